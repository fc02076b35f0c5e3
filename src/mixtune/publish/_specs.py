"""Schema-versioned JSON for mixtune's specs (Recipe, AdapterSpec, QuantSpec, ...).

Generic over attrs classes: each value is written with a small type tag
where JSON has no type of its own (attrs instances, tuples, paths, torch
dtypes, enums, non-finite floats), so ``spec_from_dict(spec_to_dict(x)) == x``
for every spec whose fields are built from those types. Only classes from
the ``mixtune`` package are ever instantiated when reading, so a published
file cannot make the reader import arbitrary code. Fields excluded from
equality (run-time hooks such as ``RunSettings.callbacks``) are not written
and come back with their defaults.
"""

from __future__ import annotations

import enum
import importlib
import math
from pathlib import Path, PurePath
from typing import Any

import attrs
import torch

from mixtune.errors import ConfigError

__all__ = ["SCHEMA_VERSION", "spec_from_dict", "spec_to_dict"]

SCHEMA_VERSION = 1


def _qualname(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve(name: str) -> Any:
    module, _, qual = name.partition(":")
    if not (module == "mixtune" or module.startswith("mixtune.")):
        raise ConfigError(f"spec JSON names the type {name!r}: only mixtune types can be read")
    try:
        obj: Any = importlib.import_module(module)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"spec JSON names the type {name!r}, which this mixtune does not have; "
            "upgrade mixtune to read it"
        ) from exc
    return obj


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        # JSON has no NaN/inf; tag them so the file stays standard JSON.
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, enum.Enum):
        return {"__enum__": _qualname(type(value)), "value": _encode(value.value)}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, PurePath):
        return {"__path__": str(value)}
    if attrs.has(type(value)):
        fields = {
            f.name: _encode(getattr(value, f.name))
            for f in attrs.fields(type(value))
            if f.init and f.eq
        }
        return {"__attrs__": _qualname(type(value)), "fields": fields}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, frozenset):
        return {"__frozenset__": sorted((_encode(v) for v in value), key=repr)}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ConfigError(f"cannot write a dict with non-string keys to spec JSON: {value!r}")
        return {"__dict__": {k: _encode(v) for k, v in value.items()}}
    raise ConfigError(
        f"cannot write a value of type {type(value).__name__} to spec JSON: {value!r}"
    )


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__float__" in value:
        return float(value["__float__"])
    if "__dtype__" in value:
        dtype = getattr(torch, value["__dtype__"], None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"spec JSON names an unknown torch dtype {value['__dtype__']!r}")
        return dtype
    if "__path__" in value:
        return Path(value["__path__"])
    if "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if "__frozenset__" in value:
        return frozenset(_decode(v) for v in value["__frozenset__"])
    if "__dict__" in value:
        return {k: _decode(v) for k, v in value["__dict__"].items()}
    if "__enum__" in value:
        return _resolve(value["__enum__"])(_decode(value["value"]))
    if "__attrs__" in value:
        cls = _resolve(value["__attrs__"])
        if not attrs.has(cls):
            raise ConfigError(f"spec JSON type {value['__attrs__']!r} is not an attrs class")
        fields = {k: _decode(v) for k, v in value["fields"].items()}
        # Private attributes (``_x``) take their init name without the underscore.
        aliases = {f.name: f.alias for f in attrs.fields(cls)}
        return cls(**{aliases.get(k, k): v for k, v in fields.items()})
    raise ConfigError(f"spec JSON holds an untagged object {value!r}")


def spec_to_dict(spec: Any) -> dict[str, Any]:
    """Turn a mixtune spec into JSON-ready data.

    Args:
        spec: An attrs spec (``Recipe``, ``AdapterSpec``, ``QuantSpec``, ...).

    Returns:
        ``{"schema_version": 1, "spec": ...}``, with type tags where needed.

    Raises:
        ConfigError: If a field holds a value that has no JSON form.
    """
    if not attrs.has(type(spec)):
        raise ConfigError(f"spec_to_dict needs an attrs spec, got {type(spec).__name__}")
    return {"schema_version": SCHEMA_VERSION, "spec": _encode(spec)}


def spec_from_dict(data: dict[str, Any]) -> Any:
    """Rebuild a spec from :func:`spec_to_dict`'s output.

    Args:
        data: The parsed JSON.

    Returns:
        The spec, equal to the one written.

    Raises:
        ConfigError: If the schema version is not one this mixtune reads, the
            data names an unknown or non-mixtune type, or the spec's own
            validation fails.
    """
    raw: object = data
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise ConfigError(
            f"spec JSON has schema_version={version!r}; this mixtune reads version "
            f"{SCHEMA_VERSION} (upgrade mixtune for newer files)"
        )
    return _decode(data["spec"])
