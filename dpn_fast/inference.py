"""Export to a Paddle Inference model and load it back as a predictor.

The fused ops are recorded in the saved program by name, so the op library must be registered
before the program is loaded; importing dpn_fast does that, which is why predictors for our
exports are created here rather than with paddle.inference directly.
"""
import os

import numpy as np
import paddle

import dpn_fast  # noqa: F401  (registers the custom ops before any program is loaded)


def export(model, path_prefix, image_size=224):
    """Saves `model` (eval mode, batch dimension dynamic) as `path_prefix`.json/.pdiparams."""
    model.eval()
    spec = paddle.static.InputSpec([None, 3, image_size, image_size], "float32", "image")
    static = paddle.jit.to_static(model, input_spec=[spec], full_graph=True)
    paddle.jit.save(static, path_prefix)
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


def run_predictor(predictor, images):
    """Runs `images` (float32 array [N, 3, H, W]) and returns the logits array."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    predictor.get_input_handle(predictor.get_input_names()[0]).copy_from_cpu(images)
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()
