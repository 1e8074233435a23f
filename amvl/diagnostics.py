"""Diagnostics of answer leakage and latent health on multiple-choice data.

Examples are ``{"images": [...], "question": str, "choices": [str, ...], "answer": str}`` with
the answer one of the choices. A choice is predicted by the lowest mean token NLL given the
latents under test. Reported (:func:`leakage_report`):

- accuracy and gold-answer NLL with prior latents (mu_p, what inference sees) and with
  posterior latents (mu_q, computed from the gold answer): their difference is the leakage gap;
- answer-flip rates of the prior-latent predictions when z is zeroed, noised, or swapped across
  examples (how much the decoder actually reads z);
- how well a linear probe decodes the gold answer (its text, one class per distinct answer)
  from posterior means vs prior means, and from posterior draws z ~ q (cross-validated
  logistic regression). The probe standardises its features, so the means' probe is
  scale-free: it finds any answer dependence of mu_q however small against the posterior's
  noise, and even an untrained posterior, whose means move with the answer it reads, decodes
  it. The draws' probe reads what the decoder receives in training, above chance only where
  the answer survives the posterior's noise: the leakage that matters;
- per-slot KL(q||p), KL(p||q) and active slots;
- latent collapse: mean pairwise cosine similarity of the prior means across examples, and
  their spread (the share of their mean square that varies across examples: 0 = the same
  means for every example), which a shared offset does not hide as it does the cosine;
- slot redundancy: the mean cosine similarity between the K slots of one example's prior
  means (1 = every slot says the same), and their spread across the slots.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

import amvl_kernels as ak
from amvl.evaluation import (choice_answers, markdown_table, record_choice_ids,
                             warn_indistinguishable_choices)
from amvl.model import in_eval_mode
from amvl.objectives import ACTIVE_SLOT_NATS
from amvl.sharded import choices_to_score

if TYPE_CHECKING:
    from amvl.data import AMVLCollator
    from amvl.model import AMVLModel

VARIANTS = ("prior", "posterior", "zeroed", "noised", "swapped")


def _check_examples(examples: Sequence[dict], batch_size: int = 1,
                    group_key: str | None = None) -> None:
    if not (hasattr(examples, "__len__") and hasattr(examples, "__getitem__")):
        # an iterator would be spent by these checks
        raise TypeError(f"examples must be a sequence (e.g. a list), got "
                        f"{type(examples).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not examples:
        raise ValueError("diagnostics need at least one example")
    for i, ex in enumerate(examples):
        if group_key is not None and group_key not in ex:
            raise ValueError(f"example {i} has no {group_key!r} (group_key)")
        choices = ex.get("choices")
        if not isinstance(choices, (list, tuple)) or len(choices) < 2:
            raise ValueError(f"example {i}: 'choices' must list at least two strings")
        if ex.get("answer") not in choices:
            raise ValueError(f"example {i}: answer {ex.get('answer')!r} is not among its choices")


def _to(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {k: v.to(device) for k, v in batch.items()}
    if "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def _variant_latents(heads: dict[str, Tensor], noise: Tensor, noise_scale: float,
                     previous: Tensor | None) -> dict[str, Tensor | None]:
    """The latents of every variant for one batch. "swapped" gives each example the prior
    means of the example before it in the whole set (the first example: the last one's), so
    batch boundaries and batches of one example change nothing; ``previous`` holds the prior
    means of the example before this batch's first. ``noise`` is this batch's rows of one
    draw for the whole set, so the batch size does not change it either."""
    mu_p = heads["mu_p"]
    noise = noise.to(mu_p)
    roll = torch.cat([previous.to(mu_p), mu_p[:-1]])  # a set of one example: its own
    return {"prior": mu_p, "posterior": heads.get("mu_q"), "zeroed": torch.zeros_like(mu_p),
            "noised": mu_p + noise_scale * noise, "swapped": roll}


@torch.no_grad()
@in_eval_mode
def score_choices(model: AMVLModel, collator: AMVLCollator, examples: Sequence[dict],
                  batch_size: int = 8, noise_scale: float = 1.0, seed: int = 0,
                  progress: bool = True) -> dict:
    """Per-example choice NLLs under every latent variant, plus the heads' outputs.

    Returns ``{"nll": {variant: (N, C) array}, "gold": (N,) array, "mu_p", "mu_q", "z_q",
    "kl_fwd", "kl_rev"}`` (the last five (N, K, ...) arrays, None without latents; ``z_q``:
    one posterior draw per example, from the same fixed noise as the "noised" variant).
    Warns when choices tokenize alike (:func:`amvl.evaluation.warn_indistinguishable_choices`):
    their NLLs tie under every variant.
    """
    _check_examples(examples, batch_size)
    device = model.device
    dtype = model.dtype
    has_latents = model.objective.latent_source != "none"
    has_posterior = model.objective.uses_posterior
    n_choices = max(len(ex["choices"]) for ex in examples)
    sharded, passes = choices_to_score(model, len(examples), batch_size, n_choices)
    config = model.config
    noise = torch.randn((len(examples), config.num_slots, config.latent_dim),
                        generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    nll = {v: np.full((len(examples), n_choices), np.inf) for v in VARIANTS}
    collected: dict[str, list] = {"mu_p": [], "mu_q": [], "z_q": [], "kl_fwd": [],
                                  "kl_rev": []}
    choice_ids: list[list[tuple[int, ...]]] = [[] for _ in examples]  # for ties, as in eval
    previous = None  # the prior means of the example before the batch's first, for the swap
    if has_latents:  # the first example's swap partner is the last one
        last = _to(collator([examples[-1]]), device, dtype)
        previous = model.heads(last["prompt_ids"], last["prompt_mask"],
                               **{k: last[k] for k in ("pixel_values", "image_grid_thw")
                                  if k in last})["mu_p"]
    for start in tqdm(range(0, len(examples), batch_size), desc="diagnostics",
                      disable=not progress):
        chunk = list(examples[start:start + batch_size])
        rows = slice(start, start + len(chunk))
        gold_host = collator(chunk)
        gold_batch = _to(gold_host, device, dtype)
        images = {k: gold_batch[k] for k in ("pixel_values", "image_grid_thw") if k in gold_batch}
        variants: dict[str, Tensor | None] = {"prior": None}
        if has_latents:
            heads = model.heads(gold_batch["prompt_ids"], gold_batch["prompt_mask"],
                                gold_batch["answer_ids"] if has_posterior else None,
                                gold_batch["answer_mask"] if has_posterior else None, **images)
            variants = _variant_latents(heads, noise[rows], noise_scale, previous)
            previous = heads["mu_p"][-1:]
            collected["mu_p"].append(heads["mu_p"].float().cpu())
            if has_posterior:
                _, kl_fwd, kl_rev = ak.gaussian_sample_kl(
                    heads["mu_q"], heads["logvar_q"], heads["mu_p"], heads["logvar_p"],
                    seed=seed, backend=model.config.kernel_backend)
                collected["mu_q"].append(heads["mu_q"].float().cpu())
                # one draw per example from the fixed noise, so batch sizes agree
                draw = heads["mu_q"].float() + torch.exp(0.5 * heads["logvar_q"].float()) \
                    * noise[rows].to(device)
                collected["z_q"].append(draw.cpu())
                collected["kl_fwd"].append(kl_fwd.float().cpu())
                collected["kl_rev"].append(kl_rev.float().cpu())
        # Every row answers each choice, a row past its last one with a stand-in (dropped),
        # so that every answer under every variant follows the chunk's prompts, encoded once
        # (AMVLModel.choices_nll). A sharded model's processes run the most choices of any.
        count = passes if sharded else max(len(ex["choices"]) for ex in chunk)
        batches = choice_answers(collator, chunk, range(count), gold_host["prompt_ids"])
        for c, batch in enumerate(batches):
            record_choice_ids(choice_ids, start, chunk, list(range(len(chunk))), c, batch)
        answers = [(b["answer_ids"].to(device), b["answer_mask"].to(device)) for b in batches]
        prompts = (gold_batch["prompt_ids"], gold_batch["prompt_mask"])
        names = [name for name, z in variants.items() if z is not None] or ["prior"]
        values = model.choices_nll(*prompts, answers, **images, latents=[
            variants[name] for name in names]) if has_latents \
            else model.choices_nll(*prompts, answers, **images)[None]
        values = values.float().cpu().numpy()
        for c in range(count):
            have = [i for i, ex in enumerate(chunk) if c < len(ex["choices"])]
            for v, name in enumerate(names):
                nll[name][start + np.array(have, dtype=int), c] = values[v, have, c]
    warn_indistinguishable_choices(examples, choice_ids)
    gold = np.array([ex["choices"].index(ex["answer"]) for ex in examples])

    def cat(key):
        return torch.cat(collected[key]).numpy() if collected[key] else None

    return {"nll": nll, "gold": gold, **{k: cat(k) for k in collected}}


def _class_indices(labels) -> np.ndarray:
    """``labels`` as a 1-D array of class indices, or a ValueError saying what it is."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)) \
            or (labels < 0).any():
        raise ValueError(f"labels must be a 1-D array of class indices >= 0, got dtype "
                         f"{labels.dtype} and shape {labels.shape}")
    return labels.astype(np.int64)


def _probed(labels: np.ndarray) -> np.ndarray:
    """Which examples a probe can use: those of a class with at least two (a class of one
    example can be in the training folds or the held-out one, never both)."""
    counts = np.bincount(labels)
    return counts[labels] >= 2


def probe_chance(labels: np.ndarray) -> float:
    """The accuracy of always answering the most frequent class, on the examples
    :func:`linear_probe_accuracy` uses: the level its accuracy is to be read against (90% on
    features of pure noise where 90% of the answers are one class). NaN where it uses none."""
    labels = _class_indices(labels)
    used = labels[_probed(labels)]
    if len(np.unique(used)) < 2:
        return float("nan")
    return float(np.bincount(used).max() / len(used))


def linear_probe_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = 5,
                          seed: int = 0) -> float:
    """Cross-validated accuracy of a logistic regression decoding ``labels`` from features
    (standardised per fold, so the features' scale does not matter), on the examples of
    classes with at least two examples (a class of one cannot be held out and trained on);
    with fewer examples in a class than ``folds``, that many folds. NaN where fewer than two
    classes remain. Read it against :func:`probe_chance`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels = np.asarray(features), _class_indices(labels)
    if len(features) != len(labels):
        raise ValueError(f"features has {len(features)} rows but labels {len(labels)}")
    if len(labels) == 0:
        return float("nan")
    used = _probed(labels)
    features, labels = features[used], labels[used]
    if len(np.unique(labels)) < 2:
        return float("nan")
    counts = np.bincount(labels)
    folds = int(min(folds, counts[counts > 0].min()))
    # Standardised features: with the default L2 penalty an unscaled probe reads the means'
    # scale, not what they encode (a signal at 1e-3 of unit size decoded at chance).
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(probe, features.reshape(len(labels), -1), labels, cv=cv).mean())


def mean_pairwise_cosine(latents: np.ndarray) -> float:
    """Mean cosine similarity between different examples' flattened latents (1 = collapsed).

    Latents all equal (zeros included) are collapsed: 1. Otherwise examples whose latents
    are zero have no direction and are left out; NaN when fewer than two remain, or where a
    latent is not finite. Not centred: latents that share a large offset come out near 1
    however they vary around it (:func:`latent_spread` does not)."""
    latents = np.asarray(latents)
    if len(latents) < 2 or not np.isfinite(latents).all():
        return float("nan")
    flat = torch.from_numpy(latents.reshape(len(latents), -1)).double()
    if bool((flat == flat[0]).all()):
        return 1.0
    flat = flat[flat.norm(dim=1) > 0]
    if len(flat) < 2:
        return float("nan")
    unit = torch.nn.functional.normalize(flat, dim=1)
    sims = unit @ unit.T
    n = len(flat)
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def latent_spread(latents: np.ndarray) -> float:
    """The share of the flattened latents' mean square that varies across examples:
    mean ||l_i - mean_j l_j||^2 / mean ||l_i||^2, in [0, 1]. 0: every example has the same
    latents (collapsed, zeros included, as :func:`mean_pairwise_cosine` has it); 1: they
    vary around zero. NaN for fewer than two examples or a latent that is not finite."""
    latents = np.asarray(latents, dtype=np.float64)
    if len(latents) < 2 or not np.isfinite(latents).all():
        return float("nan")
    flat = latents.reshape(len(latents), -1)
    total = float((flat ** 2).sum(1).mean())
    if total == 0:  # every latent zero: collapsed
        return 0.0
    return float(((flat - flat.mean(0)) ** 2).sum(1).mean() / total)


def slot_similarity(latents: np.ndarray) -> tuple[float, float]:
    """How alike the K slots of each example are, for latents (N, K, d): the mean cosine
    similarity between two different slots of one example (1 = every slot a copy of one, as
    K copies of one query token give before training; NaN below two slots or where no
    example has two nonzero slots) and the share of each example's mean square that varies
    across its slots (0 = copies), each averaged over the examples. NaN for a latent that is
    not finite."""
    latents = np.asarray(latents, dtype=np.float64)
    if latents.ndim != 3:
        raise ValueError(f"latents must be (examples, slots, dims), got shape {latents.shape}")
    nan = float("nan")
    n, k, _ = latents.shape
    if n == 0 or k < 2 or not np.isfinite(latents).all():
        return nan, nan
    slots = torch.from_numpy(latents)
    norms = slots.norm(dim=2)
    unit = torch.nn.functional.normalize(slots, dim=2)
    sims = unit @ unit.transpose(1, 2)
    pairs = (norms[:, :, None] > 0) & (norms[:, None, :] > 0) & ~torch.eye(k, dtype=torch.bool)
    # an example's slots all equal (zeros included) are copies: 1
    copies = (slots == slots[:, :1]).flatten(1).all(1)
    per_example = torch.where(copies, torch.ones(n, dtype=torch.float64),
                              (sims * pairs).sum((1, 2)) / pairs.sum((1, 2)))
    cosine = float(per_example[~per_example.isnan()].mean()) \
        if bool((~per_example.isnan()).any()) else nan
    total = slots.square().sum(2).mean(1)
    varied = (slots - slots.mean(1, keepdim=True)).square().sum(2).mean(1)
    spread = torch.where(total > 0, varied / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)
    return cosine, float(spread.mean())


def leakage_report(model: AMVLModel, collator: AMVLCollator, examples: Sequence[dict],
                   batch_size: int = 8, noise_scale: float = 1.0, seed: int = 0,
                   progress: bool = True, group_key: str | None = None) -> dict:
    """All diagnostics of the module docstring as a flat dict of floats (NaN where a
    quantity does not exist for the model's objective).

    ``acc_prior`` and ``acc_posterior`` are over all examples (not a mean over groups). The
    variants of the prior means whose flips are counted: "zeroed" (z = 0), "noised" (plus
    absolute noise N(0, ``noise_scale``^2) per dimension, one draw from ``seed`` for the
    whole set, so not relative to the prior's own spread) and "swapped" (each example gets
    the prior means of the example before it in ``examples``, the first the last one's: a
    neighbour in the data's order, which may be a near-duplicate; NaN for one example).
    ``probe_chance`` is the probes' majority-class level (:func:`probe_chance`);
    ``cosine_prior`` and ``spread_prior`` measure the prior means' collapse across examples
    (:func:`mean_pairwise_cosine`, :func:`latent_spread`), ``slot_cosine_prior`` and
    ``slot_spread_prior`` how alike one example's slots are (:func:`slot_similarity`).

    With ``group_key`` (e.g. "family"), accuracies are also reported per group as
    ``acc_prior/<group>`` and ``acc_posterior/<group>``.
    """
    _check_examples(examples, batch_size, group_key)  # before the scoring, not after
    scores = score_choices(model, collator, examples, batch_size, noise_scale, seed, progress)
    gold, nll = scores["gold"], scores["nll"]
    rows = np.arange(len(gold))
    present = np.arange(nll["prior"].shape[1]) < np.array([len(ex["choices"])
                                                           for ex in examples])[:, None]
    preds = {}
    for v in VARIANTS:
        scored = nll[v][present]
        if np.isinf(scored).all():  # not computed for this objective
            continue
        if not np.isfinite(scored).all():
            warnings.warn(f"{int((~np.isfinite(scored)).sum())} of the {v} choice NLLs are "
                          f"not finite: the report's entries from them are NaN",
                          stacklevel=2)
            continue
        preds[v] = nll[v].argmin(1)
    nan = float("nan")
    report: dict[str, float] = {}
    for v in ("prior", "posterior"):
        report[f"acc_{v}"] = float((preds[v] == gold).mean()) if v in preds else nan
        report[f"nll_{v}"] = float(nll[v][rows, gold].mean()) if v in preds else nan
        if group_key is not None:
            groups = np.array([str(ex[group_key]) for ex in examples])
            for group in sorted(set(groups)):
                hit = groups == group
                report[f"acc_{v}/{group}"] = float((preds[v][hit] == gold[hit]).mean()) \
                    if v in preds else nan
    report["leakage_gap"] = report["acc_posterior"] - report["acc_prior"]
    report["nll_gap"] = report["nll_prior"] - report["nll_posterior"]
    for v in ("zeroed", "noised", "swapped"):
        report[f"flip_{v}"] = float((preds[v] != preds["prior"]).mean()) \
            if v in preds and "prior" in preds else nan
    if len(gold) == 1:  # its swap partner is itself
        report["flip_swapped"] = nan
    # The answer's text, not its position among the choices: choice lists may differ
    answers = np.unique([ex["answer"] for ex in examples], return_inverse=True)[1]
    report["probe_posterior"] = nan if scores["mu_q"] is None else \
        linear_probe_accuracy(scores["mu_q"], answers, seed=seed)
    report["probe_posterior_sampled"] = nan if scores["z_q"] is None else \
        linear_probe_accuracy(scores["z_q"], answers, seed=seed)
    report["probe_prior"] = nan if scores["mu_p"] is None else \
        linear_probe_accuracy(scores["mu_p"], answers, seed=seed)
    report["probe_chance"] = probe_chance(answers)
    report["cosine_prior"] = nan if scores["mu_p"] is None else \
        mean_pairwise_cosine(scores["mu_p"])
    report["spread_prior"] = nan if scores["mu_p"] is None else latent_spread(scores["mu_p"])
    report["slot_cosine_prior"], report["slot_spread_prior"] = (nan, nan) \
        if scores["mu_p"] is None else slot_similarity(scores["mu_p"])
    # The same keys for every objective (NaN without a posterior), so reports tabulate
    slots = model.config.num_slots
    per_slot_fwd, per_slot_rev = (np.full(slots, nan), np.full(slots, nan)) \
        if scores["kl_fwd"] is None else (scores["kl_fwd"].mean(0), scores["kl_rev"].mean(0))
    report["kl_fwd"] = nan if scores["kl_fwd"] is None else float(scores["kl_fwd"].sum(1).mean())
    report["kl_rev"] = nan if scores["kl_rev"] is None else float(scores["kl_rev"].sum(1).mean())
    report["active_slots"] = nan if scores["kl_fwd"] is None \
        else float((per_slot_fwd > ACTIVE_SLOT_NATS).sum())
    for k in range(slots):
        report[f"kl_fwd/slot{k}"] = float(per_slot_fwd[k])
        report[f"kl_rev/slot{k}"] = float(per_slot_rev[k])
    return report


# (header, report key, format) of format_leakage_table's columns
_TABLE_COLUMNS = (("acc prior", "acc_prior", "pct"), ("acc posterior", "acc_posterior", "pct"),
                  ("leakage gap", "leakage_gap", "pct"), ("NLL prior", "nll_prior", "decimal"),
                  ("NLL posterior", "nll_posterior", "decimal"),
                  ("flip zeroed", "flip_zeroed", "pct"), ("flip noised", "flip_noised", "pct"),
                  ("flip swapped", "flip_swapped", "pct"),
                  ("probe q draws", "probe_posterior_sampled", "pct"),
                  ("probe p means", "probe_prior", "pct"),
                  ("probe chance", "probe_chance", "pct"),
                  ("active slots", "active_slots", "count"), ("cos p", "cosine_prior", "decimal"),
                  ("spread p", "spread_prior", "decimal"),
                  ("slot cos p", "slot_cosine_prior", "decimal"))


def format_leakage_table(reports: dict[str, dict]) -> str:
    """The headline numbers of :func:`leakage_report` for several models, one row each, as an
    aligned markdown table: accuracies, the leakage gap, flip rates and probe accuracies in
    percent (with the probes' majority-class level), gold-answer NLLs, the prior means'
    mean cosine similarity and spread across examples and mean cosine across one example's
    slots to three decimals, active slots as a count; "-" where a model has no such quantity
    (no posterior)."""
    if not reports:
        raise ValueError("no diagnostics to tabulate")

    def cell(value: float, kind: str) -> str:
        if value is None or not np.isfinite(value):
            return "-"
        return {"pct": f"{100 * value:.1f}", "decimal": f"{value:.3f}",
                "count": f"{value:g}"}[kind]

    header = ["Model", *(h for h, _, _ in _TABLE_COLUMNS)]
    rows = [[name, *(cell(report.get(key), kind) for _, key, kind in _TABLE_COLUMNS)]
            for name, report in reports.items()]
    caption = ("Leakage diagnostics: accuracy (%) with prior latents (mu_p, as inference) and "
               "posterior latents (mu_q, from the gold answer) and their gap; gold-answer NLLs; "
               "prior predictions flipped (%) by zeroed, noised or swapped latents; linear probes "
               "of the answer (%) from posterior draws and prior means, and their majority-class "
               "level; active slots; mean cosine and spread (0 = collapsed) of the prior means "
               "across examples, and mean cosine between one example's slots (1 = copies).")
    return "\n".join([caption, "", markdown_table(header, rows)])
