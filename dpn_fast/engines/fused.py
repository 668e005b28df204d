"""The fused ops swapped into a DPN: `fuse(model)`, what `dpn_fast.DPN92(fused=True)` returns.

The model keeps its layers, parameters and state dict; its forward runs:
- CPU inference (eval, no gradients): the CPU stage engine on the model's live parameters
  (dpn_fast.engines.cpu.forward_live: one op each for the stem, every stage and the head);
- otherwise (training, gradients, GPU), the per-op path:
    block tail + next block's head: split + add + concat + concat + BN + ReLU (two BNs before a
        projection block, the final BN after the last block)  ->  dual_path_merge_bn_relu
    c3x3_b's BN + ReLU + grouped conv + c1x1_c's BN + ReLU    ->  GroupedConvBNReLUFolder
  with the stem and the 1x1 convolutions as Paddle ops.
Parameters are read at every call, so training steps, set_state_dict and set_value are seen.
"""
import paddle

from dpn_fast.engines import cpu
from dpn_fast.models.dpn import DPN
from dpn_fast.ops import GroupedConvBNReLUFolder, dual_path_merge_bn_relu
from dpn_fast.ops._backend import resolve_backend


def fuse(model):
    """Swaps the fused forward into `model` (a dpn_fast DPN) in place and returns it."""
    if not isinstance(model, DPN):
        raise TypeError(f"fuse: expected a dpn_fast DPN model, got {type(model).__name__}")
    model.fused_forward = FusedForward(model)
    return model


def _head_batch_norms(block):
    """The BN(s) applied to a block's input concat: (c1x1_w's, c1x1_a's) or c1x1_a's."""
    bn_a = block.c1x1_a_func._batch_norm
    return (block.c1x1_w_func._batch_norm, bn_a) if block.has_proj else bn_a


class FusedForward:
    """DPN.fused_forward of a fused model: (model, x) -> logits."""

    def __init__(self, model):
        self.grouped_convs = [
            GroupedConvBNReLUFolder(block.c3x3_b_func._conv, block.c1x1_c_func._batch_norm,
                                    input_bn=block.c3x3_b_func._batch_norm)
            for block in model.blocks]

    def __call__(self, model, x):
        if _cpu_inference(model, x):
            return cpu.forward_live(model, x)
        return self._per_op(model, x)

    def _per_op(self, model, x):
        """Stem, blocks and the final concat + BN + ReLU; each merge also computes the next
        block's input activations."""
        stem = model.pool2d_max(model.conv1_x_1_func(x))
        bn_w, bn_a = _head_batch_norms(model.blocks[0])
        acts = (bn_w(stem), bn_a(stem))
        resid = dense = None
        next_heads = [_head_batch_norms(b) for b in model.blocks[1:]] + [model.conv5_x_x_bn]
        for block, grouped_conv, next_bns in zip(model.blocks, self.grouped_convs, next_heads):
            if block.has_proj:
                act_w, acts = acts
                resid, dense = paddle.split(block.c1x1_w_func._conv(act_w),
                                            [block.shape.resid, 2 * block.shape.inc], axis=1)
            y = block.c1x1_c_func._conv(grouped_conv(block.c1x1_a_func._conv(acts)))
            resid, dense, acts = dual_path_merge_bn_relu(resid, dense, y, next_bns)
        return model.out(paddle.flatten(model.pool2d_avg(acts), start_axis=1))


@paddle.jit.not_to_static  # plain Python: decides which ops get traced
def _cpu_inference(model, x):
    """Whether this call takes the CPU stage engine: eval, no gradient wanted, CPU tensors. On CPU
    the fused ops run float32 only."""
    if resolve_backend("auto", x, model.model_name) != "cpu":
        return False
    dtype = model.out.weight.dtype
    if dtype != paddle.float32:
        dtype_name = str(dtype).split(".")[-1].lower()
        raise TypeError(f"{model.model_name}(fused=True) runs float32 only on CPU, but its "
                        f"parameters are {dtype_name}; convert it with "
                        "model.to(dtype='float32'), or use the reference model "
                        "(fused=False), which also runs float64")
    return not model.training and (not paddle.in_dynamic_mode() or not paddle.is_grad_enabled())
