"""The BatchNorm layers the fused ops take in place of raw BN tensors.

paddle.nn.BatchNorm2D (what most Paddle code uses) and paddle.nn.BatchNorm (PaddleClas's, with
act=None or act="relu"). The ops apply the ReLU themselves, so a layer's own act must be None
or "relu": with either, the op computes relu(batch_norm(x)).
"""
import paddle
import paddle.nn.functional as F

BN_LAYER_TYPES = (paddle.nn.BatchNorm2D, paddle.nn.BatchNorm)


def check_bn_layer(op, bn, name="bn", dtype=paddle.float32):
    """The layer's (weight, bias, running mean, running variance), checked; their dtype must be
    `dtype` (None: any)."""
    if not isinstance(bn, BN_LAYER_TYPES):
        raise TypeError(f"{op}: '{name}' must be a paddle.nn.BatchNorm2D or paddle.nn.BatchNorm, "
                        f"got {type(bn).__name__}")
    act = getattr(bn, "_act", None)  # BatchNorm2D has no activation
    if act not in (None, "relu"):
        raise TypeError(f"{op}: '{name}' has act={act!r}; the op applies ReLU after the BN, so "
                        "the layer's act must be None or 'relu'")
    tensors = (bn.weight, bn.bias, bn._mean, bn._variance)  # fetched once: Layer attrs are slow
    if tensors[0] is None or tensors[1] is None:
        raise ValueError(f"{op}: '{name}' without weight or bias is not supported")
    for part, t in zip(("weight", "bias", "_mean", "_variance"), tensors):
        if dtype is not None and t.dtype != dtype:
            raise TypeError(f"{op}: '{name}'.{part} must be {dtype} (whatever the activation "
                            f"dtype), got {t.dtype}")
    layout = bn._data_layout if isinstance(bn, paddle.nn.BatchNorm) else bn._data_format
    if layout != "NCHW":
        raise ValueError(f"{op}: '{name}' must be NCHW, got {layout}")
    return tensors


def bn_layer_relu(bn, x):
    """relu(bn(x)) by the layer itself (training statistics and running updates as it does)."""
    out = bn(x)
    return out if getattr(bn, "_act", None) == "relu" else F.relu(out)
