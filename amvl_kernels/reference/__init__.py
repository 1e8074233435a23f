"""Pure-PyTorch references of every op: the semantics the kernels are tested against, and the
CPU fallback (``backend="torch"``)."""

from amvl_kernels.reference.gaussian_kl import gaussian_kl, gaussian_sample_kl_torch
from amvl_kernels.reference.latent_attention import latent_attention_sdpa, latent_attention_torch

__all__ = ["gaussian_kl", "gaussian_sample_kl_torch", "latent_attention_sdpa",
           "latent_attention_torch"]
