"""Channels-last fused forward of timm's DPNs on dpn_fast's Triton kernels, with torch as the
host (needs torch and triton, not Paddle):

    import timm
    from dpn_fast.torch import fuse
    model = timm.create_model("dpn92", pretrained=True).eval().cuda().half()
    fused = fuse(model)
    logits = fused(images)  # [n, 3, H, W] in the model's dtype and device
    graphed = fused.cuda_graph(images)  # the whole forward in one CUDA graph at images' shape
    logits = graphed(images)  # the captured output, overwritten by the next call

The implementation and its design: dpn_fast/engines/torch_host.py.
"""
from dpn_fast.engines.torch_host import DTYPES, FusedDPN, GraphedDPN, fuse, import_timm

__all__ = ["DTYPES", "FusedDPN", "GraphedDPN", "fuse", "import_timm"]
