"""Saving and loading (amvl/saving.py): what is refused instead of loading wrong weights.

The round trips themselves are in tests/test_model.py (plain, VLM) and tests/test_trainer.py
(PEFT); here: given states, damaged or mismatched checkpoints, repeated saves, adapters.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from amvl.config import AMVLConfig
from amvl.model import AMVLModel
from amvl.tiny import tiny_qwen2, word_tokenizer
from tests.test_model import build

WORDS = [f"w{i}" for i in range(40)]


def _text_model(tied: bool = False, seed: int = 0, **config) -> AMVLModel:
    """A tiny Qwen2 AMVLModel in fp32 (tied: its LM head is its input embeddings)."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(WORDS)
    base = tiny_qwen2(tokenizer)
    if tied:
        base.config.tie_word_embeddings = True
        base.lm_head.weight = base.model.embed_tokens.weight
    return AMVLModel(base, tokenizer, AMVLConfig(num_slots=2, latent_dim=4, **{
        "kernel_backend": "torch", **config}))


def _batch(model: AMVLModel) -> dict:
    tokenizer = model.tokenizer
    prompts = tokenizer(["w1 w2 w3", "w4 w5"], return_tensors="pt", padding=True,
                        padding_side="left")
    answers = tokenizer(["w6 w7", "w8"], return_tensors="pt", padding=True,
                        padding_side="right")
    return dict(prompt_ids=prompts.input_ids, prompt_mask=prompts.attention_mask.bool(),
                answer_ids=answers.input_ids, answer_mask=answers.attention_mask.bool())


def _perturb(model: AMVLModel, scale: float = 0.1) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn_like(param))


def _loss(model: AMVLModel) -> float:
    with torch.no_grad():
        return float(model(**_batch(model), seed=1).loss)


def test_a_given_state_is_named_as_the_model_and_whole(tmp_path):
    """DDP's and torch.compile's prefixes are dropped (they saved an empty checkpoint); a
    state without some parameters is refused before anything is written (it saved a
    partial base, which then loaded with random weights in the gaps)."""
    model = _text_model()
    _perturb(model)
    state = model.state_dict()
    model.save_pretrained(tmp_path / "ddp", state_dict={f"module.{k}": v for k, v in state.items()})
    loaded = AMVLModel.from_pretrained(tmp_path / "ddp")
    assert _loss(loaded) == _loss(model)
    partial = {k: v for k, v in state.items() if "layers.1.mlp" not in k}
    with pytest.raises(ValueError, match=r"state_dict lacks 3 of the model's parameters "
                                         r"\(base.model.layers.1.mlp"):
        model.save_pretrained(tmp_path / "partial", state_dict=partial)
    assert not (tmp_path / "partial").exists()


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl"])
def test_a_checkpoint_missing_a_base_weight_is_refused(tmp_path, kind):
    """transformers' own loading (the fallback for the Qwen2-VL family's saved names) starts
    a weight its files lack at random: that is refused, not loaded."""
    model, _ = build(kind)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "base" / "model.safetensors"
    state = load_file(str(weights))
    (dropped,) = [k for k in state if k.endswith("layers.1.mlp.up_proj.weight")]
    del state[dropped]
    save_file(state, str(weights), metadata={"format": "pt"})
    other, _ = build(kind)
    with pytest.raises(ValueError, match="does not match this base model.*up_proj"):
        other.load_weights(tmp_path)
    with pytest.raises(ValueError, match="does not match this base model.*up_proj"):
        AMVLModel.from_pretrained(tmp_path, base_model=build(kind)[0].base)


def test_an_untied_checkpoint_is_refused_by_a_tied_model(tmp_path):
    """Both matrices would be copied into the one tensor, the last one winning: the trained
    input embeddings were silently replaced by the LM head."""
    untied = _text_model()
    _perturb(untied)
    untied.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tied in this model but two tensors in the checkpoint"):
        _text_model(tied=True, seed=3).load_weights(tmp_path)
    tied = _text_model(tied=True)  # a tied checkpoint into a tied model still loads
    _perturb(tied)
    tied.save_pretrained(tmp_path / "tied")
    again = _text_model(tied=True, seed=3)
    again.load_weights(tmp_path / "tied")
    assert _loss(again) == _loss(tied)


def test_saving_again_with_other_shards_leaves_only_the_new_weights(tmp_path):
    """An earlier save's single file beside a new index is what transformers' loading
    prefers, and an earlier index without its shards broke load_weights."""
    model = _text_model()
    model.save_pretrained(tmp_path)
    for shard_size in ("20KB", None):  # one file, then shards, then one file again
        _perturb(model, 1.0)
        if shard_size:
            model.base.save_pretrained = functools.partial(model.base.save_pretrained,
                                                           max_shard_size=shard_size)
        else:
            del model.base.save_pretrained
        model.save_pretrained(tmp_path)
        files = sorted(p.name for p in (tmp_path / "base").glob("model*"))
        assert ("model.safetensors" in files) == (shard_size is None), files
        assert _loss(AMVLModel.from_pretrained(tmp_path)) == _loss(model)
        in_place = _text_model(seed=5)
        in_place.load_weights(tmp_path)
        assert _loss(in_place) == _loss(model)


def test_saving_beside_weights_kept_elsewhere(tmp_path):
    """``base_weights=False`` (a Trainer's checkpoint under ZeRO-3 without gathering whole
    weights, DeepSpeed's own files holding them): everything but the base's weights, whose
    earlier files go; loading refuses it, naming the recovery, where DeepSpeed's files are;
    the recovered full state then saves and loads."""
    model = _text_model()
    _perturb(model)
    model.save_pretrained(tmp_path)  # an earlier save's weights: they must not load
    with pytest.raises(ValueError, match="pass no state_dict"):
        model.save_pretrained(tmp_path, state_dict=model.state_dict(), base_weights=False)
    _perturb(model)
    model.save_pretrained(tmp_path, base_weights=False)
    assert not list((tmp_path / "base").glob("*.safetensors"))
    assert {"config.json", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "base").iterdir()}
    heads = load_file(str(tmp_path / "amvl_heads.safetensors"))
    assert torch.equal(heads["prior_head.proj.weight"], model.prior_head.proj.weight)
    (tmp_path / "latest").write_text("global_step2")  # what DeepSpeed's checkpoint writes
    for load in (AMVLModel.from_pretrained, _text_model(seed=3).load_weights):
        with pytest.raises(ValueError, match=r"DeepSpeed's own checkpoint.*"
                                             r"get_fp32_state_dict_from_zero_checkpoint"):
            load(tmp_path)
    model.save_pretrained(tmp_path, state_dict=model.state_dict())  # as recovered
    assert _loss(AMVLModel.from_pretrained(tmp_path)) == _loss(model)


def test_settings_the_weights_do_not_depend_on_may_differ_and_a_cuda_backend_says_so(
        tmp_path):
    """kernel_backend, prefix_sharing and pair_weight_grads choose how the same model
    computes: load_weights takes a checkpoint that differs in them (resuming with another
    training path was refused). A model saved with the 'cuda' backend names the setting on
    a CPU machine."""
    _text_model(kernel_backend="cuda", prefix_sharing=False).save_pretrained(tmp_path)
    _text_model(kernel_backend="auto", pair_weight_grads=True).load_weights(tmp_path)
    with pytest.raises(ValueError, match="holds a model of another configuration.*beta"):
        _text_model(beta=0.5).load_weights(tmp_path)
    loaded = AMVLModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="kernel_backend is 'cuda'.*kernel_backend = 'auto'"):
        loaded(**_batch(loaded))
    loaded.config.kernel_backend = "auto"
    loaded(**_batch(loaded))


def test_load_arguments_that_would_be_ignored_are_refused(tmp_path):
    model = _text_model()
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"\['dtype'\] would go to transformers"):
        AMVLModel.from_pretrained(tmp_path, base_model=_text_model().base, dtype=torch.float64)
    loaded = AMVLModel.from_pretrained(tmp_path, dtype=torch.float64)  # the heads too
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    config_file = tmp_path / "base" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "architectures": ["RemoteCodeForCausalLM"]}))
    with pytest.raises(ValueError, match="no class RemoteCodeForCausalLM.*pass it as base_model"):
        AMVLModel.from_pretrained(tmp_path)


def _lora(model: AMVLModel, **settings) -> AMVLModel:
    from amvl.lora import add_adapters

    add_adapters(model, {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": None,
                         "train_latent_tokens": True, **settings})
    return model


@pytest.fixture
def adapter_checkpoint(tmp_path):
    """A LoRA model whose adapters and token rows moved, saved (base/ holds the adapter)."""
    pytest.importorskip("peft")
    model = _lora(_text_model())
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    model.eval().save_pretrained(tmp_path)
    return model, tmp_path


def test_an_adapter_loads_onto_the_plain_base(adapter_checkpoint):
    """The plain base (here one without spare embedding rows, where the old recipe,
    PeftModel.from_pretrained on it first, failed inside PEFT on the latent tokens' ids)
    gets the latent rows and the adapter; a PEFT model of the same settings gets the saved
    adapter's weights, not its own."""
    from peft import get_peft_model

    trained, folder = adapter_checkpoint
    torch.manual_seed(0)
    plain = tiny_qwen2(word_tokenizer(WORDS))
    assert plain.get_input_embeddings().weight.shape[0] < max(trained.token_ids.values()) + 1
    assert _loss(AMVLModel.from_pretrained(folder, base_model=plain)) == _loss(trained)
    fresh = _text_model()  # the trained model's base, a new adapter of the same settings
    fresh_peft = get_peft_model(fresh.base, trained.base.peft_config["default"])
    assert _loss(AMVLModel(fresh_peft, fresh.tokenizer, fresh.config)) != _loss(trained)
    loaded = AMVLModel.from_pretrained(folder, base_model=fresh_peft)
    assert _loss(loaded) == pytest.approx(_loss(trained), rel=1e-6)


@pytest.mark.parametrize("settings,match", [
    ({"alpha": 16}, r"lora_alpha \(saved 4, this model's 16\)"),
    ({"target_modules": ["q_proj", "v_proj"]}, "target_modules"),
    ({"r": 4}, "r \\(saved 2, this model's 4\\)")])
def test_an_adapter_of_other_settings_is_refused(adapter_checkpoint, settings, match):
    """Another scale (lora_alpha) changed the outputs, fewer targets dropped saved adapters,
    both silently; another rank raised PEFT's size mismatch."""
    _, folder = adapter_checkpoint
    with pytest.raises(ValueError, match=f"adapter of other settings.*{match}"):
        _lora(_text_model(), **settings).load_weights(folder)


def test_whole_models_and_adapters_do_not_load_into_each_other(adapter_checkpoint, tmp_path):
    _, folder = adapter_checkpoint
    with pytest.raises(ValueError, match="holds a PEFT adapter but this model's base is not"):
        _text_model().load_weights(folder)
    _text_model().save_pretrained(tmp_path / "whole")
    with pytest.raises(ValueError, match="holds a whole model, not a PEFT adapter"):
        _lora(_text_model()).load_weights(tmp_path / "whole")
