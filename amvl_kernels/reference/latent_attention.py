"""PyTorch reference of latent-block attention: a dense mask from the layout, then softmax.

It is the CPU fallback (``backend="torch"``) and what the kernels are tested against. Scores
and softmax run in float32, or float64 for float64 inputs; the output is in q's dtype. Memory is
quadratic in length, which is why the kernels exist.
"""

from __future__ import annotations

import torch
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
