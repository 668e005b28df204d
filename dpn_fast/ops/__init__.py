"""Fused operators of dpn_fast."""
from dpn_fast.ops.grouped_conv_bn_relu import GroupedConvBNReLUFolder, grouped_conv_bn_relu  # noqa: F401
