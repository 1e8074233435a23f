"""amvl_kernels: fused kernels for continuous latent reasoning (AMVL, arXiv 2607.00461).

Depends only on torch and triton; never imports the ``amvl`` model layer.

    import amvl_kernels as ak
    z, kl_fwd, kl_rev = ak.gaussian_sample_kl(mu_q, logvar_q, mu_p, logvar_p)
    z = ak.gaussian_sample(mu, logvar)
    layout = ak.LatentLayout.with_latent_blocks(length, [[(start, size)]])
    out = ak.latent_attention(q, k, v, layout)
"""

from amvl_kernels.backends import (
    BACKENDS,
    cuda_extension_available,
    resolve_backend,
    triton_interpreted,
)
from amvl_kernels.gaussian_kl import gaussian_sample, gaussian_sample_kl
from amvl_kernels.latent_attention import latent_attention
from amvl_kernels.layout import Kind, LatentLayout, TileMap

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "Kind",
    "LatentLayout",
    "TileMap",
    "cuda_extension_available",
    "gaussian_sample",
    "gaussian_sample_kl",
    "latent_attention",
    "resolve_backend",
    "triton_interpreted",
]
