"""MoEExperts and QuantLinear against float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixtune.model import MoEExperts, QuantLinear, QuantSpec

E, H, INTER = 4, 64, 96


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _filled(quant: QuantSpec, dtype: torch.dtype = torch.float32) -> MoEExperts:
    experts = MoEExperts(E, H, INTER, quant=quant, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    for e in range(E):
        experts.set_weight("gate_up", e, torch.randn(2 * INTER, H, generator=gen) * 0.05)
        experts.set_weight("down", e, torch.randn(H, INTER, generator=gen) * 0.05)
    return experts


def _reference(
    experts: MoEExperts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """Dense float64 MoE from the dequantized weights: every token, every expert."""
    out = torch.zeros_like(x)
    for e in range(E):
        gate_up = experts.weight("gate_up", e, torch.float64)
        down = experts.weight("down", e, torch.float64)
        gate, up = (x @ gate_up.T).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ down.T
        weight = (w.double() * (idx == e)).sum(-1, keepdim=True)
        out = out + weight * y
    return out


SPECS = [
    pytest.param(QuantSpec.nf4(compute_dtype=torch.float32), id="nf4-fp32"),
    pytest.param(QuantSpec.nf4(compute_dtype=torch.bfloat16), id="nf4-bf16"),
    pytest.param(QuantSpec.fp4(double_quant=False, compute_dtype=torch.float32), id="fp4"),
    pytest.param(QuantSpec.none(), id="none"),
]


@pytest.mark.parametrize("quant", SPECS)
def test_forward_and_input_grad_match_float64_reference(quant: QuantSpec) -> None:
    experts = _filled(quant)
    # Fresh inputs every run (no seed): the property must hold for any draw.
    x = torch.randn(24, H, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:2] for _ in range(24)])
    w = torch.softmax(torch.randn(24, 2), -1)
    y = experts(x, idx, w)
    x64 = x.detach().double().requires_grad_()
    ref = _reference(experts, x64, idx, w)
    assert y.dtype == x.dtype
    assert _rel(y, ref) <= 1e-2
    g = torch.randn_like(ref)
    y.backward(g.to(y.dtype))
    ref.backward(g)
    assert x.grad is not None
    assert x64.grad is not None
    assert _rel(x.grad, x64.grad) <= 1e-2


@pytest.mark.parametrize("quant", SPECS)
def test_base_weights_never_get_gradients(quant: QuantSpec) -> None:
    experts = _filled(quant)
    x = torch.randn(8, H, requires_grad=True)
    experts(x, torch.zeros(8, 2, dtype=torch.long), torch.ones(8, 2)).sum().backward()
    assert all(p.grad is None for p in experts.parameters())
    assert all(not p.requires_grad for p in experts.parameters())


def test_matches_stock_mixtral_experts_when_unquantized() -> None:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=H, intermediate_size=INTER, num_local_experts=E)
    stock = MixtralExperts(config)
    nn.init.normal_(stock.gate_up_proj, std=0.05)
    nn.init.normal_(stock.down_proj, std=0.05)
    ours = MoEExperts.from_experts(stock, quant=QuantSpec.none())
    x = torch.randn(16, H)
    idx = torch.stack([torch.randperm(E)[:2] for _ in range(16)])
    w = torch.softmax(torch.randn(16, 2), -1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, idx, w), stock(x, idx, w))
    quantized = MoEExperts.from_experts(stock, quant=QuantSpec.nf4(compute_dtype=torch.float32))
    with torch.no_grad():
        # Two 4-bit matmuls in a row: ~10% each.
        assert _rel(quantized(x, idx, w), stock(x, idx, w)) < 0.35


def test_weight_returns_gate_rows_then_up_rows() -> None:
    experts = MoEExperts(2, H, INTER, quant=QuantSpec.none(), dtype=torch.float32)
    gate, up = torch.randn(INTER, H), torch.randn(INTER, H)
    experts.set_weight("gate_up", 1, torch.cat([gate, up]))
    torch.testing.assert_close(experts.weight("gate_up", 1)[:INTER], gate)
    x = torch.randn(3, H)
    torch.testing.assert_close(experts.project("gate_up", 1, x)[:, INTER:], x @ up.T)


def test_project_recomputes_instead_of_saving_the_weight() -> None:
    experts = _filled(QuantSpec.nf4(compute_dtype=torch.float32))
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(5, H, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = experts.project("gate_up", 0, x)
    # Nothing of the (2I, H) dequantized weight is kept for backward.
    assert all(t.numel() < 2 * INTER * H for t in saved)
    y.sum().backward()
    assert x.grad is not None


def test_bad_arguments() -> None:
    experts = _filled(QuantSpec.nf4())
    with pytest.raises(IndexError, match="out of range"):
        experts.weight("down", E)
    with pytest.raises(ValueError, match="kind"):
        experts.weight("up", 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        experts.set_weight("down", 0, torch.zeros(INTER, H))


@pytest.mark.parametrize("bias", [False, True])
def test_quant_linear_matches_reference_and_survives_eval_no_grad(bias: bool) -> None:
    linear = nn.Linear(H, 48, bias=bias)
    q = QuantLinear.from_linear(linear, quant=QuantSpec.nf4(compute_dtype=torch.float32))
    weight = q.dequantize(torch.float64)
    ref_bias = linear.bias.detach().double() if bias else torch.zeros(48, dtype=torch.float64)

    # The Linear4bit trap: an eval forward under no_grad must not break later training.
    q.eval()
    with torch.no_grad():
        q(torch.randn(2, H))
    q.train()
    x = torch.randn(7, H, requires_grad=True)
    y = q(x)
    ref = x.detach().double() @ weight.T + ref_bias
    assert _rel(y, ref) <= 1e-2
    y.sum().backward()
    assert x.grad is not None
    expected = torch.ones(7, 48, dtype=torch.float64) @ weight
    assert _rel(x.grad, expected) <= 1e-2
    assert all(p.grad is None for p in q.parameters())
