"""Helpers shared by the adapter tests: tiny configs, a loaded-model stand-in, reference math."""

from __future__ import annotations

import math

import attrs
import torch
from torch import Tensor, nn
from transformers import MistralConfig, MixtralConfig

from mixtune.model import MoEExperts, QuantLinear, QuantSpec


@attrs.define
class Loaded:
    """The part of ``mixtune.model.LoadedModel`` the adapter reads."""

    model: nn.Module
    source: str = "tiny-test-model"


def tiny_mixtral_config(**overrides: object) -> MixtralConfig:
    kwargs: dict[str, object] = {
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 64,
        "router_jitter_noise": 0.0,
    }
    kwargs.update(overrides)
    return MixtralConfig(**kwargs)


def tiny_mistral_config() -> MistralConfig:
    return MistralConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def nudge_lora_b(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Give every LoRA B factor non-zero values, so the update is visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)


def lora_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}


def nf4() -> QuantSpec:
    """NF4 storage computing in float32 (tight CPU comparisons)."""
    return QuantSpec.nf4(compute_dtype=torch.float32)


def quantize(
    model: nn.Module, quant: QuantSpec | None = None, *, attention: bool = True
) -> nn.Module:
    """Swap in mixtune's quantized modules, as ``load_quantized`` does.

    Every ``mlp.experts`` becomes a :class:`MoEExperts` and (with
    ``attention``) every q/k/v/o projection a :class:`QuantLinear`.
    """
    quant = quant or nf4()
    for layer in model.model.layers:
        layer.mlp.experts = MoEExperts.from_experts(layer.mlp.experts, quant=quant)
        if attention and quant.is_4bit:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                linear = getattr(layer.self_attn, name)
                setattr(layer.self_attn, name, QuantLinear.from_linear(linear, quant=quant))
    return model


def reference_experts(
    x: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    weights: dict[str, list[Tensor]],
    factors: dict[str, tuple[Tensor, Tensor]],
    scale: float,
) -> Tensor:
    """Per-token float64 MoE MLP with per-expert LoRA, written out plainly.

    ``weights["gate_up"][e]`` is ``(2I, H)``, ``weights["down"][e]`` ``(H, I)``;
    ``factors[proj] = (A (E, r, in), B (E, out, r))`` for the adapted
    projections.
    """
    inter = weights["down"][0].shape[1]
    rows = []
    for t in range(x.shape[0]):
        xt = x[t].double()
        acc = torch.zeros_like(xt)
        for k in range(top_k_index.shape[1]):
            e = int(top_k_index[t, k])
            w_gu = weights["gate_up"][e].double()
            gate = w_gu[:inter] @ xt
            up = w_gu[inter:] @ xt
            if "gate" in factors:
                a, b = factors["gate"]
                gate = gate + scale * (b[e] @ (a[e] @ xt))
            if "up" in factors:
                a, b = factors["up"]
                up = up + scale * (b[e] @ (a[e] @ xt))
            h = gate * torch.sigmoid(gate) * up  # silu(gate) * up
            y = weights["down"][e].double() @ h
            if "down" in factors:
                a, b = factors["down"]
                y = y + scale * (b[e] @ (a[e] @ h))
            acc = acc + top_k_weights[t, k].double() * y
        rows.append(acc)
    return torch.stack(rows)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    diff = (actual.double() - expected.double()).norm().item()
    ref = expected.double().norm().item()
    return diff / ref if ref > 0 else diff


def rslora_scale(alpha: float, r: int) -> float:
    return alpha / math.sqrt(r)
