"""The KV cache: one paged pool shared by all requests, the batch metadata of a step that reads and
writes it, its default size, and the one memory-reserve policy (`serve`, `plan`, `rules check`).

Per decoder layer the pool holds one cache buffer of `pages x page_tokens` token rows (the attention
op's own layout: latent and rope key for MLA, plus the indexer's key for DeepSeek-V3.2; keys and values
for GQA). A request owns whole pages, taken as its tokens arrive; its tokens live in its pages, in order.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from hetero_moe.ops.attention import Rows, SeqSlice
from hetero_moe.ops.linear_attention import token_mixer
from hetero_moe.settings import RESERVES, available_memory, total_memory


class KVPool:
    """The page allocator, the per-layer cache buffers it hands out rows of, and the prefix cache.

    Prefix caching: a full page is keyed by a chained hash of its tokens and of every token before it
    (and of `salt`: what else changes its content, the model, cache dtype and attention placement).
    Pages are reference-counted and shared read-only: a request that starts with the tokens of cached
    pages takes them and computes only the rest. A page nobody holds keeps its content and its key until
    its memory is needed: free pages are reused empty ones first, then cached ones, least recently
    released first. With a `host` tier, an evicted page's rows go there, and come back by copy."""

    def __init__(
        self,
        buffers: list,
        pages: int,
        page_tokens: int,
        device: torch.device | None = None,
        *,
        prefix_cache: bool = True,
        salt: bytes = b"",
        host: HostTier | None = None,
    ) -> None:
        self.buffers = buffers
        self.pages, self.page_tokens = pages, page_tokens
        self.device = device or torch.device("cpu")  # where gathered row indices go: the buffers' device
        self.prefix_cache, self.salt, self.host = prefix_cache, salt, host
        self._free = list(range(pages - 1, -1, -1))  # empty pages, a stack: low pages first, so one request's run
        self._refs = [0] * pages
        self._key: list[bytes | None] = [None] * pages  # the hash of a cached page's content
        self._cached: dict[bytes, int] = {}  # hash -> page
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached pages no request holds, least recent first
        self.lookups = self.hit_tokens = self.evictions = 0

    @property
    def capacity(self) -> int:
        return self.pages * self.page_tokens

    @property
    def used_pages(self) -> int:
        """Pages some request holds."""
        return self.pages - len(self._free) - len(self._idle)

    @property
    def cached_pages(self) -> int:
        """Pages whose content is keyed for reuse, held or not."""
        return len(self._cached)

    def references(self) -> list[int]:
        """Each page's count of requests holding it (for checks)."""
        return list(self._refs)

    def reserve(self, owned: list[int], tokens: int) -> bool:
        """Grow `owned` to hold `tokens` tokens; False (nothing taken) when too few pages are free."""
        need = -(-tokens // self.page_tokens) - len(owned)
        if need > len(self._free) + len(self._idle):
            return False
        for _ in range(max(need, 0)):
            owned.append(self._take())
        return True

    def release(self, owned: list[int]) -> None:
        """A request lets go of its pages: cached ones stay for reuse, the others become empty."""
        for page in reversed(owned):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if self._key[page] is not None:
                    self._idle[page] = None
                else:
                    self._free.append(page)
        owned.clear()

    def match(self, tokens: list[int]) -> tuple[list[int], list[bytes]]:
        """The longest run of cached full pages `tokens` starts with, leaving at least one token to compute
        (its logits are needed): those pages, now held, and their keys."""
        pages: list[int] = []
        keys: list[bytes] = []
        if not self.prefix_cache:
            return pages, keys
        self.lookups += 1
        p = self.page_tokens
        for i in range((len(tokens) - 1) // p):
            key = self.key(keys[-1] if keys else self.salt, tokens[i * p : (i + 1) * p])
            page = self._cached.get(key)
            if page is None:
                page = self._from_host(key)
                if page is None:
                    break
            elif self._refs[page] == 0:
                del self._idle[page]
            self._refs[page] += 1
            pages.append(page)
            keys.append(key)
        self.hit_tokens += len(pages) * p
        return pages, keys

    def commit(self, owned: list[int], keys: list[bytes], tokens: list[int], computed: int) -> None:
        """Key a request's pages that its first `computed` tokens have filled since the last commit (their
        keys are appended to `keys`), so later requests can share them."""
        if not self.prefix_cache:
            return
        p = self.page_tokens
        for i in range(len(keys), computed // p):
            key = self.key(keys[-1] if keys else self.salt, tokens[i * p : (i + 1) * p])
            keys.append(key)
            page = owned[i]
            if key not in self._cached and self._key[page] is None:  # else: the same content is cached already
                self._cached[key], self._key[page] = page, key

    @staticmethod
    def key(parent: bytes, tokens: list[int]) -> bytes:
        return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()

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

    def page_rows(self, page: int) -> torch.Tensor:
        return torch.arange(page * self.page_tokens, (page + 1) * self.page_tokens)

    def _take(self) -> int:
        """An empty page, or else the least recently released cached one, evicted (to the host tier)."""
        if self._free:
            page = self._free.pop()
        else:
            page, _ = self._idle.popitem(last=False)
            key = self._key[page]
            del self._cached[key]
            self._key[page] = None
            self.evictions += 1
            if self.host is not None:
                self.host.save(key, self.buffers, self.page_rows(page))
        self._refs[page] = 1
        return page

    def _from_host(self, key: bytes) -> int | None:
        """A page holding `key`'s rows copied back from the host tier, or None."""
        if self.host is None or not self.host.has(key) or not (self._free or self._idle):
            return None
        page = self._take()
        self._refs[page] = 0  # `match` takes its reference
        self.host.load(key, self.buffers, self.page_rows(page))
        self._cached[key], self._key[page] = page, key
        return page


class HostTier:
    """Pages evicted from a GPU pool, kept in host memory by key (least recently used out first), so a
    prefix that comes back is copied instead of recomputed."""

    def __init__(self, buffers: list, pages: int, page_tokens: int) -> None:
        self.buffers, self.page_tokens = buffers, page_tokens  # per layer, host caches of `pages` pages
        self._slots: OrderedDict[bytes, int] = OrderedDict()
        self._free = list(range(pages - 1, -1, -1))
        self.saved = self.loaded = 0

    def has(self, key: bytes) -> bool:
        return key in self._slots

    def save(self, key: bytes, device_buffers: list, rows: torch.Tensor) -> None:
        if key in self._slots:
            self._slots.move_to_end(key)
            return
        slot = self._free.pop() if self._free else self._slots.popitem(last=False)[1]
        self._slots[key] = slot
        for host, dev in zip(self.buffers, device_buffers, strict=True):
            host.copy_rows(dev, self._rows(slot), rows)
        self.saved += 1

    def load(self, key: bytes, device_buffers: list, rows: torch.Tensor) -> None:
        slot = self._slots[key]
        self._slots.move_to_end(key)
        for host, dev in zip(self.buffers, device_buffers, strict=True):
            dev.copy_rows(host, rows, self._rows(slot))
        self.loaded += 1

    def _rows(self, slot: int) -> torch.Tensor:
        return torch.arange(slot * self.page_tokens, (slot + 1) * self.page_tokens)


@dataclass(frozen=True)
class Batch:
    """One forward's tokens: `ids [N]` at `positions [N]`, each sequence's share and cache rows, and the
    rows whose logits are wanted (each sampling sequence's last token), in sequence order."""

    ids: torch.Tensor
    positions: torch.Tensor
    seqs: list[SeqSlice]
    sample_rows: list[int]

    @classmethod
    def of(
        cls, pool: KVPool, parts: list[tuple[list[int], list[int], int, int]], slots: list[int] | None = None
    ) -> Batch:
        """`parts`: per sequence (its tokens, the pages holding them, tokens already cached, tokens to run
        now); a sequence whose run reaches its last token samples. `slots`: per sequence, its slot in the
        linear-attention layers' state (none: slot 0, one sequence)."""
        ids: list[int] = []
        positions: list[int] = []
        seqs, rows = [], []
        for i, (tokens, pages, start, n) in enumerate(parts):
            new_rows, all_rows = pool.rows(pages, start, start + n), pool.rows(pages, 0, start + n)
            seqs.append(SeqSlice(len(ids), n, start, new_rows, all_rows, slots[i] if slots is not None else 0))
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
    """Bytes of KV cache one token takes on each device, over all decoder layers' attention ops (none in
    linear-attention layers)."""
    per_token: dict[torch.device, int] = {}
    for layer in layers:
        attn = token_mixer(layer)
        nbytes = attn.cache_bytes(1, dtype)
        if nbytes:
            per_token[attn.device] = per_token.get(attn.device, 0) + nbytes
    return per_token


def default_pool_tokens(
    per_token: dict[torch.device, int],
    wanted: int,
    mapped_cpu_bytes: int = 0,
    fixed: dict[torch.device, int] | None = None,
) -> int:
    """`wanted` tokens of KV cache, or fewer if this box's free memory, less the reserve, holds fewer; whole
    pages of 16 tokens. On the CPU, weights memory-mapped from files (`mapped_cpu_bytes`) count as taken,
    although the system reports their page cache as available; `fixed`: bytes per device that the pool's
    companions take whatever its size (the linear-attention layers' state slots)."""
    tokens = wanted
    fixed = fixed or {}
    for dev, nbytes in per_token.items():
        if dev.type == "cuda":
            free, total = torch.cuda.mem_get_info(dev)
            usable = RESERVES["cuda"].usable(free, total)
        else:
            available, total = available_memory(), total_memory()
            if available is None or total is None:
                continue  # no /proc/meminfo: only the wanted size bounds the pool
            usable = RESERVES["cpu"].usable(available - mapped_cpu_bytes, total)
        tokens = min(tokens, int(max(usable - fixed.get(dev, 0), 0) // nbytes))
    if tokens < 16:
        raise ValueError(
            "no memory is left for the KV cache after loading the model; give --kv-cache-tokens, "
            "a smaller model placement, or free memory"
        )
    return tokens // 16 * 16
