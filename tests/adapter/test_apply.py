"""Applying a spec: wrapping, freezing, coverage, determinism, typed errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mixtune.adapter import AdapterSpec, LoraExperts, LoraLinear, LoraRouter
from mixtune.errors import AdapterError, TargetNotFoundError
from mixtune.model import QuantSpec

from .helpers import Loaded, lora_params, nudge_lora_b, quantize

ALL = ("attention", "experts", "router", "lm_head")


def test_only_lora_factors_are_trainable(tiny_mixtral: nn.Module) -> None:
    adapted = AdapterSpec.lora(targets=ALL, r=4).apply(Loaded(tiny_mixtral))
    trainable = {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_params(adapted.model))
    assert trainable == set(adapted.lora_state_dict())
    assert adapted.trainable_parameters() == adapted.coverage.lora_parameters > 0


def test_modules_are_wrapped_in_place(tiny_mixtral: nn.Module) -> None:
    adapted = AdapterSpec.lora(targets=ALL, r=4).apply(Loaded(tiny_mixtral))
    assert adapted.model is tiny_mixtral
    layer = tiny_mixtral.model.layers[1]
    assert isinstance(layer.self_attn.q_proj, LoraLinear)
    assert isinstance(layer.self_attn.o_proj, LoraLinear)
    assert isinstance(layer.mlp.experts, LoraExperts)
    assert isinstance(layer.mlp.gate, LoraRouter)
    assert isinstance(tiny_mixtral.lm_head, LoraLinear)


def test_lora_state_dict_names_and_shapes(tiny_mixtral: nn.Module) -> None:
    adapted = AdapterSpec.lora(targets=ALL, r=4).apply(Loaded(tiny_mixtral))
    sd = adapted.lora_state_dict()
    e, h, i, v = 4, 64, 96, 96
    assert sd["model.layers.0.self_attn.q_proj.lora_A"].shape == (4, h)
    assert sd["model.layers.0.self_attn.k_proj.lora_B"].shape == (32, 4)
    assert sd["model.layers.0.mlp.experts.gate_proj.lora_A"].shape == (e, 4, h)
    assert sd["model.layers.0.mlp.experts.gate_proj.lora_B"].shape == (e, i, 4)
    assert sd["model.layers.0.mlp.experts.up_proj.lora_B"].shape == (e, i, 4)
    assert sd["model.layers.0.mlp.experts.down_proj.lora_A"].shape == (e, 4, i)
    assert sd["model.layers.0.mlp.experts.down_proj.lora_B"].shape == (e, h, 4)
    assert sd["model.layers.1.mlp.gate.lora_A"].shape == (4, h)
    assert sd["model.layers.1.mlp.gate.lora_B"].shape == (e, 4)
    assert sd["lm_head.lora_B"].shape == (v, 4)
    assert len(sd) == 2 * (2 * (4 + 3 + 1) + 1)


def test_apply_is_an_identity_until_b_moves(tiny_mixtral: nn.Module) -> None:
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        before = tiny_mixtral(ids).logits
    adapted = AdapterSpec.lora(targets=ALL, r=4).apply(Loaded(tiny_mixtral))
    with torch.no_grad():
        torch.testing.assert_close(adapted.model(ids).logits, before)
        nudge_lora_b(adapted.model)
        assert not torch.allclose(adapted.model(ids).logits, before)


def test_init_is_deterministic_per_seed(tiny_mixtral: nn.Module) -> None:
    spec = AdapterSpec.lora(targets=ALL, r=4)
    first = spec.apply(Loaded(copy.deepcopy(tiny_mixtral)), seed=7).lora_state_dict()
    again = spec.apply(Loaded(copy.deepcopy(tiny_mixtral)), seed=7).lora_state_dict()
    other = spec.apply(Loaded(copy.deepcopy(tiny_mixtral)), seed=8).lora_state_dict()
    for name, tensor in first.items():
        torch.testing.assert_close(tensor, again[name], rtol=0, atol=0)
        if name.endswith("lora_B"):
            assert not tensor.any(), f"{name} must start at zero"
        else:
            assert not torch.equal(tensor, other[name]), name
            # Kaiming-uniform bound of nn.Linear: 1/sqrt(fan_in).
            assert tensor.abs().max() <= 1 / tensor.shape[-1] ** 0.5
            assert tensor.std() > 0.25 / tensor.shape[-1] ** 0.5


def test_apply_runs_no_forward_pass(tiny_mixtral: nn.Module) -> None:
    calls: list[str] = []
    for name, module in tiny_mixtral.named_modules():
        module.register_forward_pre_hook(lambda *_, n=name: calls.append(n))
    AdapterSpec.lora(targets=ALL).apply(Loaded(tiny_mixtral))
    assert calls == []


def test_lora_state_dict_round_trip(tiny_mixtral: nn.Module) -> None:
    spec = AdapterSpec.lora(targets=ALL, r=4)
    source = spec.apply(Loaded(copy.deepcopy(tiny_mixtral)), seed=1)
    nudge_lora_b(source.model)
    target = spec.apply(Loaded(copy.deepcopy(tiny_mixtral)), seed=2)
    target.load_lora_state_dict(source.lora_state_dict())
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(target.model(ids).logits, source.model(ids).logits)


def test_load_lora_state_dict_rejects_mismatches(tiny_mixtral: nn.Module) -> None:
    adapted = AdapterSpec.lora(targets=ALL, r=4).apply(Loaded(tiny_mixtral))
    sd = dict(adapted.lora_state_dict())
    sd.pop("lm_head.lora_A")
    sd["extra.lora_A"] = torch.zeros(1)
    sd["model.layers.0.mlp.gate.lora_B"] = torch.zeros(3, 3)
    with pytest.raises(AdapterError) as info:
        adapted.load_lora_state_dict(sd)
    text = str(info.value)
    assert "lm_head.lora_A" in text
    assert "extra.lora_A" in text
    assert "model.layers.0.mlp.gate.lora_B" in text


def test_coverage_lists_every_targeted_module_and_expert(tiny_mixtral: nn.Module) -> None:
    adapted = AdapterSpec.lora(targets=("attention", "w2", "lm_head"), layers=(1,), r=4).apply(
        Loaded(tiny_mixtral)
    )
    report = adapted.coverage
    rows = {(e.module, e.expert): e for e in report.entries}
    # Layer 0 matched but is excluded by ``layers``: listed, not adapted.
    skipped = rows[("model.layers.0.self_attn.q_proj", None)]
    assert not skipped.adapted
    assert skipped.lora_A_shape is None
    assert not isinstance(tiny_mixtral.model.layers[0].self_attn.q_proj, LoraLinear)
    down = [e for e in report.adapted if e.kind == "expert"]
    assert [(e.module, e.expert) for e in down] == [
        ("model.layers.1.mlp.experts.down_proj", x) for x in range(4)
    ]
    assert all(e.lora_A_shape == (4, 96) and e.lora_B_shape == (64, 4) for e in down)
    assert down[0].base_shape == (64, 96)
    assert rows[("lm_head", None)].adapted
    assert rows[("lm_head", None)].layer is None
    assert report.by_target() == {
        "q_proj": 1,
        "k_proj": 1,
        "v_proj": 1,
        "o_proj": 1,
        "expert_down": 4,
        "lm_head": 1,
    }
    table = str(report)
    assert "model.layers.1.mlp.experts.down_proj" in table
    assert "4×96" in table
    assert f"{adapted.trainable_parameters():,} LoRA parameters" in table
    assert report.lora_parameters == adapted.trainable_parameters()


def test_gate_proj_means_experts_on_moe_and_mlp_on_dense(
    tiny_mixtral: nn.Module, tiny_mistral: nn.Module
) -> None:
    moe = AdapterSpec.lora(targets=("gate_proj", "expert_gate")).apply(Loaded(tiny_mixtral))
    assert isinstance(tiny_mixtral.model.layers[0].mlp.experts, LoraExperts)
    assert tiny_mixtral.model.layers[0].mlp.experts.projections == ("gate",)
    assert len(moe.coverage.adapted) == 2 * 4
    dense = AdapterSpec.lora(targets=("attention", "mlp")).apply(Loaded(tiny_mistral))
    assert isinstance(tiny_mistral.model.layers[0].mlp.down_proj, LoraLinear)
    assert isinstance(tiny_mistral.model.layers[1].self_attn.v_proj, LoraLinear)
    assert len(dense.coverage.adapted) == 2 * 7


def test_dense_model_rejects_expert_targets(tiny_mistral: nn.Module) -> None:
    with pytest.raises(TargetNotFoundError, match="dense model without experts"):
        AdapterSpec.lora(targets=("attention", "experts")).apply(Loaded(tiny_mistral))
    with pytest.raises(TargetNotFoundError, match="dense model without experts"):
        AdapterSpec.lora(targets=("w1",)).apply(Loaded(tiny_mistral))


def test_router_target_on_dense_model_matches_nothing(tiny_mistral: nn.Module) -> None:
    with pytest.raises(TargetNotFoundError, match="'router'"):
        AdapterSpec.lora(targets=("attention", "router")).apply(Loaded(tiny_mistral))


def test_layers_outside_the_model_raise(tiny_mixtral: nn.Module) -> None:
    with pytest.raises(TargetNotFoundError, match="layer"):
        AdapterSpec.lora(layers=(99,)).apply(Loaded(tiny_mixtral))
    assert not any(isinstance(m, LoraLinear) for m in tiny_mixtral.modules())


def test_qlora_refuses_a_base_that_is_not_4bit(tiny_mixtral: nn.Module) -> None:
    with pytest.raises(AdapterError, match="4-bit base"):
        AdapterSpec.qlora().apply(Loaded(tiny_mixtral))


def test_qlora_accepts_a_4bit_base(tiny_mixtral: nn.Module) -> None:
    quantize(tiny_mixtral)
    adapted = AdapterSpec.qlora(r=4).apply(Loaded(tiny_mixtral))
    assert adapted.coverage.entries
    assert all(e.quantized for e in adapted.coverage.entries)


def test_qlora_refuses_a_plain_mixtune_base(tiny_mixtral: nn.Module) -> None:
    quantize(tiny_mixtral, QuantSpec.none(compute_dtype=torch.float32))
    with pytest.raises(AdapterError, match="4-bit base"):
        AdapterSpec.qlora().apply(Loaded(tiny_mixtral))


def test_applying_twice_is_refused(tiny_mixtral: nn.Module) -> None:
    AdapterSpec.lora().apply(Loaded(tiny_mixtral))
    with pytest.raises(AdapterError, match="already carries"):
        AdapterSpec.lora().apply(Loaded(tiny_mixtral))


@pytest.mark.parametrize("forward_first", [True, False])
def test_router_logits_of_the_adapted_router_reach_the_aux_loss(
    tiny_mixtral: nn.Module, forward_first: bool
) -> None:
    tiny_mixtral.config.output_router_logits = True
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        # transformers installs its logit recorders on the first forward.
        before = (tiny_mixtral if forward_first else copy.deepcopy(tiny_mixtral))(ids).router_logits
    adapted = AdapterSpec.lora(targets="router", r=4).apply(Loaded(tiny_mixtral))
    nudge_lora_b(adapted.model, std=1.0)
    with torch.no_grad():
        after = adapted.model(ids).router_logits
    assert len(after) == len(before) == 2
    assert not torch.allclose(after[0], before[0])
