"""Free-form answers from prior latents over a data set, and how many match the given answers.

:func:`generate_answers` runs :meth:`amvl.model.AMVLModel.generate` batch by batch and yields
one record per example, in order, so a caller can write each as it comes (``amvl generate``
writes JSON lines). With sampled latents (``latent="sample"``, ``num_samples`` draws) an
example gets every draw's answer and their majority vote, the usual way to read several
reasoning paths (self-consistency). :func:`exact_match_summary` scores the records of examples
that carry an answer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from amvl.training import GENERATION_STREAM, step_seed

if TYPE_CHECKING:
    from amvl.data import AMVLCollator
    from amvl.model import AMVLModel


def normalise(text: str) -> str:
    """What exact match compares: the text with each run of whitespace made one space and
    none at either end (decoding may not give back the answer's own spacing: a word-level
    tokenizer joins its words with single spaces)."""
    return " ".join(text.split())


def _majority(answers: list[str]) -> str:
    """The most frequent answer (counted after :func:`normalise`) as first drawn, the earliest
    drawn among ties."""
    counts = Counter(normalise(a) for a in answers)
    best = max(counts.values())
    return next(a for a in answers if counts[normalise(a)] == best)


def _answer_text(model: AMVLModel, tokens: torch.Tensor) -> str:
    """The text of one row of generated tokens, up to (without) the first EOS."""
    ids = tokens.tolist()
    eos = model.tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return model.tokenizer.decode(ids, skip_special_tokens=True)


def _batch_seed(seed: int | None, batch: int) -> int | None:
    """The seed of the ``batch``-th batch: ``seed`` for the first, one derived from it for each
    other, so that batches do not all draw the same noise (the noise is keyed by a row's place
    in its batch)."""
    if seed is None or batch == 0:
        return seed
    return step_seed(seed, batch, 0, stream=GENERATION_STREAM)


def generate_answers(model: AMVLModel, collator: AMVLCollator, examples: Sequence[dict], *,
                     batch_size: int = 8, latent: str | None = None,
                     num_samples: int | None = None, max_new_tokens: int = 64,
                     seed: int | None = None, progress: bool = True) -> Iterator[dict]:
    """Greedy answers to ``examples`` (``{"images", "question"}``, an ``"answer"`` optional)
    decoded from prior latents, one record per example, in order.

    A record has ``"prediction"`` (the answer's text, up to EOS); with several draws
    (``latent="sample"`` and ``num_samples`` > 1) ``"predictions"`` (one per draw) and
    ``"prediction"`` their majority vote. An example with an ``"answer"`` gets
    ``"exact_match"`` (the prediction equals the answer after :func:`normalise`; with draws
    also ``"sample_exact_match"``, the share of draws that do). ``latent`` and ``num_samples``
    default to the model's config; ``seed`` fixes sampled latents for a given ``batch_size``
    (:meth:`AMVLModel.generate`): each batch draws from its own seed derived from it.
    Decoding runs in eval mode and leaves every module's mode as it was.

    Raises ValueError for a bad ``batch_size`` (at the call) or examples the collator refuses
    (naming them, as they are reached).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return _generate(model, collator, examples, batch_size, latent, num_samples,
                     max_new_tokens, seed, progress)


def _generate(model: AMVLModel, collator: AMVLCollator, examples: Sequence[dict],
              batch_size: int, latent: str | None, num_samples: int | None,
              max_new_tokens: int, seed: int | None, progress: bool) -> Iterator[dict]:
    # AMVLModel.generate runs in eval mode and leaves every module's mode as it found it
    for batch_index, start in enumerate(tqdm(range(0, len(examples), batch_size),
                                             desc="generate", disable=not progress)):
        chunk = examples[start:start + batch_size]
        # the collator builds answers too: an empty one (EOS) keeps long answers from being
        # cut aloud by max_answer_tokens, and generation reads the prompts only (without an
        # EOS token an empty answer is refused: one token then, never read)
        answer = "" if collator.tokenizer.eos_token_id is not None else "0"
        try:  # an image that does not decode is found only here
            batch = collator([{**ex, "answer": answer} for ex in chunk])
        except (OSError, ValueError) as err:
            raise ValueError(f"examples {start} to {start + len(chunk) - 1}: "
                             f"{type(err).__name__}: {err}") from err
        batch = {key: value.to(model.device) for key, value in batch.items()}
        out = model.generate(batch["prompt_ids"], batch["prompt_mask"],
                             batch.get("pixel_values"), batch.get("image_grid_thw"),
                             latent=latent, num_samples=num_samples,
                             max_new_tokens=max_new_tokens, seed=_batch_seed(seed, batch_index))
        sequences = out.sequences.cpu()
        for example, rows in zip(chunk, sequences):
            yield _record(example, [_answer_text(model, row) for row in rows])


def _record(example: dict, answers: list[str]) -> dict:
    record: dict = {}
    if len(answers) == 1:
        record["prediction"] = answers[0]
    else:
        record["predictions"] = answers
        record["prediction"] = _majority(answers)
    if isinstance(example.get("answer"), str):
        gold = normalise(example["answer"])
        record["exact_match"] = normalise(record["prediction"]) == gold
        if len(answers) > 1:
            record["sample_exact_match"] = sum(normalise(a) == gold for a in answers) \
                / len(answers)
    return record


def exact_match_summary(records: Sequence[dict]) -> dict:
    """``{"scored": n, "exact_match": share}`` over the records that have an exact match
    (examples with answers; ``exact_match`` None when there are none), with
    ``"sample_exact_match"`` (the mean share of draws) when the records have draws."""
    scored = [r for r in records if "exact_match" in r]
    summary: dict = {"scored": len(scored),
                     "exact_match": sum(r["exact_match"] for r in scored) / len(scored)
                     if scored else None}
    draws = [r["sample_exact_match"] for r in scored if "sample_exact_match" in r]
    if draws:
        summary["sample_exact_match"] = sum(draws) / len(draws)
    return summary
