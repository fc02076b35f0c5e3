"""The mixtune exception hierarchy.

Every error mixtune raises on purpose derives from :class:`MixtuneError` and
also from the built-in exception a caller would naturally catch for that kind
of mistake, so ``except ValueError`` keeps working for code that does not know
about mixtune.  Messages name the offending field or file and say how to fix
it.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "AdapterError",
    "CheckpointError",
    "ConfigError",
    "CorpusError",
    "DocumentError",
    "MixtuneError",
    "ModelLoadError",
    "NonFiniteLossError",
    "OfflineError",
    "PreflightError",
    "PublishError",
    "QuantizationUnavailableError",
    "SplitError",
    "TargetNotFoundError",
    "TokenizerError",
    "TrainingError",
    "UnsupportedModelError",
]


class MixtuneError(Exception):
    """Base class of every error mixtune raises deliberately."""


class ConfigError(MixtuneError, ValueError):
    """A spec was given a value it cannot hold.

    ``problems`` lists every problem found, so one error reports them all.
    """

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems: tuple[str, ...] = (
            (problems,) if isinstance(problems, str) else tuple(problems)
        )
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            msg = f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg)


class TokenizerError(MixtuneError, ValueError):
    """A tokenizer could not be built or is unfit for the task."""


class CorpusError(MixtuneError, ValueError):
    """The corpus input (folder, documents, dataset) is unusable."""


class DocumentError(CorpusError):
    """One document could not be read; ``path`` names it."""

    def __init__(self, message: str, *, path: str) -> None:
        self.path = path
        super().__init__(message)


class SplitError(CorpusError):
    """The documents cannot be split as asked (e.g. a split would be empty)."""


class OfflineError(MixtuneError, ConnectionError):
    """Something had to be fetched from the network and could not be."""


class ModelLoadError(MixtuneError, OSError):
    """A checkpoint could not be read (missing files, wrong layout)."""


class UnsupportedModelError(MixtuneError, TypeError):
    """The model's architecture is not one mixtune can handle for this request."""


class QuantizationUnavailableError(MixtuneError, RuntimeError):
    """4-bit quantization was requested where bitsandbytes cannot run."""


class AdapterError(MixtuneError, ValueError):
    """An adapter cannot be applied, saved or loaded as asked."""


class TargetNotFoundError(AdapterError, LookupError):
    """An adapter target matched no module or parameter of the model."""


class TrainingError(MixtuneError, RuntimeError):
    """Training could not start or could not go on."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; ``step`` names the optimizer step."""

    def __init__(self, message: str, *, step: int) -> None:
        self.step = step
        super().__init__(message)


class PreflightError(TrainingError, MemoryError):
    """The run would not fit in the device's memory; raised before step one."""


class CheckpointError(TrainingError):
    """A checkpoint is missing, incomplete or belongs to another run."""


class PublishError(MixtuneError, OSError):
    """The trained adapter could not be written or uploaded."""
