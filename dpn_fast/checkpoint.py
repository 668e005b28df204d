"""Strict checkpoint loading: every key present, none extra, every shape equal."""
import os

import numpy as np
import paddle


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint for the model at hand."""


def read_state_dict(path):
    """Reads a .pdparams file (PaddleClas's or ours) into a dict of arrays/tensors."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = paddle.load(path)
    except Exception as e:  # paddle raises assorted pickle/IO errors for foreign files
        raise CheckpointError(f"{path} is not a Paddle checkpoint (.pdparams): {e}") from e
    if not isinstance(state, dict) or not state or not all(
            isinstance(v, (paddle.Tensor, np.ndarray)) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors (got {type(state).__name__})")
    return state


def check_state_dict(model, state):
    """Raises CheckpointError listing missing keys, unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)}"
                  for k in expected if k in state and list(state[k].shape) != list(expected[k].shape)]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
            problems.append(f"{len(items)} {title}: {shown}")
    if problems:
        raise CheckpointError("checkpoint does not match the model; " + "; ".join(problems))


def load_checkpoint(model, path):
    """Loads `path` into `model` strictly (see check_state_dict)."""
    state = read_state_dict(path)
    check_state_dict(model, state)
    model.set_state_dict(state)
    return model
