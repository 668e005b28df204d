"""Shared benchmark settings: devices and batch sizes, chosen by what this machine has."""
import paddle


def gpu_available():
    return paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


DEVICES = ["cpu"] + (["gpu"] if gpu_available() else [])
BATCHES = {"cpu": (1, 8), "gpu": (1, 8, 64)}


def synchronize(device):
    if device == "gpu":
        paddle.device.synchronize()
