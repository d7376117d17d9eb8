"""Apply placement rules to a transformers model built on the meta device.

Walks the module tree top-down. For each module the first matching rule decides: its op replaces
the module (adopting its children, which are then matched in turn unless `recursive: false`), and
its device holds the module's weights. A module no rule matches inherits its parent's device.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig

from hetero_moe.arch import Architecture
from hetero_moe.inject.rules import Rule, Rules
from hetero_moe.ops.base import BuildContext, Op, Services, direct_tensors
from hetero_moe.ops.linear_attention import is_recurrent, token_mixer
from hetero_moe.ops.registry import MUST_REPLACE


class InjectError(ValueError):
    """Rules that do not fit the model; the message names the module and the rule."""


@dataclass(frozen=True)
class Placement:
    name: str  # dotted module name
    hf_class: str  # the transformers class that stood here
    op: str | None  # the op that replaced it, if any
    device: torch.device
    rule: Rule | None  # the rule that matched it; None when inherited


@dataclass
class PlacedModel:
    """A model whose modules the rules have replaced and placed; weights still on meta until loaded."""

    model: nn.Module
    config: PretrainedConfig
    arch: Architecture
    dtype: torch.dtype
    placements: dict[str, Placement]
    services: Services  # what its ops share (converted-weights store, host staging)
    warnings: list[str] = field(default_factory=list)

    def owned_keys(self) -> dict[str, tuple[str, nn.Module, str, torch.Size]]:
        """Every checkpoint key the placed model expects -> (owner name, owner, key within it, shape)."""
        keys = {}
        for name, module in self.model.named_modules():
            own = (
                module.checkpoint_keys() if isinstance(module, Op) else {k: t.shape for k, t in direct_tensors(module)}
            )
            for rel, shape in own.items():
                keys[f"{name}.{rel}" if name else rel] = (name, module, rel, shape)
        return keys

    def bytes_per_device(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for name, module in self.model.named_modules():
            if isinstance(module, Op):
                for device, nbytes in module.device_bytes().items():
                    if nbytes:
                        totals[device] += nbytes
            else:
                nbytes = sum(t.numel() * t.element_size() for _, t in direct_tensors(module))
                if nbytes:
                    totals[str(self.placements[name].device)] += nbytes
        return dict(sorted(totals.items()))

    def mapped_bytes(self) -> int:
        """Bytes of the loaded weights that are memory-mapped from files."""
        return sum(m.mapped_bytes() for m in self.model.modules() if isinstance(m, Op))

    def kv_cache_bytes(self, capacity: int) -> dict[str, int]:
        """Bytes of one sequence's KV cache for `capacity` tokens, per device (with the linear-attention
        layers' state, whatever the capacity)."""
        totals: dict[str, int] = defaultdict(int)
        for layer in self.model.model.layers:
            attn = token_mixer(layer)
            totals[str(attn.device)] += attn.cache_bytes(capacity, self.dtype)
            if is_recurrent(attn):
                totals[str(attn.device)] += attn.state_bytes(1, self.dtype)
        return dict(sorted(totals.items()))

    def devices(self) -> set[torch.device]:
        return {p.device for p in self.placements.values()}


def _device(spec: str) -> torch.device:
    return torch.device("cuda:0" if spec == "cuda" else spec)


def inject(
    model: nn.Module,
    rules: Rules,
    config: PretrainedConfig,
    arch: Architecture,
    dtype: torch.dtype,
    cpu_threads: int = 1,
    services: Services | None = None,
) -> PlacedModel:
    services = services or Services()
    placements: dict[str, Placement] = {}
    used: set[int] = set()

    def visit(module: nn.Module, name: str, inherited: torch.device, parent: nn.Module | None, attr: str) -> None:
        hf_class = type(module).__name__
        rule = rules.first_match(name, hf_class)
        device = inherited
        op_name = None
        if rule is not None:
            used.add(rule.index)
            if rule.replace.device is not None:
                device = _device(rule.replace.device)
            spec = rule.replace.op
            if spec is not None:
                if parent is None:
                    raise InjectError(f"{rule.where}: the root model cannot be replaced, only placed")
                ctx = BuildContext(config, dtype, device, cpu_threads, services)
                try:
                    module = spec.build(module, ctx, rule.replace.kwargs)
                except (TypeError, ValueError) as e:
                    raise InjectError(f"{rule.where}: module {name or '<root>'}: {e}") from e
                op_name = spec.name
                parent._modules[attr] = module
        placements[name] = Placement(name, hf_class, op_name, device, rule)
        for child_name, child in list(module.named_children()):
            child_full = f"{name}.{child_name}" if name else child_name
            if rule is not None and not rule.recursive:
                for sub_name, sub in child.named_modules(prefix=child_full):
                    placements[sub_name] = Placement(sub_name, type(sub).__name__, None, device, None)
            else:
                visit(child, child_full, device, module, child_name)

    visit(model, "", torch.device("cpu"), None, "")
    _check(model, placements)
    for module in model.modules():
        if isinstance(module, Op):
            module.injected()
    unused = [r for r in rules.rules if r.index not in used and not r.optional]
    warnings = [f"{r.where}: matches no module of this {arch.name}" for r in unused]
    return PlacedModel(model, config, arch, dtype, placements, services, warnings)


def _check(model: nn.Module, placements: dict[str, Placement]) -> None:
    for name, p in placements.items():
        if p.op is None and p.hf_class in MUST_REPLACE:
            raise InjectError(
                f"module {name} ({p.hf_class}) must be replaced by op {MUST_REPLACE[p.hf_class]!r}, "
                f"but {'rule ' + str(p.rule.index) + ' keeps it' if p.rule else 'no rule replaces it'}; "
                f"add a rule such as: - match: {{class: {p.hf_class}}}\\n  replace: {{op: {MUST_REPLACE[p.hf_class]}}}"
            )
    for name, module in model.named_modules():
        if isinstance(module, Op) and not module.container:
            for sub_name, _ in module.named_modules(prefix=name):
                if placements[sub_name].device != module.device:
                    raise InjectError(
                        f"{sub_name} is placed on {placements[sub_name].device}, but it is part of op "
                        f"{placements[name].op!r} at {name} on {module.device}; an op's parts share its device"
                    )


def collapse_layers(names: list[str]) -> str:
    """`model.layers.3.mlp` ... `model.layers.60.mlp` -> `model.layers.{3..60}.mlp` (contiguous runs)."""
    if len(names) == 1:
        return names[0]
    nums = sorted(int(re.search(r"\.layers\.(\d+)", n).group(1)) for n in names)
    template = re.sub(r"\.layers\.\d+", ".layers.{}", names[0], count=1)
    runs, lo = [], nums[0]
    for a, b in zip(nums, [*nums[1:], None], strict=True):
        if b != a + 1:
            runs.append(str(lo) if lo == a else f"{lo}..{a}")
            lo = b
    return template.format("{" + ",".join(runs) + "}")
