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

import attrs
import torch
import torch.nn.functional as F

__all__ = [
    "ExpertLoraFactors",
    "RoutingPlan",
    "grouped_mm",
    "grouped_mm_reference",
    "grouped_path_available",
    "moe_grouped_forward",
    "routing_plan",
]

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
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    lora: ExpertLoraFactors | None = None,
) -> torch.Tensor:
    """One MoE expert layer as grouped products, optionally with per-expert LoRA.

    Computes, for every token ``t`` and each of its ``k`` experts ``e`` with
    router weight ``p``: ``p · W_down,e (act(W_gate,e x) ⊙ W_up,e x)`` plus the
    LoRA deltas of each projection, summed over the ``k`` slots.

    Args:
        hidden: ``(T, H)`` token states.
        top_k_index: ``(T, k)`` chosen experts.
        top_k_weights: ``(T, k)`` their router weights.
        gate_up: ``(E, 2I, H)`` frozen weights, gate rows then up rows.
        down: ``(E, H, I)`` frozen weights.
        act_fn: the gate activation (SiLU for Mixtral).
        lora: optional per-expert LoRA factors.

    Returns:
        ``(T, H)`` in ``hidden``'s dtype.
    """
    num_experts, two_i, _ = gate_up.shape
    inter = two_i // 2
    plan = routing_plan(top_k_index, top_k_weights, num_experts)
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
