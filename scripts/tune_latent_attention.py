"""Sweep the latent-attention kernels' tile configurations on a GPU, in one short call.

Each kernel (forward, dk/dv, dq) is swept on its own, the other two kept at their defaults;
so is "dkdv+dq", the dk/dv kernel that also adds dq with atomics (no dq kernel then), which
tells whether the backward should compute dq that way (``_dq_in_dkdv``):
every configuration (BLOCK_M, BLOCK_N, num_warps, num_stages) is checked against the PyTorch
reference (relative error) and timed forward+backward at the benchmark's target shape (bf16,
d=128 unless --head-dim says otherwise, 16 heads, S=4096, B=4, one latent block). Print-out:
per kernel, one line per configuration as it is measured (and saved to --json: a sweep cut
short keeps its results), then fastest first. Use the winners in ``_tile_config``.

    python scripts/tune_latent_attention.py            # on a GPU
    python scripts/tune_latent_attention.py --head-dim 64   # Qwen2-0.5B's heads
    TRITON_INTERPRET=1 python scripts/tune_latent_attention.py --smoke   # harness check, CPU
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import time
from pathlib import Path

import torch
import triton

import amvl_kernels as ak
from amvl_kernels.reference.latent_attention import latent_attention_torch

# the module (the package attribute of the same name is the function)
la = importlib.import_module("amvl_kernels.latent_attention")
DEFAULT_CONFIG = la._tile_config
DEFAULT_DQ_IN_DKDV = la._dq_in_dkdv

# dk/dv holds BLOCK_N keys and streams query tiles, dq the other way round: hence tall key
# tiles for the one and tall query tiles for the other among the candidates. Compiled for
# sm_90 at d=128 with a layout (scripts/kernel_resources.py): the 8-warp candidates spill at
# most 36 bytes (dk/dv with 128 keys and 64 queries); 4 warps with 128-row tiles spill
# 150-2900; dk/dv with 32-key tiles gets no wgmma (too few rows for a warpgroup's MMA).
# The first entry of dk/dv and dq is the Hopper default; (64, 64, 8, 2), the default of the
# first GPU runs, is there to compare. dkdv+dq with 128 keys held spills 144-232 bytes at d=128.
CANDIDATES = {
    "forward": [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)],
    "dkdv": [(64, 128, 8, 3), (64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 8, 2), (32, 32, 8, 2),
             (32, 128, 8, 3), (32, 128, 8, 2), (64, 128, 8, 2), (32, 128, 4, 3)],
    "dkdv+dq": [(64, 64, 8, 3), (64, 64, 8, 2), (32, 128, 8, 3), (64, 128, 8, 3)],
    "dq": [(128, 64, 8, 3), (64, 64, 8, 2), (64, 64, 4, 3), (64, 32, 8, 2), (128, 32, 8, 2),
           (128, 32, 8, 3), (128, 64, 8, 2), (128, 32, 4, 3)],
}


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
    parser.add_argument("--json", help="also write every result to this JSON file")
    parser.add_argument("--head-dim", type=int, default=128,
                        help="head dim of the sweep (128: the benchmark's; 64: Qwen2-0.5B's)")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    b, h, s, d = (1, 2, 40, 32) if args.smoke else (4, 16, 4096, args.head_dim)
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

    def save() -> None:
        if not args.json:
            return
        rows = [{"kernel": kernel, "fwd_bwd_ms": ms if math.isfinite(ms) else None,
                 "tiles": list(chosen) if chosen else "default", "max_rel_err": err,
                 "failure": failure} for kernel, ms, chosen, err, failure in results]
        Path(args.json).write_text(json.dumps({"head_dim": d,
                                               "device": torch.cuda.get_device_name()
                                               if torch.cuda.is_available() else "cpu",
                                               "torch": torch.__version__,
                                               "triton": triton.__version__,
                                               "results": rows}, indent=1))

    def show(kernel, ms, chosen, err, failure) -> None:
        print(f"{kernel:<8} {ms:10.3f}  {str(chosen or 'default'):<28} {err:.2e} {failure}",
              flush=True)

    print(f"{'kernel':<8} {'fwd+bwd ms':>10}  {'tiles (M, N, warps, stages)':<28} max rel err")
    # The backward kernels first (the gap to the targets), each result shown and saved as it
    # comes: a sweep cut short by a time limit keeps what it measured.
    for kernel in ("dkdv", "dkdv+dq", "dq", "forward"):
        la._dq_in_dkdv = (lambda *_: True) if kernel == "dkdv+dq" else DEFAULT_DQ_IN_DKDV
        # the smoke run tries one non-default tile shape per kernel, small enough to interpret
        for chosen in [None, (32, 16, 1, 1)] if args.smoke else CANDIDATES[kernel]:
            def config(head_dim, dtype_, kernel_, arch, kernel=kernel, chosen=chosen):
                if kernel_ == kernel and chosen is not None:
                    return chosen
                return DEFAULT_CONFIG(head_dim, dtype_, kernel_, arch)

            la._tile_config = config
            layout._derived.clear()  # tile maps and kernel arguments of other tile sizes
            try:
                def step():
                    out = ak.latent_attention(q, k, v, layout, backend="triton")
                    return out, torch.autograd.grad(out, (q, k, v), grad)

                out, grads = step()
                err = max(float((a.detach()[:, heads].double() - r).norm() / r.norm())
                          for a, r in zip((out, *grads), (ref, *ref_grads)))
                results.append((kernel, timed(step, args.smoke), chosen, err, ""))
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: go on
                results.append((kernel, float("inf"), chosen, float("nan"),
                                type(exc).__name__))
            show(*results[-1])
            save()
    la._tile_config = DEFAULT_CONFIG
    la._dq_in_dkdv = DEFAULT_DQ_IN_DKDV
    print("\nfastest first:")
    for kernel in CANDIDATES:
        for row in sorted((r for r in results if r[0] == kernel), key=lambda r: r[1]):
            show(*row)


if __name__ == "__main__":
    main()
