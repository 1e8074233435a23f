"""LatentLayout: validation, builders, and tile maps that agree with the dense mask."""

from __future__ import annotations

import pytest
import torch

from amvl_kernels.layout import EMPTY, FULL, PARTIAL, Kind, LatentLayout, kind_bits
from tests.conftest import DEVICE


def random_layout(batch: int, length: int, generator: torch.Generator) -> LatentLayout:
    """Random kinds, visibility bits, bidirectional blocks and documents."""
    kind = torch.randint(0, 4, (batch, length), generator=generator)
    visible = torch.randint(0, 16, (batch, length), generator=generator)
    # runs of tokens share a block id (0 = none) and a document
    block = torch.randint(0, 3, (batch, length // 5 + 1), generator=generator)
    block = block.repeat_interleave(5, dim=1)[:, :length]
    doc = torch.randint(0, 2, (batch, length // 11 + 1), generator=generator)
    doc = doc.repeat_interleave(11, dim=1)[:, :length].cumsum(1)
    return LatentLayout.from_tensors(kind, visible, block, doc)


def test_rule_matches_a_loop_over_positions(rng_seed):
    g = torch.Generator().manual_seed(rng_seed)
    layout = random_layout(2, 23, g)
    mask = layout.dense_mask(9)
    kind, vis, block, doc = layout.metadata()
    for b in range(2):
        for qi in range(9):
            i = 23 - 9 + qi
            for j in range(23):
                want = bool((int(vis[b, i]) >> int(kind[b, j])) & 1) and doc[b, i] == doc[b, j] \
                    and (j <= i or (block[b, i] > 0 and block[b, i] == block[b, j]))
                assert bool(mask[b, qi, j]) == want, (b, i, j)


@pytest.mark.parametrize("lq", [1, 17, 61])
@pytest.mark.parametrize("tiles", [(16, 16), (32, 16), (16, 64)])
def test_tile_map_agrees_with_dense_mask(lq, tiles, rng_seed):
    g = torch.Generator().manual_seed(rng_seed)
    # tile maps come from a Triton kernel: on the GPU when there is one
    layout = random_layout(3, 61, g).to(DEVICE)
    bm, bn = tiles
    tm = layout.tile_map(lq, bm, bn)
    mask = layout.dense_mask(lq)
    n_m, n_n = tm.classes.shape[1:]
    assert (n_m, n_n) == (-(-lq // bm), -(-61 // bn))
    for b in range(3):
        for m in range(n_m):
            for n in range(n_n):
                tile = mask[b, m * bm:(m + 1) * bm, n * bn:(n + 1) * bn]
                # exact: FULL needs a whole key tile (no keys past the end), rows past the end
                # do not count (the dense mask has none)
                want = EMPTY if not tile.any() else \
                    FULL if tile.all() and tile.shape[1] == bn else PARTIAL
                assert int(tm.classes[b, m, n]) == want, (b, m, n)
    # The index lists hold exactly the FULL / PARTIAL pairs, ascending.
    for b in range(3):
        for m in range(n_m):
            for kind, lst, cnt in ((FULL, tm.row_full, tm.row_full_count),
                                   (PARTIAL, tm.row_partial, tm.row_partial_count)):
                want = (tm.classes[b, m] == kind).nonzero().flatten().tolist()
                assert lst[b, m, :int(cnt[b, m])].tolist() == want
        for n in range(n_n):
            for kind, lst, cnt in ((FULL, tm.col_full, tm.col_full_count),
                                   (PARTIAL, tm.col_partial, tm.col_partial_count)):
                want = (tm.classes[b, :, n] == kind).nonzero().flatten().tolist()
                assert lst[b, n, :int(cnt[b, n])].tolist() == want
    assert layout.tile_map(lq, bm, bn) is tm  # cached: shared by every layer and head


def test_classify_tiles_op_passes_opcheck(rng_seed):
    layout = random_layout(2, 37, torch.Generator().manual_seed(rng_seed)).to(DEVICE)
    torch.library.opcheck(torch.ops.amvl.classify_tiles.default,
                          (*layout.metadata(), 21, 16, 16))


@pytest.mark.parametrize("batch,n_m,n_n", [(3, 5, 7), (2, 1, 9), (1, 13, 1), (2, 17, 33)])
@pytest.mark.parametrize("how", ["sort", "kernel"])
def test_tile_lists_are_a_stable_partition_per_line(batch, n_m, n_n, how, rng_seed):
    """Per query tile (key tile), the key (query) tiles of a class first, ascending, then the
    others, ascending, and their count; from torch's sorts and from the Triton kernel."""
    from amvl_kernels.layout import _lists_by_kernel, _lists_by_sort

    g = torch.Generator().manual_seed(rng_seed)
    classes = torch.randint(0, 3, (batch, n_m, n_n), generator=g, dtype=torch.int8)
    lists = _lists_by_sort if how == "sort" else _lists_by_kernel
    rows, row_counts, cols, col_counts = (t.cpu() for t in lists(classes.to(DEVICE)))
    for which, kind in enumerate((FULL, PARTIAL)):
        for got, counts, lines in ((rows, row_counts, classes), (cols, col_counts,
                                                                 classes.transpose(1, 2))):
            for index in torch.cartesian_prod(*(torch.arange(n) for n in lines.shape[:2])):
                b, line = index.tolist()
                chosen = [i for i, c in enumerate(lines[b, line].tolist()) if c == kind]
                others = [i for i, c in enumerate(lines[b, line].tolist()) if c != kind]
                assert got[which, b, line].tolist() == chosen + others
                assert counts[which, b, line] == len(chosen)


@pytest.mark.parametrize("by_kernel", [False, True])
def test_tile_maps_are_the_same_either_way(by_kernel, rng_seed, monkeypatch):
    """A layout's tile map with its lists from the kernel equals one from the sorts."""
    from amvl_kernels import layout as module

    monkeypatch.setattr(module, "LISTS_BY_KERNEL", by_kernel)
    built = random_layout(2, 45, torch.Generator().manual_seed(rng_seed)).to(DEVICE)
    got = built.tile_map(29, 16, 16)
    monkeypatch.setattr(module, "LISTS_BY_KERNEL", not by_kernel)
    again = LatentLayout(*built.metadata()).tile_map(29, 16, 16)
    for name in got.__dataclass_fields__:
        assert torch.equal(getattr(got, name), getattr(again, name)), name


def test_tile_lists_op_passes_opcheck(rng_seed):
    g = torch.Generator().manual_seed(rng_seed)
    classes = torch.randint(0, 3, (2, 3, 5), generator=g, dtype=torch.int8).to(DEVICE)
    torch.library.opcheck(torch.ops.amvl.tile_lists.default, (classes,))


def test_tile_map_of_causal_layout_is_exact():
    layout = LatentLayout.causal(1, 64).to(DEVICE)
    tm = layout.tile_map(64, 16, 16)
    expected = torch.tensor([[2 if n < m else (1 if n == m else 0) for n in range(4)]
                             for m in range(4)], dtype=torch.int8, device=DEVICE)
    assert torch.equal(tm.classes[0], expected)


def test_builders():
    layout = LatentLayout.with_latent_blocks(12, [[(3, 4)], [(0, 2), (8, 3)]])
    mask = layout.dense_mask()
    assert mask[0, 3, 6] and mask[0, 6, 3] and not mask[0, 2, 3] and mask[0, 7, 6]
    assert mask[1, 0, 1] and mask[1, 8, 10] and not mask[1, 7, 8]

    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[0, :2] = False
    mask = LatentLayout.causal(2, 6, pad).dense_mask()
    assert not mask[0, :, :2].any() and not mask[0, :2].any() and mask[0, 5, 2:].all()

    layout = LatentLayout.prefix_sharing([3, 2], [2, 4], num_slots=2)
    mask = layout.dense_mask()
    # row 0: x = 0..2, P = 3..4, y = 5..6, Q = 7..8
    assert mask[0, 3, 4] and mask[0, 4, 3] and mask[0, 3, :3].all()
    assert not mask[0, 5, 3:5].any() and mask[0, 6, 5] and mask[0, 6, :3].all()
    assert mask[0, 7, 8] and mask[0, 8, 5:7].all() and not mask[0, 8, 3:5].any()
    assert not mask[0, :, 9:].any()  # row 0 is padded to row 1's length

    mask = LatentLayout.packed([[2, 3], [4]], 6).dense_mask()
    assert mask[0, 1, 0] and not mask[0, 2, 1] and mask[0, 4, 2] and not mask[1, :, 4:].any()


@pytest.mark.parametrize("build,error,match", [
    (lambda: LatentLayout.from_tensors(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int32),
                                       torch.zeros(2, 3, dtype=torch.int32)), TypeError,
     "segment_kind"),
    (lambda: LatentLayout.from_tensors(*[torch.zeros(2, 3, dtype=torch.int32)] * 2,
                                       torch.zeros(2, 3, dtype=torch.int32).to(torch.uint32)),
     TypeError, "block_id has dtype torch.uint32"),
    (lambda: LatentLayout.from_tensors(torch.zeros(2, 3, dtype=torch.int32),
                                       torch.zeros(2, 4, dtype=torch.int32),
                                       torch.zeros(2, 3, dtype=torch.int32)), ValueError,
     "visible_kinds"),
    (lambda: LatentLayout.from_tensors(torch.full((1, 3), 40), torch.zeros(1, 3, dtype=torch.int64),
                                       torch.zeros(1, 3, dtype=torch.int64)), ValueError,
     "segment_kind"),
    (lambda: LatentLayout.from_tensors(torch.zeros(3, dtype=torch.int32),
                                       torch.zeros(3, dtype=torch.int32),
                                       torch.zeros(3, dtype=torch.int32)), ValueError,
     "batch, length"),
    # ids past int32 would wrap in the kernels' metadata: a block turned off, documents merged
    (lambda: LatentLayout.from_tensors(torch.zeros(1, 3, dtype=torch.int64),
                                       torch.ones(1, 3, dtype=torch.int64),
                                       torch.tensor([[0, 2**31, 2**31]])), ValueError,
     "block_id must be < 2"),
    (lambda: LatentLayout.from_tensors(torch.zeros(1, 3, dtype=torch.int64),
                                       torch.ones(1, 3, dtype=torch.int64),
                                       torch.zeros(1, 3, dtype=torch.int64),
                                       torch.tensor([[0, 0, 2**32]])), ValueError, "doc_id"),
    (lambda: LatentLayout.with_latent_blocks(5, [[(3, 4)]]), ValueError, "does not fit"),
    (lambda: LatentLayout.with_latent_blocks(9, [[(1, 4), (3, 2)]]), ValueError, "overlap"),
    (lambda: LatentLayout.packed([[4, 4]], 6), ValueError, "do not fit"),
    # empty documents and blocks were reported as not fitting, which they do
    (lambda: LatentLayout.packed([[3, 0, 2]], 10), ValueError,
     r"document length must be >= 1, got doc_lengths\[0\]\[1\] = 0"),
    (lambda: LatentLayout.with_latent_blocks(10, [[(2, 0)]]), ValueError,
     r"block size must be >= 1, got size 0 in blocks\[0\]\[0\]"),
    # sizes that were truncated, read by truthiness, or failed deep inside torch
    (lambda: LatentLayout.prefix_sharing([2.7], [1.9], 1), TypeError, r"prompt_lengths\[0\]"),
    (lambda: LatentLayout.prefix_sharing(["3"], [1], 1), TypeError, "prompt_lengths"),
    (lambda: LatentLayout.prefix_sharing([3], [1], True), TypeError, "num_slots"),
    (lambda: LatentLayout.causal(-1, 4), ValueError, "batch must be >= 0"),
    (lambda: LatentLayout.causal(2, 2.0), TypeError, "length must be an int"),
    (lambda: LatentLayout.causal(1, 4, torch.tensor([[0.0, float("-inf"), 0.0, 0.0]])),
     TypeError, "padding_mask must be a bool"),
    (lambda: LatentLayout.causal(1, 2, [[True, False]]), TypeError, "padding_mask must be a"),
    (lambda: LatentLayout.with_latent_blocks(8, [[(1.0, 2)]]), TypeError, "start of blocks"),
    (lambda: LatentLayout.with_latent_blocks(8, [[(1, 2, 3)]]), TypeError, "pairs"),
    (lambda: LatentLayout.with_latent_blocks(8, [[(True, True)]]), TypeError, "start"),
    (lambda: LatentLayout.with_latent_blocks(8, [[(-1, 2)]]), ValueError, "start"),
    (lambda: LatentLayout.packed([[2.0, 2]], 5), TypeError, r"doc_lengths\[0\]\[0\]"),
    (lambda: LatentLayout.packed([[]], -1), ValueError, "length must be >= 0"),
    (lambda: LatentLayout.causal(1, 4).dense_mask(2.0), TypeError, "num_queries"),
    # the constructor bypassed every check: float metadata, which only Triton refused
    (lambda: LatentLayout(*[torch.zeros(1, 3)] * 4), TypeError, "from_tensors"),
    (lambda: LatentLayout(*[torch.zeros(1, 3, dtype=torch.int32)] * 3,
                          torch.zeros(1, 4, dtype=torch.int32)), ValueError, "doc_id"),
    # tile maps read past the layout (out of bounds on a GPU) or failed inside Triton
    (lambda: LatentLayout.causal(1, 8).tile_map(100, 16, 16), ValueError, "num_queries"),
    (lambda: LatentLayout.causal(1, 8).tile_map(-1, 16, 16), ValueError, "num_queries"),
    (lambda: LatentLayout.causal(1, 8).tile_map(8, 3, 16), ValueError, "block_m must be"),
    (lambda: LatentLayout.causal(1, 8).tile_map(8, 16, 0), ValueError, "block_n must be"),
])
def test_bad_layouts_are_named(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_kind_bits():
    assert kind_bits(Kind.TEXT, Kind.ANSWER) == 0b101


def test_builders_take_lengths_as_tensors_and_numpy_integers():
    """Lengths computed from masks (0-d integer tensors, tensors of lengths) and NumPy pairs
    are what a training loop has at hand; they worked before sizes were checked, and must."""
    import numpy as np

    expected = LatentLayout.prefix_sharing([2, 3], [1, 2], 2).dense_mask()
    for lengths in (torch.tensor([2, 3]), np.array([2, 3])):
        answers = torch.tensor([1, 2]) if isinstance(lengths, torch.Tensor) else np.array([1, 2])
        got = LatentLayout.prefix_sharing(lengths, answers, torch.tensor(2)).dense_mask()
        assert torch.equal(got, expected)
    blocks = LatentLayout.with_latent_blocks(8, [[(1, 2)], [(0, 3)]]).dense_mask()
    assert torch.equal(LatentLayout.with_latent_blocks(
        8, np.array([[[1, 2]], [[0, 3]]])).dense_mask(), blocks)
    assert torch.equal(LatentLayout.packed([torch.tensor([2, 3])], 6).dense_mask(),
                       LatentLayout.packed([[2, 3]], 6).dense_mask())
    assert LatentLayout.causal(2, torch.tensor(5)).length == 5


def test_a_layout_owns_its_metadata():
    """from_tensors shared the caller's int32 tensors: changed in place afterwards (a reused
    buffer), they left the cached tile maps and masks stale (output off by 1.1). A layout now
    keeps copies, unless told the tensors never change."""
    kind = torch.zeros(1, 6, dtype=torch.int32)
    visible = torch.ones(1, 6, dtype=torch.int32)
    block = torch.tensor([[0, 1, 1, 1, 0, 0]], dtype=torch.int32)
    layout = LatentLayout.from_tensors(kind, visible, block)
    before = layout.dense_mask().clone()
    block.zero_()
    assert torch.equal(layout.dense_mask(), before)
    shared = LatentLayout.from_tensors(kind, visible, block, copy=False)
    assert shared.block_id.data_ptr() == block.data_ptr()


def test_the_constructor_refuses_strided_views():
    """A view of a longer buffer (a decode loop's preallocated metadata) reached the tile
    classifier, which indexes rows by the length: the Triton output was off by 2.28."""
    buffer = LatentLayout.with_latent_blocks(12, [[(2, 3)], [(4, 2)]]).metadata()
    with pytest.raises(ValueError, match="contiguous"):
        LatentLayout(*(t[:, :8] for t in buffer))
    view = LatentLayout.from_tensors(*(t[:, :8] for t in buffer))
    assert torch.equal(view.dense_mask(), LatentLayout.with_latent_blocks(
        8, [[(2, 3)], [(4, 2)]]).dense_mask())


def test_value_checks_can_be_skipped_but_not_shape_checks():
    kind = torch.full((1, 3), 40)
    zeros = torch.zeros(1, 3, dtype=torch.int64)
    LatentLayout.from_tensors(kind, zeros, zeros, check_values=False)  # trusted: no host sync
    with pytest.raises(ValueError, match="visible_kinds"):
        LatentLayout.from_tensors(kind, zeros[:, :2], zeros, check_values=False)


def test_plain_causal_rows_on_the_builders():
    """Exactly the rows whose dense mask is causal, read from the metadata alone."""
    from amvl_kernels.reference.latent_attention import causal_prefix_rows

    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[1, 9:] = False  # right padding: rows from 9 on see nothing
    left = torch.ones(2, 12, dtype=torch.bool)
    left[0, :2] = False  # left padding: no row of batch row 0 is plain causal
    layouts = {
        "prefix sharing": (LatentLayout.prefix_sharing([13, 20], [9, 4], num_slots=4), 13),
        "causal": (LatentLayout.causal(2, 9), 9),
        "right padding": (LatentLayout.causal(2, 12, padding), 9),
        "left padding": (LatentLayout.causal(2, 12, left), 0),
        "latent block": (LatentLayout.with_latent_blocks(20, [[(6, 3)], [(9, 2)]]), 6),
        "packed": (LatentLayout.packed([[5, 4], [7]], 12), 5),
    }
    for name, (layout, rows) in layouts.items():
        assert layout.plain_causal_rows() == rows, name
        assert causal_prefix_rows(layout.dense_mask()) == rows, name


def test_plain_causal_rows_never_claims_a_row_the_mask_does_not_allow(rng_seed):
    """A plain causal prefix followed by random metadata: every claimed row is causal in the
    dense mask, and the prefix is always found."""
    from amvl_kernels.reference.latent_attention import causal_prefix_rows

    g = torch.Generator().manual_seed(rng_seed)
    for _ in range(20):
        prefix, tail = (int(torch.randint(0, 15, (), generator=g)) for _ in range(2))
        rest = random_layout(3, tail + 1, g)
        head = [torch.full((3, prefix), fill) for fill in (Kind.TEXT, kind_bits(Kind.TEXT), 0,
                                                           0)]
        layout = LatentLayout.from_tensors(
            *(torch.cat([h, t[:, 1:]], 1) for h, t in zip(head, rest.metadata())))
        rows = layout.plain_causal_rows()
        assert prefix <= rows <= causal_prefix_rows(layout.dense_mask())
        torch.testing.assert_close(layout.dense_mask()[:, :rows, :rows],
                                   torch.ones(rows, rows, dtype=torch.bool).tril()
                                   .expand(3, -1, -1))


def test_builders_compile_as_one_graph():
    """The padding layout is built inside every compiled forward of a model on the "amvl"
    attention: it must trace without graph breaks (an IntEnum compared with a tensor does
    not)."""
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :3] = False
    torch._dynamo.reset()
    compiled = torch.compile(lambda m: LatentLayout.causal(2, 12, m).visible_kinds,
                             fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(mask), LatentLayout.causal(2, 12, mask).visible_kinds)
    # from_tensors' value checks and with_latent_blocks' overlap check read the device, which
    # failed a fullgraph compile (data-dependent branches): skipped there, run eagerly
    blocks = [[(2, 3), (7, 2)], [(4, 4)]]
    compiled = torch.compile(lambda m: LatentLayout.with_latent_blocks(12, blocks, m).metadata(),
                             fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(mask), LatentLayout.with_latent_blocks(12, blocks, mask)
                         .metadata()):
        torch.testing.assert_close(got, want)
    kind = torch.randint(0, 3, (2, 12))
    compiled = torch.compile(lambda k: LatentLayout.from_tensors(k, 1 << k, k % 2).block_id,
                             fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(kind), (kind % 2).int())


def test_a_device_given_beside_a_padding_mask_must_be_its_own():
    """It was ignored: the layout went to the mask's device whatever device= said."""
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert LatentLayout.causal(1, 4, mask, device="cpu").segment_kind.device == mask.device
    with pytest.raises(ValueError, match="device=meta but padding_mask is on cpu"):
        LatentLayout.causal(1, 4, mask, device="meta")
