"""A whole DPN block, a whole stage, and the network's head, as one op each (CPU inference,
float32):

    act = relu(bn_a(concat(resid, dense)))              (and act_w = relu(bn_w(...)), projection)
    resid', dense'[:, :2 inc] = split(conv1x1(act_w, W_w, stride))        (projection blocks)
    g = relu(bn_c(grouped_conv3x3(relu(bn_b(conv1x1(act, W_a))), stride)))
    resid' += conv1x1(g, W_c)[:, :R];  dense'[:, d:d + inc] = conv1x1(g, W_c)[:, R:]

    logits = linear(mean_hw(relu(bn(concat(resid, dense)))))                (the head)

The ops keep their stage buffers channels-last (NHWC): a 1x1 convolution is then one oneDNN
matmul over all positions that reads the activations as they lie and the weights as given (the
oneDNN that Paddle ships, whose kernels follow the CPU's features on Intel and AMD alike; Paddle's
own CPU convolutions call an MKL that takes a slow generic path on AMD). A stage keeps its dense
path in one buffer: its first block creates it with `capacity` channels, the others append to it
and accumulate into resid in place, so no split, add or concat runs as a pass of its own. The
fused model runs each stage's blocks as one op (`dpn_stage`): each op call's dispatch costs
~0.2 ms after a block has streamed its weights through the cache. The first stage reads the
stem's NCHW output directly; the head reads the last stage's buffers. A batch runs through a
stage a few images at a time (one where planes are large, more where they are small), so their
planes stay in cache from block to block.

`dpn_block` and `dpn_head` take and return NCHW tensors, like the rest of Paddle; they convert
on the way in and out. Eval BatchNorm (running statistics), no backward: training and gradients
run the per-op path (dual_path_merge_bn_relu, grouped_conv_bn_relu). `reference_dpn_block` is
the plain-Paddle block.
"""
import paddle
import paddle.nn.functional as F

from dpn_fast import _extension
from dpn_fast.ops._backend import resolve_backend
from dpn_fast.ops._batch_norm_layer import check_bn_layer
from dpn_fast.ops._checks import check_dtype, check_int, check_same_place, check_tensor
from dpn_fast.ops.dual_path_merge import batch_norm_params

OP = "dpn_block"


def _block_weights(block):
    """(weights, BN layers) of a DualPathBlock in the ops' order (projection first)."""
    layers = [block.c1x1_a_func, block.c3x3_b_func, block.c1x1_c_func]
    weights = [layer._conv.weight for layer in layers]
    bns = [layer._batch_norm for layer in layers]
    if block.has_proj:
        weights.insert(0, block.c1x1_w_func._conv.weight)
        bns.insert(0, block.c1x1_w_func._batch_norm)
    return weights, bns


def block_launch(block, resid, dense, dense_channels):
    """The block's op, unchecked in Python (the op checks shapes itself). `resid`, `dense`: the
    stage's channels-last buffers [N, H, W, C], whose first `dense_channels` dense channels are
    valid; or, for the first block, resid None and the stem's NCHW output. Returns (resid, dense
    buffer), channels-last: a projection block's new ones (the stage op with this block alone),
    a normal block's updated in place."""
    if block.has_proj:
        return stage_launch([block], resid, dense, dense_channels)
    weights, bns = _block_weights(block)
    bn, epsilons = batch_norm_params(bns)
    return _extension.run_op("dpn_fast_dpn_block", resid, dense, *weights, bn,
                             block.shape.groups, dense_channels, epsilons)


def stage_arguments(blocks, resid, dense, dense_channels):
    """The dpn_fast_dpn_stage op's inputs and attributes for a stage's blocks, in order."""
    weights, bns = [], []
    for block in blocks:
        block_weights, block_bns = _block_weights(block)
        weights += block_weights
        bns += block_bns
    bn, epsilons = batch_norm_params(bns)
    shape = blocks[0].shape
    return [resid, dense, weights, bn, shape.groups, shape.stride, dense_channels,
            shape.stage_dense, epsilons]


def stage_launch(blocks, resid, dense, dense_channels):
    """A stage's blocks (its projection block first) as one op, unchecked in Python: for the fused
    model's inference path. `resid`, `dense`, `dense_channels`: the stage's input, as for
    block_launch on its first block. Returns (resid, dense buffer) after the stage's last block,
    channels-last; the same as block_launch block by block, with one op dispatch instead of one
    per block."""
    return _extension.run_op("dpn_fast_dpn_stage",
                             *stage_arguments(blocks, resid, dense, dense_channels))


def head_launch(resid, dense, dense_channels, bn, fc):
    """The head's op on channels-last stage buffers, unchecked in Python: logits of eval BatchNorm
    `bn` and Linear `fc`."""
    params, epsilons = batch_norm_params([bn])
    return _extension.run_op("dpn_fast_dpn_head", resid, dense, params, fc.weight, fc.bias,
                             dense_channels, epsilons)[0]


def to_channels_last(x):
    """[N, C, H, W] -> [N, H, W, C], contiguous (the ops read raw memory)."""
    return paddle.transpose(x, [0, 2, 3, 1]).contiguous()


def to_channels_first(x):
    """[N, H, W, C] -> [N, C, H, W], contiguous."""
    return paddle.transpose(x, [0, 3, 1, 2]).contiguous()


def _check_inference(op, backend, dense, resid, dense_channels):
    """Checks what the block and head ops share; returns the backend to run ("cpu" or
    "reference")."""
    if backend not in ("auto", "cpu", "reference"):
        raise ValueError(f"{op}: backend must be 'auto', 'cpu' or 'reference', got {backend!r}")
    check_tensor(op, "dense", dense, rank=4)
    check_int(op, "dense_channels", dense_channels, minimum=1)
    if dense.shape[1] >= 0 and dense_channels > dense.shape[1]:
        raise ValueError(f"{op}: 'dense_channels' ({dense_channels}) exceeds the channels of "
                         f"'dense', shape {list(dense.shape)}")
    if dense.shape[2] == 0 or dense.shape[3] == 0:
        raise ValueError(f"{op}: 'dense' has an empty image, shape {list(dense.shape)}")
    if resid is not None:
        check_tensor(op, "resid", resid, rank=4)
        if resid.shape[0] != dense.shape[0] or resid.shape[2:] != dense.shape[2:]:
            raise ValueError(f"{op}: 'resid' {list(resid.shape)} and 'dense' "
                             f"{list(dense.shape)} must share batch and image size")
        check_same_place(op, dense, [("resid", resid)])
        if resid.dtype != dense.dtype:
            raise TypeError(f"{op}: 'resid' and 'dense' must have the same dtype, got "
                            f"{resid.dtype} and {dense.dtype}")
    if backend == "reference":
        return "reference"
    backend = resolve_backend(backend, dense, op)  # "cpu" with GPU tensors raises
    if backend != "cpu":
        return "reference"
    check_dtype(op, "dense", dense, paddle.float32,
                " (the CPU op runs float32 only; backend='reference' runs others)")
    if paddle.in_dynamic_mode() and paddle.is_grad_enabled() and not all(
            t.stop_gradient for t in (dense, resid) if t is not None):
        raise RuntimeError(f"{op}: has no backward; call it under paddle.no_grad() or use "
                           "backend='reference' for training")
    return backend


@paddle.jit.not_to_static  # plain Python: unknown sizes read as -1
def _check_block(block, resid, dense, dense_channels, backend):
    from dpn_fast.models.dpn import DualPathBlock  # the models import this module

    if not isinstance(block, DualPathBlock):
        raise TypeError(f"{OP}: 'block' must be a DPN block (a DPN model's dpn<i> layer), got "
                        f"{type(block).__name__}")
    shape = block.shape
    if (resid is None) != (shape.in_resid == 0):
        raise ValueError(f"{OP}: this block takes " + (
            "resid=None (its input is the stem's output)" if shape.in_resid == 0 else
            f"a 'resid' of {shape.in_resid} channels"))
    backend = _check_inference(OP, backend, dense, resid, dense_channels)
    if resid is not None and resid.shape[1] != shape.in_resid:
        raise ValueError(f"{OP}: 'resid' must have {shape.in_resid} channels for this block, "
                         f"got shape {list(resid.shape)}")
    if dense_channels != shape.in_dense:
        raise ValueError(f"{OP}: 'dense_channels' must be this block's {shape.in_dense} input "
                         f"dense channels, got {dense_channels}")
    if not block.has_proj and dense.shape[1] >= 0 and dense.shape[1] < shape.in_dense + shape.inc:
        raise ValueError(f"{OP}: the dense buffer has {dense.shape[1]} channels; this block "
                         f"appends {shape.inc} to its {shape.in_dense}")
    return backend


def dpn_block(block, resid, dense, dense_channels=None, backend="auto"):
    """One DPN block (a `dpn_fast.models.dpn.DualPathBlock` in eval mode) on (resid, dense).

    resid: [N, R, H, W] or None (the first block, whose input is the stem's output `dense`).
    dense: [N, C, H, W] whose first `dense_channels` channels (default and only valid value: the
    block's input dense channels, block.shape.in_dense) are the dense path.
    Returns new tensors (resid_out, dense_out), NCHW: dense_out has `block.shape.stage_dense`
    channels after a projection block (its first 3 inc written), else dense's channels (which
    must leave room for inc more), of which the first dense_channels + inc are valid.
    backend: "auto"/"cpu" (the op on CPU float32; it runs channels-last, so this converts on the
    way in and out) or "reference" (plain Paddle; its dense_out holds just the valid channels).
    Dynamic graph: to export, export the model, whose stage ops take their buffers directly.
    """
    if dense_channels is None:
        dense_channels = getattr(getattr(block, "shape", None), "in_dense", None)
    if _check_block(block, resid, dense, dense_channels, backend) == "reference":
        return reference_dpn_block(block, resid, dense, dense_channels)
    if resid is None:  # the stem's output goes in as it is, NCHW
        outputs = block_launch(block, None, dense, dense_channels)
    else:
        outputs = block_launch(block, to_channels_last(resid), to_channels_last(dense),
                               dense_channels)
    return tuple(to_channels_first(t) for t in outputs)


@paddle.jit.not_to_static  # plain Python: unknown sizes read as -1
def _check_head(resid, dense, bn, fc, dense_channels, backend):
    op = "dpn_head"
    if resid is None:
        raise TypeError(f"{op}: 'resid' must be a paddle.Tensor, got None")
    backend = _check_inference(op, backend, dense, resid, dense_channels)
    channels = resid.shape[1] + dense_channels
    weight = check_bn_layer(op, bn, dtype=paddle.float32 if backend == "cpu" else None)[0]
    if weight.shape[0] != channels:
        raise ValueError(f"{op}: 'bn' has {weight.shape[0]} channels, resid + dense have "
                         f"{channels}")
    if not isinstance(fc, paddle.nn.Linear):
        raise TypeError(f"{op}: 'fc' must be a paddle.nn.Linear, got {type(fc).__name__}")
    if fc.weight.shape[0] != channels or fc.bias is None:
        raise ValueError(f"{op}: 'fc' must take {channels} features and have a bias, got weight "
                         f"{list(fc.weight.shape)}")
    if backend == "cpu":
        check_dtype(op, "fc.weight", fc.weight, paddle.float32)
    return backend


def dpn_head(resid, dense, bn, fc, dense_channels=None, backend="auto"):
    """logits = fc(global_avg_pool(relu(bn(concat(resid, dense[:, :dense_channels]))))) for an
    eval BatchNorm layer `bn` and a paddle.nn.Linear `fc`."""
    if dense_channels is None:
        dense_channels = dense.shape[1]
    if _check_head(resid, dense, bn, fc, dense_channels, backend) == "reference":
        x = F.batch_norm(paddle.concat([resid, dense[:, :dense_channels]], axis=1), bn._mean,
                         bn._variance, bn.weight, bn.bias, training=False, epsilon=bn._epsilon)
        return fc(paddle.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), start_axis=1))
    return head_launch(to_channels_last(resid), to_channels_last(dense), dense_channels, bn, fc)


def reference_dpn_block(block, resid, dense, dense_channels):
    """The plain-Paddle block on the same inputs: (resid_out, the dense path's valid channels)."""
    x = dense[:, :dense_channels]
    return tuple(block(x if resid is None else [resid, x]))
