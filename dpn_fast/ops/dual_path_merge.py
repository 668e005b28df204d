"""Dual-path merge: the tail of a DPN block fused with the BN+ReLU head(s) of the next.

    resid_out = resid + y[:, :R]
    dense_out = concat([dense, y[:, R:]], 1)
    act       = relu(concat([resid_out, dense_out], 1) * scale + shift)

`scale`/`shift` are an eval BatchNorm folded per channel (see `fold_batch_norm`), of shape [C]
(one output, act [N, C, H, W]) or [A, C] with A <= 2 (act [A, N, C, H, W]: a projection block
applies its two BNs, c1x1_w's and c1x1_a's, to the same concat). The `*_bn_relu` forms take the
BatchNorm layer(s) instead (paddle.nn.BatchNorm2D, or paddle.nn.BatchNorm with act None or
"relu": the ReLU is the op's): in eval the kernels fold the BN parameters per channel as
they run (nothing is cached, so optimizer steps and set_state_dict are always seen), in training
they run the fused merge and then paddle's own batch_norm, so running statistics update exactly
as the layer's do. The fused eval kernels give gradients to the activations only; when autograd
also wants gradients for scale/shift or the BN parameters (e.g. fine-tuning with frozen BN
statistics), the head runs as paddle ops after the fused merge instead, so results stay right.

Backends: "cpu" (C++/OpenMP, float32), "cuda" (float32/float16/bfloat16), "triton" (GPU, or CPU
under TRITON_INTERPRET=1), "reference" (the plain-Paddle sequence), "auto". Under
paddle.jit.to_static, "auto" records the custom op, which picks CPU or CUDA when it runs.
"""
import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from dpn_fast._extension import run_op
from dpn_fast.ops._backend import resolve_backend, triton_arg
from dpn_fast.ops._batch_norm_layer import bn_layer_relu, check_bn_layer
from dpn_fast.ops._checks import TENSOR_TYPES, check_int

__all__ = ["dual_path_merge", "concat_bn_relu", "fold_batch_norm", "dual_path_merge_bn_relu",
           "dual_path_merge_into"]

_FLOAT_DTYPES = (paddle.float32, paddle.float16, paddle.bfloat16)
_MAX_ACTS = 2


# ---------------------------------------------------------------------------------------------
# Public API


@paddle.jit.not_to_static
def dual_path_merge(resid, dense, y, scale=None, shift=None, backend="auto"):
    """(resid_out, dense_out), or (resid_out, dense_out, act) when scale/shift are given."""
    op = "dual_path_merge"
    resid, dense, y = _check_activations(op, resid, dense, y)
    affine = _check_scale_shift(op, resid, _concat_channels(resid, dense, y), scale, shift)
    backend = _resolve(backend, resid, op)
    if backend == "reference":
        return reference_dual_path_merge(resid, dense, y, scale, shift)
    if affine is not None and _needs_grad(*affine):
        # The fused head treats scale/shift as constants: fused merge, then paddle's head.
        resid_out, dense_out = dual_path_merge(resid, dense, y, backend=backend)
        return resid_out, dense_out, reference_concat_bn_relu(resid_out, dense_out, *affine)
    if backend == "triton":
        return _triton_merge(resid, dense, y, *(affine or ()))
    if affine is None:
        return tuple(run_op("dpn_fast_dual_path_merge", resid, dense, y))
    return tuple(run_op("dpn_fast_dual_path_merge_bn_relu", resid, dense, y, list(affine), []))


@paddle.jit.not_to_static
def concat_bn_relu(resid, dense, scale=None, shift=None, backend="auto", bn=None, training=None):
    """relu(concat([resid, dense], 1) * scale + shift): the head of a block or the network's end.

    Either scale/shift (see the module doc for shapes) or `bn`: a BatchNorm2D (or BatchNorm with
    act None or "relu"), or a pair of them (then a tuple of two outputs). `training` defaults to
    the layer's own mode.
    """
    op = "concat_bn_relu"
    resid, dense = _check_activations(op, resid, dense)
    if bn is not None:
        if scale is not None or shift is not None:
            raise ValueError(f"{op}: pass either scale/shift or bn, not both")
        return _bn_relu(op, resid, dense, None, bn, training, backend)
    if scale is None or shift is None:
        raise ValueError(f"{op}: needs scale and shift (or bn=)")
    affine = _check_scale_shift(op, resid, _concat_channels(resid, dense, None), scale, shift)
    backend = _resolve(backend, resid, op)
    if backend == "reference" or _needs_grad(*affine):
        return reference_concat_bn_relu(resid, dense, *affine)
    if backend == "triton":
        return _triton_merge(resid, dense, None, *affine)[0]
    return _single(run_op("dpn_fast_concat_bn_relu", resid, dense, list(affine), []))


@paddle.jit.not_to_static
def dual_path_merge_bn_relu(resid, dense, y, bn, training=None, backend="auto"):
    """(resid_out, dense_out, act) with act = BN+ReLU of the merged concat by `bn`.

    `bn`: a paddle.nn.BatchNorm2D, or a paddle.nn.BatchNorm with act None or "relu" (act is a
    tensor), or a pair of them (act is a tuple of two tensors). The ReLU is the op's.
    `training` defaults to the layer's mode; in training the batch statistics normalise and the
    running ones update exactly as in the layer.
    """
    op = "dual_path_merge_bn_relu"
    resid, dense, y = _check_activations(op, resid, dense, y)
    return _bn_relu(op, resid, dense, y, bn, training, backend)


@paddle.jit.not_to_static
def dual_path_merge_into(resid, dense_buffer, dense_channels, y, scale=None, shift=None, bn=None,
                         backend="auto"):
    """Inference form keeping a stage's dense channels in one preallocated buffer.

    `dense_buffer` [N, D_stage, H, W] holds the stage's dense part so far in its first
    `dense_channels` channels. The new channels y[:, R:] are written into it IN PLACE at
    dense_channels .. dense_channels + inc, so old dense channels are never copied again (the
    concat of dual_path_merge copies all of them every block). Returns (resid_out, dense_buffer,
    act), act the BN+ReLU of concat([resid_out, dense_buffer[:, :dense_channels + inc]]) from
    scale/shift (as in dual_path_merge) or `bn` (as in dual_path_merge_bn_relu, eval only).
    Carry on with the returned dense_buffer: in dynamic mode it is the argument itself, under
    paddle.jit.to_static the graph's updated value of it. No backward. D_stage is
    the stage's last dense width (BlockShape.dense_before + inc of its last block); at a stage's
    first block, copy the projection's dense part into dense_buffer[:, :2 * inc] first.
    Backends: "auto", "cpu", "cuda", "reference".
    """
    op = "dual_path_merge_into"
    if _dynamic() and isinstance(dense_buffer, paddle.Tensor) and not dense_buffer.is_contiguous():
        raise ValueError(f"{op}: dense_buffer must be contiguous (it is written in place)")
    resid, dense_buffer, y = _check_activations(op, resid, dense_buffer, y)
    check_int(op, "dense_channels", dense_channels, minimum=0)
    inc = y.shape[1] - resid.shape[1]
    if dense_buffer.shape[1] >= 0 and dense_channels + inc > dense_buffer.shape[1]:
        raise ValueError(f"{op}: dense_buffer has {dense_buffer.shape[1]} channels; "
                         f"{dense_channels} old + {inc} new do not fit")
    if (_dynamic() and paddle.is_grad_enabled()
            and not all(t.stop_gradient for t in (resid, dense_buffer, y))):
        raise ValueError(f"{op}: inference only (no backward); run under paddle.no_grad() or "
                         "use dual_path_merge_bn_relu")
    channels = resid.shape[1] + dense_channels + inc
    if bn is not None:
        if scale is not None or shift is not None:
            raise ValueError(f"{op}: pass either scale/shift or bn, not both")
        layers, params, epsilons = _batch_norms(op, bn, channels)
    else:
        if scale is None or shift is None:
            raise ValueError(f"{op}: needs scale and shift (or bn=)")
        params = list(_check_scale_shift(op, resid, channels, scale, shift))
        epsilons = []
    backend = _resolve(backend, resid, op)
    if backend == "triton":
        raise ValueError(f"{op}: has no Triton kernel; needs a CUDA build of dpn_fast on GPU")
    if backend == "reference":
        resid_out, act = reference_dual_path_merge_into(resid, dense_buffer, dense_channels, y,
                                                        params, epsilons)
    else:
        resid_out, dense_buffer, act = merge_into_launch(resid, dense_buffer, dense_channels, y,
                                                         params, epsilons)
    if bn is not None:
        act = _with_acts((), _split_acts(act, len(layers)), bn)
    return resid_out, dense_buffer, act


def merge_into_launch(resid, dense_buffer, dense_channels, y, params, epsilons):
    """dual_path_merge_into's custom op, unchecked (CPU float32 or a CUDA build): for callers
    whose shapes are fixed by construction, such as the fused DPN's inference path. params:
    scale, shift ([A, C] each), or per BN weight, bias, mean, variance with their `epsilons`.
    Returns (resid_out, dense_buffer, act): act [N, C, H, W] for one BN layer, else
    [A, N, C, H, W] (split by _split_acts)."""
    return run_op("dpn_fast_dual_path_merge_into", resid, dense_buffer, y, params, epsilons,
                  dense_channels)


def batch_norm_params(layers):
    """The custom ops' BN arguments of eval BatchNorm `layers`: (params, epsilons)."""
    return ([t for layer in layers for t in (layer.weight, layer.bias, layer._mean,
                                             layer._variance)],
            [float(layer._epsilon) for layer in layers])


@paddle.no_grad()
def fold_batch_norm(bn):
    """(scale, shift) of an eval BatchNorm2D or BatchNorm (act None or "relu"):
    w / sqrt(var + eps), b - mean * scale. The ops that take them apply the ReLU."""
    weight, bias, mean, variance = check_bn_layer("fold_batch_norm", bn)
    scale = weight * paddle.rsqrt(variance + bn._epsilon)
    return scale, bias - mean * scale


# ---------------------------------------------------------------------------------------------
# Plain-Paddle reference (what the fused ops replace; tests and benchmarks compare against it)


def reference_dual_path_merge(resid, dense, y, scale=None, shift=None):
    y_resid, y_dense = paddle.split(y, [resid.shape[1], y.shape[1] - resid.shape[1]], axis=1)
    resid_out = paddle.add(resid, y_resid)
    dense_out = paddle.concat([dense, y_dense], axis=1)
    if scale is None:
        return resid_out, dense_out
    return resid_out, dense_out, reference_concat_bn_relu(resid_out, dense_out, scale, shift)


def reference_concat_bn_relu(resid, dense, scale, shift):
    x = paddle.concat([resid, dense], axis=1)
    if scale.ndim == 1:
        return F.relu(x * scale.reshape([1, -1, 1, 1]) + shift.reshape([1, -1, 1, 1]))
    return F.relu(x.unsqueeze(0) * scale.reshape([scale.shape[0], 1, -1, 1, 1])
                  + shift.reshape([shift.shape[0], 1, -1, 1, 1]))


def reference_dual_path_merge_bn_relu(resid, dense, y, bn):
    """The unfused DPN sequence: split + add + concat, concat + BatchNorm layer(s) + ReLU."""
    resid_out, dense_out = reference_dual_path_merge(resid, dense, y)
    x = paddle.concat([resid_out, dense_out], axis=1)
    act = (tuple(bn_layer_relu(layer, x) for layer in bn) if isinstance(bn, (tuple, list))
           else bn_layer_relu(bn, x))
    return resid_out, dense_out, act


def reference_dual_path_merge_into(resid, dense_buffer, dense_channels, y, params, epsilons):
    """Plain-Paddle dual_path_merge_into: (resid_out, act); params/epsilons as the custom op's."""
    r, inc = resid.shape[1], y.shape[1] - resid.shape[1]
    resid_out = resid + y[:, :r]
    dense_buffer[:, dense_channels:dense_channels + inc] = y[:, r:]
    x = paddle.concat([resid_out, dense_buffer[:, :dense_channels + inc]], axis=1)
    if not epsilons:
        return resid_out, reference_concat_bn_relu(resid_out, x[:, r:], *params)
    acts = [F.relu(F.batch_norm(x, m, v, w, b, False, epsilon=eps))
            for (w, b, m, v), eps in zip(zip(*[iter(params)] * 4), epsilons)]
    return resid_out, acts[0] if len(acts) == 1 else paddle.stack(acts)


# ---------------------------------------------------------------------------------------------
# Checks (ValueError/TypeError here; the C++ ops check again as a second line)


_NAMES = ("resid", "dense", "y")


def _dynamic():
    return paddle.in_dynamic_mode()


def _check_activations(op, *tensors):
    """Cheap on the common path (this runs on every call of a ~50 us op)."""
    first = tensors[0]
    dtype = first.dtype
    shapes = []
    for name, t in zip(_NAMES, tensors):
        if not isinstance(t, TENSOR_TYPES):
            raise TypeError(f"{op}: '{name}' must be a paddle.Tensor, got {type(t).__name__}")
        shape = t.shape
        if len(shape) != 4:
            raise ValueError(f"{op}: '{name}' must be 4-D NCHW, got shape {list(shape)}")
        if t is not first and t.dtype is not dtype and t.dtype != dtype:  # `is`: the cheap test
            raise TypeError(f"{op}: '{name}' is {t.dtype} but 'resid' is {dtype}")
        shapes.append(shape)
    if dtype is not paddle.float32 and dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: activations must be float32, float16 or bfloat16, got {dtype}")
    ref = shapes[0]
    for shape in shapes[1:]:
        for axis, what in ((0, "batch"), (2, "height"), (3, "width")):
            if shape[axis] != ref[axis] and min(shape[axis], ref[axis]) >= 0:  # -1: to_static
                raise ValueError(f"{op}: {what} sizes differ: " + ", ".join(
                    f"{n} {list(s)}" for n, s in zip(_NAMES, shapes)))
    if len(shapes) == 3 and min(ref[1], shapes[2][1]) >= 0 and shapes[2][1] <= ref[1]:
        raise ValueError(f"{op}: y has {shapes[2][1]} channels; it must have resid's "
                         f"{ref[1]} plus at least one new dense channel")
    if not _dynamic():
        return tensors
    place = first.place
    for name, t in zip(_NAMES[1:], tensors[1:]):
        if not t.place._equals(place):
            raise ValueError(f"{op}: '{name}' is on {t.place} but 'resid' is on {place}")
    # Slices and transposes are strided views; the kernels index contiguous NCHW.
    if all(t.is_contiguous() for t in tensors):
        return tensors
    return tuple(t if t.is_contiguous() else t.contiguous() for t in tensors)


def _concat_channels(resid, dense, y):
    extra = y.shape[1] - resid.shape[1] if y is not None else 0
    return resid.shape[1] + dense.shape[1] + extra


def _check_scale_shift(op, resid, channels, scale, shift):
    """The op's affine inputs (scale, shift), contiguous; None without BN."""
    if scale is None and shift is None:
        return None
    if scale is None or shift is None:
        raise ValueError(f"{op}: pass both scale and shift, or neither")
    for name, t in (("scale", scale), ("shift", shift)):
        if not isinstance(t, TENSOR_TYPES):
            raise TypeError(f"{op}: '{name}' must be a paddle.Tensor, got {type(t).__name__}")
        if t.dtype is not paddle.float32 and t.dtype != paddle.float32:
            raise TypeError(f"{op}: '{name}' must be float32 (whatever the activation dtype), "
                            f"got {t.dtype}")
    shape = scale.shape
    if not (shape == [channels] or (len(shape) == 2 and 1 <= shape[0] <= _MAX_ACTS
                                    and shape[1] == channels)):
        raise ValueError(f"{op}: 'scale' must be [{channels}] or [A, {channels}] with "
                         f"A <= {_MAX_ACTS} (C = resid + dense + new dense channels), "
                         f"got {list(shape)}")
    if shift.shape != shape:
        raise ValueError(f"{op}: scale {list(shape)} and shift {list(shift.shape)} differ")
    if _dynamic():
        for name, t in (("scale", scale), ("shift", shift)):
            if not t.place._equals(resid.place):
                raise ValueError(f"{op}: '{name}' is on {t.place} but 'resid' is on {resid.place}")
        if not (scale.is_contiguous() and shift.is_contiguous()):
            scale, shift = scale.contiguous(), shift.contiguous()
    return scale, shift


def _batch_norms(op, bn, channels):
    """(layers, params, epsilons) of `bn` (one BatchNorm layer or a pair), checked; params and
    epsilons as batch_norm_params gives them."""
    layers = tuple(bn) if isinstance(bn, (tuple, list)) else (bn,)
    if not 1 <= len(layers) <= _MAX_ACTS:
        raise ValueError(f"{op}: expects 1 or {_MAX_ACTS} BatchNorm layers, got {len(layers)}")
    for layer in layers:
        weight = check_bn_layer(op, layer)[0]
        if channels >= 0 and weight.shape[0] != channels:
            raise ValueError(f"{op}: BatchNorm has {weight.shape[0]} channels, the concat "
                             f"has {channels}")
    return (layers, *batch_norm_params(layers))


def _resolve(backend, resid, op):
    if not _dynamic():
        if backend not in ("auto", "cpu", "cuda", "reference"):
            raise ValueError(f"{op}: backend={backend!r} cannot run under paddle.jit.to_static; "
                             "use 'auto'")
        return "reference" if backend == "reference" else "custom"
    backend = resolve_backend(backend, resid, op)
    if backend == "cpu" and resid.dtype != paddle.float32:
        raise TypeError(f"{op}: the CPU kernels support float32 only, got {resid.dtype}; cast "
                        "to float32 or run on GPU")
    return backend


def _single(outputs):
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


# ---------------------------------------------------------------------------------------------
# BatchNorm-layer forms


def _bn_relu(op, resid, dense, y, bn, training, backend):
    layers, params, epsilons = _batch_norms(op, bn, _concat_channels(resid, dense, y))
    if training is None:
        training = layers[0].training
    backend = _resolve(backend, resid, op)
    if training or backend == "reference" or _needs_grad(*params[0::4], *params[1::4]):
        # Paddle's batch_norm where it must run: training statistics, or gradients for the BN
        # parameters (eval-mode BN with trainable weight/bias), which the fused head lacks.
        return _bn_relu_paddle(resid, dense, y, layers, bn, backend, training)
    if backend == "triton":
        scale, shift = zip(*(fold_batch_norm(layer) for layer in layers))
        outs = _triton_merge(resid, dense, y, paddle.stack(scale), paddle.stack(shift))
        return _with_acts(outs[:-1], paddle.unbind(outs[-1], 0), bn)
    if y is None:
        act = _single(run_op("dpn_fast_concat_bn_relu", resid, dense, params, epsilons))
        return _with_acts((), _split_acts(act, len(layers)), bn)
    resid_out, dense_out, act = run_op("dpn_fast_dual_path_merge_bn_relu", resid, dense, y, params,
                                       epsilons)
    return _with_acts((resid_out, dense_out), _split_acts(act, len(layers)), bn)


def _bn_relu_paddle(resid, dense, y, layers, bn, backend, training):
    """Fused merge (with its backward), then paddle's batch_norm on the concat, exactly as the
    layer does (in training: batch statistics; running mean/variance updated with the layer's
    momentum)."""
    merged = ()
    if y is not None:
        if backend == "triton":
            merged = _triton_merge(resid, dense, y)
        elif backend == "reference":
            merged = reference_dual_path_merge(resid, dense, y)
        else:
            merged = tuple(run_op("dpn_fast_dual_path_merge", resid, dense, y))
        resid, dense = merged
    x = paddle.concat([resid, dense], axis=1)
    acts = tuple(F.relu(F.batch_norm(x, layer._mean, layer._variance, layer.weight, layer.bias,
                                     training, layer._momentum, layer._epsilon,
                                     use_global_stats=(layer._use_global_stats if training
                                                       else None)))
                 for layer in layers)
    return _with_acts(merged, acts, bn)


def _needs_grad(*tensors):
    """Whether autograd wants gradients for any of these (dynamic mode; a captured graph keeps
    the fused op, whose inputs' gradients are right, and treats per-channel parameters as
    constants)."""
    return (_dynamic() and paddle.is_grad_enabled()
            and any(not t.stop_gradient for t in tensors))


def _split_acts(act, num_acts):
    return (act,) if num_acts == 1 else tuple(paddle.unbind(act, 0))


def _with_acts(merged, acts, bn):
    act = acts if isinstance(bn, (tuple, list)) else acts[0]
    return (*merged, act) if merged else act


# ---------------------------------------------------------------------------------------------
# Triton (GPU, or CPU under TRITON_INTERPRET=1)


def _triton_merge(resid, dense, y, scale=None, shift=None):
    """Outputs as the custom ops: (resid_out, dense_out[, act]) or, without y, (act,)."""
    stacked = scale is not None and scale.ndim == 2
    if scale is not None and not stacked:
        scale, shift = scale.unsqueeze(0), shift.unsqueeze(0)
    inputs = [t for t in (resid, dense, y, scale, shift) if t is not None]
    outs = _TritonMerge.apply(*inputs, has_y=y is not None, has_affine=scale is not None)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    if scale is not None and not stacked:
        outs = (*outs[:-1], outs[-1].squeeze(0))
    return tuple(outs)


class _TritonMerge(PyLayer):
    @staticmethod
    def forward(ctx, *inputs, has_y, has_affine):
        from dpn_fast.kernels import dual_path_merge as kernels

        resid, dense = inputs[:2]
        y = inputs[2] if has_y else None
        scale, shift = inputs[-2:] if has_affine else (None, None)
        n, r, h, w = resid.shape
        d = dense.shape[1]
        inc = y.shape[1] - r if has_y else 0
        channels = r + d + inc
        num_acts = scale.shape[0] if has_affine else 0
        outs = []
        resid_out = dense_out = act = None
        if has_y:
            resid_out = paddle.empty_like(resid)
            dense_out = paddle.empty([n, d + inc, h, w], dtype=resid.dtype)
            outs += [resid_out, dense_out]
        if num_acts:
            act = paddle.empty([num_acts, n, channels, h, w], dtype=resid.dtype)
            outs.append(act)
        arg = lambda t: None if t is None else triton_arg(t)  # noqa: E731
        kernels.merge_forward(arg(resid), arg(dense), arg(y), arg(scale), arg(shift),
                              arg(resid_out), arg(dense_out), arg(act), n, r, d, inc, h * w,
                              num_acts)
        ctx.has_y, ctx.num_acts, ctx.shape = has_y, num_acts, (n, r, d, inc, h, w)
        ctx.dtype = resid.dtype
        # The BN'd concat, for the ReLU mask in backward.
        x_parts = (resid_out, dense_out) if has_y else (resid, dense)
        ctx.save_for_backward(*(x_parts if num_acts else ()), *((scale, shift) if num_acts else ()))
        return tuple(outs) if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        from dpn_fast.kernels import dual_path_merge as kernels

        n, r, d, inc, h, w = ctx.shape
        x_resid, x_dense, scale, shift = ctx.saved_tensor() if ctx.num_acts else (None,) * 4
        grads = list(grads)
        g_resid_out = grads.pop(0) if ctx.has_y else None
        g_dense_out = grads.pop(0) if ctx.has_y else None
        g_act = grads.pop(0) if ctx.num_acts else None
        if (g_resid_out is None) != (g_dense_out is None):  # one merge output unused
            if g_resid_out is None:
                g_resid_out = paddle.zeros([n, r, h, w], ctx.dtype)
            else:
                g_dense_out = paddle.zeros([n, d + inc, h, w], ctx.dtype)
        g_resid = paddle.empty([n, r, h, w], dtype=ctx.dtype)
        g_dense = paddle.empty([n, d, h, w], dtype=ctx.dtype)
        g_y = paddle.empty([n, r + inc, h, w], dtype=ctx.dtype) if ctx.has_y else None
        arg = lambda t: None if t is None else triton_arg(t.contiguous())  # noqa: E731
        kernels.merge_backward(arg(x_resid), arg(x_dense), arg(g_resid_out), arg(g_dense_out),
                               arg(g_act), arg(scale), arg(shift), arg(g_resid), arg(g_dense),
                               arg(g_y), n, r, d, inc, h * w,
                               ctx.num_acts if g_act is not None else 0)
        grads_in = [g_resid, g_dense] + ([g_y] if ctx.has_y else [])
        if ctx.num_acts:
            grads_in += [None, None]
        return tuple(grads_in)
