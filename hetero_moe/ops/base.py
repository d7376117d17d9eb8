"""What every op shares: the build context, kwargs parsing, and how an op owns checkpoint tensors.

An op is an `nn.Module` that replaces a transformers module at load time. It is built on the meta
device from the module it replaces (adopting that module's children where their math is already
right), receives its weights tensor by tensor from the loader, and is finalized once all are in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self

import torch
from torch import nn
from transformers import PretrainedConfig

from hetero_moe.kernels.quant import dequantize_fp8_blocks
from hetero_moe.ops.staging import HostStaging


class ConvertedEntry(Protocol):
    """One op's weights converted at load, in a cache on disk (`loader/converted.py`)."""

    def load(self) -> dict[str, Any] | None: ...  # the arrays, memory-mapped; None when absent or stale

    def save(self, arrays: Mapping[str, Any]) -> None: ...


class ConvertedStore(Protocol):
    def entry(self, name: str, sources: list, settings: Mapping[str, Any]) -> ConvertedEntry: ...


class Services:
    """What the ops of one model share, given by whoever builds the model: a store for weights converted
    at load (None: convert at every load), whether Triton kernels may run on the CPU (its interpreter,
    in tests), the instruction set forced on the CPU kernels (a setting, for checks), and the host
    staging of MoE blocks that overlap CPU experts with a GPU (made on first use; `close` stops its
    worker thread)."""

    def __init__(
        self, converted: ConvertedStore | None = None, triton_on_cpu: bool = False, cpu_isa: str | None = None
    ) -> None:
        self.converted = converted
        self.triton_on_cpu = triton_on_cpu
        self.cpu_isa = cpu_isa  # the CPU kernels' instruction set; None: the best this CPU has
        self._staging: HostStaging | None = None

    def staging(self, device: torch.device) -> HostStaging:
        if self._staging is None:
            self._staging = HostStaging(device)
        return self._staging

    @property
    def overlap(self) -> HostStaging | None:
        """The host staging, if any block overlaps (for its timing stats)."""
        return self._staging

    def close(self) -> None:
        if self._staging is not None:
            self._staging.close()


@dataclass(frozen=True)
class BuildContext:
    config: PretrainedConfig
    dtype: torch.dtype  # compute dtype of activations and unquantized weights
    device: torch.device  # where the op's weights live and it runs
    cpu_threads: int = 1  # threads for CPU kernels
    services: Services = field(default_factory=Services)


@dataclass(frozen=True)
class NoKwargs:
    """The kwargs of an op that takes none."""


def parse_kwargs(kwargs_type: type, raw: Mapping[str, Any]) -> Any:
    """Build an op's frozen kwargs dataclass from YAML data, naming unknown keys and the accepted ones."""
    fields = {f.name for f in dataclasses.fields(kwargs_type)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        accepted = ", ".join(sorted(fields)) or "none"
        raise ValueError(f"unknown kwarg(s) {unknown}; accepted: {accepted}")
    return kwargs_type(**raw)


class Op(nn.Module):
    """Base class of the modules that rules place. Subclasses implement `from_hf` and `forward`."""

    # True for ops whose children may live on other devices (the MoE block); any other op keeps its
    # parts on its own device.
    container: ClassVar[bool] = False

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device

    @classmethod
    def from_hf(cls, hf: nn.Module, ctx: BuildContext, kwargs: Any) -> Self:
        """Build from the transformers module `hf` it replaces; ops that take kwargs override this."""
        return cls(hf, ctx)

    def checkpoint_keys(self) -> dict[str, torch.Size]:
        """Checkpoint keys this module itself owns (relative to its name) and their shapes."""
        return {name: t.shape for name, t in direct_tensors(self)}

    def load_weight(self, key: str, tensor: torch.Tensor) -> None:
        assign_direct(self, key, tensor, self.device)

    def load_fp8(self, key: str, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
        """An FP8 checkpoint tensor with its block scales; ops that keep FP8 override this."""
        self.load_weight(key, dequantize_fp8_blocks(weight, scale_inv, block))

    def load_mxfp4(self, key: str, blocks: torch.Tensor, scales: torch.Tensor) -> None:
        """An MXFP4 checkpoint tensor (`key` ends in `_blocks`) with its e8m0 scales; ops that take MXFP4 (the
        routed experts of gpt-oss) override this."""
        raise ValueError(f"{type(self).__name__} cannot take MXFP4 tensors ({key})")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in direct_tensors(self))

    def device_bytes(self) -> dict[str, int]:
        """Bytes this module itself will hold per device (`nbytes` on its own device, for most ops)."""
        return {str(self.device): self.nbytes()}

    def restore(self, name: str, sources: list) -> bool:
        """Before loading: take the weights from a cache of this op's own instead of `sources` (the
        checkpoint's TensorInfo of every key it owns); True when it did, and the loader skips them."""
        return False

    def mapped_bytes(self) -> int:
        """Of `nbytes`, those memory-mapped from a file (the system counts their page cache as available)."""
        return 0

    def injected(self) -> None:
        """Called once the rules have placed every module, before any weight is loaded: an op may ask its
        children for something then (latent attention asks its quantized `kv_b_proj` to keep the float weight)."""

    def finalize(self) -> None:
        """Called once every weight is loaded, children first."""


def direct_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A module's own parameters and persistent buffers, not its children's."""
    yield from module.named_parameters(recurse=False)
    for name, buf in module.named_buffers(recurse=False):
        if name not in module._non_persistent_buffers_set:
            yield name, buf


def assign_direct(module: nn.Module, key: str, tensor: torch.Tensor, device: torch.device) -> None:
    """Replace a module's own (meta) parameter or buffer `key` by `tensor`, cast to its dtype."""
    if key in module._parameters:
        old = module._parameters[key]
        module._parameters[key] = nn.Parameter(tensor.to(device=device, dtype=old.dtype), requires_grad=False)
    elif key in module._buffers:
        module._buffers[key] = tensor.to(device=device, dtype=module._buffers[key].dtype)
    else:
        raise KeyError(key)


def module_device(module: nn.Module) -> torch.device:
    """Where a loaded module runs: an op's own device, else that of its first tensor."""
    if isinstance(module, Op):
        return module.device
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")
