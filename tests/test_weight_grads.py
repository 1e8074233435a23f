"""PairedWeightGrads: one gradient per weight for a step's two decoder passes, equal to the
sum autograd forms without it, whatever order the passes' backwards run in."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from amvl import weight_grads
from amvl.weight_grads import PairedWeightGrads
from tests.test_model import _loss_and_grads, build


def _decoder(dtype=torch.float64, wide: bool = False) -> nn.Module:
    """Two linear layers; ``wide``: a 32 x 32 one between them, whose gradient is larger than
    its factors for the few tokens of a tail (the others' are not)."""
    torch.manual_seed(0)
    if wide:
        return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                             nn.Linear(32, 6, bias=False)).to(dtype)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 6, bias=False)).to(dtype)


def _step(decoder: nn.Module, pairing: PairedWeightGrads | None, order: str,
          latent_passes: int = 1) -> dict[str, torch.Tensor]:
    """A prefix pass over x and latent passes over a tail that reads the prefix's output (as
    the latent pass reads the prefix's keys), so that autograd runs the latent passes'
    backward first; with ``order="prefix_last_in_graph"`` the prefix pass runs after the
    latent passes instead, on inputs of its own, so its backward runs first."""
    decoder.zero_grad()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    tail = torch.randn(3, 2, 6, generator=g, dtype=torch.float64)
    prefix = (lambda: pairing.prefix_pass()) if pairing else contextlib.nullcontext
    latent = (lambda: pairing.latent_pass()) if pairing else contextlib.nullcontext
    loss = 0
    if order == "latent_first_in_backward":
        with prefix():
            h = decoder(x)
        for i in range(latent_passes):
            with latent():
                loss = loss + (decoder(tail + h[:, :2] * (i + 1)) ** 2).sum()
        loss = loss + h.sum()
    else:
        for i in range(latent_passes):
            with latent():
                loss = loss + (decoder(tail * (i + 1)) ** 2).sum()
        with prefix():
            loss = loss + decoder(x).sum()
    loss.backward()
    return {name: p.grad.clone() for name, p in decoder.named_parameters()}


def _spy(monkeypatch) -> list:
    """The value each weight_grad call handed autograd: None where a latent pass kept it."""
    handed = []
    real = weight_grads._WeightRecord.weight_grad

    def spy(self, *args):
        out = real(self, *args)
        handed.append(out)
        return out
    monkeypatch.setattr(weight_grads._WeightRecord, "weight_grad", spy)
    return handed


@pytest.mark.parametrize("latent_passes", [1, 2])
@pytest.mark.parametrize("order", ["latent_first_in_backward", "prefix_last_in_graph"])
def test_same_gradients_in_either_order(monkeypatch, order, latent_passes):
    decoder = _decoder()
    expected = _step(decoder, None, order, latent_passes)
    handed = _spy(monkeypatch)
    got = _step(decoder, PairedWeightGrads(decoder, min_numel=0), order, latent_passes)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-12)
    kept = sum(g is None for g in handed)
    # latent first: every latent use of both weights keeps its gradient for the prefix pass;
    # prefix first: nothing is kept, each use hands its own
    assert kept == (2 * latent_passes if order == "latent_first_in_backward" else 0)
    assert len(handed) == 2 * (latent_passes + 1)


@pytest.mark.parametrize("latent_passes", [1, 2])
def test_the_latent_passes_keep_factors_smaller_than_their_gradient(monkeypatch,
                                                                    latent_passes):
    """Until the prefix pass's backward, a latent pass keeps its output gradient and inputs
    where they are smaller than the weight's gradient (the MLPs of 7B-class models: 82 tokens
    a row against 3,584 and 18,944 features), else the gradient; the sums are the same."""
    decoder = _decoder(wide=True)
    expected = _step(decoder, None, "latent_first_in_backward", latent_passes)
    seen = {}
    real = weight_grads._WeightRecord.weight_grad

    def spy(self, grad_out, inputs, prefix):
        if prefix:  # what the latent passes left for this use
            seen[grad_out.shape[1], inputs.shape[1]] = (self.kept is not None,
                                                       len(self.factors))
        return real(self, grad_out, inputs, prefix)
    monkeypatch.setattr(weight_grads._WeightRecord, "weight_grad", spy)
    pairing = PairedWeightGrads(decoder, min_numel=0)
    got = _step(decoder, pairing, "latent_first_in_backward", latent_passes)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-12)
    # 6 tail tokens: (6 x 32) x 2 factors < 32 x 32; (6 x 32) + (6 x 6) > 32 x 6
    assert seen == {(32, 6): (True, 0), (32, 32): (False, latent_passes), (6, 32): (True, 0)}
    assert all(r.kept is None and not r.factors for r in pairing.records.values())


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("partial", ["grad_of_the_tail", "backward_of_other_inputs"])
def test_a_partial_backward_first_leaves_nothing_behind(partial, wide):
    """A backward that runs the latent pass but never reaches the prefix pass (a diagnostic
    gradient of z, or backward(inputs=...) of the heads) once left the latent pass's weight
    gradient kept, and the full backward after it counted that share twice."""
    def run(pair: bool) -> dict[str, torch.Tensor]:
        decoder = _decoder(wide=wide)
        pairing = PairedWeightGrads(decoder, min_numel=0) if pair else None
        g = torch.Generator().manual_seed(1)
        x = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
        tail = torch.randn(3, 2, 6, generator=g, dtype=torch.float64, requires_grad=True)
        head = torch.ones(6, dtype=torch.float64, requires_grad=True)  # stands for the heads
        with pairing.prefix_pass() if pair else contextlib.nullcontext():
            h = decoder(x)
        with pairing.latent_pass() if pair else contextlib.nullcontext():
            loss = (decoder(tail + h[:, :2]) ** 2 * head).sum() + h.sum()
        if partial == "grad_of_the_tail":
            torch.autograd.grad(loss, tail, retain_graph=True)
        else:
            loss.backward(inputs=[head, tail], retain_graph=True)
        loss.backward()
        return {name: p.grad.clone() for name, p in decoder.named_parameters()}

    expected, got = run(False), run(True)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-12)


def test_a_compiled_decoder_runs_unpaired_without_graph_breaks(monkeypatch):
    """A decoder compiled inside an eager step (what the model's warning recommends) broke
    its graph at every paired layer: Dynamo cannot trace the record's lock."""
    import torch._dynamo

    decoder = _decoder()
    expected = _step(decoder, None, "latent_first_in_backward")
    torch._dynamo.reset()
    compiled = torch.compile(decoder, backend="eager")
    counters = torch._dynamo.utils.counters
    counters.clear()
    handed = _spy(monkeypatch)
    pairing = PairedWeightGrads(decoder, min_numel=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    tail = torch.randn(3, 2, 6, generator=g, dtype=torch.float64)
    decoder.zero_grad()
    with pairing.prefix_pass():
        h = compiled(x)
    with pairing.latent_pass():
        loss = (compiled(tail + h[:, :2]) ** 2).sum() + h.sum()
    loss.backward()
    assert sum(counters["graph_break"].values()) == 0 and handed == []
    for name, p in decoder.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-12, atol=1e-12)


def test_the_patch_is_undone_and_unpaired_modules_run_as_usual(monkeypatch):
    decoder = _decoder()
    decoder[2].weight.requires_grad_(False)  # frozen: not paired
    pairing = PairedWeightGrads(decoder, min_numel=0)
    assert pairing.modules == [decoder[0]]
    handed = _spy(monkeypatch)
    with pairing.prefix_pass():
        assert "forward" in decoder[0].__dict__ and "forward" not in decoder[2].__dict__
        with torch.no_grad():
            decoder(torch.randn(2, 6, dtype=torch.float64))  # no autograd: no record
    assert "forward" not in decoder[0].__dict__
    assert handed == [] and pairing.records[id(decoder[0])].pending_prefix == 0
    # a module whose forward someone else replaced (accelerate's hooks) is left alone
    hooked = _decoder()
    hooked[0].forward = hooked[0].forward
    assert PairedWeightGrads(hooked, min_numel=0).modules == [hooked[2]]


def test_autocast_to_another_dtype_runs_unpaired(monkeypatch):
    """fp32 weights under bf16 autocast: the products run in bf16, not the weight's dtype, so
    the module runs as usual (autocast's casts and autograd's sum)."""
    decoder = _decoder(torch.float32)
    handed = _spy(monkeypatch)
    pairing = PairedWeightGrads(decoder, min_numel=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pairing.prefix_pass():
            h = decoder(torch.randn(3, 5, 6))
        with pairing.latent_pass():
            loss = decoder(h[:, :2]).float().sum() + h.float().sum()
    loss.backward()
    assert handed == [] and decoder[0].weight.grad is not None


def test_bf16_weights_under_bf16_autocast_are_paired(monkeypatch):
    """Weights already in autocast's dtype: paired, fp32 inputs cast as autocast would."""
    decoder = _decoder(torch.bfloat16)
    expected = None
    for pair in (False, True):
        decoder.zero_grad()
        handed = _spy(monkeypatch) if pair else []
        pairing = PairedWeightGrads(decoder, min_numel=0) if pair else None
        x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(2))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with pairing.prefix_pass() if pair else contextlib.nullcontext():
                h = decoder(x)
            with pairing.latent_pass() if pair else contextlib.nullcontext():
                loss = (decoder(h[:, :2]).float() ** 2).sum() + h.float().sum()
        loss.backward()
        grads = [p.grad.float() for p in decoder.parameters()]
        if expected is None:
            expected = grads
        else:
            assert sum(g is None for g in handed) == 2
            for got, want in zip(grads, expected):
                torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("objective,gamma", [("amvl", 0.0), ("amvl", 0.5), ("elbo", 0.0),
                                             ("prior", 0.0)])
def test_model_step_gradients_match_unpaired(monkeypatch, objective, gamma):
    """The prefix-shared step of AMVLModel with and without pairing: the same loss and
    gradients, and the latent pass did keep its weight gradients."""
    monkeypatch.setattr(weight_grads, "MIN_PAIRED_NUMEL", 0)  # the tiny model's weights too
    model, batch = build("qwen2", objective=objective, gamma=gamma)
    model.config.pair_weight_grads = False
    plain, g_plain = _loss_and_grads(model, batch, prefix_sharing=True)
    model.config.pair_weight_grads = True
    handed = _spy(monkeypatch)
    paired, g_paired = _loss_and_grads(model, batch, prefix_sharing=True)
    torch.testing.assert_close(paired.loss, plain.loss, rtol=1e-12, atol=0)
    assert g_paired.keys() == g_plain.keys()
    for name in g_plain:
        torch.testing.assert_close(g_paired[name], g_plain[name], rtol=1e-9, atol=1e-12,
                                   msg=name)
    linears = sum(type(m) is nn.Linear for m in model._backbone().modules())
    latent_passes = 2 if gamma else 1
    assert sum(g is None for g in handed) == linears * latent_passes
    # the naive path and checkpointed steps never pair
    handed.clear()
    _loss_and_grads(model, batch, prefix_sharing=False)
    assert handed == []


def test_lora_adapters_are_paired_with_the_unpaired_gradients(monkeypatch):
    """PEFT LoRA on the base model: the frozen base layers are left alone, the adapters'
    weights are paired, and every gradient equals the unpaired step's."""
    pytest.importorskip("peft")  # optional (the lora extra)
    from peft import LoraConfig, get_peft_model

    from amvl.config import AMVLConfig
    from amvl.data import AMVLCollator
    from amvl.model import AMVLModel
    from amvl.tiny import tiny_qwen2, word_tokenizer

    monkeypatch.setattr(weight_grads, "MIN_PAIRED_NUMEL", 0)  # the tiny model's weights too
    torch.manual_seed(0)
    tokenizer = word_tokenizer([f"w{i}" for i in range(30)])
    base = tiny_qwen2(tokenizer).double()
    config = AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch")
    AMVLModel(base, tokenizer, config)  # adds the special tokens before LoRA wraps the model
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = AMVLModel(lora, tokenizer, config).double()
    batch = AMVLCollator(tokenizer)([{"images": [], "question": "w1 w2 w3", "answer": "w4 w5"},
                                     {"images": [], "question": "w6 w7", "answer": "w8"}])
    model.config.pair_weight_grads = False
    _, expected = _loss_and_grads(model, batch, prefix_sharing=True)
    model.config.pair_weight_grads = True
    handed = _spy(monkeypatch)
    _, got = _loss_and_grads(model, batch, prefix_sharing=True)
    assert got.keys() == expected.keys() and any("lora_A" in name for name in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)
    adapters = sum(type(m) is nn.Linear and m.weight.requires_grad
                   for m in model._backbone().modules())
    assert adapters > 0 and sum(g is None for g in handed) == adapters


def test_only_weights_of_min_paired_numel_are_paired_by_default():
    """The Python autograd function costs host time a use: by default only weights of at least
    MIN_PAIRED_NUMEL elements (the MLPs of 7B-class models) are paired."""
    side = int(weight_grads.MIN_PAIRED_NUMEL ** 0.5)
    decoder = nn.Sequential(nn.Linear(side, side, device="meta"),
                            nn.Linear(side, side - 1, device="meta"), nn.Linear(8, 8))
    pairing = PairedWeightGrads(decoder)
    assert [pairing.pairs(m) for m in decoder] == [True, False, False]
    assert all(PairedWeightGrads(decoder, min_numel=0).pairs(m) for m in decoder)
    # the others keep their own forward, without the pairing's wrapper and its host time
    assert pairing.modules == [decoder[0]]
    with pairing.latent_pass():
        assert ["forward" in m.__dict__ for m in decoder] == [True, False, False]
    assert not any("forward" in m.__dict__ for m in decoder)


def test_the_size_that_decides_is_the_full_weights(monkeypatch):
    """Under FSDP with use_orig_params a weight outside its layer's forward is this rank's
    shard (in a 2-rank run one rank paired 0 layers, the other 4, of 6): the decision is made
    on the layer's full size, the weight it holds in its forward, as FSDP's pre-forward hook
    sets it."""
    decoder = _decoder()
    expected = _step(decoder, None, "latent_first_in_backward")
    full = {i: decoder[i].weight for i in (0, 2)}
    for i, layer in full.items():  # a shard outside the forward, the full weight inside
        decoder[i].weight = nn.Parameter(layer.detach()[:1].clone())
        decoder[i].register_forward_pre_hook(
            lambda module, args, i=i: setattr(module, "weight", full[i]))
        decoder[i].register_forward_hook(
            lambda module, args, out, i=i: setattr(module, "weight", shards[i]))
    shards = {i: decoder[i].weight for i in (0, 2)}
    handed = _spy(monkeypatch)
    min_numel = decoder[0].weight.numel() + 1  # more than a shard, less than a weight
    pairing = PairedWeightGrads(decoder, min_numel=min_numel)
    for weight in full.values():
        weight.grad = None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    tail = torch.randn(3, 2, 6, generator=g, dtype=torch.float64)
    with pairing.prefix_pass():
        h = decoder(x)
    with pairing.latent_pass():
        loss = (decoder(tail + h[:, :2]) ** 2).sum() + h.sum()
    loss.backward()
    assert sum(g is None for g in handed) == 2  # both layers' latent gradients kept
    torch.testing.assert_close(full[0].grad, expected["0.weight"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(full[2].grad, expected["2.weight"], rtol=1e-12, atol=1e-12)
