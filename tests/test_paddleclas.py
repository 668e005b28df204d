"""PaddleClas's own engine with the fused archs (dpn_fast.paddleclas): training, eval, export,
prediction and checkpoints, on a small ImageNet-style folder the tests write.

The `paddleclas` pip package (the [paddleclas] extra) holds PaddleClas's arch package only; its
engine, data pipeline and tools/ live in a PaddleClas source checkout, which the engine tests find
at $PADDLECLAS_ROOT (they skip without one).
"""
import contextlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

pytest.importorskip("paddleclas", reason="needs the [paddleclas] extra")

import yaml  # noqa: E402  (PaddleClas's dependencies from here on)
from PIL import Image  # noqa: E402

import dpn_fast  # noqa: E402
from dpn_fast import paddleclas as dpn_paddleclas  # noqa: E402
from utils import assert_matches_reference  # noqa: E402

ROOT = os.environ.get("PADDLECLAS_ROOT")
needs_engine = pytest.mark.skipif(
    not (ROOT and os.path.isfile(os.path.join(ROOT, "ppcls", "engine", "engine.py"))),
    reason="needs a PaddleClas source checkout at $PADDLECLAS_ROOT (engine and tools/)")

MODEL = "DPN68"
FUSED = MODEL + "_fused"
CLASSES = 3
TRAIN_IMAGES = 8      # two iterations at batch 4
VAL_IMAGES = 12
IMAGE_SIZE, CROP = 40, 32
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """<root>/images/class_k/*.jpg with PaddleClas's train_list.txt / val_list.txt ("path label"),
    each class a different mean colour, and a label file for Infer's class names."""
    root = tmp_path_factory.mktemp("imagenet_tiny")
    rng = np.random.default_rng(0)
    lists = {}
    for split, count in (("train", TRAIN_IMAGES), ("val", VAL_IMAGES)):
        lines = []
        for i in range(count):
            label = i % CLASSES
            folder = root / "images" / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.roll([200, 60, 60], label)
            pixels = np.clip(colour + rng.normal(0, 40, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255)
            name = f"images/class_{label}/{split}_{i}.jpg"
            Image.fromarray(pixels.astype(np.uint8)).save(root / name, quality=90)
            lines.append(f"{name} {label}")
        lists[split] = root / f"{split}_list.txt"
        lists[split].write_text("\n".join(lines) + "\n")
    (root / "labels.txt").write_text("".join(f"{k} class_{k}\n" for k in range(CLASSES)))
    return root


def eval_transforms():
    return [{"DecodeImage": {"to_rgb": True, "channel_first": False}},
            {"ResizeImage": {"resize_short": IMAGE_SIZE}},
            {"CropImage": {"size": CROP}},
            {"NormalizeImage": {"scale": "1.0/255.0", "mean": MEAN, "std": STD, "order": ""}}]


def write_config(dataset, out, arch, **global_options):
    """The structure of PaddleClas's ppcls/configs/ImageNet/DPN/DPN68.yaml, scaled to the tiny
    folder: CPU, one epoch of two iterations, 32 px crops, top-1/top-2."""
    loader = {"num_workers": 0, "use_shared_memory": False}
    config = {
        "Global": {"checkpoints": None, "pretrained_model": None, "output_dir": str(out),
                   "device": "cpu", "save_interval": 1, "eval_during_train": False,
                   "eval_interval": 1, "epochs": 1, "print_batch_step": 1,
                   "use_visualdl": False, "image_shape": [3, CROP, CROP], "seed": 7,
                   "save_inference_dir": str(out / "inference"), **global_options},
        "Arch": {"name": arch, "class_num": CLASSES},
        "Loss": {"Train": [{"CELoss": {"weight": 1.0, "epsilon": 0.1}}],
                 "Eval": [{"CELoss": {"weight": 1.0}}]},
        "Optimizer": {"name": "Momentum", "momentum": 0.9,
                      "lr": {"name": "ConstLR", "learning_rate": 0.01},
                      "regularizer": {"name": "L2", "coeff": 0.0001}},
        "DataLoader": {
            "Train": {"dataset": {"name": "ImageNetDataset", "image_root": str(dataset),
                                  "cls_label_path": str(dataset / "train_list.txt"),
                                  "transform_ops": [
                                      {"DecodeImage": {"to_rgb": True, "channel_first": False}},
                                      {"RandCropImage": {"size": CROP}},
                                      {"RandFlipImage": {"flip_code": 1}},
                                      {"NormalizeImage": {"scale": "1.0/255.0", "mean": MEAN,
                                                          "std": STD, "order": ""}}]},
                      "sampler": {"name": "DistributedBatchSampler", "batch_size": 4,
                                  "drop_last": False, "shuffle": True},
                      "loader": loader},
            "Eval": {"dataset": {"name": "ImageNetDataset", "image_root": str(dataset),
                                 "cls_label_path": str(dataset / "val_list.txt"),
                                 "transform_ops": eval_transforms()},
                     "sampler": {"name": "DistributedBatchSampler", "batch_size": 8,
                                 "drop_last": False, "shuffle": False},
                     "loader": loader}},
        "Infer": {"infer_imgs": str(dataset / "images"), "batch_size": 8,
                  "transforms": eval_transforms() + [{"ToCHWImage": None}],
                  "PostProcess": {"name": "Topk", "topk": 2,
                                  "class_id_map_file": str(dataset / "labels.txt")}},
        "Metric": {"Train": None, "Eval": [{"TopkAcc": {"topk": [1, 2]}}]},
    }
    path = out / f"{arch}.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def ppcls():
    """The checkout's ppcls with the fused archs registered (what the command line does)."""
    sys.path.insert(0, ROOT)
    dpn_paddleclas.register()
    from ppcls.engine.engine import Engine
    from ppcls.utils import config
    return Engine, config


def run(ppcls, config_path, mode, **overrides):
    """What tools/{train,eval,export_model,infer}.py do: Engine(config, mode).<mode>(); returns
    the engine and the result. Each run gets fresh generated names, as in its own process."""
    Engine, config = ppcls
    options = [f"{key}={value}" for key, value in overrides.items()]
    parsed = config.get_config(str(config_path), overrides=options, show=False)
    parsed.profiler_options = None  # as tools/train.py sets it
    with paddle.utils.unique_name.guard():
        engine = Engine(parsed, mode)
        result = getattr(engine, mode)()
    return engine, result


@contextlib.contextmanager
def captured_log():
    """The messages PaddleClas's logger ("ppcls", which does not propagate) writes meanwhile."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("ppcls")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory):
    """A random DPN68 (3 classes) with BN statistics away from identity, as .pdparams."""
    paddle.seed(3)
    model = dpn_fast.create_model(MODEL, class_num=CLASSES)
    rng = np.random.default_rng(3)
    for name, value in model.state_dict().items():
        if name.endswith("_mean"):
            value.set_value(rng.normal(0, 0.1, value.shape).astype("float32"))
        elif name.endswith("_variance"):
            value.set_value(rng.uniform(0.5, 1.5, value.shape).astype("float32"))
    path = tmp_path_factory.mktemp("init") / "init.pdparams"
    paddle.save(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def trained(dataset, initial_weights, ppcls, tmp_path_factory):
    """Two training iterations from the same weights and crops: the fused arch through the
    user's command line, the reference arch through the engine in this process. Returns the
    output folders."""
    out = tmp_path_factory.mktemp("runs")
    fused_config = write_config(dataset, out / "fused", MODEL,
                                pretrained_model=str(initial_weights)[:-len(".pdparams")])
    command = [sys.executable, "-m", "dpn_fast.paddleclas", os.path.join(ROOT, "tools/train.py"),
               "-c", str(fused_config), "-o", f"Arch.name={FUSED}"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reference_config = write_config(dataset, out / "reference", MODEL,
                                    pretrained_model=str(initial_weights)[:-len(".pdparams")])
    with captured_log() as reference_log:
        run(ppcls, reference_config, "train")
    return {"fused": out / "fused", "reference": out / "reference", "log": proc.stdout,
            "reference_log": "\n".join(reference_log)}


def latest(run):
    path = run / "latest.pdparams"
    assert path.is_file(), sorted(p.name for p in run.iterdir())
    return path


@needs_engine
def test_two_training_iterations_through_the_command_line(trained, initial_weights):
    """Both runs train on the same crops from the same weights: the first iteration's loss (the
    fused forward in training mode, PaddleClas's pipeline and CELoss) is the reference's, and the
    two iterations move every trainable parameter. (Later losses are not compared: at 32 px and
    batch 4 the last stage's BN normalises over 4 values, and one step amplifies float32
    rounding so much that plain Paddle's own float32 step is 1.5% of the loss off float64's.)"""
    pattern = r"\[Train\]\[Epoch 1/1\]\[Iter: (\d)/2\].*?CELoss: ([\d.]+)"
    fused_losses = dict(re.findall(pattern, trained["log"]))
    reference_losses = dict(re.findall(pattern, trained["reference_log"]))
    assert sorted(fused_losses) == sorted(reference_losses) == ["0", "1"], trained["log"][-2000:]
    assert float(fused_losses["0"]) == pytest.approx(float(reference_losses["0"]), abs=2e-5)
    assert 0.5 < float(fused_losses["0"]) < 2 and 0 < float(fused_losses["1"]) < 10
    assert (trained["fused"] / "latest.pdopt").is_file()
    init = paddle.load(str(initial_weights))
    fused = paddle.load(str(latest(trained["fused"])))
    assert fused.keys() == init.keys()
    unchanged = [key for key in init if np.array_equal(fused[key].numpy(), init[key].numpy())]
    assert not unchanged
    assert all(np.isfinite(value.numpy()).all() for value in fused.values())


def eval_line(messages):
    """The metrics of PaddleClas's "[Eval][Epoch 0][Avg]" log line, as floats."""
    line = [m for m in messages if m.startswith("[Eval][Epoch 0][Avg]")][-1]
    return {key: float(value) for key, value in re.findall(r"(\w+): ([\d.]+)", line)}


def float64_logits(weights, images):
    """Logits of the reference network in float64 on `weights`: the accuracy yardstick."""
    paddle.seed(0)
    model = dpn_fast.create_model(MODEL, pretrained=str(weights), class_num=CLASSES)
    model.to(dtype="float64")
    model.eval()
    with paddle.no_grad():
        return model(paddle.to_tensor(images, dtype="float64")).numpy()


@needs_engine
def test_eval_metrics_equal_the_reference_arch(trained, dataset, ppcls):
    weights = str(latest(trained["fused"]))[:-len(".pdparams")]
    metrics, batches = {}, None
    for arch in (MODEL, FUSED):
        with captured_log() as log:
            evaluator, _ = run(ppcls, write_config(dataset, trained["fused"] / f"eval_{arch}",
                                                   arch), "eval",
                               **{"Global.pretrained_model": weights})
        metrics[arch] = eval_line(log)
        assert isinstance(evaluator.model, dpn_fast.models.DPN) == (arch == FUSED)
        assert arch == MODEL or evaluator.model.fused_forward is not None
        batches = [(b[0].numpy(), b[1].numpy().ravel()) for b in evaluator.eval_dataloader]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    logits = float64_logits(weights + ".pdparams", images)
    log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1,
                                keepdims=True)) - logits.max(1, keepdims=True)
    expected_loss = -log_probs[np.arange(len(labels)), labels].mean()
    ranks = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(1)
    reference, fused = metrics[MODEL], metrics[FUSED]
    assert fused["top1"] == reference["top1"] == pytest.approx((ranks < 1).mean(), abs=1e-5)
    assert fused["top2"] == reference["top2"] == pytest.approx((ranks < 2).mean(), abs=1e-5)
    # The log prints 5 decimals; the loss averages batches weighted by their sizes.
    assert fused["CELoss"] == pytest.approx(expected_loss, abs=2e-5)
    assert reference["CELoss"] == pytest.approx(expected_loss, abs=2e-5)


def build_arch(build_model, arch, weights):
    """`arch` as PaddleClas's build_model makes it, `weights` loaded the way PaddleClas loads a
    pretrained model (ppcls.utils.save_load.load_dygraph_pretrain: set_dict)."""
    with paddle.utils.unique_name.guard():
        model = build_model({"Arch": {"name": arch, "class_num": CLASSES}})
    model.set_dict(paddle.load(str(weights)))
    model.eval()
    return model


def random_images(count=4):
    rng = np.random.default_rng(11)
    return rng.standard_normal((count, 3, CROP, CROP)).astype("float32")


@needs_engine
def test_checkpoints_interchange_both_ways(trained, dataset, ppcls):
    """A checkpoint PaddleClas saved from the reference arch runs in the fused arch and the
    other way round, with the same logits; and the fused arch resumes training (weights and
    optimiser state, Global.checkpoints) from the reference arch's checkpoint."""
    from ppcls.arch import build_model
    images = random_images()
    for saved_by, loaded_into in ((MODEL, FUSED), (FUSED, MODEL)):
        run = trained["reference" if saved_by == MODEL else "fused"]
        weights = latest(run)
        with paddle.no_grad():
            loaded = build_arch(build_model, loaded_into, weights)(paddle.to_tensor(images))
            original = build_arch(build_model, saved_by, weights)(paddle.to_tensor(images))
        reference = loaded if loaded_into == MODEL else original
        fused = original if loaded_into == MODEL else loaded
        assert_matches_reference(fused.numpy(), float64_logits(weights, images),
                                 reference.numpy(), name=f"{saved_by} -> {loaded_into}")


@needs_engine
def test_resume_from_the_reference_arch_checkpoint(trained, dataset, ppcls):
    out = trained["fused"] / "resumed"
    run(ppcls, write_config(dataset, out, FUSED, epochs=2), "train",
        **{"Global.checkpoints": str(trained["reference"] / "latest")})
    before = paddle.load(str(trained["reference"] / "latest.pdparams"))
    after = paddle.load(str(latest(out)))
    assert paddle.load(str(out / "latest.pdstates"))["epoch"] == 2
    changed = [k for k in before if not np.array_equal(before[k].numpy(), after[k].numpy())]
    assert len(changed) == len(before)


@needs_engine
def test_export_and_predict_through_paddleclas(trained, dataset, ppcls, tmp_path, monkeypatch):
    """Engine export of the fused arch; PaddleClas's deploy predictor (Paddle Inference, oneDNN
    on) on the export gives the engine's own infer results (dygraph, same weights)."""
    # PaddleClas 2.6.0's predictor calls Config.enable_memory_optim(), which Paddle 3.3.1 refuses
    # for every exported program, PaddleClas's own DPN68 included ("Not find predictor_id 0 and
    # pass_name memory_optimize_pass").
    monkeypatch.setattr(paddle.inference.Config, "enable_memory_optim", lambda self, *a: None)
    from paddleclas.deploy.python.predict_cls import ClsPredictor
    from paddleclas.deploy.utils import config as deploy_config
    weights = str(latest(trained["fused"]))[:-len(".pdparams")]
    config = write_config(dataset, tmp_path, FUSED)
    options = {"Global.pretrained_model": weights,
               "Global.save_inference_dir": str(tmp_path / "inference")}
    run(ppcls, config, "export", **options)
    assert (tmp_path / "inference" / "inference.pdiparams").is_file()
    infer = {Path(r["file_name"]).name: r for r in run(ppcls, config, "infer", **options)[1]}
    assert len(infer) == TRAIN_IMAGES + VAL_IMAGES

    predictor_config = tmp_path / "inference_cls.yaml"
    predictor_config.write_text(yaml.safe_dump({
        "Global": {"inference_model_dir": str(tmp_path / "inference"), "batch_size": 4,
                   "use_gpu": False, "enable_mkldnn": True, "cpu_num_threads": 2,
                   "enable_benchmark": False, "use_fp16": False, "ir_optim": True,
                   "use_tensorrt": False, "gpu_mem": 1000, "enable_profile": False},
        "PreProcess": {"transform_ops": [
            {"ResizeImage": {"resize_short": IMAGE_SIZE}}, {"CropImage": {"size": CROP}},
            {"NormalizeImage": {"scale": 1.0 / 255.0, "mean": MEAN, "std": STD,
                                "order": ""}},
            {"ToCHWImage": None}]},
        "PostProcess": {"main_indicator": "Topk",
                        "Topk": {"topk": 2, "class_id_map_file": str(dataset / "labels.txt")}}}))
    predictor = ClsPredictor(deploy_config.get_config(str(predictor_config), show=False))
    files = sorted((dataset / "images").rglob("*.jpg"))
    import cv2
    # As deploy/python/predict_cls.py reads them: OpenCV, BGR to RGB.
    predicted = predictor.predict([cv2.imread(str(f))[:, :, ::-1] for f in files])
    for file, result in zip(files, predicted):
        expected = infer[file.name]
        assert result["class_ids"] == expected["class_ids"], file.name
        np.testing.assert_allclose(result["scores"], expected["scores"], atol=2e-5)


def test_paddleclas_build_model_makes_the_fused_arch_with_paddleclas_names():
    """Through the pip package's own build_model: the fused arch is dpn_fast's fused model with
    the parameter names of PaddleClas's DPN (which key the optimiser state in .pdopt), and the
    two exchange state dicts with the same logits."""
    from paddleclas.ppcls.arch import build_model
    assert "paddleclas.ppcls.arch" in dpn_paddleclas.register()
    with paddle.utils.unique_name.guard():
        paddle.seed(5)
        reference = build_model({"Arch": {"name": MODEL, "class_num": CLASSES}})
    fused = build_model({"Arch": {"name": FUSED, "class_num": CLASSES}})
    assert isinstance(fused, dpn_fast.models.DPN) and fused.fused_forward is not None
    assert [p.name for p in fused.parameters()] == [p.name for p in reference.parameters()]
    fused.set_state_dict(reference.state_dict())
    reference.eval(), fused.eval()
    images = random_images()
    with paddle.no_grad():
        ref32 = reference(paddle.to_tensor(images)).numpy()
        out = fused(paddle.to_tensor(images)).numpy()
    ref64 = reference.to(dtype="float64")(paddle.to_tensor(images, dtype="float64")).numpy()
    assert_matches_reference(out, ref64, ref32, name="PaddleClas DPN68 weights in DPN68_fused")


@pytest.mark.slow
@pytest.mark.parametrize("model_name", [m for m in dpn_fast.MODEL_NAMES if m != MODEL])
def test_every_fused_arch_has_paddleclas_parameter_names(model_name):
    from paddleclas.ppcls.arch import build_model
    dpn_paddleclas.register()
    with paddle.utils.unique_name.guard():
        reference = build_model({"Arch": {"name": model_name}})
    fused = build_model({"Arch": {"name": model_name + "_fused"}})
    assert [p.name for p in fused.parameters()] == [p.name for p in reference.parameters()]
    assert list(fused.state_dict()) == list(reference.state_dict())


@pytest.mark.parametrize("arch, error, message", [
    ({"name": "DPN93_fused"}, dpn_paddleclas.UnknownArchError, "DPN68_fused, DPN92_fused"),
    ({"name": "DPN92_fused", "class_num": "3"}, TypeError, "class_num must be an integer"),
    ({"name": "DPN92_fused", "class_num": 0}, ValueError, "class_num must be positive, got 0"),
    ({"name": "DPN92_fused", "layers": 92}, TypeError, "unexpected option(s) ['layers']"),
    ({"name": "DPN92_fused", "pretrained": True}, ValueError, "downloads no weights"),
    ({"name": "DPN92_fused", "pretrained": "/nonexistent/DPN92"}, FileNotFoundError,
     "/nonexistent/DPN92.pdparams"),
])
def test_misconfigured_arch_gets_a_typed_error(arch, error, message):
    from paddleclas.ppcls.arch import build_model
    dpn_paddleclas.register()
    with pytest.raises(error, match=re.escape(message)):
        build_model({"Arch": arch})


def test_other_missing_arch_names_keep_paddleclas_error():
    from paddleclas.ppcls import arch
    dpn_paddleclas.register()
    assert not hasattr(arch, "DPN93_fused")  # UnknownArchError is an AttributeError
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchNet'") as error:
        arch.build_model({"Arch": {"name": "NoSuchNet"}})
    assert type(error.value) is AttributeError


def test_pretrained_path_with_the_wrong_class_count_names_the_mismatch(tmp_path):
    from paddleclas.ppcls.arch import build_model
    dpn_paddleclas.register()
    five_classes = dpn_fast.create_model(MODEL, class_num=5)
    paddle.save(five_classes.state_dict(), str(tmp_path / "w.pdparams"))
    with pytest.raises(dpn_fast.CheckpointError, match="out.weight"):
        build_model({"Arch": {"name": FUSED, "class_num": CLASSES,
                              "pretrained": str(tmp_path / "w")}})


def test_command_line_refuses_a_missing_script(capsys):
    with pytest.raises(SystemExit) as exit_info:
        dpn_paddleclas.main(["tools/no_such_script.py", "-c", "x.yaml"])
    assert exit_info.value.code == 2
    assert "no such script: tools/no_such_script.py" in capsys.readouterr().err


def test_register_without_paddleclas_says_what_to_install(monkeypatch):
    monkeypatch.setattr(dpn_paddleclas, "ARCH_MODULES", ("no_such_ppcls.arch",))
    with pytest.raises(dpn_paddleclas.PaddleClasNotFoundError, match=r"dpn_fast\[paddleclas\]"):
        dpn_paddleclas.register()
