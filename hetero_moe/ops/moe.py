"""The MoE block and the routers, each exactly as its architecture defines it.

The block is a container: its router, routed experts and shared experts are its children, each
placed by its own rule, and the block moves activations between their devices. When the block runs
on a GPU and its routed experts on the CPU, the experts run in a worker thread on pinned copies of
their inputs while the GPU computes the shared experts (`HostStaging`).
"""

from __future__ import annotations

import time
from dataclasses import astuple, dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from numba import get_num_threads
from torch import nn

from hetero_moe.kernels.numba import moe as moe_kernels
from hetero_moe.kernels.numba import router as router_kernels
from hetero_moe.kernels.numba.int8dot import scratch
from hetero_moe.ops.base import BuildContext, Op, module_device
from hetero_moe.ops.cpu_experts import BlockFormat, CPUExperts, GroupFormat
from hetero_moe.ops.mlp import QuantGatedMLP
from hetero_moe.ops.staging import HostStaging


class MoEBlock(Op):
    """router → routed experts (+ shared experts), combined on the block's own device. Qwen3.5-MoE and
    Qwen3-Next name their one shared expert `shared_expert` and scale its output per token by the sigmoid
    of `shared_expert_gate` (a linear to one value), computed beside it.

    A float32 block whose parts all run on the CPU, its routed experts (none pinned) and its shared experts on
    the quantized kernels, runs on numpy arrays from end to end (`_numpy`), its router in Numba: every token,
    prefill or decode, so a token's result does not depend on its batch. On the integer kernels the whole block is
    one kernel call (`run_in_one_call`)."""

    container = True

    def __init__(self, hf: nn.Module, ctx: BuildContext) -> None:
        super().__init__(ctx.device)
        self.gate = hf.gate if hasattr(hf, "gate") else hf.router  # gpt-oss's `router`, renamed (arch.py)
        self.experts = hf.experts
        # the shared experts under the checkpoint's name: `shared_experts`, or Qwen's one `shared_expert`
        self.shared_name = "shared_expert" if getattr(hf, "shared_expert", None) is not None else "shared_experts"
        setattr(self, self.shared_name, getattr(hf, self.shared_name, None))
        self.shared_expert_gate = getattr(hf, "shared_expert_gate", None)  # [1, H] linear
        self.services = ctx.services
        self.dtype = ctx.dtype
        self.staging: HostStaging | None = None
        self._forward = self._sequential

    def finalize(self) -> None:
        self.experts_device = self.experts.device
        if self.shared is not None:
            self.shared_device = module_device(self.shared)
        if self.shared_expert_gate is not None:
            self.shared_gate_device = module_device(self.shared_expert_gate)
        # routed experts kept on another device (cpu_experts' `pinned`): computed there, added here
        self.pinned_device = self.experts.pinned_device if getattr(self.experts, "pinned", ()) else None
        if self.experts_device.type == "cpu" and self.device.type != "cpu":
            # the routed experts run on the host, through pinned copies and a worker thread, while this
            # block's device does the rest
            self.staging = self.services.staging(self.device)
            self._forward = self._overlapped
        elif self._numpy_lane() and self.gate.use_numba():
            self._forward = self._numpy

    def _numpy_lane(self) -> bool:
        """Whether every part runs on the CPU in float32 numpy arrays: the experts' integer kernels (int4, int8
        or GGUF blocks; none pinned) and shared experts, if any, on the quantized CPU kernels, ungated."""
        experts = self.experts
        return (
            self.device.type == "cpu"
            and self.dtype == torch.float32
            and isinstance(experts, CPUExperts)
            and isinstance(experts.format, GroupFormat | BlockFormat)
            and not experts.pinned
            and (self.shared is None or isinstance(self.shared, QuantGatedMLP))
            and self.shared_expert_gate is None
        )

    @property
    def numpy_lane(self) -> bool:
        """Whether the block runs on numpy arrays, its router in Numba (see the class)."""
        return self._forward == self._numpy

    @property
    def shared(self) -> nn.Module | None:
        return getattr(self, self.shared_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H]
        return self._forward(x)

    def _sequential(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = self.gate(x.to(self.gate.device))  # [T, k] each
        dev = self.experts_device
        out = self.experts(x.to(dev), index.to(dev), weights.to(dev)).to(self.device)
        if self.pinned_device is not None:
            out = out + self._pinned(x, index, weights)
        if self.shared is not None:
            out = out + self._shared(x).to(self.device)
        return out

    def _numpy(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(np.ascontiguousarray(x.detach().numpy())))

    def run(self, xf: np.ndarray) -> np.ndarray:
        """The block on numpy arrays (`numpy_lane` only): `xf [T, H]` float32, contiguous -> `[T, H]` float32."""
        out = self.run_in_one_call(xf)
        if out is not None:
            return out
        weights, index = self.gate.route(xf)
        out = self.experts.run(xf, index, weights)
        if self.shared is not None:
            out += self.shared.run(xf)
        return out

    def run_in_one_call(self, xf: np.ndarray) -> np.ndarray | None:
        """`run` in one kernel call (`moe_kernels.block`: the router, the routed and the shared experts), the same
        bits, where the parts have one and the routed experts would take theirs (fewer than `torch_min_tokens`
        pairs); else None."""
        bound = self._block_args
        if bound is None or xf.shape[0] * self.gate.top_k >= self.experts.torch_min_tokens:
            return None
        t, k, out = xf.shape[0], self.gate.top_k, np.empty_like(xf)
        h_rows, y_rows = scratch("h", t * k, self.experts.inter), scratch("y", t * k, xf.shape[1])
        used = moe_kernels.block(xf, h_rows, y_rows, out, get_num_threads(), *bound)
        self.experts.count_streamed(used)
        return out

    @cached_property
    def _block_args(self) -> tuple | None:
        """`moe_kernels.block`'s weights, bound at the first call (`numpy_lane` only): the router's, the routed
        experts' and the shared experts'; None where a part has no such kernel call."""
        routed = self.experts.block_args()
        shared = (None, None, None) if self.shared is None else self.shared.kernel_args()
        if routed is None or shared is None:
            return None
        return *self.gate.kernel_args(), *routed, *shared

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        """The shared experts' output on their device, gated where the model gates it."""
        out = self.shared(x.to(self.shared_device))
        if self.shared_expert_gate is None:
            return out
        return torch.sigmoid(self.shared_expert_gate(x.to(self.shared_gate_device))).to(out.device) * out

    def _pinned(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        dev = self.pinned_device
        return self.experts.pinned_forward(x.to(dev), index.to(dev), weights.to(dev)).to(self.device)

    def _overlapped(self, x: torch.Tensor) -> torch.Tensor:
        st = self.staging
        weights, index = self.gate(x.to(self.gate.device))  # [T, k] each
        hx, hi, hw = st.to_host("x", x), st.to_host("index", index), st.to_host("weights", weights)
        ready = torch.cuda.Event() if st.pin else None
        if ready is not None:
            ready.record()
        job = st.executor.submit(self._host_experts, ready, hx, hi, hw)
        # meanwhile on this device: the pinned routed experts and the shared experts
        pinned = None if self.pinned_device is None else self._pinned(x, index, weights)
        shared = None if self.shared is None else self._shared(x)
        start = time.perf_counter()
        y = job.result()  # [T, H] in the pinned output buffer
        st.stats.wait_s += time.perf_counter() - start
        out = y.to(self.device, non_blocking=True)
        if pinned is not None:
            out = out + pinned
        return out if shared is None else out + shared.to(self.device)

    def _host_experts(self, ready, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Worker thread: wait for the inputs' copies, run the experts into the pinned output buffer."""
        if ready is not None:
            ready.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            y = self.experts(x, index, weights)
            out = self.staging.buffer("y", tuple(y.shape), x.dtype)
            out.copy_(y)
        self.staging.stats.experts_s += time.perf_counter() - start
        self.staging.stats.calls += 1
        return out


def router_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x [T, H]` times `weight [E, H]` transposed (plus `bias`) -> `[T, E]`, each row summed as it is when
    its token runs alone: a BLAS picks its GEMM by T, and the last bits of a sum follow, which would let a
    token's routing, and so its answer, depend on the tokens batched with it. T one-row products in one
    batched call (the same bits as one token's product) cost little at a router's size."""
    if x.shape[0] == 1:
        out = F.linear(x, weight)
    else:
        out = torch.bmm(x[:, None], weight.t().expand(x.shape[0], *weight.t().shape))[:, 0]
    return out if bias is None else out + bias


@dataclass(frozen=True)
class Routing:
    """A router's math as `kernels/numba/router.py` runs it (the arguments of its `route`)."""

    scoring: int  # router_kernels.SOFTMAX or SIGMOID
    num_group: int = 1
    topk_group: int = 1  # groups kept; all of them: no group-limited choice
    group_score: int = router_kernels.GROUP_MAX
    renorm: bool = False  # the chosen weights divided by their sum + eps
    eps: float = 0.0
    scaling: float = 1.0


class Router(Op):
    """Base of the routers: `forward(x [T, H]) -> (weights [T, k], expert index [T, k])`; `route`, the same in
    Numba on numpy arrays, for the routers with a `numba_routing`."""

    fp32_logits = False  # logits from the weight and the input in float32, whatever the model's dtype

    def __init__(self, hf: nn.Module, ctx: BuildContext) -> None:
        super().__init__(ctx.device)
        self.top_k = hf.top_k
        self.num_experts = hf.weight.shape[0]
        self.weight = nn.Parameter(torch.empty(hf.weight.shape, dtype=ctx.dtype, device="meta"), requires_grad=False)
        self.numba: tuple[Routing, np.ndarray, np.ndarray] | None = None  # set by `use_numba`

    def finalize(self) -> None:
        # on the CPU, widening the weight on every call took as long as the logits themselves
        if self.fp32_logits and self.device.type == "cpu":
            self.weight = nn.Parameter(self.weight.float(), requires_grad=False)

    def numba_routing(self) -> Routing | None:
        """This router's math for `route`; None where it has no Numba version."""
        return None

    def use_numba(self) -> bool:
        """After `finalize`: make `route` ready where this router has a `numba_routing` and a float32 weight on the
        CPU; whether it is."""
        routing = self.numba_routing()
        if routing is None or self.device.type != "cpu" or self.weight.dtype != torch.float32:
            return False
        bias = getattr(self, "e_score_correction_bias", None)
        bias = np.zeros(self.num_experts, np.float32) if bias is None else bias.detach().float().numpy()
        self.numba = (routing, self.weight.detach().numpy(), bias)
        return True

    def kernel_args(self) -> tuple:
        """`route`'s weight, bias and math bound for jitted callers (`use_numba` first): `(weight, bias, routing,
        top_k)`, `routing` the `Routing` fields in `router_kernels.select`'s order."""
        r, w, bias = self.numba
        return w, bias, astuple(r), self.top_k

    def route(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`x [T, H]` float32, contiguous -> (weights `[T, k]` float32, expert index `[T, k]` int64), in Numba
        (`use_numba` first)."""
        r, w, bias = self.numba
        weights = np.empty((x.shape[0], self.top_k), np.float32)
        index = np.empty((x.shape[0], self.top_k), np.int64)
        router_kernels.select(
            x, w, bias, r.scoring, r.num_group, r.topk_group, r.group_score, r.renorm, r.eps, r.scaling,
            weights, index,
        )  # fmt: skip
        return weights, index


@dataclass(frozen=True)
class SigmoidRouting:
    """What differs between the sigmoid routers with a correction bias; group-limited choice, the
    renormalisation and the scaling are read from each module (absent: one group, renormalised, scale 1)."""

    logits_fp32: bool = True  # logits from float32 weight and input; else in the weight's dtype (MiniMax-M2)
    eps: float = 1e-20  # added to the renormalising sum (DeepSeek-V3's; MiniMax-M2 adds none)


# One entry per transformers router class the `router` op replaces with `SigmoidRouter`.
SIGMOID_ROUTING = {
    "DeepseekV3TopkRouter": SigmoidRouting(),
    "DeepseekV32TopkRouter": SigmoidRouting(),
    "Glm4MoeTopkRouter": SigmoidRouting(),
    "MiniMaxM2TopKRouter": SigmoidRouting(logits_fp32=False, eps=0.0),
}


class SigmoidRouter(Router):
    """Sigmoid scores (DeepSeek-V3, Kimi-K2, V3.2, GLM-4.5, MiniMax-M2); top-k, group-limited where the
    model groups experts (group score = sum of its top 2), on scores plus the fp32 correction bias; weights
    are the unbiased scores, renormalised, times `routed_scaling_factor`. MiniMax-M2 keeps the bias on its
    MoE block: the checkpoint key is renamed to the router's (`arch.py`)."""

    def __init__(self, hf: nn.Module, ctx: BuildContext) -> None:
        super().__init__(hf, ctx)
        self.routing = SIGMOID_ROUTING[type(hf).__name__]
        self.fp32_logits = self.routing.logits_fp32
        self.num_group, self.topk_group = getattr(hf, "num_group", 1), getattr(hf, "topk_group", 1)
        self.norm_topk_prob = getattr(hf, "norm_topk_prob", True)
        self.scaling = getattr(hf, "routed_scaling_factor", 1.0)
        self.register_buffer("e_score_correction_bias", torch.empty(self.num_experts, device="meta"))

    def numba_routing(self) -> Routing:
        return Routing(
            router_kernels.SIGMOID, self.num_group, self.topk_group, router_kernels.GROUP_TOP2,
            self.norm_topk_prob, self.routing.eps, self.scaling,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fp32_logits:
            scores = router_logits(x.float(), self.weight.float()).sigmoid()  # [T, E]
        else:
            scores = router_logits(x.to(self.weight.dtype), self.weight).float().sigmoid()
        choice = scores + self.e_score_correction_bias
        if self.topk_group < self.num_group:
            per_group = self.num_experts // self.num_group
            group_scores = choice.view(-1, self.num_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(-1, self.num_group, per_group).reshape(-1, self.num_experts)
            choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        index = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, index)
        if self.norm_topk_prob:
            weights /= weights.sum(dim=-1, keepdim=True) + self.routing.eps
        return weights * self.scaling, index


class DeepseekV2Router(Router):
    """Softmax scores; `greedy` or `group_limited_greedy` (group score = its max) top-k; weights times
    `routed_scaling_factor`, not renormalised (as transformers' DeepseekV2TopkRouter)."""

    fp32_logits = True

    def __init__(self, hf: nn.Module, ctx: BuildContext) -> None:
        super().__init__(hf, ctx)
        if hf.topk_method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"DeepSeek-V2 topk_method {hf.topk_method!r} is not supported")
        self.topk_method = hf.topk_method
        self.num_group, self.topk_group = hf.num_group, hf.topk_group
        self.scaling = hf.routed_scaling_factor

    def numba_routing(self) -> Routing:
        # groups left out: their scores set to 0 here, -inf there; the same choice while k <= the experts kept
        groups = (self.num_group, self.topk_group) if self.topk_method == "group_limited_greedy" else (1, 1)
        return Routing(router_kernels.SOFTMAX, *groups, router_kernels.GROUP_MAX, scaling=self.scaling)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = router_logits(x.float(), self.weight.float()).softmax(dim=-1, dtype=torch.float32)  # [T, E]
        if self.topk_method == "group_limited_greedy":
            per_group = self.num_experts // self.num_group
            group_scores = scores.view(-1, self.num_group, per_group).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(-1, self.num_group, per_group).reshape(-1, self.num_experts)
            scores = scores.masked_fill(~score_mask.bool(), 0.0)
        weights, index = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return weights * self.scaling, index


class QwenRouter(Router):
    """Softmax (in float32) over logits in the activation dtype, top-k, optionally renormalised (always in
    Qwen3.5-MoE, whose router has no such setting); the weights return in the activation dtype (Qwen3-MoE,
    Qwen3-Next, Qwen3.5-MoE)."""

    def __init__(self, hf: nn.Module, ctx: BuildContext) -> None:
        super().__init__(hf, ctx)
        self.norm_topk_prob = getattr(hf, "norm_topk_prob", True)

    def numba_routing(self) -> Routing:
        return Routing(router_kernels.SOFTMAX, renorm=self.norm_topk_prob)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = router_logits(x, self.weight)  # [T, E]
        weights, index = torch.topk(F.softmax(logits, dtype=torch.float, dim=-1), self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights /= weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype), index


class TopkSoftmaxRouter(Router):
    """Top-k of the logits first, then the softmax over the chosen ones only, all in the activation dtype; the
    router's linear has a bias (gpt-oss)."""

    def __init__(self, hf: nn.Module, ctx: BuildContext) -> None:
        super().__init__(hf, ctx)
        self.bias = nn.Parameter(torch.empty(self.num_experts, dtype=ctx.dtype, device="meta"), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = router_logits(x, self.weight, self.bias)  # [T, E]
        top, index = torch.topk(logits, self.top_k, dim=-1)
        return F.softmax(top, dim=1, dtype=top.dtype), index


class MixtralRouter(Router):
    """Softmax of the logits in float32, top-k, always renormalised; weights stay float32."""

    def numba_routing(self) -> Routing:
        return Routing(router_kernels.SOFTMAX, renorm=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = router_logits(x, self.weight)  # [T, E]
        weights, index = torch.topk(F.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
        weights /= weights.sum(dim=-1, keepdim=True)
        return weights, index
