"""PyTorch versions of latent-block attention, both built on the dense mask of the layout.

- :func:`latent_attention_torch`, the reference the kernels are tested against: explicit scores
  and softmax in float32 (float64 for float64 inputs), memory quadratic in length.
- :func:`latent_attention_sdpa`, the fallback (``backend="torch"``, what "auto" picks on the
  CPU): PyTorch's fused SDPA kernels, which never hold the scores, with the plain causal rows
  split off to SDPA's causal kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from amvl_kernels.layout import LatentLayout


def attention_mask(layout: LatentLayout | None, num_queries: int, num_keys: int,
                   device: torch.device) -> Tensor:
    """(B or 1, Lq, Lk) bool mask: the layout's rule, or plain causal when layout is None."""
    if layout is not None:
        return layout.dense_mask(num_queries)
    i = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    return (torch.arange(num_keys, device=device)[None, :] <= i)[None]


def latent_attention_torch(q: Tensor, k: Tensor, v: Tensor, layout: LatentLayout | None,
                           scale: float) -> Tensor:
    """softmax(q k^T * scale, masked) v with (B, Hq, Lq, D) q and (B, Hkv, Lk, D) k, v.

    Grouped KV heads are expanded; a query row that sees nothing gets zeros (and zero
    gradients), not NaN.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    kx = k.to(compute).repeat_interleave(group, dim=1)
    vx = v.to(compute).repeat_interleave(group, dim=1)
    mask = attention_mask(layout, q.shape[2], k.shape[2], q.device)[:, None]  # (B, 1, Lq, Lk)
    scores = torch.matmul(q.to(compute), kx.transpose(-1, -2)) * scale
    # A finite fill keeps rows that see nothing finite; multiplying by the mask zeroes them.
    scores = scores.masked_fill(~mask, torch.finfo(compute).min)
    probs = torch.softmax(scores, dim=-1) * mask
    return torch.matmul(probs, vx).to(q.dtype)


def causal_prefix_rows(mask: Tensor) -> int:
    """How many leading rows of a square (B, L, L) mask are plain causal in every batch row:
    the dense reference of :meth:`LatentLayout.plain_causal_rows`, which reads the metadata."""
    length = mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    differs = ~(mask == causal).all(-1).all(0)
    first = differs.nonzero()
    return length if first.numel() == 0 else int(first[0])


def grouped_heads(q: Tensor, k: Tensor) -> bool:
    """Whether q has more heads than k (SDPA's ``enable_gqa``) as a plain bool. A branch, not
    the comparison: under torch.compile with dynamic shapes the comparison is symbolic, which
    SDPA refuses, and the branch specialises the graph on the head counts instead."""
    return True if q.shape[1] != k.shape[1] else False  # noqa: SIM210


def latent_attention_sdpa(q: Tensor, k: Tensor, v: Tensor, layout: LatentLayout | None,
                          scale: float) -> Tensor:
    """The same attention on ``torch.nn.functional.scaled_dot_product_attention``.

    Without a KV-cache offset (Lq == Lk), the leading query rows that are plain causal (the
    whole of x in the prefix-sharing layout) run on SDPA's causal kernel, which skips the upper
    triangle; the rows after them take the layout's boolean mask. Numerics are those of SDPA
    in the inputs' dtype, and so is NaN handling: PyTorch 2.13's CPU causal kernel returns
    zeros for a query row holding a NaN, and a NaN key reaches rows whose mask hides it (SDPA
    adds the mask to the scores), where the Triton kernels and the explicit-softmax
    reference give NaN in exactly the rows that see it. A query row that sees nothing
    returns zeros: it attends to key 0 instead and is zeroed afterwards, so its output and
    gradients are zero while key 0 and value 0 are finite (a NaN there, e.g. a padding slot
    left as ``torch.empty`` gave it, makes that row's query gradient and the keys' NaN, where
    the Triton kernels keep them zero: keep padding finite).
    """
    lq, lk = q.shape[2], k.shape[2]
    gqa = grouped_heads(q, k)
    if layout is None and lq == lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=gqa)

    def masks(split: int) -> tuple[int, Tensor, Tensor]:
        """The split, and the rows after it: their mask (a row that sees nothing given key 0)
        and which of them see anything."""
        rest = attention_mask(layout, lq, lk, q.device)[:, split:]  # (B or 1, rows, Lk)
        sees = rest.any(-1, keepdim=True)
        first_key = torch.arange(lk, device=q.device) == 0
        return split, (rest | (~sees & first_key))[:, None], sees[:, None]

    if torch.compiler.is_compiling() or layout is None:
        # Counting the causal rows reads the device (a graph break); the mask alone is exact.
        split, rest, sees = masks(0)
    else:  # built once per layout and query length, not once per layer
        split, rest, sees = layout.cached(
            ("sdpa masks", lq, q.device),
            lambda: masks(layout.plain_causal_rows() if lq == lk else 0))
    parts = []
    if split:
        parts.append(F.scaled_dot_product_attention(
            q[:, :, :split], k[:, :, :split], v[:, :, :split], is_causal=True, scale=scale,
            enable_gqa=gqa))
    if split < lq:
        out = F.scaled_dot_product_attention(q[:, :, split:], k, v, attn_mask=rest,
                                             scale=scale, enable_gqa=gqa)
        parts.append(torch.where(sees, out, 0.0))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
