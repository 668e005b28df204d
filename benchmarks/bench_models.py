"""End to end: every DPN, reference vs fused vs compiled (CPU), eval (and one training step,
reference vs fused), same process.

`pytest benchmarks/bench_models.py` groups each (model, device, batch) so the two variants sit
side by side; `--benchmark-autosave` then `--benchmark-compare` tracks them across commits.
"""
import os

import numpy as np
import paddle
import pytest
from harness import BATCHES, DEVICES, synchronize

import dpn_fast

CASES = [(name, device, batch) for name in dpn_fast.MODEL_NAMES for device in DEVICES
         for batch in BATCHES[device]]
_models = {}


def model_variants(name, device):
    """{variant: model} sharing one set of (random, seeded) weights: the reference, the fused
    model and, on CPU, the compiled engine."""
    if (name, device) not in _models:
        paddle.set_device(device)
        paddle.seed(0)
        reference = dpn_fast.create_model(name)
        fused = dpn_fast.create_model(name, fused=True)
        fused.set_state_dict(reference.state_dict())
        variants = {"reference": reference, "fused": fused}
        if device == "cpu":
            variants["compiled"] = dpn_fast.compile(reference)
        _models.clear()  # keep one set alive: the big models are ~350 MB each
        _models[(name, device)] = variants
    return _models[(name, device)]


def time_eval(benchmark, name, device, batch, variant, group):
    model = model_variants(name, device).get(variant)
    if model is None:
        pytest.skip(f"no {variant} engine on {device}")
    model.eval()
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((batch, 3, 224, 224)), "float32")
    benchmark.group = group

    def run():
        with paddle.no_grad():
            model(x)
        synchronize(device)

    benchmark.pedantic(run, rounds=3 if batch > 1 else 5, warmup_rounds=1)


@pytest.mark.parametrize("variant", ["reference", "fused", "compiled"])
@pytest.mark.parametrize("name,device,batch", CASES)
def test_eval(benchmark, name, device, batch, variant):
    time_eval(benchmark, name, device, batch, variant, f"eval {name} {device} batch {batch}")


@pytest.mark.parametrize("variant", ["reference", "fused", "compiled"])
def test_eval_all_cores(benchmark, variant):
    """DPN92 batch 1 on CPU with every core for reference and fused alike (Paddle's default is
    1 thread; dpn_fast's ops follow Paddle's setting)."""
    paddle.base.core.set_num_threads(os.cpu_count())
    try:
        time_eval(benchmark, "DPN92", "cpu", 1, variant,
                  f"eval DPN92 cpu batch 1, {os.cpu_count()} threads")
    finally:
        paddle.base.core.set_num_threads(1)


@pytest.mark.parametrize("variant", ["reference", "fused"])
def test_train_step(benchmark, variant):
    """One SGD step of DPN92 at batch 4, 112x112 (small enough for a 2-core CPU)."""
    model = model_variants("DPN92", DEVICES[-1])[variant]
    model.train()
    optimizer = paddle.optimizer.SGD(learning_rate=0.0, parameters=model.parameters())
    rng = np.random.default_rng(1)
    x = paddle.to_tensor(rng.standard_normal((4, 3, 112, 112)), "float32")
    labels = paddle.to_tensor(rng.integers(0, 1000, (4, 1)))
    benchmark.group = f"train step DPN92 {DEVICES[-1]} batch 4 112x112"

    def step():
        loss = paddle.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        synchronize(DEVICES[-1])

    benchmark.pedantic(step, rounds=2, warmup_rounds=1)
    model.eval()
