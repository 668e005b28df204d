"""Triton kernels of dpn_fast, one op per module. They import neither Paddle nor torch: the
launchers take either framework's tensors (or `_host.HostTensor` over raw host memory)."""
