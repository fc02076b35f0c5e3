"""PEFT export and merged weights reproduce the adapted model's logits on stock transformers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import MistralForCausalLM, MixtralConfig, MixtralForCausalLM

from mixtune.adapter import AdaptedModel, AdapterSpec
from mixtune.errors import AdapterError

from .helpers import Loaded, nudge_lora_b, quantize

# PEFT checks rank_pattern/alpha_pattern keys against module names only, so a
# pattern for a *parameter* target (gate_up_proj) is reported as unmatched
# even though it is applied; the logit comparisons below prove it is.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning"
)


def _adapt(model: nn.Module, spec: AdapterSpec, seed: int = 0) -> AdaptedModel:
    adapted = spec.apply(Loaded(model), seed=seed)
    nudge_lora_b(adapted.model, seed=seed + 1, std=0.2)
    adapted.model.eval()
    return adapted


def _peft_logits(stock: nn.Module, folder: Path, ids: torch.Tensor) -> torch.Tensor:
    peft_model = PeftModel.from_pretrained(stock, str(folder)).eval()
    with torch.no_grad():
        logits: torch.Tensor = peft_model(ids).logits
    return logits


@pytest.mark.parametrize(
    "spec",
    [
        AdapterSpec.lora(targets=("attention", "experts", "router", "lm_head"), r=4, alpha=8),
        AdapterSpec.lora(targets=("w1", "w2", "v_proj"), r=4, alpha=4, layers=(1,)),
        AdapterSpec.lora(targets=("w3",), r=2, alpha=8, rslora=True),
        AdapterSpec.lora(targets=("experts", "router"), r=4, alpha=8, rslora=True, layers=(0,)),
    ],
    ids=["everything", "w1+w2+v-layer1", "w3-rslora", "experts+router-rslora-layer0"],
)
def test_stock_peft_reproduces_the_logits(
    tiny_mixtral: nn.Module, spec: AdapterSpec, tmp_path: Path
) -> None:
    stock = copy.deepcopy(tiny_mixtral)
    adapted = _adapt(tiny_mixtral, spec)
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        ours = adapted.model(ids).logits
        base = stock(ids).logits
    assert not torch.allclose(ours, base, atol=1e-3)  # the adapter does something
    adapted.save_peft(tmp_path)
    torch.testing.assert_close(_peft_logits(stock, tmp_path, ids), ours, rtol=1e-5, atol=1e-5)


def test_peft_files_keys_and_shapes(tiny_mixtral: nn.Module, tmp_path: Path) -> None:
    spec = AdapterSpec.lora(targets=("attention", "experts", "router", "lm_head"), r=4, alpha=8)
    adapted = _adapt(tiny_mixtral, spec)
    adapted.save_peft(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["lora_dropout"] == 0.0  # PEFT refuses dropout on parameter targets
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["rank_pattern"] == {"gate_up_proj": 8}
    assert config["alpha_pattern"] == {"gate_up_proj": 16}
    assert sorted(config["target_modules"]) == ["k_proj", "lm_head", "o_proj", "q_proj", "v_proj"]
    assert sorted(config["target_parameters"]) == [
        "mlp.experts.down_proj",
        "mlp.experts.gate_up_proj",
        "mlp.gate.weight",
    ]
    assert config["base_model_name_or_path"] == "tiny-test-model"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    e, h, i, r, p = 4, 64, 96, 4, "base_model.model.model.layers.0."
    expected = {
        p + "self_attn.q_proj.lora_A.weight": (r, h),
        p + "self_attn.q_proj.lora_B.weight": (h, r),
        p + "self_attn.k_proj.lora_B.weight": (32, r),
        p + "mlp.gate.lora_A.weight": (r, h),
        p + "mlp.gate.lora_B.weight": (e, r),
        # gate_up: rank 2r (gate and up side by side), nested under down_proj's wrapper.
        p + "mlp.experts.base_layer.lora_A.weight": (e * 2 * r, h),
        p + "mlp.experts.base_layer.lora_B.weight": (2 * i, 2 * r * e),
        p + "mlp.experts.lora_A.weight": (e * r, i),
        p + "mlp.experts.lora_B.weight": (h, r * e),
        "base_model.model.lm_head.lora_B.weight": (96, r),
    }
    for key, shape in expected.items():
        assert tuple(tensors[key].shape) == shape, key
    assert len(tensors) == 2 * (2 * (4 + 1 + 2) + 1)
    # Expert e's gate factors sit in rows e·2r … e·2r + r of the fused A.
    sd = adapted.lora_state_dict()
    a_gate = sd["model.layers.0.mlp.experts.gate_proj.lora_A"]
    torch.testing.assert_close(tensors[p + "mlp.experts.base_layer.lora_A.weight"][8:12], a_gate[1])


def test_dense_model_exports_to_peft(tiny_mistral: nn.Module, tmp_path: Path) -> None:
    stock = copy.deepcopy(tiny_mistral)
    adapted = _adapt(tiny_mistral, AdapterSpec.lora(targets=("all-linear",), r=4, alpha=8))
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ours = adapted.model(ids).logits
    adapted.save_peft(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_parameters"] is None
    torch.testing.assert_close(_peft_logits(stock, tmp_path, ids), ours, rtol=1e-5, atol=1e-5)


def _dequantized_stock(template: nn.Module, quantized: nn.Module) -> nn.Module:
    """A stock model whose expert weights are ``quantized``'s dequantized ones."""
    stock = copy.deepcopy(template)
    with torch.no_grad():
        for layer, src in zip(stock.model.layers, quantized.model.layers, strict=True):
            experts = src.mlp.experts
            for e in range(experts.num_experts):
                layer.mlp.experts.gate_up_proj[e].copy_(experts.weight("gate_up", e))
                layer.mlp.experts.down_proj[e].copy_(experts.weight("down", e))
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                quantized_linear = getattr(src.self_attn, name)
                getattr(layer.self_attn, name).weight.copy_(quantized_linear.dequantize())
    return stock


def test_stock_peft_on_the_dequantized_base_matches_the_4bit_model(
    tiny_mixtral: nn.Module, tmp_path: Path
) -> None:
    stock_template = copy.deepcopy(tiny_mixtral)
    quantize(tiny_mixtral)
    # The base stock PEFT should sit on: the stock layout with the dequantized experts.
    stock = _dequantized_stock(stock_template, tiny_mixtral)
    adapted = _adapt(
        tiny_mixtral, AdapterSpec.qlora(targets=("experts", "attention"), r=4, alpha=8)
    )
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        ours = adapted.model(ids).logits
    adapted.save_peft(tmp_path)
    torch.testing.assert_close(_peft_logits(stock, tmp_path, ids), ours, rtol=1e-4, atol=1e-4)


def test_merged_state_dict_fused_loads_into_stock_transformers(
    tiny_mixtral: nn.Module, mixtral_config: MixtralConfig
) -> None:
    spec = AdapterSpec.lora(targets=("attention", "experts", "router", "lm_head"), r=4, alpha=8)
    adapted = _adapt(tiny_mixtral, spec)
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        ours = adapted.model(ids).logits
    merged = adapted.merged_state_dict(layout="fused", dtype=torch.float32)
    assert "model.layers.0.mlp.experts.gate_up_proj" in merged
    stock = MixtralForCausalLM(mixtral_config).eval()
    stock.load_state_dict(merged, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, ours, rtol=1e-5, atol=1e-5)


def test_merged_state_dict_original_layout_loads_with_from_pretrained(
    tiny_mixtral: nn.Module, mixtral_config: MixtralConfig, tmp_path: Path
) -> None:
    quantize(tiny_mixtral)
    spec = AdapterSpec.lora(targets=("w1", "w3", "q_proj", "router"), r=4, alpha=8, layers=(1,))
    adapted = _adapt(tiny_mixtral, spec)
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        ours = adapted.model(ids).logits
    merged = adapted.merged_state_dict(dtype=torch.float32)
    assert merged["model.layers.1.block_sparse_moe.experts.3.w1.weight"].shape == (96, 64)
    assert merged["model.layers.1.block_sparse_moe.experts.3.w2.weight"].shape == (64, 96)
    assert merged["model.layers.0.block_sparse_moe.gate.weight"].shape == (4, 64)
    assert not any(".mlp." in k for k in merged)
    mixtral_config.save_pretrained(tmp_path)
    save_file(merged, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    stock = MixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, ours, rtol=1e-5, atol=1e-5)


def test_merged_state_dict_of_a_dense_model(tiny_mistral: nn.Module) -> None:
    adapted = _adapt(tiny_mistral, AdapterSpec.lora(targets=("attention", "mlp"), r=4))
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        ours = adapted.model(ids).logits
    stock = MistralForCausalLM(tiny_mistral.config).eval()
    stock.load_state_dict(adapted.merged_state_dict(dtype=torch.float32), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, ours, rtol=1e-5, atol=1e-5)


def test_merged_state_dict_rejects_an_unknown_layout(tiny_mixtral: nn.Module) -> None:
    adapted = AdapterSpec.lora().apply(Loaded(tiny_mixtral))
    with pytest.raises(AdapterError, match="layout"):
        adapted.merged_state_dict(layout="sharded")  # type: ignore[arg-type]


def test_bitsandbytes_linear4bit_base_is_adapted_and_merged(
    tiny_mixtral: nn.Module, mixtral_config: MixtralConfig
) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    for layer in tiny_mixtral.model.layers:
        for name in ("q_proj", "v_proj"):
            linear = getattr(layer.self_attn, name)
            q = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=False,
                compute_dtype=torch.float32,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(
                linear.weight.data.clone(), requires_grad=False, quant_type="nf4"
            )
            setattr(layer.self_attn, name, q.to("cpu"))
    adapted = _adapt(tiny_mixtral, AdapterSpec.qlora(targets=("attention", "w2"), r=4, alpha=8))
    rows = {e.module: e for e in adapted.coverage.entries}
    assert rows["model.layers.0.self_attn.q_proj"].quantized
    assert not rows["model.layers.0.self_attn.k_proj"].quantized
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ours = adapted.model(ids).logits
    # That eval forward made bitsandbytes repack the CPU weights for its own
    # kernel, which rounds activations (to ~1e-3); the merge has to read the
    # repacked weights back.
    stock = MixtralForCausalLM(mixtral_config).eval()
    stock.load_state_dict(
        adapted.merged_state_dict(layout="fused", dtype=torch.float32), strict=True
    )
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, ours, rtol=5e-3, atol=5e-3)
