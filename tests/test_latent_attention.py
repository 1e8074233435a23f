"""Latent-block attention kernels against the float64 dense-mask reference.

Small odd shapes run on the CPU under TRITON_INTERPRET=1 (the interpreter uses 16x16 tiles, so
short sequences still cross many tile boundaries) and on the GPU when there is one.
"""

from __future__ import annotations

import pytest
import torch

import amvl_kernels as ak
from amvl_kernels.layout import Kind, LatentLayout, kind_bits
from amvl_kernels.reference.latent_attention import attention_mask, latent_attention_torch
from tests.conftest import DEVICE
from tests.test_layout import random_layout

TOL = {torch.float32: 1e-5}


def _inputs(b, hq, hkv, lq, lk, d, dtype, transposed=False):
    if transposed:  # how HF models hand them over: (B, L, H, D) viewed as (B, H, L, D)
        q = torch.randn(b, lq, hq, d, device=DEVICE, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(b, hq, lq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, hkv, lk, d, device=DEVICE, dtype=dtype)
    v = torch.randn(b, hkv, lk, d, device=DEVICE, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def _low_precision_torch(q, k, v, layout, scale):
    """What plain PyTorch gets in the inputs' own dtype: the yardstick of DESIGN.md 5."""
    group = q.shape[1] // k.shape[1]
    kx, vx = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    mask = attention_mask(layout, q.shape[2], k.shape[2], q.device)[:, None]
    scores = (q @ kx.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), -1).nan_to_num(0.0).to(q.dtype)
    return probs @ vx


def _rel(a, b):
    """Relative error by norms. The floor (an RMS of 1e-2, against O(0.1-1) values) keeps a
    reference that is zero up to rounding, e.g. dq when every row sees a single key, from
    turning fp32 roundoff (~1e-7) into a large relative error."""
    a, b = a.detach().double(), b.detach()
    return float((a - b).norm() / b.norm().clamp(min=1e-2 * b.numel() ** 0.5))


def check(q, k, v, layout, backend="triton", attend=None):
    """Output and gradients within DESIGN.md 5's criterion of the float64 reference;
    ``attend(q, k, v)`` instead of ``ak.latent_attention`` when given."""
    scale = q.shape[-1] ** -0.5
    out = attend(q, k, v) if attend else ak.latent_attention(q, k, v, layout, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = latent_attention_torch(*ref_in, layout, scale)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
    for t in (out, *grads):
        assert torch.isfinite(t).all()
    if q.dtype == torch.float32:
        assert _rel(out, ref) < TOL[q.dtype]
        for g, rg in zip(grads, ref_grads):
            assert _rel(g, rg) < 10 * TOL[q.dtype]
        return out, grads
    low_in = [t.detach().requires_grad_() for t in (q, k, v)]
    low = _low_precision_torch(*low_in, layout, scale)
    low_grads = torch.autograd.grad(low, low_in, grad)
    floor = 1e-3  # a few ulps of bf16 / fp16: PyTorch can be luckier than that on tiny inputs
    assert _rel(out, ref) <= 2 * _rel(low, ref) + floor
    for g, lg, rg in zip(grads, low_grads, ref_grads):
        assert _rel(g, rg) <= 3 * _rel(lg, rg) + floor
    return out, grads


@pytest.mark.parametrize("lq,lk", [(37, 37), (5, 37), (1, 23)], ids=str)
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)], ids=str)
def test_causal_without_layout(lq, lk, heads, rng_seed):
    check(*_inputs(2, *heads, lq, lk, 64, torch.float32), None)


@pytest.mark.parametrize("lq", [53, 20, 1])
def test_random_layouts(lq, rng_seed):
    layout = random_layout(2, 53, torch.Generator().manual_seed(rng_seed)).to(DEVICE)
    check(*_inputs(2, 4, 2, lq, 53, 64, torch.float32), layout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision(dtype, rng_seed):
    layout = LatentLayout.with_latent_blocks(45, [[(10, 7)], [(3, 5), (30, 9)]]).to(DEVICE)
    check(*_inputs(2, 4, 2, 45, 45, 64, dtype), layout)


@pytest.mark.parametrize("d", [128, 80, 33])
def test_head_dims_and_transposed_queries(d, rng_seed):
    layout = LatentLayout.prefix_sharing([13, 20], [9, 4], num_slots=4).to(DEVICE)
    check(*_inputs(2, 2, 1, layout.length, layout.length, d, torch.float32, transposed=True),
          layout)


def test_packed_documents_and_padding(rng_seed):
    check(*_inputs(2, 2, 1, 47, 47, 32, torch.float32),
          LatentLayout.packed([[10, 20, 5], [40]], 47).to(DEVICE))
    padding = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    padding[0, :7] = False   # left padding
    padding[1, 33:] = False  # right padding
    check(*_inputs(2, 2, 1, 40, 40, 32, torch.float32), LatentLayout.causal(2, 40, padding))


def test_rows_that_see_nothing_give_zeros_and_zero_gradients(rng_seed):
    layout = LatentLayout.causal(2, 35, torch.ones(2, 35, dtype=torch.bool)).to(DEVICE)
    blind = layout.visible_kinds.clone()
    blind[0, 3:21] = 0  # rows 3..20 of batch 0 see nothing: more than one whole 16-row tile
    layout = LatentLayout.from_tensors(layout.segment_kind, blind, layout.block_id)
    q, k, v = _inputs(2, 2, 2, 35, 35, 16, torch.float32)
    out, (dq, _, _) = check(q, k, v, layout)
    assert torch.count_nonzero(out[0, :, 3:21]) == 0
    assert torch.count_nonzero(dq[0, :, 3:21]) == 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("lq", [1, 3, 37], ids=["decode-1", "decode-3", "flash"])
def test_rows_that_see_nothing_stay_zero_beside_non_finite_keys(backend, lq, rng_seed):
    """Garbage in unfilled cache slots (NaN values, inf keys, as torch.empty may leave them)
    that no row sees: the rows that see nothing still return exact zeros, set rather than
    computed (a masked probability is 0, but 0 * NaN is NaN), and on our kernels a zero dq."""
    padding = torch.ones(2, 37, dtype=torch.bool, device=DEVICE)
    padding[:, 34:] = False  # rows 32-33 see keys of the tile that holds the garbage
    layout = LatentLayout.causal(2, 37, padding).to(DEVICE)
    q, k, v = (t.detach() for t in _inputs(2, 4, 2, lq, 37, 16, torch.float32))
    v[:, :, 35] = float("nan")
    k[:, :, 36] = float("inf")
    q.requires_grad_()
    out = ak.latent_attention(q, k, v, layout, backend=backend)
    first_blind = max(0, 34 - (37 - lq))  # the query rows at padding positions
    blind = out[:, :, first_blind:]
    assert blind.numel() and torch.count_nonzero(blind) == 0 and torch.isfinite(blind).all()
    if backend == "triton":  # SDPA's backward spreads the NaN over such rows' dq
        (dq,) = torch.autograd.grad(out, q, torch.randn_like(out))
        blind_dq = dq[:, :, first_blind:]
        assert torch.count_nonzero(blind_dq) == 0 and torch.isfinite(blind_dq).all()


def test_kv_cache_decoding_matches_full_pass(rng_seed):
    """The last query of a full pass equals a one-query call over the same keys."""
    layout = LatentLayout.with_latent_blocks(30, [[(20, 4)]]).to(DEVICE)
    q, k, v = _inputs(1, 4, 2, 30, 30, 64, torch.float32)
    full = ak.latent_attention(q, k, v, layout, backend="triton")
    last = ak.latent_attention(q[:, :, -1:], k, v, layout, backend="triton")
    torch.testing.assert_close(last, full[:, :, -1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout_kind", ["random", "causal-kv-cache"])
@pytest.mark.parametrize("tiles", [{"forward": (32, 16), "dkdv": (16, 32), "dq": (32, 16)},
                                   {"forward": (16, 32), "dkdv": (32, 16), "dq": (16, 32)}],
                         ids=["tall-dq", "wide-dq"])
def test_each_kernel_has_its_own_tiles(monkeypatch, tiles, layout_kind, rng_seed):
    """The forward, dk/dv and dq kernels read their own tile maps (or, without a layout,
    derive their causal tile ranges): shapes that differ between the three, as on Hopper
    (dk/dv 64 x 128, dq 128 x 64), must still give the reference's output and gradients."""
    import importlib

    module = importlib.import_module("amvl_kernels.latent_attention")
    monkeypatch.setattr(module, "_tile_config",
                        lambda head_dim, dtype, kernel, arch: (*tiles[kernel], 1, 1))
    if layout_kind == "random":
        layout = random_layout(2, 71, torch.Generator().manual_seed(rng_seed)).to(DEVICE)
        check(*_inputs(2, 4, 2, 50, 71, 32, torch.float32), layout)
    else:
        check(*_inputs(2, 4, 2, 45, 71, 32, torch.float32), None)


def test_rocm_gpus_do_not_pass_for_hopper(monkeypatch):
    """ROCm builds of torch call AMD GPUs "cuda" and report capabilities such as (9, 4) for
    an MI300: the tile choice must not read that as a Hopper (228 KB of shared memory)."""
    import importlib

    module = importlib.import_module("amvl_kernels.latent_attention")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    assert module._device_arch(torch.device("cuda")) == (0, 0)
    monkeypatch.setattr(torch.version, "hip", None)
    assert module._device_arch(torch.device("cuda")) == (9, 4)
    assert module._device_arch(torch.device("cpu")) == (0, 0)


class _LaunchCounter:
    """Stands in for a jitted kernel and counts its launches (then launches it)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def dq_kernel(monkeypatch):
    """The attention module with dq computed by the dk/dv kernel (atomics) when allowed, and
    its dq kernel's launches counted."""
    import importlib

    module = importlib.import_module("amvl_kernels.latent_attention")
    monkeypatch.setattr(module, "_dq_in_dkdv", lambda head_dim, dtype, arch: True)
    counter = _LaunchCounter(module._attention_bwd_dq)
    monkeypatch.setattr(module, "_attention_bwd_dq", counter)
    return counter


@pytest.mark.parametrize("case", ["causal-gqa-kv-cache", "random-layout", "bf16", "blind-rows",
                                  "transposed-d80"])
def test_dq_added_by_the_dkdv_kernel(dq_kernel, case, rng_seed):
    """The other way to dq: the dk/dv kernel adds each tile's share into an fp32 buffer with
    atomics, and the dq kernel never runs. Same criterion against the reference."""
    if case == "causal-gqa-kv-cache":
        check(*_inputs(2, 4, 2, 29, 45, 32, torch.float32), None)
    elif case == "random-layout":
        layout = random_layout(2, 53, torch.Generator().manual_seed(rng_seed)).to(DEVICE)
        check(*_inputs(2, 6, 2, 40, 53, 32, torch.float32), layout)
    elif case == "bf16":
        layout = LatentLayout.with_latent_blocks(45, [[(10, 7)], [(3, 5), (30, 9)]]).to(DEVICE)
        check(*_inputs(2, 4, 2, 45, 45, 64, torch.bfloat16), layout)
    elif case == "blind-rows":
        layout = LatentLayout.causal(2, 35, torch.ones(2, 35, dtype=torch.bool)).to(DEVICE)
        blind = layout.visible_kinds.clone()
        blind[1, 2:20] = 0
        layout = LatentLayout.from_tensors(layout.segment_kind, blind, layout.block_id)
        _, (dq, _, _) = check(*_inputs(2, 2, 1, 35, 35, 16, torch.float32), layout)
        assert torch.count_nonzero(dq[1, :, 2:20]) == 0
    else:  # Hugging Face's memory layout: dq is written back into it
        layout = LatentLayout.prefix_sharing([13, 20], [9, 4], num_slots=4).to(DEVICE)
        q, k, v = _inputs(2, 2, 1, layout.length, layout.length, 80, torch.float32,
                          transposed=True)
        _, (dq, _, _) = check(q, k, v, layout)
        assert dq.stride() == q.stride()
    assert dq_kernel.launches == 0


@pytest.mark.parametrize("dq_by_atomics", [False, True], ids=["dq-kernel", "dq-atomics"])
@pytest.mark.parametrize("case", ["causal-gqa-kv-cache", "latent-bf16", "random-layout",
                                  "blind-rows"])
def test_lengths_that_fill_whole_query_tiles(request, dq_by_atomics, case, rng_seed):
    """Query lengths a multiple of the dk/dv kernel's BLOCK_M (16 under the interpreter): its
    FULL tiles then load their query rows without row predicates."""
    if dq_by_atomics:
        request.getfixturevalue("dq_kernel")
    if case == "causal-gqa-kv-cache":
        check(*_inputs(2, 4, 2, 32, 48, 32, torch.float32), None)
    elif case == "latent-bf16":
        layout = LatentLayout.with_latent_blocks(64, [[(40, 8)], [(7, 5), (50, 9)]]).to(DEVICE)
        check(*_inputs(2, 4, 2, 64, 64, 64, torch.bfloat16), layout)
    elif case == "random-layout":
        layout = random_layout(2, 48, torch.Generator().manual_seed(rng_seed)).to(DEVICE)
        check(*_inputs(2, 4, 2, 32, 48, 32, torch.float32), layout)
    else:
        layout = LatentLayout.causal(2, 48, torch.ones(2, 48, dtype=torch.bool)).to(DEVICE)
        blind = layout.visible_kinds.clone()
        blind[0, 16:32] = 0  # one whole query tile that sees nothing
        layout = LatentLayout.from_tensors(layout.segment_kind, blind, layout.block_id)
        _, (dq, _, _) = check(*_inputs(2, 2, 1, 48, 48, 16, torch.float32), layout)
        assert torch.count_nonzero(dq[0, :, 16:32]) == 0


def test_deterministic_algorithms_keep_dq_off_atomics(dq_kernel, rng_seed):
    """Under torch.use_deterministic_algorithms the dq kernel runs even where atomics would
    be chosen: the order of atomic additions varies between runs."""
    layout = LatentLayout.with_latent_blocks(40, [[(25, 6)], [(5, 8)]]).to(DEVICE)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # cuBLAS would raise otherwise
    try:
        check(*_inputs(2, 4, 2, 40, 40, 32, torch.float32), layout)
    finally:
        torch.use_deterministic_algorithms(before)
    assert dq_kernel.launches == 1


@pytest.mark.parametrize("split", [1, 2, 4, 6])
@pytest.mark.parametrize("case", ["causal-kv-cache", "random-layout-bf16", "transposed"])
def test_grouped_query_heads_shared_by_dkdv_programs(monkeypatch, split, case, rng_seed):
    """dk/dv of a KV head summed in one program over its 6 query heads (split 1), or by 2, 4
    (shares of 1 and 2 heads) or 6 programs whose fp32 partial sums are added after the
    kernel: the same gradients."""
    import importlib

    module = importlib.import_module("amvl_kernels.latent_attention")
    chosen = []

    def forced(programs, group, target):
        chosen.append(split)
        return split
    monkeypatch.setattr(module, "_dkdv_head_split", forced)
    if case == "causal-kv-cache":
        check(*_inputs(2, 6, 1, 21, 50, 32, torch.float32), None)
    elif case == "random-layout-bf16":
        layout = random_layout(2, 47, torch.Generator().manual_seed(rng_seed)).to(DEVICE)
        check(*_inputs(2, 12, 2, 47, 47, 64, torch.bfloat16), layout)
    else:  # Hugging Face's memory layout: dk and dv are written back into it
        layout = LatentLayout.prefix_sharing([11, 17], [6, 9], num_slots=3).to(DEVICE)
        q, k, v = _inputs(2, 6, 1, layout.length, layout.length, 48, torch.float32,
                          transposed=True)
        k = k.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        _, (_, dk, dv) = check(q, k, v, layout)
        assert dk.stride() == k.stride() and dv.stride() == k.stride()
    assert chosen == [split]


def test_auto_hands_a_decoding_step_without_layout_to_sdpa(monkeypatch, rng_seed):
    """backend="auto" on a GPU: one query over plain causal keys sees every key, and goes to
    SDPA; with a layout, or more queries, our kernels run."""
    import importlib

    module = importlib.import_module("amvl_kernels.latent_attention")
    monkeypatch.setattr(module, "resolve_backend", lambda backend, device: "triton")
    ran = []
    kernel_forward = module._forward
    monkeypatch.setattr(module, "_forward", lambda *args: ran.append(args[0].shape[2]) or
                        kernel_forward(*args))
    q = torch.randn(2, 4, 1, 32, device=DEVICE)
    k, v = (torch.randn(2, 2, 9, 32, device=DEVICE) for _ in range(2))
    out = ak.latent_attention(q, k, v)
    ref = latent_attention_torch(q.double(), k.double(), v.double(), None, 32 ** -0.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert ran == []
    ak.latent_attention(q, k, v, LatentLayout.causal(2, 9).to(DEVICE))
    ak.latent_attention(torch.randn(2, 4, 2, 32, device=DEVICE), k, v)
    ak.latent_attention(q, k, v, backend="triton")
    assert ran == [1, 2, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_plain_causal_rows_on_sdpa(dtype, rng_seed):
    """x's rows on SDPA's causal kernel, the prior, answer and posterior rows on ours, as
    "auto" runs the prefix-sharing layout on a GPU: grouped heads, HF's memory layout, one
    autograd node whose gradients come back in the inputs' memory layouts."""
    from amvl_kernels._causal_split import causal_rows_on_sdpa

    layout = LatentLayout.prefix_sharing([29, 33], [7, 5], num_slots=3).to(DEVICE)
    rows = layout.plain_causal_rows()
    assert rows == 29
    q, k, v = _inputs(2, 4, 2, layout.length, layout.length, 32, dtype, transposed=True)
    out, (dq, dk, dv) = check(q, k, v, layout, attend=lambda *qkv: causal_rows_on_sdpa(
        *qkv, layout, q.shape[-1] ** -0.5, rows))
    assert type(out.grad_fn).__name__ == "_CausalRowsSplitBackward"
    assert out.stride() == q.stride() and dq.stride() == q.stride()
    assert dk.stride() == k.stride() and dv.stride() == v.stride()
    # a forward alone: the same output without a node
    with torch.no_grad():
        alone = causal_rows_on_sdpa(q, k, v, layout, q.shape[-1] ** -0.5, rows)
    assert alone.grad_fn is None and alone.stride() == q.stride()
    torch.testing.assert_close(alone, out.detach(), rtol=0, atol=0)
    # composed from slices on the reference backend: the same values
    composed = causal_rows_on_sdpa(q, k, v, layout, q.shape[-1] ** -0.5, rows, backend="torch")
    torch.testing.assert_close(composed, out, **({} if dtype == torch.float32 else
                                                  dict(rtol=2e-2, atol=2e-2)))
    # a layout that is plain causal throughout: SDPA alone
    causal = LatentLayout.causal(2, 21).to(DEVICE)
    q, k, v = _inputs(2, 4, 2, 21, 21, 32, dtype)
    check(q, k, v, causal, attend=lambda *qkv: causal_rows_on_sdpa(
        *qkv, causal, q.shape[-1] ** -0.5, causal.plain_causal_rows()))


def test_split_rows_free_their_inputs_under_activation_checkpointing(rng_seed):
    """The split's node holds x's part (SDPA's graph and its inputs) outside
    save_for_backward: under non-reentrant checkpointing q, k and v stayed alive through the
    checkpointed layer. There every row runs on our kernels, with the same result."""
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils.checkpoint import checkpoint

    from amvl_kernels._causal_split import causal_rows_on_sdpa

    layout = LatentLayout.prefix_sharing([29, 33], [7, 5], num_slots=3).to(DEVICE)
    rows = layout.plain_causal_rows()
    weight = torch.randn(32, 3 * 4 * 32, device=DEVICE, dtype=torch.float64) * 0.2
    x = torch.randn(2, layout.length, 32, device=DEVICE, dtype=torch.float64,
                    requires_grad=True)
    storages = []

    def block(x):
        qkv = (x @ weight).view(2, layout.length, 3, 4, 32).permute(2, 0, 3, 1, 4).float()
        storages.append(StorageWeakRef(qkv.untyped_storage()))
        return causal_rows_on_sdpa(*qkv.unbind(0), layout, 32 ** -0.5, rows).double().sum()

    plain = block(x)
    plain_grad, = torch.autograd.grad(plain, x)
    checkpointed = checkpoint(block, x, use_reentrant=False)
    gc.collect()
    assert storages[-1].expired()
    checkpointed.backward()
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, plain_grad, rtol=1e-4, atol=1e-5)


def test_split_rows_check_their_inputs(rng_seed):
    """The split checks what ak.latent_attention checks, and that the rows it is handed are
    plain causal: too many rows would be attended causally against the layout's rule."""
    from amvl_kernels._causal_split import causal_rows_on_sdpa

    layout = LatentLayout.prefix_sharing([11, 14], [4, 3], num_slots=2).to(DEVICE)
    length, rows = layout.length, layout.plain_causal_rows()
    q, k, v = _inputs(2, 4, 2, length, length, 16, torch.float32)
    bad = [
        (lambda: causal_rows_on_sdpa(q, k, v, layout, 1.0, 0), ValueError, "rows must be"),
        (lambda: causal_rows_on_sdpa(q, k, v, layout, 1.0, 2.0), ValueError, "rows must be"),
        (lambda: causal_rows_on_sdpa(q[:, :, 1:], k, v, layout, 1.0, 4), ValueError,
         "as many queries as keys"),
        (lambda: causal_rows_on_sdpa(q, k, v, layout, 1.0, rows + 1), ValueError,
         "plain causal"),
        (lambda: causal_rows_on_sdpa(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], layout, 1.0, 4),
         ValueError, "layout is for"),
        (lambda: causal_rows_on_sdpa(q[:1], k[:1], v[:1], layout, 1.0, 4), ValueError,
         "layout is for"),
        (lambda: causal_rows_on_sdpa(q.double(), k.double(), v.double(), layout, 1.0, 4),
         TypeError, "backend='triton' takes"),
        (lambda: causal_rows_on_sdpa(q, k, v, layout, -1.0, 4), ValueError, "scale"),
        (lambda: causal_rows_on_sdpa(q, k, v, layout, 1.0, 4, backend="cuda"), ValueError,
         "backend must be"),
        (lambda: causal_rows_on_sdpa(q, k, v, layout, 1.0, 4, backend=None), ValueError,
         "backend must be"),
    ]
    for call, error, match in bad:
        with pytest.raises(error, match=match):
            call()
    # an empty batch: the empty call's answer; scale None: 1 / sqrt(D)
    empty = causal_rows_on_sdpa(*_inputs(0, 4, 2, length, length, 16, torch.float32), None,
                                None, 3)
    assert empty.shape == (0, 4, length, 16)
    torch.testing.assert_close(causal_rows_on_sdpa(q, k, v, layout, None, rows),
                               causal_rows_on_sdpa(q, k, v, layout, 0.25, rows))


@pytest.mark.parametrize("frozen", ["q", "k", "v", "kv"])
def test_split_rows_with_frozen_inputs(frozen, rng_seed):
    """Only the inputs that require grad get gradients from the split node, and those
    gradients are the ones of the whole attention (x's share added to the keys' and values'
    in place)."""
    from amvl_kernels._causal_split import causal_rows_on_sdpa

    layout = LatentLayout.prefix_sharing([23, 19], [5, 6], num_slots=2).to(DEVICE)
    rows, scale = layout.plain_causal_rows(), 16 ** -0.5
    inputs = dict(zip("qkv", _inputs(2, 6, 2, layout.length, layout.length, 16,
                                     torch.float32)))
    for name in frozen:
        inputs[name].requires_grad_(False)
    out = causal_rows_on_sdpa(*inputs.values(), layout, scale, rows)
    grad = torch.randn_like(out)
    trained = [t for t in inputs.values() if t.requires_grad]
    grads = torch.autograd.grad(out, trained, grad)
    ref_in = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs.values()]
    ref = latent_attention_torch(*ref_in, layout, scale)
    ref_grads = torch.autograd.grad(ref, [t for t in ref_in if t.requires_grad], grad.double())
    assert _rel(out, ref) < TOL[torch.float32]
    for g, rg in zip(grads, ref_grads):
        assert _rel(g, rg) < 10 * TOL[torch.float32]


def test_split_rows_refuse_a_second_backward(rng_seed):
    """x's rows' graph is released after the first backward: a second one (retain_graph)
    names the way out instead of failing inside autograd."""
    from amvl_kernels._causal_split import causal_rows_on_sdpa

    layout = LatentLayout.prefix_sharing([17], [4], num_slots=2).to(DEVICE)
    q, k, v = _inputs(1, 2, 1, layout.length, layout.length, 16, torch.float32)
    out = causal_rows_on_sdpa(q, k, v, layout, 0.25, layout.plain_causal_rows())
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backend='triton'"):
        out.sum().backward()


def test_meta_tensors_give_shapes():
    """A model traced on the meta device (shapes alone): autocast's check raised for it."""
    q = torch.empty(2, 4, 7, 8, device="meta")
    k = torch.empty(2, 2, 9, 8, device="meta")
    out = ak.latent_attention(q, k, k)
    assert out.shape == (2, 4, 7, 8) and out.device.type == "meta"


def test_second_order_gradients_are_refused(rng_seed):
    """create_graph=True (a gradient penalty): the kernels' gradients came back without a graph
    and the second-order gradient silently lacked their terms (the split rows' too)."""
    from amvl_kernels._causal_split import causal_rows_on_sdpa

    layout = LatentLayout.prefix_sharing([17], [4], num_slots=2).to(DEVICE)
    q, k, v = _inputs(1, 2, 1, layout.length, layout.length, 16, torch.float32)
    for out in (ak.latent_attention(q, k, v, layout, backend="triton"),
                causal_rows_on_sdpa(q, k, v, layout, 0.25, layout.plain_causal_rows())):
        with pytest.raises(RuntimeError, match="cannot be differentiated again"):
            torch.autograd.grad(out.sum(), (q, k, v), create_graph=True)
        assert all(g is not None for g in torch.autograd.grad(out.sum(), (q, k, v)))


def test_auto_hands_long_plain_causal_prefixes_to_sdpa(monkeypatch, rng_seed):
    """backend="auto" on a GPU: with at least CAUSAL_ROWS_TO_SDPA leading plain causal rows
    (CAUSAL_ROWS_TO_SDPA_WITH_GRAD when a backward follows), a square fp16/bf16 call splits
    them off; otherwise, or asked for "triton", it does not, and a layout shorter than the
    threshold is not even read (no host sync)."""
    import importlib

    module = importlib.import_module("amvl_kernels.latent_attention")
    monkeypatch.setattr(module, "resolve_backend", lambda backend, device: "triton")
    monkeypatch.setattr(module, "CAUSAL_ROWS_TO_SDPA", 10)
    monkeypatch.setattr(module, "CAUSAL_ROWS_TO_SDPA_WITH_GRAD", 13)
    split = []
    splitter = importlib.import_module("amvl_kernels._causal_split")
    real = splitter.split_causal_rows
    monkeypatch.setattr(splitter, "split_causal_rows",
                        lambda *args: split.append(args[-1]) or real(*args))
    layout = LatentLayout.prefix_sharing([12, 15], [4, 3], num_slots=2).to(DEVICE)
    length = layout.length
    q, k, v = _inputs(2, 4, 2, length, length, 16, torch.bfloat16)  # all require grad
    with torch.no_grad():  # a forward alone: from 10 rows
        ak.latent_attention(q, k, v, layout)
        assert split == [12]
        ak.latent_attention(q, k, v, layout, backend="triton")  # our kernels for every row
        ak.latent_attention(q.float(), k.float(), v.float(), layout)  # fp32: ours (IEEE)
        ak.latent_attention(q[:, :, -5:], k, v, layout)  # a KV cache: no leading rows
        short = LatentLayout.prefix_sharing([9, 9], [4, 3], num_slots=2).to(DEVICE)
        ak.latent_attention(*_inputs(2, 4, 2, short.length, short.length, 16,
                                     torch.bfloat16), short)  # 9 rows: below the threshold
    assert split == [12]
    ak.latent_attention(q, k, v, layout)  # with a backward: 12 rows are below 13
    assert split == [12]
    longer = LatentLayout.prefix_sharing([14, 15], [4, 3], num_slots=2).to(DEVICE)
    grads = _inputs(2, 4, 2, longer.length, longer.length, 16, torch.bfloat16)
    out = ak.latent_attention(*grads, longer)
    assert split == [12, 14]
    out.sum().backward()
    assert all(t.grad is not None and bool(t.grad.isfinite().all()) for t in grads)
    counted = []
    monkeypatch.setattr(module, "_plain_causal_rows",
                        lambda layout: counted.append(layout) or layout.plain_causal_rows())
    monkeypatch.setattr(module, "CAUSAL_ROWS_TO_SDPA_WITH_GRAD", longer.length + 1)
    ak.latent_attention(*grads, longer)  # shorter than the threshold: no count, no split
    assert counted == [] and split == [12, 14]


def test_auto_can_hand_short_query_blocks_over_a_cache_to_sdpa(monkeypatch, rng_seed):
    """With SHORT_QUERIES_TO_SDPA set, backend="auto" runs a call of that many queries or
    fewer over a KV cache with a layout on SDPA with the layout's dense mask (built once per
    layout), with the same output and gradients as our kernels; longer blocks, square calls
    and backend="triton" stay on our kernels."""
    import importlib

    module = importlib.import_module("amvl_kernels.latent_attention")
    monkeypatch.setattr(module, "resolve_backend", lambda backend, device: "triton")
    monkeypatch.setattr(module, "SHORT_QUERIES_TO_SDPA", 6)
    handed = []
    real = module.latent_attention_sdpa
    monkeypatch.setattr(module, "latent_attention_sdpa",
                        lambda *args: handed.append(args[0].shape[2]) or real(*args))
    layout = LatentLayout.prefix_sharing([11, 9], [4, 3], num_slots=2).to(DEVICE)
    length = layout.length
    q, k, v = _inputs(2, 4, 2, length, length, 16, torch.float32)
    for rows, backend, expected in ((6, "auto", [6]), (7, "auto", []), (6, "triton", []),
                                    (length, "auto", [])):
        handed.clear()
        inputs = [q[:, :, -rows:].detach().requires_grad_(), k, v]
        out = ak.latent_attention(*inputs, layout, backend=backend)
        assert handed == expected, (rows, backend)
        if expected:
            ours = ak.latent_attention(*inputs, layout, backend="triton")
            torch.testing.assert_close(out, ours, rtol=1e-4, atol=1e-5)
            g = torch.randn_like(out)
            got = torch.autograd.grad(out, inputs, g)
            want = torch.autograd.grad(ours, inputs, g)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert sum(key[0] == "sdpa masks" for key in layout._derived) == 1


@pytest.mark.parametrize("tiles_fastest", [True, False], ids=["tiles-fastest", "heads-fastest"])
def test_both_grid_orders(monkeypatch, tiles_fastest, rng_seed):
    """The flash kernels read their place from either grid order: (tiles, heads), the
    default, or (heads, tiles), taken where heads exceed grid axis 1."""
    import importlib

    module = importlib.import_module("amvl_kernels.latent_attention")
    asked = []
    monkeypatch.setattr(module, "_tiles_fastest",
                        lambda heads: asked.append(heads) or tiles_fastest)
    layout = random_layout(2, 45, torch.Generator().manual_seed(rng_seed)).to(DEVICE)
    # 40 queries x 2 heads a group: past the decode kernel's 64 rows, so the flash forward
    check(*_inputs(2, 4, 2, 40, 45, 32, torch.float32), layout)
    check(*_inputs(2, 4, 2, 40, 45, 32, torch.float32), None)
    assert len(asked) == 6  # forward, dk/dv and dq, twice


def test_grid_order_puts_tiles_on_axis_0_within_cuda_limits():
    from amvl_kernels.latent_attention import _tiles_fastest

    assert _tiles_fastest(4 * 28) and _tiles_fastest(65535)
    assert not _tiles_fastest(65536)


def test_grouped_heads_split_only_where_the_grid_is_small():
    from amvl_kernels.latent_attention import _dkdv_head_split

    assert _dkdv_head_split(104, 7, 264) == 3  # Qwen2-0.5B, batch 4, 1,632 tokens, H100
    assert _dkdv_head_split(208, 7, 264) == 2  # the 7B proxy: the fewest shares that fill it
    assert _dkdv_head_split(100, 8, 264) == 3
    assert _dkdv_head_split(100, 8, 150) == 2
    assert _dkdv_head_split(10, 7, 264) == 7  # at most one share per head
    assert _dkdv_head_split(300, 8, 264) == 1  # enough programs already
    assert _dkdv_head_split(10, 1, 264) == 1  # no groups to split


@pytest.mark.parametrize("lq", [1, 3, 40], ids=["decode-1", "decode-3", "flash"])
def test_outputs_and_gradients_keep_the_inputs_memory_layout(lq, rng_seed):
    """Hugging Face models hand over (B, L, H, D) memory viewed as (B, H, L, D) and transpose
    the output back: in that layout the transpose is contiguous and costs no copy (as with
    SDPA), and the gradients come back in their inputs' layouts. Values against the
    reference, on the decode path and the flash path."""
    layout = random_layout(2, 41, torch.Generator().manual_seed(rng_seed)).to(DEVICE)
    q = torch.randn(2, lq, 4, 32, device=DEVICE).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(2, 41, 2, 32, device=DEVICE).transpose(1, 2).requires_grad_()
            for _ in range(2))
    out, (dq, dk, dv) = check(q, k, v, layout)
    assert out.transpose(1, 2).is_contiguous()
    assert (dq.stride(), dk.stride(), dv.stride()) == (q.stride(), k.stride(), v.stride())


def _fallback_cases(seed):
    g = torch.Generator().manual_seed(seed)
    blind = LatentLayout.causal(2, 35, torch.ones(2, 35, dtype=torch.bool))
    visible = blind.visible_kinds.clone()
    visible[0, 3:21] = 0  # rows that see nothing, after causal rows
    padding = torch.ones(2, 40, dtype=torch.bool)
    padding[0, :7] = False
    return {
        "random": (random_layout(2, 53, g), 53),
        "random-kv-cache": (random_layout(2, 53, g), 17),
        "prefix-sharing": (LatentLayout.prefix_sharing([13, 20], [9, 4], num_slots=4), None),
        "blind-rows": (LatentLayout.from_tensors(blind.segment_kind, visible, blind.block_id), 35),
        "left-padding": (LatentLayout.causal(2, 40, padding), 40),
        "causal": (None, 29),
        "causal-kv-cache": (None, 1),
    }


@pytest.mark.parametrize("case", list(_fallback_cases(0)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sdpa_fallback_matches_the_reference(case, dtype, rng_seed):
    """backend="torch" (what "auto" runs on the CPU) against the float64 reference."""
    layout, lq = _fallback_cases(rng_seed)[case]
    lk = layout.length if layout is not None else 29
    lq = lk if lq is None else lq
    layout = layout.to(DEVICE) if layout is not None else None
    out, (dq, _, _) = check(*_inputs(2, 4, 2, lq, lk, 32, dtype), layout, backend="torch")
    if case == "blind-rows":
        assert torch.count_nonzero(out[0, :, 3:21]) == 0
        assert torch.count_nonzero(dq[0, :, 3:21]) == 0


def test_causal_prefix_rows_finds_where_the_mask_stops_being_causal():
    from amvl_kernels.reference.latent_attention import causal_prefix_rows

    sharing = LatentLayout.prefix_sharing([13, 20], [9, 4], num_slots=4)
    assert causal_prefix_rows(sharing.dense_mask(sharing.length)) == 13  # the shorter x
    assert causal_prefix_rows(LatentLayout.causal(1, 9).dense_mask(9)) == 9
    blocks = LatentLayout.with_latent_blocks(20, [[(6, 3)]])
    assert causal_prefix_rows(blocks.dense_mask(20)) == 6  # row 6 sees its block ahead


def test_backends_agree_and_auto_picks_the_device_default(rng_seed):
    q, k, v = _inputs(1, 2, 2, 19, 19, 16, torch.float32)
    torch.testing.assert_close(ak.latent_attention(q, k, v, backend="torch"),
                               ak.latent_attention(q, k, v, backend="triton"),
                               rtol=1e-5, atol=1e-6)
    auto = ak.latent_attention(q.double(), k.double(), v.double())  # falls back for float64
    assert auto.dtype == torch.float64


def test_torch_compile_on_the_pytorch_path_with_a_fresh_layout(rng_seed):
    """The CPU fallback counts a layout's plain causal rows with a host read: under
    torch.compile (first, before any eager call has cached the count) it must not."""
    torch._dynamo.reset()
    q, k, v = _inputs(1, 2, 1, 21, 21, 16, torch.float32)
    prefix = LatentLayout.prefix_sharing([10], [5], 3).to(DEVICE)

    def f(q, k, v, layout):
        return ak.latent_attention(q, k, v, layout, backend="torch").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, prefix), (q, k, v))
    fresh = LatentLayout.prefix_sharing([10], [5], 3).to(DEVICE)
    for a, b in zip(got, torch.autograd.grad(f(q, k, v, fresh), (q, k, v))):
        torch.testing.assert_close(a, b)


def test_torch_compile_and_opcheck(rng_seed):
    layout = LatentLayout.with_latent_blocks(21, [[(5, 4)]]).to(DEVICE)
    q, k, v = _inputs(1, 2, 1, 21, 21, 16, torch.float32)

    def f(q, k, v):
        return ak.latent_attention(q, k, v, layout, backend="triton").square().sum()

    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(eager, torch.autograd.grad(compiled(q, k, v), (q, k, v))):
        torch.testing.assert_close(a, b)
    from amvl_kernels.latent_attention import _tile_tensors

    tiles = _tile_tensors(layout, 21, q.shape[1] // k.shape[1], 16, q.dtype, DEVICE)
    torch.library.opcheck(torch.ops.amvl.latent_attention.default, (q, k, v, tiles, 0.25))


def test_torch_compile_traces_the_custom_op_not_the_eager_function(rng_seed):
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    layout = LatentLayout.with_latent_blocks(21, [[(5, 4)]]).to(DEVICE)
    q, k, v = _inputs(1, 2, 1, 21, 21, 16, torch.float32)
    compiled = torch.compile(
        lambda q, k, v: ak.latent_attention(q, k, v, layout, backend="triton").sum(),
        backend=recording_backend, fullgraph=True)
    compiled(q, k, v)
    assert "torch.ops.amvl.latent_attention" in graphs[0]


def _dynamic_case(case: str, extra: int):
    """Inputs and layout of one call whose lengths grow with ``extra``; at least two tiles of
    the interpreter's 16 rows, so that no tile count is 1 (torch.compile specialises sizes of
    1)."""
    x = 19 + extra
    if case == "causal":
        return (*_inputs(2, 4, 2, x, x, 8, torch.float32), None)
    if case == "kv-cache":
        return (*_inputs(2, 4, 2, 17, x + 17, 8, torch.float32), None)
    if case == "prefix-sharing":  # every tail of the training step's first pass
        layout = LatentLayout.prefix_sharing([x, x - 3], [3, 2], num_slots=4)
        return (*_inputs(2, 4, 2, layout.length, layout.length, 8, torch.float32), layout)
    layout = LatentLayout.with_latent_blocks(x + 17, [[(x, 5)]])  # a latent pass over a cache
    return (*_inputs(1, 2, 1, 17, x + 17, 8, torch.float32), layout)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", ["causal", "kv-cache", "prefix-sharing", "latent-block-cache"])
def test_torch_compile_with_dynamic_shapes_keeps_one_graph(backend, case, rng_seed):
    """torch.compile with dynamic shapes (dynamic=True, or the automatic kind after a second
    length) traces every length into one graph, whose outputs and gradients equal eager
    calls. SDPA's enable_gqa once got a symbolic bool (a TypeError); a length checked with
    operator.index and a tile map looked up by its length each pinned the graph to one
    length, a recompile per length; a constant-folded function of the head dim failed."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def f(q, k, v, layout):
        return ak.latent_attention(q, k, v, layout, backend=backend).square().sum()

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=counter)
    for extra in (0, 5, 22):
        q, k, v, layout = _dynamic_case(case, extra)
        layout = layout.to(DEVICE) if layout is not None else None
        want = torch.autograd.grad(f(q, k, v, layout), (q, k, v))
        got = torch.autograd.grad(compiled(q, k, v, layout), (q, k, v))
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("with_layout", [False, True])
def test_eager_function_matches_the_custom_op(with_layout, rng_seed):
    """Eager calls skip the dispatcher (an autograd.Function over the same launchers); they
    must agree bitwise with the custom op that torch.compile traces, gradients included."""
    from amvl_kernels.latent_attention import _tile_tensors

    layout = LatentLayout.with_latent_blocks(23, [[(6, 5)], [(2, 3)]]).to(DEVICE) \
        if with_layout else None
    q, k, v = _inputs(2, 4, 2, 23, 23, 16, torch.float32)
    eager = ak.latent_attention(q, k, v, layout, scale=0.3, backend="triton")
    tiles = _tile_tensors(layout, 23, q.shape[1] // k.shape[1], 16, q.dtype, DEVICE)
    op, _ = torch.ops.amvl.latent_attention(q, k, v, tiles, 0.3)
    assert torch.equal(eager, op)
    grad = torch.randn_like(op)
    for a, b in zip(torch.autograd.grad(eager, (q, k, v), grad),
                    torch.autograd.grad(op, (q, k, v), grad)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_autocast_casts_the_inputs_as_sdpa_does(backend, rng_seed):
    """Rotary tables in fp32 hand over fp32 q and k beside a bf16 v under autocast: the op
    takes all three in autocast's dtype, and the gradients reach the fp32 inputs."""
    layout = LatentLayout.with_latent_blocks(21, [[(12, 4)], [(5, 3)]]).to(DEVICE)
    q, k, _ = _inputs(2, 4, 2, 21, 21, 16, torch.float32)
    v = torch.randn(2, 2, 21, 16, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = ak.latent_attention(q, k, v, layout, backend=backend)
    expected = ak.latent_attention(q.bfloat16(), k.bfloat16(), v, layout, backend=backend)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    dq, dk = torch.autograd.grad(out.float().sum(), (q, k))
    assert dq.dtype == dk.dtype == torch.float32 and bool(dq.abs().sum() > 0)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):  # float64 stays, as autocast leaves it
        out64 = ak.latent_attention(q.double(), k.double(), v.double(), layout, backend="torch")
    assert out64.dtype == torch.float64


def test_empty_inputs(rng_seed):
    q, k, v = _inputs(0, 2, 1, 3, 3, 16, torch.float32)
    assert ak.latent_attention(q, k, v, backend="triton").shape == (0, 2, 3, 16)
    q, k, v = _inputs(1, 2, 1, 0, 0, 16, torch.float32)
    out = ak.latent_attention(q, k, v, backend="triton")
    assert out.shape == (1, 2, 0, 16)
    assert all(g is not None for g in torch.autograd.grad(out.sum(), (q, k, v)))
    # head dim 0: the default scale 1 / sqrt(D) is never taken
    q, k, v = _inputs(1, 2, 1, 3, 3, 0, torch.float32)
    for backend in ("triton", "torch"):
        assert ak.latent_attention(q, k, v, backend=backend).shape == (1, 2, 3, 0)


def _ok():
    return [torch.randn(1, 2, 4, 8, device=DEVICE) for _ in range(3)]


@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, v: ak.latent_attention(q[0], k, v), ValueError, "q must be"),
    (lambda q, k, v: ak.latent_attention(q, k.half(), v), TypeError, "k has dtype"),
    (lambda q, k, v: ak.latent_attention(q, k, v[..., :4]), ValueError, "same shape"),
    (lambda q, k, v: ak.latent_attention(q.repeat(1, 1, 2, 1), k, v), ValueError, "queries"),
    (lambda q, k, v: ak.latent_attention(q, k.repeat(1, 3, 1, 1), v.repeat(1, 3, 1, 1)),
     ValueError, "multiple"),
    (lambda q, k, v: ak.latent_attention(q, k[:, :0], v[:, :0]), ValueError,
     "k and v need at least one head"),
    (lambda q, k, v: ak.latent_attention(q, k, v, LatentLayout.causal(1, 5)), ValueError,
     "layout is for"),
    (lambda q, k, v: ak.latent_attention(q, k, v, layout="causal"), TypeError, "LatentLayout"),
    (lambda q, k, v: ak.latent_attention(q.long(), k, v), TypeError, "floating-point"),
    (lambda q, k, v: ak.latent_attention(*(t.to(torch.float8_e4m3fn) for t in (q, k, v)),
                                         backend="torch"), TypeError, "cast the inputs"),
    (lambda q, k, v: ak.latent_attention(q, k, v, scale=float("nan")), ValueError, "scale"),
    (lambda q, k, v: ak.latent_attention(q, k, v, scale=True), ValueError, "scale"),
    (lambda q, k, v: ak.latent_attention(q, k, v, scale=0.0), ValueError, "positive"),
    (lambda q, k, v: ak.latent_attention(q, k, v, scale=-0.5), ValueError, "positive"),
    (lambda q, k, v: ak.latent_attention(q, k, v, scale=torch.tensor(0.5)), ValueError, "scale"),
    (lambda q, k, v: ak.latent_attention(q, k, v, backend="flash"), ValueError, "backend"),
    (lambda q, k, v: ak.latent_attention(q.double(), k.double(), v.double(), backend="triton"),
     TypeError, "float64"),
])
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call(*_ok())


def test_offsets_past_32_bits_are_refused_not_wrapped():
    """Keys whose heads lie 2**30 elements apart: head 2 starts at element 2**31, where the
    kernels' 32-bit offsets would wrap (a crash or another tensor's memory). 4 GiB of
    address space, never touched (on a GPU, 4 GiB allocated and never touched)."""
    storage = torch.empty(2**31 + 2**10, dtype=torch.float16, device=DEVICE)
    k = storage.as_strided((1, 3, 8, 16), (0, 2**30, 16, 1))
    q = torch.randn(1, 3, 8, 16, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="32-bit offsets"):
        ak.latent_attention(q, k, k, backend="triton")
    import importlib

    module = importlib.import_module("amvl_kernels.latent_attention")
    assert module._row_extent(k) > module.MAX_ROW_OFFSET  # "auto" takes the PyTorch path
    # stride-0 views of one row: their outputs and gradients, allocated whole, would not fit
    expanded = torch.empty(1, 1, 1, 256, dtype=torch.float16, device=DEVICE).expand(
        1, 3, 2**22, 256)
    with pytest.raises(ValueError, match="32-bit offsets"):
        ak.latent_attention(expanded, expanded, expanded, backend="triton")
    fits = storage.as_strided((1, 3, 8, 16), (0, 2**29, 16, 1))  # head 2 at 2**30: fine
    from amvl_kernels.latent_attention import _check_offsets

    _check_offsets(k=fits)


def test_a_numpy_scale_is_a_number():
    import numpy as np

    q, k, v = _ok()
    torch.testing.assert_close(ak.latent_attention(q, k, v, scale=np.float32(0.25)),
                               ak.latent_attention(q, k, v, scale=0.25))


def test_layout_builders_are_exported():
    assert ak.LatentLayout is LatentLayout
    assert kind_bits(Kind.TEXT) == 1


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_views_with_a_pending_negation(backend):
    """``x.conj().imag`` views hold their values without the sign in memory."""
    q = torch.randn(1, 2, 9, 16, dtype=torch.complex64, device=DEVICE).conj().imag
    q.requires_grad_()
    k, v = (torch.randn(1, 2, 9, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    assert q.is_neg()
    out = ak.latent_attention(q, k, v, backend=backend)
    expected = ak.latent_attention(q.detach().clone(), k.detach(), v.detach(), backend=backend)
    torch.testing.assert_close(out, expected)
    grad = torch.randn(1, 9, 2, 16, device=DEVICE, dtype=torch.complex64).conj().imag
    grad = grad.transpose(1, 2)  # an upstream gradient with a pending negation, too
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ak.latent_attention(q, k, v, backend=backend), (q, k, v),
                               grad.clone())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
