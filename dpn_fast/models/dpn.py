"""The DPN family with PaddleClas's topology and state-dict layout: the network and nothing else.

Sub-layer names (conv1_x_1_func, dpn{i}.c1x1_a_func._batch_norm, conv5_x_x_bn, out, ...) are
PaddleClas's, so its .pdparams load unchanged. No ParamAttr names are fixed, so any number of
models can live in one process.

`forward` is the plain-Paddle network, unless an engine has swapped its fused forward in
(`fused_forward`, set by dpn_fast.engines.fused.fuse); the input checks run either way.
"""
import paddle
import paddle.nn as nn

from dpn_fast.models.config import CONFIGS, block_shapes

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def _batch_norm(channels):
    return nn.BatchNorm(channels, act="relu", momentum=BN_MOMENTUM, epsilon=BN_EPSILON)


class ConvBNLayer(nn.Layer):
    """Stem: conv -> BN -> ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding):
        super().__init__()
        self._conv = nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride,
                               padding=padding, bias_attr=False)
        self._batch_norm = _batch_norm(out_channels)

    def forward(self, x):
        return self._batch_norm(self._conv(x))


class BNACConvLayer(nn.Layer):
    """Pre-activation layer: BN -> ReLU -> conv."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1):
        super().__init__()
        self._batch_norm = _batch_norm(in_channels)
        self._conv = nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride,
                               padding=padding, groups=groups, bias_attr=False)

    def forward(self, x):
        return self._conv(self._batch_norm(x))


class DualPathBlock(nn.Layer):
    """One DPN block. Input and output are [resid, dense] pairs; the stage-0 projection block
    takes the stem's output as a single tensor."""

    def __init__(self, shape):
        super().__init__()
        self.shape = shape
        in_channels = shape.in_resid + shape.in_dense
        r, bw, inc = shape.bottleneck, shape.resid, shape.inc
        self.has_proj = shape.kind != "normal"
        if self.has_proj:
            self.c1x1_w_func = BNACConvLayer(in_channels, bw + 2 * inc, 1, stride=shape.stride)
        self.c1x1_a_func = BNACConvLayer(in_channels, r, 1)
        self.c3x3_b_func = BNACConvLayer(r, r, 3, stride=shape.stride, padding=1,
                                         groups=shape.groups)
        self.c1x1_c_func = BNACConvLayer(r, bw + inc, 1)

    def forward(self, x):
        data_in = paddle.concat(x, axis=1) if isinstance(x, (list, tuple)) else x
        if self.has_proj:
            resid, dense = paddle.split(self.c1x1_w_func(data_in),
                                        [self.shape.resid, 2 * self.shape.inc], axis=1)
        else:
            resid, dense = x
        y = self.c1x1_c_func(self.c3x3_b_func(self.c1x1_a_func(data_in)))
        y_resid, y_dense = paddle.split(y, [self.shape.resid, self.shape.inc], axis=1)
        return [resid + y_resid, paddle.concat([dense, y_dense], axis=1)]


def check_images(name, x):
    """`x` is a batch of RGB images, [N, 3, H, W] with H, W > 0 (sizes unknown under to_static,
    -1, pass); errors are prefixed with `name`."""
    if not isinstance(x, (paddle.Tensor, paddle.pir.Value)):
        raise TypeError(f"{name}: input must be a paddle.Tensor, got {type(x).__name__}")
    if len(x.shape) != 4:
        raise ValueError(f"{name}: input must be 4-D [N, 3, H, W], got shape {list(x.shape)}")
    if x.shape[1] != 3:
        raise ValueError(f"{name}: input must have 3 channels (RGB), [N, 3, H, W], got shape "
                         f"{list(x.shape)}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name}: input image is empty, shape {list(x.shape)}")


class DPN(nn.Layer):
    def __init__(self, model_name, class_num=1000):
        super().__init__()
        if model_name not in CONFIGS:
            raise ValueError(f"unknown model {model_name!r}; choose one of {sorted(CONFIGS)}")
        cfg = CONFIGS[model_name]
        self.model_name = model_name
        self.class_num = class_num
        self.conv1_x_1_func = ConvBNLayer(3, cfg.init_filters, cfg.stem_kernel, stride=2,
                                          padding=cfg.stem_kernel // 2)
        self.pool2d_max = nn.MaxPool2D(kernel_size=3, stride=2, padding=1)
        self.blocks = []
        for i, shape in enumerate(block_shapes(model_name), start=1):
            self.blocks.append(self.add_sublayer(f"dpn{i}", DualPathBlock(shape)))
        last = self.blocks[-1].shape
        out_channels = last.resid + last.dense_before + last.inc
        self.conv5_x_x_bn = _batch_norm(out_channels)
        self.pool2d_avg = nn.AdaptiveAvgPool2D(1)
        uniform = nn.initializer.Uniform(-0.01, 0.01)
        self.out = nn.Linear(out_channels, class_num,
                             weight_attr=paddle.ParamAttr(initializer=uniform))
        # A callable (model, x) -> logits that replaces the plain network in forward, set by an
        # engine that swaps fused ops in; it reads this model's layers at every call.
        self.fused_forward = None

    def stages(self):
        """The blocks grouped by stage, each list starting with the stage's projection block."""
        stages = []
        for block in self.blocks:
            if block.has_proj:
                stages.append([])
            stages[-1].append(block)
        return stages

    @paddle.jit.not_to_static  # plain Python: unknown sizes read as -1
    def _check_input(self, x):
        name = self.model_name
        check_images(name, x)
        dtype = self.out.weight.dtype
        dtype_name = str(dtype).split(".")[-1].lower()  # paddle.float32 / DataType.FLOAT32
        if (paddle.in_dynamic_mode() and x.place.is_cpu_place()
                and dtype not in (paddle.float32, paddle.float64)):
            raise TypeError(f"{name}: Paddle's CPU kernels run float32 and float64 only, but "
                            f"the model's parameters are {dtype_name}; convert it with "
                            "model.to(dtype='float32')")
        if x.dtype != dtype:
            raise TypeError(f"{name}: input dtype {str(x.dtype).split('.')[-1].lower()} does "
                            f"not match the model's {dtype_name} parameters; cast the input "
                            f"with x.astype('{dtype_name}')")

    def forward(self, x):
        self._check_input(x)
        if self.fused_forward is not None:
            return self.fused_forward(self, x)
        h = self.pool2d_max(self.conv1_x_1_func(x))
        for block in self.blocks:
            h = block(h)
        h = self.conv5_x_x_bn(paddle.concat(h, axis=1))
        return self.out(paddle.flatten(self.pool2d_avg(h), start_axis=1))
