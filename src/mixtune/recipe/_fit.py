"""``Recipe.fit``: the Hugging Face Trainer, told about mixtune's LoRA and checkpoints.

The Trainer runs the loop (optimizer, scheduler, accumulation, autocast,
gradient checkpointing, logging backends, seeded data order, RNG restore on
resume). mixtune replaces three of its parts through documented override
points of a subclass:

- checkpoints (``_save_checkpoint``/``_load_from_checkpoint``) hold only the
  LoRA weights plus optimizer/scheduler/RNG/trainer state and are written
  atomically (see :mod:`mixtune.recipe._checkpoint`);
- every micro-step's loss is checked (``training_step``), so a NaN stops the
  run at once with the step named, before it could be saved;
- evaluation is mixtune's own (plain LM loss and routing load).

Under ``accelerate launch``/``torchrun`` the Trainer wraps the model in DDP
and shards the training batches by rank; mixtune's own parts are made
rank-aware: rank 0 alone writes checkpoints (every rank adds its RNG state
first), evaluation splits the rows between ranks and all-reduces the sums,
the NaN check and the token count use the loss and tokens of all ranks, so
every rank stops at the same step.

With ``RunSettings(sharding="fsdp2")`` fit shards the model itself with
FSDP2 (:mod:`mixtune.recipe._fsdp`) and marks it prepared, so accelerate
adds only autocast and no DDP wrapper; checkpoints then gather the whole
LoRA factors and optimizer state to rank 0, evaluation runs the same number
of forwards on every rank (each one gathers weights from all of them), and
resume spreads them back. accelerate's own FSDP and DeepSpeed are refused.

The Trainer refuses to train "purely quantized" models that are not PEFT
models, but it recognises them only by transformers' ``hf_quantizer``/
``is_quantized`` markers, which ``load_quantized`` does not set (mixtune
quantizes with its own modules), so an adapted 4-bit model trains as is.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from mixtune.errors import CheckpointError, ConfigError, NonFiniteLossError, TrainingError
from mixtune.recipe._checkpoint import (
    checkpoint_world_size,
    complete_checkpoints,
    last_complete_checkpoint,
    load_adapter_weights,
    partial_checkpoint_dir,
    prune_checkpoints,
    write_checkpoint,
)
from mixtune.recipe._dist import (
    World,
    current_world,
    fsdp_or_deepspeed_requested,
    local_device,
)
from mixtune.recipe._eval import EvalStats, evaluate
from mixtune.recipe._fsdp import (
    full_lora_state_dict,
    load_full_lora_state_dict,
    local_bytes,
    reshard_all,
    shard_model,
)
from mixtune.recipe._loss import causal_lm_training_loss, model_inputs
from mixtune.recipe._preflight import check_preflight, estimate_memory
from mixtune.recipe._result import FitResult, LossPoint
from mixtune.recipe._spec import Recipe

__all__ = ["fit"]

# The Trainer's own file names, so a checkpoint looks the same either way.
_OPTIMIZER_FILE = "optimizer.pt"
_SCHEDULER_FILE = "scheduler.pt"


def _resolve_adapted(model: Any, adapter: Any, seed: int) -> Any:
    if hasattr(model, "lora_state_dict") and hasattr(model, "load_lora_state_dict"):
        if adapter is not None:
            raise ConfigError(
                "adapter: the model is already adapted; pass adapter=None or give the "
                "LoadedModel instead"
            )
        return model
    if adapter is None:
        raise ConfigError(
            "adapter: a LoadedModel needs an AdapterSpec to train, e.g. "
            "recipe.fit(loaded, corpus, AdapterSpec.qlora())"
        )
    if not hasattr(adapter, "apply"):
        raise ConfigError(f"adapter={adapter!r}: pass a mixtune.adapter.AdapterSpec")
    return adapter.apply(model, seed=seed)


def _resolve_device(recipe: Recipe) -> torch.device:
    want = recipe.run.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device='cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def _runtime_problems(recipe: Recipe, device: torch.device) -> tuple[str, bool]:
    """Resolve optimizer and precision for the device; report impossible choices."""
    problems = []
    sharded = fsdp_or_deepspeed_requested()
    if sharded is not None:
        problems.append(_sharded_refusal(sharded))
    fsdp2 = recipe.run.sharding == "fsdp2"
    optim = recipe.optimizer
    if optim == "auto":
        # bitsandbytes' 8-bit optimizers run their kernels on plain tensors,
        # not on the DTensor shards FSDP2 leaves; the LoRA state is small.
        optim = "paged_adamw_8bit" if device.type == "cuda" and not fsdp2 else "adamw_torch"
    if optim == "paged_adamw_8bit" and device.type != "cuda":
        problems.append(
            "optimizer='paged_adamw_8bit' needs CUDA (bitsandbytes' paged optimizers); "
            "use optimizer='auto' or 'adamw_torch' on CPU"
        )
    elif optim == "paged_adamw_8bit" and fsdp2:
        problems.append(
            "optimizer='paged_adamw_8bit' cannot update FSDP2's sharded LoRA factors "
            "(run.sharding='fsdp2'); use optimizer='auto' or 'adamw_torch'"
        )
    precision = recipe.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        problems.append("precision='bf16' but this GPU has no bf16; use precision='fp32'")
    for backend in recipe.run.report_to:
        # The Trainer would fail deep inside its integrations; say what to install.
        if importlib.util.find_spec(backend) is None:
            problems.append(
                f"run.report_to includes {backend!r} but it is not installed: "
                f'pip install "mixtune[{backend}]"'
            )
    if problems:
        raise ConfigError(problems)
    return optim, precision == "bf16"


def _sharded_refusal(name: str) -> str:
    if name == "FSDP":
        return (
            "the launcher asks for accelerate's FSDP, which cannot shard mixtune's 4-bit "
            "storage. Launch without --use_fsdp (and without an accelerate config that "
            "selects FSDP) and set Recipe(run=RunSettings(sharding='fsdp2')): fit then "
            "shards the model itself; see docs/howto/multi-gpu.md"
        )
    return (
        f"the launcher asks for {name}, which Recipe.fit does not support: launch plain DDP "
        "(accelerate launch --num_processes N, without --use_deepspeed or an accelerate "
        "config that selects it) or, for a model too large for one GPU, FSDP2 with "
        "RunSettings(sharding='fsdp2'); see docs/howto/multi-gpu.md"
    )


def _keep_frozen_out_of_ddp(model: nn.Module) -> None:
    """Tell DDP to leave the frozen base weights and the buffers alone.

    Every rank loads the same checkpoint and quantizes it the same way, and
    nothing changes them in training, so DDP's start-up broadcast of them
    (the whole 4-bit model) and its per-forward buffer broadcast would only
    cost time. The LoRA weights, identical by seed, are still broadcast and
    their gradients all-reduced. DDP reads this attribute when it wraps the
    model.
    """
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    buffers = [name for name, _ in model.named_buffers()]
    model._ddp_params_and_buffers_to_ignore = frozen + buffers  # type: ignore[assignment]


def _is_quantized(model: nn.Module) -> bool:
    return any(
        getattr(m, "is_quantized", False) is True
        or type(m).__name__ in ("Linear4bit", "Params4bit")
        for m in model.modules()
    )


def _census_bytes(adapted: Any) -> int | None:
    census = getattr(getattr(adapted, "loaded", None), "census", None)
    if not callable(census):
        return None
    total = getattr(census(), "total_bytes", None)
    return int(total) if isinstance(total, int) else None


def _history(log_history: list[dict[str, Any]], key: str) -> tuple[LossPoint, ...]:
    points = {}
    for entry in log_history:
        if key in entry and "step" in entry:
            points[int(entry["step"])] = float(entry[key])
    return tuple(LossPoint(s, v) for s, v in sorted(points.items()))


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _checkpointing_args(arguments_cls: type, enabled: bool) -> dict[str, Any]:
    # transformers 5.24 renamed gradient_checkpointing to activation_checkpointing
    # (the old name warns); 5.17 knows only the old one.
    fields = getattr(arguments_cls, "__dataclass_fields__", {})
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in fields
        else "gradient_checkpointing"
    )
    # Non-reentrant: works with frozen inputs and keyword arguments, and is
    # the variant PyTorch recommends.
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


def _disable_checkpointing(model: nn.Module) -> None:
    for name in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
        method = getattr(model, name, None)
        if method is not None:
            method()
            return


def fit(
    recipe: Recipe,
    model: Any,
    corpus: Any,
    adapter: Any = None,
    *,
    resume: bool = False,
) -> FitResult:
    """Train the LoRA weights of ``model`` on ``corpus`` following ``recipe``.

    Runs unchanged under ``accelerate launch``/``torchrun`` (DDP): every rank
    returns the same metrics, only rank 0 writes checkpoints. With
    ``RunSettings(sharding="fsdp2")`` fit first shards the model over the
    ranks with FSDP2 (see :func:`~mixtune.recipe.shard_model`); the returned
    adapter then stays sharded (publish gathers it). accelerate's own FSDP
    (``--use_fsdp``) and DeepSpeed raise :class:`~mixtune.errors.ConfigError`.

    When training ends, or stops with an error, fit lets go of the optimizer,
    its state, the scheduler and the DDP wrapper at once, so their memory is
    free for what comes next (publishing, another fit, a retry with a smaller
    batch). The paged buffers of ``paged_adamw_8bit`` are the exception:
    bitsandbytes (0.50) has no call that frees its managed memory, so they stay
    allocated until the process ends.

    Args:
        recipe: The recipe.
        model: A ``LoadedModel`` (``adapter`` is applied first) or an ``AdaptedModel``.
        corpus: A ``ChunkedCorpus`` (``to_datasets`` gives train/validation/test).
        adapter: The ``AdapterSpec`` for a ``LoadedModel``.
        resume: Continue from the last complete checkpoint in ``recipe.run.output_dir``
            (starts fresh when there is none).

    Returns:
        The :class:`FitResult`.

    Raises:
        ConfigError: If the recipe cannot run here or the inputs do not fit together.
        PreflightError: If the run would not fit in memory.
        NonFiniteLossError: If the loss became NaN or infinite (checkpoints stay).
        CheckpointError: If ``output_dir`` holds checkpoints and ``resume`` is False,
            or the checkpoint to resume was written by another number of processes.
    """
    from transformers import TrainingArguments, default_data_collator
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    device = _resolve_device(recipe)
    optim, bf16 = _runtime_problems(recipe, device)
    run_dir = recipe.run.output_dir
    existing = complete_checkpoints(run_dir)
    if existing and not resume:
        raise CheckpointError(
            f"{run_dir} already holds checkpoints ({existing[-1].name}); pass resume=True to "
            "continue that run or choose another RunSettings(output_dir=...)"
        )
    start_from = last_complete_checkpoint(run_dir) if resume else None

    adapted = _resolve_adapted(model, adapter, recipe.seed)
    hf_model: Any = adapted.model
    # torch's stubs type the index as int; it is None for a bare "cuda".
    index: int | None = device.index
    if device.type == "cuda" and index is None:
        # Under a launcher each rank's model sits on its own GPU; memory
        # checks and peak statistics must look at that one, not at cuda:0.
        on = next(hf_model.parameters()).device
        device = on if on.type == "cuda" else torch.device(local_device())
    if not any(p.requires_grad for p in hf_model.parameters()):
        raise TrainingError("the adapted model has no trainable parameters; check the AdapterSpec")

    datasets = corpus.to_datasets(layout=recipe.layout)
    for split in ("train", "validation", "test"):
        if split not in datasets:
            raise ConfigError(f"corpus.to_datasets() has no {split!r} split")
    train_ds = datasets["train"]
    if len(train_ds) == 0:
        raise ConfigError("the corpus' train split is empty; add documents or change fractions")
    seq_len = len(train_ds[0]["input_ids"])

    cfg: Any = hf_model.config
    saved_cfg = (cfg.use_cache, getattr(cfg, "output_router_logits", False))
    saved_coef = getattr(hf_model, "router_aux_loss_coef", None)
    model_device = next(hf_model.parameters()).device
    autocast = torch.bfloat16 if bf16 else None

    args = TrainingArguments(
        output_dir=str(run_dir),
        num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps if recipe.max_steps is not None else -1,
        per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.grad_accum,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm,
        warmup_steps=recipe.warmup,
        lr_scheduler_type=recipe.scheduler,
        optim=optim,
        bf16=bf16,
        use_cpu=device.type == "cpu",
        **_checkpointing_args(TrainingArguments, recipe.gradient_checkpointing),
        eval_strategy="no",
        save_strategy="steps",
        save_steps=recipe.save_steps,
        logging_strategy="steps",
        logging_steps=recipe.logging_steps,
        # The Trainer would otherwise drop NaN losses from the logged mean.
        logging_nan_inf_filter=False,
        seed=recipe.seed,
        data_seed=recipe.seed,
        report_to=list(recipe.run.report_to) or "none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        label_names=["labels"],
        # Every LoRA tensor gets a gradient each step (an expert stack's
        # factors are one tensor, all of whose experts see some token), so
        # DDP need not search the graph for unused ones.
        ddp_find_unused_parameters=False,
        # The loss is divided by the tokens of all ranks, so N ranks × batch b
        # train exactly like one process with gradient accumulation N.
        average_tokens_across_devices=True,
    )
    # Reading args.device sets up the process group under a launcher.
    world = current_world(args.device)
    fsdp2 = recipe.run.sharding == "fsdp2" and world.size > 1
    if fsdp2:
        # Before the pre-flight check (which then counts this rank's shards)
        # and before the Trainer builds the optimizer over the parameters. A
        # model still on the CPU is moved to this rank's GPU a layer at a time.
        shard_model(hf_model, device=device)
        model_device = device
    est = estimate_memory(
        hf_model,
        batch_size=recipe.batch_size,
        seq_len=seq_len,
        gradient_checkpointing=recipe.gradient_checkpointing,
        optimizer=optim,
        activation_dtype=torch.bfloat16 if bf16 else torch.float32,
        device=device,
        available=recipe.run.memory_budget_bytes,
        weights_bytes=local_bytes(hf_model) if fsdp2 else _census_bytes(adapted),
    )
    check_preflight(
        est,
        batch_size=recipe.batch_size,
        gradient_checkpointing=recipe.gradient_checkpointing,
        quantized=_is_quantized(hf_model),
    )
    if start_from is not None:
        saved_world = checkpoint_world_size(start_from)
        if saved_world != world.size:
            raise CheckpointError(
                f"{start_from} was written by a run on {saved_world} process(es) but this one "
                f"has {world.size}: the data order and RNG states only continue on the same "
                f"number of processes; relaunch with --num_processes {saved_world}"
            )

    def run_eval(split: str) -> EvalStats:
        stats = evaluate(
            hf_model,
            datasets[split],
            batch_size=recipe.batch_size,
            max_rows=recipe.eval_rows,
            device=model_device if model_device.type == device.type else device,
            autocast_dtype=autocast,
            world=world,
            lockstep=fsdp2,
        )
        if fsdp2:
            reshard_all(hf_model)
        return stats

    trainer = _MixtuneTrainer(
        model=hf_model,
        args=args,
        train_dataset=train_ds,
        data_collator=default_data_collator,
        callbacks=list(recipe.run.callbacks),
        mixtune_adapted=adapted,
        mixtune_keep=recipe.run.save_total_limit,
        mixtune_world=world,
        mixtune_fsdp2=fsdp2,
    )
    for name, flag in (("FSDP", "is_fsdp_enabled"), ("DeepSpeed", "is_deepspeed_enabled")):
        # An accelerate config file can select these without the variables.
        if getattr(trainer, flag, False):
            raise ConfigError(_sharded_refusal(name))
    # mixtune draws its own bar (loss, tokens/s, ETA); the stock printers go.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(
        _EvalCallback(
            lambda: run_eval("validation").loss, recipe.eval_steps, len(datasets["validation"]) > 0
        )
    )
    trainer.add_callback(_ProgressBar(trainer, recipe.run.progress and world.is_main))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = run_eval("test")

    if fsdp2:
        # A model accelerate has prepared is not prepared (wrapped in DDP)
        # again by the Trainer; evaluation mode applies autocast only.
        trainer.accelerator.prepare_model(hf_model, device_placement=False, evaluation_mode=True)
    elif world.size > 1:
        _keep_frozen_out_of_ddp(hf_model)
    cfg.use_cache = False
    cfg.output_router_logits = recipe.router_aux_loss_coef > 0
    if saved_coef is not None:
        hf_model.router_aux_loss_coef = recipe.router_aux_loss_coef
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(start_from) if start_from else None)
    finally:
        wall = time.perf_counter() - t0
        cfg.use_cache, cfg.output_router_logits = saved_cfg
        if saved_coef is not None:
            hf_model.router_aux_loss_coef = saved_coef
        if recipe.gradient_checkpointing:
            _disable_checkpointing(hf_model)
        hf_model.eval()
        _release_training_state(trainer)

    after = run_eval("test")
    # Rank 0 may still be renaming the last checkpoint; list it once it has.
    world.barrier()
    checkpoints = complete_checkpoints(run_dir)
    return FitResult(
        recipe=recipe,
        model=adapted,
        corpus=corpus,
        train_loss=_history(trainer.state.log_history, "loss"),
        eval_loss=_history(trainer.state.log_history, "eval_loss"),
        test_loss_before=before.loss,
        test_loss_after=after.loss,
        routing_load=after.routing_load,
        routing_load_before=before.routing_load,
        checkpoints=tuple(checkpoints),
        resumed_from=start_from,
        steps=int(trainer.state.global_step),
        tokens=trainer.mixtune_tokens,
        wall_time_s=wall,
        peak_memory_bytes=world.max(_peak_memory(device)),
        memory=est,
    )


def _release_training_state(trainer: Trainer) -> None:
    """Let go of the optimizer, the scheduler and the DDP wrapper now.

    The Trainer and its callbacks reference each other, so without this they
    live until some later garbage collection, and with them the optimizer
    state (GPU memory when fit returns, or raises an out-of-memory error the
    caller wants to retry from), DDP's gradient buckets, and DDP's hold on the
    process group. The model, the log history and the token count stay.
    """
    trainer.optimizer = None
    trainer.lr_scheduler = None
    if trainer.model is not None:
        trainer.model_wrapped = trainer.model
    handler = trainer.callback_handler
    handler.optimizer = handler.lr_scheduler = handler.train_dataloader = None
    # Forgets what accelerate prepared (the DDP wrapper among them) and collects.
    trainer.accelerator.free_memory()
    gc.collect()


class _MixtuneTrainer(Trainer):
    """The stock Trainer with mixtune's checkpoints and per-step loss check."""

    def __init__(
        self,
        *args: Any,
        mixtune_adapted: Any,
        mixtune_keep: int | None,
        mixtune_world: World,
        mixtune_fsdp2: bool = False,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.mixtune_fsdp2 = mixtune_fsdp2
        self.mixtune_adapted = mixtune_adapted
        self.mixtune_keep = mixtune_keep
        self.mixtune_world = mixtune_world
        self.mixtune_tokens = 0
        self.mixtune_step_loss = 0.0

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        mask = inputs.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        loss = super().training_step(model, inputs, num_items_in_batch)
        world = self.mixtune_world
        # One all-reduce per micro-step: the tokens of all ranks, and the sum
        # of their losses, which is not finite if any rank's is, so every rank
        # stops at the same step instead of the others hanging in the next
        # collective. The Trainer scales each rank's loss by N (it is divided
        # by the tokens of all ranks), so the mean over ranks is this
        # micro-step's share of the step's loss.
        summed_loss, summed_tokens = world.sum([float(loss.detach()), float(tokens)])
        self.mixtune_tokens += round(summed_tokens)
        value = summed_loss / world.size
        if not math.isfinite(value):
            step = int(self.state.global_step) + 1
            last = last_complete_checkpoint(Path(str(self.args.output_dir)))
            kept = (
                f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            )
            raise NonFiniteLossError(
                f"the training loss became {value} at step {step}; {kept}. Lower the "
                "learning_rate, keep max_grad_norm > 0, or check the data and the adapter's init",
                step=step,
            )
        self.mixtune_step_loss += value
        return loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        # The stock path projects the whole batch to the vocabulary at once
        # (GBs of logits for 8 x 1200 tokens); the chunked loss gives the
        # same value. A wrapped model (DDP) must run its own forward so its
        # gradient hooks fire, so it keeps the stock path; an FSDP2-sharded
        # one is not wrapped (its hooks sit on the decoder body) and takes
        # the chunked path.
        if return_outputs or self.accelerator.unwrap_model(model) is not model:
            inputs = {**inputs, **model_inputs(inputs)}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss = causal_lm_training_loss(model, inputs, num_items_in_batch=items)
        processes = self.accelerator.num_processes
        if items is not None and self.args.average_tokens_across_devices and processes > 1:
            # As the stock compute_loss does: the loss is divided by the tokens
            # of all ranks and the gradients are averaged over them (FSDP2's
            # reduce-scatter), so N ranks scale it back by N.
            loss = loss * processes
        return loss

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        run_dir = Path(str(self.args.output_dir))
        world = self.mixtune_world
        step = int(self.state.global_step)
        optimizer_state: dict[str, Any] | None = None
        if self.mixtune_fsdp2:
            # Gathering is a collective: every rank takes part, rank 0 writes.
            lora = full_lora_state_dict(self.mixtune_adapted)
            optimizer_state = self._full_optimizer_state()
        else:
            lora = self.mixtune_adapted.lora_state_dict()
        if not world.is_main:
            # Rank 0 creates the partial folder, each rank adds its own RNG
            # state (resume restores them per rank), rank 0 completes it.
            world.barrier()
            self._save_rng_state(str(partial_checkpoint_dir(run_dir, step)))
            world.barrier()
            world.barrier()
            return

        def write_rest(folder: Path) -> None:
            if optimizer_state is None:
                self._save_optimizer_and_scheduler(str(folder))
            else:
                scheduler: Any = self.lr_scheduler
                torch.save(optimizer_state, folder / _OPTIMIZER_FILE)
                torch.save(scheduler.state_dict(), folder / _SCHEDULER_FILE)
            self._save_scaler(str(folder))
            world.barrier()
            self._save_rng_state(str(folder))
            world.barrier()
            self.state.save_to_json(str(folder / "trainer_state.json"))

        write_checkpoint(
            run_dir,
            step,
            lora,
            write_rest,
            meta={"format": "mixtune-checkpoint/1", "world_size": world.size},
        )
        prune_checkpoints(run_dir, self.mixtune_keep)
        # If rank 0 fails above, the others wait here until the launcher
        # stops them with rank 0's error.
        world.barrier()

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        weights = load_adapter_weights(Path(resume_from_checkpoint))
        if self.mixtune_fsdp2:
            load_full_lora_state_dict(self.mixtune_adapted, weights)
        else:
            self.mixtune_adapted.load_lora_state_dict(weights)

    def _full_optimizer_state(self) -> dict[str, Any]:
        """The optimizer state with whole tensors under parameter names, on rank 0's CPU."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        optimizer: Any = getattr(self.optimizer, "optimizer", self.optimizer)
        model: Any = self.model
        state: dict[str, Any] = get_optimizer_state_dict(
            model,
            optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        return state

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if not self.mixtune_fsdp2:
            folder = Path(checkpoint)
            saved = (folder / _OPTIMIZER_FILE).is_file() and (folder / _SCHEDULER_FILE).is_file()
            if saved and self.args.world_size > 1 and self.args.device.type == "cpu":
                # The Trainer maps the state to args.device ("cpu:0" for CPU
                # ranks), which torch <= 2.11 cannot restore; the CPU is the CPU.
                optimizer_: Any = self.optimizer
                scheduler_: Any = self.lr_scheduler
                optimizer_.load_state_dict(
                    torch.load(folder / _OPTIMIZER_FILE, map_location="cpu", weights_only=True)
                )
                scheduler_.load_state_dict(
                    torch.load(folder / _SCHEDULER_FILE, map_location="cpu", weights_only=True)
                )
                return
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        folder = Path(checkpoint)
        # Every rank reads rank 0's whole state and keeps its own shards.
        state = torch.load(folder / _OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        optimizer: Any = getattr(self.optimizer, "optimizer", self.optimizer)
        model: Any = self.model
        scheduler: Any = self.lr_scheduler
        set_optimizer_state_dict(
            model,
            optimizer,
            state,
            options=StateDictOptions(full_state_dict=True),
        )
        scheduler.load_state_dict(
            torch.load(folder / _SCHEDULER_FILE, map_location="cpu", weights_only=True)
        )


class _EvalCallback(TrainerCallback):
    """Validation loss at step 0, every ``every`` steps and at the last step, into the log history."""

    def __init__(self, run: Any, every: int, enabled: bool) -> None:
        self.run = run
        self.every = every
        self.enabled = enabled

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The curve starts at step 0 (the untrained adapter); a resumed run
        # already carries it in the restored log history.
        if self.enabled and int(state.global_step) == 0:
            state.log_history.append({"eval_loss": self.run(), "step": 0})

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = int(state.global_step)
        if self.enabled and (step % self.every == 0 or step >= state.max_steps):
            # Stored in the Trainer's log history so checkpoints carry it across resumes.
            state.log_history.append({"eval_loss": self.run(), "step": step})


class _ProgressBar(TrainerCallback):
    """A tqdm bar with the step's loss, tokens/s and (tqdm's) ETA."""

    def __init__(self, trainer: _MixtuneTrainer, enabled: bool) -> None:
        self.trainer = trainer
        self.enabled = enabled
        self.bar: Any = None
        self.t0 = 0.0
        self.tokens0 = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=state.max_steps,
            initial=state.global_step,
            desc="fit",
            unit="step",
            disable=not self.enabled,
            dynamic_ncols=True,
        )
        self.t0 = time.perf_counter()
        self.tokens0 = self.trainer.mixtune_tokens

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loss = self.trainer.mixtune_step_loss
        self.trainer.mixtune_step_loss = 0.0
        if self.bar is None:
            return
        rate = (self.trainer.mixtune_tokens - self.tokens0) / max(
            time.perf_counter() - self.t0, 1e-9
        )
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}", refresh=False)
        self.bar.update(int(state.global_step) - self.bar.n)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
