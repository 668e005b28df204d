"""dpn-fast command line: predict, eval, demo, bench, export, info."""
import argparse
import csv
import json
import os
import sys
import time

import numpy as np


CLASSES = 1000  # ImageNet-1k: the models the command line builds


def _model(name, weights, seed=0):
    """The plain network, eval, with `weights` or random (seeded, reproducible) ones."""
    import paddle

    from dpn_fast.api import create_model

    paddle.seed(seed)
    model = create_model(name, pretrained=weights)
    model.eval()
    return model


def _fast(model, precision="fp32"):
    """What dpn_fast runs `model` as on the current device: the compiled engine on CPU (in
    `precision`), the fused ops swapped in on GPU."""
    import paddle

    from dpn_fast.api import compile, create_model
    from dpn_fast.engines.cpu import native_precisions

    if paddle.get_device() == "cpu":
        native = native_precisions()
        if precision not in native:
            raise ValueError(f"--precision {precision}: this CPU runs {', '.join(native)} "
                             "natively (bf16 needs AVX512_BF16 or AMX-BF16)")
        return compile(model, precision=precision)
    if precision != "fp32":
        raise ValueError(f"--precision {precision} runs on CPU (dpn_fast.compile); on GPU the "
                         "fused model runs in the model's dtype")
    fused = create_model(model.model_name, fused=True, class_num=model.class_num)
    fused.set_state_dict(model.state_dict())
    fused.eval()
    return fused


def _median_ms(fns, repeat):
    """Median ms of each of `fns`, run in turn each round: drift on a shared machine (another
    process, clock changes) then hits all of them alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, fn_times in zip(fns, times):
            start = time.perf_counter()
            fn()
            fn_times.append((time.perf_counter() - start) * 1e3)
    return [float(np.median(t)) for t in times]


class ResultWriter:
    """Writes each image's top-k to `path`: CSV (path, then id, name and probability per rank)
    or JSON Lines ({"path", "class_ids", "names", "probs"}), by the file's extension; with no
    path, a readable listing on stdout."""

    FORMATS = (".csv", ".jsonl")

    def __init__(self, path, topk):
        self.format = os.path.splitext(path)[1].lower() if path else None
        if path and self.format not in self.FORMATS:
            raise ValueError(f"--output {path}: the format follows the extension, one of "
                             f"{', '.join(self.FORMATS)}")
        self.file = open(path, "w", encoding="utf-8", newline="") if path else sys.stdout
        if self.format == ".csv":
            self.csv = csv.writer(self.file)
            self.csv.writerow(["path"] + [f"top{r}_{column}" for r in range(1, topk + 1)
                                          for column in ("id", "name", "prob")])

    def write(self, path, top):
        if self.format == ".csv":
            self.csv.writerow([path] + [v for index, name, prob in top
                                        for v in (index, name, f"{prob:.6f}")])
        elif self.format == ".jsonl":
            self.file.write(json.dumps({"path": path, "class_ids": [t[0] for t in top],
                                        "names": [t[1] for t in top],
                                        "probs": [t[2] for t in top]}) + "\n")
        else:
            print(path, file=self.file)
            for rank, (index, name, prob) in enumerate(top, 1):
                print(f"  {rank}. {prob:7.4f}  {index:4d}  {name}", file=self.file)

    def close(self):
        if self.file is not sys.stdout:
            self.file.close()


class Progress:
    """A one-line progress bar on stderr, redrawn at most twice a second."""

    def __init__(self, total, enabled):
        self.total, self.enabled = total, enabled
        self.start = self.drawn = time.perf_counter()

    def update(self, done):
        now = time.perf_counter()
        if not self.enabled or (now - self.drawn < 0.5 and done < self.total):
            return
        self.drawn = now
        rate = done / (now - self.start)
        eta = f"{(self.total - done) / rate:4.0f} s left" if rate else ""
        filled = 30 * done // self.total
        print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} "
              f"{rate:5.1f} images/s {eta}", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.enabled:
            print(file=sys.stderr)


def _run_folder(args, items, stats):
    """Runs args.model over `items` [(path, label)] as predict and eval do: the compiled engine
    (or --reference), --batch-size, --workers decode threads, --preprocess. Yields (item
    positions, logits) per batch, fills `stats` (a RunStats), shows the progress bar and ends
    with the run's throughput on stderr: end to end, and of the model's forward calls."""
    import paddle

    from dpn_fast.predict import PREPROCESS, opencv, run_batches

    if args.preprocess == "paddleclas":
        opencv()  # missing: one error now, not one per image
    paddle.set_device(args.device)
    threads = _set_threads(args.threads)
    model = _model(args.model, args.weights)
    if not args.reference:
        model = _fast(model, args.precision)
    progress = Progress(len(items), args.progress or (sys.stderr.isatty()
                                                       and len(items) > args.batch_size))
    for positions, logits in run_batches(model, [path for path, _ in items], args.batch_size,
                                         PREPROCESS[args.preprocess], args.workers, stats):
        yield positions, logits
        progress.update(stats.images + len(stats.failed))
    progress.close()
    engine = "reference network" if args.reference else f"dpn_fast, {args.precision}"
    print(f"{args.model} ({engine}), batch {args.batch_size}, {threads} CPU threads, "
          f"{args.workers} decode thread{'' if args.workers == 1 else 's'}, {args.preprocess} "
          f"preprocessing: {stats.images} images "
          f"in {stats.seconds:.1f} s, {stats.images_per_second:.1f} images/s; the model's forward "
          f"calls alone {stats.model_images_per_second:.1f} images/s", file=sys.stderr)
    if args.weights is None:
        print("note: random weights (no --weights given); predictions are meaningless",
              file=sys.stderr)


def _report_failures(stats):
    """Lists the images that failed on stderr; the exit status: 1 if any did."""
    if stats.failed:
        print(f"dpn-fast: {len(stats.failed)} of {stats.images + len(stats.failed)} images "
              "skipped:", file=sys.stderr)
        for _, message in stats.failed:
            print(f"  {message}", file=sys.stderr)
    return 1 if stats.failed else 0


def cmd_predict(args):
    from dpn_fast.predict import RunStats, class_names, collect_images, softmax, top_k

    items = collect_images(args.images)
    writer = ResultWriter(args.output, args.topk)
    names = class_names()
    stats = RunStats()
    try:
        for positions, logits in _run_folder(args, items, stats):
            for position, row in zip(positions, softmax(logits)):
                writer.write(items[position][0], top_k(row, args.topk, names))
    finally:
        writer.close()
    return _report_failures(stats)


def cmd_eval(args):
    from dpn_fast.predict import RunStats, class_folder_images, read_list_file

    if args.labels:
        items = read_list_file(args.labels, root=args.folder)
        unlabelled = [path for path, label in items if label is None]
        if unlabelled:
            raise ValueError(f"--labels {args.labels}: {len(unlabelled)} lines have no class id "
                             f"(first: {unlabelled[0]})")
    elif args.folder:
        items = class_folder_images(args.folder)
    else:
        raise ValueError("eval needs a folder of class subfolders, or --labels LIST")
    labels = np.array([label for _, label in items])
    if labels.min() < 0 or labels.max() >= CLASSES:
        raise ValueError(f"class ids must lie in [0, {CLASSES}), the model's classes; the "
                         f"labels hold {labels.min()} ... {labels.max()}")
    loss_sum, top1, top5 = 0.0, 0, 0
    stats = RunStats()
    for positions, logits in _run_folder(args, items, stats):
        truth = labels[positions]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss_sum += float(-log_probs[np.arange(len(truth)), truth].sum())
        ranks = (logits > logits[np.arange(len(truth)), truth][:, None]).sum(axis=1)
        top1 += int((ranks < 1).sum())
        top5 += int((ranks < 5).sum())
    n = max(stats.images, 1)
    # PaddleClas's eval line: averages over the images evaluated
    print(f"[Eval][Epoch 0][Avg]CELoss: {loss_sum / n:.5f}, loss: {loss_sum / n:.5f}, "
          f"top1: {top1 / n:.5f}, top5: {top5 / n:.5f}")
    print(f"{stats.images} images evaluated" + (f", {len(stats.failed)} skipped (unreadable)"
                                                if stats.failed else ""))
    return _report_failures(stats)


def _compare(name, weights, images, repeat, precision):
    """Reference vs dpn_fast (_fast) on `images`: (reference logits, fused logits, ref ms, fused
    ms)."""
    import paddle

    reference = _model(name, weights)
    fused = _fast(reference, precision)
    images = paddle.to_tensor(images)
    with paddle.no_grad():
        ref_logits = reference(images).numpy()
        fused_logits = fused(images).numpy()
        ref_ms, fused_ms = _median_ms([lambda: reference(images).numpy(),
                                       lambda: fused(images).numpy()], repeat)
    return ref_logits, fused_logits, ref_ms, fused_ms


def _print_timing(ref_logits, fused_logits, ref_ms, fused_ms, repeat):
    print(f"max |fused - reference| logits: {np.abs(fused_logits - ref_logits).max():.3e}")
    print(f"reference {ref_ms:.1f} ms, fused {fused_ms:.1f} ms (median of {repeat}), "
          f"speedup {ref_ms / fused_ms:.2f}x")


def available_cores():
    """The cores this process may run on (its affinity mask, as ONNX Runtime counts them)."""
    return len(os.sched_getaffinity(0))


def _set_threads(threads):
    """CPU threads for Paddle's kernels (all available cores unless given); dpn_fast's ops
    follow Paddle's setting. Returns the count."""
    import paddle

    threads = threads or available_cores()
    paddle.base.core.set_num_threads(threads)
    return threads


def cmd_demo(args):
    import paddle

    from dpn_fast.predict import SAMPLE_IMAGE, class_names, preprocess

    threads = _set_threads(args.threads)

    ref_logits, fused_logits, ref_ms, fused_ms = _compare(
        args.model, args.weights, preprocess(args.image)[None], args.repeat, args.precision)
    ref_top = np.argsort(-ref_logits[0])[:5]
    fused_top = np.argsort(-fused_logits[0])[:5]
    print(f"{args.model} on {args.image if args.image != SAMPLE_IMAGE else 'the sample image'}, "
          f"weights: {args.weights or 'random (seed 0)'}, device: {paddle.get_device()}, "
          f"{threads} CPU threads, dpn_fast in {args.precision}")
    print(f"top-1: reference {class_names()[ref_top[0]]!r}, fused {class_names()[fused_top[0]]!r}")
    print(f"top-5 agreement: {len(set(ref_top) & set(fused_top))}/5 (same order: "
          f"{bool((ref_top == fused_top).all())})")
    _print_timing(ref_logits, fused_logits, ref_ms, fused_ms, args.repeat)


def cmd_bench(args):
    import paddle

    if args.engines is not None:
        return _bench_engines(args)
    paddle.set_device(args.device)
    threads = _set_threads(args.threads)
    images = np.random.default_rng(0).standard_normal(
        (args.batch_size, 3, args.image_size, args.image_size)).astype("float32")
    print(f"{args.model} eval, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
          f"device {paddle.get_device()}, {threads} CPU threads, dpn_fast in {args.precision}")
    _print_timing(*_compare(args.model, args.weights, images, args.repeat, args.precision),
                  args.repeat)


def _bench_engines(args):
    """bench --engines: the engine comparison (dpn_fast.engine_comparison) for one model, batch
    size and thread count, each engine in its own process."""
    from dpn_fast.engine_comparison import run_and_write

    for option, value, allowed in (("--device", args.device, "cpu"),
                                   ("--precision", args.precision, "fp32"),
                                   ("--weights", args.weights, None)):
        if value != allowed:
            raise ValueError(f"bench --engines: {option} {value} does not apply: the comparison "
                             "runs every CPU engine (bf16 ones included) on seeded random "
                             "weights")
    run_and_write([args.model], [args.batch_size], [args.threads or available_cores()],
                  rounds=args.rounds, iters=args.repeat, engines=args.engines or None,
                  image_size=args.image_size, out=args.out)


def cmd_export(args):
    from dpn_fast.inference import export

    model = _model(args.model, args.weights)
    if args.reference:
        name = f"{args.model}_reference"
    else:
        model = _fast(model, args.precision)
        name = args.model + ("" if args.precision == "fp32" else f"_{args.precision}")
    prefix = export(model, f"{args.out}/{name}", args.image_size)
    print(f"saved {prefix}.json and {prefix}.pdiparams; load with "
          f"dpn_fast.inference.create_predictor({prefix!r})")
    print("(Paddle 3.3.1 logs 'Paddle static graph(PIR) not support input out tensor for now' "
          "once for any tensor + tensor it traces: harmless)")


def cmd_info(args):
    from dpn_fast.engines.cpu import native_precisions
    from dpn_fast.models.complexity import count_macs, count_parameters

    print(f"{'model':8s} {'params (M)':>10s} {'GMACs':>7s}")
    for name in args.models:
        model = _model(name, None)
        print(f"{name:8s} {count_parameters(model) / 1e6:10.2f} {count_macs(model) / 1e9:7.2f}")
    print(f"compile precisions this CPU runs natively: {', '.join(native_precisions())}")


THREADS_HELP = ("CPU threads for reference and fused alike (default: all available cores, "
                f"{available_cores()} here)")


PRECISION_OPTION = dict(choices=("fp32", "bf16"), default="fp32",
                        help="the compiled engine's precision (dpn_fast.compile; bf16 needs "
                             "AVX512_BF16 or AMX-BF16; `dpn-fast info` lists this CPU's)")


def _add_run_options(p):
    """The options predict and eval share."""
    from dpn_fast.models import MODEL_NAMES
    from dpn_fast.predict import PREPROCESS

    p.add_argument("--model", default="DPN92", choices=MODEL_NAMES)
    p.add_argument("--weights", help=".pdparams checkpoint (PaddleClas's or ours)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1,
                   help="threads decoding the next batches while the model runs (0: decode "
                        "between batches)")
    p.add_argument("--preprocess", choices=PREPROCESS, default="pil",
                   help="pil (default), or paddleclas: PaddleClas's eval transform exactly "
                        "(OpenCV decode and resize; needs opencv-python)")
    p.add_argument("--reference", action="store_true",
                   help="run the plain Paddle network instead of the compiled engine")
    p.add_argument("--precision", **PRECISION_OPTION)
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--device", default="cpu", help="cpu or gpu")
    p.add_argument("--progress", action="store_true",
                   help="show the progress bar even when stderr is not a terminal")


def build_parser():
    from dpn_fast.engine_comparison import ENGINES as ENGINE_NAMES
    from dpn_fast.models import MODEL_NAMES
    from dpn_fast.predict import SAMPLE_IMAGE

    parser = argparse.ArgumentParser(prog="dpn-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="classify images, folders and list files (ImageNet-1k)")
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively) and "
                   "list files (.txt: `path` or PaddleClas's `path label` per line)")
    _add_run_options(p)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--output", help="write the results to this .csv or .jsonl file instead of "
                   "listing them on stdout")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("eval", help="top-1/top-5 accuracy on labelled images, as PaddleClas's "
                       "eval prints it")
    p.add_argument("folder", nargs="?", help="one subfolder per class (class ids by sorted "
                   "name); with --labels, the folder its paths are relative to")
    p.add_argument("--labels", help="PaddleClas's list file, `path class_id` per line "
                   "(val_list.txt)")
    _add_run_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="compiled engine vs reference on the sample image")
    p.add_argument("--model", default="DPN92", choices=MODEL_NAMES)
    p.add_argument("--weights")
    p.add_argument("--image", default=SAMPLE_IMAGE)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--precision", **PRECISION_OPTION)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="time reference vs compiled engine on random images")
    p.add_argument("--model", default="DPN92", choices=MODEL_NAMES)
    p.add_argument("--weights")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", default="cpu", help="cpu or gpu")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--precision", **PRECISION_OPTION)
    p.add_argument("--engines", nargs="*", metavar="ENGINE",
                   help="instead: compare the CPU inference engines (dpn_fast's, Paddle "
                        "Inference, and ONNX Runtime and OpenVINO where installed), each in its "
                        "own process; no names: all of "
                        f"{', '.join(ENGINE_NAMES)}. Prints the table, writes the results file")
    p.add_argument("--rounds", type=int, default=3,
                   help="--engines: rounds, every engine once per round (--repeat forwards each)")
    p.add_argument("--out", help="--engines: the results file (default: a new .json file in "
                                 "the current folder, named by CPU kind, date, model, batch)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", help="save a model for Paddle Inference")
    p.add_argument("--model", default="DPN92", choices=MODEL_NAMES)
    p.add_argument("--weights")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--reference", action="store_true",
                   help="export the plain Paddle network instead of the compiled engine")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--precision", **PRECISION_OPTION)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="parameter and MAC counts, and the precisions this CPU runs")
    p.add_argument("models", nargs="*", default=list(MODEL_NAMES))
    p.set_defaults(func=cmd_info)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    for option, least in (("topk", 1), ("repeat", 1), ("batch_size", 1), ("image_size", 1),
                          ("threads", 1), ("rounds", 1), ("workers", 0)):
        value = getattr(args, option, None)
        if value is not None and value < least:
            print(f"dpn-fast: error: --{option.replace('_', '-')} must be at least {least}",
                  file=sys.stderr)
            return 2
    from dpn_fast.checkpoint import CheckpointError

    try:
        return args.func(args) or 0
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"dpn-fast: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
