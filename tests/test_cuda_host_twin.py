"""The CUDA kernels' code, checked on the CPU through its host twin.

csrc/gaussian_kl.cu keeps everything per element (16-byte and strided loads, Philox noise,
the maths, gradient routing, rounding) in __host__ __device__ functions; ``forward_host`` /
``backward_host`` run them serially on host memory and sum each row's KL in the kernel's
reduction order. These tests hold that code to the same criteria as test_gaussian_kl.py.
What they cannot check is the GPU itself: thread mapping, shuffles, launches. On a GPU the
last test compares the real kernels with the twin, and test_gaussian_kl.py runs in full with
backend="cuda".
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy import stats

from amvl_kernels import _cuda_gaussian_kl as launcher
from tests._cuda_ext import built_extension
from tests.test_gaussian_kl import assert_within_criterion, formulas

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROUTES = ["p", "q", "both", "none"]


@pytest.fixture(scope="module")
def ext():
    return built_extension()


def twin_forward(ext, mu_q, lv_q, mu_p=None, lv_p=None, eps=None, seed=0):
    return launcher._forward(mu_q, lv_q, mu_p, lv_p, eps, seed, ext=ext, on_host=True)


def twin_grads(ext, inputs, eps, seed, g_z, g_f, g_r, fwd_grad, rev_grad, need=(1, 1, 1, 1)):
    """All four gradients (None where not needed), as the autograd glue would ask for them."""
    out = iter(launcher._backward(*inputs, eps, seed, g_z, g_f, g_r, fwd_grad, rev_grad,
                                  [bool(n) for n in need], ext=ext, on_host=True))
    return [next(out) if n else None for n in need]


def make_inputs(shape, dtype, lv_scale=1.0):
    return [(s * torch.randn(shape, dtype=torch.float64)).to(dtype)
            for s in (1.0, lv_scale, 1.0, lv_scale)]


def reference_grads(inputs, eps, g_z, g_f, g_r, fwd_grad, rev_grad, dtype=None):
    """Gradients of sum(z * g_z) + sum(kl_fwd * g_f) + sum(kl_rev * g_r) through formulas()."""
    xs = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    z, f, r = formulas(*xs, eps.to(dtype or eps.dtype), fwd_grad, rev_grad)
    loss = (z * g_z.to(z.dtype)).sum() + (f * g_f.to(f.dtype)).sum() + (r * g_r.to(r.dtype)).sum()
    return torch.autograd.grad(loss, xs, allow_unused=True)


# ----------------------------------------------------------------------------- noise


KNOWN_ANSWERS = [  # Random123 tests/kat_vectors, "philox4x32 10" lines
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_philox_known_answers(ext, counter, key, expected):
    assert ext.philox4x32_10(counter, key) == expected


def test_philox_matches_triton(ext):
    """An independent implementation: Triton's randint4x is Philox4x32-10 with key = seed and
    counter = (offset, 0, 0, 0)."""
    from amvl_kernels.backends import triton_interpreted

    if not (torch.cuda.is_available() or triton_interpreted()):
        pytest.skip("Triton runs neither on a GPU nor under TRITON_INTERPRET=1 here")
    import triton
    import triton.language as tl

    @triton.jit
    def words(out_ptr, seed, N: tl.constexpr):
        offsets = tl.arange(0, N)
        a, b, c, d = tl.randint4x(seed, offsets)
        tl.store(out_ptr + offsets * 4, a)
        tl.store(out_ptr + offsets * 4 + 1, b)
        tl.store(out_ptr + offsets * 4 + 2, c)
        tl.store(out_ptr + offsets * 4 + 3, d)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    seed = 0x299F31D0A4093822
    out = torch.zeros(64, dtype=torch.int32, device=device)
    words[(1,)](out, seed, N=16)
    got = [w & 0xFFFFFFFF for w in out.cpu().tolist()]
    expected = [w for i in range(16)
                for w in ext.philox4x32_10((i, 0, 0, 0), (seed & 0xFFFFFFFF, seed >> 32))]
    assert got == expected


def test_noise_is_box_muller_of_philox(ext):
    """The documented stream: element i is normal i % 4 of Philox block (counter i // 4,
    key seed), words (0, 1) and (2, 3) each giving a Box-Muller pair (cos, sin)."""
    seed, n = 2**40 + 3, 64
    eps = twin_forward(ext, torch.zeros(1, n), torch.zeros(1, n), seed=seed)[0].flatten()
    expected = []
    for group in range(n // 4):
        words = ext.philox4x32_10((group, 0, 0, 0), (seed & 0xFFFFFFFF, seed >> 32))
        for radius_bits, angle_bits in (words[:2], words[2:]):
            u = torch.tensor(radius_bits, dtype=torch.float64) * 2.0**-32 + 2.0**-33
            radius = torch.sqrt(-2 * torch.log(u))
            angle = torch.pi * (angle_bits >> 8) * 2.0**-23
            expected += [radius * torch.cos(torch.tensor(angle)),
                         radius * torch.sin(torch.tensor(angle))]
    torch.testing.assert_close(eps.double(), torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_triton_noise_is_box_muller_of_philox_per_row_group(ext):
    """The Triton kernel's documented stream, checked against this independent Philox: column
    c of row r is normal c % 4 of block (counter r * ceil(d / 4) + c // 4, key seed), words
    (0, 1) and (2, 3) each a Box-Muller pair (cos, sin) in Triton's uniform mapping, the angle
    in [-pi, pi). On a GPU the kernel's log, sine and cosine are the fast approximations: the
    tolerance covers them (about 3e-6 at the largest radius)."""
    import amvl_kernels as ak
    from amvl_kernels.backends import triton_interpreted

    if not (torch.cuda.is_available() or triton_interpreted()):
        pytest.skip("Triton runs neither on a GPU nor under TRITON_INTERPRET=1 here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seed, rows, d = 2**41 + 5, 3, 10  # d not a multiple of 4: each row ends in a partial group
    zeros = torch.zeros(rows, d, device=device)
    eps = ak.gaussian_sample(zeros, zeros, seed=seed, backend="triton").double().cpu()

    def uniform(word):  # triton.language.random.uint_to_uniform_float on a 32-bit word
        signed = word - 2**32 if word >= 2**31 else word
        return (~signed if signed < 0 else signed) * 4.6566127342e-10

    groups = -(-d // 4)
    expected = torch.empty(rows, groups * 4, dtype=torch.float64)
    for r, g in itertools.product(range(rows), range(groups)):
        words = ext.philox4x32_10((r * groups + g, 0, 0, 0), (seed & 0xFFFFFFFF, seed >> 32))
        for pair in range(2):
            u1 = max(1e-7, uniform(words[2 * pair]))
            angle = 2 * torch.pi * torch.tensor(uniform(words[2 * pair + 1]),
                                                dtype=torch.float64) - torch.pi
            radius = torch.sqrt(-2 * torch.log(torch.tensor(u1, dtype=torch.float64)))
            expected[r, 4 * g + 2 * pair] = radius * torch.cos(angle)
            expected[r, 4 * g + 2 * pair + 1] = radius * torch.sin(angle)
    torch.testing.assert_close(eps, expected[:, :d], rtol=1e-5, atol=1e-5)


def test_noise_depends_only_on_seed_and_element_index(ext):
    """Keyed by the row-major index: any (rows, d) split of the same elements, hence any thread
    layout and chunk alignment (d = 1, 3, 40, 240), draws the same noise."""
    flat = twin_forward(ext, torch.zeros(1, 240), torch.zeros(1, 240), seed=77)[0].flatten()
    for rows, d in [(240, 1), (80, 3), (6, 40)]:
        zeros = torch.zeros(rows, d)
        assert torch.equal(twin_forward(ext, zeros, zeros, seed=77)[0].flatten(), flat)
    assert not torch.equal(twin_forward(ext, torch.zeros(1, 240), torch.zeros(1, 240),
                                        seed=78)[0].flatten(), flat)


def test_noise_statistics(ext):
    rows, d, n = 400, 257, 400 * 257
    zeros = torch.zeros(rows, d)
    seed = 2**40 + 12345
    eps = twin_forward(ext, zeros, zeros, seed=seed)[0].double()
    tol = 5 / n**0.5
    assert abs(eps.mean().item()) < tol
    assert abs(eps.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert stats.kstest(eps.flatten().numpy(), "norm").pvalue > 1e-4

    def corr(a, b):
        return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()

    assert abs(corr(eps[:, :-1], eps[:, 1:])) < tol, "neighbouring elements correlate"
    assert abs(corr(eps[:-1], eps[1:])) < tol, "neighbouring slots correlate"
    flat = eps.flatten()
    for lag in (2, 4):  # the two Box-Muller partners and the next Philox block
        assert abs(corr(flat[:-lag], flat[lag:])) < tol, f"elements {lag} apart correlate"
    other = twin_forward(ext, zeros, zeros, seed=seed + 1)[0].double()
    assert abs(corr(eps, other)) < tol, "neighbouring seeds correlate"


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_backward_regenerates_the_forward_noise(ext, dtype):
    mu_q, lv_q, mu_p, lv_p = make_inputs((6, 33), dtype)
    seed = 4242
    z1, f1, r1 = twin_forward(ext, mu_q, lv_q, mu_p, lv_p, seed=seed)
    z2, f2, r2 = twin_forward(ext, mu_q, lv_q, mu_p, lv_p, seed=seed)
    assert torch.equal(z1, z2) and torch.equal(f1, f2) and torch.equal(r1, r2)
    zeros = torch.zeros(6, 33)
    noise = twin_forward(ext, zeros, zeros, seed=seed)[0].double()  # the same noise, any dtype
    sigma = torch.exp(0.5 * lv_q.double())
    assert_within_criterion("z from regenerated noise", z1, mu_q.double() + sigma * noise,
                            mu_q + torch.exp(0.5 * lv_q) * noise.to(dtype), factor=2)
    g_z = torch.ones(6, 33, dtype=dtype)
    _, g_lv_q, _, _ = twin_grads(ext, (mu_q, lv_q, mu_p, lv_p), None, seed, g_z, None, None,
                                 "p", "q", need=(0, 1, 0, 0))
    assert_within_criterion("grad logvar_q", g_lv_q, 0.5 * sigma * noise,
                            (0.5 * torch.exp(0.5 * lv_q) * noise.to(dtype)), factor=3)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 1), (2, 5, 3), (9, 127), (4, 64), (3, 520), (2, 1100),
                                   (3, 4099), (2, 70001)],
                         ids=str)
def test_forward_matches_float64(ext, dtype, shape, rng_seed):
    mu_q, lv_q, mu_p, lv_p = inputs = make_inputs(shape, dtype)
    eps = torch.randn(shape)
    z, kl_fwd, kl_rev = twin_forward(ext, *inputs, eps=eps)
    assert z.dtype == dtype and z.shape == shape
    assert kl_fwd.dtype == torch.float32 and kl_fwd.shape == shape[:-1]
    refs = formulas(*(t.double() for t in inputs), eps.double())
    same_dtype = formulas(*inputs, eps)
    for name, ours, ref, base in zip(("z", "kl_fwd", "kl_rev"), (z, kl_fwd, kl_rev), refs,
                                     same_dtype):
        assert_within_criterion(name, ours, ref, base, factor=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 1), (5, 3), (4, 64), (2, 4099)], ids=str)
def test_gradients_match_float64(ext, dtype, shape, rng_seed):
    inputs = make_inputs(shape, dtype)
    eps = torch.randn(shape)
    g_z = torch.randn(shape, dtype=dtype)
    g_f, g_r = torch.randn(shape[:-1]), torch.randn(shape[:-1])
    ours = twin_grads(ext, inputs, eps, 0, g_z, g_f, g_r, "both", "both")
    refs = reference_grads(inputs, eps, g_z, g_f, g_r, "both", "both", torch.float64)
    same_dtype = reference_grads(inputs, eps, g_z, g_f, g_r, "both", "both")
    for name, o, r, b in zip(("mu_q", "logvar_q", "mu_p", "logvar_p"), ours, refs, same_dtype):
        assert o.dtype == dtype and o.is_contiguous()
        assert_within_criterion(f"grad {name}", o, r, b, factor=3)


@pytest.mark.parametrize("fwd_grad,rev_grad", list(itertools.product(ROUTES, ROUTES)))
def test_gradient_routing(ext, fwd_grad, rev_grad, rng_seed):
    inputs = make_inputs((4, 16), torch.float64)
    eps = torch.randn(4, 16, dtype=torch.float64)
    g_z, g_f, g_r = (torch.randn(s, dtype=torch.float64) for s in ((4, 16), (4,), (4,)))
    ours = twin_grads(ext, inputs, eps, 0, g_z, g_f, g_r, fwd_grad, rev_grad)
    refs = reference_grads(inputs, eps, g_z, g_f, g_r, fwd_grad, rev_grad)
    for name, o, r in zip(("mu_q", "logvar_q", "mu_p", "logvar_p"), ours, refs):
        torch.testing.assert_close(o, torch.zeros_like(o) if r is None else r, rtol=1e-10,
                                   atol=1e-10, msg=name)


def test_unused_outputs_and_sampling_only(ext):
    inputs = make_inputs((5, 8), torch.float64)
    eps = torch.randn(5, 8, dtype=torch.float64)
    g_z = torch.randn(5, 8, dtype=torch.float64)
    # Only z used: the KL terms contribute nothing, even where they would overflow.
    inputs[3] = torch.full((5, 8), -800.0, dtype=torch.float64)  # exp(800) = inf
    g = twin_grads(ext, inputs, eps, 0, g_z, None, None, "both", "both")
    torch.testing.assert_close(g[0], g_z)
    torch.testing.assert_close(g[1], g_z * 0.5 * torch.exp(0.5 * inputs[1]) * eps)
    assert torch.count_nonzero(g[2]) == 0 and torch.count_nonzero(g[3]) == 0
    # Sampling only: KLs of shape (0,), gradients of mu and logvar.
    z, f, r = twin_forward(ext, inputs[0], inputs[1], eps=eps)
    assert f.shape == (0,) and r.shape == (0,)
    torch.testing.assert_close(z, inputs[0] + torch.exp(0.5 * inputs[1]) * eps)
    g = launcher._backward(inputs[0], inputs[1], None, None, eps, 0, g_z, None, None, "none",
                           "none", [True, True, False, False], ext=ext, on_host=True)
    torch.testing.assert_close(g[0], g_z)


def _views(kind, rows, d, dtype):
    """Views that take each load path: strided, transposed, misaligned, broadcast rows."""
    if kind == "transposed":
        return [t.t() for t in make_inputs((d, rows), dtype)]
    if kind == "strided":
        return [t[:, ::2] for t in make_inputs((rows, 2 * d), dtype)]
    if kind == "misaligned":  # unit column stride but rows start off 16-byte boundaries
        return [t[:, 1:] for t in make_inputs((rows, d + 1), dtype)]
    if kind == "broadcast":  # row stride 0
        return [t.expand(rows, d) for t in make_inputs((1, d), dtype)]
    return [t.view(rows, d) for t in make_inputs((rows * d,), dtype)]  # contiguous, 16B rows


@pytest.mark.parametrize("kind", ["transposed", "strided", "misaligned", "broadcast", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("d", [37, 64])
def test_every_load_path_gives_bitwise_the_same(ext, kind, dtype, d, rng_seed):
    views = _views(kind, 9, d, dtype)
    eps = torch.randn(d, 9).t()
    contiguous = [v.contiguous() for v in views]
    ours = twin_forward(ext, *views, eps=eps, seed=5)
    expected = twin_forward(ext, *contiguous, eps=eps.contiguous(), seed=5)
    for a, b in zip(ours, expected):
        assert torch.equal(a, b)
    g_z = torch.randn(d, 9, dtype=dtype).t()
    g_f, g_r = torch.randn(9), torch.randn(9)
    for noise in (eps, None):
        a = twin_grads(ext, views, noise, 5, g_z, g_f, g_r, "both", "both")
        b = twin_grads(ext, contiguous, None if noise is None else noise.contiguous(), 5,
                       g_z.contiguous(), g_f, g_r, "both", "both")
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("eps_dtype,kl_dtype", [(torch.bfloat16, torch.float32),
                                                (torch.float64, torch.float64)], ids=str)
def test_noise_in_another_dtype(ext, eps_dtype, kl_dtype):
    inputs = make_inputs((3, 19), torch.float32)
    eps = torch.randn(3, 19).to(eps_dtype)
    z, f, r = twin_forward(ext, *inputs, eps=eps)
    assert z.dtype == torch.float32 and f.dtype == kl_dtype
    ref = formulas(*(t.to(kl_dtype) for t in inputs), eps.to(kl_dtype))
    torch.testing.assert_close(z, ref[0].float())
    torch.testing.assert_close(f, ref[1])
    torch.testing.assert_close(r, ref[2])


def test_one_dimensional_input_has_scalar_kls(ext):
    mu_q, lv_q, mu_p, lv_p = make_inputs((11,), torch.float32)
    z, f, r = twin_forward(ext, mu_q, lv_q, mu_p, lv_p, seed=3)
    assert z.shape == (11,) and f.shape == () and r.shape == ()


def test_nan_propagates_to_its_slot_only(ext):
    mu_q, lv_q, mu_p, lv_p = make_inputs((5, 11), torch.float32)
    mu_p[2, 3] = float("nan")
    lv_q[4, 0] = float("nan")
    z, f, r = twin_forward(ext, mu_q, lv_q, mu_p, lv_p, seed=7)
    assert f[2].isnan() and r[2].isnan() and f[4].isnan() and r[4].isnan()
    assert torch.isfinite(f[[0, 1, 3]]).all() and torch.isfinite(r[[0, 1, 3]]).all()
    assert z[4, 0].isnan() and torch.isfinite(z[:4]).all() and torch.isfinite(z[4, 1:]).all()


@pytest.mark.parametrize("dtype,lv_max,mu_max", [(torch.float32, 30, 1e3),
                                                 (torch.bfloat16, 30, 1e3),
                                                 (torch.float16, 5, 10)], ids=str)
def test_safe_logvar_range(ext, dtype, lv_max, mu_max):
    shape = (64, 33)
    lv = [(torch.rand(shape) * 2 - 1) * lv_max for _ in range(2)]
    lv[0][0, :4] = torch.tensor([lv_max, -lv_max, lv_max, -lv_max])
    lv[1][0, :4] = torch.tensor([-lv_max, lv_max, lv_max, -lv_max])
    mu = [(torch.rand(shape) * 2 - 1) * mu_max for _ in range(2)]
    inputs = [t.to(dtype) for t in (mu[0], lv[0], mu[1], lv[1])]
    outs = twin_forward(ext, *inputs, seed=3)
    assert all(torch.isfinite(o).all() for o in outs)
    g_z = torch.full(shape, 1 / shape[0] / shape[1], dtype=dtype)
    g_kl = torch.full(shape[:1], 1 / shape[0])
    grads = twin_grads(ext, inputs, None, 3, g_z, g_kl, g_kl, "both", "both")
    assert all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to run the kernels")
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(7, 1), (300, 3), (9, 127), (4, 64), (3, 520), (3, 4099),
                                   (2, 70001)], ids=str)
def test_gpu_kernels_match_the_host_twin(ext, dtype, shape):
    """Same noise stream, same sums: the GPU differs from the host by libm ulps, and in the
    noise by its approximate log, sine and cosine."""
    inputs = make_inputs(shape, dtype)
    g_z = torch.randn(shape, dtype=dtype)
    g_f, g_r = torch.randn(shape[:-1]), torch.randn(shape[:-1])
    gpu = [t.cuda() for t in inputs]
    host_fwd = twin_forward(ext, *inputs, seed=9)
    gpu_fwd = launcher._forward(*gpu, None, 9, ext=ext, on_host=False)
    wide = dtype in (torch.float32, torch.float64)
    tol = {"rtol": 1e-5, "atol": 1e-5} if wide else {}
    # The approximate log's absolute error (at most 3.6e-7 near 1) becomes up to 3.6e-7 / r
    # on a normal whose Box-Muller radius r is small, times the standard deviation in z. The
    # smallest r of these streams is 0.0031 (seed 9, 70,001 columns): up to about 1e-4 * std.
    noisy_tol = {"rtol": 1e-5, "atol": 2e-3} if wide else {}
    host_bwd = twin_grads(ext, inputs, None, 9, g_z, g_f, g_r, "both", "both")
    gpu_bwd = launcher._backward(*gpu, None, 9, g_z.cuda(), g_f.cuda(), g_r.cuda(), "both",
                                 "both", [True] * 4, ext=ext, on_host=False)
    # z and the log-variance gradient of q carry the noise; the KLs and the rest do not.
    noisy = [True, False, False, False, True, False, False]
    for a, b, carries_noise in zip([*gpu_fwd, *gpu_bwd], [*host_fwd, *host_bwd], noisy):
        torch.testing.assert_close(a.cpu(), b, **(noisy_tol if carries_noise else tol))
        if carries_noise and wide:  # the typical element agrees far more closely
            assert float((a.cpu() - b).abs().median()) < 2e-6
