"""ImageNet classification of files, folders and list files: input collection, the two eval
preprocessings (PIL, and PaddleClas's OpenCV one), batches decoded ahead of the model, top-k."""
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import paddle
from PIL import Image, UnidentifiedImageError

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SAMPLE_IMAGE = os.path.join(DATA_DIR, "sample_cat.jpg")
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
RESIZE_SHORT, CROP = 256, 224
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm",
                    ".pgm", ".pbm")
# A file argument with one of these names lists images, one a line: `path` or PaddleClas's
# `path label`, paths relative to the list file's folder.
LIST_EXTENSIONS = (".txt", ".list", ".lst")


def class_names():
    with open(os.path.join(DATA_DIR, "imagenet1k_classes.txt"), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _pil_rgb(path):
    """The image at `path` as 8-bit RGB: grayscale, palette, RGBA (alpha dropped, as OpenCV
    does), CMYK and YCbCr converted; 16/32-bit integer images scaled to 8 bits."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                wide = np.asarray(image, dtype=np.float64)  # I;16 reads as uint16, I as int32
                top = 65535.0 if image.mode.startswith("I;16") or wide.max() <= 65535 else 2**31
                gray = np.clip(wide * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
                return Image.fromarray(gray).convert("RGB")
            if image.mode == "F":
                raise ValueError(f"{path}: floating-point images (mode F) have no defined "
                                 "8-bit range; convert it to 8-bit first")
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path} is not a readable image: {e}") from e


def _check_sizes(resize_short, crop):
    if not 0 < crop <= resize_short:
        raise ValueError(f"preprocess: need 0 < crop <= resize_short, got crop={crop}, "
                         f"resize_short={resize_short}")


def preprocess(path, resize_short=RESIZE_SHORT, crop=CROP):
    """PIL: decode to RGB (odd modes converted, see _pil_rgb), resize the short side to 256
    (bilinear), center-crop 224, scale 1/255, normalise with ImageNet mean/std, HWC -> CHW.
    Returns float32 [3, crop, crop]."""
    _check_sizes(resize_short, crop)
    image = _pil_rgb(path)
    w, h = image.size
    scale = resize_short / min(w, h)
    w, h = int(round(w * scale)), int(round(h * scale))
    image = image.resize((w, h), Image.BILINEAR)
    left, top = (w - crop) // 2, (h - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    array = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD
    return array.transpose(2, 0, 1).copy()


def preprocess_paddleclas(path, resize_short=RESIZE_SHORT, crop=CROP):
    """PaddleClas's ImageNet eval transform, op for op: DecodeImage(to_rgb=True) (OpenCV
    imdecode, IMREAD_COLOR, BGR -> RGB), ResizeImage(resize_short=256) (cv2.resize, bilinear,
    size int(round(side * 256 / short side))), CropImage(224) (center),
    NormalizeImage(scale=1/255, ImageNet mean/std, order='') and the dataset's HWC -> CHW.
    Returns float32 [3, crop, crop]. Needs OpenCV."""
    _check_sizes(resize_short, crop)
    cv2 = opencv()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    image = cv2.imdecode(np.frombuffer(data, dtype="uint8"), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise ValueError(f"{path} is not a readable image: OpenCV cannot decode it")
    image = image[:, :, ::-1]
    h, w = image.shape[:2]
    percent = float(resize_short) / min(w, h)
    image = cv2.resize(image, (int(round(w * percent)), int(round(h * percent))),
                       interpolation=cv2.INTER_LINEAR)
    h, w = image.shape[:2]
    top, left = (h - crop) // 2, (w - crop) // 2
    image = image[top:top + crop, left:left + crop, :]
    image = (image.astype("float32") * np.float32(1.0 / 255.0) - MEAN) / STD
    return np.ascontiguousarray(image.transpose(2, 0, 1))


PREPROCESS = {"pil": preprocess, "paddleclas": preprocess_paddleclas}


def opencv():
    """The cv2 module; ValueError naming the install if OpenCV is missing."""
    try:
        import cv2
    except ModuleNotFoundError as e:
        raise ValueError("the paddleclas preprocessing decodes and resizes with OpenCV, as "
                         "PaddleClas does: pip install opencv-python") from e
    return cv2


def _is_image_name(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _folder_images(folder):
    """Image files under `folder`, recursively, in sorted order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if _is_image_name(f)]
    return found


def read_list_file(path, root=None):
    """[(image path, label or None)] from a list file: one image a line, `path` or PaddleClas's
    `path label` (space-separated; blank lines ignored). Relative paths are taken from `root`
    (PaddleClas's image_root), by default the list file's folder."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"list file not found: {path}")
    root = root if root is not None else os.path.dirname(os.path.abspath(path))
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) > 2 or (len(fields) == 2 and not fields[1].lstrip("-").isdigit()):
                raise ValueError(f"{path}:{number}: expected `image_path` or `image_path "
                                 f"class_id`, got {line.strip()!r}")
            label = int(fields[1]) if len(fields) == 2 else None
            items.append((os.path.join(root, fields[0]), label))
    return items


def collect_images(inputs):
    """[(image path, label or None)] for `inputs`: image files, folders (searched recursively
    for IMAGE_EXTENSIONS) and list files (LIST_EXTENSIONS). A missing input or an empty folder
    is an error; a listed image that is missing is reported when it is read."""
    items = []
    for path in inputs:
        if os.path.isdir(path):
            images = _folder_images(path)
            if not images:
                raise ValueError(f"{path}: no images in this folder (looked for "
                                 f"{', '.join(IMAGE_EXTENSIONS)})")
            items += [(p, None) for p in images]
        elif os.path.isfile(path) and path.lower().endswith(LIST_EXTENSIONS):
            items += read_list_file(path)
        elif os.path.isfile(path):
            items.append((path, None))
        else:
            raise FileNotFoundError(f"image not found: {path} (predict takes image files, "
                                    "folders and list files)")
    return items


def class_folder_images(root):
    """[(image path, class id)] of an ImageNet-style folder: one subfolder per class, class ids
    by sorted subfolder name (n01440764 ... n15075141 gives ImageNet-1k's ids)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"folder not found: {root}")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class subfolders (eval DIR expects DIR/<class>/<image>; "
                         "or pass --labels val_list.txt)")
    items = [(p, label) for label, name in enumerate(classes)
             for p in _folder_images(os.path.join(root, name))]
    if not items:
        raise ValueError(f"{root}: its class subfolders hold no images")
    return items


def _decode_batch(preprocess_fn, paths):
    """(stacked inputs of the images that decoded, their positions in `paths`, [(path, error)]
    for the others)."""
    arrays, good, failed = [], [], []
    for position, path in enumerate(paths):
        try:
            arrays.append(preprocess_fn(path))
            good.append(position)
        except (FileNotFoundError, ValueError) as e:
            failed.append((path, str(e)))
        except Exception as e:  # noqa: BLE001  (a decoder's own error: report it, go on)
            failed.append((path, f"{path} is not a readable image: {type(e).__name__}: {e}"))
    batch = np.stack(arrays) if arrays else None
    return batch, good, failed


@dataclass
class RunStats:
    """What a run did: images predicted, failures [(path, message)], seconds end to end and in
    the model's forward calls."""
    images: int = 0
    failed: list = field(default_factory=list)
    seconds: float = 0.0
    model_seconds: float = 0.0

    @property
    def images_per_second(self):
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def model_images_per_second(self):
        return self.images / self.model_seconds if self.model_seconds else 0.0


def run_batches(model, paths, batch_size=8, preprocess_fn=preprocess, workers=1, stats=None):
    """Yields (positions in `paths`, float32 logits [n, classes]) per batch, in order. `workers`
    threads decode up to `workers + 1` batches ahead while the model runs (PIL, OpenCV and numpy
    release the GIL in their inner loops); 0 decodes in this thread, between forwards. Images that
    fail to decode are left out and recorded in `stats.failed`; `stats` also gets the counts and
    times."""
    stats = stats if stats is not None else RunStats()
    start_time = time.perf_counter()
    executor = (ThreadPoolExecutor(workers, thread_name_prefix="dpn_fast_decode")
                if workers else None)
    pending = deque()  # (offset of the batch in `paths`, Future of its decoded inputs)
    try:
        for offset in range(0, len(paths), batch_size):
            chunk = paths[offset:offset + batch_size]
            if executor:
                decoded = executor.submit(_decode_batch, preprocess_fn, chunk)
            else:
                decoded = Future()
                decoded.set_result(_decode_batch(preprocess_fn, chunk))
            pending.append((offset, decoded))
            if len(pending) > workers:
                yield from _forward(model, *pending.popleft(), stats)
        while pending:
            yield from _forward(model, *pending.popleft(), stats)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        stats.seconds += time.perf_counter() - start_time


def _forward(model, offset, decoded, stats):
    batch, good, failed = decoded.result()
    stats.failed += failed
    if batch is None:
        return
    start = time.perf_counter()
    with paddle.no_grad():
        logits = model(paddle.to_tensor(batch)).numpy()
    stats.model_seconds += time.perf_counter() - start
    stats.images += len(good)
    yield [offset + p for p in good], logits


def softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_k(probs, k, names):
    """[(class id, name, probability)] of the k largest `probs`, largest first."""
    top = np.argsort(-probs, kind="stable")[:k]
    return [(int(i), names[i] if i < len(names) else str(i), float(probs[i])) for i in top]


def predict(model, paths, topk=5):
    """Top-k (class id, name, probability) per image, in one batch; an unreadable image raises
    (ValueError, FileNotFoundError). For folders and long lists, see run_batches."""
    names = class_names()
    batch = np.stack([preprocess(p) for p in paths])
    model.eval()
    with paddle.no_grad():
        probs = softmax(model(paddle.to_tensor(batch)).numpy())
    return [top_k(row, topk, names) for row in probs]
