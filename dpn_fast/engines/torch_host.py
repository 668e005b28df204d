"""The torch host: channels-last fused forward of timm's DPNs (dpn68, dpn68b, dpn92, dpn98,
dpn107, dpn131) on dpn_fast's Triton kernels. Entry point `fuse` (public as `dpn_fast.torch.fuse`).
Needs torch and triton, not Paddle.

    import timm
    from dpn_fast.torch import fuse
    model = timm.create_model("dpn92", pretrained=True).eval().cuda().half()
    fused = fuse(model)
    logits = fused(images)  # [n, 3, H, W] in the model's dtype and device

Each stage keeps its activations as rows, one per position (image, h, w), in one buffer
`[n * h * w, resid + capacity]`: the residual channels, then the dense channels appended block
by block (capacity: the dense channels the stage ends with). A block is four launches, with no
concat, no BN pass and no layout change:
- a projection (first block of a stage): 1x1 conv of the previous stage's rows with its BN +
  ReLU as the GEMM's prologue and stride 2 as a row gather, into the new buffer's first
  resid + 2 * inc columns (timm's split into resid and dense is where the columns fall);
- 1x1a: its BN + ReLU as prologue, reading the buffer's resid | dense prefix through the row
  stride; c3x3_b's BN folded into it, ReLU as epilogue;
- the grouped 3x3 conv with c1x1_c's BN folded in, ReLU as epilogue;
- 1x1c: epilogue adds the first resid columns into the buffer's resid in place and writes the
  inc new dense columns behind the stage's existing ones.
timm's own modules run the stem (conv + BN + ReLU + max pool, NCHW), and at the end the final BN
+ ELU (on a channels-last view of the last buffer) and the head. Eval only: the BNs are folded
with their running statistics when `fuse` is called (later changes to the model are not seen).

Buffers live in a workspace per input shape, allocated on the first call at that shape and
reused: no allocation by the fused part afterwards and no host synchronisation, so the forward
can be captured in a CUDA graph. Stages alternate between two buffers (stage i reads stage
i - 1's). On CPU the kernels run only under TRITON_INTERPRET=1 (set before triton is imported).
"""
import sys
from dataclasses import dataclass

import torch

from dpn_fast.kernels import nhwc_conv1x1, nhwc_grouped_conv3x3

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


@dataclass
class _Gemm:
    """A 1x1 conv as the GEMM kernel runs it: weight [K, N] in the activations' dtype; fp32 BN
    scale/shift of its input (prologue) and bias, each optional."""
    weight: torch.Tensor
    in_scale: torch.Tensor = None
    in_shift: torch.Tensor = None
    bias: torch.Tensor = None


@dataclass
class _Block:
    stride: int
    resid: int         # residual channels (timm's num_1x1_c)
    inc: int           # dense channels the block appends
    bottleneck: int    # channels of 1x1a's output and the grouped conv
    groups: int
    projection: _Gemm  # None except in a stage's first block
    conv_a: _Gemm
    grouped_weight: torch.Tensor  # packed for grouped_tiles
    grouped_bias: torch.Tensor
    grouped_tiles: tuple
    conv_c: _Gemm


def _bn_affine(bn, name):
    """(scale, shift) of an eval BatchNorm in float64; checks it is followed by a ReLU (timm's
    BatchNormAct2d), as the kernels' prologues and epilogues assume."""
    act = getattr(bn, "act", None)
    if not isinstance(bn, torch.nn.modules.batchnorm._BatchNorm) or \
            not isinstance(act, torch.nn.ReLU) or \
            not isinstance(getattr(bn, "drop", torch.nn.Identity()), torch.nn.Identity):
        raise TypeError(f"fuse: {name} must be timm's BatchNormAct2d with a ReLU, got "
                        f"{type(bn).__name__} with {type(act).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"fuse: {name} has no running statistics to fold")
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def _conv_weight(conv, name, kernel, groups=1):
    if not isinstance(conv, torch.nn.Conv2d) or conv.kernel_size != (kernel, kernel) or \
            conv.bias is not None or conv.groups != groups or conv.dilation != (1, 1) or \
            conv.padding != (kernel // 2, kernel // 2):
        raise TypeError(f"fuse: {name} must be a bias-free {kernel}x{kernel} Conv2d (padding "
                        f"{kernel // 2}, groups {groups}), got {conv}")
    return conv.weight.detach().double()


def _fold_block(blk, index, dtype, grouped):
    label = f"block {index}"
    projection = blk.c1x1_w_s1 if blk.c1x1_w_s1 is not None else blk.c1x1_w_s2
    stride = blk.key_stride
    as_gemm = lambda w: w.reshape(w.shape[0], -1).t().to(dtype).contiguous()  # noqa: E731
    f32 = lambda t: t.float().contiguous()  # noqa: E731

    proj = None
    if projection is not None:
        if projection.conv.stride != (stride, stride):
            raise ValueError(f"fuse: {label}'s projection has stride {projection.conv.stride}, "
                             f"its grouped conv {stride}")
        scale, shift = _bn_affine(projection.bn, f"{label} c1x1_w.bn")
        w = _conv_weight(projection.conv, f"{label} c1x1_w.conv", 1)
        proj = _Gemm(as_gemm(w), f32(scale), f32(shift))

    a_scale, a_shift = _bn_affine(blk.c1x1_a.bn, f"{label} c1x1_a.bn")
    b_scale, b_shift = _bn_affine(blk.c3x3_b.bn, f"{label} c3x3_b.bn")
    w_a = _conv_weight(blk.c1x1_a.conv, f"{label} c1x1_a.conv", 1) * b_scale.view(-1, 1, 1, 1)
    conv_a = _Gemm(as_gemm(w_a), f32(a_scale), f32(a_shift), f32(b_shift))

    conv_b = blk.c3x3_b.conv
    channels = conv_b.in_channels
    if conv_b.out_channels != channels or conv_b.stride != (stride, stride):
        raise TypeError(f"fuse: {label} c3x3_b.conv must keep its {channels} channels at stride "
                        f"{stride}, got {conv_b}")
    groups = conv_b.groups
    c_scale, c_shift = _bn_affine(blk.c1x1_c.bn, f"{label} c1x1_c.bn")
    w_b = _conv_weight(conv_b, f"{label} c3x3_b.conv", 3, groups) * c_scale.view(-1, 1, 1, 1)
    tiles = grouped.choose_tiles(channels // groups, 1 << 20, dtype != torch.float32,
                                 grouped.INTERPRETED)
    packed = torch.from_numpy(grouped.pack_weights(w_b.cpu().numpy(), groups, tiles))

    if blk.b:  # dpn68b: c1x1_c is BN + ReLU alone, its conv split in two
        w_c = torch.cat([_conv_weight(blk.c1x1_c1, f"{label} c1x1_c1", 1),
                         _conv_weight(blk.c1x1_c2, f"{label} c1x1_c2", 1)])
    else:
        w_c = _conv_weight(blk.c1x1_c.conv, f"{label} c1x1_c.conv", 1)
    resid, inc = blk.num_1x1_c, blk.inc
    if w_c.shape[0] != resid + inc:
        raise ValueError(f"fuse: {label} c1x1_c gives {w_c.shape[0]} channels, expected "
                         f"{resid} + {inc}")
    return _Block(stride, resid, inc, channels, groups, proj, conv_a,
                  packed.to(device=w_a.device, dtype=dtype), f32(c_shift), tiles,
                  _Gemm(as_gemm(w_c)))


def fuse(model):
    """The fused forward of an eval timm DPN (its parameters' dtype and device): a FusedDPN."""
    return FusedDPN(model)


class FusedDPN:
    """Callable: images [n, C, H, W] -> logits, as model(images) in eval. See the module doc."""

    def __init__(self, model):
        features = getattr(model, "features", None)
        if features is None or not all(hasattr(features, name) for name in
                                       ("conv1_1", "conv1_pool", "conv5_bn_ac")):
            raise TypeError(f"fuse: expected a timm DPN (features.conv1_1 ... conv5_bn_ac), got "
                            f"{type(model).__name__}")
        if model.training:
            raise ValueError("fuse: the model is in training mode; call model.eval() first (the "
                             "BatchNorms are folded with their running statistics)")
        weight = features.conv1_1.conv.weight
        self.dtype, self.device = weight.dtype, weight.device
        if self.dtype not in DTYPES:
            raise TypeError(f"fuse: model dtype must be one of {DTYPES}, got {self.dtype}")
        self.gemm, self.grouped = nhwc_conv1x1, nhwc_grouped_conv3x3
        if self.device.type != "cuda" and not self.gemm.INTERPRETED:
            raise ValueError(f"fuse: the model is on {self.device}; the kernels run on CUDA, or "
                             "on CPU under TRITON_INTERPRET=1 set before triton is imported")
        if self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 0):
            raise ValueError(f"fuse: {torch.cuda.get_device_name(self.device)} is older than "
                             "sm_80; the kernels are written for tensor cores of sm_80 and newer")
        self.model = model
        self.in_channels = weight.shape[1]
        blocks = [m for m in features if hasattr(m, "c1x1_a")]
        if not blocks or blocks[0].c1x1_w_s1 is None and blocks[0].c1x1_w_s2 is None:
            raise TypeError("fuse: the model's first dual path block must be a projection block")
        with torch.no_grad():
            self.blocks = [_fold_block(b, i, self.dtype, self.grouped)
                           for i, b in enumerate(blocks)]
        # Stages: a projection block and the blocks up to the next one.
        self.stages = []
        for blk in self.blocks:
            if blk.projection is not None:
                self.stages.append([])
            self.stages[-1].append(blk)
        self._workspaces = {}

    @staticmethod
    def _stage_width(stage):
        first = stage[0]
        return first.resid + 2 * first.inc + sum(b.inc for b in stage)

    def _workspace(self, n, h, w):
        """Buffers for inputs of n images whose stem output is h x w (created once per shape)."""
        key = (n, h, w)
        if key not in self._workspaces:
            sizes, scratch = [0, 0], [0, 0]
            for i, stage in enumerate(self.stages):
                rows_in = n * h * w
                h, w = (h - 1) // stage[0].stride + 1, (w - 1) // stage[0].stride + 1
                rows = n * h * w
                sizes[i % 2] = max(sizes[i % 2], rows * self._stage_width(stage))
                width = max(b.bottleneck for b in stage)
                scratch[0] = max(scratch[0], rows_in * width)  # 1x1a of the first block: input rows
                scratch[1] = max(scratch[1], rows * width)
            new = lambda size: torch.empty(size, device=self.device, dtype=self.dtype)  # noqa: E731
            stem_channels = self.stages[0][0].projection.weight.shape[0]
            self._workspaces[key] = {"stem": new(key[0] * key[1] * key[2] * stem_channels),
                                     "stages": [new(s) for s in sizes],
                                     "scratch": [new(s) for s in scratch]}
        return self._workspaces[key]

    def _check_input(self, x):
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

    def _forward(self, x):
        features = self.model.features
        x = features.conv1_pool(features.conv1_1(x))
        n, channels, h, w = x.shape
        ws = self._workspace(n, h, w)
        rows = ws["stem"][:n * h * w * channels].view(n, h, w, channels)
        rows.copy_(x.permute(0, 2, 3, 1))
        src, src_width = rows, channels
        for i, stage in enumerate(self.stages):
            src, h, w = self._stage(stage, ws, i, src, src_width, n, h, w)
            src_width = self._stage_width(stage)
        out = src.view(n, h, w, src_width).permute(0, 3, 1, 2)  # NCHW view of channels-last rows
        return self.model.forward_head(features.conv5_bn_ac(out))

    def _stage(self, stage, ws, index, src, src_width, n, h, w):
        """Runs one stage from src (the previous rows, src_width channels at h x w); returns its
        buffer and size."""
        first = stage[0]
        stride = first.stride
        h_out, w_out = (h - 1) // stride + 1, (w - 1) // stride + 1
        rows_in, rows = n * h * w, n * h_out * w_out
        width = self._stage_width(stage)
        buf = ws["stages"][index % 2][:rows * width].view(rows, width)
        proj = first.projection
        self.gemm.conv1x1_forward(src, proj.weight, buf, rows=rows, k=src_width,
                                  n=proj.weight.shape[1], lda=src_width, ldo=width,
                                  stride=stride, in_hw=(h, w), in_scale=proj.in_scale,
                                  in_shift=proj.in_shift)
        dense = 2 * first.inc  # dense channels in the buffer so far
        for blk in stage:
            if blk is first:  # reads the previous stage's rows at their size
                a_src, a_k, a_ld, a_rows, a_hw = src, src_width, src_width, rows_in, (h, w)
            else:
                a_src, a_k, a_ld, a_rows, a_hw = buf, blk.resid + dense, width, rows, \
                    (h_out, w_out)
            r = blk.bottleneck
            bottleneck = ws["scratch"][0][:a_rows * r].view(a_rows, r)
            self.gemm.conv1x1_forward(a_src, blk.conv_a.weight, bottleneck, rows=a_rows, k=a_k,
                                      n=r, lda=a_ld, ldo=r, in_scale=blk.conv_a.in_scale,
                                      in_shift=blk.conv_a.in_shift, bias=blk.conv_a.bias,
                                      relu=True)
            grouped = ws["scratch"][1][:rows * r].view(rows, r)
            self.grouped.grouped_conv3x3_forward(
                bottleneck, blk.grouped_weight, blk.grouped_bias, grouped, images=n, h=a_hw[0],
                w=a_hw[1], c=r, groups=blk.groups, stride=blk.stride, ldx=r, ldo=r,
                tiles=blk.grouped_tiles)
            self.gemm.conv1x1_forward(grouped, blk.conv_c.weight, buf, rows=rows, k=r,
                                      n=blk.resid + blk.inc, lda=r, ldo=width, split=blk.resid,
                                      dense_gap=dense, add_to_out=True)
            dense += blk.inc
        return buf, h_out, w_out
