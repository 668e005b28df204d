"""The dpn-fast command line, what `import dpn_fast` offers and says, and PaddleClas-style
preprocessing."""
import argparse
import csv
import json
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
def test_predict_on_sample_image(dpn68_weights, capsys, engine, threads_set):
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
    assert "bf16_stage" in (tmp_path / "DPN68_bf16.json").read_text()



# Folders, list files, odd images, output files, eval -------------------------------------------

def save(path, pixels, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kwargs)
    return str(path)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A folder tree of photo-sized JPEGs, odd but readable images (grayscale, RGBA, CMYK,
    16-bit, palette, tiny, extreme aspect) and unreadable ones (text, truncated JPEG, empty).
    Returns (root, readable paths sorted as a folder walk lists them, unreadable paths)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    readable = [
        save(root / "a.jpg", rgb(375, 500), quality=90),
        save(root / "b_gray.png", rgb(300, 260)[:, :, 0]),
        save(root / "c_rgba.png", rng.integers(0, 256, (240, 320, 4), dtype=np.uint8)),
        save(root / "d_16bit.png", rng.integers(0, 65536, (230, 250), dtype=np.uint16)),
        save(root / "sub" / "e_cmyk.jpg", rgb(260, 240)),  # saved below as CMYK
        save(root / "sub" / "f_tiny.png", rgb(3, 5)),
        save(root / "sub" / "g_wide.png", rgb(20, 900)),
        save(root / "sub" / "deeper" / "h_palette.gif", rgb(250, 250)),
    ]
    Image.open(readable[4]).convert("CMYK").save(readable[4])
    (root / "notes.md").write_text("not an image extension: not collected")
    unreadable = [root / "x_text.jpg", root / "y_truncated.jpg", root / "z_empty.png"]
    unreadable[0].write_text("hello")
    unreadable[1].write_bytes((root / "a.jpg").read_bytes()[:2000])
    unreadable[2].write_bytes(b"")
    return root, sorted(readable, key=lambda p: (p.count("/"), p)), [str(p) for p in unreadable]


def test_odd_images_are_converted_as_their_modes_define(image_folder):
    root, _, _ = image_folder

    def decoded(name):
        """The RGB uint8 that preprocess() normalised, recovered (exactly invertible here)."""
        array = preprocess(str(root / name)).transpose(1, 2, 0)
        return np.rint((array * [0.229, 0.224, 0.225] + [0.485, 0.456, 0.406]) * 255)

    gray = decoded("b_gray.png")
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
    # RGBA: alpha dropped (as OpenCV and PaddleClas do), colour kept
    rgba = np.asarray(Image.open(root / "c_rgba.png"))[..., :3]
    resized = np.asarray(Image.fromarray(rgba).resize((341, 256), Image.BILINEAR))
    np.testing.assert_array_equal(decoded("c_rgba.png"), resized[16:240, 58:282])
    # 16-bit: scaled to 8 bits, not clipped at 255
    wide = np.asarray(Image.open(root / "d_16bit.png"), dtype=np.float64)
    eight = np.clip(wide * 255 / 65535 + 0.5, 0, 255).astype(np.uint8)
    expected = np.asarray(Image.fromarray(eight).resize((278, 256), Image.BILINEAR))
    np.testing.assert_array_equal(decoded("d_16bit.png")[..., 0], expected[16:240, 27:251])
    assert decoded("d_16bit.png").std() > 20  # a clipped image would be nearly all 255
    for name in ("sub/e_cmyk.jpg", "sub/f_tiny.png", "sub/g_wide.png",
                 "sub/deeper/h_palette.gif"):
        assert preprocess(str(root / name)).shape == (3, 224, 224)


def test_collect_images_walks_folders_and_reads_list_files(image_folder, tmp_path):
    root, readable, unreadable = image_folder
    collected = [path for path, _ in dpn_fast.predict.collect_images([str(root)])]
    assert collected == sorted(readable + unreadable, key=lambda p: (p.count("/"), p))
    listing = tmp_path / "val_list.txt"
    listing.write_text(f"{root}/a.jpg 3\n\nsub/e_cmyk.jpg\n")
    (tmp_path / "sub").mkdir()
    items = dpn_fast.predict.collect_images([str(listing), readable[0]])
    assert items == [(f"{root}/a.jpg", 3), (str(tmp_path / "sub" / "e_cmyk.jpg"), None),
                     (readable[0], None)]
    assert dpn_fast.predict.read_list_file(str(listing), root=str(root))[1] == \
        (str(root / "sub" / "e_cmyk.jpg"), None)
    listing.write_text("a.jpg three\n")
    with pytest.raises(ValueError, match=r"val_list.txt:1: expected `image_path` or"):
        dpn_fast.predict.collect_images([str(listing)])
    with pytest.raises(ValueError, match="no images in this folder"):
        dpn_fast.predict.collect_images([str(tmp_path / "sub")])


def engine_probabilities(weights, paths):
    """Float64 softmax of the compiled DPN68's logits on preprocess() of each path, one at a
    time: what predict must report whatever the batching and decode threads."""
    engine = dpn_fast.compile(dpn_fast.DPN68(pretrained=weights).eval())
    with paddle.no_grad():
        logits = np.concatenate([engine(paddle.to_tensor(preprocess(p)[None])).numpy()
                                 for p in paths]).astype(np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def test_predict_folder_writes_results_and_reports_failures(image_folder, dpn68_weights, tmp_path,
                                                            capsys, threads_set):
    root, readable, unreadable = image_folder
    expected = engine_probabilities(dpn68_weights, readable)
    outputs = {}
    for workers, suffix in ((0, ".csv"), (2, ".jsonl")):
        out = tmp_path / f"results{suffix}"
        assert main(["predict", str(root), "--model", "DPN68", "--weights", dpn68_weights,
                     "--batch-size", "3", "--workers", str(workers), "--topk", "3",
                     "--output", str(out), "--progress"]) == 1
        err = capsys.readouterr().err
        assert f"3 of {len(readable) + 3} images skipped" in err
        for path in unreadable:
            assert f"{path} is not a readable image" in err
        assert f"] {len(readable) + 3}/{len(readable) + 3} " in err  # the progress bar, done
        assert f"{len(readable)} images in" in err and "the model's forward calls alone" in err
        outputs[suffix] = out
    rows = list(csv.reader(outputs[".csv"].open()))
    assert rows[0] == ["path", "top1_id", "top1_name", "top1_prob", "top2_id", "top2_name",
                       "top2_prob", "top3_id", "top3_name", "top3_prob"]
    records = [json.loads(line) for line in outputs[".jsonl"].read_text().splitlines()]
    assert [r[0] for r in rows[1:]] == [r["path"] for r in records] == readable
    names = class_names()
    for probs, row, record in zip(expected, rows[1:], records):
        top = np.argsort(-probs)[:3]
        assert record["class_ids"] == [int(i) for i in top] == [int(v) for v in row[1::3]]
        assert record["names"] == [names[i] for i in top] == row[2::3]
        np.testing.assert_allclose(record["probs"], probs[top], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose([float(v) for v in row[3::3]], probs[top], atol=1e-6)


def test_predict_options_are_checked(tmp_path, capsys):
    assert main(["predict", SAMPLE_IMAGE, "--output", str(tmp_path / "out.txt")]) == 1
    assert "out.txt: the format follows the extension, one of .csv, .jsonl" in \
        capsys.readouterr().err
    assert main(["predict", SAMPLE_IMAGE, "--workers", "-1"]) == 2
    assert "--workers must be at least 0" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing")]) == 1
    assert "image not found" in capsys.readouterr().err


def test_eval_prints_paddleclas_metrics(image_folder, dpn68_weights, tmp_path, capsys,
                                        threads_set):
    """Labels chosen so that, on the model's own ranking, 2 of 6 images are right at top-1 and 4
    of 6 within top-5; CELoss against the float64 log-softmax."""
    _, readable, _ = image_folder
    paths = readable[:6]
    probs = engine_probabilities(dpn68_weights, paths)
    ranking = np.argsort(-probs, axis=1)
    labels = [ranking[0, 0], ranking[1, 0], ranking[2, 1], ranking[3, 4], ranking[4, 5],
              ranking[5, 999]]
    listing = tmp_path / "val_list.txt"
    listing.write_text("".join(f"{p} {label}\n" for p, label in zip(paths, labels)))
    assert main(["eval", "--labels", str(listing), "--model", "DPN68", "--weights",
                 dpn68_weights, "--batch-size", "4"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("[Eval]"))
    printed = re.fullmatch(r"\[Eval\]\[Epoch 0\]\[Avg\]CELoss: ([0-9.]+), loss: ([0-9.]+), "
                           r"top1: 0\.33333, top5: 0\.66667", line)
    assert printed, line
    loss = -np.mean(np.log(probs[np.arange(6), labels]))
    assert abs(float(printed[1]) - loss) <= 2e-5 and printed[1] == printed[2]
    # class-per-subfolder: ids by sorted subfolder name
    for label, name in ((0, "n0_first"), (1, "n1_second")):
        (tmp_path / "val" / name).mkdir(parents=True)
        (tmp_path / "val" / name / "img.png").write_bytes(Path(paths[label]).read_bytes())
    items = dpn_fast.predict.class_folder_images(str(tmp_path / "val"))
    assert [label for _, label in items] == [0, 1]
    listing.write_text(f"{paths[0]} 1000\n")
    assert main(["eval", "--labels", str(listing), "--model", "DPN68"]) == 1
    assert "class ids must lie in [0, 1000)" in capsys.readouterr().err
    assert main(["eval", "--model", "DPN68"]) == 1
    assert "eval needs a folder of class subfolders, or --labels" in capsys.readouterr().err


def test_paddleclas_preprocessing_is_paddleclas_eval_transform(image_folder):
    """--preprocess paddleclas gives bit-identical inputs to PaddleClas 2.6.0's own eval ops
    (DecodeImage, ResizeImage(resize_short=256), CropImage(224), NormalizeImage(order=''), then
    HWC -> CHW) on every readable image of the folder."""
    cv2 = pytest.importorskip("cv2", reason="--preprocess paddleclas needs OpenCV (opencv-python)")
    ops = pytest.importorskip(
        "paddleclas.deploy.python.preprocess",
        reason="paddleclas is not installed (pip install paddleclas==2.6.0): its transform ops "
               "are the reference")
    chain = [ops.DecodeImage(to_rgb=True, channel_first=False), ops.ResizeImage(resize_short=256),
             ops.CropImage(size=224),
             ops.NormalizeImage(scale=1.0 / 255.0, mean=[0.485, 0.456, 0.406],
                                std=[0.229, 0.224, 0.225], order=""),
             ops.ToCHWImage()]
    _, readable, _ = image_folder
    compared = 0
    for path in readable:
        with open(path, "rb") as f:
            data = f.read()
        if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is None:
            # PaddleClas fails on it (OpenCV reads no GIF); predict reports and skips it
            with pytest.raises(ValueError, match="OpenCV cannot decode it"):
                dpn_fast.predict.preprocess_paddleclas(path)
            continue
        expected = data
        for op in chain:
            expected = op(expected)
        ours = dpn_fast.predict.preprocess_paddleclas(path)
        assert ours.dtype == expected.dtype == np.float32 and ours.shape == (3, 224, 224)
        assert np.array_equal(ours, expected), path
        compared += 1
    assert compared == len(readable) - 1  # all but the GIF


def test_bench_engines_runs_the_comparison_and_writes_its_file(tmp_path, capsys, monkeypatch):
    """bench --engines at its smallest: two engines, DPN68 at 32x32, one round of one forward;
    each engine in its own process. Without --out the file lands in the current folder."""
    from dpn_fast import engine_comparison

    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--engines", "compiled", "reference-dygraph", "--model", "DPN68",
                 "--image-size", "32", "--threads", "1", "--rounds", "1", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    [path] = tmp_path.glob("*.json")
    results = json.loads(path.read_text())
    engine_comparison.check_results(results)
    assert path.name == f"{results['machine']['kind']}_{results['date']}_DPN68_b1.json"
    assert f"Wrote {path.name}" in out and "| DPN68 | dpn_fast.compile | " in out
    [cell] = results["cells"]
    assert (cell["model"], cell["batch"], cell["threads"]) == ("DPN68", 1, 1)
    assert list(cell["results"]) == ["compiled", "reference-dygraph"]  # ENGINES' order
    assert cell["results"]["reference-dygraph"]["logits_rel_diff"] == 0.0
    assert cell["results"]["compiled"]["logits_rel_diff"] < 1e-4
    assert results["settings"]["rounds"] == 1 and results["settings"]["iters"] == 1

    assert main(["bench", "--engines", "--precision", "bf16"]) == 1
    assert "--precision bf16 does not apply" in capsys.readouterr().err
    assert main(["bench", "--engines", "tvm"]) == 1
    assert "unknown engines ['tvm']" in capsys.readouterr().err
