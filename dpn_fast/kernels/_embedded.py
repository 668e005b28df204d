"""The kernel variants compiled ahead of time into the op library (CUDA builds): for each
channels-last kernel, every arch its tile table lists (from the module's AOT_MIN_CC on), every
activation dtype, and the module's `embedded_variants(arch, dtype)` (forms x tile entries x
alignment variants, as its launcher builds a Launch's options).

build_backend/aot_cubins.py compiles this list into the library; csrc/aot_kernels.cc launches
it (the C ABI); `_abi.py` calls that ABI. A planned Launch finds its variant by
(kernel name, dtype, Launch.variant) and the device's arch.
"""
from typing import NamedTuple

from dpn_fast.kernels import nhwc_conv1x1, nhwc_grouped_conv3x3
from dpn_fast.kernels._launch import variant_key
from dpn_fast.kernels._tiles import archs

# (module, its launchable kernel, its tile table key)
KERNELS = ((nhwc_conv1x1, "_conv1x1_kernel", "conv1x1"),
           (nhwc_grouped_conv3x3, "_grouped_conv3x3_kernel", "grouped_conv3x3"))
# Activation dtype names -> Triton's
TRITON_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


class Variant(NamedTuple):
    name: str      # the kernel's function name: its cubin symbol
    dtype: str     # the activations' dtype name ("float16")
    arch: int      # compute capability of the cubin (80: sm_80)
    options: dict  # constexprs and launch options, as a Launch holds them
    params: tuple  # the launch's arguments as Triton types ("*fp16", "i32"), in order

    @property
    def key(self):
        return variant_key(self.options)


def params(module, dtype):
    """The non-constexpr parameters of `module`'s kernel for activations of `dtype`, as Triton
    types: what a launch passes (Triton's hidden parameters are not counted)."""
    signature = module.triton_signature(TRITON_DTYPES[dtype])
    return tuple(kind for kind in signature.values() if kind != "constexpr")


def variants():
    """Every Variant the op library embeds, in a fixed order."""
    out = []
    for module, name, table_key in KERNELS:
        for arch in archs(table_key):
            if arch < module.AOT_MIN_CC:
                continue
            for dtype in TRITON_DTYPES:
                out += [Variant(name, dtype, arch, options, params(module, dtype))
                        for options in module.embedded_variants(arch, dtype)]
    return out
