"""Latent-block attention: flash attention with the segment mask of DESIGN.md section 3.

Kernels, launchers and autograd in one file:

- ``_attention_fwd``: online softmax over the key tiles of one query tile; stores the output
  and the log-sum-exp (base 2) of every query row.
- ``_attention_bwd_dkdv``: one key tile per program, looping over the query heads of its KV
  group and over the query tiles; dk and dv are reduced over the group in registers (no
  atomics), and each tile is computed transposed (keys along axis 0).
- ``_attention_bwd_dq``: one query tile per program, looping over the key tiles.

The backward computes dq one of two ways (:func:`_dq_by_atomics`): by the dq kernel, which
recomputes each tile's scores (7 tile matmuls per tile pair in all, deterministic), or inside
the dk/dv kernel, which adds each tile's dq into an fp32 buffer with atomics (5 matmuls, as
FlashAttention-2 does; the order of the additions varies from run to run).

Every kernel walks only the tiles that the layout's :class:`~amvl_kernels.layout.TileMap`
marks non-empty, in two branch-free loops over index lists (FULL tiles without mask
arithmetic, then PARTIAL tiles with the rule), so the compiler can pipeline the tile loads.
Without a layout the kernels are plain causal attention, the diagonal tiles being the partial
ones. Queries are the last Lq of the Lk keys (a KV cache), Lq = 1 included; short query blocks
(decoding) take the split-KV forward of ``latent_attention_decode`` instead of
``_attention_fwd``. The shared jit helpers live in ``_attention_tiles``.

Registered as the custom ops ``amvl::latent_attention`` and ``amvl::latent_attention_backward``
so ``torch.compile`` traces through them.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from amvl_kernels._attention_tiles import (read_metadata, softmax_result, softmax_tile,
                                          tile_dot, tile_scores)
from amvl_kernels._autograd import first_order_only
from amvl_kernels._launch import MAX_GRID_Y, cdiv, next_power_of_2
from amvl_kernels._mask_rule import mask_rule
from amvl_kernels._validation import check_float_tensor
from amvl_kernels.backends import resolve_backend, triton_interpreted
from amvl_kernels.latent_attention_decode import decode_forward, uses_decode
from amvl_kernels.layout import LatentLayout
from amvl_kernels.reference.latent_attention import grouped_heads, latent_attention_sdpa

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ATTENTION_DTYPES = (*TRITON_DTYPES, torch.float64)  # float64: the torch backend
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
# Under backend="auto", at least this many leading plain causal rows (x in the prefix-sharing
# layout) go to SDPA's causal kernel, cuDNN's on an H100 or H200: a forward alone (prefill)
# from 256 rows, where the split ran the attention benchmark's forward 1.18-1.24x faster at 4k
# and 16k tokens (H100); a forward that autograd will differentiate from 2,048 rows. With the
# backward, the split as one autograd node (_causal_split) ran the benchmark's forward+backward
# 3-10% faster at about 3,000 rows and 11-13% at 12,288 (H200, RESULTS.md run 6); in the 7B
# proxy's training step, 1,536 of 1,632 rows, it took 0.6 ms off the kernels and nothing
# measurable off the step, whose time is its host's there, and costs a host sync per layout
# (counting the rows) and one attention output of x's rows in memory.
CAUSAL_ROWS_TO_SDPA = 256
CAUSAL_ROWS_TO_SDPA_WITH_GRAD = 2048
# Under backend="auto", a call of at most this many queries over a KV cache with a layout (the
# latent pass's tail of a training step: 82 tokens a row on the 7B proxy) runs on SDPA with
# the layout's dense mask, built once per layout: two C++ operators a layer instead of our
# launchers' Python and four Triton launches, in the stretch of the step where the device
# waits for the host (RESULTS.md, run 6). 0, off, until a GPU times it
# (scripts/profile_model_step.py's "shared_amvl:short_sdpa").
SHORT_QUERIES_TO_SDPA = 0


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _row_tiles(pid_m, b, LQ, LK, N_M, N_N, ROW_FULL_COUNT, ROW_PARTIAL_COUNT,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LAYOUT: tl.constexpr):
    """(number of FULL key tiles, number of PARTIAL key tiles, list offset) of query tile
    pid_m. Without a layout: causal, the key tiles wholly at or before the tile's first query
    are full, the rest up to its last query partial."""
    if HAS_LAYOUT:
        tile_row = b.to(tl.int64) * N_M + pid_m
        n_full = tl.load(ROW_FULL_COUNT + tile_row)
        n_partial = tl.load(ROW_PARTIAL_COUNT + tile_row)
        base = tile_row * N_N
    else:
        first_query = LK - LQ + pid_m * BLOCK_M
        n_full = (first_query + 1) // BLOCK_N
        n_end = tl.cdiv(tl.minimum(first_query + BLOCK_M, LK), BLOCK_N)
        n_partial = n_end - n_full
        base = pid_m.to(tl.int64) * 0
    return n_full, n_partial, base


@triton.jit
def _query_tile(HQ, GROUP, LQ, LK, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr, TILES_FASTEST: tl.constexpr):
    """Where a program of the forward or dq kernel stands: grid (query tiles, B * Hq), or
    (B * Hq, query tiles) without TILES_FASTEST (see :func:`_tiles_fastest`).

    Returns pid_m, the batch row b, query head h and its KV head hk, the query offsets and
    absolute positions, the row and head-dim masks, the row's offset in the metadata and the
    (b, h) offset in the per-row statistics (lse, delta).
    """
    # A head's last query tiles first: under a causal mask they see the most keys, and the
    # GPU dispatches programs roughly in the order of their linear index (axis 0 fastest).
    if TILES_FASTEST:
        pid_bh = tl.program_id(1)
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_bh = tl.program_id(0)
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return (pid_m, b, h, h // GROUP, offs_m, offs_d, LK - LQ + offs_m, offs_m < LQ,
            offs_d < HEAD_DIM, b.to(tl.int64) * LK, pid_bh.to(tl.int64) * LQ)


@triton.jit
def _attention_fwd(
    Q, K, V, O, LSE, KIND, VIS, BLK, DOC,
    ROW_FULL, ROW_FULL_COUNT, ROW_PARTIAL, ROW_PARTIAL_COUNT,
    scale_log2,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    HQ, GROUP, LQ, LK, N_M, N_N,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_LAYOUT: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, TILES_FASTEST: tl.constexpr,
):
    pid_m, b, h, hk, offs_m, offs_d, pos_i, row_ok, d_ok, meta_row, stat_row = _query_tile(
        HQ, GROUP, LQ, LK, HEAD_DIM, BLOCK_M, BLOCK_D, TILES_FASTEST)

    q = tl.load(Q + b.to(tl.int64) * s_qb + h * s_qh + offs_m[:, None] * s_qm
                + offs_d[None, :] * s_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * s_kb + hk * s_kh
    v_base = V + b.to(tl.int64) * s_vb + hk * s_vh
    vis_i, blk_i, doc_i = read_metadata(VIS, BLK, DOC, meta_row, pos_i, row_ok, HAS_LAYOUT)
    n_full, n_partial, base = _row_tiles(pid_m, b, LQ, LK, N_M, N_N, ROW_FULL_COUNT,
                                         ROW_PARTIAL_COUNT, BLOCK_M, BLOCK_N, HAS_LAYOUT)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Two branch-free loops, full tiles without mask arithmetic, then partial tiles.
    for it in range(0, n_full):
        if HAS_LAYOUT:
            n_tile = tl.load(ROW_FULL + base + it)
        else:
            n_tile = it
        acc, m_i, l_i = softmax_tile(q, acc, m_i, l_i, k_base, v_base, n_tile, offs_d, d_ok,
                                     s_kn, s_kd, s_vn, s_vd, LK, scale_log2, pos_i, vis_i,
                                     blk_i, doc_i, KIND, BLK, DOC, meta_row, BLOCK_N, False,
                                     HAS_LAYOUT, UPCAST, IEEE)
    for it in range(0, n_partial):
        if HAS_LAYOUT:
            n_tile = tl.load(ROW_PARTIAL + base + it)
        else:
            n_tile = n_full + it
        acc, m_i, l_i = softmax_tile(q, acc, m_i, l_i, k_base, v_base, n_tile, offs_d, d_ok,
                                     s_kn, s_kd, s_vn, s_vd, LK, scale_log2, pos_i, vis_i,
                                     blk_i, doc_i, KIND, BLK, DOC, meta_row, BLOCK_N, True,
                                     HAS_LAYOUT, UPCAST, IEEE)

    out, lse, empty = softmax_result(acc, m_i, l_i)
    lse = tl.where(empty, float("inf"), lse)  # the backward's "probability 0" for such rows
    tl.store(O + b.to(tl.int64) * s_ob + h * s_oh + offs_m[:, None] * s_om
             + offs_d[None, :] * s_od, out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + stat_row + offs_m, lse, mask=row_ok)


@triton.jit
def _attention_bwd_delta(O, DO, DELTA, ROWS, HQ, LQ, s_ob, s_oh, s_om, s_od,
                         s_db, s_dh, s_dm, s_dd, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_R: tl.constexpr):
    """delta_i = sum_d dO_i * O_i in fp32 for the rows i = (b, h, m) of DELTA, read straight
    from the bf16/fp16 tensors in the layout they come in (Hugging Face models hand over
    (B, L, H, D) memory viewed as (B, H, L, D)): no upcast or contiguous copies."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < ROWS
    b, h, m = rows // LQ // HQ, rows // LQ % HQ, rows % LQ
    offs_d = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + (b * s_ob + h * s_oh + m * s_om)[:, None] + offs_d[None, :] * s_od,
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + (b * s_db + h * s_dh + m * s_dm)[:, None] + offs_d[None, :] * s_dd,
                 mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dkdv_tile(k, v, dk, dv, offs_n, kind_j, blk_j, doc_j, q_base, do_base, row_base,
               m_tile, offs_d, d_ok, s_qm, s_qd, s_dm, s_dd, LSE, DELTA, LQ, LK, scale_log2,
               VIS, BLK, DOC, meta_row, dq_acc_base,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
               HAS_LAYOUT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
               DQ_ATOMIC: tl.constexpr, EVEN_M: tl.constexpr):
    """One query tile's contribution to the dk, dv of a key tile.

    Computed transposed, keys along axis 0: P^T = exp(K Q^T - lse) and dS^T come out of
    their matmuls in the orientation the next matmuls (P^T dO, dS^T Q) take as left operand,
    so no computed tile is ever transposed (a transpose would cost a trip through shared
    memory per tile). With ``DQ_ATOMIC`` the tile's dq, dS K (unscaled), is added into the
    fp32 rows at ``dq_acc_base`` (vectorised reductions, no return value to wait for).
    """
    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    q_at = q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd
    do_at = do_base + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd
    if EVEN_M and not MASKED:
        # A FULL tile's rows all lie below LQ when LQ is a multiple of BLOCK_M: no row
        # predicates on its loads (about 60 of the 500 instructions of an iteration, sm_90).
        q_ok = d_ok[None, :]  # broadcast over the rows by the loads and the atomic add
        q = tl.load(q_at, mask=q_ok, other=0.0)
        do = tl.load(do_at, mask=q_ok, other=0.0)
        lse = tl.load(LSE + row_base + offs_m)
        delta = tl.load(DELTA + row_base + offs_m)
    else:
        row_ok = offs_m < LQ
        q_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_at, mask=q_ok, other=0.0)
        do = tl.load(do_at, mask=q_ok, other=0.0)
        # Rows past LQ or that saw nothing have lse = +inf: probability 0.
        lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    p_t = tl.math.exp2(tile_dot(k, tl.trans(q), IEEE) * scale_log2 - lse[None, :])
    if MASKED:
        pos_i = LK - LQ + offs_m
        vis_i, blk_i, doc_i = read_metadata(VIS, BLK, DOC, meta_row, pos_i, row_ok,
                                            HAS_LAYOUT)
        ok = mask_rule(pos_i[None, :], vis_i[None, :], blk_i[None, :], doc_i[None, :],
                   offs_n[:, None], kind_j[:, None], blk_j[:, None], doc_j[:, None],
                   HAS_LAYOUT)
        # Keys past LK need no test: they feed only their own dk/dv rows, never stored.
        p_t = tl.where(ok, p_t, 0.0)
    dv += tile_dot(p_t.to(do.dtype), do, IEEE)
    ds_t = p_t * (tile_dot(v, tl.trans(do), IEEE) - delta[None, :])
    ds_t = ds_t.to(q.dtype)
    dk += tile_dot(ds_t, q, IEEE)
    if DQ_ATOMIC:
        tl.atomic_add(dq_acc_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                      tile_dot(tl.trans(ds_t), k, IEEE), mask=q_ok, sem="relaxed")
    return dk, dv


@triton.jit
def _attention_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, KIND, VIS, BLK, DOC,
    COL_FULL, COL_FULL_COUNT, COL_PARTIAL, COL_PARTIAL_COUNT,
    scale, scale_log2,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dm, s_dd, s_tb, s_th, s_tn, s_td,
    HQ, HKV, GROUP, SPLIT, LQ, LK, N_M, N_N,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_LAYOUT: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, DQ_ATOMIC: tl.constexpr, TILES_FASTEST: tl.constexpr,
    EVEN_M: tl.constexpr,
):
    # Grid (key tiles, B * Hkv * SPLIT), or the other way round without TILES_FASTEST: a
    # head's first key tiles, which causal queries see the most, start first. The GROUP query
    # heads of a KV head are shared by SPLIT programs, program `part` taking heads part,
    # part + SPLIT, ... (a strided range: with bounds computed by division the loop spilled
    # 68 bytes of scalars at d = 128, sm_90), each writing its partial sums to head
    # hk * SPLIT + part of DK and DV.
    if TILES_FASTEST:
        pid_bh = tl.program_id(1)
        pid_n = tl.program_id(0)
    else:
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
    b = pid_bh // (HKV * SPLIT)
    hk = (pid_bh // SPLIT) % HKV
    part = pid_bh % SPLIT
    offset = LK - LQ
    n_start = pid_n * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_ok = (offs_n < LK)[:, None] & d_ok[None, :]
    meta_row = b.to(tl.int64) * LK

    k = tl.load(K + b.to(tl.int64) * s_kb + hk * s_kh + offs_n[:, None] * s_kn
                + offs_d[None, :] * s_kd, mask=kv_ok, other=0.0)
    v = tl.load(V + b.to(tl.int64) * s_vb + hk * s_vh + offs_n[:, None] * s_vn
                + offs_d[None, :] * s_vd, mask=kv_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    # The keys stay for the whole program: their metadata is read once, not once per tile.
    kind_j, blk_j, doc_j = read_metadata(KIND, BLK, DOC, meta_row, offs_n, offs_n < LK,
                                         HAS_LAYOUT)
    if HAS_LAYOUT:
        tile_col = b.to(tl.int64) * N_N + pid_n
        m_full = tl.load(COL_FULL_COUNT + tile_col)
        m_partial = tl.load(COL_PARTIAL_COUNT + tile_col)
        base = tile_col * N_M
        m_first = m_full * 0
        m_full_first = m_full * 0
    else:
        # Causal: query tiles from the one holding this tile's first key; those whose first
        # query is at or after this tile's last key are full (unless the tile runs past LK).
        m_first = tl.maximum(n_start - offset, 0) // BLOCK_M
        m_full_first = tl.cdiv(tl.maximum(n_start + BLOCK_N - 1 - offset, 0), BLOCK_M)
        m_full_first = tl.minimum(m_full_first, N_M)
        if n_start + BLOCK_N > LK:
            m_full_first = N_M
        m_partial = m_full_first - m_first
        m_full = N_M - m_full_first
        base = pid_n.to(tl.int64) * 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # This program's share of the KV head's query heads, summed in registers.
    for g in range(part, GROUP, SPLIT):
        h = hk * GROUP + g
        q_base = Q + b.to(tl.int64) * s_qb + h * s_qh
        do_base = DO + b.to(tl.int64) * s_db + h * s_dh
        row_base = (b.to(tl.int64) * HQ + h) * LQ
        dq_acc_base = DQ_ACC + row_base * HEAD_DIM  # (B, Hq, Lq, D) fp32, contiguous
        for it in range(0, m_full):
            if HAS_LAYOUT:
                m_tile = tl.load(COL_FULL + base + it)
            else:
                m_tile = m_full_first + it
            dk, dv = _dkdv_tile(k, v, dk, dv, offs_n, kind_j, blk_j, doc_j, q_base, do_base,
                                row_base, m_tile, offs_d, d_ok, s_qm, s_qd, s_dm,
                                s_dd, LSE, DELTA, LQ, LK, scale_log2, VIS, BLK, DOC, meta_row,
                                dq_acc_base, HEAD_DIM, BLOCK_M, False, HAS_LAYOUT, UPCAST,
                                IEEE, DQ_ATOMIC, EVEN_M)
        for it in range(0, m_partial):
            if HAS_LAYOUT:
                m_tile = tl.load(COL_PARTIAL + base + it)
            else:
                m_tile = m_first + it
            dk, dv = _dkdv_tile(k, v, dk, dv, offs_n, kind_j, blk_j, doc_j, q_base, do_base,
                                row_base, m_tile, offs_d, d_ok, s_qm, s_qd, s_dm,
                                s_dd, LSE, DELTA, LQ, LK, scale_log2, VIS, BLK, DOC, meta_row,
                                dq_acc_base, HEAD_DIM, BLOCK_M, True, HAS_LAYOUT, UPCAST,
                                IEEE, DQ_ATOMIC, EVEN_M)
    out = (b.to(tl.int64) * s_tb + (hk * SPLIT + part) * s_th + offs_n[:, None] * s_tn
           + offs_d[None, :] * s_td)
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _sum_head_shares(DK_PARTS, DV_PARTS, DK, DV, s_b, s_h, s_n, s_d, HKV, SPLIT, LK,
                     HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # dk and dv of one (key block, batch x KV head) from the SPLIT fp32 partial sums of the
    # dk/dv programs that shared its query heads, added in order and rounded once, straight
    # into the outputs' memory layout. Partials: contiguous (B, HKV * SPLIT, LK, HEAD_DIM).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_n < LK)[:, None] & (offs_d < HEAD_DIM)[None, :]
    within = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    first = pid_bh.to(tl.int64) * SPLIT * LK * HEAD_DIM
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for part in range(0, SPLIT):
        at = first + part * LK * HEAD_DIM + within  # < 2**31 past first: the launcher checks
        dk += tl.load(DK_PARTS + at, mask=ok, other=0.0)
        dv += tl.load(DV_PARTS + at, mask=ok, other=0.0)
    out = b.to(tl.int64) * s_b + hk * s_h + offs_n[:, None] * s_n + offs_d[None, :] * s_d
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=ok)


@triton.jit
def _dq_tile(q, do, dq, lse, delta, k_base, v_base, n_tile, offs_d, d_ok, s_kn, s_kd, s_vn,
             s_vd, LK, scale_log2, pos_i, vis_i, blk_i, doc_i, KIND, BLK, DOC, meta_row,
             BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LAYOUT: tl.constexpr,
             UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """One key tile's contribution to the dq of a query tile."""
    k, v, s = tile_scores(q, k_base, v_base, n_tile, offs_d, d_ok, s_kn, s_kd, s_vn, s_vd, LK,
                          scale_log2, pos_i, vis_i, blk_i, doc_i, KIND, BLK, DOC, meta_row,
                          BLOCK_N, MASKED, HAS_LAYOUT, UPCAST, IEEE)
    # Forbidden pairs (s = -inf) and rows that see nothing (lse = +inf) get probability 0.
    p = tl.math.exp2(s * scale_log2 - lse[:, None])
    ds = p * (tile_dot(do, tl.trans(v), IEEE) - delta[:, None])
    return dq + tile_dot(ds.to(k.dtype), k, IEEE)


@triton.jit
def _attention_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, KIND, VIS, BLK, DOC,
    ROW_FULL, ROW_FULL_COUNT, ROW_PARTIAL, ROW_PARTIAL_COUNT,
    scale, scale_log2,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dm, s_dd, s_gb, s_gh, s_gm, s_gd,
    HQ, GROUP, LQ, LK, N_M, N_N,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_LAYOUT: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, TILES_FASTEST: tl.constexpr,
):
    pid_m, b, h, hk, offs_m, offs_d, pos_i, row_ok, d_ok, meta_row, stat_row = _query_tile(
        HQ, GROUP, LQ, LK, HEAD_DIM, BLOCK_M, BLOCK_D, TILES_FASTEST)
    q_ok = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b.to(tl.int64) * s_qb + h * s_qh + offs_m[:, None] * s_qm
                + offs_d[None, :] * s_qd, mask=q_ok, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * s_db + h * s_dh + offs_m[:, None] * s_dm
                 + offs_d[None, :] * s_dd, mask=q_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + stat_row + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + stat_row + offs_m, mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * s_kb + hk * s_kh
    v_base = V + b.to(tl.int64) * s_vb + hk * s_vh
    vis_i, blk_i, doc_i = read_metadata(VIS, BLK, DOC, meta_row, pos_i, row_ok, HAS_LAYOUT)
    n_full, n_partial, base = _row_tiles(pid_m, b, LQ, LK, N_M, N_N, ROW_FULL_COUNT,
                                         ROW_PARTIAL_COUNT, BLOCK_M, BLOCK_N, HAS_LAYOUT)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for it in range(0, n_full):
        if HAS_LAYOUT:
            n_tile = tl.load(ROW_FULL + base + it)
        else:
            n_tile = it
        dq = _dq_tile(q, do, dq, lse, delta, k_base, v_base, n_tile, offs_d, d_ok, s_kn, s_kd,
                      s_vn, s_vd, LK, scale_log2, pos_i, vis_i, blk_i, doc_i, KIND, BLK, DOC,
                      meta_row, BLOCK_N, False, HAS_LAYOUT, UPCAST, IEEE)
    for it in range(0, n_partial):
        if HAS_LAYOUT:
            n_tile = tl.load(ROW_PARTIAL + base + it)
        else:
            n_tile = n_full + it
        dq = _dq_tile(q, do, dq, lse, delta, k_base, v_base, n_tile, offs_d, d_ok, s_kn, s_kd,
                      s_vn, s_vd, LK, scale_log2, pos_i, vis_i, blk_i, doc_i, KIND, BLK, DOC,
                      meta_row, BLOCK_N, True, HAS_LAYOUT, UPCAST, IEEE)
    # A row that sees nothing has a zero dq, set: its probabilities are exact zeros, which a
    # NaN or inf in a key of a shared tile would turn into NaN in the product.
    dq = tl.where((lse == float("inf"))[:, None], 0.0, dq)
    tl.store(DQ + b.to(tl.int64) * s_gb + h * s_gh + offs_m[:, None] * s_gm
             + offs_d[None, :] * s_gd, (dq * scale).to(DQ.dtype.element_ty), mask=q_ok)


# ----------------------------------------------------------------------------- launchers


KERNELS = ("forward", "dkdv", "dq", "dkdv+dq")


@torch.compiler.assume_constant_result  # evaluated while torch.compile traces, not graphed
def _device_arch(device: torch.device) -> tuple[int, int]:
    """Compute capability of an NVIDIA GPU, (0, 0) for other devices (under the interpreter,
    whose tiles do not depend on it). ``scripts/kernel_resources.py``, which records launches on
    CPU tensors without running them, replaces this function with its target's."""
    if device.type != "cuda" or torch.version.hip is not None:
        # ROCm GPUs also answer as "cuda", with capabilities such as (9, 4) for an MI300:
        # not a Hopper and its 228 KB of shared memory. They get the general tiles.
        return 0, 0
    return torch.cuda.get_device_capability(device)


def _tile_config(head_dim: int, dtype: torch.dtype, kernel: str, arch: tuple[int, int]
                 ) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of ``kernel``, one of :data:`KERNELS`, on a
    GPU of compute capability ``arch``. "dkdv+dq" is the dk/dv kernel when it also adds dq
    with atomics (:func:`_dq_by_atomics`).

    The dk/dv and dq kernels of the backward have their own tiles (each gets its own tile
    map), since they walk the score matrix in different directions: dk/dv holds BLOCK_N keys
    and streams query tiles, dq holds BLOCK_M queries and streams key tiles.
    Small tiles under the interpreter, so that tests with short sequences still cross many
    tile boundaries. On a GPU, fp32 or head dims over 128 get smaller tiles to stay within
    shared memory (228 KB per SM on Hopper) with pipelined K/V loads.
    """
    if triton_interpreted():
        return 16, 16, 1, 1
    # fp32 or d > 128: 8 warps share the registers of the small tiles. With 4, the fp32
    # forward and dk/dv kernels spilled about 800 bytes a thread (sm_90,
    # scripts/kernel_resources.py); with 8, nothing.
    wide = head_dim > 128 or dtype == torch.float32
    if kernel == "forward":
        if wide:
            return 64, 32, 8, 2
        return (128, 64, 8, 3) if head_dim > 64 else (128, 64, 4, 3)
    if wide:
        return 32, 32, 8, 2
    if arch[0] in (9, 10):
        # Hopper and datacenter Blackwell (227 KB of shared memory a block): the held side
        # of each backward kernel is 128 rows, one 64-row warpgroup MMA per warpgroup of 8
        # warps, and every streamed Q/dO (dk/dv) or K/V (dq) tile is read by half as many
        # programs as with 64. FlexAttention's sm_90 choice for 64 <= d <= 128; with the
        # 64x64 tiles of the first GPU runs our backward took 2.3x its time. Compiled for
        # sm_90 at d = 128, dk/dv spills 20-48 bytes a thread: loop scalars, not tile data
        # (its accumulators and the held K and V take 192 of the 255 registers).
        if kernel == "dkdv+dq":
            # A dq tile of 64 x d fp32 more: with 128 keys held it spills 144-232 bytes at
            # d = 128 (sm_90); with 64, none.
            return 64, 64, 8, 3
        return (64, 128, 8, 3) if kernel == "dkdv" else (128, 64, 8, 3)
    # Up to 163 KB (A100) or 99 KB (consumer GPUs) of shared memory a block.
    return (64, 64, 8, 2) if head_dim > 64 else (64, 64, 4, 2)


def _dq_in_dkdv(head_dim: int, dtype: torch.dtype, arch: tuple[int, int]) -> bool:
    """Whether the dk/dv kernel computes dq too, with atomics, on a GPU of compute capability
    ``arch`` (else the dq kernel does, recomputing the scores).

    No: 5 matmuls a tile pair plus fp32 atomics into L2 lost to 7 matmuls on an H100
    (2026-11-27, bf16, d = 128, 16 heads): forward+backward took 5.25 ms against 3.29 at
    S = 4k and 17.9 against 10.9 at 16k. ``scripts/tune_latent_attention.py`` times both.
    """
    return False


@torch.compiler.assume_constant_result  # evaluated while torch.compile traces, not graphed
def _deterministic() -> bool:
    # Without arguments: a constant-folded function needs constant ones, and a head dim is
    # symbolic under torch.compile with dynamic shapes.
    return torch.are_deterministic_algorithms_enabled()


def _dq_by_atomics(head_dim: int, dtype: torch.dtype, arch: tuple[int, int]) -> bool:
    """:func:`_dq_in_dkdv`, except under ``torch.use_deterministic_algorithms(True)``: the
    order of the atomic additions varies from run to run, and with it dq's last bits."""
    return _dq_in_dkdv(head_dim, dtype, arch) and not _deterministic()


def _tiles_fastest(heads: int) -> bool:
    """Whether a flash kernel's grid puts a head's tiles on axis 0, (tiles, heads), rather
    than (heads, tiles).

    The GPU dispatches programs roughly in the order of their linear index, so with tiles on
    axis 0 the programs running at once belong to a few heads and share those heads' K and V
    (forward, dq) or Q and dO (dk/dv) in L2; with heads on axis 0 they span every head, whose
    K and V outgrow the L2 at the benchmark's shapes (128 MB against an H100's 50 MB). A tile
    pair of the forward (128 x 64 at d = 128) does 128 flops per byte of K and V, half what an
    H100 needs to stay compute-bound from HBM. On an H100 the forward with heads on axis 0 ran
    6-8% slower than an earlier build with tiles on axis 0 (runs B and C in
    benchmarks/RESULTS.md, among other changes). FlashAttention-2 and FlexAttention put
    tiles on axis 0 too. Heads on axis 0 only where they exceed grid axis 1's limit.
    """
    return heads <= MAX_GRID_Y


def _dkdv_head_split(programs: int, group: int, target: int) -> int:
    """How many dk/dv programs share the ``group`` query heads of one KV head.

    The dk/dv kernel sums over a KV head's query heads inside one program. With grouped
    heads and short sequences its grid (batch x KV heads x key tiles) leaves SMs idle:
    Qwen2-0.5B's 2 KV heads at batch 4 and 1,632 tokens make 104 programs for an H100's 132
    SMs, each walking 7 heads, and in a training step on an H100 that kernel took 187 us a
    layer against 155-202 us for cuDNN's whole attention backward. Below ``target``
    programs, the fewest shares that reach it (at most one per head; shares may differ by a
    head) split the heads; each share writes fp32 partial sums, added up after the kernel.
    Few shares, since the sums cost traffic in proportion: 7 shares a KV head took 0.69 ms
    of sums in the 7B proxy's step for the 0.56 ms they saved in dk/dv (H100).
    """
    if group == 1 or programs >= target:
        return 1
    return min(group, -(-target // programs))


@functools.lru_cache(maxsize=None)
def _dkdv_target_programs(device: torch.device) -> int:
    """The dk/dv grid below which query-head groups are split: two programs per SM on a
    GPU; under the interpreter 16, so that the tests' short grouped-head cases split."""
    if device.type != "cuda":
        return 16
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _dkdv_kernel(head_dim: int, dtype: torch.dtype, arch: tuple[int, int]) -> str:
    """The name in :data:`KERNELS` of the dk/dv kernel the backward runs."""
    return "dkdv+dq" if _dq_by_atomics(head_dim, dtype, arch) else "dkdv"


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def _tile_tensors(layout: LatentLayout | None, lq: int, group: int, head_dim: int,
                  dtype: torch.dtype, device: torch.device, backward: bool = True
                  ) -> list[Tensor]:
    """What the kernels read of a layout, as one flat list (a custom op takes list[Tensor]):
    [meta (4, B, Lk) int32, the row lists of the forward's tile map (4), the row lists of the
    dq kernel's tile map (4), the column lists of the dk/dv kernel's tile map (4)]. [] without
    a layout. Without ``backward`` only what the forward reads: [meta] when the decode kernel
    runs it (no tile map at all), [meta, the forward's row lists] otherwise. Tile maps are
    cached on the layout, so equal tile shapes share one."""
    if layout is None:
        return []
    decode = uses_decode(lq, group)
    arch = _device_arch(device)
    # The dq map is built even when the dk/dv kernel computes dq: the list keeps its shape,
    # and on Hopper the dq and forward tiles are the same, hence the same cached map.
    kernels = (("forward", "dq", _dkdv_kernel(head_dim, dtype, arch)) if backward
               else () if decode else ("forward",))
    tiles = tuple(_tile_config(head_dim, dtype, kernel, arch)[:2] for kernel in kernels)

    def build() -> list[Tensor]:
        lists = [torch.stack(layout.metadata())]
        for shape, kernel in zip(tiles, kernels):
            tile_map = layout.tile_map(lq, *shape)
            lists += ([tile_map.col_full, tile_map.col_full_count, tile_map.col_partial,
                       tile_map.col_partial_count] if kernel.startswith("dkdv") else
                      [tile_map.row_full, tile_map.row_full_count, tile_map.row_partial,
                       tile_map.row_partial_count])
        return [t if t.device == device else t.to(device) for t in lists]

    # Every layer of a pass asks for the same list: built by the first.
    return layout.cached(("kernel arguments", lq, kernels, tiles, device), build)


def _check_tile_lists(lists: list[Tensor], shape: tuple[int, int, int], kernel: str) -> None:
    """A tile map built for other tile sizes would send the kernel to tiles that do not exist
    (out-of-bounds reads): refuse it on the host, where it costs a shape comparison."""
    if lists and tuple(lists[0].shape) != shape:
        raise RuntimeError(f"the {kernel} kernel was handed a tile map of shape "
                           f"{tuple(lists[0].shape)}, expected {shape}: tile maps and tile "
                           "sizes must come from the same _tile_config (did "
                           "torch.use_deterministic_algorithms change between the forward "
                           "and the backward?)")


def _meta_args(tiles: list[Tensor], dummy: Tensor) -> tuple[Tensor, ...]:
    if not tiles:
        return (dummy,) * 4
    return tuple(tiles[0].unbind(0))


def _strides(t: Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _forward(q: Tensor, k: Tensor, v: Tensor, tiles: list[Tensor], scale: float,
             out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out, lse); ``out``, when given, is written in place (any strides, q's shape)."""
    batch, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if uses_decode(lq, hq // hkv):
        result, lse = decode_forward(q, k, v, tiles[0] if tiles else None, scale * _LOG2E)
        return (result, lse) if out is None else (out.copy_(result), lse)
    # In q's memory layout: a Hugging Face model's (B, L, H, D) memory, which it transposes
    # back for free, as it does SDPA's output.
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty((batch, hq, lq), dtype=torch.float32, device=q.device)
    bm, bn, warps, stages = _tile_config(d, q.dtype, "forward", _device_arch(q.device))
    n_m, n_n = cdiv(lq, bm), cdiv(lk, bn)
    kind, vis, blk, doc = _meta_args(tiles, lse)
    rows = tiles[1:5] if tiles else (lse,) * 4  # lse stands in for absent pointers: never read
    _check_tile_lists(tiles[1:5], (batch, n_m, n_n), "forward")
    fastest = _tiles_fastest(batch * hq)
    _attention_fwd[(n_m, batch * hq) if fastest else (batch * hq, n_m)](
        q, k, v, out, lse, kind, vis, blk, doc, *rows,
        scale * _LOG2E, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        hq, hq // hkv, lq, lk, n_m, n_n,
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=bm, BLOCK_N=bn, HAS_LAYOUT=bool(tiles),
        UPCAST=triton_interpreted(), IEEE=q.dtype == torch.float32, TILES_FASTEST=fastest,
        num_warps=warps, num_stages=stages)
    return out, lse


def _backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              tiles: list[Tensor], scale: float, dq: Tensor | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv); ``dq``, when given, is written in place (any strides, q's shape)."""
    batch, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    grad_out = grad_out.resolve_neg()
    _check_offsets(grad_output=grad_out)
    # delta_i = sum_d dO_i * O_i, the softmax-backward correction of every query row.
    delta = torch.empty((batch, hq, lq), dtype=torch.float32, device=q.device)
    rows, block_r = batch * hq * lq, 16
    _attention_bwd_delta[(cdiv(rows, block_r),)](
        out, grad_out, delta, rows, hq, lq, *_strides(out), *_strides(grad_out),
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_R=block_r)
    # Gradients in their inputs' memory layouts (no copies on the way back through a
    # model's transposes); dv shares dk's strides, the dk/dv kernel takes one set.
    if dq is None:
        dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(dk)
    kind, vis, blk, doc = _meta_args(tiles, delta)
    rows = tiles[5:9] if tiles else (delta,) * 4
    cols = tiles[9:13] if tiles else (delta,) * 4

    arch = _device_arch(q.device)

    def launch_args(kernel: str) -> tuple[int, int, dict]:
        bm, bn, warps, stages = _tile_config(d, q.dtype, kernel, arch)
        meta = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=bm, BLOCK_N=bn,
                    HAS_LAYOUT=bool(tiles), UPCAST=triton_interpreted(),
                    IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages)
        return cdiv(lq, bm), cdiv(lk, bn), meta

    dkdv_kernel = _dkdv_kernel(d, q.dtype, arch)
    atomic = dkdv_kernel == "dkdv+dq"
    dq_acc = torch.zeros((batch, hq, lq, d), dtype=torch.float32, device=q.device) if atomic \
        else delta  # a stand-in pointer, never read
    n_m, n_n, meta = launch_args(dkdv_kernel)
    _check_tile_lists(tiles[9:13], (batch, n_n, n_m), "dk/dv")
    split = _dkdv_head_split(batch * hkv * n_n, hq // hkv, _dkdv_target_programs(q.device))
    if hkv * split * lk * d > MAX_ROW_OFFSET:  # the partial sums' rows: no split then
        split = 1
    # Split query-head groups write fp32 partial sums, added up below (in a fixed order).
    dk_out, dv_out = (dk, dv) if split == 1 else (
        torch.empty((batch, hkv * split, lk, d), dtype=torch.float32, device=q.device)
        for _ in range(2))
    fastest = _tiles_fastest(batch * hkv * split)
    _attention_bwd_dkdv[(n_n, batch * hkv * split) if fastest else (batch * hkv * split, n_n)](
        q, k, v, grad_out, lse, delta, dk_out, dv_out, dq_acc, kind, vis, blk, doc, *cols,
        scale, scale * _LOG2E, *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
        *_strides(dk_out), hq, hkv, hq // hkv, split, lq, lk, n_m, n_n, DQ_ATOMIC=atomic,
        TILES_FASTEST=fastest, EVEN_M=lq % meta["BLOCK_M"] == 0, **meta)
    if split > 1:
        block_n = 32
        _sum_head_shares[(cdiv(lk, block_n), batch * hkv)](
            dk_out, dv_out, dk, dv, *_strides(dk), hkv, split, lk, HEAD_DIM=d,
            BLOCK_N=block_n, BLOCK_D=_block_d(d), num_warps=8)
    if atomic:  # scaled and rounded in one pass, into q's memory layout
        torch.mul(dq_acc, scale, out=dq)
        return dq, dk, dv
    n_m, n_n, meta = launch_args("dq")
    _check_tile_lists(tiles[5:9], (batch, n_m, n_n), "dq")
    fastest = _tiles_fastest(batch * hq)
    _attention_bwd_dq[(n_m, batch * hq) if fastest else (batch * hq, n_m)](
        q, k, v, grad_out, lse, delta, dq, kind, vis, blk, doc, *rows,
        scale, scale * _LOG2E, *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
        *_strides(dq), hq, hq // hkv, lq, lk, n_m, n_n, TILES_FASTEST=fastest, **meta)
    return dq, dk, dv


# ----------------------------------------------------------------------------- autograd
#
# Two doors to the same launchers, as in gaussian_kl: torch.compile traces the custom ops;
# eager calls take an autograd.Function, which skips the dispatcher's round trips (host time
# paid once per layer and step).


@torch.library.custom_op("amvl::latent_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, tiles: list[Tensor], scale: float
                  ) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, tiles, scale)


@_attention_op.register_fake
def _(q, k, v, tiles, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("amvl::latent_attention_backward", mutates_args=())
def _attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                           lse: Tensor, tiles: list[Tensor], scale: float
                           ) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(grad_out, q, k, v, out, lse, tiles, scale)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, tiles, scale):
    dk = torch.empty_like(k)
    return torch.empty_like(q), dk, torch.empty_like(dk)


def _setup_context(ctx, inputs, output):
    q, k, v, tiles, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *tiles)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward_rule(ctx, grad_out, grad_lse):
    q, k, v, out, lse, *tiles = ctx.saved_tensors
    no_tiles = [None] * len(tiles)  # the structure of the inputs: tiles is a list
    if grad_out is None:
        return None, None, None, no_tiles, None
    dq, dk, dv = torch.ops.amvl.latent_attention_backward(grad_out, q, k, v, out, lse, tiles,
                                                          ctx.scale)
    return dq, dk, dv, no_tiles, None


_attention_op.register_autograd(_backward_rule, setup_context=_setup_context)


class _LatentAttentionFunction(torch.autograd.Function):
    """The eager door: the custom op's forward and backward without the dispatcher.

    The tile tensors travel as trailing positional inputs (autograd.Function takes no list).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, *tiles):
        out, lse = _forward(q, k, v, list(tiles), scale)
        ctx.save_for_backward(q, k, v, out, lse, *tiles)
        ctx.scale = scale
        return out

    @staticmethod
    @first_order_only("latent_attention", "second-order gradients through it are not "
                      "supported")
    def backward(ctx, grad_out):
        q, k, v, out, lse, *tiles = ctx.saved_tensors
        dq, dk, dv = _backward(grad_out, q, k, v, out, lse, tiles, ctx.scale)
        return dq, dk, dv, None, *([None] * len(tiles))


# ----------------------------------------------------------------------------- public API


def _validate(q: Tensor, k: Tensor, v: Tensor, layout: LatentLayout | None,
              scale: float | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, heads, length, head_dim), got shape "
                             f"{tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}")
    if q.dtype not in ATTENTION_DTYPES:  # 8-bit floats: no backend computes in them
        raise TypeError(f"latent_attention takes {ATTENTION_DTYPES}, got {q.dtype}; cast the "
                        "inputs")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    (batch, hq, lq, d), (kb, hkv, lk, kd) = q.shape, k.shape
    if kb != batch or kd != d:
        raise ValueError(f"k must be (batch={batch}, heads, length, head_dim={d}), got "
                         f"{tuple(k.shape)}")
    if hkv == 0:
        raise ValueError(f"k and v need at least one head, got k and v of shape "
                         f"{tuple(k.shape)} (batch, heads, length, head_dim)")
    if hq % hkv:
        raise ValueError(f"q's heads ({hq}) must be a multiple of k's heads ({hkv})")
    if lq > lk:
        raise ValueError(f"q has {lq} queries but k only {lk} keys: the queries are the last "
                         "Lq of the Lk keys")
    if layout is not None:
        if not isinstance(layout, LatentLayout):
            raise TypeError(f"layout must be a LatentLayout or None, got "
                            f"{type(layout).__name__}")
        if (layout.batch, layout.length) != (batch, lk):
            raise ValueError(f"layout is for (batch, keys) = {(layout.batch, layout.length)} "
                             f"but the call has {(batch, lk)}")
        if layout.device != q.device:
            raise ValueError(f"layout is on {layout.device} but q is on {q.device}")
    # The kernels take row maxima of unscaled scores, which commute with a positive scale
    # only; a zero or negative scale is no attention anyone trains.
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a finite positive real number or None, got {scale!r}")


def _autocast_inputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Under ``torch.autocast``, q, k and v in autocast's dtype, as autocast hands them to
    SDPA (it does not know our op). Without it a model whose rotary tables are fp32 would
    hand over fp32 q and k beside a bf16 v. float64 stays, as autocast leaves it."""
    if not all(isinstance(t, Tensor) for t in (q, k, v)):
        return q, k, v  # _validate names the bad argument
    device = q.device.type
    if device == "meta" or not torch.is_autocast_enabled(device):  # autocast knows no meta
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    low = (torch.float32, torch.float16, torch.bfloat16)
    return tuple(t.to(dtype) if t.dtype in low else t for t in (q, k, v))


# The kernels widen the batch index to 64 bits; within one batch row, offsets are 32-bit.
MAX_ROW_OFFSET = 2**31 - 1


def _row_extent(t: Tensor) -> int:
    """The largest offset between two elements of one batch row of ``t``, or of a tensor
    allocated like it: ``empty_like`` of an expanded (stride 0) tensor is contiguous, so
    outputs and gradients can span more than their input."""
    strided = sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:]))
    return max(strided, math.prod(t.shape[1:]) - 1)


def _check_offsets(**tensors: Tensor) -> None:
    """Refuse tensors whose elements within one batch row lie 2**31 or more apart: the Triton
    kernels' 32-bit offsets would wrap (reads and writes out of bounds), e.g. at about 512k
    tokens of 32 heads of 128 in Hugging Face's (B, L, H, D) memory."""
    for name, t in tensors.items():
        extent = _row_extent(t)
        if extent > MAX_ROW_OFFSET:
            raise ValueError(f"{name} {tuple(t.shape)} with strides {t.stride()} spans "
                             f"{extent + 1} elements per batch row, more than the Triton "
                             f"kernels' 32-bit offsets address ({MAX_ROW_OFFSET + 1}); split "
                             "the call over heads or batch rows")


def _check_triton_inputs(q: Tensor, k: Tensor, v: Tensor, offsets: bool = True) -> None:
    """What the Triton kernels take beyond the contract's checks (:func:`_validate`)."""
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' takes {TRITON_DTYPES}, got {q.dtype}; use "
                        "backend='torch'")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' takes head dims up to {MAX_HEAD_DIM}, got "
                         f"{q.shape[-1]}")
    if offsets:
        _check_offsets(q=q, k=k, v=v)


def _plain_causal_rows(layout: LatentLayout) -> int:
    """``layout.plain_causal_rows()``, or 0 while a CUDA graph is being captured and the
    count is not known yet (reading it back from the device is a sync, which capture forbids)."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return layout.cached(("plain causal rows",), lambda: 0)
    return layout.plain_causal_rows()


def latent_attention(q: Tensor, k: Tensor, v: Tensor, layout: LatentLayout | None = None,
                     scale: float | None = None, backend: str = "auto") -> Tensor:
    """Attention under the latent-block mask rule of DESIGN.md section 3.

    Args:
        q: (B, Hq, Lq, D) queries, the last Lq positions of the keys (a KV cache when Lq < Lk).
        k, v: (B, Hkv, Lk, D) with Hq a multiple of Hkv (grouped-query attention).
        layout: per-token metadata of the Lk keys; None means plain causal attention.
        scale: score scale, a positive number, default 1 / sqrt(D).
        backend: "auto" (Triton on a GPU, PyTorch's SDPA with the layout's mask on the CPU or
            where Triton cannot run; a decoding step without a layout, one query that sees
            every key, goes to SDPA everywhere, and so do the leading plain causal rows of a
            layout, x in the prefix-sharing layout, when there are at least
            ``CAUSAL_ROWS_TO_SDPA`` of them, ``CAUSAL_ROWS_TO_SDPA_WITH_GRAD`` when a backward
            will follow: see ``amvl_kernels._causal_split``), "triton" (our kernels for
            every row) or "torch". The Triton kernels take fp16, bf16 and fp32
            (fp32 matmuls in IEEE precision), head dims up to 256, and tensors whose
            elements within one batch row lie less than 2**31 apart ("auto" takes SDPA
            beyond, "triton" raises).

    Returns:
        (B, Hq, Lq, D) in q's dtype. A query row that sees no key gets zeros and zero gradient.
        Under ``torch.autocast`` the inputs are first cast to autocast's dtype, as SDPA's are.
        Non-finite inputs: a row that sees nothing returns zeros whatever the keys it cannot
        see hold. Otherwise a NaN or inf in q, k or v reaches the rows that see it, and may
        also reach, in the output and the gradients, rows and keys that share a kernel tile
        with it: a masked pair's probability is an exact 0, and 0 * NaN is NaN, as in
        FlashAttention, FlexAttention and SDPA with a mask. So fill unused cache or padding
        slots with finite values (zeros, not ``torch.empty``). On "torch" SDPA's own handling
        applies (see ``reference.latent_attention_sdpa``).
    """
    q, k, v = _autocast_inputs(q, k, v)
    _validate(q, k, v, layout, scale)
    # A pending negation (x.conj().imag) is a view whose memory lacks the sign: the kernels
    # read memory. resolve_neg returns the tensor itself when there is none.
    q, k, v = q.resolve_neg(), k.resolve_neg(), v.resolve_neg()
    if scale is None:  # head dim 0 (an empty call) would divide by zero
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    scale = float(scale)
    auto = backend == "auto"
    backend = resolve_backend(backend, q.device)
    if auto and (q.dtype not in TRITON_DTYPES or q.shape[-1] > MAX_HEAD_DIM
                 or max(_row_extent(t) for t in (q, k, v)) > MAX_ROW_OFFSET):
        backend = "torch"
    if backend == "triton":
        # "auto" sent tensors past the kernels' offsets to SDPA above
        _check_triton_inputs(q, k, v, offsets=not auto)
    if q.numel() == 0 or k.numel() == 0:
        # Nothing to attend: zeros, still connected to every input so autograd gives zeros.
        return q * 0 + (k.sum() + v.sum()) * 0
    if backend == "torch":
        return latent_attention_sdpa(q, k, v, layout, scale)
    if auto and layout is None and q.shape[2] == 1:
        # One query over plain causal keys sees every key: unmasked attention, where SDPA's
        # kernels took 15-109 us a call against our decode kernel's 118-365 us on an H100
        # (benchmarks/RESULTS.md, decoding rows; mostly host time).
        return F.scaled_dot_product_attention(q, k, v, scale=scale,
                                              enable_gqa=grouped_heads(q, k))
    if auto and layout is not None and q.shape[2] <= SHORT_QUERIES_TO_SDPA \
            and q.shape[2] < k.shape[2]:
        return latent_attention_sdpa(q, k, v, layout, scale)
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    least_rows = CAUSAL_ROWS_TO_SDPA_WITH_GRAD if backward else CAUSAL_ROWS_TO_SDPA
    # The length test first: counting the rows reads the device (a host sync), which a layout
    # too short to qualify need not pay.
    if auto and layout is not None and q.shape[2] == k.shape[2] >= least_rows \
            and q.dtype in (torch.float16, torch.bfloat16) and not torch.compiler.is_compiling():
        rows = _plain_causal_rows(layout)
        if rows >= least_rows:
            # Here, not at the top: that module builds on this one's launchers.
            from amvl_kernels._causal_split import split_causal_rows
            return split_causal_rows(q, k, v, layout, scale, rows)
    tiles = _tile_tensors(layout, q.shape[2], q.shape[1] // k.shape[1], q.shape[-1], q.dtype,
                          q.device, backward)
    if torch.compiler.is_compiling():
        out, _ = torch.ops.amvl.latent_attention(q, k, v, tiles, scale)
        return out
    if not backward:  # inference, a decoding step above all: no autograd node to build
        return _forward(q, k, v, tiles, scale)[0]
    return _LatentAttentionFunction.apply(q, k, v, scale, *tiles)
