"""Hypothesis strategies shared by the test suite."""

from __future__ import annotations

from hypothesis import strategies as st

# Pieces that stress a SentencePiece/BPE tokenizer and a text cleaner: runs of
# whitespace, digits, LaTeX, non-Latin scripts, emoji, combining marks.
_FRAGMENTS = st.sampled_from(
    [
        " ",
        "  ",
        "   ",
        "\n",
        "\n\n",
        "\t",
        " \n ",
        "1",
        "42",
        "3.14159",
        "2022",
        "$x^2$",
        r"\frac{a}{b}",
        r"\[ \sum_{i=1}^n i \]",
        r"\alpha\beta",
        "{",
        "}",
        "_",
        "the",
        " the",
        "The",
        "Mixture",
        "-of-",
        "Experts",
        ".",
        ",",
        "!",
        "?",
        ":",
        ";",
        "é",
        "ß",
        "Ω",
        "中文",
        "日本語",
        "한국어",
        "Привет",
        "مرحبا",
        "🙂",
        "👩‍💻",
        "e\u0301",
        "\u00a0",
        "ﬁ",
        "…",
        "—",
        "“quoted”",
        "'s",
        "n't",
        "http://x.org/a?b=1",
    ]
)

texts = st.one_of(
    st.lists(_FRAGMENTS, max_size=40).map("".join),
    st.text(max_size=200),
    st.lists(st.one_of(_FRAGMENTS, st.text(max_size=6)), max_size=30).map("".join),
)
"""Strings mixing Unicode, whitespace runs, digits and LaTeX."""


# ---------------------------------------------------------------------------
# model (owner: model): 4-bit storage specs and weight matrices
# ---------------------------------------------------------------------------


@st.composite
def quant_specs(draw: st.DrawFn) -> object:
    """Valid 4-bit ``mixtune.model.QuantSpec`` values (fp32 compute, for exact checks)."""
    import torch

    from mixtune.model import QuantSpec

    return QuantSpec(
        method=draw(st.sampled_from(["nf4", "fp4"])),
        double_quant=draw(st.booleans()),
        compute_dtype=torch.float32,
        block_size=draw(st.sampled_from([64, 128, 256])),
    )


matrix_shapes = st.tuples(st.integers(1, 48), st.integers(1, 48).map(lambda n: 2 * n))
"""``(rows, cols)`` of a weight matrix; an even column count, as in real models."""
