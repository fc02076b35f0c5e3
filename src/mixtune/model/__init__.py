"""Loading Mixtral-style models with 4-bit attention **and** experts.

:func:`load_quantized` streams a checkpoint (either layout, local or from the
Hub) into a transformers model whose experts are :class:`MoEExperts` and whose
linear layers are :class:`QuantLinear`, as :class:`QuantSpec` says;
:func:`census` shows where the bytes went; :func:`random_checkpoint` writes
seeded random checkpoints for tests and benchmarks, and :func:`random_quantized`
builds such a model directly in 4 bits, without a checkpoint.
"""

from __future__ import annotations

from mixtune.model._census import Census, CensusEntry, census
from mixtune.model._experts import ExpertKind, MoEExperts
from mixtune.model._linear import QuantEmbedding, QuantLinear
from mixtune.model._loader import LoadedModel, iter_expert_modules, load_quantized
from mixtune.model._quant import Packed4bit, QuantSpec, dequant_linear
from mixtune.model._random import mixtral_8x7b_config, random_checkpoint, tiny_config
from mixtune.model._random_quantized import random_quantized

__all__ = [
    "Census",
    "CensusEntry",
    "ExpertKind",
    "LoadedModel",
    "MoEExperts",
    "Packed4bit",
    "QuantEmbedding",
    "QuantLinear",
    "QuantSpec",
    "census",
    "dequant_linear",
    "iter_expert_modules",
    "load_quantized",
    "mixtral_8x7b_config",
    "random_checkpoint",
    "random_quantized",
    "tiny_config",
]
