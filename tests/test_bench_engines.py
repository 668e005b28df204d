"""benchmarks/bench_engines.py end to end on a small DPN68, and its argument checks."""
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_engines", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_engines.py")
bench_engines = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_engines)

ORT_INSTALLED = all(importlib.util.find_spec(m) for m in ("onnxruntime", "paddle2onnx"))


def table_rows(markdown):
    """{engine label: [cells after the label]} of the one table in `markdown`."""
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    assert rows[0][0].strip() == "engine"
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


@pytest.mark.slow
def test_engines_table(tmp_path, capsys):
    engines = ["reference-dygraph", "fused-dygraph", "ort-reference"]  # ORT: a row or a note
    out_file = tmp_path / "engines.md"
    assert bench_engines.main(["--model", "DPN68", "--image-size", "64", "--batch-sizes", "1",
                               "--threads", "1", "--rounds", "1", "--iters", "2", "--warmup", "1",
                               "--engines", *engines, "--markdown", str(out_file)]) == 0
    report = out_file.read_text()
    assert report == capsys.readouterr().out
    assert "DPN68, batch 1, 64x64, 1 thread, 1 round of 2 iterations" in report
    assert "cores, 1 thread, paddlepaddle 3.3.1" in report
    assert (bench_engines.ORT_MISSING in report) != ORT_INSTALLED
    rows = table_rows(report)
    assert list(rows) == [bench_engines.ENGINES[key].label
                          for key in engines[:None if ORT_INSTALLED else 2]]
    fused_ms = float(rows["fused dygraph"][1])
    for label, (per_round, median, vs_fused, vs_pi_fused, rel_diff) in rows.items():
        assert float(per_round) == float(median) > 0  # one round
        assert float(vs_fused) == pytest.approx(float(median) / fused_ms, abs=0.011)
        assert vs_pi_fused == "-"  # that engine did not run
        assert float(rel_diff) < 1e-4, f"{label}'s logits disagree with the reference"


def test_bad_arguments_exit_with_a_message(capsys):
    for argv in (["--threads", "0"], ["--iters", "0"], ["--warmup", "-1"], ["--engines", "tvm"],
                 ["--model", "DPN1"]):
        with pytest.raises(SystemExit) as exc:
            bench_engines.main(argv)
        assert exc.value.code == 2
        assert argv[0] in capsys.readouterr().err
