"""Helpers shared by the adapter tests: tiny configs, a loaded-model stand-in, reference math."""

from __future__ import annotations

import math

import attrs
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import MistralConfig, MixtralConfig


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


class FakeQuantExperts(nn.Module):
    """A stand-in 4-bit expert stack: weights rounded to 15 levels per row.

    Same public surface as ``mixtune.model.MoEExperts`` (``project``,
    ``weight``, ``is_quantized``), so the adapter math can be checked against
    ``weight()`` without depending on the real quantizer.
    """

    is_quantized = True

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.num_experts = int(experts.num_experts)
        self.hidden_dim = int(experts.hidden_dim)
        self.intermediate_dim = int(experts.intermediate_dim)
        self.act_fn = experts.act_fn
        for kind, param in (("gate_up", experts.gate_up_proj), ("down", experts.down_proj)):
            w = param.detach().float()
            scale = w.abs().amax(dim=-1, keepdim=True) / 7
            self.register_buffer(f"{kind}_codes", torch.round(w / scale).to(torch.int8))
            self.register_buffer(f"{kind}_scale", scale)

    def _dequant(self, kind: str, expert: int) -> Tensor:
        codes: Tensor = getattr(self, f"{kind}_codes")
        scale: Tensor = getattr(self, f"{kind}_scale")
        return codes[expert].float() * scale[expert]

    def weight(self, kind: str, expert: int, dtype: torch.dtype | None = None) -> Tensor:
        return self._dequant(kind, expert).to(dtype or torch.float32)

    def project(self, kind: str, expert: int, x: Tensor) -> Tensor:
        return F.linear(x, self._dequant(kind, expert).to(x.dtype))

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for k in range(top_k_index.shape[1]):
                e = int(top_k_index[t, k])
                gate, up = self.project("gate_up", e, hidden_states[t : t + 1]).chunk(2, dim=-1)
                y = self.project("down", e, self.act_fn(gate) * up)
                out[t] += (y[0] * top_k_weights[t, k]).to(out.dtype)
        return out


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
