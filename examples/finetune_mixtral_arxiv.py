"""Fine-tune Mixtral-8x7B on arXiv papers with QLoRA on one GPU (the guide's recipe).

Loads ``mistralai/Mixtral-8x7B-v0.1`` (or any Mixtral checkpoint folder) with
NF4 attention and experts, chunks a folder of papers (or a Hub dataset),
trains the guide's QLoRA adapter with ``Recipe.guide_qlora`` and publishes
the adapter (optionally merged, optionally uploaded).

Examples::

    python examples/finetune_mixtral_arxiv.py --papers ~/papers --out mixtral-arxiv
    python examples/finetune_mixtral_arxiv.py --dataset user/arxiv-abstracts --text-column abstract
    python examples/finetune_mixtral_arxiv.py --papers ~/papers --resume      # after an interruption
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mixtune.adapter import AdapterSpec
from mixtune.corpus import ChunkedCorpus
from mixtune.errors import MixtuneError
from mixtune.model import QuantSpec, load_quantized
from mixtune.publish import publish
from mixtune.recipe import Recipe, RunSettings
from mixtune.tokenizers import mixtral_v1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--papers", type=Path, help="folder of .txt/.md/.pdf papers (MANIFEST.tsv optional)"
    )
    src.add_argument("--dataset", help="Hugging Face dataset id with one document per row")
    p.add_argument("--text-column", default="text", help="text column of --dataset")
    p.add_argument("--model", default="mistralai/Mixtral-8x7B-v0.1", help="hub id or local folder")
    p.add_argument("--max-length", type=int, default=1200, help="tokens per training row")
    p.add_argument("--layout", choices=("packed", "padded"), default="packed")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--r", type=int, default=32, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=64.0, help="LoRA alpha")
    p.add_argument(
        "--targets",
        nargs="+",
        default=["attention", "experts"],
        help="adapter targets (presets: attention experts router lm_head all-linear)",
    )
    p.add_argument("--save-steps", type=int, default=50)
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--eval-rows", type=int, default=None, help="cap evaluation rows per split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", type=Path, default=Path("runs/mixtral-arxiv"))
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--report-to", nargs="*", default=[], choices=("tensorboard", "wandb"))
    p.add_argument("--out", type=Path, default=Path("mixtral-arxiv"), help="publish folder")
    p.add_argument("--merge", action="store_true", help="also write a merged bf16 model")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload to this Hub repo (private)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("this example needs a CUDA GPU; examples/quickstart.py runs on CPU", file=sys.stderr)
        return 2
    try:
        tokenizer = mixtral_v1()
        loaded = load_quantized(
            args.model, quant=QuantSpec.nf4(), device_map="cuda", tokenizer=tokenizer
        )
        print(loaded.census())
        if args.papers is not None:
            corpus = ChunkedCorpus.from_folder(
                args.papers, tokenizer, max_length=args.max_length, seed=args.seed
            )
        else:
            corpus = ChunkedCorpus.from_hub(
                args.dataset,
                tokenizer,
                args.text_column,
                max_length=args.max_length,
                seed=args.seed,
            )
        print(corpus.describe())
        recipe = Recipe.guide_qlora(
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            learning_rate=args.lr,
            layout=args.layout,
            save_steps=args.save_steps,
            eval_steps=args.eval_steps,
            eval_rows=args.eval_rows,
            seed=args.seed,
            run=RunSettings(output_dir=args.run_dir, report_to=tuple(args.report_to)),
        )
        adapter = AdapterSpec.qlora(r=args.r, alpha=args.alpha, targets=tuple(args.targets))
        result = recipe.fit(loaded, corpus, adapter, resume=args.resume)
        print(result.summary())
        published = publish(
            result,
            args.out,
            merge=args.merge,
            push_to_hub=args.push_to_hub is not None,
            repo_id=args.push_to_hub,
            overwrite=args.overwrite,
        )
    except MixtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"published to {published.dest}"
        + (f" and {published.repo_url}" if published.repo_url else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
