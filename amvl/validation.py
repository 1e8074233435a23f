"""Validation of a model on held-out examples during or after training.

Two kinds of numbers, side by side, so the leakage AMVL is about can be watched as it grows:

- the training objective on the held-out examples (``loss``, ``nll``, ``kl_fwd``, ...), at
  full KL weight, its latent noise fixed per batch (the same model always gets the same
  values), with the decoder's NLL from the latents the objective trains it on (posterior
  draws for "amvl" and "elbo");
- ``nll_prior``: the answers' NLL decoded from the prior's means, what inference decodes
  from with ``latent="mean"`` (``generate``'s default), whatever the config's inference
  setting. ``nll_prior - nll`` is the price of answering without the
  answer in view; a posterior that leaks the answer into z makes ``nll`` small and this gap
  large. For "prior" and "none" the two differ only by the prior's noise (none for "none").

The NLLs are means over all answer tokens, the other metrics means over examples, and
``loss`` is the objective's NLL terms (``nll``, plus ``gamma`` times ``nll_prior_draw``, the
prior-path NLL from a prior draw, when gamma > 0) over tokens plus the rest of it over
examples. ``nll_prior`` does not depend on the batching; the others' noise is drawn per batch,
so they move a little with the batch size and the number of processes.
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
_LOSS_NLL = "_loss_nll"  # the loss's NLL terms (nll + gamma nll_prior_draw), token means


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
                    seed=step_seed(seed, index, rank, stream=EVAL_STREAM), prior_mean_nll=True)
        metrics = out.metrics.tensors()
        # gamma > 0: the objective's "nll_prior_draw" decodes a prior *draw*, a term of the
        # loss; "nll_prior" the prior's *means*, which the loss has not
        token_terms = metrics["nll"] + model.config.gamma * metrics.get("nll_prior_draw", 0.0)
        for key, value in metrics.items():
            # per-slot values are diagnostics, and the KL weight is 1 here
            if key == "loss":  # its NLL terms token means, the rest an example mean
                add(_BEYOND_NLL, (value - token_terms) * n)
                add(_LOSS_NLL, token_terms * tokens.sum())
            elif "/slot" not in key and key != "kl_weight":
                add(key, value * (tokens.sum() if key.startswith("nll") else n))
        add(_EXAMPLES, n)
        add(_TOKENS, tokens.sum())
    return sums


def validation_metrics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """The metrics of :func:`validation_sums`' sums (added up over processes, if several):
    the NLLs over all answer tokens, the rest over all examples."""
    examples, tokens = float(sums[_EXAMPLES]), float(sums[_TOKENS])
    metrics = {key: float(value) / (tokens if key.startswith("nll") else examples)
               for key, value in sums.items() if not key.startswith("_")}
    metrics["loss"] = float(sums[_LOSS_NLL]) / tokens + float(sums[_BEYOND_NLL]) / examples
    return metrics


def validate(model: AMVLModel, collator: AMVLCollator, examples: Sequence[dict],
             batch_size: int = 8, seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Validation metrics of ``model`` on ``examples`` in one process (module docstring):
    the objective's (``loss``, ``nll``, ``kl_fwd``, ...) and ``nll_prior``. The model's mode
    is left as it was."""
    return validation_metrics(validation_sums(model, collator, examples, batch_size, seed,
                                              progress=progress))
