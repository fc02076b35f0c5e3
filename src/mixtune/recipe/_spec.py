"""The training spec: what defines a fine-tuning run, kept apart from where it runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

from mixtune.errors import ConfigError

if TYPE_CHECKING:
    from mixtune.recipe._result import FitResult

__all__ = ["Recipe", "RunSettings"]


_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
_OPTIMIZERS = ("auto", "paged_adamw_8bit", "adamw_torch")
_PRECISIONS = ("auto", "bf16", "fp32")
_LAYOUTS = ("padded", "packed")
_DEVICES = ("auto", "cpu", "cuda")
_BACKENDS = ("tensorboard", "wandb")
_SHARDINGS = ("ddp", "fsdp2")


def _tuple_of_str(value: Any) -> tuple[str, ...]:
    # A lone string would otherwise become a tuple of characters.
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@attrs.frozen(kw_only=True)
class RunSettings:
    """Where and how a run executes; nothing here changes the trained adapter.

    Kept out of the artifact-defining :class:`Recipe` fields (like peft's
    ``LoraRuntimeConfig``): two runs that differ only here train the same
    weights.

    Attributes:
        output_dir: Folder for checkpoints (``checkpoint-<step>``) and logs.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.
        report_to: Logging backends, none by default; ``"tensorboard"`` and
            ``"wandb"`` need the extras of the same name.
        progress: Show a progress bar with loss, tokens/s and ETA.
        save_total_limit: Keep at most this many complete checkpoints (``None``: all).
        memory_budget_bytes: Free device memory the pre-flight check assumes,
            instead of asking the device (for tests and for leaving headroom).
        callbacks: Extra ``transformers.TrainerCallback`` objects (run-time
            hooks; not compared, not saved).
        sharding: How several processes (``torchrun``/``accelerate launch``)
            share the model. ``"ddp"`` (default): every rank holds the whole
            4-bit model and the LoRA gradients are all-reduced. ``"fsdp2"``:
            ``fit`` shards the decoder layers, 4-bit weights included, over the
            ranks with PyTorch's FSDP2, so each holds about ``1/N`` of them
            (for models whose 4-bit weights do not fit one GPU); LoRA on
            ``lm_head`` and bitsandbytes' paged optimizer are not available
            then. A plain ``python`` run (no process group) has nothing to
            shard and trains as one process either way.
    """

    output_dir: Path = attrs.field(default=Path("mixtune-run"), converter=Path)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    report_to: tuple[Literal["tensorboard", "wandb"], ...] = attrs.field(
        default=(), converter=_tuple_of_str
    )
    progress: bool = True
    save_total_limit: int | None = None
    memory_budget_bytes: int | None = None
    callbacks: tuple[Any, ...] = attrs.field(default=(), converter=tuple, eq=False, repr=False)
    sharding: Literal["ddp", "fsdp2"] = "ddp"

    def __attrs_post_init__(self) -> None:
        problems = []
        if self.sharding not in _SHARDINGS:
            problems.append(
                f"run.sharding={self.sharding!r}: use 'ddp' (each GPU holds the whole model) "
                "or 'fsdp2' (the model is split between the GPUs)"
            )
        if self.device not in _DEVICES:
            problems.append(f"run.device={self.device!r}: use one of {', '.join(_DEVICES)}")
        for backend in self.report_to:
            if backend not in _BACKENDS:
                problems.append(
                    f"run.report_to contains {backend!r}: use any of {', '.join(_BACKENDS)} (or none)"
                )
        if self.save_total_limit is not None and self.save_total_limit < 1:
            problems.append(
                f"run.save_total_limit={self.save_total_limit}: use a positive number or None"
            )
        if self.memory_budget_bytes is not None and self.memory_budget_bytes < 0:
            problems.append(
                f"run.memory_budget_bytes={self.memory_budget_bytes}: use bytes >= 0 or None"
            )
        if problems:
            raise ConfigError(problems)


@attrs.frozen(kw_only=True)
class Recipe:
    """A fine-tuning recipe: every knob that defines the trained adapter.

    The defaults follow the guide's QLoRA run, scaled to a safe default
    length; :meth:`guide_lora` and :meth:`guide_qlora` give the guide's two
    settings. Change one field with ``attrs.evolve(recipe, learning_rate=1e-4)``.

    Attributes:
        epochs: Passes over the training split; ignored when ``max_steps`` is set.
        max_steps: Optimizer steps to run (overrides ``epochs``).
        batch_size: Rows per device per micro-batch.
        grad_accum: Micro-batches per optimizer step.
        learning_rate: Peak learning rate.
        warmup: Linear warm-up, as a fraction of all steps when < 1, else a
            number of steps.
        scheduler: Learning-rate schedule after warm-up.
        weight_decay: AdamW weight decay on the LoRA weights.
        max_grad_norm: Gradient clipping norm (0 disables clipping).
        optimizer: ``"auto"`` is bitsandbytes' paged 8-bit AdamW on CUDA and
            ``torch.optim.AdamW`` on CPU, where bitsandbytes' paged optimizers
            cannot run.
        precision: ``"auto"`` is bf16 autocast on CUDA and fp32 on CPU.
        gradient_checkpointing: Recompute activations in backward
            (non-reentrant checkpointing) to save memory.
        layout: Corpus layout: ``"packed"`` (documents concatenated, rows carry
            ``position_ids``) or ``"padded"`` (one chunk per row).
        router_aux_loss_coef: Weight of Mixtral's load-balancing loss added to
            the LM loss (0 switches it off); Mixtral was trained with 0.02.
        eval_steps: Evaluate on the validation split every this many steps.
        save_steps: Write a checkpoint every this many steps.
        logging_steps: Record the training loss every this many steps.
        eval_rows: Evaluate on at most this many rows per split (``None``: all).
        seed: Seed of data order, dropout and adapter initialisation.
        run: Run-time settings (output folder, device, logging).
    """

    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 1
    grad_accum: int = 4
    learning_rate: float = 2e-4
    warmup: float = 0.03
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    optimizer: Literal["auto", "paged_adamw_8bit", "adamw_torch"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    gradient_checkpointing: bool = True
    layout: Literal["padded", "packed"] = "packed"
    router_aux_loss_coef: float = 0.02
    eval_steps: int = 50
    save_steps: int = 50
    logging_steps: int = 10
    eval_rows: int | None = None
    seed: int = 0
    run: RunSettings = attrs.field(factory=RunSettings)

    def __attrs_post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ConfigError(problems)

    def _problems(self) -> list[str]:
        p: list[str] = []

        def positive_int(name: str, value: object) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                p.append(f"{name}={value!r}: use a whole number >= 1")

        def finite(name: str, value: object, *, lo: float, strict: bool = False) -> bool:
            if isinstance(value, bool) or not isinstance(value, int | float):
                p.append(f"{name}={value!r}: use a number")
                return False
            bad = not math.isfinite(value) or (value <= lo if strict else value < lo)
            if bad:
                p.append(f"{name}={value!r}: use a finite number {'>' if strict else '>='} {lo}")
                return False
            return True

        finite("epochs", self.epochs, lo=0.0, strict=True)
        if self.max_steps is not None:
            positive_int("max_steps", self.max_steps)
        for name in ("batch_size", "grad_accum", "eval_steps", "save_steps", "logging_steps"):
            positive_int(name, getattr(self, name))
        if self.eval_rows is not None:
            positive_int("eval_rows", self.eval_rows)
        if finite("learning_rate", self.learning_rate, lo=0.0, strict=True) and (
            self.learning_rate > 1.0
        ):
            p.append(f"learning_rate={self.learning_rate}: above 1 is surely a typo (try 2e-4)")
        if (
            finite("warmup", self.warmup, lo=0.0)
            and self.warmup >= 1
            and self.warmup != int(self.warmup)
        ):
            p.append(f"warmup={self.warmup}: use a fraction in [0, 1) or a whole number of steps")
        finite("weight_decay", self.weight_decay, lo=0.0)
        finite("max_grad_norm", self.max_grad_norm, lo=0.0)
        finite("router_aux_loss_coef", self.router_aux_loss_coef, lo=0.0)
        # Typed fields can still receive anything at runtime; check as objects.
        seed: object = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            p.append(f"seed={seed!r}: use a whole number >= 0")
        for name, value, allowed in (
            ("scheduler", self.scheduler, _SCHEDULERS),
            ("optimizer", self.optimizer, _OPTIMIZERS),
            ("precision", self.precision, _PRECISIONS),
            ("layout", self.layout, _LAYOUTS),
        ):
            if value not in allowed:
                p.append(f"{name}={value!r}: use one of {', '.join(allowed)}")
        checkpointing: object = self.gradient_checkpointing
        if not isinstance(checkpointing, bool):
            p.append(f"gradient_checkpointing={checkpointing!r}: use True or False")
        run: object = self.run
        if not isinstance(run, RunSettings):
            p.append(f"run={run!r}: use a mixtune.recipe.RunSettings")
        return p

    # -- named constructors ---------------------------------------------------------------

    @classmethod
    def guide_lora(cls, **overrides: Any) -> Recipe:
        """The guide's LoRA setting: bf16 base weights, a moderate learning rate.

        Args:
            **overrides: Any :class:`Recipe` field to change.

        Returns:
            The recipe.

        Raises:
            ConfigError: If an override is invalid.
        """
        base: dict[str, Any] = {
            "batch_size": 2,
            "grad_accum": 4,
            "learning_rate": 2.5e-5,
            "warmup": 5,
            "scheduler": "linear",
            "max_grad_norm": 1.0,
            "eval_steps": 25,
            "save_steps": 25,
            "logging_steps": 25,
        }
        return cls(**{**base, **overrides})

    @classmethod
    def guide_qlora(cls, **overrides: Any) -> Recipe:
        """The guide's QLoRA setting: 4-bit base, paged 8-bit AdamW, checkpointing.

        Args:
            **overrides: Any :class:`Recipe` field to change.

        Returns:
            The recipe.

        Raises:
            ConfigError: If an override is invalid.
        """
        base: dict[str, Any] = {
            "batch_size": 2,
            "grad_accum": 4,
            "learning_rate": 2e-4,
            "warmup": 0.03,
            "scheduler": "cosine",
            "max_grad_norm": 0.3,
            "gradient_checkpointing": True,
            "eval_steps": 25,
            "save_steps": 25,
            "logging_steps": 25,
        }
        return cls(**{**base, **overrides})

    def fit(
        self,
        model: Any,
        corpus: Any,
        adapter: Any = None,
        *,
        resume: bool = False,
    ) -> FitResult:
        """Train LoRA weights on ``corpus``; see :func:`mixtune.recipe.fit`.

        Args:
            model: A ``LoadedModel`` (then ``adapter`` is applied first) or an
                ``AdaptedModel``.
            corpus: A ``ChunkedCorpus`` with train/validation/test splits.
            adapter: The ``AdapterSpec`` to apply to a ``LoadedModel``.
            resume: Continue from the last complete checkpoint in
                ``run.output_dir``.

        Returns:
            The :class:`FitResult`.

        Raises:
            ConfigError: If the recipe cannot run on this device or input.
            PreflightError: If the run would not fit in memory.
            NonFiniteLossError: If the loss became NaN or infinite.
            CheckpointError: If checkpoints exist and ``resume`` is False.
        """
        from mixtune.recipe._fit import fit

        return fit(self, model, corpus, adapter, resume=resume)
