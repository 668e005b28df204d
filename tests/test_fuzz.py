"""Seeded fuzzing of every public op and the models' forward (CPU).

Each case is a random valid call, or one with a single defect: a bad shape, rank, dtype, group or
stride value, argument type, backend, BatchNorm layer; or an input the op must handle: a
non-contiguous view, an empty batch, NaN/Inf. The rules:
  - nothing crashes (the cases run in a subprocess, which reports the case it died in);
  - an invalid call raises TypeError/ValueError whose message names the op;
  - a call that returns (valid cases must) matches the plain-Paddle reference in float64 by the
    project's 2x rule (tests/utils.py), with NaN/Inf exactly where the reference has them.
CI runs a few hundred cases, `-m slow` thousands (docs/reliability.md records the counts).
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import paddle
import pytest

from utils import assert_matches_reference, random_bn

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
TYPED_ERRORS = (TypeError, ValueError)
VALID, INVALID = "valid", "invalid"


class Case:
    def __init__(self, op, label, kind, run):
        self.op, self.label, self.kind = op, label, kind
        self.run = run  # run(prec), prec "fused", "ref32" or "ref64" -> outputs (tensor or tuple)


def _tensor(array, dtype):
    return paddle.to_tensor(np.asarray(array).astype(dtype))


class Inputs:
    """A case's float64 arrays; `tensors(prec)` builds them in the run's dtype, applying the
    case's views (non-contiguous), casts and replacements (fused run only)."""

    def __init__(self, **arrays):
        self.arrays, self.views, self.casts, self.replace = arrays, {}, {}, {}

    def tensors(self, prec):
        dtype = "float64" if prec == "ref64" else "float32"
        out = {}
        for name, a in self.arrays.items():
            if prec == "fused" and name in self.replace:
                out[name] = self.replace[name]
                continue
            t = _tensor(a, self.casts.get(name, dtype) if prec == "fused" else dtype)
            out[name] = self.views[name](t) if name in self.views else t
        return out

    def poison(self, rng, name):
        """NaN and +-Inf at random positions of one input."""
        a = self.arrays[name]
        if a.size:
            flat = a.reshape(-1)
            for value in (np.nan, np.inf, -np.inf):
                flat[rng.integers(0, flat.size)] = value


def _pick(rng, options):
    return options[rng.integers(0, len(options))]


def _normal(rng, *shape):
    return rng.standard_normal(shape)


def _transposed(rng, shape):
    """(array, view): an array whose [0, 1, 3, 2] transpose (non-contiguous) has `shape`."""
    n, c, h, w = shape
    return _normal(rng, n, c, w, h), lambda t: t.transpose([0, 1, 3, 2])


def _sliced(rng, shape):
    """(array, view): a channel slice (non-contiguous unless the batch is 1 and..., never
    assumed) of a wider array."""
    n, c, h, w = shape
    return _normal(rng, n, c + 3, h, w), lambda t: t[:, 2:2 + c]


def _view_input(rng, inputs, name, shape):
    array, view = (_transposed if rng.random() < 0.5 else _sliced)(rng, shape)
    inputs.arrays[name], inputs.views[name] = array, view


# ---------------------------------------------------------------------------------------------
# grouped_conv_bn_relu and GroupedConvBNReLUFolder

BN = ("bn_weight", "bn_bias", "bn_mean", "bn_var")
IN_BN = ("in_bn_weight", "in_bn_bias", "in_bn_mean", "in_bn_var")


def _conv_defects(c, c_out, groups):
    """(label, kind, mutate(inputs, kwargs)) for grouped_conv_bn_relu."""
    def cast(name, dtype, *more):
        def mutate(inputs, kwargs):
            for n in (name,) + more:
                inputs.casts[n] = dtype
        return mutate

    def set_kw(**values):
        return lambda inputs, kwargs: kwargs.update(values)

    def resize(name, shape):
        return lambda inputs, kwargs: inputs.arrays.__setitem__(name, np.ones(shape))

    x_shape = lambda inputs: inputs.arrays["x"].shape  # noqa: E731
    return [
        ("groups=0", INVALID, set_kw(groups=0)),
        ("groups=-2", INVALID, set_kw(groups=-2)),
        ("groups float", INVALID, set_kw(groups=float(groups) + 0.5)),
        ("groups str", INVALID, set_kw(groups=str(groups))),
        ("groups not dividing", INVALID, set_kw(groups=c + 1)),
        ("stride 0", INVALID, set_kw(stride=0)),
        ("stride 3", INVALID, set_kw(stride=3)),
        ("stride float", INVALID, set_kw(stride=1.0)),
        ("stride None", INVALID, set_kw(stride=None)),
        ("epsilon str", INVALID, set_kw(epsilon="1e-5")),
        ("backend tpu", INVALID, set_kw(backend="tpu")),
        ("backend cuda", INVALID, set_kw(backend="cuda")),
        ("x float64", INVALID, cast("x", "float64")),
        ("x+weight float64", INVALID, cast("x", "float64", "weight")),
        ("x+weight float16", INVALID, cast("x", "float16", "weight")),
        ("x+weight int32", INVALID, cast("x", "int32", "weight")),
        ("bn_var float64", INVALID, cast("bn_var", "float64")),
        ("x rank 3", INVALID, lambda i, k: i.arrays.__setitem__("x", i.arrays["x"][0])),
        ("x rank 5", INVALID, lambda i, k: i.arrays.__setitem__("x", i.arrays["x"][None])),
        ("x no channels", INVALID, lambda i, k: i.arrays.__setitem__("x", i.arrays["x"][:, :0])),
        ("x empty image", INVALID, lambda i, k: i.arrays.__setitem__("x", i.arrays["x"][:, :, :0])),
        ("weight 5x5", INVALID, resize("weight", (c_out, c // groups, 5, 5))),
        ("weight wrong C/groups", INVALID, resize("weight", (c_out, c // groups + 1, 3, 3))),
        ("weight rank 3", INVALID, resize("weight", (c_out, c // groups, 9))),
        ("weight no outputs", INVALID, resize("weight", (0, c // groups, 3, 3))),
        ("bn_mean short", INVALID, resize("bn_mean", (c_out - 1,))),
        ("bn_var long", INVALID, resize("bn_var", (c_out + 1,))),
        ("bn_weight 2-D", INVALID, resize("bn_weight", (c_out, 1))),
        ("x numpy", INVALID, lambda i, k: i.replace.__setitem__("x", i.arrays["x"])),
        ("bn_bias list", INVALID, lambda i, k: i.replace.__setitem__("bn_bias", [0.0] * c_out)),
        ("x strided", VALID, lambda i, k: _view_input(np.random.default_rng(c), i, "x",
                                                        x_shape(i))),
        ("weight strided", VALID, lambda i, k: (
            i.arrays.__setitem__("weight", i.arrays["weight"].transpose(0, 1, 3, 2).copy()),
            i.views.__setitem__("weight", lambda t: t.transpose([0, 1, 3, 2])))),
        ("bn_var strided", VALID, lambda i, k: (
            i.arrays.__setitem__("bn_var", np.repeat(i.arrays["bn_var"], 2)),
            i.views.__setitem__("bn_var", lambda t: t[::2]))),
        ("NaN/Inf in x", VALID, lambda i, k: i.poison(np.random.default_rng(c_out), "x")),
        ("empty batch", VALID, lambda i, k: i.arrays.__setitem__("x", i.arrays["x"][:0])),
    ]


def gen_grouped_conv(rng):
    from dpn_fast.ops import grouped_conv_bn_relu
    n, groups = _pick(rng, [1, 1, 2, 3]), _pick(rng, [1, 2, 3, 4, 8])
    c, c_out = groups * int(rng.integers(1, 7)), groups * int(rng.integers(1, 5))
    h, w = (int(v) for v in rng.integers(1, 13, 2))
    # Training normalises over at least 4 values per channel: over one, batch statistics amplify
    # rounding by 1/sqrt(eps) (docs/reliability.md, open issues).
    training = rng.random() < 0.25 and n * h * w >= 16
    prologue = not training and rng.random() < 0.3
    inputs = Inputs(x=_normal(rng, n, c, h, w),
                    weight=_normal(rng, c_out, c // groups, 3, 3) / np.sqrt(9 * c // groups),
                    **random_bn(rng, c_out),
                    **({f"in_{k}": v for k, v in random_bn(rng, c).items()} if prologue else {}))
    kwargs = {"stride": _pick(rng, [1, 2]), "groups": groups, "training": training}
    label, kind = "valid", VALID
    if rng.random() < 0.75:
        label, kind, mutate = _pick(rng, _conv_defects(c, c_out, groups))
        mutate(inputs, kwargs)
        if label == "empty batch" and training:
            kind = INVALID
    backend = kwargs.pop("backend", "cpu")

    def run(prec):
        t = inputs.tensors(prec)
        input_bn = tuple(t[k] for k in IN_BN) + (1e-5,) if prologue else None
        return grouped_conv_bn_relu(t["x"], t["weight"], *(t[k] for k in BN), **kwargs,
                                    input_bn=input_bn,
                                    backend=backend if prec == "fused" else "reference")
    return Case("grouped_conv_bn_relu", f"{label} n{n} c{c}->{c_out} g{groups} {h}x{w} "
                f"{kwargs} train={training} prologue={prologue}", kind, run)


def gen_folder(rng):
    """GroupedConvBNReLUFolder over layers; the reference is the functional op's reference on
    the same parameters."""
    from dpn_fast.ops import GroupedConvBNReLUFolder, grouped_conv_bn_relu
    groups = _pick(rng, [1, 2, 4])
    c = groups * int(rng.integers(1, 5))
    stride = _pick(rng, [1, 2])
    conv = paddle.nn.Conv2D(c, c, 3, stride=stride, padding=1, groups=groups, bias_attr=False)
    bn = paddle.nn.BatchNorm(c, act="relu")
    for layer in (conv, bn):
        layer.eval()
    params = random_bn(rng, c)
    for name, attr in zip(BN, ("weight", "bias", "_mean", "_variance")):
        getattr(bn, attr).set_value(params[name].astype("float32"))
    n, h, w = 1, int(rng.integers(1, 10)), int(rng.integers(1, 10))
    x = _normal(rng, n, c, h, w)
    label, kind = "valid", VALID
    layer_args = {"conv": conv, "bn": bn}
    defect = rng.integers(0, 8) if rng.random() < 0.6 else None
    if defect == 0:
        label, kind, layer_args["conv"] = "conv is a BatchNorm", INVALID, bn
    elif defect == 1:
        label, kind = "conv padding 2", INVALID
        layer_args["conv"] = paddle.nn.Conv2D(c, c, 3, padding=2, groups=groups, bias_attr=False)
    elif defect == 2:
        # act=None: the op applies the ReLU itself (same parameters)
        label, layer_args["bn"] = "bn with act None", paddle.nn.BatchNorm(c)
        layer_args["bn"].set_state_dict(bn.state_dict())
        layer_args["bn"].eval()
    elif defect == 3:
        label, kind, x = "x channels", INVALID, _normal(rng, n, c + 1, h, w)
    elif defect == 4:
        label, kind, x = "x rank 3", INVALID, x[0]
    elif defect == 5:
        label, kind = "NaN/Inf in x", VALID
        x.reshape(-1)[0], x.reshape(-1)[-1] = np.nan, np.inf
    dtype = "float64" if defect == 6 else "float32"
    if defect == 6:
        label, kind = "x float64", INVALID
    transpose = defect == 7
    if transpose:
        label, x = "x strided", x.transpose(0, 1, 3, 2).copy()

    def run(prec):
        xt = _tensor(x, dtype if prec == "fused" else ("float64" if prec == "ref64" else "float32"))
        xt = xt.transpose([0, 1, 3, 2]) if transpose else xt
        if prec == "fused":
            return GroupedConvBNReLUFolder(**layer_args)(xt)
        cast = lambda t: t.astype(xt.dtype)  # noqa: E731
        return grouped_conv_bn_relu(xt, cast(conv.weight), *(cast(t) for t in (
            bn.weight, bn.bias, bn._mean, bn._variance)), stride=stride, groups=groups,
            backend="reference")
    return Case("grouped_conv_bn_relu", f"Folder {label} c{c} g{groups} s{stride} {h}x{w}",
                kind, run)


# ---------------------------------------------------------------------------------------------
# The merge family and fold_batch_norm

def _merge_defects(r, d, inc):
    def cast(*names, dtype):
        return lambda inputs, ctx: inputs.casts.update({n: dtype for n in names})

    def set_array(name, fn):
        return lambda inputs, ctx: inputs.arrays.__setitem__(name, fn(inputs.arrays[name]))

    return [
        ("resid rank 3", INVALID, set_array("resid", lambda a: a[0])),
        ("dense batch", INVALID, set_array("dense", lambda a: np.concatenate([a, a]))),
        ("y height", INVALID, set_array("y", lambda a: a[:, :, :-1] if a.shape[2] > 1 else
                                         np.concatenate([a, a], 2))),
        ("y without new channels", INVALID, set_array("y", lambda a: a[:, :r])),
        ("all float64", INVALID, cast("resid", "dense", "y", dtype="float64")),
        ("all float16", INVALID, cast("resid", "dense", "y", dtype="float16")),
        ("all int32", INVALID, cast("resid", "dense", "y", dtype="int32")),
        ("y float64", INVALID, cast("y", dtype="float64")),
        ("scale float64", INVALID, cast("scale", dtype="float64")),
        ("scale short", INVALID, set_array("scale", lambda a: a[..., :-1])),
        ("shift rank 3", INVALID, set_array("shift", lambda a: a[None, None])),
        ("three acts", INVALID, lambda i, ctx: [i.arrays.__setitem__(k, np.stack(
            [i.arrays[k].reshape(-1, i.arrays[k].shape[-1])[0]] * 3)) for k in ("scale", "shift")]),
        ("scale only", INVALID, lambda i, ctx: ctx.update(no_shift=True)),
        ("resid numpy", INVALID, lambda i, ctx: i.replace.__setitem__("resid", i.arrays["resid"])),
        ("backend tpu", INVALID, lambda i, ctx: ctx.update(backend="tpu")),
        ("backend cuda", INVALID, lambda i, ctx: ctx.update(backend="cuda")),
        ("bn float64", INVALID, lambda i, ctx: ctx.update(bn_dtype="float64")),
        ("bn with act None", VALID, lambda i, ctx: ctx.update(bn_act=None)),
        ("bn is BatchNorm2D", VALID, lambda i, ctx: ctx.update(bn_class="2D")),
        ("three bns", INVALID, lambda i, ctx: ctx.update(bn_count=3)),
        ("bn channels", INVALID, lambda i, ctx: ctx.update(bn_extra=1)),
        ("strided resid/dense/y", VALID, lambda i, ctx: [
            _view_input(np.random.default_rng(r + d), i, k, i.arrays[k].shape)
            for k in ("resid", "dense", "y")]),
        ("strided scale", VALID, lambda i, ctx: (
            i.arrays.__setitem__("scale", np.repeat(i.arrays["scale"], 2, axis=-1)),
            i.views.__setitem__("scale", lambda t: t[..., ::2]))),
        ("NaN/Inf in y and resid", VALID, lambda i, ctx: [
            i.poison(np.random.default_rng(inc), k) for k in ("y", "resid")]),
        ("empty batch", VALID, lambda i, ctx: [
            i.arrays.__setitem__(k, i.arrays[k][:0]) for k in ("resid", "dense", "y")]),
        ("empty image", VALID, lambda i, ctx: [
            i.arrays.__setitem__(k, i.arrays[k][:, :, :0]) for k in ("resid", "dense", "y")]),
    ]


def _bn_layers(rng, channels, count, dtype="float32", act="relu", bn_class=None):
    layers = []
    for _ in range(count):
        layer = (paddle.nn.BatchNorm2D(channels) if bn_class == "2D"
                 else paddle.nn.BatchNorm(channels, act=act))
        params = random_bn(rng, channels)
        for name, attr in zip(BN, ("weight", "bias", "_mean", "_variance")):
            getattr(layer, attr).set_value(params[name].astype("float32"))
        layer.eval()
        layers.append(layer)
    return layers


def _bn_reference(x, layers, dtype):
    """relu(eval batch_norm(x)) per layer, with the layers' parameters cast to `dtype`."""
    import paddle.nn.functional as F
    cast = lambda t: t.astype(dtype)  # noqa: E731
    return tuple(F.relu(F.batch_norm(x, cast(layer._mean), cast(layer._variance),
                                     cast(layer.weight), cast(layer.bias), False,
                                     epsilon=layer._epsilon))
                 for layer in layers)


def gen_merge(rng):
    import dpn_fast.ops as ops
    from dpn_fast.ops.dual_path_merge import (reference_concat_bn_relu,
                                              reference_dual_path_merge)
    form = _pick(rng, ["merge", "merge_affine", "concat_bn_relu", "merge_bn_relu",
                       "concat_bn_relu_bn", "merge_into", "merge_into_bn"])
    n, r, d, inc = (_pick(rng, [1, 2, 3]), int(rng.integers(0, 9)), int(rng.integers(0, 9)),
                    int(rng.integers(1, 6)))
    h, w = (int(v) for v in rng.integers(1, 9, 2))
    with_y = form not in ("concat_bn_relu", "concat_bn_relu_bn")
    channels = r + d + (inc if with_y else 0)
    num_acts = int(rng.integers(1, 3))
    stacked = num_acts == 2 or rng.random() < 0.3
    affine_shape = (num_acts, channels) if stacked else (channels,)
    inputs = Inputs(resid=_normal(rng, n, r, h, w), dense=_normal(rng, n, d, h, w),
                    y=_normal(rng, n, r + inc, h, w), scale=_normal(rng, *affine_shape),
                    shift=_normal(rng, *affine_shape))
    ctx = {"backend": "cpu"}
    label, kind = "valid", VALID
    if rng.random() < 0.75:
        label, kind, mutate = _pick(rng, _merge_defects(r, d, inc))
        mutate(inputs, ctx)
    uses_bn = form.endswith("_bn") or form == "merge_bn_relu"
    uses_affine = form in ("merge_affine", "concat_bn_relu", "merge_into")
    if (label.startswith("bn") or label == "three bns") and not uses_bn:
        label, kind = "valid", VALID  # the defect does not apply to this form
    if label.startswith(("scale", "shift", "three acts", "strided scale")) and not uses_affine:
        label, kind = "valid", VALID
    if label.startswith(("y ", "y without")) and not with_y:
        label, kind = "valid", VALID
    bn_count = ctx.get("bn_count", num_acts)
    layers = _bn_layers(rng, channels + ctx.get("bn_extra", 0), bn_count,
                        act=ctx.get("bn_act", "relu"), bn_class=ctx.get("bn_class"))
    if ctx.get("bn_dtype"):
        for layer in layers:
            layer.to(dtype=ctx["bn_dtype"])
    bn = tuple(layers) if stacked or bn_count != num_acts else layers[0]
    dense_extra = int(rng.integers(0, 3))
    op_name = {"merge": "dual_path_merge", "merge_affine": "dual_path_merge",
               "concat_bn_relu": "concat_bn_relu", "concat_bn_relu_bn": "concat_bn_relu",
               "merge_bn_relu": "dual_path_merge_bn_relu", "merge_into": "dual_path_merge_into",
               "merge_into_bn": "dual_path_merge_into"}[form]

    def run(prec):
        t = inputs.tensors(prec)
        resid, dense, y, scale, shift = (t[k] for k in ("resid", "dense", "y", "scale", "shift"))
        shift = None if ctx.get("no_shift") else shift
        if prec != "fused":  # the plain-Paddle sequence, in the run's dtype
            dt = "float64" if prec == "ref64" else "float32"
            if with_y:
                merged = reference_dual_path_merge(resid, dense, y)
                resid, dense = merged
            x_parts = (resid, dense)
            if uses_bn:
                act = _bn_reference(paddle.concat(x_parts, 1), layers, dt)
                act = act if isinstance(bn, tuple) else act[0]
            elif uses_affine:
                act = reference_concat_bn_relu(*x_parts, scale, shift)
            outs = (merged if with_y else ()) + ((act,) if form != "merge" else ())
            return outs if len(outs) > 1 else outs[0]
        backend = ctx["backend"]
        if form == "merge":
            return ops.dual_path_merge(resid, dense, y, backend=backend)
        if form == "merge_affine":
            return ops.dual_path_merge(resid, dense, y, scale, shift, backend=backend)
        if form == "concat_bn_relu":
            return ops.concat_bn_relu(resid, dense, scale, shift, backend=backend)
        if form == "concat_bn_relu_bn":
            return ops.concat_bn_relu(resid, dense, bn=bn, backend=backend)
        if form == "merge_bn_relu":
            return ops.dual_path_merge_bn_relu(resid, dense, y, bn, backend=backend)
        # merge_into: the old dense channels sit at the front of a larger buffer.
        if isinstance(dense, paddle.Tensor):
            buffer = paddle.concat([dense.contiguous(), paddle.zeros(
                [dense.shape[0], inc + dense_extra, *dense.shape[2:]], dense.dtype)], 1)
        else:
            buffer = dense
        with paddle.no_grad():
            resid_out, buffer, act = ops.dual_path_merge_into(
                resid, buffer, d, y, *((scale, shift) if form == "merge_into" else ()),
                bn=bn if form == "merge_into_bn" else None, backend=backend)
        return resid_out, buffer[:, :d + inc], act
    return Case(op_name, f"{form} {label} n{n} r{r} d{d} inc{inc} {h}x{w} acts{num_acts} "
                f"stacked={stacked}", kind, run)


def gen_merge_into_arguments(rng):
    """dual_path_merge_into's own arguments: dense_channels and the in-place buffer."""
    import dpn_fast.ops as ops
    n, r, d, inc, hw = 1, 3, 2, 2, 4
    base = Inputs(resid=_normal(rng, n, r, hw, hw), y=_normal(rng, n, r + inc, hw, hw),
                  scale=_normal(rng, r + d + inc), shift=_normal(rng, r + d + inc))
    label, dense_channels, buffer_channels, transpose = _pick(rng, [
        ("dense_channels -1", -1, d + inc, False), ("dense_channels float", 2.0, d + inc, False),
        ("dense_channels bool", True, d + inc, False), ("dense_channels str", "2", d + inc, False),
        ("buffer too small", d, d + inc - 1, False), ("buffer strided", d, d + inc, True)])

    def run(prec):
        t = base.tensors(prec)
        buffer = paddle.zeros([n, buffer_channels, hw, hw])
        buffer = buffer.transpose([0, 1, 3, 2]) if transpose else buffer
        with paddle.no_grad():
            return ops.dual_path_merge_into(t["resid"], buffer, dense_channels, t["y"],
                                            t["scale"], t["shift"])
    return Case("dual_path_merge_into", label, INVALID, run)


def gen_fold_batch_norm(rng):
    from dpn_fast.ops import fold_batch_norm
    c = int(rng.integers(1, 9))
    label, kind, layer = "valid", VALID, _bn_layers(rng, c, 1)[0]
    if rng.random() < 0.5:
        label, kind, layer = _pick(rng, [
            ("BatchNorm2D", VALID, _bn_layers(rng, c, 1, bn_class="2D")[0]),
            ("None", INVALID, None), ("a Conv2D", INVALID, paddle.nn.Conv2D(c, c, 1)),
            ("a tensor", INVALID, paddle.ones([c]))])

    def run(prec):
        if prec == "fused":
            return fold_batch_norm(layer)
        dt = "float64" if prec == "ref64" else "float32"
        w, b, m, v = (t.astype(dt) for t in (layer.weight, layer.bias, layer._mean,
                                             layer._variance))
        scale = w / paddle.sqrt(v + layer._epsilon)
        return scale, b - m * scale
    return Case("fold_batch_norm", f"{label} c{c}", kind, run)


# ---------------------------------------------------------------------------------------------
# stem_conv_bn_relu_pool

def gen_stem(rng):
    from dpn_fast.ops import stem_conv_bn_relu_pool
    n, c = _pick(rng, [1, 1, 2]), _pick(rng, [3, 3, 1, 4])
    c_out, kernel = int(rng.integers(1, 20)), _pick(rng, [3, 5, 7])
    stride = _pick(rng, [2, 2, 1, 3])
    h, w = (int(v) for v in rng.integers(1, 24, 2))
    inputs = Inputs(x=_normal(rng, n, c, h, w),
                    weight=_normal(rng, c_out, c, kernel, kernel) / np.sqrt(c * kernel ** 2),
                    **random_bn(rng, c_out))
    kwargs = {"stride": stride}
    label, kind = "valid", VALID
    if rng.random() < 0.7:
        def resize(name, shape):
            return lambda: inputs.arrays.__setitem__(name, np.ones(shape))
        defects = [
            ("kernel even", INVALID, resize("weight", (c_out, c, 4, 4))),
            ("kernel 13", INVALID, resize("weight", (c_out, c, 13, 13))),
            ("kernel not square", INVALID, resize("weight", (c_out, c, 3, 5))),
            ("weight channels", INVALID, resize("weight", (c_out, c + 1, kernel, kernel))),
            ("bn_mean short", INVALID, resize("bn_mean", (c_out + 1,))),
            ("x rank 3", INVALID, lambda: inputs.arrays.__setitem__("x", inputs.arrays["x"][0])),
            ("x empty image", INVALID, lambda: inputs.arrays.__setitem__(
                "x", inputs.arrays["x"][:, :, :, :0])),
            ("stride 0", INVALID, lambda: kwargs.update(stride=0)),
            ("stride > kernel", INVALID, lambda: kwargs.update(stride=kernel + 1)),
            ("stride float", INVALID, lambda: kwargs.update(stride=2.5)),
            ("epsilon None", INVALID, lambda: kwargs.update(epsilon=None)),
            ("backend cuda", INVALID, lambda: kwargs.update(backend="cuda")),
            ("x+weight float64", INVALID, lambda: inputs.casts.update(x="float64",
                                                                      weight="float64")),
            ("bn_var float64", INVALID, lambda: inputs.casts.update(bn_var="float64")),
            ("x list", INVALID, lambda: inputs.replace.update(x=inputs.arrays["x"].tolist())),
            ("x strided", VALID, lambda: _view_input(rng, inputs, "x", inputs.arrays["x"].shape)),
            ("weight strided", VALID, lambda: (
                inputs.arrays.__setitem__("weight",
                                          inputs.arrays["weight"].transpose(0, 1, 3, 2).copy()),
                inputs.views.__setitem__("weight", lambda t: t.transpose([0, 1, 3, 2])))),
            ("NaN/Inf in x", VALID, lambda: inputs.poison(rng, "x")),
            ("empty batch", VALID, lambda: inputs.arrays.__setitem__("x", inputs.arrays["x"][:0])),
        ]
        label, kind, mutate = _pick(rng, defects)
        mutate()
    backend = kwargs.pop("backend", "cpu")

    def run(prec):
        t = inputs.tensors(prec)
        with paddle.no_grad():
            return stem_conv_bn_relu_pool(t["x"], t["weight"], *(t[k] for k in BN), **kwargs,
                                          backend=backend if prec == "fused" else "reference")
    return Case("stem_conv_bn_relu_pool", f"{label} n{n} c{c}->{c_out} k{kernel} {h}x{w} "
                f"{kwargs}", kind, run)


# ---------------------------------------------------------------------------------------------
# dpn_block, dpn_head and fold_batch_norms (the whole-block and head ops, CPU inference)

def _block_shape(rng):
    """A small random BlockShape: a projection (the network's first block, input the stem's
    output), a stride-2 first block of a later stage, or a normal block."""
    from dpn_fast.models.config import BlockShape
    kind = _pick(rng, ["proj", "down", "normal", "normal"])
    groups, per_group = _pick(rng, [1, 2, 3, 4]), _pick(rng, [1, 2, 3])
    in_resid = 0 if kind == "proj" else int(rng.integers(1, 7))
    hw, stride = int(rng.integers(1, 10)), 2 if kind == "down" else 1
    inc = int(rng.integers(1, 4))
    return BlockShape(model="DPN68", stage=0, index=0, kind=kind, in_resid=in_resid,
                      in_dense=int(rng.integers(1, 7)), in_hw=hw, out_hw=(hw - 1) // stride + 1,
                      bottleneck=groups * per_group, groups=groups, stride=stride,
                      resid=in_resid if kind == "normal" else int(rng.integers(1, 7)),
                      dense_before=0, inc=inc)


def _float_pair(rng, make):
    from test_dpn_block import pair
    return pair(make, rng)


def gen_dpn_block(rng):
    from dpn_fast.models.dpn import DualPathBlock
    from dpn_fast.ops import dpn_block
    from test_dpn_block import block_arguments
    shape = _block_shape(rng)
    blocks = _float_pair(rng, lambda: DualPathBlock(shape))
    n = _pick(rng, [1, 1, 2, 3])
    inputs = Inputs(dense=_normal(rng, n, shape.in_dense, shape.in_hw, shape.in_hw))
    if shape.kind != "proj":
        inputs.arrays["resid"] = _normal(rng, n, shape.in_resid, shape.in_hw, shape.in_hw)
    weights, scale_shift = block_arguments(blocks["float32"])
    args = {"weights": list(weights), "scale_shift": scale_shift, "groups": shape.groups,
            "stride": shape.stride}
    label, kind = "valid", VALID
    if rng.random() < 0.6:
        hw = shape.in_hw

        def set_arg(**values):
            return lambda: args.update(values)

        def replace_weight(i, value):
            return lambda: args["weights"].__setitem__(i, value)

        defects = [
            ("3 weights for a projection" if shape.kind != "normal" else "2 weights", INVALID,
             lambda: args.update(weights=args["weights"][1:] if shape.kind != "normal"
                                 else args["weights"][:2])),
            ("weights a tensor", INVALID, set_arg(weights=weights[0])),
            ("w_a input channels", INVALID, replace_weight(
                -3, paddle.ones([shape.bottleneck, shape.in_resid + shape.in_dense + 1, 1, 1]))),
            ("w_a rank 2", INVALID, replace_weight(-3, weights[-3][:, :, 0, 0])),
            ("w_c float64", INVALID, replace_weight(-1, weights[-1].astype("float64"))),
            ("w_conv numpy", INVALID, replace_weight(-2, weights[-2].numpy())),
            ("scale_shift short", INVALID, set_arg(scale_shift=scale_shift[:, 1:])),
            ("scale_shift rank 1", INVALID, set_arg(scale_shift=scale_shift[0])),
            ("scale_shift float64", INVALID, set_arg(scale_shift=scale_shift.astype("float64"))),
            ("groups 0", INVALID, set_arg(groups=0)),
            ("groups float", INVALID, set_arg(groups=float(shape.groups))),
            ("groups not matching w_conv", INVALID, set_arg(groups=shape.bottleneck + 1)),
            ("stride 3", INVALID, set_arg(stride=3)),
            ("stride str", INVALID, set_arg(stride="1")),
            ("dense rank 3", INVALID, lambda: inputs.arrays.__setitem__(
                "dense", inputs.arrays["dense"][0])),
            ("dense empty image", INVALID, lambda: inputs.arrays.__setitem__(
                "dense", inputs.arrays["dense"][:, :, :0])),
            ("dense float64", INVALID, lambda: inputs.casts.update(dense="float64")),
            ("dense list", INVALID, lambda: inputs.replace.update(
                dense=inputs.arrays["dense"].tolist())),
            ("dense strided", VALID, lambda: _view_input(rng, inputs, "dense",
                                                         inputs.arrays["dense"].shape)),
            ("NaN/Inf in dense", VALID, lambda: inputs.poison(rng, "dense")),
            ("empty batch", VALID, lambda: inputs.arrays.update(
                {k: a[:0] for k, a in inputs.arrays.items()})),
        ]
        if shape.kind == "normal":
            defects += [
                ("stride 2 without projection", INVALID, set_arg(stride=2)),
                ("resid None without projection", INVALID, lambda: inputs.replace.update(
                    resid=None)),
                ("resid batch", INVALID, lambda: inputs.arrays.__setitem__(
                    "resid", _normal(rng, n + 1, shape.in_resid, hw, hw))),
                ("resid image size", INVALID, lambda: inputs.arrays.__setitem__(
                    "resid", _normal(rng, n, shape.in_resid, hw + 1, hw))),
                # resid takes all of w_c's rows (no new dense channel); dense keeps w_a's sum
                ("resid as wide as w_c", INVALID, lambda: inputs.arrays.update(
                    resid=_normal(rng, n, shape.in_resid + shape.inc, hw, hw),
                    dense=_normal(rng, n, max(1, shape.in_dense - shape.inc), hw, hw))),
                ("resid strided", VALID, lambda: _view_input(rng, inputs, "resid",
                                                             inputs.arrays["resid"].shape)),
            ]
        label, kind, mutate = _pick(rng, defects)
        mutate()

    def run(prec):
        t = inputs.tensors(prec)
        resid, dense = t.get("resid"), t["dense"]
        with paddle.no_grad():
            if prec == "fused":
                return dpn_block(resid, dense, args["weights"], args["scale_shift"],
                                 args["groups"], args["stride"])
            block = blocks["float64" if prec == "ref64" else "float32"]
            return block(dense if resid is None else [resid, dense])
    return Case("dpn_block", f"{label} {shape.kind} n{n} resid{shape.in_resid} "
                f"dense{shape.in_dense}+{shape.inc} R{shape.bottleneck}/g{shape.groups} "
                f"{shape.in_hw}x{shape.in_hw}", kind, run)


def gen_dpn_head(rng):
    from dpn_fast.models.dpn import _batch_norm
    from dpn_fast.ops import dpn_head, fold_batch_norms
    n, r, d = _pick(rng, [1, 1, 2, 3]), int(rng.integers(1, 9)), int(rng.integers(1, 9))
    hw, classes = int(rng.integers(1, 8)), int(rng.integers(1, 12))
    bns = _float_pair(rng, lambda: _batch_norm(r + d))
    fcs = _float_pair(rng, lambda: paddle.nn.Linear(r + d, classes))
    inputs = Inputs(resid=_normal(rng, n, r, hw, hw), dense=_normal(rng, n, d, hw, hw))
    with paddle.no_grad():
        scale_shift = fold_batch_norms([bns["float32"]])
    fc = fcs["float32"]
    args = {"scale_shift": scale_shift, "fc_weight": fc.weight, "fc_bias": fc.bias}
    label, kind = "valid", VALID
    if rng.random() < 0.6:
        def set_arg(**values):
            return lambda: args.update(values)

        label, kind, mutate = _pick(rng, [
            ("resid None", INVALID, lambda: inputs.replace.update(resid=None)),
            ("resid batch", INVALID, lambda: inputs.arrays.__setitem__(
                "resid", _normal(rng, n + 1, r, hw, hw))),
            ("resid image size", INVALID, lambda: inputs.arrays.__setitem__(
                "resid", _normal(rng, n, r, hw, hw + 1))),
            ("dense rank 3", INVALID, lambda: inputs.arrays.__setitem__(
                "dense", inputs.arrays["dense"][0])),
            ("dense empty image", INVALID, lambda: inputs.arrays.update(
                {k: a[:, :, :0] for k, a in inputs.arrays.items()})),
            ("dense float64", INVALID, lambda: inputs.casts.update(dense="float64")),
            ("resid numpy", INVALID, lambda: inputs.replace.update(resid=inputs.arrays["resid"])),
            ("scale_shift short", INVALID, set_arg(scale_shift=scale_shift[:, 1:])),
            ("scale_shift transposed", INVALID, set_arg(scale_shift=scale_shift.t())),
            ("fc_weight transposed", INVALID, set_arg(fc_weight=fc.weight.t())
             if r + d != classes else set_arg(fc_weight=fc.weight[1:])),
            ("fc_bias short", INVALID, set_arg(fc_bias=fc.bias[1:])
             if classes > 1 else set_arg(fc_bias=paddle.zeros([2]))),
            ("fc_weight float64", INVALID, set_arg(fc_weight=fc.weight.astype("float64"))),
            ("fc_bias rank 2", INVALID, set_arg(fc_bias=fc.bias[None])),
            ("strided", VALID, lambda: (
                _view_input(rng, inputs, "resid", inputs.arrays["resid"].shape),
                _view_input(rng, inputs, "dense", inputs.arrays["dense"].shape))),
            ("NaN/Inf in dense", VALID, lambda: inputs.poison(rng, "dense")),
            ("empty batch", VALID, lambda: inputs.arrays.update(
                {k: a[:0] for k, a in inputs.arrays.items()})),
        ])
        mutate()

    def run(prec):
        t = inputs.tensors(prec)
        with paddle.no_grad():
            if prec == "fused":
                return dpn_head(t["resid"], t["dense"], args["scale_shift"], args["fc_weight"],
                                args["fc_bias"])
            dt = "float64" if prec == "ref64" else "float32"
            x = bns[dt](paddle.concat([t["resid"], t["dense"]], 1))
            return fcs[dt](paddle.mean(x, axis=[2, 3]))
    return Case("dpn_head", f"{label} n{n} resid{r} dense{d} {hw}x{hw} classes{classes}", kind,
                run)


def gen_fold_batch_norms(rng):
    from dpn_fast.ops import fold_batch_norms
    sizes = [int(c) for c in rng.integers(1, 7, int(rng.integers(1, 4)))]
    layers = [_bn_layers(rng, c, 1, bn_class=_pick(rng, [None, "2D"]))[0] for c in sizes]
    label, kind, argument = "valid", VALID, layers
    if rng.random() < 0.5:
        label, kind, argument = _pick(rng, [
            ("tuple", VALID, tuple(layers)),
            ("empty list", INVALID, []),
            ("one layer, not a list", INVALID, layers[0]),
            ("None in the list", INVALID, layers + [None]),
            ("a Conv2D in the list", INVALID, [paddle.nn.Conv2D(2, 2, 1)] + layers),
            ("act sigmoid", INVALID, layers + [_bn_layers(rng, 2, 1, act="sigmoid")[0]]),
            ("float64 layer", INVALID, layers + [paddle.nn.BatchNorm2D(2).to(dtype="float64")]),
            ("NHWC layer", INVALID, layers + [paddle.nn.BatchNorm2D(2, data_format="NHWC")]),
        ])

    def run(prec):
        if prec == "fused":
            return fold_batch_norms(argument)
        dt = "float64" if prec == "ref64" else "float32"
        scales, shifts = [], []
        for layer in argument:
            w, b, m, v = (t.astype(dt) for t in (layer.weight, layer.bias, layer._mean,
                                                 layer._variance))
            scales.append(w / paddle.sqrt(v + layer._epsilon))
            shifts.append(b - m * scales[-1])
        return paddle.stack([paddle.concat(scales), paddle.concat(shifts)])
    return Case("fold_batch_norms", f"{label} channels {sizes}", kind, run)


# ---------------------------------------------------------------------------------------------
# The models' forward (DPN68, fused vs the reference in float32 and float64)

_MODELS = {}


def _models():
    """DPN68 (fused, float32 and float64 references) and the reference's compiled engine."""
    if not _MODELS:
        import dpn_fast
        from test_fused_models import build_trio
        reference, fused, reference64 = build_trio("DPN68", seed=21)
        for model in (reference, fused, reference64):
            model.eval()
        _MODELS.update(fused=fused, ref32=reference, ref64=reference64,
                       compiled=dpn_fast.compile(reference))
    return _MODELS


def gen_model(rng):
    n, h, w = _pick(rng, [1, 1, 2, 0]), int(rng.integers(1, 48)), int(rng.integers(1, 48))
    x = _normal(rng, n, 3, h, w)
    label, kind, dtype = "valid", VALID, "float32"
    if rng.random() < 0.5:
        label = _pick(rng, ["rank 3", "4 channels", "float64", "int32", "empty image",
                            "NaN/Inf", "strided"])
        kind = VALID if label in ("NaN/Inf", "strided") else INVALID
        if label == "rank 3":
            x = x[0] if n else x[:, 0]
        elif label == "4 channels":
            x = _normal(rng, n, 4, h, w)
        elif label in ("float64", "int32"):
            dtype = label
        elif label == "empty image":
            x = x[:, :, :0]
        elif label == "NaN/Inf":
            inputs = Inputs(x=x)
            inputs.poison(rng, "x")
    transpose = label == "strided"
    no_grad = rng.random() < 0.7

    def run(prec):
        t = _tensor(x.transpose(0, 1, 3, 2) if transpose else x,
                    dtype if prec == "fused" else ("float64" if prec == "ref64" else "float32"))
        t = t.transpose([0, 1, 3, 2]) if transpose else t
        if no_grad:
            with paddle.no_grad():
                return _models()[prec](t)
        return _models()[prec](t)
    return Case("DPN68", f"{label} x{list(x.shape)} {dtype} no_grad={no_grad}", kind, run)


def gen_compiled(rng):
    """dpn_fast.compile's engine (of the float32 reference DPN68) against the references."""
    n, h, w = _pick(rng, [1, 1, 2, 3, 0]), int(rng.integers(1, 48)), int(rng.integers(1, 48))
    inputs = Inputs(x=_normal(rng, n, 3, h, w))
    label, kind = "valid", VALID
    if rng.random() < 0.6:
        def set_x(array):
            return lambda: inputs.arrays.__setitem__("x", array)

        label, kind, mutate = _pick(rng, [
            ("rank 3", INVALID, set_x(_normal(rng, 3, h, w))),
            ("rank 5", INVALID, set_x(_normal(rng, 1, n, 3, h, w))),
            ("1 channel", INVALID, set_x(_normal(rng, n, 1, h, w))),
            ("NHWC", INVALID, set_x(_normal(rng, n, h, w, 3)) if w != 3 and h != 3
             else set_x(_normal(rng, n, 4, h, w))),
            ("empty image", INVALID, set_x(_normal(rng, n, 3, 0, w))),
            ("float64", INVALID, lambda: inputs.casts.update(x="float64")),
            ("float16", INVALID, lambda: inputs.casts.update(x="float16")),
            ("int32", INVALID, lambda: inputs.casts.update(x="int32")),
            ("numpy", INVALID, lambda: inputs.replace.update(
                x=inputs.arrays["x"].astype("float32"))),
            ("list", INVALID, lambda: inputs.replace.update(x=inputs.arrays["x"].tolist())),
            ("None", INVALID, lambda: inputs.replace.update(x=None)),
            ("strided", VALID, lambda: _view_input(rng, inputs, "x", inputs.arrays["x"].shape)),
            ("NaN/Inf", VALID, lambda: inputs.poison(rng, "x")),
            ("wanting gradients", VALID, lambda: inputs.views.__setitem__(
                "x", lambda t: _requiring_grad(t))),
        ])
        mutate()

    def run(prec):
        x = inputs.tensors(prec)["x"]
        if prec == "fused":
            return _models()["compiled"](x)
        with paddle.no_grad():
            return _models()[prec](x)
    return Case("compiled DPN68", f"{label} x{list(inputs.arrays['x'].shape)}", kind, run)


def _requiring_grad(t):
    t.stop_gradient = False
    return t


# ---------------------------------------------------------------------------------------------
# Running the cases

GENERATORS = [(gen_grouped_conv, 6), (gen_folder, 2), (gen_merge, 7),
              (gen_merge_into_arguments, 1), (gen_fold_batch_norm, 1), (gen_stem, 4),
              (gen_model, 1), (gen_dpn_block, 4), (gen_dpn_head, 2), (gen_fold_batch_norms, 1),
              (gen_compiled, 2)]


def _arrays(outputs):
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    flat = []
    for o in outputs:
        flat.extend(_arrays(o) if isinstance(o, (tuple, list)) else [np.asarray(
            o.numpy(), np.float64)])
    return flat


def compare(case, outputs):
    """Raises AssertionError unless `outputs` match the float64 reference by the 2x rule, with
    NaN and +-Inf exactly where the reference has them."""
    got, ref64, ref32 = _arrays(outputs), _arrays(case.run("ref64")), _arrays(case.run("ref32"))
    assert len(got) == len(ref64), f"{len(got)} outputs, the reference has {len(ref64)}"
    for i, (a, e64, e32) in enumerate(zip(got, ref64, ref32)):
        assert a.shape == e64.shape, f"output {i}: shape {a.shape} != reference {e64.shape}"
        finite = np.isfinite(e64)
        assert np.array_equal(np.isfinite(a), finite), (
            f"output {i}: {int((np.isfinite(a) != finite).sum())} elements finite in one of "
            "fused/reference only")
        assert np.array_equal(a[~finite], e64[~finite], equal_nan=True), \
            f"output {i}: non-finite values differ from the reference"
        both = finite & np.isfinite(e32)
        if both.any():
            assert_matches_reference(a[both], e64[both], e32[both], name=f"output {i}")


def check(case):
    """None if the case passes, else what went wrong."""
    try:
        outputs = case.run("fused")
    except TYPED_ERRORS as error:
        if case.kind == VALID:
            return f"raised on a valid call: {type(error).__name__}: {error}"
        if case.op not in str(error):
            return f"error does not name the op: {type(error).__name__}: {error}"
        return None
    except Exception as error:  # noqa: BLE001 (any other type is the defect being looked for)
        return f"untyped error {type(error).__name__}: {str(error)[:300]}"
    if case.kind == INVALID:
        return "accepted an invalid call"
    try:
        compare(case, outputs)
    except AssertionError as error:
        return f"wrong result: {error}"
    except Exception as error:  # noqa: BLE001
        return f"the reference failed: {type(error).__name__}: {str(error)[:300]}"
    return None


def main(seed, count):
    """Runs `count` cases; prints each case before running it (so a crash names it), each
    failure, and a summary line."""
    paddle.seed(seed)
    rng = np.random.default_rng(seed)
    gens = [g for g, weight in GENERATORS for _ in range(weight)]
    failures = 0
    for i in range(count):
        case = gens[rng.integers(0, len(gens))](rng)
        print(f"CASE {i} {case.op}: {case.label}", flush=True)
        problem = check(case)
        if problem:
            failures += 1
            print(f"FAIL {i} {case.op}: {case.label}: {problem}", flush=True)
    print(f"DONE tried={count} failures={failures}", flush=True)


def run_in_subprocess(seed, count, timeout):
    """(return code, output) of main() in a fresh interpreter (run from outside the repo)."""
    code = f"import sys; sys.path.insert(0, {TESTS_DIR!r}); import test_fuzz; " \
           f"test_fuzz.main({seed}, {count})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=tempfile.gettempdir(),
                          env=dict(os.environ, GLOG_minloglevel="2"))
    return proc.returncode, proc.stdout + proc.stderr


def assert_fuzz_clean(seed, count, timeout):
    rc, output = run_in_subprocess(seed, count, timeout)
    cases = [line for line in output.splitlines() if line.startswith("CASE ")]
    assert rc == 0, (f"fuzz process died (return code {rc}) in {cases[-1] if cases else 'setup'}"
                     f"\n{output[-3000:]}")
    failures = [line for line in output.splitlines() if line.startswith("FAIL ")]
    assert not failures, f"{len(failures)} of {count} cases failed:\n" + "\n".join(failures[:30])
    assert f"DONE tried={count} failures=0" in output


def test_fuzz_ci():
    assert_fuzz_clean(seed=2026, count=300, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_fuzz_thousands(seed):
    assert_fuzz_clean(seed=seed, count=1500, timeout=1800)
