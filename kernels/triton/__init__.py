"""GPU kernels (Triton) for the linears that stay on the GPU: DeepSeek's FP8 block scheme and INT4
group-quantized weights. Each also runs on the CPU under `TRITON_INTERPRET=1` for tests."""
