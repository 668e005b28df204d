"""A whole DPN block, and the network's head, as one op each (CPU inference, float32):

    act = relu(bn_a(concat(resid, dense)))              (and act_w = relu(bn_w(...)), projection)
    resid', dense'[:, :2 inc] = split(conv1x1(act_w, W_w, stride))        (projection blocks)
    g = relu(bn_c(grouped_conv3x3(relu(bn_b(conv1x1(act, W_a))), stride)))
    resid' += conv1x1(g, W_c)[:, :R];  dense'[:, d:d + inc] = conv1x1(g, W_c)[:, R:]

    logits = linear(mean_hw(relu(bn(concat(resid, dense)))))                (the head)

The ops keep their stage buffers channels-last (NHWC): a 1x1 convolution is then one oneDNN
matmul over all positions that reads the activations as they lie and the weights as given (the
oneDNN that Paddle ships, whose kernels follow the CPU's features on Intel and AMD alike; Paddle's
own CPU convolutions call an MKL that takes a slow generic path on AMD). A stage keeps its dense
path in one buffer: its first block creates it, the others append to it and accumulate into
resid in place, so no split, add or concat runs as a pass of its own. The CPU engine
(dpn_fast.engines.cpu) runs each stage's blocks as one op (`dpn_fast_dpn_stage`): each op call's
dispatch costs ~0.2 ms after a block has streamed its weights through the cache. A batch runs
through a stage a few images at a time (one where planes are large, more where they are small),
so their planes stay in cache from block to block.

The BNs come folded: one [2, channels] tensor of scales and shifts (`fold_batch_norms`), each
BN's channels in the op's order. The functions here take and return NCHW tensors, like the rest
of Paddle, and convert on the way in and out. No backward: training runs the per-op path
(dual_path_merge_bn_relu, grouped_conv_bn_relu).
"""
import paddle

from dpn_fast import _extension
from dpn_fast.ops._backend import resolve_backend
from dpn_fast.ops._batch_norm_layer import check_bn_layer
from dpn_fast.ops._checks import check_dtype, check_int, check_same_place, check_tensor


def fold_launch(layers):
    """fold_batch_norms unchecked (the CPU engine's path)."""
    params = [t for layer in layers for t in (layer.weight, layer.bias, layer._mean,
                                               layer._variance)]
    return _extension.run_op("dpn_fast_fold_batch_norms", params,
                             [float(layer._epsilon) for layer in layers])[0]


def stage_launch(resid, dense, weights, scale_shift, groups, stride, dense_channels, capacity,
                 packed_weights=False, bf16_stage=False):
    """A stage's blocks as one op, unchecked (the CPU engine's path; the op checks shapes itself).
    resid, dense: the stage's input, channels-last [N, H, W, C] (dense: its first
    `dense_channels` channels valid), or resid None and the stem's NCHW output. weights: the first
    block's w_proj, w_a, w_conv, w_c, then w_a, w_conv, w_c per further block, or with
    `packed_weights` what pack_stage_launch made of them; scale_shift: their input BNs folded, in
    the same order. `bf16_stage`: the block convolutions on bf16 weights and inputs with float32
    sums (csrc/dpn_block.h), on weights packed with bf16=True, and a bfloat16 dense buffer (out,
    and in unless it is the stem's output); resid stays float32.
    Returns the new (resid, dense buffer of `capacity` channels), channels-last."""
    return _extension.run_op("dpn_fast_dpn_stage", resid, dense, weights, scale_shift, groups,
                             stride, dense_channels, capacity, packed_weights, bf16_stage)


def pack_stage_launch(weights, groups, bf16=False):
    """A stage's plain weights (stage_launch's) laid out once for this CPU: one uint8 blob per
    1x1 GEMM in oneDNN's packed format, each naming its layout, w_proj and w_c split into their
    resid and dense rows, and one per grouped conv (`groups` groups) in the channel blocks of this
    CPU's kernel variant (the first block's w_proj_resid, w_proj_dense, w_a, w_conv, w_c_resid,
    w_c_dense, then w_a, w_conv, w_c_resid, w_c_dense per further block). stage_launch runs them
    with packed_weights=True on a CPU whose oneDNN picks the same layouts and whose kernels have
    the same vector width, and refuses them elsewhere. `bf16`: for bf16_stage=True, every weight
    rounded to bf16 (the grouped convs' laid out for vdpbf16ps where the CPU has AVX512_BF16);
    raises where the CPU has no bf16 instructions (AVX512_BF16 or AMX-BF16)."""
    def pack(weight, first_row, rows):
        return _extension.run_op("dpn_fast_pack_1x1_weight", weight, first_row, rows, bf16)[0]

    def pack_conv(weight):
        return _extension.run_op("dpn_fast_pack_grouped_conv_weight", weight, groups, bf16)[0]

    w_proj, first_w_c = weights[0], weights[3]
    # w_proj: resid + 2 inc rows; w_c: resid + inc rows
    inc = w_proj.shape[0] - first_w_c.shape[0]
    resid = first_w_c.shape[0] - inc
    packed = [pack(w_proj, 0, resid), pack(w_proj, resid, 2 * inc)]
    bottlenecks = zip(weights[1::3], weights[2::3], weights[3::3])  # (w_a, w_conv, w_c) per block
    for w_a, w_conv, w_c in bottlenecks:
        packed += [pack(w_a, 0, w_a.shape[0]), pack_conv(w_conv), pack(w_c, 0, resid),
                   pack(w_c, resid, w_c.shape[0] - resid)]
    return packed


def head_launch(resid, dense, scale_shift, fc_weight, fc_bias, dense_channels, packed_fc=False):
    """The head's op on channels-last stage buffers (dense float32, or a bf16 stage's bfloat16),
    unchecked: logits [N, classes]. fc_weight: the classifier's [channels, classes] weight, or
    with `packed_fc` what pack_head_launch made of it."""
    return _extension.run_op("dpn_fast_dpn_head", resid, dense, scale_shift, fc_weight, fc_bias,
                             dense_channels, packed_fc)[0]


def pack_head_launch(fc_weight):
    """The classifier's weight [channels, classes] laid out once for this CPU as a 1x1 GEMM's
    float32 weight (pack_stage_launch), for head_launch with packed_fc=True."""
    classes = fc_weight.shape[1]
    rows = paddle.transpose(fc_weight, [1, 0]).contiguous().reshape([classes, -1, 1, 1])
    return _extension.run_op("dpn_fast_pack_1x1_weight", rows, 0, classes, False)[0]


def fold_batch_norms(layers):
    """Eval BN `layers` (BatchNorm2D, or BatchNorm with act None or "relu") folded into one
    [2, channels] float32 CPU tensor: the layers' scales w / sqrt(var + eps), then their shifts
    b - mean * scale, as dpn_block and dpn_head take them."""
    op = "fold_batch_norms"
    if not isinstance(layers, (list, tuple)) or not layers:
        raise TypeError(f"{op}: 'layers' must be a non-empty list of BN layers, got {layers!r}")
    for i, layer in enumerate(layers):
        weight = check_bn_layer(op, layer, name=f"layers[{i}]")[0]
        if paddle.in_dynamic_mode() and not weight.place.is_cpu_place():
            raise ValueError(f"{op}: runs on CPU, 'layers[{i}]' is on {weight.place}")
    return fold_launch(layers)


def to_channels_last(x):
    """[N, C, H, W] -> [N, H, W, C], contiguous (the ops read raw memory)."""
    return paddle.transpose(x, [0, 2, 3, 1]).contiguous()


def to_channels_first(x):
    """[N, H, W, C] -> [N, C, H, W], contiguous."""
    return paddle.transpose(x, [0, 3, 1, 2]).contiguous()


def _check_cpu_float32(op, named_tensors):
    """Every tensor a paddle.Tensor, float32, on the CPU, not wanting a gradient."""
    for name, t in named_tensors:
        check_tensor(op, name, t)
        check_dtype(op, name, t, paddle.float32, " (the op runs float32 only)")
    first = named_tensors[0][1]
    resolve_backend("cpu", first, op)  # raises for GPU tensors
    check_same_place(op, first, named_tensors[1:])
    if paddle.is_grad_enabled() and not all(t.stop_gradient for _, t in named_tensors):
        raise RuntimeError(f"{op}: has no backward; call it under paddle.no_grad() (training runs "
                           "the per-op path, dpn_fast.DPN92(fused=True))")


def _check_1x1(op, name, weight, in_channels, what):
    """A 1x1 convolution's weight [C_out, in_channels, 1, 1], C_out >= 1."""
    if weight.shape[1:] != [in_channels, 1, 1] or weight.shape[0] < 1:
        raise ValueError(f"{op}: '{name}' has shape {list(weight.shape)}; it must be [C_out, "
                         f"{in_channels}, 1, 1] for the {in_channels} {what}")


def _check_activations(op, resid, dense):
    check_tensor(op, "dense", dense, rank=4)
    if resid is not None:
        check_tensor(op, "resid", resid, rank=4)
        if resid.shape[0] != dense.shape[0] or resid.shape[2:] != dense.shape[2:]:
            raise ValueError(f"{op}: 'resid' {list(resid.shape)} and 'dense' "
                             f"{list(dense.shape)} must share batch and image size")
    if dense.shape[2] == 0 or dense.shape[3] == 0:
        raise ValueError(f"{op}: 'dense' has an empty image, shape {list(dense.shape)}")


def dpn_block(resid, dense, weights, scale_shift, groups, stride=1):
    """One DPN block on NCHW (resid, dense): returns (resid_out, dense_out), new tensors, as the
    plain-Paddle block computes them (dense_out = concat(dense or the projection's dense part,
    the block's inc new channels)).

    weights: (w_proj, w_a, w_conv, w_c) for a projection block (a stage's first), else (w_a,
    w_conv, w_c); 1x1 weights [C_out, C_in, 1, 1], the grouped conv's [R, R / groups, 3, 3].
    resid: None for the first block of the network, whose input is the stem's output `dense`.
    scale_shift: the folded BNs (fold_batch_norms) [2, channels] in the order [projection's,]
    1x1a's, the grouped conv's, 1x1c's input BN. stride: the projection block's (1 or 2).
    """
    op = "dpn_block"
    _check_activations(op, resid, dense)
    if not isinstance(weights, (list, tuple)) or len(weights) not in (3, 4):
        raise TypeError(f"{op}: 'weights' must be (w_proj, w_a, w_conv, w_c) or (w_a, w_conv, "
                        f"w_c), got {weights!r:.200}")
    projection = len(weights) == 4
    names = ("w_proj", "w_a", "w_conv", "w_c")[4 - len(weights):]
    for name, w in zip(names, weights):
        check_tensor(op, name, w, rank=4)
    check_tensor(op, "scale_shift", scale_shift, rank=2)
    check_int(op, "groups", groups, minimum=1)
    check_int(op, "stride", stride, choices=(1, 2) if projection else (1,))
    if resid is None and not projection:
        raise ValueError(f"{op}: resid=None (the stem's output) goes to a projection block, which "
                         "takes 4 weights")
    in_channels = dense.shape[1] + (0 if resid is None else resid.shape[1])
    w_a, w_conv, w_c = weights[-3:]
    _check_1x1(op, "w_a", w_a, in_channels, "resid + dense channels")
    bottleneck = w_a.shape[0]
    if bottleneck % groups:
        raise ValueError(f"{op}: 'groups' ({groups}) must divide the bottleneck's {bottleneck} "
                         "channels ('w_a' rows)")
    if list(w_conv.shape) != [bottleneck, bottleneck // groups, 3, 3]:
        raise ValueError(f"{op}: 'w_conv' must have shape [{bottleneck}, {bottleneck // groups}, "
                         f"3, 3] (bottleneck, its channels per group, 3x3), got "
                         f"{list(w_conv.shape)}")
    _check_1x1(op, "w_c", w_c, bottleneck, "bottleneck channels ('w_a' rows)")
    if projection:
        _check_1x1(op, "w_proj", weights[0], in_channels, "resid + dense channels")
        inc = weights[0].shape[0] - w_c.shape[0]  # w_proj: resid + 2 inc rows; w_c: resid + inc
        if inc < 1 or w_c.shape[0] - inc < 1:
            raise ValueError(f"{op}: 'w_proj' ({weights[0].shape[0]} rows = resid + 2 inc) and "
                             f"'w_c' ({w_c.shape[0]} rows = resid + inc) must imply resid >= 1 "
                             f"and inc >= 1, got resid {w_c.shape[0] - inc} and inc {inc}")
    else:
        inc = w_c.shape[0] - resid.shape[1]
        if inc < 1:
            raise ValueError(f"{op}: 'w_c' has {w_c.shape[0]} rows; it must have the "
                             f"{resid.shape[1]} resid channels plus at least one new dense "
                             "channel")
    bn_channels = (2 if projection else 1) * in_channels + 2 * bottleneck
    if list(scale_shift.shape) != [2, bn_channels]:
        raise ValueError(f"{op}: 'scale_shift' must have shape [2, {bn_channels}] (the block's "
                         f"BNs folded), got {list(scale_shift.shape)}")
    tensors = [("dense", dense), ("scale_shift", scale_shift)] + list(zip(names, weights))
    _check_cpu_float32(op, tensors + ([] if resid is None else [("resid", resid)]))
    if dense.shape[0] == 0:  # an empty batch: the op's channels-last views of it lose its shape
        resid_channels = w_c.shape[0] - inc
        out_hw = [(size - 1) // stride + 1 for size in dense.shape[2:]]
        dense_out = (2 * inc if projection else dense.shape[1]) + inc
        return (paddle.empty([0, resid_channels] + out_hw, "float32"),
                paddle.empty([0, dense_out] + out_hw, "float32"))

    resid_in = None if resid is None else to_channels_last(resid)
    dense_in = dense if resid is None else to_channels_last(dense)  # the stem's output is NCHW
    if projection:
        inc = weights[0].shape[0] - w_c.shape[0]
        resid_out, dense_out = stage_launch(resid_in, dense_in, list(weights), scale_shift, groups,
                                            stride, dense.shape[1], 3 * inc)
    else:
        inc = w_c.shape[0] - resid.shape[1]
        # The op appends to a buffer in place: give it room for the inc new channels.
        buffer = paddle.concat([dense_in, paddle.empty(dense_in.shape[:3] + [inc], "float32")],
                               axis=3)
        resid_out, dense_out = _extension.run_op("dpn_fast_dpn_block", resid_in, buffer,
                                                 *weights, scale_shift, groups, dense.shape[1])
    return to_channels_first(resid_out), to_channels_first(dense_out)


def dpn_head(resid, dense, scale_shift, fc_weight, fc_bias):
    """logits = concat(resid, dense) -> BN + ReLU (folded: scale_shift [2, C]) -> global average
    pool -> fc (fc_weight [C, classes], paddle.nn.Linear's layout; fc_bias [classes]). NCHW
    inputs."""
    op = "dpn_head"
    if resid is None:
        raise TypeError(f"{op}: 'resid' must be a paddle.Tensor, got None")
    _check_activations(op, resid, dense)
    check_tensor(op, "scale_shift", scale_shift, rank=2)
    check_tensor(op, "fc_weight", fc_weight, rank=2)
    check_tensor(op, "fc_bias", fc_bias, rank=1)
    channels = resid.shape[1] + dense.shape[1]
    if list(scale_shift.shape) != [2, channels]:
        raise ValueError(f"{op}: 'scale_shift' must have shape [2, {channels}] (resid + dense "
                         f"channels), got {list(scale_shift.shape)}")
    if fc_weight.shape[0] != channels or list(fc_bias.shape) != [fc_weight.shape[1]]:
        raise ValueError(f"{op}: 'fc_weight' must be [{channels}, classes] and 'fc_bias' "
                         f"[classes], got {list(fc_weight.shape)} and {list(fc_bias.shape)}")
    _check_cpu_float32(op, [("dense", dense), ("resid", resid), ("scale_shift", scale_shift),
                            ("fc_weight", fc_weight), ("fc_bias", fc_bias)])
    return head_launch(to_channels_last(resid), to_channels_last(dense), scale_shift, fc_weight,
                       fc_bias, dense.shape[1])
