"""DDP scaling of ``Recipe.fit``: QLoRA throughput on 1 and 2 processes.

One invocation writes the model once, then launches itself under
``torch.distributed.run`` (what ``accelerate launch`` uses) for each process
count, and compares steady-state training throughput: tokens/s of all ranks
together, tokens/s per process, and scaling efficiency (tokens/s per
process relative to one process; the goal on GPUs is >= 90%). Each rank
keeps the same per-device batch (weak scaling), so N processes train on N
times the tokens per step.

GPU (the lead's run): a seeded random 2-layer slice at Mixtral-8x7B width
(hidden 4096, 8 experts × 14336, 32k vocabulary), NF4 experts and attention,
the guide's QLoRA adapter, packed 1024-token rows of the shared arXiv sample::

    PYTHONPATH=src python benchmarks/scaling.py --procs 1,2

CPU smoke check (a tiny model, gloo; its numbers say nothing about GPUs)::

    PYTHONPATH=src python benchmarks/scaling.py --tiny --cpu

Prints a table and writes ``benchmarks/results/scaling.json`` (``--tiny``
writes into a temporary folder unless ``--out`` is given).
``MIXTUNE_SAMPLE_CORPUS`` points at the sample if it is not beside the repo.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]


def slice_config() -> Any:
    from mixtune.model import mixtral_8x7b_config

    return mixtral_8x7b_config(2, max_position_embeddings=4096, router_jitter_noise=0.0)


def tiny_model_config() -> Any:
    from mixtune.model import tiny_config

    return tiny_config(max_position_embeddings=512, router_jitter_noise=0.0)


class _Clock(TrainerCallback):
    """Wall time and this rank's tokens from the end of step ``warmup`` to the last step."""

    def __init__(self, warmup: int, cuda: bool) -> None:
        self.warmup = warmup
        self.cuda = cuda
        self.t_start: float | None = None
        self.t_end: float | None = None
        self.steps = 0
        self.tokens = 0
        self.pending = 0

    def watch(self, model: torch.nn.Module) -> None:
        # The decoder body sees every row on both loss paths (chunked on one
        # process, the stock forward under DDP).
        body: Any = getattr(model, "model", model)
        body.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: Any, kwargs: Any) -> None:
        if not module.training:
            return
        # Packed rows run without a mask (position_ids keep chunks apart), so
        # every position counts, the short padded tail of a row included.
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        if mask is not None:
            self.pending += int(mask.sum())
        elif ids is not None:
            self.pending += int(ids.numel())

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = int(state.global_step)
        if step == self.warmup:
            self.t_start = self._now()
        elif step > self.warmup:
            self.t_end = self._now()
            self.steps = step - self.warmup
            self.tokens += self.pending
        self.pending = 0


def _sample() -> Path:
    return Path(
        os.environ.get("MIXTUNE_SAMPLE_CORPUS", REPO.parent / "shared" / "corpus" / "arxiv-sample")
    )


def worker(args: argparse.Namespace) -> None:
    """One rank: load, adapt, fit; rank 0 writes the measurements."""
    from mixtune.adapter import AdapterSpec
    from mixtune.corpus import ChunkedCorpus
    from mixtune.model import QuantSpec, load_quantized
    from mixtune.recipe import Recipe, RunSettings, local_device
    from mixtune.tokenizers import mixtral_v1

    cuda = not args.cpu
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tokenizer = mixtral_v1()
    quant = QuantSpec.nf4() if cuda else QuantSpec.nf4(compute_dtype=torch.float32)
    t0 = time.perf_counter()
    loaded = load_quantized(
        args.base,
        quant=quant,
        dtype=torch.bfloat16 if cuda else torch.float32,
        device_map=local_device() if cuda else None,
        tokenizer=tokenizer,
    )
    load_s = time.perf_counter() - t0
    corpus = ChunkedCorpus.from_folder(_sample(), tokenizer, max_length=args.max_length)
    clock = _Clock(args.warmup, cuda)
    recipe = Recipe.guide_qlora(
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        learning_rate=1e-3,
        eval_steps=args.steps,
        save_steps=args.steps,
        logging_steps=5,
        eval_rows=args.eval_rows,
        gradient_checkpointing=cuda,
        run=RunSettings(
            output_dir=Path(args.result).with_suffix(".run"),
            device="cuda" if cuda else "cpu",
            progress=False,
            callbacks=(clock,),
        ),
    )
    adapted = AdapterSpec.qlora(targets=("attention", "experts", "lm_head")).apply(loaded)
    clock.watch(adapted.model)
    result = recipe.fit(adapted, corpus)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens = clock.tokens
    if torch.distributed.is_initialized():
        t = torch.tensor([tokens], device=local_device() if cuda else "cpu")
        torch.distributed.all_reduce(t)
        tokens = int(t.item())
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if clock.t_start is None or clock.t_end is None:
        raise SystemExit(f"--steps must exceed --warmup ({args.warmup})")
    tok_s = tokens / (clock.t_end - clock.t_start)
    row = {
        "procs": world,
        "tokens_per_s": round(tok_s, 1),
        "tokens_per_s_per_proc": round(tok_s / world, 1),
        "timed_steps": clock.steps,
        "timed_tokens": tokens,
        "fit_tokens_per_s": round(result.tokens_per_s, 1),
        "fit_tokens": result.tokens,
        "steps": result.steps,
        "load_s": round(load_s, 2),
        "peak_memory_gib": round(result.peak_memory_bytes / 2**30, 3),
        "eval_loss_first": result.eval_loss[0].loss,
        "eval_loss_last": result.eval_loss[-1].loss,
    }
    Path(args.result).write_text(json.dumps(row, indent=2) + "\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--procs", default="1,2", help="process counts to compare, e.g. 1,2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=2, help="rows per process per micro-step")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--eval-rows", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead of the slice")
    parser.add_argument("--cpu", action="store_true", help="run on CPU with gloo")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from mixtune.model import random_checkpoint

    if args.tiny and args.max_length == 1024:
        args.max_length = 128
    procs = [int(p) for p in args.procs.split(",")]
    if not args.cpu:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: pass --cpu (with --tiny for a smoke check)")
        if max(procs) > torch.cuda.device_count():
            raise SystemExit(f"--procs {args.procs} needs {max(procs)} GPUs")
    work = Path(tempfile.mkdtemp(prefix="mixtune-scaling-"))
    t0 = time.perf_counter()
    config = tiny_model_config() if args.tiny else slice_config()
    dtype = torch.float32 if args.cpu else torch.bfloat16
    base = random_checkpoint(config, work / "base", layout="original", seed=0, dtype=dtype)
    write_s = time.perf_counter() - t0
    print(f"wrote the {'tiny model' if args.tiny else 'slice'} in {write_s:.1f} s", flush=True)

    rows = []
    for n in procs:
        result = work / f"procs-{n}.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            f"--nproc_per_node={n}",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            str(Path(__file__).resolve()),
            "--worker",
            f"--base={base}",
            f"--result={result}",
            f"--steps={args.steps}",
            f"--warmup={args.warmup}",
            f"--batch-size={args.batch_size}",
            f"--grad-accum={args.grad_accum}",
            f"--max-length={args.max_length}",
            f"--eval-rows={args.eval_rows}",
            *(["--cpu"] if args.cpu else []),
        ]
        env = {
            "OMP_NUM_THREADS": "1",
            # No NVLink multicast (NVLS): DDP's all-reduce does not need it,
            # and shared GPU hosts may forbid it.
            "NCCL_NVLS_ENABLE": "0",
            "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1",
            **os.environ,
        }
        t1 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True)
        print(f"{n} process(es): {time.perf_counter() - t1:.1f} s", flush=True)
        rows.append(json.loads(result.read_text()))

    base_rate = rows[0]["tokens_per_s_per_proc"]
    for row in rows:
        row["scaling_efficiency"] = round(row["tokens_per_s_per_proc"] / base_rate, 4)
    header = (
        "procs",
        "tokens_per_s",
        "tokens_per_s_per_proc",
        "scaling_efficiency",
        "peak_memory_gib",
    )
    print("  ".join(f"{h:>22}" for h in header))
    for row in rows:
        print("  ".join(f"{row[h]!s:>22}" for h in header))
    report = {
        "device": "cpu" if args.cpu else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": "tiny" if args.tiny else "mixtral-8x7b-width 2-layer slice",
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "batch_size_per_proc": args.batch_size,
        "grad_accum": args.grad_accum,
        "max_length": args.max_length,
        "write_model_s": round(write_s, 2),
        "runs": rows,
    }
    out = args.out or (
        work / "scaling.json" if args.tiny else REPO / "benchmarks" / "results" / "scaling.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
