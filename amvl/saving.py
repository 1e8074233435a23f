"""Saving and loading an :class:`amvl.model.AMVLModel`: safetensors and JSON, nothing unpickled.

A saved directory holds ``amvl_config.json`` (the :class:`AMVLConfig`), ``amvl_heads.safetensors``
(the heads, the injector, the slot embeddings, and for a PEFT base the latent special tokens'
embedding rows)
and ``base/`` (the base model, or only its adapter, and the tokenizer).
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from amvl.config import IMPLEMENTATION_FIELDS, INFERENCE_FIELDS, AMVLConfig
from amvl.heads import SlotEmbeddings
from amvl.lora import ADAPTER_FILE, stored_layer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from amvl.model import AMVLModel

HEADS_NAME = "amvl_heads.safetensors"


class SavingMixin:
    """``save_pretrained``, ``load_weights`` and ``from_pretrained`` of :class:`AMVLModel`."""

    def save_pretrained(self, directory: str | Path,
                        state_dict: dict[str, Tensor] | None = None,
                        base_weights: bool = True) -> None:
        """Config (JSON), heads, injector and slot embeddings (safetensors), base model and
        tokenizer.

        ``state_dict`` (this module's keys, e.g. the full state a Trainer gathers under FSDP
        or ZeRO-3) is saved instead of the live parameters; it must hold every parameter (a
        ``module.`` or ``_orig_mod.`` prefix that all its keys share, as DDP's and
        torch.compile's wrappers give them, is dropped). With a PEFT base, ``base/`` holds
        only the adapter, so the rows of the latent special tokens in the embeddings, which
        the adapter does not carry, are saved beside the heads.

        ``base_weights=False`` writes all but the base model's weights (their files from an
        earlier save are removed): the config, the heads, the tokenizer and the base's
        ``config.json``, what a checkpoint needs beside weights kept in another format
        (DeepSpeed's own checkpoint, under ZeRO-3 without
        ``stage3_gather_16bit_weights_on_model_save``). Loading such a directory is refused,
        saying how to recover the weights.

        Without ``state_dict`` the live parameters that :meth:`parameters_to_save` names are
        read, and must be whole: ZeRO-3 partitions gathered (``deepspeed.zero.
        GatheredParameters``), which with a PEFT base is only the adapter's, the heads' and
        the embeddings', not the frozen base's."""
        if not base_weights and state_dict is not None:
            raise ValueError("base_weights=False saves the live parameters beside the base's "
                             "(gathered, if sharded): pass no state_dict")
        if state_dict is None:
            self._check_whole(base_weights)
        else:
            state_dict = self._checked_state(state_dict)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _remove_saved_base_weights(directory / "base")
        self.config.save(directory)
        own = self._own_state() if state_dict is None else {
            k: v for k, v in state_dict.items() if k.split(".", 1)[0] in self._own_modules()}
        own.update(self._special_token_rows(state_dict))
        save_file({k: v.detach().cpu().contiguous() for k, v in own.items()},
                  str(directory / HEADS_NAME), metadata={"format": "pt"})
        base_state = None if state_dict is None else {
            k[len("base."):]: v for k, v in state_dict.items() if k.startswith("base.")}
        # A PEFT base whose vocabulary grew for the latent tokens would otherwise save its
        # whole embedding matrices into the adapter (PEFT's save_embedding_layers="auto"),
        # which then fit no base but a resized one: the special rows are beside the heads.
        peft_options = {"save_embedding_layers": False} if self._is_peft() else {}
        if base_weights:
            self.base.save_pretrained(directory / "base", safe_serialization=True,
                                      state_dict=base_state, **peft_options)
        else:  # what the weights recovered from elsewhere would be loaded into
            self._unwrapped().config.save_pretrained(directory / "base")
        self.tokenizer.save_pretrained(directory / "base")

    def parameters_to_save(self, base_weights: bool = True) -> list[nn.Parameter]:
        """The live parameters ``save_pretrained(directory, base_weights=base_weights)`` reads
        (what to gather first where they are ZeRO-3 partitions): every one; with a PEFT base
        only its adapter's (PEFT's, named with an adapter's name), the heads', the injector's,
        the slot embeddings' and the embeddings' and LM head's (the latent special tokens'
        rows, which the adapter does not carry); ``base_weights=False``: all but the
        adapter's of these."""
        if base_weights and not self._is_peft():
            return list(self.parameters())
        modules = list(self._own_modules().values())
        if self._is_peft():
            modules += [layer for layer in (self.get_input_embeddings(),
                                            self.get_output_embeddings()) if layer is not None]
        params = {id(p): p for module in modules for p in module.parameters()}
        if base_weights:
            adapters = set(getattr(self.base, "peft_config", {}))
            params.update({id(p): p for name, p in self.base.named_parameters()
                           if adapters & set(name.split("."))})
        return list(params.values())

    def _check_whole(self, base_weights: bool = True) -> None:
        """Refuse to save live parameters that are one process's shards: FSDP2's DTensors,
        DeepSpeed ZeRO-3's partitions (empty outside a forward; whole while gathered),
        FSDP1's flat or empty views (heads of no size), which would be saved as they are.
        Only those of :meth:`parameters_to_save` are checked."""
        saved = {id(p) for p in self.parameters_to_save(base_weights)}
        partitioned = [n for n, p in self.named_parameters() if id(p) in saved and (
            type(p).__name__ == "DTensor" or _zero3_partition(p))]
        layers = [(name, module) for name, module in self._own_modules().items()]
        if self._is_peft():  # the special tokens' rows are read from these
            layers += [(f"the {kind} embeddings", stored) for kind, stored in
                       (("input", stored_layer(self.get_input_embeddings())),
                        ("output", stored_layer(self.get_output_embeddings() or nn.Identity())))
                       if isinstance(stored, (nn.Embedding, nn.Linear))]
        partitioned += [".".join(filter(None, (name, layer_name, "weight")))
                        for name, module in layers
                        for layer_name, layer in module.named_modules()
                        if tuple(getattr(layer, "weight", torch.empty(0)).shape)
                        != _whole_weight_shape(layer)]
        if partitioned:
            raise ValueError(
                f"the model's live weights are sharded across processes ({partitioned[0]}, "
                f"...): pass the gathered full state, save_pretrained(directory, "
                f"state_dict=...), e.g. from torch.distributed.checkpoint.state_dict."
                f"get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) "
                f"(FSDP2), under FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT) "
                f"(FSDP1), or from DeepSpeed's engine._zero3_consolidated_16bit_state_dict() "
                f"(ZeRO-3; the Trainer's save_model gathers it with "
                f"stage3_gather_16bit_weights_on_model_save)")

    def _checked_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``state`` with this module's own names, refused when a parameter is missing (a
        partial state saved a partial base, which then loaded with random weights where it
        had none). Names are compared without the wrappers' components, which the live names
        of a model wrapped in place (FSDP1, activation checkpointing) carry and a gathered
        state does not."""
        while state and len({k.split(".", 1)[0] for k in state}) == 1 \
                and next(iter(state)).split(".", 1)[0] in _WRAPPER_PREFIXES:
            state = {k.split(".", 1)[1]: v for k, v in state.items()}
        names_of: dict[object, list[str]] = {}  # a parameter: its names (tied: several)
        for name, param in self.named_parameters(remove_duplicate=False):
            fqns = getattr(param, "_fqns", None)
            if fqns is None:
                names_of.setdefault(id(param), []).append(_without_wrappers(name))
                continue
            # FSDP1's FlatParameter (use_orig_params=False): the gathered state names the
            # parameters it holds, relative to the module that holds it, never itself
            owner = name.rpartition(".")[0]
            for i, fqn in enumerate(fqns):
                names_of.setdefault((id(param), i), []).append(
                    _without_wrappers(f"{owner}.{fqn}" if owner else fqn))
        missing = [names[0] for names in names_of.values()
                   if not any(name in state for name in names)]  # tied weights: one name
        if missing:
            raise ValueError(
                f"state_dict lacks {len(missing)} of the model's parameters ({missing[0]}, ...) "
                f"of {len(names_of)}: pass the whole state, named as this model's "
                f"state_dict() names it (its first keys: {list(state)[:2]})")
        return state

    def _own_state(self) -> dict[str, Tensor]:
        return {f"{name}.{k}": v for name, module in self._own_modules().items()
                for k, v in module.state_dict().items()}

    def _is_peft(self) -> bool:
        return hasattr(self.base, "get_base_model")

    def _special_token_rows(self, state_dict: dict[str, Tensor] | None = None
                            ) -> dict[str, Tensor]:
        """The latent special tokens' embedding rows (input, and output when untied), in
        ``token_ids`` order, for a PEFT base; {} otherwise."""
        if not self._is_peft():
            return {}
        ids = torch.tensor(list(self.token_ids.values()))
        embeddings, output = self.get_input_embeddings(), self.get_output_embeddings()
        layers = {"special_tokens.input": embeddings}
        if output is not None and \
                stored_layer(output).weight is not stored_layer(embeddings).weight:  # untied
            layers["special_tokens.output"] = output
        if state_dict is None:  # a trainable-tokens wrapper's weight: the rows as trained
            rows = {k: layer.weight for k, layer in layers.items()}
        else:  # the gathered state's stored matrices (the live ones may be shards), whose
            # rows PEFT's trainable tokens, saved in the adapter, override on load
            # named by their modules, as the state names them: a wrapped model's live
            # parameters may carry wrappers' names, or be FSDP1's flat parameters
            names = {id(m): n for n, m in self.named_modules(remove_duplicate=False)}
            rows = {k: state_dict.get(_without_wrappers(f"{names[id(stored_layer(layer))]}"
                                                        ".weight"), stored_layer(layer).weight)
                    for k, layer in layers.items()}
        return {k: w[ids.to(w.device)] for k, w in rows.items()}

    def _load_own_state(self, state: dict[str, Tensor]) -> None:
        for name in self._own_modules():
            prefix = f"{name}."
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not own:
                raise ValueError(f"the saved heads hold no weights of {name} (was the model "
                                 "saved from a sharded state without gathering it?)")
            module = getattr(self, name).to(next(iter(own.values())).dtype)  # as saved
            try:
                module.load_state_dict(own)
            except RuntimeError as error:  # e.g. a config edited after saving
                raise ValueError(f"the saved weights of {name} do not fit this model's "
                                 f"(num_slots={self.config.num_slots}, latent_dim="
                                 f"{self.config.latent_dim}): {error}") from None
        ids = torch.tensor(list(self.token_ids.values()))
        with torch.no_grad():
            for key, layer in (("special_tokens.input", self.get_input_embeddings()),
                               ("special_tokens.output",
                                self.get_output_embeddings())):
                if key in state and layer is not None:
                    # the stored matrix: a trainable-tokens wrapper's weight is a fresh copy
                    weight = stored_layer(layer).weight
                    weight[ids.to(weight.device)] = state[key].to(weight)

    def load_weights(self, directory: str | Path) -> None:
        """Load, in place, every weight :meth:`save_pretrained` wrote into ``directory`` (a
        model of the same configuration, but for the inference settings, which the weights do
        not depend on and which this model keeps): heads, injector and the base model, or its
        PEFT adapter. What a Trainer resuming from one of its checkpoints needs."""
        directory = Path(directory)
        differ = AMVLConfig.load(directory).differences(
            self.config, ignore=INFERENCE_FIELDS | IMPLEMENTATION_FIELDS)
        if differ:
            raise ValueError(f"{directory} holds a model of another configuration (differs in "
                             f"{differ}): build the model on the saved config "
                             "(AMVLConfig.load) to load it")
        base_dir = directory / "base"
        _refuse_weights_kept_elsewhere(directory)
        if (base_dir / ADAPTER_FILE).is_file():
            if not self._is_peft():
                raise ValueError(f"{base_dir} holds a PEFT adapter but this model's base is "
                                 "not a PEFT model")
            self._load_adapter(base_dir)
        elif self._is_peft():
            raise ValueError(f"{base_dir} holds a whole model, not a PEFT adapter, but this "
                             "model's base is a PEFT model: load it into a model on the plain "
                             "base")
        else:
            self._load_base_state(base_dir)
        self._load_own_state(load_file(str(directory / HEADS_NAME), device=str(self.device)))

    def _load_adapter(self, base_dir: Path) -> None:
        """Load the adapter saved in ``base_dir`` into this model's PEFT base, whose adapter
        must have the saved settings (``ADAPTER_SETTINGS``) and take every saved weight."""
        from peft import set_peft_model_state_dict

        saved = json.loads((base_dir / "adapter_config.json").read_text())
        name = getattr(self.base, "active_adapter", "default")
        live = self.base.peft_config[name].to_dict()
        differ = [f"{key} (saved {_shortened(saved[key])}, this model's "
                  f"{_shortened(live[key])})"
                  for key in ADAPTER_SETTINGS if key in saved and key in live
                  and _comparable(saved[key]) != _comparable(live[key])]
        if differ:
            raise ValueError(f"{base_dir} holds an adapter of other settings than this model's: "
                             f"{'; '.join(differ)}: wrap the base with the saved settings "
                             "(PeftModel.from_pretrained(<the plain base>, base_dir)), or pass "
                             "the plain base to AMVLModel.from_pretrained")
        try:
            result = set_peft_model_state_dict(self.base, load_file(str(base_dir / ADAPTER_FILE)),
                                               adapter_name=name)
        except RuntimeError as error:  # shapes of another adapter
            raise ValueError(f"{base_dir}'s adapter does not fit this model's: {error}") from None
        if result.unexpected_keys:
            raise ValueError(f"{base_dir}'s adapter has weights this model's adapter lacks: "
                             f"{sorted(result.unexpected_keys)[:5]}")

    def _load_base_state(self, base_dir: Path) -> None:
        index = base_dir / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) \
            if index.is_file() else ["model.safetensors"]
        missing = [name for name in files if not (base_dir / name).is_file()]
        if missing:
            raise FileNotFoundError(f"no {missing[0]} in {base_dir}")
        state = {}
        for name in files:
            state.update(load_file(str(base_dir / name)))
        target = self._unwrapped()
        problems = _load_into(target, state)
        renamed = _under_own_names(target, state) if problems and \
            not problems.startswith("tied") else None
        if renamed is not None:  # the saved names map onto the model's one to one
            problems = _load_into(target, renamed)
        if problems and not problems.startswith("tied"):
            # transformers saves some models (the Qwen2-VL family) under their original
            # checkpoints' names and maps them back when it loads: let it, and refuse what
            # it could not find (it starts those weights at random). This builds a second
            # whole model on the host, so it is the last resort.
            fresh, info = type(target).from_pretrained(
                base_dir, use_safetensors=True, dtype=next(target.parameters()).dtype,
                output_loading_info=True)
            unloaded = {key: sorted(info.get(key) or ())[:5]
                        for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
                        if info.get(key)}
            problems = f"its files {unloaded}" if unloaded \
                else _load_into(target, fresh.state_dict())
            del fresh
        if problems:
            raise ValueError(f"{base_dir} does not match this base model: {problems}")

    @classmethod
    def from_pretrained(cls, directory: str | Path, base_model: nn.Module | None = None,
                        tokenizer: PreTrainedTokenizerBase | None = None,
                        **base_kwargs) -> AMVLModel:
        """Load what :meth:`save_pretrained` wrote: JSON and safetensors only, nothing unpickled.

        The base model class is taken from the saved ``config.json`` ``architectures`` entry
        unless ``base_model`` is given (``base_kwargs`` go to its ``from_pretrained``, e.g.
        ``dtype``, which the heads then take too); a given base gets the saved weights loaded
        into it. A PEFT model saved only its adapter: pass the plain base it was trained on,
        and the adapter is loaded onto it (after the latent special tokens' rows, which its
        trainable tokens index), or a PEFT model of the same adapter settings, into which the
        saved adapter is loaded; the latent special tokens' rows come back from the heads'
        file. A given ``tokenizer`` must hold the latent special tokens at the saved
        tokenizer's ids (the saved embedding rows are theirs). The model comes in eval mode,
        as transformers' do: call ``.train()`` to train it.
        """
        import transformers

        from amvl.model import ensure_special_tokens

        directory = Path(directory)
        base_dir = directory / "base"
        config = AMVLConfig.load(directory)
        _refuse_weights_kept_elsewhere(directory)
        adapter = (base_dir / "adapter_config.json").is_file()
        if base_model is not None and base_kwargs:
            raise ValueError(f"{sorted(base_kwargs)} would go to transformers' from_pretrained, "
                             "which a given base_model skips: build the base with them")
        saved_tokenizer = load_saved_tokenizer(base_dir)
        if tokenizer is None:
            tokenizer = saved_tokenizer
        else:
            _check_latent_token_ids(tokenizer, saved_tokenizer, config)
        load_saved_base = load_saved_adapter = False
        if base_model is None:
            if adapter:
                raise ValueError(f"{base_dir} holds a PEFT adapter, not a whole model: pass "
                                 "the base model it was trained on, base_model=<that model>")
            arch = json.loads((base_dir / "config.json").read_text())["architectures"][0]
            if not hasattr(transformers, arch):
                raise ValueError(f"transformers has no class {arch}, the saved base's "
                                 "architecture (a model with remote code?): build the base "
                                 f"from '{base_dir}' yourself and pass it as base_model")
            base_model = getattr(transformers, arch).from_pretrained(
                base_dir, use_safetensors=True, **base_kwargs)
        elif adapter and not hasattr(base_model, "get_base_model"):
            from peft import PeftModel

            ensure_special_tokens(base_model, tokenizer, config)
            base_model = PeftModel.from_pretrained(base_model, base_dir)
        elif adapter:
            load_saved_adapter = True  # checked against the given adapter's settings
        else:
            load_saved_base = True  # the trained weights, not the given ones
        model = cls(base_model, tokenizer, config)
        if load_saved_base:
            model._load_base_state(base_dir)
        if load_saved_adapter:
            model._load_adapter(base_dir)
        model._load_own_state(load_file(str(directory / HEADS_NAME), device=str(model.device)))
        dtype = base_kwargs.get("dtype", base_kwargs.get("torch_dtype"))
        if isinstance(dtype, torch.dtype):
            for module in model._own_modules().values():
                module.to(dtype)
        return model.eval()  # as transformers' from_pretrained returns its models


# The settings of a saved adapter that shape or scale it: a live adapter that differs in one
# of them gives other outputs from the same weights, or drops some of them.
ADAPTER_SETTINGS = ("peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "use_dora",
                    "fan_in_fan_out", "modules_to_save", "trainable_token_indices",
                    "rank_pattern", "alpha_pattern", "bias", "layers_to_transform")


def _shortened(value: object, length: int = 120) -> str:
    text = repr(_comparable(value))
    return text if len(text) <= length else text[:length] + "...]"


def _comparable(value: object) -> object:
    """A setting as JSON holds it: enums by value, sets and lists sorted."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _comparable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset, list, tuple)):
        return sorted((_comparable(v) for v in value), key=repr)
    return value


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_saved_tokenizer(base_dir: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``base_dir``. A generic tokenizers-backed one (e.g. a WordLevel
    vocabulary on a Qwen2 base) loads as its own class: AutoTokenizer would pick the model
    type's, and Qwen2's BPE rebuilt from a word-level vocabulary tokenizes to nothing. Any
    other class is AutoTokenizer's choice, as for the model's own checkpoints."""
    import transformers

    base_dir = Path(base_dir)
    config_file = base_dir / "tokenizer_config.json"
    saved_class = json.loads(config_file.read_text()).get("tokenizer_class") \
        if config_file.is_file() else None
    if saved_class in GENERIC_TOKENIZER_CLASSES and hasattr(transformers, saved_class):
        return getattr(transformers, saved_class).from_pretrained(base_dir)
    return transformers.AutoTokenizer.from_pretrained(base_dir)


def _check_latent_token_ids(tokenizer, saved_tokenizer, config: AMVLConfig) -> None:
    """Refuse a tokenizer whose latent special tokens are missing or at other ids than the
    saved one's: the model would re-initialise their trained rows, or read other rows."""
    vocab = tokenizer.get_vocab()
    for token in config.special_tokens():
        saved = saved_tokenizer.convert_tokens_to_ids(token)
        given = vocab.get(token)
        if given != saved:
            raise ValueError(f"the tokenizer given has {token!r} at id {given}, the saved one "
                             f"at {saved}: pass the saved tokenizer (tokenizer=None) or one "
                             "with the same latent special tokens")


def _refuse_weights_kept_elsewhere(directory: Path) -> None:
    """Refuse a directory whose ``base/`` holds no weights because DeepSpeed's own checkpoint
    beside it does (``save_pretrained(..., base_weights=False)`` under ZeRO-3), saying how to
    recover them; other missing files are for the loading itself to name."""
    base_dir = directory / "base"
    if (base_dir / ADAPTER_FILE).is_file() or any(base_dir.glob("model*.safetensors")) \
            or not ((directory / "latest").is_file() or any(directory.glob("global_step*"))):
        return
    raise ValueError(
        f"{base_dir} holds no weights: they are in DeepSpeed's own checkpoint in {directory} "
        "(a ZeRO-3 run without stage3_gather_16bit_weights_on_model_save in its DeepSpeed "
        "config, which saves whole weights). Recover them in one process: build the model as "
        "for training and call model.save_pretrained(out, state_dict=deepspeed.utils."
        f"zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint('{directory}')); or set "
        "the flag (resume_from_checkpoint needs neither)")


def _remove_saved_base_weights(base_dir: Path) -> None:
    """Before saving into ``base_dir``: delete the weight files of an earlier save (a whole
    model's, in one file or in shards, or an adapter), which loading would take for this
    save's: transformers removes only shards of its own naming, and an old single file next
    to a new index is what its loading prefers."""
    if not base_dir.is_dir():
        return
    for pattern in ("model*.safetensors", "model.safetensors.index.json",
                    "adapter_config.json", ADAPTER_FILE):
        for file in base_dir.glob(pattern):
            file.unlink()


# What wrappers put in front of or among a model's parameter names: DDP's module, compile's
# _orig_mod, FSDP1's and activation checkpointing's in-place wrappers.
_WRAPPER_PREFIXES = ("module", "_orig_mod")
_WRAPPER_COMPONENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def _without_wrappers(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_COMPONENTS)


def _zero3_partition(param: nn.Parameter) -> bool:
    """A DeepSpeed ZeRO-3 parameter (``ds_id``) not whole now: neither gathered nor kept
    whole on every process (ZeRO-3's persistent small parameters)."""
    return hasattr(param, "ds_id") and \
        getattr(getattr(param, "ds_status", None), "name", None) != "AVAILABLE"


def _whole_weight_shape(layer: nn.Module) -> tuple[int, ...]:
    """The shape of an own layer's ``weight`` when it is whole, not a process's shard: (0,)
    for a layer without one."""
    if isinstance(layer, nn.Linear):
        return (layer.out_features, layer.in_features)
    if isinstance(layer, SlotEmbeddings):
        return (layer.num_slots, layer.hidden_size)
    if isinstance(layer, nn.Embedding):
        return (layer.num_embeddings, layer.embedding_dim)
    return (0,)


def _under_own_names(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """``state`` under ``model``'s own names, where transformers saved it under its original
    checkpoints' names by renaming alone (the Qwen2-VL family: ``model.layers.*`` for
    ``model.language_model.layers.*``, ``visual.*`` for ``model.visual.*``): each saved name
    the model lacks goes to the one name of the model's, not saved, that ends with it (or
    with it less its first part), of the same shape. None where that is not one to one, or
    the model's names would not all be found: transformers' own loading decides then."""
    own = model.state_dict()
    # each unsaved name under every ending after one of its dots: a dict lookup per saved
    # name, where scanning every name for each was quadratic (an MoE's thousands of names)
    by_ending: dict[str, list[str]] = {}
    for name in own:
        if name not in state:
            parts = name.split(".")
            for i in range(1, len(parts)):
                by_ending.setdefault(".".join(parts[i:]), []).append(name)
    renamed: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if key in own:
            renamed[key] = tensor
            continue
        tail = key.partition(".")[2]
        candidates = by_ending.get(key) or (by_ending.get(tail, []) if tail else [])
        if len(candidates) != 1 or candidates[0] in renamed \
                or own[candidates[0]].shape != tensor.shape:
            return None
        renamed[candidates[0]] = tensor
    return renamed


def _load_into(model: nn.Module, state: dict[str, Tensor]) -> str:
    """Copy ``state`` into ``model``; '' when every weight was found, else what was not. A
    tied weight (the LM head on the input embeddings) is saved once and may be missing; two
    saved tensors that differ but are one tensor in ``model`` (an untied checkpoint, a tied
    model: whichever came last would win) are refused before anything is copied."""
    own = model.state_dict()
    keys_of: dict[int, list[str]] = {}
    for key, tensor in own.items():
        if key in state and tensor.numel():  # an empty tensor has no storage to share
            keys_of.setdefault(tensor.data_ptr(), []).append(key)
    for keys in keys_of.values():
        if any(not torch.equal(state[keys[0]], state[key]) for key in keys[1:]):
            return (f"tied in this model but two tensors in the checkpoint: {keys} (was it "
                    f"saved from a model whose LM head is not tied to its input embeddings?)")
    result = model.load_state_dict(state, strict=False)
    loaded = {own[k].data_ptr() for k in own if k in state}
    untied = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
    if untied or result.unexpected_keys:
        return f"missing {untied[:5]}, unexpected {result.unexpected_keys[:5]}"
    return ""
