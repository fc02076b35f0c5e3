"""DDP test body: train the toy (dropout off) and save what the run did as JSON.

Usage: python _ddp_worker.py OUTPUT_DIR RESULT_JSON BATCH_SIZE GRAD_ACCUM MAX_STEPS MODE

MODE is ``fresh``, ``resume``, or ``nan``: the last rank's LoRA weight turns
NaN before step 3 and every rank writes the error it stopped with to
``RESULT_JSON.error-<rank>``.

Run under ``torchrun`` (gloo on CPU), or call :func:`train` in-process for the
one-process reference. Rank 0 writes RESULT_JSON (per-step training loss,
eval/test numbers, tokens, checkpoints, final LoRA weights); every rank writes
the rows it trained on to ``RESULT_JSON.rows-<rank>``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from typing import Any

import torch
from transformers import TrainerCallback

from mixtune.errors import NonFiniteLossError
from mixtune.recipe import Recipe, RunSettings
from tests.recipe.multiproc import end_worker
from tests.recipe.toy import ToyCorpus, toy_adapted


class RowSpy(TrainerCallback):
    """Records every row this rank trains on."""

    def __init__(self, model: torch.nn.Module, path: Path) -> None:
        self.path = path
        self.rows: list[list[int]] = []
        # The decoder body sees every training row on both loss paths: the
        # chunked one (one process) calls it directly, the stock one (DDP)
        # through the causal LM's forward.
        body: Any = model.model
        body.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):  # type: ignore[no-untyped-def]
        if module.training:
            self.rows.extend(kwargs["input_ids"].tolist())

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.path.write_text(json.dumps(self.rows))


class PoisonLastRank(TrainerCallback):
    """Writes NaN into one LoRA weight of the last rank before step 3."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step + 1 == 3 and args.process_index == args.world_size - 1:
            with torch.no_grad():
                self.model.model.layers[0].self_attn.q_proj.lora_A.fill_(float("nan"))


def train(out: str, result: Path, batch: int, accum: int, steps: int, mode: str) -> None:
    adapted = toy_adapted()
    for module in adapted.model.modules():
        # Dropout draws differ between ranks and micro-batches; off, the
        # trajectories must agree to float rounding.
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    rank = int(os.environ.get("RANK", "0"))
    spy = RowSpy(adapted.model, Path(f"{result}.rows-{rank}"))
    recipe = Recipe(
        max_steps=steps,
        batch_size=batch,
        grad_accum=accum,
        learning_rate=1e-2,
        warmup=0,
        eval_steps=2,
        save_steps=2,
        logging_steps=1,
        gradient_checkpointing=False,
        layout="padded",
        run=RunSettings(
            output_dir=out,
            progress=False,
            callbacks=(spy, PoisonLastRank(adapted.model)) if mode == "nan" else (spy,),
        ),
    )
    if mode == "nan":
        try:
            recipe.fit(adapted, ToyCorpus(rows=40))
        except NonFiniteLossError as exc:
            Path(f"{result}.error-{rank}").write_text(json.dumps([exc.step, str(exc)]))
        return
    # Automatic collection off while fitting: a DDP wrapper still alive
    # afterwards is one fit kept, not one the collector has yet to reach.
    gc.disable()
    try:
        res = recipe.fit(adapted, ToyCorpus(rows=40), resume=mode == "resume")
        ddp_left = sum(
            isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects()
        )
    finally:
        gc.enable()
    if rank == 0:
        result.write_text(
            json.dumps(
                {
                    "train_loss": [[p.step, p.loss] for p in res.train_loss],
                    "eval_loss": [[p.step, p.loss] for p in res.eval_loss],
                    "test_before": res.test_loss_before,
                    "test_after": res.test_loss_after,
                    "routing": res.routing_load,
                    "tokens": res.tokens,
                    "steps": res.steps,
                    "checkpoints": [c.name for c in res.checkpoints],
                    "ddp_left": ddp_left,
                    "lora": {k: v.tolist() for k, v in res.model.lora_state_dict().items()},
                }
            )
        )


if __name__ == "__main__":
    train(
        sys.argv[1],
        Path(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
        int(sys.argv[5]),
        sys.argv[6],
    )
    end_worker()
