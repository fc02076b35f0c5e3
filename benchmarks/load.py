"""Memory of a 4-bit Mixtral load: mixtune vs transformers + bitsandbytes.

Writes a seeded random Mixtral-8x7B-width checkpoint (2 layers by default,
~5.6 GB bf16) with ``mixtune.model.random_checkpoint``, then loads it twice,
each in a fresh subprocess so peak host RSS is its own:

* mixtune: ``load_quantized(path, quant=QuantSpec.nf4(), device_map=...)``;
* stock: ``AutoModelForCausalLM.from_pretrained(path, quantization_config=
  BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, bf16 compute))``.

Reports weight bytes (mixtune: the census; stock: parameters and buffers by
dtype, Params4bit as 4-bit), the 32-layer extrapolation, peak GPU memory
during the load (``torch.cuda.max_memory_allocated``) and peak host RSS.
Prints a table and writes JSON (default ``benchmarks/results/load.json``).

    python benchmarks/load.py                  # GPU, Mixtral-8x7B width
    python benchmarks/load.py --tiny           # CPU smoke check
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GIB = 2**30
GOAL_SLICE_GIB = 1.9
GOAL_FULL_GIB = 24.0
FULL_LAYERS = 32


def _config(tiny: bool, layers: int) -> Any:
    from mixtune.model import mixtral_8x7b_config, tiny_config

    return tiny_config(num_hidden_layers=layers) if tiny else mixtral_8x7b_config(layers)


def _peak_rss() -> int:
    # ru_maxrss is in KiB on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return requested


def _reset_gpu(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak(device: str) -> int | None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    return None


def _extrapolate(per_layer: float, rest: float, layers: int = FULL_LAYERS) -> float:
    return rest + per_layer * layers


def _warm_imports(device: str) -> None:
    """Import what both paths import lazily and start CUDA, so load_seconds is the load alone."""
    import bitsandbytes  # noqa: F401
    import torch
    from transformers import BitsAndBytesConfig, MixtralForCausalLM  # noqa: F401

    if device.startswith("cuda"):
        torch.zeros(1, device=device)


def worker_mixtune(path: Path, device: str, layers: int) -> dict[str, Any]:
    import torch

    from mixtune.model import QuantSpec, load_quantized

    _warm_imports(device)
    _reset_gpu(device)
    start = time.perf_counter()
    loaded = load_quantized(path, quant=QuantSpec.nf4(), device_map=device, progress=False)
    seconds = time.perf_counter() - start
    census = loaded.census()
    per_layer = (
        sum(census.bytes(kind=k) for k in ("attention", "experts", "router", "norms", "mlp"))
        / layers
    )
    rest = census.total_bytes - per_layer * layers
    ids = torch.randint(0, loaded.config.vocab_size, (1, 16), device=device)
    with torch.no_grad():
        finite = bool(torch.isfinite(loaded.model(ids).logits).all())
    return {
        "weight_bytes": census.total_bytes,
        "by_storage": census.by_storage(),
        "by_kind": census.by_kind(),
        "per_layer_bytes": per_layer,
        "extrapolated_32_layers_bytes": _extrapolate(per_layer, rest),
        "peak_gpu_bytes": _gpu_peak(device),
        "peak_rss_bytes": _peak_rss(),
        "load_seconds": seconds,
        "note": "load_seconds excludes imports and CUDA start-up",
        "logits_finite": finite,
        "table": census.table(),
    }


def worker_stock(path: Path, device: str, layers: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _warm_imports(device)
    _reset_gpu(device)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        device_map=device,
    )
    seconds = time.perf_counter() - start
    by_dtype: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        storage = (
            "4-bit" if type(t).__name__ == "Params4bit" else str(t.dtype).removeprefix("torch.")
        )
        size = t.numel() * t.element_size()
        by_dtype[storage] = by_dtype.get(storage, 0) + size
        kind = "experts" if ".experts." in name else name.split(".")[-2]
        by_kind[kind] = by_kind.get(kind, 0) + size
    total = sum(by_dtype.values())
    nonlayer = sum(
        t.numel() * t.element_size()
        for n, t in model.named_parameters()
        if not n.startswith("model.layers.")
    )
    per_layer = (total - nonlayer) / layers
    return {
        "weight_bytes": total,
        "by_storage": by_dtype,
        "experts_bytes": sum(
            t.numel() * t.element_size() for n, t in model.named_parameters() if ".experts." in n
        ),
        "per_layer_bytes": per_layer,
        "extrapolated_32_layers_bytes": _extrapolate(per_layer, nonlayer),
        "peak_gpu_bytes": _gpu_peak(device),
        "peak_rss_bytes": _peak_rss(),
        "load_seconds": seconds,
        "note": "load_seconds excludes imports and CUDA start-up; bitsandbytes quantization state (absmax) is not a parameter/buffer and is not counted",
    }


def _run_worker(which: str, args: argparse.Namespace, path: Path, device: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        which,
        "--path",
        str(path),
        "--device",
        device,
        "--layers",
        str(args.layers),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _versions(device: str) -> dict[str, Any]:
    import torch
    import transformers

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except Exception as exc:  # report, do not fail: the mixtune path says why
        bnb = f"unavailable ({type(exc).__name__})"
    card = (
        torch.cuda.get_device_name(device)
        if device.startswith("cuda")
        else platform.processor() or "cpu"
    )
    return {
        "card": card,
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bnb,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke check)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "load.json"
    )
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--worker", choices=["mixtune", "stock"], help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        fn = worker_mixtune if args.worker == "mixtune" else worker_stock
        print(json.dumps(fn(args.path, args.device, args.layers)))
        return

    from mixtune.model import random_checkpoint

    device = "cpu" if args.tiny and args.device == "auto" else _device(args.device)
    name = f"mixtune-bench-{'tiny' if args.tiny else '8x7b'}-{args.layers}l"
    path = args.workdir / name
    start = time.perf_counter()
    random_checkpoint(_config(args.tiny, args.layers), path)
    write_seconds = time.perf_counter() - start
    checkpoint_bytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))

    results: dict[str, Any] = {
        **_versions(device),
        "model": "tiny mixtral" if args.tiny else "Mixtral-8x7B width",
        "layers": args.layers,
        "checkpoint_bytes": checkpoint_bytes,
        "checkpoint_write_seconds": write_seconds,
        "goals_gib": {"slice": GOAL_SLICE_GIB, "full_32_layers": GOAL_FULL_GIB},
        "mixtune": _run_worker("mixtune", args, path, device),
    }
    if not args.skip_stock:
        results["stock"] = _run_worker("stock", args, path, device)

    print(f"{results['model']}, {args.layers} layers on {results['card']} ({device})")
    print(f"checkpoint: {_fmt(checkpoint_bytes)} GiB bf16, written in {write_seconds:.1f} s")
    rows = [
        ("", "weights GiB", f"{FULL_LAYERS}-layer GiB", "peak GPU GiB", "peak RSS GiB", "load s")
    ]
    for key in ("mixtune", "stock"):
        r = results.get(key)
        if r is None:
            continue
        if "error" in r:
            rows.append((key, "error: " + r["error"][:60], "", "", "", ""))
            continue
        rows.append(
            (
                key,
                _fmt(r["weight_bytes"]),
                _fmt(r["extrapolated_32_layers_bytes"]),
                _fmt(r["peak_gpu_bytes"]),
                _fmt(r["peak_rss_bytes"]),
                f"{r['load_seconds']:.1f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    mix = results["mixtune"]
    if "error" not in mix:
        print(mix["table"])
        if not args.tiny:
            ok_slice = mix["weight_bytes"] <= GOAL_SLICE_GIB * GIB
            ok_full = mix["extrapolated_32_layers_bytes"] <= GOAL_FULL_GIB * GIB
            print(
                f"goal slice <= {GOAL_SLICE_GIB} GiB: {'met' if ok_slice else 'MISSED'}; "
                f"32 layers <= {GOAL_FULL_GIB} GiB: {'met' if ok_full else 'MISSED'}"
            )
            results["goals_met"] = {"slice": ok_slice, "full_32_layers": ok_full}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
