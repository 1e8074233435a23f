"""Training objectives, one class each over a shared base (DESIGN.md section 2).

| name  | loss                                                          | latents |
| amvl  | NLL(y|x,z~q) + alpha KL(sg(q)||p) + beta KL(sg(p)||q) [+ gamma NLL(y|x,z~p)] | q |
| elbo  | NLL(y|x,z~q) + beta KL(q||p), gradient to both sides [+ gamma NLL prior]     | q |
| prior | NLL(y|x,z~p)                                                  | p       |
| none  | NLL(y|x), no latent block                                     | none    |

The model asks an objective where its latents come from (:attr:`Objective.latent_source`),
lets it draw them (:meth:`Objective.draw`, which calls the fused kernel with the objective's
gradient routing), runs the decoder, and hands the NLLs back to :meth:`Objective.loss`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

import amvl_kernels as ak
from amvl.config import AMVLConfig

ACTIVE_SLOT_NATS = 0.01
"""A slot whose batch-mean KL(q||p) exceeds this many nats counts as active."""


@dataclass
class Latents:
    """What the heads produced and what was drawn from them for one batch, (B, K, d)."""

    z: Tensor
    mu_p: Tensor
    logvar_p: Tensor
    mu_q: Tensor | None = None
    logvar_q: Tensor | None = None
    kl_fwd: Tensor | None = None  # (B, K) KL(q||p)
    kl_rev: Tensor | None = None  # (B, K) KL(p||q)


def kl_weight(config: AMVLConfig, step: int | Tensor | None) -> float | Tensor:
    """Multiplier of the KL term that reaches the posterior at optimisation step ``step``
    (0-based); 1 for ``step`` None, the full objective (evaluation). The cyclical schedule is
    Fu et al.'s (2019): within each cycle a linear ramp over the first ``kl_cycle_ratio`` of
    its steps, then 1. A step given as a one-element integer tensor (as a CUDA-graphed step
    takes it, see :meth:`amvl.model.AMVLModel.forward`) gives the weight as a tensor."""
    if step is None:
        return 1.0
    if config.kl_schedule == "linear":
        if config.kl_warmup_steps == 0:
            return 1.0
        ramp = step / config.kl_warmup_steps
    elif config.kl_schedule == "cyclical":
        ramp = (step % config.kl_cycle_steps) / config.kl_cycle_steps / config.kl_cycle_ratio
    else:
        return 1.0
    return ramp.clamp(max=1.0).reshape(()) if isinstance(ramp, Tensor) else min(1.0, ramp)


def free_bits(kl: Tensor, lam: float) -> Tensor:
    """Sum over slots of max(batch-mean KL_k, lambda); kl is (B, K). Returns a scalar."""
    per_slot = kl.mean(0)
    if lam > 0:
        per_slot = torch.clamp(per_slot, min=lam)
    return per_slot.sum()


class Objective:
    """Shared base: latent source, gradient routing, KL schedule and metrics."""

    name: ClassVar[str]
    latent_source: ClassVar[str]  # "posterior", "prior" or "none"
    fwd_grad: ClassVar[str] = "p"
    rev_grad: ClassVar[str] = "q"
    registry: ClassVar[dict[str, type[Objective]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Objective.registry[cls.name] = cls

    def __init__(self, config: AMVLConfig):
        self.config = config

    @property
    def uses_posterior(self) -> bool:
        """Whether the decoder's latents come from the posterior (which then needs its head)."""
        return self.latent_source == "posterior"

    @property
    def uses_prior_nll(self) -> bool:
        """Whether the model must also decode y from prior latents for the gamma term."""
        return self.uses_posterior and self.config.gamma > 0

    def draw(self, mu_p: Tensor, logvar_p: Tensor, mu_q: Tensor | None = None,
             logvar_q: Tensor | None = None, seed: int | Tensor | None = None) -> Latents:
        """Sample the latents the decoder sees, with this objective's gradient routing."""
        backend = self.config.kernel_backend
        if self.uses_posterior:
            if mu_q is None or logvar_q is None:
                raise ValueError(f"objective {self.name!r} needs the posterior heads' outputs")
            z, kl_fwd, kl_rev = ak.gaussian_sample_kl(
                mu_q, logvar_q, mu_p, logvar_p, seed=seed, fwd_grad=self.fwd_grad,
                rev_grad=self.rev_grad, backend=backend)
            return Latents(z, mu_p, logvar_p, mu_q, logvar_q, kl_fwd, kl_rev)
        z = ak.gaussian_sample(mu_p, logvar_p, seed=seed, backend=backend)
        return Latents(z, mu_p, logvar_p)

    def kl_loss(self, latents: Latents, step: int | Tensor | None) -> Tensor:
        """The objective's weighted KL terms; objectives without a posterior have none."""
        return latents.z.new_zeros((), dtype=torch.float32)

    def loss(self, nll: Tensor, latents: Latents | None, step: int | Tensor | None = 0,
             nll_prior: Tensor | None = None) -> tuple[Tensor, Metrics]:
        """Total loss and metrics from the decoder's mean NLL(s) and the drawn latents."""
        total = nll
        named = {"nll": nll}
        weight = {}
        if latents is not None and latents.kl_fwd is not None:
            total = total + self.kl_loss(latents, step)
            named.update(kl_metrics(latents))
            scheduled = kl_weight(self.config, step)
            if isinstance(scheduled, Tensor):
                named["kl_weight"] = scheduled
            else:
                weight["kl_weight"] = scheduled
        if nll_prior is not None:
            total = total + self.config.gamma * nll_prior
            named["nll_prior_draw"] = nll_prior  # a draw: "nll_prior" is the means'
        named["loss"] = total
        return total, Metrics(named, weight)


class Metrics(Mapping[str, float]):
    """One step's metrics as Python floats, read from the device on first access, in one
    transfer. Reading them inside the forward would make the host wait for the GPU before it
    queues the backward, every step; read after the backward (as a training loop's logging
    does), the wait costs nothing. :meth:`tensors` gives the values without reading them."""

    def __init__(self, tensors: dict[str, Tensor], floats: dict[str, float] | None = None):
        self._tensors = {key: t.detach() for key, t in tensors.items()}
        self._floats = dict(floats or {})
        self._values: dict[str, float] | None = None

    def with_tensors(self, **tensors: Tensor) -> Metrics:
        """A copy with these device scalars added or replaced."""
        return Metrics({**self._tensors, **tensors}, self._floats)

    def tensors(self) -> dict[str, Tensor | float]:
        """Every metric, device scalars left on the device (for sums over steps)."""
        return {**self._tensors, **self._floats}

    def _read(self) -> dict[str, float]:
        if self._values is None:
            # one device for the stack: under a device_map the NLL (LM head's device) and the
            # KLs (the heads') may live on different GPUs
            device = next(iter(self._tensors.values())).device if self._tensors else None
            values = torch.stack([t.float().reshape(()).to(device)
                                  for t in self._tensors.values()]).tolist() \
                if self._tensors else []
            self._values = {**dict(zip(self._tensors, values)), **self._floats}
        return self._values

    def __getitem__(self, key: str) -> float:
        return self._read()[key]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._tensors, *self._floats])

    def __len__(self) -> int:
        return len(self._tensors) + len(self._floats)

    def __repr__(self) -> str:
        return f"Metrics({self._read()!r})"


def kl_metrics(latents: Latents) -> dict[str, Tensor]:
    """Mean forward and reverse KL, per slot, and the number of active slots (scalar tensors,
    left on the device)."""
    kl_fwd, kl_rev = latents.kl_fwd.detach().float(), latents.kl_rev.detach().float()
    per_slot_fwd, per_slot_rev = kl_fwd.mean(0), kl_rev.mean(0)
    metrics = {"kl_fwd": kl_fwd.sum(-1).mean(), "kl_rev": kl_rev.sum(-1).mean(),
               "active_slots": (per_slot_fwd > ACTIVE_SLOT_NATS).sum()}
    for k in range(per_slot_fwd.shape[0]):
        metrics[f"kl_fwd/slot{k}"] = per_slot_fwd[k]
        metrics[f"kl_rev/slot{k}"] = per_slot_rev[k]
    return metrics


class AMVLObjective(Objective):
    """The paper: the prior learns from KL(sg(q)||p), the posterior is held by KL(sg(p)||q)."""

    name = "amvl"
    latent_source = "posterior"
    fwd_grad, rev_grad = "p", "q"

    def kl_loss(self, latents: Latents, step: int | Tensor | None) -> Tensor:
        """alpha KL(sg(q)||p) in full + the scheduled beta KL(sg(p)||q) with free bits."""
        # The KL schedule and free bits keep the posterior from collapsing onto the prior, so
        # they act on the term that reaches q, the reverse KL. The forward KL is the prior's
        # only target (with gamma = 0): warmed up, the prior would learn nothing early on;
        # clamped at lambda, it would stop up to lambda nats a slot short of the posterior it
        # stands in for at inference.
        c = self.config
        return (c.alpha * latents.kl_fwd.mean(0).sum()
                + kl_weight(c, step) * c.beta * free_bits(latents.kl_rev, c.free_bits))


class ELBOObjective(Objective):
    """Standard variational training: one KL(q||p) with gradient to both sides."""

    name = "elbo"
    latent_source = "posterior"
    fwd_grad, rev_grad = "both", "none"

    def kl_loss(self, latents: Latents, step: int | Tensor | None) -> Tensor:
        """The scheduled beta KL(q||p) with free bits, gradient to both sides."""
        c = self.config
        return kl_weight(c, step) * c.beta * free_bits(latents.kl_fwd, c.free_bits)


class PriorObjective(Objective):
    """Latents from the prior alone, trained through the NLL: no posterior, no KL."""

    name = "prior"
    latent_source = "prior"


class NoLatentObjective(Objective):
    """Plain fine-tuning without a latent block: the baseline every latent method must beat."""

    name = "none"
    latent_source = "none"


def build_objective(config: AMVLConfig) -> Objective:
    """The objective class named by ``config.objective``."""
    return Objective.registry[config.objective](config)

