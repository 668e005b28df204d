"""Parameter and multiply-accumulate counts of a model."""
import numpy as np
import paddle
import paddle.nn as nn


def count_parameters(model, trainable_only=True):
    return sum(int(np.prod(p.shape)) for p in model.parameters()
               if not (trainable_only and p.stop_gradient))


def count_macs(model, image_size=224):
    """Multiply-accumulates of the convolutions and the classifier for one image."""
    macs = []

    def conv_hook(layer, inputs, output):
        kh, kw = layer.weight.shape[2:]
        macs.append(int(np.prod(output.shape[1:])) * (layer.weight.shape[1] * kh * kw))

    def linear_hook(layer, inputs, output):
        macs.append(int(np.prod(layer.weight.shape)))

    hooks = [layer.register_forward_post_hook(conv_hook if isinstance(layer, nn.Conv2D)
                                              else linear_hook)
             for layer in model.sublayers() if isinstance(layer, (nn.Conv2D, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            model(paddle.zeros([1, 3, image_size, image_size]))
    finally:
        for h in hooks:
            h.remove()
        if was_training:
            model.train()
    return sum(macs)
