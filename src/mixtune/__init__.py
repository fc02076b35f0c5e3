"""mixtune: typed, composable fine-tuning primitives for Mixtral-style MoE models.

The pipeline, one import each::

    load_quantized -> ChunkedCorpus -> AdapterSpec.lora/qlora -> Recipe.fit -> publish

Each stage lives in its own subpackage (:mod:`mixtune.corpus`,
:mod:`mixtune.model`, :mod:`mixtune.adapter`, :mod:`mixtune.recipe`,
:mod:`mixtune.publish`); the names most users need are re-exported here.
"""

from __future__ import annotations

from mixtune.adapter import AdaptedModel, AdapterSpec, CoverageReport
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
from mixtune.model import (
    Census,
    LoadedModel,
    QuantSpec,
    load_quantized,
    mixtral_8x7b_config,
    random_checkpoint,
    random_quantized,
    tiny_config,
)
from mixtune.publish import PublishResult, publish, spec_from_dict, spec_to_dict
from mixtune.recipe import FitResult, MemoryEstimate, Recipe, RunSettings, local_device
from mixtune.tokenizers import mixtral_v1

__version__ = "0.1.0.dev0"

__all__ = [
    "AdaptedModel",
    "AdapterError",
    "AdapterSpec",
    "Census",
    "CheckpointError",
    "ChunkedCorpus",
    "ConfigError",
    "CorpusDescription",
    "CorpusError",
    "CorpusSpec",
    "CoverageReport",
    "Document",
    "DocumentError",
    "FitResult",
    "LoadedModel",
    "MemoryEstimate",
    "MixtuneError",
    "ModelLoadError",
    "NonFiniteLossError",
    "OfflineError",
    "PreflightError",
    "Provenance",
    "PublishError",
    "PublishResult",
    "QuantSpec",
    "QuantizationUnavailableError",
    "Recipe",
    "RunSettings",
    "SplitError",
    "TargetNotFoundError",
    "TokenizerError",
    "TrainingError",
    "UnsupportedModelError",
    "__version__",
    "load_quantized",
    "local_device",
    "mixtral_8x7b_config",
    "mixtral_v1",
    "publish",
    "random_checkpoint",
    "random_quantized",
    "spec_from_dict",
    "spec_to_dict",
    "tiny_config",
]
