"""DDP scaling and FSDP2 sharding of ``Recipe.fit``: QLoRA on 1 and 2 processes.

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

FSDP2 (``--fsdp2``): a model whose 4-bit weights exceed one card's stated
budget, trained sharded on 2 GPUs with ``RunSettings(sharding="fsdp2")``.
Each process is capped at ``--budget-gib`` (default 22) with
``torch.cuda.set_per_process_memory_fraction`` before anything is built. The
full 32-layer Mixtral-8x7B shape (≈ 23.7 GiB in NF4, more than the cap) is
built one decoder layer at a time on the GPU (``random_quantized`` of a
one-layer model per layer) and parked in CPU memory, adapted there (QLoRA on
attention and experts), and ``mixtune.recipe.shard_model(device=GPU)`` moves
it back a layer at a time keeping this rank's half: no GPU ever holds the
whole model. Reports each rank's weight bytes, the peaks of build, sharding
and training, and tokens/s::

    PYTHONPATH=src python benchmarks/scaling.py --fsdp2 --procs 2 --out benchmarks/results/fsdp2.json

and its CPU smoke check (tiny model, gloo, no budget)::

    PYTHONPATH=src python benchmarks/scaling.py --fsdp2 --tiny --cpu --procs 2

Prints a table and writes ``benchmarks/results/scaling.json`` (``--fsdp2``:
``fsdp2.json``; ``--tiny`` writes into a temporary folder unless ``--out``
is given).
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


def build_layerwise(config: Any, quant: Any, dtype: torch.dtype, device: str, seed: int) -> Any:
    """A random 4-bit model built one decoder layer at a time on ``device``, kept on the CPU.

    ``random_quantized`` builds a whole model where it will live; to keep
    the GPU from ever holding all of it, each layer is drawn and quantized
    on ``device`` as the only layer of a one-layer model (seed ``seed + i``),
    then parked in CPU memory, and the layers are put together in the first
    model's body. ``shard_model(..., device=GPU)`` later moves them back one
    at a time, keeping only this rank's share.

    Returns:
        A ``LoadedModel`` on the CPU with ``config.num_hidden_layers`` layers.
    """
    import copy
    import gc

    import attrs

    from mixtune.model import random_quantized

    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    host: Any = None
    layers = []
    for i in range(int(config.num_hidden_layers)):
        loaded = random_quantized(
            one, quant=quant, dtype=dtype, device_map=device, seed=seed + i, progress=False
        )
        if host is None:
            host = loaded
            host.model.to("cpu")  # embeddings, norm, lm_head and layer 0
        layer = loaded.model.model.layers[0].to("cpu")
        layer.self_attn.layer_idx = i
        layers.append(layer)
        # Free this build's GPU leftovers (its embeddings) before the next one.
        del loaded
        gc.collect()
    model = host.model
    model.model.layers = torch.nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)
    model.model.config.num_hidden_layers = len(layers)
    return attrs.evolve(host, config=model.config, device=torch.device("cpu"))


def _recipe(
    args: argparse.Namespace,
    clock: Any,
    cuda: bool,
    *,
    logging_steps: int,
    checkpointing: bool,
    sharding: str,
) -> Any:
    """The guide's QLoRA recipe as both benchmark modes run it (one eval, one save)."""
    from mixtune.recipe import Recipe, RunSettings

    return Recipe.guide_qlora(
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        learning_rate=1e-3,
        eval_steps=args.steps,
        save_steps=args.steps,
        logging_steps=logging_steps,
        eval_rows=args.eval_rows,
        gradient_checkpointing=checkpointing,
        run=RunSettings(
            output_dir=Path(args.result).with_suffix(".run"),
            device="cuda" if cuda else "cpu",
            progress=False,
            callbacks=(clock,),
            sharding=sharding,
        ),
    )


def fsdp2_worker(args: argparse.Namespace) -> None:
    """One rank of the FSDP2 run: cap memory, build layer by layer, adapt, shard, fit."""
    import torch.distributed as dist

    from mixtune.adapter import AdapterSpec
    from mixtune.corpus import ChunkedCorpus
    from mixtune.model import QuantSpec, mixtral_8x7b_config
    from mixtune.recipe import local_device
    from mixtune.recipe._fsdp import local_bytes, packed_4bit_bytes, shard_model
    from mixtune.tokenizers import mixtral_v1

    cuda = not args.cpu
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # The Trainer reuses this group; shard_model needs it before fit.
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    world = dist.get_world_size()
    device = local_device() if cuda else "cpu"
    config = (
        tiny_model_config()
        if args.tiny
        else mixtral_8x7b_config(args.layers, max_position_embeddings=4096, router_jitter_noise=0.0)
    )
    budget = int(args.budget_gib * 2**30)
    if cuda:
        # From here on this process may not use more than the budget: the
        # card it simulates could not hold the model's weights.
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))
    t0 = time.perf_counter()
    loaded = build_layerwise(
        config,
        QuantSpec.nf4() if cuda else QuantSpec.nf4(compute_dtype=torch.float32),
        torch.bfloat16 if cuda else torch.float32,
        device,
        seed=0,
    )
    build_s = time.perf_counter() - t0
    build_peak = torch.cuda.max_memory_allocated() if cuda else 0
    # lm_head stays whole on every rank under FSDP2, so it is not adapted.
    adapted = AdapterSpec.qlora(r=args.lora_rank, targets=("attention", "experts")).apply(loaded)
    model = adapted.model
    full_bytes = local_bytes(model)
    full_4bit = packed_4bit_bytes(model)
    t0 = time.perf_counter()
    # Each layer goes to this rank's GPU, is split, and only its share stays.
    shard_model(model, device=device)
    shard_s = time.perf_counter() - t0
    rank_bytes = local_bytes(model)
    rank_4bit = packed_4bit_bytes(model)
    shard_peak = torch.cuda.max_memory_allocated() if cuda else 0
    # What the allocator holds once sharded: about 1/N of the weights.
    after_shard = torch.cuda.memory_allocated() if cuda else 0
    tokenizer = mixtral_v1()
    corpus = ChunkedCorpus.from_folder(_sample(), tokenizer, max_length=args.max_length)
    clock = _Clock(args.warmup, cuda)
    clock.watch(model)
    recipe = _recipe(args, clock, cuda, logging_steps=1, checkpointing=True, sharding="fsdp2")
    result = recipe.fit(adapted, corpus)
    tokens = torch.tensor([clock.tokens], device=device)
    dist.all_reduce(tokens)
    per_rank = [None] * world
    dist.all_gather_object(
        per_rank,
        {
            "rank": rank,
            "weights_bytes": rank_bytes,
            "weights_4bit_bytes": rank_4bit,
            "allocated_after_shard_gib": round(after_shard / 2**30, 3),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)
            if cuda
            else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)
            if cuda
            else None,
        },
    )
    if rank != 0:
        return
    if clock.t_start is None or clock.t_end is None:
        raise SystemExit(f"--steps must exceed --warmup ({args.warmup})")
    tok_s = int(tokens.item()) / (clock.t_end - clock.t_start)
    row = {
        "procs": world,
        "mode": "fsdp2",
        "layers": int(config.num_hidden_layers),
        "budget_gib": args.budget_gib if cuda else None,
        "weights_gib_unsharded": round(full_bytes / 2**30, 3),
        "weights_4bit_gib_unsharded": round(full_4bit / 2**30, 3),
        "weights_bytes_unsharded": full_bytes,
        "weights_4bit_bytes_unsharded": full_4bit,
        # What one card with this budget would need for the weights alone.
        "fits_one_budget": full_bytes < budget if cuda else None,
        "build_s": round(build_s, 2),
        "build_peak_gib": round(build_peak / 2**30, 3),
        "shard_s": round(shard_s, 2),
        "shard_peak_gib": round(shard_peak / 2**30, 3),
        "ranks": per_rank,
        "tokens_per_s": round(tok_s, 1),
        "tokens_per_s_per_proc": round(tok_s / world, 1),
        "timed_steps": clock.steps,
        "timed_tokens": int(tokens.item()),
        "fit_tokens": result.tokens,
        "steps": result.steps,
        "peak_memory_gib": round(result.peak_memory_bytes / 2**30, 3),
        "train_loss": [[p.step, p.loss] for p in result.train_loss],
        "eval_loss_first": result.eval_loss[0].loss,
        "eval_loss_last": result.eval_loss[-1].loss,
    }
    Path(args.result).write_text(json.dumps(row, indent=2) + "\n")


def worker(args: argparse.Namespace) -> None:
    """One rank: load, adapt, fit; rank 0 writes the measurements."""
    from mixtune.adapter import AdapterSpec
    from mixtune.corpus import ChunkedCorpus
    from mixtune.model import QuantSpec, load_quantized
    from mixtune.recipe import local_device
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
    recipe = _recipe(args, clock, cuda, logging_steps=5, checkpointing=cuda, sharding="ddp")
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
    parser.add_argument(
        "--procs", default=None, help="process counts to compare, e.g. 1,2 (--fsdp2: 2)"
    )
    parser.add_argument("--steps", type=int, default=None, help="default 30 (--fsdp2: 12)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="steps left out of the timing (5; --fsdp2: 3)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="rows per process per micro-step (2; --fsdp2: 1)",
    )
    parser.add_argument("--grad-accum", type=int, default=None, help="default 2 (--fsdp2: 1)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--eval-rows", type=int, default=None, help="default 16 (--fsdp2: 4)")
    parser.add_argument(
        "--fsdp2", action="store_true", help="shard a model too large for one budget (FSDP2)"
    )
    parser.add_argument("--layers", type=int, default=32, help="--fsdp2: Mixtral-8x7B layers")
    parser.add_argument(
        "--budget-gib", type=float, default=22.0, help="--fsdp2: memory cap per process (GPU)"
    )
    parser.add_argument("--lora-rank", type=int, default=16, help="--fsdp2: LoRA rank")
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead of the slice")
    parser.add_argument("--cpu", action="store_true", help="run on CPU with gloo")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = (
        {"procs": "2", "steps": 12, "warmup": 3, "batch_size": 1, "grad_accum": 1, "eval_rows": 4}
        if args.fsdp2
        else {"procs": "1,2", "steps": 30, "warmup": 5, "batch_size": 2, "grad_accum": 2}
        | {"eval_rows": 16}
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.worker:
        fsdp2_worker(args) if args.fsdp2 else worker(args)
        # The worker's results are written. Tear the group down and exit at
        # once: under CPU load gloo now and then aborts a rank during
        # interpreter shutdown, and torchrun would report a good run as failed.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
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
    base = work / "base"
    if not args.fsdp2:
        # FSDP2 ranks build their model directly in 4 bits; nothing to write.
        config = tiny_model_config() if args.tiny else slice_config()
        dtype = torch.float32 if args.cpu else torch.bfloat16
        base = random_checkpoint(config, base, layout="original", seed=0, dtype=dtype)
        name = "tiny model" if args.tiny else "slice"
        print(f"wrote the {name} in {time.perf_counter() - t0:.1f} s", flush=True)
    write_s = time.perf_counter() - t0

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
            f"--layers={args.layers}",
            f"--budget-gib={args.budget_gib}",
            f"--lora-rank={args.lora_rank}",
            *(["--cpu"] if args.cpu else []),
            *(["--tiny"] if args.tiny else []),
            *(["--fsdp2"] if args.fsdp2 else []),
        ]
        env = {
            "OMP_NUM_THREADS": "1",
            # No NVLink multicast (NVLS): DDP's all-reduce does not need it,
            # and shared GPU hosts may forbid it.
            "NCCL_NVLS_ENABLE": "0",
            "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1",
            # FSDP2 gathers and frees a layer at a time: expandable segments
            # strand fewer blocks under the per-process cap.
            **({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"} if args.fsdp2 else {}),
            **os.environ,
        }
        t1 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True)
        print(f"{n} process(es): {time.perf_counter() - t1:.1f} s", flush=True)
        rows.append(json.loads(result.read_text()))

    base_rate = rows[0]["tokens_per_s_per_proc"]
    for row in rows:
        row["scaling_efficiency"] = round(row["tokens_per_s_per_proc"] / base_rate, 4)
    header: tuple[str, ...] = (
        "procs",
        "tokens_per_s",
        "tokens_per_s_per_proc",
        "scaling_efficiency",
        "peak_memory_gib",
    )
    if args.fsdp2:
        header = (
            "procs",
            "weights_gib_unsharded",
            "budget_gib",
            "tokens_per_s",
            "peak_memory_gib",
        )
        for row in rows:
            for rank in row["ranks"]:
                gib = rank["weights_bytes"] / 2**30
                print(
                    f"rank {rank['rank']}: {gib:.2f} GiB of weights, peak {rank['peak_allocated_gib']}"
                )
    print("  ".join(f"{h:>22}" for h in header))
    for row in rows:
        print("  ".join(f"{row[h]!s:>22}" for h in header))
    report = {
        "device": "cpu" if args.cpu else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": "tiny"
        if args.tiny
        else f"mixtral-8x7b, {args.layers} layers, built in NF4"
        if args.fsdp2
        else "mixtral-8x7b-width 2-layer slice",
        "mode": "fsdp2" if args.fsdp2 else "ddp",
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "batch_size_per_proc": args.batch_size,
        "grad_accum": args.grad_accum,
        "max_length": args.max_length,
        "write_model_s": round(write_s, 2),
        "runs": rows,
    }
    name = "fsdp2.json" if args.fsdp2 else "scaling.json"
    out = args.out or (work / name if args.tiny else REPO / "benchmarks" / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
