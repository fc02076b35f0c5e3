"""A toy adapted Mixtral and corpus with the interfaces Recipe.fit relies on.

They keep the recipe tests independent of the model/adapter/corpus packages:
a stock tiny ``MixtralForCausalLM`` with hand-rolled LoRA on q/v projections
(with dropout, so RNG restore on resume matters), and a corpus of random
token rows in the padded or packed layout.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset, DatasetDict
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM


class ToyLoRA(nn.Module):
    def __init__(self, base: nn.Linear, r: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) * 0.02)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.drop(x) @ self.lora_A.T @ self.lora_B.T


class ToyAdapted:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if "lora_" in n}

    def load_lora_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, v in sd.items():
                params[k].copy_(v)


def toy_config(vocab: int = 128) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def toy_adapted(seed: int = 0, vocab: int = 128) -> ToyAdapted:
    torch.manual_seed(seed)
    model = MixtralForCausalLM(toy_config(vocab)).float()
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers:
        layer.self_attn.q_proj = ToyLoRA(layer.self_attn.q_proj)
        layer.self_attn.v_proj = ToyLoRA(layer.self_attn.v_proj)
    return ToyAdapted(model)


class ToyCorpus:
    """Rows of a repeating pattern plus noise, so a LoRA can learn something."""

    def __init__(self, rows: int = 24, length: int = 32, vocab: int = 128, seed: int = 0) -> None:
        self.max_length = length
        self.tokenizer = None
        g = torch.Generator().manual_seed(seed)
        base = torch.arange(length) % 7 + 3
        self._rows = []
        for _ in range(rows):
            ids = base.clone()
            noise = torch.rand(length, generator=g) < 0.1
            ids[noise] = torch.randint(3, vocab, (int(noise.sum()),), generator=g)
            ids[0] = 1
            self._rows.append(ids.tolist())

    def to_datasets(self, layout: str = "padded") -> DatasetDict:
        def make(rows: list[list[int]]) -> Dataset:
            data: dict[str, Any] = {
                "input_ids": rows,
                "attention_mask": [[1] * len(r) for r in rows],
                "labels": [list(r) for r in rows],
            }
            if layout == "packed":
                data["position_ids"] = [list(range(len(r))) for r in rows]
            return Dataset.from_dict(data)

        n = len(self._rows)
        return DatasetDict(
            train=make(self._rows[: n - 8]),
            validation=make(self._rows[n - 8 : n - 4]),
            test=make(self._rows[n - 4 :]),
        )

    def provenance(self) -> list[dict[str, str]]:
        return []
