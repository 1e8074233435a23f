"""The split-KV decode forward of latent_attention (amvl_kernels/latent_attention_decode.py)
against the float64 reference: GQA groups packed into one tile, slices of the keys merged by
their log-sum-exps, slices and rows that see nothing, and the flash path it stands in for."""

from __future__ import annotations

import importlib

import pytest
import torch

import amvl_kernels as ak
from amvl_kernels.layout import LatentLayout
from tests.conftest import DEVICE
from tests.test_latent_attention import _inputs, check
from tests.test_layout import random_layout

decode = importlib.import_module("amvl_kernels.latent_attention_decode")


def _slices_of(monkeypatch, per_split: int) -> None:
    """Cut the keys into slices of ``per_split`` key tiles."""
    monkeypatch.setattr(decode, "_split_tiles",
                        lambda programs, n_tiles, target: (-(-n_tiles // per_split), per_split))


@pytest.mark.parametrize("heads", [(7, 1), (4, 2), (3, 3)], ids=str)
@pytest.mark.parametrize("lq", [1, 3])
@pytest.mark.parametrize("per_split", [1, 2, 5, 6], ids=lambda n: f"{n}-tiles-per-slice")
def test_random_layouts_any_slicing(heads, lq, per_split, monkeypatch, rng_seed):
    """83 keys are 6 tiles of 16 under the interpreter: 6, 3, 2 slices, or one (no merge).
    The queries come as Hugging Face models hand them over, (B, L, H, D) memory viewed as
    (B, H, L, D), and the output is written in that layout, by the merge too."""
    _slices_of(monkeypatch, per_split)
    layout = random_layout(2, 83, torch.Generator().manual_seed(rng_seed)).to(DEVICE)
    assert decode.uses_decode(lq, heads[0] // heads[1])
    out, _ = check(*_inputs(2, *heads, lq, 83, 32, torch.float32, transposed=True), layout)
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("lk", [1, 16, 50])
def test_causal_without_layout(lk, rng_seed):
    check(*_inputs(3, 4, 1, 1, lk, 64, torch.float32), None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision(dtype, rng_seed):
    padding = torch.ones(2, 61, dtype=torch.bool, device=DEVICE)
    padding[1, :9] = False  # left padding, as batched generation has
    check(*_inputs(2, 8, 2, 2, 61, 64, dtype), LatentLayout.causal(2, 61, padding))


def test_slices_that_see_nothing_and_rows_that_see_nothing(monkeypatch, rng_seed):
    """The query's document starts at key 50: the first slices hold no key it sees and must
    weigh nothing; a blind query row gives zeros and zero gradients."""
    _slices_of(monkeypatch, 1)
    layout = LatentLayout.packed([[50, 20], [70]], 70).to(DEVICE)
    blind = layout.visible_kinds.clone()
    blind[1, -1] = 0
    layout = LatentLayout.from_tensors(layout.segment_kind, blind, layout.block_id,
                                       layout.doc_id)
    q, k, v = _inputs(2, 4, 2, 1, 70, 16, torch.float32)
    out, (dq, _, _) = check(q, k, v, layout)
    assert torch.count_nonzero(out[1]) == 0 and torch.count_nonzero(dq[1]) == 0


def test_matches_the_flash_forward(monkeypatch, rng_seed):
    """The same call on the flash forward (decode switched off) gives the same output."""
    layout = random_layout(2, 45, torch.Generator().manual_seed(rng_seed)).to(DEVICE)
    q, k, v = (t.detach() for t in _inputs(2, 6, 2, 2, 45, 32, torch.float32))
    with_decode = ak.latent_attention(q, k, v, layout, backend="triton")
    monkeypatch.setattr(decode, "DECODE_MAX_ROWS", 0)
    flash = ak.latent_attention(q, k, v, layout, backend="triton")
    torch.testing.assert_close(with_decode, flash, rtol=1e-5, atol=1e-6)


def test_inference_builds_no_tile_map(rng_seed):
    """Decoding without gradients reads the metadata only; with gradients the backward's tile
    maps are built."""
    layout = LatentLayout.with_latent_blocks(40, [[(10, 4)]]).to(DEVICE)
    q, k, v = _inputs(1, 4, 2, 1, 40, 16, torch.float32)
    with torch.no_grad():
        ak.latent_attention(q, k, v, layout, backend="triton")
    assert not [key for key in layout._derived if key[0] == "tile map"]
    ak.latent_attention(q, k, v, layout, backend="triton").sum().backward()
    assert [key for key in layout._derived if key[0] == "tile map"]


def test_long_queries_stay_on_the_flash_forward():
    assert decode.uses_decode(1, 8) and decode.uses_decode(8, 8)
    assert not decode.uses_decode(9, 8) and not decode.uses_decode(65, 1)


def test_batch_past_the_grid_limit_is_decoded_in_slices_of_rows(monkeypatch, rng_seed):
    """Grid axis 1 holds batch x KV heads, at most 65,535 on CUDA: beyond, a launch per slice
    of batch rows (here a limit of 4 programs, 2 KV heads: slices of 2 of the 5 rows)."""
    monkeypatch.setattr(decode, "MAX_GRID_Y", 4)
    padding = torch.ones(5, 37, dtype=torch.bool, device=DEVICE)
    padding[3, :6] = False
    check(*_inputs(5, 4, 2, 1, 37, 32, torch.float32), LatentLayout.causal(5, 37, padding))
