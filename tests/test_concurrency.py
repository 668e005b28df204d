"""Several threads at once on DPN68: one Paddle Inference predictor per thread (exports of the
fused model and of the compiled engine), one dynamic-graph fused model shared by all threads
under paddle.no_grad(), and one compiled engine shared by all threads. Every thread's outputs
must be bit-identical to a single-threaded run of the same input.

The ops' shared state is the host block cache (csrc/host_block_cache.cc): a function-local static
(initialised once, thread-safely, by C++11), whose take/give hold one mutex; a block is handed to
one tensor at a time. The cores keep no other state between calls.
"""
import threading

import numpy as np
import paddle
import pytest

import dpn_fast
from dpn_fast.inference import create_predictor, export, run_predictor
from test_fused_models import random_state

THREADS = 4
ROUNDS = 3
IMAGE_SIZE = 32


def fused_dpn68(state):
    model = dpn_fast.DPN68(fused=True)
    model.set_state_dict(state)
    model.eval()
    return model


def thread_inputs():
    return [np.random.default_rng(100 + i).standard_normal((2, 3, IMAGE_SIZE, IMAGE_SIZE))
            .astype("float32") for i in range(THREADS)]


def run_threads(work):
    """Runs work(i) for i < THREADS at once; returns their results, re-raising any error."""
    start = threading.Barrier(THREADS)
    results, errors = [None] * THREADS, []

    def body(i):
        try:
            start.wait()
            results[i] = work(i)
        except Exception as error:  # noqa: BLE001 (re-raised in the main thread)
            errors.append(error)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def compiled_dpn68(state):
    model = dpn_fast.DPN68()
    model.set_state_dict(state)
    return dpn_fast.compile(model)


@pytest.mark.parametrize("make", [fused_dpn68, compiled_dpn68], ids=["fused", "compiled"])
def test_one_predictor_per_thread(tmp_path, make):
    state = random_state(dpn_fast.DPN68(), seed=31)
    # export() traces the model it gets: give it its own instance.
    prefix = export(make(state), str(tmp_path / "dpn68"), image_size=IMAGE_SIZE)
    inputs = thread_inputs()
    single = create_predictor(prefix)
    expected = [run_predictor(single, x) for x in inputs]
    assert all(np.isfinite(e).all() for e in expected)

    def work(i):
        predictor = create_predictor(prefix)
        return [run_predictor(predictor, inputs[i]) for _ in range(ROUNDS)]

    for i, outputs in enumerate(run_threads(work)):
        for out in outputs:
            np.testing.assert_array_equal(out, expected[i])


def test_threads_share_one_dynamic_graph_model():
    model = fused_dpn68(random_state(dpn_fast.DPN68(), seed=32))
    inputs = thread_inputs()
    with paddle.no_grad():
        expected = [model(paddle.to_tensor(x)).numpy() for x in inputs]
    assert all(np.isfinite(e).all() for e in expected)

    def work(i):
        with paddle.no_grad():  # grad mode is per thread
            return [model(paddle.to_tensor(inputs[i])).numpy() for _ in range(ROUNDS)]

    for i, outputs in enumerate(run_threads(work)):
        for out in outputs:
            np.testing.assert_array_equal(out, expected[i])


def test_threads_share_one_compiled_engine():
    """dpn_fast.compile's object, called from every thread without paddle.no_grad() (it needs
    none)."""
    engine = compiled_dpn68(random_state(dpn_fast.DPN68(), seed=33))
    inputs = thread_inputs()
    expected = [engine(paddle.to_tensor(x)).numpy() for x in inputs]
    assert all(np.isfinite(e).all() for e in expected)

    def work(i):
        return [engine(paddle.to_tensor(inputs[i])).numpy() for _ in range(ROUNDS)]

    for i, outputs in enumerate(run_threads(work)):
        for out in outputs:
            np.testing.assert_array_equal(out, expected[i])
