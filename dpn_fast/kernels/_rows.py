"""Argument checks shared by the channels-last kernels' launchers (torch or Paddle tensors, or
raw host pointers)."""

ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")


def dtype_name(tensor):
    return str(tensor.dtype).replace("torch.", "").replace("paddle.", "")


def check_dtypes(op, activation, same_dtype, float32):
    """activation: (label, tensor) in one of ACTIVATION_DTYPES; same_dtype: (label, tensor) pairs
    in that dtype; float32: (label, tensor or None) pairs that are float32 where given. Returns
    the activations' dtype name."""
    activation_label, activation_tensor = activation
    dtype = dtype_name(activation_tensor)
    if dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{op}: activations must be one of {ACTIVATION_DTYPES}, got {dtype}")
    for label, t in same_dtype:
        if dtype_name(t) != dtype:
            raise TypeError(f"{op}: {label} dtype {dtype_name(t)} != {activation_label}'s {dtype}")
    for label, t in float32:
        if t is not None and dtype_name(t) != "float32":
            raise TypeError(f"{op}: {label} must be float32, got {dtype_name(t)}")
    return dtype


def check_rows(op, tensors):
    """Tensors that describe themselves (torch, Paddle) must share a device and be rows: unit
    stride along channels, the given row stride. Raw pointers (_host.py) are taken as
    given. tensors: {label: (tensor, row stride or None for a vector)}."""
    devices = {str(t.device) for t, _ in tensors.values() if hasattr(t, "device")}
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors on different devices: {sorted(devices)}")
    for label, (t, ld) in tensors.items():
        strides = tuple(t.stride()) if callable(getattr(t, "stride", None)) else ()
        if strides and (strides[-1] != 1 or (ld is not None and len(strides) > 1
                                              and strides[-2] != ld)):
            raise ValueError(f"{op}: {label} must be rows of unit channel stride"
                             + ("" if ld is None else f" and row stride {ld}")
                             + f", got strides {strides}")
