"""QLoRA training throughput on a Mixtral-8x7B-width slice: stock stack vs mixtune.

Arms, each measured in its own subprocess on the same card in one run:

(a) the guide's recipe on today's stack: ``BitsAndBytesConfig`` nf4 +
    ``prepare_model_for_kbit_training`` + PEFT ``target_parameters``;
(b) bf16 base + transformers' ``grouped_mm`` experts + PEFT ``target_parameters``;
(c) mixtune: ``load_quantized`` (4-bit attention and experts) + ``AdapterSpec``,
    trained with the chunked LM loss (``--chunked-loss``, default on for (c)
    only): the logits are never materialised for the whole batch.

With more than 2 layers (``--build auto``) arm (c) is built directly in 4
bits on the device with ``mixtune.model.random_quantized`` (no checkpoint on
disk, the bf16 model never exists); arms (a) and (b) need a bf16 checkpoint
and are skipped then. ``--layers 32`` is the full Mixtral-8x7B architecture.

All arms: LoRA r=16 (alpha 32) on q/k/v/o and every expert's gate/up/down,
non-reentrant gradient checkpointing, paged 8-bit AdamW, random tokens.

FLOPs: forward FLOPs per token = 2·N_active + 2·L·T·d_model (causal attention
scores and values, half of the full T×T), with N_active = L·(attention
projections + router + top-k experts' three projections) + lm_head; training
= 3 × forward.  MFU = tokens/s × 3 × forward FLOPs per token / 989e12 (H100/H200
dense bf16 peak).

Usage::

    python benchmarks/moe_qlora.py --workdir /tmp/slice            # all arms
    python benchmarks/moe_qlora.py --tiny --arms c                  # CPU smoke
    python benchmarks/moe_qlora.py --arms a,b,c,c@2048              # (c) twice: default
                                                                    # and 2 GiB of experts
                                                                    # dequantized at a time
    python benchmarks/moe_qlora.py --layers 32 --arms c --shapes 8x1200 \
        --real-data-arm "" --steps 3 --warmup 1                      # full 8x7B, one GPU
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PEAK_FLOPS = 989e12


def slice_config(layers: int, tiny: bool):  # type: ignore[no-untyped-def]
    from transformers import MixtralConfig

    if tiny:
        return MixtralConfig(
            vocab_size=32000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=4096,
        )
    return MixtralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=32768,
        rope_theta=1e6,
    )


def forward_flops_per_token(config, seq: int) -> float:  # type: ignore[no-untyped-def]
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = d // config.num_attention_heads * config.num_key_value_heads
    attn = d * d * 2 + d * kv * 2
    experts = config.num_experts_per_tok * 3 * d * inter
    router = d * config.num_local_experts
    active = layers * (attn + experts + router) + d * config.vocab_size
    return 2.0 * active + 2.0 * layers * seq * d


def _peft_config(targets_params: list[str]):  # type: ignore[no-untyped-def]
    from peft import LoraConfig

    # PEFT refuses dropout with target_parameters, so every arm runs dropout 0.
    return LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=targets_params,
    )


def build_arm(arm: str, path: Path, device: str, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    import torch

    if arm == "a":
        from peft import get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quant, dtype=torch.bfloat16, device_map=device
        )
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        model = get_peft_model(
            model, _peft_config(["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        )
    elif arm == "b":
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, device_map=device, experts_implementation="grouped_mm"
        )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model = get_peft_model(
            model, _peft_config(["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        )
    elif arm == "c":
        from mixtune.adapter import AdapterSpec
        from mixtune.model import QuantSpec, load_quantized

        if args.build == "direct":
            from mixtune.model import random_quantized

            loaded = random_quantized(
                slice_config(args.layers, args.tiny),
                quant=QuantSpec.nf4(),
                dtype=torch.bfloat16,
                device_map=device,
                seed=0,
            )
        else:
            loaded = load_quantized(
                path, quant=QuantSpec.nf4(), dtype=torch.bfloat16, device_map=device
            )
        if args.dequant_chunk_mib is not None:
            from mixtune.model import MoEExperts

            for module in loaded.model.modules():
                if isinstance(module, MoEExperts):
                    module.dequant_chunk_bytes = args.dequant_chunk_mib * 2**20
        adapted = AdapterSpec.lora(
            r=16, alpha=32, dropout=0.0, targets=("attention", "experts")
        ).apply(loaded)
        model = adapted.model
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    else:
        raise SystemExit(f"unknown arm {arm!r}")
    model.config.use_cache = False
    model.train()
    return model


def corpus_batch(layout: str, batch: int, seq: int, device: str) -> tuple[dict[str, object], int]:
    """``batch`` rows of the guide-like short-row corpus (~250 characters a row).

    Padded rows carry an attention mask; packed rows carry restarting
    ``position_ids`` and no mask, so attention stays inside each chunk.
    Returns the batch and its count of real (non-pad) tokens.
    """
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from corpus import _default_folder, _short_rows  # the corpus benchmark's row cutter
    from mixtune.corpus import ChunkedCorpus
    from mixtune.tokenizers import mixtral_v1

    tok = mixtral_v1()
    papers = ChunkedCorpus.from_folder(_default_folder(), tok, max_length=seq, progress=False)
    short = ChunkedCorpus.from_documents(_short_rows(papers), tok, max_length=seq, progress=False)
    rows = short.to_datasets(layout)["train"].select(range(batch))
    cols = ["input_ids", "labels"] + (
        ["attention_mask"] if layout == "padded" else ["position_ids"]
    )
    out = {c: torch.tensor(rows[c], device=device) for c in cols}
    if layout == "padded":
        real = int(out["attention_mask"].sum())
    else:
        real = int(sum(sum(lens) for lens in rows["seq_lens"]))
    return out, real


def run_arm(args: argparse.Namespace) -> dict[str, object]:
    import bitsandbytes as bnb
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    model = build_arm(args.arm, Path(args.workdir), device, args)
    if device == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t_build
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None
    build_peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    if device == "cuda":
        optim = bnb.optim.PagedAdamW8bit(trainable, lr=1e-4)
    else:
        optim = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.seq), device=device)
    batch: dict[str, torch.Tensor] = {"input_ids": ids, "labels": ids}
    real_tokens = args.batch * args.seq
    if args.data != "random":
        batch, real_tokens = corpus_batch(args.data, args.batch, args.seq, device)

    chunked = bool(args.chunked_loss)
    # PEFT wraps the transformers model; the chunked loss needs it bare.
    bare = model.get_base_model() if hasattr(model, "get_base_model") else model

    def loss_of() -> torch.Tensor:
        if chunked:
            from mixtune.recipe import causal_lm_training_loss

            return causal_lm_training_loss(bare, batch)
        loss: torch.Tensor = model(**batch, use_cache=False).loss
        return loss

    def step() -> float:
        loss = loss_of()
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    # Gradient check: every trainable tensor must have received a gradient.
    loss_of().backward()
    no_grad = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not bool(p.grad.abs().sum() > 0))
    ]
    optim.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tokens = args.batch * args.seq * args.steps
    tok_s = tokens / elapsed
    profile = top_kernels(step, device) if args.profile else None
    flops = forward_flops_per_token(model.config, args.seq)
    expert_lora = sum(1 for n, p in model.named_parameters() if p.requires_grad and "expert" in n)
    return {
        "arm": args.arm,
        "data": args.data,
        "real_fraction": real_tokens / (args.batch * args.seq),
        "real_tokens_per_s": tok_s * real_tokens / (args.batch * args.seq),
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_s": tok_s,
        "peak_gib": (torch.cuda.max_memory_allocated() / 2**30) if device == "cuda" else None,
        "weights_gib": weights_gib,
        "build_peak_gib": build_peak_gib,
        "build_s": build_s,
        "build": args.build if args.arm == "c" else "checkpoint",
        "layers": model.config.num_hidden_layers,
        "chunked_loss": chunked,
        "mfu": tok_s * 3 * flops / PEAK_FLOPS,
        "trainable_params": n_trainable,
        "trainable_tensors": len(trainable),
        "expert_lora_tensors": expert_lora,
        "tensors_without_grad": len(no_grad),
        "losses": losses,
        "dequant_chunk_mib": args.dequant_chunk_mib,
        "profile": profile,
    }


def top_kernels(step, device: str, count: int = 30) -> list[dict[str, object]] | None:  # type: ignore[no-untyped-def]
    """Two more steps under the profiler: the ``count`` ops with most device time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if device != "cuda":
        return None
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        step()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0)
        if device_us:
            rows.append(
                {"name": event.key[:120], "ms_per_step": device_us / 2e3, "calls": event.count // 2}
            )
    rows.sort(key=lambda r: -float(r["ms_per_step"]))  # type: ignore[arg-type]
    return rows[:count]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="/tmp/mixtune-slice")
    parser.add_argument("--arms", default="a,b,c")
    parser.add_argument("--shapes", default="2x1200,8x1200")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny config for a CPU smoke run")
    parser.add_argument(
        "--build",
        default="auto",
        choices=["auto", "checkpoint", "direct"],
        help="arm (c): load a bf16 checkpoint from --workdir, or build directly in 4 bits "
        "with random_quantized (auto: direct for more than 2 layers; arms a/b are then skipped)",
    )
    parser.add_argument(
        "--chunked-loss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compute the LM loss in chunks of tokens, never the whole batch's logits "
        "(default: on for arm c only)",
    )
    parser.add_argument(
        "--dequant-chunk-mib",
        type=int,
        default=None,
        help="arm (c): bytes of dequantized experts that exist at once (default: the library's)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also record the ops with most device time over two steps (CUDA only)",
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_qlora.json"))
    # internal: one arm in this process
    parser.add_argument("--arm")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--data", default="random", choices=["random", "padded", "packed"])
    parser.add_argument(
        "--real-data-arm",
        default="c",
        help="arm that also runs on the guide-like short rows, padded and packed, at the last shape",
    )
    args = parser.parse_args()

    if args.arm:
        print("RESULT " + json.dumps(run_arm(args)), flush=True)
        return

    import torch
    import transformers

    from mixtune.model import random_checkpoint

    workdir = Path(args.workdir)
    build = args.build if args.build != "auto" else ("direct" if args.layers > 2 else "checkpoint")
    arms = args.arms.split(",")
    if build == "direct":
        skipped = [a for a in arms if a.partition("@")[0] != "c"]
        if skipped:
            print(
                f"--layers {args.layers}: arm(s) {', '.join(skipped)} skipped: they load a bf16 "
                "checkpoint, which this build never writes (pass --build checkpoint to force one)",
                file=sys.stderr,
            )
        arms = [a for a in arms if a.partition("@")[0] == "c"]
    elif not (workdir / "config.json").exists():
        random_checkpoint(slice_config(args.layers, args.tiny), workdir, layout="fused", seed=0)

    def arm_flags(arm: str) -> list[str]:
        # "c@MIB": arm (c) with that many MiB of experts dequantized at a time.
        arm, _, chunk_mib = arm.partition("@")
        chunked = args.chunked_loss if args.chunked_loss is not None else arm == "c"
        flags = ["--layers", str(args.layers), "--build", build]
        flags.append("--chunked-loss" if chunked else "--no-chunked-loss")
        if chunk_mib or args.dequant_chunk_mib is not None:
            flags += ["--dequant-chunk-mib", chunk_mib or str(args.dequant_chunk_mib)]
        if args.profile:
            flags.append("--profile")
        return flags + (["--tiny"] if args.tiny else [])

    def run_child(arm: str, batch: int, seq: int, data: str = "random") -> dict[str, object]:
        """One arm in a fresh process, so each starts with an empty GPU."""
        cmd = [
            sys.executable,
            __file__,
            *("--arm", arm.partition("@")[0], "--batch", str(batch), "--seq", str(seq)),
            *("--data", data),
            *("--workdir", str(workdir), "--steps", str(args.steps)),
            *("--warmup", str(args.warmup)),
            *arm_flags(arm),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is not None:
            result: dict[str, object] = json.loads(line[len("RESULT ") :])
            result["arm"] = arm
            return result
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"arm {arm} {batch}x{seq} ({data}) failed:\n{tail}", file=sys.stderr)
        return {"arm": arm, "batch": batch, "seq": seq, "data": data, "error": tail}

    rows = []
    for shape in args.shapes.split(","):
        batch, seq = (int(v) for v in shape.split("x"))
        rows.extend(run_child(arm, batch, seq) for arm in arms)
    if args.real_data_arm and (build == "checkpoint" or args.real_data_arm == "c"):
        batch, seq = (int(v) for v in args.shapes.split(",")[-1].split("x"))
        for layout in ("padded", "packed"):
            rows.append(run_child(args.real_data_arm, batch, seq, layout))
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    meta = {
        "card": card,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "layers": args.layers,
        "tiny": args.tiny,
        "build": build,
    }
    print(
        f"{card} | torch {torch.__version__} | transformers {transformers.__version__} | {meta['date']}"
    )
    print(
        f"{'arm':<7}{'data':<8}{'B×T':>9}{'tok/s':>11}{'real tok/s':>12}{'peak GiB':>10}{'MFU':>7}"
        f"{'LoRA tensors':>14}{'no grad':>9}{'chunked':>9}{'build s':>9}{'weights GiB':>13}"
    )
    for r in rows:
        data = r.get("data", "random")
        if "error" in r:
            print(f"{r['arm']:<7}{data:<8}{r['batch']:>4}x{r['seq']:<4}   failed")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        weights = f"{r['weights_gib']:.1f}" if r["weights_gib"] is not None else "-"
        print(
            f"{r['arm']:<7}{data:<8}{r['batch']:>4}x{r['seq']:<4}{r['tokens_per_s']:>11,.0f}"
            f"{r['real_tokens_per_s']:>12,.0f}{peak:>10}{r['mfu']:>7.1%}"
            f"{r['trainable_tensors']:>14}{r['tensors_without_grad']:>9}"
            f"{'yes' if r['chunked_loss'] else 'no':>9}{r['build_s']:>9.1f}"
            f"{weights:>13}"
        )
    for r in rows:
        if r.get("profile"):
            print(
                f"\nprofile, arm {r['arm']} {r['batch']}x{r['seq']} ({r.get('data')}): ms/step, calls"
            )
            for p in r["profile"][:15]:  # type: ignore[index]
                print(f"  {p['ms_per_step']:>9.2f} {p['calls']:>6}  {p['name']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
