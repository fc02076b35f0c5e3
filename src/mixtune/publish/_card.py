"""The model card (README.md) and the loss-curve plot of a published adapter."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["loss_curve_png", "model_card"]


def loss_curve_png(result: Any, path: Path) -> str | None:
    """Plot training and validation loss to ``path``.

    Args:
        result: The ``FitResult``.
        path: The PNG to write.

    Returns:
        ``None`` on success, else why no plot was written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 'matplotlib is not installed (`pip install "mixtune[plots]"` adds it)'
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    if result.train_loss:
        ax.plot(
            [p.step for p in result.train_loss], [p.loss for p in result.train_loss], label="train"
        )
    if result.eval_loss:
        ax.plot(
            [p.step for p in result.eval_loss],
            [p.loss for p in result.eval_loss],
            marker="o",
            label="validation",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _provenance_section(corpus: Any) -> list[str]:
    getter = getattr(corpus, "provenance", None)
    prov = getter() if callable(getter) else None
    if prov is None or not getattr(prov, "sources", None):
        return ["No provenance was recorded for the training data."]
    lines = [f"Origin: `{prov.origin}` ({len(prov.sources)} documents)."]
    licenses = getattr(prov, "licenses", {})
    if licenses:
        lines += ["", "| Licence | Documents |", "|---|---|"]
        lines += [f"| {lic} | {n} |" for lic, n in licenses.items()]
    if getattr(prov, "license_files", ()):
        lines += ["", "Licence files beside the data: " + ", ".join(prov.license_files) + "."]
    lines += ["", "<details><summary>Documents</summary>", ""]
    lines += ["| Id | Title | Licence | URL |", "|---|---|---|---|"]
    for s in prov.sources:
        title = (s.title or "").replace("|", "\\|")
        lines.append(f"| {s.doc_id} | {title} | {s.license or 'unknown'} | {s.url or ''} |")
    lines += ["", "</details>"]
    return lines


def model_card(
    result: Any,
    *,
    base_model: str,
    plot_note: str | None,
    merged: bool,
    recipe_fields: dict[str, Any],
    adapter_repr: str,
    quant_repr: str,
) -> str:
    """Render the model card.

    Args:
        result: The ``FitResult``.
        base_model: The base model's id or path.
        plot_note: ``None`` if ``loss_curve.png`` was written, else why not.
        merged: Whether a merged model sits in ``merged/``.
        recipe_fields: The recipe's artifact-defining fields.
        adapter_repr: The adapter spec, printed.
        quant_repr: The quantization spec, printed.

    Returns:
        Markdown with a YAML header the Hugging Face Hub reads.
    """
    licenses: dict[str, int] = {}
    prov_getter = getattr(result.corpus, "provenance", None)
    if callable(prov_getter):
        licenses = getattr(prov_getter(), "licenses", {}) or {}
    tags = ["mixtune", "lora", "mixtral", "moe", "peft"]
    header = [
        "---",
        "library_name: peft",
        f"base_model: {base_model}",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
    ]
    last_eval = result.eval_loss[-1].loss if result.eval_loss else float("nan")
    metrics = [
        "| Metric | Value |",
        "|---|---|",
        f"| Test perplexity before | {result.perplexity_before:.3f} |",
        f"| Test perplexity after | {result.perplexity_after:.3f} |",
        f"| Test loss before / after | {result.test_loss_before:.4f} / {result.test_loss_after:.4f} |",
        f"| Last validation loss | {last_eval:.4f} |",
        f"| Optimizer steps | {result.steps} |",
        f"| Tokens trained (this run) | {result.tokens} |",
        f"| Throughput | {result.tokens_per_s:.0f} tokens/s |",
        f"| Wall time | {result.wall_time_s:.1f} s |",
        f"| Peak memory | {_fmt_bytes(result.peak_memory_bytes)} |",
    ]
    routing = []
    before_load = getattr(result, "routing_load_before", ()) or ((),) * len(result.routing_load)
    for i, (layer, before) in enumerate(zip(result.routing_load, before_load, strict=False)):
        share = " ".join(f"{x:.2f}" for x in layer)
        was = " ".join(f"{x:.2f}" for x in before)
        routing.append(f"| {i} | {was} | {share} | {max(layer) * len(layer):.2f} |")
    recipe_rows = ["| Field | Value |", "|---|---|"] + [
        f"| {k} | {v} |" for k, v in recipe_fields.items()
    ]
    plot = (
        ["![Loss curve](loss_curve.png)"]
        if plot_note is None
        else [f"No loss-curve plot: {plot_note}."]
    )
    licence_line = (
        "Training data licences: " + ", ".join(f"{k} ({v})" for k, v in licenses.items()) + "."
        if licenses
        else ""
    )
    usage = [
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_model}", dtype="bfloat16")',
        'model = PeftModel.from_pretrained(base, "<this folder or repo>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder or repo>")',
        "```",
    ]
    body = [
        f"# LoRA adapter for {base_model}",
        "",
        "Trained with mixtune (LoRA on a Mixtral-style Mixture-of-Experts model, experts "
        "included). The adapter is in PEFT's format; "
        + ("a merged bf16 model is in `merged/`." if merged else "no merged model was written."),
        "",
        "## Base model",
        "",
        f"`{base_model}`, quantization: `{quant_repr}`.",
        "",
        "## Training data",
        "",
        *_provenance_section(result.corpus),
        "",
        licence_line,
        "",
        "## Recipe",
        "",
        f"Adapter: `{adapter_repr}`",
        "",
        *recipe_rows,
        "",
        "## Results",
        "",
        *metrics,
        "",
        *plot,
        "",
        "### Expert routing load (test split)",
        "",
        "Fraction of routed token slots each expert received, per layer, before and after "
        "training; the last column is the busiest expert's share after training relative to "
        "a perfectly even split (1.00 = even).",
        "",
        "| Layer | Before | After | Max / even |",
        "|---|---|---|---|",
        *routing,
        "",
        "## Use",
        "",
        *usage,
        "",
    ]
    text = "\n".join(header + body)
    # Perplexities of an untrained tiny model can overflow; keep the card valid.
    return text.replace("inf |", "∞ |") if math.isinf(result.perplexity_before) else text
