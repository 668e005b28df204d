"""The fused DPNs inside PaddleClas: its engine (tools/train.py, eval.py, export_model.py,
infer.py) trains, evaluates, exports and predicts with `DPN92(fused=True)` when the config says

    Arch:
      name: DPN92_fused        # or DPN68_fused, DPN98_fused, DPN107_fused, DPN131_fused

and the tool runs through this module, which registers those names first:

    python -m dpn_fast.paddleclas tools/train.py -c ppcls/configs/ImageNet/DPN/DPN92.yaml \\
        -o Arch.name=DPN92_fused

PaddleClas resolves `Arch.name` as an attribute of its `ppcls.arch` package (`build_model`), so
registering is adding the five factories there. Everything else (data pipeline, loss, optimiser,
metrics, checkpoints, export) is PaddleClas's own and unchanged: the fused model has the same
parameters, names and state dict as PaddleClas's DPN, so `.pdparams`/`.pdopt` files move between
`DPN92` and `DPN92_fused` runs both ways. An export of a fused arch holds the fused ops; any
process that loads it (PaddleClas's deploy/python/predict_cls.py included) registers them by
importing dpn_fast first, which this module's command line does.
"""
import argparse
import importlib
import os
import runpy
import sys

from dpn_fast.api import create_model
from dpn_fast.models import MODEL_NAMES

FUSED_SUFFIX = "_fused"
ARCH_NAMES = tuple(name + FUSED_SUFFIX for name in MODEL_NAMES)
# Where PaddleClas keeps the namespace that build_model reads Arch.name from: a source checkout
# (the engine and tools/, top-level `ppcls`) and the pip package `paddleclas` (its arch only).
ARCH_MODULES = ("ppcls.arch", "paddleclas.ppcls.arch")


class PaddleClasNotFoundError(ImportError):
    """Neither a PaddleClas checkout (`ppcls`) nor the `paddleclas` package is importable."""


class UnknownArchError(AttributeError):
    """A fused arch name that dpn_fast does not have (an AttributeError, as PaddleClas expects of
    an unknown Arch.name)."""


def _arch_factory(model_name):
    def factory(pretrained=False, use_ssld=False, class_num=1000, **unexpected):
        arch = model_name + FUSED_SUFFIX
        if unexpected:
            raise TypeError(f"Arch {arch}: unexpected option(s) {sorted(unexpected)}; it takes "
                            "class_num and pretrained (a .pdparams path) only")
        if isinstance(class_num, bool) or not isinstance(class_num, int):
            raise TypeError(f"Arch {arch}: class_num must be an integer, got {class_num!r}")
        if class_num < 1:
            raise ValueError(f"Arch {arch}: class_num must be positive, got {class_num}")
        if pretrained is True or use_ssld:
            raise ValueError(f"Arch {arch}: dpn_fast downloads no weights; set pretrained to "
                             "the path of a PaddleClas .pdparams file (or use "
                             "Global.pretrained_model)")
        weights = None if pretrained is False or pretrained is None else \
            _pdparams_path(arch, pretrained)
        model = create_model(model_name, fused=True, pretrained=weights, class_num=class_num)
        for key, parameter in model.named_parameters():
            parameter.name = paddleclas_parameter_name(key)
        return model

    factory.__name__ = factory.__qualname__ = model_name + FUSED_SUFFIX
    factory.__doc__ = (f"PaddleClas arch {model_name}{FUSED_SUFFIX}: dpn_fast.{model_name}"
                       "(fused=True), PaddleClas's layers and state dict on the fused ops.")
    return factory


# PaddleClas's DPN names every parameter (ParamAttr) after its layer; an optimiser's state
# (.pdopt) is keyed by those names, so the fused archs take them too.
_BLOCK_LAYER_NAMES = {"c1x1_w_func": "match", "c1x1_a_func": "conv1", "c3x3_b_func": "conv2",
                      "c1x1_c_func": "conv3"}
_BN_NAMES = {"weight": "bn_scale", "bias": "bn_offset", "_mean": "bn_mean",
             "_variance": "bn_variance"}


def paddleclas_parameter_name(key):
    """The name PaddleClas's DPN gives the parameter at state-dict `key`, e.g.
    dpn3.c1x1_a_func._conv.weight -> dpn3_conv1_weights, out.bias -> fc_offset."""
    parts = key.split(".")
    if parts[0] == "out":
        return {"weight": "fc_weights", "bias": "fc_offset"}[parts[1]]
    if parts[0] == "conv5_x_x_bn":
        return "final_concat_" + _BN_NAMES[parts[1]]
    prefix = "conv1" if parts[0] == "conv1_x_1_func" else \
        f"{parts[0]}_{_BLOCK_LAYER_NAMES[parts[1]]}"
    return f"{prefix}_weights" if parts[-2] == "_conv" else f"{prefix}_{_BN_NAMES[parts[-1]]}"


def _pdparams_path(arch, pretrained):
    """PaddleClas's convention: a pretrained path names the file with or without .pdparams."""
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"Arch {arch}: pretrained must be False or a .pdparams path, got "
                        f"{pretrained!r}")
    path = os.fspath(pretrained)
    if not path.endswith(".pdparams") and not os.path.isfile(path):
        path += ".pdparams"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Arch {arch}: pretrained weights not found: {path}")
    return path


def _unknown_arch_hook(module, previous):
    """A module __getattr__ for `module` that names the fused archs when a config asks for one
    that does not exist, and otherwise behaves as before."""

    def __getattr__(name):
        if name.lower().endswith(FUSED_SUFFIX):
            raise UnknownArchError(f"unknown PaddleClas arch {name!r}; dpn_fast registers "
                                   f"{', '.join(ARCH_NAMES)}")
        if previous is not None:
            return previous(name)
        raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")

    __getattr__.dpn_fast_hook = True
    return __getattr__


def register():
    """Adds DPN68_fused ... DPN131_fused to every PaddleClas arch namespace importable here
    (`ppcls.arch` of a checkout on sys.path, `paddleclas.ppcls.arch` of the pip package) and
    returns the names of the modules it registered into. Idempotent."""
    registered = []
    for module_name in ARCH_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and module_name.startswith(error.name):
                continue  # that PaddleClas is not installed
            raise
        for model_name in MODEL_NAMES:
            setattr(module, model_name + FUSED_SUFFIX, _arch_factory(model_name))
        previous = module.__dict__.get("__getattr__")
        if not getattr(previous, "dpn_fast_hook", False):
            module.__getattr__ = _unknown_arch_hook(module, previous)
        registered.append(module_name)
    if not registered:
        raise PaddleClasNotFoundError(
            "PaddleClas is not importable: run from a PaddleClas source checkout (its engine and "
            "tools/), or pip install 'dpn_fast[paddleclas]' for its arch package")
    return registered


def main(argv=None):
    """`python -m dpn_fast.paddleclas SCRIPT [ARGS...]`: runs a PaddleClas script (tools/train.py,
    tools/eval.py, tools/export_model.py, tools/infer.py, deploy/python/predict_cls.py) as
    `python SCRIPT ARGS...` would, with the fused archs registered and the fused ops loaded."""
    parser = argparse.ArgumentParser(
        prog="python -m dpn_fast.paddleclas",
        description="Run a PaddleClas script with the archs DPN68_fused ... DPN131_fused "
                    "registered (set Arch.name to one of them).")
    parser.add_argument("script", help="a PaddleClas script, e.g. tools/train.py")
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="its arguments, e.g. -c CONFIG -o Arch.name=DPN92_fused")
    args = parser.parse_args(argv)
    script = os.path.abspath(args.script)
    if not os.path.isfile(script):
        parser.error(f"no such script: {args.script}")
    script_dir = os.path.dirname(script)
    # As `python SCRIPT` would: the script's folder first; PaddleClas's tools add the checkout
    # root themselves, which register() needs now.
    sys.path[:0] = [script_dir, os.path.dirname(script_dir)]
    register()
    sys.argv = [script] + args.args
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
