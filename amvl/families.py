"""What :class:`amvl.model.AMVLModel` needs of a Hugging Face model, and the per-family details
it must know.

AMVLModel calls the decoder and the LM head itself (to share the prefix, inject the latents and
project only the answer), so what a model's own ``forward`` does around them has to be
reproduced here: the logit transforms some families apply after the LM head, and the names
under which vision-language families keep their image markers. Models whose token mixers
cannot honour the latent masks are refused when AMVLModel is built, before anything is
changed on the model or its tokenizer.
"""

from __future__ import annotations

import inspect
import numbers
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
"""``layer_types`` entries that are softmax attention over the caller's mask (a sliding window
is checked per pass by AMVLModel)."""

# Token mixers that are not softmax attention (linear attention, state-space, convolution and
# recurrent blocks): they ignore custom masks and layouts, so padding and the segment mask
# leak, and they carry a state that a cropped KV cache cannot roll back.
_RECURRENT_MIXER = re.compile(
    r"Mamba|Mixer|DeltaNet|DeltaAttention|ShortConv|LinearAttention|Rglru|RecurrentBlock|Rwkv")

# (start, end) marker names: Qwen2-VL's family, then GLM-4.1V / GLM-4.5V's.
_VISION_MARKER_NAMES = (("vision_start_token_id", "vision_end_token_id"),
                        ("image_start_token_id", "image_end_token_id"))


def text_config(model: nn.Module) -> PreTrainedConfig:
    """The text model's config (the whole config for a text-only model)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_supported(model: nn.Module, backbone: nn.Module) -> None:
    """Raise ``NotImplementedError`` naming why AMVLModel cannot train ``model`` correctly.

    Args:
        model: the transformers model (under any PEFT wrapper).
        backbone: its decoder (``model.base_model``); for a VLM, vision tower + text model.
    """
    name = type(model).__name__
    if hasattr(model.config, "vision_config") and not hasattr(backbone, "get_rope_index"):
        raise NotImplementedError(
            f"AMVLModel takes vision-language models of the Qwen2-VL family, whose tail "
            f"positions come from the model's multimodal rope index; {name} has no "
            f"get_rope_index")
    text = text_config(model)
    others = sorted(set(getattr(text, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES)
    decoder = getattr(backbone, "language_model", backbone)
    mixers = sorted({type(m).__name__ for m in decoder.modules()
                     if _RECURRENT_MIXER.search(type(m).__name__)})
    if others or mixers:
        found = ", ".join(others + mixers)
        raise NotImplementedError(
            f"{name} has token mixers other than softmax attention ({found}). They ignore the "
            f"latent masks (padding and the prior slots' view of y would leak into their "
            f"state) and their state cannot be cropped back to the prompt, so AMVLModel "
            f"cannot train or decode them correctly")
    if not getattr(model, "_supports_attention_backend", True):
        # Falcon and Bloom: their attention builds ALiBi biases from a 2D mask itself, and
        # neither the "amvl" attention nor a 4D mask reaches it (a crash deep in transformers)
        raise NotImplementedError(
            f"{name}'s attention does not go through transformers' attention interface (its "
            f"own code, ALiBi biases in Falcon and Bloom): it takes neither the 'amvl' "
            f"attention nor the 4D masks of AMVLModel's sequences")


@dataclass(frozen=True)
class RouterBalance:
    """How an MoE model's own loss adds its routers' load-balancing loss: ``coef`` times
    ``loss_fn(router_logits, num_experts, top_k, attention_mask)``, the model's own function
    (transformers' MoE models each define ``load_balancing_loss_func``: Switch Transformer's
    loss over every layer's real tokens)."""

    coef: float
    num_experts: int
    top_k: int
    loss_fn: Callable[..., Tensor]


def router_balance(model: nn.Module) -> RouterBalance | None:
    """The model's load-balancing loss when its config asks for it
    (``output_router_logits=True``), else None. ``NotImplementedError`` when it asks but the
    model's module or config lacks what the loss needs."""
    text = text_config(model)
    if not (getattr(text, "output_router_logits", False)
            or getattr(model.config, "output_router_logits", False)):
        return None
    loss_fn = getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)
    if loss_fn is not None and list(inspect.signature(loss_fn).parameters)[:4] != \
            ["gate_logits", "num_experts", "top_k", "attention_mask"]:
        loss_fn = None  # another loss (Doge's takes num_keys): called this way, it would break
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
    top_k = getattr(text, "num_experts_per_tok", None)
    coef = getattr(text, "router_aux_loss_coef", None)
    if loss_fn is None or not experts or not top_k or coef is None:
        raise NotImplementedError(
            f"{type(model).__name__} is configured with output_router_logits=True, but "
            f"AMVLModel cannot reproduce its load-balancing loss (it looks for "
            f"load_balancing_loss_func in the model's module and num_experts, "
            f"num_experts_per_tok and router_aux_loss_coef in its config). Set "
            f"config.output_router_logits = False to train without it")
    return RouterBalance(float(coef), int(experts), int(top_k), loss_fn)


def transform_logits(logits: Tensor, text: PreTrainedConfig) -> Tensor:
    """What a model's own ``forward`` does to the LM head's output: Granite's and MiniCPM3's
    division by ``logits_scaling`` (HyperCLOVA X multiplies by it instead), Cohere's
    ``logit_scale``, Muse's ``output_multiplier`` and Gemma's ``final_logit_softcapping``.
    ``text`` is the text model's config."""
    scaling = getattr(text, "logits_scaling", None)
    if scaling is not None:
        multiplies = str(getattr(text, "model_type", "")).startswith("hyperclovax")
        logits = logits * scaling if multiplies else logits / scaling
    for name in ("logit_scale", "output_multiplier"):
        scale = getattr(text, name, None)
        if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
            logits = logits * scale
    cap = getattr(text, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def vision_markers(config: PreTrainedConfig) -> tuple[int, int]:
    """(start, end) ids of the markers around each image, under either family's names."""
    for start, end in _VISION_MARKER_NAMES:
        if getattr(config, start, None) is not None and getattr(config, end, None) is not None:
            return getattr(config, start), getattr(config, end)
    raise ValueError(f"{type(config).__name__} names no image start/end markers (looked for "
                     f"{', '.join(n for pair in _VISION_MARKER_NAMES for n in pair)})")


def structural_vision_ids(config: PreTrainedConfig) -> list[int]:
    """Ids that mark images and videos in a prompt: an answer never contains them."""
    names = ["image_token_id", "video_token_id",
             *(n for pair in _VISION_MARKER_NAMES for n in pair)]
    return [getattr(config, n) for n in names if getattr(config, n, None) is not None]
