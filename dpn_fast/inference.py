"""Export to a Paddle Inference model and load it back as a predictor.

The fused ops are recorded in the saved program by name, so the op library must be registered
before the program is loaded; importing dpn_fast does that, which is why predictors for our
exports are created here rather than with paddle.inference directly.
"""
import os

import numpy as np
import paddle

from dpn_fast import _extension  # noqa: F401  (registers the custom ops before a program loads)


class _Traced(paddle.nn.Layer):
    """What export traces: paddle.jit.to_static replaces the forward of the layer it is given,
    so it is given this wrapper and the caller's model keeps its own."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        return self.model(image)


def export(model, path_prefix, image_size=224):
    """Saves `model` (a DPN, fused or not, or dpn_fast.compile's engine) in eval mode (batch
    dimension dynamic) as `path_prefix`.json/.pdiparams.

    `model` comes back as it went in: same forward, same training flags on every sublayer.
    """
    modes = [(layer, layer.training) for layer in model.sublayers(include_self=True)]
    spec = paddle.static.InputSpec([None, 3, image_size, image_size], "float32", "image")
    try:
        traced = _Traced(model)
        traced.eval()
        paddle.jit.save(paddle.jit.to_static(traced, input_spec=[spec], full_graph=True),
                        path_prefix)
    finally:
        for layer, training in modes:
            layer.training = training
    return path_prefix


def _program_file(path_prefix):
    for suffix in (".json", ".pdmodel"):
        if os.path.isfile(path_prefix + suffix):
            return path_prefix + suffix
    raise FileNotFoundError(f"no exported program at {path_prefix}.json or {path_prefix}.pdmodel")


def create_predictor(path_prefix, use_onednn=True, num_threads=None, use_gpu=False):
    """A Paddle Inference predictor for an exported (reference or fused) model.

    oneDNN stays usable with the fused ops: they reorder oneDNN-layout inputs to NCHW.
    """
    params = path_prefix + ".pdiparams"
    if not os.path.isfile(params):
        raise FileNotFoundError(f"no exported parameters at {params}")
    config = paddle.inference.Config(_program_file(path_prefix), params)
    if use_gpu:
        config.enable_use_gpu(256, 0)
    else:
        config.disable_gpu()
        if use_onednn:
            config.enable_mkldnn()
        else:
            config.disable_mkldnn()
        if num_threads:
            config.set_cpu_math_library_num_threads(num_threads)
    config.disable_glog_info()
    return paddle.inference.create_predictor(config)


def _check_images(images):
    """`images` as a contiguous float32 array [N, 3, H, W] (N, H, W >= 1), or a TypeError /
    ValueError naming what is wrong: Paddle Inference answers a bad input with a bare
    `std::exception`, or crashes (an empty batch)."""
    op = "run_predictor"
    array = np.asarray(images)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{op}: images must be a real numeric array, float32 [N, 3, H, W]; got "
                        f"dtype {array.dtype} ({type(images).__name__})")
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"{op}: images must have shape [N, 3, H, W] (RGB, channels first), got "
                         f"{list(array.shape)}")
    if 0 in array.shape:
        raise ValueError(f"{op}: images [N, 3, H, W] must hold at least one image of at least "
                         f"1x1 pixels, got shape {list(array.shape)}")
    return np.ascontiguousarray(array, dtype=np.float32)


def run_predictor(predictor, images):
    """Runs `images` (an array [N, 3, H, W], float32 or cast to it) and returns the logits
    array. A reference or fused export runs at any image size; the compiled engine's too."""
    images = _check_images(images)
    predictor.get_input_handle(predictor.get_input_names()[0]).copy_from_cpu(images)
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()
