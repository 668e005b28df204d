"""Fused operators of dpn_fast."""
from dpn_fast.ops.dpn_block import dpn_block, dpn_head, fold_batch_norms  # noqa: F401
from dpn_fast.ops.dual_path_merge import (  # noqa: F401
    concat_bn_relu, dual_path_merge, dual_path_merge_bn_relu, dual_path_merge_into,
    fold_batch_norm)
from dpn_fast.ops.grouped_conv_bn_relu import (  # noqa: F401
    GroupedConvBNReLUFolder, grouped_conv_bn_relu)
from dpn_fast.ops.stem_conv_bn_relu_pool import stem_conv_bn_relu_pool  # noqa: F401
