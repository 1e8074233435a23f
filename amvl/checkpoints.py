"""The models of the ``amvl`` command: a run config's base model, and the directories that
``amvl train`` writes, loaded for ``amvl eval`` and ``amvl generate``: ``final/`` (``AMVLModel.save_pretrained``, the
image processor in ``base/``, the prompt format) and ``checkpoint-<step>/`` (the weights alone,
built on the run config's model section). A LoRA run's ``final/`` and checkpoints hold the
adapter in ``base/`` instead, with the record of the base model it adapts (:mod:`amvl.lora`),
and load on their own."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from amvl.config import AMVLConfig
from amvl.lora import (RECORD_FILE, TINY_HIDDEN_SIZE, TINY_MODEL, has_adapter, read_record,
                       require_peft)
from amvl.run_config import PROMPT_KEYS, prompt_format

if TYPE_CHECKING:
    import torch
    from transformers import BaseImageProcessor, PreTrainedModel, PreTrainedTokenizerBase

    from amvl.model import AMVLModel

FINAL_DIR = "final"
PROMPT_FORMAT_FILE = "prompt_format.json"  # in final/: how the run formatted its prompts
# In amvl train's checkpoints: the base model the run trains on (lora.base_record), which a
# resume compares before the model loads
BASE_RECORD_FILE = "base_model.json"
# In final/: the training step its weights are of, so that a rerun with --resume can tell a
# final/ older than the last checkpoint (a run killed before it wrote final/)
TRAINED_STEP_FILE = "trained_step.json"


def load_base(model_section: dict) -> tuple[PreTrainedModel, PreTrainedTokenizerBase,
                                            BaseImageProcessor | None]:
    """(base model, tokenizer, image processor or None) from a run config's model section."""
    import torch
    import transformers

    source = str(model_section["path"])
    attention = model_section.get("attn_implementation", "sdpa")
    if source == TINY_MODEL:
        from amvl.puzzles import vocabulary
        from amvl.tiny import tiny_image_processor, tiny_qwen2_vl, word_tokenizer

        tokenizer = word_tokenizer(vocabulary(), vision=True)
        base = tiny_qwen2_vl(tokenizer, hidden=int(model_section.get("hidden_size",
                                                                     TINY_HIDDEN_SIZE)))
        base = base.to(getattr(torch, model_section.get("dtype", "float32")))
        return with_attention(base, attention), tokenizer, tiny_image_processor()
    directory = Path(source)
    if not (directory / "config.json").is_file():
        raise SystemExit(f"amvl: model.path {source} is not a local Hugging Face checkpoint "
                         "(no config.json); nothing is downloaded")
    architectures = json.loads((directory / "config.json").read_text(encoding="utf-8")
                               ).get("architectures")
    arch = architectures[0] if architectures else None
    if not isinstance(arch, str) or not hasattr(transformers, arch):
        raise SystemExit(f"amvl: {directory / 'config.json'} names no model class transformers "
                         f"has (architectures: {architectures!r})")
    dtype = getattr(torch, model_section.get("dtype", "float32"))
    base = getattr(transformers, arch).from_pretrained(
        directory, dtype=dtype, use_safetensors=True,
        attn_implementation="sdpa" if attention == "amvl" else attention)
    from amvl.saving import load_saved_tokenizer

    tokenizer = load_saved_tokenizer(directory)
    processor = None
    if hasattr(base.config, "vision_config"):
        processor = load_image_processor(directory)
    return with_attention(base, attention), tokenizer, processor


def load_image_processor(directory: Path) -> BaseImageProcessor:
    """The image processor saved in ``directory``. Without torchvision, transformers 5.17's
    AutoImageProcessor refuses even processors that have a pillow backend: then the saved
    type's pillow class (``...Pil``) or the type itself, which falls back to pillow."""
    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(directory)
    except ImportError as err:
        config_file = directory / "preprocessor_config.json"
        saved = json.loads(config_file.read_text(encoding="utf-8")
                           ).get("image_processor_type", "") \
            if config_file.is_file() else ""
        name = saved.removesuffix("Fast")
        for candidate in (f"{name}Pil", name) if name else ():
            try:  # a lazy attribute may itself be a class that needs torchvision
                return getattr(transformers, candidate).from_pretrained(directory)
            except (AttributeError, ImportError):
                continue
        raise SystemExit(f"amvl: cannot load the image processor in {directory}: {err}") \
            from None


def with_attention(base, attention: str):
    """``attn_implementation: amvl`` puts the language model on the latent-block kernel and
    leaves a vision tower on SDPA (``amvl_kernels.hf.use_amvl_attention``); any other name is
    transformers' own, set at load."""
    if attention == "amvl":
        from amvl_kernels.hf import use_amvl_attention

        use_amvl_attention(base)
    return base


def is_training_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` is one of ``amvl train``'s ``checkpoint-<step>`` directories
    (amvl.training.save_checkpoint): the whole model's weights in one ``model.safetensors``
    beside the resume state, without ``base/`` (the base model's config, tokenizer and image
    processor), which ``final/`` and ``AMVLModel.save_pretrained`` hold."""
    return ((directory / "state.json").is_file() and (directory / "model.safetensors").is_file()
            and not (directory / "base").is_dir())


def load_trained(directory: Path, model_section: dict | None = None, command: str = "eval",
                 device: torch.device | None = None
                 ) -> tuple[AMVLModel, BaseImageProcessor | None]:
    """(AMVLModel on ``device``, by default the GPU when there is one, image processor or
    None) of a directory written by ``amvl train``: ``final/`` (or
    ``AMVLModel.save_pretrained`` plus the processor's own ``save_pretrained`` into ``base/``),
    or a ``checkpoint-<step>``, which is built on the run config's ``model_section`` (the
    model it trained from). Either comes back on the base's default attention, in eval mode."""
    import torch

    if is_training_checkpoint(directory):
        model, processor = _load_training_checkpoint(directory, model_section, command)
    else:
        model, processor = _load_saved_model(directory, command)
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda")
    if device is not None:
        model.to(device)
    return model, processor


def _load_saved_model(directory: Path, command: str
                      ) -> tuple[AMVLModel, BaseImageProcessor | None]:
    """What ``AMVLModel.save_pretrained`` wrote into ``directory``, and the image processor
    saved beside the base model (for a VLM)."""
    from amvl.model import AMVLModel

    if has_adapter(directory):
        return _load_lora_run(directory)
    model = AMVLModel.from_pretrained(directory)
    processor = None
    if model.is_vlm:
        if (directory / "base" / "preprocessor_config.json").is_file():
            processor = load_image_processor(directory / "base")
        else:
            from amvl.tiny import tiny_image_processor

            # Only the demo's tiny model may go without its processor: any other one would
            # get images cut to the wrong patches (or to 32 pixels) without a word.
            processor = tiny_image_processor()
            vision = model.base.config.vision_config
            if (getattr(vision, "patch_size", None) != processor.patch_size
                    or getattr(vision, "spatial_merge_size", None) != processor.merge_size
                    or model.base.config.get_text_config().hidden_size > 256):
                raise SystemExit(f"amvl {command}: no image processor in "
                                 f"{directory / 'base'}; save the model's processor there "
                                 "(processor.save_pretrained), as amvl train does")
    return model, processor


def _load_lora_run(directory: Path) -> tuple[AMVLModel, BaseImageProcessor | None]:
    """A LoRA run's ``final/`` or checkpoint: the frozen base its record names (rebuilt from
    the run's seed for the tiny model) under its adapter, the heads, injector, slot embeddings
    and latent tokens' rows loaded; the image processor saved in ``base/``, else the base's.

    The adapter is not merged into the base: a bf16 base would round the merged weights
    (1.9e-3 nats on a small model), and a tied embedding would take an adapter of the LM
    head into the input embeddings too. The trained token rows are (exactly: a copy). The
    model scores as it trained."""
    import torch
    from peft import PeftModel

    from amvl.config import AMVLConfig
    from amvl.model import AMVLModel, ensure_special_tokens
    from amvl.saving import load_saved_tokenizer

    record = read_record(directory)
    tokenizer = load_saved_tokenizer(directory / "base")
    with torch.random.fork_rng(devices=[]):  # the caller's generator is left as it was
        if record["base"]["path"] == TINY_MODEL:  # as amvl train seeded it before building it
            torch.manual_seed(record["seed"])
        base, _, base_processor = load_base(record["base"])
        # the latent tokens' rows before PEFT wraps the embeddings (its trainable tokens
        # index them); their values come back from the saved rows and the adapter
        ensure_special_tokens(base, tokenizer, AMVLConfig.load(directory))
    adapted = PeftModel.from_pretrained(base, directory / "base")
    model = AMVLModel.from_pretrained(directory, base_model=adapted, tokenizer=tokenizer)
    merge_trainable_tokens(model)
    processor = None
    if model.is_vlm:
        processor = load_image_processor(directory / "base") \
            if (directory / "base" / "preprocessor_config.json").is_file() else base_processor
    return model.eval(), processor


def merge_trainable_tokens(model: AMVLModel) -> None:
    """Put the trained latent token rows of PEFT's trainable tokens into the stored embedding
    matrix (and a tied LM head's), for inference: unmerged, every lookup and LM head call
    builds a copy of the whole matrix. Exact: the rows are copied as the unmerged forward
    copies them. The LoRA adapters themselves stay unmerged."""
    try:
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    except ImportError:  # a PEFT without trainable tokens: nothing to merge
        return
    for module in model.modules():
        if isinstance(module, TrainableTokensLayer) and not module.merged:
            module.merge()


def _load_training_checkpoint(directory: Path, model_section: dict | None, command: str
                              ) -> tuple[AMVLModel, BaseImageProcessor | None]:
    """A ``checkpoint-<step>`` of ``amvl train`` as a model: the base model, tokenizer and
    image processor of the run config's model section (as training loaded them), the
    checkpoint's AMVL config, then every weight from its ``model.safetensors``, which must
    fit exactly (no key missing or left over, every shape equal)."""
    from safetensors.torch import load_model

    from amvl.model import AMVLModel

    # the commands check before anything loads; a caller of its own gets the same errors
    check_trained(directory.name, directory, model_section, command)
    # the default attention, as a saved model comes back: the commands set the config's
    section = {key: value for key, value in model_section.items()
               if key != "attn_implementation"}
    base, tokenizer, processor = load_base(section)
    model = AMVLModel(base, tokenizer, AMVLConfig.load(directory))
    try:
        load_model(model, str(directory / "model.safetensors"), strict=True)
    except RuntimeError as err:  # keys or shapes of another model
        raise SystemExit(f"amvl {command}: {directory / 'model.safetensors'} does not fit the "
                         f"model of the run config's model.path {model_section['path']} (was "
                         f"the checkpoint trained from another model?): {err}") from None
    return model.eval(), processor


def _base_config_file(directory: Path, model_section: dict | None) -> Path | None:
    """The config.json of the base model a directory of ``amvl train`` holds or, for a
    training checkpoint, is built on (None for the tiny model, which has none)."""
    if has_adapter(directory):
        record = read_record(directory)
        path = record["base"]["path"] if record is not None else TINY_MODEL
        return None if path == TINY_MODEL else Path(path) / "config.json"
    if not is_training_checkpoint(directory):
        return directory / "base" / "config.json"
    if model_section is None or model_section["path"] == TINY_MODEL:
        return None
    return Path(model_section["path"]) / "config.json"


def is_text_only(directory: Path, model_section: dict | None = None) -> bool:
    """Whether the base model of a directory of ``amvl train`` has no vision tower (False
    when that cannot be read without loading it; the tiny model has one). A LoRA run's is
    the base model its record names."""
    config_file = _base_config_file(directory, model_section)
    return config_file is not None and config_file.is_file() and \
        "vision_config" not in json.loads(config_file.read_text(encoding="utf-8"))


def check_trained(name: str, directory: Path, model_section: dict | None = None,
                  command: str = "eval") -> None:
    """Refuse a directory that ``amvl eval`` cannot load, before any model loads: one that
    ``amvl train`` did not write, or a training checkpoint without the run config whose model
    section holds what the checkpoint lacks (the base model's config, tokenizer and image
    processor)."""
    if not (directory / "amvl_config.json").is_file():
        run_dir = (directory / FINAL_DIR).is_dir() or any(directory.glob("checkpoint-*"))
        hint = (f": it is a run's output directory, give {directory / FINAL_DIR} (or one of its "
                "checkpoint-<step> with the run's --config)") if run_dir else ""
        raise SystemExit(f"amvl {command}: {name}: {directory} is not a model written by "
                         f"amvl train (no amvl_config.json){hint}")
    if has_adapter(directory):
        _check_lora_run(name, directory, command)
    if is_training_checkpoint(directory) and model_section is None:
        raise SystemExit(
            f"amvl {command}: {name}: {directory} is a training checkpoint, which holds the "
            "weights but not the base model's config, tokenizer or image processor: give the "
            "run's --config as well (its model section is loaded and the checkpoint's weights "
            f"put into it), or use the run's {FINAL_DIR}/, which holds everything")


def _check_lora_run(name: str, directory: Path, command: str) -> None:
    """Refuse a directory holding a LoRA adapter that cannot load: PEFT missing, no record of
    the base model it adapts (an adapter saved in Python, not by amvl train), or a base
    model no longer where the record says."""
    require_peft(command)
    record = read_record(directory)
    if record is None:
        raise SystemExit(
            f"amvl {command}: {name}: {directory / 'base'} holds a PEFT adapter but "
            f"{directory} has no {RECORD_FILE}, amvl train's record of the base model it "
            "adapts: load it in Python, AMVLModel.from_pretrained(directory, base_model="
            "<the base model>), which loads the adapter onto it")
    path = record["base"]["path"]
    if path != TINY_MODEL and not (Path(path) / "config.json").is_file():
        raise SystemExit(f"amvl {command}: {name}: the LoRA adapter in {directory} adapts the "
                         f"base model {path}, which is not there any more (no config.json)")


def trained_prompt_format(name: str, directory: Path, data_section: dict,
                          command: str = "eval") -> dict | None:
    """The prompt format ``amvl train`` recorded in a ``final/`` directory, else None (a
    training checkpoint, or a directory from before the record: the run config's data section
    applies). A config that sets another format is overruled, with a note."""
    file = directory / PROMPT_FORMAT_FILE
    if not file.is_file():
        return None
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SystemExit(f"amvl {command}: {name}: {file} is not JSON: {err}") from None
    if isinstance(saved, dict) and set(saved) == set(PROMPT_KEYS) - {"add_bos"}:
        saved["add_bos"] = False  # recorded before add_bos: its prompts had no BOS
    if not isinstance(saved, dict) or set(saved) != set(PROMPT_KEYS):
        raise SystemExit(f"amvl {command}: {name}: {file} must map {list(PROMPT_KEYS)} to "
                         "values")
    wanted = prompt_format(data_section)
    if wanted["add_bos"] is None:  # the collator's choice, which the record holds
        wanted["add_bos"] = saved["add_bos"]
    if any(key in data_section for key in PROMPT_KEYS) and wanted != saved:
        print(f"amvl {command}: {name} was trained with another prompt format than the "
              f"config's data section sets ({file}); it runs with its own", file=sys.stderr)
    return saved
