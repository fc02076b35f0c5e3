"""Fast paths, each beside the reference it is tested against."""

from __future__ import annotations

from mixtune.kernels._moe import (
    ExpertLoraFactors,
    RoutingPlan,
    grouped_mm,
    grouped_mm_reference,
    moe_grouped_forward,
    routing_plan,
)

__all__ = [
    "ExpertLoraFactors",
    "RoutingPlan",
    "grouped_mm",
    "grouped_mm_reference",
    "moe_grouped_forward",
    "routing_plan",
]
