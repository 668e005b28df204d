"""A whole DPN block, and the network's head, as one op each (CPU inference, float32):

    act = relu(bn_a(concat(resid, dense)))              (and act_w = relu(bn_w(...)), projection)
    resid', dense'[:, :2 inc] = split(conv1x1(act_w, W_w, stride))        (projection blocks)
    g = relu(bn_c(grouped_conv3x3(relu(bn_b(conv1x1(act, W_a))), stride)))
    resid' += conv1x1(g, W_c)[:, :R];  dense'[:, d:d + inc] = conv1x1(g, W_c)[:, R:]

    logits = linear(mean_hw(relu(bn(concat(resid, dense)))))                (the head)

The 1x1 convolutions run on oneDNN's matmul (the oneDNN that Paddle ships), whose kernels follow
the CPU's features on Intel and AMD alike; Paddle's own CPU convolutions call an MKL that takes a
slow generic path on AMD. A stage keeps its dense path in one buffer: the first block of a stage
(`dpn_block_proj`) creates it with `capacity` channels, the others (`dpn_block`) append to it and
accumulate into resid in place, so no split, add or concat runs as a pass of its own.

Eval BatchNorm (running statistics), no backward: training and gradients run the per-op path
(dual_path_merge_bn_relu, grouped_conv_bn_relu). `reference_dpn_block` is the plain-Paddle block.
"""
import paddle
import paddle.nn.functional as F

from dpn_fast import _extension
from dpn_fast.ops._backend import resolve_backend

OP = "dpn_block"


def _bn_params(layers):
    """The ops' BN list and epsilons for eval BatchNorm `layers`."""
    return ([t for bn in layers for t in (bn.weight, bn.bias, bn._mean, bn._variance)],
            [float(bn._epsilon) for bn in layers])


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
    """The block's op, unchecked in Python (the op checks shapes itself): for the fused model's
    inference path. `dense`: the stem's output for the first block, else the stage's dense buffer
    whose first `dense_channels` channels are valid. Returns (resid, dense buffer)."""
    weights, bns = _block_weights(block)
    bn, epsilons = _bn_params(bns)
    shape = block.shape
    if block.has_proj:
        return _extension.run_op("dpn_fast_dpn_block_proj", resid, dense, *weights, bn,
                                 shape.groups, shape.stride, dense_channels, block.stage_dense,
                                 epsilons)
    return _extension.run_op("dpn_fast_dpn_block", resid, dense, *weights, bn, shape.groups,
                             dense_channels, epsilons)


def head_launch(resid, dense, dense_channels, bn, fc):
    """The head's op, unchecked in Python: logits of eval BatchNorm `bn` and Linear `fc`."""
    params, epsilons = _bn_params([bn])
    return _extension.run_op("dpn_fast_dpn_head", resid, dense, params, fc.weight, fc.bias,
                             dense_channels, epsilons)[0]


def _check_inference(op, backend, tensors):
    if backend not in ("auto", "cpu", "reference"):
        raise ValueError(f"{op}: backend must be 'auto', 'cpu' or 'reference', got {backend!r}")
    if backend == "reference":
        return "reference"
    backend = resolve_backend(backend, tensors[0], op)  # "cpu" with GPU tensors raises
    if backend != "cpu":
        return "reference"
    if paddle.in_dynamic_mode() and paddle.is_grad_enabled() and not all(
            t.stop_gradient for t in tensors if t is not None):
        raise RuntimeError(f"{op}: has no backward; call it under paddle.no_grad() or use "
                           "backend='reference' for training")
    return backend


def dpn_block(block, resid, dense, dense_channels=None, backend="auto"):
    """One DPN block (a `dpn_fast.models.dpn.DualPathBlock` in eval mode) on (resid, dense).

    resid: [N, R, H, W] or None (the first block, whose input is the stem's output `dense`).
    dense: [N, C, H, W] whose first `dense_channels` channels (default: all) are the dense path.
    Returns (resid_out, dense_out): a projection block returns new tensors, dense_out with
    `block.stage_dense` channels of which the first 3 inc are written; a normal block updates
    resid and dense in place (dense must have room for inc more channels) and returns them.
    backend: "auto"/"cpu" (the op on CPU float32) or "reference" (plain Paddle; its dense_out
    holds just the valid channels, dense_channels + inc, or 3 inc after a projection).
    """
    if dense_channels is None:
        dense_channels = dense.shape[1]
    if _check_inference(OP, backend, [dense, resid]) == "reference":
        return reference_dpn_block(block, resid, dense, dense_channels)
    return block_launch(block, resid, dense, dense_channels)


def dpn_head(resid, dense, bn, fc, dense_channels=None, backend="auto"):
    """logits = fc(global_avg_pool(relu(bn(concat(resid, dense[:, :dense_channels]))))) for an
    eval BatchNorm layer `bn` and a paddle.nn.Linear `fc`."""
    if dense_channels is None:
        dense_channels = dense.shape[1]
    if _check_inference("dpn_head", backend, [dense, resid]) == "reference":
        x = F.batch_norm(paddle.concat([resid, dense[:, :dense_channels]], axis=1), bn._mean,
                         bn._variance, bn.weight, bn.bias, training=False, epsilon=bn._epsilon)
        return fc(paddle.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), start_axis=1))
    return head_launch(resid, dense, dense_channels, bn, fc)


def reference_dpn_block(block, resid, dense, dense_channels):
    """The plain-Paddle block on the same inputs: (resid_out, the dense path's valid channels)."""
    x = dense[:, :dense_channels]
    return tuple(block(x if resid is None else [resid, x]))
