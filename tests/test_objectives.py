"""Objectives: schedules, free bits, and gradient routing against explicit-detach formulas."""

from __future__ import annotations

import pytest
import torch

from amvl.config import AMVLConfig
from amvl.objectives import (
    AMVLObjective,
    ELBOObjective,
    NoLatentObjective,
    Objective,
    PriorObjective,
    build_objective,
    free_bits,
    kl_weight,
)
from tests.conftest import DEVICE, available_backends


def test_registry_has_one_class_per_objective():
    expected = {"amvl": AMVLObjective, "elbo": ELBOObjective, "prior": PriorObjective,
                "none": NoLatentObjective}
    for name, cls in expected.items():
        assert Objective.registry[name] is cls
        assert type(build_objective(AMVLConfig(objective=name))) is cls


def test_kl_schedules():
    assert kl_weight(AMVLConfig(), 12345) == 1.0
    linear = AMVLConfig(kl_schedule="linear", kl_warmup_steps=100)
    assert [kl_weight(linear, s) for s in (0, 25, 100, 400)] == [0.0, 0.25, 1.0, 1.0]
    cyc = AMVLConfig(kl_schedule="cyclical", kl_cycle_steps=10, kl_cycle_ratio=0.5)
    assert [kl_weight(cyc, s) for s in (0, 2, 5, 9, 10, 12)] == [0.0, 0.4, 1.0, 1.0, 0.0, 0.4]
    # a step tensor (a CUDA-graphed step's) gives the same weights as a 0-d tensor
    for config, steps in ((linear, (0, 25, 100, 400)), (cyc, (0, 2, 5, 9, 10, 12))):
        for s in steps:
            weight = kl_weight(config, torch.tensor([s]))
            assert weight.shape == () and weight.item() == pytest.approx(kl_weight(config, s))


def test_free_bits_clamps_batch_mean_per_slot(rng_seed):
    kl = torch.rand(6, 4)
    lam = float(kl.mean(0).median())
    expected = torch.maximum(kl.mean(0), torch.tensor(lam)).sum()
    torch.testing.assert_close(free_bits(kl, lam), expected)
    torch.testing.assert_close(free_bits(kl, 0.0), kl.mean(0).sum())


def _kl(mu_a, lv_a, mu_b, lv_b):
    return 0.5 * (lv_b - lv_a + torch.exp(lv_a - lv_b) + (mu_a - mu_b) ** 2 * torch.exp(-lv_b)
                  - 1).sum(-1)


def _heads(b=3, k=2, d=5):
    # On DEVICE: the backends of available_backends() include the GPU-only ones there.
    return [torch.randn(b, k, d, dtype=torch.float64, device=DEVICE, requires_grad=True)
            for _ in range(4)]


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("name", ["amvl", "elbo"])
def test_posterior_objectives_route_gradient_like_the_paper(backend, name, rng_seed):
    config = AMVLConfig(objective=name, alpha=0.7, beta=1.9, free_bits=0.0,
                        kernel_backend=backend)
    objective = build_objective(config)
    mu_q, lv_q, mu_p, lv_p = _heads()
    latents = objective.draw(mu_p, lv_p, mu_q, lv_q, seed=42)
    weights = torch.randn_like(latents.z)
    nll = (latents.z * weights).sum() / 3  # a stand-in decoder NLL that depends on z
    loss, metrics = objective.loss(nll, latents, step=0)

    # The same loss written out with explicit stop-gradients.
    noise = ((latents.z - mu_q) / torch.exp(0.5 * lv_q)).detach()
    z = mu_q + torch.exp(0.5 * lv_q) * noise
    sg = [t.detach() for t in (mu_q, lv_q, mu_p, lv_p)]
    if name == "amvl":
        kl_term = (0.7 * _kl(sg[0], sg[1], mu_p, lv_p) + 1.9 * _kl(mu_p.detach(), lv_p.detach(),
                                                                   mu_q, lv_q)).mean(0).sum()
    else:
        kl_term = 1.9 * _kl(mu_q, lv_q, mu_p, lv_p).mean(0).sum()
    expected = (z * weights).sum() / 3 + kl_term
    torch.testing.assert_close(loss, expected)
    inputs = [mu_q, lv_q, mu_p, lv_p]
    for got, want in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(got, want)
    assert metrics["active_slots"] == 2 and metrics["kl_fwd"] > 0 and "kl_rev/slot1" in metrics


def test_amvl_prior_nll_term_and_schedule(rng_seed):
    config = AMVLConfig(objective="amvl", gamma=0.5, kl_schedule="linear", kl_warmup_steps=10,
                        kernel_backend="torch")
    objective = build_objective(config)
    assert objective.uses_prior_nll
    mu_q, lv_q, mu_p, lv_p = _heads()
    latents = objective.draw(mu_p, lv_p, mu_q, lv_q, seed=1)
    nll, nll_prior = (torch.tensor(v, dtype=torch.float64, device=DEVICE) for v in (2.0, 3.0))
    loss, metrics = objective.loss(nll, latents, step=0, nll_prior=nll_prior)
    # KL weight 0 at step 0: the reverse KL is off, the forward KL (the prior's target) is not
    expected = 3.5 + latents.kl_fwd.mean(0).sum()
    torch.testing.assert_close(loss, expected)
    assert metrics["kl_weight"] == 0.0 and metrics["nll_prior_draw"] == 3.0


@pytest.mark.parametrize("setting", ["warm-up", "free bits"])
def test_amvl_schedule_and_free_bits_act_on_the_posteriors_kl_only(setting, rng_seed):
    """Warm-up and free bits keep q from collapsing onto p, so under "amvl" they act on the
    reverse KL, the one term that reaches q; the prior keeps its full forward-KL target (a
    prior clamped at lambda would stop short of the posterior it replaces at inference)."""
    kwargs = (dict(kl_schedule="linear", kl_warmup_steps=10) if setting == "warm-up"
              else dict(free_bits=1e3))  # lambda far above every slot's KL
    objective = build_objective(AMVLConfig(objective="amvl", alpha=0.7, beta=1.9,
                                           kernel_backend="torch", **kwargs))
    mu_q, lv_q, mu_p, lv_p = _heads()
    latents = objective.draw(mu_p, lv_p, mu_q, lv_q, seed=5)
    loss, _ = objective.loss(latents.z.sum() * 0, latents, step=0)
    g_mu_q, g_lv_q, g_mu_p, g_lv_p = torch.autograd.grad(loss, [mu_q, lv_q, mu_p, lv_p])
    prior_target = 0.7 * _kl(mu_q.detach(), lv_q.detach(), mu_p, lv_p).mean(0).sum()
    want_mu_p, want_lv_p = torch.autograd.grad(prior_target, [mu_p, lv_p])
    torch.testing.assert_close(g_mu_p, want_mu_p)
    torch.testing.assert_close(g_lv_p, want_lv_p)
    assert torch.count_nonzero(g_mu_q) == 0 and torch.count_nonzero(g_lv_q) == 0


def test_prior_objective_samples_the_prior_and_trains_it_through_z(rng_seed):
    objective = build_objective(AMVLConfig(objective="prior", kernel_backend="torch"))
    _, _, mu_p, lv_p = _heads()
    latents = objective.draw(mu_p, lv_p, seed=3)
    assert latents.kl_fwd is None and latents.mu_q is None
    loss, metrics = objective.loss(latents.z.square().mean(), latents)
    g_mu, g_lv = torch.autograd.grad(loss, [mu_p, lv_p])
    torch.testing.assert_close(g_mu, 2 * latents.z.detach() / latents.z.numel())
    assert set(metrics) == {"nll", "loss"}


def test_posterior_objective_without_posterior_is_an_error():
    objective = build_objective(AMVLConfig(objective="amvl", kernel_backend="torch"))
    _, _, mu_p, lv_p = _heads()
    with pytest.raises(ValueError, match="posterior"):
        objective.draw(mu_p, lv_p)


def test_metrics_are_read_from_the_device_once_and_only_when_asked(monkeypatch):
    """A forward must not wait for the GPU to read its metrics: they stay tensors until a
    key is read, then all come over in one transfer."""
    from amvl.objectives import Metrics

    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist",
                        lambda self: reads.append(self.shape) or real_tolist(self))
    metrics = Metrics({"nll": torch.tensor(2.5), "kl_fwd": torch.tensor(0.25)}, {"kl_weight": 1.0})
    assert list(metrics) == ["nll", "kl_fwd", "kl_weight"] and len(metrics) == 3
    assert not reads
    assert isinstance(metrics.tensors()["nll"], torch.Tensor)
    assert dict(metrics) == {"nll": 2.5, "kl_fwd": 0.25, "kl_weight": 1.0}
    assert metrics["nll"] == 2.5 and reads == [torch.Size([2])]
