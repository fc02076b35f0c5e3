"""Spec JSON: from_dict(to_dict(x)) == x through real JSON text, and refusals."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hypothesis import given, settings

from mixtune.errors import ConfigError
from mixtune.publish import spec_from_dict, spec_to_dict
from mixtune.recipe import Recipe, RunSettings
from tests.strategies import adapter_specs, recipes, spec_quant_specs


def _round_trip(spec: Any) -> Any:
    # Through JSON text with allow_nan=False: the file must be standard JSON.
    return spec_from_dict(json.loads(json.dumps(spec_to_dict(spec), allow_nan=False)))


@settings(max_examples=60, deadline=None)
@given(recipes())
def test_recipe_round_trip(recipe: Any) -> None:
    back = _round_trip(recipe)
    assert back == recipe
    assert type(back.run.output_dir) is type(recipe.run.output_dir)


@settings(max_examples=60, deadline=None)
@given(spec_quant_specs())
def test_quant_spec_round_trip(spec: Any) -> None:
    back = _round_trip(spec)
    assert back == spec
    assert isinstance(back.compute_dtype, torch.dtype)


@settings(max_examples=60, deadline=None)
@given(adapter_specs())
def test_adapter_spec_round_trip(spec: Any) -> None:
    assert _round_trip(spec) == spec


def test_run_time_callbacks_are_not_written() -> None:
    recipe = Recipe(run=RunSettings(callbacks=(object(),)))
    data = spec_to_dict(recipe)
    assert "callbacks" not in json.dumps(data)
    assert _round_trip(recipe).run.callbacks == ()


def test_newer_schema_is_refused() -> None:
    data = spec_to_dict(Recipe())
    data["schema_version"] = 99
    with pytest.raises(ConfigError, match="schema_version=99"):
        spec_from_dict(data)


def test_only_mixtune_types_are_instantiated() -> None:
    data = {"schema_version": 1, "spec": {"__attrs__": "os:system", "fields": {}}}
    with pytest.raises(ConfigError, match="only mixtune types"):
        spec_from_dict(data)


def test_invalid_values_fail_validation_on_read() -> None:
    data = spec_to_dict(Recipe())
    data["spec"]["fields"]["batch_size"] = 0
    with pytest.raises(ConfigError, match="batch_size"):
        spec_from_dict(data)
