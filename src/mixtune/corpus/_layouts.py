"""Turning chunks into fixed-length training rows: padded or packed.

Both layouts give rows of exactly ``max_length`` tokens with ``labels = -100``
wherever no loss should be taken.  The builders work on token-id arrays only
and know nothing about documents or splits.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = ["IGNORE_INDEX", "Layout", "pack_lengths", "packed_rows", "padded_rows"]

IGNORE_INDEX = -100
"""Label value that PyTorch's cross-entropy (and transformers' loss) ignores."""

Layout = Literal["padded", "packed"]

Ids = npt.NDArray[np.int64]


def padded_rows(chunks: Sequence[Ids], max_length: int, pad_id: int) -> dict[str, Ids]:
    """One row per chunk, right-padded to ``max_length``.

    Args:
        chunks: Token ids of each chunk (each at most ``max_length`` long).
        max_length: Row length.
        pad_id: Id written on padding positions.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` as ``(rows, max_length)``
        arrays; labels copy the ids on real tokens and are -100 on padding, so
        the model is never taught to emit the pad (often EOS) id.
    """
    n = len(chunks)
    input_ids = np.full((n, max_length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((n, max_length), dtype=np.int64)
    labels = np.full((n, max_length), IGNORE_INDEX, dtype=np.int64)
    for row, ids in enumerate(chunks):
        k = len(ids)
        input_ids[row, :k] = ids
        attention_mask[row, :k] = 1
        labels[row, :k] = ids
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group items into bins of at most ``capacity`` (best-fit decreasing).

    Items are placed longest first (ties by index), each into the fullest
    bin it still fits in, else a new bin.  Deterministic for a given input.

    Args:
        lengths: Item sizes, each ``<= capacity``.
        capacity: Bin size.

    Returns:
        Bins as lists of item indices, in the order the bins were opened.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Open bins as (remaining room, bin number), sorted: bisect finds the bin
    # with the least room that still fits, in O(log bins) plus a list insert.
    room: list[tuple[int, int]] = []
    for i in order:
        size = lengths[i]
        at = bisect.bisect_left(room, (size, -1))
        if at < len(room):
            left, b = room.pop(at)
        else:
            left, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if left - size > 0:
            bisect.insort(room, (left - size, b))
    return bins


def packed_rows(
    chunks: Sequence[Ids], max_length: int, pad_id: int, *, seed: int
) -> dict[str, Ids | list[list[int]]]:
    """Pack chunks into rows of ``max_length`` tokens without cross-chunk attention.

    Within a row each chunk gets ``position_ids`` restarting at 0 and label
    -100 on its first token (that token would otherwise be predicted from the
    previous chunk).  The tail is padding, with its own restarting positions,
    ``attention_mask`` 0 and labels -100.  Rows are shuffled with ``seed`` so
    that row order does not follow chunk length.

    transformers derives a block-diagonal causal mask from restarting
    ``position_ids`` only when the model gets ``attention_mask=None`` and no
    cache: run the model with ``use_cache=False`` and without the
    ``attention_mask`` column.

    Args:
        chunks: Token ids of each chunk (each at most ``max_length`` long).
        max_length: Row length.
        pad_id: Id written on padding positions.
        seed: Seed of the row shuffle.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``, ``position_ids`` as
        ``(rows, max_length)`` arrays and ``seq_lens`` (chunk lengths per row).
    """
    bins = pack_lengths([len(c) for c in chunks], max_length)
    random.Random(seed).shuffle(bins)
    n = len(bins)
    input_ids = np.full((n, max_length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((n, max_length), dtype=np.int64)
    labels = np.full((n, max_length), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((n, max_length), dtype=np.int64)
    seq_lens: list[list[int]] = []
    for row, members in enumerate(bins):
        at = 0
        lens = []
        for i in members:
            ids = chunks[i]
            k = len(ids)
            input_ids[row, at : at + k] = ids
            attention_mask[row, at : at + k] = 1
            labels[row, at + 1 : at + k] = ids[1:]
            position_ids[row, at : at + k] = np.arange(k)
            lens.append(k)
            at += k
        position_ids[row, at:] = np.arange(max_length - at)
        seq_lens.append(lens)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "position_ids": position_ids,
        "seq_lens": seq_lens,
    }
