"""Per-sequence state of the linear-attention layers (Qwen3.5-MoE, Qwen3-Next), beside the paged KV cache.

Such a layer keeps no row per token but a fixed-size state per sequence (`ops/linear_attention.py`):
each of these layers' buffers has one slot per request the running batch can hold, and a request holds
one slot index, the same in every layer, from its admission into the running batch until it finishes,
is aborted or is preempted. Slots are never cleared: a sequence that starts from position 0 starts
from zeros, so a preempted request that comes back recomputes its state from its tokens.

The prefix cache shares pages of KV rows; the recurrent state after a prefix is in no page, so a model
with such layers runs without the prefix cache.
"""

from __future__ import annotations


class StateSlots:
    """The slot allocator: `slots` slot indices, taken and released by requests."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.slots = slots
        self._free = list(range(slots - 1, -1, -1))  # a stack: low slots first

    @property
    def used(self) -> int:
        return self.slots - len(self._free)

    def take(self) -> int:
        if not self._free:
            raise RuntimeError(f"all {self.slots} recurrent-state slots are taken (one per running request)")
        return self._free.pop()

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.slots or slot in self._free:
            raise ValueError(f"slot {slot} is not taken")
        self._free.append(slot)
