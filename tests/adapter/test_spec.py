from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mixtune.adapter import PRESETS, TARGET_NAMES, AdapterSpec
from mixtune.errors import ConfigError
from tests.strategies import adapter_target_lists


def test_lora_defaults_are_the_guides_setting() -> None:
    spec = AdapterSpec.lora()
    assert (spec.r, spec.alpha, spec.dropout) == (8, 16, 0.1)
    assert spec.targets == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "expert_gate",
        "expert_up",
        "expert_down",
    )
    assert spec.requires_4bit is False
    assert spec.scaling == 2.0


def test_qlora_defaults_require_a_4bit_base() -> None:
    spec = AdapterSpec.qlora()
    assert (spec.r, spec.alpha, spec.dropout) == (32, 64, 0.1)
    assert spec.requires_4bit is True
    assert spec.scaling == 2.0


def test_rslora_scales_by_sqrt_r() -> None:
    assert AdapterSpec.lora(r=16, alpha=8, rslora=True).scaling == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("attention", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("experts", ("expert_gate", "expert_up", "expert_down")),
        ("router", ("router",)),
        ("lm_head", ("lm_head",)),
        (
            "all-linear",
            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        ),
        (("w1", "w2", "w3"), ("expert_gate", "expert_up", "expert_down")),
        (("w2",), ("expert_down",)),
        (("gate",), ("router",)),
        (("gate_proj", "q_proj", "q_proj"), ("q_proj", "gate_proj")),
        (
            ("lm_head", "attention", "w1"),
            ("q_proj", "k_proj", "v_proj", "o_proj", "expert_gate", "lm_head"),
        ),
    ],
)
def test_targets_are_normalised_to_canonical_names(
    targets: str | tuple[str, ...], expected: tuple[str, ...]
) -> None:
    assert AdapterSpec.lora(targets=targets).targets == expected


def test_every_preset_expands_to_canonical_names() -> None:
    for names in PRESETS.values():
        assert set(names) <= set(TARGET_NAMES)


@given(adapter_target_lists)
def test_normalisation_is_idempotent_and_canonical(targets: list[str]) -> None:
    spec = AdapterSpec.lora(targets=targets)
    assert set(spec.targets) <= set(TARGET_NAMES)
    assert len(set(spec.targets)) == len(spec.targets)
    assert list(spec.targets) == [t for t in TARGET_NAMES if t in spec.targets]
    assert attrs.evolve(spec, targets=spec.targets) == spec


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        AdapterSpec.lora(r=0, alpha=-1, dropout=1.0, targets=("attention", "w9"))
    problems = info.value.problems
    assert len(problems) == 4
    text = str(info.value)
    assert "r must be an integer > 0" in text
    assert "alpha must be a number > 0" in text
    assert "dropout must be in [0, 1)" in text
    assert "'w9'" in text
    # The message lists what would have been valid.
    assert "attention" in text
    assert "expert_gate" in text


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"r": 0}, "r must be"),
        ({"r": -4}, "r must be"),
        ({"r": 2.5}, "r must be"),
        ({"alpha": 0}, "alpha must be"),
        ({"alpha": -16}, "alpha must be"),
        ({"dropout": -0.1}, "dropout must be"),
        ({"dropout": 1.0}, "dropout must be"),
        ({"dropout": 1.5}, "dropout must be"),
        ({"targets": ("nope",)}, "unknown name"),
        ({"targets": ()}, "targets is empty"),
        ({"layers": (-1,)}, "layers must be"),
        ({"layers": ()}, "layers is empty"),
    ],
)
def test_bad_fields_raise_config_error(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        AdapterSpec.lora(**kwargs)  # type: ignore[arg-type]


def test_evolve_revalidates() -> None:
    spec = AdapterSpec.lora()
    with pytest.raises(ConfigError, match="r must be"):
        attrs.evolve(spec, r=0)


def test_layers_are_sorted_and_deduplicated() -> None:
    assert AdapterSpec.lora(layers=[3, 1, 3]).layers == (1, 3)


@given(st.integers(1, 256), st.floats(0.01, 1024), st.floats(0, 0.99))
def test_valid_numbers_are_accepted(r: int, alpha: float, dropout: float) -> None:
    spec = AdapterSpec.lora(r=r, alpha=alpha, dropout=dropout)
    assert spec.scaling == pytest.approx(alpha / r)
    assert spec.describe()["scaling"] == spec.scaling
