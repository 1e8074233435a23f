"""amvl.generation: answers over a data set, batch by batch, equal to AMVLModel.generate's own
rows, with majority votes over sampled latents and exact match against given answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amvl.config import AMVLConfig
from amvl.data import AMVLCollator
from amvl.generation import _majority, exact_match_summary, generate_answers
from amvl.model import AMVLModel
from amvl.tiny import tiny_qwen2, word_tokenizer

WORDS = [f"w{i}" for i in range(25)]


def _model(**config) -> AMVLModel:
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    settings = {"num_slots": 3, "latent_dim": 4, "kernel_backend": "torch", **config}
    return AMVLModel(tiny_qwen2(tokenizer), tokenizer, AMVLConfig(**settings)).double().eval()


def _questions(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"images": [], "question": " ".join(rng.choice(WORDS, size=1 + i % 4))}
            for i in range(n)]


def _decoded(model: AMVLModel, rows: torch.Tensor) -> list[str]:
    """The tokens of each row up to EOS as text, by hand."""
    eos, out = model.tokenizer.eos_token_id, []
    for row in rows.tolist():
        out.append(model.tokenizer.decode(row[: row.index(eos)] if eos in row else row,
                                          skip_special_tokens=True))
    return out


def test_answers_are_generates_rows_in_order_for_any_batch_size():
    model = _model()
    collator = AMVLCollator(model.tokenizer)
    examples = _questions(5)
    batch = collator([{**ex, "answer": ""} for ex in examples])
    whole = model.generate(batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=6)
    expected = _decoded(model, whole.sequences[:, 0])
    assert any(expected)  # a random model still says something before EOS
    for batch_size in (1, 2, 5):
        records = list(generate_answers(model, collator, examples, batch_size=batch_size,
                                        max_new_tokens=6, progress=False))
        assert [r["prediction"] for r in records] == expected
        assert all("exact_match" not in r for r in records)  # no answers given


def test_a_tokenizer_without_eos_generates_as_the_model_does():
    """AMVLModel.generate decodes max_new_tokens without an EOS token; generate_answers
    collated an empty answer, which the collator refuses then."""
    model = _model()
    model.tokenizer.eos_token = None
    assert model.tokenizer.eos_token_id is None
    collator = AMVLCollator(model.tokenizer)
    examples = _questions(3)
    batch = collator([{**ex, "answer": "w1"} for ex in examples])
    whole = model.generate(batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=3)
    records = list(generate_answers(model, collator, examples, batch_size=2, max_new_tokens=3,
                                    progress=False))
    assert [r["prediction"] for r in records] == [
        model.tokenizer.decode(row, skip_special_tokens=True) for row in whole.sequences[:, 0]]


def test_exact_match_against_given_answers():
    model = _model()
    collator = AMVLCollator(model.tokenizer)
    examples = _questions(4, seed=1)
    predicted = [r["prediction"] for r in generate_answers(model, collator, examples,
                                                           max_new_tokens=5, progress=False)]
    # answers: the model's own (with other whitespace), another text, and none
    examples[0]["answer"] = "  " + predicted[0].replace(" ", " \n ") + " \n"
    examples[1]["answer"] = predicted[1] + " w0"
    examples[2]["answer"] = predicted[2]
    records = list(generate_answers(model, collator, examples, max_new_tokens=5,
                                    progress=False))
    assert [r.get("exact_match") for r in records] == [True, False, True, None]
    assert exact_match_summary(records) == {"scored": 3, "exact_match": 2 / 3}
    assert exact_match_summary(records[3:]) == {"scored": 0, "exact_match": None}


def test_sampled_latents_give_every_draw_and_their_majority():
    # wide log-variances, so the draws differ and so do some answers
    model = _model(logvar_init=2.0)
    collator = AMVLCollator(model.tokenizer)
    examples = _questions(3, seed=2)
    records = list(generate_answers(model, collator, examples, latent="sample", num_samples=5,
                                    max_new_tokens=4, seed=7, progress=False))
    batch = collator([{**ex, "answer": ""} for ex in examples])
    out = model.generate(batch["prompt_ids"], batch["prompt_mask"], latent="sample",
                         num_samples=5, max_new_tokens=4, seed=7)
    assert any(len(set(r["predictions"])) > 1 for r in records)  # a vote to take
    for record, rows in zip(records, out.sequences):
        assert record["predictions"] == _decoded(model, rows)
        assert record["prediction"] == _majority(record["predictions"])
    examples[0]["answer"] = records[0]["predictions"][0]
    # the same batches and seed draw the same latents: the answer only adds the scores
    scored = list(generate_answers(model, collator, examples, latent="sample", num_samples=5,
                                   max_new_tokens=4, seed=7, progress=False))
    assert [r["predictions"] for r in scored] == [r["predictions"] for r in records]
    share = sum(p.split() == examples[0]["answer"].split() for p in records[0]["predictions"])
    assert scored[0]["sample_exact_match"] == pytest.approx(share / 5) and share > 0
    assert scored[0]["exact_match"] == (records[0]["prediction"].split()
                                        == examples[0]["answer"].split())
    assert exact_match_summary(scored)["sample_exact_match"] == pytest.approx(share / 5)


def test_majority_vote_counts_stripped_answers_and_breaks_ties_by_draw_order():
    assert _majority(["b", "a ", " a", "b", "c"]) == "b"  # 2:2, "b" drawn first
    assert _majority(["x", " y", "y "]) == " y"  # as first drawn
    assert _majority(["x y", "x  y", "z"]) == "x y"
    assert _majority(["only"]) == "only"


def test_the_model_keeps_its_mode_and_bad_batch_sizes_are_refused():
    model = _model().train()
    collator = AMVLCollator(model.tokenizer)
    list(generate_answers(model, collator, _questions(2), max_new_tokens=2, progress=False))
    assert model.training
    for bad in (0, 1.5, True):  # at the call, not when the first answer is asked for
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            generate_answers(model, collator, _questions(2), batch_size=bad)


def test_a_seed_draws_other_latents_in_every_batch():
    """AMVLModel.generate keys its noise by a row's place in the batch: one seed for every
    batch gave each batch the same draws, so one question per batch got the same answers
    every time. Each batch now draws from its own seed; the run repeats with the seed."""
    model = _model(logvar_init=2.0)
    collator = AMVLCollator(model.tokenizer)
    examples = _questions(1, seed=3) * 6

    def draws(seed):
        return [tuple(r["predictions"]) for r in generate_answers(
            model, collator, examples, batch_size=1, latent="sample", num_samples=4,
            max_new_tokens=4, seed=seed, progress=False)]

    seeded = draws(7)
    assert len(set(seeded)) > 1
    assert draws(7) == seeded
    assert draws(8) != seeded


def test_submodules_keep_their_modes():
    """generate_answers set the whole model to eval and back to train, which put a frozen
    base (left in eval mode on purpose) back into training mode."""
    model = _model().train()
    model.base.eval()
    list(generate_answers(model, AMVLCollator(model.tokenizer), _questions(2),
                          max_new_tokens=2, progress=False))
    assert model.training and not model.base.training
