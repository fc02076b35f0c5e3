"""``load_quantized``: stream a checkpoint into a model with 4-bit attention and experts.

The model skeleton is built on the meta device (no memory), mixtune's modules
are swapped in on the target device, and then the checkpoint is read tensor by
tensor (copied into fresh buffers, never memory-mapped); expert matrices are quantized as they
arrive, one expert at a time. The full-precision model is never resident:
peak memory is the final (4-bit) size plus one expert matrix in flight.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import attrs
import torch
from torch import nn

from mixtune.errors import (
    ConfigError,
    ModelLoadError,
    OfflineError,
    QuantizationUnavailableError,
    TokenizerError,
    UnsupportedModelError,
)
from mixtune.model._census import Census, census, module_kind
from mixtune.model._experts import ExpertKind, MoEExperts
from mixtune.model._linear import QuantEmbedding, QuantLinear
from mixtune.model._quant import QuantSpec, require_4bit
from mixtune.model._random import DENSE_TYPES, MOE_TYPES, SUPPORTED_TYPES
from mixtune.model._safetensors import SafetensorsReader

__all__ = ["LoadedModel", "load_quantized"]

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# What a hub download fetches: the transformers-format weights, config and
# tokenizer, never Mistral's own consolidated.safetensors duplicate.
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
]
# The default spec (specs are frozen, so one shared instance is safe).
NF4 = QuantSpec.nf4()
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

_ORIG_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$"
)
_ORIG_ROUTER = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$")
_FUSED_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


@attrs.frozen(eq=False, repr=False)
class LoadedModel:
    """A loaded model and what it was loaded from.

    Attributes:
        model: The transformers ``*ForCausalLM``; for MoE models every
            ``model.layers[i].mlp.experts`` is a :class:`MoEExperts`, and under
            a 4-bit spec attention (and dense MLP) projections are
            :class:`QuantLinear`. All base weights are frozen.
        tokenizer: The tokenizer passed in or found beside the weights, or None.
        quant: How the base weights are stored.
        source: The path or hub id it came from.
        config: The transformers config.
        device: Where the weights live.
        dtype: dtype of the weights kept in high precision.
    """

    model: Any
    tokenizer: Any
    quant: QuantSpec
    source: str
    config: Any
    device: torch.device
    dtype: torch.dtype

    @property
    def is_moe(self) -> bool:
        """Whether the model has experts."""
        return bool(self.config.model_type in MOE_TYPES)

    def __repr__(self) -> str:
        # The default would print the whole module tree and the tokenizer.
        return (
            f"LoadedModel(source={self.source!r}, model={type(self.model).__name__}, "
            f"quant={self.quant!r}, device={str(self.device)!r}, dtype={self.dtype}, "
            f"tokenizer={'yes' if self.tokenizer is not None else 'none'})"
        )

    def census(self) -> Census:
        """Bytes by module kind and storage (see :func:`census`).

        Returns:
            The census of ``self.model``.
        """
        return census(self.model)


# --------------------------------------------------------------------------- sources


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or os.path.isabs(text)
    )


def _resolve_source(model_id_or_path: str | os.PathLike[str]) -> Path:
    text = os.fspath(model_id_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"{path} is a file; pass the checkpoint folder that holds config.json and the safetensors"
            )
        return path
    if isinstance(model_id_or_path, os.PathLike) or _looks_like_path(text):
        raise ModelLoadError(f"checkpoint folder {path} does not exist")
    return _download(text)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ModelLoadError(
            f"{repo_id!r} is not a local folder and huggingface_hub is not installed to fetch it"
        ) from exc
    offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
    try:
        folder = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline)
    except LocalEntryNotFoundError as exc:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise OfflineError(
            f"cannot fetch {repo_id!r} from the Hugging Face Hub ({why}) and it is not in the local "
            "cache; download it while online (`hf download "
            f"{repo_id}`) or pass a local checkpoint folder"
        ) from exc
    except GatedRepoError as exc:
        raise ModelLoadError(
            f"{repo_id!r} is gated: accept its licence on the Hub and log in (`hf auth login`)"
        ) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as exc:
        raise ModelLoadError(
            f"{repo_id!r} is neither a local folder nor a Hub model id that exists "
            f"({type(exc).__name__}); check the spelling or pass a local path"
        ) from exc
    except (OSError, ConnectionError) as exc:
        raise OfflineError(
            f"downloading {repo_id!r} failed ({type(exc).__name__}: {exc}); check the network "
            "or pass a local checkpoint folder"
        ) from exc
    return Path(str(folder))


def _weight_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name of the checkpoint to the file that holds it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(
                f"{index} is not a valid safetensors index (needs a 'weight_map' object): {exc}"
            ) from exc
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise ModelLoadError(
                f"{index} lists shard(s) missing from {folder}: {', '.join(missing)}; "
                "re-download the checkpoint"
            )
        return {k: folder / f for k, f in weight_map.items()}
    single = folder / "model.safetensors"
    files = (
        [single]
        if single.is_file()
        else sorted(
            p for p in folder.glob("*.safetensors") if not p.name.startswith("consolidated")
        )
    )
    if not files:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        hint = (
            f" (found PyTorch pickles {', '.join(bins)}; mixtune reads only safetensors: "
            "re-save with model.save_pretrained(dest, safe_serialization=True))"
            if bins
            else ""
        )
        raise ModelLoadError(f"no safetensors weights in {folder}{hint}")
    out: dict[str, Path] = {}
    for path in files:
        with SafetensorsReader(path) as reader:
            out.update(dict.fromkeys(reader.keys(), path))
    return out


def _load_config(folder: Path) -> Any:
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json; it is not a transformers checkpoint")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{folder / 'config.json'} is not valid JSON: {exc}") from exc
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"{folder / 'config.json'} has model_type {model_type!r}; mixtune supports "
            f"{', '.join(SUPPORTED_TYPES)} (MoE: {', '.join(MOE_TYPES)}; dense: {', '.join(DENSE_TYPES)})"
        )
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {exc}") from exc


def resolve_device(device_map: Any) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    given: object = device_map  # checked at run time: callers may pass anything
    if isinstance(given, bool) or not isinstance(given, (str, int, torch.device)):
        raise ConfigError(
            f"device_map={device_map!r}: mixtune places the whole model on one device; pass "
            "'auto', 'cpu', 'cuda', 'cuda:N', an int GPU index or a torch.device"
        )
    try:
        device = (
            torch.device("cuda", device_map)
            if isinstance(device_map, int)
            else torch.device(device_map)
        )
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"device_map={device_map!r} is not a device: {exc}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device_map={device_map!r} but no CUDA device is available; use 'cpu' or 'auto'"
            )
        given_index = cast("int | None", device.index)  # None for a bare "cuda"
        index = torch.cuda.current_device() if given_index is None else given_index
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device_map={device_map!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return torch.device("cuda", index)
    return device


def _load_tokenizer(folder: Path, tokenizer: Any) -> Any:
    if tokenizer is not None:
        return tokenizer
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise TokenizerError(
            f"the tokenizer files in {folder} could not be loaded ({type(exc).__name__}: {exc}); "
            "pass tokenizer=... to load_quantized"
        ) from exc


# --------------------------------------------------------------------------- skeleton


def _experts_module(
    config: Any, quant: QuantSpec, dtype: torch.dtype, device: torch.device
) -> MoEExperts:
    """The experts of one layer: 4-bit storage under a 4-bit spec."""
    return MoEExperts.from_config(config, quant=quant, dtype=dtype, device=device)


def _linear_module(
    linear: nn.Linear, quant: QuantSpec, dtype: torch.dtype, device: torch.device
) -> QuantLinear:
    return QuantLinear(
        linear.in_features,
        linear.out_features,
        quant=quant,
        bias=linear.bias is not None,
        dtype=dtype,
        device=device,
    )


def build_skeleton(
    config: Any, quant: QuantSpec, dtype: torch.dtype, device: torch.device
) -> tuple[nn.Module, set[str]]:
    """A meta-device model with mixtune modules swapped in; returns it and the load targets."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model: nn.Module = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    moe = config.model_type in MOE_TYPES
    for layer in model.model.layers:  # type: ignore[union-attr]
        if moe:
            layer.mlp.experts = _experts_module(config, quant, dtype, device)
        if quant.is_4bit:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(
                    layer.self_attn,
                    proj,
                    _linear_module(getattr(layer.self_attn, proj), quant, dtype, device),
                )
            if not moe:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    setattr(
                        layer.mlp,
                        proj,
                        _linear_module(getattr(layer.mlp, proj), quant, dtype, device),
                    )
    if quant.quantize_lm_head:
        model.lm_head = _linear_module(model.lm_head, quant, dtype, device)  # type: ignore[arg-type]
    if quant.quantize_embeddings:
        old = cast(nn.Embedding, model.model.embed_tokens)  # type: ignore[union-attr]
        model.model.embed_tokens = QuantEmbedding(  # type: ignore[union-attr]
            old.num_embeddings,
            old.embedding_dim,
            quant=quant,
            padding_idx=old.padding_idx,
            device=device,
        )
    targets: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, MoEExperts):
            for e in range(module.num_experts):
                targets.update({f"{name}.gate_up[{e}]", f"{name}.down[{e}]"})
        elif isinstance(module, (QuantLinear, QuantEmbedding)):
            targets.add(f"{name}.weight")
            if getattr(module, "bias", None) is not None:
                targets.add(f"{name}.bias")
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.is_meta:
            targets.add(name)
    return model, targets


# --------------------------------------------------------------------------- streaming


@attrs.define
class Loader:
    model: nn.Module
    device: torch.device
    dtype: torch.dtype
    filled: set[str] = attrs.field(factory=set)

    def assign(self, name: str, tensor: torch.Tensor) -> None:
        """Put a checkpoint tensor (already mapped to a model name) into the model."""
        module_path, _, attr = name.rpartition(".")
        try:
            module = self.model.get_submodule(module_path)
        except AttributeError as exc:
            raise ModelLoadError(
                f"checkpoint tensor {name!r} matches no module of the model"
            ) from exc
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            try:
                if attr == "weight":
                    module.set_weight(tensor)
                elif attr == "bias" and isinstance(module, QuantLinear):
                    module.set_bias(tensor)
                else:
                    raise ValueError(f"unexpected tensor {attr!r}")
            except ValueError as exc:
                raise ModelLoadError(f"checkpoint tensor {name!r}: {exc}") from exc
        else:
            current = module._parameters.get(attr)
            if current is None:
                raise ModelLoadError(
                    f"checkpoint tensor {name!r} matches no parameter of the model"
                )
            if tuple(current.shape) != tuple(tensor.shape):
                raise ModelLoadError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, the config "
                    f"expects {tuple(current.shape)}; config.json and the weights disagree"
                )
            value = tensor.to(
                device=self.device, dtype=self.dtype if tensor.is_floating_point() else None
            )
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        self.filled.add(name)

    def accepts(self, name: str) -> bool:
        """Whether a (mapped) checkpoint name has a place in the model."""
        module_path, _, attr = name.rpartition(".")
        try:
            module = self.model.get_submodule(module_path)
        except AttributeError:
            return False
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            return attr == "weight" or (
                attr == "bias" and getattr(module, "bias", None) is not None
            )
        return module._parameters.get(attr) is not None

    def experts(self, layer: int) -> MoEExperts:
        module = self.model.get_submodule(f"model.layers.{layer}.mlp.experts")
        assert isinstance(module, MoEExperts)
        return module

    def set_expert(
        self, layer: int, kind: ExpertKind, expert: int, tensor: torch.Tensor, key: str
    ) -> None:
        module = self.experts(layer)
        if expert >= module.num_experts:
            raise ModelLoadError(
                f"checkpoint tensor {key!r} is for expert {expert}, but the config has "
                f"num_local_experts={module.num_experts}"
            )
        try:
            module.set_weight(kind, expert, tensor)
        except ValueError as exc:
            raise ModelLoadError(
                f"checkpoint tensor {key!r}: {exc}; config.json and the weights disagree"
            ) from exc
        self.filled.add(f"model.layers.{layer}.mlp.experts.{kind}[{expert}]")


def _plan_keys(
    keys: list[str], moe: bool, num_layers: int
) -> tuple[dict[int | None, dict[str, list[Any]]], list[str]]:
    """Group checkpoint keys by layer and by how they load; also list unknown keys."""
    groups: dict[int | None, dict[str, list[Any]]] = defaultdict(
        lambda: {"direct": [], "fused": [], "pieces": []}
    )
    unknown: list[str] = []
    for key in keys:
        if _IGNORED.search(key):
            continue
        layer_match = _LAYER.match(key)
        layer = int(layer_match.group(1)) if layer_match else None
        if layer is not None and layer >= num_layers:
            unknown.append(key)
            continue
        if moe and (m := _ORIG_EXPERT.match(key)):
            groups[layer]["pieces"].append((int(m.group(2)), m.group(3), key))
        elif moe and _FUSED_EXPERTS.match(key):
            groups[layer]["fused"].append(key)
        elif moe and (m := _ORIG_ROUTER.match(key)):
            groups[layer]["direct"].append((key, f"model.layers.{m.group(1)}.mlp.gate.weight"))
        else:
            groups[layer]["direct"].append((key, key))
    return groups, unknown


def _progress(total: int, enabled: bool | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc="mixtune: loading",
        unit="layer",
        disable=None if enabled is None else not enabled,
    )


def _stream(
    loader: Loader,
    files: dict[str, Path],
    config: Any,
    quant: QuantSpec,
    progress: bool | None,
) -> None:
    moe = config.model_type in MOE_TYPES
    num_layers = int(config.num_hidden_layers)
    groups, unknown = _plan_keys(sorted(files), moe, num_layers)
    unknown += [
        key for g in groups.values() for key, name in g["direct"] if not loader.accepts(name)
    ]
    if unknown:
        shown = ", ".join(unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise ModelLoadError(
            f"the checkpoint holds tensors that do not fit a {config.model_type} model with "
            f"{num_layers} layers: {shown}; check that config.json belongs to these weights"
        )
    tie = bool(getattr(config, "tie_word_embeddings", False)) and "lm_head.weight" not in files
    order = [None, *range(num_layers)]
    with ExitStack() as stack:
        readers = _Readers(files, stack)
        bar = _progress(len(order), progress)
        try:
            for layer in order:
                group = groups.get(layer)
                if group is not None:
                    _load_group(loader, group, layer, tie, quant, readers)
                bar.update(1)
        finally:
            bar.close()


@attrs.define
class _Readers:
    """Open each checkpoint file once, on first use."""

    files: dict[str, Path]
    stack: ExitStack
    open: dict[Path, SafetensorsReader] = attrs.field(factory=dict)

    def of(self, key: str) -> SafetensorsReader:
        path = self.files[key]
        if path not in self.open:
            self.open[path] = self.stack.enter_context(SafetensorsReader(path))
        return self.open[path]

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        return self.of(key).read(key, index)


def assign_direct(
    loader: Loader, name: str, tensor: torch.Tensor, tie: bool, quant: QuantSpec
) -> None:
    """Assign a non-expert tensor; with tied embeddings also fill ``lm_head``."""
    loader.assign(name, tensor)
    if tie and name == "model.embed_tokens.weight":
        if quant.quantize_lm_head or quant.quantize_embeddings:
            loader.assign("lm_head.weight", tensor)
        else:
            # Tied and both plain: share one tensor, like transformers does.
            loader.model.lm_head.weight = loader.model.model.embed_tokens.weight  # type: ignore[union-attr]
            loader.filled.add("lm_head.weight")


def _load_group(
    loader: Loader,
    group: dict[str, list[Any]],
    layer: int | None,
    tie: bool,
    quant: QuantSpec,
    readers: _Readers,
) -> None:
    for key, name in group["direct"]:
        tensor = readers.read(key)
        assign_direct(loader, name, tensor, tie, quant)
        del tensor
    if layer is None:
        return  # expert tensors always carry a layer index (see _plan_keys)
    for key in group["fused"]:
        kind: ExpertKind = "gate_up" if key.endswith("gate_up_proj") else "down"
        for e in range(readers.of(key).shape(key)[0]):
            # One expert in memory at a time: only that slice's bytes are read.
            loader.set_expert(layer, kind, e, readers.read(key, e), key)
    pieces: dict[int, dict[str, str]] = defaultdict(dict)
    for expert, w, key in group["pieces"]:
        pieces[expert][w] = key
    for expert, by_w in sorted(pieces.items()):
        if "w1" in by_w and "w3" in by_w:
            gate_up = torch.cat([readers.read(by_w["w1"]), readers.read(by_w["w3"])])
            loader.set_expert(layer, "gate_up", expert, gate_up, by_w["w1"])
            del gate_up
        if "w2" in by_w:
            loader.set_expert(layer, "down", expert, readers.read(by_w["w2"]), by_w["w2"])


def _rebuild_meta_buffers(model: nn.Module, config: Any, device: torch.device) -> None:
    """Re-create modules whose non-persistent buffers (rotary ``inv_freq``) are still on meta."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if "RotaryEmbedding" not in type(module).__name__:
            raise ModelLoadError(
                f"module {name!r} ({type(module).__name__}) has buffers mixtune cannot rebuild"
            )
        with torch.device(device):
            fresh = type(module)(config=config)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, fresh)


def _verify(model: nn.Module, quant: QuantSpec) -> None:
    """Refuse a model that a 4-bit spec left with high-precision weight matrices."""
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ModelLoadError(f"tensors were never loaded: {', '.join(meta[:10])}")
    if not quant.is_4bit:
        return
    kinds = {"attention", "experts", "mlp"}
    if quant.quantize_embeddings:
        kinds.add("embeddings")
    if quant.quantize_lm_head:
        kinds.add("lm_head")
    plain = census(model).high_precision_bytes(tuple(kinds))
    # Biases stay high precision on purpose; only weight matrices must be 4-bit.
    for name, t in model.named_parameters():
        if name.endswith(".bias") and module_kind(name) in plain:
            plain[module_kind(name)] -= t.numel() * t.element_size()
    plain = {k: v for k, v in plain.items() if v > 0}
    if plain:
        detail = ", ".join(f"{k}: {v / 2**20:.1f} MiB" for k, v in sorted(plain.items()))
        raise QuantizationUnavailableError(
            f"a {quant.method} load left weights in high precision ({detail}); the 4-bit "
            "conversion did not run for them. This is a mixtune bug or a patched quantizer; "
            "load with quant=QuantSpec.none() if you want high-precision weights"
        )


def check_load_args(quant: object, dtype: object) -> None:
    """Raise one ConfigError listing every problem of ``quant`` and ``dtype``."""
    problems = []
    if not isinstance(quant, QuantSpec):
        problems.append(f"quant={quant!r}: must be a QuantSpec (e.g. QuantSpec.nf4())")
    if dtype not in _FLOAT_DTYPES:
        problems.append(f"dtype={dtype!r}: must be torch.bfloat16, torch.float16 or torch.float32")
    if problems:
        raise ConfigError(problems)


def finish_model(
    loader: Loader, targets: set[str], config: Any, quant: QuantSpec, source: str
) -> None:
    """Check every target was filled, rebuild rotary buffers, freeze, verify the storage."""
    missing = sorted(targets - loader.filled)
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise ModelLoadError(f"{source} lacks {len(missing)} tensor(s) the config needs: {shown}")
    model = loader.model
    _rebuild_meta_buffers(model, config, loader.device)
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    _verify(model, quant)


def load_quantized(
    model_id_or_path: str | os.PathLike[str],
    *,
    quant: QuantSpec = NF4,
    dtype: torch.dtype = torch.bfloat16,
    device_map: str | int | torch.device | None = None,
    tokenizer: Any = None,
    progress: bool | None = None,
) -> LoadedModel:
    """Load a Mixtral (or dense Mistral/Llama) checkpoint with 4-bit base weights.

    Attention projections, dense MLPs **and the MoE experts** are stored in
    4 bits (unlike ``BitsAndBytesConfig(load_in_4bit=True)``, which leaves
    transformers 5's fused experts in bf16); router, norms, embeddings and
    lm_head stay in ``dtype`` unless the spec says otherwise. Both checkpoint
    layouts load (the hub's ``block_sparse_moe.experts.N.w1/w2/w3`` and the
    fused ``mlp.experts.gate_up_proj``/``down_proj``), single-file or sharded.
    Tensors are streamed one at a time, so the full-precision model is never
    in memory.

    Args:
        model_id_or_path: A local checkpoint folder or a Hugging Face Hub id
            (downloaded with ``huggingface_hub.snapshot_download``; honours
            ``HF_HUB_OFFLINE``).
        quant: Storage of the base weights (``QuantSpec.none()`` for plain LoRA).
        dtype: dtype of the weights kept in high precision.
        device_map: Where to put the whole model: None or ``"cpu"`` for the
            CPU, ``"cuda"``/``"cuda:N"``/an int for a GPU, ``"auto"`` for the
            first GPU if there is one, else the CPU.
        tokenizer: A tokenizer to attach; by default the checkpoint folder's
            own, if it has tokenizer files.
        progress: Show a progress bar (None: only on a terminal).

    Returns:
        The :class:`LoadedModel`, in eval mode, every base weight frozen.

    Raises:
        ConfigError: For a bad ``quant``, ``dtype`` or ``device_map``.
        ModelLoadError: For a missing folder, missing/unreadable files, or
            weights that do not match the config.
        OfflineError: For a hub id that cannot be fetched.
        UnsupportedModelError: For a ``model_type`` other than mixtral,
            mistral or llama.
        QuantizationUnavailableError: If 4-bit is asked where bitsandbytes
            cannot run.
        TokenizerError: If the folder's tokenizer files cannot be loaded.

    Example:
        >>> loaded = load_quantized(path)  # doctest: +SKIP
        >>> print(loaded.census())  # doctest: +SKIP
    """
    check_load_args(quant, dtype)
    device = resolve_device(device_map)
    folder = _resolve_source(model_id_or_path)
    config = _load_config(folder)
    files = _weight_files(folder)
    require_4bit(quant, device)
    tok = _load_tokenizer(folder, tokenizer)

    model, targets = build_skeleton(config, quant, dtype, device)
    loader = Loader(model, device, dtype)
    _stream(loader, files, config, quant, progress)
    finish_model(loader, targets, config, quant, f"the checkpoint in {folder}")
    return LoadedModel(
        model=model,
        tokenizer=tok,
        quant=quant,
        source=os.fspath(model_id_or_path),
        config=config,
        device=device,
        dtype=dtype,
    )


def iter_expert_modules(model: nn.Module) -> Iterator[tuple[str, MoEExperts]]:
    """Every :class:`MoEExperts` of a model with its qualified name.

    Args:
        model: A loaded model.

    Yields:
        ``(name, module)`` pairs.
    """
    for name, module in model.named_modules():
        if isinstance(module, MoEExperts):
            yield name, module
