"""Recipe.fit on a toy adapted Mixtral: losses, evaluation, checkpoints, failures."""

from __future__ import annotations

import gc
import math
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from mixtune.errors import CheckpointError, ConfigError, NonFiniteLossError, PreflightError
from mixtune.recipe import (
    Recipe,
    RunSettings,
    _checkpoint,
    complete_checkpoints,
    last_complete_checkpoint,
)
from tests.recipe.recipes import resume_recipe
from tests.recipe.toy import ToyCorpus, toy_adapted

WORKER = Path(__file__).with_name("_resume_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _recipe(tmp_path: Path, **kw: object) -> Recipe:
    base: dict[str, object] = {
        "max_steps": 6,
        "batch_size": 2,
        "grad_accum": 1,
        "learning_rate": 1e-2,
        "warmup": 0,
        "eval_steps": 3,
        "save_steps": 2,
        "logging_steps": 1,
        "gradient_checkpointing": False,
        "layout": "padded",
        "run": RunSettings(output_dir=tmp_path / "run", progress=False),
    }
    base.update(kw)
    return Recipe(**base)  # type: ignore[arg-type]


class _Spy(TrainerCallback):
    """Records the model settings in force while training, and the forward's inputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.settings: list[tuple[object, ...]] = []
        self.input_keys: set[str] = set()
        # Training runs the decoder body (the loss is chunked over the logits).
        model.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):  # type: ignore[no-untyped-def]
        if module.training:
            self.input_keys |= {k for k, v in kwargs.items() if v is not None}

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        cfg = self.model.config
        self.settings.append(
            (cfg.use_cache, cfg.output_router_logits, self.model.router_aux_loss_coef)
        )


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_fit_lowers_loss_and_reports(tmp_path: Path, layout: str) -> None:
    adapted = toy_adapted()
    spy = _Spy(adapted.model)
    run = RunSettings(output_dir=tmp_path / "run", progress=False, callbacks=(spy,))
    res = _recipe(tmp_path, layout=layout, gradient_checkpointing=layout == "packed", run=run).fit(
        adapted, ToyCorpus()
    )
    # While training: no KV cache, router logits on for Mixtral's aux loss (0.02).
    assert spy.settings == [(False, True, 0.02)] * 6
    assert ("position_ids" in spy.input_keys) == (layout == "packed")
    # Packed rows go without their mask: transformers then masks per chunk.
    assert ("attention_mask" in spy.input_keys) == (layout == "padded")
    assert "input_ids" in spy.input_keys
    assert res.steps == 6
    assert [p.step for p in res.eval_loss] == [0, 3, 6]
    assert res.eval_loss[-1].loss < res.eval_loss[0].loss
    assert [p.step for p in res.train_loss] == list(range(1, 7))
    assert res.test_loss_after < res.test_loss_before
    assert res.perplexity_after == pytest.approx(math.exp(res.test_loss_after))
    assert len(res.routing_load) == 2  # one row per layer
    for layer in res.routing_load:
        assert len(layer) == 4
        assert sum(layer) == pytest.approx(1.0)
    assert [c.name for c in res.checkpoints] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert res.tokens == 6 * 2 * 32
    assert res.tokens_per_s > 0
    assert res.peak_memory_bytes > 0
    # use_cache is forced off only while training.
    assert res.model.model.config.use_cache is True


def test_checkpoint_holds_only_lora_and_state(tmp_path: Path) -> None:
    adapted = toy_adapted()
    res = _recipe(tmp_path, max_steps=2).fit(adapted, ToyCorpus())
    ckpt = res.checkpoints[-1]
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= names
    assert {"trainer_state.json", "COMPLETE"} <= names
    saved = load_file(str(ckpt / "adapter.safetensors"))
    assert set(saved) == set(adapted.lora_state_dict())
    for k, v in adapted.lora_state_dict().items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0)


def test_existing_checkpoints_need_resume(tmp_path: Path) -> None:
    _recipe(tmp_path, max_steps=2).fit(toy_adapted(), ToyCorpus())
    with pytest.raises(CheckpointError, match="resume=True"):
        _recipe(tmp_path, max_steps=2).fit(toy_adapted(), ToyCorpus())


def test_crash_mid_write_leaves_no_complete_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _checkpoint.write_checkpoint

    def crash_at_four(run_dir, step, lora, write_rest, **kw):  # type: ignore[no-untyped-def]
        if step == 4:

            def half(folder: Path) -> None:
                write_rest(folder)
                raise KeyboardInterrupt("simulated crash mid-write")

            return real(run_dir, step, lora, half, **kw)
        return real(run_dir, step, lora, write_rest, **kw)

    monkeypatch.setattr("mixtune.recipe._fit.write_checkpoint", crash_at_four)
    with pytest.raises(KeyboardInterrupt):
        _recipe(tmp_path).fit(toy_adapted(), ToyCorpus())
    run = tmp_path / "run"
    assert (run / ".checkpoint-4.partial" / "adapter.safetensors").is_file()
    assert not (run / "checkpoint-4").exists()
    assert last_complete_checkpoint(run) == run / "checkpoint-2"
    # A folder that looks like a checkpoint but lacks the marker is ignored too.
    (run / "checkpoint-5").mkdir()
    (run / "checkpoint-5" / "adapter.safetensors").write_bytes(b"garbage")
    monkeypatch.undo()
    res = _recipe(tmp_path).fit(toy_adapted(), ToyCorpus(), resume=True)
    assert res.resumed_from == run / "checkpoint-2"
    assert res.steps == 6
    assert not (run / ".checkpoint-4.partial").exists()  # the retry replaced it
    assert [c.name for c in complete_checkpoints(run)] == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]


class _Poison(TrainerCallback):
    """Writes NaN into one LoRA weight before step ``at`` (1-based)."""

    def __init__(self, model: torch.nn.Module, at: int) -> None:
        self.model = model
        self.at = at

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step + 1 == self.at:
            with torch.no_grad():
                self.model.model.layers[0].self_attn.q_proj.lora_A.fill_(float("nan"))


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    adapted = toy_adapted()
    run = RunSettings(
        output_dir=tmp_path / "run", progress=False, callbacks=(_Poison(adapted.model, 4),)
    )
    with pytest.raises(NonFiniteLossError, match="step 4") as info:
        _recipe(tmp_path, run=run).fit(adapted, ToyCorpus())
    assert info.value.step == 4
    assert "checkpoint-2" in str(info.value)
    last = last_complete_checkpoint(tmp_path / "run")
    assert last is not None
    assert last.name == "checkpoint-2"
    for v in load_file(str(last / "adapter.safetensors")).values():
        assert torch.isfinite(v).all()


class _OptimizerWatch(TrainerCallback):
    """Weak references to the optimizer and its state tensors, taken after step 1."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref[Any]] = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):  # type: ignore[no-untyped-def]
        if not self.refs:
            inner = getattr(optimizer, "optimizer", optimizer)
            tensors = [t for st in inner.state.values() for t in st.values() if torch.is_tensor(t)]
            self.refs = [weakref.ref(inner)] + [weakref.ref(t) for t in tensors]


@pytest.mark.parametrize("fails", [False, True], ids=["returns", "raises"])
def test_fit_lets_go_of_the_optimizer_at_once(tmp_path: Path, fails: bool) -> None:
    adapted = toy_adapted()
    watch = _OptimizerWatch()
    callbacks = (watch, _Poison(adapted.model, 4)) if fails else (watch,)
    run = RunSettings(output_dir=tmp_path / "run", progress=False, callbacks=callbacks)
    # Automatic collection off: only what fit lets go of itself counts (the
    # Trainer and its callbacks reference each other and would wait for it).
    gc.disable()
    try:
        if fails:
            with pytest.raises(NonFiniteLossError):
                _recipe(tmp_path, run=run).fit(adapted, ToyCorpus())
        else:
            _recipe(tmp_path, run=run).fit(adapted, ToyCorpus())
        alive = [r for r in watch.refs if r() is not None]
    finally:
        gc.enable()
    assert len(watch.refs) > 2  # the optimizer and its moment tensors were seen
    assert alive == []


def test_preflight_refuses_in_seconds(tmp_path: Path) -> None:
    recipe = _recipe(
        tmp_path,
        batch_size=4,
        run=RunSettings(output_dir=tmp_path / "run", progress=False, memory_budget_bytes=1000),
    )
    t0 = time.perf_counter()
    with pytest.raises(PreflightError, match="would not fit") as info:
        recipe.fit(toy_adapted(), ToyCorpus())
    msg = str(info.value)
    assert "batch_size=2" in msg
    assert "gradient_checkpointing=True" in msg
    assert "QuantSpec.nf4" in msg
    assert "logits" in msg
    assert not (tmp_path / "run").exists()  # nothing ran
    assert time.perf_counter() - t0 < 60


def test_preflight_passes_with_a_fitting_budget(tmp_path: Path) -> None:
    run = RunSettings(output_dir=tmp_path / "run", progress=False, memory_budget_bytes=2**30)
    res = _recipe(tmp_path, max_steps=1, run=run).fit(toy_adapted(), ToyCorpus())
    assert res.memory.available == 2**30
    assert res.memory.fits
    assert res.memory.logits == 2 * 2 * 32 * 128 * 4


def test_paged_optimizer_refused_on_cpu(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="paged_adamw_8bit"):
        _recipe(
            tmp_path,
            optimizer="paged_adamw_8bit",
            run=RunSettings(output_dir=tmp_path / "run", device="cpu"),
        ).fit(toy_adapted(), ToyCorpus())


def test_missing_logging_backend_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec now reports it missing
    run = RunSettings(output_dir=tmp_path / "run", report_to="wandb")
    with pytest.raises(ConfigError, match=r"mixtune\[wandb\]"):
        _recipe(tmp_path, run=run).fit(toy_adapted(), ToyCorpus())


def test_loaded_model_without_adapter_is_refused(tmp_path: Path) -> None:
    class Loaded:
        model = toy_adapted().model

    with pytest.raises(ConfigError, match="AdapterSpec"):
        _recipe(tmp_path).fit(Loaded(), ToyCorpus())


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path) -> None:
    ref = resume_recipe(RunSettings(output_dir=tmp_path / "ref", progress=False)).fit(
        toy_adapted(), ToyCorpus()
    )
    expected = ref.model.lora_state_dict()

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    out = tmp_path / "killed"
    result = tmp_path / "final.safetensors"
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(out), str(result), "fresh", "0.5"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint-4" / "COMPLETE").exists():
            if proc.poll() is not None:
                pytest.fail(f"worker ended early: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no checkpoint-4 within 120 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not result.exists()
    assert not (out / "checkpoint-8").exists()

    done = subprocess.run(
        [sys.executable, str(WORKER), str(out), str(result), "resume", "0"],
        env=env,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    resumed = load_file(str(result))
    assert set(resumed) == set(expected)
    for k in expected:
        torch.testing.assert_close(resumed[k], expected[k], rtol=0, atol=0)


def test_estimate_counts_one_chunk_of_dequantized_experts_on_cuda(tmp_path: Path) -> None:
    from mixtune.model import MoEExperts, QuantSpec, load_quantized, random_checkpoint, tiny_config
    from mixtune.recipe import estimate_memory

    ckpt = random_checkpoint(tiny_config("mixtral"), tmp_path / "ckpt", dtype=torch.float32)
    model = load_quantized(ckpt, quant=QuantSpec.nf4(compute_dtype=torch.float32)).model
    kwargs: dict[str, Any] = {
        "batch_size": 2,
        "seq_len": 64,
        "gradient_checkpointing": True,
        "optimizer": "adamw_torch",
        "activation_dtype": torch.bfloat16,
        "available": 1 << 40,
    }
    cfg = model.config
    per_expert = 2 * cfg.hidden_size * cfg.intermediate_size * 2  # gate_up, bf16
    for chunk in (1, 3, cfg.num_local_experts):
        for module in model.modules():
            if isinstance(module, MoEExperts):
                module.dequant_chunk_bytes = chunk * per_expert
        for checkpointing in (True, False):
            args = {**kwargs, "gradient_checkpointing": checkpointing}
            cpu = estimate_memory(model, device=torch.device("cpu"), **args)
            cuda = estimate_memory(model, device=torch.device("cuda"), **args)
            # Fetched again in backward, never kept: one chunk, whatever the depth.
            assert cuda.activations - cpu.activations == chunk * per_expert
