"""Sweep the latent-attention kernels' tile configurations on a GPU, in one short call.

Each configuration (BLOCK_M, BLOCK_N, num_warps, num_stages), for the forward or the backward
kernels, is checked against the PyTorch reference (relative error) and timed forward+backward
at the benchmark's target shape (bf16, d=128, 16 heads, S=4096, B=4, one latent block).
Print-out: one line per configuration, fastest first. Use the winner in ``_tile_config``.

    python scripts/tune_latent_attention.py            # on a GPU
    TRITON_INTERPRET=1 python scripts/tune_latent_attention.py --smoke   # harness check, CPU
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import time

import torch

import amvl_kernels as ak
from amvl_kernels.reference.latent_attention import latent_attention_torch

# the module (the package attribute of the same name is the function)
la = importlib.import_module("amvl_kernels.latent_attention")
DEFAULT_CONFIG = la._tile_config

FORWARD = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)]
BACKWARD = [(64, 64, 8, 2), (64, 64, 4, 2), (32, 128, 4, 3), (128, 32, 8, 2), (64, 128, 8, 2)]


def timed(fn, smoke: bool) -> float:
    if smoke:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU interpreter")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    b, h, s, d = (1, 2, 40, 32) if args.smoke else (4, 16, 4096, 128)
    layout = ak.LatentLayout.with_latent_blocks(s, [[(int(0.75 * s), min(64, s // 4))]] * b)
    layout = layout.to(device)
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    heads = slice(0, 2)  # the reference on a few heads is enough to catch a broken config
    ref_in = [t.detach()[:, heads].double().requires_grad_() for t in (q, k, v)]
    ref = latent_attention_torch(*ref_in, layout, d ** -0.5)
    ref_grads = torch.autograd.grad(ref, ref_in, grad[:, heads].double())
    ref = ref.detach()

    results = []
    fwd_options = [None] if args.smoke else FORWARD
    bwd_options = [None] if args.smoke else BACKWARD
    for fwd, bwd in itertools.product(fwd_options, bwd_options):
        def config(head_dim, dtype_, backward, fwd=fwd, bwd=bwd):
            chosen = bwd if backward else fwd
            return chosen or DEFAULT_CONFIG(head_dim, dtype_, backward)

        la._tile_config = config
        layout._tile_maps.clear()
        try:
            def step():
                out = ak.latent_attention(q, k, v, layout, backend="triton")
                return out, torch.autograd.grad(out, (q, k, v), grad)

            out, grads = step()
            err = max(float((a.detach()[:, heads].double() - r).norm() / r.norm())
                      for a, r in zip((out, *grads), (ref, *ref_grads)))
            results.append((timed(step, args.smoke), fwd, bwd, err, ""))
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: report, go on
            results.append((float("inf"), fwd, bwd, float("nan"), type(exc).__name__))
    la._tile_config = DEFAULT_CONFIG
    print(f"{'fwd+bwd ms':>10}  {'forward tiles':<18} {'backward tiles':<18} max rel err")
    for ms, fwd, bwd, err, failure in sorted(results, key=lambda r: r[0]):
        print(f"{ms:10.3f}  {str(fwd or 'default'):<18} {str(bwd or 'default'):<18} "
              f"{err:.2e} {failure}")


if __name__ == "__main__":
    main()
