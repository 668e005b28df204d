"""ImageNet classification with PaddleClas's evaluation preprocessing."""
import os

import numpy as np
import paddle
from PIL import Image, UnidentifiedImageError

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SAMPLE_IMAGE = os.path.join(DATA_DIR, "sample_cat.jpg")
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def class_names():
    with open(os.path.join(DATA_DIR, "imagenet1k_classes.txt"), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def preprocess(path, resize_short=256, crop=224):
    """Decode RGB, resize the short side to 256 (bilinear), center-crop 224, scale 1/255,
    normalise with ImageNet mean/std, HWC -> CHW. Returns float32 [3, crop, crop]."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image: {e}") from e
    w, h = image.size
    scale = resize_short / min(w, h)
    w, h = int(round(w * scale)), int(round(h * scale))
    image = image.resize((w, h), Image.BILINEAR)
    left, top = (w - crop) // 2, (h - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    array = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD
    return array.transpose(2, 0, 1).copy()


def predict(model, paths, topk=5):
    """Top-k (class id, name, probability) per image."""
    names = class_names()
    batch = paddle.to_tensor(np.stack([preprocess(p) for p in paths]))
    model.eval()
    with paddle.no_grad():
        probs = paddle.nn.functional.softmax(model(batch), axis=-1).numpy()
    results = []
    for row in probs:
        top = np.argsort(-row)[:topk]
        results.append([(int(i), names[i] if i < len(names) else str(i), float(row[i]))
                        for i in top])
    return results
