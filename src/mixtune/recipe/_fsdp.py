"""FSDP2 for 4-bit models: shard the packed weights, gather the LoRA factors.

DDP keeps the whole 4-bit model on every GPU; a model whose 4-bit weights
do not fit one card (Mixtral-8x22B is about 70 GB in NF4) needs them split
between the GPUs. PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``)
splits the *parameters* of a module between the ranks as ``DTensor`` shards,
all-gathers a decoder layer's parameters just before its forward (and again
before its backward) and frees them right after, so each rank holds about
``1/N`` of the weights plus one layer in full.

mixtune keeps its 4-bit weights in :class:`~mixtune.model.Packed4bit`
*buffers*, which FSDP2 leaves whole on every rank. :func:`make_4bit_shardable`
re-registers their two large tensors, ``data`` (the packed nibbles, uint8)
and ``absmax`` (the per-block scales), as frozen parameters of the same
name. Integer tensors are held as a bfloat16 *view* of the same bytes
(``Packed4bit.raw`` views them back): FSDP2 in torch 2.11 wraps every shard
in ``nn.Parameter(...)`` with its default ``requires_grad=True`` before
freezing it, which integer dtypes refuse (seen on the GPU machine; torch
2.13 accepts uint8). FSDP2 is not given a mixed-precision policy, so the
view is never cast. Both are ``(count, n)`` tensors whose first
dimension is the number of experts (1 for a linear layer), so
:func:`shard_model` splits them on dimension 1, which every rank gets an
even share of. The small quantization state (``absmax2``, ``offset``,
``code2``) stays in replicated buffers.

What is sharded and what is not:

- every decoder layer (attention, router, experts, norms, and their LoRA
  factors) is one FSDP2 unit; the decoder body (``model.model``: embeddings
  and final norm) is the root unit;
- ``lm_head`` stays whole on every rank: the chunked loss calls it directly,
  outside the body's forward, where FSDP2 could not gather it. So LoRA on
  ``lm_head`` cannot be trained sharded (:func:`shard_model` says so).

The LoRA factors are ``DTensor`` shards after sharding: checkpoints and the
published adapter need them whole, which :func:`full_lora_state_dict` and
:func:`gathered_lora` provide (collectives: every rank must call them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from mixtune.errors import ConfigError
from mixtune.model import Packed4bit

__all__ = [
    "full_lora_state_dict",
    "gathered_lora",
    "has_sharded_lora",
    "is_sharded",
    "load_full_lora_state_dict",
    "local_bytes",
    "make_4bit_shardable",
    "packed_4bit_bytes",
    "reshard_all",
    "shard_model",
]

#: The Packed4bit tensors that scale with the model and so are sharded.
SHARDED_4BIT = ("data", "absmax")


def make_4bit_shardable(model: nn.Module) -> int:
    """Turn the large buffers of every :class:`~mixtune.model.Packed4bit` into frozen parameters.

    ``data`` and ``absmax`` keep their name, device and bytes; they become
    ``nn.Parameter(requires_grad=False)`` so that FSDP2 shards them, uint8
    ones as a bfloat16 view of the same bytes (an odd-length uint8 row,
    which cannot be viewed so, stays a replicated buffer). Calling it again
    does nothing.

    Args:
        model: Any module; its Packed4bit submodules are changed in place.

    Returns:
        How many tensors were re-registered by this call.
    """
    moved = 0
    for module in model.modules():
        if not isinstance(module, Packed4bit):
            continue
        for name in SHARDED_4BIT:
            if name not in module._buffers:
                continue
            tensor = module._buffers.get(name)
            if tensor is None:
                continue
            if tensor.dtype == torch.uint8:
                if tensor.shape[-1] % 2:
                    continue
                tensor = tensor.view(torch.bfloat16)
            del module._buffers[name]
            module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
            moved += 1
    return moved


def _packed_ids(model: nn.Module) -> set[int]:
    return {
        id(p)
        for module in model.modules()
        if isinstance(module, Packed4bit)
        for p in module.parameters(recurse=False)
    }


def _decoder(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if not isinstance(body, nn.Module) or not isinstance(layers, nn.ModuleList):
        raise ConfigError(
            f"sharding='fsdp2' needs a transformers causal LM with .model.layers (a decoder "
            f"body and its layers); got {type(model).__name__}. Use sharding='ddp'"
        )
    return body, layers


def shard_model(
    model: nn.Module,
    *,
    device: torch.device | str | None = None,
    mesh: Any = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard a (4-bit, LoRA-adapted) causal LM over the ranks with FSDP2, in place.

    Each decoder layer becomes one FSDP2 unit, then the decoder body
    (``model.model``) the root. The 4-bit tensors are split on their
    second dimension (``data`` and ``absmax``), every other parameter on its
    first; ``lm_head`` and the buffers stay whole on every rank. Call it
    after the adapter is applied and before the optimizer is created, on
    every rank.

    The model may sit on this rank's GPU already or still on the CPU (loaded
    with ``device_map="cpu"``): with ``device`` a GPU, FSDP2 moves one layer
    at a time there and keeps only this rank's share of it, so the GPU never
    holds the whole model, only the CPU does (once per process).

    Args:
        model: A transformers ``*ForCausalLM`` (``.model.layers``).
        device: Where the shards live: this rank's device, i.e. the current
            CUDA device for a GPU (default: where the model's parameters are).
            What stays whole (``lm_head``) is moved there too.
        mesh: A 1-D ``DeviceMesh`` (default: all ranks, on ``device``'s type).
        reshard_after_forward: Free each layer's gathered weights after its
            forward (gathered again for backward); False trades memory for
            one all-gather per layer and step.

    Returns:
        ``model`` itself (its layers' classes now also derive from ``FSDPModule``).

    Raises:
        ConfigError: If no process group is initialised, the model has no
            decoder layers, or a trainable parameter lies outside the
            decoder body (LoRA on ``lm_head``).
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            "sharding='fsdp2' needs a process group: launch with torchrun or accelerate "
            "launch (see docs/howto/multi-gpu.md)"
        )
    body, layers = _decoder(model)
    inside = {id(p) for p in body.parameters()}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        shown = ", ".join(outside[:4]) + (" …" if len(outside) > 4 else "")
        raise ConfigError(
            f"sharding='fsdp2' trains only LoRA inside the decoder layers, but {shown} "
            "lie outside them (lm_head stays unsharded); drop 'lm_head' from the "
            "AdapterSpec targets or use sharding='ddp'"
        )
    if is_sharded(model):
        return model
    make_4bit_shardable(model)
    packed = _packed_ids(model)

    def placement(param: nn.Parameter) -> Any:
        # Dimension 0 is the expert count (1 for a linear layer), which would
        # leave all but one rank empty; dimension 1 splits evenly.
        return Shard(1) if id(param) in packed else None

    target = torch.device(device) if device is not None else next(model.parameters()).device
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(target.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(
            layer,
            mesh=mesh,
            reshard_after_forward=reshard_after_forward,
            shard_placement_fn=placement,
        )
    body_class = type(body)
    fully_shard(body, mesh=mesh, shard_placement_fn=placement)
    _keep_output_recording(body_class, type(body))
    # fully_shard moved what it manages; the rest (lm_head) follows. The
    # sharded body must not be moved again (.to() cannot swap DTensors).
    for child in model.children():
        if child is not body:
            child.to(target)
    return model


def _keep_output_recording(old: type, new: type) -> None:
    """Let the FSDP2 subclass of the decoder body still return router logits.

    transformers records ``router_logits`` (and hidden states) through hooks
    chosen from a registry keyed by the model's class *name*; ``fully_shard``
    swaps the body's class for an ``FSDP<Name>`` subclass, which the registry
    does not know, and the router logits (so the load-balancing loss and the
    routing statistics) would silently vanish. The entry is copied to the new
    class. The registry is a dict keyed by ``str(cls)`` in transformers 5.17
    and later (a subclass in newer ones, read and written as a plain dict here).
    """
    try:
        from transformers.utils import output_capturing
    except ImportError:  # pragma: no cover - older layouts record without a registry
        return
    registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
    if not isinstance(registry, dict):  # pragma: no cover - layout changed
        return
    flags = dict.get(registry, str(old))
    if flags is not None:
        dict.__setitem__(registry, str(new), flags)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (FSDP2-sharded).

    Args:
        model: Any module.

    Returns:
        True if :func:`shard_model` (or another FSDP2 user) sharded it.
    """
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def local_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers this rank holds (its shards only).

    Args:
        model: Any module.

    Returns:
        The byte count.
    """
    tensors = [_local(p) for p in model.parameters()] + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def packed_4bit_bytes(model: nn.Module) -> int:
    """Bytes of 4-bit storage (every Packed4bit tensor) this rank holds.

    Args:
        model: Any module.

    Returns:
        The byte count; about ``1/N`` of the unsharded count after
        :func:`shard_model` on N ranks.
    """
    total = 0
    for module in model.modules():
        if isinstance(module, Packed4bit):
            tensors = [_local(p) for p in module.parameters(recurse=False)]
            tensors += list(module.buffers(recurse=False))
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def reshard_all(model: nn.Module) -> None:
    """Free gathered weights left by a forward outside training.

    FSDP2's root unit keeps its parameters gathered after a forward (the
    backward would need them at once); after an evaluation nothing will, so
    they are split again.

    Args:
        model: A model sharded by :func:`shard_model` (anything else is left alone).
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _named_lora(adapted: Any) -> dict[str, torch.Tensor]:
    """The LoRA parameters under their ``lora_state_dict`` names (module paths)."""
    params = dict(adapted.model.named_parameters())
    missing = [name for name in adapted.lora_state_dict() if name not in params]
    if missing:
        raise ConfigError(
            f"the adapter's LoRA names are not module paths of its model ({missing[:3]}); "
            "sharding='fsdp2' needs a mixtune AdaptedModel"
        )
    return {name: params[name] for name in adapted.lora_state_dict()}


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr


def full_lora_state_dict(adapted: Any) -> dict[str, torch.Tensor]:
    """The whole LoRA factors on every rank, on the CPU (a collective).

    Args:
        adapted: An ``AdaptedModel`` (sharded or not).

    Returns:
        Name → full tensor, as ``AdaptedModel.lora_state_dict`` names them;
        fresh CPU copies.
    """
    from torch.distributed.tensor import DTensor

    out = {}
    # Every rank walks the same names in the same order, so the all-gathers pair up.
    for name, tensor in adapted.lora_state_dict().items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        out[name] = full.detach().to("cpu", copy=True)
    return out


def load_full_lora_state_dict(adapted: Any, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load whole LoRA factors into a (possibly sharded) adapted model (a collective).

    Each rank keeps its own shard of every factor.

    Args:
        adapted: An ``AdaptedModel``.
        state_dict: Name → full tensor, as :func:`full_lora_state_dict` gives.

    Raises:
        AdapterError: If names or shapes do not fit (from ``load_lora_state_dict``).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = _named_lora(adapted)
    ready: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        param = params.get(name)
        if isinstance(param, DTensor) and tuple(param.shape) == tuple(tensor.shape):
            local = tensor.to(device=param.device, dtype=param.dtype)
            ready[name] = distribute_tensor(local, param.device_mesh, param.placements)
        else:
            ready[name] = tensor
    adapted.load_lora_state_dict(ready)


def has_sharded_lora(adapted: Any) -> bool:
    """Whether any LoRA factor of ``adapted`` is an FSDP2 shard (a ``DTensor``).

    Args:
        adapted: An ``AdaptedModel``.

    Returns:
        True after ``Recipe.fit`` with ``sharding="fsdp2"`` on several ranks.
    """
    from torch.distributed.tensor import DTensor

    state = getattr(adapted, "lora_state_dict", None)
    if not callable(state):
        return False
    return any(isinstance(t, DTensor) for t in state().values())


@contextlib.contextmanager
def gathered_lora(adapted: Any) -> Iterator[None]:
    """Within the block, the LoRA factors are whole, plain parameters (a collective).

    Code that reads the factors from the modules (``save_peft``,
    ``lora_state_dict``) then sees full tensors on every rank; on exit the
    shards are put back untouched, so training state is unchanged. Run no
    forward inside the block.

    Args:
        adapted: An ``AdaptedModel``; a model that is not sharded is left as is.

    Yields:
        Nothing.
    """
    from torch.distributed.tensor import DTensor

    # The sharded parameters themselves go back on exit (FSDP2 holds them).
    swapped: list[tuple[nn.Module, str, Any]] = []
    try:
        for name, param in _named_lora(adapted).items():
            if not isinstance(param, DTensor):
                continue
            module, attr = _owner(adapted.model, name)
            full = param.full_tensor().detach()
            swapped.append((module, attr, param))
            module._parameters[attr] = nn.Parameter(full, requires_grad=param.requires_grad)
        yield
    finally:
        for module, attr, param in swapped:
            module._parameters[attr] = param
