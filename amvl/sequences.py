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

import functools
from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.nn.functional as F
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
    block: bidirectional block id of the part's real tokens (0 = causal): an int, a tuple of
        n ints (per column, the same in every row), or a (B, n) tensor.
    """

    segment: Segment
    ids: Tensor
    mask: Tensor
    start: Tensor
    block: int | tuple[int, ...] | Tensor = 0


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
    """Concatenate named parts column-wise; padding becomes ``Segment.PAD``.

    A training step assembles a few sequences of several parts each, and on a GPU its host
    is what it waits for: the metadata is computed for all the columns at once (about 15
    launches a sequence, where a part at a time takes 13 a part), from per-column constants
    that depend only on the parts' kinds, widths and blocks, built once per such structure.
    Under torch.compile, which fuses the launches anyway, a part at a time: the constants
    would pin every part's width in the graph (a recompile per prompt length).
    """
    if torch.compiler.is_compiling():
        return _assemble_by_part(parts)
    spans, column = {}, 0
    for name, part in parts.items():
        spans[name] = (column, column + part.ids.shape[1])
        column += part.ids.shape[1]
    values = list(parts.values())
    device = values[0].ids.device
    one = len(values) == 1
    mask = (values[0].mask if one else torch.cat([p.mask for p in values], 1)).bool()
    structure = tuple((int(p.segment), p.ids.shape[1],
                       None if isinstance(p.block, Tensor) else p.block) for p in values)
    kinds, index = _column_constants(structure, device)
    segment = torch.where(mask, kinds[0], int(Segment.PAD))
    visible = torch.where(mask, kinds[1], 0)
    block = torch.where(mask, kinds[2], 0)
    for (begin, end), p in zip(spans.values(), values):
        if isinstance(p.block, Tensor):  # per row: written over its columns' zeros
            block[:, begin:end] = mask[:, begin:end] * p.block
    # Each real token's rank among its part's real tokens, from one running count: the count
    # before the part's first column is subtracted.
    counts = mask.long().cumsum(-1)
    before = F.pad(counts, (1, 0)).index_select(1, index[0])
    starts = (values[0].start[:, None] if one else torch.stack([p.start for p in values], 1))
    offset = (counts - before - 1).clamp(min=0)
    position = torch.where(mask, starts.index_select(1, index[1]) + offset, 0)
    ids = values[0].ids if one else torch.cat([p.ids for p in values], 1)
    return Sequence(ids, segment, visible, block, position, spans)


def _assemble_by_part(parts: dict[str, Part]) -> Sequence:
    """:func:`assemble`, a part at a time."""
    ids, segment, visible, block, position, spans = [], [], [], [], [], {}
    column = 0
    for name, part in parts.items():
        mask = part.mask.bool()
        blocks = torch.tensor(part.block, device=mask.device) if isinstance(part.block, tuple) \
            else part.block
        ids.append(part.ids)
        segment.append(torch.where(mask, int(part.segment), int(Segment.PAD)).to(torch.int32))
        # A Python int per part: no lookup table to copy to the device on every pass.
        visible.append(torch.where(mask, VISIBLE_KINDS[part.segment], 0).to(torch.int32))
        block.append((mask * blocks).to(torch.int32))
        offset = (mask.long().cumsum(-1) - 1).clamp(min=0)
        position.append(torch.where(mask, part.start[:, None] + offset, 0))
        spans[name] = (column, column + part.ids.shape[1])
        column += part.ids.shape[1]
    return Sequence(torch.cat(ids, 1), torch.cat(segment, 1), torch.cat(visible, 1),
                    torch.cat(block, 1), torch.cat(position, 1), spans)


@functools.lru_cache(maxsize=64)
def _column_constants(structure: tuple[tuple[int, int, int | tuple[int, ...] | None], ...],
                      device: torch.device) -> tuple[Tensor, Tensor]:
    """Per column of a sequence of parts (segment kind, width, block: an int, a tuple per
    column, None for a tensor), on ``device``: (3, L) int32 of the part's segment kind, its
    visible-kinds set and its block id, and (2, L) int64 of the part's first column and the
    part's index. Built on the CPU and copied without a host sync (pinned memory) on a GPU:
    with padding to each batch's longest row the widths, hence the structure, can change
    every step. The copy runs on the current stream, which the kernels reading the constants
    follow."""
    widths = torch.tensor([width for _, width, _ in structure], dtype=torch.long)
    per_part = torch.tensor([[kind, VISIBLE_KINDS[Segment(kind)]] for kind, _, _ in structure],
                            dtype=torch.int32).reshape(-1, 2).t()
    blocks = [torch.tensor(block, dtype=torch.int32) if isinstance(block, tuple)
              else torch.full((width,), block or 0, dtype=torch.int32)
              for _, width, block in structure]
    if any(b.numel() != width for b, (_, width, _) in zip(blocks, structure)):
        raise ValueError("a part's per-column block ids must be as many as its columns")
    kinds = torch.cat([per_part.repeat_interleave(widths, dim=1), torch.cat(blocks)[None]])
    index = torch.stack([widths.cumsum(0) - widths, torch.arange(len(structure))])
    index = index.repeat_interleave(widths, dim=1)
    if device.type == "cuda":
        return (kinds.pin_memory().to(device, non_blocking=True),
                index.pin_memory().to(device, non_blocking=True))
    return kinds.to(device), index.to(device)


def concat(first: Sequence, second: Sequence) -> Sequence:
    """``second`` appended after ``first`` (e.g. a cached prefix and the tail fed after it)."""
    width = first.input_ids.shape[1]
    spans = {**first.spans, **{n: (b + width, e + width) for n, (b, e) in second.spans.items()}}
    return Sequence(*(torch.cat([getattr(first, f), getattr(second, f)], 1)
                      for f in ("input_ids", "segment", "visible_kinds", "block_id",
                                "position_ids")), spans)


def repeat_rows(seq: Sequence, n: int) -> Sequence:
    """``seq`` with each row ``n`` times in a row (the rows of a batch's ``n`` draws)."""
    return Sequence(*(getattr(seq, f).repeat_interleave(n, 0)
                      for f in ("input_ids", "segment", "visible_kinds", "block_id",
                                "position_ids")), dict(seq.spans))


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
