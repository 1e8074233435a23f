"""Host time per call of the kernels' Python side, and where it goes.

On shapes so small that the device finishes each call at once, back-to-back calls (one
synchronisation at the end) run at the host's pace: their time per call is what a model pays
per layer whenever the GPU waits for the host, as in a small model's training step or in
decoding. Then ``cProfile`` over a batch of calls lists the Python functions that take it.

    python scripts/host_overhead.py                  # on a GPU: the Triton and CUDA paths
    python scripts/host_overhead.py --backend torch  # the PyTorch paths, anywhere
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections.abc import Callable

import torch

import amvl_kernels as ak


def cases(device: torch.device, backend: str) -> dict[str, Callable[[], object]]:
    """One closure per call pattern a model makes, on tiny inputs."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, grad=False):
        t = torch.randn(*shape, generator=g).to(device)
        return t.requires_grad_(grad)

    gauss = [rand(4, 16, 64, grad=True) for _ in range(4)]
    q, k, v = (rand(1, 4, 64, 64, grad=True) for _ in range(3))
    layout = ak.LatentLayout.with_latent_blocks(64, [[(40, 8)]]).to(device)
    dq, dk, dv = rand(1, 4, 1, 64), rand(1, 2, 512, 64), rand(1, 2, 512, 64)

    def gaussian_fwd_bwd():
        z, kl_f, kl_r = ak.gaussian_sample_kl(*gauss, seed=1, backend=backend)
        torch.autograd.grad((z.sum() + kl_f.sum() + kl_r.sum()), gauss)

    attention_backend = "torch" if backend == "torch" else "triton"

    def attention_fwd_bwd():
        out = ak.latent_attention(q, k, v, layout, backend=attention_backend)
        torch.autograd.grad(out.sum(), (q, k, v))

    def attention_fwd():
        with torch.no_grad():
            ak.latent_attention(q, k, v, layout, backend=attention_backend)

    def decode_step():
        ak.latent_attention(dq, dk, dv, backend=attention_backend)

    return {f"gaussian_sample_kl fwd+bwd ({backend})": gaussian_fwd_bwd,
            f"latent_attention fwd+bwd, layout ({attention_backend})": attention_fwd_bwd,
            f"latent_attention fwd, layout, no grad ({attention_backend})": attention_fwd,
            f"latent_attention decode, Lq=1, GQA 4/2 ({attention_backend})": decode_step}


def per_call_us(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    for _ in range(10):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "cuda", "torch"],
                        help="the Gaussian op's backend; attention takes triton unless torch")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rows", type=int, default=12, help="functions listed per case")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = args.backend
    if backend == "auto":
        backend = "cuda" if device.type == "cuda" and ak.cuda_extension_available() else \
            ("triton" if device.type == "cuda" else "torch")
    for name, fn in cases(device, backend).items():
        us = per_call_us(fn, device, args.calls)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(50):
            fn()
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.rows)
        print(f"== {name}: {us:.1f} us a call\n"
              + "\n".join(line for line in text.getvalue().splitlines() if line.strip()))


if __name__ == "__main__":
    main()
