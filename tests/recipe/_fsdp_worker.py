"""FSDP2 test body: QLoRA on the real tiny NF4 Mixtral, sharded or in one process.

Usage: python _fsdp_worker.py OUTPUT_DIR RESULT_JSON BATCH_SIZE GRAD_ACCUM MAX_STEPS MODE

MODE is ``fresh``, ``resume`` or ``gpu`` (the model is built on the CPU in
bf16 and ``fit`` shards it onto each rank's GPU). Run under ``torchrun`` (gloo on CPU) for the
sharded run, or call :func:`train` in-process for the one-process reference
(``sharding="fsdp2"`` without a process group trains as one process). Rank 0
writes RESULT_JSON: per-step losses, eval/test numbers, tokens, checkpoints,
the whole LoRA factors after training, and every rank's 4-bit bytes before
and after sharding. Every rank publishes the adapter to ``OUTPUT_DIR/published``
(only rank 0 writes).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist

from mixtune.adapter import AdapterSpec
from mixtune.model import QuantSpec, random_quantized
from mixtune.model import tiny_config as model_tiny_config
from mixtune.publish import publish
from mixtune.recipe import Recipe, RunSettings
from mixtune.recipe._fsdp import full_lora_state_dict, packed_4bit_bytes
from tests.recipe.multiproc import end_worker
from tests.recipe.toy import ToyCorpus

#: Adapted inside the decoder layers (FSDP2 keeps lm_head whole).
TARGETS = ("attention", "experts", "router")


def adapted_model(gpu: bool = False) -> object:
    dtype = torch.bfloat16 if gpu else torch.float32
    loaded = random_quantized(
        model_tiny_config(max_position_embeddings=256, router_jitter_noise=0.0),
        quant=QuantSpec.nf4(compute_dtype=dtype),
        dtype=dtype,
        device_map="cpu",
        progress=False,
    )
    return AdapterSpec.qlora(r=4, alpha=8, dropout=0.0, targets=TARGETS).apply(loaded, seed=0)


def train(out: str, result: Path, batch: int, accum: int, steps: int, mode: str) -> None:
    gpu = mode == "gpu"
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    adapted = adapted_model(gpu)
    model: torch.nn.Module = adapted.model  # type: ignore[attr-defined]
    bytes_before = packed_4bit_bytes(model)
    recipe = Recipe(
        max_steps=steps,
        batch_size=batch,
        grad_accum=accum,
        learning_rate=1e-2,
        warmup=0,
        eval_steps=2,
        save_steps=2,
        logging_steps=1,
        # Non-reentrant checkpointing recomputes each layer inside backward,
        # where FSDP2 must have gathered its weights again.
        gradient_checkpointing=True,
        layout="padded",
        run=RunSettings(
            output_dir=out, progress=False, sharding="fsdp2", device="cuda" if gpu else "cpu"
        ),
    )
    res = recipe.fit(adapted, ToyCorpus(rows=40), resume=mode == "resume")
    bytes_after = packed_4bit_bytes(model)
    devices = sorted({str(t.device) for t in [*model.parameters(), *model.buffers()]})
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    every = [[bytes_before, bytes_after]] * world
    if world > 1:
        gathered: list[object] = [None] * world
        dist.all_gather_object(gathered, [bytes_before, bytes_after])
        every = gathered  # type: ignore[assignment]
    lora = full_lora_state_dict(res.model)
    published = publish(res, Path(out) / "published", overwrite=True)
    if rank == 0:
        result.write_text(
            json.dumps(
                {
                    "world": world,
                    "devices": devices,
                    "peak_memory_bytes": res.peak_memory_bytes,
                    "train_loss": [[p.step, p.loss] for p in res.train_loss],
                    "eval_loss": [[p.step, p.loss] for p in res.eval_loss],
                    "test_before": res.test_loss_before,
                    "test_after": res.test_loss_after,
                    "routing": res.routing_load,
                    "tokens": res.tokens,
                    "steps": res.steps,
                    "checkpoints": [c.name for c in res.checkpoints],
                    "packed_bytes": every,
                    "published": [str(f) for f in published.files],
                    "lora": {k: v.tolist() for k, v in lora.items()},
                }
            )
        )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    train(
        sys.argv[1],
        Path(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
        int(sys.argv[5]),
        sys.argv[6],
    )
    end_worker()
