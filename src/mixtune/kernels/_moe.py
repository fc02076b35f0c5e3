"""Grouped expert computation for MoE layers, with LoRA as grouped low-rank products.

The reference path of the library (``MoEExperts`` / ``LoraExperts``) loops over
experts and runs two small matrix products per expert.  Here the tokens of a
layer are sorted by expert once, and each projection becomes a single grouped
matrix product over contiguous row groups (``torch.nn.functional.grouped_mm``
on CUDA).  LoRA stays low-rank: ``x -> x Aₑᵀ -> (x Aₑᵀ) Bₑᵀ`` for the rows of
expert ``e``, never ``Wₑ + Bₑ Aₑ``.

On devices without a usable grouped GEMM (CPU autograd through
``grouped_mm`` is broken in torch 2.13) :func:`grouped_mm` falls back to a
loop over groups, so the permutation and LoRA logic are exercised everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
import torch.nn.functional as F

__all__ = [
    "ExpertLoraFactors",
    "ExpertStack",
    "RoutingPlan",
    "experts_per_chunk",
    "grouped_mm",
    "grouped_mm_reference",
    "grouped_path_available",
    "grouped_wgrad",
    "moe_grouped_forward",
    "routing_plan",
]

ExpertStack = torch.Tensor | Callable[[int, int], torch.Tensor]
"""Frozen expert weights of one projection: an ``(E, out, in)`` tensor, or a
function ``(start, stop) -> (stop - start, out, in)`` that produces the
stack of experts ``start .. stop - 1`` on demand (e.g. by dequantizing them),
so that only a few experts' weights exist at a time."""

_GATE_UP = ("gate", "up")


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``out[rows of group g] = x[rows of g] @ w[g]``, one plain product per group.

    Args:
        x: ``(N, K)`` rows sorted by group.
        w: ``(G, K, M)`` one matrix per group.
        offs: ``(G,)`` int32 cumulative row ends (``offs[-1] == N``).

    Returns:
        ``(N, M)`` in ``x``'s dtype.
    """
    ends = offs.tolist()
    starts = [0, *ends[:-1]]
    parts = [x[s:e] @ w[g].to(x.dtype) for g, (s, e) in enumerate(zip(starts, ends, strict=True))]
    if not parts:
        return x.new_zeros(x.shape[0], w.shape[-1])
    return torch.cat(parts, dim=0)


def grouped_path_available(x: torch.Tensor) -> bool:
    """Whether ``x`` can go through the native grouped GEMM (CUDA, bf16).

    Args:
        x: Activations that would be multiplied.

    Returns:
        True on CUDA with ``torch.nn.functional.grouped_mm`` and bf16 input.
    """
    return x.is_cuda and hasattr(F, "grouped_mm") and x.dtype == torch.bfloat16


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM: the native kernel on CUDA bf16, else :func:`grouped_mm_reference`.

    Args:
        x: ``(N, K)`` rows sorted by group.
        w: ``(G, K, M)``; may be a transposed view of a ``(G, M, K)`` weight.
        offs: ``(G,)`` int32 cumulative row ends.

    Returns:
        ``(N, M)``.
    """
    w = w.to(x.dtype)
    # Backward multiplies by the (N, M) output gradient too, so M must give
    # 16-byte rows as well (a LoRA rank of 4 in bf16 does not).
    out_rows_ok = (w.shape[-1] * x.element_size()) % 16 == 0
    if grouped_path_available(x) and out_rows_ok and _aligned(x) and _aligned(w):
        return F.grouped_mm(x, w, offs=offs)
    return grouped_mm_reference(x, w, offs)


def grouped_wgrad(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-group ``aᵀ b`` over row groups: the weight gradient of a grouped product.

    Args:
        a: ``(N, M)`` rows sorted by group (e.g. an output gradient).
        b: ``(N, K)`` the same rows (e.g. the product's input).
        offs: ``(G,)`` int32 cumulative row ends.

    Returns:
        ``(G, M, K)`` in ``a``'s dtype; a group without rows gets zeros.
    """
    b = b.to(a.dtype)
    at = a.t()
    if grouped_path_available(a) and _aligned(at) and _aligned(b):
        return F.grouped_mm(at, b, offs=offs)
    ends = offs.tolist()
    starts = [0, *ends[:-1]]
    out = a.new_zeros(len(ends), a.shape[1], b.shape[1])
    for g, (s, e) in enumerate(zip(starts, ends, strict=True)):
        if e > s:
            out[g] = a[s:e].t() @ b[s:e]
    return out


def experts_per_chunk(bytes_per_expert: int, budget: int, num_experts: int) -> int:
    """How many experts' dequantized weights fit a byte budget (at least one).

    Args:
        bytes_per_expert: Size of one expert's largest dequantized matrix.
        budget: Bytes allowed for one chunk.
        num_experts: ``E`` (the result never exceeds it).

    Returns:
        Experts per chunk, in ``[1, num_experts]``.
    """
    return max(1, min(num_experts, budget // max(1, bytes_per_expert)))


def _aligned(t: torch.Tensor) -> bool:
    # The native kernel needs 16-byte aligned strides (e.g. a LoRA rank of 4
    # in bf16 gives 8-byte rows); such operands take the loop instead.
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(
        (stride * size) % 16 == 0
        for stride, n in zip(t.stride(), t.shape, strict=True)
        if stride != 1 and n > 1
    )


@attrs.frozen
class RoutingPlan:
    """Where each (token, slot) assignment goes once rows are sorted by expert.

    Attributes:
        order: ``(T·k,)`` permutation of flattened assignments, grouped by expert.
        token: ``(T·k,)`` source token of each sorted row.
        weight: ``(T·k,)`` router weight of each sorted row.
        offs: ``(E,)`` int32 cumulative row ends per expert.
        counts: ``(E,)`` rows per expert.
    """

    order: torch.Tensor
    token: torch.Tensor
    weight: torch.Tensor
    offs: torch.Tensor
    counts: torch.Tensor


def routing_plan(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int
) -> RoutingPlan:
    """Sort the router's assignments by expert.

    Args:
        top_k_index: ``(T, k)`` expert of each slot.
        top_k_weights: ``(T, k)`` router weight of each slot.
        num_experts: ``E``.

    Returns:
        The :class:`RoutingPlan`.
    """
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return RoutingPlan(
        order=order,
        token=order // k,
        weight=top_k_weights.reshape(-1)[order],
        offs=torch.cumsum(counts, 0).to(torch.int32),
        counts=counts,
    )


@attrs.frozen
class ExpertLoraFactors:
    """Per-expert LoRA factors of one MoE layer, by projection.

    Attributes:
        factors: ``{"gate"|"up"|"down": (A, B)}`` with ``A: (E, r, in)`` and
            ``B: (E, out, r)``; a projection without LoRA is absent.
        scaling: ``alpha / r``.
        dropout: probability applied to the LoRA branch's input.
        training: whether dropout is active.
    """

    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float
    dropout: float = 0.0
    training: bool = False

    def delta(self, kind: str, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor | None:
        """``scaling · B(A(dropout(x)))`` for the rows of each expert, or ``None``."""
        pair = self.factors.get(kind)
        if pair is None:
            return None
        a, b = pair
        if self.dropout > 0.0 and self.training:
            x = F.dropout(x, p=self.dropout, training=True)
        low = grouped_mm(x, a.transpose(1, 2), offs)
        return grouped_mm(low, b.transpose(1, 2), offs) * self.scaling


def moe_grouped_forward(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: ExpertStack,
    down: ExpertStack,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    lora: ExpertLoraFactors | None = None,
    *,
    num_experts: int | None = None,
    chunk_experts: int | None = None,
) -> torch.Tensor:
    """One MoE expert layer as grouped products, optionally with per-expert LoRA.

    Computes, for every token ``t`` and each of its ``k`` experts ``e`` with
    router weight ``p``: ``p · W_down,e (act(W_gate,e x) ⊙ W_up,e x)`` plus the
    LoRA deltas of each projection, summed over the ``k`` slots.

    The base weights are frozen.  With a SiLU gate (Mixtral) and no active
    LoRA dropout the layer is one autograd node with a hand-written
    backward: it walks the experts ``chunk_experts`` at a time, takes just
    those experts' weights from ``gate_up``/``down`` (dequantizing them when
    these are functions) in forward and again in backward, and saves only
    the gate/up pre-activations, the outputs before the router weight and
    the LoRA rank-``r`` intermediates; ``act(gate) ⊙ up`` is recomputed.
    Otherwise (another activation, LoRA dropout while training, or base
    weights that require gradients) plain autograd runs over whole stacks.

    Args:
        hidden: ``(T, H)`` token states.
        top_k_index: ``(T, k)`` chosen experts.
        top_k_weights: ``(T, k)`` their router weights.
        gate_up: ``(E, 2I, H)`` frozen weights, gate rows then up rows, or a
            function producing a range of experts' stack (``mixtune.kernels.ExpertStack``).
        down: ``(E, H, I)`` frozen weights, or such a function.
        act_fn: the gate activation (SiLU for Mixtral).
        lora: optional per-expert LoRA factors.
        num_experts: ``E``; required when ``gate_up`` is a function.
        chunk_experts: Experts whose weights exist at once (default: all).

    Returns:
        ``(T, H)`` in ``hidden``'s dtype.

    Raises:
        ValueError: If ``gate_up`` is a function and ``num_experts`` is missing.
    """
    if isinstance(gate_up, torch.Tensor):
        num_experts = gate_up.shape[0]
    elif num_experts is None:
        raise ValueError("moe_grouped_forward: pass num_experts when gate_up is a function")
    plan = routing_plan(top_k_index, top_k_weights, num_experts)
    needs_base_grad = torch.is_grad_enabled() and any(
        isinstance(w, torch.Tensor) and w.requires_grad for w in (gate_up, down)
    )
    dropout_on = lora is not None and lora.training and lora.dropout > 0.0
    if needs_base_grad or dropout_on or not _is_silu(act_fn):
        return _autograd_forward(
            hidden,
            plan,
            _whole(gate_up, num_experts),
            _whole(down, num_experts),
            act_fn,
            lora,
        )
    chunk = num_experts if chunk_experts is None else max(1, min(chunk_experts, num_experts))
    if chunk >= num_experts:
        spans = [(0, num_experts, 0, plan.token.shape[0])]
    else:
        # Slicing rows per chunk needs the group ends on the host (one sync).
        ends = plan.offs.tolist()
        spans = []
        for start in range(0, num_experts, chunk):
            stop = min(start + chunk, num_experts)
            first = ends[start - 1] if start > 0 else 0
            spans.append((start, stop, first, ends[stop - 1]))
    factors = lora.factors if lora is not None else {}
    pairs = [factors.get(kind, (None, None)) for kind in ("gate", "up", "down")]
    spec = _FusedSpec(
        gate_up=gate_up,
        down=down,
        offs=plan.offs,
        spans=tuple(spans),
        scaling=lora.scaling if lora is not None else 1.0,
    )
    xs = hidden[plan.token]
    out: torch.Tensor = _FusedExperts.apply(  # type: ignore[no-untyped-call]
        xs, plan.weight, spec, *(t for pair in pairs for t in pair)
    )
    result = torch.zeros_like(hidden)
    return result.index_add_(0, plan.token, out.to(hidden.dtype))


def _whole(stack: ExpertStack, num_experts: int) -> torch.Tensor:
    return stack if isinstance(stack, torch.Tensor) else stack(0, num_experts)


def _span(stack: ExpertStack, start: int, stop: int) -> torch.Tensor:
    return stack[start:stop].detach() if isinstance(stack, torch.Tensor) else stack(start, stop)


def _is_silu(act_fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    # The fused backward hard-codes SiLU's derivative, so only activations
    # known to be exactly SiLU qualify: torch's, and transformers'
    # ACT2FN["silu"] (a SiLUActivation module that calls F.silu), which is
    # what Mixtral checkpoints name.
    kind = type(act_fn)
    return (
        act_fn is F.silu
        or kind is torch.nn.SiLU
        or (kind.__name__ == "SiLUActivation" and kind.__module__ == "transformers.activations")
    )


def _autograd_forward(
    hidden: torch.Tensor,
    plan: RoutingPlan,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    lora: ExpertLoraFactors | None,
) -> torch.Tensor:
    """The same layer through plain autograd (saves what autograd saves)."""
    inter = gate_up.shape[1] // 2
    xs = hidden[plan.token]
    gu = grouped_mm(xs, gate_up.transpose(1, 2), plan.offs)
    gate, up = gu[:, :inter], gu[:, inter:]
    if lora is not None:
        d_gate = lora.delta("gate", xs, plan.offs)
        d_up = lora.delta("up", xs, plan.offs)
        if d_gate is not None:
            gate = gate + d_gate
        if d_up is not None:
            up = up + d_up
    h = act_fn(gate) * up
    out = grouped_mm(h, down.transpose(1, 2), plan.offs)
    if lora is not None:
        d_down = lora.delta("down", h, plan.offs)
        if d_down is not None:
            out = out + d_down
    out = out * plan.weight.unsqueeze(-1).to(out.dtype)
    result = torch.zeros_like(hidden)
    return result.index_add_(0, plan.token, out.to(hidden.dtype))


@attrs.frozen
class _FusedSpec:
    """What the fused node needs besides its differentiable inputs."""

    gate_up: ExpertStack
    down: ExpertStack
    offs: torch.Tensor
    spans: tuple[tuple[int, int, int, int], ...]  # (expert start, stop, row start, stop)
    scaling: float


_Pair = tuple[torch.Tensor | None, torch.Tensor | None]


def _low_rank(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s · x Aᵀ, (s · x Aᵀ) Bᵀ)`` per expert group.

    The scaling goes on the rank-``r`` intermediate, not on the wide delta:
    one pass over ``N × r`` values instead of ``N × out``.
    """
    low = grouped_mm(x, a.transpose(1, 2), offs) * scaling
    return low, grouped_mm(low, b.transpose(1, 2), offs)


class _FusedExperts(torch.autograd.Function):
    """The expert MLP with per-expert LoRA as one node; base weights re-fetched in backward.

    Saved per span of experts: ``gu`` (gate and up pre-activations, LoRA
    included), ``y`` (output before the router weight) and the rank-``r``
    LoRA intermediates ``s · x Aᵀ``.  Never saved: base weights, ``act(gate) ⊙ up``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        xs: torch.Tensor,
        weight: torch.Tensor,
        spec: _FusedSpec,
        a_gate: torch.Tensor | None,
        b_gate: torch.Tensor | None,
        a_up: torch.Tensor | None,
        b_up: torch.Tensor | None,
        a_down: torch.Tensor | None,
        b_down: torch.Tensor | None,
    ) -> torch.Tensor:
        # The down projection maps back to the hidden width, which is xs's width.
        out = xs.new_empty(xs.shape)
        saved: list[torch.Tensor | None] = []
        inter = 0
        for start, stop, first, last in spec.spans:
            if last == first:
                saved.extend([None] * 5)
                continue
            x = xs[first:last]
            offs = spec.offs[start:stop] - first
            w = _span(spec.gate_up, start, stop)
            gu = grouped_mm(x, w.transpose(1, 2), offs)
            del w
            inter = gu.shape[1] // 2
            lows: list[torch.Tensor | None] = []
            for (a, b), cols in (
                ((a_gate, b_gate), slice(0, inter)),
                ((a_up, b_up), slice(inter, 2 * inter)),
            ):
                if a is None or b is None:
                    lows.append(None)
                    continue
                low, delta = _low_rank(x, a[start:stop], b[start:stop], offs, spec.scaling)
                gu[:, cols] += delta.to(gu.dtype)
                lows.append(low)
            h = F.silu(gu[:, :inter]).mul_(gu[:, inter:])
            w = _span(spec.down, start, stop)
            y = grouped_mm(h, w.transpose(1, 2), offs)
            del w
            low_down = None
            if a_down is not None and b_down is not None:
                low_down, delta = _low_rank(
                    h, a_down[start:stop], b_down[start:stop], offs, spec.scaling
                )
                y += delta.to(y.dtype)
            torch.mul(y, weight[first:last, None].to(y.dtype), out=out[first:last])
            saved.extend([gu, y, lows[0], lows[1], low_down])
        ctx.spec = spec
        ctx.save_for_backward(xs, weight, a_gate, b_gate, a_up, b_up, a_down, b_down, *saved)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        spec: _FusedSpec = ctx.spec
        saved = list(ctx.saved_tensors)
        xs, weight = saved[0], saved[1]
        params: list[torch.Tensor | None] = saved[2:8]
        # Under activation checkpointing the recomputed tensors are referenced
        # only from here, so each span's are dropped as soon as it is done.
        per_span: list[torch.Tensor | None] = saved[8:]
        del saved
        need = ctx.needs_input_grad
        grad_x = torch.zeros_like(xs) if need[0] else None
        grad_w = torch.zeros_like(weight) if need[1] else None
        grads: list[torch.Tensor | None] = [
            torch.zeros_like(p) if p is not None and need[3 + i] else None
            for i, p in enumerate(params)
        ]
        a_gate, b_gate, a_up, b_up, a_down, b_down = params
        s = spec.scaling
        for index, (start, stop, first, last) in enumerate(spec.spans):
            gu, y, low_gate, low_up, low_down = per_span[5 * index : 5 * index + 5]
            per_span[5 * index : 5 * index + 5] = [None] * 5
            if last == first or gu is None or y is None:
                continue
            x = xs[first:last]
            offs = spec.offs[start:stop] - first
            g = grad_out[first:last]
            if grad_w is not None:
                grad_w[first:last] = (g.float() * y.float()).sum(-1).to(grad_w.dtype)
            del y
            dy = g * weight[first:last, None].to(g.dtype)
            inter = gu.shape[1] // 2
            gate, up = gu[:, :inter], gu[:, inter:]
            act = F.silu(gate)
            d_low_down = None
            if a_down is not None and b_down is not None and low_down is not None:
                d_low_down = grouped_mm(dy, b_down[start:stop], offs) * s
                if grads[5] is not None:  # low_down already carries the scaling
                    grads[5][start:stop] = grouped_wgrad(dy, low_down, offs)
                if grads[4] is not None:
                    h = act * up
                    grads[4][start:stop] = grouped_wgrad(d_low_down, h, offs)
                    del h
            w = _span(spec.down, start, stop)
            dh = grouped_mm(dy, w, offs)
            del w, dy
            if d_low_down is not None and a_down is not None:
                dh += grouped_mm(d_low_down, a_down[start:stop], offs).to(dh.dtype)
            # d gate = silu'(gate) · dh · up and d up = dh · act(gate), written
            # straight into one buffer (the gate half first holds dh · up).
            dgu = torch.empty_like(gu)
            torch.mul(dh, up, out=dgu[:, :inter])
            torch.ops.aten.silu_backward.grad_input(dgu[:, :inter], gate, grad_input=dgu[:, :inter])
            torch.mul(dh, act, out=dgu[:, inter:])
            del dh, act, gate, up, gu
            if grad_x is None and all(grads[i] is None for i in range(4)):
                continue
            dx = None
            if grad_x is not None:
                w = _span(spec.gate_up, start, stop)
                dx = grouped_mm(dgu, w, offs)
                del w
            for i, (a, b, low, cols) in enumerate(
                (
                    (a_gate, b_gate, low_gate, slice(0, inter)),
                    (a_up, b_up, low_up, slice(inter, 2 * inter)),
                )
            ):
                if a is None or b is None or low is None:
                    continue
                d_part = dgu[:, cols]
                d_low = grouped_mm(d_part, b[start:stop], offs) * s
                grad_a, grad_b = grads[2 * i], grads[2 * i + 1]
                if grad_b is not None:
                    grad_b[start:stop] = grouped_wgrad(d_part, low, offs)
                if grad_a is not None:
                    grad_a[start:stop] = grouped_wgrad(d_low, x, offs)
                if dx is not None:
                    dx += grouped_mm(d_low, a[start:stop], offs).to(dx.dtype)
            del dgu
            if grad_x is not None and dx is not None:
                grad_x[first:last] = dx
        return (grad_x, grad_w, None, *grads)
