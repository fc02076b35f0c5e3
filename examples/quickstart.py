"""The whole mixtune flow on CPU in a few minutes.

A tiny random Mixtral (2 layers, 4 experts, the real 32k vocabulary) is
written to disk, loaded with 4-bit NF4 experts and attention, given LoRA
adapters, trained on the shared arXiv sample with the real Mixtral
tokenizer, evaluated before and after (test-split perplexity) and published
to ``./out`` as a PEFT adapter with a model card.

Run it with ``nox -s quickstart`` or ``python examples/quickstart.py``.
The sample is read from ``../shared/corpus/arxiv-sample`` beside the
repository; ``--corpus`` or the ``MIXTUNE_SAMPLE_CORPUS`` variable point
elsewhere.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from mixtune.adapter import AdapterSpec
from mixtune.corpus import ChunkedCorpus
from mixtune.model import QuantSpec, load_quantized, random_checkpoint, tiny_config
from mixtune.publish import publish
from mixtune.recipe import Recipe, RunSettings
from mixtune.tokenizers import mixtral_v1

REPO = Path(__file__).resolve().parents[1]


def default_corpus() -> Path:
    env = os.environ.get("MIXTUNE_SAMPLE_CORPUS")
    return Path(env) if env else REPO.parent / "shared" / "corpus" / "arxiv-sample"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "corpus_path", nargs="?", type=Path, help="folder of papers (same as --corpus)"
    )
    parser.add_argument("--corpus", type=Path, default=default_corpus(), help="folder of papers")
    parser.add_argument("--out", type=Path, default=Path("out"), help="where to publish")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per row")
    args = parser.parse_args(argv)
    if args.corpus_path is not None:
        args.corpus = args.corpus_path
    if not args.corpus.is_dir():
        print(
            f"no corpus at {args.corpus}; pass --corpus or set MIXTUNE_SAMPLE_CORPUS",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    torch.manual_seed(0)

    # 1. A tiny random Mixtral with the real vocabulary, written like a hub checkpoint.
    work = Path(tempfile.mkdtemp(prefix="mixtune-quickstart-"))
    config = tiny_config(max_position_embeddings=1024)
    base = random_checkpoint(config, work / "tiny-mixtral", layout="original", seed=0)

    # 2. Load it with 4-bit experts and attention (fp32 compute: CPUs have no fast bf16).
    tokenizer = mixtral_v1()
    loaded = load_quantized(
        base,
        quant=QuantSpec.nf4(compute_dtype=torch.float32),
        dtype=torch.float32,
        tokenizer=tokenizer,
    )
    print(f"loaded {base.name}: {loaded.census().total_bytes / 2**20:.1f} MiB of weights")

    # 3. The papers, split by document (no leaks), packed into 256-token rows.
    corpus = ChunkedCorpus.from_folder(args.corpus, tokenizer, max_length=args.max_length)
    print(corpus.describe())

    # 4. QLoRA on attention, every expert and the output head. The head
    #    matters here: a random model can only learn the papers' token
    #    statistics in a few minutes through it.
    adapter = AdapterSpec.qlora(r=8, alpha=16, targets=("attention", "experts", "lm_head"))
    recipe = Recipe(
        max_steps=args.steps,
        batch_size=4,
        grad_accum=1,
        learning_rate=1e-2,
        warmup=0.1,
        layout="packed",
        gradient_checkpointing=False,
        eval_steps=max(1, args.steps // 2),
        save_steps=max(1, args.steps // 2),
        logging_steps=5,
        eval_rows=32,
        run=RunSettings(output_dir=work / "run"),
    )
    result = recipe.fit(loaded, corpus, adapter)
    print(result.summary())
    for i, (before, after) in enumerate(
        zip(result.routing_load_before, result.routing_load, strict=False)
    ):
        print(
            f"layer {i} expert load before: {' '.join(f'{x:.2f}' for x in before)}"
            f"  after: {' '.join(f'{x:.2f}' for x in after)}"
        )

    # 5. Publish: PEFT adapter, tokenizer, specs, model card.
    published = publish(result, args.out, overwrite=True)
    print(f"published {len(published.files)} files to {published.dest.resolve()}")
    shutil.rmtree(work, ignore_errors=True)

    first, last = result.eval_loss[0], result.eval_loss[-1]
    print(
        f"validation loss {first.loss:.3f} (step {first.step}) -> {last.loss:.3f} (step {last.step}); "
        f"test perplexity {result.perplexity_before:.0f} -> {result.perplexity_after:.0f}; "
        f"total {time.perf_counter() - t0:.0f} s"
    )
    if not last.loss < first.loss:
        print("the validation loss did not go down", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
