"""Triton eval forward of grouped 3x3 conv (padding 1) + folded BatchNorm + ReLU.

out = relu(conv(x', w_folded, stride, padding=1, groups) + bias), x' = x, or with the optional
input prologue x' = relu(x * in_scale + in_shift) per input channel (an eval BatchNorm + ReLU on
the input, applied to loaded pixels only: the zero padding pads x').

One program computes a block of output channels of one group for a block of output positions of
one image; each (input channel, tap) step is an outer product of a weight column and a row of
shifted inputs (plain FMAs: the groups hold only 3..32 channels, too few for tensor-core tiles).
fp32 accumulation; x and out fp32/fp16/bf16, folded weights, bias and in_scale/in_shift fp32.

Framework-free: tensors are anything Triton accepts as a pointer argument; `out` is preallocated.
"""
import os

import triton
import triton.language as tl


@triton.jit
def _grouped_conv_bias_relu_kernel(x_ptr, w_ptr, bias_ptr, in_scale_ptr, in_shift_ptr, out_ptr,
                                   C, H, W, C_OUT, H_OUT, W_OUT, GROUPS, COUT_G,
                                   STRIDE: tl.constexpr, CIN_G: tl.constexpr,
                                   IN_AFFINE: tl.constexpr, BLOCK_OC: tl.constexpr,
                                   BLOCK_P: tl.constexpr):
    pid_image_group = tl.program_id(0)
    b = (pid_image_group // GROUPS).to(tl.int64)
    g = pid_image_group % GROUPS
    oc = tl.program_id(1) * BLOCK_OC + tl.arange(0, BLOCK_OC)
    oc_mask = oc < COUT_G
    channel = g * COUT_G + oc
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < H_OUT * W_OUT
    oh = p // W_OUT
    ow = p % W_OUT

    acc = tl.zeros([BLOCK_OC, BLOCK_P], dtype=tl.float32)
    x_group = x_ptr + (b * C + g * CIN_G) * H * W
    for ic in range(C // GROUPS):  # a runtime bound: fully unrolled, wide groups spill
        x_channel = x_group + ic * H * W
        w_channel = w_ptr + (channel * CIN_G + ic) * 9
        if IN_AFFINE:
            in_scale = tl.load(in_scale_ptr + g * CIN_G + ic)
            in_shift = tl.load(in_shift_ptr + g * CIN_G + ic)
        for kh in tl.static_range(3):
            ih = oh * STRIDE + (kh - 1)
            row_ok = p_mask & (ih >= 0) & (ih < H)
            for kw in tl.static_range(3):
                iw = ow * STRIDE + (kw - 1)
                ok = row_ok & (iw >= 0) & (iw < W)
                xv = tl.load(x_channel + ih * W + iw, mask=ok, other=0.0).to(tl.float32)
                if IN_AFFINE:
                    xv = tl.where(ok, tl.maximum(xv * in_scale + in_shift, 0.0), 0.0)
                wv = tl.load(w_channel + kh * 3 + kw, mask=oc_mask, other=0.0).to(tl.float32)
                acc += wv[:, None] * xv[None, :]
    bias = tl.load(bias_ptr + channel, mask=oc_mask, other=0.0).to(tl.float32)
    acc = tl.maximum(acc + bias[:, None], 0.0)
    out_offsets = (b * C_OUT + channel[:, None]) * (H_OUT * W_OUT) + p[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty),
             mask=oc_mask[:, None] & p_mask[None, :])


def grouped_conv_bias_relu_forward(x, w_folded, bias, out, n, c, h, w, c_out, groups, stride,
                                   in_scale=None, in_shift=None):
    """out[n, c_out, h_out, w_out] = relu(grouped_conv3x3(x', w_folded) + bias); out preallocated.

    x' = relu(x * in_scale + in_shift) (fp32 [c] each) when in_scale is given, else x.
    """
    in_affine = in_scale is not None
    if in_affine != (in_shift is not None):
        raise ValueError("grouped_conv_bias_relu_forward: give both in_scale and in_shift or "
                         "neither")
    h_out, w_out = (h - 1) // stride + 1, (w - 1) // stride + 1
    cin_g, cout_g = c // groups, c_out // groups
    block_oc = min(triton.next_power_of_2(cout_g), 16)
    # The CPU interpreter pays per program: fewer, larger programs there.
    max_block_p = 1024 if os.environ.get("TRITON_INTERPRET") == "1" else 128
    block_p = min(triton.next_power_of_2(h_out * w_out), max_block_p)
    grid = (n * groups, triton.cdiv(cout_g, block_oc), triton.cdiv(h_out * w_out, block_p))
    # Without the prologue the scale/shift pointers are never read: pass bias in their place.
    _grouped_conv_bias_relu_kernel[grid](x, w_folded, bias, in_scale if in_affine else bias,
                                         in_shift if in_affine else bias, out, c, h, w, c_out,
                                         h_out, w_out, groups, cout_g, STRIDE=stride, CIN_G=cin_g,
                                         IN_AFFINE=in_affine, BLOCK_OC=block_oc, BLOCK_P=block_p)
    return out


def _aot_specs():
    """(kernel, signature, constexprs) per dtype for tests/test_gpu_compile.py's ahead-of-time
    compile: DPN92's widest group (24 channels, 32-channel output block) at stride 1 with the
    input prologue, and its narrowest (3 channels) at stride 2 without, at the GPU position block."""
    specs = []
    for dt in ("fp32", "fp16", "bf16"):
        signature = {"x_ptr": f"*{dt}", "w_ptr": "*fp32", "bias_ptr": "*fp32",
                     "in_scale_ptr": "*fp32", "in_shift_ptr": "*fp32", "out_ptr": f"*{dt}",
                     **{k: "i32" for k in ("C", "H", "W", "C_OUT", "H_OUT", "W_OUT", "GROUPS",
                                           "COUT_G")},
                     **{k: "constexpr" for k in ("STRIDE", "CIN_G", "IN_AFFINE", "BLOCK_OC",
                                                 "BLOCK_P")}}
        for stride, cin_g, in_affine in ((1, 24, True), (2, 3, False)):
            specs.append((_grouped_conv_bias_relu_kernel, signature,
                          {"STRIDE": stride, "CIN_G": cin_g, "IN_AFFINE": in_affine,
                           "BLOCK_OC": min(triton.next_power_of_2(cin_g), 16), "BLOCK_P": 128}))
    return specs


AOT_SPECS = _aot_specs()  # see tests/_triton_aot.py
