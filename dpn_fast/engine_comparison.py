"""The DPNs on every CPU inference engine, each engine in its own process; results as a data file.

    dpn-fast bench --engines                      # installed: one model, batch and thread count
    python benchmarks/bench_engines.py --models DPN92 --batch-sizes 1 8 --threads 1 2 --rounds 3

Runtimes in one process starve each other (libiomp5's, ONNX Runtime's and OpenVINO's idle threads
spin), so every (engine, round) is a fresh process; round r runs every engine before round r+1
starts, so drift on a shared machine hits all engines alike. A first process per model saves the
random (seeded) weights, the exports the selected engines need and the reference dygraph's
logits. Each run loads its engine, warms up, times --iters forwards and reports their median.

The run writes one JSON file (docs/performance.md has its schema), named by the CPU kind, the
date, the models and the batch sizes (benchmarks/bench_engines.py: in benchmarks/results/;
`dpn-fast bench --engines`: in the current folder), and prints a markdown table per model.
benchmarks/plot_results.py draws the files and makes docs/performance.md's tables. Each child is
`python -m dpn_fast.engine_comparison` run from the folder holding this dpn_fast, so it imports
the same copy as the parent.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PACKAGE_PARENT = Path(__file__).resolve().parents[1]  # a checkout, or site-packages
SOURCE = "benchmarks/bench_engines.py"  # the results files' "source" (the comparison's name)
MODEL_NAMES = ("DPN68", "DPN92", "DPN98", "DPN107", "DPN131")
SCHEMA_VERSION = 1

# The keys every results file has (docs/performance.md describes them). Transcribed files
# (figures of earlier versions, copied from notes) name their origin in "source" and may hold
# null for what the notes did not record (round times, logits agreement, versions).
TOP_KEYS = ("schema_version", "source", "date", "machine", "git", "versions", "settings",
            "engines", "skipped", "cells")
MACHINE_KEYS = ("cpu_model", "vendor", "kind", "cores", "flags")
RESULT_KEYS = ("round_ms", "median_ms", "logits_rel_diff", "precision")


@dataclass(frozen=True)
class Engine:
    label: str
    runtime: str  # dygraph, compiled, paddle-inference, onnxruntime, openvino
    model: str  # what it runs: the reference network, the fused one, or dpn_fast.compile's
    stock: bool  # runs no dpn_fast code: what a user would deploy without this project
    description: str
    onednn: bool = False
    onednn_bf16: bool = False  # Paddle Inference: Config.enable_mkldnn_bfloat16()
    precision_hint: str = None  # OpenVINO's INFERENCE_PRECISION_HINT; None: its default
    compile_precision: str = "fp32"  # dpn_fast.compile's precision (the compiled runtime)


ENGINES = {
    "compiled": Engine(
        "dpn_fast.compile", "compiled", "compiled", False,
        'dpn_fast.compile(model, device="cpu", precision="fp32") called on a paddle tensor'),
    "compiled-bf16": Engine(
        "dpn_fast.compile, bf16", "compiled", "compiled", False,
        'dpn_fast.compile(model, device="cpu", precision="bf16") called on a paddle tensor',
        compile_precision="bf16"),
    "pi-compiled": Engine(
        "compiled export, Paddle Inference", "paddle-inference", "compiled", False,
        "dpn_fast.inference.export(engine, prefix) run by a Paddle Inference predictor "
        "(oneDNN on)", onednn=True),
    "pi-compiled-bf16": Engine(
        "compiled bf16 export, Paddle Inference", "paddle-inference", "compiled-bf16", False,
        'dpn_fast.compile(model, precision="bf16") exported with dpn_fast.inference.export, run '
        "by a Paddle Inference predictor (oneDNN on)", onednn=True, compile_precision="bf16"),
    "fused-dygraph": Engine(
        "fused network, dynamic graph", "dygraph", "fused", False,
        "the fused network in eval under paddle.no_grad()"),
    "pi-fused-onednn": Engine(
        "fused export, Paddle Inference, oneDNN on", "paddle-inference", "fused", False,
        "the fused network exported, Paddle Inference with oneDNN on", onednn=True),
    "pi-fused": Engine(
        "fused export, Paddle Inference, oneDNN off", "paddle-inference", "fused", False,
        "the fused network exported, Paddle Inference with oneDNN off"),
    "reference-dygraph": Engine(
        "reference, dynamic graph", "dygraph", "reference", True,
        "the plain Paddle network in eval under paddle.no_grad()"),
    "pi-onednn-reference": Engine(
        "reference export, Paddle Inference + oneDNN", "paddle-inference", "reference", True,
        "the plain network exported, Paddle Inference with oneDNN on", onednn=True),
    "pi-onednn-bf16-reference": Engine(
        "reference export, Paddle Inference + oneDNN bf16", "paddle-inference", "reference", True,
        "the plain network exported, Paddle Inference with oneDNN and "
        "Config.enable_mkldnn_bfloat16()", onednn=True, onednn_bf16=True),
    "ort-reference": Engine(
        "reference export, ONNX Runtime", "onnxruntime", "reference", True,
        "the reference export converted by paddle2onnx, ONNX Runtime's CPU provider, "
        "intra-op threads = threads, sequential"),
    "openvino-f32-reference": Engine(
        "reference export, OpenVINO f32", "openvino", "reference", True,
        "the paddle2onnx conversion compiled by OpenVINO for CPU, latency hint, one stream, "
        "INFERENCE_PRECISION_HINT f32", precision_hint="f32"),
    "openvino-default-reference": Engine(
        "reference export, OpenVINO default precision", "openvino", "reference", True,
        "as OpenVINO f32 without a precision hint: what OpenVINO picks (bf16 where the CPU "
        "has bf16 instructions)"),
}

# Python modules each runtime needs beyond Paddle, and where to get them.
RUNTIME_MODULES = {"onnxruntime": ("onnxruntime", "paddle2onnx"),
                   "openvino": ("openvino", "paddle2onnx")}
# dpn_fast.compile's precisions by the names the results files use (OpenVINO's).
COMPILE_PRECISION_NAMES = {"fp32": "f32", "bf16": "bf16"}


def plural(count, word):
    return f"{count} {word}{'s' if count != 1 else ''}"


def images(batch, image_size):
    shape = (batch, 3, image_size, image_size)
    return np.random.default_rng(0).standard_normal(shape).astype("float32")


def native_compile_precisions():
    """The precisions dpn_fast.compile runs natively on this CPU, asked in a child (running Paddle
    here would start its thread pool in the process that only schedules the runs)."""
    return run_child("--native-compile-precisions").split()


def unavailable_engines(engine_keys):
    """{key: reason} for the selected engines this environment cannot run."""
    reasons = {}
    for key in engine_keys:
        engine = ENGINES[key]
        missing = [module for module in RUNTIME_MODULES.get(engine.runtime, ())
                   if not importlib.util.find_spec(module)]
        if missing:
            reasons[key] = (f"{' and '.join(missing)} not installed (pip install "
                            "'dpn_fast[bench]')")
    compiled = [key for key in engine_keys if ENGINES[key].model.startswith("compiled")]
    if any(ENGINES[key].compile_precision != "fp32" for key in compiled):
        native = native_compile_precisions()
        for key in compiled:
            precision = ENGINES[key].compile_precision
            if precision not in native:
                reasons[key] = (f"this CPU has no {precision} matmul kernels (dpn_fast.compile's "
                                f"precision={precision!r} needs them)")
    return reasons


def build_model(model_name, fused=False, weights=None):
    from dpn_fast.api import create_model

    model = create_model(model_name, fused=fused, pretrained=weights)
    model.eval()
    return model


def prepare(workdir, model_name, engine_keys, batch_sizes, image_size):
    """Writes the weights, the exports the engines need and the reference logits per batch size."""
    import paddle

    from dpn_fast import inference
    from dpn_fast.api import compile as compile_model

    paddle.seed(0)
    reference = build_model(model_name)
    paddle.save(reference.state_dict(), f"{workdir}/weights.pdparams")
    with paddle.no_grad():
        for batch in batch_sizes:
            np.save(f"{workdir}/reference_logits_{batch}.npy",
                    reference(paddle.to_tensor(images(batch, image_size))).numpy())
    engines = [ENGINES[key] for key in engine_keys]
    exported = {e.model for e in engines if e.runtime != "dygraph" and e.runtime != "compiled"}
    if "reference" in exported:
        inference.export(reference, f"{workdir}/reference", image_size)
    if any(e.runtime in RUNTIME_MODULES for e in engines):
        import paddle2onnx

        paddle2onnx.export(f"{workdir}/reference.json", f"{workdir}/reference.pdiparams",
                           f"{workdir}/reference.onnx")
    if "fused" in exported:
        fused = build_model(model_name, fused=True, weights=f"{workdir}/weights.pdparams")
        inference.export(fused, f"{workdir}/fused", image_size)
    for precision, name in (("fp32", "compiled"), ("bf16", "compiled-bf16")):
        if name in exported:
            engine = compile_model(build_model(model_name, weights=f"{workdir}/weights.pdparams"),
                                   device="cpu", precision=precision)
            inference.export(engine, f"{workdir}/{name}", image_size)


def make_forward(workdir, model_name, engine, x, threads):
    """(forward() -> logits array, the precision it computes in) for `engine` in this process."""
    if engine.runtime in ("dygraph", "compiled"):
        import paddle

        from dpn_fast.api import compile as compile_model

        paddle.base.core.set_num_threads(threads)  # dpn_fast's ops follow it
        model = build_model(model_name, engine.model == "fused", f"{workdir}/weights.pdparams")
        if engine.runtime == "compiled":
            model = compile_model(model, device="cpu", precision=engine.compile_precision)
        tensor = paddle.to_tensor(x)

        def forward():
            with paddle.no_grad():
                return model(tensor).numpy()
        return forward, COMPILE_PRECISION_NAMES[engine.compile_precision]
    if engine.runtime == "paddle-inference":
        from dpn_fast.inference import create_predictor, run_predictor

        if engine.onednn_bf16:  # a stock setting that dpn_fast's own helper does not offer
            import paddle

            prefix = f"{workdir}/{engine.model}"
            config = paddle.inference.Config(f"{prefix}.json", f"{prefix}.pdiparams")
            config.disable_gpu()
            config.enable_mkldnn()
            config.enable_mkldnn_bfloat16()
            config.set_cpu_math_library_num_threads(threads)
            config.disable_glog_info()
            predictor = paddle.inference.create_predictor(config)
            return (lambda: run_predictor(predictor, x)), "bf16"
        predictor = create_predictor(f"{workdir}/{engine.model}", use_onednn=engine.onednn,
                                     num_threads=threads)
        return (lambda: run_predictor(predictor, x)), COMPILE_PRECISION_NAMES[
            engine.compile_precision]
    if engine.runtime == "onnxruntime":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        session = onnxruntime.InferenceSession(f"{workdir}/reference.onnx", options,
                                               providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        return (lambda: session.run(None, {input_name: x})[0]), "f32"
    import openvino

    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if engine.precision_hint:
        config["INFERENCE_PRECISION_HINT"] = engine.precision_hint
    compiled = openvino.Core().compile_model(f"{workdir}/reference.onnx", "CPU", config)
    request = compiled.create_infer_request()
    output = compiled.output(0)
    # The request reuses its output buffer: copy, as every other engine returns fresh logits.
    return ((lambda: request.infer({0: x})[output].copy()),
            compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())


def worker(workdir, model_name, engine_key, batch, threads, image_size, warmup, iters):
    """Times one engine in this process: {"ms": median ms per forward, "rel_diff", "precision"}."""
    x = images(batch, image_size)
    forward, precision = make_forward(workdir, model_name, ENGINES[engine_key], x, threads)
    for _ in range(warmup):
        forward()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        logits = forward()
        times.append((time.perf_counter() - start) * 1e3)
    reference = np.load(f"{workdir}/reference_logits_{batch}.npy")
    rel_diff = np.abs(logits - reference).max() / np.abs(reference).max()
    return {"ms": float(np.median(times)), "rel_diff": float(rel_diff), "precision": precision}


def run_child(*args):
    """Runs this module with `args` in a fresh Python; returns its stdout."""
    env = dict(os.environ)
    env.pop("DPN_FAST_NUM_THREADS", None)  # the engines' thread count is --threads, for all alike
    proc = subprocess.run([sys.executable, "-m", __spec__.name, *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=PACKAGE_PARENT)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_engines {' '.join(map(str, args))} failed "
                           f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def cpu_kind(vendor, flags):
    """The project's name for a CPU: the three kinds its machines come in, else vendor and ISA."""
    if "amx_bf16" in flags:
        return "intel-amx"
    if vendor == "AuthenticAMD" and "avx512f" in flags:
        return "amd-zen4-avx512"
    if vendor == "AuthenticAMD" and "avx2" in flags:
        return "amd-zen3-avx2"
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse"
    return f"{vendor.lower() or 'unknown'}-{isa}"


def machine():
    cpuinfo = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            cpuinfo.setdefault(key.strip(), value.strip())
    flags = set(cpuinfo.get("flags", "").split())
    vendor = cpuinfo.get("vendor_id", "")
    return {"cpu_model": cpuinfo.get("model name", "unknown"), "vendor": vendor,
            "kind": cpu_kind(vendor, flags), "cores": len(os.sched_getaffinity(0)),
            "flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}}


def git_state():
    """{"commit", "dirty"} of the checkout this dpn_fast is the package of; None for both where it
    is not one (an installed wheel). New results files do not make it dirty (a run would otherwise
    dirty the next)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(PACKAGE_PARENT), *args], capture_output=True,
                              text=True, check=True).stdout.strip()
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != PACKAGE_PARENT:
            return {"commit": None, "dirty": None}  # e.g. site-packages in a venv in a checkout
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--", ".",
                                  ":(exclude)benchmarks/results"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def versions():
    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    found = {p: version(p) for p in ("paddlepaddle", "onnxruntime", "openvino", "paddle2onnx",
                                     "dpn_fast")}
    return {"python": sys.version.split()[0], **found}


def check_results(results):
    """Raises ValueError naming the first key a results document lacks or gets wrong."""
    def require(mapping, keys, where):
        missing = [key for key in keys if key not in mapping]
        if missing:
            raise ValueError(f"results {where} lacks {', '.join(missing)}")

    require(results, TOP_KEYS, "file")
    if results["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"results schema_version {results['schema_version']} is not "
                         f"{SCHEMA_VERSION}")
    require(results["machine"], MACHINE_KEYS, "machine")
    require(results["git"], ("commit", "dirty"), "git")
    datetime.date.fromisoformat(results["date"])
    for cell in results["cells"]:
        require(cell, ("model", "batch", "threads", "results"), "cell")
        for key, result in cell["results"].items():
            if key not in results["engines"]:
                raise ValueError(f"results cell {cell['model']} batch {cell['batch']} names "
                                 f"engine {key!r}, which 'engines' does not describe")
            require(result, RESULT_KEYS, f"{key} in {cell['model']} batch {cell['batch']}")
            if result["round_ms"] and result["median_ms"] != float(np.median(result["round_ms"])):
                raise ValueError(f"results {key}: median_ms is not the median of round_ms")


def run_benchmark(models, batch_sizes, threads, rounds, iters, warmup, engine_keys, image_size):
    """Runs every (model, batch, threads) cell; returns the results document."""
    skipped = unavailable_engines(engine_keys)
    runnable = [key for key in engine_keys if key not in skipped]
    cells = []
    for model in models:
        with tempfile.TemporaryDirectory(prefix="bench_engines_") as workdir:
            if runnable:
                run_child("--prepare", workdir, model, ",".join(runnable),
                          ",".join(map(str, batch_sizes)), image_size)
            for batch in batch_sizes:
                for thread_count in threads:
                    runs = {key: [] for key in runnable}
                    for _ in range(rounds):
                        for key in runnable:
                            out = run_child("--worker", workdir, model, key, batch, thread_count,
                                            image_size, warmup, iters)
                            runs[key].append(json.loads(out.strip().splitlines()[-1]))
                    cells.append({"model": model, "batch": batch, "threads": thread_count,
                                  "results": {key: summarise(r) for key, r in runs.items()}})
    return {
        "schema_version": SCHEMA_VERSION,
        "source": SOURCE,
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "git": git_state(),
        "versions": versions(),
        "settings": {"models": list(models), "batch_sizes": list(batch_sizes),
                     "threads": list(threads), "image_size": image_size, "rounds": rounds,
                     "iters": iters, "warmup": warmup},
        "engines": {key: {"label": ENGINES[key].label, "stock": ENGINES[key].stock,
                          "description": ENGINES[key].description} for key in runnable},
        "skipped": skipped,
        "cells": cells,
    }


def summarise(rounds):
    """One engine's rounds in one cell, as the results file holds them."""
    round_ms = [r["ms"] for r in rounds]
    precisions = {r["precision"] for r in rounds}
    return {"round_ms": round_ms, "median_ms": float(np.median(round_ms)),
            "logits_rel_diff": max(r["rel_diff"] for r in rounds),
            "precision": precisions.pop() if len(precisions) == 1 else sorted(precisions)}


def results_path(results, directory):
    """<kind>_<date>_<models>_b<batches>.json in `directory`, numbered if that name is taken."""
    settings = results["settings"]
    models = ("all-models" if sorted(settings["models"]) == sorted(MODEL_NAMES)
              else "-".join(settings["models"]))
    stem = (f"{results['machine']['kind']}_{results['date']}_{models}_"
            f"b{'-'.join(map(str, settings['batch_sizes']))}")
    path, number = Path(directory) / f"{stem}.json", 2
    while path.exists():
        path, number = Path(directory) / f"{stem}_{number}.json", number + 1
    return path


def repository_path(path):
    """`path` relative to the checkout holding this dpn_fast where it lies inside it, for tables
    and plots."""
    path = Path(path).resolve()
    return path.relative_to(PACKAGE_PARENT) if path.is_relative_to(PACKAGE_PARENT) else path


def provenance(results):
    """Which code the figures came from: commit, uncommitted changes, transcription."""
    commit = results["git"]["commit"]
    text = f"commit {commit[:12]}" if commit else "no commit recorded"
    if results["git"]["dirty"]:
        text += " with uncommitted changes"
    if results["source"] != SOURCE:
        text += f"; {results['source']}"
    return text


def precision_label(label, precision):
    """`label`, naming the precision where it is not f32 and the label does not already."""
    return label + (f" ({precision})" if precision != "f32" and precision not in label else "")


def cell_heading(batch, threads):
    return f"batch {batch}, {plural(threads, 'thread')}"


def fastest(cell, engines, stock, precision="f32"):
    """(key, ms) of the fastest `stock` (or dpn_fast) engine computing in `precision`, or None."""
    candidates = [(r["median_ms"], key) for key, r in cell["results"].items()
                  if engines[key]["stock"] == stock and r["precision"] == precision]
    return min(candidates)[::-1] if candidates else None


def format_table(results, data_file=None):
    """Markdown: a line naming the machine, run and data file, then the median ms of each engine
    per cell, a row per (model, engine), and per model the fastest dpn_fast engine's speed-up."""
    machine_, settings = results["machine"], results["settings"]
    columns = list(dict.fromkeys((c["batch"], c["threads"]) for c in results["cells"]))
    models = list(dict.fromkeys(c["model"] for c in results["cells"]))
    rounds = f" over {plural(settings['rounds'], 'round')}" if settings["rounds"] else ""
    lines = [f"{', '.join(models)} on {machine_['cpu_model']} ({machine_['kind']}, "
             f"{plural(machine_['cores'], 'core')}), {results['date']}, {provenance(results)}. "
             f"Median ms{rounds}" + (f"; data: `{data_file}`" if data_file else "") + ".", "",
             "| model | engine | " + " | ".join(cell_heading(*c) for c in columns)
             + " | logits vs reference |",
             "|---" * (len(columns) + 3) + "|"]
    for model in models:
        cells = {(c["batch"], c["threads"]): c for c in results["cells"] if c["model"] == model}
        engines = dict.fromkeys(key for c in cells.values() for key in c["results"])
        for key in engines:
            measured = [c["results"][key] for c in cells.values() if key in c["results"]]
            precision = ", ".join(sorted({str(r["precision"]) for r in measured}))
            diffs = [r["logits_rel_diff"] for r in measured if r["logits_rel_diff"] is not None]
            row = [f"{cells[c]['results'][key]['median_ms']:.1f}"
                   if c in cells and key in cells[c]["results"] else "-" for c in columns]
            lines.append(f"| {model} | "
                         f"{precision_label(results['engines'][key]['label'], precision)}"
                         f" | {' | '.join(row)} | {f'{max(diffs):.1e}' if diffs else '-'} |")
        # Speed-ups within a precision, for each precision both sides ran in.
        for precision in ("f32", "bf16"):
            speedups = []
            for column in columns:
                ours = column in cells and fastest(cells[column], results["engines"], False,
                                                   precision)
                theirs = column in cells and fastest(cells[column], results["engines"], True,
                                                     precision)
                speedups.append(f"{theirs[1] / ours[1]:.2f}x" if ours and theirs else "-")
            if any(x != "-" for x in speedups):
                lines.append(f"| {model} | fastest dpn_fast engine vs fastest stock {precision} "
                             "engine | " + " | ".join(speedups) + " | |")
    lines.append("")
    if results.get("note"):
        lines += [results["note"], ""]
    if results["skipped"]:
        not_run = ", ".join(f"{key} ({why})" for key, why in results["skipped"].items())
        lines += [f"Not run: {not_run}.", ""]
    return "\n".join(lines)


def run_and_write(models, batch_sizes, threads, rounds=3, iters=10, warmup=2, engines=None,
                  image_size=224, out=None, results_dir="."):
    """Runs the comparison (`engines`: keys of ENGINES, default all), writes the results file
    (`out`, or a new file in `results_dir` named by results_path) and prints its table. Returns
    the path. Bad settings raise ValueError naming the option."""
    for option, values in (("--batch-sizes", batch_sizes), ("--threads", threads),
                           ("--rounds", [rounds]), ("--iters", [iters]),
                           ("--image-size", [image_size])):
        if min(values) < 1:
            raise ValueError(f"engine comparison: {option} must be at least 1, got {values}")
    if warmup < 0:
        raise ValueError(f"engine comparison: --warmup must be at least 0, got {warmup}")
    unknown = set(engines or ()) - set(ENGINES)
    if unknown:
        raise ValueError(f"engine comparison: unknown engines {sorted(unknown)}; choose from "
                         f"{', '.join(ENGINES)}")
    results = run_benchmark(models, batch_sizes, threads, rounds, iters, warmup,
                            [key for key in ENGINES if engines is None or key in engines],
                            image_size)
    path = Path(out) if out else results_path(results, results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(format_table(results, data_file=repository_path(path)), end="")
    print(f"Wrote {path}")
    return path


def main(argv=None, results_dir="."):
    """The comparison's own command line (benchmarks/bench_engines.py passes its results_dir)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["DPN92"], choices=MODEL_NAMES)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10, help="timed forwards per engine and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards before them")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES),
                        help="a subset (the tables keep this list's order)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", type=Path,
                        help=f"the results file (default: a new file in {results_dir})")
    args = parser.parse_args(argv)
    try:
        run_and_write(args.models, args.batch_sizes, args.threads, args.rounds, args.iters,
                      args.warmup, args.engines, args.image_size, args.out, results_dir)
    except ValueError as error:
        parser.error(str(error))
    return 0


def child_main(argv):
    """A child process's work: --prepare, --worker or --native-compile-precisions."""
    if argv[:1] == ["--prepare"]:
        workdir, model, engines, batches, size = argv[1:]
        prepare(workdir, model, engines.split(","), [int(b) for b in batches.split(",")], int(size))
    elif argv[:1] == ["--worker"]:
        workdir, model, engine, *numbers = argv[1:]
        print(json.dumps(worker(workdir, model, engine, *map(int, numbers))))
    elif argv[:1] == ["--native-compile-precisions"]:
        from dpn_fast.engines.cpu import native_precisions
        print(" ".join(native_precisions()))
    else:
        raise SystemExit(f"usage: python -m {__spec__.name} --prepare|--worker|"
                         "--native-compile-precisions ... (run by the comparison itself)")


if __name__ == "__main__":
    child_main(sys.argv[1:])
