"""A minimal safetensors reader that copies bytes instead of mapping the file.

``safetensors.safe_open`` memory-maps the file, so every tensor read stays in
the process's resident set as file-backed pages: loading a 90 GB checkpoint
shows ~90 GB of RSS even though mixtune keeps only the 4-bit result. Reading
with ``readinto`` into a fresh buffer keeps the host footprint at one tensor
(or one expert slice) at a time. The format is a little-endian u64 header
length, a JSON header (``{name: {dtype, shape, data_offsets}}``) and the raw
bytes.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import torch

from mixtune.errors import ModelLoadError

__all__ = ["SafetensorsReader"]

_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# A header larger than this is not a safetensors file (the format caps it at 100 MB).
_MAX_HEADER = 100 * 2**20


class SafetensorsReader:
    """Read tensors (or slices along their first dimension) from one file.

    Args:
        path: The ``.safetensors`` file.

    Raises:
        ModelLoadError: If the file is missing, truncated or not safetensors.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file: io.BufferedReader = path.open("rb")
        except OSError as exc:
            raise ModelLoadError(f"cannot open {path}: {exc}") from exc
        try:
            self._entries, self._data_start = self._parse_header()
        except ModelLoadError:
            self._file.close()
            raise

    def _bad(self, why: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path} is not a readable safetensors file: {why}")

    def _parse_header(self) -> tuple[dict[str, dict[str, Any]], int]:
        raw = self._file.read(8)
        if len(raw) != 8:
            raise self._bad("shorter than its 8-byte header length")
        (size,) = struct.unpack("<Q", raw)
        if size > _MAX_HEADER:
            raise self._bad(f"header length {size} is implausible")
        header_bytes = self._file.read(size)
        try:
            header = json.loads(header_bytes)
        except ValueError as exc:
            raise self._bad(f"header is not JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        header.pop("__metadata__", None)
        file_size = self.path.stat().st_size
        data_start = 8 + size
        for name, entry in header.items():
            try:
                dtype = _DTYPES[entry["dtype"]]
                shape = [int(s) for s in entry["shape"]]
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise self._bad(f"entry {name!r} is malformed ({exc})") from exc
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * torch.empty((), dtype=dtype).element_size():
                raise self._bad(f"entry {name!r} has {end - begin} bytes for shape {shape}")
            if data_start + end > file_size:
                raise self._bad(f"entry {name!r} runs past the end of the file (truncated?)")
            entry["_dtype"] = dtype
        return header, data_start

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keys(self) -> list[str]:
        """Tensor names in the file.

        Returns:
            The names.
        """
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor.

        Args:
            name: Tensor name.

        Returns:
            The shape.
        """
        return tuple(int(s) for s in self._entries[name]["shape"])

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """Read a tensor, or its ``index``-th slice along dimension 0.

        Args:
            name: Tensor name.
            index: Row of the first dimension to read alone (None: all).

        Returns:
            A new CPU tensor (not a view of the file).

        Raises:
            ModelLoadError: If the file ends early.
        """
        entry = self._entries[name]
        dtype: torch.dtype = entry["_dtype"]
        shape = [int(s) for s in entry["shape"]]
        begin, end = (int(x) for x in entry["data_offsets"])
        if index is not None:
            row = (end - begin) // shape[0]
            begin, end = begin + index * row, begin + (index + 1) * row
            shape = shape[1:]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        self._file.seek(self._data_start + begin)
        got = self._file.readinto(buffer.numpy().data)
        if got != end - begin:
            raise self._bad(f"tensor {name!r} is cut short ({got} of {end - begin} bytes)")
        return buffer.view(dtype).reshape(shape)
