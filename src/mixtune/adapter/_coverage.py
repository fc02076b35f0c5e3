"""The coverage report: which modules and experts an adapter reaches."""

from __future__ import annotations

from typing import Literal

import attrs

__all__ = ["CoverageEntry", "CoverageReport"]


@attrs.frozen
class CoverageEntry:
    """One targeted module, or one expert's projection, and its LoRA shapes.

    Attributes:
        target: The canonical target name that matched it.
        module: Module path from the causal LM (for experts, with the
            projection: ``model.layers.0.mlp.experts.gate_proj``).
        kind: ``"linear"``, ``"expert"`` or ``"router"``.
        layer: Decoder layer index, None for ``lm_head``.
        expert: Expert index for expert rows, else None.
        base_shape: ``(out, in)`` of the frozen weight.
        lora_A_shape: ``(r, in)``, None when not adapted.
        lora_B_shape: ``(out, r)``, None when not adapted.
        quantized: Whether the frozen weight is 4-bit.
        adapted: Whether it carries LoRA (False when ``layers`` excludes it).
    """

    target: str
    module: str
    kind: Literal["linear", "expert", "router"]
    layer: int | None
    expert: int | None
    base_shape: tuple[int, ...]
    lora_A_shape: tuple[int, ...] | None
    lora_B_shape: tuple[int, ...] | None
    quantized: bool
    adapted: bool


def _fmt(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else "×".join(str(d) for d in shape)


@attrs.frozen
class CoverageReport:
    """Every module/expert an adapter's targets matched, adapted or not.

    ``str(report)`` is a table, one row per module (per expert for experts).

    Attributes:
        entries: The rows, in layer order.
    """

    entries: tuple[CoverageEntry, ...]

    @property
    def adapted(self) -> tuple[CoverageEntry, ...]:
        """The rows that carry LoRA."""
        return tuple(e for e in self.entries if e.adapted)

    @property
    def lora_parameters(self) -> int:
        """Number of LoRA parameters over the adapted rows."""
        total = 0
        for e in self.adapted:
            for shape in (e.lora_A_shape, e.lora_B_shape):
                if shape is not None:
                    n = 1
                    for d in shape:
                        n *= d
                    total += n
        return total

    def by_target(self) -> dict[str, int]:
        """How many adapted rows each target has.

        Returns:
            Target name → count.
        """
        counts: dict[str, int] = {}
        for e in self.adapted:
            counts[e.target] = counts.get(e.target, 0) + 1
        return counts

    def table(self) -> str:
        """The report as an aligned text table.

        Returns:
            Header, one line per row, and a summary line.
        """
        header = ("module", "expert", "target", "kind", "base", "lora_A", "lora_B", "4bit", "lora")
        rows = [
            (
                e.module,
                "-" if e.expert is None else str(e.expert),
                e.target,
                e.kind,
                _fmt(e.base_shape),
                _fmt(e.lora_A_shape),
                _fmt(e.lora_B_shape),
                "yes" if e.quantized else "no",
                "yes" if e.adapted else "no",
            )
            for e in self.entries
        ]
        widths = [max(len(r[c]) for r in (header, *rows)) for c in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in (header, *rows)
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"{len(self.adapted)} of {len(self.entries)} rows adapted, "
            f"{self.lora_parameters:,} LoRA parameters"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
