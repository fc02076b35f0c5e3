"""Invariants of chunking, splitting and the row layouts, with the real Mixtral tokenizer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mixtune.corpus import (
    IGNORE_INDEX,
    SPLITS,
    ChunkedCorpus,
    Document,
    assign_split,
    clean_text,
)
from mixtune.errors import CorpusError, SplitError
from tests.strategies import chunk_settings, doc_ids, paragraph_texts, texts

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

documents = st.lists(
    st.builds(Document, doc_ids, paragraph_texts), min_size=1, max_size=6, unique_by=lambda d: d.id
)


def _build(docs, tok, *, max_length, overlap, fractions=(1.0, 0.0, 0.0)):  # type: ignore[no-untyped-def]
    try:
        return ChunkedCorpus.from_documents(
            docs,
            tok,
            max_length=max_length,
            overlap=overlap,
            fractions=fractions,
            progress=False,
        )
    except (SplitError, CorpusError) as exc:
        # Every text empty after cleaning, duplicates or an unlucky split: not
        # what these properties are about.
        assume(False)
        raise AssertionError from exc  # unreachable: assume raises


@PROPERTY
@given(docs=documents, settings_=chunk_settings())
def test_windows_cover_every_token_with_exactly_the_overlap(
    mixtral_tokenizer, docs, settings_
) -> None:
    max_length, overlap = settings_
    corpus = _build(docs, mixtral_tokenizer, max_length=max_length, overlap=overlap)
    for doc in corpus.documents:
        # The document's tokens, computed here independently of the corpus.
        body = mixtral_tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        chunks = [c for c in corpus.chunks() if c.doc_id == doc.id]
        assert [c.index for c in chunks] == list(range(len(chunks)))
        assert chunks[0].token_start == 0
        assert chunks[-1].token_end == len(body)
        for before, after in itertools.pairwise(chunks):
            assert after.token_start == before.token_end - overlap
            assert after.token_start > before.token_start
        for c in chunks:
            assert 1 <= c.n_tokens <= max_length
            last = c is chunks[-1]
            expected = [1, *body[c.token_start : c.token_end], *([2] if last else [])]
            assert c.input_ids == expected


@PROPERTY
@given(docs=documents, settings_=chunk_settings())
def test_character_spans_tile_the_text_and_decoding_round_trips(
    mixtral_tokenizer, docs, settings_
) -> None:
    max_length, _ = settings_
    corpus = _build(docs, mixtral_tokenizer, max_length=max_length, overlap=0)
    for doc in corpus.documents:
        chunks = [c for c in corpus.chunks() if c.doc_id == doc.id]
        assert "".join(doc.text[c.char_start : c.char_end] for c in chunks) == doc.text
        body = [t for c in chunks for t in c.input_ids[1:]][:-1]  # BOS off each, final EOS off
        whole = mixtral_tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        assert body == whole
        # SentencePiece decodes its own space marker "▁" (U+2581) as a space;
        # otherwise decoding gives back the cleaned text exactly.
        assert mixtral_tokenizer.decode(body) == doc.text.replace("\u2581", " ")
        for c in chunks:
            # Each chunk decodes to its own span (SentencePiece drops a leading space).
            decoded = mixtral_tokenizer.decode(c.input_ids, skip_special_tokens=True)
            span = doc.text[c.char_start : c.char_end].replace("\u2581", " ")
            assert decoded.strip() == span.strip()


@PROPERTY
@given(
    docs=st.lists(
        st.builds(Document, doc_ids, paragraph_texts),
        min_size=4,
        max_size=10,
        unique_by=lambda d: d.id,
    ),
    extra=st.lists(st.builds(Document, doc_ids, texts), max_size=3),
)
def test_no_document_in_two_splits_and_adding_documents_moves_no_other(
    mixtral_tokenizer, docs, extra
) -> None:
    fractions = (0.5, 0.5, 0.0)
    corpus = _build(docs, mixtral_tokenizer, max_length=16, overlap=0, fractions=fractions)
    per_split = {s: {c.doc_id for c in corpus.chunks(s)} for s in SPLITS}
    assert not per_split["train"] & per_split["validation"]
    assert not per_split["test"]
    for c in corpus.chunks():
        assert c.split == corpus.split_of(c.doc_id)
    ids = {d.id for d in docs}
    grown = _build(
        [*docs, *(d for d in extra if d.id not in ids)],
        mixtral_tokenizer,
        max_length=16,
        overlap=0,
        fractions=fractions,
    )
    shrunk_docs = list(corpus.documents)[1:]
    for doc in corpus.documents:
        assert grown.split_of(doc.id) == corpus.split_of(doc.id)
    if len(shrunk_docs) >= 2:
        try:
            shrunk = ChunkedCorpus.from_documents(
                shrunk_docs, mixtral_tokenizer, max_length=16, fractions=fractions, progress=False
            )
        except SplitError:
            return
        for doc in shrunk.documents:
            assert shrunk.split_of(doc.id) == corpus.split_of(doc.id)


@settings(max_examples=300, deadline=None)
@given(
    doc_id=doc_ids,
    seed=st.integers(-(2**40), 2**40),
    fractions=st.sampled_from([(0.8, 0.1, 0.1), (0.9, 0.1, 0.0), (0.5, 0.0, 0.5), (1.0, 0.0, 0.0)]),
)
def test_zero_fraction_split_never_receives_a_document(doc_id, seed, fractions) -> None:
    split = assign_split(doc_id, fractions, seed)
    assert fractions[SPLITS.index(split)] > 0


@PROPERTY
@given(docs=documents, settings_=chunk_settings(), layout=st.sampled_from(["padded", "packed"]))
def test_rows_mask_padding_and_chunk_starts(mixtral_tokenizer, docs, settings_, layout) -> None:
    max_length, overlap = settings_
    corpus = _build(docs, mixtral_tokenizer, max_length=max_length, overlap=overlap)
    rows = corpus.rows("train", layout)
    ids, mask, labels = (np.asarray(rows[k]) for k in ("input_ids", "attention_mask", "labels"))
    chunks = [c.input_ids for c in corpus.chunks("train")]
    assert ids.shape[1] == max_length
    # Padding: attention 0 and label -100, exactly where no real token is.
    real = mask == 1
    assert int(real.sum()) == sum(len(c) for c in chunks)
    assert (labels[~real] == IGNORE_INDEX).all()
    assert (ids[~real] == 2).all()  # no pad token: EOS pads
    if layout == "padded":
        assert ids.shape[0] == len(chunks)
        assert (labels[real] == ids[real]).all()
        for row, c in zip(ids, chunks, strict=True):
            assert row[: len(c)].tolist() == c
        return
    positions = np.asarray(rows["position_ids"])
    seen = []
    for r in range(ids.shape[0]):
        at = 0
        for k in rows["seq_lens"][r]:
            assert positions[r, at : at + k].tolist() == list(range(k))
            assert labels[r, at] == IGNORE_INDEX
            assert labels[r, at + 1 : at + k].tolist() == ids[r, at + 1 : at + k].tolist()
            seen.append(ids[r, at : at + k].tolist())
            at += k
        assert not real[r, at:].any()
        # The padded tail is its own sequence: positions restart there too.
        assert positions[r, at:].tolist() == list(range(max_length - at))
    assert sorted(seen) == sorted(chunks)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_same_inputs_give_identical_rows(mixtral_tokenizer, layout) -> None:
    docs = [Document(f"d{i}", "A sentence here. " * (i * 7 + 3)) for i in range(12)]
    a = ChunkedCorpus.from_documents(
        docs, mixtral_tokenizer, max_length=32, fractions=(0.5, 0.5, 0.0), progress=False
    )
    b = ChunkedCorpus.from_documents(
        list(reversed(docs)),
        mixtral_tokenizer,
        max_length=32,
        fractions=(0.5, 0.5, 0.0),
        progress=False,
    )
    da, db = a.to_datasets(layout), b.to_datasets(layout)
    for split in SPLITS:
        assert da[split].to_dict() == db[split].to_dict()


@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_cleaning_is_idempotent_and_leaves_no_control_characters(text) -> None:
    once = clean_text(text)
    assert clean_text(once) == once
    assert "\r" not in once
    assert "\n\n\n" not in once
    assert once == once.strip()
    assert all(ch in "\t\n" or not (ord(ch) < 32 or 127 <= ord(ch) < 160) for ch in once)
