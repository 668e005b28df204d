"""benchmarks/gpu_check.py's CPU dry run: what the GPU check runs, minus the GPU (needs torch,
and timm for its e2e stage, which .ci/run installs; skipped where they are absent)."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_check  # noqa: E402  (imports neither torch nor dpn_fast until its main() runs)


def dry_run(tmp_path, *skip):
    pytest.importorskip("torch")
    skip = list(skip) + ([] if shutil.which("nvcc") else ["build"])
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out"),
           "--build-dir", str(tmp_path / "build"), "--skip", ",".join(skip) or "none"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert not report["errors"], report["errors"]
    return report


def test_dry_run_kernels_and_timing_paths(tmp_path):
    report = dry_run(tmp_path, "sweep", "e2e")
    assert report["info"]["dpn_fast"] == str(REPO / "dpn_fast")  # the checkout's, without Paddle
    assert report["info"]["backends"] == {"merge": ["triton", "torch"], "conv": ["triton", "torch"]}
    rows = report["tables"]["correctness"]
    assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert report["tables"]["merge timing"] and report["tables"]["conv timing"]
    nhwc = report["tables"]["nhwc correctness"]
    assert {r["op"] for r in nhwc} == {"nhwc 1x1", "nhwc grouped conv"}
    assert all(r["ok"] for r in nhwc), [r for r in nhwc if not r["ok"]]
    for section in ("nhwc grouped conv timing (fp16)", "nhwc 1x1 timing (fp16)",
                    "nhwc grouped conv tile sweep (fp16)", "nhwc 1x1 tile sweep (fp16)"):
        assert report["tables"][section], section
    for section in ("nhwc grouped conv tile sweep (fp16)", "nhwc 1x1 tile sweep (fp16)"):
        rows = report["tables"][section]
        assert all(v for r in rows for k, v in r.items() if k.endswith(" ok")), rows
    # The channels-last forward's targets, by their exact names; nothing is measured on CPU.
    targets = report["tables"]["targets"]
    assert [r["target"] for r in targets] == [
        "grouped conv >= 3x cuDNN at n=64, every shape", "e2e n=64 >= 2x timm eager",
        "e2e n=64 >= 1.4x torch.compile", "e2e n=1 graph <= 0.8 ms", "peak memory <= timm eager"]
    assert {r["verdict"] for r in targets} == {"not measured"}
    if "build" in report["info"]:
        probe = report["info"]["C ABI probe (1 = kInvalidArgument)"]
        assert all(v in (1, "absent") for v in probe.values()), probe


@pytest.mark.slow
def test_dry_run_conv_tile_sweep_and_timm_fused_equals_eager(tmp_path):
    """The dry run's two slowest stages under the interpreter: the NCHW conv's tile sweep, and
    timm dpn92 on dpn_fast.torch's fused forward (32x32 images)."""
    if importlib.util.find_spec("timm") is None:  # not imported here: it may need
        pytest.skip("timm not installed")          # import_timm's torchvision workaround
    report = dry_run(tmp_path, "build", "nhwc-correct", "nhwc-kernels", "nhwc-sweep", "correct",
                     "kernels")
    sweep = report["tables"]["conv tile sweep (Triton, fp16)"]
    assert {r["form"] for r in sweep} == {"plain", "prologue"}
    assert all(v for r in sweep for k, v in r.items() if k.endswith(" ok")), sweep
    rows = report["tables"]["e2e equivalence (logits vs float64 timm)"]
    assert [(r["fused"], r["dtype"]) for r in rows] == [("nhwc", "float32")], rows
    assert rows[0]["ok"] and 0 < rows[0]["err"] <= rows[0]["bound"], rows
    timed = report["tables"]["e2e timing (timm dpn92, 224x224)"]
    assert [(r["model"], r["n"]) for r in timed] == [("timm eager", 1)], timed


def test_targets_from_measured_rows(tmp_path):
    """The targets table from rows as a GPU run writes them (no torch needed): each verdict and
    figure follows the measured values and the card."""
    report = gpu_check.Report(tmp_path, 60)
    report.info["device"] = "NVIDIA H200"
    narrow_copy = {3: 55.0, 6: 45.0}  # the 6-channel groups miss 50% of copy bandwidth
    for cin_g, speedup in ((3, 3.5), (6, 3.2), (12, 4.0), (24, 3.1)):
        report.add("nhwc grouped conv timing (fp16)", {
            "case": f"g{cin_g}", "n": 64, "cin_g": cin_g, "speedup": speedup,
            "%copy": narrow_copy.get(cin_g, 30.0)})
    e2e = [("timm eager", "float16", 64, 20.0, None, 1000.0),
           ("timm torch.compile", "float16", 64, 12.0, None, 900.0),
           ("fused nhwc", "float16", 64, 9.0, None, 800.0),
           ("fused nhwc", "float16", 1, 1.5, 0.75, 100.0),
           ("timm eager", "float16", 256, 80.0, None, 3000.0),
           ("fused nhwc", "float16", 256, 36.0, None, 3100.0)]
    for model, dtype, n, ms, graph_ms, peak in e2e:
        gpu_check._e2e_row(report, model, dtype, n, ms, graph_ms, peak=peak)
    gpu_check.evaluate_targets(report)
    rows = {r["target"]: r for r in report.tables["targets"]}
    conv = rows["grouped conv >= 3x cuDNN at n=64, every shape"]
    assert conv["verdict"] == "FAIL" and "min 3.10x over 4 shapes" in conv["measured"] \
        and "55, 45% of copy" in conv["measured"]
    assert rows["e2e n=64 >= 2x timm eager"]["verdict"] == "PASS"
    assert "2.22x" in rows["e2e n=64 >= 2x timm eager"]["measured"]
    compiled = rows["e2e n=64 >= 1.4x torch.compile"]
    assert compiled["verdict"] == "FAIL" and "1.33x" in compiled["measured"] \
        and "bfloat16 n=256: not measured" in compiled["measured"]
    graph = rows["e2e n=1 graph <= 0.8 ms"]
    assert graph["verdict"] == "PASS" and "0.750 ms on NVIDIA H200" in graph["measured"]
    memory = rows["peak memory <= timm eager"]
    assert memory["verdict"] == "FAIL" and "3100 vs 3000 MiB" in memory["measured"]

    report = gpu_check.Report(tmp_path, 60)
    report.info["device"] = "NVIDIA H100 80GB HBM3"
    gpu_check._e2e_row(report, "fused nhwc", "float16", 1, 1.5, 0.95)
    gpu_check.evaluate_targets(report)
    graph = {r["target"]: r for r in report.tables["targets"]}["e2e n=1 graph <= 0.8 ms"]
    assert graph["verdict"] == "PASS" and "limit 1.0 ms" in graph["measured"]
