"""The training loop behind ``amvl train`` and ``amvl demo``.

Distribution comes from accelerate: run the same script under ``accelerate launch`` or
``torchrun`` for DDP (tested with two processes). Its checkpoints are written by the main
process from its own full copy of the model and optimizer, which FSDP and DeepSpeed ZeRO do
not keep: for those, train with :class:`amvl.trainer.AMVLTrainer`, whose checkpoints are the
Trainer's own. On a machine without GPUs, launch with ``ACCELERATE_USE_CPU=1 torchrun
--nproc_per_node N ...`` (``accelerate launch --cpu`` starts one process). Each process's NLL is
weighed by its share of the batch's answer tokens, so N processes optimise the loss one process
would on the whole batch (up to the latent noise, which is drawn per process). Logged metrics
are averaged over the processes (the loss and the NLL are then the whole batch's). Everything a step depends on is a function of
(seed, step): the batch (a fixed permutation per epoch, sharded across processes) and the latent
noise seed (whether the batches are built in the loop or ahead of it by DataLoader workers,
``TrainConfig.num_workers``, for a collator that draws no random numbers). So resuming from a
checkpoint continues exactly: the checkpoint holds the step, the model, the optimizer, the LR
scheduler and the RNG states, and is written atomically (to a temporary directory, then
renamed); every process's RNG state is in it. Checkpoints are loaded with ``weights_only=True``: nothing
arbitrary is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from amvl.config import INFERENCE_FIELDS, AMVLConfig, check_types
from amvl.step_batches import StepBatches, prefetching_loader, stop_workers
from amvl.stopping import (CATCHABLE_SIGNALS, DEFAULT_STOP_SIGNALS, StopSignals,
                           TrainingStopped)
from amvl.trackers import (LOGS_DIR, check_trackers, finish_trackers, log_entry, read_runs,
                           start_trackers, write_runs)

if TYPE_CHECKING:  # annotations only: accelerate is imported when a run starts
    from accelerate import Accelerator

    from amvl.data import AMVLCollator
    from amvl.model import AMVLModel

CHECKPOINT_PREFIX = "checkpoint-"
# transformers.get_scheduler names that need nothing beyond warm-up and length (the plateau
# scheduler steps on a metric; cosine_with_min_lr and warmup_stable_decay need arguments)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup", "inverse_sqrt")


@dataclass
class TrainConfig:
    """Optimisation settings (the AMVL settings live in :class:`amvl.config.AMVLConfig`)."""

    steps: int = 1000
    batch_size: int = 16  # per optimisation step, over all processes
    # Examples per forward on each process (None: its whole share, batch_size / processes); a
    # step accumulates the gradients of share / micro_batch_size of them. The step's examples
    # and its loss (the answer NLL over all of its answer tokens) stay those of the whole
    # batch, so a run's data continue on resume with another micro_batch_size.
    micro_batch_size: int | None = None
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"  # one of LR_SCHEDULERS (transformers.get_scheduler names)
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # 0: save only at the end (when output_dir is set)
    save_total_limit: int = 2
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (accelerate)
    # Recompute the base model's layers in the backward (memory for time). Prefix sharing then
    # needs the "amvl" attention (x's keys kept outside the dropped KV cache); elsewhere steps
    # take the naive path.
    activation_checkpointing: bool = False
    # With validation examples (train's eval_examples, amvl train's data.eval): validate every
    # eval_every steps (0: after the last step only), eval_batch_size examples a forward on
    # each process (None: micro_batch_size, else the process's share of a step).
    eval_every: int = 0
    eval_batch_size: int | None = None
    # Run each step's forward and backward as torch.compile graphs: far less host work a step
    # (one graph each instead of an autograd node and a Python call per operator), after a
    # compile on the first step and one more when lengths first change.
    compile: bool = False
    # Build the coming steps' batches in this many DataLoader worker processes (0: in the loop,
    # while the device waits), each up to two steps ahead, into pinned memory on a GPU.
    num_workers: int = 0
    # Experiment trackers that log the history as it comes (accelerate's: "tensorboard",
    # "wandb", "mlflow", ... or "all"; their packages are the user's), into
    # output_dir/logs for the local ones.
    report_to: tuple[str, ...] = ()
    # Seconds a process waits in a collective before the process group gives up, e.g. while
    # the main process writes a checkpoint (a 7B model's weights and AdamW state take
    # minutes): NCCL's own default, 600, aborted such runs. Applies where the loop (or amvl
    # train) starts the group; the Trainer's is TrainingArguments.ddp_timeout.
    ddp_timeout: int = 1800
    # Signals on which the loop saves a checkpoint after the step it is in and stops, raising
    # amvl.stopping.TrainingStopped (a scheduler's warning before a time limit or preemption;
    # see amvl/stopping.py). Needs an output_dir; () lets them end the run as they would.
    stop_signals: tuple[str, ...] = DEFAULT_STOP_SIGNALS

    def __post_init__(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")

        check_types(self, integers={"steps": 1, "batch_size": 1, "warmup_steps": 0, "seed": 0,
                                    "log_every": 1, "save_every": 0, "save_total_limit": 0,
                                    "eval_every": 0, "num_workers": 0, "ddp_timeout": 1},
                    reals=("learning_rate", "weight_decay", "max_grad_norm"),
                    flags=("activation_checkpointing", "compile"))
        for name in ("steps", "batch_size", "log_every"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        trackers = self.report_to
        require(isinstance(trackers, (list, tuple)) and all(
            isinstance(name, str) and name for name in trackers)
            and len(set(trackers)) == len(trackers),
            f"report_to must be a list of distinct tracker names, got {trackers!r}")
        self.report_to = tuple(trackers)
        stops = self.stop_signals
        require(isinstance(stops, (list, tuple)) and all(
            name in CATCHABLE_SIGNALS for name in stops) and len(set(stops)) == len(stops),
            f"stop_signals must be a list of distinct names out of {CATCHABLE_SIGNALS}, got "
            f"{stops!r}")
        self.stop_signals = tuple(stops)
        if self.eval_batch_size is not None:
            check_types(self, integers={"eval_batch_size": 1}, reals=(), flags=())
        if self.micro_batch_size is not None:
            check_types(self, integers={"micro_batch_size": 1}, reals=(), flags=())
            require(self.micro_batch_size <= self.batch_size,
                    f"micro_batch_size {self.micro_batch_size} is larger than batch_size "
                    f"{self.batch_size}")
            require(self.batch_size % self.micro_batch_size == 0,
                    f"micro_batch_size {self.micro_batch_size} does not divide batch_size "
                    f"{self.batch_size}")
        require(self.learning_rate > 0, "learning_rate must be > 0")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(self.max_grad_norm >= 0,
                f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        require(0 <= self.warmup_steps <= self.steps,
                f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        require(self.save_every >= 0, f"save_every must be >= 0, got {self.save_every}")
        require(0 <= self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed}")
        require(self.lr_scheduler in LR_SCHEDULERS,
                f"lr_scheduler must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")
        require(self.mixed_precision in ("no", "bf16", "fp16"),
                f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")


def recompute_skips_side_effects() -> contextlib.AbstractContextManager:
    """Around a compiled training forward: under activation checkpointing, PrefixKeys (prefix
    sharing on the "amvl" attention) records x's keys inside the checkpointed layers, a side
    effect torch.compile cannot replay in the recompute, so it broke the graph at every layer.
    The recompute needs none of it (PrefixKeys keeps a layer's first record), so Dynamo may
    leave it out. Nothing changes without checkpointing, or on a torch without the setting."""
    if not hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)


EVAL_STREAM = 1  # step_seed's stream of evaluation seeds
GENERATION_STREAM = 2  # ... and of amvl.generation's batches after the first


def step_seed(seed: int, step: int, rank: int, stream: int = 0, micro_index: int = 0) -> int:
    """The latent-noise seed of one step on one process: a hash of (seed, step, rank) in
    [0, 2**63), so no two steps or processes share one (an arithmetic formula collided across
    processes, and with the model's seed + 1 for the prior path). ``stream`` > 0 gives other
    streams of seeds (evaluation's), disjoint from training's; ``micro_index`` > 0 the seeds
    of a step's later micro-batches (the first one's is the step's)."""
    entropy = [seed, step, rank] + ([stream] if stream or micro_index else []) \
        + ([micro_index] if micro_index else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------- checkpoints


def _rng_state() -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    plain = {"numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "python": [version, list(internal), gauss]}
    return tensors, plain


def _set_rng_state(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        # the GPUs this machine has of those saved: a job requeued on fewer GPUs (or more)
        # than the checkpoint's machine saw (set_rng_state_all indexed past its devices)
        for key, state in tensors.items():
            if key.startswith("cuda") and int(key[4:]) < torch.cuda.device_count():
                torch.cuda.set_rng_state(state, int(key[4:]))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step (temporary directories are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*")
            if p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def _rng_state_of_rank(tensors: dict, state: dict, rank: int) -> tuple[dict, dict]:
    """The random state process ``rank`` left in a checkpoint (``tensors`` from its rng.pt,
    ``state`` its state.json), for :func:`_set_rng_state`. A checkpoint of one process, or
    written before the processes' states were kept, holds the main process's alone."""
    prefix = f"rank{rank}."
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if rank == 0 or not own:
        return {k: v for k, v in tensors.items() if not k.startswith("rank")}, state["rng"]
    return own, state["rng_of_ranks"][str(rank)]


def save_checkpoint(output_dir: Path, step: int, model: AMVLModel,
                    optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler,
                    history: list[dict], config: TrainConfig,
                    pending: dict[str, float] | None = None,
                    scaler: torch.amp.GradScaler | None = None, *,
                    pending_steps: int = 0, num_processes: int = 1,
                    on_save: Callable[[Path], None] | None = None,
                    rng_states: list[tuple[dict, dict]] | None = None) -> Path:
    """Write checkpoint-<step> atomically: everything goes to a temporary directory in the
    same folder, which is renamed into place only when complete.

    ``pending`` holds the metric sums of the log window still open at this step, over
    ``pending_steps`` steps; ``scaler`` is fp16's loss scaler, whose scale a resumed run must
    continue from. A PEFT base is saved as ``AMVLModel.save_pretrained`` saves it (the adapter,
    the heads and the latent tokens' rows; its frozen weights are the run's base model),
    any other model whole in ``model.safetensors``. ``on_save`` gets the temporary directory
    before the rename, to add files of the caller's. ``rng_states``: every process's random
    state, by rank (None: this process's), so that each continues its own dropout on resume.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = readable_temporary_directory(output_dir, f".{final.name}.")
    try:
        if model._is_peft():
            model.save_pretrained(tmp)
        else:
            save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
            model.config.save(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        states = rng_states or [_rng_state()]
        tensors = dict(states[0][0])  # the main process's under their own names, as before
        for rank, (more, _) in enumerate(states[1:], 1):
            tensors.update({f"rank{rank}.{k}": v for k, v in more.items()})
        torch.save(tensors, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(
            {"step": step, "history": history, "pending": pending or {},
             "pending_steps": pending_steps, "rng": states[0][1],
             "rng_of_ranks": {str(rank): plain for rank, (_, plain) in enumerate(states)
                              if rank},
             "num_processes": num_processes, "train_config": asdict(config)}))
        if on_save is not None:
            on_save(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _add_tracker_runs(directory: Path, runs: dict[str, str],
                      then: Callable[[Path], None] | None) -> None:
    """A checkpoint's ``on_save``: the trackers' run ids, then the caller's files."""
    write_runs(directory, runs)
    if then is not None:
        then(directory)


def readable_temporary_directory(parent: Path, prefix: str) -> Path:
    """A new directory in ``parent`` to write a save into before renaming it, with the
    permissions the umask gives any other directory: ``tempfile.mkdtemp`` makes it 0700, and
    the renamed save would be unreadable to the other users of a shared cluster."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    return path


def _rates_of_this_run(optimizer: torch.optim.Optimizer,
                       scheduler: torch.optim.lr_scheduler.LRScheduler,
                       learning_rate: float) -> None:
    """After loading a checkpoint's optimizer and scheduler: the rates of this run's schedule
    (its learning_rate, steps and warm-up) at the checkpoint's step. The loaded state holds the
    checkpoint run's peak rate and, in the optimizer, the rate its schedule left for the next
    step (0 at the end of a linear decay): a run resumed with more steps trained its first
    step at that rate, and every later one at the old peak. The same settings give the same
    rates as before."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # transformers' are
        return
    scheduler.base_lrs = [learning_rate] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _prune(output_dir: Path, keep: int) -> None:
    checkpoints = sorted((p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
                          if p.name[len(CHECKPOINT_PREFIX):].isdigit()),
                         key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
    for old in checkpoints[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    # temporary directories of saves that were killed before their rename
    for stale in output_dir.glob(f".{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


class OtherRunError(ValueError):
    """A checkpoint to resume was trained with other settings."""


class NothingLeftToTrain(ValueError):
    """A checkpoint to resume is already at (or past) the run's last step."""


class LaunchError(ValueError):
    """The processes the run was launched as cannot train it: accelerate sees another number
    of them, or they do not divide the batch."""


def _check_same_run(checkpoint: Path, amvl_config: AMVLConfig, config: TrainConfig,
                    num_processes: int | None) -> None:
    """Refuse to resume a checkpoint of another run: another latent block or objective (the
    AMVLConfig, but for its inference settings, ``INFERENCE_FIELDS``, which a resumed run
    trains alike with), another data order
    or batch (seed, batch_size), or another number of processes (each draws its share's noise
    from its rank; None: not checked). The step count, rates, weight decay and logging may
    change on resume (the resumed run trains with its own)."""
    differ = AMVLConfig.load(checkpoint).differences(amvl_config, ignore=INFERENCE_FIELDS)
    if differ:
        raise OtherRunError(f"{checkpoint} was trained with another AMVLConfig (differs in "
                            f"{differ}): resume it with the same settings or start a new run "
                            "elsewhere")
    state = json.loads((checkpoint / "state.json").read_text())
    for name in ("seed", "batch_size"):
        before = state["train_config"].get(name)
        if before != getattr(config, name):
            raise OtherRunError(f"{checkpoint} was trained with {name}={before}, this run "
                                f"has {getattr(config, name)}: the data order would not "
                                "continue")
    before = state.get("num_processes")  # not recorded before 2026-11-28
    if num_processes is not None and before is not None and before != num_processes:
        raise OtherRunError(f"{checkpoint} was trained on {before} processes, this run has "
                            f"{num_processes}: the batches' shares and their latent noise "
                            f"would not continue; resume on {before}, or continue on "
                            f"{num_processes} anyway (amvl train --resume --any-process-count, "
                            "train(..., any_process_count=True): the same batches, other noise "
                            "and dropout than an uninterrupted run)")


def check_output_dir(output_dir: str | Path, config: TrainConfig, amvl_config: AMVLConfig,
                     resume: bool, num_processes: int | None = None) -> Path | None:
    """The checkpoint a run into ``output_dir`` continues (None: a new run), or the reason it
    cannot train there. It reads only the directory, so ``amvl train`` calls it before it
    builds the model; :func:`train` calls it again.

    Raises:
        FileExistsError: ``output_dir`` holds checkpoints and ``resume`` is False.
        FileNotFoundError: ``resume`` is True and ``output_dir`` holds no checkpoint.
        OtherRunError: the latest checkpoint was trained with other settings (see
            ``_check_same_run``; ``num_processes`` None leaves the process count unchecked).
        NothingLeftToTrain: the latest checkpoint is already at ``config.steps``.
    """
    found = latest_checkpoint(output_dir)
    if found is not None and not resume:
        # Its checkpoints would be pruned among this run's by step number, and a later
        # resume would continue whichever is newest.
        raise FileExistsError(f"{output_dir} already holds checkpoints of a run ({found.name}): "
                              "pass resume=True (amvl train --resume) to continue it, or "
                              "choose another output directory")
    if not resume:
        return None
    if found is None:
        raise FileNotFoundError(f"resume=True but no checkpoint in {output_dir}")
    _check_same_run(found, amvl_config, config, num_processes)
    step = json.loads((found / "state.json").read_text())["step"]
    if step >= config.steps:
        raise NothingLeftToTrain(f"{found.name} is already at step {step}, and this run "
                                 f"trains to step {config.steps}: raise steps to go on")
    return found


def load_checkpoint_weights(model: AMVLModel, checkpoint: Path) -> None:
    """Put the weights of ``checkpoint`` (of :func:`save_checkpoint`) into ``model``: the whole
    model's, or a PEFT base's adapter, heads and latent tokens' rows.

    Raises:
        OtherRunError: the whole model's weights do not fit ``model`` (a checkpoint of another
            base model, e.g. another width), instead of torch's list of every mismatch.
    """
    if not (checkpoint / "model.safetensors").is_file():
        model.load_weights(checkpoint)  # a PEFT base's checkpoint
        return
    try:
        load_model(model, str(checkpoint / "model.safetensors"), device=str(model.device))
    except torch.OutOfMemoryError:  # a RuntimeError too, but no sign of another model
        raise
    except RuntimeError as err:  # keys or shapes of another model, one line each
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        first = lines[1] if len(lines) > 1 else lines[0] if lines else type(err).__name__
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        raise OtherRunError(f"{checkpoint}'s weights do not fit this model: {first}{more}. "
                            "Was it trained from another base model? Resume it on the model it "
                            "trained from, or start a new run elsewhere") from None


# What a training log line shows without a progress bar (the history holds every metric)
TRAIN_LOG_KEYS = ("loss", "nll", "kl_fwd", "kl_rev", "active_slots", "lr")


def _decay_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups as transformers' Trainer makes them: weight decay on weight matrices, none
    on biases and normalisation weights (decaying a norm's gain pulls it towards 0, not 1)."""
    decay, keep, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:  # tied weights: once
                continue
            seen.add(id(param))
            is_norm = "norm" in type(module).__name__.lower() or "norm" in name.lower()
            (keep if name == "bias" or is_norm or param.dim() < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": keep, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- the loop


HISTORY_NAME = "history.jsonl"


def _validation_entry(step: int, accelerator: Accelerator, model: AMVLModel,
                      collator: AMVLCollator, examples: Sequence[dict], batch_size: int,
                      seed: int) -> dict:
    """A history entry of :mod:`amvl.validation`'s metrics after ``step`` steps: each process
    validates every ``world``-th example, and the sums are added up across processes."""
    from amvl.validation import validation_metrics, validation_sums

    world, rank = accelerator.num_processes, accelerator.process_index
    with accelerator.autocast():  # as the training forward (patched by prepare) runs: the
        # objective and nll_prior (heads / answer_nll, not patched) in the same precision
        sums = validation_sums(model, collator, examples[rank::world], batch_size, seed, rank)
    if world > 1:
        sums = accelerator.reduce(sums, "sum")
    return {"step": step, **{f"eval/{key}": value
                             for key, value in validation_metrics(sums).items()}}


def read_history(run: str | Path) -> list[dict]:
    """The history a run of :func:`train` with an ``output_dir`` keeps in
    ``run/history.jsonl`` (training and validation entries, as logged so far). Raises
    FileNotFoundError without one, ValueError naming a line that is not a JSON object."""
    file = Path(run) / HISTORY_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {HISTORY_NAME} in {run} (the output_dir of a run of "
                                "amvl train, which writes it at its first log)")
    entries = []
    for number, line in enumerate(file.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}, line {number}: not JSON ({err})") from None
        if not isinstance(entry, dict) or "step" not in entry:
            raise ValueError(f"{file}, line {number}: not a history entry (an object with "
                             "a step)")
        entries.append(entry)
    return entries


def _write_history(out: Path, history: list[dict]) -> None:
    """The whole logged history so far as ``out/history.jsonl``, one entry a line, replaced
    atomically: it outlives pruned checkpoints, and a resumed run rewrites it from the
    checkpoint's history on, so it never holds the steps the resume discarded."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{HISTORY_NAME}.tmp"
    tmp.write_text("".join(json.dumps(entry) + "\n" for entry in history), encoding="utf-8")
    os.replace(tmp, out / HISTORY_NAME)


def _warn_low_precision_weights(params: list[torch.Tensor], config: TrainConfig) -> None:
    """Warn when trainable weights are bf16 or fp16: AdamW updates them in their own dtype
    (there are no fp32 master weights here), and an update below a weight's rounding step
    (2**-8 of it in bf16) is lost. At learning rates around 1e-5 most of them are (on a tiny
    model at 1e-5, 15% of a bf16 decoder's weights moved in 3 steps, all of an fp32 one's)."""
    low = [p for p in params if p.dtype in (torch.bfloat16, torch.float16)]
    if not low:
        return
    share = sum(p.numel() for p in low) / sum(p.numel() for p in params)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in low})
    warnings.warn(f"{share:.0%} of the trainable weights are {'/'.join(dtypes)}, which AdamW "
                  f"updates in place without fp32 master weights: updates smaller than a "
                  f"weight's rounding step are lost (most of them at learning rate "
                  f"{config.learning_rate:g}). Load the model in float32 (model.dtype: float32) "
                  "and train with mixed_precision: bf16 instead", stacklevel=3)


def mean_over_processes(sums: dict, accelerator: Accelerator) -> dict:
    """Metric values (floats or one-element tensors) averaged over the processes, each of
    which holds its share's (one collective, on the accelerator's device). Every process calls
    it at the same steps, with the same keys (one objective's metrics, which the data do not
    change), so the values reduce in one fixed order.

    The loop's log window: the objective weighs each share's NLL by the whole batch's tokens,
    so the mean over the processes is the whole batch's loss; and replacing each process's sums
    by their mean before the window closes leaves the window's mean as it was, which lets a
    checkpoint save the open window of all the processes."""
    if accelerator.num_processes == 1 or not sums:
        return sums
    keys = sorted(sums)
    values = [torch.as_tensor(sums[k], device=accelerator.device).reshape(()) for k in keys]
    dtype = torch.float32  # at least: a float64 model's metrics keep their precision
    for value in values:
        dtype = torch.promote_types(dtype, value.dtype)
    values = torch.stack([value.to(dtype) for value in values])
    return dict(zip(keys, accelerator.reduce(values, "mean").unbind()))


def train(model: AMVLModel, collator: AMVLCollator, examples: Sequence[dict],
          config: TrainConfig, output_dir: str | Path | None = None, resume: bool = False,
          on_log: Callable[[dict], None] | None = None, progress: bool = True,
          accelerator: Accelerator | None = None,
          eval_examples: Sequence[dict] | None = None,
          on_save: Callable[[Path], None] | None = None,
          any_process_count: bool = False) -> list[dict]:
    """Train ``model`` (an :class:`amvl.model.AMVLModel`) and return the logged history.

    Each history entry holds the step, the learning rate and the objective's metrics averaged
    over the ``log_every`` steps before it; with ``eval_examples``, validation entries hold
    the step and :mod:`amvl.validation`'s metrics as ``eval/<name>`` (``eval/nll``,
    ``eval/nll_prior``, ...), every ``config.eval_every`` steps and after the last, each
    process validating a share of the examples. With an ``output_dir`` the main process also
    keeps the history so far in ``output_dir/history.jsonl``; ``on_log`` gets every entry.
    With ``progress=False`` each training entry is also a line on the console (its loss,
    NLL, KLs, active slots and rate), as each validation entry always is.
    ``resume=True`` continues from the latest checkpoint in ``output_dir``, on as many
    processes as it trained on (``any_process_count=True``: on any number, with a warning: the
    steps' batches continue, but their shares' latent noise and dropout differ from an
    uninterrupted run's); ``on_save`` gets each checkpoint's directory before it is moved into
    place (see :func:`save_checkpoint`). An ``accelerator`` of one's own must train in
    ``config.mixed_precision`` and leave gradient accumulation to ``config.micro_batch_size``
    (its own ``gradient_accumulation_steps`` would divide the loss a second time).
    With an ``output_dir``, the signals ``config.stop_signals`` (a scheduler's SIGTERM or
    SIGUSR1) end the run after the step they arrive in, saved as a checkpoint, by raising
    :class:`amvl.stopping.TrainingStopped` (on every process, after the same step).
    Only the parameters that require gradients train (a PEFT base's adapters, not its frozen
    weights). Trainable bf16/fp16 weights get a warning: AdamW updates them without fp32
    master weights.
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from transformers import get_scheduler

    if not examples:
        raise ValueError("train needs at least one example")
    if config.eval_every and not eval_examples:
        raise ValueError(f"eval_every={config.eval_every}, but there are no eval_examples")
    if config.batch_size > len(examples):
        warnings.warn(f"batch_size {config.batch_size} is larger than the {len(examples)} "
                      "examples: every batch holds some of them more than once", stacklevel=2)
    trackers = list(config.report_to)
    if trackers:
        check_trackers(trackers)
        if accelerator is not None:
            raise ValueError(f"report_to={trackers} with an accelerator of your own: build it "
                             "with log_with=... and start its trackers (init_trackers); the "
                             "loop logs to them")
        if output_dir is None:
            raise ValueError(f"report_to={trackers} needs an output_dir: the run is named "
                             f"after it, and local trackers write into output_dir/{LOGS_DIR}")
    own_accelerator = accelerator is not None
    if accelerator is None:
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        # A VLM's vision tower gets no gradient from a share of a batch without images: DDP
        # must look for unused parameters there, or it waits for their gradients forever.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=model.is_vlm)
        group = InitProcessGroupKwargs(timeout=timedelta(seconds=config.ddp_timeout))
        accelerator = Accelerator(mixed_precision=config.mixed_precision,
                                  kwargs_handlers=[ddp, group], log_with=trackers or None,
                                  project_dir=str(Path(output_dir) / LOGS_DIR)
                                  if trackers else None)
    if config.mixed_precision == "fp16" and not accelerator.native_amp:
        warnings.warn(f"mixed_precision='fp16' has no effect on {accelerator.device}: "
                      "training runs in the model's own dtype", stacklevel=2)
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(f"this loop checkpoints from one full copy of the model, which "
                         f"{accelerator.distributed_type.value} does not keep: train with "
                         "amvl.trainer.AMVLTrainer instead")
    if own_accelerator and accelerator.gradient_accumulation_steps != 1:
        # accelerator.backward divides the loss by it, on top of the loop's own accumulation
        raise ValueError(f"an accelerator with gradient_accumulation_steps="
                         f"{accelerator.gradient_accumulation_steps}: the loop accumulates by "
                         "itself, so build it without and set TrainConfig.micro_batch_size to "
                         "split each step into micro-batches")
    if own_accelerator and accelerator.mixed_precision != config.mixed_precision:
        # the accelerator's precision is the one that trains, not the config's, which the
        # checkpoints record
        raise ValueError(f"TrainConfig.mixed_precision={config.mixed_precision!r}, but the "
                         f"accelerator of your own trains in {accelerator.mixed_precision!r}: "
                         "set the same precision in both (Accelerator(mixed_precision=...))")
    launched = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))
    if launched != accelerator.num_processes:
        raise LaunchError(
            f"launched as {launched} processes, but accelerate sees "
            f"{accelerator.num_processes}: each would train alone and write the same "
            "checkpoints. Without GPUs launch with ACCELERATE_USE_CPU=1 torchrun "
            "--nproc_per_node N (accelerate launch --cpu starts one process)")
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise LaunchError(f"batch_size {config.batch_size} is not divisible by the "
                          f"{world} processes")
    per_rank = config.batch_size // world
    micro_size = config.micro_batch_size or per_rank
    if per_rank % micro_size:
        raise LaunchError(f"each of the {world} processes takes {per_rank} of batch_size "
                          f"{config.batch_size}, which micro_batch_size {micro_size} does not "
                          "divide")
    accumulate = per_rank // micro_size
    if model.config.free_bits > 0 and model.config.objective in ("amvl", "elbo") \
            and world * accumulate > 1:
        warnings.warn(f"free_bits={model.config.free_bits} clamps each forward's batch-mean KL "
                      f"per slot: with {world * accumulate} forwards a step (processes x "
                      "micro-batches) the step is not the whole batch's", stacklevel=2)
    if eval_examples and len(eval_examples) < world:
        raise LaunchError(f"{len(eval_examples)} eval_examples for {world} processes: each "
                          "validates a share of them, so give at least one each")
    torch.manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    _warn_low_precision_weights(params, config)
    amvl_config = model.config
    if amvl_config.kl_schedule == "linear" and amvl_config.kl_warmup_steps > config.steps:
        warnings.warn(f"kl_warmup_steps={amvl_config.kl_warmup_steps} is longer than the run's "
                      f"{config.steps} steps: the KL weight never reaches 1", stacklevel=2)
    optimizer = torch.optim.AdamW(_decay_groups(model, config.weight_decay),
                                  lr=config.learning_rate)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, config.warmup_steps, config.steps)
    start, history, sums, summed = 0, [], {}, 0
    out = Path(output_dir) if output_dir is not None else None
    if resume and out is None:
        raise FileNotFoundError("resume=True but no checkpoint in output_dir=None: give the "
                                "directory of the run to continue")
    checkpoint = check_output_dir(out, config, model.config, resume,
                                  None if any_process_count else accelerator.num_processes) \
        if out is not None else None
    if checkpoint is not None:
        load_checkpoint_weights(model, checkpoint)
        # On the CPU: torch.load puts tensors back on the device they were saved from, so every
        # process of a GPU run piled the main process's AdamW state onto cuda:0 (and a machine
        # without CUDA could not resume at all); load_state_dict moves it to the parameters.
        decays = [group["weight_decay"] for group in optimizer.param_groups]
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location="cpu",
                                             weights_only=True))
        # load_state_dict took the checkpoint's weight decay too: this run's, as its rates
        for group, decay in zip(optimizer.param_groups, decays):
            group["weight_decay"] = decay
        scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", map_location="cpu",
                                             weights_only=True))
        _rates_of_this_run(optimizer, scheduler, config.learning_rate)
        state = json.loads((checkpoint / "state.json").read_text())
        trained_on = state.get("num_processes", world)
        # any_process_count=True let it through check_output_dir; said once, not per process
        if trained_on != world and accelerator.is_main_process:
            warnings.warn(f"{checkpoint.name} trained on {trained_on} processes and continues "
                          f"on {world}: the steps' batches continue, but their shares' latent "
                          "noise and dropout are not an uninterrupted run's", stacklevel=2)
        _set_rng_state(*_rng_state_of_rank(torch.load(checkpoint / "rng.pt", map_location="cpu",
                                                      weights_only=True), state, rank))
        if accelerator.scaler is not None and (checkpoint / "scaler.pt").is_file():
            accelerator.scaler.load_state_dict(torch.load(checkpoint / "scaler.pt",
                                                          map_location="cpu",
                                                          weights_only=True))
        start, history, sums = state["step"], state["history"], state["pending"]
        # Before the metric names were settled, the objective's prior-draw NLL (gamma > 0)
        # was "nll_prior", now the name of the NLL from the prior's means: renamed on load,
        # so the history and the open log window hold one name for one quantity.
        for entry in (*[e for e in history if "eval/loss" not in e], sums):
            if "nll_prior" in entry and "nll_prior_draw" not in entry:
                entry["nll_prior_draw"] = entry.pop("nll_prior")
        # Checkpoints before "pending_steps" assumed a window open since the last multiple
        # of log_every, which a run that logged its last step had closed.
        summed = state.get("pending_steps", start % config.log_every)
    if config.activation_checkpointing:
        model.activation_checkpointing_enable()
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    # Compiled around the DDP wrapper, as torch documents (its optimiser splits the graph at
    # gradient buckets); ``wrapped`` itself stays what checkpoints unwrap.
    forward = torch.compile(wrapped) if config.compile else wrapped
    device = accelerator.device
    bar = tqdm(range(start, config.steps), desc="train", disable=not progress or rank != 0,
               initial=start, total=config.steps)
    steps = StepBatches(examples, collator, start=start, steps=config.steps,
                        batch_size=config.batch_size, seed=config.seed, rank=rank, world=world,
                        micro_size=micro_size)
    stops = None  # without an output_dir there is nowhere to save: signals act as they would
    tracker_runs: dict[str, str] = {}
    built_ahead = iter(prefetching_loader(steps, config.num_workers,
                                          pin_memory=device.type == "cuda", seed=config.seed,
                                          ignore_signals=config.stop_signals
                                          if out is not None else ())) \
        if config.num_workers and start < config.steps else None
    try:
        if out is not None and config.stop_signals and start < config.steps:
            stops = StopSignals(config.stop_signals, world)
        if trackers:  # inside: a tracker that fails to start stops the workers too
            tracker_runs = start_trackers(accelerator, out, model.config, config,
                                          read_runs(checkpoint) if checkpoint else None)
        for step in bar:
            wrapped.train()  # each step: an on_log callback may have evaluated the model
            mine = None
            if built_ahead is not None:
                batches = next(built_ahead)
            elif accumulate > 1 and hasattr(collator, "answer_tokens"):
                # each micro-batch built when it runs, its answer tokens counted from the text
                mine, batches = steps.share(step), None
            else:  # one batch (or a collator of the caller's own): built first
                batches = steps.build(steps.share(step))
            tokens = None
            if world > 1 or accumulate > 1:
                # each micro-batch's NLL over the mean answer tokens of the step's micro-batches
                # on all processes, so the step's loss is the token mean over its whole batch
                count = collator.answer_tokens(mine) if batches is None \
                    else sum(int(b["answer_mask"].sum()) for b in batches)
                tokens = torch.tensor(float(count), device=device)
                tokens = (accelerator.reduce(tokens, "sum") if world > 1 else tokens) \
                    / (world * accumulate)
            for i in range(accumulate):
                batch = batches[i] if batches is not None else steps.micro_batch(mine, i)
                # asynchronous from pinned memory: the copy overlaps what the device still runs
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                # DDP averages the gradients across processes at the step's last micro-batch only
                last = i + 1 == accumulate
                with accelerator.no_sync(wrapped) if not last else contextlib.nullcontext():
                    with accelerator.autocast(), recompute_skips_side_effects() \
                            if config.compile else contextlib.nullcontext():
                        out_step = forward(**batch, step=step,
                                           seed=step_seed(config.seed, step, rank, micro_index=i),
                                           answer_tokens=tokens)
                    accelerator.backward(out_step.loss / accumulate if accumulate > 1
                                         else out_step.loss)
                # summed on the device: reading them every step would make the host wait
                for key, value in out_step.metrics.tensors().items():
                    value = value / accumulate if accumulate > 1 else value
                    sums[key] = sums.get(key, 0.0) + value
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            summed += 1
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                sums = mean_over_processes(sums, accelerator)
                entry = {"step": step + 1, "lr": lr,
                         **{k: float(v) / summed for k, v in sums.items()}}
                history.append(entry)
                log_entry(accelerator, entry)
                sums, summed = {}, 0
                bar.set_postfix(loss=f"{entry['loss']:.3f}")
                if not progress and rank == 0:  # no bar to show it: a line, as a log file wants
                    bar.write("step {}: {}".format(step + 1, ", ".join(
                        f"{key} {entry[key]:.4g}" for key in TRAIN_LOG_KEYS if key in entry)))
                if out is not None and accelerator.is_main_process:
                    _write_history(out, history)
                if on_log is not None:
                    on_log(entry)
            if eval_examples and ((config.eval_every and (step + 1) % config.eval_every == 0)
                                  or step + 1 == config.steps):
                entry = _validation_entry(step + 1, accelerator, accelerator.unwrap_model(wrapped),
                                          collator, eval_examples,
                                          config.eval_batch_size or micro_size, config.seed)
                history.append(entry)
                log_entry(accelerator, entry)
                if rank == 0:  # tqdm.write prints plainly when the bar is disabled
                    bar.write("step {}: {}".format(step + 1, ", ".join(
                        f"{key} {entry[key]:.4f}" for key in ("eval/loss", "eval/nll",
                                                              "eval/nll_prior"))))
                if out is not None and accelerator.is_main_process:
                    _write_history(out, history)  # before the step's save: the checkpoint has it
                if on_log is not None:
                    on_log(entry)
            save_now = config.save_every and (step + 1) % config.save_every == 0
            stop_on = stops.agreed() if stops is not None else None
            if out is not None and (save_now or step + 1 == config.steps or stop_on):
                if summed:  # the open log window, saved by the main process for all of them
                    sums = mean_over_processes(sums, accelerator)
                # each process's own: their dropout drew different amounts (other lengths)
                rng_states = gather_object([_rng_state()]) if world > 1 else None
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save_checkpoint(out, step + 1, accelerator.unwrap_model(wrapped), optimizer,
                                    scheduler, history, config,
                                    {k: float(v) for k, v in sums.items()}, accelerator.scaler,
                                    pending_steps=summed, num_processes=world,
                                    on_save=partial(_add_tracker_runs, runs=tracker_runs,
                                                    then=on_save),
                                    rng_states=rng_states)
                    _prune(out, config.save_total_limit)
                accelerator.wait_for_everyone()
            if stop_on and step + 1 < config.steps:  # at the last step the run is complete
                raise TrainingStopped(step + 1, stop_on, out / f"{CHECKPOINT_PREFIX}{step + 1}")
    finally:
        stop_workers(built_ahead)
        if stops is not None:
            stops.close()
        if trackers:
            finish_trackers(accelerator)

    return history
