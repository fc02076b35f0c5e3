"""Tokenizers whose ids match the reference implementation on every input.

:func:`mixtral_v1` builds the Mixtral v0.1 tokenizer as a Hugging Face fast
tokenizer directly from the SentencePiece model that mistral-common ships
(``mistral_common/data/tokenizer.model.v1``), with no download.

Why not let transformers convert the file?  Its generic conversion of a
SentencePiece BPE model silently disagrees with SentencePiece on some inputs
(merge priority, the dummy-prefix space, runs of whitespace, BOS handling), and
``LlamaTokenizerFast(vocab_file=...)`` ignores the file altogether.  Here the
``tokenizers`` pipeline is assembled piece by piece from the model proto so that
it reproduces SentencePiece's algorithm; the test suite checks the ids against
``sentencepiece`` itself.
"""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixtune.errors import TokenizerError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["MIXTRAL_V1_MAX_LENGTH", "mixtral_v1"]

MIXTRAL_V1_MAX_LENGTH = 32768
"""Context length of Mixtral v0.1, set as the tokenizer's ``model_max_length``."""

_INSTALL_HINT = 'install the extra with `pip install "mixtune[mistral]"`'
_SPACE = "\u2581"  # SentencePiece's visible stand-in for " " ("▁")

# ModelProto.SentencePiece.Type and TrainerSpec.ModelType values (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE, _UNUSED = 1, 2, 3, 4, 6, 5
_BPE = 2

# What the Mixtral v0.1 file looks like; a model_file that differs is refused
# rather than turned into a tokenizer that silently disagrees with it.
_SPECIALS = {0: ("<unk>", _UNKNOWN), 1: ("<s>", _CONTROL), 2: ("</s>", _CONTROL)}
_VOCAB_SIZE = 32000


def mixtral_v1(
    *,
    add_bos: bool = True,
    add_eos: bool = False,
    model_file: str | os.PathLike[str] | None = None,
) -> PreTrainedTokenizerFast:
    """Load the Mixtral v0.1 tokenizer as a Hugging Face fast tokenizer.

    The ids equal those of ``sentencepiece.SentencePieceProcessor(model_file=...)
    .encode(text, add_bos=add_bos, add_eos=add_eos)`` for every string, and
    ``decode(ids, skip_special_tokens=True)`` equals SentencePiece's ``decode``
    for ids it produced.  Text that spells a special token (``"</s>"``) is
    tokenized as plain text, as SentencePiece does.  BOS is ``<s>`` (id 1), EOS
    ``</s>`` (id 2), unknown ``<unk>`` (id 0); there is no pad token, so code
    that pads must pick one (mixtune pads with EOS and masks the labels).
    ``model_max_length`` is :data:`MIXTRAL_V1_MAX_LENGTH`.

    The tokenizer survives ``save_pretrained`` and
    ``transformers.AutoTokenizer.from_pretrained`` with the same ids.  After
    such a reload, change BOS/EOS behaviour by calling this function again
    rather than by setting ``add_eos_token`` on the reloaded object:
    transformers does not keep ``add_bos_token`` in the saved files, so toggling
    one flag there rewrites the template without the BOS.

    Building the pipeline takes a fraction of a second once per model file and
    process; later calls reuse it.  Every call returns a new tokenizer object, so
    setting e.g. ``pad_token`` on one does not affect another.

    Example:
        >>> from mixtune.tokenizers import mixtral_v1
        >>> tok = mixtral_v1()
        >>> tok("Mixture of experts")["input_ids"]
        [1, 13609, 8440, 302, 11725]
        >>> tok.decode([1, 13609, 8440, 302, 11725], skip_special_tokens=True)
        'Mixture of experts'

    Args:
        add_bos: Put ``<s>`` (id 1) before every encoded text.
        add_eos: Put ``</s>`` (id 2) after every encoded text.
        model_file: A copy of mistral-common's ``tokenizer.model.v1`` to use
            instead of the one inside the installed mistral-common package.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.

    Raises:
        TokenizerError: mistral-common (for the default file) or
            sentencepiece/protobuf is not installed; ``model_file`` does not
            exist or cannot be read; or the file is not the Mixtral v0.1
            SentencePiece BPE model.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = _default_model_file() if model_file is None else Path(model_file)
    try:
        stat = path.stat()
    except OSError as e:
        raise TokenizerError(
            f"model_file {str(path)!r} cannot be read ({e.strerror or e}); pass the path of an "
            "existing copy of mistral-common's tokenizer.model.v1, or leave model_file unset "
            "to use the one inside the installed mistral-common"
        ) from e
    if not path.is_file():
        raise TokenizerError(
            f"model_file {str(path)!r} is not a file; pass the path of tokenizer.model.v1 itself"
        )
    # The key includes size and mtime so that a file replaced in place is rebuilt.
    backend_json = _backend_json(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    # Untyped in transformers; the annotation on mixtral_v1 states the result.
    fast_tokenizer_cls: Any = PreTrainedTokenizerFast
    tokenizer: PreTrainedTokenizerFast = fast_tokenizer_cls(
        tokenizer_object=_with_template(Tokenizer.from_str(backend_json), add_bos, add_eos),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        model_max_length=MIXTRAL_V1_MAX_LENGTH,
        # SentencePiece never matches "<s>"/"</s>" inside text; without this the
        # fast tokenizer would turn the literal text "</s>" into id 2.
        split_special_tokens=True,
        # Cleaning spaces around punctuation would break decode parity.
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def _default_model_file() -> Path:
    try:
        import mistral_common
    except ImportError as e:
        raise TokenizerError(
            f"mixtral_v1() reads the tokenizer shipped with mistral-common, which is not "
            f"installed: {_INSTALL_HINT} (or pass model_file=)"
        ) from e
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise TokenizerError(
            f"the installed mistral-common has no {path}; upgrade it with "
            '`pip install -U "mixtune[mistral]"` or pass model_file='
        )
    return path


def _load_proto(path: Path) -> Any:
    try:
        # Imported by name so that a missing module (or one hidden in a test)
        # surfaces here as ImportError.
        decode_error = importlib.import_module("google.protobuf.message").DecodeError
        sentencepiece_model_pb2 = importlib.import_module("sentencepiece.sentencepiece_model_pb2")
    except ImportError as e:
        raise TokenizerError(
            f"reading a SentencePiece model needs sentencepiece and protobuf: {_INSTALL_HINT}"
        ) from e
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except OSError as e:
        raise TokenizerError(f"cannot read model_file {str(path)!r}: {e}") from e
    except decode_error as e:
        raise TokenizerError(
            f"model_file {str(path)!r} is not a SentencePiece model ({e}); pass "
            "mistral-common's tokenizer.model.v1"
        ) from e
    return proto


def _check_proto(proto: Any, path: Path) -> None:
    """Refuse any model whose SentencePiece behaviour the pipeline does not reproduce."""
    problems: list[str] = []
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != _BPE:
        problems.append(f"model type is {trainer.model_type}, not BPE ({_BPE})")
    if len(proto.pieces) != _VOCAB_SIZE:
        problems.append(f"it has {len(proto.pieces)} pieces, not {_VOCAB_SIZE}")
    for i, (piece, kind) in _SPECIALS.items():
        if len(proto.pieces) > i and (proto.pieces[i].piece, proto.pieces[i].type) != (
            piece,
            kind,
        ):
            problems.append(f"id {i} is {proto.pieces[i].piece!r}, not {piece!r}")
    if not trainer.byte_fallback:
        problems.append("byte_fallback is off")
    n_bytes = sum(p.type == _BYTE for p in proto.pieces)
    if n_bytes != 256:
        problems.append(f"it has {n_bytes} byte pieces, not 256")
    odd = {p.type for p in proto.pieces} - {_NORMAL, _UNKNOWN, _CONTROL, _BYTE}
    if odd:
        # User-defined pieces are matched before BPE and unused ones are
        # re-segmented; neither is modelled here.
        problems.append(f"it has pieces of types {sorted(odd)} (user-defined or unused)")
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        problems.append(f"its normalizer {norm.name!r} rewrites characters")
    if not norm.add_dummy_prefix:
        problems.append("add_dummy_prefix is off")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces is on")
    if not norm.escape_whitespaces:
        problems.append("escape_whitespaces is off")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix is on")
    if problems:
        raise TokenizerError(
            f"model_file {str(path)!r} is not the Mixtral v0.1 SentencePiece model: "
            + "; ".join(problems)
            + ". Pass mistral-common's tokenizer.model.v1."
        )


def _merges(proto: Any) -> list[tuple[str, str]]:
    """BPE merges, in priority order, that make ``tokenizers`` merge like SentencePiece.

    SentencePiece's BPE encoder starts from single characters and repeatedly
    joins the adjacent pair whose concatenation is the highest-scoring piece of
    the vocabulary, leftmost first on ties; any split of a piece into two pieces
    will do.  ``tokenizers`` joins the listed pair with the lowest rank, also
    leftmost first on ties.  So every split of every piece into two pieces is
    listed, ranked by the score of the piece it makes.

    Scores are all distinct except for the whitespace-only pieces ("▁" × 2 to
    16, all -1e9, merged after everything else).  There SentencePiece's
    leftmost rule grows a run of spaces from its left end into the longest
    piece before starting the next one.  Ranks must be distinct, so among equal
    scores the longer result and then the longer left part come first: the pair
    (▁×k, ▁) then outranks a (▁, ▁) further right, which gives the same pieces.
    """
    pieces = {p.piece: p.score for p in proto.pieces if p.type == _NORMAL}
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, score in pieces.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in pieces and right in pieces:
                ranked.append((-score, -len(piece), -cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


@functools.lru_cache(maxsize=4)
def _backend_json(path: str, size: int, mtime_ns: int) -> str:
    """The ``tokenizers`` pipeline (without BOS/EOS template) as JSON; cached per file."""
    del size, mtime_ns  # only part of the cache key
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = _load_proto(Path(path))
    _check_proto(proto, Path(path))
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges(proto),
            unk_token="<unk>",
            # SentencePiece spells a character missing from the vocabulary as
            # its UTF-8 bytes <0xXX>, never as <unk>.
            byte_fallback=True,
            fuse_unk=False,
        )
    )
    # SentencePiece's normalizer for this model: no character mapping, spaces
    # become "▁" (runs kept, not collapsed) and one "▁" is prepended to
    # non-empty text (add_dummy_prefix).  No pre-tokenizer: SentencePiece merges
    # across the whole text, so the whole text is one BPE word.
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)]
    )
    # Decoding: "▁" back to spaces, byte pieces back to characters, and the
    # dummy prefix (one leading space) dropped.
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.add_special_tokens(
        [AddedToken(piece, special=True, normalized=False) for piece, _ in _SPECIALS.values()]
    )
    return tokenizer.to_str()


def _with_template(tokenizer: Any, add_bos: bool, add_eos: bool) -> Any:
    from tokenizers import processors

    single = ("<s> " if add_bos else "") + "$A" + (" </s>" if add_eos else "")
    pair = single + " " + single.replace("$A", "$B")
    specials = [("<s>", 1)] * add_bos + [("</s>", 2)] * add_eos
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=specials
    )
    return tokenizer
