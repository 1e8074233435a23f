"""Tests of ak.gaussian_sample_kl / ak.gaussian_sample against float64 formulas.

Every backend that runs here (torch; triton on a GPU or under TRITON_INTERPRET=1; cuda when
built and a GPU is present) is held to DESIGN.md section 5: its error against float64 is at
most 2x PyTorch's own error in the same dtype on the forward, 3x on gradients.
"""

from __future__ import annotations

import importlib
import itertools

import numpy as np
import pytest
import torch
from scipy import stats

import amvl_kernels as ak
from tests.conftest import DEVICE, available_backends

BACKENDS = available_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROUTES = ["p", "q", "both", "none"]


# ----------------------------------------------------------------------------- references


def kl64(mu_a, lv_a, mu_b, lv_b):
    """KL(a||b) per slot, straight from DESIGN.md section 2."""
    return 0.5 * (lv_b - lv_a + torch.exp(lv_a - lv_b)
                  + (mu_a - mu_b) ** 2 * torch.exp(-lv_b) - 1).sum(-1)


def formulas(mu_q, lv_q, mu_p, lv_p, eps, fwd_grad="p", rev_grad="q"):
    """z, KL(q||p), KL(p||q) in the inputs' dtype, gradient routed with explicit detach."""
    def side(route, q_or_p):
        return route in (q_or_p, "both")

    def maybe(t, keep):
        return t if keep else t.detach()

    z = mu_q + torch.exp(0.5 * lv_q) * eps.to(mu_q.dtype)
    kl_fwd = kl64(maybe(mu_q, side(fwd_grad, "q")), maybe(lv_q, side(fwd_grad, "q")),
                  maybe(mu_p, side(fwd_grad, "p")), maybe(lv_p, side(fwd_grad, "p")))
    kl_rev = kl64(maybe(mu_p, side(rev_grad, "p")), maybe(lv_p, side(rev_grad, "p")),
                  maybe(mu_q, side(rev_grad, "q")), maybe(lv_q, side(rev_grad, "q")))
    return z, kl_fwd, kl_rev


def make_inputs(shape, dtype, lv_scale=1.0, requires_grad=False):
    """Fresh random mu and log-variances (never zeros), made in float64 then rounded."""
    mu_q, mu_p = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    lv_q = lv_scale * torch.randn(shape, dtype=torch.float64)
    lv_p = lv_scale * torch.randn(shape, dtype=torch.float64)
    out = [t.to(DEVICE, dtype).requires_grad_(requires_grad) for t in (mu_q, lv_q, mu_p, lv_p)]
    return out


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_criterion(name, ours, ref64, torch_same_dtype, factor):
    """DESIGN.md section 5: error <= factor x PyTorch's own error in that dtype.

    The floor of a few ulps of the output's magnitude covers outputs where PyTorch happens to
    be exact (fp32 z is one rounding), which a correct kernel cannot beat either.
    """
    ulp = torch.finfo(ours.dtype if ours.dtype.is_floating_point else torch.float32).eps
    floor = 4 * ulp * (1.0 + ref64.abs().max().item())
    err, base = max_err(ours, ref64), max_err(torch_same_dtype, ref64)
    assert err <= factor * base + floor, (
        f"{name}: error {err:.3e} vs PyTorch's {base:.3e} (allowed {factor}x + {floor:.1e})")


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 1), (2, 5, 3), (9, 127), (3, 4099)], ids=str)
def test_forward_matches_float64(backend, dtype, shape, rng_seed):
    mu_q, lv_q, mu_p, lv_p = make_inputs(shape, dtype)
    eps = torch.randn(shape, device=DEVICE)
    z, kl_fwd, kl_rev = ak.gaussian_sample_kl(mu_q, lv_q, mu_p, lv_p, eps=eps, backend=backend)
    assert z.dtype == dtype and z.shape == shape
    assert kl_fwd.dtype == torch.float32 and kl_fwd.shape == shape[:-1]
    refs = formulas(*(t.double() for t in (mu_q, lv_q, mu_p, lv_p)), eps.double())
    same_dtype = formulas(mu_q, lv_q, mu_p, lv_p, eps)
    for name, ours, ref, base in zip(("z", "kl_fwd", "kl_rev"), (z, kl_fwd, kl_rev), refs,
                                     same_dtype):
        assert_within_criterion(name, ours, ref, base, factor=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,eps_dtype,kl_dtype", [
    (torch.float16, None, torch.float32),
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float32, torch.float64, torch.float64),  # float64 noise alone widens the KLs
    (torch.float64, None, torch.float64),
    (torch.float64, torch.float16, torch.float64),
], ids=str)
def test_kl_dtype_is_float32_or_float64_when_mu_q_or_eps_is(backend, dtype, eps_dtype,
                                                            kl_dtype):
    """The documented KL dtype: float32, float64 when mu_q (so every Gaussian input) or eps
    is float64; z stays in mu_q's dtype."""
    mu_q, lv_q, mu_p, lv_p = make_inputs((3, 5), dtype)
    eps = None if eps_dtype is None else torch.randn(3, 5, device=DEVICE, dtype=eps_dtype)
    z, kl_fwd, kl_rev = ak.gaussian_sample_kl(mu_q, lv_q, mu_p, lv_p, eps=eps, seed=5,
                                              backend=backend)
    assert z.dtype == dtype
    assert kl_fwd.dtype == kl_rev.dtype == kl_dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 1), (5, 3), (4, 127), (2, 4099)], ids=str)
def test_gradients_match_float64(backend, dtype, shape, rng_seed):
    inputs = make_inputs(shape, dtype, requires_grad=True)
    eps = torch.randn(shape, device=DEVICE)
    g_z = torch.randn(shape, device=DEVICE, dtype=dtype)
    g_f, g_r = torch.randn(shape[:-1], device=DEVICE), torch.randn(shape[:-1], device=DEVICE)

    def grads(outputs, wrt):
        z, f, r = outputs
        return torch.autograd.grad((z * g_z.to(z.dtype)).sum() + (f * g_f.to(f.dtype)).sum()
                                   + (r * g_r.to(r.dtype)).sum(), wrt)

    ours = grads(ak.gaussian_sample_kl(*inputs, eps=eps, fwd_grad="both", rev_grad="both",
                                       backend=backend), inputs)
    x64 = [t.detach().double().requires_grad_() for t in inputs]
    refs = grads(formulas(*x64, eps.double(), "both", "both"), x64)
    same_dtype = grads(formulas(*inputs, eps, "both", "both"), inputs)
    for name, o, r, b in zip(("mu_q", "logvar_q", "mu_p", "logvar_p"), ours, refs, same_dtype):
        assert o.dtype == dtype
        assert_within_criterion(f"grad {name}", o, r, b, factor=3)


def _views(kind, shape, dtype):
    """Non-contiguous views holding fresh random values."""
    rows, d = shape
    if kind == "transposed":  # reshape stays a view, strides (1, rows)
        return [t.t() for t in make_inputs((d, rows), dtype)]
    if kind == "strided":  # every other column
        return [t[:, ::2] for t in make_inputs((rows, 2 * d), dtype)]
    # a permuted 3-D tensor: reshaping it to (rows, d) has to copy
    return [t.permute(1, 0, 2) for t in make_inputs((3, rows // 3, d), dtype)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["transposed", "strided", "permuted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(backend, kind, dtype, rng_seed):
    views = _views(kind, (9, 37), dtype)
    assert not views[0].is_contiguous()
    eps = torch.randn(views[0].shape[::-1], device=DEVICE).permute(*range(views[0].dim())[::-1])
    for v in views:
        v.requires_grad_()
    outs = ak.gaussian_sample_kl(*views, eps=eps, fwd_grad="both", rev_grad="both",
                                 backend=backend)
    contiguous = [v.detach().contiguous().requires_grad_() for v in views]
    expected = ak.gaussian_sample_kl(*contiguous, eps=eps.contiguous(), fwd_grad="both",
                                     rev_grad="both", backend=backend)
    # Elementwise results are bitwise equal on the kernels. Sums over d are not: a compiled
    # kernel specialises on strides and may reduce in another order (seen on an H100), and so
    # may PyTorch's reductions of a strided view.
    exact = {"rtol": 0, "atol": 0} if backend != "torch" else {}
    torch.testing.assert_close(outs[0], expected[0], **exact)
    for a, b in zip(outs[1:], expected[1:]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)
    loss = sum(o.float().sum() for o in outs)
    ref_loss = sum(o.float().sum() for o in expected)
    # Gradients may differ by an ulp too: another specialisation may contract to FMA otherwise.
    for a, b in zip(torch.autograd.grad(loss, views), torch.autograd.grad(ref_loss, contiguous)):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fwd_grad,rev_grad", list(itertools.product(ROUTES, ROUTES)))
def test_gradient_routing(backend, fwd_grad, rev_grad, rng_seed):
    inputs = make_inputs((4, 6), torch.float64, requires_grad=True)
    eps = torch.randn(4, 6, device=DEVICE, dtype=torch.float64)
    weights = [torch.randn(s, device=DEVICE, dtype=torch.float64) for s in ((4, 6), (4,), (4,))]

    def loss(outputs):
        return sum((o * w).sum() for o, w in zip(outputs, weights))

    ours = torch.autograd.grad(
        loss(ak.gaussian_sample_kl(*inputs, eps=eps, fwd_grad=fwd_grad, rev_grad=rev_grad,
                                   backend=backend)), inputs, allow_unused=True)
    refs = torch.autograd.grad(loss(formulas(*inputs, eps, fwd_grad, rev_grad)), inputs,
                               allow_unused=True)
    p_gets_gradient = fwd_grad in ("p", "both") or rev_grad in ("p", "both")
    for name, o, r in zip(("mu_q", "logvar_q", "mu_p", "logvar_p"), ours, refs):
        if name.endswith("_p") and not p_gets_gradient:
            assert o is None, f"{name} must get no gradient (not even zeros)"
            assert r is None
            continue
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_outputs_without_a_route_need_no_gradient(backend, compiled):
    """An output whose routes reach no input that requires grad reports requires_grad=False,
    as the PyTorch path's detached terms do: z with q frozen, a KL routed only to frozen sides
    or to "none". Both doors: the eager autograd function and the compiled custom op."""
    def run(*args, **kwargs):
        return ak.gaussian_sample_kl(*args, **kwargs)
    cases = list(itertools.product([(0, 0, 1, 0), (1, 0, 0, 0), (1, 1, 1, 1)], ROUTES, ROUTES))
    if compiled:  # every routing is a recompile: a few, under dynamo's limit
        torch._dynamo.reset()
        run = torch.compile(run, backend="aot_eager", fullgraph=True)
        cases = [((0, 0, 1, 0), "none", "none"), ((0, 0, 1, 0), "p", "q"),
                 ((1, 0, 0, 0), "p", "q"), ((1, 1, 1, 1), "none", "both")]
    for trains, fwd_grad, rev_grad in cases:
        inputs = [torch.randn(3, 5, device=DEVICE, requires_grad=bool(t)) for t in trains]
        kwargs = dict(seed=7, fwd_grad=fwd_grad, rev_grad=rev_grad)
        ours = run(*inputs, backend=backend, **kwargs)
        ref = ak.gaussian_sample_kl(*inputs, backend="torch", **kwargs)
        assert [t.requires_grad for t in ours] == [t.requires_grad for t in ref], \
            (trains, fwd_grad, rev_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("explicit_eps", [True, False], ids=["eps", "seed"])
def test_gradcheck_float64(backend, explicit_eps, rng_seed):
    """Finite differences see every path, so this checks the ELBO routing ("both", "both");
    the stop-gradient routings are checked against explicit detach in test_gradient_routing."""
    inputs = make_inputs((3, 5), torch.float64, requires_grad=True)
    eps = torch.randn(3, 5, device=DEVICE, dtype=torch.float64) if explicit_eps else None

    def fn(*xs):
        return ak.gaussian_sample_kl(*xs, eps=eps, seed=1234, fwd_grad="both",
                                     rev_grad="both", backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)
    sample_inputs = [t.detach().requires_grad_() for t in inputs[:2]]
    assert torch.autograd.gradcheck(
        lambda m, lv: ak.gaussian_sample(m, lv, eps=eps, seed=99, backend=backend),
        sample_inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_outputs_get_no_gradient_work(backend):
    """Only z used: the prior gets no gradient at all, and the KL terms are skipped rather
    than multiplied by zero (an overflowing term would otherwise turn into NaN)."""
    inputs = make_inputs((5, 8), torch.float64, requires_grad=True)
    with torch.no_grad():
        inputs[3][0, 0] = -800.0  # exp(800) overflows even float64
    eps = torch.randn(5, 8, device=DEVICE, dtype=torch.float64)
    z, _, _ = ak.gaussian_sample_kl(*inputs, eps=eps, fwd_grad="both", rev_grad="both",
                                    backend=backend)
    g = torch.autograd.grad(z.sum(), inputs, allow_unused=True)
    torch.testing.assert_close(g[0], torch.ones_like(g[0]))
    torch.testing.assert_close(g[1], 0.5 * torch.exp(0.5 * inputs[1].detach()) * eps)
    assert g[2] is None and g[3] is None
    # Only KL(p||q) used with rev_grad="q": z's path and KL(q||p) add nothing to q.
    _, _, kl_rev = ak.gaussian_sample_kl(*inputs[:3], inputs[3].detach().clamp(min=-5), eps=eps,
                                         fwd_grad="both", rev_grad="q", backend=backend)
    g = torch.autograd.grad(kl_rev.sum(), inputs, allow_unused=True)
    assert g[2] is None and g[3] is None and torch.isfinite(g[0]).all()


# ----------------------------------------------------------------------------- noise


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_seed_bitwise_and_backward_uses_the_same_noise(backend, dtype, rng_seed):
    mu_q, lv_q, mu_p, lv_p = make_inputs((6, 33), dtype, requires_grad=True)
    seed = rng_seed
    z1, f1, r1 = ak.gaussian_sample_kl(mu_q, lv_q, mu_p, lv_p, seed=seed, backend=backend)
    z2, f2, r2 = ak.gaussian_sample_kl(mu_q, lv_q, mu_p, lv_p, seed=seed, backend=backend)
    assert torch.equal(z1, z2) and torch.equal(f1, f2) and torch.equal(r1, r2)
    z3, _, _ = ak.gaussian_sample_kl(mu_q, lv_q, mu_p, lv_p, seed=seed + 1, backend=backend)
    assert not torch.equal(z1, z3)
    # a NumPy integer seed (from a NumPy generator) is the same seed, not a TypeError
    z4, _, _ = ak.gaussian_sample_kl(mu_q, lv_q, mu_p, lv_p, seed=np.int64(seed),
                                     backend=backend)
    assert torch.equal(z1, z4)
    # The noise the forward used is what gaussian_sample draws from the same seed at mu=0,
    # logvar=0, and d z / d logvar_q = 0.5 * sigma * eps must use exactly that noise.
    zeros = torch.zeros_like(mu_q, dtype=torch.float32)
    noise = ak.gaussian_sample(zeros, zeros, seed=seed, backend=backend)
    sigma = torch.exp(0.5 * lv_q.detach().float())
    assert_within_criterion("z from regenerated noise", z1,
                            mu_q.detach().double() + sigma.double() * noise.double(),
                            (mu_q.detach() + torch.exp(0.5 * lv_q.detach()) * noise.to(dtype)),
                            factor=2)
    (g_lv_q,) = torch.autograd.grad(z1.float().sum(), [lv_q])
    assert_within_criterion("grad logvar_q", g_lv_q, 0.5 * sigma.double() * noise.double(),
                            (0.5 * torch.exp(0.5 * lv_q.detach()) * noise.to(dtype)), factor=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_statistics(backend):
    rows, d, n = 400, 257, 400 * 257  # > 10^5 samples
    zeros = torch.zeros(rows, d, device=DEVICE)
    seed = 2**40 + 12345
    eps = ak.gaussian_sample(zeros, zeros, seed=seed, backend=backend).double().cpu()
    tol = 5 / n**0.5  # five standard errors
    assert abs(eps.mean().item()) < tol
    assert abs(eps.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert stats.kstest(eps.flatten().numpy(), "norm").pvalue > 1e-4

    def corr(a, b):
        return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()

    assert abs(corr(eps[:, :-1], eps[:, 1:])) < tol, "neighbouring elements correlate"
    assert abs(corr(eps[:-1], eps[1:])) < tol, "neighbouring slots correlate"
    other = ak.gaussian_sample(zeros, zeros, seed=seed + 1, backend=backend).double().cpu()
    assert abs(corr(eps, other)) < tol, "neighbouring seeds correlate"


def test_torch_backend_noise_on_the_cpu_is_the_cpu_generators_stream():
    """The PyTorch backend's CPU noise is PyTorch's CPU generator's stream for the seed, kept
    stable so that CPU runs reproduce across versions; that generator reads the seed's low 32
    bits, so seeds equal modulo 2**32 share it (documented). The op torch.compile traces
    instead of the generator draws the same."""
    mu, logvar = torch.randn(4, 9), torch.randn(4, 9)
    for seed in (7, 7 + 2**32, 2**62 + 3):
        z = ak.gaussian_sample(mu, logvar, seed=seed, backend="torch")
        eps = torch.randn(4, 9, generator=torch.Generator().manual_seed(seed % 2**32))
        torch.testing.assert_close(z, mu + torch.exp(0.5 * logvar) * eps, rtol=0, atol=1e-6)
        assert torch.equal(torch.ops.amvl.seeded_normal([4, 9], seed, torch.device("cpu")), eps)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton backend")
@pytest.mark.parametrize("d", [1, 6, 37])
def test_triton_noise_does_not_depend_on_block_sizes(monkeypatch, d, rng_seed):
    """The noise is keyed by (seed, row, column): tiny blocks, which split rows and noise
    groups across programs and loop over d (the backward's column chunks also over fewer
    programs than chunks), must reproduce the default launch bitwise, and a row's noise must
    not depend on how many rows there are."""
    module = importlib.import_module("amvl_kernels.gaussian_kl")
    mu_q, lv_q, mu_p, lv_p = make_inputs((5, d), torch.float32, requires_grad=True)
    seed = rng_seed

    def run():
        z, _, _ = ak.gaussian_sample_kl(mu_q, lv_q, mu_p, lv_p, seed=seed, backend="triton")
        return z, torch.autograd.grad(z.sum(), [lv_q])[0]

    z_default, g_default = run()
    monkeypatch.setattr(module, "_block_sizes", lambda n_rows, d: (2, 4, 1))
    z_tiny, g_tiny = run()
    assert torch.equal(z_default, z_tiny)
    assert torch.equal(g_default, g_tiny)
    # More column chunks than backward programs along d: each program loops over several.
    monkeypatch.setattr(module, "MAX_GRID_Y", 3)
    assert torch.equal(g_default, run()[1])
    zeros = torch.zeros(2, d, device=DEVICE)
    head = ak.gaussian_sample(zeros, zeros, seed=seed, backend="triton")
    monkeypatch.undo()
    wider = torch.zeros(9, d, device=DEVICE)
    assert torch.equal(head, ak.gaussian_sample(wider, wider, seed=seed, backend="triton")[:2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 130), (4, 1)], ids=str)
def test_a_seed_tensor_draws_the_stream_of_its_int(backend, shape, rng_seed):
    """A one-element int64 seed tensor on the inputs' device is the seed it holds: the same
    z, KLs and gradients (the backward regenerates the noise from it) as that int, and the
    same sample from gaussian_sample. Past 32 bits, so both halves of the key count."""
    inputs = make_inputs(shape, torch.float32, requires_grad=True)
    seed = rng_seed + 2**40

    def step(s):
        outs = ak.gaussian_sample_kl(*inputs, seed=s, fwd_grad="both", rev_grad="both",
                                     backend=backend)
        return [*outs, *torch.autograd.grad(sum(o.sum() for o in outs), inputs)]

    for from_int, from_tensor in zip(step(seed), step(torch.tensor([seed], device=DEVICE)),
                                     strict=True):
        assert torch.equal(from_int, from_tensor)
    mu, logvar = (t.detach() for t in inputs[:2])
    assert torch.equal(ak.gaussian_sample(mu, logvar, seed=seed, backend=backend),
                       ak.gaussian_sample(mu, logvar, seed=torch.tensor(seed, device=DEVICE),
                                          backend=backend))


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton backend")
def test_compiled_seed_tensor_keeps_one_graph_and_none_draws_inside_it(rng_seed):
    """Under torch.compile(fullgraph=True) a seed tensor whose value changes keeps one graph
    and gives the eager result of its int (an int seed is a constant or a symbolic int of
    the graph, which CUDA graphs record anew for each value). seed=None draws its seed in
    the graph, fresh at every call."""
    from torch._dynamo.testing import CompileCounterWithBackend

    inputs = make_inputs((3, 9), torch.float32, requires_grad=True)

    def loss(seed, *xs):
        return sum(o.sum() for o in ak.gaussian_sample_kl(*xs, seed=seed, backend="triton"))

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss, backend=counter, fullgraph=True)
    for seed in (rng_seed, rng_seed + 1, rng_seed + 2**40):
        got = compiled(torch.tensor(seed, device=DEVICE), *inputs)
        want = loss(seed, *inputs)
        assert torch.equal(got, want)
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(got, inputs),
                                                     torch.autograd.grad(want, inputs)))
    assert counter.frame_count == 1
    fresh = torch.compile(lambda *xs: ak.gaussian_sample(*xs, backend="triton"),
                          backend="aot_eager", fullgraph=True)
    mu, logvar = (t.detach() for t in inputs[:2])
    assert not torch.equal(fresh(mu, logvar), fresh(mu, logvar))
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CUDA graphs)")
def test_cuda_graph_replays_draw_new_noise_from_a_seed_tensor_or_none():
    """Captured in a CUDA graph, the Triton kernels read a seed tensor at each replay (the
    replay equals an eager call with the value it then holds), and seed=None draws anew at
    each replay instead of replaying the noise of the seed drawn at capture. The backends
    that take their seed by value refuse seed=None under capture."""
    mu, logvar = (t.detach() for t in make_inputs((4, 37), torch.float32)[:2])
    seed = torch.tensor([5], device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile the kernels) outside the capture
        ak.gaussian_sample(mu, logvar, seed=seed, backend="triton")
        ak.gaussian_sample(mu, logvar, backend="triton")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        seeded = ak.gaussian_sample(mu, logvar, seed=seed, backend="triton")
        fresh = ak.gaussian_sample(mu, logvar, backend="triton")
    draws = []
    for value in (5, 9):
        seed.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(seeded, ak.gaussian_sample(mu, logvar, seed=value,
                                                      backend="triton"))
        draws.append(fresh.clone())
    assert not torch.equal(draws[0], draws[1])
    with pytest.raises(RuntimeError, match="CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            ak.gaussian_sample(mu, logvar, backend="torch")


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([1.0]), "one int64"), (torch.tensor([1, 2]), "one int64"),
    (torch.tensor(1, dtype=torch.int32), "one int64"),
    (torch.tensor([1], device="meta"), "inputs' device")], ids=["float", "two", "int32", "meta"])
def test_a_bad_seed_tensor_is_refused(bad, match):
    mu, logvar = make_inputs((2, 3), torch.float32)[:2]
    with pytest.raises(ValueError, match=match):
        ak.gaussian_sample(mu, logvar, seed=bad)
    with pytest.raises(ValueError, match=match):
        ak.gaussian_sample_kl(mu, logvar, mu, logvar, seed=bad)


# ----------------------------------------------------------------------------- edge cases


def test_meta_tensors_give_shapes():
    """A model traced on the meta device (shapes alone): drawing noise there raised."""
    mu = torch.empty(3, 2, 5, device="meta", requires_grad=True)
    z, kl_fwd, kl_rev = ak.gaussian_sample_kl(mu, mu, mu, mu, rev_grad="both")
    assert (z.shape, kl_fwd.shape, kl_rev.dtype, z.device.type) == \
        ((3, 2, 5), (3, 2), torch.float32, "meta")
    (z.sum() + kl_rev.sum()).backward()
    assert mu.grad.shape == mu.shape
    assert ak.gaussian_sample(mu, mu, seed=3).shape == mu.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_order_gradients_are_the_references_or_refused(backend, rng_seed):
    """create_graph=True (a gradient penalty): the kernels' gradients came back without a graph
    and the second-order gradient silently lacked their terms; they are refused now, and the
    torch backend's are the formulas' own."""
    leaves = [torch.randn(3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
              for _ in range(4)]
    eps = torch.randn(3, 5, dtype=torch.float64, device=DEVICE)
    z, kl_fwd, kl_rev = ak.gaussian_sample_kl(*leaves, eps=eps, fwd_grad="both",
                                              rev_grad="both", backend=backend)
    loss = (z ** 2).sum() + kl_fwd.sum() + kl_rev.sum()
    if backend != "torch":
        with pytest.raises(RuntimeError, match="create_graph=True.*backend='torch'"):
            torch.autograd.grad(loss, leaves, create_graph=True)
        return
    penalty = sum((g ** 2).sum() for g in torch.autograd.grad(loss, leaves, create_graph=True))
    z, kl_fwd, kl_rev = formulas(*leaves, eps, "both", "both")
    expected = sum((g ** 2).sum() for g in torch.autograd.grad(
        (z ** 2).sum() + kl_fwd.sum() + kl_rev.sum(), leaves, create_graph=True))
    for got, want in zip(torch.autograd.grad(penalty, leaves),
                         torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_rows_loop_over_d(backend, rng_seed):
    inputs = make_inputs((2, 70001), torch.float32)
    eps = torch.randn(2, 70001, device=DEVICE)
    z, f, r = ak.gaussian_sample_kl(*inputs, eps=eps, backend=backend)
    refs = formulas(*(t.double() for t in inputs), eps.double())
    for name, ours, ref, base in zip("zfr", (z, f, r), refs, formulas(*inputs, eps)):
        assert_within_criterion(name, ours, ref, base, factor=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (2, 0, 3)], ids=str)
def test_empty_inputs(backend, shape):
    inputs = [torch.randn(shape, device=DEVICE, requires_grad=True) for _ in range(4)]
    z, f, r = ak.gaussian_sample_kl(*inputs, backend=backend)
    assert z.shape == shape and f.shape == shape[:-1] and r.shape == shape[:-1]
    assert torch.count_nonzero(f) == 0 and torch.count_nonzero(r) == 0  # empty sums are 0
    grads = torch.autograd.grad(z.sum() + f.sum() + r.sum(), inputs, allow_unused=True)
    assert all(g is None or g.shape == shape for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_to_its_slot_only(backend, rng_seed):
    mu_q, lv_q, mu_p, lv_p = make_inputs((5, 11), torch.float32)
    mu_p[2, 3] = float("nan")
    lv_q[4, 0] = float("nan")
    z, f, r = ak.gaussian_sample_kl(mu_q, lv_q, mu_p, lv_p, seed=7, backend=backend)
    assert f[2].isnan() and r[2].isnan() and f[4].isnan() and r[4].isnan()
    assert torch.isfinite(f[[0, 1, 3]]).all() and torch.isfinite(r[[0, 1, 3]]).all()
    assert z[4, 0].isnan() and torch.isfinite(z[:4]).all() and torch.isfinite(z[4, 1:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,lv_max,mu_max", [(torch.float32, 30, 1e3),
                                                 (torch.bfloat16, 30, 1e3),
                                                 (torch.float16, 5, 10)], ids=str)
def test_safe_logvar_range(backend, dtype, lv_max, mu_max):
    """The documented safe range: no inf or NaN in any output or gradient."""
    shape = (64, 33)
    lv = [(torch.rand(shape, device=DEVICE) * 2 - 1) * lv_max for _ in range(2)]
    lv[0][0, :4] = torch.tensor([lv_max, -lv_max, lv_max, -lv_max])  # the extremes themselves
    lv[1][0, :4] = torch.tensor([-lv_max, lv_max, lv_max, -lv_max])
    mu = [(torch.rand(shape, device=DEVICE) * 2 - 1) * mu_max for _ in range(2)]
    inputs = [t.to(dtype).requires_grad_() for t in (mu[0], lv[0], mu[1], lv[1])]
    outs = ak.gaussian_sample_kl(*inputs, seed=3, fwd_grad="both", rev_grad="both",
                                 backend=backend)
    assert all(torch.isfinite(o).all() for o in outs)
    grads = torch.autograd.grad(sum(o.float().mean() for o in outs), inputs)
    assert all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------- bad input


def _ok(shape=(3, 4)):
    return [torch.randn(shape, device=DEVICE) for _ in range(4)]


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a: a.__setitem__(2, torch.randn(3, 5, device=DEVICE)), ValueError, "mu_p"),
    (lambda a: a.__setitem__(1, a[1].double()), TypeError, "logvar_q"),
    (lambda a: a.__setitem__(3, a[3].to(torch.int64)), TypeError, "logvar_p"),
    (lambda a: a.__setitem__(0, a[0].tolist()), TypeError, "mu_q"),
    (lambda a: a.__setitem__(0, torch.tensor(1.0)), ValueError, "mu_q"),
    (lambda a: a.__setitem__(2, a[2].to("meta")), ValueError, "mu_p"),
])
def test_bad_tensors_are_named(mutate, error, match):
    args = _ok()
    mutate(args)
    with pytest.raises(error, match=match):
        ak.gaussian_sample_kl(*args)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"eps": torch.randn(3, 5)}, ValueError, "eps"),
    ({"eps": torch.ones(3, 4, dtype=torch.int32)}, TypeError, "eps"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"seed": -1}, ValueError, "seed"),
    ({"fwd_grad": "prior"}, ValueError, "fwd_grad"),
    ({"rev_grad": None}, ValueError, "rev_grad"),
    ({"backend": "cudnn"}, ValueError, "backend"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    args = [a.cpu() for a in _ok()]
    with pytest.raises(error, match=match):
        ak.gaussian_sample_kl(*args, **kwargs)


def test_gaussian_sample_names_its_own_arguments():
    with pytest.raises(ValueError, match="logvar must have the shape of mu"):
        ak.gaussian_sample(torch.randn(3, 4), torch.randn(4, 3))


@pytest.mark.skipif(DEVICE.type == "cuda", reason="checks the CPU error path")
def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA tensors"):
        ak.gaussian_sample_kl(*_ok(), backend="cuda")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    import amvl_kernels.backends as backends

    monkeypatch.setattr(backends, "triton_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backends.resolve_backend("triton", torch.device("cpu"))
    assert backends.resolve_backend("auto", torch.device("cpu")) == "torch"


# ----------------------------------------------------------------------------- torch.library


def test_opcheck():
    inputs = make_inputs((3, 7), torch.float32, requires_grad=True)
    eps = torch.randn(3, 7, device=DEVICE)
    op = torch.ops.amvl.gaussian_sample_kl.default
    torch.library.opcheck(op, (*inputs, None, 5, "p", "q", "triton"))
    torch.library.opcheck(op, (*inputs, eps, 0, "both", "both", "triton"))
    torch.library.opcheck(op, (*inputs[:2], None, None, None, 5, "none", "none", "triton"))
    seed = torch.tensor([2**40 + 5], device=DEVICE)  # read by the kernels, in place of the int
    torch.library.opcheck(op, (*inputs, None, 0, "p", "q", "triton", seed))


@pytest.mark.parametrize("fwd_grad, rev_grad", [("p", "q"), ("both", "none"), ("q", "p")])
@pytest.mark.parametrize("use", ["all", "z", "kl_rev"])
def test_eager_function_matches_the_custom_op(fwd_grad, rev_grad, use, rng_seed):
    """Eager calls skip the dispatcher (an autograd.Function over the same launchers); they
    must agree bitwise with the custom op that torch.compile traces, gradients included."""
    inputs = make_inputs((5, 11), torch.float32, requires_grad=True)
    backend = "cuda" if "cuda" in BACKENDS else "triton"
    pick = {"all": slice(0, 3), "z": slice(0, 1), "kl_rev": slice(2, 3)}[use]

    def loss(outputs):
        return sum(o.double().square().sum() for o in outputs[pick])

    eager = ak.gaussian_sample_kl(*inputs, seed=rng_seed, fwd_grad=fwd_grad, rev_grad=rev_grad,
                                  backend=backend)
    op = torch.ops.amvl.gaussian_sample_kl(*inputs, None, rng_seed, fwd_grad, rev_grad,
                                           backend)
    for a, b in zip(eager, op):
        assert torch.equal(a, b) and a.requires_grad == b.requires_grad
    if not any(o.requires_grad for o in eager[pick]):  # kl_rev routed "none": no gradient
        return
    grads_eager = torch.autograd.grad(loss(eager), inputs, allow_unused=True)
    grads_op = torch.autograd.grad(loss(op), inputs, allow_unused=True)
    for a, b in zip(grads_eager, grads_op):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_torch_compile_fullgraph_traces_through(backend):
    """Both backends, the PyTorch one's seeded noise included (an op while compiling: a
    private torch.Generator is an object Dynamo cannot trace)."""
    torch._dynamo.reset()
    inputs = make_inputs((4, 9), torch.float32, requires_grad=True)

    def step(mu_q, lv_q, mu_p, lv_p):
        z, kl_fwd, kl_rev = ak.gaussian_sample_kl(mu_q, lv_q, mu_p, lv_p, seed=11,
                                                  backend=backend)
        return z.square().sum() + kl_fwd.sum() + 0.5 * kl_rev.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, expected = compiled(*inputs), step(*inputs)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, inputs),
                               torch.autograd.grad(expected, inputs))


def test_torch_compile_traces_the_custom_op_not_the_eager_function():
    """Under torch.compile the op must appear in the graph as torch.ops.amvl.*, opaque to
    dynamo (the eager autograd.Function is for calls outside compiled code)."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    inputs = make_inputs((3, 8), torch.float32, requires_grad=True)
    compiled = torch.compile(
        lambda *x: ak.gaussian_sample_kl(*x, seed=3, backend="triton")[1].sum(),
        backend=recording_backend, fullgraph=True)
    compiled(*inputs)
    assert "torch.ops.amvl.gaussian_sample_kl" in graphs[0]



@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_views_with_a_pending_negation(backend):
    """``x.conj().imag`` is a real view whose memory holds the values without their sign:
    the kernels read memory, so the negation must be applied first."""
    c = torch.randn(3, 7, dtype=torch.complex64, device=DEVICE)
    mu_q, mu_p = c.conj().imag, torch.randn(3, 7, device=DEVICE)
    lv_q, lv_p = 0.1 * torch.randn(3, 7, device=DEVICE), 0.1 * torch.randn(3, 7, device=DEVICE)
    assert mu_q.is_neg()
    eps = torch.randn(3, 7, device=DEVICE)
    got = ak.gaussian_sample_kl(mu_q, lv_q, mu_p, lv_p, eps=eps, backend=backend)
    expected = ak.gaussian_sample_kl(mu_q.clone(), lv_q, mu_p, lv_p, eps=eps, backend=backend)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
