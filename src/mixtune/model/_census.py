"""Where a model's bytes are: by storage (4-bit, bf16, fp32, ...) and module kind."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Literal

import attrs
import torch
from torch import nn

from mixtune.model._quant import Packed4bit

__all__ = ["Census", "CensusEntry", "census"]

ModuleKind = Literal[
    "embeddings",
    "attention",
    "router",
    "experts",
    "mlp",
    "norms",
    "lm_head",
    "lora",
    "rotary",
    "other",
]
KINDS: tuple[str, ...] = (
    "embeddings",
    "attention",
    "router",
    "experts",
    "mlp",
    "norms",
    "lm_head",
    "lora",
    "rotary",
    "other",
)
FOUR_BIT = "4-bit"

_DTYPE_NAMES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}
_ROUTER = re.compile(r"(^|\.)(mlp|block_sparse_moe)\.gate\.")
_EXPERTS = re.compile(r"(^|\.)(mlp|block_sparse_moe)\.experts\.")


def module_kind(name: str) -> str:
    """Classify a parameter or buffer by its qualified name.

    Args:
        name: e.g. ``"model.layers.0.self_attn.q_proj.packed.data"``.

    Returns:
        One of ``KINDS``.
    """
    if "lora_" in name:
        return "lora"
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head.") or ".lm_head." in name:
        return "lm_head"
    if "rotary_emb" in name:
        return "rotary"
    if ".self_attn." in name:
        return "attention"
    if _EXPERTS.search(name):
        return "experts"
    if _ROUTER.search(name):
        return "router"
    parts = name.split(".")
    owner = parts[-2] if len(parts) > 1 else parts[0]
    if "norm" in owner:
        return "norms"
    if ".mlp." in name:
        return "mlp"
    return "other"


def _storage(t: torch.Tensor) -> str:
    return _DTYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch."))


@attrs.frozen
class CensusEntry:
    """Bytes of one (module kind, storage) pair.

    Attributes:
        kind: Module kind (``"experts"``, ``"attention"``, ...).
        storage: ``"4-bit"`` or a dtype name (``"bf16"``, ``"fp32"``, ...).
        tensors: Number of tensors counted.
        weights: Number of weights they represent (for 4-bit: unpacked count).
        bytes: Bytes held, quantization state included.
        overhead_bytes: Part of ``bytes`` that is quantization state (scales,
            code books), zero for plain tensors.
    """

    kind: str
    storage: str
    tensors: int
    weights: int
    bytes: int
    overhead_bytes: int = 0


_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def _unit(total: int) -> tuple[str, int]:
    for name, size in _UNITS:
        if total >= size:
            return name, size
    return "KiB", 2**10


@attrs.frozen
class Census:
    """Byte counts of a model's parameters and buffers.

    Attributes:
        entries: One entry per (kind, storage) pair present.
    """

    entries: tuple[CensusEntry, ...]

    @property
    def total_bytes(self) -> int:
        """All bytes counted."""
        return sum(e.bytes for e in self.entries)

    def bytes(self, *, kind: str | None = None, storage: str | None = None) -> int:
        """Bytes matching a kind and/or a storage.

        Args:
            kind: Module kind to keep (None: all).
            storage: Storage to keep (None: all).

        Returns:
            The sum.
        """
        return sum(
            e.bytes
            for e in self.entries
            if (kind is None or e.kind == kind) and (storage is None or e.storage == storage)
        )

    def by_kind(self) -> dict[str, int]:
        """Bytes per module kind.

        Returns:
            ``{kind: bytes}`` in a fixed kind order.
        """
        out: dict[str, int] = {}
        for e in sorted(self.entries, key=lambda e: KINDS.index(e.kind)):
            out[e.kind] = out.get(e.kind, 0) + e.bytes
        return out

    def by_storage(self) -> dict[str, int]:
        """Bytes per storage.

        Returns:
            ``{storage: bytes}``.
        """
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.storage] = out.get(e.storage, 0) + e.bytes
        return out

    def high_precision_bytes(self, kinds: tuple[str, ...]) -> dict[str, int]:
        """Non-4-bit bytes of the given kinds (those with any).

        Args:
            kinds: Module kinds to check.

        Returns:
            ``{kind: bytes}`` for kinds holding plain tensors.
        """
        out: dict[str, int] = {}
        for e in self.entries:
            if e.kind in kinds and e.storage != FOUR_BIT and e.bytes:
                out[e.kind] = out.get(e.kind, 0) + e.bytes
        return out

    def table(self) -> str:
        """A plain-text table of kinds × storages, with totals (unit fits the total).

        Returns:
            The table.
        """
        unit, scale = _unit(self.total_bytes)

        def fmt(n: int) -> str:
            return f"{n / scale:.3f}"

        storages = sorted(self.by_storage(), key=lambda s: (s != FOUR_BIT, s))
        kinds = list(self.by_kind())
        header = ["kind", *storages, "total"]
        rows = [header]
        for kind in kinds:
            row = [kind]
            for s in storages:
                n = self.bytes(kind=kind, storage=s)
                row.append(fmt(n) if n else "-")
            row.append(fmt(self.bytes(kind=kind)))
            rows.append(row)
        rows.append(
            ["total", *(fmt(self.bytes(storage=s)) for s in storages), fmt(self.total_bytes)]
        )
        overhead = sum(e.overhead_bytes for e in self.entries)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        lines.append(f"({unit}; 4-bit includes {fmt(overhead)} {unit} of quantization state)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def census(model: nn.Module) -> Census:
    """Count a model's parameter and buffer bytes by module kind and storage.

    Tensors inside :class:`~mixtune.model.Packed4bit` storage count as
    ``"4-bit"`` (packed weights plus their scales); every other tensor counts
    under its dtype. Shared tensors are counted once.

    Args:
        model: Any module (usually ``LoadedModel.model``).

    Returns:
        The census.
    """
    four_bit: dict[int, tuple[bool, int]] = {}
    for module in model.modules():
        if isinstance(module, Packed4bit):
            # Buffers, or frozen parameters once made shardable for FSDP2.
            own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            for bname, buf in own:
                # The packed data holds the weights (two per byte); the rest is quantization state.
                is_data = bname == "data"
                four_bit[id(buf)] = (is_data, module.count * module.numel if is_data else 0)
    acc: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    seen: set[int] = set()
    named = [*model.named_parameters(), *model.named_buffers()]
    for name, t in named:
        if id(t) in seen:
            continue
        seen.add(id(t))
        size = t.numel() * t.element_size()
        if id(t) in four_bit:
            is_data, weights = four_bit[id(t)]
            key = (module_kind(name), FOUR_BIT)
            overhead = 0 if is_data else size
        else:
            key = (module_kind(name), _storage(t))
            weights = t.numel()
            overhead = 0
        slot = acc[key]
        slot[0] += 1
        slot[1] += weights
        slot[2] += size
        slot[3] += overhead
    entries = [
        CensusEntry(kind, storage, n, w, b, o) for (kind, storage), (n, w, b, o) in acc.items()
    ]
    entries.sort(key=lambda e: (KINDS.index(e.kind), e.storage))
    return Census(tuple(entries))
