"""Triton kernels of dpn_fast (installed as `dpn_fast.kernels`). One op per module."""
