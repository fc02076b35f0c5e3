"""Loading Mixtral-style models with 4-bit attention **and** experts.

The pieces: :class:`QuantSpec` (how base weights are stored),
:class:`MoEExperts` and :class:`QuantLinear` (mixtune's quantized modules).
"""

from __future__ import annotations

from mixtune.model._experts import ExpertKind, MoEExperts
from mixtune.model._linear import QuantEmbedding, QuantLinear
from mixtune.model._quant import Packed4bit, QuantSpec, dequant_linear

__all__ = [
    "ExpertKind",
    "MoEExperts",
    "Packed4bit",
    "QuantEmbedding",
    "QuantLinear",
    "QuantSpec",
    "dequant_linear",
]
