"""Validation of a model on held-out examples during or after training.

Two kinds of numbers, side by side, so the leakage AMVL is about can be watched as it grows:

- the training objective on the held-out examples (``loss``, ``nll``, ``kl_fwd``, ...), at
  full KL weight, its latent noise fixed per batch (the same model always gets the same
  values), with the decoder's NLL from the latents the objective trains it on (posterior
  draws for "amvl" and "elbo");
- ``nll_prior``: the answers' NLL decoded from the prior's means, what inference decodes
  from (``generate``'s default). ``nll_prior - nll`` is the price of answering without the
  answer in view; a posterior that leaks the answer into z makes ``nll`` small and this gap
  large. For "prior" and "none" the two differ only by the prior's noise (none for "none").

Both NLLs are means over all answer tokens, the other metrics means over examples, and
``loss`` is ``nll`` plus the mean over examples of the rest of the objective.
:func:`validation_sums` returns the sums behind them, for processes to add up before
:func:`validation_metrics` divides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from amvl.model import in_eval_mode
from amvl.training import EVAL_STREAM, step_seed

if TYPE_CHECKING:
    from amvl.data import AMVLCollator
    from amvl.model import AMVLModel

_EXAMPLES, _TOKENS = "_examples", "_tokens"  # the counts among the sums
_BEYOND_NLL = "_loss_beyond_nll"  # the loss's KL terms, a mean over examples


@torch.no_grad()
@in_eval_mode
def validation_sums(model: AMVLModel, collator: AMVLCollator, examples: Sequence[dict],
                    batch_size: int = 8, seed: int = 0, rank: int = 0,
                    progress: bool = False) -> dict[str, torch.Tensor]:
    """The sums behind :func:`validation_metrics` over ``examples`` (with answers), as float64
    tensors on the model's device: each metric times its weight (examples, or answer tokens
    for the NLLs) and the two counts. ``seed`` and ``rank`` (a process's) fix the noise of
    each batch. Raises ValueError for an empty ``examples`` or a bad ``batch_size``."""
    if not examples:
        raise ValueError("validation needs at least one example")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    device = model.device
    sums: dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor | float) -> None:
        value = torch.as_tensor(value, device=device).double()
        sums[key] = sums[key] + value if key in sums else value

    for index, start in enumerate(tqdm(range(0, len(examples), batch_size), desc="validate",
                                       disable=not progress)):
        batch = collator(list(examples[start:start + batch_size]))
        batch = {key: value.to(device) for key, value in batch.items()}
        n = batch["prompt_ids"].shape[0]
        tokens = batch["answer_mask"].sum(1)
        out = model(**batch, step=None,  # step=None: the full KL weight
                    seed=step_seed(seed, index, rank, stream=EVAL_STREAM))
        for key, value in out.metrics.tensors().items():
            # per-slot values are diagnostics, and the KL weight is 1 here
            if key == "loss":  # its NLL a token mean like "nll", the rest an example mean
                add(_BEYOND_NLL, (value - out.metrics.tensors()["nll"]) * n)
            elif "/slot" not in key and key != "kl_weight":
                add(key, value * (tokens.sum() if key == "nll" else n))
        add("nll_prior", (_prior_nll(model, batch) * tokens).sum())
        add(_EXAMPLES, n)
        add(_TOKENS, tokens.sum())
    return sums


def _prior_nll(model: AMVLModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each example's mean answer-token NLL decoded from the prior's means (B,)."""
    images = {key: batch[key] for key in ("pixel_values", "image_grid_thw") if key in batch}
    answers = (batch["prompt_ids"], batch["prompt_mask"], batch["answer_ids"],
               batch["answer_mask"])
    if model.prior_head is None:  # "none": no latent block
        return model.answer_nll(*answers, **images)
    z = model.heads(batch["prompt_ids"], batch["prompt_mask"], **images)["mu_p"]
    return model.answer_nll(*answers, z=z, **images)


def validation_metrics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """The metrics of :func:`validation_sums`' sums (added up over processes, if several):
    the NLLs over all answer tokens, the rest over all examples."""
    examples, tokens = float(sums[_EXAMPLES]), float(sums[_TOKENS])
    metrics = {key: float(value) / (tokens if key.startswith("nll") else examples)
               for key, value in sums.items() if not key.startswith("_")}
    metrics["loss"] = metrics["nll"] + float(sums[_BEYOND_NLL]) / examples
    return metrics


def validate(model: AMVLModel, collator: AMVLCollator, examples: Sequence[dict],
             batch_size: int = 8, seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Validation metrics of ``model`` on ``examples`` in one process (module docstring):
    the objective's (``loss``, ``nll``, ``kl_fwd``, ...) and ``nll_prior``. The model's mode
    is left as it was."""
    return validation_metrics(validation_sums(model, collator, examples, batch_size, seed,
                                              progress=progress))
