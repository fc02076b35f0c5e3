"""Cutting one tokenized document into overlapping token windows.

Windows are cut on token indices of the whole document's tokenization, so a
chunk's tokens are always a slice of the document's tokens: nothing is
re-tokenized, and SentencePiece's dummy prefix or a BPE merge across a cut
cannot change a single id.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np
import numpy.typing as npt

__all__ = ["Window", "cut_windows"]

# Cut quality, best first.  A cut falls *before* token ``e``.
_PARAGRAPH = 3.0
_LINE_OR_SENTENCE = 2.0
_WHITESPACE = 1.0
_INSIDE_WORD = 0.0
_INSIDE_CHARACTER = -1.0  # byte-fallback pieces of one character: never cut there if avoidable

_SENTENCE_END = (".", "!", "?", "…", "。", "！", "？", ".)", '."', ".”")


@attrs.frozen
class Window:
    """Token and character extent of one chunk within its document.

    Args:
        token_start: First body token (index into the document's tokens).
        token_end: One past the last body token.
        char_start: First character of the chunk in the cleaned text.
        char_end: One past its last character.
    """

    token_start: int
    token_end: int
    char_start: int
    char_end: int


def _cut_score(text: str, offsets: npt.NDArray[np.int64], e: int) -> float:
    p = int(offsets[e, 0])
    if p < int(offsets[e - 1, 1]):
        return _INSIDE_CHARACTER
    left = text[max(0, p - 8) : p]
    bare = left.rstrip(" \t")
    if bare.endswith("\n\n"):
        return _PARAGRAPH
    at_space = (p < len(text) and text[p].isspace()) or (p > 0 and text[p - 1].isspace())
    if bare.endswith("\n") or (at_space and bare.rstrip().endswith(_SENTENCE_END)):
        return _LINE_OR_SENTENCE
    return _WHITESPACE if at_space else _INSIDE_WORD


def cut_windows(
    text: str,
    offsets: npt.NDArray[np.int64] | Sequence[tuple[int, int]],
    *,
    budget: int,
    overlap: int,
    slack: float,
) -> list[Window]:
    """Cut a document's tokens into windows of at most ``budget`` tokens.

    Consecutive windows share exactly ``overlap`` tokens and together cover
    every token.  A window may end up to ``slack * budget`` tokens early to
    end at a better place: the last paragraph break in that range, else a
    line break or sentence end, else whitespace (ties go to the later cut); a
    cut never falls between byte-fallback pieces of one character when it can
    be avoided.

    Character spans: the first window starts at character 0, the last ends at
    ``len(text)``, and a window ends where the token after it starts, so
    with ``overlap=0`` the spans tile the text exactly.

    Args:
        text: The cleaned document text.
        offsets: ``(n_tokens, 2)`` character offsets of the document's tokens.
        budget: Maximum body tokens per window (``>= 1``).
        overlap: Tokens shared by consecutive windows (``0 <= overlap < budget``).
        slack: Fraction of ``budget`` a window may give up for a better cut.

    Returns:
        The windows, in order; empty for a document without tokens.
    """
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    n = len(offs)
    windows: list[Window] = []
    start = 0
    give = max(1, int(budget * slack))
    while n:
        if n - start <= budget:
            end = n
        else:
            hard = start + budget
            # The next window starts at end - overlap, which must move forward.
            lowest = max(start + overlap + 1, hard - give)
            end, best = hard, _cut_score(text, offs, hard)
            for e in range(hard - 1, lowest - 1, -1):
                if best >= _PARAGRAPH:
                    break
                score = _cut_score(text, offs, e)
                if score > best:
                    end, best = e, score
            # Whole slack range inside one character's byte pieces (tiny
            # windows): go back further to the nearest character boundary.
            e = lowest - 1
            while best < _INSIDE_WORD and e > start + overlap:
                score = _cut_score(text, offs, e)
                if score > best:
                    end, best = e, score
                e -= 1
        char_start = 0 if start == 0 else int(offs[start, 0])
        char_end = len(text) if end == n else max(char_start, int(offs[end, 0]))
        windows.append(Window(start, end, char_start, char_end))
        if end == n:
            break
        start = end - overlap
    return windows
