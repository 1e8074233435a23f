"""Worker for tests/test_trainer.py: AMVLModel steps under FSDP2 (``fully_shard``) on 2 CPU
processes (gloo, torchrun), and the same steps in one process for the test to compare.

Each decoder layer is sharded on its own (the classes AMVLModel offers as
``_no_split_modules``), then the whole AMVLModel. The prefix-shared step on the "amvl"
attention runs every layer twice before one backward. Mode "paired": every linear pairs its
weight gradients (the threshold lowered to 0; the worker checks that they did). Mode
"checkpointed": accelerate's recipe with activation checkpointing, each layer in torch's
checkpoint_wrapper first (checkpointed steps do not pair). Rank 0 writes the gathered
parameters to OUT/fsdp.safetensors. Each rank decodes its own prompt (:func:`decode`) before
training and after it, and writes the tokens to OUT/untrained_tokens{rank} and
OUT/tokens{rank}.safetensors, and :func:`scores` and :func:`choice_scores` to
OUT/scores{rank}.safetensors. Mode "fsdp1_saves": :func:`fsdp1_saves`.
"""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from amvl import weight_grads
from amvl.config import AMVLConfig
from amvl.data import AMVLCollator
from amvl.model import AMVLModel
from amvl.tiny import tiny_qwen2, word_tokenizer
from amvl.training import step_seed
from tests.worker_exit import exit_without_teardown

WORDS = [f"w{i}" for i in range(30)]
WORLD, PER_RANK, STEPS, LR = 2, 2, 2, 0.05


def build(checkpointed: bool, dtype: torch.dtype = torch.float64
          ) -> tuple[AMVLModel, AMVLCollator]:
    import amvl_kernels.hf as akhf

    weight_grads.MIN_PAIRED_NUMEL = 0
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    model = AMVLModel(tiny_qwen2(tokenizer), tokenizer,
                      AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch",
                                 pair_weight_grads=True)).to(dtype)
    akhf.use_amvl_attention(model.base)
    if checkpointed:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )
        layers = model.base.model.layers
        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer)
    return model.train(), AMVLCollator(tokenizer)


def batch(collator: AMVLCollator, step: int, rank: int) -> dict:
    g = torch.Generator().manual_seed(100 * step + rank)
    examples = [{"question": " ".join(WORDS[int(i)] for i in
                                      torch.randint(0, 30, (2 + j,), generator=g)),
                 "answer": WORDS[int(torch.randint(0, 30, (1,), generator=g))]}
                for j in range(PER_RANK)]
    return collator(examples)


def decode(model: AMVLModel, collator: AMVLCollator, rank: int) -> torch.Tensor:
    """Greedy tokens of this rank's prompt, 4 at most. Rank 0's EOS is set to its first token,
    rank 1's to a token it never emits, so rank 0's rows end three passes before rank 1's: on
    a sharded model every pass gathers parameters from both ranks, which must go on together
    (``generate``'s synced decoding)."""
    question = "w1 w2 w3" if rank == 0 else "w4 w5 w6 w7 w8"
    batch = collator([{"question": question, "answer": "w0"}])
    prompt = batch["prompt_ids"], batch["prompt_mask"]
    first = model.generate(*prompt, max_new_tokens=1).sequences
    eos = model.tokenizer.eos_token_id  # the collator's too: put back afterwards
    model.tokenizer.eos_token_id = int(first.flatten()[0]) if rank == 0 \
        else model.token_ids["latent_start"]  # the latent specials are never decoded
    try:
        return model.generate(*prompt, max_new_tokens=4).sequences
    finally:
        model.tokenizer.eos_token_id = eos


def refuses_together(model: AMVLModel, collator: AMVLCollator, rank: int) -> bool:
    """Whether ``generate`` raised on this rank when only rank 0's first logits are NaN (a
    synced rank that went on would wait for rank 0 for ever)."""
    question = "w1 w2 w3" if rank == 0 else "w4 w5 w6 w7 w8"
    batch = collator([{"question": question, "answer": "w0"}])
    logits = model.next_token_logits
    if rank == 0:
        model.next_token_logits = lambda hidden: logits(hidden) * float("nan")
    try:
        model.generate(batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=4)
    except FloatingPointError:
        return True
    finally:
        model.__dict__.pop("next_token_logits", None)  # the method again
    return False


CHOICE_EXAMPLES = [  # rank 0's examples have 2 and 3 choices, rank 1's 3 each
    [{"question": "w1 w2", "choices": ["w3", "w4"], "answer": "w3"},
     {"question": "w5 w6", "choices": ["w7", "w8", "w9"], "answer": "w8"}],
    [{"question": "w5 w6", "choices": ["w7", "w8", "w9"], "answer": "w8"},
     {"question": "w2 w4 w6", "choices": ["w1", "w3", "w5"], "answer": "w1"}]]


def choice_scores(model: AMVLModel, collator: AMVLCollator, rank: int
                  ) -> dict[str, torch.Tensor]:
    """Choice NLLs of this rank's multiple-choice examples (whose choices number differently
    on the two ranks: one pass per choice) by prior_choice_nll and score_choices, and whether
    prior_choice_nll refused examples numbering differently on the ranks (on a sharded model
    it must; in one process there is nothing to refuse)."""
    from amvl.diagnostics import score_choices
    from amvl.evaluation import prior_choice_nll

    examples = CHOICE_EXAMPLES[rank]
    try:  # as many examples on every process, or a refusal on each
        prior_choice_nll(model, collator, examples[:rank + 1], batch_size=1, progress=False)
        refused = False
    except ValueError as error:
        refused = "every process must run the same passes" in str(error)
    prior = prior_choice_nll(model, collator, examples, batch_size=1, progress=False)
    scored = score_choices(model, collator, examples, batch_size=1, progress=False)
    return {"prior_choice_nll": torch.from_numpy(prior), "refused": torch.tensor(refused),
            **{f"score_choices.{k}": torch.from_numpy(v) for k, v in scored["nll"].items()}}


def scores(model: AMVLModel, collator: AMVLCollator, rank: int) -> dict[str, torch.Tensor]:
    """The heads' outputs and the answer NLL given the posterior means on this rank's first
    batch (passes outside ``forward``), and an evaluation forward's NLL from the prior's
    means (one more decoding pass inside it)."""
    b = batch(collator, 0, rank)
    with torch.no_grad():
        out = model.heads(b["prompt_ids"], b["prompt_mask"], b["answer_ids"], b["answer_mask"])
        out["nll"] = model.answer_nll(b["prompt_ids"], b["prompt_mask"], b["answer_ids"],
                                      b["answer_mask"], z=out["mu_q"])
        evaluated = model(**b, step=None, seed=step_seed(0, 0, rank), prior_mean_nll=True)
        out["nll_prior"] = evaluated.metrics.tensors()["nll_prior"]
    return {k: v.contiguous() for k, v in out.items()}


def single_process(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """The ranks' steps in one process: the mean of their losses, their own noise seeds."""
    return {n: p.detach().clone() for n, p in trained_in_one_process(dtype)[0].named_parameters()}


def trained_in_one_process(dtype: torch.dtype = torch.float64
                           ) -> tuple[AMVLModel, AMVLCollator]:
    """The model after :func:`single_process`'s steps, and its collator."""
    model, collator = build(checkpointed=False, dtype=dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        for rank in range(WORLD):
            loss = model(**batch(collator, step, rank), step=step,
                         seed=step_seed(0, step, rank)).loss
            (loss / WORLD).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, collator


def fsdp1_saves(out: str) -> None:
    """FSDP1 (each decoder layer a unit, then the whole model) with ``use_orig_params`` False
    and True, after one step: the full state gathered to rank 0 as accelerate's
    ``get_state_dict`` gathers it, and saved as AMVLTrainer._save saves it, into
    OUT/uop_{flag}/; the state to OUT/state_{flag}.safetensors."""
    from accelerate.utils import extract_model_from_parallel
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    rank = dist.get_rank()
    for use_orig_params in (False, True):
        torch.manual_seed(0)
        tokenizer = word_tokenizer(WORDS)
        model = AMVLModel(tiny_qwen2(tokenizer), tokenizer,
                          AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch")).train()
        layers = {type(m) for m in model.modules() if type(m).__name__ in model._no_split_modules}
        wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy(layers),
                       use_orig_params=use_orig_params, device_id=torch.device("cpu"))
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=LR)
        wrapped(**batch(AMVLCollator(tokenizer), 0, rank), step=0,
                seed=step_seed(0, 0, rank)).loss.backward()
        optimizer.step()
        # offload_to_cpu=True (accelerate's) crashes CPU-only FSDP1 in torch; same keys
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=False, rank0_only=True)):
            state = wrapped.state_dict()
        if rank == 0:
            flat = [n for n, _ in extract_model_from_parallel(wrapped).named_parameters()]
            assert any(n.endswith("_flat_param") for n in flat) != use_orig_params, flat[:3]
            extract_model_from_parallel(wrapped).save_pretrained(
                os.path.join(out, f"uop_{use_orig_params}"), state_dict=state)
            save_file({k: v.contiguous() for k, v in state.items()},
                      os.path.join(out, f"state_{use_orig_params}.safetensors"))
        dist.barrier()


def main(out: str, mode: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    # a rank left waiting in a collective fails the test in a minute instead of hanging it
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    if mode == "fsdp1_saves":
        fsdp1_saves(out)
        dist.destroy_process_group()
        return
    rank = dist.get_rank()
    model, collator = build(checkpointed=mode == "checkpointed")
    assert model.is_activation_checkpointing == (mode == "checkpointed")
    kept = []  # True where a latent pass kept its weight gradient: pairing happened
    handed = weight_grads._WeightRecord.weight_grad

    def spy(record, *args):
        grad = handed(record, *args)
        kept.append(grad is None)
        return grad
    weight_grads._WeightRecord.weight_grad = spy
    for module in list(model.modules()):
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module)
    fully_shard(model)
    # Before any step too: a pass outside forward first must leave training possible.
    save_file({"tokens": decode(model, collator, rank)},
              os.path.join(out, f"untrained_tokens{rank}.safetensors"))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        loss = model(**batch(collator, step, rank), step=step,
                     seed=step_seed(0, step, rank)).loss
        loss.backward()  # FSDP averages the gradients over the ranks
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    # every linear of both layers, in every step, or none when checkpointed
    assert sum(kept) == (0 if mode == "checkpointed" else 2 * 7 * STEPS), sum(kept)
    params = {n.replace("._checkpoint_wrapped_module", ""):
              (p.full_tensor() if isinstance(p, DTensor) else p).detach().contiguous()
              for n, p in model.named_parameters()}
    if rank == 0:
        save_file(params, os.path.join(out, "fsdp.safetensors"))
    save_file({"tokens": decode(model, collator, rank),
               "refused": torch.tensor(refuses_together(model, collator, rank))},
              os.path.join(out, f"tokens{rank}.safetensors"))
    save_file({**scores(model, collator, rank), **choice_scores(model, collator, rank)},
              os.path.join(out, f"scores{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
    exit_without_teardown()
