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


def test_warm_up_steps_without_the_linear_schedule_are_named():
    with pytest.warns(UserWarning, match="kl_warmup_steps=10 has no effect"):
        AMVLConfig(kl_warmup_steps=10)


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
