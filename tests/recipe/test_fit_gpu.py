"""GPU: 30 QLoRA steps on a 2-layer Mixtral-8x7B-width slice, then publish with merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mixtune.adapter import AdapterSpec
from mixtune.corpus import ChunkedCorpus
from mixtune.model import QuantSpec, load_quantized, mixtral_8x7b_config, random_checkpoint
from mixtune.publish import MERGE_TOLERANCE, publish
from mixtune.recipe import Recipe, RunSettings

# Same rule as tests/conftest.py's requires_gpu (conftest is not imported by name).
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

pytestmark = [pytest.mark.gpu, requires_gpu]


def test_qlora_30_steps_on_8x7b_width_slice(
    tmp_path: Path, mixtral_tokenizer: Any, arxiv_sample: Path
) -> None:
    config = mixtral_8x7b_config(2, max_position_embeddings=4096)
    base = random_checkpoint(config, tmp_path / "slice", layout="original", seed=0)
    loaded = load_quantized(
        base, quant=QuantSpec.nf4(), device_map="cuda", tokenizer=mixtral_tokenizer
    )
    corpus = ChunkedCorpus.from_folder(arxiv_sample, mixtral_tokenizer, max_length=512)
    recipe = Recipe.guide_qlora(
        max_steps=30,
        batch_size=2,
        grad_accum=2,
        learning_rate=1e-3,
        eval_steps=30,
        save_steps=15,
        logging_steps=5,
        eval_rows=32,
        run=RunSettings(output_dir=tmp_path / "run", progress=False),
    )
    result = recipe.fit(
        loaded, corpus, AdapterSpec.qlora(targets=("attention", "experts", "lm_head"))
    )
    print(
        f"\n{result.tokens_per_s:.0f} tokens/s, peak memory {result.peak_memory_bytes / 2**30:.2f} GiB, "
        f"test perplexity {result.perplexity_before:.1f} -> {result.perplexity_after:.1f}"
    )
    assert result.steps == 30
    assert result.eval_loss[-1].loss < result.eval_loss[0].loss
    assert result.test_loss_after < result.test_loss_before
    for layer in result.routing_load:
        assert sum(layer) == pytest.approx(1.0)
    out = publish(result, tmp_path / "published", merge=True)
    assert out.merge_error is not None
    assert out.merge_error <= MERGE_TOLERANCE
    print(f"merged vs adapter logits: relative RMS {out.merge_error:.4f}")
