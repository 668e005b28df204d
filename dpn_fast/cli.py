"""dpn-fast command line: predict, demo, bench, export, info."""
import argparse
import os
import sys
import time

import numpy as np


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


def cmd_predict(args):
    from dpn_fast.predict import predict

    model = _model(args.model, args.weights)
    if not args.reference:
        model = _fast(model, args.precision)
    for path, top in zip(args.images, predict(model, args.images, args.topk)):
        print(path)
        for rank, (index, name, prob) in enumerate(top, 1):
            print(f"  {rank}. {prob:7.4f}  {index:4d}  {name}")
    if args.weights is None:
        print("note: random weights (no --weights given); predictions are meaningless")


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

    paddle.set_device(args.device)
    threads = _set_threads(args.threads)
    images = np.random.default_rng(0).standard_normal(
        (args.batch_size, 3, args.image_size, args.image_size)).astype("float32")
    print(f"{args.model} eval, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
          f"device {paddle.get_device()}, {threads} CPU threads, dpn_fast in {args.precision}")
    _print_timing(*_compare(args.model, args.weights, images, args.repeat, args.precision),
                  args.repeat)


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


def build_parser():
    from dpn_fast.models import MODEL_NAMES
    from dpn_fast.predict import SAMPLE_IMAGE

    parser = argparse.ArgumentParser(prog="dpn-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="classify images (ImageNet-1k)")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", default="DPN92", choices=MODEL_NAMES)
    p.add_argument("--weights", help=".pdparams checkpoint (PaddleClas's or ours)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--reference", action="store_true",
                   help="run the plain Paddle network instead of the compiled engine")
    p.add_argument("--precision", **PRECISION_OPTION)
    p.set_defaults(func=cmd_predict)

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
    for option in ("topk", "repeat", "batch_size", "image_size", "threads"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            print(f"dpn-fast: error: --{option.replace('_', '-')} must be at least 1",
                  file=sys.stderr)
            return 2
    from dpn_fast.checkpoint import CheckpointError

    try:
        args.func(args)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"dpn-fast: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
