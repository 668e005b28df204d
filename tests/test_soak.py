"""Memory over time: the host block cache's cap (csrc/host_block_cache.cc) and soaks of 2000
DPN68 forwards, fused model and compiled engine. Each run is a fresh interpreter, since the cache
reads its cap (DPN_FAST_HOST_CACHE_MB) once per process.

`python tests/test_soak.py` prints the figures of docs/reliability.md: the cache's peak for
DPN92/DPN131 at batch 1 and 8, and the resident memory of fused and reference DPN92 predictors.
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# Runs in the child: helpers reading the process's resident memory and the cache's counters.
PRELUDE = """
import ctypes, json, sys
import numpy as np, paddle
import dpn_fast
sys.path.insert(0, {tests_dir!r})
_lib = ctypes.CDLL(dpn_fast._extension.LIBRARY_PATH)
for _name in ("dpn_fast_host_cache_retained_bytes", "dpn_fast_host_cache_limit_bytes"):
    getattr(_lib, _name).restype = ctypes.c_size_t

def cache_retained():
    return _lib.dpn_fast_host_cache_retained_bytes()

def cache_limit():
    return _lib.dpn_fast_host_cache_limit_bytes()

def rss_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

def fused_model(name):
    model = dpn_fast.create_model(name, fused=True)
    model.eval()
    return model

def compiled_model(name):
    return dpn_fast.compile(dpn_fast.create_model(name))
"""


def run_child(body, cache_mb=None, timeout=600):
    """Runs PRELUDE + body in a fresh interpreter; returns the JSON it prints last."""
    env = dict(os.environ, GLOG_minloglevel="2")
    if cache_mb is not None:
        env["DPN_FAST_HOST_CACHE_MB"] = str(cache_mb)
    proc = subprocess.run([sys.executable, "-c", PRELUDE.format(tests_dir=TESTS_DIR) + body],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=tempfile.gettempdir())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cache_keeps_freed_blocks_within_its_cap():
    """Freed outputs are kept up to the cap and reused; beyond it they go back to the system."""
    result = run_child("""
from dpn_fast import ops
resid, dense = paddle.randn([1, 64, 32, 32]), paddle.randn([1, 64, 32, 32])
y = paddle.randn([1, 96, 32, 32])
outs = [ops.dual_path_merge(resid, dense, y) for _ in range(8)]  # 8 x (256 + 384) KiB live
del outs
after_free = cache_retained()
ops.dual_path_merge(resid, dense, y)  # takes a kept block of each size and gives it back
print(json.dumps({"limit": cache_limit(), "after_free": after_free,
                  "after_reuse": cache_retained()}))
""", cache_mb=2)
    assert result["limit"] == 2 << 20
    assert 1 << 20 < result["after_free"] <= result["limit"]
    assert result["after_reuse"] == result["after_free"]


SOAK = """
model = {make}("DPN68")
x = paddle.to_tensor(np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype("float32"))
with paddle.no_grad():
    for _ in range(100):  # warm-up
        model(x)
    rss_start, peak_retained = rss_bytes(), 0
    for _ in range(2000):
        model(x)
        peak_retained = max(peak_retained, cache_retained())
print(json.dumps({{"rss_start": rss_start, "rss_end": rss_bytes(), "limit": cache_limit(),
                   "peak_retained": peak_retained}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("make", ["fused_model", "compiled_model"])
def test_soak_2000_dpn68_forwards(make):
    """Resident memory grows < 5% after warm-up; the cache stays within its (default) cap. A cap
    that binds is tested above."""
    result = run_child(SOAK.format(make=make), timeout=1200)
    print(result)
    assert result["rss_end"] < 1.05 * result["rss_start"], result
    assert 0 < result["peak_retained"] <= result["limit"], result


CACHE_PEAK = """
model = fused_model({name!r})
x = paddle.to_tensor(np.random.default_rng(0).standard_normal(({batch}, 3, 224, 224)),
                     dtype="float32")
peak = 0
with paddle.no_grad():
    for _ in range(3):
        model(x)
        peak = max(peak, cache_retained())
print(json.dumps({{"peak_mib": peak / 2**20, "rss_mib": rss_bytes() / 2**20}}))
"""

PREDICTOR_RSS = """
import tempfile
from dpn_fast.inference import create_predictor, export, run_predictor
model = dpn_fast.create_model("DPN92", fused={fused})
prefix = export(model, tempfile.mkdtemp() + "/dpn92")
del model
import gc; gc.collect()
x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype("float32")
rss_before = rss_bytes()
predictor = create_predictor(prefix, use_onednn={onednn})
for _ in range(5):
    run_predictor(predictor, x)
print(json.dumps({{"predictor_mib": (rss_bytes() - rss_before) / 2**20,
                   "process_rss_mib": rss_bytes() / 2**20,
                   "cache_peak_mib": cache_retained() / 2**20}}))
"""

if __name__ == "__main__":
    for name in ("DPN92", "DPN131"):
        for batch in (1, 8):
            print(name, "batch", batch, run_child(CACHE_PEAK.format(name=name, batch=batch),
                                                  cache_mb=1 << 20))
    for fused in (False, True):
        for onednn in (True, False):
            print("DPN92 predictor fused" if fused else "DPN92 predictor reference",
                  "oneDNN", "on" if onednn else "off",
                  run_child(PREDICTOR_RSS.format(fused=fused, onednn=onednn)))
