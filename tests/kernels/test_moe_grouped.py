"""The grouped MoE path against a per-token float64 reference written independently."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtune.kernels import ExpertLoraFactors, grouped_mm, moe_grouped_forward, routing_plan
from tests.conftest import requires_gpu

KINDS = ("gate", "up", "down")


def _problem(t: int, h: int, i: int, e: int, k: int, r: int, device: str, dtype: torch.dtype):
    """Fresh random inputs on every call: the fast path must hold on any input."""
    hidden = torch.randn(t, h, device=device, dtype=dtype)
    logits = torch.randn(t, e, device=device)
    probs, idx = torch.topk(logits.softmax(-1), k, dim=-1)
    probs = (probs / probs.sum(-1, keepdim=True)).to(dtype)
    gate_up = torch.randn(e, 2 * i, h, device=device, dtype=dtype) / h**0.5
    down = torch.randn(e, h, i, device=device, dtype=dtype) / i**0.5
    dims = {"gate": (h, i), "up": (h, i), "down": (i, h)}
    factors = {
        kind: (
            (torch.randn(e, r, fan_in, device=device, dtype=dtype) / fan_in**0.5).requires_grad_(),
            (torch.randn(e, fan_out, r, device=device, dtype=dtype) / r**0.5).requires_grad_(),
        )
        for kind, (fan_in, fan_out) in dims.items()
    }
    return hidden, idx, probs, gate_up, down, factors


def _reference(hidden, idx, probs, gate_up, down, factors, scaling):
    """Float64 math slot by slot: for each slot and expert, the rows choosing it.

    No sorting or grouped products; weights are never gathered per token, so
    it fits in memory at Mixtral width.
    """
    f64 = {k: (a.double(), b.double()) for k, (a, b) in factors.items()}
    x = hidden.double()
    inter = gate_up.shape[1] // 2
    out = torch.zeros_like(x)
    for slot in range(idx.shape[1]):
        for e in range(gate_up.shape[0]):
            rows = (idx[:, slot] == e).nonzero().flatten()
            if rows.numel() == 0:
                continue
            xe = x[rows]
            w = gate_up[e].double()

            def lora(kind, v, e=e):
                a, b = f64[kind]
                return scaling * (v @ a[e].T) @ b[e].T

            g = xe @ w[:inter].T + lora("gate", xe)
            u = xe @ w[inter:].T + lora("up", xe)
            hid = F.silu(g) * u
            o = hid @ down[e].double().T + lora("down", hid)
            contrib = probs[rows, slot].double().unsqueeze(-1) * o
            out = out.index_add(0, rows, contrib)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _check(
    device: str,
    dtype: torch.dtype,
    tol: float,
    sizes: tuple[int, ...],
    *,
    chunk_experts: int | None = None,
    as_functions: bool = False,
    idle_expert: bool = False,
) -> None:
    t, h, i, e, k, r = sizes
    hidden, idx, probs, gate_up, down, factors = _problem(t, h, i, e, k, r, device, dtype)
    if idle_expert:
        # Expert 0 gets no token: its span is empty and its factors get zeros.
        idx = torch.where(idx == 0, torch.full_like(idx, e - 1), idx)
        idx[:, 1] = torch.where(idx[:, 0] == idx[:, 1], (idx[:, 0] % (e - 1)) + 1, idx[:, 1])
    hidden.requires_grad_()
    probs.requires_grad_()
    scaling = 2.0
    lora = ExpertLoraFactors(factors=factors, scaling=scaling)
    stacks: tuple = (gate_up, down)
    if as_functions:
        stacks = (lambda s, e_: gate_up[s:e_].clone(), lambda s, e_: down[s:e_].clone())
    out = moe_grouped_forward(
        hidden,
        idx,
        probs,
        *stacks,
        F.silu,
        lora,
        num_experts=e,
        chunk_experts=chunk_experts,
    )
    ref_in = hidden.detach().double().requires_grad_()
    ref_probs = probs.detach().double().requires_grad_()
    ref_factors = {
        kind: (a.detach().double().requires_grad_(), b.detach().double().requires_grad_())
        for kind, (a, b) in factors.items()
    }
    ref = _reference(ref_in, idx, ref_probs, gate_up, down, ref_factors, scaling)
    assert _rel(out, ref) <= tol

    upstream = torch.randn_like(ref)
    (out.float() * upstream.to(out.device, torch.float32)).sum().backward()
    (ref * upstream).sum().backward()
    assert _rel(hidden.grad, ref_in.grad) <= tol
    assert _rel(probs.grad, ref_probs.grad) <= tol
    for kind in KINDS:
        for got, want in zip(factors[kind], ref_factors[kind], strict=True):
            assert _rel(got.grad, want.grad) <= tol, kind
    # Every expert that received a token must get a gradient on each factor.
    routed = torch.bincount(idx.reshape(-1), minlength=e) > 0
    for kind in KINDS:
        for factor in factors[kind]:
            per_expert = factor.grad.abs().flatten(1).sum(-1)
            assert bool((per_expert[routed] > 0).all()), kind
            assert bool((per_expert[~routed] == 0).all()), kind


@pytest.mark.parametrize("chunk_experts", [None, 1, 2, 4, 6])
@pytest.mark.parametrize("as_functions", [False, True])
def test_grouped_forward_backward_match_reference_cpu(
    chunk_experts: int | None, as_functions: bool
) -> None:
    _check(
        "cpu",
        torch.float32,
        1e-5,
        (48, 32, 24, 6, 2, 4),
        chunk_experts=chunk_experts,
        as_functions=as_functions,
    )


@pytest.mark.parametrize("chunk_experts", [None, 1, 3])
def test_an_expert_without_tokens_gets_zero_gradients(chunk_experts: int | None) -> None:
    _check(
        "cpu",
        torch.float32,
        1e-5,
        (40, 16, 12, 5, 2, 4),
        chunk_experts=chunk_experts,
        idle_expert=True,
    )


def test_base_weights_are_fetched_again_in_backward_not_saved() -> None:
    """Span by span the stacks are produced on demand twice; none is kept by autograd."""
    e, h, i = 4, 16, 12
    hidden, idx, probs, gate_up, down, factors = _problem(64, h, i, e, 2, 4, "cpu", torch.float32)
    hidden.requires_grad_()
    calls: list[tuple[str, int, int]] = []

    def source(kind, full):
        def fetch(s, stop):
            calls.append((kind, s, stop))
            return full[s:stop].clone()

        return fetch

    saved_shapes: list[tuple[int, ...]] = []

    def pack(t):
        saved_shapes.append(tuple(t.shape))
        return t

    lora = ExpertLoraFactors(factors=factors, scaling=1.0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = moe_grouped_forward(
            hidden,
            idx,
            probs,
            source("gate_up", gate_up),
            source("down", down),
            F.silu,
            lora,
            num_experts=e,
            chunk_experts=2,
        )
    forward_calls = list(calls)
    assert sorted(forward_calls) == sorted(
        [("gate_up", 0, 2), ("down", 0, 2), ("gate_up", 2, 4), ("down", 2, 4)]
    )
    out.sum().backward()
    assert sorted(calls[len(forward_calls) :]) == sorted(forward_calls)
    assert (2, 2 * i, h) not in saved_shapes
    assert (2, h, i) not in saved_shapes
    assert hidden.grad is not None
    assert float(hidden.grad.abs().sum()) > 0


def test_fused_and_autograd_paths_agree() -> None:
    """A non-SiLU activation takes plain autograd; with SiLU both give the same numbers."""
    hidden, idx, probs, gate_up, down, factors = _problem(50, 16, 12, 4, 2, 4, "cpu", torch.float64)
    lora = ExpertLoraFactors(factors=factors, scaling=0.5)

    class NotSiLU(torch.nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    results = []
    for act in (F.silu, NotSiLU()):
        x = hidden.clone().requires_grad_()
        out = moe_grouped_forward(x, idx, probs, gate_up, down, act, lora, chunk_experts=3)
        out.square().sum().backward()
        grads = [x.grad] + [t.grad.clone() for pair in factors.values() for t in pair]
        for pair in factors.values():
            for t in pair:
                t.grad = None
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b)


def test_lora_dropout_is_active_only_in_training() -> None:
    hidden, idx, probs, gate_up, down, factors = _problem(64, 16, 8, 4, 2, 4, "cpu", torch.float32)
    train = ExpertLoraFactors(factors=factors, scaling=1.0, dropout=0.5, training=True)
    evaluation = ExpertLoraFactors(factors=factors, scaling=1.0, dropout=0.5, training=False)
    a = moe_grouped_forward(hidden, idx, probs, gate_up, down, F.silu, train)
    b = moe_grouped_forward(hidden, idx, probs, gate_up, down, F.silu, train)
    c = moe_grouped_forward(hidden, idx, probs, gate_up, down, F.silu, evaluation)
    d = moe_grouped_forward(hidden, idx, probs, gate_up, down, F.silu, evaluation)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(c, d, rtol=0, atol=0)


def test_without_lora_equals_transformers_experts() -> None:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=32, intermediate_size=24, num_local_experts=5)
    experts = MixtralExperts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    hidden = torch.randn(40, 32)
    probs, idx = torch.topk(torch.randn(40, 5).softmax(-1), 2, dim=-1)
    with torch.no_grad():
        want = experts(hidden, idx, probs)
        got = moe_grouped_forward(
            hidden, idx, probs, experts.gate_up_proj, experts.down_proj, F.silu
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(1, 40),
    experts=st.integers(1, 9),
    data=st.data(),
)
def test_routing_plan_places_every_assignment_once(
    tokens: int, experts: int, data: st.DataObject
) -> None:
    k = data.draw(st.integers(1, experts))
    idx = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k)
    plan = routing_plan(idx, weights, experts)
    assert int(plan.counts.sum()) == tokens * k
    assert int(plan.offs[-1]) == tokens * k
    sorted_experts = idx.reshape(-1)[plan.order]
    assert bool((sorted_experts[1:] >= sorted_experts[:-1]).all())
    pairs = sorted(zip(plan.token.tolist(), sorted_experts.tolist(), strict=True))
    want = sorted((t, int(e)) for t in range(tokens) for e in idx[t])
    assert pairs == want
    torch.testing.assert_close(plan.weight.sum(), weights.sum())


def test_grouped_mm_fallback_handles_empty_groups() -> None:
    x = torch.randn(5, 4)
    w = torch.randn(3, 4, 2)
    offs = torch.tensor([0, 5, 5], dtype=torch.int32)
    out = grouped_mm(x, w, offs)
    torch.testing.assert_close(out, x @ w[1])


@pytest.mark.gpu
@requires_gpu
def test_grouped_forward_backward_match_reference_gpu_mixtral_width() -> None:
    # Mixtral-8x7B expert width on a few hundred tokens: native bf16 grouped_mm.
    _check("cuda", torch.bfloat16, 1e-2, (256, 4096, 14336, 8, 2, 16))


@pytest.mark.gpu
@requires_gpu
def test_chunked_fetch_matches_reference_gpu_mixtral_width() -> None:
    # Two experts' weights at a time, produced by a function as 4-bit storage does.
    _check(
        "cuda",
        torch.bfloat16,
        1e-2,
        (512, 4096, 14336, 8, 2, 16),
        chunk_experts=2,
        as_functions=True,
    )


def test_misaligned_operands_are_detected() -> None:
    from mixtune.kernels._moe import _aligned

    a = torch.zeros(4, 16, 4, dtype=torch.bfloat16)  # rank-4 rows: 8-byte strides
    b = torch.zeros(4, 16, 8, dtype=torch.bfloat16)  # rank-8 rows: 16-byte strides
    assert not _aligned(a.transpose(1, 2))
    assert _aligned(b)
    assert _aligned(b.transpose(1, 2))
