"""Gaussian heads, the slot embeddings and the latent injector."""

import pytest
import torch

from amvl.heads import GaussianHead, LatentInjector, SlotEmbeddings


def test_head_bounds_and_unit_variance_at_start(rng_seed):
    head = GaussianHead(hidden_size=13, latent_dim=5, logvar_min=-7.0, logvar_max=3.0)
    hidden = torch.randn(2, 4, 13) * 1e4  # far outside any sane range
    mu, logvar = head(hidden)
    assert mu.shape == logvar.shape == (2, 4, 5)
    assert float(logvar.detach().min()) >= -7.0 and float(logvar.detach().max()) <= 3.0
    torch.nn.init.zeros_(head.proj.weight)
    _, logvar = head(torch.randn(3, 13))
    torch.testing.assert_close(logvar, torch.zeros(3, 5), atol=1e-6, rtol=0)


@pytest.mark.parametrize("hidden", [13, 4096])
def test_head_starts_at_logvar_init(hidden, rng_seed):
    """As built, whatever the hidden size (the means start random, the log-variances not)."""
    head = GaussianHead(hidden, 5, logvar_min=-9.0, logvar_max=2.0, logvar_init=-4.0)
    mu, logvar = head(torch.randn(3, hidden))
    torch.testing.assert_close(logvar, torch.full((3, 5), -4.0), atol=1e-5, rtol=0)
    assert float(mu.abs().max()) > 0


def test_float64_head_stays_float64(rng_seed):
    """The fp32 widening is for 16-bit heads: a float64 head (the references' dtype) keeps
    every digit of lo + span * sigmoid(raw + shift)."""
    head = GaussianHead(7, 3, logvar_min=-6.0, logvar_max=2.0).double()
    torch.nn.init.normal_(head.proj.weight, std=0.5)
    hidden = torch.randn(4, 7, dtype=torch.float64)
    mu, logvar = head(hidden)
    raw = head.proj(hidden).chunk(2, dim=-1)[1]
    exact = -6.0 + 8.0 * torch.sigmoid(raw + head.shift)
    assert mu.dtype == logvar.dtype == torch.float64
    torch.testing.assert_close(logvar, exact, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("case", ["bf16_autocast", "fp16_autocast", "fp16_head"])
def test_head_outputs_fp32_whatever_the_compute_dtype(case, rng_seed):
    """Under autocast, or as a 16-bit module, the head still computes and returns fp32: the
    KL's gradients at the log-variance bounds overflow fp16 (diff * exp(10) = 66,000 for a
    mean 3 away at lv_p = -10), and a 16-bit sigmoid rounds the bounded log-variance to a
    few dozen values."""
    head = GaussianHead(64, 16, logvar_min=-10.0, logvar_max=4.0)
    torch.nn.init.normal_(head.proj.weight, std=0.3)
    hidden = torch.randn(3, 64)
    if case == "fp16_head":
        head = head.half()
        hidden = hidden.half()
    exact_proj = torch.nn.functional.linear(hidden.float(), head.proj.weight.float(),
                                            head.proj.bias.float())
    dtype = torch.bfloat16 if case == "bf16_autocast" else torch.float16
    with torch.autocast("cpu", dtype=dtype, enabled=case != "fp16_head"):
        mu, logvar = head(hidden)
    assert mu.dtype == logvar.dtype == torch.float32
    exact_mu, raw = exact_proj.chunk(2, dim=-1)
    torch.testing.assert_close(mu, exact_mu, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logvar, -10.0 + 14.0 * torch.sigmoid(raw + head.shift),
                               rtol=1e-6, atol=1e-6)


def test_head_rejects_init_outside_bounds():
    with pytest.raises(ValueError, match="logvar_min"):
        GaussianHead(4, 2, logvar_min=1.0, logvar_max=3.0)
    with pytest.raises(ValueError, match="logvar_init"):
        GaussianHead(4, 2, logvar_min=-3.0, logvar_max=3.0, logvar_init=3.0)


def test_injector_writes_slots_in_order_and_passes_gradient(rng_seed):
    injector = LatentInjector(latent_dim=3, hidden_size=6)
    embeds = torch.randn(2, 7, 6)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 2:4] = True
    mask[1, 4:6] = True
    z = torch.randn(2, 2, 3, requires_grad=True)
    out = injector(embeds, mask, z)
    projected = injector.proj(z)
    torch.testing.assert_close(out[0, 2:4], projected[0])
    torch.testing.assert_close(out[1, 4:6], projected[1])
    torch.testing.assert_close(out[~mask], embeds[~mask])
    out.sum().backward()
    assert z.grad is not None and torch.count_nonzero(z.grad) > 0


def test_injector_rejects_wrong_placeholder_count():
    injector = LatentInjector(latent_dim=3, hidden_size=6)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, :2] = True
    mask[1, :3] = True
    with pytest.raises(ValueError, match="exactly K=2"):
        injector(torch.randn(2, 7, 6), mask, torch.randn(2, 2, 3))


def test_injector_by_columns_matches_the_mask_path(rng_seed):
    injector = LatentInjector(latent_dim=3, hidden_size=6)
    embeds, z = torch.randn(2, 9, 6), torch.randn(2, 4, 3, requires_grad=True)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, 3:7] = True
    by_columns = injector(embeds, slice(3, 7), z)
    torch.testing.assert_close(by_columns, injector(embeds, mask, z), rtol=0, atol=0)
    (g_columns,) = torch.autograd.grad(by_columns.sum(), z)
    (g_mask,) = torch.autograd.grad(injector(embeds, mask, z).sum(), z)
    torch.testing.assert_close(g_columns, g_mask)
    for bad in (slice(3, 6), slice(6, 10), slice(-6, -2), slice(3, 11, 2), slice(None, 4)):
        with pytest.raises(ValueError, match="slice of K=4"):
            injector(embeds, bad, z)


def test_heads_and_injector_run_their_linear_layers_as_modules(rng_seed):
    """Every head and the injector call their linear layer as a module, never reading its
    weight in their own forward: DeepSpeed ZeRO-3 gathers a partitioned weight only around its
    own module's forward (tests/deepspeed_worker.py runs it)."""
    head, injector, slots = GaussianHead(13, 5), LatentInjector(5, 13), SlotEmbeddings(3, 13)
    calls = []
    for layer in (slots, head.proj, injector.proj):
        layer.register_forward_pre_hook(lambda module, args: calls.append(module))
    mu, _ = head(slots(torch.randn(2, 3, 13), slice(0, 3)))
    injector(torch.randn(2, 6, 13), slice(1, 4), mu)
    assert calls == [slots, head.proj, injector.proj]
    assert list(dict(slots.named_parameters(recurse=False))) == ["weight"]  # its own


def test_slot_embeddings_add_slot_k_at_the_kth_column(rng_seed):
    """Slot k's vector is added at column start + k of every row, in the embeddings' dtype;
    the other columns are untouched and the gradient reaches each slot's vector."""
    slots = SlotEmbeddings(num_slots=3, hidden_size=6, std=0.5)
    embeds = torch.randn(2, 7, 6, dtype=torch.float64)
    out = slots(embeds, slice(2, 5))
    expected = embeds.clone()
    expected[:, 2:5] += slots.weight.double()
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    upstream = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * upstream).sum(), slots.weight)
    torch.testing.assert_close(grad, upstream[:, 2:5].sum(0).float())
    for bad in (slice(2, 4), slice(5, 8), slice(1, 4, 2), slice(None, 3)):
        with pytest.raises(ValueError, match="slice of K=3 consecutive columns"):
            slots(embeds, bad)
    with pytest.raises(ValueError, match="6 features"):
        slots(torch.randn(2, 7, 5), slice(2, 5))


def test_slot_embeddings_start_at_the_given_spread(rng_seed):
    weight = SlotEmbeddings(num_slots=5, hidden_size=4001, std=0.3).weight.detach()
    assert weight.shape == (5, 4001) and weight.dtype == torch.float32
    assert abs(float(weight.std()) - 0.3) < 0.01 and abs(float(weight.mean())) < 0.01
