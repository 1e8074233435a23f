"""amvl.diagnostics on a tiny model, and its building blocks against known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from amvl.config import AMVLConfig
from amvl.data import AMVLCollator
from amvl.diagnostics import (
    latent_spread,
    leakage_report,
    linear_probe_accuracy,
    mean_pairwise_cosine,
    probe_chance,
    score_choices,
    slot_similarity,
)
from amvl.model import AMVLModel
from amvl.tiny import tiny_qwen2, word_tokenizer

WORDS = [f"w{i}" for i in range(20)] + ["yes", "no", "maybe"]


def _examples(n: int, rng: np.random.Generator) -> list[dict]:
    out = []
    for _ in range(n):
        choices = ["yes", "no", "maybe"][: 2 + int(rng.integers(0, 2))]  # ragged choice lists
        out.append({"question": " ".join(rng.choice(WORDS[:20], size=3)), "choices": choices,
                    "answer": str(rng.choice(choices))})
    return out


def _model(objective: str) -> tuple[AMVLModel, AMVLCollator]:
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    config = AMVLConfig(num_slots=2, latent_dim=4, objective=objective, kernel_backend="torch")
    model = AMVLModel(tiny_qwen2(tokenizer), tokenizer, config)
    return model, AMVLCollator(tokenizer)


def test_scores_match_answer_nll_of_each_choice():
    model, collator = _model("amvl")
    examples = _examples(5, np.random.default_rng(1))
    scores = score_choices(model, collator, examples, batch_size=2, progress=False)
    ex = examples[3]
    batch = collator([dict(ex, answer=ex["choices"][1])])
    z = model.heads(batch["prompt_ids"], batch["prompt_mask"])["mu_p"]
    expected = model.answer_nll(batch["prompt_ids"], batch["prompt_mask"], batch["answer_ids"],
                                batch["answer_mask"], z=z)
    assert scores["nll"]["prior"][3, 1] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert all(np.isinf(scores["nll"]["prior"][i, 2]) for i, e in enumerate(examples)
               if len(e["choices"]) == 2)


def test_choices_that_tokenize_alike_are_warned_about():
    """Choices the tokenizer cannot tell apart tie under every latent variant, so the flip
    rates and accuracies over them measured nothing, silently (as in amvl eval)."""
    import warnings

    model, collator = _model("amvl")
    examples = _examples(4, np.random.default_rng(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score_choices(model, collator, examples, batch_size=3, progress=False)
    assert not [w for w in caught if "tokenize to the same ids" in str(w.message)]
    examples[2] = dict(examples[2], choices=["yes", "(X)", "(Y)"], answer="yes")  # both <unk>
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = score_choices(model, collator, examples, batch_size=3, progress=False)
    tied = [str(w.message) for w in caught if "tokenize to the same ids" in str(w.message)]
    assert len(tied) == 1 and tied[0].startswith("1 of 4 examples"), tied
    assert "['(X)', '(Y)']" in tied[0]
    assert scores["nll"]["prior"][2, 1] == scores["nll"]["prior"][2, 2]


def test_scoring_leaves_each_modules_train_mode_as_it_was():
    """Diagnostics called from a training loop (an on_log callback) must not leave the model
    in eval mode: dropout and activation checkpointing would stay off for the steps after."""
    model, collator = _model("amvl")
    model.train()
    model.base.get_input_embeddings().eval()  # a frozen part that stays in eval
    before = [m.training for m in model.modules()]
    score_choices(model, collator, _examples(3, np.random.default_rng(4)), progress=False)
    assert [m.training for m in model.modules()] == before


@pytest.mark.parametrize("objective", ["amvl", "prior", "none"])
def test_leakage_report_fields(objective):
    model, collator = _model(objective)
    report = leakage_report(model, collator, _examples(12, np.random.default_rng(2)),
                            batch_size=5, progress=False)
    assert 0 <= report["acc_prior"] <= 1 and report["nll_prior"] > 0
    has_posterior = objective == "amvl"
    assert math.isnan(report["acc_posterior"]) != has_posterior
    assert math.isnan(report["leakage_gap"]) != has_posterior
    if objective == "none":
        assert math.isnan(report["flip_zeroed"]) and math.isnan(report["cosine_prior"])
        assert math.isnan(report["slot_cosine_prior"]) and math.isnan(report["slot_spread_prior"])
    else:
        assert 0 <= report["flip_swapped"] <= 1 and -1 <= report["cosine_prior"] <= 1
        assert -1 <= report["slot_cosine_prior"] < 1 and 0 < report["slot_spread_prior"] <= 1
    if has_posterior:
        assert report["kl_fwd"] > 0 and report["active_slots"] <= 2
        sampled, means = report["probe_posterior_sampled"], report["probe_posterior"]
        assert math.isnan(sampled) == math.isnan(means)  # NaN: a class too rare to hold out
        assert math.isnan(sampled) or 0 <= sampled <= 1
    else:  # the same keys for every objective, NaN where they do not exist (they were missing)
        assert all(math.isnan(report[k]) for k in ("kl_fwd", "kl_rev", "active_slots",
                                                  "kl_fwd/slot1", "kl_rev/slot0",
                                                  "probe_posterior", "probe_posterior_sampled"))
    assert {k for k in report if "/slot" in k} == {f"kl_{d}/slot{i}" for d in ("fwd", "rev")
                                                   for i in range(2)}


def test_probes_decode_the_answer_and_the_draws_probe_reads_through_the_noise():
    """An untrained posterior's means move with the answer they read, by a hair against its
    noise: the scale-free means probe decodes them perfectly (it read 1.0 on an untrained
    model), the draws' probe stays near chance. Narrowed to near points, the posterior's draws
    carry the answer too. The probes' classes are the answers' texts, not their positions."""
    model, collator = _model("amvl")
    rng = np.random.default_rng(0)
    options = ["yes", "no", "maybe"]
    examples = []
    for _ in range(30):  # one question; choice lists in varying order
        answer = options[int(rng.integers(3))]
        order = list(rng.permutation(options))
        examples.append({"question": "w1 w2 w3", "choices": order, "answer": answer})
    report = leakage_report(model, collator, examples, batch_size=10, progress=False)
    assert report["probe_posterior"] == 1.0
    assert report["probe_posterior_sampled"] < 0.6  # chance: 1/3
    assert math.isnan(report["probe_prior"]) or report["probe_prior"] < 0.6  # x is the same
    with torch.no_grad():  # log-variance at its floor: draws within exp(-5) of the means
        model.posterior_head.proj.bias[model.config.latent_dim:] = -30.0
    report = leakage_report(model, collator, examples, batch_size=10, progress=False)
    assert report["probe_posterior_sampled"] == 1.0


def test_bad_examples_are_named():
    model, collator = _model("amvl")
    with pytest.raises(ValueError, match="example 0: answer"):
        leakage_report(model, collator, [{"question": "w1", "choices": ["yes", "no"],
                                          "answer": "maybe"}], progress=False)
    with pytest.raises(ValueError, match="at least two"):
        leakage_report(model, collator, [{"question": "w1", "choices": ["yes"],
                                          "answer": "yes"}], progress=False)


def test_bad_settings_are_named_before_any_scoring(monkeypatch):
    """batch_size -1 gave an all-NaN report, 0 a range() error; a group_key missing from an
    example failed only after all the scoring; an iterator was spent by the checks."""
    import amvl.diagnostics as diagnostics

    model, collator = _model("amvl")
    examples = _examples(3, np.random.default_rng(0))
    monkeypatch.setattr(diagnostics, "score_choices", None)  # never reached
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            leakage_report(model, collator, examples, batch_size=bad, progress=False)
    with pytest.raises(ValueError, match="example 0 has no 'family'"):
        leakage_report(model, collator, examples, group_key="family", progress=False)
    with pytest.raises(TypeError, match="examples must be a sequence"):
        leakage_report(model, collator, iter(examples), progress=False)
    diagnostics._check_examples(examples, np.int64(4))  # a NumPy integer is a batch size


def test_probe_and_cosine_name_bad_arrays():
    with pytest.raises(ValueError, match="labels must be a 1-D array of class indices"):
        linear_probe_accuracy(np.zeros((4, 2)), np.array([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="features has 4 rows but labels 3"):
        linear_probe_accuracy(np.zeros((4, 2)), np.array([0, 1, 0]))
    assert np.isnan(linear_probe_accuracy(np.zeros((0, 2)), np.zeros(0, dtype=int)))
    assert np.isnan(mean_pairwise_cosine(np.zeros((0, 3))))  # as documented: below two


def test_probe_decodes_a_planted_signal_and_not_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=90)
    planted = rng.normal(size=(90, 2, 4))
    planted[:, 0, 0] += 4.0 * labels
    assert linear_probe_accuracy(planted, labels) > 0.85
    assert linear_probe_accuracy(rng.normal(size=(90, 2, 4)), labels) < 0.6


def test_probe_ignores_the_features_scale():
    # An unscaled probe under the default L2 penalty once fell to chance at small scales.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=90)
    planted = rng.normal(size=(90, 2, 4))
    planted[:, 0, 0] += 4.0 * labels
    accuracy = linear_probe_accuracy(planted, labels)
    for scale in (1e-2, 1e-3, 1e3):
        assert linear_probe_accuracy(planted * scale, labels) == pytest.approx(accuracy,
                                                                               abs=0.03)


def test_probe_leaves_out_classes_of_one_and_reports_its_chance_level():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 30)
    planted = rng.normal(size=(90, 2, 4))
    planted[:, 0, 0] += 4.0 * labels
    alone = np.concatenate([labels, [3]])  # a class of one example made the whole probe NaN
    with_alone = np.concatenate([planted, rng.normal(size=(1, 2, 4))])
    assert linear_probe_accuracy(with_alone, alone) == linear_probe_accuracy(planted, labels)
    assert probe_chance(alone) == pytest.approx(1 / 3)  # on the examples the probe uses
    # 90% of one class: pure noise decodes at about 90%, its chance level
    skewed = np.array([0] * 90 + [1] * 10)
    noise = linear_probe_accuracy(rng.normal(size=(100, 4)), skewed)
    assert probe_chance(skewed) == 0.9 and noise == pytest.approx(0.9, abs=0.05)
    assert math.isnan(probe_chance(np.array([0, 0, 1]))) and math.isnan(probe_chance(labels[:0]))
    with pytest.raises(ValueError, match="labels must be a 1-D array of class indices"):
        probe_chance(np.array([0.0, 1.0, 1.0]))


def test_spread_sees_through_a_shared_offset_where_the_cosine_does_not():
    rng = np.random.default_rng(0)
    varied = rng.normal(size=(200, 8))
    assert mean_pairwise_cosine(varied + 20.0) > 0.99  # a shared offset: "collapsed"
    assert latent_spread(varied + 20.0) == pytest.approx(1 / 401, rel=0.2)  # 1 / (1 + 20^2)
    assert latent_spread(varied) == pytest.approx(1.0, abs=0.02)
    assert latent_spread(np.tile([[1.0, -2.0]], (5, 1))) == 0.0
    assert latent_spread(np.zeros((4, 3))) == 0.0 and math.isnan(latent_spread(varied[:1]))
    with_nan = varied.copy()
    with_nan[3, 0] = np.nan  # a NaN row was dropped from the cosine without a word
    assert math.isnan(latent_spread(with_nan)) and math.isnan(mean_pairwise_cosine(with_nan))


def test_slot_similarity_tells_copies_of_one_slot_from_distinct_slots():
    rng = np.random.default_rng(0)
    one = rng.normal(size=(6, 1, 5))
    copies = np.repeat(one, 4, axis=1)
    assert slot_similarity(copies) == (1.0, 0.0)
    assert slot_similarity(np.zeros((3, 4, 5))) == (1.0, 0.0)  # collapse onto zeros
    cosine, spread = slot_similarity(copies + 0.1 * rng.normal(size=copies.shape))
    assert 0.95 < cosine < 1 and 0 < spread < 0.05
    cosine, spread = slot_similarity(rng.normal(size=(400, 4, 64)))  # independent slots
    assert abs(cosine) < 0.02 and spread == pytest.approx(0.75, abs=0.02)  # (K - 1) / K
    opposite = np.array([[[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]])  # a zero slot: no direction
    assert slot_similarity(opposite)[0] == pytest.approx(-1.0)
    assert all(math.isnan(v) for v in slot_similarity(rng.normal(size=(5, 1, 3))))
    with_nan = copies.copy()
    with_nan[2, 1, 0] = np.nan
    assert all(math.isnan(v) for v in slot_similarity(with_nan))
    with pytest.raises(ValueError, match=r"\(examples, slots, dims\)"):
        slot_similarity(np.zeros((4, 3)))


def test_pairwise_cosine():
    same = np.tile(np.array([[1.0, 2.0, -1.0]]), (5, 1))
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)
    opposite = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert mean_pairwise_cosine(opposite) == pytest.approx(-1.0)
    orthogonal = np.eye(4)
    assert mean_pairwise_cosine(orthogonal) == pytest.approx(0.0)
    # Collapse onto zeros is collapse (it read 0, "healthy"); a zero row has no direction.
    assert mean_pairwise_cosine(np.zeros((5, 2, 4))) == 1.0
    assert mean_pairwise_cosine(np.array([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])) == \
        pytest.approx(-1.0)
    assert np.isnan(mean_pairwise_cosine(np.array([[1.0, 0.0], [0.0, 0.0]])))


class _PlantedModel:
    """A stand-in AMVLModel whose answers are read straight out of z: the prior means of
    example i point at choice ``prior_pick[i]``, the posterior means at the gold answer, and a
    choice's NLL is minus its coordinate in z. Every diagnostic then has a known value."""

    device, dtype = torch.device("cpu"), torch.float32
    config = AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch")

    def __init__(self, prior_pick: np.ndarray):
        from types import SimpleNamespace

        self.prior_pick = torch.as_tensor(prior_pick)
        self.objective = SimpleNamespace(latent_source="prior", uses_posterior=True)

    def eval(self):
        return self

    def heads(self, prompt_ids, prompt_mask, answer_ids=None, answer_mask=None, **images):
        rows = torch.arange(len(prompt_ids))
        mu_p = torch.zeros(len(rows), 2, 4)
        mu_p[rows, 0, self.prior_pick[prompt_ids[:, 0]]] = 1.0
        out = {"mu_p": mu_p, "logvar_p": torch.zeros_like(mu_p)}
        if answer_ids is not None:  # the posterior, given the answer
            mu_q = torch.zeros_like(mu_p)
            mu_q[rows, 0, answer_ids[:, 0]] = 3.0
            out.update(mu_q=mu_q, logvar_q=torch.zeros_like(mu_q))
        return out

    def answer_nll(self, prompt_ids, prompt_mask, answer_ids, answer_mask, z=None, **images):
        return -z[torch.arange(len(answer_ids)), 0, answer_ids[:, 0]]

    def choices_nll(self, prompt_ids, prompt_mask, answers, latents=None, **images):
        """AMVLModel.choices_nll's contract, from answer_nll: (V, B, C), or (B, C) from the
        prior's means."""
        zs = latents if latents is not None else [self.heads(prompt_ids, prompt_mask)["mu_p"]]
        out = torch.stack([torch.stack([self.answer_nll(prompt_ids, prompt_mask, *answer, z=z)
                                        for answer in answers], 1) for z in zs])
        return out if latents is not None else out[0]


@pytest.mark.parametrize("batch_size", [8, 1, 4])
def test_known_answers_and_a_swap_that_crosses_batches(batch_size):
    n, choices = 9, 4  # batches of 8 and 1, of one, of 4, 4 and 1: the swap is one global roll
    gold = np.array([0, 1, 2, 3, 0, 1, 2, 3, 1])
    prior_pick = np.array([0, 1, 2, 3, 1, 2, 3, 2, 1])  # no two swapped alike, in a ring
    examples = [{"question": "q", "choices": [f"c{c}" for c in range(choices)],
                 "answer": f"c{gold[i]}", "index": i} for i in range(n)]

    def collator(chunk):
        ones = torch.ones(len(chunk), 1, dtype=torch.bool)
        return {"prompt_ids": torch.tensor([[ex["index"]] for ex in chunk]), "prompt_mask": ones,
                "answer_ids": torch.tensor([[int(ex["answer"][1:])] for ex in chunk]),
                "answer_mask": ones}

    report = leakage_report(_PlantedModel(prior_pick), collator, examples,
                            batch_size=batch_size, noise_scale=0.0, progress=False)
    assert report["acc_prior"] == pytest.approx(np.mean(prior_pick == gold))
    assert report["acc_posterior"] == 1.0
    assert report["flip_zeroed"] == pytest.approx(np.mean(prior_pick != 0))  # ties pick c0
    assert report["flip_noised"] == 0.0
    # each example gets the prior means of the one before it (the first: the last one's)
    swapped = np.roll(prior_pick, 1)
    assert report["flip_swapped"] == pytest.approx(np.mean(swapped != prior_pick))
    assert report["flip_swapped"] == 1.0
    if batch_size == 1:  # one example is its own swap partner: no flip to count (it read 0)
        alone = leakage_report(_PlantedModel(prior_pick), collator, examples[:1],
                               noise_scale=0.0, progress=False)
        assert math.isnan(alone["flip_swapped"]) and alone["flip_zeroed"] == 0.0


@pytest.mark.parametrize("batch_size", [1, 4, 9])
def test_noised_latents_do_not_depend_on_the_batch_size(batch_size):
    # Drawn per batch, the noise once changed with the batch size (flip rate 0.21 vs 0.08).
    n, choices = 9, 4
    rng = np.random.default_rng(5)
    prior_pick = rng.integers(0, choices, size=n)
    examples = [{"question": "q", "choices": [f"c{c}" for c in range(choices)],
                 "answer": f"c{c}", "index": i} for i, c in enumerate(rng.integers(0, 4, n))]

    def collator(chunk):
        ones = torch.ones(len(chunk), 1, dtype=torch.bool)
        return {"prompt_ids": torch.tensor([[ex["index"]] for ex in chunk]), "prompt_mask": ones,
                "answer_ids": torch.tensor([[int(ex["answer"][1:])] for ex in chunk]),
                "answer_mask": ones}

    scores = [score_choices(_PlantedModel(prior_pick), collator, examples, batch_size=size,
                            noise_scale=2.0, progress=False)["nll"]["noised"]
              for size in (batch_size, n)]
    np.testing.assert_array_equal(scores[0], scores[1])


class _NaNModel(_PlantedModel):
    """The planted model with NaN scores for one choice, or for the prior latents only."""

    def __init__(self, prior_pick, nan_choice=None, nan_prior=False):
        super().__init__(prior_pick)
        self.nan_choice, self.nan_prior = nan_choice, nan_prior

    def heads(self, prompt_ids, prompt_mask, answer_ids=None, answer_mask=None, **images):
        out = super().heads(prompt_ids, prompt_mask, answer_ids, answer_mask)
        out["mu_p"][:, 1, 0] = 0.5  # marks the prior means (and what is made from them)
        return out

    def answer_nll(self, prompt_ids, prompt_mask, answer_ids, answer_mask, z=None, **images):
        out = super().answer_nll(prompt_ids, prompt_mask, answer_ids, answer_mask, z)
        if self.nan_choice is not None:
            out = out.masked_fill(answer_ids[:, 0] == self.nan_choice, float("nan"))
        if self.nan_prior:
            out = out.masked_fill(z[:, 1, 0] == 0.5, float("nan"))
        return out


def test_non_finite_scores_give_nan_and_a_warning_not_a_pick():
    n, choices = 6, 3
    gold = np.zeros(n, dtype=int)
    examples = [{"question": "q", "choices": [f"c{c}" for c in range(choices)],
                 "answer": "c0", "index": i} for i in range(n)]

    def collator(chunk):
        ones = torch.ones(len(chunk), 1, dtype=torch.bool)
        return {"prompt_ids": torch.tensor([[ex["index"]] for ex in chunk]), "prompt_mask": ones,
                "answer_ids": torch.tensor([[int(ex["answer"][1:])] for ex in chunk]),
                "answer_mask": ones}

    # A NaN on a wrong choice was taken as the prediction (argmin returns NaN's index).
    with pytest.warns(UserWarning, match="not finite"):
        report = leakage_report(_NaNModel(gold, nan_choice=2), collator, examples,
                                noise_scale=0.0, progress=False)
    assert math.isnan(report["acc_prior"]) and math.isnan(report["flip_zeroed"])
    # Prior NaN with other variants finite was a KeyError.
    with pytest.warns(UserWarning, match="prior choice NLLs are not finite"):
        report = leakage_report(_NaNModel(gold, nan_prior=True), collator, examples,
                                noise_scale=0.0, progress=False)
    assert math.isnan(report["flip_zeroed"]) and math.isnan(report["flip_swapped"])
    assert report["acc_posterior"] == 1.0


def test_plots_close_their_figures_even_when_they_fail(tmp_path):
    import matplotlib.pyplot as plt

    from amvl import plots

    history = {"amvl": [{"step": 1, "nll": 2.0, "kl_fwd": 0.5, "kl_rev": 0.4},
                        {"step": 2, "nll": 1.5, "kl_fwd": 0.4, "kl_rev": 0.3}]}
    report = {"amvl": {"acc_prior": 0.5, "acc_posterior": 0.7, "chance": 0.25}}
    plt.close("all")
    missing = tmp_path / "not" / "there"
    for draw, arg in ((plots.learning_curves, history), (plots.kl_curves, history),
                      (plots.leakage_gap, report)):
        with pytest.raises(FileNotFoundError):
            draw(arg, missing)
        assert draw(arg, tmp_path).stat().st_size > 0
    with pytest.raises(ValueError, match="at least one report"):
        plots.leakage_gap({}, tmp_path)
    assert plt.get_fignums() == []


def test_leakage_table_formats_each_kind_and_marks_what_a_model_lacks():
    from amvl.diagnostics import format_leakage_table

    report = {"acc_prior": 0.5, "acc_posterior": 0.875, "leakage_gap": 0.375,
              "nll_prior": 1.23456, "nll_posterior": float("nan"), "flip_zeroed": 0.0,
              "flip_noised": 0.25, "flip_swapped": 1.0, "probe_posterior_sampled": 0.3333,
              "probe_prior": 0.5, "probe_chance": 0.25, "active_slots": 3.0,
              "cosine_prior": 0.9876, "spread_prior": 0.0123, "slot_cosine_prior": 0.5}
    table = format_leakage_table({"amvl | run": report,
                                  "prior": {**report, "acc_posterior": float("nan")}})
    lines = table.splitlines()
    assert lines[0].startswith("Leakage diagnostics:")
    cells = [c.strip() for c in lines[4].strip("|").split(" | ")]
    assert cells == ["amvl \\| run", "50.0", "87.5", "37.5", "1.235", "-", "0.0", "25.0",
                     "100.0", "33.3", "50.0", "25.0", "3", "0.988", "0.012", "0.500"]
    assert [c.strip() for c in lines[5].strip("|").split(" | ")][2] == "-"
    assert len({len(line) for line in lines[2:]}) == 1  # aligned
    with pytest.raises(ValueError, match="no diagnostics"):
        format_leakage_table({})
