"""A DPN block's weights prepared for its stage plan (dpn_fast/kernels/_stage.py), from the
block's raw parameters, whatever framework holds them: every host (the torch host for timm's
DPNs, the Paddle GPU engine for dpn_fast's) takes its model's arrays into `BlockParameters` and
binds what `prepare_block` returns, so both run the same folded weights in one orientation.

numpy, float64 math. A block's BNs fold as the kernels apply them:
- projection and 1x1a: their input BN + ReLU stays the GEMM's prologue (in_scale, in_shift);
- c3x3_b's BN scales 1x1a's output channels and becomes its bias (ReLU as its epilogue), in
  the grouped conv's slot layout (nhwc_grouped_conv3x3.slot_layout; zero padding columns);
- c1x1_c's BN folds into the grouped conv's weights (packed for its chunks) and bias;
- 1x1c reads the slots (zero weight rows for the padding).
GEMM weights are [K, N] (input channels by output channels), row-major.
"""
from typing import NamedTuple

import numpy as np

from dpn_fast.kernels import nhwc_grouped_conv3x3 as grouped
from dpn_fast.kernels._stage import StageBlock, weight_names


class BatchNorm(NamedTuple):
    """An eval BatchNorm's parameters: arrays of its channels (weight and bias None when it has
    no affine part) and its epsilon."""
    mean: np.ndarray
    var: np.ndarray
    eps: float
    weight: np.ndarray = None
    bias: np.ndarray = None


class ConvBN(NamedTuple):
    """BN + ReLU, then a bias-free conv of weight [out, in / groups, k, k]."""
    bn: BatchNorm
    weight: np.ndarray


class BlockParameters(NamedTuple):
    """A dual path block's raw parameters (PaddleClas's and timm's layers alike)."""
    stride: int         # of the grouped conv and the projection
    resid: int          # residual channels
    inc: int            # dense channels it appends
    groups: int         # of the grouped 3x3 conv
    projection: ConvBN  # 1x1 to resid + 2 inc channels; None except in a stage's first block
    conv_a: ConvBN      # 1x1 to the bottleneck
    conv_b: ConvBN      # grouped 3x3, bottleneck to bottleneck
    conv_c: ConvBN      # 1x1 to resid + inc channels


class PreparedBlock(NamedTuple):
    """A block as its stage plan runs it: its geometry and its weights in weight_names' order.
    As prepared, float32 arrays are the kernels' fp32 operands (BN scales, shifts, biases) and
    float64 arrays the weights a host casts to the activations' dtype (numpy has no bf16);
    `converted` gives the host's tensors."""
    shape: StageBlock
    weights: tuple

    @property
    def has_projection(self):
        return len(self.weights) == len(weight_names(0, True))

    def named(self, index):
        """{name: weight} as block `index` of its stage."""
        return dict(zip(weight_names(index, self.has_projection), self.weights))

    def converted(self, convert):
        """This block with each weight replaced by convert(weight)."""
        return PreparedBlock(self.shape, tuple(convert(w) for w in self.weights))


def bn_affine(bn):
    """(scale, shift) float64 of an eval BatchNorm: bn(x) = x * scale + shift."""
    scale = 1.0 / np.sqrt(np.asarray(bn.var, np.float64) + bn.eps)
    if bn.weight is not None:
        scale = scale * np.asarray(bn.weight, np.float64)
    shift = -np.asarray(bn.mean, np.float64) * scale
    if bn.bias is not None:
        shift = shift + np.asarray(bn.bias, np.float64)
    return scale, shift


def _weight(layer, label, role, shape, in_channels):
    """layer's conv weight in float64, checked to be of `shape`, and its BN's arrays to hold
    the conv's in_channels."""
    weight = np.asarray(layer.weight, np.float64)
    if weight.shape != shape:
        raise ValueError(f"{label} {role}: weight of shape {weight.shape}, expected {shape}")
    for field in ("mean", "var", "weight", "bias"):
        values = getattr(layer.bn, field)
        if values is not None and np.shape(values) != (in_channels,):
            raise ValueError(f"{label} {role}: its BN's {field} has shape {np.shape(values)}, "
                             f"expected ({in_channels},)")
    return weight


def _as_gemm(weight):
    """A 1x1 conv's [out, in, 1, 1] weight as the GEMM's [K, N] = [in, out], row-major (a copy,
    never a view of the caller's array)."""
    return np.array(weight.reshape(weight.shape[0], -1).T, order="C")


def _f32(array):
    return array.astype(np.float32)


def prepare_block(block, label):
    """The PreparedBlock of `block` (BlockParameters); errors name it by `label`."""
    channels, in_width = np.shape(block.conv_a.weight)[:2]  # the bottleneck, the block's input
    groups = block.groups
    if groups <= 0 or channels % groups:
        raise ValueError(f"{label}: {channels} bottleneck channels do not split into {groups} "
                         "groups")
    n_c = block.resid + block.inc
    w_a = _weight(block.conv_a, label, "conv_a", (channels, in_width, 1, 1), in_width)
    w_b = _weight(block.conv_b, label, "conv_b", (channels, channels // groups, 3, 3), channels)
    w_c = _weight(block.conv_c, label, "conv_c", (n_c, channels, 1, 1), channels)
    chunks = grouped.chunk_lanes(channels // groups)
    columns, width = grouped.slot_layout(channels, groups, chunks)

    def to_slots(array, axis):  # channels -> their slot columns along axis, zeros in the padding
        shape = list(array.shape)
        shape[axis] = width
        slots = np.zeros(shape, array.dtype)
        index = [slice(None)] * array.ndim
        index[axis] = columns
        slots[tuple(index)] = array
        return slots

    weights = []
    if block.projection is not None:
        w_p = _weight(block.projection, label, "projection",
                      (block.resid + 2 * block.inc, in_width, 1, 1), in_width)
        p_scale, p_shift = bn_affine(block.projection.bn)
        weights += [_as_gemm(w_p), _f32(p_scale), _f32(p_shift)]
    a_scale, a_shift = bn_affine(block.conv_a.bn)
    b_scale, b_shift = bn_affine(block.conv_b.bn)
    c_scale, c_shift = bn_affine(block.conv_c.bn)
    weights += [to_slots(_as_gemm(w_a * b_scale[:, None, None, None]), 1), _f32(a_scale),
                _f32(a_shift), to_slots(_f32(b_shift), 0),
                grouped.pack_weights(w_b * c_scale[:, None, None, None], groups, chunks),
                to_slots(_f32(c_shift), 0), to_slots(_as_gemm(w_c), 0)]
    shape = StageBlock(block.stride, block.resid, block.inc, channels, groups, width)
    return PreparedBlock(shape, tuple(weights))
