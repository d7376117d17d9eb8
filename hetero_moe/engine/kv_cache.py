"""The KV cache: one paged pool shared by all requests, the batch metadata of a step that reads and
writes it, its default size, and the one memory-reserve policy (`serve`, `plan`, `rules check`).

Per decoder layer the pool holds one cache buffer of `pages x page_tokens` token rows (the attention
op's own layout: latent and rope key for MLA, keys and values for GQA). A request owns whole pages,
taken as its tokens arrive; its tokens live in its pages, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetero_moe.ops.attention import Rows, SeqSlice
from hetero_moe.settings import available_memory, total_memory

GB = 1e9


@dataclass(frozen=True)
class Reserve:
    """Memory a device keeps free beyond the weights and the KV cache: a fixed amount for the runtime
    (the CUDA context or the OS and Python, activations) plus a share of the device (allocator slack)."""

    fixed: float
    share: float = 0.05

    def usable(self, free: float, total: float) -> float:
        """Bytes of `free` that weights and KV cache may take, on a device of `total` bytes."""
        return max(free - self.fixed - self.share * total, 0.0)


RESERVES = {"cuda": Reserve(1 * GB), "cpu": Reserve(4 * GB)}


class KVPool:
    """The page allocator and the per-layer cache buffers it hands out rows of."""

    def __init__(self, buffers: list, pages: int, page_tokens: int, device: torch.device | None = None) -> None:
        self.buffers = buffers
        self.pages, self.page_tokens = pages, page_tokens
        self.device = device or torch.device("cpu")  # where gathered row indices go: the buffers' device
        self._free = list(range(pages - 1, -1, -1))  # a stack: low pages first, so one request's run

    @property
    def capacity(self) -> int:
        return self.pages * self.page_tokens

    @property
    def used_pages(self) -> int:
        return self.pages - len(self._free)

    def reserve(self, owned: list[int], tokens: int) -> bool:
        """Grow `owned` to hold `tokens` tokens; False (nothing taken) when too few pages are free."""
        need = -(-tokens // self.page_tokens) - len(owned)
        if need > len(self._free):
            return False
        owned.extend(self._free.pop() for _ in range(max(need, 0)))
        return True

    def release(self, owned: list[int]) -> None:
        self._free.extend(reversed(owned))
        owned.clear()

    def rows(self, owned: list[int], begin: int, end: int) -> Rows:
        """Buffer rows of a request's tokens `begin .. end - 1`: a range when they are contiguous."""
        p = self.page_tokens
        first, last = begin // p, (end - 1) // p
        pages = owned[first : last + 1]
        if pages == list(range(pages[0], pages[0] + len(pages))):
            base = pages[0] * p - first * p
            return slice(base + begin, base + end)
        rows = (torch.tensor(pages)[:, None] * p + torch.arange(p)).flatten()
        return rows[begin - first * p : end - first * p].to(self.device)


@dataclass(frozen=True)
class Batch:
    """One forward's tokens: `ids [N]` at `positions [N]`, each sequence's share and cache rows, and the
    rows whose logits are wanted (each sampling sequence's last token), in sequence order."""

    ids: torch.Tensor
    positions: torch.Tensor
    seqs: list[SeqSlice]
    sample_rows: list[int]

    @classmethod
    def of(cls, pool: KVPool, parts: list[tuple[list[int], list[int], int, int]]) -> Batch:
        """`parts`: per sequence (its tokens, the pages holding them, tokens already cached, tokens to run
        now); a sequence whose run reaches its last token samples."""
        ids: list[int] = []
        positions: list[int] = []
        seqs, rows = [], []
        for tokens, pages, start, n in parts:
            new_rows, all_rows = pool.rows(pages, start, start + n), pool.rows(pages, 0, start + n)
            seqs.append(SeqSlice(len(ids), n, start, new_rows, all_rows))
            ids += tokens[start : start + n]
            positions += range(start, start + n)
            if start + n == len(tokens):
                rows.append(len(ids) - 1)
        return cls(torch.tensor(ids), torch.tensor(positions), seqs, rows)

    @property
    def decode_only(self) -> bool:
        """One token per sequence: no prompt chunk in this step."""
        return len(self.ids) == len(self.seqs)


def cache_bytes_per_token(layers, dtype: torch.dtype) -> dict[torch.device, int]:
    """Bytes of KV cache one token takes on each device, over all decoder layers' attention ops."""
    per_token: dict[torch.device, int] = {}
    for layer in layers:
        attn = layer.self_attn
        per_token[attn.device] = per_token.get(attn.device, 0) + attn.cache_bytes(1, dtype)
    return per_token


def default_pool_tokens(per_token: dict[torch.device, int], wanted: int, mapped_cpu_bytes: int = 0) -> int:
    """`wanted` tokens of KV cache, or fewer if this box's free memory, less the reserve, holds fewer; whole
    pages of 16 tokens. On the CPU, weights memory-mapped from files (`mapped_cpu_bytes`) count as taken,
    although the system reports their page cache as available."""
    tokens = wanted
    for dev, nbytes in per_token.items():
        if dev.type == "cuda":
            free, total = torch.cuda.mem_get_info(dev)
            usable = RESERVES["cuda"].usable(free, total)
        else:
            available, total = available_memory(), total_memory()
            if available is None or total is None:
                continue  # no /proc/meminfo: only the wanted size bounds the pool
            usable = RESERVES["cpu"].usable(available - mapped_cpu_bytes, total)
        tokens = min(tokens, int(usable // nbytes))
    if tokens < 16:
        raise ValueError(
            "no memory is left for the KV cache after loading the model; give --kv-cache-tokens, "
            "a smaller model placement, or free memory"
        )
    return tokens // 16 * 16
