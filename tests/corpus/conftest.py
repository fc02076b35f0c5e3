"""Fixtures of the corpus tests: small tokenizers built offline and folders on disk.

The real Mixtral tokenizer is the session fixture ``mixtral_tokenizer`` of
``tests/conftest.py``; these stand for "any other tokenizer".
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast


def _word_level(*, max_len: int, bos: bool) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over a small vocabulary."""
    words = ["the", "a", "of", "to", "and", "in", "is", "it", "that", "for", "on", "with"]
    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2, "[PAD]": 3}
    for w in [*words, *".,;:!?()$\\{}_^"]:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", special_tokens=[("[BOS]", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        model_max_length=max_len,
    )


@pytest.fixture(scope="session")
def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, adds BOS, eos id 2, no pad token, model_max_length 64."""
    return _word_level(max_len=64, bos=True)


@pytest.fixture(scope="session")
def gpt2_like_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE that adds nothing on encode and has a pad token (like GPT-2 + pad)."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders, trainers

    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = "The mixture of experts routes each token to two experts. " * 20
    tk.train_from_iterator([text, "Paragraphs.\n\nSentences! Numbers 123."], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=int(1e30),
    )


@pytest.fixture
def make_folder(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Write ``{relative path: str | bytes}`` under a fresh folder and return it."""

    def make(files: dict[str, str | bytes]) -> Path:
        root = tmp_path / "corpus"
        root.mkdir(exist_ok=True)
        for name, content in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8")
        return root

    return make
