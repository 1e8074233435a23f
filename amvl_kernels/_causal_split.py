"""x's rows on SDPA's causal kernel, the rows after them on ours: one autograd node.

In the prefix-sharing layout the first rows (x: image and question) are plain causal: each
sees exactly the keys at or before it, so ``is_causal`` attention over the first ``rows`` keys
is their whole mask, and SDPA's causal kernel (cuDNN's on an H100) runs them faster than ours
(RESULTS.md, run E). The rows after them (prior slots, answer, posterior slots) see every key
under the layout's rule and run on our kernels as a block of queries at the end of the keys.

Composing the two from slices, a concatenation and autograd's sums cost more than the split
saved in the 7B proxy's training step: the concatenated output, each slice's gradient
scattered into a zero tensor of the full size and the two added, and the shared keys'
gradients summed (RESULTS.md, the third training-step run: 1.1 ms of the step's kernels).
Here the tail rows' output and dq are written straight into the full tensors, x's rows are
copied in once, and only the x part of dk and dv gets SDPA's share added in place.

SDPA runs inside the node with autograd on, so its own backward (whichever kernel it picked)
computes x's gradients: the price is that SDPA's output for x's rows is kept for the backward
beside the full output, one attention output of x's rows per layer. That graph lives outside
``save_for_backward``, so under saved-tensor hooks (activation checkpointing, offloading) a
call with a backward runs every row on our kernels instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from amvl_kernels._autograd import first_order_only
from amvl_kernels.latent_attention import (TRITON_DTYPES, _autocast_inputs, _backward,
                                           _check_triton_inputs, _forward, _tile_tensors,
                                           _validate, latent_attention)
from amvl_kernels.layout import LatentLayout
from amvl_kernels.reference.latent_attention import grouped_heads


def _sdpa_causal(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                          enable_gqa=grouped_heads(q, k))


class _CausalRowsSplit(torch.autograd.Function):
    """Attention of all rows; the first ``rows`` on SDPA, the others on our kernels with
    ``tiles`` (built for the tail's queries). The tiles travel as trailing inputs."""

    @staticmethod
    def forward(ctx, q, k, v, rows, scale, *tiles):
        # Detached views of x's rows, with a graph of their own for SDPA's backward.
        head_inputs = tuple(t[:, :, :rows].detach().requires_grad_(t.requires_grad)
                            for t in (q, k, v))
        with torch.enable_grad():
            head = _sdpa_causal(*head_inputs, scale)
        out = torch.empty_like(q)  # q's memory layout, as the kernels' and SDPA's outputs
        out[:, :, :rows].copy_(head)
        _, lse = _forward(q[:, :, rows:], k, v, list(tiles), scale, out=out[:, :, rows:])
        ctx.save_for_backward(q, k, v, out, lse, *tiles)
        ctx.head, ctx.head_inputs = head, head_inputs
        ctx.rows, ctx.scale = rows, scale
        return out

    @staticmethod
    @first_order_only("latent_attention", "second-order gradients through it are not "
                      "supported")
    def backward(ctx, grad_out):
        if ctx.head is None:
            raise RuntimeError("a second backward through the split attention (retain_graph="
                               "True): x's rows are released after the first; pass "
                               "backend='triton' to amvl_kernels.latent_attention (or "
                               "amvl_kernels.hf.set_backend('triton')) to keep every row on "
                               "our kernels")
        q, k, v, out, lse, *tiles = ctx.saved_tensors
        rows = ctx.rows
        dq = torch.empty_like(q)
        _, dk, dv = _backward(grad_out[:, :, rows:], q[:, :, rows:], k, v, out[:, :, rows:],
                              lse, tiles, ctx.scale, dq=dq[:, :, rows:])
        wanted = [i for i in range(3) if ctx.needs_input_grad[i]]
        head_grads = dict(zip(wanted, torch.autograd.grad(
            ctx.head, [ctx.head_inputs[i] for i in wanted], grad_out[:, :, :rows])
            if wanted else ()))
        ctx.head = ctx.head_inputs = None  # SDPA's saved tensors go with its graph
        if 0 in head_grads:
            dq[:, :, :rows].copy_(head_grads[0])
        if 1 in head_grads:
            dk[:, :, :rows].add_(head_grads[1])
        if 2 in head_grads:
            dv[:, :, :rows].add_(head_grads[2])
        grads = [g if ctx.needs_input_grad[i] else None for i, g in enumerate((dq, dk, dv))]
        return *grads, None, None, *([None] * len(tiles))


def _saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks are on: non-reentrant activation checkpointing (in the
    forward and in its recomputation alike) or offloading."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None  # unknown: assume so


def causal_rows_on_sdpa(q: Tensor, k: Tensor, v: Tensor, layout: LatentLayout | None,
                        scale: float | None, rows: int, backend: str = "triton") -> Tensor:
    """Attention with the first ``rows`` queries, plain causal ones, on SDPA's causal kernel.

    Those queries see exactly the keys at or before them, so ``is_causal`` over the first
    ``rows`` keys is their whole mask; the queries after them run on ``backend`` as a block
    of queries at the end of all the keys. Lq must equal Lk, and ``rows`` may not exceed the
    layout's :meth:`~amvl_kernels.layout.LatentLayout.plain_causal_rows` (counted once per
    layout: a host sync). With ``backend="triton"`` the two parts make one autograd node (see
    the module's docstring); ``"torch"`` composes them from slices, for reference; ``"auto"``
    is the first on a GPU, the second elsewhere. The
    inputs are checked as :func:`amvl_kernels.latent_attention` checks them, and ``scale``
    None means 1 / sqrt(D).
    """
    q, k, v = _autocast_inputs(q, k, v)
    _validate(q, k, v, layout, scale)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    scale = float(scale)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":  # as latent_attention's: Triton on a GPU, where it takes the dtype
        backend = "triton" if q.is_cuda and q.dtype in TRITON_DTYPES else "torch"
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"causal_rows_on_sdpa needs as many queries as keys, got "
                         f"{q.shape[2]} and {k.shape[2]}")
    if isinstance(rows, bool) or not isinstance(rows, int) or not 0 < rows <= q.shape[2]:
        raise ValueError(f"rows must be an int in [1, {q.shape[2]}], got {rows!r}")
    if backend == "triton":
        _check_triton_inputs(q, k, v)
    if q.numel() == 0 or k.numel() == 0:  # nothing to split: the empty call's own answer
        return latent_attention(q, k, v, layout, scale, backend=backend)
    if layout is not None and rows > layout.plain_causal_rows():
        raise ValueError(f"rows={rows} but the layout's first {layout.plain_causal_rows()} "
                         "rows only are plain causal in every batch row: the rows after them "
                         "see more or less than the keys at or before them")
    q, k, v = q.resolve_neg(), k.resolve_neg(), v.resolve_neg()
    if backend == "torch":
        if rows == q.shape[2]:
            return _sdpa_causal(q, k, v, scale)
        head = _sdpa_causal(q[:, :, :rows], k[:, :, :rows], v[:, :, :rows], scale)
        tail = latent_attention(q[:, :, rows:], k, v, layout, scale, backend=backend)
        return torch.cat([head, tail], dim=2)
    return split_causal_rows(q, k, v, layout, scale, rows)


def split_causal_rows(q: Tensor, k: Tensor, v: Tensor, layout: LatentLayout | None,
                      scale: float, rows: int) -> Tensor:
    """:func:`causal_rows_on_sdpa` on the Triton kernels, without its checks: for
    :func:`amvl_kernels.latent_attention`, which has made them (and counted ``rows``)."""
    if rows == q.shape[2]:
        return _sdpa_causal(q, k, v, scale)
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if backward and _saved_tensors_hooked():
        # The node keeps x's part (SDPA's graph and its inputs) outside save_for_backward,
        # where activation checkpointing or offloading cannot reach it: q, k and v would
        # stay alive through a checkpointed layer. Every row on our kernels instead.
        return latent_attention(q, k, v, layout, scale, backend="triton")
    tiles = _tile_tensors(layout, q.shape[2] - rows, q.shape[1] // k.shape[1], q.shape[-1],
                          q.dtype, q.device, backward)
    if not backward:
        out = torch.empty_like(q)
        out[:, :, :rows].copy_(_sdpa_causal(q[:, :, :rows], k[:, :, :rows], v[:, :, :rows],
                                            scale))
        _forward(q[:, :, rows:], k, v, tiles, scale, out=out[:, :, rows:])
        return out
    return _CausalRowsSplit.apply(q, k, v, rows, scale, *tiles)
