"""The Paddle GPU inference engine, `dpn_fast.compile(model, device="gpu", precision=...)`:

    stem (Paddle ops, float32: conv with its BN folded in + ReLU + 3x3/2 max pool, channels-last)
    -> dpn_fast_aot_stage x 4 (the op library's embedded Triton kernels, dpn_fast/ops/aot_stage.py)
    -> head (Paddle ops, float32: final BN + ReLU, average pool, classifier)

The stages run the torch host's kernels, plans and weights: each stage's launches planned by
dpn_fast/kernels/_stage.py, its weights prepared once by dpn_fast/kernels/_stage_weights.py from
the model's layers (PaddleClas's: dpn_fast/models/dpn.py). Activations between the stem and the
head are channels-last rows in the precision's dtype (PRECISIONS; the kernels accumulate in
fp32); the images in and the logits out are float32. A forward is planned once per input shape:
the op's attributes are encoded then, and each call launches them on Paddle's current stream
(the op allocates its output and scratch there).

Needs a CUDA build of dpn_fast (nvcc at install time), a CUDA build of Paddle, triton (to plan
the launches) and a GPU of an arch the library embeds cubins for (sm_80 and sm_90 and their
minor versions: A100, A10, L4, H100, ...). It has not yet run on a GPU.
"""
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import paddle
import paddle.nn.functional as F

from dpn_fast import _extension
from dpn_fast.kernels import nhwc_conv1x1
from dpn_fast.kernels._embedded import variants
from dpn_fast.kernels._stage import plan_stages
from dpn_fast.kernels._stage_weights import (BatchNorm, BlockParameters, ConvBN, bn_affine,
                                             prepare_block)
from dpn_fast.models.dpn import DPN, check_images
from dpn_fast.ops.aot_stage import aot_stage, encode_stage

# Precision -> the activations' dtype name (the stage kernels' variants).
PRECISIONS = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
MAX_PLANS = 16  # input shapes whose encoded plans are kept (least recently used dropped)
# DPN.pool2d_max
POOL_SIZE, POOL_STRIDE, POOL_PADDING = 3, 2, 1


class GpuUnavailableError(RuntimeError):
    """compile(device="gpu") cannot run here; the message names what is missing."""


def _array(tensor):
    return tensor.detach().astype("float64").numpy()


def _batch_norm(bn):
    """A Paddle nn.BatchNorm's eval parameters."""
    return BatchNorm(_array(bn._mean), _array(bn._variance), float(bn._epsilon), _array(bn.weight),
                     _array(bn.bias))


def _conv_bn(layer):
    """A BNACConvLayer (BN + ReLU, then a bias-free conv)."""
    return ConvBN(_batch_norm(layer._batch_norm), _array(layer._conv.weight))


def block_parameters(block):
    """The BlockParameters of a DualPathBlock of dpn_fast's DPN."""
    shape = block.shape
    return BlockParameters(shape.stride, shape.resid, shape.inc, shape.groups,
                           _conv_bn(block.c1x1_w_func) if block.has_proj else None,
                           _conv_bn(block.c1x1_a_func), _conv_bn(block.c3x3_b_func),
                           _conv_bn(block.c1x1_c_func))


def prepare_stages(model):
    """`model`'s stages as lists of PreparedBlocks (numpy), as its stage plans run them."""
    return [[prepare_block(block_parameters(block), f"compile: {model.model_name} block "
                                                    f"{block.shape.stage}.{block.shape.index}")
             for block in blocks] for blocks in model.stages()]


def stage_weight_order(stage):
    """The names of a stage's weights in the order the stage op takes them."""
    return [name for index, block in enumerate(stage) for name in block.named(index)]


def plan_forward(stages, images, h, w, in_width, dtype, arch):
    """[(StagePlan, encode_stage(plan, stage_weight_order(stage)))] of `stages` (lists of
    PreparedBlocks) on images x h x w stem rows of in_width channels, for activations of `dtype`
    on compute capability `arch`."""
    plans = plan_stages([[block.shape for block in stage] for stage in stages], images, h, w,
                        in_width, dtype, arch)
    return [(plan, encode_stage(plan, stage_weight_order(stage)))
            for stage, plan in zip(stages, plans)]


def cuda_arch():
    """The current CUDA device's (id, compute capability as 10 * major + minor), checked to be
    runnable here: GpuUnavailableError naming the first thing missing."""
    what = "compile(device='gpu')"
    if not _extension.BUILT_WITH_CUDA:
        raise GpuUnavailableError(
            f"{what}: this dpn_fast was built without CUDA (no nvcc at install time, or "
            "DPN_FAST_CPU_ONLY=1), so its op library has no dpn_fast_aot_stage op or embedded "
            "kernels; reinstall it with nvcc on PATH beside a CUDA build of Paddle, or use "
            "device='cpu'")
    if not paddle.is_compiled_with_cuda():
        raise GpuUnavailableError(f"{what}: the Paddle imported ({paddle.__version__}) is built "
                                  "without CUDA; install a CUDA build of Paddle")
    if paddle.device.cuda.device_count() == 0:
        raise GpuUnavailableError(f"{what}: Paddle sees no CUDA device")
    device = paddle.device.get_device()
    if not device.startswith("gpu"):
        raise GpuUnavailableError(f"{what}: Paddle's current device is {device!r}; select a GPU "
                                  "with paddle.set_device('gpu')")
    if nhwc_conv1x1.INTERPRETED:
        raise GpuUnavailableError(f"{what}: TRITON_INTERPRET=1 is set, which plans the CPU "
                                  "interpreter's tiles; the embedded kernels have the GPU's")
    major, minor = paddle.device.cuda.get_device_capability()
    embedded = sorted({variant.arch for variant in variants()})
    if not any(arch // 10 == major and arch % 10 <= minor for arch in embedded):
        raise GpuUnavailableError(
            f"{what}: the GPU is sm_{major}{minor}; the op library embeds kernels for "
            f"{', '.join(f'sm_{arch}' for arch in embedded)} (each serves its major arch)")
    return int(device.split(":")[1]), 10 * major + minor


class Stem(NamedTuple):
    """The stem's conv with its BN folded in (float64 arrays), its stride and padding."""
    weight: np.ndarray
    bias: np.ndarray
    stride: int
    padding: int


class Head(NamedTuple):
    """The final BN as (scale, shift) and the classifier's weight [in, out] and bias (float64)."""
    scale: np.ndarray
    shift: np.ndarray
    fc_weight: np.ndarray
    fc_bias: np.ndarray


def prepare_stem(model):
    conv, bn = model.conv1_x_1_func._conv, model.conv1_x_1_func._batch_norm
    scale, shift = bn_affine(_batch_norm(bn))
    # Padding k // 2, as DPN builds its stem.
    return Stem(_array(conv.weight) * scale[:, None, None, None], shift, int(conv._stride[0]),
                conv.weight.shape[2] // 2)


def prepare_head(model):
    return Head(*bn_affine(_batch_norm(model.conv5_x_x_bn)), _array(model.out.weight),
                _array(model.out.bias))


def run_stem(x, stem, dtype):
    """Stem rows [n * h * w, channels] in `dtype` and (n, h, w) of float32 images x [n, 3, H, W];
    `stem`: a Stem of float32 tensors on x's device."""
    y = F.conv2d(x.transpose([0, 2, 3, 1]), stem.weight, stem.bias, stride=stem.stride,
                 padding=stem.padding, data_format="NHWC")
    y = F.max_pool2d(F.relu(y), POOL_SIZE, POOL_STRIDE, POOL_PADDING, data_format="NHWC")
    n, h, w, channels = y.shape
    return y.astype(dtype).reshape([n * h * w, channels]), (n, h, w)


def run_head(rows, plan, head):
    """float32 logits from the last stage's output rows (its StagePlan `plan`); `head`: a Head of
    float32 tensors on the rows' device."""
    features = rows.reshape([-1, plan.h * plan.w, plan.row_stride])[:, :, :plan.width]
    features = F.relu(features.astype("float32") * head.scale + head.shift)
    return F.linear(features.mean(axis=1), head.fc_weight, head.fc_bias)


def check_gpu_images(name, x, device_id):
    """`x` is a float32 batch of images [N, 3, H, W] on GPU `device_id`."""
    check_images(name, x)
    if x.dtype != paddle.float32:
        raise TypeError(f"{name}: input must be float32, got {x.dtype}; cast it with "
                        "x.astype('float32')")
    if not x.place.is_gpu_place():
        raise ValueError(f"{name}: runs on the GPU, the input is on {x.place}; move it with "
                         "x.cuda()")
    if x.place.gpu_device_id() != device_id:
        raise ValueError(f"{name}: compiled on GPU {device_id}, the input is on {x.place}")


class GpuCompiledDPN:
    """A DPN prepared for GPU inference (see the module doc): BNs folded once into copies of the
    weights on the current GPU, so later changes to the source model do not reach it. Call it on
    float32 NCHW tensors on that GPU; it returns float32 logits [N, classes]. Inference only."""

    def __init__(self, model, precision):
        if not isinstance(model, DPN):
            raise TypeError(f"compile: expected a dpn_fast DPN model, got {type(model).__name__}")
        if precision not in PRECISIONS:
            raise ValueError(f"compile: precision must be one of {tuple(PRECISIONS)} on GPU, got "
                             f"{precision!r}")
        self.device_id, self.arch = cuda_arch()
        self.model_name, self.class_num, self.precision = model.model_name, model.class_num, \
            precision
        self.dtype = PRECISIONS[precision]
        place = paddle.CUDAPlace(self.device_id)

        def tensor(array, dtype="float32"):
            t = paddle.to_tensor(np.ascontiguousarray(array, np.float32), place=place)
            return t if dtype == "float32" else t.astype(dtype)

        with paddle.no_grad():
            stem = prepare_stem(model)
            self._stem = stem._replace(weight=tensor(stem.weight), bias=tensor(stem.bias))
            self._stem_channels = len(stem.bias)
            # The stages' weights as the op takes them: float32 arrays stay float32 (BN scales,
            # shifts, biases), the others become the activations' dtype.
            self._stages = []
            for prepared in prepare_stages(model):
                stage = [block.converted(lambda a: tensor(
                    a, "float32" if a.dtype == np.float32 else self.dtype)) for block in prepared]
                named = {name: weight for index, block in enumerate(stage)
                         for name, weight in block.named(index).items()}
                self._stages.append((stage, [named[n] for n in stage_weight_order(stage)]))
            self._head = Head(*(tensor(array) for array in prepare_head(model)))
        self._plans = OrderedDict()  # (n, h, w) -> plan_forward(...)

    def _plan(self, n, h, w):
        key = (n, h, w)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = plan_forward([stage for stage, _ in self._stages], n, h, w,
                                                   self._stem_channels, self.dtype, self.arch)
            while len(self._plans) > MAX_PLANS:
                self._plans.popitem(last=False)
        self._plans.move_to_end(key)
        return plan

    def __call__(self, x):
        check_gpu_images(f"compiled {self.model_name} (GPU)", x, self.device_id)
        if x.shape[0] == 0:
            return paddle.zeros([0, self.class_num], "float32")
        with paddle.no_grad():
            rows, (n, h, w) = run_stem(x, self._stem, self.dtype)
            plans = self._plan(n, h, w)
            for (_, weights), (_, encoded) in zip(self._stages, plans):
                rows = aot_stage(rows, weights, encoded)
            return run_head(rows, plans[-1][0], self._head)
