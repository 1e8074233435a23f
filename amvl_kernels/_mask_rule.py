"""The mask rule of DESIGN.md section 3 as a Triton helper.

One definition shared by the attention kernels and the tile classifier of
:meth:`amvl_kernels.layout.LatentLayout.tile_map`, so the two can never disagree.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mask_rule(pos_i, vis_i, blk_i, doc_i, pos_j, kind_j, blk_j, doc_j, HAS_LAYOUT: tl.constexpr):
    """allowed(i, j), elementwise on broadcastable query (i) and key (j) metadata, so tiles can
    hold their queries along either axis. Without a layout: plain causal."""
    causal = pos_j <= pos_i
    if HAS_LAYOUT:
        sees = ((vis_i >> kind_j) & 1) != 0
        same_block = (blk_i > 0) & (blk_i == blk_j)
        return sees & (doc_i == doc_j) & (causal | same_block)
    else:
        return causal
