"""``AMVLModel``: AMVL training and inference on a Hugging Face decoder (LM or Qwen2-VL family).

Training step (DESIGN.md section 3), prefix-shared path:
  1. ``[x | P_1..P_K | y | Q_1..Q_K]`` in one call with the segment mask; the prior head reads
     the hidden states of P, the posterior head those of Q. P and y both continue x's positions
     as if the other were absent, Q continues after y.
  2. The cache of x (cropped), then ``[<lat_start> z <lat_end> | y]`` with z drawn by the
     objective: the NLL of y.
Naive path: separate full sequences ``[x | P]``, ``[x | y | Q]``, ``[x | latent | y]``. Both
paths build their masks from the same per-token metadata (:mod:`amvl.sequences`) and give the
same loss and gradients. On the "amvl" attention (``amvl_kernels.hf.use_amvl_attention``) the
sequences reach the model as a ``LatentLayout`` and no mask is materialised; on any other
implementation that accepts custom masks (eager, sdpa) as dense 4D additive masks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amvl_kernels.hf import PrefixKeys
from amvl_kernels.layout import LatentLayout

from amvl.config import AMVLConfig
from amvl.families import check_supported, router_balance, structural_vision_ids, \
    text_config, transform_logits
from amvl.heads import GaussianHead, LatentInjector, SlotEmbeddings
from amvl.lora import stored_layer
from amvl.objectives import Latents, Metrics, build_objective
from amvl.saving import SavingMixin
from amvl.sharded import all_processes, gathered_for_update, several_processes, \
    sharded_across_processes, with_gathered_root
from amvl.sequences import (
    LATENT_BLOCK,
    POSTERIOR_BLOCK,
    PRIOR_BLOCK,
    Part,
    Segment,
    Sequence,
    assemble,
    concat,
    dense_mask,
    repeat_rows,
    slots,
)
from amvl.weight_grads import PairedWeightGrads


if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_Fn = TypeVar("_Fn", bound=Callable)


# forward's default step: 0, but a KL schedule needs the step given (see AMVLModel.forward)
_STEP_NOT_GIVEN = object()


def _cache_kwarg(backbone: nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); accept both."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters \
        else "past_key_values"


try:
    from torch.distributed._composable.contract import _get_registry
except ImportError:  # torch built without distributed
    _get_registry = None


def _composable_apis(module: nn.Module) -> tuple[str, ...]:
    """Names of the torch.distributed composable APIs applied to ``module`` (``checkpoint``,
    ``fully_shard``, ...)."""
    return tuple(_get_registry(module) or ()) if _get_registry is not None else ()


def _checkpointed(module: nn.Module) -> bool:
    """Whether ``module`` is checkpointed by transformers (its flag), torch's
    ``checkpoint_wrapper`` or the composable ``checkpoint``. Read from the module's own
    dictionaries: every training step asks this of every module, and ``getattr`` of a name a
    module lacks raises inside nn.Module (a few microseconds, 3 ms a step on a 24-layer model
    on our CPUs)."""
    flag = module.__dict__.get("gradient_checkpointing",
                               getattr(type(module), "gradient_checkpointing", False))
    return (flag is True
            or "_checkpoint_wrapped_module" in module._modules
            or "checkpoint" in _composable_apis(module))


def _scope(name: str):
    """A named range in torch.profiler's traces (scripts/profile_model_step.py --gaps charges
    device idle time to them); nothing under torch.compile, which would log that it ignores
    it."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.profiler.record_function(name)


@dataclass
class AMVLOutput:
    """A training forward's result: the scalar loss, its metrics (read lazily, in one
    transfer) and the latents drawn (None for the "none" objective)."""

    loss: Tensor
    metrics: Metrics = field(default_factory=lambda: Metrics({}))
    latents: Latents | None = None


def in_eval_mode(fn: _Fn) -> _Fn:
    """Decorator for ``fn(model, ...)``: runs it with ``model.eval()`` and leaves every
    submodule's train/eval flag as it found it, so that a diagnostic called from inside a
    training loop does not switch dropout and activation checkpointing off for the steps
    after it."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        modes = [(module, module.training) for module in model.modules()] \
            if isinstance(model, nn.Module) else []  # a stand-in model keeps its own state
        model.eval()
        try:
            return fn(model, *args, **kwargs)
        finally:
            for module, training in modes:
                module.training = training
    return wrapper


def _embedding_rows(layer: nn.Module) -> int:
    """The rows of an embedding layer: its ``num_embeddings`` (that of the layer a PEFT
    wrapper holds), not its weight's shape, which DeepSpeed ZeRO-3 partitions down to (0,)."""
    plain = stored_layer(layer)
    rows = getattr(plain, "num_embeddings", None)
    return rows if isinstance(rows, int) else plain.weight.shape[0]


def ensure_special_tokens(base_model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                          config: AMVLConfig) -> dict[str, int]:
    """Add the latent special tokens the tokenizer lacks and return their ids by role. Ids
    always come from the tokenizer.

    New tokens get embedding rows at the mean of the existing tokens' rows (input and, when
    untied, output embeddings), the way transformers' resize initialises them. The matrices
    grow only when an id has no row: checkpoints whose matrices are padded past their
    vocabulary (Qwen2 and Qwen2.5-VL: 151,936 rows for about 151,665 tokens) keep their size,
    so nothing is cut off and adapters trained on the unmodified model still fit. A tokenizer
    that already holds the tokens (a saved one) with a base that lacks their rows is resized
    the same way."""
    vocab_before = len(tokenizer)
    missing = [t for t in config.special_tokens() if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                     replace_extra_special_tokens=False)
    roles = ("latent_start", "latent_end", "latent", "prior_query", "posterior_query")
    ids = {role: tokenizer.convert_tokens_to_ids(tok)
           for role, tok in zip(roles, config.special_tokens())}
    embeddings, output = base_model.get_input_embeddings(), base_model.get_output_embeddings()
    rows = _embedding_rows(embeddings)
    others = vocab_before - (len(config.special_tokens()) - len(missing))
    if others > rows:  # rows for the latent tokens alone are added below without a word
        warnings.warn(f"the tokenizer holds {others} tokens besides the latent ones but the "
                      f"model's embeddings only {rows} rows: resizing them to fit. Tokens "
                      "added to the tokenizer get new rows; a tokenizer of another model would "
                      "read wrong ones", stacklevel=3)
    if max(ids.values()) >= rows:
        wrapped = [f"{name} ({type(module).__name__})" for name, module, plain in
                   (("input embeddings", embeddings, nn.Embedding), ("LM head", output, nn.Linear))
                   if module is not None and not isinstance(module, plain)]
        if wrapped:  # transformers resizes plain layers only
            raise ValueError(
                f"the latent special tokens need embedding rows up to id {max(ids.values())}, "
                f"the model has {rows}, and it cannot grow them: its {' and '.join(wrapped)} "
                "are wrapped (e.g. by PEFT's LoRA on embed_tokens, or modules_to_save), which "
                "transformers cannot resize. Build the AMVLModel on the unwrapped base first "
                "(it adds the rows), then wrap it: "
                "model.base = get_peft_model(model.base, lora_config)")
        base_model.resize_token_embeddings(max(len(tokenizer), max(ids.values()) + 1))
    elif missing:
        new = torch.tensor([tokenizer.convert_tokens_to_ids(t) for t in missing])
        matrices = {stored_layer(embeddings).weight}
        if output is not None:
            matrices.add(stored_layer(output).weight)  # the same tensor when tied: once
        with torch.no_grad(), gathered_for_update(list(matrices)):
            for weight in matrices:
                weight[new.to(weight.device)] = weight[:vocab_before].mean(0)
    return ids


def check_batch(prompt_ids: Tensor, prompt_mask: Tensor, answer_ids: Tensor | None = None,
                answer_mask: Tensor | None = None, padding: bool = True,
                vocab_size: int | None = None) -> None:
    """Raise a ValueError naming what is wrong with a batch, instead of a loss computed from
    the wrong columns: prompts must be left-padded and answers right-padded (the tails start
    in one column for every row, and each answer token is predicted from the column before
    it), each row with at least one real token; masks bool (or 0/1 integers), all on one
    device; token ids int64, in [0, ``vocab_size``).

    The value checks (``padding``) read the device: one host synchronisation on a GPU."""
    pairs = [("prompt", prompt_ids, prompt_mask)]
    if answer_ids is not None or answer_mask is not None:
        if answer_ids is None or answer_mask is None:
            raise ValueError("answer_ids and answer_mask come together")
        pairs.append(("answer", answer_ids, answer_mask))
    for name, ids, mask in pairs:
        for what, t in ((f"{name}_ids", ids), (f"{name}_mask", mask)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
            if t.device != prompt_ids.device:
                raise ValueError(f"{what} is on {t.device} but prompt_ids on {prompt_ids.device}")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise ValueError(f"{name}_mask must be bool (or 0/1 integers) marking real tokens, "
                             f"got {mask.dtype}")
        if ids.dim() != 2 or ids.shape != mask.shape:
            raise ValueError(f"{name}_ids {tuple(ids.shape)} and {name}_mask "
                             f"{tuple(mask.shape)} must be the same (batch, length) shape")
        if ids.dtype != torch.long:  # int32 ids failed deep in cross_entropy or the rope index
            raise ValueError(f"{name}_ids must hold token ids as torch.long (int64), got "
                             f"{ids.dtype}" + (": convert them with .long()" if not (
                                 ids.dtype.is_floating_point or ids.dtype == torch.bool
                                 or ids.dtype.is_complex) else ""))
        if ids.shape[0] != prompt_ids.shape[0]:
            raise ValueError(f"{name}_ids has {ids.shape[0]} rows, prompt_ids "
                             f"{prompt_ids.shape[0]}")
        if ids.shape[1] == 0:
            raise ValueError(f"{name}_ids has no columns: every row needs a real {name} token")
    if prompt_ids.shape[0] == 0:
        raise ValueError("the batch is empty")
    if not padding or torch.compiler.is_compiling():
        return  # a host read would break the graph; the checks ran in eager calls
    prompt = prompt_mask.bool()
    flags = [prompt[:, -1].all(), (prompt[:, 1:] >= prompt[:, :-1]).all()]
    if answer_mask is not None:
        answer = answer_mask.bool()
        flags += [answer[:, 0].all(), (answer[:, 1:] <= answer[:, :-1]).all()]
    # read in the same transfer as the padding flags: no second host synchronisation
    extra = [(mask == mask.bool()).all() for _, _, mask in pairs]
    if vocab_size is not None:
        extra += [((ids >= 0) & (ids < vocab_size)).all() for _, ids, _ in pairs]
    ok = torch.stack(flags + extra).tolist()
    ok, masks_ok, ids_ok = ok[:len(flags)], ok[len(flags):][:len(pairs)], \
        ok[len(flags) + len(pairs):]
    for (name, _, _), good in zip(pairs, masks_ok):
        if not good:
            raise ValueError(f"{name}_mask must hold 0/1 (or bools) marking real tokens")
    for (name, _, _), good in zip(pairs, ids_ok):
        if not good:
            raise ValueError(f"{name}_ids must be token ids in [0, {vocab_size}), the "
                             f"embedding's rows; pad with a real id (e.g. the pad token) and "
                             f"mark padding in {name}_mask, not with -100")
    if not all(ok[:2]):
        raise ValueError("prompts must be left-padded (prompt_mask False only before a row's "
                         "tokens) with at least one real token a row, as AMVLCollator builds "
                         "them")
    if not all(ok[2:]):
        raise ValueError("answers must be right-padded (answer_mask False only after a row's "
                         "tokens) with at least one real token a row, as AMVLCollator builds "
                         "them")


class AMVLModel(SavingMixin, nn.Module):
    """A Hugging Face causal LM or Qwen2-VL-family model with an AMVL latent block.

    Args:
        base_model: ``*ForCausalLM`` or ``Qwen2VLForConditionalGeneration`` /
            ``Qwen2_5_VLForConditionalGeneration`` (also wrapped by PEFT).
        tokenizer: its tokenizer; the latent special tokens are added when missing.
        config: :class:`AMVLConfig`.
    """

    def __init__(self, base_model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 config: AMVLConfig) -> None:
        super().__init__()
        self.base = base_model
        # The decoder layer classes, which FSDP's transformer-based wrapping (the Trainer's
        # and accelerate's default) shards and checkpoints one by one; without them the whole
        # model would be one unit, unsharded at once on every rank.
        self._no_split_modules = list(getattr(self._unwrapped(), "_no_split_modules", None)
                                      or [])
        self.tokenizer = tokenizer
        self.config = config
        self.objective = build_objective(config)
        # before anything changes: a refused model keeps its tokenizer and embeddings
        check_supported(self._unwrapped(), self._backbone())
        self._check_attention()
        self._router_balance = router_balance(self._unwrapped())
        self.token_ids = ensure_special_tokens(self._unwrapped(), tokenizer, config)
        model_config = self._unwrapped().config
        self.is_vlm = hasattr(model_config, "vision_config")
        hidden = getattr(model_config, "text_config", model_config).hidden_size
        device = self.device
        d, lo, hi = config.latent_dim, config.logvar_min, config.logvar_max
        init = config.logvar_init
        # Only what the objective trains exists, so DDP never meets parameters without
        # gradient (the "none" objective is the plain base model).
        uses_latents = self.objective.latent_source != "none"
        self.prior_head = GaussianHead(hidden, d, lo, hi, init).to(device) \
            if uses_latents else None
        self.posterior_head = GaussianHead(hidden, d, lo, hi, init).to(device) \
            if self.objective.uses_posterior else None
        self.injector = LatentInjector(d, hidden).to(device) if uses_latents else None
        self.slot_embeddings = SlotEmbeddings(config.num_slots, hidden,
                                              self._token_embedding_std()).to(device) \
            if uses_latents and config.slot_embeddings else None
        self._padding_checked = False  # on a GPU: once (see _check_batch)
        self._compiled_base_warned = False
        config.fix_structure()
        # One mode for the whole model, the base's: a model from transformers' from_pretrained
        # comes in eval mode, and new heads alone in training mode would say training while
        # the decoder ran without dropout. Training loops call .train(), as they must anyway.
        self.train(base_model.training)

    # ------------------------------------------------------------------ plumbing

    def _unwrapped(self) -> nn.Module:
        """The transformers model under any PEFT wrapper."""
        return self.base.get_base_model() if hasattr(self.base, "get_base_model") else self.base

    def get_input_embeddings(self) -> nn.Module:
        """The base model's input embeddings (what tools that hook them expect of a Hugging
        Face model, e.g. the Trainer's NEFTune, whose noise then reaches every pass)."""
        return self._unwrapped().get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        """The base model's LM head."""
        return self._unwrapped().get_output_embeddings()

    def _backbone(self) -> nn.Module:
        """The decoder under the LM head: ``.model`` for most, ``.gpt_neox`` for GPT-NeoX
        (transformers' ``base_model_prefix``)."""
        return self._unwrapped().base_model

    def _text_config(self):
        return text_config(self._unwrapped())

    def _token_embedding_std(self) -> float:
        """The spread of the input embeddings' entries, from about 4,096 of their rows (the
        scale the slot embeddings start at: a pretrained table's is not the config's
        ``initializer_range``, SmolLM2-135M's 0.136 against 0.02); the config's
        ``initializer_range`` (0.02 without one) where the table cannot be read here: on
        the meta device, or a process's empty ZeRO-3 partition."""
        weight = stored_layer(self.get_input_embeddings()).weight
        if weight.is_meta or weight.dim() != 2 or weight.shape[0] < 2:
            return float(getattr(self._text_config(), "initializer_range", None) or 0.02)
        with torch.no_grad():
            rows = weight[::max(1, weight.shape[0] // 4096)]
            return float(rows.float().std())

    def _sliding_window(self) -> int | None:
        """The text model's attention window when any layer has one, else None."""
        text = self._text_config()
        window = getattr(text, "sliding_window", None)
        types = getattr(text, "layer_types", None)
        if not window or (types is not None and "sliding_attention" not in types):
            return None
        return int(window)

    def _check_window(self, num_keys: int) -> None:
        """Refuse a pass longer than a sliding window: the latent masks (dense or layouts)
        cannot express one, and transformers applies a caller's 4D mask as it is, so the
        window would silently be ignored. Within the window the result is exact."""
        window = self._sliding_window()
        if window is not None and num_keys > window:
            raise NotImplementedError(
                f"{type(self._unwrapped()).__name__} attends within a sliding window of "
                f"{window} tokens, and this pass has {num_keys}: AMVLModel's latent masks have "
                "no window (and a sliding-window cache cannot be cropped back past it). Keep "
                "each pass within the window: prompt + latent block + answer, and with prefix "
                "sharing prompt + answer + both sides' query slots (2 K) for the step's first "
                "pass (prefix_sharing=False needs only the former), or disable the window in "
                "the config (e.g. sliding_window=None or use_sliding_window=False)")

    def output_logits(self, hidden: Tensor) -> Tensor:
        """Logits of the LM head on ``hidden``, at least fp32 (an fp64 model's stay fp64),
        with the transforms some models apply after it in their own forward
        (:func:`amvl.families.transform_logits`: Granite's ``logits_scaling``, Cohere's
        ``logit_scale``, Gemma's ``final_logit_softcapping``, ...)."""
        logits = self.get_output_embeddings()(hidden)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return transform_logits(logits, self._text_config())

    @property
    def device(self) -> torch.device:
        """Where the input embeddings live: where batches go."""
        return stored_layer(self.get_input_embeddings()).weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The input embeddings' dtype: what images' pixel values are cast to."""
        return stored_layer(self.get_input_embeddings()).weight.dtype

    def _own_modules(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name)
                for name in ("prior_head", "posterior_head", "injector", "slot_embeddings")
                if getattr(self, name) is not None}

    def _on_amvl_attention(self) -> bool:
        """True when the text model runs on the "amvl" attention (``amvl_kernels.hf``): the
        sequences then travel as a ``LatentLayout`` instead of dense 4D masks."""
        return getattr(self._text_config(), "_attn_implementation", None) == "amvl"

    def _check_batch(self, prompt_ids: Tensor, prompt_mask: Tensor,
                     answer_ids: Tensor | None = None, answer_mask: Tensor | None = None,
                     pixel_values: Tensor | None = None, image_grid_thw: Tensor | None = None
                     ) -> None:
        """:func:`check_batch`, its padding checks on every batch on the CPU and on the first
        one on a GPU: a training step then never waits for the device to read its masks
        (a collator pads every batch alike; :class:`AMVLCollator` pads them right)."""
        if "_orig_mod" in self.base._modules and not self._compiled_base_warned:
            warnings.warn(
                "the base model is wrapped by torch.compile, but AMVLModel calls its decoder and "
                "LM head directly, so the compiled forward never runs: compile the AMVLModel "
                "(torch.compile(model) or model.compile()) or the decoder (e.g. "
                "model.base.model = torch.compile(model.base.model)) instead", stacklevel=3)
            self._compiled_base_warned = True
        self._check_attention()
        on_host = prompt_mask.device.type == "cpu"
        if self.config.kernel_backend == "cuda" and on_host:
            # a saved model keeps the backend it trained with, a GPU's, also on a CPU machine
            raise ValueError("AMVLConfig.kernel_backend is 'cuda', which needs the model and "
                             "its batches on a CUDA device, and they are on the CPU: set "
                             "model.config.kernel_backend = 'auto' (or 'torch')")
        vocab = _embedding_rows(self.get_input_embeddings())
        check_batch(prompt_ids, prompt_mask, answer_ids, answer_mask,
                    padding=on_host or not self._padding_checked, vocab_size=vocab)
        self._padding_checked = self._padding_checked or not on_host
        if self.is_vlm:
            self._check_images(prompt_ids, pixel_values, image_grid_thw)

    def _check_attention(self) -> None:
        """Refuse a text model on an attention that ignores the masks the latent sequences
        need (flash-attention's kernels take a causal mask and a 2D padding mask, nothing
        else): the latent block would not be bidirectional, and in a prefix-shared step the
        prior's query slots would see the answer. Its vision tower may use any."""
        implementation = str(getattr(self._text_config(), "_attn_implementation", None))
        if "flash" in implementation.lower():
            raise ValueError(
                f"the text model's attention is {implementation!r}, which ignores the masks "
                "AMVL's sequences need (the latent block attends both ways, and the prior's "
                "slots must not see the answer): load it with attn_implementation='sdpa' "
                "(or 'eager'), or put it on the 'amvl' attention "
                "(amvl_kernels.hf.use_amvl_attention(model.base): flash-attention speed with "
                "the masks)")

    def _check_images(self, prompt_ids: Tensor, pixel_values: Tensor | None,
                      image_grid_thw: Tensor | None) -> None:
        """A VLM's images against its prompts: the vision code would otherwise fail deep in
        transformers (a bare StopIteration) or misplace features. The count reads the device,
        as transformers' rope index does on every VLM batch anyway."""
        if (pixel_values is None) != (image_grid_thw is None):
            given, missing = ("pixel_values", "image_grid_thw") if image_grid_thw is None \
                else ("image_grid_thw", "pixel_values")
            raise ValueError(f"{given} given without {missing}: the image processor returns "
                             "both, and the model needs both")
        config = self._unwrapped().config
        merge = getattr(getattr(config, "vision_config", None), "spatial_merge_size", None)
        image_token = getattr(config, "image_token_id", None)
        if merge is None or image_token is None or torch.compiler.is_compiling():
            return
        if image_grid_thw is not None and (image_grid_thw.dim() != 2
                                           or image_grid_thw.shape[-1] != 3):
            raise ValueError(f"image_grid_thw must be (images, 3), got "
                             f"{tuple(image_grid_thw.shape)}")
        tokens = (prompt_ids == image_token).sum()
        grid = image_grid_thw.prod(-1).sum() // merge**2 if image_grid_thw is not None \
            else torch.zeros_like(tokens)
        tokens, grid = torch.stack([tokens, grid.to(tokens)]).tolist()  # one host read
        if tokens != grid:
            rows = 0 if image_grid_thw is None else image_grid_thw.shape[0]
            raise ValueError(f"the prompts hold {tokens} image tokens, but image_grid_thw's "
                             f"{rows} row(s) give {grid} (an image's t * h * w / "
                             f"{merge}**2): prompts and images must come from one collator "
                             "or processor call")

    def _rope_positions(self, prompt_ids: Tensor, prompt_mask: Tensor,
                        image_grid_thw: Tensor | None) -> Tensor | None:
        """(3, B, Lx) multimodal rope positions of the prompt from the model's own rope index."""
        if not self.is_vlm:
            return None
        backbone = self._backbone()
        kwargs = {"image_grid_thw": image_grid_thw, "attention_mask": prompt_mask}
        if "mm_token_type_ids" in inspect.signature(backbone.get_rope_index).parameters:
            image_token = self._unwrapped().config.image_token_id
            kwargs["mm_token_type_ids"] = (prompt_ids == image_token).int()
        positions, _ = backbone.get_rope_index(prompt_ids, **kwargs)
        return positions

    def _run(self, seq: Sequence, *, prefix: Sequence | None = None, cache=None,
             z: Tensor | None = None, rope: Tensor | None = None, images: dict | None = None,
             use_cache: bool = False, record_prefix: PrefixKeys | None = None,
             with_prefix: PrefixKeys | None = None, routers: list | None = None,
             embeds: Tensor | None = None):
        """One decoder call on ``seq`` (after ``prefix``, whose keys are in ``cache`` or, on
        the "amvl" attention, in ``with_prefix``; ``record_prefix`` records them). An MoE
        model's router logits (per layer, (B * L, experts)) are appended to ``routers``.
        ``embeds``: the input embeddings of ``seq``'s tokens, when already looked up.

        Returns the last hidden states (B, L, H) and the cache.
        """
        if embeds is None:
            embeds = self._embed(seq)[0]
        if z is not None:
            # The placeholders follow <lat_start> in the latent part: the same K columns in
            # every row, so no search for them (and no host sync).
            begin = seq.spans["latent"][0] + 1
            embeds = self.injector(embeds, slice(begin, begin + z.shape[1]), z)
        keys = seq if prefix is None else concat(prefix, seq)
        self._check_window(keys.input_ids.shape[1])
        kwargs = dict(images or {})
        if self._on_amvl_attention():
            # The kernel reads the per-token metadata; no (Lq, Lk) mask is ever built.
            kwargs["latent_layout"] = LatentLayout.from_tensors(
                keys.segment, keys.visible_kinds, keys.block_id, check_values=False,
                copy=False)  # built for this call alone
            # transformers hands a 4D mask to the attention as it is, without building one
            # (nor reading the device to detect packed sequences in positions that restart),
            # and the layout replaces it there. All True, expanded from one element: no memory.
            # Not a promise held around the call (layouts_replace_masks): torch.compile cannot
            # break a graph, as a VLM's forward does, inside a with block of an inlined call.
            mask = torch.ones((), dtype=torch.bool, device=embeds.device).expand(
                embeds.shape[0], 1, seq.input_ids.shape[1], keys.input_ids.shape[1])
        else:
            allowed = dense_mask(keys, seq.input_ids.shape[1])
            mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=embeds.device)
            mask = mask.masked_fill(~allowed, torch.finfo(embeds.dtype).min)[:, None]
        positions = seq.position_ids
        if self.is_vlm:
            tails = positions[None].expand(3, -1, -1)
            positions = tails if rope is None else torch.cat(
                [rope, tails[:, :, rope.shape[-1]:]], dim=-1)
        for name, keys_store in (("record_prefix", record_prefix), ("with_prefix", with_prefix)):
            if keys_store is not None:
                kwargs[name] = keys_store
        if routers is not None:
            kwargs["output_router_logits"] = True
        backbone = self._backbone()
        kwargs[_cache_kwarg(backbone)] = cache
        out = backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                       use_cache=use_cache, **kwargs)
        # transformers 5.2x names the output field "cache", earlier 5.x "past_key_values"; the
        # old name is looked up in keys() only, since reading it on 5.2x logs a deprecation.
        cache = next((out[k] for k in ("cache", "past_key_values") if k in out.keys()), None)
        if routers is not None:
            routers.append(out["router_logits"])
        return out.last_hidden_state, cache

    def _embed(self, *seqs: Sequence) -> list[Tensor]:
        """The input embeddings of each of ``seqs`` (same batch size), from one lookup.

        A lookup's backward writes a gradient the size of the whole table (Qwen2-7B's
        152,064 x 3,584, 1.1 GB in bf16), so a lookup per pass would write one per pass and
        autograd would add them: one lookup for all the passes of a step writes it once.
        The embeddings' forward hooks (NEFTune's) get a lookup per pass instead.
        """
        layer = self.get_input_embeddings()
        if len(seqs) == 1 or layer._forward_hooks:
            # A hook on the lookup (the Trainer's NEFTune) sees each pass as the model's own
            # forward would, (batch, length, hidden): NEFTune scales its noise by
            # 1/sqrt(length x hidden), which one row of every pass's tokens shrank 3-4 times.
            looked_up = [layer(seq.input_ids) for seq in seqs]
        else:
            # One row of all the passes' tokens, each pass's a contiguous piece of it (models
            # may .view their inputs_embeds), still (batch, length, hidden) for the module's
            # hooks (NEFTune's reads its output's last two sizes).
            ids = torch.cat([s.input_ids.reshape(1, -1) for s in seqs], 1)
            embeds = layer(ids)[0]
            pieces = embeds.split([s.input_ids.numel() for s in seqs])
            looked_up = [piece.view(*s.input_ids.shape, -1) for piece, s in zip(pieces, seqs)]
        return [self._add_slot_embeddings(embeds, seq) for embeds, seq in zip(looked_up, seqs)]

    def _add_slot_embeddings(self, embeds: Tensor, seq: Sequence) -> Tensor:
        """``embeds`` of ``seq`` with the slot embeddings added on its query slots."""
        if self.slot_embeddings is None:
            return embeds
        for part in ("prior", "posterior"):
            if part in seq.spans:
                embeds = self.slot_embeddings(embeds, seq.columns(part))
        return embeds

    def _nll(self, hidden: Tensor, seq: Sequence, answer_ids: Tensor, answer_mask: Tensor,
             tokens: float | Tensor | None = None) -> Tensor:
        """Mean token NLL of the answer part of ``seq`` (each token predicted one column back),
        or its sum divided by ``tokens``."""
        begin, end = seq.spans["answer"]
        logits = self.output_logits(hidden[:, begin - 1:end - 1])
        labels = answer_ids.masked_fill(~answer_mask.bool(), -100)
        if tokens is None:
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                reduction="sum")
        return total / tokens

    # ------------------------------------------------------------------ sequence parts

    def _parts(self, prompt_ids, prompt_mask, answer_ids=None, answer_mask=None, rope=None):
        """The parts every pass is built from, with the positions of DESIGN.md section 3."""
        b, device, k = prompt_ids.shape[0], prompt_ids.device, self.config.num_slots
        zero = torch.zeros(b, dtype=torch.long, device=device)
        # Where the tails start: one past the prompt's last position (its length for text).
        x_end = prompt_mask.long().sum(1) if rope is None else rope.amax(dim=(0, 2)) + 1
        ids = self.token_ids
        parts = {"prompt": Part(Segment.PROMPT, prompt_ids, prompt_mask, zero)}
        parts["prior"] = Part(Segment.PRIOR_QUERY, *slots(ids["prior_query"], b, k, device),
                              x_end, PRIOR_BLOCK)
        latent_ids = torch.cat([slots(ids["latent_start"], b, 1, device)[0],
                                slots(ids["latent"], b, k, device)[0],
                                slots(ids["latent_end"], b, 1, device)[0]], 1)
        block = (0,) + (LATENT_BLOCK,) * k + (0,)  # the ends are causal
        parts["latent"] = Part(Segment.LATENT, latent_ids,
                               torch.ones_like(latent_ids, dtype=torch.bool), x_end, block)
        if answer_ids is not None:
            y_len = answer_mask.long().sum(1)
            parts["answer_after_x"] = Part(Segment.ANSWER, answer_ids, answer_mask, x_end)
            parts["answer_after_latent"] = Part(Segment.ANSWER, answer_ids, answer_mask,
                                                x_end + k + 2)
            parts["posterior"] = Part(Segment.POSTERIOR_QUERY,
                                      *slots(ids["posterior_query"], b, k, device),
                                      x_end + y_len, POSTERIOR_BLOCK)
        return parts

    # ------------------------------------------------------------------ checkpointing
    #
    # What transformers' Trainer calls for TrainingArguments(activation_checkpointing=True)
    # (gradient_checkpointing=True before transformers 5.24), passed to the base model's own
    # machinery. Its checkpointed layers drop the KV cache: prefix-shared steps then keep x's
    # keys in PrefixKeys on the "amvl" attention, and take the naive path elsewhere.

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether any layer of the base model is checkpointed: by transformers, or by torch's
        ``checkpoint_wrapper`` or composable ``checkpoint`` (what FSDP's activation
        checkpointing in accelerate and the Trainer applies to each decoder layer)."""
        return any(_checkpointed(module) for module in self._unwrapped().modules())

    is_gradient_checkpointing = is_activation_checkpointing  # the name before transformers 5.24

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        **kwargs) -> None:
        """Checkpoint the base model's layers (transformers' activation checkpointing)."""
        base = self._unwrapped()
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(
                activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
        else:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                      **kwargs) -> None:
        """The name before transformers 5.24 of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        """Stop checkpointing the base model's layers."""
        base = self._unwrapped()
        disable = getattr(base, "activation_checkpointing_disable", None) \
            or base.gradient_checkpointing_disable
        disable()

    gradient_checkpointing_disable = activation_checkpointing_disable

    # ------------------------------------------------------------------ training

    def forward(self, prompt_ids: Tensor, prompt_mask: Tensor, answer_ids: Tensor,
                answer_mask: Tensor, pixel_values: Tensor | None = None,
                image_grid_thw: Tensor | None = None,
                step: int | Tensor | None = _STEP_NOT_GIVEN,  # type: ignore[assignment]
                seed: int | Tensor | None = None,
                prefix_sharing: bool | None = None,
                answer_tokens: float | Tensor | None = None,
                prior_mean_nll: bool = False) -> AMVLOutput:
        """One training forward: loss, metrics and the drawn latents.

        Prompts are left-padded (B, Lx), answers right-padded (B, Ly), masks True on real
        tokens. ``step`` drives the KL schedule (None: the full objective, as evaluation
        wants; not given: step 0, which a training forward under a linear or cyclical
        schedule refuses, since its KL weight there is 0). ``seed`` fixes the latent noise
        (same seed, same loss on both paths).
        Both may be one-element integer tensors on the model's device (int64 for the seed),
        which a step captured in CUDA graphs (torch.compile's "reduce-overhead") needs: the
        graph then reads them at each replay, where a Python int is a value it records a
        new graph for. A seed tensor draws the noise of the int it holds on the Triton
        kernels (``kernel_backend`` "auto" on a GPU, or "triton").
        ``answer_tokens``: divide the answer's summed NLL by this instead of the batch's own
        answer token count. Data-parallel ranks pass the tokens of all their shares divided
        by the number of ranks, so that the average of their losses (DDP's) weighs every
        token alike, as one process over the whole batch does.
        ``prior_mean_nll``: also the metric ``nll_prior``, the answers' NLL decoded from
        the prior's means (what inference decodes from by default; without a latent block for
        "none"): one more decoding pass, which reuses the step's encoding of x when sharing.
        For evaluation, so only without autograd (``torch.no_grad()``).
        """
        if answer_ids is None or answer_mask is None:
            raise ValueError("the forward trains on answers: answer_ids and answer_mask are "
                             "required (heads() and generate() take prompts alone)")
        self._check_batch(prompt_ids, prompt_mask, answer_ids, answer_mask, pixel_values,
                          image_grid_thw)
        if prior_mean_nll and torch.is_grad_enabled():
            raise ValueError("prior_mean_nll is an evaluation metric: call the forward under "
                             "torch.no_grad()")
        if step is _STEP_NOT_GIVEN:
            if self.training and torch.is_grad_enabled() and self.config.kl_schedule != \
                    "constant" and self.config.objective in ("amvl", "elbo"):
                # step 0 weighs the KL by 0 there: a loop of one's own would train without it
                raise ValueError(f"kl_schedule={self.config.kl_schedule!r} weighs the KL by the "
                                 "training step: call model(..., step=<optimisation step>) "
                                 "(without it every forward is step 0, where the KL's weight "
                                 "is 0; step=None trains with the full weight)")
            step = 0
        if isinstance(step, Tensor):
            if step.is_floating_point() or step.is_complex() or step.dtype == torch.bool \
                    or step.numel() != 1:
                raise ValueError(f"a step tensor must hold one integer, got dtype {step.dtype} "
                                 f"and shape {tuple(step.shape)}")
        elif step is not None and (isinstance(step, bool)
                                   or not isinstance(step, numbers.Integral) or step < 0):
            # a negative step would turn the KL schedule's weight negative
            raise ValueError(f"step must be an int >= 0, a tensor or None, got {step!r}")
        if isinstance(answer_tokens, Tensor):
            if answer_tokens.numel() != 1 or answer_tokens.dtype == torch.bool \
                    or answer_tokens.is_complex():
                raise ValueError(f"an answer_tokens tensor must hold one real number, got dtype "
                                 f"{answer_tokens.dtype} and shape {tuple(answer_tokens.shape)}")
        elif answer_tokens is not None and (isinstance(answer_tokens, bool) or not isinstance(
                answer_tokens, numbers.Real) or not 0 < answer_tokens < math.inf):
            # 0 would make the loss inf, a negative count flip its sign
            raise ValueError(f"answer_tokens must be a number > 0, a tensor or None, got "
                             f"{answer_tokens!r}")
        share = self.config.prefix_sharing if prefix_sharing is None else prefix_sharing
        # Checkpointed layers drop transformers' KV cache: on the "amvl" attention x's keys are
        # kept in PrefixKeys instead, elsewhere the step falls back to the naive path. (Newer
        # transformers keep the cache when autograd is off; older ones may not: either way.)
        checkpointed = self.training and self.is_activation_checkpointing
        if share and checkpointed and not self._on_amvl_attention():
            warnings.warn("activation (gradient) checkpointing drops the KV cache of x that "
                          "prefix sharing reuses, and only the 'amvl' attention can keep x's "
                          "keys without it: training takes the naive path (the same loss and "
                          "gradients, x encoded once per pass)", stacklevel=2)
            share = False
        prefix_keys = PrefixKeys(prompt_ids.shape[1], needs_grad=torch.is_grad_enabled()) \
            if share and checkpointed else None
        # Checkpointed layers re-run their forward in the backward, outside the pairing.
        pairing = PairedWeightGrads(self._backbone()) \
            if share and self.config.pair_weight_grads and torch.is_grad_enabled() \
            and not checkpointed and not torch.compiler.is_compiling() else None
        images = self._images(pixel_values, image_grid_thw)
        rope = self._rope_positions(prompt_ids, prompt_mask, image_grid_thw)
        p = self._parts(prompt_ids, prompt_mask, answer_ids, answer_mask, rope)
        obj = self.objective
        # An MoE model's routers, balanced over the tokens of the sequence the NLL decodes,
        # [x | latent block | y] (x's from the pass that encodes it), as its own loss over [x | y]
        routed: list | None = [] if self._router_balance is not None else None
        if obj.latent_source == "none":
            seq = assemble({"prompt": p["prompt"], "answer": p["answer_after_x"]})
            hidden, _ = self._run(seq, rope=rope, images=images, routers=routed)
            loss, metrics = obj.loss(self._nll(hidden, seq, answer_ids, answer_mask,
                                           answer_tokens), None, step)
            loss, metrics = self._balance_routers(loss, metrics, routed, [(seq, slice(None))])
            if prior_mean_nll:  # no latents: the answers' NLL is the one inference decodes
                metrics = metrics.with_tensors(nll_prior=metrics.tensors()["nll"])
            return AMVLOutput(loss, metrics)

        # Named scopes: what scripts/profile_model_step.py --gaps charges device idle time to.
        with _scope("amvl.prefix_pass"):
            prompt_seq = assemble({"prompt": p["prompt"]})
            if share:
                names = ["prompt", "prior", "answer_after_x", "posterior"] if obj.uses_posterior \
                    else ["prompt", "prior"]
                seq = assemble({n: p[n] for n in names})
                decoded = assemble({"latent": p["latent"], "answer": p["answer_after_latent"]})
                seq_embeds, decoded_embeds = self._embed(seq, decoded)
                routed_parts = [(seq, seq.columns("prompt"))]
                if prefix_keys is not None:
                    hidden, cache = self._run(seq, rope=rope, images=images, embeds=seq_embeds,
                                              record_prefix=prefix_keys, routers=routed)
                else:
                    with pairing.prefix_pass() if pairing else contextlib.nullcontext():
                        hidden, cache = self._run(seq, rope=rope, images=images, use_cache=True,
                                                  routers=routed, embeds=seq_embeds)
                    cache.crop(-(seq.input_ids.shape[1] - prompt_ids.shape[1]))
                h_prior = hidden[:, seq.columns("prior")]
                h_post = hidden[:, seq.columns("posterior")] if obj.uses_posterior else None
            else:
                routed_parts = []
                passes = [assemble({n: p[n] for n in ("prompt", "prior")})]
                if obj.uses_posterior:
                    passes.append(assemble({n: p[n] for n in ("prompt", "answer_after_x",
                                                              "posterior")}))
                decoded = assemble({"prompt": p["prompt"], "latent": p["latent"],
                                    "answer": p["answer_after_latent"]})
                *pass_embeds, decoded_embeds = self._embed(*passes, decoded)
                hidden, _ = self._run(passes[0], rope=rope, images=images,
                                      embeds=pass_embeds[0])
                h_prior = hidden[:, passes[0].columns("prior")]
                h_post = None
                if obj.uses_posterior:
                    hidden, _ = self._run(passes[1], rope=rope, images=images,
                                          embeds=pass_embeds[1])
                    h_post = hidden[:, passes[1].columns("posterior")]
        with _scope("amvl.heads_and_draw"):
            mu_p, lv_p = self.prior_head(h_prior)
            mu_q, lv_q = self.posterior_head(h_post) if h_post is not None else (None, None)
            latents = obj.draw(mu_p, lv_p, mu_q, lv_q, seed=seed)

        def decode_nll(z: Tensor, routers: list | None = None) -> Tensor:
            # ``decoded``: the latent block and the answer, after x's cache when sharing, with x
            # before them otherwise; its embeddings were looked up with the first pass's.
            if share:
                if prefix_keys is not None:
                    hidden, _ = self._run(decoded, prefix=prompt_seq, z=z, routers=routers,
                                          with_prefix=prefix_keys, embeds=decoded_embeds)
                else:
                    with pairing.latent_pass() if pairing else contextlib.nullcontext():
                        hidden, _ = self._run(decoded, prefix=prompt_seq, cache=cache, z=z,
                                              use_cache=True, routers=routers,
                                              embeds=decoded_embeds)
                    cache.crop(-decoded.input_ids.shape[1])
            else:
                hidden, _ = self._run(decoded, rope=rope, images=images, z=z, routers=routers,
                                      embeds=decoded_embeds)
            if routers is not None:
                routed_parts.append((decoded, slice(None)))
            return self._nll(hidden, decoded, answer_ids, answer_mask, answer_tokens)

        with _scope("amvl.latent_pass"):
            nll = decode_nll(latents.z, routed)
            nll_prior = None
            if obj.uses_prior_nll:
                # A tensor's 64 bits are a key as they are: no wrap to [0, 2**63) needed.
                prior_seed = None if seed is None else (
                    seed + 1 if isinstance(seed, Tensor) else (seed + 1) % 2**63)
                z_prior = self._prior_latents(mu_p, lv_p, "sample", prior_seed)
                nll_prior = decode_nll(z_prior)
        with _scope("amvl.loss"):
            loss, metrics = obj.loss(nll, latents, step, nll_prior)
            loss, metrics = self._balance_routers(loss, metrics, routed, routed_parts)
        if prior_mean_nll:
            metrics = metrics.with_tensors(nll_prior=decode_nll(mu_p))
        return AMVLOutput(loss, metrics, latents)

    def _balance_routers(self, loss: Tensor, metrics: Metrics, routed: list | None,
                         parts: list[tuple[Sequence, slice]]) -> tuple[Tensor, Metrics]:
        """The loss plus the MoE routers' load-balancing loss, as the model's own loss adds it,
        over the columns ``parts`` name of the passes that ``routed`` recorded (in order), and
        the metric ``router_aux``. Unchanged for other models."""
        balance = self._router_balance
        if balance is None:
            return loss, metrics
        layers = []
        for i in range(len(routed[0])):
            pieces = [logits[i].view(*seq.input_ids.shape, -1)[:, columns]
                      for logits, (seq, columns) in zip(routed, parts)]
            layers.append(torch.cat(pieces, 1).flatten(0, 1))
        mask = torch.cat([seq.real[:, columns] for seq, columns in parts], 1)
        aux = balance.loss_fn(tuple(layers), balance.num_experts, balance.top_k, mask)
        loss = loss + balance.coef * aux.to(loss.device)
        return loss, metrics.with_tensors(router_aux=aux, loss=loss)

    def _prior_latents(self, mu_p: Tensor, lv_p: Tensor, mode: str,
                       seed: int | Tensor | None) -> Tensor:
        if mode == "mean":
            return mu_p
        import amvl_kernels as ak

        return ak.gaussian_sample(mu_p, lv_p, seed=seed, backend=self.config.kernel_backend)

    # ------------------------------------------------------------------ inference

    def _images(self, pixel_values, image_grid_thw) -> dict | None:
        if pixel_values is None:
            return None
        if not self.is_vlm:  # the text model's forward would drop them without a word
            raise ValueError(f"pixel_values given, but {type(self._unwrapped()).__name__} is "
                             "a text-only model: it cannot see images")
        return {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}

    @with_gathered_root
    def heads(self, prompt_ids: Tensor, prompt_mask: Tensor, answer_ids: Tensor | None = None,
              answer_mask: Tensor | None = None, pixel_values: Tensor | None = None,
              image_grid_thw: Tensor | None = None) -> dict[str, Tensor]:
        """Prior (and, given the answer, posterior) means and log-variances, each (B, K, d)."""
        if self.prior_head is None:
            raise ValueError(f"objective {self.config.objective!r} has no latent heads")
        self._check_batch(prompt_ids, prompt_mask, answer_ids, answer_mask, pixel_values,
                          image_grid_thw)
        rope = self._rope_positions(prompt_ids, prompt_mask, image_grid_thw)
        p = self._parts(prompt_ids, prompt_mask, answer_ids, answer_mask, rope)
        images = self._images(pixel_values, image_grid_thw)
        seq = assemble({n: p[n] for n in ("prompt", "prior")})
        hidden, _ = self._run(seq, rope=rope, images=images)
        out = dict(zip(("mu_p", "logvar_p"), self.prior_head(hidden[:, seq.columns("prior")])))
        if answer_ids is not None and self.posterior_head is not None:
            seq = assemble({n: p[n] for n in ("prompt", "answer_after_x", "posterior")})
            hidden, _ = self._run(seq, rope=rope, images=images)
            out.update(zip(("mu_q", "logvar_q"),
                           self.posterior_head(hidden[:, seq.columns("posterior")])))
        return out

    @with_gathered_root
    def answer_nll(self, prompt_ids: Tensor, prompt_mask: Tensor, answer_ids: Tensor,
                   answer_mask: Tensor, z: Tensor | None = None,
                   pixel_values: Tensor | None = None, image_grid_thw: Tensor | None = None
                   ) -> Tensor:
        """Per-example mean token NLL (B,) of the answers given latents ``z`` (B, K, d).

        ``z=None`` decodes without a latent block (the "none" objective's model).
        """
        self._check_batch(prompt_ids, prompt_mask, answer_ids, answer_mask, pixel_values,
                          image_grid_thw)
        if z is not None:
            if self.injector is None:
                raise ValueError(f"objective {self.config.objective!r} has no latent block: "
                                 "pass z=None")
            want = (prompt_ids.shape[0], self.config.num_slots, self.config.latent_dim)
            # A wrong K would write over <lat_end> and the answer, or leave placeholders.
            if z.dim() != 3 or tuple(z.shape) != want:
                raise ValueError(f"z must be (B, K, d) = {want} (batch, num_slots, latent_dim), "
                                 f"got {tuple(z.shape)}")
        rope = self._rope_positions(prompt_ids, prompt_mask, image_grid_thw)
        p = self._parts(prompt_ids, prompt_mask, answer_ids, answer_mask, rope)
        names = {"prompt": p["prompt"], "answer": p["answer_after_x"]} if z is None else \
            {"prompt": p["prompt"], "latent": p["latent"], "answer": p["answer_after_latent"]}
        seq = assemble(names)
        hidden, _ = self._run(seq, rope=rope, images=self._images(pixel_values, image_grid_thw),
                              z=z)
        begin, end = seq.spans["answer"]
        return self._per_example_nll(hidden[:, begin - 1:end - 1], answer_ids, answer_mask)

    def _per_example_nll(self, hidden: Tensor, answer_ids: Tensor, answer_mask: Tensor
                         ) -> Tensor:
        """Mean token NLL (B,) of the answers, ``hidden`` holding the state before each of
        their tokens (B, Ly, H)."""
        logits = self.output_logits(hidden)
        token_nll = F.cross_entropy(logits.transpose(1, 2), answer_ids, reduction="none")
        mask = answer_mask.to(token_nll.dtype)
        return (token_nll * mask).sum(1) / mask.sum(1).clamp(min=1)

    @with_gathered_root
    def choices_nll(self, prompt_ids: Tensor, prompt_mask: Tensor,
                    answers: list[tuple[Tensor, Tensor]],
                    pixel_values: Tensor | None = None,
                    image_grid_thw: Tensor | None = None,
                    latents: list[Tensor] | None = None) -> Tensor:
        """Per-example mean token NLL (B, C) of C answers to the same prompts, each given the
        prior's means (without a latent block for "none"), as :meth:`answer_nll` gives them
        one at a time. ``answers``: C pairs (answer_ids, answer_mask), right-padded. With
        ``latents`` (V tensors (B, K, d)), (V, B, C): each answer given each of them instead
        (a diagnostic's variants: posterior means, zeroed, swapped, ...).

        With ``config.prefix_sharing`` x is encoded once (in the prior's pass when it needs
        the prior's means) and each answer decoded after its cache (cropped back to x in
        between), where answer_nll encodes x again for every answer and latent: a benchmark
        question's prompt is an image's thousand tokens or more, its answers a few.
        """
        if not isinstance(answers, (list, tuple)) or not answers:
            raise ValueError("choices_nll needs a non-empty list of answers")
        if not all(isinstance(answer, (list, tuple)) and len(answer) == 2 for answer in answers):
            raise ValueError("each of choices_nll's answers must be an (answer_ids, "
                             "answer_mask) pair")
        for answer_ids, answer_mask in answers:
            self._check_batch(prompt_ids, prompt_mask, answer_ids, answer_mask, pixel_values,
                              image_grid_thw)
        latent = self.prior_head is not None
        if latents is not None:
            if not latent:
                raise ValueError(f"objective {self.config.objective!r} has no latent block: "
                                 "pass latents=None")
            want = (prompt_ids.shape[0], self.config.num_slots, self.config.latent_dim)
            if not isinstance(latents, (list, tuple)):  # one tensor: a list of one, please
                raise ValueError(f"latents must be a list of (B, K, d) = {want} tensors (one "
                                 f"variant: [z]), got {type(latents).__name__}")
            if not latents or any(tuple(z.shape) != want for z in latents):
                raise ValueError(f"latents must be a non-empty list of (B, K, d) = {want} "
                                 f"tensors, got shapes {[tuple(z.shape) for z in latents]}")
        images = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
        # checkpointed layers with autograd on drop the KV cache the shared encoding keeps
        cache_dropped = self.training and self.is_activation_checkpointing and \
            torch.is_grad_enabled()
        if not self.config.prefix_sharing or cache_dropped:
            zs = latents if latents is not None else \
                [self.heads(prompt_ids, prompt_mask, **images)["mu_p"] if latent else None]
            out = torch.stack([torch.stack([self.answer_nll(prompt_ids, prompt_mask, *answer,
                                                            z=z, **images)
                                            for answer in answers], 1) for z in zs])
            return out if latents is not None else out[0]
        rope = self._rope_positions(prompt_ids, prompt_mask, image_grid_thw)
        p = self._parts(prompt_ids, prompt_mask, None, None, rope)
        prompt_seq = assemble({"prompt": p["prompt"]})
        seq = assemble({n: p[n] for n in ("prompt", "prior")}) \
            if latent and latents is None else prompt_seq
        hidden, cache = self._run(seq, rope=rope, images=self._images(pixel_values,
                                                                        image_grid_thw),
                                  use_cache=True)
        before_answer = hidden[:, -1:]  # without latents: x's last state (left padding)
        zs = latents
        if zs is None:
            zs = [self.prior_head(hidden[:, seq.columns("prior")])[0] if latent else None]
            if latent:
                cache.crop(-(seq.input_ids.shape[1] - prompt_ids.shape[1]))
        out = []
        for z in zs:
            for answer_ids, answer_mask in answers:
                parts = self._parts(prompt_ids, prompt_mask, answer_ids, answer_mask, rope)
                decoded = assemble({"latent": parts["latent"],
                                    "answer": parts["answer_after_latent"]} if latent
                                   else {"answer": parts["answer_after_x"]})
                hidden, _ = self._run(decoded, prefix=prompt_seq, cache=cache, z=z,
                                      use_cache=True)
                cache.crop(-decoded.input_ids.shape[1])
                begin, end = decoded.spans["answer"]
                states = hidden[:, begin - 1:end - 1] if latent \
                    else torch.cat([before_answer, hidden[:, :end - 1]], 1)
                out.append(self._per_example_nll(states, answer_ids, answer_mask))
        out = torch.stack(out, 1).unflatten(1, (len(zs), len(answers))).transpose(0, 1)
        return out if latents is not None else out[0]

    def next_token_logits(self, hidden: Tensor) -> Tensor:
        """Logits over the vocabulary with the structural tokens (latent specials, vision
        markers) masked out: an answer never contains them."""
        logits = self.output_logits(hidden)
        banned = list(self.token_ids.values())
        if self.is_vlm:
            banned += structural_vision_ids(self._unwrapped().config)
        logits[..., banned] = float("-inf")
        return logits

    @torch.no_grad()
    @in_eval_mode  # greedy decoding means no dropout, whatever mode training left
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor,
                 pixel_values: Tensor | None = None, image_grid_thw: Tensor | None = None, *,
                 latent: str | None = None, num_samples: int | None = None,
                 max_new_tokens: int = 32, seed: int | None = None,
                 synced_processes: bool | None = None) -> GenerationOutput:
        """Greedy decoding from prior latents, with a KV cache.

        Per example: the prior pass ``[x | P]``, the cache cropped to x, the latent block
        ``<lat_start> z <lat_end>`` (always closed by a real token), then the answer token by
        token. ``latent`` is "mean" (z = mu_p) or "sample" (``num_samples`` draws per example,
        rows of the output); defaults come from the config. A model without latents (objective
        "none") answers once: it refuses "sample", ``num_samples`` and ``seed``, and ignores
        the config's inference setting. Returns the answers' tokens without the prompt
        (:class:`GenerationOutput`, (B, n, T)). Rows stop at the tokenizer's EOS and are padded
        with its pad id afterwards; decoding ends once every row has, so T is the longest
        answer's length (at most ``max_new_tokens``). With "sample", ``seed`` fixes the draws of the
        batch as a whole: the noise is keyed by an element's place in the batch, so an example
        gets the same draws again only at the same row of a batch of the same shape ("mean"
        depends on the batch only through floating-point rounding).

        ``synced_processes``: every process decodes until all processes' rows have ended (as
        transformers' ``synced_gpus``), which a model sharded across processes needs, since
        each forward pass gathers parameters from all of them; every process must then call
        ``generate`` alike (same ``max_new_tokens``). None: on when the model is sharded
        (DeepSpeed ZeRO-3, FSDP) in a group of several processes (:mod:`amvl.sharded`).
        """
        mode = self.config.inference if latent is None else latent
        if mode not in ("mean", "sample"):
            raise ValueError(f"latent must be 'mean' or 'sample', got {mode!r}")
        if self.objective.latent_source == "none":
            # No latents, so one answer a prompt: n draws would decode it n times alike
            if latent == "sample" or num_samples is not None or seed is not None:
                raise ValueError("this model has no latents (objective 'none'): it answers "
                                 "once, so latent='sample', num_samples and seed do not apply")
            mode = "mean"  # whatever the config's inference setting says
        if num_samples is not None and mode == "mean":
            raise ValueError("num_samples draws latents: pass latent='sample' with it (the "
                             "means give one answer)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                                 or seed < 0):
            raise ValueError(f"seed must be an int >= 0 or None, got {seed!r}")
        if seed is not None and mode == "mean":
            raise ValueError("seed fixes sampled latents: the means (latent='mean') draw "
                             "none; pass latent='sample' with it, or no seed")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
        if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(
                num_samples, numbers.Integral) or num_samples < 1):
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if synced_processes is not None and not isinstance(synced_processes, bool):
            raise ValueError(f"synced_processes must be a bool or None, got "
                             f"{synced_processes!r}")
        self._check_batch(prompt_ids, prompt_mask, pixel_values=pixel_values,
                          image_grid_thw=image_grid_thw)
        synced = sharded_across_processes(self) if synced_processes is None \
            else synced_processes and several_processes()  # one process is in step with itself
        n = int(num_samples or self.config.num_samples) if mode == "sample" else 1
        b = prompt_ids.shape[0]
        latent_tokens = 0 if self.objective.latent_source == "none" \
            else self.config.num_slots + 2
        self._check_window(prompt_ids.shape[1] + latent_tokens + max_new_tokens - 1)
        sequences, z = self._decode(prompt_ids, prompt_mask, pixel_values, image_grid_thw,
                                    mode, seed, max_new_tokens, synced, n)
        return GenerationOutput(sequences.view(b, n, -1),
                                None if z is None else z.view(b, n, *z.shape[1:]))

    @with_gathered_root
    def _decode(self, prompt_ids: Tensor, prompt_mask: Tensor, pixel_values: Tensor | None,
                image_grid_thw: Tensor | None, mode: str, seed: int | None,
                max_new_tokens: int, synced: bool, n: int = 1) -> tuple[Tensor, Tensor | None]:
        """:meth:`generate`'s passes on checked rows: the (B * n, T) tokens and the
        (B * n, K, d) latents (None without a latent block), an example's ``n`` draws in
        consecutive rows. The prior pass runs once per example (its images once); its cache,
        cropped to x, is repeated for the draws."""
        rope = self._rope_positions(prompt_ids, prompt_mask, image_grid_thw)
        p = self._parts(prompt_ids, prompt_mask, rope=rope)
        images = self._images(pixel_values, image_grid_thw)
        prompt_seq = assemble({"prompt": p["prompt"]})
        z = None
        if self.objective.latent_source == "none":
            hidden, cache = self._run(prompt_seq, rope=rope, images=images, use_cache=True)
            keys, next_pos = prompt_seq, p["latent"].start
        else:
            seq = assemble({"prompt": p["prompt"], "prior": p["prior"]})
            hidden, cache = self._run(seq, rope=rope, images=images, use_cache=True)
            mu_p, lv_p = self.prior_head(hidden[:, seq.columns("prior")])
            cache.crop(-(seq.input_ids.shape[1] - prompt_ids.shape[1]))
            if n > 1:  # every draw decodes as its own row, after the one pass over x
                mu_p, lv_p = mu_p.repeat_interleave(n, 0), lv_p.repeat_interleave(n, 0)
                cache.batch_repeat_interleave(n)
                prompt_seq = repeat_rows(prompt_seq, n)
                p["latent"] = dataclasses.replace(
                    p["latent"], **{name: getattr(p["latent"], name).repeat_interleave(n, 0)
                                    for name in ("ids", "mask", "start")})
            # the noise is keyed by row: each draw's as when the rows were repeated up front
            z = self._prior_latents(mu_p, lv_p, mode, seed)
            tail = assemble({"latent": p["latent"]})
            hidden, cache = self._run(tail, prefix=prompt_seq, cache=cache, z=z, use_cache=True)
            keys = concat(prompt_seq, tail)
            next_pos = p["latent"].start + self.config.num_slots + 2
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        pad = eos if pad is None else pad
        done = torch.zeros(hidden.shape[0], dtype=torch.bool, device=prompt_ids.device)
        tokens = []
        for t in range(max_new_tokens):
            logits = self.next_token_logits(hidden[:, -1])
            token = logits.argmax(-1)
            if pad is not None:  # no EOS and no pad: every row runs max_new_tokens
                token = torch.where(done, torch.full_like(token, pad), token)
            tokens.append(token)
            done |= token == eos if eos is not None else done
            # (suppressed tokens' logits are -inf by design: NaN is what overflow leaves)
            flags = torch.stack([done.all()] + ([~torch.isnan(logits).any()] if t == 0 else []))
            if synced:  # every process stops, or refuses, together
                flags = all_processes(flags)
            stop, *finite = flags.tolist()  # one host read, as before
            if finite and not finite[0]:
                # argmax of NaN is token 0 for every step: refuse instead of padding output
                where = " (on some process)" if synced else ""
                raise FloatingPointError(
                    f"the first decoding step's logits are NaN{where}: the inputs hold NaN "
                    f"or inf (pixel_values?), or the latents or the model overflow "
                    f"{hidden.dtype} (log-variances up to {self.config.logvar_max} give "
                    f"latents up to exp({self.config.logvar_max / 2:g}) times the noise; "
                    "lower logvar_max or decode in a wider dtype)")
            if stop or t == max_new_tokens - 1:
                break
            step = assemble({"answer": Part(Segment.ANSWER, token[:, None],
                                            torch.ones_like(token[:, None], dtype=torch.bool),
                                            next_pos + t)})
            hidden, cache = self._run(step, prefix=keys, cache=cache, use_cache=True)
            keys = concat(keys, step)
        return torch.stack(tokens, 1), z


@dataclass
class GenerationOutput:
    """What :meth:`AMVLModel.generate` decoded, ``n`` rows per example (``n`` samples, or 1)."""

    sequences: Tensor  # (B, n, T) answer tokens, padded after EOS
    latents: Tensor | None  # (B, n, K, d) the z each row was decoded from
