"""End to end on tiny checkpoints loaded through ``mixtune.model.load_quantized``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from mixtune.adapter import AdapterSpec, LoraExperts
from mixtune.errors import AdapterError, TargetNotFoundError
from mixtune.model import (
    LoadedModel,
    MoEExperts,
    QuantLinear,
    QuantSpec,
    load_quantized,
    random_checkpoint,
    tiny_config,
)

from .helpers import lora_params, nudge_lora_b, relative_error

pytestmark = pytest.mark.filterwarnings(
    "ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning"
)

F32 = torch.float32
ALL = ("attention", "experts", "router", "lm_head")


@pytest.fixture(scope="module")
def mixtral_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Mixtral in the hub's original layout, float32."""
    dest = tmp_path_factory.mktemp("mixtral")
    return random_checkpoint(tiny_config("mixtral"), dest, layout="original", seed=3, dtype=F32)


@pytest.fixture(scope="module", params=["mistral", "llama"])
def dense_ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random dense checkpoints (Mistral and Llama), float32."""
    dest = tmp_path_factory.mktemp(request.param)
    return random_checkpoint(tiny_config(request.param), dest, seed=4, dtype=F32)


def _load(path: Path, quant: QuantSpec, dtype: torch.dtype = F32) -> LoadedModel:
    return load_quantized(path, quant=quant, dtype=dtype)


def _stock(path: Path, dtype: torch.dtype = F32) -> Any:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _dequantized_stock(path: Path, loaded: LoadedModel) -> Any:
    """Stock transformers model holding the loaded model's dequantized weights."""
    stock = _stock(path)
    with torch.no_grad():
        for mine, theirs in zip(loaded.model.model.layers, stock.model.layers, strict=True):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                q = getattr(mine.self_attn, name)
                assert isinstance(q, QuantLinear)
                getattr(theirs.self_attn, name).weight.copy_(q.dequantize(F32))
            experts = mine.mlp.experts
            assert isinstance(experts, MoEExperts)
            for e in range(experts.num_experts):
                theirs.mlp.experts.gate_up_proj[e].copy_(experts.weight("gate_up", e, F32))
                theirs.mlp.experts.down_proj[e].copy_(experts.weight("down", e, F32))
    return stock


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(ids).logits
    return out


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(seed))


def test_peft_export_on_a_plain_base_matches_stock_peft(mixtral_ckpt: Path, tmp_path: Path) -> None:
    loaded = _load(mixtral_ckpt, QuantSpec.none(compute_dtype=F32))
    adapted = AdapterSpec.lora(targets=ALL, r=4, alpha=8).apply(loaded)
    nudge_lora_b(adapted.model, std=0.2)
    ids = _ids()
    ours = _logits(adapted.model, ids)
    adapted.save_peft(tmp_path)
    peft_model = PeftModel.from_pretrained(_stock(mixtral_ckpt), str(tmp_path)).eval()
    theirs = _logits(peft_model, ids)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, _logits(_stock(mixtral_ckpt), ids), atol=1e-3)


def test_peft_export_on_a_4bit_base_matches_stock_peft_on_dequantized_weights(
    mixtral_ckpt: Path, tmp_path: Path
) -> None:
    loaded = _load(mixtral_ckpt, QuantSpec.nf4(compute_dtype=F32))
    stock = _dequantized_stock(mixtral_ckpt, loaded)
    adapted = AdapterSpec.qlora(targets=ALL, r=4, alpha=8).apply(loaded)
    assert all(
        e.quantized
        for e in adapted.coverage.entries
        if e.kind != "router" and e.target != "lm_head"
    )
    nudge_lora_b(adapted.model, std=0.2)
    ids = _ids(1)
    ours = _logits(adapted.model, ids)
    adapted.save_peft(tmp_path)
    theirs = _logits(PeftModel.from_pretrained(stock, str(tmp_path)).eval(), ids)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_peft_export_in_bfloat16(mixtral_ckpt: Path, tmp_path: Path) -> None:
    """The real use: bf16 base on both sides; agreement within bf16 rounding.

    PEFT folds ``W + s·B@A`` into one bf16 weight, mixtune adds a float32
    update to the bf16 base product; the roundings differ, and a routing
    flip here and there amplifies it (measured: 0.6 % relative error on the
    logits for B ~ N(0, 0.05²), against an 86 % change from the adapter).
    """
    loaded = _load(mixtral_ckpt, QuantSpec.none(compute_dtype=torch.bfloat16), torch.bfloat16)
    adapted = AdapterSpec.lora(targets=ALL, r=4, alpha=8).apply(loaded)
    nudge_lora_b(adapted.model, std=0.05)
    ids = _ids(2)
    ours = _logits(adapted.model, ids).float()
    adapted.save_peft(tmp_path)
    stock = _stock(mixtral_ckpt, torch.bfloat16)
    theirs = _logits(PeftModel.from_pretrained(stock, str(tmp_path)).eval(), ids).float()
    base = _logits(_stock(mixtral_ckpt, torch.bfloat16), ids).float()
    assert relative_error(theirs, ours) <= 2e-2
    # The adapter's effect is far larger than the bf16 disagreement.
    assert relative_error(base, ours) > 10 * relative_error(theirs, ours)


@pytest.mark.parametrize(
    "quant",
    [
        QuantSpec.nf4(compute_dtype=F32),
        QuantSpec.fp4(compute_dtype=F32, quantize_embeddings=True, quantize_lm_head=True),
    ],
    ids=["nf4", "fp4-embeddings-lm_head"],
)
def test_merged_original_layout_from_a_4bit_base(
    mixtral_ckpt: Path, tmp_path: Path, quant: QuantSpec
) -> None:
    loaded = _load(mixtral_ckpt, quant)
    adapted = AdapterSpec.qlora(targets=ALL, r=4, alpha=8).apply(loaded)
    nudge_lora_b(adapted.model, std=0.2)
    ids = _ids(3)
    ours = _logits(adapted.model, ids)
    merged = adapted.merged_state_dict(layout="original", dtype=F32)
    loaded.config.save_pretrained(tmp_path)
    save_file(merged, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    torch.testing.assert_close(_logits(_stock(tmp_path), ids), ours, rtol=1e-4, atol=1e-4)
    # mixtune's own loader reads the merged checkpoint too.
    reloaded = _load(tmp_path, QuantSpec.none(compute_dtype=F32))
    torch.testing.assert_close(_logits(reloaded.model, ids), ours, rtol=1e-4, atol=1e-4)


def test_training_step_on_a_4bit_base_reaches_every_lora_tensor(mixtral_ckpt: Path) -> None:
    loaded = _load(mixtral_ckpt, QuantSpec.nf4(compute_dtype=F32))
    adapted = AdapterSpec.qlora(targets=ALL, r=4, alpha=8).apply(loaded)
    model = adapted.model.train()
    params = lora_params(model)
    assert adapted.trainable_parameters() == sum(p.numel() for p in params.values())
    ids = torch.randint(0, 32000, (4, 32), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    torch.optim.SGD(params.values(), lr=0.1).step()
    for p in params.values():
        p.grad = None
    model(ids, labels=ids).loss.backward()
    for name, p in params.items():
        assert p.grad is not None, name
        if p.ndim == 3:
            assert all(p.grad[e].abs().sum() > 0 for e in range(p.shape[0])), name
        else:
            assert p.grad.abs().sum() > 0, name
    assert all(isinstance(layer.mlp.experts, LoraExperts) for layer in model.model.layers)


def test_qlora_refuses_a_plain_loaded_base(mixtral_ckpt: Path) -> None:
    loaded = _load(mixtral_ckpt, QuantSpec.none(compute_dtype=F32))
    with pytest.raises(AdapterError, match="4-bit base"):
        AdapterSpec.qlora().apply(loaded)


def test_dense_loaded_model(dense_ckpt: Path, tmp_path: Path) -> None:
    loaded = _load(dense_ckpt, QuantSpec.nf4(compute_dtype=F32))
    with pytest.raises(TargetNotFoundError, match="dense model"):
        AdapterSpec.qlora(targets=("attention", "experts")).apply(loaded)
    stock = _stock(dense_ckpt)
    with torch.no_grad():
        for mine, theirs in zip(loaded.model.model.layers, stock.model.layers, strict=True):
            for owner, names in (
                ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                ("mlp", ("gate_proj", "up_proj", "down_proj")),
            ):
                for name in names:
                    src = getattr(getattr(mine, owner), name)
                    getattr(getattr(theirs, owner), name).weight.copy_(src.dequantize(F32))
    adapted = AdapterSpec.qlora(targets=("attention", "mlp"), r=4, alpha=8).apply(loaded)
    nudge_lora_b(adapted.model, std=0.2)
    ids = _ids(4)
    ours = _logits(adapted.model, ids)
    adapted.save_peft(tmp_path)
    theirs_logits = _logits(PeftModel.from_pretrained(copy.deepcopy(stock), str(tmp_path)), ids)
    torch.testing.assert_close(theirs_logits, ours, rtol=1e-4, atol=1e-4)
    merged = adapted.merged_state_dict(dtype=F32)
    fresh = _stock(dense_ckpt)
    fresh.load_state_dict(merged, strict=True)
    torch.testing.assert_close(_logits(fresh, ids), ours, rtol=1e-4, atol=1e-4)
