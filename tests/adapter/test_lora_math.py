"""The LoRA modules against plain per-token float64 math on the dequantized weights."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts, MixtralTopKRouter

from mixtune.adapter import LoraExperts, LoraLinear, LoraRouter
from mixtune.adapter._lora import StockExperts
from mixtune.model import MoEExperts, QuantSpec

from .helpers import nf4, reference_experts, relative_error

PROJECTION_SETS = [("gate", "up", "down"), ("gate",), ("up", "down"), ("down",)]


BASES = ["nf4", "none", "stock"]


def _experts(config: MixtralConfig, kind: str) -> nn.Module:
    """Seeded experts: mixtune's NF4 or plain ``MoEExperts``, or transformers' own."""
    torch.manual_seed(0)
    stock = MixtralExperts(config)
    nn.init.normal_(stock.gate_up_proj, std=0.1)
    nn.init.normal_(stock.down_proj, std=0.1)
    if kind == "stock":
        return StockExperts(stock)
    quant = nf4() if kind == "nf4" else QuantSpec.none(compute_dtype=torch.float32)
    return MoEExperts.from_experts(stock, quant=quant)


def _routing(tokens: int, config: MixtralConfig, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    e, k = config.num_local_experts, config.num_experts_per_tok
    # Every expert gets tokens: the first e·k slots cycle through the experts.
    scores = torch.rand(tokens, e, generator=gen)
    index = scores.topk(k, dim=-1).indices
    cycle = torch.arange(tokens * k) % e
    index[:e, 0] = cycle[:e]
    index[:e, 1] = (cycle[:e] + 1) % e
    weights = torch.softmax(torch.rand(tokens, k, generator=gen), dim=-1)
    return index, weights


def _reference_inputs(
    lora: LoraExperts,
) -> tuple[dict[str, list[Tensor]], dict[str, tuple[Tensor, Tensor]]]:
    base = lora.base
    weights = {
        kind: [base.weight(kind, e, torch.float64) for e in range(lora.num_experts)]
        for kind in ("gate_up", "down")
    }
    factors = {}
    for proj in lora.projections:
        f = lora.factors(proj)
        assert f is not None
        factors[proj] = (
            f.lora_A.detach().double().requires_grad_(True),
            f.lora_B.detach().double().requires_grad_(True),
        )
    return weights, factors


@pytest.mark.parametrize("base_kind", BASES)
@pytest.mark.parametrize("projections", PROJECTION_SETS, ids=lambda p: "+".join(p))
def test_expert_lora_forward_and_backward_match_reference(
    mixtral_config: MixtralConfig, base_kind: str, projections: tuple[str, ...], fresh_seed: int
) -> None:
    base = _experts(mixtral_config, base_kind)
    lora = LoraExperts(
        base,
        projections=projections,  # type: ignore[arg-type]
        r=4,
        scale=2.0,
        dropout=0.0,
        generator=torch.Generator().manual_seed(3),
    )
    gen = torch.Generator().manual_seed(fresh_seed)
    with torch.no_grad():
        for proj in projections:
            f = lora.factors(proj)  # type: ignore[arg-type]
            assert f is not None
            f.lora_B.normal_(0, 0.1, generator=gen)
    tokens = 24
    x = torch.randn(tokens, mixtral_config.hidden_size, generator=gen)
    index, weights = _routing(tokens, mixtral_config, gen)
    x_ours = x.clone().requires_grad_(True)
    out = lora(x_ours, index, weights)
    grad_out = torch.randn(out.shape, generator=gen)
    (out * grad_out).sum().backward()

    ref_weights, ref_factors = _reference_inputs(lora)
    x_ref = x.double().requires_grad_(True)
    expected = reference_experts(x_ref, index, weights, ref_weights, ref_factors, scale=2.0)
    (expected * grad_out.double()).sum().backward()

    assert relative_error(out, expected) <= 1e-2
    assert x_ours.grad is not None
    assert x_ref.grad is not None
    assert relative_error(x_ours.grad, x_ref.grad) <= 1e-2
    for proj, (a_ref, b_ref) in ref_factors.items():
        f = lora.factors(proj)  # type: ignore[arg-type]
        assert f is not None
        assert f.lora_A.grad is not None
        assert f.lora_B.grad is not None
        assert a_ref.grad is not None
        assert b_ref.grad is not None
        assert relative_error(f.lora_A.grad, a_ref.grad) <= 1e-2, proj
        assert relative_error(f.lora_B.grad, b_ref.grad) <= 1e-2, proj
    # Base weights stay frozen and only the chosen projections have factors.
    assert [lora.factors(p) is not None for p in ("gate", "up", "down")] == [
        p in projections for p in ("gate", "up", "down")
    ]


def test_expert_lora_with_zero_b_equals_the_base(mixtral_config: MixtralConfig) -> None:
    base = _experts(mixtral_config, "nf4")
    lora = LoraExperts(
        base,
        projections=("gate", "up", "down"),
        r=4,
        scale=2.0,
        dropout=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, mixtral_config.hidden_size, generator=gen)
    index, weights = _routing(16, mixtral_config, gen)
    torch.testing.assert_close(lora(x, index, weights), base(x, index, weights))


def test_expert_dropout_is_active_in_train_mode_only(mixtral_config: MixtralConfig) -> None:
    lora = LoraExperts(
        _experts(mixtral_config, "none"),
        projections=("gate", "up", "down"),
        r=4,
        scale=2.0,
        dropout=0.5,
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        for proj in ("gate", "up", "down"):
            f = lora.factors(proj)  # type: ignore[arg-type]
            assert f is not None
            f.lora_B.normal_(0, 0.5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, mixtral_config.hidden_size, generator=gen)
    index, weights = _routing(16, mixtral_config, gen)
    lora.train()
    assert not torch.allclose(lora(x, index, weights), lora(x, index, weights))
    lora.eval()
    torch.testing.assert_close(lora(x, index, weights), lora(x, index, weights), rtol=0, atol=0)


def test_lora_linear_matches_reference(fresh_seed: int) -> None:
    gen = torch.Generator().manual_seed(fresh_seed)
    base = nn.Linear(32, 48, bias=True)
    layer = LoraLinear(
        base, r=4, scale=1.5, dropout=0.0, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1, generator=gen)
    x = torch.randn(5, 7, 32, generator=gen)
    w = base.weight.double() + 1.5 * layer.lora_B.double() @ layer.lora_A.double()
    expected = x.double() @ w.T + base.bias.double()
    assert relative_error(layer(x), expected) <= 1e-5
    assert layer.lora_A.shape == (4, 32)
    assert layer.lora_B.shape == (48, 4)


def test_router_lora_matches_reference_and_keeps_router_type(
    mixtral_config: MixtralConfig, fresh_seed: int
) -> None:
    gen = torch.Generator().manual_seed(fresh_seed)
    router = MixtralTopKRouter(mixtral_config)
    nn.init.normal_(router.weight, std=0.1)
    lora = LoraRouter(
        router, r=4, scale=2.0, dropout=0.0, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.5, generator=gen)
    x = torch.randn(2, 9, mixtral_config.hidden_size, generator=gen)
    logits, scores, index = lora(x)
    w = router.weight.double() + 2.0 * lora.lora_B.double() @ lora.lora_A.double()
    expected = x.reshape(-1, mixtral_config.hidden_size).double() @ w.T
    assert relative_error(logits, expected) <= 1e-5
    probs = F.softmax(expected, dim=-1)
    top, top_index = probs.topk(mixtral_config.num_experts_per_tok, dim=-1)
    assert torch.equal(index, top_index)
    torch.testing.assert_close(
        scores.double(), top / top.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6
    )
    # transformers records router logits by class; the wrapper must still match.
    assert isinstance(lora, MixtralTopKRouter)
