import os
import time
from pathlib import Path

# Every float32 CPU output of the ops starts as NaN (csrc/host_block_cache.cc), so an element a
# kernel leaves unwritten fails the tests. Read by the op library on its first call; inherited by
# the tests' subprocesses.
os.environ["DPN_FAST_POISON_OUTPUTS"] = "1"

# --- GPU compile reports (tests/test_gpu_compile.py): one line naming each file this run wrote,
# with its spill summary (the tables run to hundreds of lines).
_SESSION_START = time.time()
_GPU_COMPILE_REPORTS = ("cuda_resource_report.txt", "triton_resource_report.txt",
                        "triton_dpn92_ptx_report.txt")


def pytest_terminal_summary(terminalreporter):
    build = Path(__file__).resolve().parents[1] / "build"
    for name in _GPU_COMPILE_REPORTS:
        path = build / name
        if path.exists() and path.stat().st_mtime >= _SESSION_START:
            summary = path.read_text().rstrip().splitlines()[-1]
            terminalreporter.write_line(f"GPU compile resource report: {path} ({summary})")
