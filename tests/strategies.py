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


# --- tok: tokenizer parity strategies (owner: tok) ---------------------------

_WHITESPACE = st.sampled_from([" ", "\n", "\t", "\r", "\u00a0", "\u2581", "\u3000", "\u2028"])

whitespace_texts = st.lists(
    st.one_of(
        # Runs of one whitespace character, long enough to need several pieces
        # ("▁" × 16 is the longest whitespace piece).
        st.tuples(_WHITESPACE, st.integers(1, 40)).map(lambda t: t[0] * t[1]),
        st.lists(_WHITESPACE, min_size=1, max_size=8).map("".join),
        st.sampled_from(["x", "the", "Mixtral", "42", ".", "中", "é", "🙂"]),
    ),
    max_size=12,
).map("".join)
"""Whitespace runs (spaces, newlines, tabs, NBSP, "▁") around short words, leading and trailing."""

unicode_texts = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80
)
"""Any encodable Unicode: astral planes, combining marks, controls, private use."""

latex_texts = st.lists(
    st.one_of(
        st.sampled_from(
            [
                r"\begin{equation}",
                r"\end{equation}",
                r"\mathbb{R}^{d}",
                r"\left(",
                r"\right)",
                r"\cite{smith2020}",
                r"\label{eq:1}",
                "$",
                "$$",
                "^",
                "_{",
                "}",
                "\\\\",
                " & ",
                "%",
                "~",
                "---",
                "``",
                "''",
            ]
        ),
        st.integers(-(10**12), 10**12).map(str),
        st.floats(allow_nan=False, allow_infinity=False).map(repr),
        st.from_regex(r"[a-zA-Z]{1,10}", fullmatch=True),
        _WHITESPACE,
    ),
    max_size=30,
).map("".join)
"""LaTeX-ish markup with numbers: what arXiv text mostly looks like to a tokenizer."""

tokenizer_texts = st.one_of(texts, whitespace_texts, unicode_texts, latex_texts)
"""Everything above: input for tokenizer parity properties."""


# ---------------------------------------------------------------------------
# corpus (owner: corpus) — documents and chunking settings
# ---------------------------------------------------------------------------

_PROSE = st.sampled_from(
    [
        "The router sends each token to two experts.",
        "Sparse models scale well.",
        "We prove the claim by induction on $n$.",
        "Table 3 lists the results [12].",
        r"\[ \sum_{i=1}^n x_i = 1 \]",
        "Mixture-of-Experts layers replace the MLP.",
        "Résumé: ça marche très bien.",
        "中文句子。",
        "Why? Because!",
        "i.e. the first, e.g. the second",
    ]
)

_SEPARATORS = st.sampled_from([" ", "  ", "\n", "\n\n", "\n\n\n", " \n", "\r\n", "\t", "\u00a0"])

paragraph_texts = st.lists(
    st.one_of(
        st.tuples(_PROSE, _SEPARATORS).map("".join),
        texts,
    ),
    min_size=1,
    max_size=12,
).map("".join)
"""Multi-sentence texts with paragraph and line breaks plus arbitrary Unicode."""

doc_ids = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12
)
"""Document ids: any non-empty UTF-8-encodable string."""


@st.composite
def chunk_settings(draw: st.DrawFn, *, specials: int = 2) -> tuple[int, int]:
    """``(max_length, overlap)`` with ``overlap < max_length - specials``."""
    max_length = draw(st.integers(min_value=8, max_value=48))
    overlap = draw(st.integers(min_value=0, max_value=max_length - specials - 1))
    return max_length, overlap


# --------------------------------------------------------------- end corpus


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


# --- recipe: spec strategies for the JSON round trip (owner: recipe) ----------

import torch as _torch  # noqa: E402 - this section's own imports

_FLOAT_DTYPES = st.sampled_from([_torch.bfloat16, _torch.float16, _torch.float32])


@st.composite
def recipes(draw: st.DrawFn) -> object:
    """Valid :class:`mixtune.recipe.Recipe` objects with varied fields."""
    from mixtune.recipe import Recipe, RunSettings

    run = RunSettings(
        output_dir=draw(st.sampled_from(["runs/a", "/tmp/b c", "ü/ñ"])),
        device=draw(st.sampled_from(["auto", "cpu", "cuda"])),
        report_to=draw(
            st.lists(st.sampled_from(["tensorboard", "wandb"]), unique=True, max_size=2)
        ),
        progress=draw(st.booleans()),
        save_total_limit=draw(st.none() | st.integers(1, 10)),
        memory_budget_bytes=draw(st.none() | st.integers(0, 2**40)),
    )
    pos_float = st.floats(min_value=1e-8, max_value=1.0, allow_nan=False, allow_infinity=False)
    warmup = draw(st.one_of(st.floats(0, 0.999), st.integers(0, 1000).map(float)))
    return Recipe(
        epochs=draw(st.floats(min_value=0.01, max_value=100, allow_nan=False)),
        max_steps=draw(st.none() | st.integers(1, 10**6)),
        batch_size=draw(st.integers(1, 64)),
        grad_accum=draw(st.integers(1, 64)),
        learning_rate=draw(pos_float),
        warmup=warmup,
        scheduler=draw(st.sampled_from(["linear", "cosine", "constant", "constant_with_warmup"])),
        weight_decay=draw(st.floats(0, 1)),
        max_grad_norm=draw(st.floats(0, 10)),
        optimizer=draw(st.sampled_from(["auto", "paged_adamw_8bit", "adamw_torch"])),
        precision=draw(st.sampled_from(["auto", "bf16", "fp32"])),
        gradient_checkpointing=draw(st.booleans()),
        layout=draw(st.sampled_from(["padded", "packed"])),
        router_aux_loss_coef=draw(st.floats(0, 1)),
        eval_steps=draw(st.integers(1, 10**4)),
        save_steps=draw(st.integers(1, 10**4)),
        logging_steps=draw(st.integers(1, 10**4)),
        eval_rows=draw(st.none() | st.integers(1, 10**4)),
        seed=draw(st.integers(0, 2**32)),
        run=run,
    )


@st.composite
def spec_quant_specs(draw: st.DrawFn) -> object:
    """Valid :class:`mixtune.model.QuantSpec` objects of every method and dtype."""
    from mixtune.model import QuantSpec

    kind = draw(st.sampled_from(["nf4", "fp4", "none"]))
    if kind == "none":
        return QuantSpec.none(compute_dtype=draw(_FLOAT_DTYPES))
    make = QuantSpec.nf4 if kind == "nf4" else QuantSpec.fp4
    return make(
        double_quant=draw(st.booleans()),
        compute_dtype=draw(_FLOAT_DTYPES),
        block_size=draw(st.sampled_from([64, 128, 256])),
        quantize_embeddings=draw(st.booleans()),
        quantize_lm_head=draw(st.booleans()),
    )


@st.composite
def adapter_specs(draw: st.DrawFn) -> object:
    """Valid :class:`mixtune.adapter.AdapterSpec` objects."""
    from mixtune.adapter import AdapterSpec

    make = draw(st.sampled_from([AdapterSpec.lora, AdapterSpec.qlora]))
    targets = draw(
        st.lists(
            st.sampled_from(["attention", "experts", "router", "lm_head", "all-linear", "q_proj"]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    return make(
        r=draw(st.integers(1, 128)),
        alpha=draw(st.floats(0.5, 256, allow_nan=False)),
        dropout=draw(st.floats(0, 0.9)),
        targets=tuple(targets),
        layers=draw(st.none() | st.lists(st.integers(0, 63), min_size=1, max_size=4, unique=True)),
        rslora=draw(st.booleans()),
    )


# --------------------------------------------------------------- end recipe
