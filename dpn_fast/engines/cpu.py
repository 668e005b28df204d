"""The CPU inference engine: the stem, each stage and the head as one op each (float32 in and out,
eval BatchNorm, no backward; in bf16 precision every convolution multiplies bf16 weights by bf16
inputs).

    stem_conv_bn_relu_pool -> dpn_stage x 4 -> dpn_head

A stage op runs all of its blocks (dpn_fast.ops.dpn_block's sequence) on channels-last stage
buffers; its BNs come folded to one [2, channels] (scale, shift) tensor. Two entry points share
the runner:
- `CompiledDPN` (`dpn_fast.compile(model)`): folds the BNs once and owns copies of everything it
  runs on, so later changes to the source model do not reach it; its 1x1 weights it keeps only
  laid out for this CPU (oneDNN's packed format, which its matmul otherwise rebuilds on every
  call). Callable from several threads (it keeps no state between calls) and exportable to Paddle
  Inference (dpn_fast.inference.export); packed weights only run on a CPU whose oneDNN picks the
  same layout, and elsewhere the stage op refuses them, naming both layouts. The classifier's
  weight is packed likewise. precision="bf16" packs the convolutions' weights as bf16 and runs
  the stem and the blocks' convolutions on bf16-rounded inputs with float32 sums, its stages'
  dense buffers in bf16 (BNs, pooling, the residual buffers and the classifier stay float32), on
  CPUs with bf16 matmul kernels only.
- `forward_live(model, x)`: the fused model's eval path (dpn_fast.engines.fused), which reads the
  model's parameters at every call and folds a stage's BNs in one op call before the stage's.
"""
from dataclasses import dataclass, replace

import paddle

from dpn_fast.models.dpn import DPN, check_images
from dpn_fast.ops.cpu_features import bf16_gemm_supported
from dpn_fast.ops.dpn_block import (fold_launch, head_launch, pack_head_launch, pack_stage_launch,
                                    stage_launch)
from dpn_fast.ops.stem_conv_bn_relu_pool import stem_launch

PRECISIONS = ("fp32", "bf16")


def native_precisions():
    """The PRECISIONS this CPU runs with its own instructions (bf16: bf16 matmul kernels)."""
    return PRECISIONS if bf16_gemm_supported() else ("fp32",)


@dataclass(frozen=True)
class StageLayout:
    """A stage op's attributes: its blocks' groups, the first block's stride, the dense channels
    of the stage's input, the capacity of its dense buffer, whether its weights come packed
    (pack_stage_launch) and whether it is a bf16 stage (stage_launch; packed as bf16 then)."""
    groups: int
    stride: int
    dense_channels: int
    capacity: int
    packed_weights: bool = False
    bf16_stage: bool = False


def stage_layout(blocks):
    shape = blocks[0].shape
    return StageLayout(shape.groups, shape.stride, shape.in_dense, shape.stage_dense)


def _stage_layers(blocks):
    """The stage's BN + conv layers in the stage op's order: the first block's projection, then
    1x1a, grouped 3x3 and 1x1c of each block."""
    layers = [blocks[0].c1x1_w_func]
    for block in blocks:
        layers += [block.c1x1_a_func, block.c3x3_b_func, block.c1x1_c_func]
    return layers


def stage_weights(blocks):
    return [layer._conv.weight for layer in _stage_layers(blocks)]


def stage_batch_norms(blocks):
    """Each of stage_weights' input BNs."""
    return [layer._batch_norm for layer in _stage_layers(blocks)]


def _run(x, stem, stages, head):
    """stem: stem_launch's arguments after x; stages: [(weights, scale_shift, StageLayout)];
    head: head_launch's arguments after resid and dense."""
    dense = stem_launch(x, *stem)
    resid = None
    for weights, scale_shift, layout in stages:
        resid, dense = stage_launch(resid, dense, weights, scale_shift, layout.groups,
                                    layout.stride, layout.dense_channels, layout.capacity,
                                    layout.packed_weights, bf16_stage=layout.bf16_stage)
    return head_launch(resid, dense, *head)


def _stem(model, bf16=False):
    conv, bn = model.conv1_x_1_func._conv, model.conv1_x_1_func._batch_norm
    return [conv.weight, bn.weight, bn.bias, bn._mean, bn._variance, int(conv._stride[0]),
            float(bn._epsilon), bf16]


def _head_dense_channels(model):
    last = model.blocks[-1].shape
    return last.dense_before + last.inc


def forward_live(model, x):
    """Logits of `model` (a float32 DPN; eval BN) on CPU float32 `x` [N, 3, H, W], its parameters
    read now."""
    if paddle.in_dynamic_mode() and x.shape[0] == 0:  # an empty batch; an export traces no check
        return paddle.zeros([0, model.class_num], x.dtype)
    stages = [(stage_weights(blocks), fold_launch(stage_batch_norms(blocks)),
               stage_layout(blocks)) for blocks in model.stages()]
    head = (fold_launch([model.conv5_x_x_bn]), model.out.weight, model.out.bias,
            _head_dense_channels(model))
    return _run(x, _stem(model), stages, head)


class CompiledDPN(paddle.nn.Layer):
    """A DPN prepared for CPU inference: BNs folded once, 1x1 weights packed for this CPU, every
    tensor its own copy (buffers, so an export carries them). Call it on float32 NCHW CPU
    tensors [N, 3, H, W]; it returns the float32 logits [N, classes] in either precision.
    Inference only: it has no backward and ignores train()."""

    def __init__(self, model, precision="fp32"):
        super().__init__()
        if not isinstance(model, DPN):
            raise TypeError(f"compile: expected a dpn_fast DPN model, got {type(model).__name__}")
        if precision not in PRECISIONS:
            raise ValueError(f"compile: precision must be one of {PRECISIONS} on CPU, got "
                             f"{precision!r}")
        dtype = model.out.weight.dtype
        if dtype != paddle.float32:
            raise TypeError(f"compile: the model's parameters are {dtype}; the CPU engine runs "
                            "float32 models (convert with model.to(dtype='float32'))")
        bf16 = precision == "bf16"
        if bf16 and not bf16_gemm_supported():
            raise RuntimeError("compile: precision='bf16' needs a CPU with AVX512_BF16 or "
                               "AMX-BF16 (oneDNN's bf16 matmul kernels); this CPU has neither; "
                               "use precision='fp32'")
        self.model_name, self.class_num = model.model_name, model.class_num
        self.precision = precision
        with paddle.no_grad():
            self._stem = [self._own(f"stem_{i}", t) if isinstance(t, paddle.Tensor) else t
                          for i, t in enumerate(_stem(model, bf16))]
            self._stages = []
            for s, blocks in enumerate(model.stages()):
                layout = stage_layout(blocks)
                weights = [self._keep(f"stage{s}_weight{i}", w)
                           for i, w in enumerate(pack_stage_launch(stage_weights(blocks),
                                                                   layout.groups, bf16=bf16))]
                scale_shift = self._keep(f"stage{s}_scale_shift",
                                         fold_launch(stage_batch_norms(blocks)))
                self._stages.append((weights, scale_shift,
                                     replace(layout, packed_weights=True, bf16_stage=bf16)))
            self._head = (self._keep("head_scale_shift", fold_launch([model.conv5_x_x_bn])),
                          self._keep("fc_weight", pack_head_launch(model.out.weight)),
                          self._own("fc_bias", model.out.bias), _head_dense_channels(model),
                          True)
        self.eval()

    def _own(self, name, tensor):
        """A copy of `tensor` registered as a persistable buffer `name`."""
        return self._keep(name, paddle.assign(tensor.detach()))

    def _keep(self, name, tensor):
        """`tensor`, which this engine made (nothing else refers to it), registered as a
        persistable buffer `name`."""
        tensor.stop_gradient = True
        self.register_buffer(name, tensor)
        return tensor

    @paddle.jit.not_to_static  # plain Python: unknown sizes read as -1
    def _check_input(self, x):
        name = f"compiled {self.model_name}"
        check_images(name, x)
        if x.dtype != paddle.float32:
            raise TypeError(f"{name}: input must be float32, got {x.dtype}; cast it with "
                            "x.astype('float32')")
        if paddle.in_dynamic_mode() and not x.place.is_cpu_place():
            raise ValueError(f"{name}: runs on CPU, the input is on {x.place}; move it with "
                             "x.cpu()")

    def forward(self, x):
        self._check_input(x)
        if paddle.in_dynamic_mode() and x.shape[0] == 0:  # an export traces no shape check
            return paddle.zeros([0, self.class_num], x.dtype)
        with paddle.no_grad():  # the ops have no backward: callers need not say so
            return _run(x, self._stem, self._stages, self._head)
