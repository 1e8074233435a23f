"""AMVLConfig: validation with clear errors, JSON round trip."""

import json

import pytest

from amvl.config import CONFIG_NAME, AMVLConfig


def test_round_trip(tmp_path):
    config = AMVLConfig(num_slots=3, latent_dim=17, objective="elbo", beta=0.3,
                        kl_schedule="cyclical", kl_cycle_steps=50, free_bits=0.1,
                        inference="sample", num_samples=4, latent_token="<z>")
    path = config.save(tmp_path)
    assert path.name == CONFIG_NAME
    assert json.loads(path.read_text())["latent_dim"] == 17
    assert AMVLConfig.load(tmp_path) == config


@pytest.mark.parametrize("kwargs,match", [
    ({"num_slots": 0}, "num_slots"),
    ({"latent_dim": 2.5}, "latent_dim"),
    ({"objective": "vae"}, "objective"),
    ({"kl_schedule": "cosine"}, "kl_schedule"),
    ({"inference": "argmax"}, "inference"),
    ({"alpha": -1.0}, "alpha"),
    ({"kl_cycle_ratio": 0.0}, "kl_cycle_ratio"),
    ({"logvar_min": 2.0, "logvar_max": 1.0}, "logvar_min"),
    ({"logvar_max": 40.0}, "safe range"),
    ({"logvar_init": -12.0}, "logvar_init"),
    ({"num_samples": 0}, "num_samples"),
    ({"kernel_backend": "nope"}, "kernel_backend"),
    ({"latent_token": "<lat_start>"}, "special tokens"),
    ({"num_slots": True}, "num_slots"),
    ({"alpha": float("inf")}, "alpha must be a finite"),
    ({"free_bits": float("inf")}, "free_bits"),
    ({"beta": "1e-3"}, "YAML reads 1e-5 as a string"),
    ({"prefix_sharing": "false"}, "prefix_sharing"),
    ({"latent_token": ""}, "non-empty"),
    ({"kl_cycle_steps": 1}, "kl_cycle_steps"),  # a weight of 0 at every step
    ({"num_samples": 2.5}, "num_samples"),
])
def test_invalid_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AMVLConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_slots": 0}, "num_slots"), ({"objective": "vae"}, "objective"),
    ({"alpha": -1.0}, "alpha"), ({"beta": "1e-3"}, "YAML"),
    ({"logvar_init": -12.0}, "logvar_init"), ({"latent_token": "<lat_start>"}, "special"),
    ({"prefix_sharing": "false"}, "prefix_sharing"), ({"num_samples": 2.5}, "num_samples"),
    ({"kernel_backend": "nope"}, "kernel_backend")])
def test_invalid_assignments_are_refused_and_change_nothing(kwargs, match):
    """As the constructor refuses them; the field keeps its value."""
    config = AMVLConfig()
    (name, value), = kwargs.items()
    before = getattr(config, name)
    with pytest.raises(ValueError, match=match):
        setattr(config, name, value)
    assert getattr(config, name) == before and config == AMVLConfig()


def test_assignments_are_normalised_and_named_when_unused():
    import numpy as np

    config = AMVLConfig(objective="prior")
    config.num_samples = np.int64(3)
    assert type(config.num_samples) is int and config.num_samples == 3
    with pytest.warns(UserWarning, match="alpha set but unused by objective='prior'"):
        config.alpha = 2.0
    assert config.alpha == 2.0


def test_a_built_model_fixes_what_it_was_made_from():
    """latent_dim, the objective, the log-variance parameterisation and the special tokens
    made the model's heads, objective and token ids: changing them on its config would make
    the model and its saved config disagree. Everything else stays assignable."""
    import dataclasses

    from amvl.model import AMVLModel
    from amvl.tiny import tiny_qwen2, word_tokenizer

    tokenizer = word_tokenizer(["a", "b"])
    config = AMVLConfig(num_slots=2, latent_dim=3, slot_embeddings=True)
    model = AMVLModel(tiny_qwen2(tokenizer), tokenizer, config)
    # num_slots: the slot embeddings have a row per slot
    for name, value in [("latent_dim", 5), ("objective", "elbo"), ("logvar_max", 3.0),
                        ("latent_token", "<z>"), ("slot_embeddings", False), ("num_slots", 3)]:
        with pytest.raises(AttributeError, match=f"AMVLConfig.{name} is fixed"):
            setattr(model.config, name, value)
    assert model.config == AMVLConfig(num_slots=2, latent_dim=3, slot_embeddings=True)
    model.config.alpha, model.config.inference = 0.5, "sample"
    assert (model.config.alpha, model.objective.config.alpha) == (0.5, 0.5)
    other = dataclasses.replace(model.config, latent_dim=5, num_slots=3)
    other.objective = "elbo"  # a new config is free until a model is built on it
    assert AMVLModel(tiny_qwen2(tokenizer), tokenizer, other).prior_head.latent_dim == 5


def test_without_slot_embeddings_the_number_of_slots_stays_free():
    """Nothing of the model's size depends on K then: a model trained at one K can be run
    at another."""
    from amvl.model import AMVLModel
    from amvl.tiny import tiny_qwen2, word_tokenizer

    tokenizer = word_tokenizer(["a", "b"])
    model = AMVLModel(tiny_qwen2(tokenizer), tokenizer,
                      AMVLConfig(num_slots=2, latent_dim=3, slot_embeddings=False))
    assert model.slot_embeddings is None
    model.config.num_slots = 4
    assert model.config.num_slots == 4
    with pytest.raises(AttributeError, match="AMVLConfig.slot_embeddings is fixed"):
        model.config.slot_embeddings = True


def test_slot_embeddings_are_off_unless_asked_for(tmp_path):
    """Off by default (README, "Slot embeddings"), so models saved before they existed, whose
    configs lack the field, load as they were."""
    assert AMVLConfig().slot_embeddings is False
    path = AMVLConfig(num_slots=2).save(tmp_path)
    old = json.loads(path.read_text())
    del old["slot_embeddings"]
    path.write_text(json.dumps(old))
    assert AMVLConfig.load(tmp_path) == AMVLConfig(num_slots=2)
    assert AMVLConfig.from_dict({"slot_embeddings": True}).slot_embeddings is True
    with pytest.raises(ValueError, match="slot_embeddings must be true or false"):
        AMVLConfig(slot_embeddings="no")


def test_warm_up_steps_without_the_linear_schedule_are_named():
    with pytest.warns(UserWarning, match="kl_warmup_steps=10 has no effect"):
        AMVLConfig(kl_warmup_steps=10)
    # the cycle's settings likewise outside the cyclical schedule (they were silent)
    with pytest.warns(UserWarning, match="kl_cycle_steps=50, kl_cycle_ratio=0.2 has no effect"):
        AMVLConfig(kl_schedule="linear", kl_warmup_steps=5, kl_cycle_steps=50,
                   kl_cycle_ratio=0.2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AMVLConfig(kl_schedule="cyclical", kl_cycle_steps=50, kl_cycle_ratio=0.2)


def test_settings_the_objective_does_not_use_are_named():
    with pytest.warns(UserWarning, match="beta, gamma, free_bits set but unused by "
                                         "objective='none'"):
        AMVLConfig(objective="none", beta=0.3, gamma=0.5, free_bits=0.5)
    with pytest.warns(UserWarning, match="alpha set but unused by objective='elbo'"):
        AMVLConfig(objective="elbo", alpha=2.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AMVLConfig(objective="amvl", alpha=2.0, beta=0.5, gamma=0.5, free_bits=0.1)
        AMVLConfig(objective="prior", num_slots=4)


def test_unknown_keys_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        AMVLConfig.from_dict({"num_slots": 2, "slots": 3})
    with pytest.raises(FileNotFoundError):
        AMVLConfig.load(tmp_path)
