"""benchmarks/gpu_check.py's CPU dry run: what the GPU check runs, minus the GPU (needs torch;
skipped where it is absent, e.g. in the Paddle-only CI environment)."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


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
    report = dry_run(tmp_path, "e2e")
    rows = report["tables"]["correctness"]
    assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert report["tables"]["merge timing"] and report["tables"]["conv timing"]
    if "build" in report["info"]:
        probe = report["info"]["C ABI probe (1 = kInvalidArgument)"]
        assert all(v in (1, "absent") for v in probe.values()), probe


@pytest.mark.slow
def test_dry_run_timm_fused_equals_eager(tmp_path):
    if importlib.util.find_spec("timm") is None:  # not imported here: it may need the dry
        pytest.skip("timm not installed")          # run's torchvision workaround
    report = dry_run(tmp_path, "build", "correct", "kernels")
    rows = report["tables"]["e2e equivalence (logits vs float64 timm)"]
    assert rows and all(r["ok"] for r in rows), rows
