"""Pure compute kernels, installed as `hetero_moe.kernels`: `numba/` for the CPU, `triton/` for the GPU.

Kernels know tensors and shapes, never modules or rules.
"""
