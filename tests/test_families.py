"""amvl.families: which Hugging Face models AMVLModel takes, and the per-family details it must
reproduce (logit transforms, vision marker names). Tiny random models built offline."""

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

from amvl.config import AMVLConfig
from amvl.data import AMVLCollator, VisionTokens
from amvl.model import AMVLModel
from amvl.tiny import VISION_WORDS, tiny_image_processor, word_tokenizer

WORDS = [f"w{i}" for i in range(40)]
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2)


def _transformers_class(name: str):
    cls = getattr(tf, name, None)
    if cls is None:
        pytest.skip(f"transformers {tf.__version__} has no {name}")
    return cls


def _batch(tokenizer):
    return AMVLCollator(tokenizer)([{"images": [], "question": "w1 w2 w3", "answer": "w4 w5"},
                                    {"images": [], "question": "w6", "answer": "w7"}])


def _own_loss(model, batch):
    """The transformers model's own loss on [x | y], labels on y."""
    ids = torch.cat([batch["prompt_ids"], batch["answer_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["answer_mask"]], 1)
    labels = torch.cat([torch.full_like(batch["prompt_ids"], -100),
                        batch["answer_ids"].masked_fill(~batch["answer_mask"], -100)], 1)
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    return model.base(input_ids=ids, attention_mask=mask, position_ids=positions,
                      labels=labels).loss


def _hybrid(kind: str, tokenizer):
    if kind == "qwen3_5":  # Gated-DeltaNet linear attention beside full attention
        config = _transformers_class("Qwen3_5TextConfig")(
            vocab_size=len(tokenizer), **SIZES, head_dim=8, linear_conv_kernel_dim=2,
            linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
            linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"])
        return _transformers_class("Qwen3_5ForCausalLM")(config)
    # Jamba: Mamba mixers beside attention, without layer_types
    config = _transformers_class("JambaConfig")(
        vocab_size=len(tokenizer), **SIZES, attn_layer_period=2, attn_layer_offset=1,
        expert_layer_period=2, num_experts=2, mamba_d_state=4, mamba_d_conv=2,
        mamba_expand=1, use_mamba_kernels=False)
    return _transformers_class("JambaForCausalLM")(config)


@pytest.mark.parametrize("kind", ["qwen3_5", "jamba"])
def test_models_with_recurrent_token_mixers_are_refused_untouched(kind):
    """Linear-attention and Mamba layers ignore the latent masks (left padding entered the
    recurrent state: a row's NLL changed with its padding) and the prefix-shared step's cache
    crop failed inside transformers. They are refused before the tokenizer or the embeddings
    change."""
    tokenizer = word_tokenizer(WORDS)
    base = _hybrid(kind, tokenizer)
    vocab, rows = len(tokenizer), base.get_input_embeddings().num_embeddings
    with pytest.raises(NotImplementedError, match="token mixers other than softmax attention"):
        AMVLModel(base, tokenizer, AMVLConfig(num_slots=2, latent_dim=4))
    assert len(tokenizer) == vocab and base.get_input_embeddings().num_embeddings == rows


@pytest.mark.parametrize("kind", ["falcon", "bloom"])
def test_models_whose_attention_is_their_own_code_are_refused(kind):
    """Falcon (ALiBi) and Bloom build their attention biases from a 2D mask themselves:
    AMVLModel accepted them and failed deep in transformers ("too many values to unpack"),
    and use_amvl_attention left them on their own attention without a word."""
    import amvl_kernels.hf as akhf

    tokenizer = word_tokenizer(WORDS)
    sizes = dict(vocab_size=len(tokenizer), hidden_size=32, num_attention_heads=4)
    if kind == "falcon":
        base = tf.FalconForCausalLM(tf.FalconConfig(num_hidden_layers=2, alibi=True, **sizes))
    else:
        base = tf.BloomForCausalLM(tf.BloomConfig(n_layer=2, n_head=4, **{
            k: v for k, v in sizes.items() if k != "num_attention_heads"}))
    vocab = len(tokenizer)
    with pytest.raises(NotImplementedError, match="does not go through transformers' attention"):
        AMVLModel(base, tokenizer, AMVLConfig(num_slots=2, latent_dim=4))
    assert len(tokenizer) == vocab  # refused before anything changed
    with pytest.raises(ValueError, match="kept its attention implementation"):
        akhf.use_amvl_attention(base)


def test_refused_vision_models_keep_their_tokenizer_and_embeddings():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration

    tokenizer = word_tokenizer(WORDS)
    text = LlamaConfig(vocab_size=len(tokenizer) + 1, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4, image_size=28, patch_size=14)
    base = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                     image_token_id=len(tokenizer)))
    vocab, rows = len(tokenizer), base.get_input_embeddings().num_embeddings
    with pytest.raises(NotImplementedError, match="get_rope_index"):
        AMVLModel(base, tokenizer, AMVLConfig(num_slots=2, latent_dim=4))
    assert len(tokenizer) == vocab and base.get_input_embeddings().num_embeddings == rows


def _moe(tokenizer, objective="amvl", **config_kwargs) -> AMVLModel:
    config = tf.Qwen3MoeConfig(vocab_size=len(tokenizer), **SIZES, head_dim=8, num_experts=4,
                               num_experts_per_tok=2, moe_intermediate_size=32, pad_token_id=0,
                               output_router_logits=True, router_aux_loss_coef=0.5)
    torch.manual_seed(0)
    base = tf.Qwen3MoeForCausalLM(config)
    if hasattr(base, "set_experts_implementation"):  # grouped_mm takes no float64
        base.set_experts_implementation("eager")
    return AMVLModel(base, tokenizer, AMVLConfig(num_slots=2, latent_dim=4, objective=objective,
                                                 kernel_backend="torch",
                                                 **config_kwargs)).double()


def test_router_load_balancing_loss_is_the_models_own():
    """With output_router_logits=True an MoE model's own loss adds its routers' balancing
    loss; AMVLModel dropped it silently (3.9349 against the model's 3.9757, the router's
    gradient a third of the model's). The "none" objective is now the model's own loss, and
    its gradients."""
    tokenizer = word_tokenizer(WORDS)
    model = _moe(tokenizer, objective="none")
    batch = _batch(tokenizer)
    ours = model(**batch)
    own = _own_loss(model, batch).double()
    torch.testing.assert_close(ours.loss, own, rtol=1e-6, atol=0)
    assert ours.metrics["router_aux"] > 0  # metrics are read as fp32
    assert ours.metrics["loss"] == pytest.approx(float(ours.loss.detach()), rel=1e-6)
    gate = model.base.model.layers[0].mlp.gate.weight
    want = torch.autograd.grad(own, gate)[0]
    torch.testing.assert_close(torch.autograd.grad(ours.loss, gate)[0], want,
                               rtol=1e-5, atol=1e-9)


def test_a_balancing_loss_of_another_signature_is_refused():
    """Doge's load_balancing_loss_func takes num_keys before top_k: called as Mixtral's, the
    first step crashed inside transformers. Such a model is refused when built."""
    tokenizer = word_tokenizer(WORDS)
    config = _transformers_class("DogeConfig")(
        vocab_size=len(tokenizer), **SIZES, pad_token_id=0, is_moe=True, num_experts=16,
        num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5)
    with pytest.raises(NotImplementedError, match="cannot reproduce its load-balancing loss"):
        AMVLModel(_transformers_class("DogeForCausalLM")(config), tokenizer,
                  AMVLConfig(num_slots=2, latent_dim=4))


@pytest.mark.parametrize("gamma", [0.0, 0.5])
@pytest.mark.parametrize("attention", ["sdpa", "amvl", "amvl_checkpointed"])
def test_router_balance_is_the_same_on_both_paths(attention, gamma):
    """Balanced over [x | latent block | y], the sequence the NLL decodes (x's router logits
    from the pass that encodes it): the prefix-shared and naive steps give the same loss and
    router gradients, with the prior-path NLL too, and on the checkpointed PrefixKeys path."""
    import amvl_kernels.hf as akhf

    tokenizer = word_tokenizer(WORDS)
    model = _moe(tokenizer, gamma=gamma)
    if attention != "sdpa":
        akhf.use_amvl_attention(model.base)
    if attention == "amvl_checkpointed":
        model.gradient_checkpointing_enable()
    batch = _batch(tokenizer)
    gates = [layer.mlp.gate.weight for layer in model.base.model.layers]
    results = []
    for share in (True, False):
        out = model(**batch, seed=4, prefix_sharing=share)
        results.append((out.loss, out.metrics["router_aux"],
                        torch.autograd.grad(out.loss, gates)))
    (shared, aux_shared, g_shared), (naive, aux_naive, g_naive) = results
    torch.testing.assert_close(shared, naive, rtol=1e-9, atol=0)
    assert aux_shared == pytest.approx(aux_naive, rel=1e-9) and aux_naive > 0
    for g, r in zip(g_shared, g_naive):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("scaling", [0.25, 4.0])
def test_hyperclovax_multiplies_its_logits(scaling):
    """HyperCLOVA X multiplies the LM head's output by logits_scaling where Granite divides:
    AMVLModel's logits were the model's times 1 / scaling**2."""
    tokenizer = word_tokenizer(WORDS)
    config = _transformers_class("HyperCLOVAXConfig")(
        vocab_size=len(tokenizer), **SIZES, pad_token_id=0, logits_scaling=scaling)
    torch.manual_seed(0)
    base = _transformers_class("HyperCLOVAXForCausalLM")(config)
    model = AMVLModel(base, tokenizer, AMVLConfig(num_slots=2, latent_dim=4,
                                                  objective="none")).double()
    batch = _batch(tokenizer)
    torch.testing.assert_close(model(**batch).loss, _own_loss(model, batch).double(),
                               rtol=1e-6, atol=0)


def _tiny_glm4v(tokenizer):
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in VISION_WORDS}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                pad_token_id=0, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [1, 1, 0], "partial_rotary_factor": 0.5})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                  patch_size=4, image_size=16, spatial_merge_size=2, temporal_patch_size=2)
    config = _transformers_class("Glm4vConfig")(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], image_start_token_id=ids["<|vision_start|>"],
        image_end_token_id=ids["<|vision_end|>"])
    return _transformers_class("Glm4vForConditionalGeneration")(config)


def test_glm4v_names_its_image_markers_its_own_way():
    """GLM-4.1V keeps its markers under image_start/end_token_id: the collator's
    VisionTokens, sampled generation with images and the answer's banned tokens read only
    Qwen's names (AttributeError; markers allowed in answers)."""
    tokenizer = word_tokenizer(WORDS, vision=True)
    torch.manual_seed(0)
    base = _tiny_glm4v(tokenizer)
    model = AMVLModel(base, tokenizer, AMVLConfig(num_slots=2, latent_dim=4)).double()
    markers = VisionTokens.from_model_config(base.config)
    assert (markers.start, markers.end) == (base.config.image_start_token_id,
                                            base.config.image_end_token_id)
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((24, 24, 3)) * 255).astype("uint8"))
    batch = AMVLCollator(tokenizer, tiny_image_processor(), markers)(
        [{"images": [image], "question": "w1 w2", "answer": "w3"},
         {"images": [image, image], "question": "w4", "answer": "w5 w6"}])
    batch["pixel_values"] = batch["pixel_values"].double()
    assert torch.isfinite(model(**batch, seed=1).loss)
    logits = model.next_token_logits(torch.zeros(1, 32, dtype=torch.float64))[0]
    assert torch.isinf(logits[[markers.start, markers.end, markers.image]]).all()
    model.eval()
    out = model.generate(batch["prompt_ids"], batch["prompt_mask"], batch["pixel_values"],
                         batch["image_grid_thw"], latent="sample", num_samples=2,
                         max_new_tokens=2, seed=0)
    assert out.sequences.shape == (2, 2, 2)
