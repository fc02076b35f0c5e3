"""Building corpora: folders, documents, datasets, cleaning, cut points and packing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtune.corpus import (
    ChunkedCorpus,
    Document,
    clean_text,
    cut_windows,
    pack_lengths,
)
from mixtune.corpus._layouts import packed_rows, padded_rows

PARAGRAPH = "Experts route tokens to the best expert. " * 6


def _minimal_pdf(lines: list[str]) -> bytes:
    """A one-page PDF with Helvetica text lines, xref offsets computed exactly."""
    content = (
        "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({line}) Tj T*" for line in lines) + " ET"
    )
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(content)} >>\nstream\n{content}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += (
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    )
    return out


# ------------------------------------------------------------------ cleaning


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a\r\nb\rc", "a\nb\nc"),
        ("a\u00a0b\u202fc\u2009d", "a b c d"),
        ("zero\u200bwidth\ufeff soft\u00adhyphen", "zerowidth softhyphen"),
        ("nul\x00 bell\x07 del\x7f c1\x9b.", "nul bell del c1."),
        ("trailing  \t\nspaces   ", "trailing\nspaces"),
        ("a\n\n\n\n\nb\n \n \n\nc", "a\n\nb\n\nc"),
        ("\n\n  indented start", "indented start"),
        ("page\fbreak\u2028line", "page\nbreak\nline"),
        ("keep\ttabs and 👩\u200d💻 ZWJ", "keep\ttabs and 👩\u200d💻 ZWJ"),
        ("no NFKC: ﬁ ①", "no NFKC: ﬁ ①"),
    ],
)
def test_cleaning_rules(raw: str, clean: str) -> None:
    assert clean_text(raw) == clean


# ------------------------------------------------------------------- folders


def test_folder_ids_manifest_and_meta_files(make_folder, word_tokenizer) -> None:
    manifest = "file\ttitle\tlicense\turl\na.txt\tPaper A\tCC0-1.0\thttps://x/a\n"
    root = make_folder(
        {
            "a.txt": PARAGRAPH,
            "sub/b.md": "# Heading\n\n" + PARAGRAPH + "b",
            "sub/deep/c.tex": r"\section{Intro} " + PARAGRAPH + "c",
            "MANIFEST.tsv": manifest,
            "README.md": "about this corpus",
            "LICENSE": "CC0",
            "notes.csv": "not,a,document",
            ".hidden.txt": "hidden",
        }
    )
    corpus = ChunkedCorpus.from_folder(
        root, word_tokenizer, max_length=64, fractions=(1, 0, 0), progress=False
    )
    assert [d.id for d in corpus.documents] == ["a.txt", "sub/b.md", "sub/deep/c.tex"]
    a = corpus.document("a.txt")
    assert (a.title, a.license, a.url) == ("Paper A", "CC0-1.0", "https://x/a")
    assert corpus.document("sub/b.md").metadata == {}
    prov = corpus.provenance()
    assert prov.license_files == ("LICENSE",)
    assert prov.licenses == {"unknown": 2, "CC0-1.0": 1}
    assert prov.origin == str(root)


def test_pdf_files_are_read(make_folder, word_tokenizer) -> None:
    pytest.importorskip("pypdf")
    root = make_folder({"paper.pdf": _minimal_pdf(["Hello PDF world.", "Second line here."])})
    corpus = ChunkedCorpus.from_folder(
        root, word_tokenizer, max_length=64, fractions=(1, 0, 0), progress=False
    )
    assert corpus.document("paper.pdf").text == "Hello PDF world.\nSecond line here."


def test_duplicates_and_empty_documents_are_reported(word_tokenizer) -> None:
    docs = [
        Document("a", PARAGRAPH),
        Document("b", PARAGRAPH + "\r\n\n\n"),
        Document("c", "\u200b \n"),
    ]
    corpus = ChunkedCorpus.from_documents(
        docs, word_tokenizer, max_length=64, fractions=(1, 0, 0), progress=False
    )
    assert [d.id for d in corpus.documents] == ["a"]
    assert {s.id: s.reason for s in corpus.describe().skipped} == {
        "b": "same text as 'a' after cleaning",
        "c": "empty after cleaning",
    }


def test_plain_strings_get_ids_from_their_text(word_tokenizer) -> None:
    texts = [f"{i} " + PARAGRAPH for i in range(30)]
    corpus = ChunkedCorpus.from_documents(texts, word_tokenizer, max_length=64, progress=False)
    more = ChunkedCorpus.from_documents(
        ["new " + PARAGRAPH, *reversed(texts)], word_tokenizer, max_length=64, progress=False
    )
    assert all(d.id.startswith("sha-") for d in corpus.documents)
    for doc in corpus.documents:
        assert more.split_of(doc.id) == corpus.split_of(doc.id)


def test_from_hub_reads_a_local_dataset(tmp_path: Path, word_tokenizer) -> None:
    rows = [{"key": f"k{i}", "text": f"Row {i}. " + PARAGRAPH} for i in range(5)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    corpus = ChunkedCorpus.from_hub(
        "json",
        word_tokenizer,
        id_column="key",
        data_files=str(tmp_path / "rows.jsonl"),
        cache_dir=str(tmp_path / "cache"),
        max_length=64,
        fractions=(1, 0, 0),
        progress=False,
    )
    assert [d.id for d in corpus.documents] == [f"k{i}" for i in range(5)]
    assert corpus.origin == "json"


# ----------------------------------------------------------- any tokenizer


def test_tokenizer_without_bos_and_with_a_pad_token(gpt2_like_tokenizer) -> None:
    corpus = ChunkedCorpus.from_documents(
        [Document("d", PARAGRAPH * 4)],
        gpt2_like_tokenizer,
        max_length=32,
        fractions=(1, 0, 0),
        progress=False,
    )
    eos = gpt2_like_tokenizer.eos_token_id
    pad = gpt2_like_tokenizer.pad_token_id
    assert corpus.prefix_ids == ()
    body = gpt2_like_tokenizer(corpus.documents[0].text)["input_ids"]
    chunks = corpus.chunks("train")
    assert [t for c in chunks for t in c.input_ids] == [*body, eos]
    assert all(c.n_tokens <= 32 for c in chunks)
    assert max(c.n_tokens for c in chunks[:-1]) <= 31  # every chunk reserves room for EOS
    rows = corpus.rows("train", "padded")
    last = chunks[-1].n_tokens
    assert rows["input_ids"][-1, last:].tolist() == [pad] * (32 - last)


def test_eos_only_at_the_end_of_each_document(word_tokenizer) -> None:
    corpus = ChunkedCorpus.from_documents(
        [Document("a", PARAGRAPH * 3), Document("b", PARAGRAPH * 2)],
        word_tokenizer,
        max_length=16,
        fractions=(1, 0, 0),
        progress=False,
    )
    for c in corpus.chunks():
        last = c.token_end == max(x.token_end for x in corpus.chunks() if x.doc_id == c.doc_id)
        assert c.input_ids[0] == 1
        assert (c.input_ids[-1] == 2) == last
        assert 2 not in c.input_ids[:-1]


# -------------------------------------------------------------- cut points


def _word_offsets(text: str) -> list[tuple[int, int]]:
    """One token per word or newline, spaces attached to the next word (like SentencePiece)."""
    import re

    return [(m.start(), m.end()) for m in re.finditer(r"\n| ?[^ \n]+", text)]


def test_cuts_prefer_paragraph_then_sentence_then_whitespace() -> None:
    para = "one two three four five six seven eight.\n\nnine ten"
    offsets = _word_offsets(para)
    windows = cut_windows(para, offsets, budget=11, overlap=0, slack=0.3)
    # The hard cut would fall after "nine"; the paragraph break is 3 tokens earlier.
    assert para[windows[0].char_start : windows[0].char_end].endswith("eight.\n\n")

    sent = "one two three. four five six seven eight nine ten eleven"
    windows = cut_windows(sent, _word_offsets(sent), budget=6, overlap=0, slack=0.5)
    assert sent[: windows[0].char_end] == "one two three."

    words = "aaaa bbbb cccc dddd eeee"
    # Two tokens per word: a cut inside a word is the hard cut, whitespace is preferred.
    offsets = [
        (0, 2),
        (2, 4),
        (4, 7),
        (7, 9),
        (9, 12),
        (12, 14),
        (14, 17),
        (17, 19),
        (19, 22),
        (22, 24),
    ]
    windows = cut_windows(words, offsets, budget=5, overlap=0, slack=0.4)
    assert windows[0].token_end == 4
    assert words[: windows[0].char_end] == "aaaa bbbb"


def test_no_cut_inside_a_character() -> None:
    text = "ab😀😀😀cd"
    # byte-fallback: four tokens per emoji, all with the emoji's offsets
    offsets = (
        [(0, 1), (1, 2)] + [(2 + k, 3 + k) for k in range(3) for _ in range(4)] + [(5, 6), (6, 7)]
    )
    for budget in range(5, 16):
        for w in cut_windows(text, offsets, budget=budget, overlap=0, slack=0.1):
            assert w.token_start in (0, 1, 2, 6, 10, 14, 15)
            assert w.token_end - w.token_start <= budget


# -------------------------------------------------------------------- packing


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), max_size=80), capacity=st.integers(64, 200))
def test_packing_places_every_item_once_within_capacity(lengths: list[int], capacity: int) -> None:
    bins = pack_lengths(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert all(b for b in bins)
    assert bins == pack_lengths(lengths, capacity)
    # Best-fit decreasing never leaves two bins that could be merged.
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(loads) < 2 or loads[0] + loads[1] > capacity


def test_short_rows_pack_densely_and_padding_does_not() -> None:
    rng = np.random.default_rng(0)
    chunks = [rng.integers(3, 1000, size=n) for n in rng.integers(40, 110, size=2000)]
    real = sum(len(c) for c in chunks)
    packed = packed_rows(chunks, 1200, 2, seed=0)
    padded = padded_rows(chunks, 1200, 2)
    assert real / packed["input_ids"].size >= 0.95
    assert real / padded["input_ids"].size < 0.1


def test_packed_rows_keep_chunks_apart_in_a_mixtral_model(word_tokenizer) -> None:
    """The documented call (position_ids, no attention_mask, use_cache=False) isolates chunks."""
    torch = pytest.importorskip("torch")
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    docs = [Document(f"d{i}", "the a of to and in is it. " * (i + 1)) for i in range(4)]
    corpus = ChunkedCorpus.from_documents(
        docs, word_tokenizer, max_length=24, fractions=(1, 0, 0), progress=False
    )
    rows = corpus.rows("train", "packed")
    assert any(len(lens) > 1 for lens in rows["seq_lens"])
    with torch.no_grad():
        for r, lens in enumerate(rows["seq_lens"]):
            ids = torch.tensor(rows["input_ids"][r : r + 1])
            pos = torch.tensor(rows["position_ids"][r : r + 1])
            packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
            at = 0
            for k in lens:
                alone = model(input_ids=ids[:, at : at + k], use_cache=False).logits[0]
                torch.testing.assert_close(packed[at : at + k], alone, rtol=1e-4, atol=1e-5)
                at += k
