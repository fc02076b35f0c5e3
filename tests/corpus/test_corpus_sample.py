"""The shared arXiv sample at max_length 1200, checked against counts computed here."""

from __future__ import annotations

import csv
import hashlib
import math
from collections import Counter
from pathlib import Path

import pytest

from mixtune.corpus import SPLITS, ChunkedCorpus, clean_text

MAX_LENGTH = 1200
SLACK = 0.1


@pytest.fixture(scope="module")
def sample_corpus(arxiv_sample: Path, mixtral_tokenizer) -> ChunkedCorpus:  # type: ignore[no-untyped-def]
    return ChunkedCorpus.from_folder(
        arxiv_sample, mixtral_tokenizer, max_length=MAX_LENGTH, progress=False
    )


def _expected_split(doc_id: str, seed: int = 0) -> str:
    # The documented rule, written out again: blake2b(f"{seed}:{id}") → [0, 1) → 80/10/10.
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "big") / 2**64
    return "train" if u < 0.8 else "validation" if u < 0.9 else "test"


def test_documents_and_splits_match_the_folder(
    sample_corpus: ChunkedCorpus, arxiv_sample: Path
) -> None:
    papers = sorted(p.name for p in arxiv_sample.glob("*.txt") if p.name.startswith("arxiv_"))
    assert len(papers) == 40
    assert [d.id for d in sample_corpus.documents] == papers
    described = sample_corpus.describe()
    expected = Counter(_expected_split(p) for p in papers)
    for split in SPLITS:
        assert described[split].documents == expected[split]
        for paper in papers:
            if _expected_split(paper) == split:
                assert sample_corpus.split_of(paper) == split
    assert described.skipped == ()
    assert described.documents == 40


def test_token_and_chunk_counts_match_an_independent_tokenization(
    sample_corpus: ChunkedCorpus, arxiv_sample: Path, mixtral_tokenizer
) -> None:
    budget = MAX_LENGTH - 2  # BOS on every chunk, EOS on a document's last
    tokens: Counter[str] = Counter()
    low: Counter[str] = Counter()
    high: Counter[str] = Counter()
    docs: Counter[str] = Counter()
    for path in sorted(arxiv_sample.glob("arxiv_*.txt")):
        text = clean_text(path.read_text(encoding="utf-8"))
        n = len(mixtral_tokenizer(text, add_special_tokens=False)["input_ids"])
        split = _expected_split(path.name)
        tokens[split] += n + 1  # the body plus the document's EOS
        docs[split] += 1
        low[split] += math.ceil(n / budget)
        high[split] += math.ceil(n / (budget - int(budget * SLACK)))
    described = sample_corpus.describe()
    for split in SPLITS:
        stats = described[split]
        # One BOS per chunk on top of the body tokens and EOS.
        assert stats.tokens == tokens[split] + stats.chunks
        assert low[split] <= stats.chunks <= high[split]
        assert stats.padded_rows == stats.chunks
        assert math.ceil(stats.tokens / MAX_LENGTH) <= stats.packed_rows <= stats.chunks
        assert stats.padded_fraction == pytest.approx(stats.tokens / (stats.chunks * MAX_LENGTH))
    assert described.packed_fraction >= 0.95
    table = str(described)
    assert f"{described.tokens}" in table
    assert "skipped 0 documents" in table


def test_datasets_have_the_described_shape(sample_corpus: ChunkedCorpus) -> None:
    described = sample_corpus.describe()
    for layout in ("padded", "packed"):
        dd = sample_corpus.to_datasets(layout)
        assert list(dd) == list(SPLITS)
        for split in SPLITS:
            rows = (
                described[split].padded_rows if layout == "padded" else described[split].packed_rows
            )
            assert dd[split].num_rows == rows
            first = dd[split][0]
            assert len(first["input_ids"]) == len(first["labels"]) == MAX_LENGTH
            real = sum(sum(m) for m in dd[split]["attention_mask"])
            assert real == described[split].tokens


def test_manifest_metadata_and_provenance(sample_corpus: ChunkedCorpus, arxiv_sample: Path) -> None:
    with (arxiv_sample / "MANIFEST.tsv").open(encoding="utf-8") as f:
        rows = {r["file"]: r for r in csv.DictReader(f, delimiter="\t")}
    doc = sample_corpus.document("arxiv_2212.11765.txt")
    assert doc.title == rows["arxiv_2212.11765.txt"]["title"]
    assert doc.metadata["authors"] == rows["arxiv_2212.11765.txt"]["authors"]
    assert doc.url == "https://arxiv.org/abs/2212.11765"
    prov = sample_corpus.provenance()
    assert prov.licenses == dict(Counter(r["license"] for r in rows.values()).most_common())
    assert prov.license_files == ("LICENSE-CC-BY-SA-4.0.txt",)
    assert [s.doc_id for s in prov.sources] == sorted(rows)
