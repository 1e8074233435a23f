"""Split-KV forward for short query blocks (decoding): what ``ak.latent_attention`` runs when
the queries of a KV head's group, Lq x (Hq / Hkv) rows, fit one small tile.

The flash forward of ``latent_attention`` gives each program a 128-row tile of one query head.
With one query per head, 127 of those rows are padding, B x Hq programs stream the whole KV
cache alone (a few dozen programs on a 132-SM GPU), and the query heads of a GQA group each
read the same keys and values. Here (flash-decoding) one program holds every query of a KV
group as the rows of its tile, so K and V are read once for the group, and only a slice of
the keys: enough slices that the GPU fills. ``_decode_combine`` then merges the slices by
their log-sum-exps; when the batch alone fills the GPU there is one slice and no merge.

Every key tile evaluates the mask rule instead of reading a tile map, so a decoding step never
builds one. The output and the log-sum-exp (base 2, +inf for a row that sees nothing) are
those of the flash forward, so the backward of ``latent_attention`` applies unchanged.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from amvl_kernels._attention_tiles import read_metadata, softmax_result, softmax_tile
from amvl_kernels._launch import MAX_GRID_Y, cdiv, next_power_of_2
from amvl_kernels.backends import triton_interpreted

# Rows of the decode tile: Lq x (query heads per KV head). Past this the flash forward's
# tiles are no longer mostly padding.
DECODE_MAX_ROWS = 64


@triton.jit
def _decode_partial(
    Q, K, V, O, LSE, O_PART, LSE_PART, KIND, VIS, BLK, DOC,
    scale_log2,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    HQ, HKV, GROUP, LQ, LK, ROWS, TILES_PER_SPLIT,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_LAYOUT: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, ONE_SLICE: tl.constexpr,
):
    """Grid (slices, B * Hkv): the online softmax of all GROUP x LQ queries of one KV head over
    one slice of the keys. Tile row r is query r % LQ of head hk * GROUP + r // LQ. With
    ONE_SLICE the program holds every key and writes the final output: no merge."""
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    r = tl.arange(0, BLOCK_M)
    row_ok = r < GROUP * LQ
    h = hk * GROUP + r // LQ
    i = r % LQ
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b.to(tl.int64) * s_qb + h[:, None] * s_qh + i[:, None] * s_qm
                + offs_d[None, :] * s_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    pos_i = LK - LQ + i
    meta_row = b.to(tl.int64) * LK
    vis_i, blk_i, doc_i = read_metadata(VIS, BLK, DOC, meta_row, pos_i, row_ok, HAS_LAYOUT)
    k_base = K + b.to(tl.int64) * s_kb + hk * s_kh
    v_base = V + b.to(tl.int64) * s_vb + hk * s_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    first = split * TILES_PER_SPLIT
    last = tl.minimum(first + TILES_PER_SPLIT, tl.cdiv(LK, BLOCK_N))
    for n_tile in range(first, last):
        acc, m_i, l_i = softmax_tile(q, acc, m_i, l_i, k_base, v_base, n_tile, offs_d, d_ok,
                                     s_kn, s_kd, s_vn, s_vd, LK, scale_log2, pos_i, vis_i,
                                     blk_i, doc_i, KIND, BLK, DOC, meta_row, BLOCK_N, True,
                                     HAS_LAYOUT, UPCAST, IEEE)

    out, lse, empty = softmax_result(acc, m_i, l_i)
    row = ((b * HQ + h) * LQ + i).to(tl.int64)  # of the (B, Hq, Lq) rows
    if ONE_SLICE:  # the final output and log-sum-exp (+inf: the row sees nothing)
        tl.store(O + b.to(tl.int64) * s_ob + h[:, None] * s_oh + i[:, None] * s_om
                 + offs_d[None, :] * s_od, out.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + row, tl.where(empty, float("inf"), lse), mask=row_ok)
    else:  # the slice's own, for _decode_combine (-inf: the slice holds nothing the row sees)
        row += split * ROWS
        tl.store(O_PART + row[:, None] * HEAD_DIM + offs_d[None, :], out,
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE_PART + row, tl.where(empty, float("-inf"), lse), mask=row_ok)


@triton.jit
def _decode_combine(O_PART, LSE_PART, O, LSE, ROWS, SPLITS, HQ, LQ, s_ob, s_oh, s_om, s_od,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid (B * Hq * Lq,): merge one query row's slices, weighting each by 2^(lse - max)."""
    row = tl.program_id(0).to(tl.int64)  # (b, h, m) of the (B, Hq, Lq) rows
    s = tl.arange(0, BLOCK_S)
    s_ok = s < SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lse_s = tl.load(LSE_PART + s * ROWS + row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse_s - m_safe)  # 0 for slices that saw nothing
    total = tl.sum(w, 0)
    o_s = tl.load(O_PART + (s[:, None] * ROWS + row) * HEAD_DIM + offs_d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    empty = total == 0.0
    out = tl.sum(w[:, None] * o_s, 0) / tl.where(empty, 1.0, total)
    tl.store(O + row // LQ // HQ * s_ob + row // LQ % HQ * s_oh + row % LQ * s_om
             + offs_d * s_od, out.to(O.dtype.element_ty), mask=d_ok)
    tl.store(LSE + row, tl.where(empty, float("inf"), m_safe + tl.math.log2(
        tl.where(empty, 1.0, total))))


def uses_decode(num_queries: int, group: int) -> bool:
    """Whether the forward of a call with these queries per head and query heads per KV head
    runs here rather than on the flash forward."""
    return num_queries * group <= DECODE_MAX_ROWS


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    """How many programs a decoding step should spread over: about two per SM on a GPU, a few
    under the interpreter (enough slices to exercise the merge)."""
    if device.type != "cuda":
        return 3
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _decode_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages). Small tiles under the interpreter, so that short test
    sequences span several slices."""
    if triton_interpreted():
        return 16, 1, 1
    if head_dim > 128 or dtype == torch.float32:
        return 32, 4, 2
    return 64, 4, 3


def _split_tiles(programs: int, n_tiles: int, target: int) -> tuple[int, int]:
    """(number of slices, key tiles per slice) that bring ``programs`` (B x Hkv) up to about
    ``target`` programs."""
    splits = max(1, min(n_tiles, -(-target // programs)))
    per_split = -(-n_tiles // splits)
    return -(-n_tiles // per_split), per_split


def decode_forward(q: Tensor, k: Tensor, v: Tensor, meta: Tensor | None, scale_log2: float
                   ) -> tuple[Tensor, Tensor]:
    """(out, lse) of the flash forward for a short query block: out (B, Hq, Lq, D) in q's
    dtype, lse (B, Hq, Lq) float32 in base 2. ``meta`` is the layout's (4, B, Lk) int32
    metadata, None for plain causal attention; ``scale_log2`` the score scale times log2(e)."""
    batch, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    rows_per_launch = max(1, MAX_GRID_Y // hkv)
    if batch > rows_per_launch:  # grid axis 1 is batch x KV heads: a launch per slice of rows
        parts = [decode_forward(q[i:i + rows_per_launch], k[i:i + rows_per_launch],
                                v[i:i + rows_per_launch],
                                None if meta is None else meta[:, i:i + rows_per_launch],
                                scale_log2) for i in range(0, batch, rows_per_launch)]
        return torch.cat([o for o, _ in parts]), torch.cat([s for _, s in parts])
    group = hq // hkv
    out = torch.empty_like(q)  # in q's memory layout, as the flash forward's
    lse = torch.empty((batch, hq, lq), dtype=torch.float32, device=q.device)
    block_n, warps, stages = _decode_config(d, q.dtype)
    block_d = max(16, next_power_of_2(d))
    n_tiles = cdiv(lk, block_n)
    splits, per_split = _split_tiles(batch * hkv, n_tiles, _target_programs(q.device))
    rows = batch * hq * lq
    one_slice = splits == 1
    # Slices write their own results to scratch for the merge; a single slice needs none (the
    # output stands in for the unused pointers).
    o_part = out if one_slice else torch.empty((splits, rows, d), dtype=torch.float32,
                                               device=q.device)
    lse_part = lse if one_slice else torch.empty((splits, rows), dtype=torch.float32,
                                                 device=q.device)
    kind, vis, blk, doc = meta.unbind(0) if meta is not None else (lse,) * 4
    _decode_partial[(splits, batch * hkv)](
        q, k, v, out, lse, o_part, lse_part, kind, vis, blk, doc, scale_log2,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        hq, hkv, group, lq, lk, rows, per_split,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=max(16, next_power_of_2(group * lq)),
        BLOCK_N=block_n, HAS_LAYOUT=meta is not None, UPCAST=triton_interpreted(),
        IEEE=q.dtype == torch.float32, ONE_SLICE=one_slice, num_warps=warps,
        num_stages=stages)
    if not one_slice:
        _decode_combine[(rows,)](o_part, lse_part, out, lse, rows, splits, hq, lq,
                                 *out.stride(), HEAD_DIM=d, BLOCK_D=block_d,
                                 BLOCK_S=next_power_of_2(splits))
    return out, lse
