"""benchmarks/gpu_check.py (the channels-last forward's GPU check) and benchmarks/gpu_nchw.py
(the NCHW kernels'): their CPU dry runs walk the whole plan through the real code paths (Triton
under its interpreter, a tiny DPN), the targets follow the measured rows, and the plan's
estimate fits the GPU machine's time. Needs torch, and timm for the end-to-end steps (.ci/run
installs both); skipped where they are absent."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402  (imports neither torch nor dpn_fast until its main() runs)


def needs_torch_and_timm():
    pytest.importorskip("torch")
    if importlib.util.find_spec("timm") is None:  # not imported here: it may need
        pytest.skip("timm not installed")          # import_timm's torchvision workaround


def run_script(script, out, *args):
    cmd = [sys.executable, str(BENCHMARKS / script), "--dry-run", "--out", str(out), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    report = json.loads((out / f"{Path(script).stem}.json").read_text())
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert not report["errors"], report["errors"]
    return report


def test_dry_run_walks_every_step_of_the_plan(tmp_path):
    needs_torch_and_timm()
    out = tmp_path / "out"
    report = run_script("gpu_check.py", out)
    tables, info = report["tables"], report["info"]
    assert list(report["stage_seconds"]) == [step.name for step in gpu_check.PLAN]
    assert not [n for n in report["notes"] if "skipped" in n or "not measured" in n], \
        report["notes"]
    assert info["dpn_fast"] == str(REPO / "dpn_fast")  # the checkout's, without Paddle
    for key in ("date", "device", "torch", "triton", "python", "commit", "timm"):
        assert info[key], key
    # fp16 first, then fp32 (bf16 math is wrong in the interpreter); every case passes.
    rows = tables["nhwc correctness"]
    assert [r["dtype"] for r in rows] == ["float16"] * 8 + ["float32"] * 8
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    equivalence = tables["e2e equivalence (logits vs float64 timm)"]
    assert all(r["ok"] and 0 < r["err"] <= r["bound"] for r in equivalence), equivalence
    assert {r["model"] for r in tables["e2e timing"]} == {
        "timm eager", "timm eager channels_last", "fused nhwc", "torch.compile default",
        "torch.compile max-autotune"}
    conv = tables["nhwc grouped conv timing (fp16)"][0]
    assert {"cudnn nchw ms", "cudnn channels_last ms", "cudnn folded nchw ms",
            "cudnn folded channels_last ms"} <= set(conv)
    assert conv["best cudnn ms"] == min(v for k, v in conv.items()
                                        if k.startswith("cudnn ") and k.endswith(" ms"))
    assert all({"cublas ms", "torch ms", "nhwc ms", "of floor"} <= set(r)
               for r in tables["nhwc 1x1 timing (fp16)"])
    for section in ("nhwc grouped conv tile sweep (fp16)", "nhwc 1x1 tile sweep (fp16)"):
        sweep = tables[section]
        assert sweep and all(v for r in sweep for k, v in r.items() if k.endswith(" ok")), sweep
        assert not [k for r in sweep for k in r if k.endswith(" error")], sweep
    targets = tables["targets"]
    assert [r["target"] for r in targets] == list(gpu_check.TARGETS)
    assert {r["verdict"] for r in targets} == {"not measured"}
    # The console went to the log as it ran; the warm-up and compile children logged too.
    log = (out / "gpu_check.log").read_text()
    assert all(f"== {step.name} " in log for step in gpu_check.PLAN)
    assert (out / "gpu_check.md").read_text().count("## ") >= 8
    assert sorted(p.name for p in out.glob("warm_*.log")) == ["warm_fused_0of1.log",
                                                              "warm_kernels_0of1.log"]
    assert (out / "compile_max-autotune.jsonl").exists()


def test_plan_fits_the_gpu_machine_and_has_a_basis():
    total = gpu_check.plan_estimate_s()
    assert total + gpu_check.MACHINE_START_S < gpu_check.GPU_MACHINE_LIMIT_S
    assert gpu_check.parse_args(["--out", "x"]).budget_s == total
    skip = "torch.compile max-autotune,sweep"
    skipped = sum(s.estimate_s for s in gpu_check.PLAN if s.name in skip.split(","))
    assert skipped and gpu_check.parse_args(["--out", "x", "--skip", skip]).budget_s == \
        total - skipped
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", "x", "--skip", "compile"])  # not a step's name
    assert all(step.basis for step in gpu_check.PLAN if step.estimate_s)
    assert [s.name for s in gpu_check.PLAN][:3] == ["setup", "warm triton cache",
                                                     "correctness fp16"]
    assert gpu_check.PLAN[-1].name == "targets"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--estimate"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and f"{total:.0f} s  the script" in result.stdout


def test_report_is_on_disk_after_every_row(tmp_path):
    pytest.importorskip("torch")
    from gpu_common import Report
    report = Report(tmp_path)
    for i in range(3):
        report.add("rows", {"i": i, "ms": 0.5 * i})
        on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
        assert [r["i"] for r in on_disk["tables"]["rows"]] == list(range(i + 1))
        assert f"| {i} |" in (tmp_path / "gpu_check.md").read_text()


def test_a_compile_child_past_its_share_is_killed_and_noted(tmp_path):
    """torch.compile runs in a child with a hard limit: past it the child is killed, the run
    goes on, and the report says what was not measured and why."""
    pytest.importorskip("torch")
    import gpu_e2e
    from gpu_common import Report
    report = Report(tmp_path)
    gpu_e2e.run_compiled(report, BENCHMARKS / "gpu_check.py", "max-autotune", [64, 1], 0.5,
                         dry_run=True)
    assert "e2e timing" not in report.tables
    assert report.notes == ["torch.compile max-autotune: n=[64, 1] not measured (killed after "
                            "0 s; compile_max-autotune.log)"]


def test_timed_baselines_compute_what_the_kernels_compute():
    """The torch sequences timed against the kernels do the same work: each cuDNN form of the
    grouped conv and each GEMM's torch sequence (no kernel runs here) matches float64."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    import gpu_nhwc
    from gpu_common import compare, import_checkout_dpn_fast
    import_checkout_dpn_fast()
    from dpn_fast.kernels import nhwc_grouped_conv3x3
    gen = torch.Generator().manual_seed(0)
    for case in gpu_nhwc.SMALL_GEMMS:
        run = gpu_nhwc.GemmRun(None, case, 2, torch.float32, "cpu", gen)
        run.reset_out()
        run.torch_sequence()()
        ref64, plain = run.unfused(torch.float64), run.unfused(torch.float32)
        assert compare(run.written(), ref64, plain, "float32")["ok"], case
        assert run.untouched_ok(), case
    for case in gpu_nhwc.SMALL_CONVS:
        # sm_80's shipped tiles: there is no GPU here to look the arch up from
        tiles = nhwc_grouped_conv3x3.choose_tiles(case.c // case.groups, 2 * case.hw**2, False,
                                                  arch=80)
        run = gpu_nhwc.GroupedRun(nhwc_grouped_conv3x3, case, 2, torch.float32, "cpu", gen,
                                  tiles)
        ref64 = run.unfused(torch.float64).view(2, run.h_out, run.w_out, case.c)
        for name, baseline in run.cudnn_baselines().items():
            out = baseline().permute(0, 2, 3, 1)
            assert compare(out, ref64, ref64, "float32")["ok"], (case, name)


def _e2e(report, model, n, ms, peak=None):
    report.add("e2e timing", {"model": model, "dtype": "float16", "n": n, "graph ms": ms,
                              "peak MiB": peak})


def test_targets_from_measured_rows(tmp_path):
    """The targets table from rows as a GPU run writes them: each verdict and figure follows
    the measured values, one threshold whatever the card."""
    pytest.importorskip("torch")
    from gpu_common import Report
    report = Report(tmp_path)
    report.info["device"] = "NVIDIA H200"
    for case, speedup in (("s0-proj", 3.5), ("s1-down", 3.2), ("s2-down", 4.0),
                          ("s3-normal", 2.9)):
        report.add(gpu_check.CONV_SECTION, {"case": case, "n": 64, "speedup": speedup,
                                            "best cudnn": "folded channels_last"})
    report.add(gpu_check.CONV_SECTION, {"case": "s0-proj", "n": 1, "speedup": 0.5,
                                        "best cudnn": "nchw"})  # n=1: not the target's
    _e2e(report, "timm eager", 64, 20.0, 1000.0)
    _e2e(report, "torch.compile default", 64, 13.0)
    _e2e(report, "torch.compile max-autotune", 64, 12.0)
    _e2e(report, "fused nhwc", 64, 9.0, 800.0)
    _e2e(report, "fused nhwc", 1, 0.75)
    gpu_check.evaluate_targets(report)
    rows = {r["target"]: r for r in report.tables["targets"]}
    conv = rows["grouped conv >= 3x best cuDNN at n=64, every shape"]
    assert conv["verdict"] == "FAIL" and "min 2.90x over 4 shapes" in conv["measured"] \
        and "s3-normal 2.90x vs folded channels_last" in conv["measured"]
    eager = rows["e2e n=64 >= 2x timm eager"]
    assert eager["verdict"] == "PASS" and "2.22x" in eager["measured"]
    compiled = rows["e2e n=64 >= 1.4x torch.compile"]  # against the better mode
    assert compiled["verdict"] == "FAIL" and "torch.compile max-autotune" in compiled["measured"] \
        and "1.33x" in compiled["measured"]
    graph = rows["e2e n=1 graph <= 0.8 ms"]
    assert graph["verdict"] == "PASS" and "0.750 ms on NVIDIA H200" in graph["measured"]
    memory = rows["peak memory <= timm eager"]
    assert memory["verdict"] == "PASS" and "800 vs 1000 MiB" in memory["measured"]

    report = Report(tmp_path / "h100")
    report.info["device"] = "NVIDIA H100 80GB HBM3"
    _e2e(report, "torch.compile default", 64, 13.0)
    _e2e(report, "fused nhwc", 64, 9.0, 1200.0)
    _e2e(report, "fused nhwc", 1, 0.95)
    gpu_check.evaluate_targets(report)
    rows = {r["target"]: r for r in report.tables["targets"]}
    assert rows["e2e n=1 graph <= 0.8 ms"]["verdict"] == "FAIL"  # 0.8 ms on an H100 too
    compiled = rows["e2e n=64 >= 1.4x torch.compile"]
    assert compiled["verdict"] == "PASS" and "max-autotune not measured" in compiled["measured"]
    assert rows["e2e n=64 >= 2x timm eager"]["verdict"] == "not measured"
    assert rows["peak memory <= timm eager"]["verdict"] == "not measured"
    assert rows["grouped conv >= 3x best cuDNN at n=64, every shape"]["verdict"] == \
        "not measured"


@pytest.mark.slow
def test_nchw_dry_run_kernels_timing_and_sweep(tmp_path):
    """benchmarks/gpu_nchw.py's dry run: the CUDA library build and C ABI probe (with nvcc),
    every NCHW kernel and backend on small odd shapes under the interpreter, the torch
    references at DPN92's shapes, the timing and tile-sweep paths."""
    pytest.importorskip("torch")
    skip = [] if shutil.which("nvcc") else ["build"]
    report = run_script("gpu_nchw.py", tmp_path / "out", "--build-dir", str(tmp_path / "build"),
                        "--skip", ",".join(skip) or "none")
    assert report["info"]["backends"] == {"merge": ["triton", "torch"], "conv": ["triton", "torch"]}
    rows = report["tables"]["correctness"]
    assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert report["tables"]["merge timing"] and report["tables"]["conv timing"]
    sweep = report["tables"]["conv tile sweep (Triton, fp16)"]
    assert {r["form"] for r in sweep} == {"plain", "prologue"}
    assert all(v for r in sweep for k, v in r.items() if k.endswith(" ok")), sweep
    assert [r["target"] for r in report["tables"]["targets (NCHW kernels)"]]
    if "build" in report["info"]:
        probe = report["info"]["C ABI probe (1 = kInvalidArgument)"]
        assert all(v in (1, "absent") for v in probe.values()), probe
