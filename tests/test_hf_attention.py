"""The "amvl" Hugging Face attention implementation (amvl_kernels.hf) against transformers' SDPA.

Every comparison runs the same tiny random model twice, once per implementation, and compares
logits on real (non-padding) positions and the gradients of every parameter:

* no layout: "amvl" with the 2D padding mask against SDPA's own causal + padding mask;
* a latent layout: "amvl" with ``latent_layout=`` against SDPA with the 4D additive mask of
  ``layout.dense_mask(Lq)``, swapped in for the 2D mask just before the decoder (so position ids,
  which Qwen2-VL derives from the 2D mask, are the same in both runs);
* with a KV cache: a prefix pass with ``use_cache=True`` then a tail pass on that cache; the loss
  covers both passes, so gradients flow through the cached keys and values.

Float64 models on the PyTorch reference make these comparisons tight; one float32 run goes
through the Triton kernel (the interpreter on the CPU) to show the kernel path is the one taken.
"""

from __future__ import annotations

import contextlib
import inspect
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface

import amvl_kernels.hf as akhf
from amvl.tiny import tiny_image_processor, tiny_qwen2, tiny_qwen2_vl, word_tokenizer
from amvl_kernels.layout import LatentLayout

WORDS = [f"w{i}" for i in range(24)]
LENGTH, PREFIX, PADS = 12, 8, 3  # row 0 is left-padded by PADS; the cache splits at PREFIX
BLOCK = (9, 3)  # a bidirectional latent block inside the tail, in both rows


# ----------------------------------------------------------------------------- fixtures, helpers


@pytest.fixture(autouse=True)
def torch_backend():
    """Each test starts on the PyTorch reference and leaves the backend as it found it."""
    previous = akhf.set_backend("torch")
    yield
    akhf.set_backend(previous)


@contextlib.contextmanager
def spy_on_amvl():
    """Record (module class, queries, keys) of every call of the "amvl" attention function."""
    seen: list[tuple[str, int, int]] = []

    def spy(module, query, key, *args, **kwargs):
        seen.append((type(module).__name__, query.shape[2], key.shape[2]))
        return akhf.amvl_attention_forward(module, query, key, *args, **kwargs)

    AttentionInterface.register(akhf.NAME, spy)
    try:
        yield seen
    finally:
        AttentionInterface.register(akhf.NAME, akhf.amvl_attention_forward)


def image_inputs(count: int) -> dict:
    """pixel_values and image_grid_thw for ``count`` random 16x16 images (4 tokens each)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
              for _ in range(count)]
    out = tiny_image_processor()(images=images, return_tensors="pt")  # pillow backend
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def build(kind: str, dtype: torch.dtype = torch.float64, **config) -> tuple:
    """(model, inputs) for 'qwen2' or 'qwen2_vl': two rows of LENGTH tokens, row 0 left-padded;
    the Qwen2-VL rows hold one image each inside the prefix."""
    torch.manual_seed(0)
    vision = kind == "qwen2_vl"
    tokenizer = word_tokenizer(WORDS, vision=vision)
    model = (tiny_qwen2_vl if vision else tiny_qwen2)(tokenizer)
    for key, value in config.items():
        setattr(model.config.get_text_config(), key, value)
    if config:  # rebuild so that the layers read the changed config
        model = type(model)(model.config)
    model = model.to(dtype)
    first_word = 3 + 4 * vision  # past the special tokens and the vision markers
    words = torch.randint(first_word, len(tokenizer), (2, LENGTH))
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[0, :PADS] = 0
    words[0, :PADS] = tokenizer.pad_token_id
    inputs = {"input_ids": words, "attention_mask": mask}
    if vision:
        ids = {w: tokenizer.convert_tokens_to_ids(w)
               for w in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")}
        image = [ids["<|vision_start|>"], *[ids["<|image_pad|>"]] * 4, ids["<|vision_end|>"]]
        words[:, PADS:PADS + 6] = torch.tensor(image)  # after the padding, inside the prefix
        inputs.update(image_inputs(2))
        # 1 marks image tokens: Qwen2-VL's multimodal rotary positions need it (5.17+).
        inputs["mm_token_type_ids"] = (words == ids["<|image_pad|>"]).int()
        # Explicit multimodal rotary positions for every pass: in 5.24 the model cannot derive
        # a cached tail's positions from a mask longer than the tail (generate() passes them).
        inputs["position_ids"], _ = model.model.get_rope_index(
            words, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
            attention_mask=mask)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return model, inputs


def latent_layout(mask: torch.Tensor) -> LatentLayout:
    """Causal with padding and one bidirectional block per row, over all LENGTH keys."""
    return LatentLayout.with_latent_blocks(LENGTH, [[BLOCK], [BLOCK]], padding_mask=mask.bool())


def first_keys(layout: LatentLayout, n: int) -> LatentLayout:
    """The layout of the first n keys (valid for a prefix pass: no block crosses n)."""
    return LatentLayout.from_tensors(*(t[:, :n] for t in layout.metadata()))


def additive_mask(layout: LatentLayout, num_queries: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, Lq, Lk) additive mask of the layout, for SDPA."""
    allowed = layout.dense_mask(num_queries)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def cache_name(model) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"


def output_cache(out):
    """The KV cache of a forward pass (the field is ``cache`` from transformers 5.24 on)."""
    return out.get("cache", out.get("past_key_values"))


def run(model, inputs: dict, implementation: str, layout: LatentLayout | None = None,
        split: int | None = None) -> tuple[torch.Tensor, dict]:
    """Logits of the last pass at real positions, and every parameter's gradient.

    split=None: one pass over all tokens. split=n: a prefix pass over n tokens with
    use_cache=True, then a tail pass on the cache. The loss is a fixed random projection of
    the real positions' logits of every pass.
    """
    if implementation == "amvl":
        akhf.use_amvl_attention(model)
    else:
        model.set_attn_implementation(implementation)
    model.zero_grad()
    mask = inputs["attention_mask"]
    ends = [LENGTH] if split is None else [split, LENGTH]
    dense: list[torch.Tensor | None] = [None]

    def swap_mask(module, args, kwargs):  # the SDPA reference of a layout: its dense mask
        if dense[0] is not None:
            kwargs["attention_mask"] = dense[0]
        return args, kwargs

    hook = model.get_decoder().register_forward_pre_hook(swap_mask, with_kwargs=True)
    try:
        torch.manual_seed(1)
        loss, cache, start = 0.0, None, 0
        for end in ends:
            step = {"input_ids": inputs["input_ids"][:, start:end], "attention_mask": mask[:, :end]}
            if start == 0:  # the images lie inside the first pass
                step.update({k: v for k, v in inputs.items() if k.startswith(("pixel", "image"))})
                if "mm_token_type_ids" in inputs:
                    step["mm_token_type_ids"] = inputs["mm_token_type_ids"][:, :end]
            else:
                step[cache_name(model)] = cache
            if "position_ids" in inputs:
                step["position_ids"] = inputs["position_ids"][..., start:end]
            pass_layout = None if layout is None else first_keys(layout, end)
            if pass_layout is not None and implementation == "amvl":
                step["latent_layout"] = pass_layout
            if pass_layout is not None and implementation != "amvl":
                dense[0] = additive_mask(pass_layout, end - start, model.dtype)
            out = model(**step, use_cache=split is not None)
            cache = output_cache(out)
            real = mask[:, start:end].bool()
            logits = out.logits[real]
            loss = loss + (logits * torch.randn_like(logits)).sum()
            start = end
        loss.backward()
    finally:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def assert_same(reference: tuple, candidate: tuple, rtol: float, atol: float) -> None:
    (logits_a, grads_a), (logits_b, grads_b) = reference, candidate
    torch.testing.assert_close(logits_b, logits_a, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


# ----------------------------------------------------------------------------- registration


def test_registered_in_both_interfaces():
    assert akhf.NAME in AttentionInterface()
    # Without a mask function under the same name transformers silently drops the padding.
    assert AttentionMaskInterface()[akhf.NAME] is akhf.amvl_attention_mask


def test_kernel_package_imports_neither_transformers_nor_amvl():
    code = ("import sys, amvl_kernels; assert 'transformers' not in sys.modules; "
            "import amvl_kernels.hf; assert not any(m == 'amvl' or m.startswith('amvl.') "
            "for m in sys.modules), 'amvl_kernels.hf imported amvl'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("split", [None, PREFIX], ids=["full", "kv_cache"])
@pytest.mark.parametrize("with_layout", [False, True], ids=["padding", "layout"])
@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl"])
def test_matches_sdpa(kind, with_layout, split):
    model, inputs = build(kind)
    layout = latent_layout(inputs["attention_mask"]) if with_layout else None
    reference = run(model, inputs, "sdpa", layout, split)
    with spy_on_amvl() as calls:
        candidate = run(model, inputs, "amvl", layout, split)
    layers = model.config.get_text_config().num_hidden_layers
    passes = [(LENGTH, LENGTH)] if split is None else [(split, split), (LENGTH - split, LENGTH)]
    assert sorted({call[1:] for call in calls}) == sorted(passes)
    assert len(calls) == layers * len(passes)
    assert_same(reference, candidate, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl"])
def test_generate_matches_sdpa(kind):
    """Greedy decoding: one query per step on a growing cache, padding honoured throughout."""
    model, inputs = build(kind)
    inputs.pop("position_ids", None)  # generate() derives the positions of every step
    tokens = {}
    for implementation in ("sdpa", "amvl"):
        if implementation == "amvl":
            akhf.use_amvl_attention(model)
        with torch.no_grad():
            tokens[implementation] = model.generate(**inputs, max_new_tokens=4, do_sample=False,
                                                    pad_token_id=0)
    assert torch.equal(tokens["amvl"], tokens["sdpa"])


def test_layout_is_authoritative_over_the_padding_mask():
    """A layout that ignores the padding lets real tokens see the pad tokens: the logits move."""
    model, inputs = build("qwen2")
    akhf.use_amvl_attention(model)
    no_pads = LatentLayout.causal(2, LENGTH)
    with torch.no_grad():
        padded = model(**inputs).logits
        unpadded = model(**inputs, latent_layout=no_pads).logits
    assert torch.equal(padded[1], unpadded[1])  # row 1 has no padding
    assert not torch.allclose(padded[0, PADS:], unpadded[0, PADS:])


def test_triton_kernel_matches_sdpa_float32():
    """The Triton kernel (interpreted on the CPU) inside a float32 Qwen2, with a layout."""
    model, inputs = build("qwen2", torch.float32)
    if torch.cuda.is_available():  # the kernel itself on a GPU; the interpreter on the CPU
        model = model.cuda()
        inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    layout = latent_layout(inputs["attention_mask"])
    reference = run(model, inputs, "sdpa", layout, PREFIX)
    akhf.set_backend("triton")
    with spy_on_amvl() as calls:
        candidate = run(model, inputs, "amvl", layout, PREFIX)
    assert calls
    assert_same(reference, candidate, rtol=1e-4, atol=1e-5)


def test_generate_on_the_triton_kernel_matches_sdpa(monkeypatch):
    """Greedy generation from a left-padded batch: every decoding step (one query per head,
    GQA, a padded layout per step) runs the kernel's split-KV decode path, here with one key
    tile per slice, and the logits of every step match SDPA's."""
    import importlib

    decode = importlib.import_module("amvl_kernels.latent_attention_decode")
    monkeypatch.setattr(decode, "_split_tiles", lambda programs, n_tiles, target: (n_tiles, 1))
    model, inputs = build("qwen2", torch.float32)
    if torch.cuda.is_available():
        model = model.cuda()
        inputs = {k: v.cuda() for k, v in inputs.items()}
    # 8 new tokens: the keys outgrow the interpreter's 16-key tiles, so steps merge slices.
    settings = dict(max_new_tokens=8, do_sample=False, output_scores=True,
                    return_dict_in_generate=True, pad_token_id=0)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        reference = model.generate(**inputs, **settings)
    akhf.use_amvl_attention(model)
    akhf.set_backend("triton")
    with spy_on_amvl() as calls, torch.no_grad():
        candidate = model.generate(**inputs, **settings)
    assert any(queries == 1 for _, queries, _ in calls)  # the decoding steps reached the kernel
    assert torch.equal(candidate.sequences, reference.sequences)
    for got, want in zip(candidate.scores, reference.scores, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_vision_tower_stays_on_sdpa():
    model, inputs = build("qwen2_vl")
    akhf.use_amvl_attention(model)
    assert model.config.text_config._attn_implementation == akhf.NAME
    assert model.config.vision_config._attn_implementation == "sdpa"
    with spy_on_amvl() as calls, torch.no_grad():
        model(**inputs, latent_layout=latent_layout(inputs["attention_mask"]))
    layers = model.config.text_config.num_hidden_layers
    assert [name for name, _, _ in calls] == ["Qwen2VLAttention"] * layers


def test_unsupported_mask_falls_back_to_sdpa():
    """Packed sequences (position ids restarting, no mask) need a doc-aware mask: without a
    layout they run on SDPA, with a warning, and still match it."""
    model, inputs = build("qwen2")
    packed = {"input_ids": inputs["input_ids"][1:], "use_cache": False,  # no cache: packing
              "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])}
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        reference = model(**packed).logits
        akhf.use_amvl_attention(model)
        with pytest.warns(UserWarning, match="running transformers' SDPA"):
            candidate = model(**packed).logits
        # The same packing as a layout runs on the kernel, and agrees.
        layout = LatentLayout.packed([[5, 7]], LENGTH)
        on_kernel = model(**packed, latent_layout=layout).logits
    torch.testing.assert_close(candidate, reference, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(on_kernel, reference, rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------- errors


def test_dropout_in_training_raises():
    model, inputs = build("qwen2", attention_dropout=0.1)
    akhf.use_amvl_attention(model)
    model.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(**inputs)
    model.eval()  # dropout is off in eval mode: fine
    model(**inputs)


def test_active_sliding_window_raises():
    model, inputs = build("qwen2", use_sliding_window=True, sliding_window=4,
                          max_window_layers=0,
                          layer_types=["sliding_attention", "sliding_attention"])
    akhf.use_amvl_attention(model)
    with pytest.raises(NotImplementedError, match="sliding window"):
        model(**inputs)


def _window_in_the_mask_only(kind: str):
    """A tiny float32 model (their experts' grouped products take no float64) whose window
    its attention modules do not carry: PhiMoE's sliding window, Llama-4's attention chunks,
    both of 4, put in the mask alone."""
    import transformers as tf

    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 pad_token_id=0, num_local_experts=2, num_experts_per_tok=1)
    torch.manual_seed(0)
    if kind == "phimoe":
        model = tf.PhimoeForCausalLM(tf.PhimoeConfig(**sizes, sliding_window=4))
    else:
        model = tf.Llama4ForCausalLM(tf.Llama4TextConfig(
            **sizes, attention_chunk_size=4, head_dim=8, intermediate_size_mlp=64,
            interleave_moe_layer_step=1, no_rope_layers=[1, 0],
            layer_types=["chunked_attention", "full_attention"]))
    return model.eval()


@pytest.mark.parametrize("kind", ["phimoe", "llama4"])
def test_a_window_only_the_mask_carries_is_refused_with_a_layout(kind):
    """Without a layout such a model's dense mask runs on SDPA; a layout replaced that mask,
    and the window was silently dropped (logits 0.14 off SDPA's). Within
    layouts_replace_masks, where no mask is built, the layer types' window is refused too."""
    model = _window_in_the_mask_only(kind)
    ids = torch.randint(3, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        reference = model(ids).logits
        akhf.use_amvl_attention(model)
        with pytest.warns(UserWarning, match="running transformers' SDPA"):
            torch.testing.assert_close(model(ids).logits, reference, rtol=1e-5, atol=1e-6)
        with pytest.raises(NotImplementedError, match="window of 4"):
            model(ids, latent_layout=LatentLayout.causal(1, 12))
        with akhf.layouts_replace_masks(), pytest.raises(NotImplementedError,
                                                          match="window of 4 over 12 keys"):
            model(ids, latent_layout=LatentLayout.causal(1, 12))


def test_a_layout_is_refused_where_the_queries_are_not_the_last_keys():
    """A static cache's keys are all its slots and its queries sit where the cache is filled
    to: a layout over its keys read the new tokens as the last slots, which saw nothing
    (zeros, no error). Without a layout the static cache runs on SDPA."""
    from transformers import StaticCache

    model, inputs = build("qwen2")
    akhf.use_amvl_attention(model)
    ids = inputs["input_ids"][1:]
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="not the last of its 16 keys"):
        model(ids[:, :6], latent_layout=LatentLayout.causal(1, 16), use_cache=True,
              **{_cache_kwarg(model): cache})


def test_a_masked_token_attends_as_in_sdpa():
    """transformers' 2D mask hides a token as a key; its own query still attends over the
    real keys before it. Such rows (right padding, a token masked in mid-row) returned zeros
    on the 'amvl' attention, where SDPA and eager attend."""
    model, inputs = build("qwen2")
    mask = torch.ones_like(inputs["attention_mask"])
    mask[0, 5] = 0  # in mid-row
    mask[1, -3:] = 0  # right padding
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        reference = model(inputs["input_ids"], attention_mask=mask).logits
        akhf.use_amvl_attention(model)
        candidate = model(inputs["input_ids"], attention_mask=mask).logits
    torch.testing.assert_close(candidate, reference, rtol=1e-9, atol=1e-10)


def test_a_sliding_window_that_holds_every_key_runs_on_the_kernel():
    """Mistral's default window (4,096) over a shorter sequence is plain causal attention: it
    ran on SDPA, with a warning on every layer of every call, instead of on the kernel."""
    import warnings

    config = dict(use_sliding_window=True, sliding_window=LENGTH, max_window_layers=0,
                  layer_types=["sliding_attention", "sliding_attention"])
    model, inputs = build("qwen2", **config)
    reference = run(model, inputs, "sdpa")
    with spy_on_amvl() as calls, warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        candidate = run(model, inputs, "amvl")
    assert len(calls) == model.config.num_hidden_layers
    assert_same(reference, candidate, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("argument", ["position_bias", "sinks", "indices"])
def test_attention_arguments_it_does_not_know_are_refused(argument):
    """transformers passes new attention features as arguments (Inkling2's position_bias and
    sinks, DeepSeek-V3.2's indices); ignoring one gave other logits than the model's (0.05
    off on Inkling2) without a word. Flags and None pass."""
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(NotImplementedError, match=rf"passes \['{argument}'\]"):
        akhf.amvl_attention_forward(torch.nn.Module(), q, k, k, None,
                                    **{argument: torch.zeros(1)})
    out, _ = akhf.amvl_attention_forward(torch.nn.Module(), q, k, k, None, **{argument: None},
                                         some_flag=True)
    assert out.shape == (1, 3, 4, 8)
    bidirectional = torch.nn.Module()
    bidirectional.is_causal = False  # the SDPA path of non-causal modules refuses them too
    with pytest.raises(NotImplementedError, match=argument):
        akhf.amvl_attention_forward(bidirectional, q, k, k, None,
                                    **{argument: torch.zeros(1)})
    with pytest.raises(NotImplementedError, match="soft-capping"):
        akhf.amvl_attention_forward(bidirectional, q, k, k, None, softcap=30.0)


def test_a_bidirectional_module_keeps_its_dropout_on_sdpa(monkeypatch):
    """A non-causal module on the "amvl" implementation runs SDPA: with dropout 0, always,
    so a vision tower switched along lost its training dropout silently."""
    seen = []

    def spy(module, query, key, value, mask, dropout=0.0, **kwargs):
        seen.append(dropout)
        return query.transpose(1, 2), None
    monkeypatch.setattr(akhf, "sdpa_attention_forward", spy)
    bidirectional = torch.nn.Module()
    bidirectional.is_causal = False
    q = torch.randn(1, 4, 3, 8)
    with pytest.warns(UserWarning, match="is not causal"):
        akhf.amvl_attention_forward(bidirectional, q, q, q, None, dropout=0.25)
    assert seen == [0.25]


def test_softcap_raises():
    q = torch.randn(1, 4, 3, 8)
    k = torch.randn(1, 2, 3, 8)
    with pytest.raises(NotImplementedError, match="soft-capping"):
        akhf.amvl_attention_forward(torch.nn.Module(), q, k, k, None, softcap=30.0)


def test_attention_weights_are_refused_not_dropped():
    # output_attentions=True once returned an empty tuple without a word.
    model, inputs = build("qwen2")
    akhf.use_amvl_attention(model)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(**inputs, output_attentions=True)


def test_a_promised_layout_must_come():
    # Inside layouts_replace_masks the mask function builds nothing, so a call without a
    # layout would silently lose its padding: it is refused instead.
    model, inputs = build("qwen2")
    akhf.use_amvl_attention(model)
    with akhf.layouts_replace_masks(), pytest.raises(ValueError, match="no latent_layout"):
        model(**inputs)
    model(**inputs)  # the promise ends with its block


def test_bad_layouts_raise():
    model, inputs = build("qwen2")
    akhf.use_amvl_attention(model)
    layout = latent_layout(inputs["attention_mask"])
    with torch.no_grad():
        with pytest.raises(TypeError, match="LatentLayout"):
            model(**inputs, latent_layout=layout.dense_mask())
        prefix = model(input_ids=inputs["input_ids"][:, :PREFIX], use_cache=True,
                       latent_layout=first_keys(layout, PREFIX))
        # With a cache the layout must cover the cached keys too, not just the new tokens.
        tail_only = LatentLayout.causal(2, LENGTH - PREFIX)
        with pytest.raises(ValueError, match="cover every key"):
            model(input_ids=inputs["input_ids"][:, PREFIX:], latent_layout=tail_only,
                  **{cache_name(model): output_cache(prefix)})


def test_set_backend_validates():
    with pytest.raises(ValueError, match="backend"):
        akhf.set_backend("cuda")
    assert akhf.get_backend() == "torch"


def test_prefix_keys_continue_a_call_like_the_kv_cache():
    """A tail call with ``with_prefix=`` over the keys recorded by the prefix call gives the
    logits of the same tail on transformers' KV cache; misuse is a clear error."""
    model, inputs = build("qwen2")
    akhf.use_amvl_attention(model)
    ids, length = inputs["input_ids"][1:], inputs["input_ids"].shape[1]
    full = LatentLayout.causal(1, length)
    prefix_layout = LatentLayout.causal(1, PREFIX)
    positions = torch.arange(length)[None]
    with torch.no_grad():
        cached = model(ids[:, :PREFIX], latent_layout=prefix_layout, use_cache=True)
        reference = model(ids[:, PREFIX:], position_ids=positions[:, PREFIX:],
                          latent_layout=full, **{_cache_kwarg(model): _cache_of(cached)})
        keys = akhf.PrefixKeys(PREFIX, needs_grad=False)
        model(ids, latent_layout=full, record_prefix=keys, use_cache=False)
        tail = model(ids[:, PREFIX:], position_ids=positions[:, PREFIX:], latent_layout=full,
                     with_prefix=keys, use_cache=False)
        torch.testing.assert_close(tail.logits, reference.logits)
        with pytest.raises(RuntimeError, match="no prefix keys recorded"):
            model(ids[:, PREFIX:], latent_layout=full, with_prefix=akhf.PrefixKeys(PREFIX),
                  use_cache=False)
        with pytest.raises(ValueError, match="needs latent_layout"):
            model(ids[:, PREFIX:], with_prefix=keys, use_cache=False)
        with pytest.raises(ValueError, match="fewer than the prefix"):
            model(ids[:, :PREFIX - 1], latent_layout=LatentLayout.causal(1, PREFIX - 1),
                  record_prefix=akhf.PrefixKeys(PREFIX, needs_grad=False), use_cache=False)
        with pytest.raises(ValueError, match=r"recorded for \(batch, heads\)"):
            doubled = LatentLayout.from_tensors(*(t.repeat(2, 1) for t in full.metadata()))
            model(ids[:, PREFIX:].repeat(2, 1), latent_layout=doubled, with_prefix=keys,
                  use_cache=False)
        # a second prefix into the same records kept the first one's keys, silently
        with pytest.raises(RuntimeError, match="already holds layer 0's keys of an earlier"):
            model(ids.flip(1), latent_layout=full, record_prefix=keys, use_cache=False)
        keys.clear()
        model(ids, latent_layout=full, record_prefix=keys, use_cache=False)
        again = model(ids[:, PREFIX:], position_ids=positions[:, PREFIX:], latent_layout=full,
                      with_prefix=keys, use_cache=False)
        torch.testing.assert_close(again.logits, reference.logits)
        with pytest.raises(RuntimeError, match=r"under torch.no_grad\(\) \(inference\) make "
                                               r"the PrefixKeys with needs_grad=False"):
            model(ids, latent_layout=full, record_prefix=akhf.PrefixKeys(PREFIX),
                  use_cache=False)
    with pytest.raises(ValueError, match="PrefixKeys length must be >= 1"):
        akhf.PrefixKeys(0)
    with pytest.raises(TypeError, match="PrefixKeys length must be an int"):
        akhf.PrefixKeys(True)
    with pytest.raises(TypeError, match="needs_grad must be a bool"):
        akhf.PrefixKeys(3, needs_grad="no")
    assert akhf.PrefixKeys(np.int64(3)).length == 3


def _cache_kwarg(model) -> str:
    """transformers 5.2x takes the cache as ``cache=``, earlier 5.x as ``past_key_values=``."""
    names = inspect.signature(model.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


def _cache_of(output):
    """The cache a call returned, under either of its names."""
    return next(output[k] for k in ("cache", "past_key_values") if k in output.keys())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_model_with_padding_runs_as_one_graph(backend):
    """torch.compile(fullgraph=True) over a model on the "amvl" attention with a padding mask:
    no host reads, weak references or enum comparisons in the traced code, and the eager
    logits."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    # the kernel itself on a GPU; the interpreter on the CPU
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    model = Qwen2ForCausalLM(config).eval().to(device)
    model.set_attn_implementation("amvl")
    ids = torch.randint(0, 97, (2, 12), device=device)
    mask = torch.ones(2, 12, dtype=torch.long, device=device)
    mask[0, :3] = 0
    previous = akhf.set_backend(backend)
    try:
        torch._dynamo.reset()
        compiled = torch.compile(lambda i, m: model(i, attention_mask=m, use_cache=False).logits,
                                 fullgraph=True, backend="aot_eager")
        real = mask.bool()
        torch.testing.assert_close(compiled(ids, mask)[real],
                                   model(ids, attention_mask=mask, use_cache=False).logits[real])
    finally:
        akhf.set_backend(previous)
