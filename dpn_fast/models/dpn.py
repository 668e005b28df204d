"""The DPN family with PaddleClas's topology and state-dict layout.

Sub-layer names (conv1_x_1_func, dpn{i}.c1x1_a_func._batch_norm, conv5_x_x_bn, out, ...) are
PaddleClas's, so its .pdparams load unchanged. No ParamAttr names are fixed, so any number of
models can live in one process.

`fused=True` runs the same layers and parameters through the fused ops:
  block tail + next block's head: split + add + concat + concat + BN + ReLU (two BNs before a
      projection block, the final BN after the last block)  ->  dual_path_merge_bn_relu
  c3x3_b's BN + ReLU + grouped conv + c1x1_c's BN + ReLU     ->  GroupedConvBNReLUFolder
      (eval: c3x3_b's BN + ReLU applied as the conv loads c1x1_a's output; training: Paddle BN)
The 1x1 convolutions stay Paddle ops, and so does the stem, in training.
CPU inference (eval, no gradients, float32) is one op each for the stem (conv + BN + ReLU + max
pool), every stage (its blocks as ops.dpn_block runs them: 1x1 convolutions on oneDNN, the grouped
conv and the BN + ReLUs on dpn_fast's kernels) and the head (BN + ReLU + average pool +
classifier); each stage keeps its dense path in one buffer that the blocks append to in place.
GPU inference on the CUDA build keeps the per-op path, with the stage buffers and in-place merges
of dual_path_merge_into.
"""
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from dpn_fast.models.config import CONFIGS, block_shapes
from dpn_fast.ops import GroupedConvBNReLUFolder, dual_path_merge_bn_relu
from dpn_fast.ops._backend import resolve_backend
from dpn_fast.ops.dpn_block import head_launch, stage_launch
from dpn_fast.ops.dual_path_merge import batch_norm_params, merge_into_launch
from dpn_fast.ops.stem_conv_bn_relu_pool import stem_launch

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def _batch_norm(channels):
    return nn.BatchNorm(channels, act="relu", momentum=BN_MOMENTUM, epsilon=BN_EPSILON)


class ConvBNLayer(nn.Layer):
    """Stem: conv -> BN -> ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding):
        super().__init__()
        self._conv = nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride,
                               padding=padding, bias_attr=False)
        self._batch_norm = _batch_norm(out_channels)

    def forward(self, x):
        return self._batch_norm(self._conv(x))


class BNACConvLayer(nn.Layer):
    """Pre-activation layer: BN -> ReLU -> conv."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1):
        super().__init__()
        self._batch_norm = _batch_norm(in_channels)
        self._conv = nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride,
                               padding=padding, groups=groups, bias_attr=False)

    def forward(self, x):
        return self._conv(self._batch_norm(x))


class DualPathBlock(nn.Layer):
    """One DPN block. Input and output are (resid, dense) pairs; the stage-0 projection block
    takes the stem's output as a single tensor."""

    def __init__(self, shape, fused):
        super().__init__()
        self.shape = shape
        in_channels = shape.in_resid + shape.in_dense
        r, bw, inc = shape.bottleneck, shape.resid, shape.inc
        self.has_proj = shape.kind != "normal"
        if self.has_proj:
            self.c1x1_w_func = BNACConvLayer(in_channels, bw + 2 * inc, 1, stride=shape.stride)
        self.c1x1_a_func = BNACConvLayer(in_channels, r, 1)
        self.c3x3_b_func = BNACConvLayer(r, r, 3, stride=shape.stride, padding=1,
                                         groups=shape.groups)
        self.c1x1_c_func = BNACConvLayer(r, bw + inc, 1)
        if fused:
            self.conv_bn_relu = GroupedConvBNReLUFolder(self.c3x3_b_func._conv,
                                                        self.c1x1_c_func._batch_norm,
                                                        input_bn=self.c3x3_b_func._batch_norm)

    def head_batch_norms(self):
        """The BN(s) applied to this block's input concat: (c1x1_w's, c1x1_a's) or c1x1_a's."""
        bn_a = self.c1x1_a_func._batch_norm
        return (self.c1x1_w_func._batch_norm, bn_a) if self.has_proj else bn_a

    def forward_fused(self, resid, dense, acts, next_batch_norms, into_buffer):
        """`acts`: head_batch_norms() applied to the block's input, computed by the previous
        merge. Returns (resid, dense, next block's acts). into_buffer: inference on the custom
        ops (see _forward_inference); `dense` is then the stage's dense buffer."""
        if into_buffer:
            return self._forward_inference(resid, dense, acts, next_batch_norms)
        if self.has_proj:
            act_w, acts = acts
            resid, dense = self._split_projection(self.c1x1_w_func._conv(act_w))
        y = self.c1x1_c_func._conv(self.conv_bn_relu(self.c1x1_a_func._conv(acts)))
        return dual_path_merge_bn_relu(resid, dense, y, next_batch_norms)

    def _forward_inference(self, resid, dense, acts, next_batch_norms):
        """Eval without gradients on the CUDA build's custom ops: nothing but op launches. The
        shapes are the architecture's (the model checks its input), parameters are read live
        (nothing cached can go stale), and the dense path lives in one buffer per stage that each
        merge appends to in place. The sublayers' forward hooks do not run."""
        if self.has_proj:
            act_w, acts = acts
            weight = self.c1x1_w_func._conv.weight
            if self.shape.stride == 1:
                # One GEMM per path on the weight's row blocks (views, no copy) rather than
                # one GEMM and a split that copies the residual part (stage 1: 1.7 -> 0.4 ms).
                # With stride 2 Paddle subsamples the input per conv, so one conv is cheaper.
                resid = F.conv2d(act_w, weight[:self.shape.resid])
                new_dense = F.conv2d(act_w, weight[self.shape.resid:])
            else:
                resid, new_dense = self._split_projection(
                    F.conv2d(act_w, weight, stride=self.shape.stride))
            dense = self._stage_buffer(new_dense)
        y = F.conv2d(self.conv_bn_relu.infer(F.conv2d(acts, self.c1x1_a_func._conv.weight)),
                     self.c1x1_c_func._conv.weight)
        layers = next_batch_norms if isinstance(next_batch_norms, tuple) else (next_batch_norms,)
        resid, dense, act = merge_into_launch(resid, dense, self.shape.dense_before, y,
                                              *batch_norm_params(layers))
        return resid, dense, act if len(layers) == 1 else tuple(paddle.unbind(act, 0))

    def _stage_buffer(self, new_dense):
        """The stage's dense buffer: the projection's dense channels, then room for the other
        blocks' (written in place by their merges)."""
        n, _, h, w = new_dense.shape
        if paddle.in_dynamic_mode():
            # 5-10x faster than writing a slice of an empty buffer.
            spare = paddle.empty([n, self.shape.stage_dense - 2 * self.shape.inc, h, w],
                                 dtype=new_dense.dtype)
            return paddle.concat([new_dense, spare], axis=1)
        # Exported: Paddle Inference runs concat on oneDNN, whose output layout the in-place
        # merge cannot take.
        dense = paddle.empty([n, self.shape.stage_dense, h, w], dtype=new_dense.dtype)
        dense[:, :2 * self.shape.inc] = new_dense
        return dense

    def _split_projection(self, projected):
        return paddle.split(projected, [self.shape.resid, 2 * self.shape.inc], axis=1)

    def forward(self, x):
        data_in = paddle.concat(x, axis=1) if isinstance(x, (list, tuple)) else x
        if self.has_proj:
            resid, dense = paddle.split(self.c1x1_w_func(data_in),
                                        [self.shape.resid, 2 * self.shape.inc], axis=1)
        else:
            resid, dense = x
        y = self.c1x1_c_func(self.c3x3_b_func(self.c1x1_a_func(data_in)))
        y_resid, y_dense = paddle.split(y, [self.shape.resid, self.shape.inc], axis=1)
        return [resid + y_resid, paddle.concat([dense, y_dense], axis=1)]


class DPN(nn.Layer):
    def __init__(self, model_name, class_num=1000, fused=False):
        super().__init__()
        if model_name not in CONFIGS:
            raise ValueError(f"unknown model {model_name!r}; choose one of {sorted(CONFIGS)}")
        cfg = CONFIGS[model_name]
        self.model_name = model_name
        self.fused = fused
        self.class_num = class_num
        self.conv1_x_1_func = ConvBNLayer(3, cfg.init_filters, cfg.stem_kernel, stride=2,
                                          padding=cfg.stem_kernel // 2)
        self.pool2d_max = nn.MaxPool2D(kernel_size=3, stride=2, padding=1)
        self.blocks = []
        shapes = block_shapes(model_name)
        for i, shape in enumerate(shapes, start=1):
            self.blocks.append(self.add_sublayer(f"dpn{i}", DualPathBlock(shape, fused)))
        last = self.blocks[-1].shape
        out_channels = last.resid + last.dense_before + last.inc
        self.conv5_x_x_bn = _batch_norm(out_channels)
        self.pool2d_avg = nn.AdaptiveAvgPool2D(1)
        stdv = 0.01
        self.out = nn.Linear(out_channels, class_num,
                             weight_attr=paddle.ParamAttr(initializer=nn.initializer.Uniform(-stdv, stdv)))

    def refold(self):
        """Drops cached BN folds. Needed only after changing parameters in place outside
        set_state_dict and training (e.g. param.set_value) on a fused model used in eval."""
        if self.fused:
            for block in self.blocks:
                block.conv_bn_relu.refold()

    def set_state_dict(self, state_dict, use_structured_name=True):
        # Paddle's set_state_dict writes in place without bumping tensor versions, so cached
        # folds cannot see it.
        result = super().set_state_dict(state_dict, use_structured_name=use_structured_name)
        self.refold()
        return result

    @paddle.jit.not_to_static  # plain Python: unknown sizes read as -1
    def _check_input(self, x):
        name = self.model_name
        if len(x.shape) != 4:
            raise ValueError(f"{name}: input must be 4-D [N, 3, H, W], got shape {list(x.shape)}")
        if x.shape[1] != 3:
            raise ValueError(f"{name}: input must have 3 channels (RGB), got shape "
                             f"{list(x.shape)}")
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"{name}: input image is empty, shape {list(x.shape)}")
        dtype = self.out.weight.dtype
        dtype_name = str(dtype).split(".")[-1].lower()  # paddle.float32 / DataType.FLOAT32
        if resolve_backend("auto", x, name) == "cpu":
            if self.fused and dtype != paddle.float32:
                raise TypeError(f"{name}(fused=True) runs float32 only on CPU, but its "
                                f"parameters are {dtype_name}; convert it with "
                                "model.to(dtype='float32'), or use the reference model "
                                "(fused=False), which also runs float64")
            if dtype not in (paddle.float32, paddle.float64):
                raise TypeError(f"{name}: Paddle's CPU kernels run float32 and float64 only, "
                                f"but the model's parameters are {dtype_name}; convert it with "
                                "model.to(dtype='float32')")
        if x.dtype != dtype:
            raise TypeError(f"{name}: input dtype {str(x.dtype).split('.')[-1].lower()} does "
                            f"not match the model's {dtype_name} parameters; cast the input "
                            f"with x.astype('{dtype_name}')")

    def forward(self, x):
        self._check_input(x)
        # On CPU _check_input has made sure a fused model and its input are float32.
        if self.fused and self._inference_on("cpu", x):
            return self._forward_cpu_inference(x)
        if self.fused:
            h = self._forward_fused(x)
        else:
            h = self.pool2d_max(self.conv1_x_1_func(x))
            for block in self.blocks:
                h = block(h)
            h = self.conv5_x_x_bn(paddle.concat(h, axis=1))
        return self.out(paddle.flatten(self.pool2d_avg(h), start_axis=1))

    def _inference_on(self, backend, x):
        """Whether this call can take the inference ops (in-place stage buffers, no backward) on
        `backend`: eval, no gradient wanted, and the ops' "auto" backend there."""
        return (not self.training and (not paddle.in_dynamic_mode() or not paddle.is_grad_enabled())
                and resolve_backend("auto", x, "DPN") == backend)

    def _stages(self):
        """The blocks grouped by stage, each list starting with the stage's projection block."""
        stages = []
        for block in self.blocks:
            if block.has_proj:
                stages.append([])
            stages[-1].append(block)
        return stages

    def _forward_cpu_inference(self, x):
        """stem -> stages -> head, one op each (CPU float32)."""
        # An empty batch (Paddle passes its empty tensors to ops as absent). Dynamic graph
        # only: an export must not trace a shape check.
        if paddle.in_dynamic_mode() and x.shape[0] == 0:
            return paddle.zeros([0, self.class_num], x.dtype)
        dense = stem_launch(x, self.conv1_x_1_func._conv, self.conv1_x_1_func._batch_norm)
        resid = None
        for blocks in self._stages():
            resid, dense = stage_launch(blocks, resid, dense, blocks[0].shape.in_dense)
        last = self.blocks[-1].shape
        return head_launch(resid, dense, last.dense_before + last.inc, self.conv5_x_x_bn,
                           self.out)

    def _forward_fused(self, x):
        """Stem, blocks and the final concat/BN/ReLU; each merge also computes the next
        block's head."""
        # The in-place stage buffers have no backward (and Triton has no stage-buffer merge).
        into_buffer = self._inference_on("cuda", x)
        stem = self.pool2d_max(self.conv1_x_1_func(x))
        bn_w, bn_a = self.blocks[0].head_batch_norms()
        acts = (bn_w(stem), bn_a(stem))
        resid = dense = None
        heads = [block.head_batch_norms() for block in self.blocks[1:]] + [self.conv5_x_x_bn]
        for block, next_batch_norms in zip(self.blocks, heads):
            resid, dense, acts = block.forward_fused(resid, dense, acts, next_batch_norms,
                                                     into_buffer)
        return acts
