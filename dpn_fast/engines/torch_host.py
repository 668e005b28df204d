"""The torch host: channels-last fused forward of timm's DPNs (dpn68, dpn68b, dpn92, dpn98,
dpn107, dpn131) on dpn_fast's Triton kernels. Entry point `fuse` (public as `dpn_fast.torch.fuse`).
Needs torch and triton, not Paddle.

    import timm
    from dpn_fast.torch import fuse
    model = timm.create_model("dpn92", pretrained=True).eval().cuda().half()
    fused = fuse(model)
    logits = fused(images)  # [n, 3, H, W] in the model's dtype and device
    graphed = fused.cuda_graph(images)  # the whole forward in one CUDA graph at images' shape

Each stage keeps its activations as rows, one per position (image, h, w), in one buffer
`[n * h * w, resid + capacity]` (rows padded to a multiple of 8 channels, so each starts 16-byte
aligned): the residual channels, then the dense channels appended block by block (capacity: the
dense channels the stage ends with). A block is four launches, with no
concat, no BN pass and no layout change:
- a projection (first block of a stage): 1x1 conv of the previous stage's rows with its BN +
  ReLU as the GEMM's prologue and stride 2 as a row gather, into the new buffer's first
  resid + 2 * inc columns (timm's split into resid and dense is where the columns fall);
- 1x1a: its BN + ReLU as prologue, reading the buffer's resid | dense prefix through the row
  stride; c3x3_b's BN folded into it, ReLU as epilogue; it writes the grouped conv's slot
  layout (nhwc_grouped_conv3x3.slot_layout: each chunk of groups 16-byte aligned), its weights
  zero in the padding columns;
- the grouped 3x3 conv with c1x1_c's BN folded in, ReLU as epilogue, slots in and out;
- 1x1c: reads the slots (zero weight rows for the padding); its epilogue adds the first resid
  columns into the buffer's resid in place and writes the inc new dense columns behind the
  stage's existing ones.
timm's own modules run the stem (conv + BN + ReLU + max pool, NCHW), and at the end the final BN
+ ELU (on a channels-last view of the last buffer) and the head. Eval only: the BNs are folded
with their running statistics when `fuse` is called (later changes to the model are not seen),
by dpn_fast/kernels/_stage_weights.py, which prepares the Paddle GPU engine's weights too.

A forward is planned once per input shape and stream (`_Plan`), each stage's launches by
dpn_fast/kernels/_stage.py (the plan as data, which Paddle's GPU stage op runs too): the
workspace buffers are allocated and every launch's arguments checked then; the launches go to
Triton's JIT, or with `fuse(..., kernels=)` to the op library's ahead-of-time kernels; later
calls at that shape only launch. The plans of the last `max_plans` shapes/streams are kept
(least recently used dropped). Stages alternate between two buffers (stage i reads stage
i - 1's). Nothing in the fused part allocates or synchronises after planning, so
`FusedDPN.cuda_graph` captures the whole forward (stem, kernels, head) at any batch size in one
CUDA graph. On CPU the kernels run only under TRITON_INTERPRET=1 (set before triton is
imported).
"""
import sys
from collections import OrderedDict
from functools import partial

import numpy as np
import torch

from dpn_fast.kernels import nhwc_conv1x1
from dpn_fast.kernels._stage import plan_stages
from dpn_fast.kernels._stage_weights import BatchNorm, BlockParameters, ConvBN, prepare_block

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def import_timm():
    """`import timm`, also beside a torchvision whose compiled ops do not load (PyPI's CUDA build
    of torchvision next to a CPU torch): registering their fake kernels fails at import, and timm
    needs only torchvision's Python parts, so that registration is skipped on a second try."""
    try:
        import timm
        return timm
    except (ImportError, RuntimeError):
        pass
    import torch.library
    register_fake = torch.library.register_fake
    torch.library.register_fake = lambda *args, **kwargs: (lambda fn: fn)
    try:
        for name in [m for m in sys.modules if m.startswith(("torchvision", "timm"))]:
            del sys.modules[name]
        import timm
    finally:
        torch.library.register_fake = register_fake
    return timm


def _array(tensor):
    """A parameter as a float64 numpy array (None stays None)."""
    return None if tensor is None else tensor.detach().double().cpu().numpy()


def _batch_norm(bn, name):
    """An eval BatchNorm's parameters; checks it is followed by a ReLU (timm's BatchNormAct2d),
    as the kernels' prologues and epilogues assume."""
    act = getattr(bn, "act", None)
    if not isinstance(bn, torch.nn.modules.batchnorm._BatchNorm) or \
            not isinstance(act, torch.nn.ReLU) or \
            not isinstance(getattr(bn, "drop", torch.nn.Identity()), torch.nn.Identity):
        raise TypeError(f"fuse: {name} must be timm's BatchNormAct2d with a ReLU, got "
                        f"{type(bn).__name__} with {type(act).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"fuse: {name} has no running statistics to fold")
    return BatchNorm(_array(bn.running_mean), _array(bn.running_var), bn.eps, _array(bn.weight),
                     _array(bn.bias))


def _conv_weight(conv, name, kernel, groups=1):
    if not isinstance(conv, torch.nn.Conv2d) or conv.kernel_size != (kernel, kernel) or \
            conv.bias is not None or conv.groups != groups or conv.dilation != (1, 1) or \
            conv.padding != (kernel // 2, kernel // 2):
        raise TypeError(f"fuse: {name} must be a bias-free {kernel}x{kernel} Conv2d (padding "
                        f"{kernel // 2}, groups {groups}), got {conv}")
    return _array(conv.weight)


def _conv_bn(module, name, kernel, groups=1):
    """timm's BnActConv2d (BN + ReLU, then a conv)."""
    return ConvBN(_batch_norm(module.bn, f"{name}.bn"),
                  _conv_weight(module.conv, f"{name}.conv", kernel, groups))


def _block_parameters(blk, label):
    """The BlockParameters of timm's DualPathBlock `blk`."""
    projection = blk.c1x1_w_s1 if blk.c1x1_w_s1 is not None else blk.c1x1_w_s2
    stride = blk.key_stride
    if projection is not None and projection.conv.stride != (stride, stride):
        raise ValueError(f"fuse: {label}'s projection has stride {projection.conv.stride}, its "
                         f"grouped conv {stride}")
    conv_b = blk.c3x3_b.conv
    channels = conv_b.in_channels
    if conv_b.out_channels != channels or conv_b.stride != (stride, stride):
        raise TypeError(f"fuse: {label} c3x3_b.conv must keep its {channels} channels at stride "
                        f"{stride}, got {conv_b}")
    if blk.b:  # dpn68b: c1x1_c is BN + ReLU alone, its conv split in two
        conv_c = ConvBN(_batch_norm(blk.c1x1_c.bn, f"{label} c1x1_c.bn"), np.concatenate(
            [_conv_weight(blk.c1x1_c1, f"{label} c1x1_c1", 1),
             _conv_weight(blk.c1x1_c2, f"{label} c1x1_c2", 1)]))
    else:
        conv_c = _conv_bn(blk.c1x1_c, f"{label} c1x1_c", 1)
    return BlockParameters(
        stride, blk.num_1x1_c, blk.inc, conv_b.groups,
        None if projection is None else _conv_bn(projection, f"{label} c1x1_w", 1),
        _conv_bn(blk.c1x1_a, f"{label} c1x1_a", 1),
        _conv_bn(blk.c3x3_b, f"{label} c3x3_b", 3, conv_b.groups), conv_c)


def to_torch(prepared, dtype, device):
    """A PreparedBlock's weights as tensors on `device`: the fp32 operands fp32, the others in the
    activations' `dtype`."""
    return prepared.converted(lambda array: torch.from_numpy(array).to(
        device=device, dtype=torch.float32 if array.dtype == np.float32 else dtype))


def _prepare_block(blk, index, dtype, device):
    """Block `index` of the model prepared for its stage plan (dpn_fast/kernels/_stage_weights.py)
    as tensors."""
    label = f"block {index}"
    return to_torch(prepare_block(_block_parameters(blk, label), f"fuse: {label}"), dtype, device)


def fuse(model, max_plans=4, kernels=None):
    """The fused forward of an eval timm DPN (its parameters' dtype and device): a FusedDPN.
    max_plans: how many input shapes/streams keep their planned forward and workspace.
    kernels: None (Triton's JIT compiles and launches the kernels) or the op library's
    ahead-of-time kernels, dpn_fast.kernels._abi.EmbeddedKernels(path of libdpn_fast_ops.so or
    the Paddle-free libdpn_fast_kernels.so of a CUDA build), which then run the same plans."""
    return FusedDPN(model, max_plans, kernels)


class _Plan:
    """A forward at one input shape, planned once for a GPU of compute capability `arch` (None:
    the interpreter): each stage's launches (dpn_fast/kernels/_stage.py) bound to this plan's
    workspace buffers and the model's weights, their arguments checked when planned. `run()`
    copies the stem's output into the first rows buffer, launches, and returns the last stage's
    rows as an NCHW view."""

    def __init__(self, fused, n, h, w, arch):
        self.arch, self.kernels, self.device = arch, fused.kernels, fused.device
        dtype = str(fused.dtype).replace("torch.", "")
        stem_channels = fused.stages[0][0].named(0)["0.projection.weight"].shape[0]
        stem_shape = (n, h, w, stem_channels)
        plans = plan_stages([[blk.shape for blk in stage] for stage in fused.stages], n, h, w,
                            stem_channels, dtype, arch)
        new = lambda size: torch.empty(size, device=fused.device, dtype=fused.dtype)  # noqa: E731
        # Stages alternate between two buffers (stage i reads stage i - 1's); one scratch each
        # for the bottleneck rows and the grouped conv's output.
        self.stem = new(plans[0].sizes["input"]).view(stem_shape)
        self.buffers = [new(max(p.sizes["stage"] for p in plans[i::2])) for i in range(2)]
        scratch = {name: new(max(p.sizes[name] for p in plans))
                   for name in ("bottleneck", "grouped")}
        self.launches = []
        source = self.stem
        for i, (stage, plan) in enumerate(zip(fused.stages, plans)):
            memory = {"input": source, "stage": self.buffers[i % 2], **scratch}
            for index, blk in enumerate(stage):
                memory.update(blk.named(index))
            self.launches += [launch.bind(partial(_bound, memory)) for launch in plan.launches]
            source = self.buffers[i % 2]
        # NCHW view of the last rows (channels-last strides), without the row padding.
        plan = plans[-1]
        h, w, width, ld = plan.h, plan.w, plan.width, plan.row_stride
        self.out = source[:n * h * w * ld].view(n, h, w, ld)[..., :width].permute(0, 3, 1, 2)

    def run(self, stem_out):
        self.stem.copy_(stem_out.permute(0, 2, 3, 1))
        if self.kernels is None:
            for launch in self.launches:
                launch()
        else:
            stream = torch.cuda.current_stream(self.device).cuda_stream
            for launch in self.launches:
                self.kernels.launch_planned(launch, stream)
        return self.out


def _bound(memory, region):
    """The tensor a planned Region names, checked to hold it."""
    tensor = memory[region.name]
    if str(tensor.dtype).replace("torch.", "") != region.dtype or \
            tensor.numel() < region.size or not tensor.is_contiguous():
        raise ValueError(f"stage plan: {region.name} is a {tensor.dtype} tensor of "
                         f"{tensor.numel()} elements (contiguous: {tensor.is_contiguous()}); "
                         f"the plan needs {region.size} {region.dtype}")
    return tensor


class FusedDPN:
    """Callable: images [n, C, H, W] -> logits, as model(images) in eval. See the module doc."""

    def __init__(self, model, max_plans=4, kernels=None):
        features = getattr(model, "features", None)
        if features is None or not all(hasattr(features, name) for name in
                                       ("conv1_1", "conv1_pool", "conv5_bn_ac")):
            raise TypeError(f"fuse: expected a timm DPN (features.conv1_1 ... conv5_bn_ac), got "
                            f"{type(model).__name__}")
        if model.training:
            raise ValueError("fuse: the model is in training mode; call model.eval() first (the "
                             "BatchNorms are folded with their running statistics)")
        if not isinstance(max_plans, int) or max_plans < 1:
            raise ValueError(f"fuse: max_plans must be a positive int, got {max_plans!r}")
        weight = features.conv1_1.conv.weight
        self.dtype, self.device = weight.dtype, weight.device
        if self.dtype not in DTYPES:
            raise TypeError(f"fuse: model dtype must be one of {DTYPES}, got {self.dtype}")
        if kernels is not None and self.device.type != "cuda":
            raise ValueError(f"fuse: the embedded kernels (kernels=) run on CUDA; the model is "
                             f"on {self.device}")
        self.kernels = kernels
        self.gemm = nhwc_conv1x1
        self.arch = None  # the interpreter's (CPU)
        if self.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(self.device)
            if major < 8:
                raise ValueError(f"fuse: {torch.cuda.get_device_name(self.device)} is older than "
                                 "sm_80; the kernels are written for tensor cores of sm_80 and "
                                 "newer")
            self.arch = 10 * major + minor
        self.model = model
        self.in_channels = weight.shape[1]
        blocks = [m for m in features if hasattr(m, "c1x1_a")]
        if not blocks or blocks[0].c1x1_w_s1 is None and blocks[0].c1x1_w_s2 is None:
            raise TypeError("fuse: the model's first dual path block must be a projection block")
        self.blocks = [_prepare_block(b, i, self.dtype, self.device)
                       for i, b in enumerate(blocks)]
        # Stages: a projection block and the blocks up to the next one.
        self.stages = []
        for blk in self.blocks:
            if blk.has_projection:
                self.stages.append([])
            self.stages[-1].append(blk)
        self.max_plans = max_plans
        self._plans = OrderedDict()  # (n, h, w, stream) -> _Plan, least recently used first

    def _plan(self, n, h, w):
        """The plan for stem output n x h x w on the current stream (made on first use)."""
        stream = torch.cuda.current_stream(self.device).cuda_stream \
            if self.device.type == "cuda" else None
        key = (n, h, w, stream)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _Plan(self, n, h, w, self.arch)
            while len(self._plans) > self.max_plans:
                self._plans.popitem(last=False)
        self._plans.move_to_end(key)
        return plan

    def _check_input(self, x):
        if self.device.type != "cuda" and not self.gemm.INTERPRETED:
            raise ValueError(f"FusedDPN: the model is on {self.device}; the kernels run on CUDA, "
                             "or on CPU under TRITON_INTERPRET=1 set before triton is imported "
                             "(on CPU without it the forward can be planned, not run)")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FusedDPN: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"FusedDPN: expected images [n, {self.in_channels}, H, W], got "
                             f"{tuple(x.shape)}")
        if x.dtype != self.dtype or x.device != self.device:
            raise TypeError(f"FusedDPN: input is {x.dtype} on {x.device}, the model "
                            f"{self.dtype} on {self.device}")

    def __call__(self, x):
        self._check_input(x)
        with torch.no_grad():
            return self._forward(x)

    def _forward(self, x, plan=None):
        """timm's stem, the planned kernels (the given plan, else the shape's), timm's head."""
        features = self.model.features
        x = features.conv1_pool(features.conv1_1(x))
        if plan is None:
            plan = self._plan(*x.shape[:1], *x.shape[2:])
        return self.model.forward_head(features.conv5_bn_ac(plan.run(x)))

    def cuda_graph(self, example, graph=None):
        """The whole forward at example's shape (any batch) captured once: a GraphedDPN whose
        calls copy their images into the captured input and replay. Its plan and workspace are
        its own (never dropped while it lives). graph: the capture mechanism, default a CUDA
        graph on the model's device; any object with capture(fn) -> fn's result and replay()."""
        self._check_input(example)
        if graph is None:
            if self.device.type != "cuda":
                raise ValueError(f"cuda_graph: the model is on {self.device}; CUDA graphs need "
                                 "a CUDA device")
            graph = _CudaGraph(self.device)
        with torch.no_grad():
            stem = self.model.features.conv1_pool(self.model.features.conv1_1(example))
            n, _, h, w = stem.shape
            plan = _Plan(self, n, h, w, self.arch)
            static_in = example.clone()
            static_out = graph.capture(lambda: self._forward(static_in, plan))
        return GraphedDPN(graph, static_in, static_out, plan)


class _CudaGraph:
    """capture(fn): runs fn once on a side stream (Triton compiles its kernels, cuDNN picks its
    algorithms: nothing of that may happen inside a capture), then captures it."""

    def __init__(self, device):
        self.device = device
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn):
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        with torch.cuda.graph(self.graph):
            return fn()

    def replay(self):
        self.graph.replay()


class GraphedDPN:
    """A FusedDPN forward captured at one input shape: call it with images of that shape, dtype
    and device. Returns the captured output tensor, overwritten by the next call (clone it to
    keep it)."""

    def __init__(self, graph, static_in, static_out, plan):
        self.graph, self.static_in, self.static_out, self._plan = graph, static_in, static_out, \
            plan

    def __call__(self, x):
        if not isinstance(x, torch.Tensor) or x.shape != self.static_in.shape or \
                x.dtype != self.static_in.dtype or x.device != self.static_in.device:
            got = (tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else type(x)
            raise ValueError(f"GraphedDPN: captured for images {tuple(self.static_in.shape)} "
                             f"{self.static_in.dtype} on {self.static_in.device}, got {got}")
        with torch.no_grad():
            self.static_in.copy_(x)
            self.graph.replay()
        return self.static_out
