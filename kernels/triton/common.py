"""What the Triton kernels share."""

from __future__ import annotations

import torch

# `tl.dot`'s input_precision by input dtype: float32 inputs get exact float32 products (a GPU's default, TF32,
# puts them ~1e-3 off); bf16 and fp16 products TF32 holds exactly, so they keep the tensor cores' fast path
DOT_PRECISION = {torch.float32: "ieee", torch.bfloat16: "tf32", torch.float16: "tf32"}
