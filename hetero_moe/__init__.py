"""hetero-moe: Mixture-of-Experts inference with routed experts on the CPU and the rest on the GPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["LLM"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from hetero_moe.llm import LLM


def __getattr__(name: str):
    # Importing the package stays cheap (no torch) until the API is used.
    if name == "LLM":
        from hetero_moe.llm import LLM

        return LLM
    raise AttributeError(f"module 'hetero_moe' has no attribute {name!r}")
