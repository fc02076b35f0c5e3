"""Build a leak-free corpus from the shared arXiv sample and print its description.

Replaced by the full CPU fine-tuning quickstart once training lands.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mixtune


def main() -> None:
    default = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "arxiv-sample"
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MIXTUNE_SAMPLE_CORPUS", default))
    corpus = mixtune.ChunkedCorpus.from_folder(folder, mixtune.mixtral_v1(), max_length=1200)
    print(corpus.describe())


if __name__ == "__main__":
    main()
