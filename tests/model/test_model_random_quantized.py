"""random_quantized: the model load_quantized gives for the same random checkpoint, built without one."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from mixtune.errors import ConfigError, UnsupportedModelError
from mixtune.model import (
    MoEExperts,
    QuantLinear,
    QuantSpec,
    load_quantized,
    random_checkpoint,
    random_quantized,
    tiny_config,
)
from mixtune.model import _random as random_module

F32 = QuantSpec.nf4(compute_dtype=torch.float32)


def _state(loaded: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("quant", [QuantSpec.nf4(), QuantSpec.fp4(double_quant=False)])
def test_equals_loading_the_random_checkpoint(tmp_path: Path, quant: QuantSpec) -> None:
    config = tiny_config(vocab_size=512)
    built = random_quantized(config, quant=quant, seed=5, progress=False)
    folder = random_checkpoint(config, tmp_path / "ckpt", seed=5)
    loaded = load_quantized(folder, quant=quant, progress=False)
    _assert_same(_state(built), _state(loaded))
    assert built.source == "random(seed=5)"
    assert built.config is not config  # the caller's config is never touched


def test_deterministic_for_a_seed() -> None:
    config = tiny_config(vocab_size=512)
    a = _state(random_quantized(config, seed=1, progress=False))
    b = _state(random_quantized(config, seed=1, progress=False))
    c = _state(random_quantized(config, seed=2, progress=False))
    _assert_same(a, b)
    key = "model.layers.1.mlp.experts.gate_up.data"
    assert not torch.equal(a[key], c[key])


def test_census_has_no_high_precision_experts_or_attention() -> None:
    loaded = random_quantized(tiny_config(vocab_size=512, num_hidden_layers=3), progress=False)
    assert loaded.census().high_precision_bytes(("experts", "attention")) == {}
    for layer in loaded.model.model.layers:
        assert isinstance(layer.mlp.experts, MoEExperts)
        assert layer.mlp.experts.is_quantized
        assert isinstance(layer.self_attn.q_proj, QuantLinear)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert not loaded.model.training


def test_forward_gives_finite_logits() -> None:
    loaded = random_quantized(
        tiny_config(vocab_size=512), quant=F32, dtype=torch.float32, progress=False
    )
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded.model(input_ids=ids, use_cache=False).logits
    assert logits.shape == (2, 9, 512)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0


def test_dense_model_and_tied_embeddings() -> None:
    config = tiny_config("mistral", vocab_size=512, tie_word_embeddings=True)
    loaded = random_quantized(config, progress=False)
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert loaded.census().high_precision_bytes(("attention", "mlp")) == {}


def test_never_holds_more_than_one_expert_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every drawn tensor is freed before the next expert is drawn.

    CPU peak memory is not measurable reliably from inside torch, so the
    builder is instrumented instead: the bytes of drawn expert tensors alive at once
    never exceed the two halves (gate, up) of one expert's ``gate_up``. The
    GPU benchmark (``benchmarks/moe_qlora.py --layers 32``) measures the real peak.
    """
    live: dict[int, int] = {}
    peak = [0]
    real = random_module._random

    def tracked(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = real(*args, **kwargs)
        if ".experts." not in args[1]:
            return out  # router, norms, embeddings: kept by the model, not in flight
        key = id(out)
        live[key] = out.numel() * out.element_size()
        peak[0] = max(peak[0], sum(live.values()))
        weakref.finalize(out, live.pop, key, None)
        return out

    monkeypatch.setattr(random_module, "_random", tracked)
    config = tiny_config(vocab_size=64, num_hidden_layers=3, num_local_experts=8)
    random_quantized(config, progress=False)
    one_expert = 2 * config.intermediate_size * config.hidden_size * 2  # gate_up, bf16
    layer = 3 * one_expert // 2 * config.num_local_experts
    assert 0 < peak[0] <= one_expert < layer


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError) as info:
        random_quantized(tiny_config(), quant="nf4", dtype=torch.int8, progress=False)  # type: ignore[arg-type]
    assert "quant=" in str(info.value)
    assert "dtype=" in str(info.value)
    with pytest.raises(ConfigError, match="seed"):
        random_quantized(tiny_config(), seed=1.5, progress=False)  # type: ignore[arg-type]
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError, match="gpt2"):
        random_quantized(GPT2Config(), progress=False)
