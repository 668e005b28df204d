"""dpn-fast command line: predict, demo, info."""
import argparse
import sys
import time

import numpy as np


def _model(name, fused, weights, seed=0):
    import paddle

    from dpn_fast.models import create_model

    paddle.seed(seed)  # random weights, when no checkpoint is given, are reproducible
    model = create_model(name, fused=fused, pretrained=weights)
    model.eval()
    return model


def _median_ms(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def cmd_predict(args):
    from dpn_fast.predict import predict

    model = _model(args.model, args.fused, args.weights)
    for path, top in zip(args.images, predict(model, args.images, args.topk)):
        print(path)
        for rank, (index, name, prob) in enumerate(top, 1):
            print(f"  {rank}. {prob:7.4f}  {index:4d}  {name}")
    if args.weights is None:
        print("note: random weights (no --weights given); predictions are meaningless")


def cmd_demo(args):
    import paddle

    from dpn_fast.predict import SAMPLE_IMAGE, preprocess

    image = paddle.to_tensor(preprocess(args.image)[None])
    reference = _model(args.model, False, args.weights)
    fused = _model(args.model, True, None)
    fused.set_state_dict(reference.state_dict())
    with paddle.no_grad():
        ref_logits = reference(image).numpy()
        fused_logits = fused(image).numpy()
        ref_ms = _median_ms(lambda: reference(image).numpy(), args.repeat)
        fused_ms = _median_ms(lambda: fused(image).numpy(), args.repeat)
    ref_top = np.argsort(-ref_logits[0])[:5]
    fused_top = np.argsort(-fused_logits[0])[:5]
    weights = args.weights or "random (seed 0)"
    print(f"{args.model} on {args.image if args.image != SAMPLE_IMAGE else 'the sample image'}, "
          f"weights: {weights}, device: {paddle.get_device()}")
    print(f"max |fused - reference| logits: {np.abs(fused_logits - ref_logits).max():.3e}")
    print(f"top-5 agreement: {len(set(ref_top) & set(fused_top))}/5 (same order: "
          f"{bool((ref_top == fused_top).all())})")
    print(f"reference {ref_ms:.1f} ms, fused {fused_ms:.1f} ms (median of {args.repeat}), "
          f"speedup {ref_ms / fused_ms:.2f}x")


def cmd_info(args):
    from dpn_fast.models.complexity import count_macs, count_parameters

    print(f"{'model':8s} {'params (M)':>10s} {'GMACs':>7s}")
    for name in args.models:
        model = _model(name, False, None)
        print(f"{name:8s} {count_parameters(model) / 1e6:10.2f} {count_macs(model) / 1e9:7.2f}")


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
    p.add_argument("--fused", action="store_true", help="use the fused model")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="fused vs reference on the sample image")
    p.add_argument("--model", default="DPN92", choices=MODEL_NAMES)
    p.add_argument("--weights")
    p.add_argument("--image", default=SAMPLE_IMAGE)
    p.add_argument("--repeat", type=int, default=5)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="parameter and MAC counts")
    p.add_argument("models", nargs="*", default=list(MODEL_NAMES))
    p.set_defaults(func=cmd_info)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "topk", 1) < 1:
        print("dpn-fast: error: --topk must be at least 1", file=sys.stderr)
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
