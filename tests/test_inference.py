"""Export to Paddle Inference and predictor round trips."""
import threading

import numpy as np
import paddle
import pytest

import dpn_fast
from dpn_fast.inference import create_predictor, export, run_predictor


@pytest.mark.parametrize("use_onednn", [True, False])
def test_reference_export_predictor_round_trip(tmp_path, use_onednn):
    paddle.seed(4)
    model = dpn_fast.DPN68()
    model.eval()
    images = np.random.default_rng(5).standard_normal((2, 3, 64, 64)).astype("float32")
    with paddle.no_grad():
        expected = model(paddle.to_tensor(images)).numpy()
    prefix = export(model, str(tmp_path / "dpn68"), image_size=64)
    logits = run_predictor(create_predictor(prefix, use_onednn=use_onednn), images)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def dpn68_predictors(tmp_path_factory):
    """DPN68 (random weights) exported at 32x32 as the reference and as the compiled engine:
    {kind: (dynamic-graph model, predictor)}."""
    paddle.seed(7)
    model = dpn_fast.DPN68()
    model.eval()
    engine = dpn_fast.compile(model)
    folder = tmp_path_factory.mktemp("exports")
    return {kind: (layer, create_predictor(export(layer, str(folder / kind), image_size=32)))
            for kind, layer in (("reference", model), ("compiled", engine))}


@pytest.mark.parametrize("kind", ["reference", "compiled"])
def test_predictor_runs_other_image_sizes(dpn68_predictors, kind):
    """An export traced at 32x32 runs batches of other sizes as the model does."""
    layer, predictor = dpn68_predictors[kind]
    images = np.random.default_rng(8).standard_normal((2, 3, 45, 38)).astype("float32")
    with paddle.no_grad():
        expected = layer(paddle.to_tensor(images)).numpy()
    np.testing.assert_allclose(run_predictor(predictor, images), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["reference", "compiled"])
@pytest.mark.parametrize("images,error,match", [
    (np.zeros((1, 4, 32, 32), "float32"), ValueError, r"\[N, 3, H, W\].*got \[1, 4, 32, 32\]"),
    (np.zeros((1, 32, 32, 3), "float32"), ValueError, r"channels first\), got \[1, 32, 32, 3\]"),
    (np.zeros((3, 32, 32), "float32"), ValueError, r"\[N, 3, H, W\].*got \[3, 32, 32\]"),
    (np.zeros((0, 3, 32, 32), "float32"), ValueError, "at least one image"),
    (np.zeros((1, 3, 0, 32), "float32"), ValueError, "at least one image"),
    (np.zeros((1, 3, 32, 32), complex), TypeError, "real numeric.*complex128"),
    (np.zeros((1, 3, 32, 32), bool), TypeError, "real numeric.*bool"),
    (None, TypeError, "real numeric.*NoneType"),
    ([["a", "b"]], TypeError, "real numeric.*list"),
])
def test_bad_predictor_inputs_raise_typed_errors(dpn68_predictors, kind, images, error, match):
    """Paddle Inference answers these with a bare std::exception, or crashes (empty batch)."""
    with pytest.raises(error, match=match):
        run_predictor(dpn68_predictors[kind][1], images)


def test_predictor_casts_other_real_dtypes(dpn68_predictors):
    layer, predictor = dpn68_predictors["compiled"]
    images = np.random.default_rng(9).standard_normal((1, 3, 32, 32))
    np.testing.assert_array_equal(run_predictor(predictor, images),
                                  run_predictor(predictor, images.astype("float32")))


def test_missing_export_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pdiparams"):
        create_predictor(str(tmp_path / "nothing"))


@pytest.mark.parametrize("fused", [False, True])
def test_export_leaves_the_model_as_it_was(tmp_path, fused):
    """Same forward and training flags after export, and threads sharing the model still run
    it in dynamic graph (a model left converted by to_static failed here: 'Another thread is
    waiting' from run_program)."""
    paddle.seed(6)
    model = dpn_fast.DPN68(fused=fused)
    model.train()
    model.blocks[0].eval()  # a mixed state, as with frozen layers
    modes = [layer.training for layer in model.sublayers(include_self=True)]
    export(model, str(tmp_path / "dpn68"), image_size=32)
    assert "forward" not in vars(model)  # the class's own forward, not to_static's
    assert [layer.training for layer in model.sublayers(include_self=True)] == modes

    model.eval()
    images = [paddle.to_tensor(np.random.default_rng(seed).standard_normal((1, 3, 32, 32))
                               .astype("float32")) for seed in range(4)]
    with paddle.no_grad():
        expected = [model(x).numpy() for x in images]
    results, errors = [None] * 4, []

    def run(i):
        try:
            with paddle.no_grad():
                results[i] = model(images[i]).numpy()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)
