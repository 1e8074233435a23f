"""amvl.validation: the objective on held-out examples under fixed noise, and the answers' NLL
from the prior's means, weighted by answer tokens whatever the batching."""

from __future__ import annotations

import pytest
import torch

from amvl.config import AMVLConfig
from amvl.data import AMVLCollator
from amvl.model import AMVLModel
from amvl.tiny import tiny_qwen2, word_tokenizer
from amvl.training import EVAL_STREAM, step_seed
from amvl.validation import validate, validation_metrics, validation_sums

WORDS = [f"w{i}" for i in range(30)]


def _model(objective: str = "amvl") -> tuple[AMVLModel, AMVLCollator]:
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    model = AMVLModel(tiny_qwen2(tokenizer), tokenizer,
                      AMVLConfig(num_slots=2, latent_dim=4, objective=objective,
                                 kernel_backend="torch")).double()
    return model, AMVLCollator(tokenizer)


def _examples(n: int = 5) -> list[dict]:
    """Answers of 1 to 5 words: a mean of examples' means would weigh them wrongly."""
    g = torch.Generator().manual_seed(3)
    return [{"question": " ".join(WORDS[int(i)] for i in torch.randint(0, 30, (2 + i,),
                                                                          generator=g)),
             "answer": " ".join(WORDS[int(i)] for i in torch.randint(0, 30, (1 + i % 5,),
                                                                        generator=g))}
            for i in range(n)]


def test_nll_prior_is_the_token_mean_nll_from_the_priors_means():
    model, collator = _model()
    examples = _examples()
    batch = collator(examples)
    z = model.heads(batch["prompt_ids"], batch["prompt_mask"])["mu_p"]
    per_example = model.answer_nll(batch["prompt_ids"], batch["prompt_mask"],
                                   batch["answer_ids"], batch["answer_mask"], z=z)
    tokens = batch["answer_mask"].sum(1)
    want = float((per_example * tokens).sum() / tokens.sum())
    for batch_size in (1, 2, 5):  # token-weighted: the batching does not matter
        got = validate(model, collator, examples, batch_size=batch_size, progress=False)
        assert got["nll_prior"] == pytest.approx(want, rel=1e-10)


def test_the_objective_at_full_kl_weight_under_each_batchs_fixed_noise():
    model, collator = _model()
    examples = _examples(4)
    batch = collator(examples)
    model.eval()
    out = model(**batch, step=None, seed=step_seed(5, 0, 0, stream=EVAL_STREAM))
    model.train()
    got = validate(model, collator, examples, batch_size=4, seed=5, progress=False)
    for key in ("loss", "nll", "kl_fwd", "kl_rev"):
        assert got[key] == pytest.approx(out.metrics[key], rel=1e-6), key  # fp32 metrics
    assert got["loss"] == pytest.approx(out.loss.item(), rel=1e-10)
    assert "kl_weight" not in got and not any("/slot" in key for key in got)
    assert model.training  # its mode is left as it was
    assert validate(model, collator, examples, batch_size=4, seed=5, progress=False) == got
    assert validate(model, collator, examples, batch_size=4, seed=6, progress=False)["nll"] \
        != pytest.approx(got["nll"], rel=1e-10)  # other noise


def test_without_latents_the_two_nlls_are_one():
    model, collator = _model("none")
    got = validate(model, collator, _examples(), batch_size=2, progress=False)
    assert got["nll_prior"] == pytest.approx(got["nll"], rel=1e-10)
    assert got["loss"] == pytest.approx(got["nll"], rel=1e-10)


def test_sums_add_up_across_shares_as_one_run():
    """What the training loop does across processes: each validates a share, the sums are
    added, then divided."""
    model, collator = _model("none")
    examples = _examples(6)
    shares = [validation_sums(model, collator, examples[r::2], 2, rank=r) for r in range(2)]
    added = {key: shares[0][key] + shares[1][key] for key in shares[0]}
    whole = validate(model, collator, examples, batch_size=2, progress=False)
    for key, value in validation_metrics(added).items():
        assert value == pytest.approx(whole[key], rel=1e-10), key


def test_bad_inputs():
    model, collator = _model()
    with pytest.raises(ValueError, match="at least one example"):
        validate(model, collator, [], progress=False)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            validate(model, collator, _examples(), batch_size=bad, progress=False)


def test_gamma_keeps_the_objectives_prior_draw_apart_from_the_prior_means():
    """With gamma > 0 the forward reports its own prior-path NLL (from a prior draw) as
    "nll_prior": it was added into the prior means' nll_prior (4.44 against 3.63 nats)."""
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    model = AMVLModel(tiny_qwen2(tokenizer), tokenizer,
                      AMVLConfig(num_slots=2, latent_dim=4, gamma=0.5,
                                 kernel_backend="torch")).double()
    collator = AMVLCollator(tokenizer)
    examples = _examples(4)
    batch = collator(examples)
    with torch.no_grad():
        z = model.heads(batch["prompt_ids"], batch["prompt_mask"])["mu_p"]
    tokens = batch["answer_mask"].sum(1)
    means = model.answer_nll(batch["prompt_ids"], batch["prompt_mask"], batch["answer_ids"],
                             batch["answer_mask"], z=z)
    got = validate(model, collator, examples, batch_size=4, progress=False)
    assert got["nll_prior"] == pytest.approx(float((means * tokens).sum() / tokens.sum()),
                                             rel=1e-10)
    model.eval()
    out = model(**batch, step=None, seed=step_seed(0, 0, 0, stream=EVAL_STREAM))
    assert got["nll_prior_draw"] == pytest.approx(out.metrics["nll_prior_draw"], rel=1e-6)
    assert got["loss"] == pytest.approx(out.loss.item(), rel=1e-10)
