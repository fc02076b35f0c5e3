"""publish(): PEFT round trip in stock peft, merged model, card, refusals, Hub upload."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixtune.errors import PublishError
from mixtune.publish import MERGE_TOLERANCE, publish, spec_from_dict
from tests.recipe import real

pytestmark = pytest.mark.slow


def _rows(res: Any, n: int = 2) -> dict[str, torch.Tensor]:
    rows = res.corpus.to_datasets(layout="padded")["test"][:n]
    return {k: torch.tensor(rows[k])[:, :64] for k in ("input_ids", "attention_mask")}


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits.float()


@pytest.fixture(scope="module")
def lora_result(mixtral_tokenizer: Any, arxiv_sample: Path) -> Any:
    return real.lora_fit(mixtral_tokenizer, arxiv_sample)


@pytest.fixture(scope="module")
def qlora_result(mixtral_tokenizer: Any, arxiv_sample: Path) -> Any:
    return real.qlora_fit(mixtral_tokenizer, arxiv_sample)


def test_adapter_reloads_in_stock_peft_with_same_logits(lora_result: Any, tmp_path: Path) -> None:
    from peft import PeftModel

    out = publish(lora_result, tmp_path / "pub")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "mixtune.json"} <= set(
        out.files
    )
    assert "tokenizer.json" in out.files
    assert not list(tmp_path.glob(".*partial"))

    inputs = _rows(lora_result)
    expected = _logits(lora_result.model.model, inputs)
    base = AutoModelForCausalLM.from_pretrained(str(real.checkpoint()), dtype=torch.float32)
    base_logits = _logits(base, inputs)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "pub"))
    got = _logits(peft_model, inputs)
    # The trained adapter changes the output, and stock peft reproduces the change.
    assert (expected - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "pub"))
    text = "Mixture of experts, $x^2$."
    assert tok(text).input_ids == lora_result.corpus.tokenizer(text).input_ids


def test_specs_round_trip_through_mixtune_json(lora_result: Any, tmp_path: Path) -> None:
    publish(lora_result, tmp_path / "pub")
    meta = json.loads((tmp_path / "pub" / "mixtune.json").read_text())
    assert meta["schema_version"] == 1
    assert spec_from_dict(meta["recipe"]) == lora_result.recipe
    assert spec_from_dict(meta["adapter"]) == lora_result.model.spec
    assert spec_from_dict(meta["quant"]) == lora_result.model.loaded.quant
    assert meta["metrics"]["perplexity_after"] == pytest.approx(lora_result.perplexity_after)
    assert meta["base_model"] == str(real.checkpoint())


def test_model_card_has_provenance_recipe_metrics(lora_result: Any, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = publish(lora_result, tmp_path / "pub")
    card = (tmp_path / "pub" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n")
    assert f"base_model: {real.checkpoint()}" in card
    assert "| CC-BY-4.0 | 38 |" in card
    assert "arxiv_2212.11764.txt" in card
    assert "| learning_rate | 0.01 |" in card
    assert f"{lora_result.perplexity_after:.3f}" in card
    assert "![Loss curve](loss_curve.png)" in card
    assert out.plot_note is None
    assert (tmp_path / "pub" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_card_says_why_there_is_no_plot(
    lora_result: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now fails
    out = publish(lora_result, tmp_path / "pub")
    assert out.plot_note is not None
    assert "mixtune[plots]" in out.plot_note
    assert "loss_curve.png" not in out.files
    assert "No loss-curve plot" in (tmp_path / "pub" / "README.md").read_text()


def test_non_empty_dest_is_refused_unless_overwrite(lora_result: Any, tmp_path: Path) -> None:
    dest = tmp_path / "pub"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(PublishError, match="overwrite=True"):
        publish(lora_result, dest)
    assert (dest / "keep.txt").read_text() == "mine"
    publish(lora_result, dest, overwrite=True)
    assert not (dest / "keep.txt").exists()
    assert (dest / "adapter_model.safetensors").is_file()


def test_merged_model_matches_adapter_model(qlora_result: Any, tmp_path: Path) -> None:
    out = publish(qlora_result, tmp_path / "pub", merge=True)
    assert out.merged_dir == tmp_path / "pub" / "merged"
    assert out.merge_error is not None
    assert out.merge_error <= MERGE_TOLERANCE
    merged_dir = tmp_path / "pub" / "merged"
    assert (merged_dir / "config.json").is_file()
    names: set[str] = set()
    for f in merged_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names |= set(st.keys())
            assert st.get_tensor(next(iter(st.keys()))).dtype == torch.bfloat16
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names  # hub layout

    inputs = _rows(qlora_result)
    expected = _logits(qlora_result.model.model, inputs)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.bfloat16)
    got = _logits(merged, inputs)
    rel = (got - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()
    assert float(rel) <= MERGE_TOLERANCE


def test_merge_mismatch_fails_and_writes_nothing(
    qlora_result: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_merge = type(qlora_result.model).merged_state_dict

    def broken(self: Any, *a: Any, **kw: Any) -> dict[str, torch.Tensor]:
        sd = real_merge(self, *a, **kw)
        sd["lm_head.weight"] = sd["lm_head.weight"] * 3
        return sd

    monkeypatch.setattr(type(qlora_result.model), "merged_state_dict", broken)
    with pytest.raises(PublishError, match="logits differ"):
        publish(qlora_result, tmp_path / "pub", merge=True)
    assert not (tmp_path / "pub").exists()
    assert not list(tmp_path.iterdir())


def test_hub_upload_goes_through_huggingface_hub(
    lora_result: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The network is replaced at the huggingface_hub boundary only: the two
    # HfApi methods publish calls are patched; everything of mixtune runs.
    from huggingface_hub import HfApi

    calls: list[tuple[str, dict[str, Any]]] = []

    def create_repo(self: Any, **kw: Any) -> str:
        calls.append(("create_repo", kw))
        return f"https://huggingface.co/{kw['repo_id']}"

    def upload_folder(self: Any, **kw: Any) -> None:
        calls.append(("upload_folder", kw))
        assert (Path(kw["folder_path"]) / "adapter_model.safetensors").is_file()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    out = publish(lora_result, tmp_path / "pub", push_to_hub=True, repo_id="me/tiny")
    assert out.repo_url == "https://huggingface.co/me/tiny"
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1]["private"] is True
    assert calls[0][1]["repo_id"] == calls[1][1]["repo_id"] == "me/tiny"
    assert "token" not in calls[0][1]
    assert "token" not in calls[1][1]
    for f in (tmp_path / "pub").rglob("*"):
        if f.is_file():
            assert b"hf_secret_token_value" not in f.read_bytes()


def test_hub_errors_become_publish_errors(
    lora_result: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi

    def refuse(self: Any, **kw: Any) -> str:
        raise PermissionError("401 Unauthorized")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(PublishError, match="hf auth login"):
        publish(lora_result, tmp_path / "pub", push_to_hub=True, repo_id="me/tiny")
    with pytest.raises(PublishError, match="repo_id"):
        publish(lora_result, tmp_path / "pub2", push_to_hub=True)
