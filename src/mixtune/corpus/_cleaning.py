"""Text normalisation applied to every document before it is tokenized.

The rules are deliberately few and exactly documented (see :func:`clean_text`)
so that a character span recorded on a chunk can always be looked up in the
cleaned text the corpus keeps.
"""

from __future__ import annotations

import re

__all__ = ["clean_text", "control_fraction"]

# Line-like separators that editors and PDF extractors emit instead of "\n".
_NEWLINES = re.compile("\r\n|[\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")

# Space characters that look like a space but tokenize differently (NBSP from
# HTML/LaTeX "~", thin and narrow spaces from typesetting, the ideographic
# space).  They become an ordinary space.
_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")

# Invisible characters that only carry layout information: zero-width space,
# word joiner, BOM/ZWNBSP and soft hyphen (a PDF line-break artefact).  ZWJ and
# ZWNJ are kept on purpose: emoji sequences and Persian/Indic words need them.
_INVISIBLE = re.compile("[\u200b\u2060\ufeff\u00ad]")

# C0 controls except tab and newline, DEL, and the C1 block.
_CONTROLS = re.compile("[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f]")

_TRAILING = re.compile("[ \t]+\n")
_BLANK_RUNS = re.compile("\n{3,}")


def clean_text(text: str) -> str:
    """Normalise whitespace and remove control characters, in this order.

    1. ``\\r\\n``, lone ``\\r``, vertical tab, form feed, U+0085, U+001C–U+001E,
       U+2028 and U+2029 become ``\\n``.
    2. No-break and typographic spaces (U+00A0, U+1680, U+2000–U+200A, U+202F,
       U+205F, U+3000) become an ordinary space.
    3. Zero-width space, word joiner, byte-order mark and soft hyphen are
       removed (zero-width joiner/non-joiner are kept).
    4. NUL and every other control character except tab and newline are
       removed (C0, DEL, C1).
    5. Spaces and tabs at the end of a line are removed.
    6. Three or more consecutive newlines become two (at most one blank line).
    7. Leading and trailing whitespace of the whole text is removed.

    No Unicode normalisation (NFC/NFKC) is applied: that is the tokenizer's
    business, and doing it here would change what the model sees.

    Args:
        text: Raw document text.

    Returns:
        The cleaned text (possibly empty).

    Example:
        >>> from mixtune.corpus import clean_text
        >>> clean_text("a\\u00a0b  \\r\\n\\r\\n\\r\\n\\x00c\\n")
        'a b\\n\\nc'
    """
    text = _NEWLINES.sub("\n", text)
    text = _SPACES.sub(" ", text)
    text = _INVISIBLE.sub("", text)
    text = _CONTROLS.sub("", text)
    text = _TRAILING.sub("\n", text + "\n")
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def control_fraction(text: str) -> float:
    """Fraction of characters that are control characters other than whitespace.

    Text files have next to none; UTF-16 text read as UTF-8 or a binary file
    that happens to decode has many (every other byte of UTF-16 is NUL).

    Args:
        text: Decoded file content.

    Returns:
        A number in [0, 1]; 0 for the empty string.
    """
    if not text:
        return 0.0
    return len(_CONTROLS.findall(text)) / len(text)
