"""Fixtures shared by every test package.

Subpackages keep their own fixtures in their own ``conftest.py``; only what
several of them need lives here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def sample_corpus_dir() -> Path:
    """The shared arXiv sample: ``../shared/corpus/arxiv-sample`` beside the repo.

    ``MIXTUNE_SAMPLE_CORPUS`` overrides it (the GPU machine gets a copy inside
    the working tree, since ``../shared`` does not travel there).
    """
    env = os.environ.get("MIXTUNE_SAMPLE_CORPUS")
    return Path(env) if env else REPO.parent / "shared" / "corpus" / "arxiv-sample"


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def arxiv_sample() -> Path:
    path = sample_corpus_dir()
    if not (path / "MANIFEST.tsv").is_file():
        pytest.fail(
            f"the shared arXiv sample is missing at {path}; set MIXTUNE_SAMPLE_CORPUS to its folder"
        )
    return path


@pytest.fixture(scope="session")
def mixtral_tokenizer():  # type: ignore[no-untyped-def]
    """The real Mixtral v0.1 tokenizer (offline, from mistral-common)."""
    from mixtune.tokenizers import mixtral_v1

    return mixtral_v1()
