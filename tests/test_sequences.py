"""Sequence assembly (amvl/sequences.py): the metadata of every column, computed for all
columns at once (eager) and a part at a time (under torch.compile), which must agree."""

from __future__ import annotations

import pytest
import torch

from amvl import sequences
from amvl.sequences import Part, Segment, assemble


def _random_parts(g: torch.Generator, batch: int, widths: list[int], block_kinds: list[str]
                  ) -> dict[str, Part]:
    parts = {}
    for i, (width, how) in enumerate(zip(widths, block_kinds)):
        segment = Segment(int(torch.randint(0, 5, (1,), generator=g)))
        mask = torch.rand(batch, width, generator=g) < 0.7
        if i % 2:
            mask = mask.long()  # collators hand masks as integers too
        ids = torch.randint(0, 1000, (batch, width), generator=g)
        start = torch.randint(0, 50, (batch,), generator=g)
        block = {"int": int(torch.randint(0, 4, (1,), generator=g)),
                 "tuple": tuple(torch.randint(0, 4, (width,), generator=g).tolist()),
                 "tensor": torch.randint(0, 4, (batch, width), generator=g)}[how]
        parts[f"part{i}"] = Part(segment, ids, mask, start, block)
    return parts


@pytest.mark.parametrize("batch,widths,blocks", [
    (3, [7, 1, 5, 11], ["int", "tuple", "int", "int"]),
    (2, [5], ["tuple"]),
    (1, [4, 0, 3], ["int", "int", "tuple"]),
    (4, [6, 2, 9], ["tensor", "int", "tuple"]),
    (0, [3, 2], ["int", "tuple"]),
])
def test_assembled_metadata_equals_a_part_at_a_time(batch, widths, blocks):
    g = torch.Generator().manual_seed(sum(widths) + batch)
    fields = ("input_ids", "segment", "visible_kinds", "block_id", "position_ids")
    for _ in range(3):  # fresh parts, and the cached column constants reused
        parts = _random_parts(g, batch, widths, blocks)
        seq, expected = assemble(parts), sequences._assemble_by_part(parts)
        assert seq.spans == expected.spans
        for name in fields:
            got, want = getattr(seq, name), getattr(expected, name)
            assert got.dtype == want.dtype, name
            assert torch.equal(got, want), name
        # the rule itself, on one part: positions count real tokens up from the part's start
        first = parts["part0"]
        mask = first.mask.bool()
        rank = mask.long().cumsum(-1) - 1
        want = torch.where(mask, first.start[:, None] + rank.clamp(min=0), 0)
        assert torch.equal(seq.position_ids[:, :widths[0]], want)
        assert torch.equal(seq.segment[:, :widths[0]] == int(Segment.PAD), ~mask)
        column = 0
        for name, width in zip(parts, widths):
            assert seq.spans[name] == (column, column + width)
            column += width


def test_column_constants_are_built_once_per_structure():
    """The per-column constants depend on the parts' kinds, widths and blocks only: a second
    batch of the same structure builds nothing."""
    sequences._column_constants.cache_clear()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        assemble(_random_parts(torch.Generator().manual_seed(1), 2, [3, 4], ["int", "tuple"]))
    assert sequences._column_constants.cache_info().misses == 1
    assemble(_random_parts(g, 2, [3, 5], ["int", "int"]))
    assert sequences._column_constants.cache_info().misses == 2


def test_a_tuple_of_blocks_must_cover_its_part():
    part = Part(Segment.LATENT, torch.zeros(1, 3, dtype=torch.long),
                torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, dtype=torch.long), (0, 3))
    with pytest.raises(ValueError, match="as many as its columns"):
        assemble({"latent": part})
