"""Who may attend to whom: the per-token metadata of latent-block attention (DESIGN.md 3).

A :class:`LatentLayout` holds four integer tensors of shape (B, Lk), one entry per key token.
For query position i and key position j (absolute positions; with a KV cache the queries are
the last Lq of the Lk keys):

    allowed(i, j) = (visible_kinds[i] >> segment_kind[j]) & 1
                    and doc_id[i] == doc_id[j]
                    and (j <= i or (block_id[i] > 0 and block_id[i] == block_id[j]))

The kernels never build this (B, Lq, Lk) mask. They read the metadata of the tokens of a tile
and, before that, a :class:`TileMap`: each (query tile, key tile) pair classified once per
layout as empty (skipped), partial (masked) or full (no mask arithmetic). Tile maps are cached
on the layout, so every layer and head of a forward pass shares them.

Builders cover the common layouts: :meth:`LatentLayout.causal` (with padding),
:meth:`LatentLayout.with_latent_blocks`, :meth:`LatentLayout.prefix_sharing` and
:meth:`LatentLayout.packed`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import torch
import triton
import triton.language as tl
from torch import Tensor

from amvl_kernels._mask_rule import mask_rule
from amvl_kernels._validation import check_count
from amvl_kernels.backends import triton_interpreted

MAX_KINDS = 31  # visible_kinds is an int32 bit set
_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


class Kind(IntEnum):
    """Segment kinds the builders use (any integers in [0, 31) work with ``from_tensors``)."""

    TEXT = 0
    PRIOR_QUERY = 1
    ANSWER = 2
    POSTERIOR_QUERY = 3
    LATENT = 4
    PAD = 5


def kind_bits(*kinds: int) -> int:
    """The ``visible_kinds`` bit set of the given kinds."""
    return sum(1 << int(k) for k in set(kinds))


EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class TileMap:
    """Classes of (query tile, key tile) pairs for one tile shape and one query length, and
    the same as index lists the kernels loop over without branching (so their loads pipeline).

    classes: (B, n_query_tiles, n_key_tiles) int8, EMPTY / PARTIAL / FULL.
    row_full, row_partial: (B, n_query_tiles, n_key_tiles) int32; row m lists, ascending, the
        key tiles whose pair with query tile m is FULL (PARTIAL); the first
        ``row_full_count[b, m]`` (``row_partial_count``) entries are valid.
    col_full, col_partial: (B, n_key_tiles, n_query_tiles) int32, the same per key tile, with
        ``col_full_count`` and ``col_partial_count`` (B, n_key_tiles).
    """

    classes: Tensor
    row_full: Tensor
    row_full_count: Tensor
    row_partial: Tensor
    row_partial_count: Tensor
    col_full: Tensor
    col_full_count: Tensor
    col_partial: Tensor
    col_partial_count: Tensor


# Compiled kernels read globals only as tl.constexpr instances (the interpreter is laxer).
_EMPTY = tl.constexpr(EMPTY)
_PARTIAL = tl.constexpr(PARTIAL)
_FULL = tl.constexpr(FULL)


@triton.jit
def _classify_tiles(KIND, VIS, BLK, DOC, CLASSES, LQ, LK, N_M, N_N,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The class of one (query tile, key tile) pair of one row, from the exact rule on every
    pair of the tile: computed in registers, so nothing quadratic in length is ever stored."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < LQ
    key_ok = offs_n < LK
    meta = b.to(tl.int64) * LK
    pos_i = LK - LQ + offs_m
    vis_i = tl.load(VIS + meta + pos_i, mask=row_ok, other=0)
    blk_i = tl.load(BLK + meta + pos_i, mask=row_ok, other=0)
    doc_i = tl.load(DOC + meta + pos_i, mask=row_ok, other=0)
    kind_j = tl.load(KIND + meta + offs_n, mask=key_ok, other=0)
    blk_j = tl.load(BLK + meta + offs_n, mask=key_ok, other=0)
    doc_j = tl.load(DOC + meta + offs_n, mask=key_ok, other=0)
    ok = mask_rule(pos_i[:, None], vis_i[:, None], blk_i[:, None], doc_i[:, None],
                   offs_n[None, :], kind_j[None, :], blk_j[None, :], doc_j[None, :], True)
    ok = ok & row_ok[:, None] & key_ok[None, :]
    allowed = tl.sum(tl.sum(ok.to(tl.int32), axis=1), axis=0)
    rows = tl.sum(row_ok.to(tl.int32), axis=0)
    # FULL skips the mask, so its key tile must not run past LK; query rows past LQ do not
    # count (they are never stored, and the backward gives them zero probability).
    whole = (pid_n + 1) * BLOCK_N <= LK
    cls = tl.where(allowed == 0, _EMPTY,
                   tl.where(whole & (allowed == rows * BLOCK_N), _FULL, _PARTIAL))
    tl.store(CLASSES + (b.to(tl.int64) * N_M + pid_m) * N_N + pid_n, cls.to(tl.int8))


def _classify(segment_kind: Tensor, visible_kinds: Tensor, block_id: Tensor, doc_id: Tensor,
              num_queries: int, block_m: int, block_n: int) -> Tensor:
    """The (B, N_M, N_N) int8 classes of a layout's tile pairs."""
    batch, lk = segment_kind.shape
    n_m, n_n = -(-num_queries // block_m), -(-lk // block_n)
    classes = torch.empty((batch, n_m, n_n), dtype=torch.int8, device=segment_kind.device)
    if classes.numel():
        _classify_tiles[(n_n, n_m, batch)](segment_kind, visible_kinds, block_id, doc_id,
                                           classes, num_queries, lk, n_m, n_n,
                                           BLOCK_M=block_m, BLOCK_N=block_n)
    return classes


# Custom ops, so that torch.compile traces a first call on a new layout through its tile maps.
_classify_tiles_op = torch.library.custom_op("amvl::classify_tiles", _classify,
                                             mutates_args=())


@_classify_tiles_op.register_fake
def _(segment_kind, visible_kinds, block_id, doc_id, num_queries, block_m, block_n):
    batch, lk = segment_kind.shape
    return segment_kind.new_empty((batch, -(-num_queries // block_m), -(-lk // block_n)),
                                  dtype=torch.int8)


# Whether a tile map's index lists come from one Triton launch (_tile_lists) instead of
# torch's sorts (about a dozen launches a map, four maps a training step). Written in a session
# whose GPU lease was spent: checked under the interpreter and compiled for sm_90 (Triton 3.6
# and 3.9, scripts/kernel_resources.py), never run on a GPU, so off until one runs and times
# it (tests/test_layout.py runs the kernel; scripts/profile_model_step.py's
# "shared_amvl:lists_kernel" times a step with it).
LISTS_BY_KERNEL = False


@triton.jit
def _tile_lists(CLASSES, ROWS, ROW_COUNTS, COLS, COL_COUNTS, BATCH, N_M, N_N,
                BLOCK: tl.constexpr):
    """One line of one batch row's tile map: a query tile's key tiles (axis 2 = 0) or a key
    tile's query tiles (axis 2 = 1), partitioned as :func:`_lists_by_sort` does."""
    line = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    start = CLASSES + b * N_M * N_N
    if tl.program_id(2) == 0:  # query tile m = line: its key tiles n, N_N of them, 1 apart
        if line < N_M:
            _line_lists(start + line * N_N, 1, N_N, ROWS, ROW_COUNTS, b * N_M + line,
                        BATCH * N_M, BLOCK)
    else:  # key tile n = line: its query tiles m, N_M of them, N_N apart
        if line < N_N:
            _line_lists(start + line, N_N, N_M, COLS, COL_COUNTS, b * N_N + line,
                        BATCH * N_N, BLOCK)


@triton.jit
def _line_lists(LINE, step, n, LISTS, COUNTS, owner, owners, BLOCK: tl.constexpr):
    """The FULL and PARTIAL lists and counts of one line of ``n`` classes ``step`` apart,
    the line ``owner`` of ``owners`` (lists of ``n`` entries; PARTIAL's after FULL's)."""
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    cls = tl.load(LINE + offs * step, mask=valid, other=_EMPTY)
    _partition(cls, valid, offs, _FULL, LISTS + owner * n, COUNTS + owner)
    _partition(cls, valid, offs, _PARTIAL, LISTS + (owners + owner) * n, COUNTS + owners + owner)


@triton.jit
def _partition(cls, valid, offs, KIND: tl.constexpr, LIST, COUNT):
    """Stores at LIST the stable partition of ``offs`` by ``cls == KIND`` (those first), and
    at COUNT how many those are."""
    chosen = valid & (cls == KIND)
    others = valid & (cls != KIND)
    count = tl.sum(chosen.to(tl.int32), axis=0)
    rank = tl.where(chosen, tl.cumsum(chosen.to(tl.int32), axis=0) - 1,
                    count + tl.cumsum(others.to(tl.int32), axis=0) - 1)
    tl.store(LIST + rank, offs, mask=valid)
    tl.store(COUNT, count)


def _lists(classes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The index lists of a (B, N_M, N_N) map of classes: (2, B, N_M, N_N) row lists and
    (2, B, N_M) counts, (2, B, N_N, N_M) column lists and (2, B, N_N) counts, each [FULL,
    PARTIAL] (see :class:`TileMap`)."""
    return _lists_by_kernel(classes) if LISTS_BY_KERNEL else _lists_by_sort(classes)


def _lists_by_sort(classes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per line, the indices of its tiles of a class first, ascending, then the others,
    ascending: a stable sort of 0 (chosen) and 1 (not), for both classes and both directions
    in two sorts."""
    unchosen = torch.stack([classes != FULL, classes != PARTIAL]).to(torch.int8)
    lists, counts = [], []
    for by_line in (unchosen, unchosen.transpose(2, 3)):
        order = torch.sort(by_line, dim=-1, stable=True).indices
        lists.append(order.to(torch.int32).contiguous())
        counts.append(by_line.shape[-1] - by_line.sum(-1, dtype=torch.int32))
    return lists[0], counts[0], lists[1], counts[1]


def _lists_by_kernel(classes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_lists_by_sort` in one launch."""
    batch, n_m, n_n = classes.shape
    new = functools.partial(torch.empty, dtype=torch.int32, device=classes.device)
    rows, row_counts = new((2, batch, n_m, n_n)), new((2, batch, n_m))
    cols, col_counts = new((2, batch, n_n, n_m)), new((2, batch, n_n))
    if classes.numel():
        _tile_lists[(max(n_m, n_n), batch, 2)](
            classes, rows, row_counts, cols, col_counts, batch, n_m, n_n,
            BLOCK=triton.next_power_of_2(max(n_m, n_n)))
    return rows, row_counts, cols, col_counts


_tile_lists_op = torch.library.custom_op("amvl::tile_lists", _lists, mutates_args=())


@_tile_lists_op.register_fake
def _(classes):
    batch, n_m, n_n = classes.shape
    new = functools.partial(classes.new_empty, dtype=torch.int32)
    return new((2, batch, n_m, n_n)), new((2, batch, n_m)), new((2, batch, n_n, n_m)), \
        new((2, batch, n_n))


@dataclass(eq=False)
class LatentLayout:
    """Per-token attention metadata, all (B, Lk) int32 on one device.

    Build with :meth:`from_tensors` or one of the builders. The key length Lk of a layout must
    equal the key length of the attention call; the queries are its last Lq tokens. The
    constructor itself checks types, shapes and devices only: the values' ranges are
    :meth:`from_tensors`'s to check.
    """

    segment_kind: Tensor
    visible_kinds: Tensor
    block_id: Tensor
    doc_id: Tensor
    _derived: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name, t in zip(("segment_kind", "visible_kinds", "block_id", "doc_id"),
                           self.metadata()):
            if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.dim() != 2:
                raise TypeError(
                    f"LatentLayout takes (B, L) int32 tensors; {name} is "
                    f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}"
                    f"{tuple(t.shape) if isinstance(t, Tensor) else ''}: build layouts with "
                    f"LatentLayout.from_tensors, which checks and converts")
            if t.shape != self.segment_kind.shape or t.device != self.segment_kind.device:
                raise ValueError(f"{name} must have segment_kind's shape and device")
            if not t.is_contiguous():  # the tile classifier indexes rows by the length
                raise ValueError(f"LatentLayout takes contiguous tensors; {name} is a strided "
                                 f"view: build layouts with LatentLayout.from_tensors")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_tensors(cls, segment_kind: Tensor, visible_kinds: Tensor, block_id: Tensor,
                     doc_id: Tensor | None = None, *, check_values: bool = True,
                     copy: bool = True) -> LatentLayout:
        """Validate and wrap (B, L) integer tensors (see the module docstring for the rule).

        segment_kind: the kind of each token, in [0, 31).
        visible_kinds: the bit set of kinds each token may see as a query.
        block_id: bidirectional block of each token, 0 = none (causal).
        doc_id: packed-document id of each token; None = one document per row.
        check_values: check the ranges of the values too. Each check reads the device back (a
            host sync), so code that builds the metadata itself, once per model call, may
            pass False; types, shapes and devices are always checked.
        copy: the layout keeps copies (it caches what it derives, tile maps among them, so a
            tensor changed in place afterwards would leave them stale). False shares tensors
            that are int32 and contiguous already, for code that never changes them.
        """
        named = {"segment_kind": segment_kind, "visible_kinds": visible_kinds,
                 "block_id": block_id}
        if doc_id is not None:
            named["doc_id"] = doc_id
        for name, t in named.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
            if t.dtype in _WIDE_UNSIGNED:
                raise TypeError(f"{name} has dtype {t.dtype}, which torch barely supports (no "
                                "min or max); give a signed integer tensor or uint8")
            if t.dim() != 2:
                raise ValueError(f"{name} must be (batch, length), got shape {tuple(t.shape)}")
            if t.shape != segment_kind.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but segment_kind has "
                                 f"{tuple(segment_kind.shape)}")
            if t.device != segment_kind.device:
                raise ValueError(f"{name} is on {t.device} but segment_kind is on "
                                 f"{segment_kind.device}")
        # the value checks read the device: inside a compiled graph they are skipped (a
        # data-dependent branch Dynamo cannot trace), as the eager calls have run them
        if check_values and segment_kind.numel() and not torch.compiler.is_compiling():
            lo, hi = int(segment_kind.min()), int(segment_kind.max())
            if lo < 0 or hi >= MAX_KINDS:
                raise ValueError(f"segment_kind must lie in [0, {MAX_KINDS}), got [{lo}, {hi}]")
            if int(block_id.min()) < 0:
                raise ValueError("block_id must be >= 0 (0 = no bidirectional block)")
            # The kernels read int32: a wider id would wrap, merging blocks or documents
            # (or turning a block off) without a word.
            if int(block_id.max()) >= 2**31:
                raise ValueError(f"block_id must be < 2**31 (the kernels store int32), got "
                                 f"{int(block_id.max())}")
            if doc_id is not None and not -2**31 <= int(doc_id.min()) <= int(doc_id.max()) \
                    < 2**31:
                raise ValueError(f"doc_id must lie in the int32 range [-2**31, 2**31), got "
                                 f"[{int(doc_id.min())}, {int(doc_id.max())}]")
            if int(visible_kinds.min()) < 0 or int(visible_kinds.max()) >= 2**MAX_KINDS:
                raise ValueError(f"visible_kinds must be bit sets in [0, 2**{MAX_KINDS})")
        if doc_id is None:
            doc_id = torch.zeros_like(segment_kind)
        as32 = []
        for t in (segment_kind, visible_kinds, block_id, doc_id):
            owned = t.to(torch.int32).contiguous()
            as32.append(owned.clone() if copy and owned is t else owned)
        return cls(*as32)

    @classmethod
    def causal(cls, batch: int, length: int, padding_mask: Tensor | None = None,
               device: torch.device | str | None = None) -> LatentLayout:
        """Plain causal attention; ``padding_mask`` (B, L) marks real tokens (False = padding,
        anywhere in the row: left or right padding both work). With a ``padding_mask`` the
        layout is on its device (a ``device`` given must be that one)."""
        batch, length = check_count("batch", batch), check_count("length", length)
        if padding_mask is not None:
            _check_mask("padding_mask", padding_mask, (batch, length))
            given = torch.device(device) if device is not None else None
            if given is not None and (given.type != padding_mask.device.type or given.index
                                      not in (None, padding_mask.device.index)):
                raise ValueError(f"device={device} but padding_mask is on "
                                 f"{padding_mask.device}: the layout is built on the mask's")
            device = padding_mask.device
        kind = torch.full((batch, length), int(Kind.TEXT), dtype=torch.int32, device=device)
        if padding_mask is not None:
            kind = torch.where(padding_mask.bool(), kind, int(Kind.PAD))
        visible = torch.where(kind == int(Kind.PAD), 0, kind_bits(Kind.TEXT))
        # In range by construction: skip the value checks, whose reads of the device would be
        # host syncs at every decoding step of a padded batch (the HF mask function's layout).
        return cls.from_tensors(kind, visible, torch.zeros_like(kind), check_values=False,
                                copy=False)

    @classmethod
    def with_latent_blocks(cls, length: int, blocks: Sequence[Sequence[tuple[int, int]]],
                           padding_mask: Tensor | None = None,
                           device: torch.device | str | None = None) -> LatentLayout:
        """Causal rows with bidirectional latent blocks.

        blocks[b] lists (start, size) of the blocks in row b, each size >= 1; rows may differ
        in count and offsets. Tokens of a block see each other in both directions; everything
        else is causal. ``padding_mask`` as in :meth:`causal`.
        """
        batch = len(blocks)
        layout = cls.causal(batch, length, padding_mask, device)
        kind, block = layout.segment_kind.clone(), layout.block_id.clone()
        for b, row in enumerate(blocks):
            placed: list[tuple[int, int]] = []
            for number, pair in enumerate(row, start=1):
                try:
                    start, size = pair
                except (TypeError, ValueError):
                    raise TypeError(f"blocks[{b}] must hold (start, size) pairs, got "
                                    f"{pair!r}") from None
                start = check_count(f"the start of blocks[{b}][{number - 1}]", start)
                size = check_count(f"the size of blocks[{b}][{number - 1}]", size)
                if size < 1:  # an empty block would take a block id and mark nothing
                    raise ValueError(f"a block size must be >= 1, got size {size} in "
                                     f"blocks[{b}][{number - 1}] = {(start, size)} (row {b})")
                if start + size > length:
                    raise ValueError(f"block {(start, size)} of row {b} does not fit in "
                                     f"length {length}")
                # overlaps from the pairs themselves: no device read (a compiled graph)
                if any(start < other_start + other_size and other_start < start + size
                       for other_start, other_size in placed):
                    raise ValueError(f"blocks of row {b} overlap at {(start, size)}")
                placed.append((start, size))
                block[b, start:start + size] = number
                kind[b, start:start + size] = torch.where(
                    kind[b, start:start + size] == int(Kind.PAD), int(Kind.PAD), int(Kind.LATENT))
        text_and_latent = kind_bits(Kind.TEXT, Kind.LATENT)
        visible = torch.where(kind == int(Kind.PAD), 0, text_and_latent)
        return cls.from_tensors(kind, visible, block, copy=False)

    @classmethod
    def prefix_sharing(cls, prompt_lengths: Sequence[int], answer_lengths: Sequence[int],
                       num_slots: int, device: torch.device | str | None = None
                       ) -> LatentLayout:
        """The prefix-sharing training layout ``[x | P_1..P_K | y | Q_1..Q_K]`` per row.

        Prior slots P see x and P (bidirectionally), never y; y sees x and y (causally); the
        posterior slots Q see x, y and Q. Rows are right-padded to the longest one.
        """
        if len(prompt_lengths) != len(answer_lengths):
            raise ValueError("prompt_lengths and answer_lengths must have one entry per row")
        num_slots = check_count("num_slots", num_slots, least=1)
        rows = [(check_count(f"prompt_lengths[{b}]", x), check_count(f"answer_lengths[{b}]", y))
                for b, (x, y) in enumerate(zip(prompt_lengths, answer_lengths))]
        length = max((x + y + 2 * num_slots for x, y in rows), default=0)
        kind = torch.full((len(rows), length), int(Kind.PAD), dtype=torch.int32)
        block = torch.zeros_like(kind)
        for b, (x, y) in enumerate(rows):
            kind[b, :x] = Kind.TEXT
            kind[b, x:x + num_slots] = Kind.PRIOR_QUERY
            block[b, x:x + num_slots] = 1
            kind[b, x + num_slots:x + num_slots + y] = Kind.ANSWER
            q = x + num_slots + y
            kind[b, q:q + num_slots] = Kind.POSTERIOR_QUERY
            block[b, q:q + num_slots] = 2
        table = torch.tensor([0] * MAX_KINDS, dtype=torch.int32)
        table[Kind.TEXT] = kind_bits(Kind.TEXT)
        table[Kind.PRIOR_QUERY] = kind_bits(Kind.TEXT, Kind.PRIOR_QUERY)
        table[Kind.ANSWER] = kind_bits(Kind.TEXT, Kind.ANSWER)
        table[Kind.POSTERIOR_QUERY] = kind_bits(Kind.TEXT, Kind.ANSWER, Kind.POSTERIOR_QUERY)
        visible = table[kind.long()]
        return cls.from_tensors(kind.to(device), visible.to(device), block.to(device),
                                copy=False)

    @classmethod
    def packed(cls, doc_lengths: Sequence[Sequence[int]], length: int,
               device: torch.device | str | None = None) -> LatentLayout:
        """Packed documents: row b holds documents of ``doc_lengths[b]`` tokens back to back,
        each causal on its own; the rest of the row is padding. Every length must be >= 1."""
        batch, length = len(doc_lengths), check_count("length", length)
        doc = torch.zeros((batch, length), dtype=torch.int32)
        kind = torch.full((batch, length), int(Kind.PAD), dtype=torch.int32)
        for b, docs in enumerate(doc_lengths):
            docs = [check_count(f"doc_lengths[{b}][{i}]", n) for i, n in enumerate(docs)]
            for i, n in enumerate(docs):
                if n < 1:  # an empty document would take a doc id and hold no token
                    raise ValueError(f"a document length must be >= 1, got doc_lengths[{b}][{i}]"
                                     f" = {n} (row {b}: {docs})")
            if sum(docs) > length:
                raise ValueError(f"documents {docs} of row {b} ({sum(docs)} tokens) do not fit "
                                 f"in length {length}")
            start = 0
            for number, n in enumerate(docs, start=1):
                doc[b, start:start + n] = number
                kind[b, start:start + n] = Kind.TEXT
                start += n
        visible = torch.where(kind == int(Kind.PAD), 0, kind_bits(Kind.TEXT))
        return cls.from_tensors(kind.to(device), visible.to(device),
                                torch.zeros_like(kind).to(device), doc.to(device), copy=False)

    # ------------------------------------------------------------------ queries
    @property
    def batch(self) -> int:
        """Rows, B."""
        return self.segment_kind.shape[0]

    @property
    def length(self) -> int:
        """Key tokens per row, Lk."""
        return self.segment_kind.shape[1]

    @property
    def device(self) -> torch.device:
        """Where the metadata lives."""
        return self.segment_kind.device

    def to(self, device: torch.device | str) -> LatentLayout:
        """The same layout on another device (tile maps are rebuilt there on demand)."""
        return LatentLayout(*(t.to(device) for t in self.metadata()))

    def metadata(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(segment_kind, visible_kinds, block_id, doc_id)."""
        return self.segment_kind, self.visible_kinds, self.block_id, self.doc_id

    def dense_mask(self, num_queries: int | None = None) -> Tensor:
        """(B, Lq, Lk) bool mask of the rule, queries the last ``num_queries`` tokens.

        For references and tests: it is quadratic in length, which the kernels avoid.
        """
        lk = self.length
        lq = lk if num_queries is None else check_count("num_queries", num_queries)
        if not 0 <= lq <= lk:
            raise ValueError(f"num_queries must be in [0, {lk}], got {lq}")
        kind, visible, block, doc = (t.long() for t in self.metadata())
        rows = slice(lk - lq, lk)
        sees = ((visible[:, rows, None] >> kind[:, None, :]) & 1).bool()
        same_doc = doc[:, rows, None] == doc[:, None, :]
        i = torch.arange(lk - lq, lk, device=self.device)[:, None]
        j = torch.arange(lk, device=self.device)[None, :]
        same_block = (block[:, rows, None] > 0) & (block[:, rows, None] == block[:, None, :])
        return sees & same_doc & ((j <= i)[None] | same_block)

    def plain_causal_rows(self) -> int:
        """How many leading tokens are plain causal queries in every batch row: each sees
        exactly the keys at or before it (every kind among them, one document, no
        bidirectional block of its own). x in the prefix-sharing layout, the tokens before the
        first latent block in the others; 0 when a row starts with padding.

        Cached; the first call reads one integer back from the device (a host sync).
        """
        return self.cached(("plain causal rows",), self._plain_causal_rows)

    def _plain_causal_rows(self) -> int:
        if self.batch == 0 or self.length == 0:
            return 0
        kind, visible, block, doc = (t.long() for t in self.metadata())
        kinds = torch.arange(MAX_KINDS, device=self.device)
        # (B, L, kinds): the kinds among the keys at or before each token, and those it sees
        seen = (kind[..., None] == kinds).int().cummax(dim=1).values.bool()
        sees = ((visible[..., None] >> kinds) & 1).bool()
        plain = ~(seen & ~sees).any(-1) & (block == 0) & (doc == doc[:, :1])
        return int(plain.int().cumprod(dim=1).sum(dim=1).min())

    def tile_map(self, num_queries: int, block_m: int, block_n: int) -> TileMap:
        """Classes of (query tile, key tile) pairs, computed once per shape and cached.

        Exact: a pair is EMPTY when no query of the tile sees any key of it, FULL when every
        query sees every key (and no key runs past the end), PARTIAL otherwise. One Triton
        program per pair evaluates the rule on the tile in registers, so nothing quadratic in
        length is stored and a map costs a handful of launches (CUDA tensors, or the CPU under
        ``TRITON_INTERPRET=1``).
        """
        num_queries = check_count("num_queries", num_queries)
        if num_queries > self.length:
            raise ValueError(f"num_queries must be in [0, {self.length}], got {num_queries}")
        for name, size in (("block_m", block_m), ("block_n", block_n)):
            if check_count(name, size, least=1) & (size - 1):
                raise ValueError(f"{name} must be a power of two, got {size}")
        return self.cached(("tile map", num_queries, block_m, block_n),
                           lambda: self._classify(num_queries, block_m, block_n))

    def cached(self, key: Hashable, build: Callable[[], object]) -> object:
        """A value derived from this layout (tile maps, kernel arguments), built on first use.

        Layouts are immutable once built, so derived values live as long as the layout: every
        layer of a forward pass reuses what the first one built. Not under torch.compile: a
        key's lengths may be symbolic there (dynamic shapes), and looking them up would hash
        them, pinning the graph to one length; each call in a graph builds what it needs.
        """
        if torch.compiler.is_compiling():
            return build()
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def _classify(self, lq: int, bm: int, bn: int) -> TileMap:
        if not (self.device.type == "cuda" or triton_interpreted()):
            raise RuntimeError("tile maps are built by a Triton kernel: they need CUDA tensors, "
                               "or TRITON_INTERPRET=1 on the CPU (set before importing "
                               "amvl_kernels)")
        # Eager calls skip the dispatcher's round trips (host time on every new layout: two a
        # training step); torch.compile traces the custom ops.
        compiling = torch.compiler.is_compiling()
        classify = torch.ops.amvl.classify_tiles if compiling else _classify
        lists = torch.ops.amvl.tile_lists if compiling else _lists
        classes = classify(*self.metadata(), lq, bm, bn)
        rows, row_counts, cols, col_counts = lists(classes)
        return TileMap(classes, rows[0], row_counts[0], rows[1], row_counts[1],
                       cols[0], col_counts[0], cols[1], col_counts[1])


def _check_mask(name: str, mask: Tensor, shape: tuple[int, int]) -> None:
    """A (B, L) bool or integer tensor, True / nonzero on real tokens. Float masks are refused:
    an additive mask (0 on real tokens, -inf on padding) would read the other way round."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name} must be a bool (or 0/1 integer) tensor marking real tokens, "
                        f"got {mask.dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(mask.shape)}")
