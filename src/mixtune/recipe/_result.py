"""What a fit returns: losses, perplexities, routing load, checkpoints, speed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs

__all__ = ["FitResult", "LossPoint", "MemoryEstimate"]


@attrs.frozen
class LossPoint:
    """One point of a loss curve.

    Attributes:
        step: Optimizer step the loss belongs to.
        loss: Mean token cross-entropy (nats).
    """

    step: int
    loss: float


@attrs.frozen(kw_only=True)
class MemoryEstimate:
    """The pre-flight estimate of what a run needs beyond what is already resident.

    All sizes in bytes.

    Attributes:
        weights: Model weights by storage (4-bit experts count as packed bytes).
        weights_resident: Whether the weights already sit on the target device
            (then the free memory already excludes them).
        trainable: LoRA weights, their gradients and optimizer states.
        activations: Saved activations for one micro-batch.
        logits: fp32 logits and their gradient of one loss chunk
            (at most 1,024 tokens × V; the loss never holds the whole batch's).
        available: Free memory of the device (or the injected budget).
        device: ``"cpu"`` or ``"cuda"``.
    """

    weights: int
    weights_resident: bool
    trainable: int
    activations: int
    logits: int
    available: int
    device: str

    @property
    def needed(self) -> int:
        """Bytes the run still has to allocate, with a 10 % margin for fragmentation."""
        extra = self.trainable + self.activations + self.logits
        if not self.weights_resident:
            extra += self.weights
        return int(extra * 1.1)

    @property
    def fits(self) -> bool:
        """Whether :attr:`needed` fits in :attr:`available`."""
        return self.needed <= self.available

    def table(self) -> str:
        """A small human-readable breakdown.

        Returns:
            One line per component, in GiB.
        """

        def gib(n: int) -> str:
            return f"{n / 2**30:8.3f} GiB"

        resident = " (already loaded)" if self.weights_resident else ""
        return "\n".join(
            [
                f"  weights          {gib(self.weights)}{resident}",
                f"  LoRA+grads+optim {gib(self.trainable)}",
                f"  activations      {gib(self.activations)}",
                f"  logits (fp32)    {gib(self.logits)}",
                f"  needed (+10 %)   {gib(self.needed)}",
                f"  free on {self.device:<8} {gib(self.available)}",
            ]
        )


@attrs.frozen(kw_only=True)
class FitResult:
    """The outcome of :meth:`Recipe.fit`.

    Attributes:
        recipe: The recipe that ran.
        model: The trained ``AdaptedModel`` (LoRA weights in place). After a
            run with ``RunSettings(sharding="fsdp2")`` on several processes
            it stays sharded: its factors are ``DTensor`` shards, whole ones
            come from :func:`~mixtune.recipe.full_lora_state_dict` (called
            on every rank).
        corpus: The corpus trained on.
        train_loss: Training loss every ``logging_steps``.
        eval_loss: Validation loss every ``eval_steps`` and at the end.
        test_loss_before: Test-split loss before training.
        test_loss_after: Test-split loss after training.
        routing_load: Per layer, the fraction of routed token slots each
            expert received on the test split after training (each layer sums to 1).
        routing_load_before: The same before training.
        checkpoints: Complete checkpoints written, oldest first.
        resumed_from: The checkpoint this run continued from, if any.
        steps: Optimizer steps done in total.
        tokens: Tokens trained on in this call (by all processes under DDP).
        wall_time_s: Seconds spent in this call's training loop.
        peak_memory_bytes: Peak device memory (CUDA allocator peak, or the
            process's peak RSS on CPU); under DDP the largest over the processes.
        memory: The pre-flight estimate.
    """

    recipe: Any
    model: Any = attrs.field(eq=False, repr=False)
    corpus: Any = attrs.field(eq=False, repr=False)
    train_loss: tuple[LossPoint, ...]
    eval_loss: tuple[LossPoint, ...]
    test_loss_before: float
    test_loss_after: float
    routing_load: tuple[tuple[float, ...], ...]
    routing_load_before: tuple[tuple[float, ...], ...]
    checkpoints: tuple[Path, ...]
    resumed_from: Path | None
    steps: int
    tokens: int
    wall_time_s: float
    peak_memory_bytes: int
    memory: MemoryEstimate

    @property
    def perplexity_before(self) -> float:
        """Test-split perplexity before training."""
        return math.exp(self.test_loss_before)

    @property
    def perplexity_after(self) -> float:
        """Test-split perplexity after training."""
        return math.exp(self.test_loss_after)

    @property
    def tokens_per_s(self) -> float:
        """Training throughput of this call (tokens per second of wall time)."""
        return self.tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def summary(self) -> str:
        """A short human-readable report.

        Returns:
            Three lines with speed and memory, perplexities, and checkpoints.
        """
        last_eval = f"{self.eval_loss[-1].loss:.4f}" if self.eval_loss else "n/a"
        return "\n".join(
            [
                f"steps {self.steps}, tokens {self.tokens}, {self.wall_time_s:.1f} s, "
                f"{self.tokens_per_s:.0f} tokens/s, peak memory {self.peak_memory_bytes / 2**20:.0f} MiB",
                f"test perplexity {self.perplexity_before:.2f} -> {self.perplexity_after:.2f}; "
                f"last validation loss {last_eval}",
                f"checkpoints: {len(self.checkpoints)}"
                + (f" (last {self.checkpoints[-1]})" if self.checkpoints else ""),
            ]
        )
