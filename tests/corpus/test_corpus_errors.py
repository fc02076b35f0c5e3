"""Every bad input gives a typed mixtune error that names the file or field and the fix."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mixtune.corpus import ChunkedCorpus, Document
from mixtune.errors import (
    ConfigError,
    CorpusError,
    DocumentError,
    OfflineError,
    SplitError,
    TokenizerError,
)

GOOD = "Experts route tokens. " * 20


def _docs(n: int) -> list[Document]:
    return [Document(f"doc{i}.txt", f"Document {i}. " + GOOD) for i in range(n)]


# ----------------------------------------------------------------- folders


def test_missing_folder(tmp_path: Path, word_tokenizer) -> None:
    with pytest.raises(CorpusError, match=r"does not exist; pass an existing folder") as info:
        ChunkedCorpus.from_folder(tmp_path / "nope", word_tokenizer, max_length=64)
    assert str(tmp_path / "nope") in str(info.value)


def test_file_instead_of_folder(make_folder, word_tokenizer) -> None:
    root = make_folder({"a.txt": GOOD})
    with pytest.raises(CorpusError, match=r"is a file, not a folder.*from_documents"):
        ChunkedCorpus.from_folder(root / "a.txt", word_tokenizer, max_length=64)


def test_empty_folder(tmp_path: Path, word_tokenizer) -> None:
    with pytest.raises(CorpusError, match=r"is empty; add \.txt, \.md, \.tex, \.pdf files"):
        ChunkedCorpus.from_folder(tmp_path, word_tokenizer, max_length=64)


def test_no_supported_files(make_folder, word_tokenizer) -> None:
    root = make_folder(
        {"data.csv": "a,b", "README.md": "# about", "LICENSE.txt": "CC0", "MANIFEST.tsv": "file\n"}
    )
    with pytest.raises(
        CorpusError, match=r"no supported files \(found .*\.csv.*\); documents must end in \.txt"
    ):
        ChunkedCorpus.from_folder(root, word_tokenizer, max_length=64)


def test_non_utf8_file_is_named(make_folder, word_tokenizer) -> None:
    root = make_folder({"ok.txt": GOOD, "sub/latin1.txt": "café crème".encode("latin-1")})
    with pytest.raises(
        DocumentError, match=r"latin1\.txt: not UTF-8 text.*errors=\"skip\""
    ) as info:
        ChunkedCorpus.from_folder(root, word_tokenizer, max_length=64, fractions=(1, 0, 0))
    assert info.value.path.endswith("sub/latin1.txt")


def test_binary_file_is_named(make_folder, word_tokenizer) -> None:
    root = make_folder({"ok.txt": GOOD, "utf16.txt": GOOD.encode("utf-16-le")})
    with pytest.raises(DocumentError, match=r"utf16\.txt: looks like a binary file") as info:
        ChunkedCorpus.from_folder(root, word_tokenizer, max_length=64, fractions=(1, 0, 0))
    assert info.value.path.endswith("utf16.txt")


def test_errors_skip_reports_unreadable_files(make_folder, word_tokenizer) -> None:
    root = make_folder(
        {
            "ok.txt": GOOD,
            "bad.txt": b"\xff\xfe\x00bad",
            "bin.md": bytes(range(256)) * 4,
            "blank.tex": "  \n\n \r\n",
        }
    )
    corpus = ChunkedCorpus.from_folder(
        root, word_tokenizer, max_length=64, fractions=(1, 0, 0), errors="skip", progress=False
    )
    assert [d.id for d in corpus.documents] == ["ok.txt"]
    described = corpus.describe()
    reasons = {s.id: s.reason for s in described.skipped}
    assert set(reasons) == {"bad.txt", "bin.md", "blank.tex"}
    assert "not UTF-8" in reasons["bad.txt"]
    assert reasons["blank.tex"] == "empty after cleaning"
    table = str(described)
    assert "skipped 3 documents" in table
    assert "bad.txt" in table


def test_pdf_without_the_extra(
    make_folder, word_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_folder({"paper.pdf": b"%PDF-1.4\n"})
    monkeypatch.setitem(sys.modules, "pypdf", None)  # import pypdf now raises ImportError
    with pytest.raises(
        CorpusError,
        match=r"paper\.pdf: reading PDF files needs the 'pdf' extra: pip install \"mixtune\[pdf\]\"",
    ):
        ChunkedCorpus.from_folder(root, word_tokenizer, max_length=64)


def test_broken_pdf_is_named(make_folder, word_tokenizer) -> None:
    pytest.importorskip("pypdf")
    root = make_folder({"broken.pdf": b"this is not a pdf"})
    with pytest.raises(DocumentError, match=r"broken\.pdf: not a readable PDF"):
        ChunkedCorpus.from_folder(root, word_tokenizer, max_length=64)


# ---------------------------------------------------------------- settings


def test_overlap_not_below_max_length(word_tokenizer) -> None:
    with pytest.raises(ConfigError, match=r"overlap \(64\) must be smaller than max_length \(64\)"):
        ChunkedCorpus.from_documents(_docs(3), word_tokenizer, max_length=64, overlap=64)


def test_overlap_not_below_the_body_budget(word_tokenizer) -> None:
    # BOS + EOS leave 62 body tokens of 64.
    with pytest.raises(
        ConfigError, match=r"overlap \(62\) must be smaller than the body tokens per chunk \(62"
    ):
        ChunkedCorpus.from_documents(_docs(3), word_tokenizer, max_length=64, overlap=62)


def test_max_length_too_small(word_tokenizer) -> None:
    with pytest.raises(ConfigError, match=r"max_length must be an int >= 8 \(got 4\)"):
        ChunkedCorpus.from_documents(_docs(3), word_tokenizer, max_length=4)


def test_max_length_beyond_the_tokenizer(word_tokenizer) -> None:
    with pytest.raises(
        ConfigError,
        match=r"max_length \(65\) is beyond the tokenizer's limit \(model_max_length=64\); use at most 64",
    ):
        ChunkedCorpus.from_documents(_docs(3), word_tokenizer, max_length=65)


def test_huge_model_max_length_sentinel_is_not_a_limit(gpt2_like_tokenizer) -> None:
    corpus = ChunkedCorpus.from_documents(
        _docs(1), gpt2_like_tokenizer, max_length=100_000, fractions=(1, 0, 0), progress=False
    )
    assert corpus.max_length == 100_000


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ((0.9, 0.2, -0.1), r"fractions must be finite and >= 0 \(got test=-0\.1\)"),
        ((0.5, 0.2, 0.2), r"fractions must sum to 1 \(got \(0\.5, 0\.2, 0\.2\), sum 0\.9\)"),
        ((0.5, 0.5), r"fractions must be three numbers"),
        ("80/10/10", r"fractions must be three numbers"),
    ],
)
def test_bad_fractions(word_tokenizer, fractions, message) -> None:
    with pytest.raises(ConfigError, match=message):
        ChunkedCorpus.from_documents(_docs(3), word_tokenizer, max_length=64, fractions=fractions)


def test_all_setting_problems_are_reported_at_once(word_tokenizer) -> None:
    with pytest.raises(ConfigError) as info:
        ChunkedCorpus.from_documents(
            _docs(3),
            word_tokenizer,
            max_length=2,
            overlap=-1,
            fractions=(0.5, 0.6, 0.1),
            seed="0",  # type: ignore[arg-type]
            errors="ignore",  # type: ignore[arg-type]
        )
    problems = info.value.problems
    assert len(problems) == 5
    assert "5 problems" in str(info.value)
    for field in ("max_length", "overlap", "fractions", "seed", "errors"):
        assert any(p.startswith(field) for p in problems)


def test_not_a_tokenizer() -> None:
    with pytest.raises(
        TokenizerError, match=r"tokenizer must be a transformers tokenizer.*got str"
    ):
        ChunkedCorpus.from_documents(_docs(3), "mistralai/Mixtral-8x7B-v0.1")  # type: ignore[arg-type]


# --------------------------------------------------------------- documents


def test_zero_documents(word_tokenizer) -> None:
    with pytest.raises(
        CorpusError, match=r"zero documents to build a corpus from; pass at least one"
    ):
        ChunkedCorpus.from_documents([], word_tokenizer, max_length=64)


def test_only_empty_documents(word_tokenizer) -> None:
    with pytest.raises(
        CorpusError, match=r"zero documents.*all 2 were skipped: a: empty after cleaning"
    ):
        ChunkedCorpus.from_documents(
            [Document("a", " \n"), Document("b", "\x00")], word_tokenizer, max_length=64
        )


def test_duplicate_ids(word_tokenizer) -> None:
    with pytest.raises(CorpusError, match=r"two documents have the id 'x'"):
        ChunkedCorpus.from_documents(
            [Document("x", "one"), Document("x", "two")], word_tokenizer, max_length=64
        )


def test_not_text(word_tokenizer) -> None:
    with pytest.raises(DocumentError, match=r"docs\[1\] is a bytes, not a str or Document") as info:
        ChunkedCorpus.from_documents([GOOD, b"raw"], word_tokenizer, max_length=64)  # type: ignore[list-item]
    assert info.value.path == "docs[1]"
    corpus = ChunkedCorpus.from_documents(
        [GOOD, b"raw"],
        word_tokenizer,
        max_length=64,
        fractions=(1, 0, 0),
        errors="skip",
        progress=False,  # type: ignore[list-item]
    )
    assert [s.id for s in corpus.describe().skipped] == ["docs[1]"]


def test_empty_split_says_how_many_documents_are_needed(word_tokenizer) -> None:
    with pytest.raises(SplitError) as info:
        ChunkedCorpus.from_documents(_docs(2), word_tokenizer, max_length=64, progress=False)
    msg = str(info.value)
    assert "received none of the 2 documents" in msg
    assert "At least 3 documents are needed for 3 non-empty splits" in msg
    assert "about 44 documents make that unlikely" in msg  # (1 - 0.1)**44 < 1%
    assert "give that split a fraction of 0" in msg


def test_zero_fraction_leaves_a_split_empty_on_purpose(word_tokenizer) -> None:
    corpus = ChunkedCorpus.from_documents(
        _docs(2), word_tokenizer, max_length=64, fractions=(1.0, 0.0, 0.0), progress=False
    )
    dd = corpus.to_datasets("packed")
    assert dd["validation"].num_rows == dd["test"].num_rows == 0
    assert dd["test"].column_names == dd["train"].column_names


def test_unknown_split_layout_and_document(word_tokenizer) -> None:
    corpus = ChunkedCorpus.from_documents(
        _docs(1), word_tokenizer, max_length=64, fractions=(1, 0, 0), progress=False
    )
    with pytest.raises(
        CorpusError, match=r"unknown split 'valid'; use one of train, validation, test"
    ):
        corpus.chunks("valid")  # type: ignore[arg-type]
    with pytest.raises(CorpusError, match=r"unknown layout 'ragged'; use 'padded' or 'packed'"):
        corpus.to_datasets("ragged")  # type: ignore[arg-type]
    with pytest.raises(CorpusError, match=r"no document 'other.txt' in this corpus"):
        corpus.split_of("other.txt")


# -------------------------------------------------------------------- hub


def test_from_hub_without_network(word_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise ConnectionError("Couldn't reach 'someone/papers' on the Hub (ConnectionError)")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(
        OfflineError,
        match=r"cannot load dataset 'someone/papers': the Hugging Face Hub cannot be reached.*from_documents",
    ):
        ChunkedCorpus.from_hub("someone/papers", word_tokenizer, max_length=64)


def test_from_hub_in_offline_mode(word_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def not_cached(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise FileNotFoundError("Dataset 'someone/papers' is not cached")

    monkeypatch.setattr(datasets, "load_dataset", not_cached)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(
        OfflineError,
        match=r"offline mode is on \(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE\).*pass the local folder",
    ):
        ChunkedCorpus.from_hub("someone/papers", word_tokenizer, max_length=64)


def test_from_hub_missing_column(tmp_path: Path, word_tokenizer) -> None:
    (tmp_path / "rows.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n', encoding="utf-8")
    with pytest.raises(
        CorpusError, match=r"has no column 'text' \(columns: body\); pass text_column="
    ):
        ChunkedCorpus.from_hub(
            "json",
            word_tokenizer,
            data_files=str(tmp_path / "rows.jsonl"),
            cache_dir=str(tmp_path / "cache"),
            max_length=64,
            progress=False,
        )


def test_slow_tokenizer(word_tokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    class Slow(PreTrainedTokenizerFast):  # stands for a Python tokenizer without offsets
        @property
        def is_fast(self) -> bool:
            return False

    slow = Slow(tokenizer_object=word_tokenizer.backend_tokenizer, eos_token="[EOS]")
    with pytest.raises(TokenizerError, match=r"Slow is a slow \(Python\) tokenizer.*use_fast=True"):
        ChunkedCorpus.from_documents(_docs(3), slow, max_length=64)


def test_links_and_folders_named_like_documents_are_not_documents(
    make_folder, word_tokenizer
) -> None:
    root = make_folder({"ok.txt": GOOD})
    (root / "dangling.txt").symlink_to(root / "missing-target.txt")
    (root / "dir.md").mkdir()
    corpus = ChunkedCorpus.from_folder(
        root, word_tokenizer, max_length=64, fractions=(1, 0, 0), progress=False
    )
    assert [d.id for d in corpus.documents] == ["ok.txt"]


def test_unreadable_file_is_named(
    make_folder, word_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_folder({"ok.txt": GOOD, "locked.txt": GOOD + "locked"})
    real_read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DocumentError, match=r"locked\.txt: cannot be read \(Permission denied\)"):
        ChunkedCorpus.from_folder(root, word_tokenizer, max_length=64, fractions=(1, 0, 0))


def test_from_hub_row_without_text(tmp_path: Path, word_tokenizer) -> None:
    rows = '{"text": "Experts route tokens."}\n{"text": null}\n'
    (tmp_path / "rows.jsonl").write_text(rows, encoding="utf-8")
    kwargs = {
        "data_files": str(tmp_path / "rows.jsonl"),
        "cache_dir": str(tmp_path / "cache"),
        "max_length": 64,
        "fractions": (1, 0, 0),
        "progress": False,
    }
    with pytest.raises(DocumentError, match=r"row 'train/1': column 'text' holds NoneType") as info:
        ChunkedCorpus.from_hub("json", word_tokenizer, **kwargs)
    assert info.value.path == "train/1"
    corpus = ChunkedCorpus.from_hub("json", word_tokenizer, errors="skip", **kwargs)
    assert [d.id for d in corpus.documents] == ["train/0"]
    assert [s.id for s in corpus.describe().skipped] == ["train/1"]
