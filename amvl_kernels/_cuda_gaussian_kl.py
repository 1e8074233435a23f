"""Launcher of the hand-written CUDA kernels of ``gaussian_sample_kl`` (``backend="cuda"``).

Imported lazily by :mod:`amvl_kernels.gaussian_kl`; ``forward`` and ``backward`` mirror
``_triton_forward`` / ``_triton_backward`` there: same arguments, same outputs, same dtypes.

The compiled module ``amvl_kernels._C`` takes raw pointers, strides in elements, dtype codes
and the current CUDA stream as ints (no torch C++ API), so it works with any torch version.
Inputs are viewed as (rows, d) with ``reshape(-1, d)`` exactly like the Triton launcher.

One deliberate difference from the Triton path, the noise: both draw four normals per
Philox4x32-10 call, but here the groups of four run along the row-major element index (the
Triton kernel groups four columns of one row) and Box-Muller is this file's own code. A seed is
deterministic on this backend and its backward regenerates the noise bitwise, but the same seed
gives different z on the Triton and CUDA backends.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from amvl_kernels.reference.gaussian_kl import compute_dtype

__all__ = ["forward", "backward"]

# Storage dtype codes shared with csrc/gaussian_kl.h (enum class DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _ext() -> ModuleType:
    from amvl_kernels import _C

    return _C


def _check_inputs(tensors: dict[str, Tensor | None]) -> torch.device:
    """All given tensors on one CUDA device, mu/logvar in a dtype the kernels store."""
    device = tensors["mu_q"].device
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {name} on {t.device}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but mu_q is on {device}")
        if name in ("mu_q", "logvar_q", "mu_p", "logvar_p") and t.dtype not in DTYPE_CODES:
            raise TypeError(f"backend='cuda' supports {sorted(map(str, DTYPE_CODES))}, "
                            f"got {name} of dtype {t.dtype}")
    return device


def _matrix(t: Tensor | None) -> tuple[int, int, int, int] | None:
    """(data_ptr, row stride, col stride, dtype code) of a (rows, d) view."""
    return None if t is None else (t.data_ptr(), t.stride(0), t.stride(1), DTYPE_CODES[t.dtype])


def _row_vector(t: Tensor | None) -> tuple[int, int] | None:
    return None if t is None else (t.data_ptr(), t.stride(0))


def _launch_kwargs(device: torch.device, on_host: bool) -> dict[str, int]:
    if on_host:
        return {}
    return {"device": device.index, "stream": torch.cuda.current_stream(device).cuda_stream}


def _prepare(mu_q, lv_q, mu_p, lv_p, eps):
    """(work dtype, inputs as (rows, d) views in it, eps view).

    The kernels compute in fp32, or fp64 when the inputs are fp64. fp64 noise with lower
    precision inputs asks for fp64 compute too (compute_dtype): those inputs are upcast here,
    which gives exactly what an fp64-accumulating kernel would, at the price of a copy.
    """
    d = mu_q.shape[-1]
    work = torch.float64 if compute_dtype(mu_q, eps) == torch.float64 else mu_q.dtype
    rows = [None if t is None else t.to(work).reshape(-1, d) for t in (mu_q, lv_q, mu_p, lv_p)]
    if eps is not None and eps.dtype not in DTYPE_CODES:
        eps = eps.float()  # exotic float noise (fp8, ...) is exact in fp32
    e = None if eps is None else eps.reshape(-1, d)
    return work, rows, e


def _forward(mu_q: Tensor, lv_q: Tensor, mu_p: Tensor | None, lv_p: Tensor | None,
             eps: Tensor | None, seed: int, *, ext: ModuleType, on_host: bool
             ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`forward` without the checks; ``on_host`` runs the kernels' host twin on CPU
    tensors (tests), ``ext`` is the compiled module to call."""
    device = mu_q.device
    d = mu_q.shape[-1]
    lead = mu_q.shape[:-1]
    with_kl = mu_p is not None
    work, (mq, lq, mp, lp), e = _prepare(mu_q, lv_q, mu_p, lv_p, eps)
    n_rows = mq.shape[0]
    kl_dtype = compute_dtype(mu_q, eps)
    z = torch.empty((n_rows, d), dtype=work, device=device)
    kl_fwd = torch.empty(lead if with_kl else (0,), dtype=kl_dtype, device=device)
    kl_rev = torch.empty(lead if with_kl else (0,), dtype=kl_dtype, device=device)
    if n_rows > 0:
        launch = ext.forward_host if on_host else ext.forward
        launch(dtype=DTYPE_CODES[work], rows=n_rows, d=d, seed=seed, mu_q=_matrix(mq),
               lv_q=_matrix(lq), mu_p=_matrix(mp), lv_p=_matrix(lp), eps=_matrix(e),
               z=z.data_ptr(), kl_fwd=kl_fwd.data_ptr() if with_kl else 0,
               kl_rev=kl_rev.data_ptr() if with_kl else 0, **_launch_kwargs(device, on_host))
    return z.to(mu_q.dtype).reshape(mu_q.shape), kl_fwd, kl_rev


def _backward(mu_q: Tensor, lv_q: Tensor, mu_p: Tensor | None, lv_p: Tensor | None,
              eps: Tensor | None, seed: int, grad_z: Tensor | None, grad_kl_fwd: Tensor | None,
              grad_kl_rev: Tensor | None, fwd_grad: str, rev_grad: str, need: list[bool], *,
              ext: ModuleType, on_host: bool) -> list[Tensor]:
    """:func:`backward` without the checks; ``ext`` and ``on_host`` as in :func:`_forward`."""
    device = mu_q.device
    d = mu_q.shape[-1]
    with_kl = mu_p is not None
    work, (mq, lq, mp, lp), e = _prepare(mu_q, lv_q, mu_p, lv_p, eps)
    n_rows = mq.shape[0]
    kl_dtype = compute_dtype(mu_q, eps)
    dz = None if grad_z is None else grad_z.to(work).reshape(-1, d)
    # Per-slot upstream gradients: (rows,) views in the KL dtype; a 0-d KL (1-D inputs) is 1 row.
    g_fwd, g_rev = (None if g is None or not with_kl else g.to(kl_dtype).reshape(-1)
                    for g in (grad_kl_fwd, grad_kl_rev))
    need = list(need[:2]) + [bool(n) and with_kl for n in need[2:]]
    grads = [torch.empty((n_rows, d), dtype=work, device=device) if n else None for n in need]
    if n_rows > 0 and any(need):
        launch = ext.backward_host if on_host else ext.backward
        ptrs = [0 if g is None else g.data_ptr() for g in grads]
        launch(dtype=DTYPE_CODES[work], rows=n_rows, d=d, seed=seed, mu_q=_matrix(mq),
               lv_q=_matrix(lq), mu_p=_matrix(mp), lv_p=_matrix(lp), eps=_matrix(e),
               grad_z=_matrix(dz), grad_kl_fwd=_row_vector(g_fwd),
               grad_kl_rev=_row_vector(g_rev), fwd_to_q=fwd_grad in ("q", "both"),
               fwd_to_p=fwd_grad in ("p", "both"), rev_to_q=rev_grad in ("q", "both"),
               rev_to_p=rev_grad in ("p", "both"), grad_mu_q=ptrs[0], grad_lv_q=ptrs[1],
               grad_mu_p=ptrs[2], grad_lv_p=ptrs[3], **_launch_kwargs(device, on_host))
    return [g.to(mu_q.dtype).reshape(mu_q.shape) for g in grads if g is not None]


def forward(mu_q: Tensor, lv_q: Tensor, mu_p: Tensor | None, lv_p: Tensor | None,
            eps: Tensor | None, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """z, KL(q||p), KL(p||q) on the GPU; ``mu_p``/``lv_p`` None means sampling only.

    Returns z in mu_q's dtype and shape, and the KLs of shape ``mu_q.shape[:-1]`` in float32
    (float64 for float64 inputs or noise), or of shape (0,) when sampling only. The noise comes
    from ``seed`` when ``eps`` is None.
    """
    _check_inputs({"mu_q": mu_q, "logvar_q": lv_q, "mu_p": mu_p, "logvar_p": lv_p, "eps": eps})
    return _forward(mu_q, lv_q, mu_p, lv_p, eps, seed, ext=_ext(), on_host=False)


def backward(mu_q: Tensor, lv_q: Tensor, mu_p: Tensor | None, lv_p: Tensor | None,
             eps: Tensor | None, seed: int, grad_z: Tensor | None, grad_kl_fwd: Tensor | None,
             grad_kl_rev: Tensor | None, fwd_grad: str, rev_grad: str, need: list[bool]
             ) -> list[Tensor]:
    """Gradients of the inputs flagged in ``need`` (mu_q, logvar_q, mu_p, logvar_p), in order.

    One elementwise pass: the noise is regenerated from ``seed``, KL(q||p) sends gradient to
    the sides ``fwd_grad`` names and KL(p||q) to those ``rev_grad`` names. Gradients are
    contiguous, in mu_q's dtype and shape.
    """
    _check_inputs({"mu_q": mu_q, "logvar_q": lv_q, "mu_p": mu_p, "logvar_p": lv_p, "eps": eps,
                   "grad_z": grad_z, "grad_kl_fwd": grad_kl_fwd, "grad_kl_rev": grad_kl_rev})
    return _backward(mu_q, lv_q, mu_p, lv_p, eps, seed, grad_z, grad_kl_fwd, grad_kl_rev,
                     fwd_grad, rev_grad, need, ext=_ext(), on_host=False)
