"""Strict checkpoint loading: every key present, none extra, every shape equal."""
import os

import numpy as np
import paddle


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint for the model at hand.

    For a state dict that does not fit the model, the full lists are kept: `missing_keys`,
    `unexpected_keys` and `shape_mismatches` ((key, checkpoint shape, model shape) tuples);
    the message shows counts and the first few of each.
    """

    SHOWN = 5  # entries of each list in the message

    def __init__(self, message, missing_keys=(), unexpected_keys=(), shape_mismatches=()):
        self.missing_keys = list(missing_keys)
        self.unexpected_keys = list(unexpected_keys)
        self.shape_mismatches = list(shape_mismatches)
        lists = (("missing keys", self.missing_keys),
                 ("unexpected keys", self.unexpected_keys),
                 ("shape mismatches", [f"{k}: checkpoint {c} vs model {m}"
                                       for k, c, m in self.shape_mismatches]))
        counts = ", ".join(f"{len(items)} {title}" for title, items in lists if items)
        lines = [f"{message}: {counts}" if counts else message]
        for title, items in lists:
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines += [f"    {item}" for item in items[:self.SHOWN]]
                if len(items) > self.SHOWN:
                    lines.append(f"    ... and {len(items) - self.SHOWN} more")
        super().__init__("\n".join(lines))


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


def check_state_dict(model, state, source="checkpoint"):
    """Raises CheckpointError listing missing keys, unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, list(state[k].shape), list(expected[k].shape))
                  for k in expected
                  if k in state and list(state[k].shape) != list(expected[k].shape)]
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{source} does not match "
                              f"{getattr(model, 'model_name', 'the model')}",
                              missing, unexpected, mismatched)


def load_checkpoint(model, path):
    """Loads `path` into `model` strictly (see check_state_dict)."""
    state = read_state_dict(path)
    check_state_dict(model, state, path)
    model.set_state_dict(state)
    return model
