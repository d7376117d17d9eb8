"""CPU kernels (Numba) for the routed experts: INT4 group-quantized, FP8 block-quantized and BF16."""
