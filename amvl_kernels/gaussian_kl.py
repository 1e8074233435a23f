"""Fused diagonal-Gaussian reparameterised sampling with forward and reverse KL.

One forward pass reads mu_q, logvar_q, mu_p, logvar_p (and eps only when given) and writes
z = mu_q + exp(logvar_q / 2) * eps plus the per-slot KL(q||p) and KL(p||q), summed over the
last dim in fp32. One backward pass regenerates the noise from the seed (eps is never stored)
and writes gradients only for the inputs the routing flags send gradient to.

Layout: every input is viewed as (rows, d) with its own strides, rows = slots. A program owns
BLOCK_R rows and loops over d in BLOCK_D chunks, so any d works, including d > 65536.

Numerics (documented contract, tested):
- Inputs are upcast to fp32 right after each load (fp64 stays fp64, for gradcheck); the KLs are
  returned in fp32 (fp64 when mu_q or eps is fp64), z and gradients in the inputs' dtype.
- Safe log-variance range: for log-variances in [-30, 30] (and |mu| up to 1e3) every output is
  finite in fp32 and bf16. In fp16, z and gradients are rounded to fp16, whose range ends at
  65504: exp(logvar/2) and exp(logvar_q - logvar_p) overflow it past about |logvar| > 10.
- NaN in an input propagates to the z elements and KL slots it touches; nothing hangs.
- Noise: Philox4x32-10 keyed by the seed, one call per group of four columns of a row (see
  ``_noise``), so the same seed gives bitwise identical z whatever the block sizes or strides.
  Box-Muller takes the hardware's approximate log, sine and cosine on a GPU (``_box_muller``):
  normals within about 3e-6 of the exact transform of the same Philox words.
  The PyTorch backend draws from torch's generator (on the CPU from the seed's low 32 bits,
  see ``reference.gaussian_kl.draw_noise``): same seed, same z within a backend, different
  streams across backends.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from amvl_kernels._autograd import first_order_only
from amvl_kernels._launch import MAX_GRID_Y, cdiv, next_power_of_2
from amvl_kernels._validation import check_choice, check_float_tensor, check_like, check_seed
from amvl_kernels.backends import resolve_backend, triton_interpreted
from amvl_kernels.reference.gaussian_kl import ROUTES, compute_dtype, gaussian_sample_kl_torch

__all__ = ["gaussian_sample_kl", "gaussian_sample"]


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _box_muller(u1, u2, FAST_MATH: tl.constexpr):
    """Two independent standard normals from two uniforms in [0, 1).

    With FAST_MATH (on a GPU) the log, sine and cosine are libdevice's fast variants, single
    hardware instructions with errors near 1e-6 (sin/cos on [-pi, pi], where the angle lies);
    the precise ones take about 50 (log) and 100 (sin, cos) instructions each and made the
    noise, not memory, the bound of the kernels. The interpreter cannot call libdevice, so it
    runs the precise functions: the same stream up to those last bits.
    """
    u1 = tl.maximum(u1, 1.0e-7)
    angle = 6.283185307179586 * u2 - 3.141592653589793
    if FAST_MATH:
        log_u1 = libdevice.fast_logf(u1)
        cos, sin = libdevice.fast_cosf(angle), libdevice.fast_sinf(angle)
    else:
        log_u1 = tl.log(u1)
        cos, sin = tl.cos(angle), tl.sin(angle)
    # An approximate log of a u1 within an ulp or two of 1 may come out positive: clamp, or
    # the square root would be NaN about once in ten million draws.
    radius = tl.sqrt(tl.maximum(-2.0 * log_u1, 0.0))
    return radius * cos, radius * sin


@triton.jit
def _noise(seed, rows, start, d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
           FAST_MATH: tl.constexpr):
    """Standard normals for columns start .. start + BLOCK_D of ``rows``.

    Each row is cut into groups of four columns, and group g of row r is one Philox4x32-10
    call with counter (r * ceil(d / 4) + g) and key seed; Box-Muller turns its four words into
    the four normals of columns 4g .. 4g + 3. The stream depends only on (seed, row, column),
    never on block sizes or strides, so the backward regenerates it bitwise. One call feeds
    four elements (tl.randn spends a whole call on one) and the 32-bit counter words keep
    Philox in 32-bit arithmetic whatever the tensor size.
    """
    groups = start // 4 + tl.arange(0, BLOCK_D // 4)
    counter = rows.to(tl.int64)[:, None] * tl.cdiv(d, 4) + groups[None, :]
    lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    hi = (counter >> 32).to(tl.uint32)
    zero = lo * 0
    w0, w1, w2, w3 = tl.philox(seed, lo, hi, zero, zero)
    n0, n1 = _box_muller(tl.uint_to_uniform_float(w0), tl.uint_to_uniform_float(w1), FAST_MATH)
    n2, n3 = _box_muller(tl.uint_to_uniform_float(w2), tl.uint_to_uniform_float(w3), FAST_MATH)
    # [R, G, 2, 2] with [r, g, i, j] = n_(2i + j), flattened row-major: column 4g + 2i + j.
    quads = tl.join(tl.join(n0, n2), tl.join(n1, n3))
    return tl.reshape(quads, [BLOCK_R, BLOCK_D])


@triton.jit
def _philox_key(seed, seed_ptr, SEED_IN_MEMORY: tl.constexpr):
    """The noise's key: the ``seed`` argument, or with SEED_IN_MEMORY the int64 at
    ``seed_ptr``, read on the device (a seed tensor: what a CUDA graph replays afresh)."""
    if SEED_IN_MEMORY:
        key = tl.load(seed_ptr)
    else:
        key = seed
    return key


@triton.jit(do_not_specialize=["seed"])
def _gaussian_kl_fwd_kernel(
    mu_q_ptr, lv_q_ptr, mu_p_ptr, lv_p_ptr, eps_ptr, z_ptr, kl_fwd_ptr, kl_rev_ptr,
    n_rows, d, seed, seed_ptr,
    s_mq_r, s_mq_c, s_lq_r, s_lq_c, s_mp_r, s_mp_c, s_lp_r, s_lp_c, s_e_r, s_e_c,
    HAS_EPS: tl.constexpr, WITH_KL: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, FAST_MATH: tl.constexpr,
    SEED_IN_MEMORY: tl.constexpr,
):
    key = _philox_key(seed, seed_ptr, SEED_IN_MEMORY)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    r64 = rows.to(tl.int64)[:, None]
    # Elementwise partial sums, reduced across the program's threads once after the loop: a
    # reduction per chunk would cost shuffles and a barrier every iteration.
    acc_fwd = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    acc_rev = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols[None, :] < d)
        c64 = cols.to(tl.int64)[None, :]
        mu_q = tl.load(mu_q_ptr + r64 * s_mq_r + c64 * s_mq_c, mask=mask, other=0.0).to(ACC)
        lv_q = tl.load(lv_q_ptr + r64 * s_lq_r + c64 * s_lq_c, mask=mask, other=0.0).to(ACC)
        if WITH_KL:
            # Loaded before the store of z: the compiler cannot move a load above a store it
            # cannot prove disjoint, and after it their latency would not overlap the noise.
            mu_p = tl.load(mu_p_ptr + r64 * s_mp_r + c64 * s_mp_c, mask=mask, other=0.0).to(ACC)
            lv_p = tl.load(lv_p_ptr + r64 * s_lp_r + c64 * s_lp_c, mask=mask, other=0.0).to(ACC)
        if HAS_EPS:
            eps = tl.load(eps_ptr + r64 * s_e_r + c64 * s_e_c, mask=mask, other=0.0).to(ACC)
        else:
            eps = _noise(key, rows, start, d, BLOCK_R, BLOCK_D, FAST_MATH).to(ACC)
        z = mu_q + tl.exp(0.5 * lv_q) * eps
        tl.store(z_ptr + r64 * d + c64, z.to(z_ptr.dtype.element_ty), mask=mask)
        if WITH_KL:
            diff2 = (mu_q - mu_p) * (mu_q - mu_p)
            # Masked lanes load zeros, for which both terms are exactly 0.
            kl_fwd = 0.5 * (lv_p - lv_q + tl.exp(lv_q - lv_p) + diff2 * tl.exp(-lv_p) - 1.0)
            kl_rev = 0.5 * (lv_q - lv_p + tl.exp(lv_p - lv_q) + diff2 * tl.exp(-lv_q) - 1.0)
            acc_fwd += kl_fwd
            acc_rev += kl_rev
    if WITH_KL:
        tl.store(kl_fwd_ptr + rows, tl.sum(acc_fwd, axis=1).to(kl_fwd_ptr.dtype.element_ty),
                 mask=row_ok)
        tl.store(kl_rev_ptr + rows, tl.sum(acc_rev, axis=1).to(kl_rev_ptr.dtype.element_ty),
                 mask=row_ok)


@triton.jit(do_not_specialize=["seed"])
def _gaussian_kl_bwd_kernel(
    mu_q_ptr, lv_q_ptr, mu_p_ptr, lv_p_ptr, eps_ptr,
    dz_ptr, dkl_fwd_ptr, dkl_rev_ptr,
    dmu_q_ptr, dlv_q_ptr, dmu_p_ptr, dlv_p_ptr,
    n_rows, d, seed, seed_ptr,
    s_mq_r, s_mq_c, s_lq_r, s_lq_c, s_mp_r, s_mp_c, s_lp_r, s_lp_c, s_e_r, s_e_c,
    s_dz_r, s_dz_c,
    HAS_EPS: tl.constexpr, HAS_DZ: tl.constexpr, HAS_DKL_FWD: tl.constexpr,
    HAS_DKL_REV: tl.constexpr,
    NEED_MU_Q: tl.constexpr, NEED_LV_Q: tl.constexpr, NEED_MU_P: tl.constexpr,
    NEED_LV_P: tl.constexpr,
    FWD_TO_Q: tl.constexpr, FWD_TO_P: tl.constexpr, REV_TO_Q: tl.constexpr,
    REV_TO_P: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, FAST_MATH: tl.constexpr,
    SEED_IN_MEMORY: tl.constexpr,
):
    key = _philox_key(seed, seed_ptr, SEED_IN_MEMORY)
    # Purely elementwise given the per-slot upstream gradients of the two KLs, so the column
    # chunks of a row go to programs of their own (grid axis 1) instead of one program's loop:
    # no serial chain of chunks, which bounds the latency of rows of a few thousand columns.
    # The loop only takes over where the chunks outnumber grid axis 1's 65,535 programs.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    r64 = rows.to(tl.int64)[:, None]
    g_fwd = tl.zeros([BLOCK_R, 1], dtype=ACC)
    g_rev = tl.zeros([BLOCK_R, 1], dtype=ACC)
    if HAS_DKL_FWD:
        g_fwd = tl.load(dkl_fwd_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    if HAS_DKL_REV:
        g_rev = tl.load(dkl_rev_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    for start in range(tl.program_id(1) * BLOCK_D, d, tl.num_programs(1) * BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols[None, :] < d)
        c64 = cols.to(tl.int64)[None, :]
        out = r64 * d + c64
        mu_q = tl.load(mu_q_ptr + r64 * s_mq_r + c64 * s_mq_c, mask=mask, other=0.0).to(ACC)
        lv_q = tl.load(lv_q_ptr + r64 * s_lq_r + c64 * s_lq_c, mask=mask, other=0.0).to(ACC)
        mu_p = tl.load(mu_p_ptr + r64 * s_mp_r + c64 * s_mp_c, mask=mask, other=0.0).to(ACC)
        lv_p = tl.load(lv_p_ptr + r64 * s_lp_r + c64 * s_lp_c, mask=mask, other=0.0).to(ACC)
        diff = mu_q - mu_p
        inv_var_p = tl.exp(-lv_p)
        inv_var_q = tl.exp(-lv_q)
        ratio_qp = tl.exp(lv_q - lv_p)
        ratio_pq = tl.exp(lv_p - lv_q)
        if NEED_MU_Q or NEED_LV_Q:
            g_mu_q = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
            g_lv_q = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
            if HAS_DZ:
                dz = tl.load(dz_ptr + r64 * s_dz_r + c64 * s_dz_c, mask=mask, other=0.0).to(ACC)
                if HAS_EPS:
                    eps = tl.load(eps_ptr + r64 * s_e_r + c64 * s_e_c, mask=mask,
                                  other=0.0).to(ACC)
                else:
                    eps = _noise(key, rows, start, d, BLOCK_R, BLOCK_D, FAST_MATH).to(ACC)
                g_mu_q += dz
                g_lv_q += dz * 0.5 * tl.exp(0.5 * lv_q) * eps
            if FWD_TO_Q:
                g_mu_q += g_fwd * diff * inv_var_p
                g_lv_q += g_fwd * 0.5 * (ratio_qp - 1.0)
            if REV_TO_Q:
                g_mu_q += g_rev * diff * inv_var_q
                g_lv_q += g_rev * 0.5 * (1.0 - ratio_pq - diff * diff * inv_var_q)
            if NEED_MU_Q:
                tl.store(dmu_q_ptr + out, g_mu_q.to(dmu_q_ptr.dtype.element_ty), mask=mask)
            if NEED_LV_Q:
                tl.store(dlv_q_ptr + out, g_lv_q.to(dlv_q_ptr.dtype.element_ty), mask=mask)
        if NEED_MU_P or NEED_LV_P:
            g_mu_p = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
            g_lv_p = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
            if FWD_TO_P:
                g_mu_p -= g_fwd * diff * inv_var_p
                g_lv_p += g_fwd * 0.5 * (1.0 - ratio_qp - diff * diff * inv_var_p)
            if REV_TO_P:
                g_mu_p -= g_rev * diff * inv_var_q
                g_lv_p += g_rev * 0.5 * (ratio_pq - 1.0)
            if NEED_MU_P:
                tl.store(dmu_p_ptr + out, g_mu_p.to(dmu_p_ptr.dtype.element_ty), mask=mask)
            if NEED_LV_P:
                tl.store(dlv_p_ptr + out, g_lv_p.to(dlv_p_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _rows(t: Tensor | None, d: int) -> Tensor | None:
    """View ``t`` as (rows, d) without copying when its strides allow it."""
    return None if t is None else t.reshape(-1, d)


def _strides(t: Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def _block_sizes(n_rows: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) of a program.

    On a GPU, 2048 elements and 8 warps a program (8 elements a thread), short rows sharing
    one: the kernels are memory bound, and compiled for sm_90 they hold every input, the noise
    and the intermediates of an element in registers. Measured on an H100 (bf16, forward and
    backward replayed from a CUDA graph) against the earlier 1024 elements (512 for d < 1024):
    19.7 us instead of 21.1 at 512 x 3584, the same within 0.5% at 4096 x 4096 and 65536 x 256;
    16 or 32 warps were slower at every shape. Sixteen elements a thread took 95-122 (forward)
    and 173-208 (backward) registers, too few warps to hide memory latency.
    The interpreter runs programs one after another with numpy, so there bigger is faster.
    """
    budget, num_warps = (16384, 4) if triton_interpreted() else (2048, 8)
    # At least one whole noise group of four columns.
    block_d = max(4, min(next_power_of_2(d), budget))
    block_r = max(1, min(next_power_of_2(n_rows), budget // block_d))
    return block_r, block_d, num_warps


def _acc_dtype(*tensors: Tensor | None) -> tl.dtype:
    return tl.float64 if compute_dtype(*tensors) == torch.float64 else tl.float32


def _fast_math() -> bool:
    """Whether the noise may use libdevice's approximate log, sine and cosine: on NVIDIA GPUs
    only. The interpreter cannot call libdevice, and ROCm's has no ``fast_`` functions."""
    return not triton_interpreted() and torch.version.hip is None


def _seed_arguments(seed: int | Tensor, placeholder: Tensor) -> tuple[int, Tensor, bool]:
    """(seed, seed_ptr, SEED_IN_MEMORY) of the kernels for an int seed or a seed tensor."""
    if isinstance(seed, Tensor):
        return 0, seed, True
    return seed, placeholder, False


def _triton_forward(mu_q: Tensor, lv_q: Tensor, mu_p: Tensor | None, lv_p: Tensor | None,
                    eps: Tensor | None, seed: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    d = mu_q.shape[-1]
    lead = mu_q.shape[:-1]
    mq, lq, mp, lp, e = (_rows(t, d) for t in (mu_q, lv_q, mu_p, lv_p, eps))
    n_rows = mq.shape[0]
    with_kl = mp is not None
    kl_dtype = compute_dtype(mu_q, eps)
    z = torch.empty(mu_q.shape, dtype=mu_q.dtype, device=mu_q.device)
    kl_shape = lead if with_kl else (0,)
    kl_fwd = torch.empty(kl_shape, dtype=kl_dtype, device=mu_q.device)
    kl_rev = torch.empty(kl_shape, dtype=kl_dtype, device=mu_q.device)
    block_r, block_d, num_warps = _block_sizes(n_rows, d)
    grid = (cdiv(n_rows, block_r),)
    seed, seed_ptr, seed_in_memory = _seed_arguments(seed, mq)
    # Absent inputs are passed as mu_q: never read, but triton needs a pointer.
    _gaussian_kl_fwd_kernel[grid](
        mq, lq, mp if with_kl else mq, lp if with_kl else mq, e if e is not None else mq,
        z, kl_fwd, kl_rev, n_rows, d, seed, seed_ptr,
        *_strides(mq), *_strides(lq), *_strides(mp), *_strides(lp), *_strides(e),
        HAS_EPS=e is not None, WITH_KL=with_kl, ACC=_acc_dtype(mu_q, eps),
        BLOCK_R=block_r, BLOCK_D=block_d, FAST_MATH=_fast_math(),
        SEED_IN_MEMORY=seed_in_memory, num_warps=num_warps,
    )
    return z, kl_fwd, kl_rev


def _triton_backward(mu_q: Tensor, lv_q: Tensor, mu_p: Tensor | None, lv_p: Tensor | None,
                     eps: Tensor | None, seed: int | Tensor, grad_z: Tensor | None,
                     grad_kl_fwd: Tensor | None, grad_kl_rev: Tensor | None,
                     fwd_grad: str, rev_grad: str, need: list[bool]) -> list[Tensor]:
    d = mu_q.shape[-1]
    mq, lq, mp, lp, e, dz = (_rows(t, d) for t in (mu_q, lv_q, mu_p, lv_p, eps, grad_z))
    n_rows = mq.shape[0]
    with_kl = mp is not None
    # Absent KL tensors (sampling only) are passed as mu_q, never read.
    mp, lp = (mp, lp) if with_kl else (mq, mq)
    grads = [torch.empty(mu_q.shape, dtype=mu_q.dtype, device=mu_q.device) if n else None
             for n in need]
    placeholder = mq
    has_fwd, has_rev = with_kl and grad_kl_fwd is not None, with_kl and grad_kl_rev is not None
    block_r, block_d, num_warps = _block_sizes(n_rows, d)
    grid = (cdiv(n_rows, block_r), min(cdiv(d, block_d), MAX_GRID_Y))
    seed, seed_ptr, seed_in_memory = _seed_arguments(seed, placeholder)
    _gaussian_kl_bwd_kernel[grid](
        mq, lq, mp, lp, e if e is not None else placeholder,
        dz if dz is not None else placeholder,
        grad_kl_fwd.contiguous() if grad_kl_fwd is not None else placeholder,
        grad_kl_rev.contiguous() if grad_kl_rev is not None else placeholder,
        *(g if g is not None else placeholder for g in grads),
        n_rows, d, seed, seed_ptr,
        *_strides(mq), *_strides(lq), *_strides(mp), *_strides(lp), *_strides(e),
        *_strides(dz),
        HAS_EPS=e is not None, HAS_DZ=dz is not None,
        HAS_DKL_FWD=has_fwd, HAS_DKL_REV=has_rev,
        NEED_MU_Q=need[0], NEED_LV_Q=need[1], NEED_MU_P=need[2], NEED_LV_P=need[3],
        # A KL without upstream gradient adds nothing: skipping it (rather than adding 0 * term)
        # keeps an overflowing term from turning the gradient into NaN.
        FWD_TO_Q=has_fwd and fwd_grad in ("q", "both"),
        FWD_TO_P=has_fwd and fwd_grad in ("p", "both"),
        REV_TO_Q=has_rev and rev_grad in ("q", "both"),
        REV_TO_P=has_rev and rev_grad in ("p", "both"),
        ACC=_acc_dtype(mu_q, eps), BLOCK_R=block_r, BLOCK_D=block_d,
        FAST_MATH=_fast_math(), SEED_IN_MEMORY=seed_in_memory, num_warps=num_warps,
    )
    return [g for g in grads if g is not None]


def _host_seed(seed: int | Tensor, backend: str) -> int:
    """``seed`` as an int, for the backends that take their key by value (the CUDA extension,
    the PyTorch path): a seed tensor is read back to the host, which a CUDA graph being
    captured cannot do."""
    if not isinstance(seed, Tensor):
        return seed
    if seed.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"backend={backend!r} reads a seed tensor on the host, which a CUDA "
                           "graph being captured cannot do: use backend='triton', whose "
                           "kernels read it on the device at each replay")
    return int(seed.item())


def _cuda_forward(mu_q, lv_q, mu_p, lv_p, eps, seed):
    from amvl_kernels import _cuda_gaussian_kl

    return _cuda_gaussian_kl.forward(mu_q, lv_q, mu_p, lv_p, eps, _host_seed(seed, "cuda"))


def _cuda_backward(mu_q, lv_q, mu_p, lv_p, eps, seed, *rest):
    from amvl_kernels import _cuda_gaussian_kl

    return _cuda_gaussian_kl.backward(mu_q, lv_q, mu_p, lv_p, eps, _host_seed(seed, "cuda"),
                                      *rest)


def _launch_forward(mu_q, logvar_q, mu_p, logvar_p, eps, seed, backend, seed_tensor=None):
    forward = _cuda_forward if backend == "cuda" else _triton_forward
    return forward(mu_q, logvar_q, mu_p, logvar_p, eps,
                   seed if seed_tensor is None else seed_tensor)


def _launch_backward(mu_q, logvar_q, mu_p, logvar_p, eps, seed, grad_z, grad_kl_fwd,
                     grad_kl_rev, fwd_grad, rev_grad, need, backend, seed_tensor=None):
    backward = _cuda_backward if backend == "cuda" else _triton_backward
    return backward(mu_q, logvar_q, mu_p, logvar_p, eps,
                    seed if seed_tensor is None else seed_tensor, grad_z, grad_kl_fwd,
                    grad_kl_rev, fwd_grad, rev_grad, need)


# ----------------------------------------------------------------------------- autograd
#
# Two doors to the same launchers. torch.compile traces the custom op (opaque to dynamo, with a
# fake implementation). Eager calls take a plain autograd.Function: the custom op's dispatcher
# round trips cost about 180 us of host time per forward+backward on our CPUs, more than
# the GPU time of the whole op at many sizes. Both share the context and the routing below.


@torch.library.custom_op("amvl::gaussian_sample_kl", mutates_args=())
def _gaussian_sample_kl_op(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor | None,
                           logvar_p: Tensor | None, eps: Tensor | None, seed: int,
                           fwd_grad: str, rev_grad: str, backend: str,
                           seed_tensor: Tensor | None = None
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """``seed_tensor``, when given, replaces ``seed``: a one-element int64 tensor on the
    inputs' device."""
    return _launch_forward(mu_q, logvar_q, mu_p, logvar_p, eps, seed, backend, seed_tensor)


@_gaussian_sample_kl_op.register_fake
def _(mu_q, logvar_q, mu_p, logvar_p, eps, seed, fwd_grad, rev_grad, backend,
      seed_tensor=None):
    kl_shape = mu_q.shape[:-1] if mu_p is not None else (0,)
    kl_dtype = compute_dtype(mu_q, eps)
    return (torch.empty(mu_q.shape, dtype=mu_q.dtype, device=mu_q.device),
            mu_q.new_empty(kl_shape, dtype=kl_dtype), mu_q.new_empty(kl_shape, dtype=kl_dtype))


@torch.library.custom_op("amvl::gaussian_sample_kl_backward", mutates_args=())
def _gaussian_sample_kl_backward_op(
    mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor | None, logvar_p: Tensor | None,
    eps: Tensor | None, seed: int, grad_z: Tensor | None, grad_kl_fwd: Tensor | None,
    grad_kl_rev: Tensor | None, fwd_grad: str, rev_grad: str, need: list[bool], backend: str,
    seed_tensor: Tensor | None = None,
) -> list[Tensor]:
    """Gradients of the inputs flagged in ``need`` (mu_q, logvar_q, mu_p, logvar_p), in order."""
    return _launch_backward(mu_q, logvar_q, mu_p, logvar_p, eps, seed, grad_z, grad_kl_fwd,
                            grad_kl_rev, fwd_grad, rev_grad, need, backend, seed_tensor)


@_gaussian_sample_kl_backward_op.register_fake
def _(mu_q, logvar_q, mu_p, logvar_p, eps, seed, grad_z, grad_kl_fwd, grad_kl_rev, fwd_grad,
      rev_grad, need, backend, seed_tensor=None):
    return [torch.empty(mu_q.shape, dtype=mu_q.dtype, device=mu_q.device) for n in need if n]


def _setup_context(ctx, inputs, output):
    mu_q, logvar_q, mu_p, logvar_p, eps, seed, fwd_grad, rev_grad, backend, seed_tensor = inputs
    ctx.save_for_backward(mu_q, logvar_q, mu_p, logvar_p, eps, seed_tensor)
    ctx.seed, ctx.fwd_grad, ctx.rev_grad, ctx.backend = seed, fwd_grad, rev_grad, backend
    # Unused outputs then arrive as None, not zeros: their terms are skipped, not multiplied.
    ctx.set_materialize_grads(False)
    # An output whose routes reach no input that requires grad has no gradient, as on the
    # PyTorch path: z without q's, a KL whose flag names only sides that are frozen (or
    # "none"). Otherwise .backward() through it would run and silently change nothing.
    trains_q = any(t is not None and t.requires_grad for t in (mu_q, logvar_q))
    trains_p = any(t is not None and t.requires_grad for t in (mu_p, logvar_p))

    def reaches(route: str) -> bool:
        return (trains_q and route in ("q", "both")) or (trains_p and route in ("p", "both"))
    z, kl_fwd, kl_rev = output
    frozen = [t for t, live in ((z, trains_q), (kl_fwd, reaches(fwd_grad)),
                                (kl_rev, reaches(rev_grad))) if not live]
    if frozen:
        ctx.mark_non_differentiable(*frozen)


def _input_grads(ctx, grad_z, grad_kl_fwd, grad_kl_rev, launch_backward):
    mu_q, logvar_q, mu_p, logvar_p, eps, seed_tensor = ctx.saved_tensors
    grad_z, grad_kl_fwd, grad_kl_rev = map(_resolved, (grad_z, grad_kl_fwd, grad_kl_rev))
    with_kl = mu_p is not None
    if not with_kl:
        grad_kl_fwd = grad_kl_rev = None
    # An input gets a gradient only if autograd wants one and some used output routes to it:
    # z feeds q; each KL feeds the sides its flag names.
    q_routed = grad_z is not None \
        or (grad_kl_fwd is not None and ctx.fwd_grad in ("q", "both")) \
        or (grad_kl_rev is not None and ctx.rev_grad in ("q", "both"))
    p_routed = (grad_kl_fwd is not None and ctx.fwd_grad in ("p", "both")) \
        or (grad_kl_rev is not None and ctx.rev_grad in ("p", "both"))
    need = [ctx.needs_input_grad[0] and q_routed, ctx.needs_input_grad[1] and q_routed,
            ctx.needs_input_grad[2] and p_routed, ctx.needs_input_grad[3] and p_routed]
    grads: list[Tensor | None] = [None] * 4
    if any(need):
        computed = iter(launch_backward(
            mu_q, logvar_q, mu_p, logvar_p, eps, ctx.seed, grad_z, grad_kl_fwd, grad_kl_rev,
            ctx.fwd_grad, ctx.rev_grad, need, ctx.backend, seed_tensor))
        grads = [next(computed) if n else None for n in need]
    # eps is noise: it receives no gradient, nor do the seeds and the non-tensor arguments.
    return (*grads, None, None, None, None, None, None)


def _op_backward(ctx, grad_z, grad_kl_fwd, grad_kl_rev):
    return _input_grads(ctx, grad_z, grad_kl_fwd, grad_kl_rev,
                        torch.ops.amvl.gaussian_sample_kl_backward)


_gaussian_sample_kl_op.register_autograd(_op_backward, setup_context=_setup_context)


class _GaussianSampleKLFunction(torch.autograd.Function):
    """The eager door: the custom op's forward and backward without the dispatcher."""

    @staticmethod
    def forward(ctx, mu_q, logvar_q, mu_p, logvar_p, eps, seed, fwd_grad, rev_grad, backend,
                seed_tensor):
        output = _launch_forward(mu_q, logvar_q, mu_p, logvar_p, eps, seed, backend,
                                 seed_tensor)
        _setup_context(ctx, (mu_q, logvar_q, mu_p, logvar_p, eps, seed, fwd_grad, rev_grad,
                             backend, seed_tensor), output)
        return output

    @staticmethod
    @first_order_only("gaussian_sample_kl", "backend='torch' computes gradients that can be")
    def backward(ctx, grad_z, grad_kl_fwd, grad_kl_rev):
        return _input_grads(ctx, grad_z, grad_kl_fwd, grad_kl_rev, _launch_backward)


# ----------------------------------------------------------------------------- public API


def _draw_seed(like: Tensor, backend: str) -> int | Tensor:
    """A fresh seed from torch's generator. For the Triton kernels a one-element tensor drawn
    on the inputs' device, which the kernels read there: no host sync, and inside a CUDA
    graph each replay draws anew (torch's generators are graph-safe), where an int drawn on
    the host would be captured once and replayed forever.
    The other backends take an int, which a CUDA graph cannot draw afresh: refused there."""
    if backend == "triton":
        return torch.randint(0, 2**62, (1,), device=like.device)
    if like.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"seed=None under CUDA graph capture on backend={backend!r} would "
                           "replay the noise of one host-drawn seed forever: use "
                           "backend='triton', or pass a seed tensor it reads at each replay")
    return int(torch.randint(0, 2**62, (1,), device="cpu").item())


def _check_seed_tensor(seed: Tensor, like: Tensor) -> None:
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"a seed tensor must hold one int64, got dtype {seed.dtype} and shape "
                         f"{tuple(seed.shape)}")
    if seed.device != like.device:
        raise ValueError(f"a seed tensor must be on the inputs' device ({like.device}), got "
                         f"{seed.device}")


def _validate(mu_q, logvar_q, mu_p, logvar_p, eps, seed, fwd_grad, rev_grad):
    check_float_tensor("mu_q", mu_q)
    if mu_q.dim() == 0:
        raise ValueError("mu_q must have at least one dimension (..., d), got a 0-d tensor")
    check_float_tensor("logvar_q", logvar_q)
    check_like("logvar_q", logvar_q, "mu_q", mu_q)
    for name, t in (("mu_p", mu_p), ("logvar_p", logvar_p)):
        if t is not None:
            check_float_tensor(name, t)
            check_like(name, t, "mu_q", mu_q)
    if eps is not None:
        check_float_tensor("eps", eps)
        check_like("eps", eps, "mu_q", mu_q, same_dtype=False)
    if isinstance(seed, Tensor):
        _check_seed_tensor(seed, mu_q)
    else:
        check_seed(seed)
    check_choice("fwd_grad", fwd_grad, ROUTES)
    check_choice("rev_grad", rev_grad, ROUTES)


def _resolved(t: Tensor | None) -> Tensor | None:
    """``t`` with a pending negation applied: ``x.conj().imag`` is a view whose memory holds
    the values without their sign, which kernels reading raw pointers would take as they are."""
    return None if t is None else t.resolve_neg()


def _run(mu_q, logvar_q, mu_p, logvar_p, eps, seed, fwd_grad, rev_grad, backend):
    mu_q, logvar_q, mu_p, logvar_p, eps = map(_resolved, (mu_q, logvar_q, mu_p, logvar_p, eps))
    backend = resolve_backend(backend, mu_q.device, has_cuda_kernel=True)
    if eps is not None or mu_q.numel() == 0:
        seed = 0  # unused: no noise is drawn
    elif seed is None:
        seed = _draw_seed(mu_q, backend)
    seed_tensor = seed if isinstance(seed, Tensor) else None
    seed = 0 if seed_tensor is not None else int(seed)  # a NumPy integer too (_validate)
    if backend == "torch" or mu_q.numel() == 0:
        # Empty inputs give empty outputs (or zero KLs when d == 0) without a launch.
        seed = seed if seed_tensor is None else _host_seed(seed_tensor, backend)
        return gaussian_sample_kl_torch(mu_q, logvar_q, mu_p, logvar_p, eps, seed,
                                        fwd_grad, rev_grad)
    if torch.compiler.is_compiling():
        return torch.ops.amvl.gaussian_sample_kl(mu_q, logvar_q, mu_p, logvar_p, eps, seed,
                                                 fwd_grad, rev_grad, backend, seed_tensor)
    return _GaussianSampleKLFunction.apply(mu_q, logvar_q, mu_p, logvar_p, eps, seed,
                                           fwd_grad, rev_grad, backend, seed_tensor)


def gaussian_sample_kl(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor,
                       eps: Tensor | None = None, seed: int | Tensor | None = None,
                       fwd_grad: str = "p", rev_grad: str = "q", backend: str = "auto"
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Sample z ~ q by reparameterisation and return the per-slot KL(q||p) and KL(p||q).

    Args:
        mu_q, logvar_q: posterior mean and log-variance, (..., d), any float dtype.
        mu_p, logvar_p: prior mean and log-variance, same shape, dtype and device.
        eps: explicit standard-normal noise of the same shape (any float dtype), or None to draw
            it in the kernel from ``seed``. eps receives no gradient.
        seed: int in [0, 2**63), or a one-element int64 tensor on the inputs' device (its
            64 bits the key as they are), which the Triton kernels read on the device: what a
            CUDA graph (or torch.compile's "reduce-overhead") needs to draw new noise at each
            replay: an int seed is a constant or a symbolic int of a compiled graph, and CUDA
            graphs record anew for each value. The CUDA and PyTorch backends read it to the
            host. None draws a fresh seed from torch's
            generator (on the inputs' device for the Triton kernels, so graph replays draw
            anew; captured elsewhere it is refused). Ignored when ``eps`` is given. The same
            seed, int or tensor, gives bitwise-identical z on one backend. The PyTorch backend
            on the CPU draws from PyTorch's CPU generator, which reads the seed's low 32 bits
            only: there seeds equal modulo 2**32 give the same z.
        fwd_grad: which side KL(q||p) sends gradient to: "p" (AMVL's prior update, default),
            "q", "both" (the ELBO) or "none".
        rev_grad: which side KL(p||q) sends gradient to: "q" (default), "p", "both" or "none".
        backend: "auto", "triton", "cuda" or "torch" (see :func:`resolve_backend`).

    Returns:
        z of shape (..., d) in mu_q's dtype (its gradient always flows to mu_q and logvar_q),
        and kl_fwd, kl_rev of shape (...) in float32, or in float64 when mu_q (and so
        logvar_q, mu_p and logvar_p, which share its dtype) or eps is float64: the dtype the
        kernels accumulate in. Half-precision inputs still give float32 KLs.

    Safe range: finite for log-variances in [-30, 30] in fp32 and bf16. In fp16 the
    gradients, written in the inputs' dtype, reach diff * exp(-logvar) and
    diff^2 * exp(-logvar) / 2, past fp16's 65,504 already at logvar = -10 with the means 3
    apart, and z overflows past logvar of about 20: give fp16 models' heads fp32 outputs (as
    ``amvl``'s heads do). NaN inputs propagate to the affected outputs.
    """
    _validate(mu_q, logvar_q, mu_p, logvar_p, eps, seed, fwd_grad, rev_grad)
    if mu_p is None or logvar_p is None:
        raise TypeError("mu_p and logvar_p must be tensors; use gaussian_sample for sampling only")
    return _run(mu_q, logvar_q, mu_p, logvar_p, eps, seed, fwd_grad, rev_grad, backend)


def gaussian_sample(mu: Tensor, logvar: Tensor, eps: Tensor | None = None,
                    seed: int | Tensor | None = None, backend: str = "auto") -> Tensor:
    """Reparameterised sample z = mu + exp(logvar / 2) * eps, e.g. from the prior.

    Same conventions as :func:`gaussian_sample_kl`: z in mu's dtype, noise drawn in the kernel
    from ``seed`` when ``eps`` is None, gradient to mu and logvar.
    """
    try:
        _validate(mu, logvar, None, None, eps, seed, "p", "q")
    except (TypeError, ValueError) as err:  # name the arguments as the caller wrote them
        raise type(err)(str(err).replace("mu_q", "mu").replace("logvar_q", "logvar")) from None
    z, _, _ = _run(mu, logvar, None, None, eps, seed, "none", "none", backend)
    return z
