"""Documents and how they are read from a folder (text, Markdown, LaTeX, PDF)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import attrs

from mixtune.corpus._cleaning import control_fraction
from mixtune.errors import CorpusError, DocumentError

__all__ = [
    "MANIFEST_NAME",
    "SUPPORTED_SUFFIXES",
    "Document",
    "FolderContents",
    "SkippedDocument",
    "read_folder",
]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".md", ".tex", ".pdf")
"""File suffixes read as documents by :meth:`ChunkedCorpus.from_folder`."""

MANIFEST_NAME = "MANIFEST.tsv"

# Files that describe a corpus rather than belong to it.  They are never
# documents even when their suffix is supported.
_META_STEMS = ("readme", "license", "licence", "copying", "notice", "manifest")

# A decoded file with more control characters than this is binary (or UTF-16),
# not text with a few stray NULs.
_BINARY_CONTROL_FRACTION = 0.01

Errors = Literal["raise", "skip"]


def _freeze_metadata(value: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(value or {}))


@attrs.frozen
class Document:
    """One document of a corpus.

    Args:
        id: Stable identifier: the path relative to the corpus folder (POSIX
            style) for folders, the position (``"doc-00012"``) or the given id
            otherwise.  The split a document lands in depends only on its id.
        text: The text (cleaned, once the document belongs to a corpus).
        metadata: Extra fields, e.g. ``title``, ``license``, ``url`` from a
            ``MANIFEST.tsv`` beside the files.

    Example:
        >>> from mixtune.corpus import Document
        >>> Document("notes/a.txt", "Hello.", {"license": "CC0-1.0"}).license
        'CC0-1.0'
    """

    id: str = attrs.field(validator=attrs.validators.instance_of(str))
    text: str = attrs.field(validator=attrs.validators.instance_of(str), repr=False)
    metadata: Mapping[str, str] = attrs.field(
        factory=dict, converter=_freeze_metadata, eq=False, hash=False
    )

    @property
    def title(self) -> str | None:
        """The ``title`` metadata field, if any."""
        return self.metadata.get("title")

    @property
    def license(self) -> str | None:
        """The ``license`` metadata field, if any."""
        return self.metadata.get("license")

    @property
    def url(self) -> str | None:
        """The ``url`` metadata field, if any."""
        return self.metadata.get("url")


@attrs.frozen
class SkippedDocument:
    """A document that was not used, and why.

    Args:
        id: The document's id (relative path for folders).
        reason: Human-readable reason, e.g. ``"empty after cleaning"``.
    """

    id: str
    reason: str


@attrs.frozen
class FolderContents:
    """What :func:`read_folder` found.

    Args:
        documents: Documents read, raw (uncleaned) text, sorted by id.
        skipped: Files that could not be read (with ``errors="skip"``).
        license_files: Names of ``LICENSE*``/``LICENCE*``/``COPYING*`` files.
        has_manifest: Whether a ``MANIFEST.tsv`` was found and applied.
    """

    documents: tuple[Document, ...]
    skipped: tuple[SkippedDocument, ...]
    license_files: tuple[str, ...]
    has_manifest: bool


def _is_meta(path: Path) -> bool:
    name = path.name.lower()
    return name.startswith(_META_STEMS)


def _read_manifest(path: Path) -> dict[str, dict[str, str]]:
    """Rows of a MANIFEST.tsv keyed by its ``file`` column."""
    try:
        content = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DocumentError(
            f"{path}: the manifest cannot be read as UTF-8 text ({exc}); fix or remove it",
            path=str(path),
        ) from exc
    reader = csv.DictReader(io.StringIO(content), delimiter="\t")
    if reader.fieldnames is None or "file" not in reader.fieldnames:
        raise DocumentError(
            f"{path}: the manifest needs a header row with a 'file' column "
            f"(found columns {reader.fieldnames or []}); fix its header or remove it",
            path=str(path),
        )
    rows: dict[str, dict[str, str]] = {}
    for row in reader:
        name = (row.get("file") or "").strip()
        if name:
            rows[name] = {
                k: v.strip() for k, v in row.items() if k and k != "file" and v is not None
            }
    return rows


def _read_pdf(path: Path) -> str:
    try:
        import pypdf
    except ImportError as exc:
        raise CorpusError(
            f"{path}: reading PDF files needs the 'pdf' extra: "
            'pip install "mixtune[pdf]" (or remove the PDF files from the folder)'
        ) from exc
    try:
        reader = pypdf.PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as exc:  # pypdf raises many unrelated types on broken files
        raise DocumentError(
            f"{path}: not a readable PDF ({type(exc).__name__}: {exc}); "
            'repair or remove it, or pass errors="skip"',
            path=str(path),
        ) from exc
    # Pages are separated by a blank line so a page break counts as a paragraph break.
    return "\n\n".join(pages)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DocumentError(
            f"{path}: cannot be read ({exc.strerror or exc}); fix its permissions, remove it, "
            'or pass errors="skip"',
            path=str(path),
        ) from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentError(
            f"{path}: not UTF-8 text (byte {exc.start} is invalid; a binary file or another "
            'encoding); convert it to UTF-8, remove it, or pass errors="skip"',
            path=str(path),
        ) from exc
    if control_fraction(text) > _BINARY_CONTROL_FRACTION:
        raise DocumentError(
            f"{path}: looks like a binary file (more than {_BINARY_CONTROL_FRACTION:.0%} "
            'control characters, e.g. NUL); remove it, convert it to UTF-8 text, or pass errors="skip"',
            path=str(path),
        )
    return text


def read_folder(path: str | os.PathLike[str], *, errors: Errors = "raise") -> FolderContents:
    """Read every supported file under ``path`` (recursively) as a document.

    Args:
        path: The corpus folder.
        errors: ``"raise"`` stops at the first unreadable file; ``"skip"``
            records it in :attr:`FolderContents.skipped` and goes on.

    Returns:
        The documents (raw text, sorted by id), skipped files, licence files
        and whether a manifest was applied.

    Raises:
        CorpusError: The folder is missing, empty or has no supported file,
            or PDF files need the missing ``pdf`` extra.
        DocumentError: A file is not UTF-8, looks binary or is a broken PDF
            (only with ``errors="raise"``), or the manifest is unreadable.
    """
    root = Path(path)
    if not root.exists():
        raise CorpusError(f"corpus folder {root} does not exist; pass an existing folder")
    if not root.is_dir():
        raise CorpusError(
            f"corpus folder {root} is a file, not a folder; pass its parent folder "
            "or use ChunkedCorpus.from_documents"
        )
    files = sorted(
        (
            p
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise CorpusError(
            f"corpus folder {root} is empty; add {', '.join(SUPPORTED_SUFFIXES)} files to it"
        )
    manifest_path = root / MANIFEST_NAME
    manifest = _read_manifest(manifest_path) if manifest_path.is_file() else {}
    license_files = tuple(
        p.relative_to(root).as_posix()
        for p in files
        if p.name.lower().startswith(("license", "licence", "copying"))
    )
    candidates = [p for p in files if p.suffix.lower() in SUPPORTED_SUFFIXES and not _is_meta(p)]
    if not candidates:
        found = sorted({p.suffix or p.name for p in files})
        raise CorpusError(
            f"corpus folder {root} has no supported files (found {', '.join(found)}); "
            f"documents must end in {', '.join(SUPPORTED_SUFFIXES)}"
        )
    documents: list[Document] = []
    skipped: list[SkippedDocument] = []
    for file in candidates:
        doc_id = file.relative_to(root).as_posix()
        try:
            text = _read_pdf(file) if file.suffix.lower() == ".pdf" else _read_text(file)
        except DocumentError as exc:
            if errors == "raise":
                raise
            skipped.append(SkippedDocument(doc_id, str(exc)))
            continue
        meta = manifest.get(doc_id, manifest.get(file.name, {}))
        documents.append(Document(doc_id, text, meta))
    return FolderContents(tuple(documents), tuple(skipped), license_files, bool(manifest))
