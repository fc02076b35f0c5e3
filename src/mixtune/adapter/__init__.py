"""LoRA adapters for Mixtral-style MoE models (and dense Mistral/Llama models).

Describe an adapter with :class:`AdapterSpec` (``AdapterSpec.lora(...)`` or
``AdapterSpec.qlora(...)``), apply it to a loaded model with
:meth:`AdapterSpec.apply`, and get an :class:`AdaptedModel` whose only
trainable parameters are the LoRA factors.  Experts get per-expert low-rank
pairs (:class:`LoraExperts`); the adapter exports to PEFT's format
(:meth:`AdaptedModel.save_peft`) and to merged full weights
(:meth:`AdaptedModel.merged_state_dict`).
"""

from __future__ import annotations

from mixtune.adapter._apply import AdaptedModel, SupportsModel
from mixtune.adapter._coverage import CoverageEntry, CoverageReport
from mixtune.adapter._lora import (
    ExpertFactors,
    ExpertsLike,
    LoraExperts,
    LoraLinear,
    LoraRouter,
    StockExperts,
    is_experts_like,
)
from mixtune.adapter._spec import PRESETS, TARGET_NAMES, AdapterSpec

__all__ = [
    "PRESETS",
    "TARGET_NAMES",
    "AdaptedModel",
    "AdapterSpec",
    "CoverageEntry",
    "CoverageReport",
    "ExpertFactors",
    "ExpertsLike",
    "LoraExperts",
    "LoraLinear",
    "LoraRouter",
    "StockExperts",
    "SupportsModel",
    "is_experts_like",
]
