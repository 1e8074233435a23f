"""Benchmark of the fused Gaussian sample + bidirectional KL op.

Providers, side by side in one run: eager PyTorch (the reference, noise from
``torch.randn_like``), ``torch.compile`` of that reference, our Triton kernel (called as users
call it, and through the custom op that torch.compile traces), and the CUDA extension when it
is built. Forward and forward+backward (AMVL routing: every input gets a
gradient) at (slots, d) of (4096, 4096), (512, 3584), (65536, 256) in bf16 and fp32.

Reported per provider: median ms; ``graph_ms``, the same replayed from a CUDA graph (GPU time
without per-call host overhead, which dominates the smaller shapes), cycling through enough
copies of the buffers that no call finds its data in L2 (``graph_ms_l2_warm``: one set, as
the runs in RESULTS.md up to the eighth session's timed it); effective GB/s from the minimal
bytes (each input read once, each output written once) and its share of the measured device copy bandwidth; peak memory
above the inputs; activation memory, i.e. what the forward keeps alive for the backward beyond
its outputs (the fused op keeps nothing: it regenerates the noise). Before a row counts, each
provider's result is checked against the float64 formulas (``max_err``, ``noise_sigmas``): the
row is recorded, then the test fails if the result is wrong, so that no speed is reported for a
broken kernel.

    python -m pytest benchmarks/bench_gaussian_kl.py --benchmark
"""

from __future__ import annotations

import pytest
import torch

import amvl_kernels as ak
from amvl_kernels.reference import gaussian_sample_kl_torch
from benchmarks import common

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and not common.SMOKE,
    reason="needs a CUDA GPU (AMVL_BENCH_SMOKE=1 checks the harness on the CPU)")

SHAPES = [(4, 33)] if common.SMOKE else [(4096, 4096), (512, 3584), (65536, 256)]
DTYPES = [torch.bfloat16, torch.float32]
MODES = ["fwd", "fwd+bwd"]
# Largest error (``common.max_scaled_error`` over the KLs and the gradients) a row may show. A
# correct provider shows about the rounding of its outputs: eager PyTorch 4e-3 in bf16 at
# 4096 x 4096 (on the CPU), 1e-7 in fp32; one wrong element (a wrong stride, a lost chunk, a
# NaN) shows about 1.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-4}
# The noise recovered from z must be standard normal: its mean and standard deviation within
# this many standard errors of 0 and 1.
NOISE_SIGMAS = 6.0


def _eager(mu_q, lv_q, mu_p, lv_p):
    return gaussian_sample_kl_torch(mu_q, lv_q, mu_p, lv_p, torch.randn_like(mu_q), 0)


common.allow_recompiles()  # one specialisation per (shape, dtype, mode): 12 in all
_compiled = torch.compile(_eager, dynamic=False)


def _providers() -> dict:
    providers = {
        "eager": _eager,
        "torch.compile": _compiled,
        "triton": lambda *x: ak.gaussian_sample_kl(*x, seed=1234, backend="triton"),
        # The same kernels through the custom op (what torch.compile traces): the per-call
        # gap to "triton" is the dispatcher's host time, which eager calls skip.
        "triton-custom-op": lambda *x: torch.ops.amvl.gaussian_sample_kl(
            *x, None, 1234, "p", "q", "triton"),
    }
    if torch.cuda.is_available() and ak.cuda_extension_available():
        providers["cuda"] = lambda *x: ak.gaussian_sample_kl(*x, seed=1234, backend="cuda")
    return providers


def minimal_bytes(slots: int, d: int, dtype: torch.dtype, mode: str) -> int:
    """Each input read once, each output written once. The KLs and their gradients are fp32."""
    elem = torch.empty((), dtype=dtype).element_size()
    fwd = 5 * slots * d * elem + 2 * slots * 4  # read 4 inputs, write z and two KLs
    if mode == "fwd":
        return fwd
    # backward: read 4 inputs, dz and two KL grads; write 4 input grads
    return fwd + 9 * slots * d * elem + 2 * slots * 4


def distinct_bytes(slots: int, d: int, dtype: torch.dtype, mode: str) -> int:
    """Bytes of the distinct buffers one call touches: 4 inputs, z and the KLs; with the
    backward also dz, the KLs' gradients and 4 input gradients."""
    elem = torch.empty((), dtype=dtype).element_size()
    fwd = 5 * slots * d * elem + 2 * slots * 4
    return fwd if mode == "fwd" else fwd + 5 * slots * d * elem + 2 * slots * 4


def buffer_sets(shape, dtype: torch.dtype, device, grad: bool, copies: int) -> list[tuple]:
    """``copies`` independent (inputs, grad_outputs) of the benchmark's distributions."""
    sets = []
    for _ in range(copies):
        inputs = [torch.randn(shape, device=device, dtype=dtype, requires_grad=grad)
                  for _ in range(4)]
        grad_outputs = (torch.randn(shape, device=device, dtype=dtype),
                        torch.randn(shape[0], device=device), torch.randn(shape[0], device=device))
        sets.append((inputs, grad_outputs))
    return sets


def timed_call(fn, mode: str):
    """The call to time on one buffer set: the forward, or forward+backward."""
    def forward(inputs, grad_outputs):
        return fn(*inputs)

    def forward_backward(inputs, grad_outputs):
        return torch.autograd.grad(fn(*inputs), inputs, grad_outputs)

    return forward if mode == "fwd" else forward_backward


def result_errors(outputs, inputs, grads, grad_outputs) -> dict[str, float]:
    """How far a provider's result is from the float64 formulas of DESIGN.md section 2.

    The providers draw different noise, so each one's noise is recovered from its z,
    eps = (z - mu_q) * exp(-0.5 * logvar_q). ``noise_sigmas``: how many standard errors its
    mean is from 0 and its standard deviation from 1 (the larger). ``max_err``: the largest
    :func:`common.max_scaled_error` of the two KLs and, with ``grads``, of the four inputs'
    gradients, against the float64 reference fed with that noise (of these only logvar_q's
    gradient depends on it).
    """
    z, kl_fwd, kl_rev = (o.detach() for o in outputs)
    x64 = [t.detach().double().requires_grad_(grads is not None) for t in inputs]
    eps = (z.double() - x64[0].detach()) * torch.exp(-0.5 * x64[1].detach())
    n = eps.numel()
    noise_sigmas = max(abs(float(eps.mean())) * n ** 0.5,
                       abs(float(eps.std()) - 1) * (2 * n) ** 0.5)
    ref_z, ref_fwd, ref_rev = gaussian_sample_kl_torch(*x64, eps, 0)
    errors = [common.max_scaled_error(kl_fwd, ref_fwd), common.max_scaled_error(kl_rev, ref_rev)]
    if grads is not None:
        ref_grads = torch.autograd.grad((ref_z, ref_fwd, ref_rev), x64,
                                        [g.double() for g in grad_outputs])
        errors += [common.max_scaled_error(g, r) for g, r in zip(grads, ref_grads)]
    # torch's max keeps a NaN, Python's would drop it
    return {"max_err": float(torch.tensor(errors).max()), "noise_sigmas": noise_sigmas}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("provider", list(_providers()))
def test_gaussian_kl(benchmark, bench_device, provider, shape, dtype, mode):
    slots, d = shape
    fn = _providers()[provider]
    copies = common.l2_cold_copies(distinct_bytes(slots, d, dtype, mode))
    sets = buffer_sets(shape, dtype, bench_device, mode != "fwd", copies)
    inputs, grad_outputs = sets[0]
    call = timed_call(fn, mode)

    def forward():
        return fn(*inputs)

    def run():
        return call(inputs, grad_outputs)

    def run_every_set():
        # every call's outputs kept until the end: distinct output buffers for each set
        return [call(*buffers) for buffers in sets]

    outputs = forward()
    grads = torch.autograd.grad(outputs, inputs, grad_outputs) if mode != "fwd" else None
    errors = result_errors(outputs, inputs, grads, grad_outputs)
    del outputs, grads
    median_ms = common.time_ms(run)
    effective = minimal_bytes(slots, d, dtype, mode) / median_ms / 1e6
    metrics = {
        **errors,
        "GBps": effective,
        "pct_of_copy": 100 * effective / common.copy_bandwidth_gbs(),
        "peak_MB": common.peak_memory_bytes(run) / 2**20,
    }
    graph_ms = common.graph_time_ms(run_every_set, calls=copies)
    if graph_ms is not None:  # the same work without per-call host overhead
        metrics["graph_ms"] = graph_ms
        metrics["graph_pct_of_copy"] = (100 * minimal_bytes(slots, d, dtype, mode) / graph_ms
                                        / 1e6 / common.copy_bandwidth_gbs())
        metrics["graph_copies"] = copies
        if copies > 1:  # what one set gives: the cache's share of the time
            metrics["graph_ms_l2_warm"] = common.graph_time_ms(run)
    if mode != "fwd" and bench_device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        outputs = forward()
        kept = torch.cuda.memory_allocated() - before
        kept -= sum(o.numel() * o.element_size() for o in outputs)
        metrics["activation_MB"] = kept / 2**20
        del outputs
    case = f"{mode} {str(dtype).removeprefix('torch.')} slots={slots} d={d}"
    common.record("gaussian_kl", case, provider, median_ms, **metrics)
    benchmark.extra_info.update(metrics, median_ms_cuda_events=median_ms)
    assert errors["max_err"] <= TOLERANCE[dtype], f"{provider} is wrong on {case}: {errors}"
    assert errors["noise_sigmas"] <= NOISE_SIGMAS, f"{provider}'s noise on {case}: {errors}"

    def synced():
        run()
        if bench_device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=3 if common.SMOKE else 20, warmup_rounds=1)
