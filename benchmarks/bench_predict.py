"""Folder prediction vs the model alone: how much of the decoding the decode workers hide.

    python benchmarks/bench_predict.py --model DPN92 --images 512 --batch-size 8 --workers 0 1 2

Writes --images seeded 500x375 JPEGs (photo-like: smooth colour fields plus noise) to a
temporary folder, then per round times, in turn:
- the model alone: the compiled engine (dpn_fast.compile, --precision) on the same images,
  decoded beforehand, in batches of --batch-size;
- `dpn_fast.predict.run_batches` over the folder with each --workers count (0: decode between
  batches), as `dpn-fast predict` runs it.
Prints images/s (median over --rounds), each predict run as a fraction of the model alone, and
the CPU time per image (the process's user + system time: threads' spinning included). On a busy
shared machine the wall-clock figures mostly measure the other load; the CPU times still show
what the decoding costs, and `model / (model + decode)` CPU time bounds the fraction a 2-core
machine with no other load can reach when the model keeps both cores busy.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import paddle
from PIL import Image

import dpn_fast
from dpn_fast.models import MODEL_NAMES
from dpn_fast.predict import PREPROCESS, RunStats, collect_images, run_batches


def write_jpegs(folder, count, size=(500, 375), seed=0):
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(count):
        fields = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        pixels = np.asarray(fields.resize((w, h), Image.BICUBIC), np.int16)
        pixels = np.clip(pixels + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def timed(run, images):
    """(images/s, CPU ms per image) of run()."""
    start, cpu_start = time.perf_counter(), time.process_time()
    run()
    cpu_ms = (time.process_time() - cpu_start) * 1e3 / images
    return images / (time.perf_counter() - start), cpu_ms


def model_alone(engine, batches):
    """`engine` over pre-decoded `batches`."""
    with paddle.no_grad():
        for batch in batches:
            engine(paddle.to_tensor(batch)).numpy()


def predict_run(engine, paths, batch_size, preprocess_fn, workers):
    stats = RunStats()
    for _ in run_batches(engine, paths, batch_size, preprocess_fn, workers, stats):
        pass
    assert stats.images == len(paths) and not stats.failed, stats.failed[:3]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DPN92", choices=MODEL_NAMES)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--preprocess", choices=PREPROCESS, default="pil")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)

    paddle.base.core.set_num_threads(args.threads)
    paddle.seed(0)
    engine = dpn_fast.compile(dpn_fast.create_model(args.model).eval(),
                              precision=args.precision)
    preprocess_fn = PREPROCESS[args.preprocess]
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as folder:
        write_jpegs(folder, args.images)
        paths = [path for path, _ in collect_images([folder])]
        decoded = np.stack([preprocess_fn(p) for p in paths])
        batches = [decoded[i:i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
        model_alone(engine, batches[:1])  # warm-up
        decode = timed(lambda: [preprocess_fn(p) for p in paths], len(paths))
        runs = {"model alone": lambda: model_alone(engine, batches)}
        for w in args.workers:
            runs[f"predict, {w} workers"] = (
                lambda w=w: predict_run(engine, paths, args.batch_size, preprocess_fn, w))
        measured = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                measured[name].append(timed(run, len(paths)))
    with open("/proc/cpuinfo") as f:
        cpu = next(line.split(":")[1].strip() for line in f if line.startswith("model name"))
    print(f"{args.model}, {args.images} JPEGs 500x375, batch {args.batch_size}, {args.precision}, "
          f"{args.threads} threads, {args.preprocess} preprocessing, {cpu}, "
          f"{time.strftime('%Y-%m-%d')}, load average {os.getloadavg()[0]:.1f}; medians of "
          f"{args.rounds} rounds")
    print(f"  {'':22s} {'images/s':>9s} {'vs model':>9s} {'CPU ms/image':>13s}")
    alone = float(np.median([rate for rate, _ in measured["model alone"]]))
    for name, values in measured.items():
        rate, cpu_ms = np.median(values, axis=0)
        print(f"  {name:22s} {rate:9.2f} {rate / alone:9.1%} {cpu_ms:13.1f}")
    model_cpu = float(np.median([cpu for _, cpu in measured["model alone"]]))
    print(f"  decoding alone, 1 thread: {decode[1]:.1f} CPU ms/image; a 2-core machine with no "
          f"other load reaches at most {model_cpu / (model_cpu + decode[1]):.1%} of the model "
          "alone where the model keeps both cores busy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
