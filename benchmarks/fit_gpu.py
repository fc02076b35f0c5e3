"""QLoRA fit on a 2-layer slice at Mixtral-8x7B width, on one GPU.

A seeded random checkpoint with Mixtral-8x7B's layer shapes (hidden 4096,
8 experts × 14336, 32/8 attention heads, 32k vocabulary) but 2 layers is
loaded with NF4 experts and attention, adapted with the guide's QLoRA
adapter and trained for 30 steps with ``Recipe.guide_qlora`` on the shared
arXiv sample and the real Mixtral tokenizer, then published with a merged
bf16 model. Prints a table and writes ``benchmarks/results/fit_gpu.json``.

Usage: ``python benchmarks/fit_gpu.py [--steps 30] [--max-length 1024]``
(``MIXTUNE_SAMPLE_CORPUS`` points at the sample if it is not beside the repo).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mixtune.adapter import AdapterSpec
from mixtune.corpus import ChunkedCorpus
from mixtune.model import QuantSpec, load_quantized, mixtral_8x7b_config, random_checkpoint
from mixtune.publish import publish
from mixtune.recipe import Recipe, RunSettings
from mixtune.tokenizers import mixtral_v1

REPO = Path(__file__).resolve().parents[1]


def slice_config() -> Any:
    return mixtral_8x7b_config(2, max_position_embeddings=4096)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    sample = Path(
        os.environ.get("MIXTUNE_SAMPLE_CORPUS", REPO.parent / "shared" / "corpus" / "arxiv-sample")
    )
    work = Path(tempfile.mkdtemp(prefix="mixtune-fit-gpu-"))
    t0 = time.perf_counter()
    base = random_checkpoint(slice_config(), work / "slice", layout="original", seed=0)
    tokenizer = mixtral_v1()
    loaded = load_quantized(base, quant=QuantSpec.nf4(), device_map="cuda", tokenizer=tokenizer)
    load_s = time.perf_counter() - t0
    corpus = ChunkedCorpus.from_folder(sample, tokenizer, max_length=args.max_length)
    recipe = Recipe.guide_qlora(
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=2,
        learning_rate=1e-3,
        eval_steps=args.steps,
        save_steps=args.steps,
        logging_steps=5,
        eval_rows=32,
        run=RunSettings(output_dir=work / "run"),
    )
    adapter = AdapterSpec.qlora(targets=("attention", "experts", "lm_head"))
    result = recipe.fit(loaded, corpus, adapter)
    t1 = time.perf_counter()
    published = publish(result, work / "published", merge=True)
    publish_s = time.perf_counter() - t1

    row = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "steps": result.steps,
        "batch_size": args.batch_size,
        "grad_accum": 2,
        "max_length": args.max_length,
        "tokens": result.tokens,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "train_wall_s": round(result.wall_time_s, 2),
        "load_s": round(load_s, 2),
        "publish_merge_s": round(publish_s, 2),
        "peak_memory_gib": round(result.peak_memory_bytes / 2**30, 3),
        "preflight_needed_gib": round(result.memory.needed / 2**30, 3),
        "weights_gib": round(result.memory.weights / 2**30, 3),
        "eval_loss_first": result.eval_loss[0].loss,
        "eval_loss_last": result.eval_loss[-1].loss,
        "perplexity_before": result.perplexity_before,
        "perplexity_after": result.perplexity_after,
        "merge_relative_rms": published.merge_error,
    }
    width = max(len(k) for k in row)
    for k, v in row.items():
        print(f"{k:<{width}}  {v}")
    out = REPO / "benchmarks" / "results" / "fit_gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
