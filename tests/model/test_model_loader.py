"""load_quantized on tiny seeded checkpoints, against stock transformers."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mixtune.errors import (
    ConfigError,
    ModelLoadError,
    OfflineError,
    QuantizationUnavailableError,
    TokenizerError,
    UnsupportedModelError,
)
from mixtune.model import (
    LoadedModel,
    MoEExperts,
    QuantEmbedding,
    QuantLinear,
    QuantSpec,
    _loader,
    iter_expert_modules,
    load_quantized,
)
from tests.model.model_helpers import DEVICES

FP32_NF4 = QuantSpec.nf4(compute_dtype=torch.float32)


def _ids(vocab: int = 32000, device: str = "cpu") -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), device=device)


def _logits(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(ids).logits.float()


def _stock(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def _copy_dequantized_into(stock: nn.Module, loaded: LoadedModel) -> None:
    """Overwrite a stock model's weights with our dequantized ones (independent reference)."""
    ours = loaded.model
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, (QuantLinear, QuantEmbedding)):
                stock.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
            elif isinstance(module, MoEExperts):
                target = stock.get_submodule(name)
                for e in range(module.num_experts):
                    target.gate_up_proj[e].copy_(module.weight("gate_up", e, torch.float32))
                    target.down_proj[e].copy_(module.weight("down", e, torch.float32))


# ----------------------------------------------------------------- correctness


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "quant", [FP32_NF4, QuantSpec.nf4(), QuantSpec.none()], ids=["nf4-fp32", "nf4", "none"]
)
def test_both_layouts_load_to_the_same_logits(
    tiny_fused: Path, tiny_original: Path, quant: QuantSpec, device: str
) -> None:
    a = load_quantized(tiny_fused, quant=quant, device_map=device)
    b = load_quantized(tiny_original, quant=quant, device_map=device)
    ids = _ids(device=device)
    la, lb = _logits(a, ids), _logits(b, ids)
    assert torch.isfinite(la).all()
    torch.testing.assert_close(la, lb, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("model_type", "layout"),
    [("mixtral", "fused"), ("mixtral", "original"), ("mistral", "fused"), ("llama", "fused")],
)
def test_unquantized_load_matches_stock_transformers(
    make_checkpoint, model_type: str, layout: str
) -> None:
    path = make_checkpoint(model_type, layout=layout)
    ours = load_quantized(path, quant=QuantSpec.none(), dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        expected = _stock(path)(ids).logits
    torch.testing.assert_close(_logits(ours, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("model_type", "layout"), [("mixtral", "fused"), ("mixtral", "original"), ("llama", "fused")]
)
def test_4bit_model_matches_stock_model_with_dequantized_weights(
    make_checkpoint, model_type: str, layout: str, device: str
) -> None:
    path = make_checkpoint(model_type, layout=layout)
    ours = load_quantized(path, quant=FP32_NF4, dtype=torch.float32, device_map=device)
    stock = _stock(path, device=device)
    ids = _ids(device=device)
    with torch.no_grad():
        plain = stock(ids).logits
    _copy_dequantized_into(stock, ours)
    with torch.no_grad():
        expected = stock(ids).logits
    got = _logits(ours, ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # ...and the quantization really changed the weights (the reference is not the bf16 model).
    assert not torch.allclose(got, plain, atol=1e-4)


def test_loaded_structure_and_frozen_weights(tiny_fused: Path) -> None:
    loaded = load_quantized(tiny_fused)
    model = loaded.model
    assert type(model).__name__ == "MixtralForCausalLM"
    assert loaded.is_moe
    assert loaded.source == str(tiny_fused)
    assert loaded.device == torch.device("cpu")
    assert not model.training
    for layer in model.model.layers:
        assert isinstance(layer.mlp.experts, MoEExperts)
        assert layer.mlp.experts.is_quantized
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert isinstance(getattr(layer.self_attn, proj), QuantLinear)
        assert layer.mlp.gate.weight.dtype == torch.bfloat16
        assert layer.input_layernorm.weight.dtype == torch.bfloat16
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.embed_tokens) is nn.Embedding
    assert all(not p.requires_grad for p in model.parameters())
    assert len(list(iter_expert_modules(model))) == 2
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"
    text = repr(loaded)
    assert "MixtralForCausalLM" in text
    assert "nf4" in text
    assert len(text) < 400


@pytest.mark.parametrize("quant", [QuantSpec.nf4(), QuantSpec.none()], ids=["nf4", "none"])
def test_eval_under_no_grad_then_training_still_gives_input_gradients(
    tiny_fused: Path, quant: QuantSpec
) -> None:
    model = load_quantized(tiny_fused, quant=quant).model
    ids = _ids()
    model.eval()
    with torch.no_grad():
        model(ids)
    model.train()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    model(inputs_embeds=embeds).logits.float().sum().backward()
    assert embeds.grad is not None
    assert embeds.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_dense_model_loads_with_4bit_attention_and_mlp(make_checkpoint) -> None:
    loaded = load_quantized(make_checkpoint("mistral"))
    assert not loaded.is_moe
    layer = loaded.model.model.layers[0]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert isinstance(getattr(layer.mlp, proj), QuantLinear)
    census = loaded.census()
    assert census.bytes(kind="experts") == 0
    assert census.bytes(kind="mlp") == census.bytes(kind="mlp", storage="4-bit") > 0
    assert torch.isfinite(_logits(loaded, _ids())).all()


def test_quantized_embeddings_and_lm_head(tiny_fused: Path) -> None:
    quant = QuantSpec.nf4(quantize_embeddings=True, quantize_lm_head=True)
    loaded = load_quantized(tiny_fused, quant=quant)
    assert isinstance(loaded.model.lm_head, QuantLinear)
    assert isinstance(loaded.model.model.embed_tokens, QuantEmbedding)
    census = loaded.census()
    for kind in ("embeddings", "lm_head"):
        assert census.bytes(kind=kind) == census.bytes(kind=kind, storage="4-bit") > 0
    plain = load_quantized(tiny_fused)
    # The tables dominate a tiny model: quantizing them shrinks it a lot.
    assert census.total_bytes < plain.census().total_bytes / 2
    assert torch.isfinite(_logits(loaded, _ids())).all()


@pytest.mark.parametrize(
    "quant", [QuantSpec.nf4(quantize_lm_head=True), QuantSpec.none()], ids=["q", "plain"]
)
def test_tied_embeddings(make_checkpoint, quant: QuantSpec) -> None:
    path = make_checkpoint("llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in json.dumps(_header(path / "model.safetensors"))
    loaded = load_quantized(path, quant=quant, dtype=torch.float32)
    with torch.no_grad():
        expected = _stock(path)(ids := _ids()).logits
    got = _logits(loaded, ids)
    if quant.is_4bit:
        assert torch.isfinite(got).all()
    else:
        assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
        torch.testing.assert_close(got, expected)


def _header(path: Path) -> dict[str, object]:
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header: dict[str, object] = json.loads(raw[8 : 8 + size])
    return header


# ----------------------------------------------------------------- census


def test_census_matches_an_independent_count(tiny_fused: Path) -> None:
    loaded = load_quantized(tiny_fused, quant=QuantSpec.nf4(double_quant=True, block_size=64))
    config = loaded.config
    census = loaded.census()
    e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
    layers, vocab = config.num_hidden_layers, config.vocab_size
    head_dim = h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim

    def packed_bytes(count: int, numel: int) -> int:
        blocks = math.ceil(numel / 64)
        # data (2 per byte) + uint8 scales + fp32 scale-of-scales + fp32 offset, + 256-entry fp32 code book
        return count * (numel // 2 + blocks + 4 * math.ceil(blocks / 256) + 4) + 256 * 4

    experts = layers * (packed_bytes(e, 2 * i * h) + packed_bytes(e, h * i))
    attention = layers * (2 * packed_bytes(1, h * h) + 2 * packed_bytes(1, kv * h))
    assert census.bytes(kind="experts") == census.bytes(kind="experts", storage="4-bit") == experts
    assert census.bytes(kind="attention", storage="4-bit") == attention
    assert (
        census.bytes(kind="router")
        == census.bytes(storage="bf16", kind="router")
        == layers * e * h * 2
    )
    assert census.bytes(kind="norms", storage="bf16") == (2 * layers + 1) * h * 2
    assert census.bytes(kind="embeddings", storage="bf16") == vocab * h * 2
    assert census.bytes(kind="lm_head", storage="bf16") == vocab * h * 2
    assert census.total_bytes == sum(census.by_kind().values()) == sum(census.by_storage().values())
    four_bit = [x for x in census.entries if x.storage == "4-bit"]
    assert sum(x.weights for x in four_bit) == layers * (3 * e * i * h + 2 * h * h + 2 * kv * h)
    table = str(census)
    for word in (
        "experts",
        "attention",
        "router",
        "norms",
        "embeddings",
        "lm_head",
        "4-bit",
        "bf16",
        "total",
    ):
        assert word in table


def test_census_of_unquantized_model_has_no_4bit(tiny_fused: Path) -> None:
    census = load_quantized(tiny_fused, quant=QuantSpec.none()).census()
    assert "4-bit" not in census.by_storage()
    config = load_quantized(tiny_fused, quant=QuantSpec.none()).config
    e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
    assert census.bytes(kind="experts", storage="bf16") == 2 * 3 * e * h * i * 2


def test_a_4bit_load_with_bf16_experts_is_refused(
    tiny_fused: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_op_quantizer(config, quant, dtype, device):  # type: ignore[no-untyped-def]
        return MoEExperts.from_config(config, quant=QuantSpec.none(), dtype=dtype, device=device)

    monkeypatch.setattr(_loader, "_experts_module", no_op_quantizer)
    with pytest.raises(QuantizationUnavailableError, match="experts"):
        load_quantized(tiny_fused, quant=QuantSpec.nf4())


def test_a_4bit_load_with_bf16_attention_is_refused(
    tiny_fused: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def plain_linear(linear, quant, dtype, device):  # type: ignore[no-untyped-def]
        return nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")

    monkeypatch.setattr(_loader, "_linear_module", plain_linear)
    with pytest.raises(QuantizationUnavailableError, match="attention"):
        load_quantized(tiny_fused, quant=QuantSpec.nf4())


# ----------------------------------------------------------------- bad inputs


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_quantized(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_quantized("./nope/at/all")


def test_file_instead_of_folder(tiny_fused: Path) -> None:
    with pytest.raises(ModelLoadError, match="is a file"):
        load_quantized(tiny_fused / "config.json")


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_missing_safetensors(tiny_fused: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_fused, tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no safetensors"):
        load_quantized(folder)
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin"):
        load_quantized(folder)


def test_missing_config(tiny_fused: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_fused, tmp_path / "ckpt")
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_quantized(folder)


def test_missing_shard(tiny_original: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_original, tmp_path / "ckpt")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00002"):
        load_quantized(folder)


def test_corrupt_safetensors(tiny_fused: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_fused, tmp_path / "ckpt")
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        load_quantized(folder)


def test_weights_of_another_model(make_checkpoint, tmp_path: Path) -> None:
    folder = _copy(make_checkpoint(), tmp_path / "ckpt")
    bigger = make_checkpoint(hidden_size=128)
    shutil.copy(bigger / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match="shape"):
        load_quantized(folder)


def test_dense_weights_under_a_moe_config(make_checkpoint, tmp_path: Path) -> None:
    folder = _copy(make_checkpoint(), tmp_path / "ckpt")
    shutil.copy(make_checkpoint("mistral") / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"do not fit a mixtral model.*mlp\.down_proj"):
        load_quantized(folder)


def test_missing_tensor(tiny_fused: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_fused, tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.down_proj"]
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"lacks 5 .*k_proj.*down\[0\]") as info:
        load_quantized(folder)
    assert "layers.1.mlp.experts.down[3]" in str(info.value)


def test_missing_expert_piece_in_original_layout(tiny_original: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_original, tmp_path / "ckpt")
    shard = folder / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    del tensors["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, shard)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"gate_up\[2\]"):
        load_quantized(folder)


def test_unknown_architecture(tiny_fused: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_fused, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*mixtral.*mistral.*llama"):
        load_quantized(folder)


def test_hub_id_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OfflineError, match=r"mixtune-tests/no-such-model.*HF_HUB_OFFLINE"):
        load_quantized("mixtune-tests/no-such-model")


def test_hub_download_asks_only_for_transformers_files(
    tiny_fused: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append((repo_id, kwargs))
        return str(tiny_fused)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    loaded = load_quantized("someone/tiny-mixtral")
    assert loaded.source == "someone/tiny-mixtral"
    ((repo_id, kwargs),) = calls
    assert repo_id == "someone/tiny-mixtral"
    patterns = kwargs["allow_patterns"]
    assert "config.json" in patterns
    assert "model*.safetensors" in patterns
    assert not any(p in ("*", "*.safetensors", "*.bin") for p in patterns)


def test_bad_arguments(tiny_fused: Path) -> None:
    with pytest.raises(ConfigError, match="2 problems"):
        load_quantized(tiny_fused, quant="nf4", dtype=torch.int8)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="one device"):
        load_quantized(tiny_fused, device_map={"": 0})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not a device"):
        load_quantized(tiny_fused, device_map="gpu please")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda(tiny_fused: Path) -> None:
    with pytest.raises(ConfigError, match="no CUDA device"):
        load_quantized(tiny_fused, device_map="cuda")
    assert load_quantized(tiny_fused, device_map="auto").device == torch.device("cpu")


def test_bitsandbytes_missing(tiny_fused: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import bitsandbytes` fail
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(QuantizationUnavailableError, match=r"QuantSpec\.none\(\)") as info:
        load_quantized(tiny_fused)
    assert "pip install bitsandbytes" in str(info.value)
    # Without quantization bitsandbytes is not needed at all.
    assert (
        not load_quantized(tiny_fused, quant=QuantSpec.none())
        .model.model.layers[0]
        .mlp.experts.is_quantized
    )


def test_bitsandbytes_unsupported_device(tiny_fused: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bitsandbytes.functional as bnb_f

    def unsupported(*args: object, **kwargs: object) -> None:
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(bnb_f, "quantize_4bit", unsupported)
    with pytest.raises(
        QuantizationUnavailableError, match=r"device cpu.*no kernel.*QuantSpec\.none\(\)"
    ):
        load_quantized(tiny_fused)


# ----------------------------------------------------------------- tokenizer


def _tiny_tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def test_tokenizer_found_beside_weights_or_passed_in(tiny_fused: Path, tmp_path: Path) -> None:
    assert load_quantized(tiny_fused).tokenizer is None
    folder = _copy(tiny_fused, tmp_path / "ckpt")
    _tiny_tokenizer().save_pretrained(folder)
    found = load_quantized(folder).tokenizer
    assert found is not None
    assert found("hello world", add_special_tokens=False)["input_ids"] == [3, 4]
    given = _tiny_tokenizer()
    assert load_quantized(folder, tokenizer=given).tokenizer is given


def test_broken_tokenizer_files(tiny_fused: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_fused, tmp_path / "ckpt")
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer=") as info:
        load_quantized(folder)
    assert str(folder) in str(info.value)


def test_gradient_checkpointing_gives_the_same_input_gradients(tiny_fused: Path) -> None:
    model = load_quantized(tiny_fused, quant=FP32_NF4, dtype=torch.float32).model
    model.train()
    ids = _ids()

    def input_grad() -> torch.Tensor:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        model(inputs_embeds=embeds, use_cache=False).logits.sum().backward()
        assert embeds.grad is not None
        return embeds.grad

    plain = input_grad()
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    checkpointed = input_grad()
    torch.testing.assert_close(checkpointed, plain)
