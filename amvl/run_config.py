"""A run of the ``amvl`` command: its YAML config, checked key by key and value by value, and
its training data in JSON lines.

Sections (each optional but ``model``): ``model`` (``path``, ``dtype``,
``attn_implementation``, ``hidden_size`` for the tiny model, ``lora`` for LoRA adapters),
``amvl`` (:class:`AMVLConfig`), ``train`` (:class:`TrainConfig`), ``data`` (``train``,
``eval``, ``per_family``, ``max_prompt_tokens``, ``max_answer_tokens``, ``chat_template``,
``system_prompt``, ``add_bos``), ``output_dir`` and ``eval`` (``baselines``). A misspelt key or
a bad value is an error naming it, never a setting left at its default.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import fields
from math import inf
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from amvl.config import AMVLConfig
from amvl.training import TrainConfig

if TYPE_CHECKING:
    from amvl.data import AMVLCollator

# the data keys that format prompts (a final/ of before add_bos has the first two)
PROMPT_KEYS = ("chat_template", "system_prompt", "add_bos")

SECTIONS = ("model", "amvl", "train", "data", "output_dir", "eval")
MODEL_KEYS = ("path", "dtype", "attn_implementation", "hidden_size", "lora")
LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "train_latent_tokens")
DATA_KEYS = ("train", "eval", "per_family", "max_prompt_tokens", "max_answer_tokens",
             *PROMPT_KEYS)
EVAL_KEYS = ("baselines",)


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A key written twice in one mapping of a run config."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key repeated in one mapping is an error: PyYAML keeps the
    last of them without a word, so a second ``train:`` section appended to a config dropped
    the first one whole. Keys merged in with ``<<`` may still be overridden, as YAML allows."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # unhashable: the safe loader names it below
                continue
            if repeated:
                raise _DuplicateKey(None, None, f"key {key!r} appears twice",
                                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


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
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as err:
        raise SystemExit(f"amvl: {path}: {err.problem} (the second time on line "
                         f"{err.problem_mark.line + 1}): write each key once; only the last "
                         "would count") from None
    except yaml.YAMLError as err:
        raise SystemExit(f"amvl: {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SystemExit(f"amvl: {path} must hold a mapping of sections {list(SECTIONS)}")
    _check_keys(raw, "top level", SECTIONS)
    if "path" not in _check_keys(raw.get("model"), "model", MODEL_KEYS):
        raise SystemExit(f"amvl: {path} needs model.path")
    _check_model_values(path, raw["model"])
    raw["lora_settings"] = lora_settings(path, raw["model"]["lora"]) \
        if "lora" in raw["model"] else None
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
    if raw["train_config"].eval_every and not (raw.get("data") or {}).get("eval"):
        raise SystemExit(f"amvl: {path}: train.eval_every validates on data.eval, which is "
                         "not set")
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
    attention = model.get("attn_implementation", "sdpa")
    if not isinstance(attention, str) or "flash" in attention.lower():
        # refused by AMVLModel too, but here before minutes of loading
        raise SystemExit(f"amvl: {path}: model.attn_implementation {attention!r}: "
                         "flash-attention ignores the masks of AMVL's sequences (the prior's "
                         "slots would see the answer); use amvl (the latent-block kernel, "
                         "flash-attention speed with the masks), sdpa or eager")
    if "hidden_size" in model:
        if model["path"] != "tiny-qwen2-vl":
            raise SystemExit(f"amvl: {path}: model.hidden_size is for model.path "
                             "tiny-qwen2-vl only; a checkpoint has its own")
        size = model["hidden_size"]
        # 4 heads whose rotary half splits 2:1:1 into mrope's t, h and w sections
        if not _positive_int(size) or size % 32:
            raise SystemExit(f"amvl: {path}: model.hidden_size must be a positive multiple "
                             f"of 32, got {size!r}")


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < inf


def lora_settings(path: Path, section) -> dict:
    """The ``model.lora`` section of the run config at ``path``, checked, with its defaults
    filled in: ``r`` (required), ``alpha`` (2 * r), ``dropout`` (0.0), ``target_modules``
    (None: every linear layer of the text decoder, see :mod:`amvl.lora`) and
    ``train_latent_tokens`` (True: the latent tokens' embedding rows train too)."""
    lora = _check_keys(section, "model.lora", LORA_KEYS)
    if "r" not in lora:
        raise SystemExit(f"amvl: {path}: model.lora needs r, the adapters' rank (e.g. "
                         "model: {lora: {r: 16}})")
    if not _positive_int(lora["r"]):
        raise SystemExit(f"amvl: {path}: model.lora.r must be a positive int, got "
                         f"{lora['r']!r}")
    alpha = lora.get("alpha", 2 * lora["r"])
    if not _positive_number(alpha):
        raise SystemExit(f"amvl: {path}: model.lora.alpha must be a positive number, got "
                         f"{alpha!r}")
    dropout = lora.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0 <= dropout < 1:
        raise SystemExit(f"amvl: {path}: model.lora.dropout must be a number in [0, 1), got "
                         f"{dropout!r}")
    targets = lora.get("target_modules")
    if targets is not None and (
            not isinstance(targets, list) or not targets
            or not all(isinstance(name, str) and name for name in targets)
            or len(set(targets)) < len(targets)):
        raise SystemExit(f"amvl: {path}: model.lora.target_modules must be a non-empty list "
                         f"of distinct module names, got {targets!r}")
    tokens = lora.get("train_latent_tokens", True)
    if not isinstance(tokens, bool):
        raise SystemExit(f"amvl: {path}: model.lora.train_latent_tokens must be true or false, "
                         f"got {tokens!r}")
    return {"r": lora["r"], "alpha": alpha, "dropout": float(dropout),
            "target_modules": targets, "train_latent_tokens": tokens}


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
    if "eval" in data and (not isinstance(data["eval"], str) or not data["eval"]):
        raise SystemExit(f"amvl: {path}: data.eval must be a JSON-lines file of held-out "
                         f"examples, got {data['eval']!r}")
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
    bos = data.get("add_bos")
    if bos is not None and (not isinstance(bos, bool) or (bos and template)):
        raise SystemExit(f"amvl: {path}: data.add_bos must be true or false, and true only "
                         f"without data.chat_template, which writes the prompt's start itself "
                         f"(got {bos!r}; unset: where the tokenizer adds BOS by itself)")


def prompt_format(data_section: dict) -> dict:
    """The run's prompt format from its data section: ``chat_template`` (False, True for the
    tokenizer's own, or a template file's text), ``system_prompt`` and ``add_bos`` (None:
    where the tokenizer adds BOS by itself; the collator resolves it)."""
    template = data_section.get("chat_template", False)
    if isinstance(template, str):
        template = Path(template).read_text(encoding="utf-8")
    return {"chat_template": template, "system_prompt": data_section.get("system_prompt"),
            "add_bos": data_section.get("add_bos")}


def read_jsonl(path: str | Path) -> list[dict]:
    """Training examples from JSON lines (see :func:`read_jsonl_lines`)."""
    return read_jsonl_lines(path)[0]


def read_jsonl_lines(path: str | Path, need_answers: bool = True
                     ) -> tuple[list[dict], list[int]]:
    """(examples, the line each came from) of a JSON-lines file of ``{"images": [paths],
    "question": str, "answer": str}`` records (UTF-8); without ``need_answers`` (questions
    to answer) a record may leave the answer out or null, and its example has none.

    Image paths are relative to the file (an absolute one stays as it is) and are kept as
    paths, checked only to exist: the collator decodes each image when its batch is built, so
    no process holds the whole data set's pixels. Raises SystemExit naming the file and line
    of the first record that is not an example. Empty answers are allowed (the example trains
    on the EOS token alone), with one warning counting them."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"amvl: no data file {path}")
    examples, line_numbers, empty_answers = [], [], []
    try:  # utf-8-sig: a byte-order mark that some editors write is not part of line 1
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line_no = path.read_bytes()[: err.start].count(b"\n") + 1
        raise SystemExit(f"amvl: {path} line {line_no}: not UTF-8 ({err.reason} at byte "
                         f"{err.start})") from None
    # JSON lines end at \n only: splitlines() also breaks at U+2028, U+0085, ... that a JSON
    # string may hold as they are
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            example = _jsonl_example(path, json.loads(line), need_answers)
        except KeyError as err:
            raise SystemExit(f"amvl: {path} line {line_no}: no {err} field") from None
        except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
            raise SystemExit(f"amvl: {path} line {line_no}: {err}") from None
        if need_answers and not example["answer"]:
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


def _jsonl_example(path: Path, record: object, need_answers: bool = True) -> dict:
    """One JSON-lines record as an example: its texts exactly as written (str() would turn
    null into "None" and a list into "['one']"), its images as paths resolved against the
    file's directory. Raises KeyError for a missing text, TypeError or ValueError for the
    rest."""
    if not isinstance(record, dict):
        raise TypeError(f"expected a JSON object, got {type(record).__name__}")
    texts = {}
    for key in ("question", "answer"):
        if key == "answer" and not need_answers and record.get(key) is None:
            continue
        value = record[key]
        if not isinstance(value, str):
            raise TypeError(f"{key!r} must be a string, got {json.dumps(value)[:80]}")
        try:  # a JSON escape of half a surrogate pair ("\ud83d") is no character
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{key!r} holds an unpaired surrogate escape (\\ud800-\\udfff), "
                             "which is no character") from None
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
    ident = record.get("id")  # carried to what amvl generate writes
    if ident is not None and (isinstance(ident, bool) or not isinstance(ident, (str, int))):
        raise TypeError(f"'id' must be a string or an integer, got {json.dumps(ident)[:80]}")
    return {"images": images, **texts, **({} if ident is None else {"id": ident})}


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
