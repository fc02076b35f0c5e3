"""Recipe and RunSettings: defaults, named constructors, validation."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from mixtune.errors import ConfigError
from mixtune.recipe import Recipe, RunSettings


def test_defaults_are_sound() -> None:
    r = Recipe()
    assert r.optimizer == "auto"
    assert r.precision == "auto"
    assert r.gradient_checkpointing is True
    assert r.router_aux_loss_coef == pytest.approx(0.02)
    assert r.run.report_to == ()
    assert r.run.output_dir == Path("mixtune-run")


def test_named_constructors_and_overrides() -> None:
    q = Recipe.guide_qlora(max_steps=30)
    assert q.max_steps == 30
    assert q.gradient_checkpointing is True
    lo = Recipe.guide_lora()
    assert lo.learning_rate == pytest.approx(2.5e-5)
    assert attrs.evolve(q, seed=3).seed == 3
    with pytest.raises(ConfigError):
        Recipe.guide_lora(batch_size=0)


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        Recipe(
            batch_size=0,
            learning_rate=-1.0,
            scheduler="wavy",  # type: ignore[arg-type]
            warmup=2.5,
            max_grad_norm=float("nan"),
            eval_rows=0,
        )
    problems = info.value.problems
    assert len(problems) == 6
    text = "\n".join(problems)
    for field in (
        "batch_size",
        "learning_rate",
        "scheduler",
        "warmup",
        "max_grad_norm",
        "eval_rows",
    ):
        assert field in text


def test_run_settings_validation() -> None:
    with pytest.raises(ConfigError) as info:
        RunSettings(device="tpu", report_to="mlflow", save_total_limit=0)  # type: ignore[arg-type]
    assert len(info.value.problems) == 3
    assert RunSettings(report_to="tensorboard").report_to == ("tensorboard",)


def test_run_settings_do_not_change_equality_of_callbacks() -> None:
    assert RunSettings(callbacks=(object(),)) == RunSettings()


def test_run_settings_sharding() -> None:
    assert RunSettings().sharding == "ddp"
    assert RunSettings(sharding="fsdp2").sharding == "fsdp2"
    with pytest.raises(ConfigError, match=r"run\.sharding='fsdp'"):
        RunSettings(sharding="fsdp")  # type: ignore[arg-type]
