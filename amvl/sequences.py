"""Token sequences of a latent-reasoning batch and their per-token metadata (DESIGN.md 3).

A sequence is assembled from parts (prompt x, prior query slots P, answer y, posterior query
slots Q, the latent block ``<lat_start> z_1..z_K <lat_end>``). Every token carries a segment
kind, the bit set of kinds it may see, a bidirectional block id and a position; these are the
inputs of ``amvl_kernels.LatentLayout.from_tensors`` and of the dense masks of the naive path.

Visibility (who sees whom, on top of causality and padding):
    prompt -> prompt                      prior query P -> prompt, P (never y)
    answer -> prompt, latent, answer      posterior query Q -> prompt, answer, Q
    latent -> prompt, latent              padding -> nothing, and nobody sees padding
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

from amvl_kernels.layout import kind_bits


class Segment(IntEnum):
    """The kind of each token; its value is the token's bit in a ``visible_kinds`` set
    (:data:`VISIBLE_KINDS`)."""

    PROMPT = 0
    PRIOR_QUERY = 1
    ANSWER = 2
    POSTERIOR_QUERY = 3
    LATENT = 4
    PAD = 5


VISIBLE_KINDS = {
    Segment.PROMPT: kind_bits(Segment.PROMPT),
    Segment.PRIOR_QUERY: kind_bits(Segment.PROMPT, Segment.PRIOR_QUERY),
    Segment.ANSWER: kind_bits(Segment.PROMPT, Segment.LATENT, Segment.ANSWER),
    Segment.POSTERIOR_QUERY: kind_bits(Segment.PROMPT, Segment.ANSWER, Segment.POSTERIOR_QUERY),
    Segment.LATENT: kind_bits(Segment.PROMPT, Segment.LATENT),
    Segment.PAD: 0,
}

# Bidirectional block ids, 0 = causal.
PRIOR_BLOCK, POSTERIOR_BLOCK, LATENT_BLOCK = 1, 2, 3


@dataclass
class Part:
    """One stretch of tokens in every row of a batch.

    ids, mask: (B, n); mask marks real tokens (False = padding).
    start: (B,) position of the part's first real token; later real tokens count up from it.
    block: bidirectional block id of the part's real tokens (0 = causal), an int or (B, n).
    """

    segment: Segment
    ids: Tensor
    mask: Tensor
    start: Tensor
    block: int | Tensor = 0


@dataclass
class Sequence:
    """An assembled batch: ids and per-token metadata, all (B, L)."""

    input_ids: Tensor
    segment: Tensor
    visible_kinds: Tensor  # each token's VISIBLE_KINDS bit set (0 on padding)
    block_id: Tensor
    position_ids: Tensor
    spans: dict[str, tuple[int, int]]  # part name -> [begin, end) columns

    @property
    def real(self) -> Tensor:
        """(B, L) bool, True on real tokens (False on padding)."""
        return self.segment != Segment.PAD

    def columns(self, name: str) -> slice:
        """The columns of part ``name``, as a slice (KeyError for an unknown part)."""
        begin, end = self.spans[name]
        return slice(begin, end)


def assemble(parts: dict[str, Part]) -> Sequence:
    """Concatenate named parts column-wise; padding becomes ``Segment.PAD``."""
    ids, segment, visible, block, position, spans = [], [], [], [], [], {}
    column = 0
    for name, part in parts.items():
        mask = part.mask.bool()
        ids.append(part.ids)
        segment.append(torch.where(mask, int(part.segment), int(Segment.PAD)).to(torch.int32))
        # A Python int per part: no lookup table to copy to the device on every pass.
        visible.append(torch.where(mask, VISIBLE_KINDS[part.segment], 0).to(torch.int32))
        block.append((mask * part.block).to(torch.int32))
        offset = (mask.long().cumsum(-1) - 1).clamp(min=0)
        position.append(torch.where(mask, part.start[:, None] + offset, 0))
        spans[name] = (column, column + part.ids.shape[1])
        column += part.ids.shape[1]
    return Sequence(torch.cat(ids, 1), torch.cat(segment, 1), torch.cat(visible, 1),
                    torch.cat(block, 1), torch.cat(position, 1), spans)


def concat(first: Sequence, second: Sequence) -> Sequence:
    """``second`` appended after ``first`` (e.g. a cached prefix and the tail fed after it)."""
    width = first.input_ids.shape[1]
    spans = {**first.spans, **{n: (b + width, e + width) for n, (b, e) in second.spans.items()}}
    return Sequence(*(torch.cat([getattr(first, f), getattr(second, f)], 1)
                      for f in ("input_ids", "segment", "visible_kinds", "block_id",
                                "position_ids")), spans)


def slots(token_id: int, batch: int, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """ids and mask of K copies of one special token in every row."""
    ids = torch.full((batch, k), token_id, dtype=torch.long, device=device)
    return ids, torch.ones_like(ids, dtype=torch.bool)


def dense_mask(keys: Sequence, num_queries: int) -> Tensor:
    """(B, Lq, Lk) bool mask of DESIGN.md section 3 with the queries the last Lq keys.

    The naive path's reference; the "amvl" attention builds the same mask from the same
    metadata without materialising it.
    """
    kind, visible, block = keys.segment.long(), keys.visible_kinds.long(), keys.block_id
    lk = kind.shape[1]
    q = slice(lk - num_queries, lk)
    sees_kind = ((visible[:, q, None] >> kind[:, None, :]) & 1).bool()
    i = torch.arange(lk - num_queries, lk, device=kind.device)[:, None]
    j = torch.arange(lk, device=kind.device)[None, :]
    same_block = (block[:, q, None] > 0) & (block[:, q, None] == block[:, None, :])
    return sees_kind & ((j <= i)[None] | same_block)
