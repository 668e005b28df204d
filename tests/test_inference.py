"""Export to Paddle Inference and predictor round trips."""
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


def test_missing_export_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pdiparams"):
        create_predictor(str(tmp_path / "nothing"))
