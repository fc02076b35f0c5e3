"""Recipe.fit under DDP: 2 CPU processes on gloo (torchrun) against one process.

Two ranks with batch b and one process with batch b and gradient
accumulation 2 see the same 2b rows per optimizer step, with the router's
balancing loss taken per micro-batch in both, so the trajectories agree to
float32 summation order: losses within rtol 1e-5, LoRA weights within atol 1e-6.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from mixtune.errors import CheckpointError, ConfigError
from mixtune.recipe import complete_checkpoints
from tests.recipe import _ddp_worker
from tests.recipe.multiproc import assert_same_run, torchrun

WORKER = Path(__file__).with_name("_ddp_worker.py")
STEPS = 6


def _torchrun(out: Path, result: Path, mode: str, steps: int = STEPS) -> dict[str, Any] | None:
    return torchrun(WORKER, out, result, mode, steps, timeout=300)


def _rows(result: Path, ranks: int) -> list[list[int]]:
    return [r for k in range(ranks) for r in json.loads(Path(f"{result}.rows-{k}").read_text())]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("ddp")
    two = _torchrun(tmp / "two", tmp / "two.json", "fresh")
    assert two is not None
    _ddp_worker.train(str(tmp / "one"), tmp / "one.json", 2, 2, STEPS, "fresh")
    one = json.loads((tmp / "one.json").read_text())
    return {"tmp": tmp, "two": two, "one": one}


def _assert_same_run(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert_same_run(a, b, STEPS)


@pytest.mark.slow
def test_two_ranks_follow_the_one_process_trajectory(runs: dict[str, Any]) -> None:
    two, one = runs["two"], runs["one"]
    _assert_same_run(two, one)
    # The LoRA moved: the comparison is not between two untrained adapters.
    assert two["train_loss"][-1][1] < two["train_loss"][0][1]
    for key in ("test_before", "test_after"):
        assert two[key] == pytest.approx(one[key], rel=1e-5)
    torch.testing.assert_close(torch.tensor(two["routing"]), torch.tensor(one["routing"]))
    # Tokens are summed over ranks: the global batch's, as in one process.
    assert two["tokens"] == one["tokens"] == STEPS * 4 * 32
    # fit let go of the DDP wrapper (and its hold on the process group).
    assert two["ddp_left"] == 0


@pytest.mark.slow
def test_ranks_split_the_rows_without_duplicates_or_losses(runs: dict[str, Any]) -> None:
    tmp = runs["tmp"]
    r0 = json.loads(Path(f"{tmp / 'two.json'}.rows-0").read_text())
    r1 = json.loads(Path(f"{tmp / 'two.json'}.rows-1").read_text())
    assert len(r0) == len(r1) == STEPS * 2
    # 6 steps × 4 rows = 24 of the 32 training rows, each drawn once.
    assert len({tuple(r) for r in r0 + r1}) == STEPS * 4
    assert sorted(r0 + r1) == sorted(_rows(tmp / "one.json", 1))


@pytest.mark.slow
def test_rank_zero_writes_checkpoints_with_every_ranks_rng(runs: dict[str, Any]) -> None:
    run = runs["tmp"] / "two"
    assert [c.name for c in complete_checkpoints(run)] == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    for ckpt in complete_checkpoints(run):
        names = {p.name for p in ckpt.iterdir()}
        assert {"rng_state_0.pth", "rng_state_1.pth", "adapter.safetensors"} <= names
        meta = json.loads((ckpt / "mixtune_checkpoint.json").read_text())
        assert meta["world_size"] == 2
    assert not [p for p in run.iterdir() if p.name.endswith(".partial")]


@pytest.mark.slow
def test_resume_on_two_ranks_matches_the_uninterrupted_run(runs: dict[str, Any]) -> None:
    tmp = runs["tmp"]
    shutil.copytree(tmp / "two", tmp / "again")
    shutil.rmtree(tmp / "again" / "checkpoint-6")
    again = _torchrun(tmp / "again", tmp / "again.json", "resume")
    assert again is not None
    assert again["steps"] == STEPS
    # The resumed run logs steps 5 and 6 on top of the restored history.
    _assert_same_run(again, runs["two"])


@pytest.mark.slow
def test_resume_on_another_world_size_is_refused(runs: dict[str, Any]) -> None:
    tmp = runs["tmp"]
    shutil.copytree(tmp / "two", tmp / "single")
    with pytest.raises(CheckpointError, match="--num_processes 2"):
        _ddp_worker.train(str(tmp / "single"), tmp / "single.json", 2, 2, STEPS + 2, "resume")


@pytest.mark.parametrize(
    ("variable", "says"),
    [("ACCELERATE_USE_FSDP", "sharding='fsdp2'"), ("ACCELERATE_USE_DEEPSPEED", "does not support")],
)
def test_sharded_launchers_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, says: str
) -> None:
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ConfigError, match=says) as info:
        _ddp_worker.train(str(tmp_path / "run"), tmp_path / "r.json", 2, 1, 2, "fresh")
    assert "multi-gpu" in str(info.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_at_that_step(tmp_path: Path) -> None:
    _torchrun(tmp_path / "run", tmp_path / "nan.json", "nan")
    for rank in (0, 1):
        step, message = json.loads(Path(f"{tmp_path / 'nan.json'}.error-{rank}").read_text())
        assert step == 3
        assert "checkpoint-2" in message
    assert [c.name for c in complete_checkpoints(tmp_path / "run")] == ["checkpoint-2"]
