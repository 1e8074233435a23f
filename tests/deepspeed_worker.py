"""Worker for tests/test_trainer.py: AMVLModel under DeepSpeed ZeRO on 2 CPU processes (gloo,
torchrun).

Modes "zero2" and "zero3": ``deepspeed.initialize`` on the model of tests/fsdp_worker.py in
fp32 (ZeRO takes no fp64), its steps with SGD and no gradient clipping (DeepSpeed clips to 1.0
unless told otherwise); before and after them each rank decodes its own prompt
(``fsdp_worker.decode``: the ranks' rows end at different steps). Rank 0 writes the gathered
parameters to OUT/params.safetensors; each rank its tokens to OUT/untrained_tokens{rank} and
OUT/tokens{rank}.safetensors.

Mode "trainer": AMVLTrainer with a ZeRO-3 ``deepspeed`` config (what a Trainer script passes),
on a base that transformers built partitioned (every parameter: :func:`zero3_arguments`); a
checkpoint and ``save_model`` to OUT/saved; rank 0 writes the gathered parameters to
OUT/params.safetensors for the test to compare with what it loads. Mode
"trainer_without_gathering": the same without ``stage3_gather_16bit_weights_on_model_save``
(:func:`trainer_without_gathering`), checkpoints and a resume from one; mode
"peft_trainer_without_gathering": the same on a PEFT base.

Mode "vlm": ZeRO-3 steps of a tiny Qwen2-VL whose batches hold images on rank 0 and none on
rank 1 (the collator's stand-in image), the gathered parameters to OUT/params.safetensors
and each rank's decoded tokens to OUT/tokens{rank}.safetensors.
"""

import os
import sys
from collections.abc import Callable
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from amvl.config import AMVLConfig
from amvl.data import AMVLCollator
from amvl.model import AMVLModel
from amvl.tiny import tiny_qwen2, word_tokenizer
from amvl.training import step_seed
from tests import fsdp_worker
from tests.worker_exit import exit_without_teardown


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of the parameters (ZeRO-3 keeps one partition of each on a rank)."""
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone().contiguous() for n, p in params.items()}


def steps_under_zero(out: str, model: AMVLModel, batch_of: Callable[[int, int], dict],
                     stage: int, before_steps: Callable[[], None] = lambda: None) -> None:
    """``deepspeed.initialize`` with ZeRO ``stage``, SGD and no clipping, fsdp_worker's steps
    on ``batch_of(step, rank)``; rank 0 writes the gathered parameters to
    OUT/params.safetensors. ``before_steps`` runs once the model is partitioned."""
    rank = dist.get_rank()
    config = {"train_micro_batch_size_per_gpu": fsdp_worker.PER_RANK,
              "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0,
              "zero_allow_untested_optimizer": True}
    optimizer = torch.optim.SGD(model.parameters(), lr=fsdp_worker.LR)
    wrapped, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    before_steps()
    for step in range(fsdp_worker.STEPS):
        loss = wrapped(**batch_of(step, rank), step=step, seed=step_seed(0, step, rank)).loss
        wrapped.backward(loss)
        wrapped.step()
    params = gathered(model)
    if rank == 0:
        save_file(params, os.path.join(out, "params.safetensors"))


def engine(out: str, stage: int) -> None:
    model, collator = fsdp_worker.build(checkpointed=False, dtype=torch.float32)
    rank = dist.get_rank()

    def decode_untrained() -> None:
        # ZeRO-3 prefetches what a traced training step used, which can hide a parameter
        # read outside its module's forward: decode before any step too.
        save_file({"tokens": fsdp_worker.decode(model, collator, rank)},
                  os.path.join(out, f"untrained_tokens{rank}.safetensors"))
    steps_under_zero(out, model, lambda step, r: fsdp_worker.batch(collator, step, r), stage,
                     decode_untrained)
    tokens = fsdp_worker.decode(model, collator, rank)
    save_file({"tokens": tokens}, os.path.join(out, f"tokens{rank}.safetensors"))


def zero3_built_model(partitioned: bool = True) -> tuple[AMVLModel, AMVLCollator]:
    """The model of tests/fsdp_worker.py (fp32), its base built by transformers under ZeRO-3
    (as ``from_pretrained`` builds one), partitioned before AMVLModel adds its special
    tokens, into embedding rows the vocabulary leaves spare as in Qwen2 checkpoints.
    ``partitioned=False``: the same model built whole, in a process without ZeRO-3."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tokenizer = word_tokenizer(fsdp_worker.WORDS)
    config = tiny_qwen2(tokenizer).config
    config.vocab_size += 8
    base = AutoModelForCausalLM.from_config(config)
    assert hasattr(base.get_input_embeddings().weight, "ds_id") == partitioned, \
        "not built as asked"
    model = AMVLModel(base, tokenizer,
                      AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch"))
    return model.train(), AMVLCollator(tokenizer)


def zero3_arguments(out: str, max_steps: int, gather: bool = True, partition_all: bool = False):
    """TrainingArguments with a ZeRO-3 ``deepspeed`` config (what a Trainer script passes), a
    checkpoint every 2 steps; ``gather``: with ``stage3_gather_16bit_weights_on_model_save``
    (DeepSpeed's default is without). Build them before the model: with ZeRO-3 in the
    arguments, transformers builds models partitioned. ``partition_all``: no parameter is
    kept whole on every process (ZeRO-3 keeps those under 1e5 elements so, which are all of
    this tiny model's), so that what reads them must gather them."""
    from transformers import TrainingArguments

    zero = {"stage": 3, **({"stage3_gather_16bit_weights_on_model_save": True} if gather else {}),
            **({"stage3_param_persistence_threshold": 0} if partition_all else {})}
    zero3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
             "zero_optimization": zero}
    return TrainingArguments(output_dir=out, per_device_train_batch_size=2,
                             max_steps=max_steps, learning_rate=1e-2, logging_steps=1,
                             save_strategy="steps", save_steps=2, report_to=[], use_cpu=True,
                             disable_tqdm=True, deepspeed=zero3, seed=0)


def trainer(out: str) -> None:
    from amvl.trainer import AMVLTrainer

    args = zero3_arguments(out, max_steps=2, partition_all=True)
    model, collator = zero3_built_model()
    data = [{"question": f"w{i} w{i + 1} w{i + 2}", "answer": f"w{i + 3}"} for i in range(8)]
    run = AMVLTrainer(model, args, train_dataset=data, data_collator=collator)
    run.train()
    if not any("amvl/kl_fwd" in entry for entry in run.state.log_history):
        raise SystemExit("the objective's metrics were not logged")
    run.save_model(os.path.join(out, "saved"))
    params = gathered(model)
    if dist.get_rank() == 0:
        save_file(params, os.path.join(out, "params.safetensors"))


def with_adapters(model: AMVLModel) -> AMVLModel:
    """``model`` with LoRA adapters on its attention's q and v projections, as amvl train
    adds them (without training the latent tokens' rows: PEFT's trainable tokens gather
    ZeRO-3 partitions onto a CUDA device)."""
    from amvl.lora import add_adapters

    add_adapters(model, {"r": 4, "alpha": 8, "dropout": 0.0, "train_latent_tokens": False,
                         "target_modules": ["q_proj", "v_proj"]})
    return model


def trainer_without_gathering(out: str, peft: bool = False) -> None:
    """ZeRO-3 without stage3_gather_16bit_weights_on_model_save, every parameter partitioned
    (on a PEFT base with ``peft``: :func:`with_adapters`): 4 steps, checkpoints at 2 and 4,
    ``save_model`` to OUT/saved, the gathered parameters to OUT/params.safetensors; then a
    fresh model resumes from checkpoint-2 to step 4, its gathered parameters to
    OUT/resumed.safetensors."""
    from amvl.trainer import AMVLTrainer

    data = [{"question": f"w{i} w{i + 1} w{i + 2}", "answer": f"w{i + 3}"} for i in range(16)]
    for resume, name in ((None, "params"), ("checkpoint-2", "resumed")):
        args = zero3_arguments(os.path.join(out, name), max_steps=4, gather=False,
                               partition_all=True)
        model, collator = zero3_built_model()
        if peft:
            model = with_adapters(model)
        run = AMVLTrainer(model, args, train_dataset=data, data_collator=collator)
        run.train(resume_from_checkpoint=resume and os.path.join(out, "params", resume))
        if resume is None:
            run.save_model(os.path.join(out, "saved"))
        params = gathered(model)
        if dist.get_rank() == 0:
            save_file(params, os.path.join(out, f"{name}.safetensors"))


def vlm(dtype: torch.dtype = torch.float32) -> tuple[AMVLModel, AMVLCollator]:
    """A tiny Qwen2-VL AMVLModel and a collator that gives examples without images a blank
    stand-in (what a VLM sharded across processes needs: see :func:`vlm_batch`)."""
    from PIL import Image

    from amvl.data import VisionTokens
    from amvl.tiny import tiny_image_processor, tiny_qwen2_vl

    torch.manual_seed(0)
    tokenizer = word_tokenizer(fsdp_worker.WORDS, vision=True)
    base = tiny_qwen2_vl(tokenizer)
    model = AMVLModel(base, tokenizer,
                      AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch")).to(dtype)
    collator = AMVLCollator(tokenizer, tiny_image_processor(),
                            VisionTokens.from_model_config(base.config),
                            image_for_text_only=Image.new("RGB", (16, 16)))
    return model.train(), collator


def vlm_batch(collator: AMVLCollator, step: int, rank: int) -> dict:
    """Rank 0's examples have an image, rank 1's none (they get the stand-in)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(100 * step + rank)
    examples = [{"question": f"w{step + j} w{rank + 3}", "answer": f"w{j + 7}",
                 **({"images": [Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8))]}
                    if rank == 0 else {})} for j in range(2)]
    return collator(examples)


def vlm_engine(out: str) -> None:
    """ZeRO-3 steps of the tiny Qwen2-VL, then each rank decodes its first batch."""
    model, collator = vlm()
    rank = dist.get_rank()
    steps_under_zero(out, model, lambda step, r: vlm_batch(collator, step, r), stage=3)
    b = vlm_batch(collator, 0, rank)
    tokens = model.generate(b["prompt_ids"], b["prompt_mask"], b["pixel_values"],
                            b["image_grid_thw"], max_new_tokens=3).sequences
    save_file({"tokens": tokens}, os.path.join(out, f"tokens{rank}.safetensors"))


def main(out: str, mode: str) -> None:
    torch.set_num_threads(1)
    # a rank left waiting in a collective fails the test in a minute instead of hanging it
    deepspeed.init_distributed("gloo", timeout=timedelta(seconds=60))
    if mode == "trainer":
        trainer(out)
    elif mode in ("trainer_without_gathering", "peft_trainer_without_gathering"):
        trainer_without_gathering(out, peft=mode.startswith("peft"))
    elif mode == "vlm":
        vlm_engine(out)
    else:
        engine(out, stage={"zero2": 2, "zero3": 3}[mode])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
    exit_without_teardown()
