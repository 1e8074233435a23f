"""Smallest useful call of the fused Gaussian op: run it, print what it returns, check it.

    python examples/quickstart.py

On a GPU this runs the Triton kernel; on a CPU the PyTorch reference (set TRITON_INTERPRET=1
before starting Python to run the Triton kernel through its interpreter instead).
"""

import torch

import amvl_kernels as ak


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    slots, d = 4, 8  # K latent slots of a d-dim diagonal Gaussian
    mu_q, logvar_q, mu_p, logvar_p = (torch.randn(slots, d, device=device, requires_grad=True)
                                      for _ in range(4))

    backend = "triton" if ak.triton_interpreted() else "auto"
    # AMVL's routing: KL(q||p) trains the prior, KL(p||q) regularises the posterior.
    z, kl_fwd, kl_rev = ak.gaussian_sample_kl(mu_q, logvar_q, mu_p, logvar_p, seed=1234,
                                              fwd_grad="p", rev_grad="q", backend=backend)
    backend = ak.resolve_backend(backend, z.device, has_cuda_kernel=True)
    print(f"device={device} backend={backend} torch={torch.__version__}")
    print(f"z[0]      = {z[0].detach().cpu().numpy().round(3)}")
    print(f"KL(q||p)  = {kl_fwd.detach().cpu().numpy().round(3)}  (per slot)")
    print(f"KL(p||q)  = {kl_rev.detach().cpu().numpy().round(3)}  (per slot)")

    (kl_fwd.sum() + kl_rev.sum()).backward()
    # With the default routing the prior's mean only hears KL(q||p), the posterior's only
    # KL(p||q): compare with the closed forms of DESIGN.md section 2.
    diff = (mu_q - mu_p).detach()
    expected_mu_p = -diff * torch.exp(-logvar_p.detach())
    expected_mu_q = diff * torch.exp(-logvar_q.detach())
    print(f"grad mu_p matches -diff*exp(-lv_p): {torch.allclose(mu_p.grad, expected_mu_p, atol=1e-5)}")
    print(f"grad mu_q matches  diff*exp(-lv_q): {torch.allclose(mu_q.grad, expected_mu_q, atol=1e-5)}")

    again, _, _ = ak.gaussian_sample_kl(mu_q, logvar_q, mu_p, logvar_p, seed=1234,
                                        backend=backend)
    print(f"same seed, same z: {torch.equal(z, again)}")


if __name__ == "__main__":
    main()
