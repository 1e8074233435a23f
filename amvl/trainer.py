"""``transformers.Trainer`` integration.

Distribution (DDP, FSDP, DeepSpeed) is the Trainer's and accelerate's: launch with
``torchrun`` or ``accelerate launch`` as for any Trainer script. This module only supplies the
loss (the model's objective at the current step), logs the objective's metrics averaged over
each logging interval (each optimizer step's micro-batches first, then the steps, then the
processes, as the Trainer averages its loss), saves with :meth:`AMVLModel.save_pretrained`
and loads checkpoints (``resume_from_checkpoint``, ``load_best_model_at_end``) with
:meth:`AMVLModel.load_weights`. Under DeepSpeed the Trainer resumes from DeepSpeed's own
checkpoint: it alone holds the base's weights under ZeRO-3 without
``stage3_gather_16bit_weights_on_model_save``, and it leaves a PEFT base's frozen weights out
(:meth:`AMVLTrainer._save`, :meth:`AMVLTrainer.save_model`).

Each micro-batch's answer NLL is its summed NLL over the mean answer tokens of the
optimizer step's micro-batches on all processes, so gradient accumulation and data
parallelism optimise the token mean over the whole step's batch, as one process on it would
(transformers' ``num_items_in_batch``, counted here from ``answer_mask``). The KL terms are
micro-batch means averaged over the step's micro-batches, so where these differ in size (an
epoch's short last one) they are not the one batch's example mean.

Latent noise is seeded per micro-batch and process from ``TrainingArguments.seed``
(:func:`amvl.training.step_seed`): each rank draws its own noise, and a resumed run draws the
same as an uninterrupted one. Evaluation scores the full objective (KL weight 1, whatever the
schedule) with noise fixed per evaluation batch, so the same model always gets the same
``eval_loss`` and evaluating does not move training's noise.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (PreTrainedTokenizerBase, ProcessorMixin, Trainer, TrainerCallback,
                          TrainerControl, TrainerState, TrainingArguments)
from transformers.data.data_collator import DataCollatorWithPadding, default_data_collator
from transformers.integrations.deepspeed import (deepspeed_load_checkpoint,
                                                 is_deepspeed_zero3_enabled)
from transformers.trainer_utils import (PREFIX_CHECKPOINT_DIR, EvalLoopOutput, TrainOutput,
                                        align_special_tokens)
from transformers.utils import logging

from amvl.model import AMVLModel, AMVLOutput
from amvl.sharded import gathered_for_reading
from amvl.stopping import DEFAULT_STOP_SIGNALS, StopSignals, TrainingStopped
from amvl.training import (EVAL_STREAM, mean_over_processes, recompute_skips_side_effects,
                           step_seed)

logger = logging.get_logger(__name__)

CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


TRAINING_ARGS_JSON = "training_args.json"
"""What :meth:`AMVLTrainer._save` writes the TrainingArguments to, in every checkpoint."""


class StopOnSignals(TrainerCallback):
    """A Trainer callback (AMVLTrainer adds one): on one of the signals ``names`` the step it
    arrives in is saved as a checkpoint, whatever the save strategy, and
    :class:`amvl.stopping.TrainingStopped` is raised once it is written; ``resume_from_
    checkpoint`` continues from it. All processes agree on the step
    (:class:`amvl.stopping.StopSignals`). A signal during the last step lets training end as
    it would. Under ``save_strategy="best"`` an evaluation at that step decides the save."""

    def __init__(self, names: Sequence[str] = DEFAULT_STOP_SIGNALS) -> None:
        self.names = tuple(names)
        self._signals: StopSignals | None = None
        self._stopping: str | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        self.close()  # a train() before that raised
        self._signals = StopSignals(self.names, args.world_size)

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> TrainerControl:
        name = self._signals.agreed() if self._signals is not None else None
        if name is not None and state.global_step < state.max_steps:
            self._stopping = name
            control.should_save = control.should_training_stop = True
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if self._stopping is not None:
            name = self._stopping
            self.close()
            raise TrainingStopped(state.global_step, name, Path(args.output_dir) /
                                  f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Put the signals' handlers back (and end the processes' group)."""
        self._stopping = None
        if self._signals is not None:
            self._signals.close()
            self._signals = None


def _refuse_reentrant_checkpointing_across_processes(args: TrainingArguments) -> None:
    """Refuse reentrant activation checkpointing on several processes (DDP, DeepSpeed): a
    step runs layers more than once (and DDP looks for unused parameters for some
    objectives), so a recomputed layer hands the parameter's gradient to DDP's or DeepSpeed's
    hooks twice, which fail late and obscurely ("Expected to mark a variable ready only
    once"). transformers 5.2x names the settings activation_*, earlier 5.x gradient_*."""
    enabled = getattr(args, "activation_checkpointing", None) or \
        getattr(args, "gradient_checkpointing", None)
    settings = getattr(args, "activation_checkpointing_kwargs", None) or \
        getattr(args, "gradient_checkpointing_kwargs", None) or {}
    if isinstance(settings, str):  # a JSON text, as the command line gives it
        settings = json.loads(settings)
    if enabled and settings.get("use_reentrant") and args.world_size > 1:
        raise ValueError(f"AMVLTrainer cannot honour: reentrant activation checkpointing "
                         f"({{'use_reentrant': True}}) on {args.world_size} processes: an "
                         "AMVL step runs layers more than once, and DDP and DeepSpeed refuse "
                         "a gradient handed twice; leave use_reentrant unset (non-reentrant, "
                         "the same memory saving)")


class AMVLTrainer(Trainer):
    """A Trainer for :class:`AMVLModel` with :class:`amvl.data.AMVLCollator` batches.

    The dataset yields raw examples (``{"images", "question", "answer"}``), so the Trainer must
    not drop "unused" columns: ``remove_unused_columns`` is False in the trainer's own copy of
    ``args`` (the caller's object stays as given, e.g. for a plain Trainer beside it). There,
    too, ``ddp_find_unused_parameters`` left unset is False where every parameter gets a
    gradient at every step (the objectives with a posterior, on a text model), True
    elsewhere. The stop signals of :class:`amvl.training.TrainConfig` (SIGTERM, SIGUSR1) save
    a checkpoint after the step they arrive in and stop (:class:`StopOnSignals`).
    """

    # The Trainer divides the loss by the step's micro-batches (compute_loss does not scale
    # it for accumulation; the answer tokens it divides by are the step's per micro-batch).
    loss_is_scaled_for_ga = False

    def __init__(self, model: AMVLModel, args: TrainingArguments | None = None, *rest: Any,
                 stop_signals: Sequence[str] = DEFAULT_STOP_SIGNALS, **kwargs: Any):
        if args is None:  # the stock default, made here to be adjusted before it is used
            args = TrainingArguments(output_dir="tmp_trainer")
        _refuse_reentrant_checkpointing_across_processes(args)
        ours = {"remove_unused_columns": False}
        if args.ddp_find_unused_parameters is None and isinstance(model, AMVLModel):
            # The stock Trainer has DDP look for parameters without gradients, a walk over the
            # autograd graph at every step, for any model that is not a PreTrainedModel. Only
            # a VLM (a batch without images leaves its vision tower out) and the objectives
            # without a posterior (whose head, or every head, goes unused) need it.
            ours["ddp_find_unused_parameters"] = model.is_vlm or \
                model.objective.latent_source != "posterior"
        if any(getattr(args, key) != value for key, value in ours.items()):
            args = copy.copy(args)  # the caller's object stays as given
            for key, value in ours.items():
                setattr(args, key, value)
        super().__init__(model, args, *rest, **kwargs)
        self._refuse_what_amvl_batches_cannot_do()
        self._stop_on_signals = StopOnSignals(stop_signals) if stop_signals else None
        if self._stop_on_signals is not None:
            self.add_callback(self._stop_on_signals)
        self._eval_batch = 0
        # the objective's metrics summed over an evaluation's examples (evaluation_loop)
        self._eval_sums: dict[str, torch.Tensor | float] | None = None
        self._eval_examples = 0
        self._hidden_processing_class = None  # while train() hides it from the alignment
        self._warned_weights_kept_by_deepspeed = False
        self._reset_training_state()

    @property
    def _processor_to_save(self):
        """The processing class, also while train() hides it from the stock alignment."""
        return self.processing_class if self.processing_class is not None \
            else self._hidden_processing_class

    def _refuse_what_amvl_batches_cannot_do(self) -> None:
        """Settings the stock Trainer would silently skip (or crash on later) with AMVL
        batches, which carry no logits, labels or ``input_ids``."""
        refused = []
        if self.data_collator is default_data_collator \
                or isinstance(self.data_collator, DataCollatorWithPadding):
            refused.append("a data_collator of the Trainer's own (none was given): AMVL "
                           "batches come from data_collator=amvl.data.AMVLCollator(tokenizer, "
                           "image_processor, ...)")
        if self.compute_metrics is not None or self.preprocess_logits_for_metrics is not None:
            refused.append("compute_metrics / preprocess_logits_for_metrics: evaluation "
                           "returns the objective's loss only, no logits or labels, so they "
                           "would never be called (score answers with amvl.evaluation or "
                           "amvl.diagnostics)")
        if getattr(self, "compute_loss_func", None) is not None:
            refused.append("compute_loss_func: the loss is the AMVLConfig's objective")
        if getattr(self.args, "include_for_metrics", None):
            refused.append(f"include_for_metrics={self.args.include_for_metrics!r}: it feeds "
                           "compute_metrics, and the Trainer looks for input_ids, which AMVL "
                           "batches do not have")
        if self.args.label_smoothing_factor:
            refused.append("label_smoothing_factor: the objective's NLL is plain "
                           "cross-entropy, so it would have no effect")
        strategy = getattr(self.args, "train_sampling_strategy", "random")
        if strategy in ("group_by_length", "batch_rebalance") and self.train_dataset is not None \
                and self.args.length_column_name not in getattr(self.train_dataset,
                                                                "column_names", ()):
            refused.append(f"train_sampling_strategy={strategy!r} without a precomputed "
                           f"{self.args.length_column_name!r} column: the Trainer reads "
                           "lengths from input_ids, which raw AMVL examples do not have "
                           "(give a datasets.Dataset that has the column)")
        if self.args.n_gpu > 1:
            refused.append(f"{self.args.n_gpu} GPUs in one process (torch.nn.DataParallel, "
                           "which cannot gather the model's outputs): launch one process per "
                           "GPU, torchrun --nproc_per_node N (or CUDA_VISIBLE_DEVICES)")
        if refused:
            raise ValueError("AMVLTrainer cannot honour: " + "; ".join(refused))

    def _track_num_input_tokens(self, inputs: dict[str, torch.Tensor]) -> None:
        """``include_num_input_tokens_seen``: the prompts' and answers' tokens (the real ones
        for "non_padding", every position for "all"), summed over the processes; the stock
        count looks for ``input_ids``, which AMVL batches do not have."""
        mode = self.args.include_num_input_tokens_seen
        if mode in ("no", False, None) or "prompt_ids" not in inputs:
            return
        if mode == "non_padding":
            tokens = inputs["prompt_mask"].sum() + inputs["answer_mask"].sum()
        else:
            tokens = inputs["prompt_ids"].numel() + inputs["answer_ids"].numel()
        tokens = torch.as_tensor(tokens, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

    def _reset_training_state(self) -> None:
        """What one train() call counts: a second call (a resume in the same process) must not
        continue the first's noise counters or log its unlogged metrics."""
        # Sums stay on the device until logged: reading them every step would make the host
        # wait for the forward before it queues the backward. A step's micro-batches are
        # averaged first, then the steps, as the Trainer averages its loss (a last step of
        # fewer micro-batches weighs as much as any other).
        self._step_sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self._step_micro_batches = 0
        self._metric_sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self._metric_steps = 0
        self._seeded_step, self._micro_batch = -1, 0

    def train(self, *args: Any, **kwargs: Any) -> TrainOutput:
        """``Trainer.train`` with fresh noise counters and metric sums
        (:meth:`_inner_training_loop`). A tokenizer's or processor's special tokens are aligned
        with the base model's config (an AMVLModel's own ``config`` is its AMVLConfig)."""
        try:
            return self._train_aligned(*args, **kwargs)
        finally:  # a run that raised: the stop signals' handlers go back all the same
            if self._stop_on_signals is not None:
                self._stop_on_signals.close()

    def _train_aligned(self, *args: Any, **kwargs: Any) -> TrainOutput:
        processing_class = self.processing_class
        if not isinstance(processing_class, (PreTrainedTokenizerBase, ProcessorMixin)):
            return super().train(*args, **kwargs)  # an image processor: nothing to align
        # The stock train() aligns the special tokens of self.model.config with the
        # tokenizer's; an AMVLModel's config is its AMVLConfig, so align the base model's
        # here and hide the processing class from that step (nothing else in train() needs
        # it for AMVL batches, which have no input_ids).
        align_special_tokens(self.accelerator.unwrap_model(self.model)._unwrapped(),
                             processing_class)
        self.processing_class, self._hidden_processing_class = None, processing_class
        try:
            return super().train(*args, **kwargs)
        finally:
            self.processing_class, self._hidden_processing_class = processing_class, None

    def _inner_training_loop(self, *args: Any, **kwargs: Any) -> TrainOutput:
        """The stock loop from fresh noise counters and metric sums: each train() call, and
        each retry of ``auto_find_batch_size`` at a smaller batch (which re-enters this loop
        without train(); its failed step's seed and metrics carried over before)."""
        self._reset_training_state()
        return super()._inner_training_loop(*args, **kwargs)

    def _training_seed(self) -> int:
        """The noise seed of this micro-batch: (seed, micro-batches before it, rank)."""
        step = self.state.global_step
        if step != self._seeded_step:  # a new optimizer step: the last one's metrics close
            self._seeded_step, self._micro_batch = step, 0
            self._close_metric_step()
        micro = step * self.args.gradient_accumulation_steps + self._micro_batch
        self._micro_batch += 1
        return step_seed(self.args.seed, micro, self.args.process_index)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device
                          ) -> tuple[list, torch.Tensor | None]:
        """The Trainer's micro-batches of one optimizer step, and the answer tokens they hold
        on all processes (``num_items_in_batch``; the Trainer counts ``labels``, which AMVL
        batches do not have)."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        masks = [b["answer_mask"] for b in batch_samples if "answer_mask" in b]
        if not masks or len(masks) != len(batch_samples):
            return batch_samples, None
        tokens = torch.stack([m.sum() for m in masks]).sum().to(device)
        if self.args.world_size > 1:
            tokens = self.accelerator.reduce(tokens, "sum")
        return batch_samples, tokens

    def evaluation_loop(self, dataloader: Any, description: str,
                        prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None,
                        metric_key_prefix: str = "eval") -> EvalLoopOutput:
        """``Trainer.evaluation_loop`` from the first evaluation seed, so every call draws the
        same latent noise, with the objective's metrics beside the loss
        (``<prefix>_amvl/<name>``: NLL, KLs, active slots, ...) and ``nll_prior``, the
        answers' NLL decoded from the prior's means as inference decodes (one more decoding
        pass a batch; gamma's prior-draw NLL is ``nll_prior_draw``), averaged over the
        examples of every process as the loss is."""
        self._eval_batch = 0  # every evaluate() and predict() draws the same noise
        self._eval_sums, self._eval_examples = defaultdict(float), 0
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only,
                                             ignore_keys, metric_key_prefix)
            sums, examples = self._eval_sums, self._eval_examples
        finally:
            self._eval_sums = None
        if examples:  # the examples of every process (_add_eval_metrics)
            for key, total in sums.items():
                output.metrics[f"{metric_key_prefix}_amvl/{key}"] = float(total / examples)
        return output

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor],
                     return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None
                     ) -> torch.Tensor | tuple[torch.Tensor, AMVLOutput]:
        """The objective's loss on one micro-batch (and the model's output if
        ``return_outputs``): in training at the current step with the micro-batch's noise seed,
        its metrics summed for :meth:`log`; in evaluation the full objective with the
        evaluation batch's seed. ``num_items_in_batch``: the answer tokens of the optimizer
        step's micro-batches on all processes (:meth:`get_batch_samples`)."""
        if not model.training:
            seed = step_seed(self.args.seed, self._eval_batch, self.args.process_index,
                             stream=EVAL_STREAM)
            self._eval_batch += 1
            looping = self._eval_sums is not None  # inside evaluation_loop, not a direct call
            out = model(**inputs, step=None, seed=self._as_graph_input(seed, (1,)),
                        prior_mean_nll=looping and not torch.is_grad_enabled())
            if looping:
                self._add_eval_metrics(out, inputs["prompt_ids"].shape[0])
        else:
            tokens = None
            if num_items_in_batch is not None:  # the mean tokens of a micro-batch of the step
                shares = self.current_gradient_accumulation_steps * self.args.world_size
                tokens = num_items_in_batch / shares
            with recompute_skips_side_effects() if self.args.torch_compile \
                    else contextlib.nullcontext():
                out = model(**inputs, step=self._as_graph_input(self.state.global_step, ()),
                            seed=self._as_graph_input(self._training_seed(), (1,)),
                            answer_tokens=tokens)
            for key, value in out.metrics.tensors().items():
                if "/slot" not in key:  # per-slot values go to diagnostics, not the log line
                    self._step_sums[key] = self._step_sums[key] + value
            self._step_micro_batches += 1
        return (out.loss, out) if return_outputs else out.loss

    def _add_eval_metrics(self, out: AMVLOutput, examples: int) -> None:
        """Add an evaluation batch's metrics, once per example of it on every process, to the
        sums: gathered as the Trainer gathers its loss (``gather_for_metrics``), which drops
        the copies accelerate pads the processes' last batches with, so the means weigh
        examples as ``eval_loss`` does. Before, each process's own mean, copies included, was
        averaged over the processes."""
        metrics = {key: value for key, value in out.metrics.tensors().items()
                   if "/slot" not in key}
        device = out.loss.device
        values = torch.stack([torch.as_tensor(value, device=device).float().reshape(())
                              for value in metrics.values()])
        rows = self.accelerator.gather_for_metrics(values.expand(examples, -1).contiguous())
        for key, total in zip(metrics, rows.sum(0)):
            self._eval_sums[key] = self._eval_sums[key] + total
        self._eval_examples += rows.shape[0]

    def _as_graph_input(self, value: int, shape: tuple[int, ...]) -> int | torch.Tensor:
        """``value`` as an int64 tensor of ``shape`` on the device when torch.compile's mode
        captures CUDA graphs ("reduce-overhead", "max-autotune"): the graph reads a tensor at
        each replay, where it would record a new graph for every new int (a step's number
        and noise seed change every step). As it is otherwise."""
        if not (self.args.torch_compile
                and self.args.torch_compile_mode in CUDA_GRAPH_COMPILE_MODES):
            return value
        return torch.full(shape, value, dtype=torch.int64, device=self.args.device)

    def _close_metric_step(self) -> None:
        """Add the last optimizer step's mean over its micro-batches to the interval's sums."""
        if self._step_micro_batches:
            for key, total in self._step_sums.items():
                self._metric_sums[key] = self._metric_sums[key] + total / self._step_micro_batches
            self._metric_steps += 1
        self._step_sums.clear()
        self._step_micro_batches = 0

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """``Trainer.log``; a log with the training loss also gets the objective's metrics
        (``amvl/<name>``), averaged over the optimizer steps since the last such log and over
        the processes."""
        if "loss" in logs:
            self._close_metric_step()
            means = {key: total / self._metric_steps for key, total in self._metric_sums.items()}
            means = mean_over_processes(means, self.accelerator)
            for key, value in means.items():
                logs.setdefault(f"amvl/{key}", float(value))
            self._metric_sums.clear()
            self._metric_steps = 0
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``; with a PEFT base under ZeRO-3, which saves only its adapter,
        the heads and the latent tokens' rows, only those are gathered (the stock one gathers
        the whole model, or without ``stage3_gather_16bit_weights_on_model_save`` saves
        DeepSpeed's whole checkpoint instead: it does so only for a PEFT model it can see,
        and an AMVLModel's ``base`` hides it). Called on every process."""
        if not (self._peft_base_under_deepspeed() and is_deepspeed_zero3_enabled()):
            super().save_model(output_dir, _internal_call)
            return
        self._save_gathered(self.accelerator.unwrap_model(self.model),
                            output_dir or self.args.output_dir, base_weights=True)
        if self.args.push_to_hub and not _internal_call:  # as the stock save_model does
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None,
              state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """:meth:`AMVLModel.save_pretrained` (of ``state_dict``, the full state the Trainer
        gathered under FSDP or ZeRO-3, or else of the live weights), the processor and the
        arguments (:data:`TRAINING_ARGS_JSON`) into ``output_dir``, on the writing process.

        An empty ``state_dict`` under DeepSpeed is the stock ``save_model``'s stand-in when
        ZeRO-3 does not gather whole weights (no ``stage3_gather_16bit_weights_on_model_save``
        in its config): DeepSpeed's own checkpoint then holds them (resuming loads it), and
        everything else is written here, the heads gathered from their partitions by every
        process (``save_pretrained(..., base_weights=False)``)."""
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if state_dict is not None and not state_dict and self.is_deepspeed_enabled:
            self._save_gathered(model, output_dir, base_weights=False)
            if self.args.should_save and not self._warned_weights_kept_by_deepspeed:
                self._warned_weights_kept_by_deepspeed = True  # once, not at every checkpoint
                logger.warning(
                    "ZeRO-3 without stage3_gather_16bit_weights_on_model_save: the base "
                    "model's weights are saved only in DeepSpeed's own checkpoint "
                    "(global_step*/ in %s), which resume_from_checkpoint loads but "
                    "AMVLModel.from_pretrained and amvl eval cannot; set the flag in the "
                    "DeepSpeed config to save whole weights, or recover them (README: Sharded "
                    "models)", output_dir)
            return
        if not self.args.should_save:  # one writer (the stock _save returns here too)
            return
        model.save_pretrained(output_dir, state_dict=state_dict)
        self._save_processor_and_arguments(output_dir)

    def _save_gathered(self, model: AMVLModel, output_dir: str, base_weights: bool) -> None:
        """``save_pretrained(output_dir, base_weights=base_weights)`` of the live weights, those
        it reads gathered from their ZeRO-3 partitions for it (:meth:`AMVLModel.
        parameters_to_save`). Called on every process: gathering them is collective."""
        with gathered_for_reading(model.parameters_to_save(base_weights)):
            if self.args.should_save:
                model.save_pretrained(output_dir, base_weights=base_weights)
        if self.args.should_save:
            self._save_processor_and_arguments(output_dir)

    def _peft_base_under_deepspeed(self) -> bool:
        """An AMVLModel on a PEFT base, under DeepSpeed: its checkpoints leave out the frozen
        base, as the stock Trainer's do for the PEFT models it can see."""
        model = self.accelerator.unwrap_model(self.model)
        return bool(getattr(self, "is_deepspeed_enabled", False)) \
            and isinstance(model, AMVLModel) and model._is_peft()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The stock states; DeepSpeed's checkpoint without the frozen base's weights for a
        PEFT base (resuming rebuilds the base and loads the rest: :meth:`
        _prepare_for_training`)."""
        if not self._peft_base_under_deepspeed():
            super()._save_optimizer_and_scheduler(output_dir)
            return
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        # the rest of the stock one under DeepSpeed: a scheduler that DeepSpeed does not save
        from accelerate.utils import DeepSpeedSchedulerWrapper
        from transformers.trainer import SCHEDULER_NAME

        if self.args.should_save and not isinstance(self.lr_scheduler,
                                                    DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any,
                              resume_from_checkpoint: str | None) -> tuple[nn.Module, Any]:
        """The stock preparation; with a PEFT base under DeepSpeed, resuming loads DeepSpeed's
        checkpoint without requiring the frozen base's weights, which it leaves out (the stock
        one requires them of any model that is not a PeftModel)."""
        if resume_from_checkpoint is None or not self._peft_base_under_deepspeed():
            return super()._prepare_for_training(max_steps, train_dataloader,
                                                 resume_from_checkpoint)
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader,
                                                                None)
        # what the stock one does with resume_from_checkpoint, loading the module non-strictly
        deepspeed_load_checkpoint(self.model_wrapped, resume_from_checkpoint,
                                  load_module_strict=False)
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader

    def _save_processor_and_arguments(self, output_dir: str) -> None:
        """What a checkpoint holds beside the model's files (on the writing process)."""
        processor = self._processor_to_save
        if processor is not None and not isinstance(processor, PreTrainedTokenizerBase):
            # an image processor (or a processor): beside the base model, as amvl train's
            # final/ keeps it, where amvl eval and amvl generate find it
            processor.save_pretrained(Path(output_dir) / "base")
        # The run's arguments, as the stock training_args.bin records them, but as JSON:
        # nothing this package writes needs unpickling to read.
        (Path(output_dir) / TRAINING_ARGS_JSON).write_text(self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """``train(resume_from_checkpoint=...)``: the weights of a checkpoint :meth:`_save`
        wrote (the optimizer, scheduler and RNG states are the Trainer's own files)."""
        target = self.accelerator.unwrap_model(model or self.model)
        if isinstance(target, AMVLModel) and not self._sharded() and \
                (Path(resume_from_checkpoint) / "amvl_config.json").is_file():
            target.load_weights(resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end=True``: the best checkpoint's weights, as on resume."""
        best = self.state.best_model_checkpoint
        target = self.accelerator.unwrap_model(self.model)
        if isinstance(target, AMVLModel) and best and not self._sharded() and \
                (Path(best) / "amvl_config.json").is_file():
            target.load_weights(best)
        elif best and self._peft_base_under_deepspeed():  # checkpoints without the frozen base
            deepspeed_load_checkpoint(self.model_wrapped, best, load_module_strict=False)
        else:
            super()._load_best_model()

    def _sharded(self) -> bool:
        """FSDP or DeepSpeed: their checkpoints and shards are the Trainer's own business."""
        return bool(getattr(self, "is_fsdp_enabled", False)
                    or getattr(self, "is_deepspeed_enabled", False))

    def prediction_step(self, model: nn.Module, inputs: dict[str, torch.Tensor],
                        prediction_loss_only: bool, ignore_keys: list[str] | None = None
                        ) -> tuple[torch.Tensor, None, None]:
        """Evaluation loss only: an AMVL batch has no logits to gather."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
