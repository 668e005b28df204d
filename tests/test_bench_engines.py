"""The engine comparison (dpn_fast.engine_comparison, run by benchmarks/bench_engines.py and
`dpn-fast bench --engines`) and plot_results.py: the results file a run writes, the committed
results files, their tables and plots, and the argument checks."""
import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpn_fast import engine_comparison

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # plot_results imports bench_engines as a sibling
import bench_engines  # noqa: E402
import plot_results  # noqa: E402

COMMITTED_RESULTS = sorted(bench_engines.RESULTS_DIR.glob("*.json"))


def installed(*modules):
    return all(importlib.util.find_spec(m) for m in modules)


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        return set(next(line for line in f if line.startswith("flags")).split(":")[1].split())


def sample_results():
    """A small results document as a run writes it: one model, two cells, three engines."""
    def result(round_ms, precision="f32"):
        return {"round_ms": round_ms, "median_ms": sorted(round_ms)[1],
                "logits_rel_diff": 1e-6 if precision == "f32" else 4e-3, "precision": precision}

    engines = {key: {"label": engine_comparison.ENGINES[key].label,
                     "stock": engine_comparison.ENGINES[key].stock, "description": ""}
               for key in ("fused-dygraph", "ort-reference", "openvino-default-reference")}
    return {
        "schema_version": 1, "source": "benchmarks/bench_engines.py", "date": "2026-12-01",
        "machine": {"cpu_model": "Test CPU 9000", "vendor": "AuthenticAMD",
                    "kind": "amd-zen4-avx512", "cores": 2, "flags": {}},
        "git": {"commit": "0123456789abcdef", "dirty": False}, "versions": {},
        "settings": {"models": ["DPN92"], "batch_sizes": [1], "threads": [1, 2],
                     "image_size": 224, "rounds": 3, "iters": 10, "warmup": 2},
        "engines": engines, "skipped": {"compiled": "this dpn_fast has no dpn_fast.compile"},
        "cells": [
            {"model": "DPN92", "batch": 1, "threads": 1,
             "results": {"fused-dygraph": result([110.0, 100.0, 120.0]),
                         "ort-reference": result([150.0, 160.0, 140.0]),
                         "openvino-default-reference": result([40.0, 41.0, 42.0], "bf16")}},
            {"model": "DPN92", "batch": 1, "threads": 2,
             "results": {"fused-dygraph": result([60.0, 61.0, 62.0]),
                         "ort-reference": result([75.0, 75.0, 75.0])}},
        ],
    }


def table_rows(markdown):
    """{(model, engine): [cells after them]} of the one table in `markdown`."""
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in markdown.splitlines() if line.startswith("| ")]
    assert rows[0][:2] == ["model", "engine"]
    return {(row[0], row[1]): row[2:] for row in rows[1:]}


@pytest.mark.slow
def test_run_writes_a_results_file(tmp_path, capsys):
    engines = ["fused-dygraph", "reference-dygraph", "ort-reference", "openvino-f32-reference",
               "openvino-default-reference", "compiled", "compiled-bf16"]
    out = tmp_path / "run.json"
    assert bench_engines.main(["--models", "DPN68", "--image-size", "64", "--batch-sizes", "1",
                               "--threads", "1", "--rounds", "2", "--iters", "2", "--warmup", "1",
                               "--engines", *engines, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    engine_comparison.check_results(results)
    assert f"Wrote {out}" in capsys.readouterr().out

    flags = cpu_flags()
    assert results["machine"]["kind"] == engine_comparison.cpu_kind(
        results["machine"]["vendor"], flags)
    assert results["machine"]["flags"]["avx512f"] == ("avx512f" in flags)
    head = subprocess.run(["git", "-C", str(BENCHMARKS), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    assert results["git"]["commit"] == (head or None)
    assert results["versions"]["paddlepaddle"] == "3.3.1"
    assert results["settings"]["models"] == ["DPN68"] and results["settings"]["rounds"] == 2

    from dpn_fast.ops.cpu_features import bf16_gemm_supported
    expected = {"fused-dygraph", "reference-dygraph", "compiled"}
    expected |= {"ort-reference"} if installed("onnxruntime", "paddle2onnx") else set()
    expected |= ({"openvino-f32-reference", "openvino-default-reference"}
                 if installed("openvino", "paddle2onnx") else set())
    expected |= {"compiled-bf16"} if bf16_gemm_supported() else set()
    assert set(results["engines"]) == expected
    assert set(results["skipped"]) == set(engines) - expected
    [cell] = results["cells"]
    assert (cell["model"], cell["batch"], cell["threads"]) == ("DPN68", 1, 1)
    assert set(cell["results"]) == expected
    for key, result in cell["results"].items():
        assert len(result["round_ms"]) == 2 and all(ms > 0 for ms in result["round_ms"])
        if result["precision"] == "f32":
            assert result["logits_rel_diff"] < 1e-4, f"{key}'s logits disagree with the reference"
        elif key == "compiled-bf16":
            assert result["precision"] == "bf16" and result["logits_rel_diff"] < 2e-2
        else:  # OpenVINO's default may pick bf16: close, not exact
            assert key == "openvino-default-reference" and result["logits_rel_diff"] < 0.1
    assert cell["results"]["reference-dygraph"]["logits_rel_diff"] == 0.0  # it is the reference


@pytest.mark.parametrize("native,skipped", [("fp32 bf16", set()), ("fp32", {"compiled-bf16"})])
def test_compiled_engines_the_cpu_cannot_run_are_listed_not_run(monkeypatch, native, skipped):
    answers = {"--native-compile-precisions": f"{native}\n"}
    monkeypatch.setattr(engine_comparison, "run_child", lambda flag: answers[flag])
    reasons = engine_comparison.unavailable_engines(["compiled", "compiled-bf16", "fused-dygraph"])
    assert set(reasons) == skipped
    if skipped:
        assert reasons["compiled-bf16"] == ("this CPU has no bf16 matmul kernels "
                                            "(dpn_fast.compile's precision='bf16' needs them)")


def test_cpu_kinds():
    assert engine_comparison.cpu_kind("GenuineIntel", {"avx2", "avx512f", "amx_bf16"}) \
        == "intel-amx"
    assert engine_comparison.cpu_kind("AuthenticAMD", {"avx2", "avx512f", "avx512_bf16"}) \
        == "amd-zen4-avx512"
    assert engine_comparison.cpu_kind("AuthenticAMD", {"avx2", "fma"}) == "amd-zen3-avx2"
    assert engine_comparison.cpu_kind("GenuineIntel", {"avx2", "avx512f"}) == "genuineintel-avx512"


def test_results_file_name_is_unique(tmp_path):
    results = sample_results()
    first = engine_comparison.results_path(results, tmp_path)
    assert first.name == "amd-zen4-avx512_2026-12-01_DPN92_b1.json"
    first.write_text("{}")
    assert engine_comparison.results_path(results, tmp_path).name == \
        "amd-zen4-avx512_2026-12-01_DPN92_b1_2.json"
    results["settings"].update(models=list(engine_comparison.MODEL_NAMES), batch_sizes=[1, 8])
    assert engine_comparison.results_path(results, tmp_path).name == \
        "amd-zen4-avx512_2026-12-01_all-models_b1-8.json"


def test_check_results_names_the_fault():
    engine_comparison.check_results(sample_results())
    faults = {
        "lacks date": lambda r: r.pop("date"),
        "lacks cpu_model": lambda r: r["machine"].pop("cpu_model"),
        "lacks commit": lambda r: r["git"].pop("commit"),
        "not the median": lambda r: r["cells"][0]["results"]["fused-dygraph"].update(median_ms=1.0),
        "does not describe": lambda r: r["engines"].pop("ort-reference"),
        "lacks precision": lambda r: r["cells"][1]["results"]["ort-reference"].pop("precision"),
        "schema_version 2": lambda r: r.update(schema_version=2),
    }
    for message, corrupt in faults.items():
        results = copy.deepcopy(sample_results())
        corrupt(results)
        with pytest.raises(ValueError, match=message):
            engine_comparison.check_results(results)


def test_table_names_machine_run_and_data_file():
    markdown = engine_comparison.format_table(sample_results(), data_file="results/x.json")
    first_line = markdown.splitlines()[0]
    for fact in ("Test CPU 9000", "amd-zen4-avx512", "2026-12-01", "commit 0123456789ab",
                 "results/x.json", "3 rounds"):
        assert fact in first_line
    rows = table_rows(markdown)
    assert rows[("DPN92", "fused network, dynamic graph")] == ["110.0", "61.0", "1.0e-06"]
    assert rows[("DPN92", "reference export, OpenVINO default precision (bf16)")] == \
        ["41.0", "-", "4.0e-03"]
    # bf16 is not the f32 baseline: ONNX Runtime is, 150 / 110 and 75 / 61
    assert rows[("DPN92", "fastest dpn_fast engine vs fastest stock f32 engine")] == \
        ["1.36x", "1.23x", ""]
    assert "Not run: compiled (this dpn_fast has no dpn_fast.compile)." in markdown


@pytest.mark.parametrize("path", COMMITTED_RESULTS, ids=lambda p: p.name)
def test_committed_results_are_valid(path):
    results = plot_results.load_results(path)
    machine = results["machine"]
    assert path.name.startswith(f"{machine['kind']}_{results['date']}_")
    assert machine["kind"] == engine_comparison.cpu_kind(
        machine["vendor"], {flag for flag, present in machine["flags"].items() if present})
    assert results["source"] == "benchmarks/bench_engines.py" or results["source"].startswith(
        "transcribed from")
    if results["source"] == "benchmarks/bench_engines.py":
        assert results["git"]["commit"] and all(
            r["round_ms"] for cell in results["cells"] for r in cell["results"].values())


def test_plot_writes_a_png_per_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data = tmp_path / "amd-zen4-avx512_2026-12-01_DPN92_b1.json"
    data.write_text(json.dumps(sample_results()))
    assert plot_results.main([str(data), "--out-dir", str(tmp_path)]) == 0
    png = tmp_path / "performance_amd-zen4-avx512_2026-12-01_DPN92_b1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "Test CPU 9000" in out and f"({png.name})" in out


def test_bad_arguments_exit_with_a_message(capsys):
    for argv in (["--threads", "0"], ["--iters", "0"], ["--warmup", "-1"], ["--engines", "tvm"],
                 ["--models", "DPN1"]):
        with pytest.raises(SystemExit) as exc:
            bench_engines.main(argv)
        assert exc.value.code == 2
        assert argv[0] in capsys.readouterr().err
