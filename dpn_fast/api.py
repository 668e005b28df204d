"""The public entry points: the five models, and `compile`, the step that turns a trained model
into an inference object."""
from dpn_fast.checkpoint import load_checkpoint
from dpn_fast.engines.cpu import CompiledDPN
from dpn_fast.engines.fused import fuse
from dpn_fast.models import DPN, MODEL_NAMES

DEVICES = ("cpu", "gpu")


def create_model(name, fused=False, pretrained=None, class_num=1000):
    """DPN `name` (one of MODEL_NAMES); `fused=True` swaps the fused ops into its forward (same
    layers and state dict). `pretrained`: a .pdparams path (PaddleClas's or ours), loaded
    strictly."""
    model = DPN(name, class_num=class_num)
    if pretrained is not None:
        load_checkpoint(model, pretrained)
    return fuse(model) if fused else model


def DPN68(fused=False, pretrained=None, class_num=1000):
    return create_model("DPN68", fused, pretrained, class_num)


def DPN92(fused=False, pretrained=None, class_num=1000):
    return create_model("DPN92", fused, pretrained, class_num)


def DPN98(fused=False, pretrained=None, class_num=1000):
    return create_model("DPN98", fused, pretrained, class_num)


def DPN107(fused=False, pretrained=None, class_num=1000):
    return create_model("DPN107", fused, pretrained, class_num)


def DPN131(fused=False, pretrained=None, class_num=1000):
    return create_model("DPN131", fused, pretrained, class_num)


def compile(model, device="cpu", precision="fp32"):  # noqa: A001 (the name users look for)
    """`model` (a DPN, fused or not) prepared for inference on `device`: an object that folds the
    BNs once and owns its copies of the weights, so later changes to `model` do not reach it.
    Call it on float32 NCHW tensors; it returns float32 logits.

    device="cpu": a paddle.nn.Layer, exportable with dpn_fast.inference.export. `precision`:
    "fp32", or "bf16" (the weights and inputs of the stem's and every block's convolutions, and
    the stages' dense buffers, rounded to bf16; float32 sums, BNs, residual buffers and
    classifier; needs a CPU with AVX512_BF16 or AMX-BF16).

    device="gpu": the stages on the op library's embedded Triton kernels (the kernels
    dpn_fast.torch runs), the stem and head on Paddle's ops, for the current GPU. `precision`:
    the activations' dtype between stem and head, "fp16", "bf16" or "fp32" (fp32 accumulation
    in all three). Needs a CUDA build of dpn_fast and of Paddle, triton, and an sm_80 or sm_90
    class GPU; elsewhere it raises dpn_fast.engines.gpu.GpuUnavailableError (a RuntimeError)
    naming what is missing. Never yet run on a GPU."""
    if device not in DEVICES:
        raise ValueError(f"compile: device must be one of {DEVICES}, got {device!r}")
    if device == "gpu":
        try:
            from dpn_fast.engines.gpu import GpuCompiledDPN
        except ModuleNotFoundError as error:
            if error.name != "triton":
                raise
            raise ImportError("compile(device='gpu') plans its launches with dpn_fast's Triton "
                              "kernels: install triton (pip install triton)") from error
        return GpuCompiledDPN(model, precision)
    return CompiledDPN(model, precision)


__all__ = ["MODEL_NAMES", "create_model", "DPN68", "DPN92", "DPN98", "DPN107", "DPN131",
           "compile"]
