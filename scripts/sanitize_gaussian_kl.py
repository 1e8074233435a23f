"""Drive the CUDA backend of the Gaussian op under compute-sanitizer (memcheck, racecheck).

Small odd shapes, every dtype, non-contiguous inputs, explicit and in-kernel noise, forward and
backward with the routings: enough to reach every code path of the kernels once.
"""

import itertools
import sys

import torch

import amvl_kernels as ak


def main() -> None:
    """Every path once; ``--quick`` (racecheck is slow) keeps fp32 and bf16 only."""
    assert ak.cuda_extension_available(), "build the extension first (pip install -e .)"
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    if "--quick" in sys.argv[1:]:
        dtypes = [torch.float32, torch.bfloat16]
    torch.manual_seed(0)
    # The routing flags only switch terms on and off: three combinations reach every term.
    routes = [("p", "q"), ("both", "both"), ("none", "none")]
    for dtype, (rows, d) in itertools.product(
            dtypes,
            [(1, 1), (7, 3), (5, 127), (3, 4099), (2, 70001), (33, 256)]):
        base = [torch.randn(rows, 2 * d, device="cuda", dtype=dtype) for _ in range(4)]
        for strided in (False, True):
            inputs = [(t[:, ::2] if strided else t[:, :d].contiguous()).requires_grad_()
                      for t in base]
            for eps in (None, torch.randn(rows, d, device="cuda")):
                for fwd_grad, rev_grad in routes:
                    z, kl_fwd, kl_rev = ak.gaussian_sample_kl(
                        *inputs, eps=eps, seed=5, fwd_grad=fwd_grad, rev_grad=rev_grad,
                        backend="cuda")
                    torch.autograd.grad((z.float().sum() + kl_fwd.sum() + kl_rev.sum()),
                                        inputs, allow_unused=True)
                z = ak.gaussian_sample(inputs[0], inputs[1], eps=eps, seed=5, backend="cuda")
                torch.autograd.grad(z.float().sum(), inputs[:2])
    torch.cuda.synchronize()
    print("sanitize_gaussian_kl: all launches done")


if __name__ == "__main__":
    main()
