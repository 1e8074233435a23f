"""Triton helpers shared by the attention kernels (``latent_attention`` and
``latent_attention_decode``): the metadata reads, the mask of a tile, the K/V tile loads and
scores of a key tile, one key tile of the online softmax and its result."""

from __future__ import annotations

import triton
import triton.language as tl

from amvl_kernels._mask_rule import mask_rule


@triton.jit
def tile_dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # fp32 inputs: true fp32 products, not tf32
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def read_metadata(FIRST, BLK, DOC, meta_row, positions, ok, HAS_LAYOUT: tl.constexpr):
    """Three metadata arrays of the tokens at ``positions`` of one row: (visible kinds, block
    id, doc id) for queries with FIRST = VIS, (segment kind, block id, doc id) for keys with
    FIRST = KIND. Without a layout nothing is read; the positions stand in."""
    if HAS_LAYOUT:
        first = tl.load(FIRST + meta_row + positions, mask=ok, other=0)
        blk = tl.load(BLK + meta_row + positions, mask=ok, other=0)
        doc = tl.load(DOC + meta_row + positions, mask=ok, other=0)
    else:
        first = positions
        blk = positions
        doc = positions
    return first, blk, doc


@triton.jit
def tile_mask(pos_i, vis_i, blk_i, doc_i, offs_n, LK, KIND, BLK, DOC, meta_row,
              HAS_LAYOUT: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask of the rule for query rows i and keys offs_n of one row b."""
    in_range = offs_n < LK
    kind_j, blk_j, doc_j = read_metadata(KIND, BLK, DOC, meta_row, offs_n, in_range,
                                         HAS_LAYOUT)
    ok = mask_rule(pos_i[:, None], vis_i[:, None], blk_i[:, None], doc_i[:, None],
                   offs_n[None, :], kind_j[None, :], blk_j[None, :], doc_j[None, :],
                   HAS_LAYOUT)
    return ok & in_range[None, :]


@triton.jit
def load_kv_tiles(k_base, v_base, offs_n, offs_d, d_ok, s_kn, s_kd, s_vn, s_vd, LK,
                  MASKED: tl.constexpr, UPCAST: tl.constexpr):
    """A K and a V tile; only partial tiles can run past LK, full ones skip that test."""
    if MASKED:
        kv_ok = (offs_n < LK)[:, None] & d_ok[None, :]
    else:
        kv_ok = d_ok[None, :]
    k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_ok, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def tile_scores(q, k_base, v_base, n_tile, offs_d, d_ok, s_kn, s_kd, s_vn, s_vd, LK,
                scale_log2, pos_i, vis_i, blk_i, doc_i, KIND, BLK, DOC, meta_row,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LAYOUT: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """The K and V tiles of key tile ``n_tile`` and the query rows' scores against it,
    unscaled (the callers fold ``scale_log2`` into the FMA before exp2, and the online softmax
    takes the row maxima of the unscaled scores: with scale > 0 the maximum commutes with the
    scaling, which saves a multiplication per score), -inf where the rule forbids the pair."""
    offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    k, v = load_kv_tiles(k_base, v_base, offs_n, offs_d, d_ok, s_kn, s_kd, s_vn, s_vd, LK,
                         MASKED, UPCAST)
    s = tile_dot(q, tl.trans(k), IEEE)
    if MASKED:
        ok = tile_mask(pos_i, vis_i, blk_i, doc_i, offs_n, LK, KIND, BLK, DOC, meta_row,
                       HAS_LAYOUT)
        s = tl.where(ok, s, float("-inf"))
    return k, v, s


@triton.jit
def softmax_tile(q, acc, m_i, l_i, k_base, v_base, n_tile, offs_d, d_ok, s_kn, s_kd, s_vn,
                 s_vd, LK, scale_log2, pos_i, vis_i, blk_i, doc_i, KIND, BLK, DOC, meta_row,
                 BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LAYOUT: tl.constexpr,
                 UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """One key tile of the online softmax."""
    k, v, s = tile_scores(q, k_base, v_base, n_tile, offs_d, d_ok, s_kn, s_kd, s_vn, s_vd, LK,
                          scale_log2, pos_i, vis_i, blk_i, doc_i, KIND, BLK, DOC, meta_row,
                          BLOCK_N, MASKED, HAS_LAYOUT, UPCAST, IEEE)
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
    # A row that has seen nothing yet keeps m = -inf; shift by 0 there, not by -inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * scale_log2 - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, IEEE)
    return acc, m_new, l_i


@triton.jit
def softmax_result(acc, m_i, l_i):
    """(normalised output, base-2 log-sum-exp, rows that saw nothing) of an online softmax;
    the rows that saw nothing get 0 and a log-sum-exp of -inf. Their 0 is set, not left to
    ``acc``: a masked key's probability is an exact 0, but 0 * inf or 0 * NaN in its value
    row would make the product NaN."""
    empty = l_i == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    return out, m_i + tl.math.log2(tl.where(empty, 1.0, l_i)), empty
