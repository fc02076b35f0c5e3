"""Assigning whole documents to train/validation/test by hashing their ids."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Literal

from mixtune.errors import SplitError

__all__ = ["SPLITS", "Split", "assign_split", "check_splits", "split_point"]

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, Split, Split] = ("train", "validation", "test")
"""Split names, in the order of the ``fractions`` argument."""


def split_point(doc_id: str, seed: int) -> float:
    """A uniform number in [0, 1) derived from the document id and the seed.

    ``blake2b(f"{seed}:{doc_id}")``'s first 8 bytes, divided by 2**64.  Each
    document's number depends on nothing else, which is what keeps every other
    document in place when one is added or removed.

    Args:
        doc_id: The document's id.
        seed: The split seed.

    Returns:
        A float in [0, 1).
    """
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_split(doc_id: str, fractions: tuple[float, float, float], seed: int) -> Split:
    """The split a document belongs to.

    The unit interval is cut into consecutive pieces of the given lengths
    (train, validation, test); the document goes where its
    :func:`split_point` falls.  A split with fraction 0 never receives a
    document; the last split with a positive fraction takes everything above
    the cut before it, so rounding in the fractions cannot leak documents into
    a zero-fraction split.

    Args:
        doc_id: The document's id.
        fractions: Train, validation and test fractions (non-negative, sum 1).
        seed: The split seed.

    Returns:
        ``"train"``, ``"validation"`` or ``"test"``.

    Example:
        >>> from mixtune.corpus import assign_split
        >>> assign_split("paper.txt", (1.0, 0.0, 0.0), seed=0)
        'train'
    """
    u = split_point(doc_id, seed)
    positive = [(name, f) for name, f in zip(SPLITS, fractions, strict=True) if f > 0]
    edge = 0.0
    for name, fraction in positive[:-1]:
        edge += fraction
        if u < edge:
            return name
    return positive[-1][0]


def check_splits(
    assignment: Mapping[str, Split],
    fractions: tuple[float, float, float],
    seed: int,
) -> None:
    """Raise if a split with a positive fraction received no document.

    Args:
        assignment: Document id → split.
        fractions: The fractions used.
        seed: The seed used.

    Raises:
        SplitError: Naming each empty split, how many documents were split,
            how many documents make an empty split unlikely, and the ways out.
    """
    counts = dict.fromkeys(SPLITS, 0)
    for split in assignment.values():
        counts[split] += 1
    n = len(assignment)
    empty = [
        (name, f) for name, f in zip(SPLITS, fractions, strict=True) if f > 0 and counts[name] == 0
    ]
    if not empty:
        return
    needed = sum(1 for f in fractions if f > 0)
    lines = []
    for name, fraction in empty:
        # Each document misses a split with probability 1 - f, so n documents
        # leave it empty with probability (1 - f)**n; ask for n where that is < 1%.
        likely = math.ceil(math.log(0.01) / math.log1p(-fraction)) if fraction < 1 else 1
        lines.append(
            f"split {name!r} (fraction {fraction:g}) received none of the {n} documents; "
            f"about {likely} documents make that unlikely (< 1%)"
        )
    minimum = (
        f" At least {needed} documents are needed for {needed} non-empty splits."
        if n < needed
        else ""
    )
    raise SplitError(
        "; ".join(lines)
        + f".{minimum} Documents are split whole, by hashing their ids with seed {seed}. "
        "Fix: add documents, try another seed, or give that split a fraction of 0 "
        "(e.g. fractions=(0.9, 0.1, 0.0)) to leave it empty on purpose."
    )


def split_counts(assignment: Iterable[Split]) -> dict[Split, int]:
    """Number of documents per split (all three keys present).

    Args:
        assignment: One split name per document.

    Returns:
        Split name → count.
    """
    counts: dict[Split, int] = dict.fromkeys(SPLITS, 0)
    for split in assignment:
        counts[split] += 1
    return counts
