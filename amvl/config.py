"""``AMVLConfig``: everything about the latent block that is saved with a model."""

from __future__ import annotations

import json
import math
import numbers
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from amvl_kernels.backends import BACKENDS

CONFIG_NAME = "amvl_config.json"

OBJECTIVES = ("amvl", "elbo", "prior", "none")
KL_SCHEDULES = ("constant", "linear", "cyclical")
INFERENCE_MODES = ("mean", "sample")


def check_types(owner: object, integers: dict[str, int], reals: tuple[str, ...],
                flags: tuple[str, ...]) -> None:
    """Check and normalise a config dataclass's typed fields in place: ``integers`` maps
    names to their least value, ``reals`` must be finite numbers, ``flags`` real bools.
    Raises ValueError naming the class and field. YAML 1.1 (PyYAML) reads 1e-3 as a string
    and 'false' (quoted) as a string, which would otherwise pass as true or fail an hour in.
    """
    def fail(message: str) -> None:
        raise ValueError(f"{type(owner).__name__}: {message}")

    for name, least in integers.items():
        value = getattr(owner, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            fail(f"{name} must be an int >= {least}, got {value!r}")
        setattr(owner, name, int(value))
    for name in reals:
        value = getattr(owner, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not math.isfinite(value):  # an inf weight makes the loss inf or NaN
            hint = " (YAML reads 1e-5 as a string: write 1.0e-5)" if isinstance(value, str) \
                else ""
            fail(f"{name} must be a finite number, got {value!r}{hint}")
        setattr(owner, name, float(value))
    for name in flags:
        if not isinstance(getattr(owner, name), bool):
            fail(f"{name} must be true or false, got {getattr(owner, name)!r}")


# The objectives each setting acts in (every other setting acts in all of them).
_WITH_KL = ("amvl", "elbo")
OBJECTIVE_SETTINGS = {"alpha": ("amvl",), "beta": _WITH_KL, "gamma": _WITH_KL,
                      "kl_schedule": _WITH_KL, "kl_warmup_steps": _WITH_KL,
                      "kl_cycle_steps": _WITH_KL, "kl_cycle_ratio": _WITH_KL,
                      "free_bits": _WITH_KL}


@dataclass
class AMVLConfig:
    """Latent block, objective and inference settings (DESIGN.md section 2).

    Attributes:
        num_slots: K, latent slots between the query and the answer.
        latent_dim: d, dimensions of each slot's diagonal Gaussian.
        objective: "amvl", "elbo", "prior" or "none".
        alpha: weight of KL(sg(q)||p) (amvl).
        beta: weight of KL(sg(p)||q) (amvl), of KL(q||p) (elbo).
        gamma: weight of the optional prior-path NLL(y | x, z~p) (amvl, elbo).
            The NLLs are token means over the batch's answer tokens, the KLs sums over slots
            of batch means: alpha and beta weigh a slot's nats against a token's.
        kl_schedule: "constant", "linear" (warm-up from 0 over ``kl_warmup_steps``) or
            "cyclical" (linear ramps repeating every ``kl_cycle_steps``, rising over the first
            ``kl_cycle_ratio`` of each cycle). It scales the KL that reaches the posterior:
            beta's term (amvl: the forward KL, the prior's target, always counts in full;
            elbo: its one KL).
        free_bits: lambda of free bits per slot, on the same term as the schedule: each
            slot's batch-mean KL counts as max(KL_k, lambda). 0 disables it.
        logvar_min, logvar_max: bounds of the heads' log-variance parameterisation.
        logvar_init: the heads' log-variance at initialisation (below 0 fights posterior
            collapse: early noise would otherwise teach the decoder to ignore z).
        slot_embeddings: add a learned vector per slot to the query slots' input embeddings
            (:class:`amvl.heads.SlotEmbeddings`), so that the K slots start apart instead of
            as near copies of one; it fixes ``num_slots`` once a model is built. Off by
            default: on the demo's puzzles it cost the ELBO 7-8 points in each of 3 seeds and
            moved AMVL by -7 to +7 (README, "Slot embeddings").
        inference: "mean" (z = mu_p) or "sample" (z ~ p, ``num_samples`` draws).
        num_samples: draws per example when ``inference == "sample"``.
        prefix_sharing: compute the query x once per step (needs the "amvl" attention).
        pair_weight_grads: in prefix-shared training steps, hand each large decoder linear
            weight one gradient for both passes, the latent pass's accumulated into the prefix
            pass's matrix product, instead of two that autograd adds (amvl/weight_grads.py).
            Less peak memory (the MLP weight gradients of a layer: 0.4 GB at Qwen2-7B's widths
            in bf16), at the cost of a Python autograd function's host time per use: off by
            default, since a step whose host cannot keep ahead of the GPU runs slower with it
            (benchmarks/RESULTS.md, the H200 run of 2026-11-28).
        kernel_backend: backend passed to amvl_kernels ops.
        *_token: special-token strings; added to the tokenizer when missing.
    """

    num_slots: int = 8
    latent_dim: int = 64
    objective: str = "amvl"
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.0
    kl_schedule: str = "constant"
    kl_warmup_steps: int = 0
    kl_cycle_steps: int = 1000
    kl_cycle_ratio: float = 0.5
    free_bits: float = 0.0
    logvar_min: float = -10.0
    logvar_max: float = 4.0
    logvar_init: float = 0.0
    slot_embeddings: bool = False
    inference: str = "mean"
    num_samples: int = 1
    prefix_sharing: bool = True
    pair_weight_grads: bool = False
    kernel_backend: str = "auto"
    latent_start_token: str = "<lat_start>"
    latent_end_token: str = "<lat_end>"
    latent_token: str = "<lat>"
    prior_query_token: str = "<lat_prior>"
    posterior_query_token: str = "<lat_post>"

    def __post_init__(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"AMVLConfig: {message}")

        check_types(self, integers={"num_slots": 1, "latent_dim": 1, "kl_warmup_steps": 0,
                                    "kl_cycle_steps": 2, "num_samples": 1},
                    reals=("alpha", "beta", "gamma", "free_bits", "kl_cycle_ratio",
                           "logvar_min", "logvar_max", "logvar_init"),
                    flags=("slot_embeddings", "prefix_sharing", "pair_weight_grads"))
        for name in ("latent_start_token", "latent_end_token", "latent_token",
                     "prior_query_token", "posterior_query_token"):
            require(isinstance(getattr(self, name), str) and getattr(self, name) != "",
                    f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        require(self.objective in OBJECTIVES,
                f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        require(self.kl_schedule in KL_SCHEDULES,
                f"kl_schedule must be one of {KL_SCHEDULES}, got {self.kl_schedule!r}")
        require(self.kernel_backend in BACKENDS,
                f"kernel_backend must be one of {BACKENDS}, got {self.kernel_backend!r}")
        require(self.inference in INFERENCE_MODES,
                f"inference must be one of {INFERENCE_MODES}, got {self.inference!r}")
        for name in ("alpha", "beta", "gamma", "free_bits"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        require(0 < self.kl_cycle_ratio <= 1, "kl_cycle_ratio must be in (0, 1]")
        if self.kl_warmup_steps and self.kl_schedule != "linear" \
                and self.objective in OBJECTIVE_SETTINGS["kl_warmup_steps"]:
            warnings.warn(f"AMVLConfig: kl_warmup_steps={self.kl_warmup_steps} has no effect "
                          f"with kl_schedule={self.kl_schedule!r}: only 'linear' warms up",
                          stacklevel=3)
        cycle = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                 if f.name in ("kl_cycle_steps", "kl_cycle_ratio")
                 and getattr(self, f.name) != f.default]
        if cycle and self.kl_schedule != "cyclical" \
                and self.objective in OBJECTIVE_SETTINGS["kl_cycle_steps"]:
            warnings.warn(f"AMVLConfig: {', '.join(cycle)} has no effect with kl_schedule="
                          f"{self.kl_schedule!r}: only 'cyclical' cycles", stacklevel=3)
        unused = [f.name for f in fields(self) if f.name in OBJECTIVE_SETTINGS
                  and self.objective not in OBJECTIVE_SETTINGS[f.name]
                  and getattr(self, f.name) != f.default]
        if unused:
            warnings.warn(f"AMVLConfig: {', '.join(unused)} set but unused by objective="
                          f"{self.objective!r}", stacklevel=3)
        require(self.logvar_min < self.logvar_init < self.logvar_max,
                "need logvar_min < logvar_init < logvar_max")
        require(-30 <= self.logvar_min and self.logvar_max <= 30,
                "log-variance bounds must lie in the kernels' safe range [-30, 30]")
        tokens = self.special_tokens()
        require(len(set(tokens)) == len(tokens), f"special tokens must differ, got {tokens}")
        object.__setattr__(self, "_checked", True)

    def __setattr__(self, name: str, value: object) -> None:
        """Assignments are checked as the constructor checks (the field keeps its value when
        the new one is refused); the fields a built model has consumed cannot change."""
        if not self.__dict__.get("_checked") or name not in _FIELD_NAMES:
            object.__setattr__(self, name, value)
            return
        if name in self.__dict__.get("_fixed", ()):
            raise AttributeError(
                f"AMVLConfig.{name} is fixed once an AMVLModel is built on this config (its "
                f"heads, slot embeddings, objective and special tokens were made from it; the "
                f"model would "
                f"diverge from its saved config): build a new model on "
                f"dataclasses.replace(config, {name}=...)")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            checked = replace(self, **{name: value})
        for warning in caught:  # those about this field; the others were given before
            if name in str(warning.message):
                warnings.warn(warning.message, stacklevel=2)
        object.__setattr__(self, name, getattr(checked, name))

    def fix_structure(self) -> None:
        """Make the fields a model consumes when it is built (latent_dim, objective, log-
        variance bounds and start, slot embeddings and, with them, num_slots, special tokens)
        unassignable: AMVLModel calls it."""
        fixed = STRUCTURE_FIELDS | {"num_slots"} if self.slot_embeddings else STRUCTURE_FIELDS
        object.__setattr__(self, "_fixed", fixed)

    def differences(self, other: AMVLConfig, ignore: frozenset[str] = frozenset()
                    ) -> list[str]:
        """The names of the fields whose values differ from ``other``'s, sorted, but those in
        ``ignore`` (e.g. :data:`INFERENCE_FIELDS`)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(name for name, value in mine.items()
                      if name not in ignore and theirs[name] != value)

    def special_tokens(self) -> list[str]:
        """The five special-token strings: latent start, latent end, latent slot, prior query,
        posterior query."""
        return [self.latent_start_token, self.latent_end_token, self.latent_token,
                self.prior_query_token, self.posterior_query_token]

    def to_dict(self) -> dict:
        """Every field by name, as :meth:`save` writes them."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AMVLConfig:
        """The config of a :meth:`to_dict` mapping (missing fields take their defaults).
        Raises ValueError on unknown keys, as on invalid values."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"AMVLConfig: unknown keys {unknown}")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        """Write ``amvl_config.json`` into ``directory`` (created if missing); return its
        path."""
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> AMVLConfig:
        """The config :meth:`save` wrote into ``directory``; FileNotFoundError when it has no
        ``amvl_config.json``."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        return cls.from_dict(json.loads(path.read_text()))


_FIELD_NAMES = frozenset(f.name for f in fields(AMVLConfig))
# Fields that only inference reads (AMVLModel.generate and the evaluation built on it): two
# configs that differ in nothing else train alike, and hold interchangeable weights.
INFERENCE_FIELDS = frozenset({"inference", "num_samples"})
# Fields that choose how the same model computes (the kernels' backend, the training path,
# the pairing of weight gradients): the weights do not depend on them either.
IMPLEMENTATION_FIELDS = frozenset({"kernel_backend", "prefix_sharing", "pair_weight_grads"})

# What AMVLModel makes from the config when it is built: the heads' sizes and log-variance
# parameterisation, the slot embeddings (whose rows also fix num_slots), the objective's
# class, the special tokens' ids.
STRUCTURE_FIELDS = frozenset({"latent_dim", "objective", "logvar_min", "logvar_max",
                              "logvar_init", "slot_embeddings", "latent_start_token",
                              "latent_end_token", "latent_token", "prior_query_token",
                              "posterior_query_token"})
