"""``publish``: write a trained adapter as a self-describing folder, optionally merge and upload."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any

import attrs
import torch

from mixtune.errors import MixtuneError, PublishError
from mixtune.publish._card import loss_curve_png, model_card
from mixtune.publish._specs import SCHEMA_VERSION, spec_to_dict
from mixtune.recipe._fsdp import gathered_lora, has_sharded_lora, is_sharded

__all__ = ["PublishResult", "publish"]

MERGE_TOLERANCE = 0.05
"""Largest relative RMS difference of merged vs adapter logits (bf16 rounding)."""


@attrs.frozen(kw_only=True)
class PublishResult:
    """What :func:`publish` wrote.

    Attributes:
        dest: The folder.
        files: Every file written, relative to ``dest``.
        merged_dir: The merged bf16 model's folder, if ``merge=True``.
        merge_error: Relative RMS logit difference merged vs adapter model.
        plot_note: Why no loss-curve PNG was written (``None`` if it was).
        repo_url: The Hub repository, if uploaded.
        skipped_rank: Set (to this process' rank) when this process is not
            rank 0 of a ``torch.distributed`` run and so wrote nothing: under
            ``accelerate launch`` only rank 0 publishes.
    """

    dest: Path
    files: tuple[str, ...]
    merged_dir: Path | None = None
    merge_error: float | None = None
    plot_note: str | None = None
    repo_url: str | None = None
    skipped_rank: int | None = None


def _distributed_rank() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0


def _loaded(adapted: Any) -> Any:
    return getattr(adapted, "loaded", None)


def _base_model_name(adapted: Any) -> str:
    source = getattr(_loaded(adapted), "source", None)
    if source is None:
        name = getattr(getattr(adapted.model, "config", None), "_name_or_path", "") or "unknown"
        return str(name)
    return str(source)


def _tokenizer(result: Any) -> Any:
    tok = getattr(result.corpus, "tokenizer", None)
    return tok if tok is not None else getattr(_loaded(result.model), "tokenizer", None)


def _sample_rows(result: Any, n_rows: int = 2, n_tokens: int = 64) -> dict[str, torch.Tensor]:
    ds = result.corpus.to_datasets(layout="padded")
    split = next((s for s in ("test", "validation", "train") if len(ds[s]) > 0), "train")
    rows = ds[split][: min(n_rows, len(ds[split]))]
    return {
        k: torch.as_tensor(rows[k], dtype=torch.long)[:, :n_tokens]
        for k in ("input_ids", "attention_mask")
    }


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False)
    finally:
        model.train(was)
    mask = inputs["attention_mask"].bool()
    logits: torch.Tensor = out.logits.float().cpu()
    return logits[mask]


def _write_merged(result: Any, folder: Path) -> float:
    """Write the merged bf16 model into ``folder`` and check its logits; return the error."""
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoModelForCausalLM

    adapted = result.model
    state = adapted.merged_state_dict(layout="original", dtype=torch.bfloat16)
    config = copy.deepcopy(adapted.model.config)
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.bfloat16
    config.use_cache = True
    folder.mkdir(parents=True)
    config.save_pretrained(str(folder))
    save_torch_state_dict(state, str(folder), max_shard_size="5GB")
    del state

    inputs = _sample_rows(result)
    expected = _logits(adapted.model, inputs)
    device = next(adapted.model.parameters()).device
    merged = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    merged.to(device)
    got = _logits(merged, inputs)
    del merged
    err = float(
        (got - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp_min(1e-12)
    )
    if not math.isfinite(err) or err > MERGE_TOLERANCE:
        raise PublishError(
            f"the merged bf16 model's logits differ from the adapter model's by {err:.4f} "
            f"(relative RMS; tolerance {MERGE_TOLERANCE}); the merge was not written. "
            "Publish without merge=True and report this as a bug"
        )
    return err


def publish(
    result: Any,
    dest: str | Path,
    *,
    merge: bool = False,
    push_to_hub: bool = False,
    repo_id: str | None = None,
    private: bool = True,
    overwrite: bool = False,
) -> PublishResult:
    """Write the trained adapter, tokenizer, specs and a model card to ``dest``.

    The folder holds the adapter in PEFT's format (``adapter_config.json``,
    ``adapter_model.safetensors``: stock ``PeftModel.from_pretrained`` loads
    it), the tokenizer, ``mixtune.json`` (the recipe, adapter and
    quantization specs as schema-versioned JSON, plus the metrics), a model
    card ``README.md`` and, when matplotlib is installed, ``loss_curve.png``.
    Everything is written to a hidden sibling folder first and renamed into
    place, so ``dest`` is never left half-written.

    Under ``torch.distributed`` (``accelerate launch``/``torchrun``) only
    global rank 0 publishes; every other rank returns at once a result with
    ``files=()`` and ``skipped_rank`` set, so the same script runs on every
    rank. Rank 0 does not wait for the others, nor they for it. A model
    trained with ``RunSettings(sharding="fsdp2")`` is the exception: every
    rank must call ``publish``, since all of them first gather the whole LoRA
    factors (``merge=True`` is refused there, the base being sharded).

    Args:
        result: The ``FitResult`` of :meth:`mixtune.recipe.Recipe.fit`.
        dest: The folder to create.
        merge: Also write ``merged/``: the base weights dequantized to bf16 with
            the LoRA update added, in the hub's original Mixtral layout with
            ``config.json``. Its logits are compared with the adapter model's
            on a few corpus rows before it is kept.
        push_to_hub: Upload the folder with ``huggingface_hub`` (token from the
            environment or ``hf auth login``; never written anywhere).
        repo_id: The Hub repository (``"user/name"``), needed with ``push_to_hub``.
        private: Create the repository private.
        overwrite: Replace a non-empty ``dest``.

    Returns:
        The :class:`PublishResult`.

    Raises:
        PublishError: If ``dest`` is not empty and ``overwrite`` is False,
            ``merge`` is asked of a model sharded with FSDP2,
            ``repo_id`` is missing, the merged model's logits disagree, or
            writing or uploading fails.
    """
    dest = Path(dest)
    if has_sharded_lora(getattr(result, "model", None)):
        # Trained with sharding="fsdp2": every rank holds a shard of each LoRA
        # factor. All ranks gather them (a collective, so it comes before the
        # rank check); rank 0 then writes the whole adapter as usual.
        if merge and is_sharded(result.model.model):
            raise PublishError(
                "merge=True needs the whole base model in one process, but this one is "
                "sharded (sharding='fsdp2'); publish the adapter (merge=False), then merge "
                "it in one process that holds the base"
            )
        with gathered_lora(result.model):
            return publish(
                result,
                dest,
                merge=merge,
                push_to_hub=push_to_hub,
                repo_id=repo_id,
                private=private,
                overwrite=overwrite,
            )
    rank = _distributed_rank()
    if rank != 0:
        # Rank 0 holds the same weights (DDP keeps them identical); a second
        # writer would race it for the same folder and Hub repository.
        return PublishResult(dest=dest, files=(), skipped_rank=rank)
    if push_to_hub and not repo_id:
        raise PublishError('push_to_hub=True needs repo_id="user/name"')
    if dest.exists() and not dest.is_dir():
        raise PublishError(f"dest={dest} is a file; give a folder path")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise PublishError(
            f"dest={dest} is not empty; pass overwrite=True to replace it or choose another folder"
        )
    adapted = result.model
    tmp = dest.parent / f".{dest.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    merged_dir = None
    merge_error = None
    try:
        adapted.save_peft(tmp)
        tokenizer = _tokenizer(result)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        plot_note = loss_curve_png(result, tmp / "loss_curve.png")
        if merge:
            merge_error = _write_merged(result, tmp / "merged")
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / "merged"))
        quant = getattr(_loaded(adapted), "quant", None)
        recipe = result.recipe
        meta: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "base_model": _base_model_name(adapted),
            "recipe": spec_to_dict(recipe),
            "adapter": spec_to_dict(adapted.spec) if attrs.has(type(adapted.spec)) else None,
            "quant": spec_to_dict(quant) if quant is not None and attrs.has(type(quant)) else None,
            "metrics": {
                "test_loss_before": result.test_loss_before,
                "test_loss_after": result.test_loss_after,
                "perplexity_before": result.perplexity_before,
                "perplexity_after": result.perplexity_after,
                "train_loss": [[p.step, p.loss] for p in result.train_loss],
                "eval_loss": [[p.step, p.loss] for p in result.eval_loss],
                "routing_load": [list(layer) for layer in result.routing_load],
                "routing_load_before": [list(layer) for layer in result.routing_load_before],
                "steps": result.steps,
                "tokens": result.tokens,
                "tokens_per_s": result.tokens_per_s,
                "wall_time_s": result.wall_time_s,
                "peak_memory_bytes": result.peak_memory_bytes,
                "merge_relative_rms": merge_error,
            },
        }
        (tmp / "mixtune.json").write_text(json.dumps(meta, indent=2, allow_nan=True) + "\n")
        recipe_fields = {
            f.name: getattr(recipe, f.name) for f in attrs.fields(type(recipe)) if f.name != "run"
        }
        card = model_card(
            result,
            base_model=_base_model_name(adapted),
            plot_note=plot_note,
            merged=merge,
            recipe_fields=recipe_fields,
            adapter_repr=repr(adapted.spec),
            quant_repr=repr(quant),
        )
        (tmp / "README.md").write_text(card)
    except MixtuneError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, PublishError):
            raise
        raise PublishError(f"could not publish to {dest}: {exc}") from exc
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PublishError(f"could not write {dest}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    if merge:
        merged_dir = dest / "merged"
    files = tuple(sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()))
    repo_url = _upload(dest, repo_id, private=private) if push_to_hub and repo_id else None
    return PublishResult(
        dest=dest,
        files=files,
        merged_dir=merged_dir,
        merge_error=merge_error,
        plot_note=plot_note,
        repo_url=repo_url,
    )


def _upload(folder: Path, repo_id: str, *, private: bool) -> str:
    from huggingface_hub import HfApi

    # No token argument: HfApi reads HF_TOKEN or the stored login itself, so
    # the token never passes through mixtune (nor its logs or files).
    api = HfApi()
    try:
        url = api.create_repo(repo_id=repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message="Upload LoRA adapter trained with mixtune",
        )
    except Exception as exc:
        raise PublishError(
            f"upload to the Hub repository {repo_id!r} failed ({type(exc).__name__}: {exc}); "
            "check the repo id and log in with `hf auth login` or set HF_TOKEN"
        ) from exc
    return str(url)
