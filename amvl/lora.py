"""LoRA fine-tuning for the ``amvl`` command (the run config's ``model.lora`` section).

``amvl train`` builds the :class:`AMVLModel` on the plain base (which gives the latent special
tokens their embedding rows), then wraps the base with PEFT adapters: the base's own weights
stay frozen, and the adapters, the Gaussian heads, the injector, the slot embeddings and the
embedding rows of the latent tokens the model reads (PEFT's trainable tokens; ``train_latent_tokens``) train. By
default the adapters go on every linear layer of the text decoder (attention and MLP
projections), named in full, so a VLM's vision tower, whose MLP layers share the decoder's
names (Qwen2.5-VL's ``gate_proj``, ``up_proj``, ``down_proj``), gets none.

A LoRA run's checkpoints and ``final/`` hold the adapter, not the base's weights (what
``AMVLModel.save_pretrained`` writes for a PEFT base), beside :data:`RECORD_FILE`: the LoRA
settings, which ``--resume`` compares, and the run config's model section with the run's seed,
from which ``amvl eval`` and ``amvl generate`` rebuild the frozen base the adapter belongs to.

:func:`stored_layer` sees through PEFT's wrappers of embedding layers, for the model layer.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from amvl.model import AMVLModel

RECORD_FILE = "lora_run.json"  # beside amvl_config.json in a LoRA run's saved directories
ADAPTER_FILE = "adapter_model.safetensors"  # what PEFT's save_pretrained writes into base/
TINY_MODEL = "tiny-qwen2-vl"  # model.path of the demo's tiny model, built rather than loaded
TINY_HIDDEN_SIZE = 64  # the tiny model's width when model.hidden_size is not given


def stored_layer(layer: nn.Module) -> nn.Module:
    """The plain layer inside PEFT's wrappers of an embedding or LM head (LoRA's
    ``base_layer``, trainable tokens' ``token_adapter.base_layer``), or ``layer`` itself: its
    ``weight`` is the stored matrix, where a trainable-tokens wrapper's ``weight`` is a copy of
    the whole matrix with the trained rows put in, built anew at every read."""
    while True:
        modules = layer._modules  # not getattr: PEFT's wrappers forward unknown names
        inner = modules.get("base_layer")
        adapter = modules.get("token_adapter")
        if inner is None and adapter is not None:
            inner = adapter._modules.get("base_layer")
        if inner is None:
            return layer
        layer = inner


def require_peft(command: str) -> None:
    """Raise SystemExit telling how to install PEFT when it is missing (it is optional)."""
    if importlib.util.find_spec("peft") is None:
        raise SystemExit(f"amvl {command}: LoRA adapters need the peft package: pip install "
                         "peft (or pip install 'amvl[lora]')")


def text_decoder_linear_names(base: nn.Module) -> list[str]:
    """The full names, in ``base`` (a transformers model, unwrapped), of every linear layer of
    its text decoder: the attention and MLP projections of each decoder layer, without a
    vision tower's layers or the LM head."""
    decoder, prefix = _text_decoder(base)
    routers = _routers(decoder, base.config.get_text_config())
    return [f"{prefix}.{name}" if prefix else name
            for name, module in decoder.named_modules()
            if isinstance(module, nn.Linear) and name not in routers]


def _text_decoder(base: nn.Module) -> tuple[nn.Module, str]:
    """The text decoder of ``base`` and its name in it."""
    backbone = base.base_model  # the decoder; for a VLM, vision tower + text model
    decoder = getattr(backbone, "language_model", backbone)
    return decoder, next(name for name, module in base.named_modules() if module is decoder)


def _routers(decoder: nn.Module, config) -> set[str]:
    """Names (in ``decoder``) of its MoE blocks' routing layers: a linear layer beside a
    block's ``experts`` with an output per expert (``mlp.gate``, Llama 4's ``router``), or a
    shared expert's gate (Qwen2-MoE's ``shared_expert_gate``). An adapter there would move
    which experts a token goes to, not what they compute. Known by their place, not their
    name: MiniMax's attention ``output_gate`` is a projection."""
    experts = {getattr(config, key) for key in ("num_experts", "num_local_experts",
                                                "n_routed_experts")
               if isinstance(getattr(config, key, None), int)}
    found = set()
    for block_name, block in decoder.named_modules():
        if not hasattr(block, "experts") and not hasattr(block, "shared_expert"):
            continue
        for name, child in block.named_children():
            if isinstance(child, nn.Linear) and (
                    (hasattr(block, "experts") and child.out_features in experts)
                    or (hasattr(block, "shared_expert") and child.out_features == 1)):
                found.add(f"{block_name}.{name}" if block_name else name)
    return found


def fused_expert_blocks(base: nn.Module) -> list[str]:
    """Names of the text decoder's MoE expert blocks whose weights are fused parameters (no
    linear layers): LoRA puts no adapter on them."""
    decoder, prefix = _text_decoder(base)
    return [f"{prefix}.{name}" if prefix else name for name, module in decoder.named_modules()
            if name.rsplit(".", 1)[-1] == "experts"
            and any(True for _ in module.parameters(recurse=False))]


def add_adapters(model: AMVLModel, settings: dict, command: str = "train") -> str:
    """Wrap ``model``'s base (plain, the latent tokens' rows already added) with LoRA adapters
    of ``settings`` (a checked ``model.lora`` section, :func:`amvl.run_config.lora_settings`)
    and return a line saying what trains. The base's weights are frozen; the heads, the
    injector and the slot embeddings, which are the AMVLModel's own, keep training. Target
    names that match no module raise SystemExit naming ``command``."""
    require_peft(command)
    from peft import LoraConfig, get_peft_model

    targets = settings["target_modules"] or text_decoder_linear_names(model.base)
    fused = fused_expert_blocks(model.base)  # named in the base, before PEFT wraps it
    rows = latent_row_ids(model) if settings.get("train_latent_tokens") else []
    config = LoraConfig(r=settings["r"], lora_alpha=settings["alpha"],
                        lora_dropout=settings["dropout"], target_modules=targets,
                        trainable_token_indices=rows or None)
    try:
        model.base = get_peft_model(model.base, config)
    except ValueError as err:  # PEFT's "Target modules ... not found in the base model"
        raise SystemExit(f"amvl {command}: model.lora.target_modules: {err}") from None
    adapted = sum(1 for name, _ in model.base.named_modules() if name.endswith(".lora_A"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"amvl {command}: LoRA r={settings['r']}, alpha={settings['alpha']:g}, dropout="
            f"{settings['dropout']:g} on {adapted} modules: training {trainable:,} of "
            f"{total:,} parameters ({trainable / total:.2%}; the adapters, the heads, the "
            "injector" + (", the slot embeddings" if model.slot_embeddings is not None else "")
            + (f" and the {len(rows)} latent tokens' embedding rows" if rows else "")
            + ")" + (f"; the fused expert weights of MoE blocks ({len(fused)}: "
                           f"{fused[0]}, ...) get no adapters" if fused else ""))


def latent_row_ids(model: AMVLModel) -> list[int]:
    """The ids of the latent tokens whose embedding rows ``model`` reads under its objective:
    the latent block's bounds and the prior's query slots, the posterior's where the
    objective has one; none without a latent block. They start at the mean of the
    vocabulary's rows. The placeholder's row is never read: z replaces it."""
    objective = model.objective
    if objective.latent_source == "none":
        return []
    roles = ["latent_start", "latent_end", "prior_query"] \
        + (["posterior_query"] if objective.uses_posterior else [])
    return sorted({model.token_ids[role] for role in roles})


def has_adapter(directory: Path) -> bool:
    """Whether a directory ``amvl train`` wrote holds a PEFT adapter instead of the base's
    weights (``AMVLModel.save_pretrained`` of a PEFT base)."""
    return (Path(directory) / "base" / ADAPTER_FILE).is_file()


def run_record(settings: dict, model_section: dict, seed: int) -> dict:
    """What a LoRA run's saved directories record besides the adapter: the LoRA ``settings``,
    the base model (the run config's model section, its path absolute since the command may
    run elsewhere later) and the run's ``seed``, which alone fixes the tiny model's weights
    (built from torch's generator, not loaded)."""
    return {"lora": settings, "base": base_record(model_section), "seed": seed}


def base_record(model_section: dict) -> dict:
    """The base model a run config's model section names, its defaults filled in (so that a
    setting left out and one written out compare equal): the path, absolute since the
    command may run elsewhere later, the dtype, and the tiny model's width."""
    base = {"path": model_section["path"], "dtype": model_section.get("dtype", "float32")}
    if base["path"] == TINY_MODEL:
        base["hidden_size"] = model_section.get("hidden_size", TINY_HIDDEN_SIZE)
    else:
        base["path"] = str(Path(base["path"]).resolve())
    return base


def write_record(directory: Path, record: dict) -> None:
    """Write :func:`run_record`'s ``record`` into ``directory``."""
    (Path(directory) / RECORD_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")


def read_record(directory: Path) -> dict | None:
    """The record :func:`write_record` left in ``directory``, or None where there is none."""
    file = Path(directory) / RECORD_FILE
    if not file.is_file():
        return None
    return json.loads(file.read_text(encoding="utf-8"))


def setting_differences(before: dict | None, now: dict | None) -> list[str]:
    """The LoRA settings that differ between two runs' (None: a full fine-tune), by name; the
    target modules compare as sets, since their order changes no adapter."""
    if before is None or now is None:
        return [] if before is now else ["model.lora"]

    def comparable(settings: dict) -> dict:
        targets = settings.get("target_modules")
        # runs recorded before the setting existed trained no token rows
        return {"train_latent_tokens": False, **settings,
                "target_modules": None if targets is None else sorted(targets)}

    before, now = comparable(before), comparable(now)
    return [f"model.lora.{key}" for key in sorted(set(before) | set(now))
            if before.get(key) != now.get(key)]
