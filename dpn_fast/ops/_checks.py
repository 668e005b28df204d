"""Argument checks shared by the ops' Python wrappers. Each raises TypeError (wrong type or dtype)
or ValueError (wrong value or shape) naming the op and the argument. The C++ ops check again, but
their errors surface as OSError (or, inside Paddle Inference, as a bare std::exception)."""
import numbers

import paddle

TENSOR_TYPES = (paddle.Tensor, paddle.pir.Value)  # a Value under paddle.jit.to_static


def check_tensor(op, name, tensor, rank=None):
    if not isinstance(tensor, TENSOR_TYPES):
        raise TypeError(f"{op}: '{name}' must be a paddle.Tensor, got {type(tensor).__name__}")
    if rank is not None and len(tensor.shape) != rank:
        raise ValueError(f"{op}: '{name}' must have rank {rank}, got shape {list(tensor.shape)}")


def check_int(op, name, value, minimum=None, choices=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: '{name}' must be an int, got {value!r} ({type(value).__name__})")
    if choices is not None and value not in choices:
        raise ValueError(f"{op}: '{name}' must be one of {choices}, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{op}: '{name}' must be >= {minimum}, got {value}")


def check_float(op, name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: '{name}' must be a number, got {value!r} ({type(value).__name__})")


def check_dtype(op, name, tensor, dtype, why=""):
    if tensor.dtype != dtype:
        raise TypeError(f"{op}: '{name}' must be {dtype}{why}, got {tensor.dtype}")


def check_same_place(op, x, named_tensors):
    """Dynamic mode only (a static Value has no place): every tensor on x's device."""
    if not paddle.in_dynamic_mode():
        return
    for name, t in named_tensors:
        if not t.place._equals(x.place):
            raise ValueError(f"{op}: '{name}' is on {t.place} but 'x' is on {x.place}")


def check_channel_vectors(op, x, channels, named_tensors, dtype=paddle.float32):
    """Per-channel parameters (BatchNorm's): each a [channels] tensor of `dtype` (None: any) on
    x's device. channels < 0 (unknown under to_static) skips the length check."""
    for name, t in named_tensors:
        check_tensor(op, name, t)
        if len(t.shape) != 1 or (channels >= 0 and t.shape[0] >= 0 and t.shape[0] != channels):
            raise ValueError(f"{op}: '{name}' must have shape [{channels}], got {list(t.shape)}")
        if dtype is not None:
            check_dtype(op, name, t, dtype)
    check_same_place(op, x, named_tensors)
