"""`AdapterSpec`: what a LoRA adapter targets and how it is shaped.

The spec only describes the adapter; :meth:`AdapterSpec.apply` (in
``_apply.py``) turns it into modules on a loaded model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs
import torch

from mixtune.errors import ConfigError

if TYPE_CHECKING:
    from mixtune.adapter._apply import AdaptedModel, SupportsModel

__all__ = ["PRESETS", "TARGET_NAMES", "AdapterSpec"]

# Canonical target names, in the order they are kept in a spec.
#
# ``gate_proj``/``up_proj``/``down_proj`` name "the feed-forward projection,
# whatever the model has": the projections of every expert on a MoE model, the
# MLP linears on a dense one.  ``expert_gate``/``expert_up``/``expert_down``
# insist on experts, so a dense model rejects them instead of silently
# adapting something else.
TARGET_NAMES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "expert_gate",
    "expert_up",
    "expert_down",
    "gate_proj",
    "up_proj",
    "down_proj",
    "router",
    "lm_head",
)
"""Every canonical target name, in canonical order."""

PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "experts": ("expert_gate", "expert_up", "expert_down"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "router": ("router",),
    "lm_head": ("lm_head",),
    # Like peft's "all-linear": every projection inside the blocks, not the
    # output head (and not the router, whose logits decide the routing).
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
"""Target presets and the canonical names each one expands to."""

# Names from older guides and from the original hub layout of Mixtral
# (``block_sparse_moe.experts.N.w1`` = gate, ``w3`` = up, ``w2`` = down).
_ALIASES: dict[str, tuple[str, ...]] = {
    "w1": ("expert_gate",),
    "w3": ("expert_up",),
    "w2": ("expert_down",),
    "gate": ("router",),
    "all_linear": PRESETS["all-linear"],
}


def _expand(name: str) -> tuple[str, ...]:
    key = name.strip()
    if key in TARGET_NAMES:
        return (key,)
    if key in PRESETS:
        return PRESETS[key]
    if key in _ALIASES:
        return _ALIASES[key]
    # Unknown names are kept as they are, so the spec's validation can report
    # them together with every other problem.
    return (key,)


def _normalise_targets(value: str | Iterable[str]) -> tuple[str, ...]:
    """Expand presets and old names into canonical names, deduplicated and ordered."""
    names = (value,) if isinstance(value, str) else tuple(value)
    expanded: list[str] = []
    for name in names:
        expanded.extend(_expand(str(name)))
    known = [n for n in TARGET_NAMES if n in expanded]
    unknown = list(dict.fromkeys(n for n in expanded if n not in TARGET_NAMES))
    return (*known, *unknown)


def _normalise_layers(value: Iterable[int] | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    return tuple(sorted(set(value)))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@attrs.frozen
class AdapterSpec:
    """A LoRA adapter: rank, scaling, dropout and the modules it targets.

    Build one with :meth:`lora` or :meth:`qlora`; change a field with
    :func:`attrs.evolve`.  Every problem is reported at once in one
    :class:`~mixtune.errors.ConfigError`.

    Targets are canonical names (``TARGET_NAMES``), presets
    (``PRESETS``: ``"attention"``, ``"experts"``, ``"mlp"``,
    ``"router"``, ``"lm_head"``, ``"all-linear"``) or old names (``w1`` →
    ``expert_gate``, ``w3`` → ``expert_up``, ``w2`` → ``expert_down``,
    ``gate`` → ``router``).  ``gate_proj``/``up_proj``/``down_proj`` mean the
    experts' projections on a MoE model and the MLP linears on a dense one.

    Attributes:
        r: LoRA rank (> 0).
        alpha: LoRA alpha (> 0); the update is scaled by ``alpha / r``
            (``alpha / sqrt(r)`` with ``rslora``).
        dropout: Dropout probability in ``[0, 1)`` on the LoRA input branch,
            active in train mode only.
        targets: Canonical target names, normalised from presets and aliases.
        layers: Decoder layer indices to adapt, or ``None`` for all.  The
            ``lm_head`` target is outside the layers and is not restricted.
        rslora: Use rank-stabilised scaling ``alpha / sqrt(r)``.
        requires_4bit: The base must be 4-bit quantized (QLoRA);
            :meth:`apply` refuses any other base.

    Example:
        >>> from mixtune.adapter import AdapterSpec
        >>> spec = AdapterSpec.lora(targets=("attention", "w1"))
        >>> spec.targets
        ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'expert_gate')
        >>> spec.scaling
        2.0
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    targets: tuple[str, ...] = attrs.field(
        default=("attention", "experts"), converter=_normalise_targets
    )
    layers: tuple[int, ...] | None = attrs.field(default=None, converter=_normalise_layers)
    rslora: bool = False
    requires_4bit: bool = False

    def __attrs_post_init__(self) -> None:
        problems: list[str] = []
        if not _is_int(self.r) or self.r <= 0:
            problems.append(f"r must be an integer > 0 (got {self.r!r}); try r=8")
        if not _is_number(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            problems.append(f"alpha must be a number > 0 (got {self.alpha!r}); try alpha=2*r")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout!r})")
        if not self.targets:
            problems.append(
                "targets is empty; name at least one target, e.g. targets=('attention',)"
            )
        unknown = [t for t in self.targets if t not in TARGET_NAMES]
        if unknown:
            valid = ", ".join([*PRESETS, *TARGET_NAMES, *_ALIASES])
            problems.append(f"targets has unknown name(s) {unknown!r}; valid names: {valid}")
        if self.layers is not None:
            bad = [i for i in self.layers if not _is_int(i) or i < 0]
            if bad:
                problems.append(f"layers must be non-negative layer indices (got {bad!r})")
            elif not self.layers:
                problems.append("layers is empty; pass None to adapt every layer")
        if problems:
            raise ConfigError(problems)

    @classmethod
    def lora(
        cls,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.1,
        targets: str | Iterable[str] = ("attention", "experts"),
        *,
        layers: Iterable[int] | None = None,
        rslora: bool = False,
    ) -> AdapterSpec:
        """LoRA on any base (the guide's setting: r 8, alpha 16, dropout 0.1).

        Args:
            r: LoRA rank.
            alpha: LoRA alpha.
            dropout: Dropout on the LoRA input branch.
            targets: Target names, presets or old names.
            layers: Layer indices to adapt, or ``None`` for all.
            rslora: Scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.

        Returns:
            The spec.

        Raises:
            ConfigError: Listing every invalid field.
        """
        return cls(
            r=r,
            alpha=alpha,
            dropout=dropout,
            targets=targets,
            layers=layers,
            rslora=rslora,
        )

    @classmethod
    def qlora(
        cls,
        r: int = 32,
        alpha: float = 64.0,
        dropout: float = 0.1,
        targets: str | Iterable[str] = ("attention", "experts"),
        *,
        layers: Iterable[int] | None = None,
        rslora: bool = False,
    ) -> AdapterSpec:
        """QLoRA: LoRA on a 4-bit base (the guide's setting: r 32, alpha 64, dropout 0.1).

        :meth:`apply` raises :class:`~mixtune.errors.AdapterError` if the
        loaded model is not 4-bit.

        Args:
            r: LoRA rank.
            alpha: LoRA alpha.
            dropout: Dropout on the LoRA input branch.
            targets: Target names, presets or old names.
            layers: Layer indices to adapt, or ``None`` for all.
            rslora: Scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.

        Returns:
            The spec, with ``requires_4bit=True``.

        Raises:
            ConfigError: Listing every invalid field.
        """
        return cls(
            r=r,
            alpha=alpha,
            dropout=dropout,
            targets=targets,
            layers=layers,
            rslora=rslora,
            requires_4bit=True,
        )

    @property
    def scaling(self) -> float:
        """The factor on ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` with ``rslora``."""
        return float(self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r)

    def apply(
        self, loaded: SupportsModel, *, seed: int = 0, dtype: torch.dtype = torch.float32
    ) -> AdaptedModel:
        """Wrap the targeted modules of ``loaded.model`` with LoRA, in place.

        Everything but the LoRA factors is frozen.  ``A`` factors are drawn
        Kaiming-uniform (as ``nn.Linear`` initialises weights) from a generator
        seeded with ``seed``; ``B`` factors start at zero, so the adapted
        model's output equals the base model's until training moves ``B``.
        No forward pass is run.

        Args:
            loaded: A :class:`~mixtune.model.LoadedModel` from
                :func:`~mixtune.model.load_quantized` (anything with a
                ``.model`` causal LM works).
            seed: Seed of the factor initialisation.
            dtype: dtype of the LoRA factors (float32 keeps the optimizer's
                master weights exact; the base stays in its own dtype).

        Returns:
            The adapted model, with its coverage report.

        Raises:
            AdapterError: The base is not 4-bit but the spec requires it, or
                the model is already adapted.
            TargetNotFoundError: A target matches nothing in the model.
            UnsupportedModelError: The model has no decoder layers mixtune knows.
        """
        from mixtune.adapter._apply import apply_spec

        return apply_spec(self, loaded, seed=seed, dtype=dtype)

    def describe(self) -> dict[str, Any]:
        """The spec as plain data (for logs and model cards).

        Returns:
            A dict of the fields plus the derived ``scaling``.
        """
        return {**attrs.asdict(self), "scaling": self.scaling}
