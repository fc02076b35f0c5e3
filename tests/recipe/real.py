"""The real stack at toy size, trained once per test session and shared.

A seeded random 2-layer Mixtral (hidden 64, 4 experts, the real 32k
vocabulary) written by ``random_checkpoint``, loaded by ``load_quantized``,
the real Mixtral tokenizer and the shared arXiv sample (128-token chunks).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import torch

from mixtune.adapter import AdapterSpec
from mixtune.corpus import ChunkedCorpus
from mixtune.model import QuantSpec, load_quantized, random_checkpoint
from mixtune.model import tiny_config as model_tiny_config
from mixtune.recipe import FitResult, Recipe, RunSettings

# With lm_head adapted, a random model learns the sample's token statistics in
# a dozen steps, so "the loss goes down" is a clear signal, not noise.
TARGETS = ("attention", "experts", "lm_head")

_ROOT = Path(tempfile.mkdtemp(prefix="mixtune-recipe-tests-"))


def tiny_config() -> Any:
    return model_tiny_config(max_position_embeddings=512)


@functools.cache
def checkpoint() -> Path:
    return random_checkpoint(
        tiny_config(), _ROOT / "base", layout="original", seed=0, dtype=torch.float32
    )


@functools.cache
def corpus(tokenizer: Any, sample: Path) -> Any:
    return ChunkedCorpus.from_folder(sample, tokenizer, max_length=128)


def load(quant: QuantSpec, tokenizer: Any) -> Any:
    return load_quantized(checkpoint(), quant=quant, dtype=torch.float32, tokenizer=tokenizer)


def small_recipe(out: Path, **kw: Any) -> Recipe:
    base: dict[str, Any] = {
        "max_steps": 12,
        "batch_size": 4,
        "grad_accum": 1,
        "learning_rate": 1e-2,
        "warmup": 0.1,
        "eval_steps": 12,
        "save_steps": 6,
        "logging_steps": 2,
        "eval_rows": 8,
        "gradient_checkpointing": False,
        "run": RunSettings(output_dir=out, progress=False),
    }
    base.update(kw)
    return Recipe(**base)


@functools.cache
def qlora_fit(tokenizer: Any, sample: Path) -> FitResult:
    """QLoRA on the NF4 base (fp32 compute): the quickstart's setting, scaled down."""
    loaded = load(QuantSpec.nf4(compute_dtype=torch.float32), tokenizer)
    return small_recipe(_ROOT / "qlora-run").fit(
        loaded, corpus(tokenizer, sample), AdapterSpec.qlora(r=8, alpha=16, targets=TARGETS)
    )


@functools.cache
def lora_fit(tokenizer: Any, sample: Path) -> FitResult:
    """LoRA on the unquantized fp32 base, so stock PEFT can rebuild it exactly."""
    loaded = load(QuantSpec.none(), tokenizer)
    return small_recipe(_ROOT / "lora-run", max_steps=4).fit(
        loaded, corpus(tokenizer, sample), AdapterSpec.lora(r=4, alpha=8, targets=TARGETS)
    )
