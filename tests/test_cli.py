"""The dpn-fast command line and PaddleClas-style preprocessing."""
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
from PIL import Image

import dpn_fast
from dpn_fast.cli import main
from dpn_fast.predict import SAMPLE_IMAGE, class_names, preprocess


@pytest.fixture(scope="module")
def dpn68_weights(tmp_path_factory):
    paddle.seed(0)
    path = str(tmp_path_factory.mktemp("w") / "DPN68.pdparams")
    paddle.save(dpn_fast.DPN68().state_dict(), path)
    return path


def test_class_names():
    names = class_names()
    assert len(names) == 1000
    assert names[0] == "tench, Tinca tinca" and names[281] == "tabby, tabby cat"


def test_preprocess_matches_paddleclas_pipeline(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)  # H=300, W=400
    path = str(tmp_path / "img.png")
    Image.fromarray(pixels).save(path)
    out = preprocess(path)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    resized = np.asarray(Image.fromarray(pixels).resize((341, 256), Image.BILINEAR), np.float32)
    crop = resized[16:240, 58:282] / 255.0
    expected = ((crop - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_predict_on_sample_image(dpn68_weights, capsys):
    assert main(["predict", SAMPLE_IMAGE, "--model", "DPN68", "--weights", dpn68_weights,
                 "--topk", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == SAMPLE_IMAGE
    ranks = [line.split() for line in lines[1:4]]
    assert [r[0] for r in ranks] == ["1.", "2.", "3."]
    probs = [float(r[1]) for r in ranks]
    assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
    assert all(0 <= int(r[2]) < 1000 for r in ranks)


def test_predict_missing_and_non_image_files(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nope.jpg"), "--model", "DPN68"]) == 1
    assert "image not found" in capsys.readouterr().err
    text = tmp_path / "text.jpg"
    text.write_text("hello")
    assert main(["predict", str(text), "--model", "DPN68"]) == 1
    assert "not a readable image" in capsys.readouterr().err


def test_predict_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pdparams"
    bad.write_bytes(b"junk")
    assert main(["predict", SAMPLE_IMAGE, "--model", "DPN68", "--weights", str(bad)]) == 1
    assert "not a Paddle checkpoint" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path):
    # The script pip installed beside this interpreter (a venv's bin/ need not be on PATH).
    exe = os.path.join(os.path.dirname(sys.executable), "dpn-fast")
    done = subprocess.run([exe, "predict", str(tmp_path / "missing.png")], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 1 and "image not found" in done.stderr


def test_info_prints_counts(capsys):
    assert main(["info", "DPN68"]) == 0
    out = capsys.readouterr().out
    assert "DPN68" in out and "12.61" in out and "2.33" in out


def test_demo_compares_fused_and_reference(capsys):
    assert main(["demo", "--model", "DPN68", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    diff = float(out.split("max |fused - reference| logits:")[1].split()[0])
    assert diff < 1e-3
    assert "top-5 agreement: 5/5" in out and "speedup" in out


def test_bench_and_export(tmp_path, capsys):
    assert main(["bench", "--model", "DPN68", "--image-size", "64", "--batch-size", "2",
                 "--repeat", "1"]) == 0
    assert "speedup" in capsys.readouterr().out
    assert main(["export", "--model", "DPN68", "--fused", "--image-size", "64",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "DPN68_fused.pdiparams").exists()
    assert "dpn_fast_" in (tmp_path / "DPN68_fused.json").read_text()


def test_bench_threads(capsys):
    try:
        assert main(["bench", "--model", "DPN68", "--image-size", "64", "--repeat", "1",
                     "--threads", "2"]) == 0
        assert "speedup" in capsys.readouterr().out
    finally:
        paddle.base.core.set_num_threads(1)  # Paddle's default, which the other tests assume


def test_bad_option_values(capsys):
    assert main(["bench", "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err
    assert main(["bench", "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
