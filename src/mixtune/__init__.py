"""mixtune: typed, composable fine-tuning primitives for Mixtral-style MoE models.

The pipeline, one import each::

    load_quantized -> ChunkedCorpus -> AdapterSpec.lora/qlora -> Recipe.fit -> publish
"""

from __future__ import annotations

from mixtune.corpus import (
    ChunkedCorpus,
    CorpusDescription,
    CorpusSpec,
    Document,
    Provenance,
)
from mixtune.errors import (
    AdapterError,
    CheckpointError,
    ConfigError,
    CorpusError,
    DocumentError,
    MixtuneError,
    ModelLoadError,
    NonFiniteLossError,
    OfflineError,
    PreflightError,
    PublishError,
    QuantizationUnavailableError,
    SplitError,
    TargetNotFoundError,
    TokenizerError,
    TrainingError,
    UnsupportedModelError,
)
from mixtune.tokenizers import mixtral_v1

__version__ = "0.1.0.dev0"

__all__ = [
    "AdapterError",
    "CheckpointError",
    "ChunkedCorpus",
    "ConfigError",
    "CorpusDescription",
    "CorpusError",
    "CorpusSpec",
    "Document",
    "DocumentError",
    "MixtuneError",
    "ModelLoadError",
    "NonFiniteLossError",
    "OfflineError",
    "PreflightError",
    "Provenance",
    "PublishError",
    "QuantizationUnavailableError",
    "SplitError",
    "TargetNotFoundError",
    "TokenizerError",
    "TrainingError",
    "UnsupportedModelError",
    "__version__",
    "mixtral_v1",
]
