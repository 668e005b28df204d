"""The dpn-fast command line, what `import dpn_fast` offers and says, and PaddleClas-style
preprocessing."""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
from PIL import Image

import dpn_fast
from dpn_fast.cli import available_cores, build_parser, main
from dpn_fast.ops.cpu_features import bf16_gemm_supported
from dpn_fast.predict import SAMPLE_IMAGE, class_names, preprocess


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def threads_set(monkeypatch):
    """The thread counts the CLI sets on Paddle; Paddle's default (1), which the other tests
    assume, is restored afterwards."""
    calls = []
    set_num_threads = paddle.base.core.set_num_threads
    monkeypatch.setattr(paddle.base.core, "set_num_threads",
                        lambda n: (calls.append(n), set_num_threads(n)))
    yield calls
    set_num_threads(1)


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


@pytest.mark.parametrize("engine", [[], ["--reference"]])
def test_predict_on_sample_image(dpn68_weights, capsys, engine):
    assert main(["predict", SAMPLE_IMAGE, "--model", "DPN68", "--weights", dpn68_weights,
                 "--topk", "3", *engine]) == 0
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


def test_info_prints_counts_and_native_precisions(capsys):
    assert main(["info", "DPN68"]) == 0
    out = capsys.readouterr().out
    assert "DPN68" in out and "12.61" in out and "2.33" in out
    precisions = "fp32, bf16" if bf16_gemm_supported() else "fp32"
    assert f"compile precisions this CPU runs natively: {precisions}\n" in out


def test_demo_compares_fused_and_reference(capsys, threads_set):
    assert main(["demo", "--model", "DPN68", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    diff = float(out.split("max |fused - reference| logits:")[1].split()[0])
    assert diff < 1e-3
    assert "top-5 agreement: 5/5" in out and "speedup" in out
    # All available cores by default, as ONNX Runtime does.
    assert threads_set == [available_cores()] and f"{available_cores()} CPU threads" in out


def test_bench_and_export(tmp_path, capsys, threads_set):
    assert main(["bench", "--model", "DPN68", "--image-size", "64", "--batch-size", "2",
                 "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and threads_set == [available_cores()]
    assert main(["export", "--model", "DPN68", "--image-size", "64", "--out", str(tmp_path)]) == 0
    assert "dpn_fast_dpn_stage" in (tmp_path / "DPN68.json").read_text()
    assert main(["export", "--model", "DPN68", "--reference", "--image-size", "64",
                 "--out", str(tmp_path)]) == 0
    assert "dpn_fast_" not in (tmp_path / "DPN68_reference.json").read_text()


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_option_overrides_the_default(capsys, threads_set, threads):
    assert main(["bench", "--model", "DPN68", "--image-size", "32", "--repeat", "1",
                 "--threads", str(threads)]) == 0
    assert f"{threads} CPU threads" in capsys.readouterr().out and threads_set == [threads]


def test_readme_cli_block_lists_every_option():
    block = (REPO / "README.md").read_text().split("Command line")[1].split("```\n")[1]
    listed = {}
    for line in block.splitlines():
        if line.startswith("dpn-fast "):
            command = line.split()[1]
        listed.setdefault(command, set()).update(re.findall(r"--[a-z-]+", line))
    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    assert set(listed) == set(commands)
    for command, parser in commands.items():
        options = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
        assert options - {"--help"} <= listed[command], f"README's dpn-fast {command}"


def test_bad_option_values(capsys):
    assert main(["bench", "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err
    assert main(["bench", "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


def python_in(cwd, code):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)


def test_import_reaches_documented_submodules_lazily_and_quietly(tmp_path):
    done = python_in(tmp_path, "\n".join([
        "import sys, dpn_fast",
        "lazy = [m for m in ('inference', 'predict') if 'dpn_fast.' + m in sys.modules]",
        "assert not lazy, f'loaded by import dpn_fast: {lazy}'",
        "assert callable(dpn_fast.inference.create_predictor)",
        "assert callable(dpn_fast.predict.predict)",
        "assert callable(dpn_fast.ops.dual_path_merge)",
        "assert callable(dpn_fast.models.DPN) and callable(dpn_fast.compile)",
        "assert issubclass(dpn_fast.checkpoint.CheckpointError, ValueError)",
        "assert {'inference', 'predict'} <= set(dir(dpn_fast))",
        "try:",
        "    dpn_fast.no_such_module",
        "except AttributeError as e:",
        "    print(e)",
    ]))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "module 'dpn_fast' has no attribute 'no_such_module'"
    assert "ccache" not in done.stderr  # Paddle's warning on `import paddle`, silenced


@pytest.mark.skipif((REPO / "dpn_fast" / "libdpn_fast_ops.so").exists(),
                    reason="this checkout has a library built in place: nothing is shadowed")
def test_source_tree_shadowing_the_installed_package_is_named():
    done = python_in(REPO, "import dpn_fast")
    assert done.returncode == 1
    message = done.stderr.strip().splitlines()[-1]
    assert f"imported from {REPO / 'dpn_fast'}, a source checkout" in message
    assert "shadows the installed dpn_fast in " + os.path.dirname(dpn_fast.__file__) in message
    assert "Run Python from another directory" in message


def test_precision_bf16_predicts_and_exports_or_is_refused(dpn68_weights, tmp_path, capsys):
    """--precision bf16 runs the compiled engine in bf16 where the CPU has bf16 matmul kernels;
    elsewhere it is a clear error, exit status 1."""
    args = ["predict", SAMPLE_IMAGE, "--model", "DPN68", "--weights", dpn68_weights,
            "--topk", "1", "--precision", "bf16"]
    if not bf16_gemm_supported():
        assert main(args) == 1
        assert "this CPU runs fp32 natively" in capsys.readouterr().err
        return
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[0] == SAMPLE_IMAGE
    assert main(["export", "--model", "DPN68", "--image-size", "64", "--precision", "bf16",
                 "--out", str(tmp_path)]) == 0
    assert "bf16_gemms" in (tmp_path / "DPN68_bf16.json").read_text()

