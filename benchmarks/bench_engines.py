"""One DPN on every CPU inference engine: each engine in its own process, rounds interleaved.

    python benchmarks/bench_engines.py --model DPN92 --batch-sizes 1 8 --threads 1 2 --rounds 3

Runtimes in one process starve each other (libiomp5's and ONNX Runtime's idle threads spin), so
every (engine, round) is a fresh process; round r runs every engine before round r+1 starts, so
drift on a shared machine hits all engines alike. A first process saves the random (seeded)
weights, the exports every selected engine needs and the reference dygraph's logits, in a temp
dir shared by the runs. Each run loads its engine, warms up, times --iters forwards and prints
one JSON line: the median ms and its logits' max |difference| from the reference logits,
relative to the largest |reference logit|.
"""
import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import namedtuple

import numpy as np

Engine = namedtuple("Engine", "label runtime fused onednn")
ENGINES = {
    "reference-dygraph": Engine("reference dygraph", "dygraph", False, None),
    "fused-dygraph": Engine("fused dygraph", "dygraph", True, None),
    "pi-onednn-reference": Engine("PI+oneDNN reference", "paddle-inference", False, True),
    "pi-fused-onednn": Engine("PI fused, oneDNN on", "paddle-inference", True, True),
    "pi-fused": Engine("PI fused, oneDNN off", "paddle-inference", True, False),
    "ort-reference": Engine("ONNX Runtime reference", "onnxruntime", False, None),
}
RATIO_BASELINES = ("fused-dygraph", "pi-fused")
ORT_MISSING = ("ONNX Runtime reference: skipped, onnxruntime or paddle2onnx is not installed "
               "(pip install 'dpn_fast[bench]')")


def plural(count, word):
    return f"{count} {word}{'s' if count != 1 else ''}"


def images(batch, image_size):
    shape = (batch, 3, image_size, image_size)
    return np.random.default_rng(0).standard_normal(shape).astype("float32")


def prepare(workdir, model_name, engine_keys, batch_sizes, image_size):
    """Writes the weights, the exports the engines need and the reference logits per batch size."""
    import paddle

    from dpn_fast.inference import export
    from dpn_fast.models import create_model

    paddle.seed(0)
    reference = create_model(model_name)
    reference.eval()
    paddle.save(reference.state_dict(), f"{workdir}/weights.pdparams")
    with paddle.no_grad():
        for batch in batch_sizes:
            np.save(f"{workdir}/reference_logits_{batch}.npy",
                    reference(paddle.to_tensor(images(batch, image_size))).numpy())
    engines = [ENGINES[key] for key in engine_keys]
    if any(e.runtime != "dygraph" and not e.fused for e in engines):
        export(reference, f"{workdir}/reference", image_size)
    if "ort-reference" in engine_keys:
        import paddle2onnx

        paddle2onnx.export(f"{workdir}/reference.json", f"{workdir}/reference.pdiparams",
                           f"{workdir}/reference.onnx")
    if any(e.runtime != "dygraph" and e.fused for e in engines):
        fused = create_model(model_name, fused=True, pretrained=f"{workdir}/weights.pdparams")
        export(fused, f"{workdir}/fused", image_size)


def worker(workdir, model_name, engine_key, batch, threads, image_size, warmup, iters):
    """Times one engine in this process: {"ms": median ms per forward, "rel_diff": ...}."""
    engine = ENGINES[engine_key]
    x = images(batch, image_size)
    prefix = f"{workdir}/{'fused' if engine.fused else 'reference'}"
    if engine.runtime == "dygraph":
        import paddle

        from dpn_fast.models import create_model

        paddle.base.core.set_num_threads(threads)  # dpn_fast's ops follow it
        model = create_model(model_name, engine.fused, f"{workdir}/weights.pdparams")
        model.eval()
        tensor = paddle.to_tensor(x)

        def forward():
            with paddle.no_grad():
                return model(tensor).numpy()
    elif engine.runtime == "paddle-inference":
        from dpn_fast.inference import create_predictor, run_predictor

        predictor = create_predictor(prefix, use_onednn=engine.onednn, num_threads=threads)

        def forward():
            return run_predictor(predictor, x)
    else:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        session = onnxruntime.InferenceSession(prefix + ".onnx", options,
                                               providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def forward():
            return session.run(None, {input_name: x})[0]

    for _ in range(warmup):
        logits = forward()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        logits = forward()
        times.append((time.perf_counter() - start) * 1e3)
    reference = np.load(f"{workdir}/reference_logits_{batch}.npy")
    rel_diff = np.abs(logits - reference).max() / np.abs(reference).max()
    return {"ms": float(np.median(times)), "rel_diff": float(rel_diff)}


def run_child(*args):
    """Runs this file with `args` in a fresh Python; returns its stdout."""
    env = dict(os.environ)
    env.pop("DPN_FAST_NUM_THREADS", None)  # the engines' thread count is --threads, for all alike
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, args)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_engines {' '.join(map(str, args))} failed "
                           f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def machine_line(threads):
    cpuinfo = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            cpuinfo.setdefault(key.strip(), value.strip())
    flags = set(cpuinfo.get("flags", "").split())
    isa = ", ".join(f"{name} {'yes' if flag in flags else 'no'}" for name, flag in
                    (("avx512f", "avx512f"), ("avx512_bf16", "avx512_bf16"), ("amx", "amx_tile")))

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return (f"{cpuinfo.get('model name', 'unknown CPU')} ({cpuinfo.get('vendor_id', '?')}; {isa}), "
            f"{len(os.sched_getaffinity(0))} cores, {plural(threads, 'thread')}, "
            f"paddlepaddle {version('paddlepaddle')}, onnxruntime {version('onnxruntime')}, "
            f"{datetime.date.today().isoformat()}")


def format_table(title, results, machine):
    """Markdown table of `results` {engine key: [{"ms", "rel_diff"} per round]}."""
    medians = {key: float(np.median([r["ms"] for r in runs])) for key, runs in results.items()}

    def ratio(key, baseline):
        return f"{medians[key] / medians[baseline]:.2f}" if baseline in medians else "-"

    lines = [f"### {title}", "", machine, "",
             "| engine | ms per round | median ms | time / fused dygraph | "
             "time / PI fused, oneDNN off | logits vs reference dygraph |",
             "|---|---|---|---|---|---|"]
    for key, runs in results.items():
        per_round = " / ".join(f"{r['ms']:.1f}" for r in runs)
        lines.append(f"| {ENGINES[key].label} | {per_round} | "
                     f"{medians[key]:.1f} | {ratio(key, RATIO_BASELINES[0])} | "
                     f"{ratio(key, RATIO_BASELINES[1])} | {max(r['rel_diff'] for r in runs):.1e} |")
    return "\n".join(lines) + "\n"


def run_benchmark(model, batch_sizes, threads, rounds, iters, warmup, engine_keys, image_size):
    """Every (batch, threads) table as markdown, plus notes on engines skipped."""
    notes = []
    if "ort-reference" in engine_keys and not all(
            importlib.util.find_spec(m) for m in ("onnxruntime", "paddle2onnx")):
        engine_keys = [key for key in engine_keys if key != "ort-reference"]
        notes.append(ORT_MISSING)
    if not engine_keys:
        return "\n".join(notes) + "\n"
    tables = []
    with tempfile.TemporaryDirectory(prefix="bench_engines_") as workdir:
        run_child("--prepare", workdir, model, ",".join(engine_keys),
                  ",".join(map(str, batch_sizes)), image_size)
        for batch in batch_sizes:
            for thread_count in threads:
                results = {key: [] for key in engine_keys}
                for _ in range(rounds):
                    for key in engine_keys:
                        out = run_child("--worker", workdir, model, key, batch, thread_count,
                                        image_size, warmup, iters)
                        results[key].append(json.loads(out.strip().splitlines()[-1]))
                title = (f"{model}, batch {batch}, {image_size}x{image_size}, "
                         f"{plural(thread_count, 'thread')}, {plural(rounds, 'round')} of "
                         f"{plural(iters, 'iteration')} (median)")
                tables.append(format_table(title, results, machine_line(thread_count)))
    return "\n".join(tables + notes) + "\n"


def main(argv=None):
    from dpn_fast.models import MODEL_NAMES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DPN92", choices=MODEL_NAMES)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10, help="timed forwards per engine and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards before them")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES),
                        help="a subset (the tables keep this list's order)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--markdown", help="append the tables to this file")
    args = parser.parse_args(argv)
    if min(args.batch_sizes + args.threads + [args.rounds, args.iters, args.image_size]) < 1:
        parser.error("--batch-sizes, --threads, --rounds, --iters and --image-size must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    report = run_benchmark(args.model, args.batch_sizes, args.threads, args.rounds, args.iters,
                           args.warmup, [key for key in ENGINES if key in args.engines],
                           args.image_size)
    print(report, end="")
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--prepare"]:
        workdir, model, engines, batches, size = sys.argv[2:]
        prepare(workdir, model, engines.split(","), [int(b) for b in batches.split(",")], int(size))
    elif sys.argv[1:2] == ["--worker"]:
        workdir, model, engine, *numbers = sys.argv[2:]
        print(json.dumps(worker(workdir, model, engine, *map(int, numbers))))
    else:
        sys.exit(main())
