"""Pure-PyTorch references of every op: the semantics the kernels are tested against, and the
CPU fallback (``backend="torch"``)."""

from amvl_kernels.reference.gaussian_kl import gaussian_kl, gaussian_sample_kl_torch

__all__ = ["gaussian_kl", "gaussian_sample_kl_torch"]
