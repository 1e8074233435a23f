"""Worker for tests/test_evaluation.py: ``prior_choice_nll(..., split_across_processes=True)``
on 2 CPU processes (torchrun, gloo). Each rank writes the scores it returns and the prompts
it scored itself to OUT/rank{N}.json."""

import json
import os
import sys

import torch
import torch.distributed as dist

from amvl.config import AMVLConfig
from amvl.data import AMVLCollator
from amvl.evaluation import prior_choice_nll
from amvl.model import AMVLModel
from amvl.tiny import tiny_qwen2, word_tokenizer
from tests.worker_exit import exit_without_teardown

WORDS = [f"w{i}" for i in range(30)]


def build() -> tuple[AMVLModel, AMVLCollator, list[dict]]:
    """The model, its collator and 7 examples of 2 to 4 choices."""
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    model = AMVLModel(tiny_qwen2(tokenizer), tokenizer,
                      AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch")).eval()
    g = torch.Generator().manual_seed(1)
    examples = [{"question": " ".join(WORDS[int(i)] for i in torch.randint(0, 30, (3,),
                                                                          generator=g)),
                 "choices": [WORDS[int(i)] for i in torch.randperm(30, generator=g)[:2 + k % 3]]}
                for k in range(7)]
    return model, AMVLCollator(tokenizer), examples


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model, collator, examples = build()
    scored = []  # the prompts this process encoded
    real = model.choices_nll

    def counting(prompt_ids, *args, **kwargs):
        scored.extend(prompt_ids.tolist())
        return real(prompt_ids, *args, **kwargs)

    model.choices_nll = counting
    nll = prior_choice_nll(model, collator, examples, batch_size=2, progress=False,
                           split_across_processes=True)
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as file:
        json.dump({"nll": nll.tolist(), "scored": len(scored)}, file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_without_teardown()
