"""Corpus building speed and row density (padded vs packed) with the real Mixtral tokenizer.

Usage::

    PYTHONPATH=src python benchmarks/corpus.py [FOLDER] [--max-length 1200] [--repeats 3]

FOLDER defaults to ``$MIXTUNE_SAMPLE_CORPUS`` or ``../shared/corpus/arxiv-sample``
beside the repository.  Goals: building from the 40-paper sample in < 10 s on
2 cores, and a real-token fraction >= 0.95 for packed rows both on the papers
and on short (~250-character) rows like the guide's dataset.  Prints a table
and writes ``benchmarks/results/corpus.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from mixtune.corpus import ChunkedCorpus, Document
from mixtune.tokenizers import mixtral_v1

REPO = Path(__file__).resolve().parents[1]
SHORT_ROW_CHARS = 250


def _default_folder() -> Path:
    env = os.environ.get("MIXTUNE_SAMPLE_CORPUS")
    return Path(env) if env else REPO.parent / "shared" / "corpus" / "arxiv-sample"


def _short_rows(corpus: ChunkedCorpus) -> list[Document]:
    """The papers re-cut into rows of about 250 characters at word boundaries."""
    rows: list[Document] = []
    for doc in corpus.documents:
        for p, paragraph in enumerate(doc.text.split("\n\n")):
            words = paragraph.split()
            piece: list[str] = []
            size = 0
            k = 0
            for word in words:
                piece.append(word)
                size += len(word) + 1
                if size >= SHORT_ROW_CHARS:
                    rows.append(Document(f"{doc.id}#{p}.{k}", " ".join(piece)))
                    piece, size, k = [], 0, k + 1
            if piece:
                rows.append(Document(f"{doc.id}#{p}.{k}", " ".join(piece)))
    return rows


def _timed(fn: Any, repeats: int) -> tuple[Any, list[float]]:
    times = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=_default_folder())
    parser.add_argument("--max-length", type=int, default=1200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "corpus.json")
    args = parser.parse_args()

    tokenizer = mixtral_v1()
    papers, build_times = _timed(
        lambda: ChunkedCorpus.from_folder(
            args.folder, tokenizer, max_length=args.max_length, progress=False
        ),
        args.repeats,
    )
    _, padded_times = _timed(lambda: papers.to_datasets("padded"), args.repeats)
    _, packed_times = _timed(lambda: papers.to_datasets("packed"), args.repeats)
    rows_docs = _short_rows(papers)
    short, short_times = _timed(
        lambda: ChunkedCorpus.from_documents(
            rows_docs, tokenizer, max_length=args.max_length, progress=False
        ),
        1,
    )
    print(papers.describe())
    print()
    print(short.describe())
    print()

    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "folder": str(args.folder),
        "max_length": args.max_length,
        "build_seconds_median": statistics.median(build_times),
        "build_seconds": build_times,
        "to_datasets_padded_seconds_median": statistics.median(padded_times),
        "to_datasets_packed_seconds_median": statistics.median(packed_times),
        "datasets": {},
    }
    for name, corpus, seconds in (
        ("papers", papers, statistics.median(build_times)),
        ("short rows (~250 chars)", short, short_times[0]),
    ):
        d = corpus.describe()
        results["datasets"][name] = {
            "documents": d.documents,
            "chunks": d.chunks,
            "tokens": d.tokens,
            "mean_chunk_tokens": d.tokens / d.chunks,
            "build_seconds": seconds,
            "padded_rows": sum(s.padded_rows for s in d.splits),
            "packed_rows": sum(s.packed_rows for s in d.splits),
            "padded_real_fraction": d.padded_fraction,
            "packed_real_fraction": d.packed_fraction,
        }

    head = f"{'input':<24} {'docs':>6} {'chunks':>7} {'tokens':>8} {'build s':>8} {'padded rows':>11} {'packed rows':>11} {'padded real':>11} {'packed real':>11}"
    print(f"max_length {args.max_length}, {os.cpu_count()} CPUs, median of {args.repeats} builds")
    print(head)
    print("-" * len(head))
    for name, r in results["datasets"].items():
        print(
            f"{name:<24} {r['documents']:>6} {r['chunks']:>7} {r['tokens']:>8} {r['build_seconds']:>8.2f} "
            f"{r['padded_rows']:>11} {r['packed_rows']:>11} {r['padded_real_fraction']:>11.3f} "
            f"{r['packed_real_fraction']:>11.3f}"
        )
    print(
        f"to_datasets: padded {results['to_datasets_padded_seconds_median']:.2f} s, "
        f"packed {results['to_datasets_packed_seconds_median']:.2f} s (papers)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
