"""PyTorch reference of the Gaussian sampling + bidirectional KL op (DESIGN.md section 2).

Computes in float32 (float64 when any input is float64) like the kernels, and routes gradient
with ``detach`` exactly as the ``fwd_grad`` / ``rev_grad`` flags say.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROUTES = ("p", "q", "both", "none")


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise: the accumulation dtype."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def gaussian_kl(mu_a: Tensor, logvar_a: Tensor, mu_b: Tensor, logvar_b: Tensor) -> Tensor:
    """Per-slot KL(a||b) of diagonal Gaussians, summed over the last dim.

    The formula of DESIGN.md section 2 in the inputs' dtype: no upcast, no gradient routing.
    """
    kl = 0.5 * (logvar_b - logvar_a + torch.exp(logvar_a - logvar_b)
                + (mu_a - mu_b) ** 2 * torch.exp(-logvar_b) - 1)
    return kl.sum(-1)


def draw_noise(shape: torch.Size, seed: int, device: torch.device) -> Tensor:
    """Standard normal float32 noise from a private generator seeded with ``seed``.

    The stream is PyTorch's own, kept stable so that runs on the PyTorch backend reproduce
    across versions of this package. On the CPU that generator (a Mersenne Twister) takes the
    seed's low 32 bits: seeds equal modulo 2**32 draw the same noise there (the model layer's
    seeds are hashes, :func:`amvl.training.step_seed`, whose low bits differ). CUDA's
    generator takes all 64 bits.
    """
    if torch.compiler.is_compiling():  # the op, so torch.compile(fullgraph=True) traces it
        return torch.ops.amvl.seeded_normal(list(shape), seed, device)
    if device.type == "meta":  # shapes alone (a model traced on the meta device)
        return torch.empty(shape, dtype=torch.float32, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


@torch.library.custom_op("amvl::seeded_normal", mutates_args=())
def _seeded_normal(shape: list[int], seed: int, device: torch.device) -> Tensor:
    """:func:`draw_noise` as an op: a private generator is an object Dynamo cannot trace."""
    return draw_noise(torch.Size(shape), seed, device)


@_seeded_normal.register_fake
def _(shape, seed, device):
    return torch.empty(shape, dtype=torch.float32, device=device)


def _route(mu_q: Tensor, lv_q: Tensor, mu_p: Tensor, lv_p: Tensor, route: str
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Detach the side(s) that must not receive gradient from one KL term."""
    keep_q = route in ("q", "both")
    keep_p = route in ("p", "both")
    if not keep_q:
        mu_q, lv_q = mu_q.detach(), lv_q.detach()
    if not keep_p:
        mu_p, lv_p = mu_p.detach(), lv_p.detach()
    return mu_q, lv_q, mu_p, lv_p


def gaussian_sample_kl_torch(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor | None,
                             logvar_p: Tensor | None, eps: Tensor | None, seed: int,
                             fwd_grad: str = "p", rev_grad: str = "q"
                             ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Reference for :func:`amvl_kernels.gaussian_sample_kl` (inputs already validated).

    ``mu_p`` / ``logvar_p`` of None means sampling only; the KLs are then None. When ``eps`` is
    None the noise comes from a generator seeded with ``seed`` (see :func:`draw_noise`); its
    stream differs from the Triton and CUDA kernels' Philox streams. ``kl_fwd`` and ``kl_rev``
    are in :func:`compute_dtype` of the inputs: float32, or float64 when mu_q (and so every
    Gaussian input) or eps is float64.
    """
    dtype = compute_dtype(mu_q, logvar_q, mu_p, logvar_p, eps)
    mq, lq = mu_q.to(dtype), logvar_q.to(dtype)
    noise = draw_noise(mu_q.shape, seed, mu_q.device) if eps is None else eps.detach()
    z = (mq + torch.exp(0.5 * lq) * noise.to(dtype)).to(mu_q.dtype)
    if mu_p is None or logvar_p is None:
        return z, None, None
    mp, lp = mu_p.to(dtype), logvar_p.to(dtype)
    # KL(q||p) with its routing; KL(p||q) is the same formula with the roles swapped.
    kl_fwd = gaussian_kl(*_route(mq, lq, mp, lp, fwd_grad))
    rq, rlq, rp, rlp = _route(mq, lq, mp, lp, rev_grad)
    kl_rev = gaussian_kl(rp, rlp, rq, rlq)
    return z, kl_fwd, kl_rev
