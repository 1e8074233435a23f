"""Worker for tests/test_trainer.py: a few AMVLTrainer steps under torchrun (gloo, CPU).

Each rank writes its parameters to OUT/rank{N}.safetensors for the test to compare, and the
objective's metrics it logged (and its own, before they were averaged over the ranks) and an
evaluation's metrics to OUT/metrics{N}.json.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import TrainingArguments

import amvl.trainer
from amvl.config import AMVLConfig
from amvl.data import AMVLCollator
from amvl.model import AMVLModel
from amvl.tiny import tiny_qwen2, word_tokenizer
from amvl.trainer import AMVLTrainer
from tests.worker_exit import exit_without_teardown


def main(out: str) -> None:
    torch.manual_seed(0)  # same initial weights on every rank; DDP broadcasts rank 0's anyway
    words = [f"w{i}" for i in range(30)]
    tokenizer = word_tokenizer(words)
    model = AMVLModel(tiny_qwen2(tokenizer), tokenizer,
                      AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch"))
    rng = torch.Generator().manual_seed(1)
    data = [{"question": " ".join(words[int(i)] for i in torch.randint(0, 30, (4,), generator=rng)),
             "answer": words[int(torch.randint(0, 30, (1,), generator=rng))]} for _ in range(16)]
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=3,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, ddp_backend="gloo", seed=0,
                             disable_tqdm=True, dataloader_num_workers=0,
                             per_device_eval_batch_size=2)
    # One seed on every rank, as a Trainer script has it: AMVLTrainer draws each rank's
    # latent noise from (seed, micro-batch, rank), not from the generator the Trainer seeds.
    trainer = AMVLTrainer(model, args, train_dataset=data, data_collator=AMVLCollator(tokenizer))
    own = []  # this rank's metric means before they are averaged over the ranks
    averaged = amvl.trainer.mean_over_processes

    def spy(means, accelerator):
        own.append({k: float(v) for k, v in means.items()})
        return averaged(means, accelerator)

    amvl.trainer.mean_over_processes = spy
    trainer.train()
    rank = int(os.environ["RANK"])
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
    logged = [{k[len("amvl/"):]: v for k, v in entry.items() if k.startswith("amvl/")}
              for entry in trainer.state.log_history if "amvl/kl_fwd" in entry]
    if not logged:
        raise SystemExit("the objective's metrics were not logged")
    # 7 examples in batches of 2 on 2 ranks: accelerate pads the last batches with a copy
    evaluated = trainer.evaluate(data[:7])
    with open(os.path.join(out, f"metrics{rank}.json"), "w") as f:
        json.dump({"logged": logged, "own": own, "evaluated": evaluated}, f)
    # Closed explicitly once both ranks are done: Trainer leaves it open.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_without_teardown()
