from __future__ import annotations

import pytest

import mixtune
from mixtune import errors


@pytest.mark.parametrize("name", errors.__all__)
def test_every_error_is_a_mixtune_error_and_exported(name: str) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, mixtune.MixtuneError)
    assert getattr(mixtune, name) is cls


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.ConfigError, ValueError),
        (errors.CorpusError, ValueError),
        (errors.DocumentError, ValueError),
        (errors.TargetNotFoundError, LookupError),
        (errors.OfflineError, ConnectionError),
        (errors.ModelLoadError, OSError),
        (errors.UnsupportedModelError, TypeError),
        (errors.PreflightError, MemoryError),
        (errors.NonFiniteLossError, RuntimeError),
    ],
)
def test_errors_are_catchable_as_the_matching_builtin(cls: type, builtin: type) -> None:
    assert issubclass(cls, builtin)


def test_config_error_reports_every_problem_at_once() -> None:
    err = errors.ConfigError(["r must be > 0 (got 0)", "alpha must be > 0 (got -1)"])
    assert err.problems == ("r must be > 0 (got 0)", "alpha must be > 0 (got -1)")
    assert "2 problems" in str(err)
    assert "r must be > 0" in str(err)
    assert "alpha must be > 0" in str(err)


def test_top_level_api_exports_the_pipeline() -> None:
    for name in mixtune.__all__:
        assert hasattr(mixtune, name), name
    # The five stages are reachable from the top level.
    for name in ("ChunkedCorpus", "load_quantized", "AdapterSpec", "Recipe", "publish"):
        assert name in mixtune.__all__
