"""Fast paths, each beside the reference it is tested against."""

from __future__ import annotations

from mixtune.kernels._loss import causal_lm_loss_reference, chunked_causal_lm_loss
from mixtune.kernels._moe import (
    ExpertLoraFactors,
    ExpertStack,
    RoutingPlan,
    experts_per_chunk,
    grouped_mm,
    grouped_mm_reference,
    grouped_path_available,
    grouped_wgrad,
    moe_grouped_forward,
    routing_plan,
)

__all__ = [
    "ExpertLoraFactors",
    "ExpertStack",
    "RoutingPlan",
    "causal_lm_loss_reference",
    "chunked_causal_lm_loss",
    "experts_per_chunk",
    "grouped_mm",
    "grouped_mm_reference",
    "grouped_path_available",
    "grouped_wgrad",
    "moe_grouped_forward",
    "routing_plan",
]
