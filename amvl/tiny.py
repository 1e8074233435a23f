"""Tiny models and a word-level tokenizer built offline from configs, for tests and the demo.

Nothing is downloaded: the tokenizer is a ``tokenizers`` WordLevel model over a given word
list, the models are randomly initialised from small configs of real architectures (Qwen2,
Llama, Qwen2-VL and Qwen2.5-VL), so every code path is the one a full-size checkpoint takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

if TYPE_CHECKING:  # the vision-language classes are imported when a model is built
    from transformers import (
        BaseImageProcessor,
        PreTrainedTokenizerBase,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
    )

SPECIAL_WORDS = ["<pad>", "<unk>", "<eos>"]
VISION_WORDS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def word_tokenizer(words: Iterable[str], vision: bool = False) -> PreTrainedTokenizerFast:
    """Whitespace-split word-level tokenizer over ``words`` (plus pad/unk/eos and, for VLMs,
    the Qwen2-VL vision marker tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for word in [*SPECIAL_WORDS, *(VISION_WORDS if vision else []), *words]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # the vision markers are added special tokens, as in Qwen2-VL's tokenizer: text that
    # writes them side by side ("<|vision_start|><|image_pad|>") splits into them
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                   unk_token="<unk>", eos_token="<eos>",
                                   additional_special_tokens=VISION_WORDS if vision else None)


def _text_config(vocab_size: int, hidden: int, layers: int, **extra) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=0,
                bos_token_id=None, eos_token_id=2, **extra)


def tiny_qwen2(tokenizer: PreTrainedTokenizerBase, hidden: int = 32,
               layers: int = 2) -> Qwen2ForCausalLM:
    """A Qwen2 causal LM of ``layers`` layers and width ``hidden`` for ``tokenizer``."""
    return Qwen2ForCausalLM(Qwen2Config(**_text_config(len(tokenizer), hidden, layers)))


def tiny_qwen2_vl(tokenizer: PreTrainedTokenizerBase, hidden: int = 32, layers: int = 2,
                  patch_size: int = 4, vision_dim: int = 16,
                  vision_depth: int = 1) -> Qwen2VLForConditionalGeneration:
    """A Qwen2-VL model (vision tower + text model) sized for 16-32 pixel images.

    ``tokenizer`` must come from :func:`word_tokenizer` with ``vision=True``.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in VISION_WORDS}
    head_dim = hidden // 4
    section = [head_dim // 4, head_dim // 8, head_dim // 8]  # t, h, w halves of the rotary dims
    config = Qwen2VLConfig(
        text_config=_text_config(len(tokenizer), hidden, layers,
                                 rope_scaling={"type": "mrope", "mrope_section": section}),
        vision_config=dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden,
                           num_heads=2, mlp_ratio=2,
                           patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2,
                           in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return Qwen2VLForConditionalGeneration(config)


def tiny_qwen2_5_vl(tokenizer: PreTrainedTokenizerBase, hidden: int = 32, layers: int = 2,
                    patch_size: int = 4, vision_dim: int = 16,
                    vision_depth: int = 2) -> Qwen2_5_VLForConditionalGeneration:
    """A Qwen2.5-VL model (windowed vision tower + text model) sized like
    :func:`tiny_qwen2_vl`; its last vision block attends over the whole image, the others
    within windows of 2x2 merged patches."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in VISION_WORDS}
    head_dim = hidden // 4
    section = [head_dim // 4, head_dim // 8, head_dim // 8]
    config = Qwen2_5_VLConfig(
        text_config=_text_config(len(tokenizer), hidden, layers,
                                 rope_scaling={"type": "mrope", "mrope_section": section}),
        vision_config=dict(depth=vision_depth, hidden_size=vision_dim,
                           intermediate_size=2 * vision_dim, num_heads=2,
                           out_hidden_size=hidden, patch_size=patch_size, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3,
                           window_size=2 * 2 * patch_size,
                           fullatt_block_indexes=[vision_depth - 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return Qwen2_5_VLForConditionalGeneration(config)


def tiny_image_processor(patch_size: int = 4) -> BaseImageProcessor:
    """Qwen2-VL image processor (pillow backend) for small images."""
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                 min_pixels=16 * 16, max_pixels=32 * 32)
