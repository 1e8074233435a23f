"""AMVLModel on tiny Qwen2 and Qwen2-VL models built offline.

The prefix-shared and naive paths must agree in loss and gradients on the same inputs and
noise; generation must match a recompute without cache; saving must round-trip through JSON
and safetensors only.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from PIL import Image

from amvl.config import AMVLConfig
from amvl.data import AMVLCollator, VisionTokens
from amvl.model import AMVLModel
from amvl.sequences import assemble
from amvl.tiny import (
    tiny_image_processor,
    tiny_qwen2,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    word_tokenizer,
)

WORDS = [f"w{i}" for i in range(40)]


def _image(rng: np.random.Generator, size: int = 24) -> Image.Image:
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


def _examples(rng: np.random.Generator, vision: bool, n: int = 3) -> list[dict]:
    """Ragged prompts and answers, so both paddings are exercised."""
    out = []
    for i in range(n):
        question = " ".join(rng.choice(WORDS, size=2 + 2 * i))
        answer = " ".join(rng.choice(WORDS, size=3 - i % 2))
        images = [_image(rng) for _ in range(1 + i % 2)] if vision else []
        out.append({"images": images, "question": question, "answer": answer})
    return out


def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256))


def tiny_text_model(kind: str, tokenizer, **model_kwargs):
    """A tiny causal LM of another family: 'gpt_neox' (its decoder is ``.gpt_neox``, not
    ``.model``), 'granite' (divides its logits by ``logits_scaling``), 'gemma3' (soft-caps
    its final logits when asked) or 'mistral' (a sliding window)."""
    import transformers as tf

    sizes = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    if kind == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**sizes, **model_kwargs))
    sizes["num_key_value_heads"] = 2
    if kind == "granite":
        return tf.GraniteForCausalLM(tf.GraniteConfig(**sizes, **model_kwargs))
    if kind == "gemma3":
        # Gemma 2's eager attention (it has no other) turns a left-padded row into NaN in
        # float64 in transformers itself; Gemma 3 caps its final logits the same way on SDPA.
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**sizes, head_dim=8, **model_kwargs))
        model.set_attn_implementation("sdpa")
        return model
    return tf.MistralForCausalLM(tf.MistralConfig(**sizes, **model_kwargs))


def build(kind: str, model_kwargs: dict | None = None, **config_kwargs):
    """(AMVLModel in float64, batch) for kind 'qwen2', 'llama', 'qwen2_vl', 'qwen2_5_vl' or
    one of :func:`tiny_text_model`'s (built with ``model_kwargs``)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    vision = kind in ("qwen2_vl", "qwen2_5_vl")
    tokenizer = word_tokenizer(WORDS, vision=vision)
    builders = {"qwen2": tiny_qwen2, "llama": tiny_llama, "qwen2_vl": tiny_qwen2_vl,
                "qwen2_5_vl": tiny_qwen2_5_vl}
    base = builders[kind](tokenizer) if kind in builders \
        else tiny_text_model(kind, tokenizer, **(model_kwargs or {}))
    config = AMVLConfig(num_slots=3, latent_dim=5, **{"kernel_backend": "torch", **config_kwargs})
    model = AMVLModel(base, tokenizer, config).double()
    collator = AMVLCollator(tokenizer, tiny_image_processor() if vision else None,
                            VisionTokens.from_model_config(base.config) if vision else None)
    batch = collator(_examples(rng, vision))
    if vision:
        batch["pixel_values"] = batch["pixel_values"].double()
    return model, batch


def _loss_and_grads(model, batch, **kwargs):
    model.zero_grad()
    out = model(**batch, seed=11, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _paths_agree(model, batch) -> set[str]:
    """The prefix-shared and naive steps give the same loss and gradients; returns the names
    of the parameters with a gradient."""
    shared, g_shared = _loss_and_grads(model, batch, prefix_sharing=True)
    naive, g_naive = _loss_and_grads(model, batch, prefix_sharing=False)
    torch.testing.assert_close(shared.loss, naive.loss, rtol=1e-10, atol=0)
    assert g_shared.keys() == g_naive.keys()
    for name in g_shared:
        # The models' rotary tables are fp32 even in a float64 model, and their matmul rounds
        # differently for different sequence shapes: ~1e-7 relative, not a path difference.
        scale = g_naive[name].abs().max().clamp(min=1e-12)
        assert (g_shared[name] - g_naive[name]).abs().max() / scale < 1e-5, name
    return set(g_shared)


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("objective,gamma", [("amvl", 0.0), ("amvl", 0.5), ("elbo", 0.0),
                                             ("prior", 0.0)])
def test_prefix_shared_and_naive_paths_agree(kind, objective, gamma):
    model, batch = build(kind, objective=objective, gamma=gamma, slot_embeddings=True)
    trained = _paths_agree(model, batch)
    assert {"prior_head.proj.weight", "injector.proj.weight", "slot_embeddings.weight"} <= trained
    assert ("posterior_head.proj.weight" in trained) == (objective != "prior")


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_5_vl"])
@pytest.mark.parametrize("objective", ["amvl", "prior", "none"])
def test_the_forwards_nll_from_the_priors_means_on_both_paths(kind, objective):
    """prior_mean_nll decodes the prior's means once more inside the forward (after x's
    cache when sharing): the token-mean NLL that heads() and answer_nll() give apart (the
    fp32 rotary tables round differently for other sequence shapes, see above)."""
    model, batch = build(kind, objective=objective)
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
    answers = [batch[k] for k in ("prompt_ids", "prompt_mask", "answer_ids", "answer_mask")]
    with torch.no_grad():
        z = None if objective == "none" else model.heads(*answers[:2], **images)["mu_p"]
        per_example = model.answer_nll(*answers, z=z, **images)
        tokens = batch["answer_mask"].sum(1)
        want = (per_example * tokens).sum() / tokens.sum()
        for share in (True, False):
            out = model(**batch, step=None, seed=3, prefix_sharing=share, prior_mean_nll=True)
            got = out.metrics.tensors()["nll_prior"]
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0, msg=f"sharing {share}")
            without = model(**batch, step=None, seed=3, prefix_sharing=share)
            assert without.loss == out.loss  # the extra pass leaves the objective alone


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("objective", ["amvl", "none"])
@pytest.mark.parametrize("attention", ["sdpa", "amvl"])
def test_choices_after_one_encoding_score_as_each_apart(kind, objective, attention):
    """choices_nll encodes x once and decodes every answer after its cache, cropped back to
    x in between: each answer's NLL is answer_nll's from the prior's means (a full pass per
    answer), with prefix sharing and without; a third answer shorter than the others."""
    import amvl_kernels.hf as akhf

    model, batch = build(kind, objective=objective)
    if attention == "amvl":
        akhf.use_amvl_attention(model.base)
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
    prompts = (batch["prompt_ids"], batch["prompt_mask"])
    shorter = batch["answer_mask"].clone()
    shorter[:, 1:] = False
    answers = [(batch["answer_ids"], batch["answer_mask"]),
               (batch["answer_ids"].roll(1, 0), batch["answer_mask"].roll(1, 0)),
               (batch["answer_ids"], shorter)]
    with torch.no_grad():
        z = None if objective == "none" else model.heads(*prompts, **images)["mu_p"]
        want = torch.stack([model.answer_nll(*prompts, *answer, z=z, **images)
                            for answer in answers], 1)
        for share in (True, False):
            model.config.prefix_sharing = share
            got = model.choices_nll(*prompts, answers, **images)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0, msg=f"sharing {share}")
    assert not torch.equal(want[:, 0], want[:, 1])
    with pytest.raises(ValueError, match="needs a non-empty list of answers"):
        model.choices_nll(*prompts, [], **images)
    with pytest.raises(ValueError, match=r"an \(answer_ids, answer_mask\) pair"):
        model.choices_nll(*prompts, [(batch["answer_ids"],)], **images)
    if objective == "none":
        with pytest.raises(ValueError, match="has no latent block: pass latents=None"):
            model.choices_nll(*prompts, answers, latents=[torch.zeros(1)], **images)
        return
    # given latents (a diagnostic's variants): each answer after each of them, x once
    variants = [z, torch.zeros_like(z), torch.randn_like(z)]
    with torch.no_grad():
        want = torch.stack([torch.stack([model.answer_nll(*prompts, *answer, z=v, **images)
                                         for answer in answers], 1) for v in variants])
        for share in (True, False):
            model.config.prefix_sharing = share
            got = model.choices_nll(*prompts, answers, latents=variants, **images)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0, msg=f"sharing {share}")
    with pytest.raises(ValueError, match=r"latents must be a non-empty list of \(B, K, d\)"):
        model.choices_nll(*prompts, answers, latents=[z[:, :1]], **images)
    with pytest.raises(ValueError, match=r"one variant: \[z\]\), got Tensor"):
        model.choices_nll(*prompts, answers, latents=z, **images)  # was "ambiguous"


def test_choices_score_with_gradients_under_activation_checkpointing():
    """Checkpointed layers with autograd on drop the KV cache that choices_nll's shared
    encoding keeps ('NoneType' object has no attribute 'crop'): it scores each answer apart
    then, as without prefix sharing, with gradients."""
    model, batch = build("qwen2", objective="amvl")
    prompts = (batch["prompt_ids"], batch["prompt_mask"])
    answers = [(batch["answer_ids"], batch["answer_mask"]),
               (batch["answer_ids"].roll(1, 0), batch["answer_mask"].roll(1, 0))]
    with torch.no_grad():
        want = model.choices_nll(*prompts, answers)
    model.train()
    model.activation_checkpointing_enable()
    got = model.choices_nll(*prompts, answers)
    torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=0)
    got.sum().backward()
    assert model.prior_head.proj.weight.grad is not None


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl"])
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_a_training_step_looks_its_embeddings_up_once(kind, share, gamma, monkeypatch):
    """Every pass's tokens are embedded in one lookup, whose backward writes one gradient of
    the whole table (1.1 GB for Qwen2-7B) where a lookup per pass writes one each, and the
    step is what a lookup per pass gives."""
    model, batch = build(kind, gamma=gamma)
    lookups = []
    # (Qwen2-VL's own forward also looks up its one image token, to find where images go.)
    # Counted in the layer's forward, not by a hook: a hook gets a lookup per pass (NEFTune).
    layer = model.get_input_embeddings()
    lookup = type(layer).forward
    monkeypatch.setattr(type(layer), "forward", lambda module, ids: lookups.append(1) or
                        lookup(module, ids) if ids.numel() > 1 else lookup(module, ids))
    passed = []  # each pass's inputs_embeds, contiguous as a lookup of its own would be
    model._backbone().register_forward_pre_hook(
        lambda module, args, kwargs: passed.append(kwargs["inputs_embeds"]), with_kwargs=True)
    joint, g_joint = _loss_and_grads(model, batch, prefix_sharing=share)
    assert len(lookups) == 1
    assert len(passed) >= 2 and all(e.is_contiguous() and e.dim() == 3 for e in passed)
    monkeypatch.setattr(AMVLModel, "_embed", lambda self, *seqs: [
        self._add_slot_embeddings(self.get_input_embeddings()(s.input_ids), s) for s in seqs])
    apart, g_apart = _loss_and_grads(model, batch, prefix_sharing=share)
    assert len(lookups) > 2
    torch.testing.assert_close(joint.loss, apart.loss, rtol=1e-12, atol=0)
    assert g_joint.keys() == g_apart.keys()
    for name in g_joint:
        torch.testing.assert_close(g_joint[name], g_apart[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("share", [True, False])
def test_neftune_noises_each_pass_as_a_forward_of_it_would(share):
    """transformers' NEFTune hook scales its noise by alpha / sqrt(length x hidden) of the
    lookup it sees: one row of every pass's tokens made it 3-4 times weaker than plain
    fine-tuning's. Each pass is looked up alone under a hook, (batch, its length, hidden)."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    model, batch = build("qwen2")
    layer = model.get_input_embeddings()
    layer.neftune_noise_alpha = 5.0
    seen = []
    layer.register_forward_hook(neftune_post_forward_hook)
    layer.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    out = model(**batch, seed=1, prefix_sharing=share)
    assert torch.isfinite(out.loss)
    rows, hidden = batch["prompt_ids"].shape[0], layer.embedding_dim
    assert len(seen) >= 2 and all(shape[0] == rows and shape[2] == hidden for shape in seen)
    assert max(shape[1] for shape in seen) < batch["prompt_ids"].shape[1] + \
        batch["answer_ids"].shape[1] + 2 * (model.config.num_slots + 2)  # a pass, not all


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl"])
def test_no_latent_objective_is_plain_fine_tuning(kind):
    model, batch = build(kind, objective="none")
    out, grads = _loss_and_grads(model, batch)
    assert out.loss.dtype == torch.float64  # a float64 model's NLL is not rounded to fp32
    assert model.prior_head is None and model.posterior_head is None and model.injector is None
    assert model.slot_embeddings is None
    assert grads and all(name.startswith("base.") for name in grads)
    # Different sequence shapes round the fp32 rotary tables differently (see above).
    torch.testing.assert_close(
        out.loss, model.answer_nll(**batch).mul(batch["answer_mask"].sum(1)).sum()
        / batch["answer_mask"].sum(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind,model_kwargs", [
    ("gpt_neox", {}), ("granite", {"logits_scaling": 4.0}),
    ("gemma3", {"final_logit_softcapping": 0.5})], ids=["gpt_neox", "granite", "gemma3"])
def test_other_families_train_like_their_own_forward(kind, model_kwargs):
    """GPT-NeoX (decoder under ``.gpt_neox``), Granite (logits divided by logits_scaling) and
    Gemma 3 (final logits soft-capped): the "none" objective's loss is the model's own loss on
    [x | y], and the prefix-shared and naive AMVL steps agree."""
    model, batch = build(kind, model_kwargs, objective="none")
    ids = torch.cat([batch["prompt_ids"], batch["answer_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["answer_mask"]], 1)
    labels = torch.cat([torch.full_like(batch["prompt_ids"], -100),
                        batch["answer_ids"].masked_fill(~batch["answer_mask"], -100)], 1)
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    own = model.base(input_ids=ids, attention_mask=mask, position_ids=positions,
                     labels=labels).loss
    # transformers' loss rounds a float64 model's logits to fp32; ours keeps them in fp64
    ours = model(**batch).loss
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, own.double(), rtol=1e-6, atol=0)

    model, batch = build(kind, model_kwargs)
    assert "injector.proj.weight" in _paths_agree(model, batch)
    model.eval()
    out = model.generate(batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=4)
    assert out.sequences.shape == (3, 1, 4)


def test_sliding_windows_are_exact_within_and_refused_beyond():
    """transformers applies a caller's 4D mask as it is, without the window: a pass longer
    than the window is refused instead of silently attending past it."""
    windowless, batch = build("mistral", {"sliding_window": None})
    wide, _ = build("mistral", {"sliding_window": 64})
    torch.testing.assert_close(wide(**batch, seed=3).loss, windowless(**batch, seed=3).loss,
                               rtol=0, atol=0)
    narrow, _ = build("mistral", {"sliding_window": 8})
    with pytest.raises(NotImplementedError, match="sliding window of 8 tokens"):
        narrow(**batch, seed=3)
    narrow.eval()
    with pytest.raises(NotImplementedError, match="sliding window"):
        narrow.generate(batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=4)


def test_a_window_shared_steps_outgrow_is_named_with_what_fits():
    """The shared step's first pass [x | P | y | Q] has Lx + Ly + 2K columns, which its
    sliding-window cache must hold (it cannot be cropped back past the window): refused
    there, saying so, while the naive path, whose widest pass is Lx + K + 2 + Ly, runs."""
    windowless, batch = build("mistral", {"sliding_window": None})  # K = 3 slots
    widest = batch["prompt_ids"].shape[1] + 3 + 2 + batch["answer_ids"].shape[1]
    naive_fits, _ = build("mistral", {"sliding_window": widest})
    torch.testing.assert_close(naive_fits(**batch, seed=3, prefix_sharing=False).loss,
                               windowless(**batch, seed=3, prefix_sharing=False).loss,
                               rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match=r"prompt \+ answer \+ both sides' query "
                                                  r"slots \(2 K\) .*prefix_sharing=False"):
        naive_fits(**batch, seed=3)


def test_compiled_naive_step_does_not_recompile_per_prompt_length():
    """torch.compile(model) on the naive path (what activation checkpointing on SDPA takes):
    after the one recompile that makes the prompt length dynamic, new lengths reuse the graph.
    The injector's slice once pinned the length, a recompile per length until dynamo's limit."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model, _ = build("qwen2")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    rng = np.random.default_rng(1)
    collator = AMVLCollator(model.tokenizer)
    for length in (4, 6, 7, 9):
        batch = collator([{"images": [], "question": " ".join(rng.choice(WORDS, size=length)),
                           "answer": "w1 w2"} for _ in range(2)])
        compiled(**batch, seed=11, prefix_sharing=False).loss.backward()
    assert counter.frame_count <= 2, counter.frame_count
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_shared_step_on_the_amvl_attention_keeps_one_graph_per_shape(backend):
    """torch.compile(model, fullgraph=True) on the prefix-sharing path and the "amvl"
    attention (what a Trainer with torch_compile=True runs): the loss of every prompt length
    equals the eager step's, and after the one recompile that makes the lengths dynamic, new
    lengths reuse the graph. A tile map cached by its length and a length checked with
    operator.index each pinned the graph to one length: a recompile per length, past
    dynamo's limit of 8 silently eager."""
    import amvl_kernels.hf as akhf
    from torch._dynamo.testing import CompileCounterWithBackend

    if backend == "triton" and not torch.cuda.is_available():
        # 40 s under the interpreter, a third of CI's margin: the kernels' custom ops in a
        # compiled graph are traced under the interpreter by test_latent_attention's
        # test_torch_compile_with_dynamic_shapes_keeps_one_graph, and this runs on a GPU
        pytest.skip("on a GPU: under TRITON_INTERPRET=1 other tests trace the Triton ops")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch._dynamo.reset()
    model, _ = build("qwen2")
    model = model.float().to(device)  # the Triton kernels take up to fp32
    akhf.use_amvl_attention(model.base)
    previous = akhf.set_backend(backend)
    try:
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        rng = np.random.default_rng(1)
        collator = AMVLCollator(model.tokenizer)
        # Prompts of two and more tiles of the interpreter's 16 rows (a count of 1 is a size
        # torch.compile specialises)
        for length in (17, 20, 23, 29):
            batch = collator([{"images": [], "question": " ".join(rng.choice(WORDS, size=n)),
                               "answer": " ".join(rng.choice(WORDS, size=2 + i))}
                              for i, n in enumerate((length, length - 4))])
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = compiled(**batch, seed=11, prefix_sharing=True).loss
            torch.testing.assert_close(loss, model(**batch, seed=11, prefix_sharing=True).loss)
            loss.backward()
        assert counter.frame_count <= 2, counter.frame_count
    finally:
        akhf.set_backend(previous)
        torch._dynamo.reset()


@pytest.mark.parametrize("schedule", ["linear", "cyclical"])
def test_step_and_seed_as_tensors_keep_one_compiled_graph_and_equal_the_ints(schedule):
    """A CUDA-graphed step must take its step and seed as tensors: a Python int is a value
    the graph records anew for. As one-element tensors, a compiled step keeps one graph
    (fullgraph) over steps with other values, and every step's loss, metrics and gradients
    equal the eager step with the same ints (the KL schedule and the noise included, the
    gamma term's prior-path draw too)."""
    from amvl_kernels.backends import triton_interpreted
    from torch._dynamo.testing import CompileCounterWithBackend

    if not (torch.cuda.is_available() or triton_interpreted()):
        pytest.skip("Triton runs neither on a GPU nor under TRITON_INTERPRET=1 here")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch._dynamo.reset()
    lengths = {"kl_warmup_steps": 4} if schedule == "linear" else {"kl_cycle_steps": 4}
    model, batch = build("qwen2", kernel_backend="triton", kl_schedule=schedule, gamma=0.5,
                         **lengths)
    model = model.float().to(device)  # the Triton kernels take up to fp32
    batch = {k: v.to(device) for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for step, seed in ((1, 5), (2, 2**40), (6, 7)):
        got = compiled(**batch, step=torch.tensor(step, device=device),
                       seed=torch.tensor([seed], device=device))
        want = model(**batch, step=step, seed=seed)
        torch.testing.assert_close(got.loss, want.loss)
        # read from the device with the other metrics, a float like the int step's
        assert isinstance(got.metrics["kl_weight"], float)
        assert got.metrics["kl_weight"] == pytest.approx(want.metrics["kl_weight"])
        assert got.metrics["nll_prior_draw"] == pytest.approx(want.metrics["nll_prior_draw"])
        for a, b in zip(torch.autograd.grad(got.loss, params, allow_unused=True),
                        torch.autograd.grad(want.loss, params, allow_unused=True)):
            assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert counter.frame_count == 1, counter.frame_count
    with pytest.raises(ValueError, match="step tensor"):
        model(**batch, step=torch.tensor([1.0], device=device))
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CUDA graphs)")
def test_reduce_overhead_step_runs_in_cuda_graphs_with_tensor_step_and_seed():
    """torch.compile(mode="reduce-overhead") over the prefix-sharing step on the "amvl"
    attention, the step and seed as tensors (as AMVLTrainer passes them in that mode): the
    losses and gradients of three steps equal eager's with the same ints, and Inductor
    skipped no CUDA graph (a host sync or a CPU tensor in the step would make it skip)."""
    import amvl_kernels.hf as akhf
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, batch = build("qwen2", kernel_backend="triton", kl_schedule="linear",
                         kl_warmup_steps=4)
    model = model.float().cuda()
    akhf.use_amvl_attention(model.base)
    batch = {k: v.cuda() for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    compiled = torch.compile(model, mode="reduce-overhead")
    for step, seed in ((0, 3), (1, 4), (2, 5), (3, 2**40)):
        got = compiled(**batch, step=torch.tensor(step, device="cuda"),
                       seed=torch.tensor([seed], device="cuda"), prefix_sharing=True)
        grads = [None if g is None else g.clone() for g in
                 torch.autograd.grad(got.loss, params, allow_unused=True)]
        want = model(**batch, step=step, seed=seed, prefix_sharing=True)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-5)
        for a, b in zip(grads, torch.autograd.grad(want.loss, params, allow_unused=True)):
            assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-3, atol=1e-5)
    assert not counters["inductor"].get("cudagraph_skips"), dict(counters["inductor"])
    torch._dynamo.reset()


def test_compiled_vlm_step_breaks_graphs_only_where_transformers_reads_the_device():
    """torch.compile(model) on a Qwen2-VL's prefix-sharing step over the "amvl" attention: the
    same loss as eager. The VLM's own forward breaks the graph (data-dependent operators in
    its vision code); none of those breaks may fall inside a with block of ours, which Dynamo
    cannot resume (it then runs the whole enclosing frame eagerly)."""
    import amvl_kernels.hf as akhf
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, batch = build("qwen2_vl")
    akhf.use_amvl_attention(model.base)
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(**batch, seed=11, prefix_sharing=True).loss
    torch.testing.assert_close(loss, model(**batch, seed=11, prefix_sharing=True).loss)
    loss.backward()
    breaks = " ".join(counters["graph_break"])
    assert counters["graph_break"] and "context manager" not in breaks, breaks
    torch._dynamo.reset()


def test_bf16_autocast_step_on_the_amvl_attention():
    """Under torch.autocast the rotary step hands the attention fp32 q and k beside a bf16 v;
    the step runs, on both paths, near the fp32 loss (it raised a dtype mismatch)."""
    import amvl_kernels.hf as akhf

    model, batch = build("qwen2")
    model.float()
    akhf.use_amvl_attention(model.base)
    for share in (True, False):
        full = model(**batch, seed=11, prefix_sharing=share).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(**batch, seed=11, prefix_sharing=share).loss
        low.backward()
        ratio = float(low.detach() / full.detach())
        assert torch.isfinite(low) and abs(ratio - 1) < 2e-2, (low, full)


def test_a_compiled_base_model_is_named():
    """AMVLModel calls the decoder and the LM head, never the base model's forward: a base
    wrapped by torch.compile would silently compile nothing. Compiling the decoder works."""
    model, batch = build("qwen2")
    loss = model(**batch, seed=11).loss
    decoder = model.base.model
    model.base = torch.compile(model.base, backend="eager")
    with pytest.warns(UserWarning, match="compiled forward never runs"):
        torch.testing.assert_close(model(**batch, seed=11).loss, loss)
    model.base = model.base._orig_mod
    model.base.model = torch.compile(decoder, backend="eager")
    model._compiled_base_warned = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(model(**batch, seed=11).loss, loss, rtol=1e-6, atol=0)
    assert not [w for w in caught if "compiled forward" in str(w.message)]
    torch._dynamo.reset()


def _recompute(model, batch, sequences, z):
    """Greedy tokens of a full pass without cache over [x | latent(z) | generated]."""
    mask = torch.ones_like(sequences, dtype=torch.bool)
    rope = model._rope_positions(batch["prompt_ids"], batch["prompt_mask"],
                                 batch.get("image_grid_thw"))
    parts = model._parts(batch["prompt_ids"], batch["prompt_mask"], sequences, mask, rope)
    full = assemble({"prompt": parts["prompt"], "latent": parts["latent"],
                     "answer": parts["answer_after_latent"]})
    images = model._images(batch.get("pixel_values"), batch.get("image_grid_thw"))
    with torch.no_grad():
        hidden, _ = model._run(full, rope=rope, images=images, z=z)
    begin, end = full.spans["answer"]
    return model.next_token_logits(hidden[:, begin - 1:end - 1]).argmax(-1)


@pytest.mark.parametrize("kind,mode", [("qwen2", "mean"), ("qwen2", "sample"),
                                       ("llama", "mean"), ("qwen2_vl", "mean"),
                                       ("qwen2_5_vl", "mean"), ("qwen2_vl", "sample")])
def test_generate_matches_recompute_without_cache(kind, mode):
    model, batch = build(kind)
    model.eval()
    kwargs = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
    out = model.generate(batch["prompt_ids"], batch["prompt_mask"], **kwargs, latent=mode,
                         num_samples=2 if mode == "sample" else None, max_new_tokens=6,
                         seed=4 if mode == "sample" else None)
    n = 2 if mode == "sample" else 1
    assert out.sequences.shape[:2] == (3, n) and out.latents.shape == (3, n, 3, 5)
    if mode == "mean":
        heads = model.heads(batch["prompt_ids"], batch["prompt_mask"], **kwargs)
        torch.testing.assert_close(out.latents[:, 0], heads["mu_p"])
    else:
        assert not torch.equal(out.latents[:, 0], out.latents[:, 1])
    for draw in range(n):
        sequences = out.sequences[:, draw]
        expected = _recompute(model, batch, sequences, out.latents[:, draw])
        eos = model.tokenizer.eos_token_id
        for row in range(3):  # compare up to and including the first EOS
            stop = (sequences[row] == eos).nonzero()
            end = int(stop[0]) + 1 if len(stop) else sequences.shape[1]
            assert torch.equal(sequences[row, :end], expected[row, :end])


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl", "gemma3", "gpt_neox", "qwen2:amvl"])
def test_draws_share_one_pass_over_the_prompt_and_equal_repeated_rows(kind):
    """n draws per example ran x (and its images) n times, as n copies of each row: the
    prior pass now runs once and its cache is repeated for the draws. The tokens and latents
    are those of the copies (the noise is keyed by row), with a third of the prompt passes
    (on caches of several layer kinds: Gemma 3's sliding layers; and on the "amvl"
    attention)."""
    from amvl.families import vision_markers
    from amvl_kernels.hf import use_amvl_attention

    kind, _, attention = kind.partition(":")
    model, batch = build(kind)
    if attention:
        use_amvl_attention(model.base)
    model.eval()
    n, ids, mask = 3, batch["prompt_ids"], batch["prompt_mask"]
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
    copies = {"prompt_ids": ids.repeat_interleave(n, 0),
              "prompt_mask": mask.repeat_interleave(n, 0)}
    if images:  # each example's images n times over, in the copies' order
        start, _ = vision_markers(model.base.config)
        counts = (ids == start).sum(1).tolist()
        grids = images["image_grid_thw"].split(counts)
        patches = images["pixel_values"].split([int(g.prod(-1).sum()) for g in grids])
        copies["pixel_values"] = torch.cat([x for x in patches for _ in range(n)])
        copies["image_grid_thw"] = torch.cat([g for g in grids for _ in range(n)])
    widths = []
    hook = model._backbone().register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["inputs_embeds"].shape[:2]),
        with_kwargs=True)
    try:
        out = model.generate(ids, mask, **images, latent="sample", num_samples=n,
                             max_new_tokens=5, seed=7)
        first_pass, widths[:] = widths[0], []
        alike = model.generate(**copies, latent="sample", num_samples=1, max_new_tokens=5,
                               seed=7)
    finally:
        hook.remove()
    assert first_pass[0] == ids.shape[0] and widths[0][0] == n * ids.shape[0]
    assert torch.equal(out.sequences.flatten(0, 1), alike.sequences.flatten(0, 1))
    torch.testing.assert_close(out.latents.flatten(0, 1), alike.latents.flatten(0, 1))


def test_vlm_tail_positions_continue_the_models_rope_index():
    """The answer after the prompt gets the positions the model itself would give it."""
    model, batch = build("qwen2_vl", objective="none")
    full_ids = torch.cat([batch["prompt_ids"], batch["answer_ids"]], 1)
    full_mask = torch.cat([batch["prompt_mask"], batch["answer_mask"]], 1)
    theirs = model._rope_positions(full_ids, full_mask, batch["image_grid_thw"])
    rope = model._rope_positions(batch["prompt_ids"], batch["prompt_mask"],
                                 batch["image_grid_thw"])
    parts = model._parts(batch["prompt_ids"], batch["prompt_mask"], batch["answer_ids"],
                         batch["answer_mask"], rope)
    seq = assemble({"prompt": parts["prompt"], "answer": parts["answer_after_x"]})
    ours = torch.cat([rope, seq.position_ids[None, :, rope.shape[-1]:].expand(3, -1, -1)], -1)
    assert torch.equal(ours[:, full_mask], theirs[:, full_mask])


def test_save_and_load_round_trip(tmp_path):
    model, batch = build("qwen2", objective="elbo", free_bits=0.25)
    with torch.no_grad():
        model.prior_head.proj.bias.normal_()
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".pth")) for f in files)
    assert {"amvl_config.json", "amvl_heads.safetensors", "model.safetensors"} <= files
    loaded = AMVLModel.from_pretrained(tmp_path, dtype=torch.float64).double()
    assert loaded.config == model.config and loaded.token_ids == model.token_ids
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    torch.testing.assert_close(loaded(**batch, seed=3).loss, model(**batch, seed=3).loss)
    # The tokenizer comes back as the class it was saved as: AutoTokenizer rebuilt this
    # word-level vocabulary as Qwen2's BPE, which turned "w1 w2 w3" into no tokens at all.
    text = "w1 w12 w3"
    assert loaded.tokenizer(text)["input_ids"] == model.tokenizer(text)["input_ids"] != []


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl"])
def test_slot_embeddings_set_the_query_slots_apart(kind):
    """Slot k of the prior and slot k of the posterior get slot k's vector on top of their
    token's embedding, in every pass that holds them; nothing else changes. Without them the
    slots start as near copies (a cosine of 0.98 between slots on SmolLM2-135M)."""
    model, batch = build(kind, slot_embeddings=True)
    k = model.config.num_slots
    parts = model._parts(batch["prompt_ids"], batch["prompt_mask"], batch["answer_ids"],
                         batch["answer_mask"])
    seq = assemble({n: parts[n] for n in ("prompt", "prior", "answer_after_x", "posterior")})
    looked_up = model.get_input_embeddings()(seq.input_ids)
    slots = model.slot_embeddings.weight.double()
    for joint in (True, False):  # a pass alone, and in one lookup with another
        embeds = model._embed(seq, assemble({"latent": parts["latent"]}))[0] if joint \
            else model._embed(seq)[0]
        expected = looked_up.clone()
        for part in ("prior", "posterior"):
            expected[:, seq.columns(part)] += slots
        torch.testing.assert_close(embeds, expected, rtol=0, atol=0)
    inputs = embeds[0, seq.columns("prior")]
    assert all(not torch.equal(inputs[i], inputs[j]) for i in range(k) for j in range(i))
    assert model.config.slot_embeddings
    model_without, _ = build(kind)  # the default: none
    assert model_without.slot_embeddings is None
    torch.testing.assert_close(model_without._embed(seq)[0], looked_up, rtol=0, atol=0)


def test_models_saved_before_slot_embeddings_load_and_score_alike(tmp_path):
    """A model saved before slot embeddings existed (no such field in its config, no such
    weights beside its heads) loads without them and gives the loss it gave; one saved with
    them loads them."""
    with_slots, batch = build("qwen2", slot_embeddings=True)
    with_slots.save_pretrained(tmp_path / "with")
    loaded = AMVLModel.from_pretrained(tmp_path / "with", dtype=torch.float64)
    torch.testing.assert_close(loaded.slot_embeddings.weight, with_slots.slot_embeddings.weight,
                               rtol=0, atol=0)
    torch.testing.assert_close(loaded(**batch, seed=3).loss, with_slots(**batch, seed=3).loss)
    model, batch = build("qwen2")
    with torch.no_grad():
        model.prior_head.proj.bias.normal_()
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "amvl_config.json"
    saved = json.loads(config_file.read_text())
    del saved["slot_embeddings"]
    config_file.write_text(json.dumps(saved))
    loaded = AMVLModel.from_pretrained(tmp_path, dtype=torch.float64).double()
    assert loaded.slot_embeddings is None and not loaded.config.slot_embeddings
    torch.testing.assert_close(loaded(**batch, seed=3).loss, model(**batch, seed=3).loss,
                               rtol=0, atol=0)


def test_sharded_heads_are_not_saved(tmp_path):
    """Under FSDP1 a rank's live head weights are flat or empty views of its shard: saving
    them wrote heads of no size. They are refused, and a gathered state_dict is saved."""
    model, _ = build("qwen2")
    full = model.state_dict()
    model.posterior_head.proj.weight = nn.Parameter(torch.empty(0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"sharded across processes \(posterior_head"):
        model.save_pretrained(tmp_path / "live")
    assert not (tmp_path / "live").exists()
    model.save_pretrained(tmp_path / "gathered", state_dict=full)
    loaded = AMVLModel.from_pretrained(tmp_path / "gathered", dtype=torch.float64)
    torch.testing.assert_close(loaded.posterior_head.proj.weight,
                               full["posterior_head.proj.weight"], rtol=0, atol=0)
    model, _ = build("qwen2", slot_embeddings=True)  # their weight as FSDP1's flat view
    model.slot_embeddings.weight = nn.Parameter(torch.empty(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"sharded across processes \(slot_embeddings.weight"):
        model.save_pretrained(tmp_path / "live")


@pytest.mark.parametrize("objective", ["amvl", "none"])
def test_partitioned_base_weights_are_not_saved(tmp_path, objective):
    """A DeepSpeed ZeRO-3 partition (a parameter with ``ds_id``, empty outside a forward)
    anywhere in the model is refused, with or without heads (the "none" objective has none:
    its base was saved as tensors of size 0)."""
    model, _ = build("qwen2", objective=objective)
    model.base.model.layers[0].mlp.up_proj.weight.ds_id = 0  # what ZeRO-3 marks them with
    with pytest.raises(ValueError, match=r"sharded across processes \(base\.model\.layers\.0"
                                         r"\.mlp\.up_proj\.weight.*ZeRO-3"):
        model.save_pretrained(tmp_path)
    assert not tmp_path.joinpath("amvl_heads.safetensors").exists()


def test_a_given_base_gets_the_saved_weights_and_a_given_tokenizer_is_checked(tmp_path):
    model, batch = build("qwen2", objective="amvl")
    with torch.no_grad():  # what training moves, the latent tokens' rows among it
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    fresh, _ = build("qwen2", objective="amvl")
    loaded = AMVLModel.from_pretrained(tmp_path, base_model=fresh.base,
                                       tokenizer=model.tokenizer)
    for name, tensor in model.state_dict().items():  # the given base's own weights once stayed
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # A tokenizer without the latent tokens once had their trained rows reset to the mean.
    with pytest.raises(ValueError, match="'<lat_start>' at id None"):
        AMVLModel.from_pretrained(tmp_path, tokenizer=word_tokenizer(WORDS))


def test_saving_a_whole_model_over_an_adapter_removes_the_adapter(tmp_path):
    model, batch = build("qwen2", objective="amvl")
    (tmp_path / "base").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # an earlier LoRA save
        (tmp_path / "base" / name).write_text("{}")
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "base" / "adapter_config.json").exists()
    loaded = AMVLModel.from_pretrained(tmp_path, dtype=torch.float64)
    torch.testing.assert_close(loaded(**batch, seed=3).loss, model(**batch, seed=3).loss)


def test_special_tokens_are_added_once_and_ids_come_from_the_tokenizer():
    tokenizer = word_tokenizer(WORDS)
    before = len(tokenizer)
    config = AMVLConfig(num_slots=2, latent_dim=3, latent_token="<think>")
    model = AMVLModel(tiny_qwen2(tokenizer), tokenizer, config)
    assert len(tokenizer) == before + 5
    assert model.base.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.token_ids["latent"] == tokenizer.convert_tokens_to_ids("<think>")
    AMVLModel(tiny_qwen2(tokenizer), tokenizer, config)
    assert len(tokenizer) == before + 5


def test_special_tokens_in_a_padded_vocabulary_keep_its_size():
    """Qwen2 checkpoints pad their embedding matrices past the tokenizer (151,936 rows for
    about 151,665 tokens): the new tokens take rows there, set to the mean of the real
    tokens' rows, and nothing is cut off. A base that lacks rows for a saved tokenizer's
    tokens grows."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from amvl.tiny import _text_config

    tokenizer = word_tokenizer(WORDS)
    before = len(tokenizer)
    base = Qwen2ForCausalLM(Qwen2Config(**_text_config(before + 20, 32, 1)))
    untouched = base.get_input_embeddings().weight[before + 5:].clone()
    model = AMVLModel(base, tokenizer, AMVLConfig(num_slots=2, latent_dim=3))
    for matrix in (base.get_input_embeddings().weight, base.get_output_embeddings().weight):
        assert matrix.shape[0] == before + 20
        new = matrix[sorted(model.token_ids.values())]
        torch.testing.assert_close(new, matrix[:before].mean(0).expand_as(new))
    torch.testing.assert_close(base.get_input_embeddings().weight[before + 5:], untouched)
    assert base.config.vocab_size == before + 20
    short = Qwen2ForCausalLM(Qwen2Config(**_text_config(before, 32, 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rows for the latent tokens alone: no warning
        model = AMVLModel(short, tokenizer, AMVLConfig(num_slots=2, latent_dim=3))
    assert short.get_input_embeddings().num_embeddings == before + 5


def test_a_tokenizer_larger_than_the_embeddings_is_named():
    """A tokenizer with more tokens than the model has rows (another model's, or tokens added
    without resizing) grew the embeddings without a word."""
    tokenizer = word_tokenizer(WORDS)
    base = tiny_qwen2(tokenizer)
    tokenizer.add_tokens(["extra1", "extra2"])
    with pytest.warns(UserWarning, match=r"holds \d+ tokens besides the latent ones"):
        AMVLModel(base, tokenizer, AMVLConfig(num_slots=2, latent_dim=3))
    assert base.get_input_embeddings().num_embeddings == len(tokenizer)


def test_collator_pads_prompts_left_and_answers_right():
    tokenizer = word_tokenizer(WORDS)
    batch = AMVLCollator(tokenizer)([{"question": "w1 w2 w3", "answer": "w4"},
                                     {"question": "w5", "answer": "w6 w7 w8"}])
    assert batch["prompt_mask"].tolist() == [[True] * 3, [False, False, True]]
    assert batch["answer_mask"].tolist() == [[True, True, False, False], [True] * 4]
    eos = tokenizer.eos_token_id
    assert batch["answer_ids"][0, 1] == eos and batch["answer_ids"][1, 3] == eos
    assert batch["prompt_ids"][1, 2] == tokenizer.convert_tokens_to_ids("w5")


def test_collator_image_cache_forgets_images_that_are_gone():
    """cache_images keeps a processed image as long as the image object lives, and no longer:
    a dataset that decodes its images afresh each epoch must not grow the cache for ever."""
    import gc

    tokenizer = word_tokenizer(WORDS, vision=True)
    vision = VisionTokens(*tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]))
    collator = AMVLCollator(tokenizer, tiny_image_processor(), vision, cache_images=True)
    rng = np.random.default_rng(0)
    kept = _image(rng)
    collator([{"question": "w1", "answer": "w2", "images": [kept]}])
    for _ in range(5):  # fresh images, dropped after their batch
        collator([{"question": "w1", "answer": "w2", "images": [_image(rng)]}])
    gc.collect()
    assert len(collator._image_cache) == 1
    before = collator([{"question": "w1", "answer": "w2", "images": [kept]}])
    del kept
    gc.collect()
    assert len(collator._image_cache) == 0
    assert before["pixel_values"].shape[0] > 0


def test_collator_gives_text_only_examples_the_stand_in_image():
    """image_for_text_only: an example without images is collated as if it had that image
    (what a VLM sharded across processes needs in every batch); examples with images keep
    theirs; without the option, nothing changes."""
    tokenizer = word_tokenizer(WORDS, vision=True)
    vision = VisionTokens(*tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]))
    rng = np.random.default_rng(0)
    blank, photo = Image.new("RGB", (16, 16)), _image(rng)
    stand_in = AMVLCollator(tokenizer, tiny_image_processor(), vision, image_for_text_only=blank)
    plain = AMVLCollator(tokenizer, tiny_image_processor(), vision)
    text, pictured = {"question": "w1", "answer": "w2"}, \
        {"question": "w3", "answer": "w4", "images": [photo]}
    mixed = stand_in([text, pictured])
    expected = plain([{**text, "images": [blank]}, pictured])
    assert mixed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(mixed[key], expected[key]), key
    assert "pixel_values" not in plain([text])
    with pytest.raises(ValueError, match="image_for_text_only given without an image_processor"):
        AMVLCollator(tokenizer, image_for_text_only=blank)


def test_the_stand_in_image_is_read_as_an_examples_image(tmp_path):
    """The stand-in went straight to the image processor: a transparent PNG given as a path
    came out black (an example's is composited onto white) and an EncodedImage failed."""
    import io

    from amvl.data import EncodedImage

    tokenizer = word_tokenizer(WORDS, vision=True)
    vision = VisionTokens(*tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]))
    clear = Image.new("RGBA", (16, 16), (30, 60, 90, 0))
    clear.save(tmp_path / "clear.png")
    buffer = io.BytesIO()
    clear.save(buffer, format="PNG")
    text = {"question": "w1", "answer": "w2"}
    plain = AMVLCollator(tokenizer, tiny_image_processor(), vision)
    expected = plain([{**text, "images": [str(tmp_path / "clear.png")]}])
    for stand_in in (str(tmp_path / "clear.png"), EncodedImage(buffer.getvalue()), clear):
        got = AMVLCollator(tokenizer, tiny_image_processor(), vision,
                           image_for_text_only=stand_in)([text])
        for key in expected:
            assert torch.equal(got[key], expected[key]), (type(stand_in).__name__, key)


def test_collator_truncates_questions_aloud_and_never_to_nothing():
    tokenizer = word_tokenizer(WORDS, vision=True)
    collator = AMVLCollator(tokenizer, max_prompt_tokens=2)
    with pytest.warns(UserWarning, match="lost its first 1 of 3 tokens"):
        batch = collator([{"question": "w1 w2 w3", "answer": "w4"}])
    assert batch["prompt_ids"][0].tolist() == tokenizer.convert_tokens_to_ids(["w2", "w3"])
    rng = np.random.default_rng(0)
    processor = tiny_image_processor()
    vision = VisionTokens(*tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]))
    collator = AMVLCollator(tokenizer, processor, vision, max_prompt_tokens=8)
    with pytest.raises(ValueError, match="example 0: its images take"):
        collator([{"question": "w1", "answer": "w2", "images": [_image(rng)]}])
    with pytest.raises(ValueError, match="example 0: its images take"):  # images alone, too
        collator([{"question": "", "answer": "w2", "images": [_image(rng)]}])
    for bad in (0, -1, 2.5, "8", True):
        with pytest.raises(ValueError, match="max_prompt_tokens must be a positive int"):
            AMVLCollator(tokenizer, max_prompt_tokens=bad)
        with pytest.raises(ValueError, match="max_answer_tokens must be a positive int"):
            AMVLCollator(tokenizer, max_answer_tokens=bad)


def test_collator_truncates_answers_aloud():
    """A cut answer teaches the model to stop early (EOS follows the cut): it is cut with a
    warning, as questions are."""
    tokenizer = word_tokenizer(WORDS)
    collator = AMVLCollator(tokenizer, max_answer_tokens=1)
    with pytest.warns(UserWarning, match="answer lost its last 2 of 3 tokens"):
        batch = collator([{"question": "w1", "answer": "w2 w3 w4"}])
    assert batch["answer_ids"][0].tolist() == [tokenizer.convert_tokens_to_ids("w2"),
                                               tokenizer.eos_token_id]


def test_collator_refuses_text_that_spells_a_structural_token():
    """Text that spells "<lat>" or an image marker was tokenized to the structural token
    itself, opening a latent block or announcing an image inside the question."""
    model, _ = build("qwen2_vl")
    tokenizer = model.tokenizer
    vision = VisionTokens.from_model_config(model.base.config)
    collator = AMVLCollator(tokenizer, tiny_image_processor(), vision)
    latent = model.config.latent_token
    with pytest.raises(ValueError, match=f"example 1: the question spells .*{latent}"):
        collator([{"question": "w1", "answer": "w2"},
                  {"question": f"w1 {latent} w3", "answer": "w2"}])
    with pytest.raises(ValueError, match="the answer spells .*vision_start"):
        collator([{"question": "w1", "answer": "<|vision_start|> w2"}])
    collator([{"question": "w1 w3", "answer": "w2"}])  # plain text passes
    # a model's own latent token strings (the defaults were all the collator knew), and
    # tokens added after the collator was built
    tokenizer = word_tokenizer(WORDS)
    collator = AMVLCollator(tokenizer, special_tokens=["<z>"])
    collator([{"question": "w1 <z>", "answer": "w2"}])  # not a token yet: plain text
    tokenizer.add_special_tokens({"additional_special_tokens": ["<z>"]})
    with pytest.raises(ValueError, match="spells the structural token.*<z>"):
        collator([{"question": "w1 <z>", "answer": "w2"}])


def test_collator_image_cache_takes_file_paths(tmp_path):
    tokenizer = word_tokenizer(WORDS, vision=True)
    vision = VisionTokens(*tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]))
    path = tmp_path / "image.png"
    _image(np.random.default_rng(0)).save(path)
    batches = []
    for cache in (False, True, True):
        collator = AMVLCollator(tokenizer, tiny_image_processor(), vision, cache_images=cache)
        for image in (str(path), path):
            batches.append(collator([{"question": "w1", "answer": "w2", "images": [image]}]))
    assert len(collator._path_cache) == 1
    for batch in batches[1:]:
        assert torch.equal(batch["pixel_values"], batches[0]["pixel_values"])


@pytest.mark.parametrize("examples,error,match", [
    ([], ValueError, "empty list"),
    (["w1"], TypeError, "example 0"),
    ([{"question": "w1", "answer": 3}], ValueError, "'answer'"),
    ([{"question": "", "answer": "w1"}], ValueError, "prompt is empty"),
    ([{"question": "w1", "answer": "w2", "images": [object()]}], ValueError, "image processor"),
    # one path, not a list: read character by character ("missing image d")
    ([{"question": "w1", "answer": "w2", "images": "dir/a.png"}], TypeError,
     "'images' must be a list"),
])
def test_collator_errors_name_the_example(examples, error, match):
    with pytest.raises(error, match=match):
        AMVLCollator(word_tokenizer(WORDS))(examples)


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl", "qwen2_5_vl"])
def test_amvl_attention_gives_the_dense_mask_loss_and_gradients(kind):
    """Both training paths on the "amvl" attention (layouts, no dense masks) equal sdpa with
    the dense masks."""
    import amvl_kernels.hf as akhf

    model, batch = build(kind, objective="amvl", gamma=0.5)
    dense, g_dense = _loss_and_grads(model, batch, prefix_sharing=True)
    akhf.use_amvl_attention(model.base)
    assert model._on_amvl_attention()
    for share in (True, False):
        out, grads = _loss_and_grads(model, batch, prefix_sharing=share)
        torch.testing.assert_close(out.loss, dense.loss, rtol=1e-6, atol=0)
        for name in g_dense:
            scale = g_dense[name].abs().max().clamp(min=1e-12)
            assert (grads[name] - g_dense[name]).abs().max() / scale < 1e-5, name


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl"])
def test_amvl_attention_builds_no_dense_mask_on_any_pass(kind, monkeypatch):
    """Passes without a KV cache (the checkpointed prefix-shared step, the naive step, heads,
    answer_nll) once had transformers read restarting positions (left padding; P and y both
    continuing x) as packed sequences, and the mask function then built a (B, 1, L, L) mask
    that the layout overrode. Every pass must reach the kernels with no mask built."""
    import transformers.masking_utils as masking

    import amvl_kernels.hf as akhf

    model, batch = build(kind, objective="amvl")
    akhf.use_amvl_attention(model.base)
    built = []
    monkeypatch.setattr(akhf, "sdpa_mask", lambda *a, **k: built.append(k) or None)
    packed_checks = []
    find_packed = masking.find_packed_sequence_indices
    monkeypatch.setattr(masking, "find_packed_sequence_indices",
                        lambda *a, **k: packed_checks.append(1) or find_packed(*a, **k))
    dense, _ = _loss_and_grads(model, batch, prefix_sharing=True)
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    for share in (True, False):
        out, _ = _loss_and_grads(model, batch, prefix_sharing=share)
        torch.testing.assert_close(out.loss, dense.loss, rtol=1e-9, atol=0)
    with torch.no_grad():
        heads = model.heads(**batch)
        model.answer_nll(**batch, z=heads["mu_p"])
    assert built == [] and packed_checks == []
    if kind == "qwen2_vl":  # the vision tower on "amvl" too: it still falls back to SDPA
        model.base.set_attn_implementation("amvl")
        with pytest.warns(UserWarning, match="not causal"):
            out, _ = _loss_and_grads(model, batch, prefix_sharing=True)
        torch.testing.assert_close(out.loss, dense.loss, rtol=1e-9, atol=0)


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl"])
def test_training_step_on_the_triton_kernels(kind):
    """The whole step on our Triton kernels, the Gaussian op's and the "amvl" attention's
    (the other tests run the PyTorch paths): compiled, on CUDA tensors, on a GPU; under the
    interpreter on the CPU. Both training paths equal the same model on sdpa with dense masks,
    with the same Gaussian kernel and seed, hence the same noise."""
    import amvl_kernels.hf as akhf
    from amvl_kernels.backends import triton_interpreted

    if not (torch.cuda.is_available() or triton_interpreted()):
        pytest.skip("Triton runs neither on a GPU nor under TRITON_INTERPRET=1 here")
    if kind == "qwen2_vl" and not torch.cuda.is_available():
        # 40 s under the interpreter (a VLM's image tokens lengthen x); the kernels see the
        # same calls as the text model's, which runs here
        pytest.skip("on a GPU: under TRITON_INTERPRET=1 the text model's step runs")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, batch = build(kind, objective="amvl", gamma=0.5, kernel_backend="triton")
    model = model.float().to(device)
    batch = {k: v.to(device, torch.float32 if v.is_floating_point() else v.dtype)
             if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    # The vision tower's convolution would run on TF32 on a GPU, which turns the attention
    # paths' fp32 rounding differences (~1e-7) into ~1e-4 in its weight gradient.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    previous = akhf.set_backend("triton")
    try:
        dense, g_dense = _loss_and_grads(model, batch, prefix_sharing=True)
        akhf.use_amvl_attention(model.base)
        for share in (True, False):
            out, grads = _loss_and_grads(model, batch, prefix_sharing=share)
            torch.testing.assert_close(out.loss, dense.loss, rtol=1e-5, atol=1e-6)
            assert grads.keys() == g_dense.keys()
            for name in g_dense:
                scale = g_dense[name].abs().max().clamp(min=1e-12)
                assert (grads[name] - g_dense[name]).abs().max() / scale < 1e-4, (share, name)
    finally:
        akhf.set_backend(previous)
        torch.backends.cudnn.allow_tf32 = tf32


def _right_padded_prompts(batch):
    """The batch's prompts with their padding moved to the right."""
    ids, mask = batch["prompt_ids"].clone(), batch["prompt_mask"].clone()
    for row in range(ids.shape[0]):
        keep = mask[row]
        n = int(keep.sum())
        ids[row, :n], ids[row, n:] = ids[row][keep].clone(), 0
        mask[row, :n], mask[row, n:] = True, False
    return dict(batch, prompt_ids=ids, prompt_mask=mask)


@pytest.mark.parametrize("change,match", [
    (_right_padded_prompts, "prompts must be left-padded"),
    (lambda b: dict(b, answer_mask=b["answer_mask"].flip(1), answer_ids=b["answer_ids"].flip(1)),
     "answers must be right-padded"),
    (lambda b: dict(b, answer_mask=torch.zeros_like(b["answer_mask"])),
     "answers must be right-padded"),
    (lambda b: dict(b, answer_ids=b["answer_ids"][:, :0], answer_mask=b["answer_mask"][:, :0]),
     "answer_ids has no columns"),
    (lambda b: dict(b, answer_ids=b["answer_ids"][:2]), "must be the same"),
    (lambda b: dict(b, prompt_ids=b["prompt_ids"].float()), "token ids as torch.long"),
    # answers padded with the labels' -100, ids past the vocabulary: IndexError in F.embedding
    (lambda b: dict(b, answer_ids=b["answer_ids"].masked_fill(~b["answer_mask"], -100)),
     r"answer_ids must be token ids in \[0, "),
    (lambda b: dict(b, prompt_ids=b["prompt_ids"] + 1000), "prompt_ids must be token ids"),
    # masks read by truthiness: a 3 changed the loss, an additive float mask reads backwards
    (lambda b: dict(b, answer_mask=b["answer_mask"].long() * 3), "answer_mask must hold 0/1"),
    (lambda b: dict(b, prompt_mask=b["prompt_mask"].float()), "prompt_mask must be bool"),
    (lambda b: dict(b, prompt_mask=b["prompt_mask"].to("meta")), "prompt_mask is on meta"),
    (lambda b: dict(b, pixel_values=torch.zeros(4, 8, dtype=torch.float64)), "text-only"),
])
def test_batches_padded_the_wrong_way_are_refused(change, match):
    """A right-padded prompt or a left-padded answer would put pad columns where the model
    reads its predictions: an error, not a slightly different loss. Likewise ids, masks and
    images the model cannot read as given."""
    model, batch = build("qwen2", objective="none")
    assert not batch["prompt_mask"].all()  # ragged: the padding side matters
    with pytest.raises(ValueError, match=match):
        model(**change(batch), seed=0)


def test_calls_missing_what_they_need_are_named():
    """A forward without answers failed with KeyError 'answer_after_x'; a seed with the means
    was ignored (the command line refuses it)."""
    model, batch = build("qwen2", objective="amvl")
    with pytest.raises(ValueError, match="answer_ids and answer_mask are required"):
        model(batch["prompt_ids"], batch["prompt_mask"], None, None)
    model.eval()
    with pytest.raises(ValueError, match="seed fixes sampled latents: the means"):
        model.generate(batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=2, seed=3)
    model.generate(batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=2, seed=3,
                   latent="sample")


def test_token_ids_of_another_integer_type_are_refused_clearly():
    """int32 ids passed the checks, then failed deep in cross_entropy (text models) or in
    transformers' rope index (every call of a VLM)."""
    for kind in ("qwen2", "qwen2_vl"):
        model, batch = build(kind)
        for name in ("prompt_ids", "answer_ids"):
            with pytest.raises(ValueError, match=rf"{name} must hold token ids as torch.long "
                                                 r"\(int64\), got torch.int32: convert them "
                                                 r"with .long\(\)"):
                model(**{**batch, name: batch[name].int()}, seed=0)
        with pytest.raises(ValueError, match="prompt_ids must hold token ids as torch.long"):
            model.generate(batch["prompt_ids"].int(), batch["prompt_mask"], max_new_tokens=2)


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl"])
def test_a_text_model_on_flash_attention_is_refused(kind):
    """flash-attention's kernels ignore 4D masks: the latent block would be causal, and a
    prefix-shared step's prior slots would see the answer. The vision tower may use it."""
    model, batch = build(kind)
    text = getattr(model.base.config, "text_config", model.base.config)
    if kind == "qwen2_vl":  # the vision tower's attention is its own affair
        vision = model.base.config.vision_config
        vision._attn_implementation = "flash_attention_2"
        model._check_attention()
        vision._attn_implementation = "sdpa"
    text._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"the text model's attention is 'flash_attention_2', "
                                         r"which ignores the masks"):
        model(**batch, seed=0)
    with pytest.raises(ValueError, match="ignores the masks"):
        AMVLModel(model.base, model.tokenizer, model.config)


@pytest.mark.parametrize("step", [-5, 2.5, "3", True])
def test_a_step_that_is_not_a_count_is_refused(step):
    """A negative step turned the linear warm-up's KL weight negative (the loss fell below
    the NLL)."""
    model, batch = build("qwen2", objective="amvl", kl_schedule="linear", kl_warmup_steps=10)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        model(**batch, seed=0, step=step)


@pytest.mark.parametrize("objective", ["amvl", "elbo"])
def test_a_scheduled_training_forward_without_its_step_is_refused(objective):
    """Without a step every forward was step 0, whose KL weight a linear or cyclical schedule
    sets to 0: a loop of one's own trained "elbo" without its KL and "amvl" without the
    reverse KL, silently. Given steps, evaluation (no autograd) and eval mode still run."""
    model, batch = build("qwen2", objective=objective, kl_schedule="cyclical",
                         kl_cycle_steps=4)
    with pytest.raises(ValueError, match="kl_schedule='cyclical' weighs the KL by the "
                                         r"training step: call model\(..., step="):
        model(**batch, seed=0)
    assert model(**batch, seed=0, step=0).metrics["kl_weight"] == 0.0
    assert model(**batch, seed=0, step=None).metrics["kl_weight"] == 1.0
    with torch.no_grad():
        model(**batch, seed=0)
    model.eval()
    model(**batch, seed=0)


@pytest.mark.parametrize("tokens", [0, -1.0, float("inf"), float("nan"), True, "3"])
def test_answer_tokens_that_are_not_a_positive_count_are_refused(tokens):
    """0 made the loss inf and a negative count flipped its sign, silently."""
    model, batch = build("qwen2", objective="amvl")
    with pytest.raises(ValueError, match="answer_tokens must be a number > 0"):
        model(**batch, seed=0, answer_tokens=tokens)
    with pytest.raises(ValueError, match="answer_tokens tensor must hold one real number"):
        model(**batch, seed=0, answer_tokens=torch.ones(2))
    tokens = batch["answer_mask"].sum()  # the batch's own count, as a tensor and a float
    want = model(**batch, seed=0).loss
    for given in (tokens, float(tokens)):
        torch.testing.assert_close(model(**batch, seed=0, answer_tokens=given).loss, want)


def test_answer_nll_refuses_latents_of_another_shape():
    """z with more slots than K was injected over <lat_end> and the answer's embeddings, one
    with fewer left placeholders in place: a different NLL, silently."""
    model, batch = build("qwen2", objective="amvl")
    b, k, d = batch["prompt_ids"].shape[0], model.config.num_slots, model.config.latent_dim
    z = torch.randn(b, k, d, dtype=torch.float64)
    assert model.answer_nll(**batch, z=z).shape == (b,)
    for bad in (torch.randn(b, k + 2, d), torch.randn(b, k - 1, d), torch.randn(b, k, d + 1),
                torch.randn(b + 1, k, d), torch.randn(k, d)):
        with pytest.raises(ValueError, match=r"z must be \(B, K, d\)"):
            model.answer_nll(**batch, z=bad.double())
    none, batch = build("qwen2", objective="none")
    with pytest.raises(ValueError, match="'none' has no latent block"):
        none.answer_nll(**batch, z=z)
    assert none.answer_nll(**batch).shape == (b,)


@pytest.mark.parametrize("change,match", [
    (lambda b: dict(b, image_grid_thw=None), "pixel_values given without image_grid_thw"),
    (lambda b: {k: v for k, v in b.items() if k != "pixel_values"},
     "image_grid_thw given without pixel_values"),
    (lambda b: {k: v for k, v in b.items() if k not in ("pixel_values", "image_grid_thw")},
     r"image tokens, but image_grid_thw's 0 row\(s\)"),
    (lambda b: dict(b, image_grid_thw=b["image_grid_thw"][:-1]), "image tokens, but"),
    (lambda b: dict(b, image_grid_thw=b["image_grid_thw"][:, :2]), r"must be \(images, 3\)"),
])
def test_images_that_do_not_match_the_prompts_are_refused(change, match):
    """Images missing or too few for the prompts' image tokens failed deep in transformers'
    rope index (a TypeError, a bare StopIteration): now a ValueError in every entry point."""
    model, batch = build("qwen2_vl")
    bad = change(batch)
    prompt = {k: v for k, v in bad.items() if not k.startswith("answer")}
    for call in (lambda: model(**bad, seed=0), lambda: model.heads(**bad),
                 lambda: model.answer_nll(**bad), lambda: model.generate(**prompt)):
        with pytest.raises(ValueError, match=match):
            call()


def test_generate_needs_a_token_to_generate():
    model, batch = build("qwen2", objective="amvl")
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=0)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_samples"):
            model.generate(batch["prompt_ids"], batch["prompt_mask"], latent="sample",
                           num_samples=bad)
    with pytest.raises(ValueError, match="text-only model"):  # not silently dropped
        model.generate(batch["prompt_ids"], batch["prompt_mask"],
                       pixel_values=torch.zeros(4, 8, dtype=torch.float64))
    # arguments that were silently ignored or replaced by the config's
    for bad in ("", 0):
        with pytest.raises(ValueError, match="latent must be"):
            model.generate(batch["prompt_ids"], batch["prompt_mask"], latent=bad)
    with pytest.raises(ValueError, match="num_samples draws latents"):
        model.generate(batch["prompt_ids"], batch["prompt_mask"], latent="mean", num_samples=3)
    with pytest.raises(ValueError, match="seed must be"):
        model.generate(batch["prompt_ids"], batch["prompt_mask"], latent="mean", seed="x")
    with pytest.raises(ValueError, match="left-padded"):
        right = _right_padded_prompts(batch)
        model.generate(right["prompt_ids"], right["prompt_mask"])
    with pytest.raises(ValueError, match="synced_processes must be a bool"):
        model.generate(batch["prompt_ids"], batch["prompt_mask"], synced_processes="yes")
    # one process (no process group) is in step with itself: the same tokens
    prompt = batch["prompt_ids"], batch["prompt_mask"]
    assert torch.equal(model.generate(*prompt, max_new_tokens=3).sequences,
                       model.generate(*prompt, max_new_tokens=3, synced_processes=True).sequences)


def test_generate_decodes_in_eval_mode_and_without_eos_or_pad():
    """Greedy decoding from a model left in training mode runs without dropout, and leaves
    the mode as it was; a tokenizer with neither EOS nor pad runs every row to the end."""
    model, batch = build("qwen2", objective="amvl")
    model.base.config.attention_dropout = 0.5
    for layer in model.base.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.eval()
    expected = model.generate(batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=4)
    model.train()
    again = model.generate(batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=4)
    assert model.training and torch.equal(again.sequences, expected.sequences)
    model.tokenizer.eos_token, model.tokenizer.pad_token = None, None
    assert model.tokenizer.eos_token_id is None and model.tokenizer.pad_token_id is None
    out = model.generate(batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=3)
    assert out.sequences.shape[-1] == 3


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl", "qwen2_5_vl"])
def test_load_weights_in_place(tmp_path, kind, monkeypatch):
    """What a Trainer resuming a checkpoint does: every weight back in place, VLMs too, whose
    checkpoints transformers writes under the original models' names: mapped onto the
    model's own names, without transformers building a second whole model on the host (15 GB
    more a process for a 7B VLM)."""
    model, _ = build(kind, objective="amvl")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path)
    other, _ = build(kind, objective="amvl")

    def second_model(*args, **kwargs):
        raise AssertionError("a second whole model was built to load the weights")

    with monkeypatch.context() as patch:
        patch.setattr(type(other.base), "from_pretrained", second_model)
        other.load_weights(tmp_path)
    saved = model.state_dict()
    for name, tensor in other.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    with pytest.raises(ValueError, match=r"another configuration \(differs in \['objective'\]"):
        build(kind, objective="elbo")[0].load_weights(tmp_path)
    # the inference settings are not the weights': loaded, and this model keeps its own
    sampler, _ = build(kind, objective="amvl", inference="sample", num_samples=3)
    sampler.load_weights(tmp_path)
    assert (sampler.config.inference, sampler.config.num_samples) == ("sample", 3)
    assert all(torch.equal(t, saved[n]) for n, t in sampler.state_dict().items())


def test_a_model_is_in_one_mode_the_bases_and_loads_in_eval_mode(tmp_path):
    """transformers' from_pretrained returns eval-mode models; wrapped, the heads alone were in
    training mode (model.training True over a decoder without dropout), and
    AMVLModel.from_pretrained returned that mix."""
    model, _ = build("qwen2", objective="amvl")
    assert model.training and all(m.training for m in model.modules())
    model.save_pretrained(tmp_path)
    loaded = AMVLModel.from_pretrained(tmp_path)
    assert not any(m.training for m in loaded.modules())
    base = loaded.base.train(False)
    rewrapped = AMVLModel(base, loaded.tokenizer, AMVLConfig.load(tmp_path))
    assert not any(m.training for m in rewrapped.modules())
    assert all(m.training for m in rewrapped.train().modules())


def test_fp16_autocast_keeps_finite_kl_gradients_at_the_bounds():
    """Under fp16 autocast (mixed precision's fp32 weights) the heads returned fp16, so the
    KL ran in fp16 and its gradient at lv_p = -10 (the default bound) with the means 9 apart,
    9 * exp(10) / 3 examples = 66,000, overflowed: inf or NaN gradients from the heads on, under a finite loss. The
    heads now compute in fp32; what the fp16 decoder's own range does with such gradients is
    the loss scaler's business, as for any fp16 model."""
    model, batch = build("qwen2", objective="amvl")
    model = model.float()
    d = model.config.latent_dim
    with torch.no_grad():
        model.prior_head.proj.bias[d:] = -20.0  # lv_p at the lower bound
        model.posterior_head.proj.bias[:d] = 9.0
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(**batch, seed=11)
    out.latents.mu_p.retain_grad()
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.latents.mu_p.grad).all()
    assert float(out.latents.mu_p.grad.abs().max()) > 65504  # past fp16's largest value
    heads = [p for head in (model.prior_head, model.posterior_head) for p in head.parameters()]
    assert all(torch.isfinite(p.grad).all() for p in heads)


def test_generate_refuses_logits_that_overflow():
    """Latents too large for a fp16 model made every logit NaN, and argmax gave token 0 at
    every step, silently; and heads() of the "none" objective was a TypeError."""
    model, batch = build("qwen2", objective="prior", logvar_min=-30.0, logvar_max=30.0)
    model = model.half().eval()
    with torch.no_grad():
        model.prior_head.proj.bias[model.config.latent_dim:] = 3.0  # lv_p about 28.6
    with pytest.raises(FloatingPointError, match="logits are NaN"):
        model.generate(batch["prompt_ids"], batch["prompt_mask"], latent="sample",
                       max_new_tokens=3, seed=1)
    none, batch = build("qwen2", objective="none")
    with pytest.raises(ValueError, match="'none' has no latent heads"):
        none.heads(batch["prompt_ids"], batch["prompt_mask"])


def test_a_model_without_latents_answers_once():
    """Objective 'none': sampling decoded the one answer n times alike (n times the work, and
    a 'majority vote' of copies); it is refused when asked for, and a config that says
    "sample" gives one row, the greedy answer."""
    none, batch = build("qwen2", objective="none", inference="sample", num_samples=3)
    prompts = (batch["prompt_ids"], batch["prompt_mask"])
    for asked in ({"latent": "sample"}, {"num_samples": 2, "latent": "sample"}, {"seed": 1}):
        with pytest.raises(ValueError, match="no latents .* answers once"):
            none.generate(*prompts, max_new_tokens=3, **asked)
    out = none.generate(*prompts, max_new_tokens=3)
    assert out.sequences.shape[:2] == (prompts[0].shape[0], 1) and out.latents is None
    torch.testing.assert_close(out.sequences, none.generate(*prompts, latent="mean",
                                                            max_new_tokens=3).sequences)
