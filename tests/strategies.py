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
# adapter (owner: adapter)
# ---------------------------------------------------------------------------

adapter_target_names = st.sampled_from(
    [
        "attention",
        "experts",
        "mlp",
        "router",
        "lm_head",
        "all-linear",
        "w1",
        "w2",
        "w3",
        "gate",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "expert_gate",
        "expert_up",
        "expert_down",
    ]
)
"""One valid adapter target: a preset, an old name or a canonical name."""

adapter_target_lists = st.lists(adapter_target_names, min_size=1, max_size=8)
"""Non-empty lists of valid adapter targets, with repeats."""
