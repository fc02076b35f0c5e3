"""Typed summaries of a corpus: per-split statistics and provenance."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Literal

import attrs

from mixtune.corpus._documents import Document, SkippedDocument

__all__ = ["CorpusDescription", "Provenance", "Source", "SplitStats"]

# The table names this many skipped documents; all of them are in ``.skipped``.
_LISTED = 20


@attrs.frozen
class SplitStats:
    """Counts for one split.

    Args:
        split: ``"train"``, ``"validation"`` or ``"test"``.
        documents: Documents in the split.
        chunks: Chunks (= padded rows) in the split.
        tokens: Real tokens over all chunks, special tokens included.
        padded_rows: Rows of the padded layout (one per chunk).
        packed_rows: Rows of the packed layout.
        max_length: Row length of both layouts.
    """

    split: Literal["train", "validation", "test"]
    documents: int
    chunks: int
    tokens: int
    padded_rows: int
    packed_rows: int
    max_length: int

    @property
    def padded_fraction(self) -> float:
        """Real tokens / all positions of the padded rows (0 when empty)."""
        return self.tokens / (self.padded_rows * self.max_length) if self.padded_rows else 0.0

    @property
    def packed_fraction(self) -> float:
        """Real tokens / all positions of the packed rows (0 when empty)."""
        return self.tokens / (self.packed_rows * self.max_length) if self.packed_rows else 0.0


@attrs.frozen
class CorpusDescription:
    """What :meth:`ChunkedCorpus.describe` reports; ``str()`` gives a table.

    Args:
        source: Where the documents came from (folder, hub id, ``"documents"``).
        max_length: Tokens per row.
        overlap: Tokens shared by consecutive chunks of a document.
        fractions: Requested train/validation/test fractions.
        seed: Split seed.
        splits: Statistics per split, in train/validation/test order.
        skipped: Documents not used, with the reason.
    """

    source: str
    max_length: int
    overlap: int
    fractions: tuple[float, float, float]
    seed: int
    splits: tuple[SplitStats, ...]
    skipped: tuple[SkippedDocument, ...]

    def __getitem__(self, split: str) -> SplitStats:
        """The statistics of one split by name.

        Args:
            split: ``"train"``, ``"validation"`` or ``"test"``.

        Returns:
            That split's :class:`SplitStats`.

        Raises:
            KeyError: For another name.
        """
        for stats in self.splits:
            if stats.split == split:
                return stats
        raise KeyError(f"no split {split!r}; splits are train, validation, test")

    @property
    def documents(self) -> int:
        """Documents over all splits."""
        return sum(s.documents for s in self.splits)

    @property
    def chunks(self) -> int:
        """Chunks over all splits."""
        return sum(s.chunks for s in self.splits)

    @property
    def tokens(self) -> int:
        """Real tokens over all splits."""
        return sum(s.tokens for s in self.splits)

    @property
    def padded_fraction(self) -> float:
        """Real-token fraction of the padded layout over all splits."""
        rows = sum(s.padded_rows for s in self.splits)
        return self.tokens / (rows * self.max_length) if rows else 0.0

    @property
    def packed_fraction(self) -> float:
        """Real-token fraction of the packed layout over all splits."""
        rows = sum(s.packed_rows for s in self.splits)
        return self.tokens / (rows * self.max_length) if rows else 0.0

    def table(self) -> str:
        """A plain-text table of the statistics and the skipped documents.

        Returns:
            The table, several lines.
        """
        head: tuple[str, ...] = (
            "split",
            "docs",
            "chunks",
            "tokens",
            "padded rows",
            "packed rows",
            "padded real",
            "packed real",
        )
        rows: list[tuple[str, ...]] = [
            (
                s.split,
                str(s.documents),
                str(s.chunks),
                str(s.tokens),
                str(s.padded_rows),
                str(s.packed_rows),
                f"{s.padded_fraction:.3f}",
                f"{s.packed_fraction:.3f}",
            )
            for s in self.splits
        ]
        rows.append(
            (
                "total",
                str(self.documents),
                str(self.chunks),
                str(self.tokens),
                str(sum(s.padded_rows for s in self.splits)),
                str(sum(s.packed_rows for s in self.splits)),
                f"{self.padded_fraction:.3f}",
                f"{self.packed_fraction:.3f}",
            )
        )
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

        def line(cells: tuple[str, ...]) -> str:
            first = cells[0].ljust(widths[0])
            return "  ".join(
                [first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))]
            )

        fr = "/".join(f"{f:g}" for f in self.fractions)
        out = [
            f"corpus {self.source}: max_length {self.max_length}, overlap {self.overlap}, "
            f"fractions {fr}, seed {self.seed}",
            line(head),
            "  ".join("-" * w for w in widths),
            *(line(r) for r in rows),
        ]
        if self.skipped:
            out.append(f"skipped {len(self.skipped)} documents:")
            out.extend(f"  {s.id}: {s.reason}" for s in self.skipped[:_LISTED])
            if len(self.skipped) > _LISTED:
                out.append(f"  ... and {len(self.skipped) - _LISTED} more (see .skipped)")
        else:
            out.append("skipped 0 documents")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


@attrs.frozen
class Source:
    """Where one document came from, for a model card.

    Args:
        doc_id: The document's id.
        title: Its title, if known.
        license: Its licence identifier, if known (e.g. ``"CC-BY-4.0"``).
        url: Its URL, if known.
        metadata: Every metadata field the document carries.
    """

    doc_id: str
    title: str | None
    license: str | None
    url: str | None
    metadata: Mapping[str, str] = attrs.field(eq=False, hash=False, repr=False)

    @classmethod
    def of(cls, doc: Document) -> Source:
        """The source record of a document.

        Args:
            doc: The document.

        Returns:
            Its :class:`Source`.
        """
        return cls(doc.id, doc.title, doc.license, doc.url, doc.metadata)


@attrs.frozen
class Provenance:
    """Sources and licences of a corpus (what a model card needs).

    Args:
        origin: The folder path, hub dataset id or ``"documents"``.
        sources: One record per document used, sorted by id.
        license_files: Names of licence files found beside the documents.
    """

    origin: str
    sources: tuple[Source, ...]
    license_files: tuple[str, ...]

    @property
    def licenses(self) -> dict[str, int]:
        """Licence identifier → number of documents (``"unknown"`` when absent).

        Returns:
            Counts, most common first.
        """
        counts = Counter(s.license or "unknown" for s in self.sources)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
