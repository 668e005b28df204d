"""The reference DPN family: structure, parameter counts, checkpoints, export."""
import numpy as np
import paddle
import pytest

import dpn_fast
from dpn_fast.checkpoint import CheckpointError
from dpn_fast.models.complexity import count_macs, count_parameters

# Trainable parameters (exact) and MACs at 224x224 (millions), measured from the models.
EXPECTED = {
    "DPN68": (12_611_602, 2_330),
    "DPN92": (37_668_392, 6_500),
    "DPN98": (61_570_728, 11_670),
    "DPN107": (86_917_800, 18_300),
    "DPN131": (79_254_504, 16_010),
}
# A few PaddleClas state-dict entries and their shapes.
PADDLECLAS_KEYS = {
    "DPN92": {
        "conv1_x_1_func._conv.weight": [64, 3, 7, 7],
        "conv1_x_1_func._batch_norm._mean": [64],
        "dpn1.c1x1_w_func._conv.weight": [288, 64, 1, 1],
        "dpn4.c1x1_w_func._batch_norm._mean": [336],
        "dpn4.c3x3_b_func._conv.weight": [192, 6, 3, 3],
        "dpn30.c1x1_c_func._conv.weight": [2176, 768, 1, 1],
        "conv5_x_x_bn._variance": [2688],
        "conv5_x_x_bn.weight": [2688],
        "out.weight": [2688, 1000],
        "out.bias": [1000],
    },
    "DPN68": {"conv1_x_1_func._conv.weight": [10, 3, 3, 3], "out.weight": [832, 1000]},
}


def build(name, **kwargs):
    paddle.seed(1)
    return dpn_fast.create_model(name, **kwargs)


@pytest.fixture(scope="module", params=dpn_fast.MODEL_NAMES)
def model(request):
    return build(request.param)


def test_parameter_and_mac_counts(model):
    params, mmacs = EXPECTED[model.model_name]
    assert count_parameters(model) == params
    assert abs(count_macs(model) / 1e6 - mmacs) < 5


def test_output_shape_and_finite(model):
    model.eval()
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype("float32"))
    with paddle.no_grad():
        y = model(x)
    assert y.shape == [3, 1000]
    assert np.isfinite(y.numpy()).all()


def test_paddleclas_key_names_and_shapes():
    for name, keys in PADDLECLAS_KEYS.items():
        state = build(name).state_dict()
        for key, shape in keys.items():
            assert list(state[key].shape) == shape, key
        # Every BN carries PaddleClas's four entries.
        bn_keys = [k for k in state if k.endswith("._mean")]
        assert all(k[:-len("_mean")] + "_variance" in state for k in bn_keys)


def test_several_models_in_one_process():
    a, b = build("DPN68"), build("DPN68")
    assert count_parameters(a) == count_parameters(b)


def test_checkpoint_round_trip(model, tmp_path):
    rng = np.random.default_rng(2)
    state = {k: (rng.uniform(0.5, 1.5, v.shape) if k.endswith("_variance") else
                 rng.standard_normal(v.shape) * 0.05).astype("float32")
             for k, v in model.state_dict().items()}
    model.set_state_dict(state)
    path = str(tmp_path / "model.pdparams")
    paddle.save(model.state_dict(), path)
    loaded = dpn_fast.create_model(model.model_name, pretrained=path)
    x = paddle.to_tensor(rng.standard_normal((1, 3, 64, 64)).astype("float32"))
    model.eval()
    loaded.eval()
    with paddle.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), loaded(x).numpy())


def test_strict_loading_lists_missing_unexpected_and_mismatched(tmp_path):
    model = build("DPN68")
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    del state["dpn3.c1x1_a_func._conv.weight"]
    state["extra.weight"] = np.ones([2], "float32")
    state["out.weight"] = np.ones([832, 10], "float32")
    path = str(tmp_path / "bad.pdparams")
    paddle.save(state, path)
    with pytest.raises(CheckpointError) as info:
        dpn_fast.DPN68(pretrained=path)
    message = str(info.value)
    assert "dpn3.c1x1_a_func._conv.weight" in message
    assert "extra.weight" in message
    assert "out.weight: checkpoint [832, 10] vs model [832, 1000]" in message


def test_checkpoint_error_is_a_readable_summary_with_the_full_lists(tmp_path):
    model = build("DPN68")
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    keys = list(state)
    missing, resized = keys[:7], keys[-8:]
    unexpected = [f"extra{i}.weight" for i in range(6)]
    for k in missing:
        del state[k]
    for k in unexpected:
        state[k] = np.ones([2], "float32")
    for k in resized:
        state[k] = np.ones([3], "float32")
    path = str(tmp_path / "bad.pdparams")
    paddle.save(state, path)
    with pytest.raises(CheckpointError) as info:
        dpn_fast.DPN68(pretrained=path)
    error = info.value
    assert error.missing_keys == missing and error.unexpected_keys == unexpected
    assert error.shape_mismatches == [(k, [3], list(model.state_dict()[k].shape)) for k in resized]
    lines = str(error).splitlines()
    assert lines[0] == (f"{path} does not match DPN68: 7 missing keys, 6 unexpected keys, "
                        "8 shape mismatches")
    shown = CheckpointError.SHOWN
    assert lines[1:] == (
        ["  missing keys (7):"] + [f"    {k}" for k in missing[:shown]] + ["    ... and 2 more"]
        + ["  unexpected keys (6):"] + [f"    {k}" for k in unexpected[:shown]]
        + ["    ... and 1 more"]
        + ["  shape mismatches (8):"]
        + [f"    {k}: checkpoint [3] vs model {list(model.state_dict()[k].shape)}"
           for k in resized[:shown]] + ["    ... and 3 more"])


def test_class_num_mismatch_is_reported(tmp_path):
    path = str(tmp_path / "m.pdparams")
    paddle.save(build("DPN68").state_dict(), path)
    with pytest.raises(CheckpointError, match="out.bias"):
        dpn_fast.DPN68(pretrained=path, class_num=10)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b""])
def test_non_checkpoint_file_raises_clear_error(tmp_path, content):
    path = tmp_path / "junk.pdparams"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a"):
        dpn_fast.DPN92(pretrained=str(path))


def test_missing_checkpoint_file():
    with pytest.raises(CheckpointError, match="not found"):
        dpn_fast.DPN92(pretrained="/nonexistent/DPN92.pdparams")


def test_unknown_model_name():
    with pytest.raises(ValueError, match="DPN93"):
        dpn_fast.create_model("DPN93")


def test_to_static_save_load_gives_same_output(model, tmp_path):
    model.eval()
    x = paddle.to_tensor(np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype("float32"))
    with paddle.no_grad():
        expected = model(x).numpy()
    spec = [paddle.static.InputSpec([None, 3, 64, 64], "float32")]
    static = paddle.jit.to_static(model, input_spec=spec, full_graph=True)
    path = str(tmp_path / "exported")
    paddle.jit.save(static, path)
    loaded = paddle.jit.load(path)
    loaded.eval()
    np.testing.assert_allclose(loaded(x).numpy(), expected, rtol=1e-5, atol=1e-5)
