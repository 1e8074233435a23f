"""Hugging Face drop-in: the ``"amvl"`` attention implementation for transformers 5.x models.

Importing this module registers ``"amvl"`` in transformers' ``AttentionInterface`` (the
attention function) and ``AttentionMaskInterface`` (the mask function; without it transformers
silently drops padding for a custom implementation)::

    import amvl_kernels.hf as akhf

    akhf.use_amvl_attention(model)            # Llama, Qwen2, Qwen2-VL, Qwen2.5-VL, ...
    out = model(input_ids, attention_mask=mask)                       # causal, padding honoured
    out = model(input_ids, attention_mask=mask, latent_layout=layout)  # the latent mask

Without ``latent_layout`` the attention is exact causal attention with padding honoured: the
mask function hands on the 2D padding mask (or None) instead of a dense 4D mask, and the
attention function turns it into a layout once per forward pass (all layers share it and its
tile maps): a masked token is hidden as a key, and its own query attends as SDPA's does. With
``latent_layout=`` the layout is authoritative: the padding mask is ignored, so the layout
must mark padding itself (a kind no query sees, as ``LatentLayout.causal(..., padding_mask)``
and the other builders do). With a KV cache the layout covers all Lk keys, cached ones
included, and the queries are its last Lq tokens: a static cache, whose queries are not, and
a sliding or chunked window smaller than the keys are refused with a layout.

:class:`PrefixKeys` shares a prefix's keys and values between calls without transformers' KV
cache (``record_prefix=`` in the call that computes them, ``with_prefix=`` in the calls that
continue after them), e.g. under activation checkpointing, which drops the cache.

What the kernel cannot express without a layout (packed sequences detected from
``position_ids``, custom mask overlays, a user-supplied 4D mask, a static cache whose queries are
not the last keys, non-causal modules) runs on transformers' own SDPA with the dense mask it
builds, with a warning. Dropout, active sliding windows, logit soft-capping, attention sinks and
any other set argument the attention function does not know (a relative position bias, sparse
indices: ``KNOWN_ARGUMENTS``) raise an error instead: the result would silently differ from the
model's. A sliding window that holds every key is plain causal attention and runs on the kernel;
a model whose attention is its own code (Falcon, Bloom) cannot switch to ``"amvl"``, and
:func:`use_amvl_attention` raises for it.

The backend defaults to ``"auto"`` (Triton on a GPU, PyTorch's SDPA with the layout's mask on
the CPU); change it with :func:`set_backend` or the ``AMVL_ATTENTION_BACKEND`` environment
variable.

Works on transformers 5.17 through 5.24 (only public interfaces are used). This module imports
transformers; ``import amvl_kernels`` alone does not.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, sdpa_mask

from amvl_kernels._validation import check_choice, check_count
from amvl_kernels.latent_attention import latent_attention
from amvl_kernels.layout import Kind, LatentLayout, kind_bits

NAME = "amvl"
HF_BACKENDS = ("auto", "triton", "torch")

_backend = check_choice("AMVL_ATTENTION_BACKEND", os.environ.get("AMVL_ATTENTION_BACKEND", "auto"),
                        HF_BACKENDS)


def set_backend(backend: str) -> str:
    """Select the backend of every ``"amvl"`` attention call; returns the previous one.

    ``"auto"`` (default): Triton on a GPU, a layout's long plain causal prefix on SDPA's
    causal kernel (see :func:`amvl_kernels.latent_attention`), ``"torch"`` on the CPU.
    ``"triton"``: the kernel for every row everywhere (on the CPU it needs
    ``TRITON_INTERPRET=1`` and is slow: for tests).
    ``"torch"``: PyTorch's SDPA with the layout's boolean mask.
    """
    global _backend
    previous, _backend = _backend, check_choice("backend", backend, HF_BACKENDS)
    return previous


def get_backend() -> str:
    """The backend ``"amvl"`` attention calls use now."""
    return _backend


# ----------------------------------------------------------------------------- per-forward cache


class _OneEntryCache:
    """Remembers the value built for the last source object (a mask tensor or a layout).

    Every layer of a forward pass receives the same mask object, so keying on its identity
    builds the layout (and its tile maps) once per pass. A weak reference, not the id: an id
    can be reused by a new tensor after the old one is freed, and a strong reference would
    keep the last pass's mask alive.
    """

    def __init__(self) -> None:
        self._source: weakref.ref | None = None
        self._key: tuple = ()
        self._value: LatentLayout | None = None

    def get(self, source: object, key: tuple, build: Callable[[], LatentLayout]) -> LatentLayout:
        if torch.compiler.is_compiling():  # Dynamo cannot trace weak references; a compiled
            return build()                 # graph builds its layout once per call anyway
        if self._source is not None and self._source() is source and self._key == key:
            return self._value
        value = build()
        self._source, self._key, self._value = weakref.ref(source), key, value
        return value


_padding_layouts = _OneEntryCache()
_moved_layouts = _OneEntryCache()


# ----------------------------------------------------------------------------- mask function

# How many callers have promised a latent_layout= on every "amvl" call (see
# layouts_replace_masks). A plain global, not a ContextVar: Dynamo traces globals.
_layout_promises = 0


@contextlib.contextmanager
def layouts_replace_masks() -> Iterator[None]:
    """Within: every ``"amvl"`` attention call passes ``latent_layout=``, so the mask function
    builds nothing.

    The layout replaces whatever mask transformers would hand on. Without this promise a call
    with ``attention_mask=None`` and position ids that restart (left padding, or the prefix
    pass's prior slots and answer, which both continue from the end of x) looks like packed
    sequences to transformers, and the mask function builds the dense (B, 1, Lq, Lk) mask
    that the layout then overrides: O(B L^2) memory and a host sync for nothing.
    """
    global _layout_promises
    _layout_promises += 1
    try:
        yield
    finally:
        _layout_promises -= 1


def amvl_attention_mask(batch_size: int, q_length: int, kv_length: int,
                        q_offset: int | Tensor = 0, kv_offset: int = 0,
                        mask_function: Callable = causal_mask_function,
                        attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
    """The ``AttentionMaskInterface`` entry: what the attention function receives as mask.

    Plain causal attention whose queries are the last keys (no cache, or a dynamic cache)
    gives None without padding, else the (B, kv_length) bool padding mask (True = real token).
    Anything else (packed sequences, overlays, sliding or chunked windows, a static cache)
    gives the dense 4D mask of transformers' ``sdpa_mask``: the attention function then runs
    SDPA on it, or raises if the module asks for something it cannot honour. Within
    :func:`layouts_replace_masks`: None.
    """
    if _layout_promises:
        return None
    if isinstance(q_offset, Tensor):  # static caches hand a tensor (one host sync per pass)
        q_offset = int(q_offset)
    queries_are_last = q_offset + q_length == kv_offset + kv_length
    window = kwargs.get("local_size")
    # A sliding window that holds every key is plain causal attention. transformers passes
    # it as local_size with its own window mask, and turns allow_is_causal_skip off when it
    # adds overlays or packing to that mask.
    plain_window = window is not None and kv_offset + kv_length <= window \
        and kwargs.get("allow_is_causal_skip", True)
    if (mask_function is not causal_mask_function and not plain_window) or not queries_are_last:
        kwargs["allow_is_causal_skip"] = False  # always materialise: None would mean "causal"
        mask = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                         q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                         attention_mask=attention_mask, **kwargs)
        # What a latent_layout= given to the call could not replace (it may replace packing
        # read from restarting positions and overlays): noted on the mask, which every layer
        # receives, for the attention function to refuse. Not under torch.compile, which
        # cannot trace attributes set on tensors.
        unreplaceable = None
        if not queries_are_last:
            unreplaceable = (f"its queries are not the last of its {kv_offset + kv_length} keys "
                             f"(they start at {q_offset}: a static cache?)")
        elif window is not None and not plain_window:
            unreplaceable = (f"the model's sliding or chunked window of {window} holds fewer "
                             f"than its {kv_offset + kv_length} keys")
        if unreplaceable is not None and isinstance(mask, Tensor) \
                and not torch.compiler.is_compiling():
            mask._amvl_unreplaceable = unreplaceable
        return mask
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    # The 2D mask may be shorter than the keys (transformers pads it with "padding" then).
    missing = kv_offset + kv_length - mask.shape[-1]
    if missing > 0:
        mask = torch.nn.functional.pad(mask, (0, missing), value=False)
    mask = mask[:, kv_offset:kv_offset + kv_length]
    if torch.compiler.is_compiling():  # no host read: an all-True mask is a valid layout too
        return mask
    return None if bool(mask.all()) else mask


# ----------------------------------------------------------------------------- attention function


class PrefixKeys:
    """Every layer's keys and values of the first ``length`` tokens of a call, kept for later
    calls that continue after those tokens: prefix sharing without transformers' KV cache,
    which activation checkpointing drops. Both calls run on the "amvl" attention::

        prefix = akhf.PrefixKeys(len_x)
        model(inputs_embeds=x_and_more, record_prefix=prefix, ...)  # layers record x's k, v
        model(inputs_embeds=tail, with_prefix=prefix, ...)          # the tail attends over them

    The records keep their autograd history, so the later calls' gradients reach the first
    call's layers. A checkpointed layer replayed in the backward keeps its first records, the
    ones the later calls used. A reentrant checkpoint runs the forward without autograd, which
    would silently cut those gradients: recording raises then, when ``needs_grad`` is set.
    """

    def __init__(self, length: int, needs_grad: bool = True) -> None:
        self.length = check_count("PrefixKeys length", length, least=1)
        if not isinstance(needs_grad, bool):
            raise TypeError(f"needs_grad must be a bool, got {type(needs_grad).__name__}")
        self.needs_grad = needs_grad
        self.layers: dict[int, tuple[Tensor, Tensor]] = {}

    @staticmethod
    def _layer(module: torch.nn.Module) -> int:
        index = getattr(module, "layer_idx", None)
        if index is None:
            raise ValueError(f"{type(module).__name__} has no layer_idx: prefix keys need one")
        return index

    def record(self, module: torch.nn.Module, key: Tensor, value: Tensor) -> None:
        """Keep ``module``'s keys and values (B, H, L, D) of the prefix's tokens (the first
        ``length``). A second record of one layer in a backward pass (a checkpointed layer's
        replay) keeps the first; anywhere else it is another prefix, refused: its later
        calls would attend over the first prefix's keys."""
        index = self._layer(module)
        if index in self.layers:
            if _in_backward():  # a checkpointed layer's replay: keep the first records
                return
            raise RuntimeError(f"this PrefixKeys already holds layer {index}'s keys of an "
                               "earlier prefix: make a new PrefixKeys for each prefix (or call "
                               ".clear() first)")
        if key.shape[2] < self.length:
            raise ValueError(f"the call has {key.shape[2]} keys, fewer than the prefix of "
                             f"{self.length} to record")
        if self.needs_grad and not torch.is_grad_enabled():
            raise RuntimeError("prefix keys recorded without autograd, which later calls could "
                               "not send gradients through: under torch.no_grad() (inference) "
                               "make the PrefixKeys with needs_grad=False; in training, a "
                               "reentrant activation checkpoint runs its forward so, use "
                               "use_reentrant=False")
        self.layers[index] = (key[:, :, :self.length], value[:, :, :self.length])

    def clear(self) -> None:
        """Forget every layer's records, to record another prefix."""
        self.layers.clear()

    def prepend(self, module: torch.nn.Module, key: Tensor, value: Tensor
                ) -> tuple[Tensor, Tensor]:
        """``module``'s recorded prefix keys and values in front of this call's."""
        index = self._layer(module)
        if index not in self.layers:
            raise RuntimeError(f"no prefix keys recorded for layer {index}: pass the same "
                               "PrefixKeys as record_prefix= to the prefix call first")
        prefix_key, prefix_value = self.layers[index]
        if prefix_key.shape[0] != key.shape[0] or prefix_key.shape[1] != key.shape[1]:
            raise ValueError(f"the prefix keys were recorded for (batch, heads) = "
                             f"{tuple(prefix_key.shape[:2])}, this call has "
                             f"{tuple(key.shape[:2])}")
        return torch.cat([prefix_key, key], 2), torch.cat([prefix_value, value], 2)


def _in_backward() -> bool:
    """Whether autograd is running a backward pass in this thread (where non-reentrant
    activation checkpointing replays its layers' forwards)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


# Keyword arguments that reach attention functions without changing what they compute (call
# plumbing, flash-attention's packing hints, whose packing the mask already carries, position
# and cache bookkeeping, output flags, multimodal metadata the layers pass along) or that the
# checks below read. Any other argument that is set is refused: transformers passes new
# attention features this way (relative position biases, attention sinks, sparse indices),
# and ignoring one would silently give other outputs than the model's.
KNOWN_ARGUMENTS = frozenset({
    "is_causal", "sliding_window", "softcap", "s_aux", "output_attentions",
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids",
    "cache_position", "use_cache", "past_key_values", "past_key_value", "position_embeddings",
    "output_hidden_states", "output_router_logits", "return_dict", "deterministic",
    "token_type_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "rope_deltas",
    "second_per_grid_ts", "num_items_in_batch",
    "latent_layout", "record_prefix", "with_prefix"})


def _check_arguments(module: torch.nn.Module, kwargs: dict) -> None:
    """Raise for set arguments the kernel does not implement (soft-capping, sinks) and for
    set ones it does not know; None and booleans (flags) pass."""
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(
            f"'amvl' attention has no logit soft-capping (softcap={kwargs['softcap']})")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("'amvl' attention has no attention sinks (s_aux)")
    unknown = sorted(name for name, value in kwargs.items()
                     if name not in KNOWN_ARGUMENTS and value is not None
                     and not isinstance(value, bool))
    if unknown:
        raise NotImplementedError(
            f"{type(module).__name__} passes {unknown} to its attention, which 'amvl' "
            "attention does not implement (they may change the attention: a relative position "
            "bias, sinks, sparse indices), so it refuses rather than ignores them: use "
            "another attention implementation for this model")


def _check_supported(module: torch.nn.Module, num_keys: int, dropout: float, kwargs: dict) -> None:
    """Raise for what the kernel would silently get wrong."""
    _check_arguments(module, kwargs)
    if dropout and dropout > 0 and getattr(module, "training", True):
        raise NotImplementedError(
            f"'amvl' attention has no dropout, but {type(module).__name__} asks for "
            f"dropout={dropout} in training mode: set the config's attention_dropout to 0.0")
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if window is None and kwargs.get("latent_layout") is not None:
        # A window the mask alone carries: without a layout the dense mask goes to SDPA, but
        # a layout would replace it (and within layouts_replace_masks no mask is built)
        window = _layer_window(module)
    if window is not None and num_keys > window:
        raise NotImplementedError(
            f"'amvl' attention has no sliding window or attention chunks, but "
            f"{type(module).__name__} asks for a window of {window} over {num_keys} keys: use "
            "another implementation (or disable sliding windows, e.g. "
            "use_sliding_window=False)")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("'amvl' attention never forms the attention weights "
                                  "(output_attentions=True): use attn_implementation='eager' "
                                  "for them")


def _layer_window(module: torch.nn.Module) -> int | None:
    """The window a layer's config gives it, for models whose attention modules do not carry
    it (PhiMoE's sliding, Llama-4's chunked attention put it in the mask alone): by its layer
    type, or without layer types the config's sliding window unless switched off; None for a
    full-attention layer."""
    config, index = getattr(module, "config", None), getattr(module, "layer_idx", None)
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return None if getattr(config, "use_sliding_window", True) is False \
            else getattr(config, "sliding_window", None)
    if not isinstance(index, int) or index >= len(layer_types):
        return None
    setting = {"sliding_attention": "sliding_window",
               "chunked_attention": "attention_chunk_size"}.get(layer_types[index])
    return getattr(config, setting, None) if setting else None


def _user_layout(layout: object, query: Tensor, key: Tensor) -> LatentLayout:
    if not isinstance(layout, LatentLayout):
        raise TypeError(f"latent_layout must be an amvl_kernels LatentLayout, got "
                        f"{type(layout).__name__}")
    batch, num_keys = key.shape[0], key.shape[2]
    if (layout.batch, layout.length) != (batch, num_keys):
        raise ValueError(
            f"latent_layout is for (batch, length) = {(layout.batch, layout.length)} but this "
            f"attention call has batch {batch} and {num_keys} keys ({query.shape[2]} queries): "
            "with a KV cache the layout must cover every key, cached ones included")
    if layout.device != query.device:  # move once per pass, not once per layer
        return _moved_layouts.get(layout, (query.device,), lambda: layout.to(query.device))
    return layout


def _padding_layout(attention_mask: Tensor) -> LatentLayout:
    """The layout of transformers' 2D attention mask, (B, Lk) True on real tokens: a masked
    token is hidden as a key, as padding is, but its own query still attends over the real
    keys before it, as SDPA and eager compute it (right padding, a token masked in mid-row).
    A query with no real key at or before it (left padding) returns zeros."""
    kind = torch.where(attention_mask.bool(), int(Kind.TEXT), int(Kind.PAD)).to(torch.int32)
    visible = torch.full_like(kind, kind_bits(Kind.TEXT))
    # In range by construction: no value checks, whose device reads would be host syncs at
    # every decoding step of a padded batch
    return LatentLayout.from_tensors(kind, visible, torch.zeros_like(kind), check_values=False,
                                     copy=False)


def _sdpa_fallback(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                   attention_mask: Tensor | None, scaling: float | None, why: str,
                   kwargs: dict, dropout: float = 0.0) -> tuple[Tensor, None]:
    warnings.warn(f"'amvl' attention: {why}; running transformers' SDPA with a dense mask "
                  "instead (pass latent_layout= to use the amvl kernel)", stacklevel=3)
    kwargs = {k: v for k, v in kwargs.items() if k != "latent_layout"}
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def amvl_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, scaling: float | None = None,
                           dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """The ``AttentionInterface`` entry.

    query: (B, Hq, Lq, D); key, value: (B, Hkv, Lk, D), grouped heads unexpanded, the queries
    the last Lq of the Lk keys. ``attention_mask`` is what :func:`amvl_attention_mask`
    returned. ``kwargs["latent_layout"]``, when the caller passed one to ``model(...)``, is a
    :class:`LatentLayout` over the Lk keys and overrides the mask. Returns ((B, Lq, Hq, D), None):
    no attention weights. ``record_prefix=`` / ``with_prefix=`` (a :class:`PrefixKeys`) record
    this call's first keys and values, or put recorded ones in front of this call's.
    """
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not is_causal:
        # A bidirectional module (a vision tower switched to "amvl" with the whole model):
        # the layout and the prefix keys passed to model(...) are the language model's.
        if attention_mask is not None and attention_mask.dim() == 2:
            raise ValueError(f"{type(module).__name__} is not causal but received a 2D "
                             "padding mask from the 'amvl' mask function")
        ours = ("latent_layout", "record_prefix", "with_prefix")
        kwargs = {k: v for k, v in kwargs.items() if k not in ours}
        _check_arguments(module, kwargs)  # SDPA would drop them as well
        # SDPA has dropout: the module's, as transformers passes it (0 in eval mode)
        return _sdpa_fallback(module, query, key, value, attention_mask, scaling,
                              f"{type(module).__name__} is not causal", kwargs, dropout)
    if kwargs.get("record_prefix") is not None:
        kwargs["record_prefix"].record(module, key, value)
    if kwargs.get("with_prefix") is not None:
        if kwargs.get("latent_layout") is None:
            raise ValueError("with_prefix= needs latent_layout= over the prefix and this call's "
                             "tokens")
        key, value = kwargs["with_prefix"].prepend(module, key, value)
    _check_supported(module, key.shape[2], dropout, kwargs)
    layout = kwargs.get("latent_layout")
    if layout is not None:
        unreplaceable = getattr(attention_mask, "_amvl_unreplaceable", None)
        if unreplaceable is not None:
            raise NotImplementedError(
                f"latent_layout= cannot stand for this call's mask: {unreplaceable}. The "
                "'amvl' kernel reads the queries as the last keys, with no window: use a "
                "DynamicCache (the default) and no window with a layout, or another "
                "attention implementation")
        layout = _user_layout(layout, query, key)
    else:
        if attention_mask is not None and attention_mask.dim() != 2:
            return _sdpa_fallback(module, query, key, value, attention_mask, scaling,
                                  "the mask is not plain causal with padding", kwargs)
        if _layout_promises:  # the mask function built nothing: a padding mask may be lost
            raise ValueError(f"{type(module).__name__} got no latent_layout= inside "
                             "layouts_replace_masks(), where every causal 'amvl' call must "
                             "pass one")
        if attention_mask is not None:
            batch, num_keys = key.shape[0], key.shape[2]
            if tuple(attention_mask.shape) != (batch, num_keys):
                raise ValueError(f"the padding mask has shape {tuple(attention_mask.shape)} but "
                                 f"the keys are (batch, length) = {(batch, num_keys)}")
            layout = _padding_layouts.get(attention_mask, (num_keys,),
                                          lambda: _padding_layout(attention_mask))
    out = latent_attention(query, key, value, layout=layout, scale=scaling, backend=_backend)
    return out.transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------- model helper


def use_amvl_attention(model: torch.nn.Module, vision_attention: str | None = "sdpa"
                       ) -> torch.nn.Module:
    """Switch ``model``'s language model to ``"amvl"`` attention; returns ``model``.

    Text-only models (Llama, Qwen2, ...) switch entirely. Multimodal models (Qwen2-VL,
    Qwen2.5-VL, LLaVA, ...) switch only the sub-model of ``config.get_text_config()``; every
    other sub-model (the vision tower) gets ``vision_attention`` ("sdpa" by default, None keeps
    its current implementation). The vision tower attends bidirectionally within each image,
    which the latent kernel is not for, and never sees ``latent_layout``.
    """
    config = model.config
    text_config = config.get_text_config()
    if text_config is config:
        model.set_attn_implementation(NAME)
        _check_switched(model, text_config)
        return model
    choice: dict[str, str] = {}
    for name in getattr(config, "sub_configs", {}):
        sub = getattr(config, name, None)
        if sub is None:
            continue
        if sub is text_config:
            choice[name] = NAME
        else:
            choice[name] = vision_attention or sub._attn_implementation
    if NAME not in choice.values():
        raise ValueError(f"cannot find the text sub-config of {type(config).__name__} among "
                         f"{list(getattr(config, 'sub_configs', {}))}")
    model.set_attn_implementation(choice)
    _check_switched(model, text_config)
    return model


def _check_switched(model: torch.nn.Module, text_config: object) -> None:
    """transformers leaves models whose attention is their own code (Falcon, Bloom) on their
    implementation with a log line: the "amvl" attention would never run, silently."""
    if getattr(text_config, "_attn_implementation", None) != NAME:
        raise ValueError(f"{type(model).__name__} kept its attention implementation "
                         f"({getattr(text_config, '_attn_implementation', None)!r}): its "
                         "attention does not go through transformers' AttentionInterface, so "
                         "'amvl' attention cannot run in it")


AttentionInterface.register(NAME, amvl_attention_forward)
AttentionMaskInterface.register(NAME, amvl_attention_mask)

__all__ = ["HF_BACKENDS", "NAME", "PrefixKeys", "amvl_attention_forward", "amvl_attention_mask",
           "get_backend", "layouts_replace_masks", "set_backend", "use_amvl_attention"]
