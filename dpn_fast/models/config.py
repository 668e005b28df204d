"""Architecture of the five DPNs (PaddleClas's hyper-parameters) and the layer shapes they imply.

The shape enumerators are what the tests and benchmarks sweep: every dual-path merge and every
grouped 3x3 convolution that occurs in a model at a given input size.
"""
from dataclasses import dataclass
from typing import List, Tuple


@dataclass(frozen=True)
class DPNConfig:
    name: str
    init_filters: int           # stem output channels
    stem_kernel: int            # 3 (DPN68) or 7
    k_r: int                    # bottleneck width factor
    groups: int                 # groups of the 3x3 convolution
    blocks: Tuple[int, ...]     # blocks per stage
    dense_inc: Tuple[int, ...]  # dense channels added per block, per stage
    residual: Tuple[int, ...]   # residual-path channels (bw) per stage
    width_divisor: int          # R = k_r * bw // width_divisor (PaddleClas's `r`)

    def bottleneck(self, stage: int) -> int:
        """Channels of the 1x1a / grouped 3x3 layers in `stage` (R in PaddleClas)."""
        return self.k_r * self.residual[stage] // self.width_divisor


CONFIGS = {
    "DPN68": DPNConfig("DPN68", 10, 3, 128, 32, (3, 4, 12, 3), (16, 32, 32, 64),
                       (64, 128, 256, 512), 64),
    "DPN92": DPNConfig("DPN92", 64, 7, 96, 32, (3, 4, 20, 3), (16, 32, 24, 128),
                       (256, 512, 1024, 2048), 256),
    "DPN98": DPNConfig("DPN98", 96, 7, 160, 40, (3, 6, 20, 3), (16, 32, 32, 128),
                       (256, 512, 1024, 2048), 256),
    "DPN107": DPNConfig("DPN107", 128, 7, 200, 50, (4, 8, 20, 3), (20, 64, 64, 128),
                        (256, 512, 1024, 2048), 256),
    "DPN131": DPNConfig("DPN131", 128, 7, 160, 40, (4, 8, 28, 3), (16, 32, 32, 128),
                        (256, 512, 1024, 2048), 256),
}


@dataclass(frozen=True)
class BlockShape:
    """One dual-path block: its input split (resid, dense), its 3x3 conv and its merge."""
    model: str
    stage: int          # 0..3
    index: int          # 0-based block index within the stage
    kind: str           # "proj" (stage 0 first block), "down" (first block, stride 2), "normal"
    in_resid: int       # channels of the residual part of the input (0 for the stem's output)
    in_dense: int       # channels of the dense part of the input (stem output for stage 0's first)
    in_hw: int          # input spatial size
    out_hw: int         # output spatial size
    bottleneck: int     # R: 1x1a output = grouped conv in/out channels
    groups: int
    stride: int         # of the grouped conv (and of the projection)
    resid: int          # residual channels after the block (bw)
    dense_before: int   # dense channels the merge receives (from the input or the projection)
    inc: int            # dense channels the block adds

    @property
    def stage_dense(self) -> int:
        """Dense channels at the end of this block's stage: the projection's 2 inc plus inc per
        block (the capacity of the stage's dense buffer in inference)."""
        return 2 * self.inc + CONFIGS[self.model].blocks[self.stage] * self.inc


def block_shapes(model: str, image_size: int = 224) -> List[BlockShape]:
    """Every block of `model` at `image_size`, in forward order."""
    cfg = CONFIGS[model]
    hw = image_size
    hw = (hw + 2 * (cfg.stem_kernel // 2) - cfg.stem_kernel) // 2 + 1  # stem conv, stride 2
    hw = (hw + 2 - 3) // 2 + 1                                       # 3x3/2 max pool, pad 1
    shapes = []
    in_resid, in_dense = 0, cfg.init_filters
    for stage in range(4):
        bw, inc = cfg.residual[stage], cfg.dense_inc[stage]
        for index in range(cfg.blocks[stage]):
            if index == 0:
                kind, stride = ("proj", 1) if stage == 0 else ("down", 2)
                dense_before = 2 * inc  # the projection's dense share
            else:
                kind, stride = "normal", 1
                dense_before = in_dense
            out_hw = (hw + 2 - 3) // stride + 1
            shapes.append(BlockShape(model, stage, index, kind, in_resid, in_dense, hw, out_hw,
                                     cfg.bottleneck(stage), cfg.groups, stride, bw, dense_before,
                                     inc))
            in_resid, in_dense, hw = bw, dense_before + inc, out_hw
    return shapes


def final_channels(model: str) -> Tuple[int, int]:
    """(resid, dense) channels entering the final concat + BN + ReLU."""
    last = block_shapes(model)[-1]
    return last.resid, last.dense_before + last.inc
