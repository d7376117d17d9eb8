"""An embedding whose rows stay in a GGUF file's blocks, in its memory map: each lookup dequantizes the rows
it reads (`kernels/ggml_blocks.py`). A CPU embedding of a quantized GGUF file takes the file's bytes instead
of a float32 copy (102400 x 2048 values: 0.84 GB as float32, 0.12 GB as Q4_0)."""

from __future__ import annotations

import numpy as np
import torch

from hetero_moe.kernels.ggml_blocks import REPACK
from hetero_moe.ops.base import Op


class BlockEmbedding(Op):
    """`ids [N] -> [N, H]` in `dtype`, from `rows [V, row bytes]` of llama.cpp's `block_type` blocks."""

    def __init__(self, vocab: int, hidden: int, block_type: str, dtype: torch.dtype) -> None:
        super().__init__(torch.device("cpu"))
        self.vocab, self.hidden, self.dtype = vocab, hidden, dtype
        self.block_type = block_type
        self.repack = REPACK[block_type]
        self.rows: np.ndarray | None = None  # set by `load_blocks`

    def extra_repr(self) -> str:
        return f"vocab={self.vocab}, hidden={self.hidden}, blocks={self.block_type}"

    def checkpoint_keys(self) -> dict[str, torch.Size]:
        return {"weight": torch.Size((self.vocab, self.hidden))}

    def nbytes(self) -> int:
        return self.vocab * self.hidden // self.repack.elems * self.repack.nbytes

    def mapped_bytes(self) -> int:
        return self.nbytes()

    def takes_blocks(self, rel: str) -> bool:
        return rel == "weight"

    def load_blocks(self, rel: str, raw: np.ndarray) -> None:
        """The file's rows `[V, row bytes]`, memory-mapped."""
        if raw.shape != (self.vocab, self.nbytes() // self.vocab):
            raise ValueError(
                f"{self.block_type} rows {raw.shape} do not fit an embedding [{self.vocab}, {self.hidden}]"
            )
        self.rows = raw

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).numpy()
        if flat.size and (flat.min() < 0 or flat.max() >= self.vocab):
            raise IndexError(f"token id out of range: the vocabulary has {self.vocab} tokens")
        values = self.repack.values(self.rows[flat], self.hidden)
        return torch.from_numpy(values).to(self.dtype).view(*ids.shape, self.hidden)
