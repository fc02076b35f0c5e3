"""``ChunkedCorpus``: documents → cleaned → split by document → token windows → rows."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs
import numpy as np
import numpy.typing as npt

from mixtune.corpus._chunking import cut_windows
from mixtune.corpus._cleaning import clean_text
from mixtune.corpus._describe import CorpusDescription, Provenance, Source, SplitStats
from mixtune.corpus._documents import Document, SkippedDocument, read_folder
from mixtune.corpus._layouts import pack_lengths, packed_rows, padded_rows
from mixtune.corpus._splitting import SPLITS, assign_split, check_splits
from mixtune.errors import ConfigError, CorpusError, DocumentError, OfflineError, TokenizerError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = ["Chunk", "ChunkedCorpus", "CorpusSpec"]

# Tokenizers report "no limit" as a huge sentinel (int(1e30)); only a real
# number is a limit worth checking max_length against.
_SANE_MODEL_MAX = 10**9
_MIN_MAX_LENGTH = 8
_BATCH_DOCS = 16


def _to_fractions(value: Any) -> Any:
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return value  # reported by the spec check with the field name


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def spec_problems(
    *,
    max_length: object,
    overlap: object,
    fractions: object,
    seed: object,
    slack: object,
) -> list[str]:
    """Every problem with these corpus settings, as messages naming the field."""
    problems: list[str] = []
    if not _is_int(max_length) or max_length < _MIN_MAX_LENGTH:  # type: ignore[operator]
        problems.append(
            f"max_length must be an int >= {_MIN_MAX_LENGTH} (got {max_length!r}); "
            "1200 suits papers on a 24 GB card"
        )
    if not _is_int(overlap) or overlap < 0:  # type: ignore[operator]
        problems.append(f"overlap must be an int >= 0 (got {overlap!r}); 0 means no overlap")
    elif _is_int(max_length) and overlap >= max_length:  # type: ignore[operator]
        problems.append(
            f"overlap ({overlap}) must be smaller than max_length ({max_length}); "
            "use e.g. overlap=max_length // 8"
        )
    if (
        not isinstance(fractions, tuple)
        or len(fractions) != len(SPLITS)
        or not all(isinstance(f, float) for f in fractions)
    ):
        problems.append(
            f"fractions must be three numbers (train, validation, test), got {fractions!r}; "
            "e.g. (0.8, 0.1, 0.1)"
        )
    else:
        bad = [
            f"{name}={f!r}"
            for name, f in zip(SPLITS, fractions, strict=True)
            if not math.isfinite(f) or f < 0
        ]
        if bad:
            problems.append(
                f"fractions must be finite and >= 0 (got {', '.join(bad)}); "
                "use 0 to leave a split empty on purpose"
            )
        elif not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
            problems.append(
                f"fractions must sum to 1 (got {fractions!r}, sum {sum(fractions):g}); "
                "e.g. (0.8, 0.1, 0.1)"
            )
    if not _is_int(seed):
        problems.append(f"seed must be an int (got {seed!r})")
    if not isinstance(slack, float | int) or isinstance(slack, bool) or not 0 <= slack < 0.5:
        problems.append(f"slack must be a number in [0, 0.5) (got {slack!r}); the default is 0.1")
    return problems


@attrs.frozen
class CorpusSpec:
    """How documents become chunks and splits (what defines a corpus).

    Args:
        max_length: Tokens per chunk and per row, special tokens included (>= 8).
        overlap: Tokens shared by consecutive chunks of a document
            (``0 <= overlap < max_length`` minus the special tokens).
        fractions: Train, validation and test fractions of the *documents*
            (each >= 0, summing to 1; 0 leaves that split empty on purpose).
        seed: Seed of the document split (and of the packed-row shuffle).
        slack: Fraction of a window that may be given up to end a chunk at a
            paragraph, line or sentence boundary (``[0, 0.5)``).

    Raises:
        ConfigError: Listing every invalid field at once.

    Example:
        >>> from mixtune.corpus import CorpusSpec
        >>> CorpusSpec(max_length=512, overlap=64).fractions
        (0.8, 0.1, 0.1)
    """

    max_length: int = 1200
    overlap: int = 0
    fractions: tuple[float, float, float] = attrs.field(
        default=(0.8, 0.1, 0.1), converter=_to_fractions
    )
    seed: int = 0
    slack: float = 0.1

    def __attrs_post_init__(self) -> None:
        problems = spec_problems(
            max_length=self.max_length,
            overlap=self.overlap,
            fractions=self.fractions,
            seed=self.seed,
            slack=self.slack,
        )
        if problems:
            raise ConfigError(problems)


@attrs.frozen
class Chunk:
    """One training sequence cut from one document, with its provenance.

    ``input_ids`` = the tokenizer's start tokens (BOS for Mixtral) + a slice of
    the document's tokens + EOS if this is the document's last chunk.

    Args:
        doc_id: Id of the document it comes from.
        split: The split of that document.
        index: Position of the chunk within its document (0, 1, ...).
        token_start: First body token, as an index into the document's tokens.
        token_end: One past the last body token.
        char_start: First character of the chunk in the cleaned document text.
        char_end: One past its last character.
        ids: The token ids (special tokens included) as an int array.
    """

    doc_id: str
    split: Literal["train", "validation", "test"]
    index: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int
    ids: npt.NDArray[np.int64] = attrs.field(eq=False, hash=False, repr=False)

    @property
    def input_ids(self) -> list[int]:
        """The token ids, special tokens included."""
        return [int(i) for i in self.ids]

    @property
    def n_tokens(self) -> int:
        """Number of tokens, special tokens included (at most ``max_length``)."""
        return len(self.ids)

    @property
    def char_span(self) -> tuple[int, int]:
        """``(char_start, char_end)`` in the cleaned document text."""
        return (self.char_start, self.char_end)


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[tuple[int, ...], int | None]:
    """Ids the tokenizer puts before a text on encode, and the EOS id.

    Found by encoding a probe with and without special tokens, so a tokenizer
    that adds BOS (Mixtral), none (GPT-2) or something else is followed as is.
    """
    probe = "Hello"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    prefix: tuple[int, ...] = ()
    for at in range(len(with_special) - len(bare) + 1):
        if with_special[at : at + len(bare)] == bare:
            prefix = tuple(with_special[:at])
            break
    eos = tokenizer.eos_token_id
    return prefix, (int(eos) if isinstance(eos, int) else None)


def _check_tokenizer(tokenizer: object) -> None:
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TokenizerError(
            f"tokenizer must be a transformers tokenizer (PreTrainedTokenizerBase), got "
            f"{type(tokenizer).__name__}; e.g. mixtune.tokenizers.mixtral_v1() or AutoTokenizer.from_pretrained(...)"
        )
    if not tokenizer.is_fast:
        raise TokenizerError(
            f"{type(tokenizer).__name__} is a slow (Python) tokenizer; chunking needs character "
            "offsets, which only fast tokenizers give: load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )


def _content_id(text: str) -> str:
    return (
        "sha-" + hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    )


def _offline_requested() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _is_network_error(exc: BaseException) -> bool:
    """Whether an exception from ``datasets.load_dataset`` means "could not reach the Hub"."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    network = {
        "ConnectionError",
        "OfflineModeIsEnabled",
        "LocalEntryNotFoundError",
        "ConnectTimeout",
        "ReadTimeout",
        "TimeoutException",
        "ConnectError",
        "NetworkError",
        "ProxyError",
        "TimeoutError",
    }
    return bool(names & network)


@attrs.frozen
class ChunkedCorpus:
    """Documents split into train/validation/test and cut into token chunks.

    Build one with :meth:`from_folder`, :meth:`from_documents` or
    :meth:`from_hub`; it is immutable and deterministic: the same documents,
    tokenizer and settings give the same chunks and rows.

    * Cleaning: every text goes through :func:`~mixtune.corpus.clean_text`;
      documents empty after cleaning, and exact duplicates of an earlier
      document, are skipped and listed by :meth:`describe`.
    * Splitting: whole documents, never chunks, by hashing ``f"{seed}:{id}"``
      (see :func:`~mixtune.corpus.assign_split`); adding or removing one
      document never moves another.
    * Chunking: each document is tokenized once (no special tokens) and cut
      into windows of at most ``max_length`` tokens in total: every chunk
      starts with the tokenizer's start tokens (BOS for Mixtral) and the last
      chunk of a document ends with EOS, so the body budget is ``max_length``
      minus those (``max_length - 2`` for Mixtral) for every chunk.  Only
      the document's end gets EOS: a chunk cut mid-document must not teach
      the model to stop there.  Consecutive chunks share exactly ``overlap``
      body tokens and together cover every token of the document.

    Args:
        tokenizer: The tokenizer used for every chunk.
        spec: The settings.
        documents: Documents used (cleaned text), sorted by id.
        skipped: Documents not used, with the reason.
        origin: Where the documents came from.
        license_files: Licence files found beside the documents.
        prefix_ids: Ids put before every chunk (BOS for Mixtral).
        eos_id: Id put after each document's last chunk, if any.
        assignment: Document id → split.
        all_chunks: Every chunk, in document order.
    """

    tokenizer: PreTrainedTokenizerBase = attrs.field(eq=False, repr=False)
    spec: CorpusSpec
    documents: tuple[Document, ...] = attrs.field(repr=False)
    skipped: tuple[SkippedDocument, ...] = attrs.field(repr=False)
    origin: str
    license_files: tuple[str, ...] = attrs.field(repr=False)
    prefix_ids: tuple[int, ...] = attrs.field(repr=False)
    eos_id: int | None = attrs.field(repr=False)
    assignment: Mapping[str, Literal["train", "validation", "test"]] = attrs.field(
        repr=False, eq=False
    )
    all_chunks: tuple[Chunk, ...] = attrs.field(repr=False, eq=False)

    # ------------------------------------------------------------------ build

    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike[str],
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int = 1200,
        overlap: int = 0,
        fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        slack: float = 0.1,
        errors: Literal["raise", "skip"] = "raise",
        progress: bool = True,
    ) -> ChunkedCorpus:
        """Build a corpus from the ``.txt``, ``.md``, ``.tex`` and ``.pdf`` files of a folder.

        Sub-folders are read too; hidden files, ``README*``, ``LICENSE*``,
        ``COPYING*``, ``NOTICE*`` and ``MANIFEST*`` are not documents.  A
        document's id is its path relative to ``path`` (POSIX style).  A
        ``MANIFEST.tsv`` (tab-separated, with a ``file`` column) adds its
        other columns (``title``, ``license``, ``url``, ...) to each
        document's metadata.

        Args:
            path: The folder.
            tokenizer: A fast transformers tokenizer.
            max_length: Tokens per chunk, special tokens included.
            overlap: Tokens shared by consecutive chunks of a document.
            fractions: Train, validation and test fractions of the documents.
            seed: Split seed.
            slack: Fraction of a window that may be given up for a better cut.
            errors: ``"raise"`` on an unreadable file, or ``"skip"`` it and
                report it in :meth:`describe`.
            progress: Show a progress bar while tokenizing.

        Returns:
            The corpus.

        Raises:
            ConfigError: Invalid settings (all listed at once).
            TokenizerError: Not a fast transformers tokenizer.
            CorpusError: Missing or empty folder, no supported file, PDFs
                without the ``pdf`` extra, or no usable document.
            DocumentError: An unreadable (non-UTF-8, binary, broken PDF) file
                with ``errors="raise"``; ``.path`` names it.
            SplitError: A split with a positive fraction got no document.
        """
        spec = cls._spec(tokenizer, max_length, overlap, fractions, seed, slack, errors)
        contents = read_folder(path, errors=errors)
        return cls._build(
            contents.documents,
            tokenizer,
            spec,
            origin=str(path),
            skipped=contents.skipped,
            license_files=contents.license_files,
            progress=progress,
        )

    @classmethod
    def from_documents(
        cls,
        docs: Iterable[str | Document],
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int = 1200,
        overlap: int = 0,
        fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        slack: float = 0.1,
        errors: Literal["raise", "skip"] = "raise",
        progress: bool = True,
    ) -> ChunkedCorpus:
        """Build a corpus from texts or :class:`Document` objects.

        A plain string gets the id ``"sha-<hash of its text>"``, which depends
        only on the text, so its split stays put as documents come and go.

        Args:
            docs: Strings or documents.
            tokenizer: A fast transformers tokenizer.
            max_length: Tokens per chunk, special tokens included.
            overlap: Tokens shared by consecutive chunks of a document.
            fractions: Train, validation and test fractions of the documents.
            seed: Split seed.
            slack: Fraction of a window that may be given up for a better cut.
            errors: ``"raise"`` on a document that is neither a string nor a
                :class:`Document`, or ``"skip"`` it.
            progress: Show a progress bar while tokenizing.

        Returns:
            The corpus.

        Raises:
            ConfigError: Invalid settings (all listed at once).
            TokenizerError: Not a fast transformers tokenizer.
            CorpusError: No usable document, or two documents with one id.
            DocumentError: A document that is not text (with ``errors="raise"``).
            SplitError: A split with a positive fraction got no document.
        """
        spec = cls._spec(tokenizer, max_length, overlap, fractions, seed, slack, errors)
        documents: list[Document] = []
        skipped: list[SkippedDocument] = []
        for i, doc in enumerate(docs):
            item: object = doc  # callers without type checking pass anything
            if isinstance(item, Document):
                documents.append(item)
            elif isinstance(item, str):
                documents.append(Document(_content_id(item), item))
            else:
                msg = (
                    f"docs[{i}] is a {type(item).__name__}, not a str or Document; "
                    "pass texts or mixtune.corpus.Document(id, text)"
                )
                if errors == "raise":
                    raise DocumentError(msg, path=f"docs[{i}]")
                skipped.append(SkippedDocument(f"docs[{i}]", msg))
        return cls._build(
            documents,
            tokenizer,
            spec,
            origin="documents",
            skipped=tuple(skipped),
            progress=progress,
        )

    @classmethod
    def from_hub(
        cls,
        dataset_id: str,
        tokenizer: PreTrainedTokenizerBase,
        text_column: str = "text",
        *,
        id_column: str | None = None,
        name: str | None = None,
        revision: str | None = None,
        max_length: int = 1200,
        overlap: int = 0,
        fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        slack: float = 0.1,
        errors: Literal["raise", "skip"] = "raise",
        progress: bool = True,
        **load_kwargs: Any,
    ) -> ChunkedCorpus:
        """Build a corpus from a dataset loaded with :func:`datasets.load_dataset`.

        Every row of every split of the dataset is one document (the
        dataset's own splits are ignored: documents are re-split by id).  A
        row's id is ``id_column``'s value if given, else ``"<split>/<row>"``.

        Args:
            dataset_id: Hub dataset id, or a local path ``load_dataset`` accepts.
            tokenizer: A fast transformers tokenizer.
            text_column: Column holding the text.
            id_column: Column holding a stable document id, if any.
            name: Dataset configuration name.
            revision: Dataset revision (branch, tag or commit).
            max_length: Tokens per chunk, special tokens included.
            overlap: Tokens shared by consecutive chunks of a document.
            fractions: Train, validation and test fractions of the documents.
            seed: Split seed.
            slack: Fraction of a window that may be given up for a better cut.
            errors: ``"raise"`` on a row whose text is not a string, or
                ``"skip"`` it.
            progress: Show a progress bar while tokenizing.
            **load_kwargs: Passed on to ``datasets.load_dataset`` (e.g. ``data_files``).

        Returns:
            The corpus.

        Raises:
            OfflineError: The dataset could not be fetched (no network, or
                ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set and not cached).
            CorpusError: The text or id column is missing, or no usable row.
            DocumentError: A row whose text is not a string (with ``errors="raise"``).
            ConfigError: Invalid settings (all listed at once).
            TokenizerError: Not a fast transformers tokenizer.
            SplitError: A split with a positive fraction got no document.
        """
        spec = cls._spec(tokenizer, max_length, overlap, fractions, seed, slack, errors)
        import datasets

        fix = (
            "download it where there is network (datasets.load_dataset(...).save_to_disk or "
            "huggingface-cli download) and pass the local folder, or use "
            "ChunkedCorpus.from_folder / ChunkedCorpus.from_documents"
        )
        try:
            loaded = datasets.load_dataset(dataset_id, name, revision=revision, **load_kwargs)
        except Exception as exc:
            offline = _offline_requested()
            if _is_network_error(exc) or (offline and not Path(dataset_id).exists()):
                why = (
                    "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not cached"
                    if offline
                    else f"the Hugging Face Hub cannot be reached ({type(exc).__name__})"
                )
                raise OfflineError(f"cannot load dataset {dataset_id!r}: {why}; {fix}") from exc
            raise CorpusError(
                f"cannot load dataset {dataset_id!r} ({type(exc).__name__}: {exc}); "
                "check the id, name= and data_files=, or use ChunkedCorpus.from_folder"
            ) from exc
        parts = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        documents: list[Document] = []
        skipped: list[SkippedDocument] = []
        for split_name in sorted(parts):
            part = parts[split_name]
            columns = list(part.column_names)
            for column in (text_column, id_column):
                if column is not None and column not in columns:
                    raise CorpusError(
                        f"dataset {dataset_id!r} split {split_name!r} has no column {column!r} "
                        f"(columns: {', '.join(columns)}); pass text_column=/id_column="
                    )
            texts = part[text_column]
            ids = part[id_column] if id_column is not None else None
            for row, text in enumerate(texts):
                doc_id = str(ids[row]) if ids is not None else f"{split_name}/{row}"
                if not isinstance(text, str):
                    msg = (
                        f"dataset {dataset_id!r} row {doc_id!r}: column {text_column!r} holds "
                        f"{type(text).__name__}, not text; pick the text column with text_column="
                    )
                    if errors == "raise":
                        raise DocumentError(msg, path=doc_id)
                    skipped.append(SkippedDocument(doc_id, msg))
                    continue
                documents.append(Document(doc_id, text))
        return cls._build(
            documents,
            tokenizer,
            spec,
            origin=dataset_id,
            skipped=tuple(skipped),
            progress=progress,
        )

    @staticmethod
    def _spec(
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        overlap: int,
        fractions: tuple[float, float, float],
        seed: int,
        slack: float,
        errors: str,
    ) -> CorpusSpec:
        """Validate settings and tokenizer together, reporting every problem at once."""
        _check_tokenizer(tokenizer)
        fr = _to_fractions(fractions)
        problems = spec_problems(
            max_length=max_length, overlap=overlap, fractions=fr, seed=seed, slack=slack
        )
        if errors not in ("raise", "skip"):
            problems.append(f"errors must be 'raise' or 'skip' (got {errors!r})")
        limit = getattr(tokenizer, "model_max_length", None)
        if (
            _is_int(max_length)
            and isinstance(limit, int)
            and limit < _SANE_MODEL_MAX
            and max_length > limit
        ):
            problems.append(
                f"max_length ({max_length}) is beyond the tokenizer's limit "
                f"(model_max_length={limit}); use at most {limit}"
            )
        if not problems:
            prefix, eos = _special_tokens(tokenizer)
            budget = max_length - len(prefix) - (eos is not None)
            if overlap >= budget:
                problems.append(
                    f"overlap ({overlap}) must be smaller than the body tokens per chunk ({budget} = "
                    f"max_length {max_length} minus {max_length - budget} special tokens); "
                    f"lower overlap or raise max_length"
                )
        if problems:
            raise ConfigError(problems)
        return CorpusSpec(max_length, overlap, fr, seed, slack)

    @classmethod
    def _build(
        cls,
        raw: Iterable[Document],
        tokenizer: PreTrainedTokenizerBase,
        spec: CorpusSpec,
        *,
        origin: str,
        skipped: tuple[SkippedDocument, ...] = (),
        license_files: tuple[str, ...] = (),
        progress: bool = True,
    ) -> ChunkedCorpus:
        from tqdm.auto import tqdm

        skipped_list = list(skipped)
        seen_ids: set[str] = set()
        seen_texts: dict[str, str] = {}
        documents: list[Document] = []
        for doc in raw:
            if doc.id in seen_ids:
                raise CorpusError(
                    f"two documents have the id {doc.id!r}; ids must be unique (they decide the split)"
                )
            seen_ids.add(doc.id)
            text = clean_text(doc.text)
            if not text:
                skipped_list.append(SkippedDocument(doc.id, "empty after cleaning"))
                continue
            # An exact copy under another name would put the same text in two
            # splits; the first one (by id) wins.
            key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
            if key in seen_texts:
                skipped_list.append(
                    SkippedDocument(doc.id, f"same text as {seen_texts[key]!r} after cleaning")
                )
                continue
            seen_texts[key] = doc.id
            documents.append(attrs.evolve(doc, text=text))
        documents.sort(key=lambda d: d.id)
        if not documents:
            reasons = "; ".join(f"{s.id}: {s.reason}" for s in skipped_list[:5])
            raise CorpusError(
                "zero documents to build a corpus from"
                + (f" (all {len(skipped_list)} were skipped: {reasons})" if skipped_list else "")
                + "; pass at least one non-empty text"
            )
        assignment = {d.id: assign_split(d.id, spec.fractions, spec.seed) for d in documents}
        check_splits(assignment, spec.fractions, spec.seed)

        prefix, eos = _special_tokens(tokenizer)
        budget = spec.max_length - len(prefix) - (eos is not None)
        prefix_arr = np.asarray(prefix, dtype=np.int64)
        eos_arr = np.asarray([] if eos is None else [eos], dtype=np.int64)
        chunks: list[Chunk] = []
        bar = tqdm(
            total=len(documents),
            desc="tokenizing",
            unit="doc",
            disable=not progress,
        )
        try:
            for at in range(0, len(documents), _BATCH_DOCS):
                batch = documents[at : at + _BATCH_DOCS]
                enc = tokenizer(
                    [d.text for d in batch],
                    add_special_tokens=False,
                    return_offsets_mapping=True,
                    return_attention_mask=False,
                    return_token_type_ids=False,
                    verbose=False,
                )
                for doc, ids, offsets in zip(
                    batch, enc["input_ids"], enc["offset_mapping"], strict=True
                ):
                    body = np.asarray(ids, dtype=np.int64)
                    windows = cut_windows(
                        doc.text, offsets, budget=budget, overlap=spec.overlap, slack=spec.slack
                    )
                    split = assignment[doc.id]
                    for k, w in enumerate(windows):
                        last = k == len(windows) - 1
                        parts = [prefix_arr, body[w.token_start : w.token_end]]
                        if last:
                            parts.append(eos_arr)
                        ids_arr = np.concatenate(parts)
                        ids_arr.setflags(write=False)  # chunks are immutable like the corpus
                        chunks.append(
                            Chunk(
                                doc.id,
                                split,
                                k,
                                w.token_start,
                                w.token_end,
                                w.char_start,
                                w.char_end,
                                ids_arr,
                            )
                        )
                bar.update(len(batch))
        finally:
            bar.close()
        return cls(
            tokenizer=tokenizer,
            spec=spec,
            documents=tuple(documents),
            skipped=tuple(skipped_list),
            origin=origin,
            license_files=license_files,
            prefix_ids=prefix,
            eos_id=eos,
            assignment=assignment,
            all_chunks=tuple(chunks),
        )

    # ------------------------------------------------------------------ query

    @property
    def max_length(self) -> int:
        """Tokens per chunk and per row, special tokens included."""
        return self.spec.max_length

    @property
    def overlap(self) -> int:
        """Tokens shared by consecutive chunks of a document."""
        return self.spec.overlap

    @property
    def fractions(self) -> tuple[float, float, float]:
        """Train, validation and test fractions of the documents."""
        return self.spec.fractions

    @property
    def seed(self) -> int:
        """The split seed."""
        return self.spec.seed

    @property
    def pad_id(self) -> int:
        """The id written on padding positions (``pad_token_id``, else EOS).

        That is ``tokenizer.pad_token_id`` if set, else the EOS id.

        Raises:
            TokenizerError: The tokenizer has neither a pad nor an EOS token.
        """
        pad = self.tokenizer.pad_token_id
        if isinstance(pad, int):
            return pad
        if self.eos_id is not None:
            return self.eos_id
        raise TokenizerError(
            "the tokenizer has neither a pad nor an EOS token, so rows cannot be padded; "
            "set tokenizer.pad_token"
        )

    def split_of(self, doc_id: str) -> Literal["train", "validation", "test"]:
        """The split a document of this corpus belongs to.

        Args:
            doc_id: The document's id.

        Returns:
            ``"train"``, ``"validation"`` or ``"test"``.

        Raises:
            CorpusError: No such document in the corpus (skipped ones included).
        """
        try:
            return self.assignment[doc_id]
        except KeyError:
            raise CorpusError(
                f"no document {doc_id!r} in this corpus ({len(self.documents)} documents; "
                "see .documents for their ids)"
            ) from None

    def document(self, doc_id: str) -> Document:
        """A document of this corpus by id (cleaned text).

        Args:
            doc_id: The document's id.

        Returns:
            The document.

        Raises:
            CorpusError: No such document in the corpus.
        """
        for doc in self.documents:
            if doc.id == doc_id:
                return doc
        raise CorpusError(f"no document {doc_id!r} in this corpus; see .documents for their ids")

    def chunks(
        self, split: Literal["train", "validation", "test"] | None = None
    ) -> tuple[Chunk, ...]:
        """The chunks of one split (or all), in document order.

        Args:
            split: ``"train"``, ``"validation"``, ``"test"``, or None for all.

        Returns:
            The chunks, each with its provenance (document, character span).

        Raises:
            CorpusError: An unknown split name.
        """
        if split is None:
            return self.all_chunks
        self._check_split(split)
        return tuple(c for c in self.all_chunks if c.split == split)

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise CorpusError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")

    # ----------------------------------------------------------------- output

    def rows(
        self,
        split: Literal["train", "validation", "test"],
        layout: Literal["padded", "packed"] = "padded",
    ) -> dict[str, Any]:
        """The rows of one split as NumPy arrays (what :meth:`to_datasets` stores).

        Args:
            split: ``"train"``, ``"validation"`` or ``"test"``.
            layout: ``"padded"`` or ``"packed"``.

        Returns:
            Column name → ``(rows, max_length)`` int64 array (``seq_lens``, for
            packed rows, is a list of lists).

        Raises:
            CorpusError: An unknown split or layout.
            TokenizerError: No pad or EOS token to pad with.
        """
        self._check_split(split)
        ids = [c.ids for c in self.all_chunks if c.split == split]
        if layout == "padded":
            return dict(padded_rows(ids, self.max_length, self.pad_id))
        if layout == "packed":
            return packed_rows(ids, self.max_length, self.pad_id, seed=self.seed)
        raise CorpusError(f"unknown layout {layout!r}; use 'padded' or 'packed'")

    def to_datasets(self, layout: Literal["padded", "packed"] = "padded") -> datasets.DatasetDict:
        """The rows as a :class:`datasets.DatasetDict` with ``train``/``validation``/``test``.

        ``padded``: one row per chunk, padded to ``max_length`` with
        :attr:`pad_id`; ``attention_mask`` 0 and ``labels`` -100 on padding
        (never the pad id, which would teach the model to emit EOS forever).

        ``packed``: chunks packed into ``max_length`` rows (best-fit
        decreasing, rows shuffled with the seed) with ``position_ids``
        restarting at each chunk and ``labels`` -100 on each chunk's first
        token and on the padded tail; ``seq_lens`` lists the chunk lengths of
        a row.  Attention stays within a chunk only if the model gets
        ``position_ids`` and **no** ``attention_mask``, with
        ``use_cache=False``: transformers then builds a block-diagonal causal
        mask from the restarting positions.  Drop the ``attention_mask`` (and
        ``seq_lens``) column before feeding the model.

        An intentionally empty split (fraction 0) is an empty dataset with
        the same columns.

        Args:
            layout: ``"padded"`` or ``"packed"``.

        Returns:
            The dataset dict; all id columns are lists of int64.

        Raises:
            CorpusError: An unknown layout.
            TokenizerError: No pad or EOS token to pad with.
        """
        import datasets

        if layout not in ("padded", "packed"):
            raise CorpusError(f"unknown layout {layout!r}; use 'padded' or 'packed'")
        out = {}
        for split in SPLITS:
            cols = self.rows(split, layout)
            # Explicit features: inference would pick int32 for some columns and
            # null for the list column of an empty split.
            features = datasets.Features(
                {name: datasets.List(datasets.Value("int64")) for name in cols}
            )
            out[split] = datasets.Dataset.from_dict(cols, features=features)
        return datasets.DatasetDict(out)

    def describe(self) -> CorpusDescription:
        """Documents, chunks, tokens and real-token fractions per split, and skipped documents.

        Returns:
            A :class:`CorpusDescription`; ``print()`` it for a table.
        """
        stats = []
        for split in SPLITS:
            lengths = [c.n_tokens for c in self.all_chunks if c.split == split]
            stats.append(
                SplitStats(
                    split=split,
                    documents=sum(1 for s in self.assignment.values() if s == split),
                    chunks=len(lengths),
                    tokens=sum(lengths),
                    padded_rows=len(lengths),
                    packed_rows=len(pack_lengths(lengths, self.max_length)),
                    max_length=self.max_length,
                )
            )
        return CorpusDescription(
            source=self.origin,
            max_length=self.max_length,
            overlap=self.overlap,
            fractions=self.fractions,
            seed=self.seed,
            splits=tuple(stats),
            skipped=self.skipped,
        )

    def provenance(self) -> Provenance:
        """Sources and licences of the documents used, for a model card.

        Returns:
            A :class:`Provenance` (one :class:`Source` per document, licence
            counts, licence files of the folder).
        """
        return Provenance(
            origin=self.origin,
            sources=tuple(Source.of(d) for d in self.documents),
            license_files=self.license_files,
        )
