"""Multiple-choice evaluation on benchmark files already on disk: BLINK and VisualPuzzles.

The loaders read the public schemas as they are downloaded (parquet as the Hugging Face hub
stores them, or the same records as JSON / JSON Lines) and return examples in the format of
:mod:`amvl.diagnostics` and :class:`amvl.data.AMVLCollator`::

    {"id": str, "subtask": str, "images": [PIL.Image (RGB), ...],
     "question": str,                  # the question with its lettered options: the prompt
     "choices": ["(A)", "(B)", ...],   # what is scored
     "answer": "(B)",                  # one of choices (None for unlabelled records)
     "options": [str, ...] | None,     # the option texts (None: drawn inside the image)
     "source": "FILE row N"}           # where the record came from

Choices are the option labels, not the option texts. Both benchmarks list the lettered options
in the prompt and expect a letter back, so every candidate continuation has the same short
shape, and a mean-token NLL over labels carries no bias from option length; VisualPuzzles also
has puzzles whose options exist only inside the image, where labels are all there is.

Scoring (:func:`evaluate_benchmark`): the prediction is the label of lowest mean token NLL given
the prior latents z = mu_p, i.e. what inference sees (a model trained with objective "none" is
scored without a latent block). Ties go to the earlier label. Choices that the tokenizer turns
into the same ids (e.g. "(A)" and "(B)" both as its unknown token, when it lacks those
characters) always tie: :func:`prior_choice_nll` warns, naming how many examples have them.

Averages. BLINK's authors report the unweighted mean over its 14 subtasks (their eval script);
VisualPuzzles' authors report accuracy over all puzzles beside the five category accuracies
(their lmms-eval task). :func:`evaluate_benchmark` returns both, and
:func:`format_accuracy_table` shows the one each paper uses.

Schema facts this module relies on:

- BLINK (BLINK-Benchmark/BLINK, arXiv 2404.12390): one folder per subtask holding
  ``val-00000-of-00001.parquet`` and ``test-00000-of-00001.parquet``. A record has ``idx``
  (e.g. "val_Counting_1"), ``question``, ``sub_task`` (the folder name), ``image_1`` ..
  ``image_4`` (unused slots null; images as ``{"bytes", "path"}`` structs), ``choices`` (list
  of strings), ``answer`` as "(A)", ``prompt`` (question plus lettered options, the model
  input) and ``explanation``. Test answers are withheld: ``split="test"`` is refused unless
  ``unlabelled=True``, which loads the records with ``answer=None`` (predictions only).
- VisualPuzzles (neulab/VisualPuzzles, arXiv 2504.10342): a single ``data.parquet`` (its one
  split was first named "train", later "test"). A record has ``id``, ``category`` (Algorithmic,
  Analogical, Deductive, Inductive, Spatial), ``question``, ``options`` (four strings, or null
  when the options are drawn in the image), ``answer`` as a letter "A".."D" and ``image``
  (the authors' raw JSON has ``image_path`` instead). The prompt follows the authors' layout:
  "Question: ...\\nOptions:\\n(A) ...\\n(B) ..." or "Options: Choose from (A) (B) (C) (D) in
  the image."

Images may be embedded (parquet bytes; in JSON base64 text, ``{"bytes": base64}`` or a
``data:`` URI) or files (paths relative to the data file). A bare string is a file's path, or
base64 text (as VLMEvalKit-style exports write images) when it is long, holds base64 characters
only and names no file; base64 may be broken into lines (MIME style). An image slot that is
null or a struct of nulls (``{"bytes": null, "path": null}``) is empty. Every problem with a
record (missing or mistyped field, answer not among the options, undecodable image, missing or
unreadable image file) raises :class:`BenchmarkRecordError` (a ValueError) naming the file, the
row (0-based, in file order) and the record's id; nothing is skipped. A data file that is not
UTF-8 JSON or parquet raises a ValueError naming it (and the line). Images are decoded when
loading, so a bad one fails at once rather than mid-evaluation (the cost: decoded images stay
in memory, a few GB for BLINK).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import os
import pickle
import re
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from amvl.data import EncodedImage, decode_image, rgb_image
from amvl.model import in_eval_mode
from amvl.sharded import choices_to_score, several_processes, sharded_across_processes, \
    with_choice
from amvl.step_batches import prefetching_loader, stop_workers

if TYPE_CHECKING:
    from amvl.data import AMVLCollator
    from amvl.model import AMVLModel

# Subtask (folder and ``sub_task`` name) -> column header, in the order of the BLINK paper's
# results table (also the order of the authors' eval script).
BLINK_SUBTASKS: dict[str, str] = {
    "Visual_Similarity": "Similarity",
    "Counting": "Counting",
    "Relative_Depth": "Depth",
    "Jigsaw": "Jigsaw",
    "Art_Style": "Art",
    "Functional_Correspondence": "Fun.Corr.",
    "Semantic_Correspondence": "Sem.Corr.",
    "Spatial_Relation": "Spatial",
    "Object_Localization": "Local.",
    "Visual_Correspondence": "Vis.Corr.",
    "Multi-view_Reasoning": "Multi-view",
    "Relative_Reflectance": "Reflect.",
    "Forensic_Detection": "Forensic",
    "IQ_Test": "IQ",
}
VISUALPUZZLES_CATEGORIES = ("Algorithmic", "Analogical", "Deductive", "Inductive", "Spatial")
# puzzles: the built-in suite (amvl.puzzles); jsonl: multiple-choice records of one's own
BENCHMARKS = ("blink", "visualpuzzles", "puzzles", "jsonl")
DATA_SUFFIXES = (".parquet", ".json", ".jsonl")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
BLINK_IMAGE_FIELDS = ("image_1", "image_2", "image_3", "image_4")
# What base64.encodebytes and MIME-style exporters break base64 text with: b64decode's
# validate=True refuses it, so it is removed first.
_ASCII_WHITESPACE = re.compile(r"[ \t\n\r\f\v]+")
# A bare string taken for an image's base64 text rather than a path (when it names no file):
# base64 characters only (line breaks allowed), at least 64 of them. An image's base64 is
# longer (a 1-pixel PNG's is 92 characters); a path that long without a "." is rare.
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/ \t\n\r\f\v]{64,}={0,2}[ \t\n\r\f\v]*")


class BenchmarkRecordError(ValueError):
    """A record of a benchmark file that cannot be used. The message names the file, the row
    (0-based) and the record's id; the same are attributes ``file``, ``row``, ``record_id``."""

    def __init__(self, file: Path, row: int, record_id: str | None, problem: str):
        where = f"{file}: row {row}" + (f" (id {record_id!r})" if record_id is not None else "")
        super().__init__(f"{where}: {problem}")
        self.file, self.row, self.record_id = str(file), row, record_id


# ---------------------------------------------------------------------------------- records


class _Row:
    """One raw record with its origin, and typed access that fails naming that origin."""

    def __init__(self, file: Path, row: int, record, id_field: str, encoded: bool = False):
        self.file, self.row, self.id = file, row, None
        self.encoded = encoded  # images kept as their files' bytes once they decode
        if not isinstance(record, dict):
            self.fail(f"a record must be an object, got {type(record).__name__}")
        self.record = record
        value = self.field(id_field)
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.fail(f"{id_field!r} must be a string or an integer, got {type(value).__name__}")
        self.id = str(value)

    def fail(self, problem: str) -> NoReturn:
        raise BenchmarkRecordError(self.file, self.row, self.id, problem)

    def field(self, key: str):
        if key not in self.record:
            self.fail(f"missing field {key!r}")
        return self.record[key]

    def text(self, key: str) -> str:
        value = self.field(key)
        if not isinstance(value, str):
            self.fail(f"{key!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            self.fail(f"{key!r} is empty")
        return value

    def strings(self, key: str) -> list[str]:
        value = self.field(key)
        if not isinstance(value, (list, tuple)) or \
                not all(isinstance(v, str) for v in value):
            self.fail(f"{key!r} must be a list of strings, got {value!r:.80}")
        if not 2 <= len(value) <= len(LETTERS):
            self.fail(f"{key!r} must hold 2 to {len(LETTERS)} options, got {len(value)}")
        return list(value)

    def answer_label(self, key: str, n_options: int) -> str:
        """The answer as a label "(X)"; BLINK writes "(A)", VisualPuzzles "A"."""
        value = self.text(key).strip()
        match = re.fullmatch(r"\(([A-Za-z])\)|([A-Za-z])", value)
        if match is None:
            self.fail(f"{key!r} is {value!r}, not an option letter such as '(A)' or 'A'")
        index = LETTERS.index((match.group(1) or match.group(2)).upper())
        if index >= n_options:
            self.fail(f"answer {value!r} is not among the options {_labels(n_options)}")
        return f"({LETTERS[index]})"

    def image(self, key: str, value) -> Image.Image:
        where = f"image {key!r}"
        if isinstance(value, Image.Image):
            return rgb_image(value)
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if data is not None:
                return self._decode(where, self._bytes(where, data))
            if path is None:
                self.fail(f"{where} has neither 'bytes' nor 'path'")
            if isinstance(path, str) and path:  # a struct's path is a path, never base64
                return self._open(where, path)
            value = path
        if isinstance(value, (bytes, bytearray)):
            return self._decode(where, bytes(value))
        if isinstance(value, str) and value.startswith("data:"):
            return self._decode(where, self._bytes(where, value.partition(",")[2]))
        if isinstance(value, str) and _BASE64_TEXT.fullmatch(value) and \
                not self._names_a_file(value):
            return self._decode(f"{where} (base64 text)", self._bytes(
                where, value, f"{_shortened(value)} is no file, nor valid base64"))
        if isinstance(value, str) and value:
            return self._open(where, value)
        self.fail(f"{where} must be image bytes, base64 text, a {{'bytes', 'path'}} object or "
                  f"a file path, got {type(value).__name__}")

    def _bytes(self, where: str, data, refusal: str = "'bytes' is not valid base64") -> bytes:
        """``data`` as bytes: bytes as they are, text decoded as base64 (JSON cannot hold
        bytes); ``refusal`` says what is wrong with text that does not decode."""
        if isinstance(data, (bytes, bytearray)):
            return bytes(data)
        if isinstance(data, str):
            try:
                return base64.b64decode(_ASCII_WHITESPACE.sub("", data), validate=True)
            except (binascii.Error, ValueError) as err:
                self.fail(f"{where}: {refusal} ({err})")
        self.fail(f"{where}: 'bytes' must be bytes or base64 text, got {type(data).__name__}")

    def _file(self, path: str) -> Path:
        """``path`` as a file: a relative one is relative to the data file."""
        file = Path(path)
        return file if file.is_absolute() else self.file.parent / file

    def _names_a_file(self, path: str) -> bool:
        try:
            return self._file(path).is_file()
        except OSError:  # e.g. "File name too long", as base64 text taken for a path is
            return False

    def _open(self, where: str, path: str) -> Image.Image:
        file = self._file(path)
        shown = _shortened(str(file))  # a "path" may be many KB of base64
        try:
            if not file.is_file():
                self.fail(f"{where}: image file {shown} not found")
            data = file.read_bytes()
        except OSError as err:  # os.stat and reading raise it: no access, a name too long, ...
            self.fail(f"{where}: cannot read image file {shown} "
                      f"({err.strerror or type(err).__name__})")
        return self._decode(f"{where} ({shown})", data)

    def _decode(self, where: str, data: bytes) -> Image.Image | EncodedImage:
        try:
            image = decode_image(data)
        except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data
            self.fail(f"{where}: cannot decode the image ({type(err).__name__}: {err})")
        return EncodedImage(data) if self.encoded else image


def _labels(n: int) -> list[str]:
    return [f"({letter})" for letter in LETTERS[:n]]


def _shortened(text: str, limit: int = 200) -> str:
    """``text`` as it is up to ``limit`` characters, else its start and end (a file name's
    end names it best) and its length: error messages stay one readable line."""
    if len(text) <= limit:
        return text
    return f"{text[:limit // 2]}...{text[-limit // 4:]} ({len(text)} characters)"


def _empty_image(value) -> bool:
    """Whether an image slot holds no image: null, or a struct whose fields are all null (how
    pandas and polars write a null ``{"bytes", "path"}`` struct; HF datasets write null)."""
    return value is None or isinstance(value, dict) and all(v is None for v in value.values())


def _with_instruction(text: str, instruction: str | None) -> str:
    return text if not instruction else f"{text}\n{instruction}"


# ------------------------------------------------------------------------------------ files


def _existing(path: str | os.PathLike) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"benchmark path {root} does not exist")
    return root


def _is_data_file(file: Path, split: str | None) -> bool:
    """Whether ``file``, in a folder the loaders read, is read as data: a suffix they read
    and, with a split, a name after it ("val-00000-of-00001.parquet", "val.jsonl", ...)."""
    return file.suffix.lower() in DATA_SUFFIXES and \
        (split is None or re.match(rf"{re.escape(split)}[-_.]", file.name) is not None)


def _data_files(folder: Path, split: str | None) -> list[Path]:
    """Data files directly in ``folder``; with a split, only those named after it."""
    return [p for p in sorted(folder.iterdir()) if p.is_file() and _is_data_file(p, split)]


def _split_files(folder: Path, split: str) -> list[Path]:
    """A split's data files in ``folder``: named after it, or else every data file in a
    folder named after it (the hub's parquet conversion: ``Counting/val/0000.parquet``)."""
    files = _data_files(folder, split)
    if not files and (folder / split).is_dir():
        files = _data_files(folder / split, None)
    return files


def _check_data_file(file: Path) -> None:
    """Refuse a data file given by name that the loaders cannot read (an archive, a
    ``datasets`` Arrow file), rather than fail on its bytes as text."""
    if file.suffix.lower() not in DATA_SUFFIXES:
        kind = f"a {file.suffix} file" if file.suffix else "a file without a suffix"
        raise ValueError(f"{file}: {kind} is not read as benchmark data; the loaders read "
                         f"{', '.join(DATA_SUFFIXES)} files (unzip an archive first; for a "
                         "datasets save_to_disk folder's .arrow files, write the dataset with "
                         "Dataset.to_parquet)")


def _read_records(file: Path) -> list:
    if file.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError(f"reading {file} needs pyarrow (pip install pyarrow)") from err
        try:
            return pq.read_table(file).to_pylist()
        except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
            raise ValueError(f"{file}: not a readable parquet file ({err})") from err
    data = file.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # not part of line 1
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:  # else "'utf-8' codec can't decode ...", naming no file
        line = data[:bom + err.start].count(b"\n") + 1
        raise ValueError(f"{file}: line {line} is not UTF-8 ({err.reason} at byte "
                         f"{bom + err.start}); benchmark JSON must be UTF-8") from None
    if not text.strip():
        raise ValueError(f"{file}: the file is empty")
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: invalid JSON at line {err.lineno}: {err.msg}") from err
    records = []  # JSON Lines, which is also what `datasets` writes to a ".json" file
    # lines end at "\n" only: splitlines() also breaks at U+2028 and the like, which a JSON
    # string may hold as they are
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: line {lineno} is not JSON ({err.msg}); expected a JSON "
                             "array of records or JSON Lines, one record a line") from err
    return records


def _check_unique_ids(examples: list[dict]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for ex in examples:
        key = (ex["subtask"], ex["id"])
        if key in seen:
            raise ValueError(f"{ex['source']}: id {ex['id']!r} ({ex['subtask']}) was already "
                             f"loaded from {seen[key]}; is the same data on disk twice (e.g. "
                             "as parquet and as JSON)?")
        seen[key] = ex["source"]


def _check_subtasks_present(examples: list[dict], expected: Sequence[str], where: Path) -> None:
    found = {ex["subtask"] for ex in examples}
    missing = [s for s in expected if s not in found]
    if missing:
        raise ValueError(f"{where}: no records for {missing}")
    if not examples:
        raise ValueError(f"{where}: no records")


# ------------------------------------------------------------------------------------ BLINK


def _blink_name(name: str) -> str | None:
    """The canonical subtask name for ``name`` (case, spaces, underscores and hyphens
    ignored: "IQ_Test", "iq test" and "IQTest" all name IQ_Test)."""
    def key(text: str) -> str:
        return re.sub(r"[\s_-]+", "", text).lower()
    return next((s for s in BLINK_SUBTASKS if key(s) == key(name)), None)


def _blink_folders(root: Path) -> dict[str, Path]:
    """The subtask folders directly in ``root``, by canonical subtask name."""
    return {name: child for child in sorted(root.iterdir())
            if child.is_dir() and (name := _blink_name(child.name)) is not None}


def _blink_subtasks(subtasks: Sequence[str] | None) -> list[str] | None:
    if subtasks is None:
        return None
    if isinstance(subtasks, str):
        subtasks = [subtasks]
    if not subtasks:
        raise ValueError("subtasks is empty; pass None for every subtask found")
    names = []
    for s in subtasks:
        name = _blink_name(s)
        if name is None:
            raise ValueError(f"unknown BLINK subtask {s!r}; the subtasks are "
                             f"{list(BLINK_SUBTASKS)}")
        names.append(name)
    return names


def _blink_example(file: Path, row: int, record, folder_subtask: str | None,
                   wanted: list[str] | None, unlabelled: bool,
                   instruction: str | None, encoded: bool) -> dict | None:
    r = _Row(file, row, record, "idx", encoded)
    raw = r.text("sub_task")
    subtask = _blink_name(raw) or r.fail(f"unknown BLINK sub_task {raw!r}")
    if folder_subtask is not None and subtask != folder_subtask:
        r.fail(f"sub_task {raw!r} does not match its folder {folder_subtask!r}")
    if wanted is not None and subtask not in wanted:
        return None
    r.text("question")
    options = r.strings("choices")
    prompt = r.text("prompt")
    answer = None if unlabelled else r.answer_label("answer", len(options))
    if _empty_image(record.get("image_1")):
        r.fail("missing image: 'image_1' is absent, null or a struct of nulls")
    images = [r.image(k, record[k]) for k in BLINK_IMAGE_FIELDS
              if not _empty_image(record.get(k))]
    return {"id": r.id, "subtask": subtask, "images": images,
            "question": _with_instruction(prompt, instruction), "choices": _labels(len(options)),
            "answer": answer, "options": options, "source": f"{file} row {row}"}


def load_blink(path: str | os.PathLike, split: str = "val",
               subtasks: Sequence[str] | None = None, *, unlabelled: bool = False,
               instruction: str | None = None, encoded: bool = False) -> list[dict]:
    """BLINK multiple-choice examples from files on disk.

    Args:
        path: the dataset folder as downloaded (one folder per subtask, each with
            ``{split}-*.parquet`` or ``{split}.json`` / ``{split}.jsonl``), one subtask's
            folder, a folder of ``{split}`` files holding several subtasks, or one data file.
        split: "val" (labelled) or "test" (answers withheld; needs ``unlabelled=True``).
        subtasks: subtask names to load (case, spaces and underscores are ignored); each must
            be on disk. None: every subtask found.
        unlabelled: do not read answers; examples get ``answer=None``, for predictions only
            (the BLINK test split).
        instruction: a line appended to every prompt (e.g. "Answer with the option's letter
            from the given choices directly."); None keeps BLINK's ``prompt`` as it is.
        encoded: keep each image as its file's bytes (an :class:`amvl.data.EncodedImage`,
            which the collator decodes when its batch is built) once it has decoded here:
            a tenth of the memory or less, for every process of a run. False: PIL images.

    Returns:
        Examples in the order of the paper's subtasks, then file order (see the module doc).

    Raises:
        FileNotFoundError: ``path`` is missing, or holds no data file for the split / a
            requested subtask.
        BenchmarkRecordError: a malformed record (names file, row and idx).
        ValueError: the test split without ``unlabelled``, unknown subtask names, a subtask
            without records, ids loaded twice, a data file that is not UTF-8 JSON or parquet
            (or, given as ``path``, not of a suffix in ``DATA_SUFFIXES``).
    """
    if split == "test" and not unlabelled:
        raise ValueError("BLINK's test answers are withheld (the public test files carry no "
                         "gold answers; test scores come from the benchmark's evaluation "
                         "server). Use split='val' for accuracy, or unlabelled=True (amvl eval "
                         "--unlabelled) to load the test records with answer=None for "
                         "predictions.")
    root = _existing(path)
    wanted = _blink_subtasks(subtasks)
    sources: list[tuple[Path, str | None]] = []
    if root.is_file():
        # A file is read whatever the split; one named for another split is refused, or a
        # labelled val file read as "test" would silently lose its answers.
        _check_data_file(root)
        named = re.match(r"(val|validation|test|dev|train)(?=[-_.])", root.name.lower())
        if named and named.group(1) != split:
            raise ValueError(f"{root} is a {named.group(1)!r} file, but split={split!r}: pass "
                             f"split={named.group(1)!r}, or the file of the split you want")
        sources = [(root, None)]
    else:
        folders = _blink_folders(root)
        if folders:
            names = wanted or [s for s in BLINK_SUBTASKS if s in folders]
            missing = [s for s in names if s not in folders]
            if missing:
                raise FileNotFoundError(f"{root}: no folder for BLINK subtask(s) {missing}; "
                                        f"found {list(folders)}")
            for name in names:
                files = _split_files(folders[name], split)
                if not files:
                    raise FileNotFoundError(
                        f"{folders[name]}: no {split!r} data file ({split}-*.parquet, "
                        f"{split}.json, {split}.jsonl or {split}/*.parquet)")
                sources += [(f, name) for f in files]
        else:
            files = _split_files(root, split)
            if not files:
                raise FileNotFoundError(
                    f"{root}: neither BLINK subtask folders ({', '.join(BLINK_SUBTASKS)}) nor "
                    f"{split!r} data files ({split}-*.parquet, {split}.json, {split}.jsonl, "
                    f"{split}/*.parquet)")
            sources = [(f, _blink_name(root.name)) for f in files]
    examples = []
    for file, folder_subtask in sources:
        for row, record in enumerate(_read_records(file)):
            example = _blink_example(file, row, record, folder_subtask, wanted, unlabelled,
                                     instruction, encoded)
            if example is not None:
                examples.append(example)
    order = {s: i for i, s in enumerate(BLINK_SUBTASKS)}
    examples.sort(key=lambda ex: order[ex["subtask"]])  # stable: file order within a subtask
    expected = wanted or sorted({s for _, s in sources if s}, key=order.get)
    _check_subtasks_present(examples, expected, root)
    _check_unique_ids(examples)
    return examples


# ---------------------------------------------------------------------------- VisualPuzzles


def _visualpuzzles_category(name: str) -> str | None:
    return next((c for c in VISUALPUZZLES_CATEGORIES if c.lower() == name.strip().lower()),
                None)


def _visualpuzzles_example(file: Path, row: int, record, wanted: list[str] | None,
                           instruction: str | None, encoded: bool) -> dict | None:
    r = _Row(file, row, record, "id", encoded)
    raw = r.text("category")
    category = _visualpuzzles_category(raw) or r.fail(
        f"unknown VisualPuzzles category {raw!r}; expected one of {VISUALPUZZLES_CATEGORIES}")
    if wanted is not None and category not in wanted:
        return None
    question = r.text("question")
    options = None if r.field("options") is None else r.strings("options")
    n = 4 if options is None else len(options)  # options drawn in the image are (A)-(D)
    answer = r.answer_label("answer", n)
    if options is None:
        listing = "Options: Choose from (A) (B) (C) (D) in the image."
    else:
        listing = "Options:\n" + "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
    key = "image" if "image" in record else "image_path" if "image_path" in record else None
    if key is None or _empty_image(record[key]):
        r.fail("missing image: no 'image' (or 'image_path') value")
    prompt = f"Question: {question.strip()}\n{listing}"
    return {"id": r.id, "subtask": category, "images": [r.image(key, record[key])],
            "question": _with_instruction(prompt, instruction), "choices": _labels(n),
            "answer": answer, "options": options, "source": f"{file} row {row}"}


def load_visualpuzzles(path: str | os.PathLike, split: str | None = None,
                       categories: Sequence[str] | None = None, *,
                       instruction: str | None = None, encoded: bool = False) -> list[dict]:
    """VisualPuzzles multiple-choice examples from files on disk.

    Args:
        path: a data file (``data.parquet`` as on the hub, or JSON / JSON Lines), or a folder
            of them (or with them in a ``data/`` folder, as some hub revisions lay them out).
        split: in a folder, read only files named after it (``{split}-*.parquet``,
            ``{split}.json``, ...). None: every data file in the folder (the hub has just
            ``data.parquet``).
        categories: categories to keep (case ignored); None: all five.
        instruction: a line appended to every prompt; None adds none.
        encoded: as :func:`load_blink`'s (images as their files' bytes, decoded in batches).

    Returns:
        Examples in file order (see the module doc); ``subtask`` is the category.

    Raises:
        FileNotFoundError: ``path`` is missing or holds no data file.
        BenchmarkRecordError: a malformed record (names file, row and id).
        ValueError: unknown category names, a requested category without records, ids
            loaded twice, a data file that is not UTF-8 JSON or parquet (or, given as
            ``path``, not of a suffix in ``DATA_SUFFIXES``).
    """
    root = _existing(path)
    wanted = None
    if categories is not None:
        categories = [categories] if isinstance(categories, str) else categories
        if not categories:
            raise ValueError("categories is empty; pass None for all five")
        wanted = [_visualpuzzles_category(c) for c in categories]
        if None in wanted:
            raise ValueError(f"unknown VisualPuzzles categories in {list(categories)}; the "
                             f"categories are {list(VISUALPUZZLES_CATEGORIES)}")
    if root.is_file():
        _check_data_file(root)
    files = [root] if root.is_file() else _data_files(root, split)
    if not files and root.is_dir() and (root / "data").is_dir():
        files = _data_files(root / "data", split)  # a hub snapshot laid out as data/*.parquet
    if not files:
        named = f" for split {split!r}" if split else ""
        unsplit = [] if not split or not root.is_dir() else \
            _data_files(root, None) or ((root / "data").is_dir()
                                        and _data_files(root / "data", None))
        # the hub's snapshot holds one split, "test" on its card, in data.parquet
        hint = f"; its data files ({', '.join(f.name for f in unsplit[:3])}) are not named " \
               f"after a split: give no split to read them" if unsplit else ""
        raise FileNotFoundError(f"{root}: no data file{named} (*.parquet, *.json, *.jsonl), "
                                f"nor in a data/ folder inside it{hint}")
    examples = []
    for file in files:
        try:
            records = _read_records(file)
        except ValueError as err:
            if root.is_file():
                raise
            # often another file left in the folder (an earlier run's results, metadata)
            raise ValueError(f"{err}. Every *.parquet, *.json and *.jsonl file in {file.parent} "
                             "is read as VisualPuzzles records: give the data file itself, or "
                             "a split its files are named after") from err
        for row, record in enumerate(records):
            example = _visualpuzzles_example(file, row, record, wanted, instruction, encoded)
            if example is not None:
                examples.append(example)
    _check_subtasks_present(examples, wanted or [], root)
    _check_unique_ids(examples)
    return examples


def _choices_example(file: Path, row: int, record, encoded: bool) -> dict:
    r = _Row(file, row, dict(record, id=record.get("id", row)) if isinstance(record, dict)
             else record, "id", encoded)
    question, choices = r.text("question"), r.strings("choices")
    if len(set(choices)) != len(choices):
        r.fail(f"'choices' holds the same text twice: {choices!r:.80}")
    answer = r.text("answer")
    if answer not in choices:  # else a label, "(B)" or "B", of the choice it names
        label = re.fullmatch(r"\(([A-Za-z])\)|([A-Za-z])", answer.strip())
        index = LETTERS.index((label.group(1) or label.group(2)).upper()) if label else None
        if index is None or index >= len(choices):
            r.fail(f"'answer' {answer!r} is none of the choices {choices!r:.80} nor the label "
                   f"of one ({', '.join(_labels(len(choices)))})")
        answer = choices[index]
    subtask = record.get("subtask", "all")
    if not isinstance(subtask, str) or not subtask:
        r.fail(f"'subtask' must be a non-empty string, got {subtask!r:.80}")
    images = record.get("images") or []
    if not isinstance(images, list):
        r.fail(f"'images' must be a list, got {type(images).__name__}")
    return {"id": r.id, "subtask": subtask,
            "images": [r.image(f"images[{i}]", image) for i, image in enumerate(images)],
            "question": question, "choices": choices, "answer": answer,
            "source": f"{file} row {row}"}


def load_choices(path: str | os.PathLike, *, encoded: bool = False) -> list[dict]:
    """Multiple-choice examples of one's own from a JSON-lines (or JSON array) file.

    A record is ``{"question": str, "choices": [str, ...], "answer": str}`` with optional
    ``"images"`` (paths relative to the file, or what BLINK's loader takes: bytes, base64
    text, ``{"bytes"}`` objects, ``data:`` URIs), ``"subtask"`` (default "all") and ``"id"``
    (default: its row).
    The question is used as written (list the options in it as the model was trained to see
    them); each choice's text is scored as the answer. ``answer`` is one of the choices, or
    the label of one ("(B)" or "B") when no choice reads so. ``encoded``: as
    :func:`load_blink`'s (images as their files' bytes, decoded in batches).

    Raises:
        FileNotFoundError: no such file.
        BenchmarkRecordError: a malformed record (names file, row and id).
        ValueError: an empty file, ids loaded twice, a file that is not UTF-8 or not of a
            suffix in ``DATA_SUFFIXES``.
    """
    file = _existing(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file} is a folder; give the JSON-lines file itself")
    _check_data_file(file)
    examples = [_choices_example(file, row, record, encoded)
                for row, record in enumerate(_read_records(file))]
    _check_subtasks_present(examples, [], file)
    _check_unique_ids(examples)
    return examples


def load_benchmark(benchmark: str, path: str | os.PathLike, split: str | None = None,
                   **kwargs) -> list[dict]:
    """:func:`load_blink`, :func:`load_visualpuzzles` or :func:`load_choices` by name
    ("blink" | "visualpuzzles" | "jsonl"), or the built-in puzzles' ``split`` ("puzzles");
    ``split=None`` takes each loader's default."""
    name = _benchmark_key(benchmark)
    if name == "blink":
        return load_blink(path, split or "val", **kwargs)
    if name == "jsonl":
        if split is not None:
            raise ValueError("a JSON-lines file of one's own has no splits: give the file")
        return load_choices(path, **kwargs)
    if name == "puzzles":  # generated, not read: ``path`` is unused
        from amvl.puzzles import puzzle_suite

        return [dict(ex, subtask=ex["family"])
                for ex in puzzle_suite(split or "test", kwargs.get("per_family", 60))]
    return load_visualpuzzles(path, split, **kwargs)


def reads_as_data(benchmark: str, path: str | os.PathLike, file: str | os.PathLike,
                  split: str | None = None) -> bool:
    """Whether :func:`load_benchmark` ``(benchmark, path, split)`` would read ``file`` (which
    need not exist yet) as one of its data files: the loaders' own file discovery, so that
    ``amvl eval --out`` is not written where the next run reads it as records. For
    VisualPuzzles a folder's ``data/`` counts too (read when the folder has no data file)."""
    name = _benchmark_key(benchmark)
    root, file = Path(path).expanduser().resolve(), Path(file).expanduser().resolve()
    if name == "puzzles":  # generated, nothing read
        return False
    if file == root:
        return True
    if name == "jsonl" or not root.is_dir():  # a file root is read alone
        return False
    if name == "blink":  # the subtask folders when there are any, else the folder itself
        folders = [f.resolve() for f in (list(_blink_folders(root).values()) or [root])]
        split = split or "val"
        return (file.parent in folders and _is_data_file(file, split)) or \
            (file.parent.name == split and file.parent.parent in folders
             and _is_data_file(file, None))  # the parquet conversion's <subtask>/<split>/
    return file.parent in (root, (root / "data").resolve()) and _is_data_file(file, split)


def _benchmark_key(benchmark: str) -> str:
    key = re.sub(r"[\s_-]+", "", benchmark).lower()
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")
    return key


# ---------------------------------------------------------------------------------- scoring


def _check_scorable(examples: Sequence[dict]) -> bool:
    """Raise on examples that cannot be scored; return whether they carry answers."""
    if not examples:
        raise ValueError("no examples to evaluate")
    labelled = set()
    for i, ex in enumerate(examples):
        name = f"example {i} ({ex.get('source', ex.get('id', i))})" if isinstance(ex, dict) \
            else f"example {i}"
        if not isinstance(ex, dict):
            raise TypeError(f"{name} must be a dict, got {type(ex).__name__}")
        choices = ex.get("choices")
        if not isinstance(choices, (list, tuple)) or len(choices) < 2 or \
                not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{name}: 'choices' must list at least two strings")
        answer = ex.get("answer")
        if answer is not None and answer not in choices:
            raise ValueError(f"{name}: answer {answer!r} is not among its choices {choices}")
        labelled.add(answer is not None)
    if len(labelled) > 1:
        raise ValueError("some examples have answers and some do not (answer=None); evaluate "
                         "labelled and unlabelled examples separately")
    return labelled.pop()


@torch.no_grad()
@in_eval_mode
def prior_choice_nll(model: AMVLModel, collator: AMVLCollator, examples: Sequence[dict],
                     batch_size: int = 8, progress: bool = True, num_workers: int = 0,
                     split_across_processes: bool = False) -> np.ndarray:
    """(N, C) mean token NLL of every choice given prior latents z = mu_p (``inf`` past an
    example's last choice).

    The "prior" column of :func:`amvl.diagnostics.score_choices`, without the four other latent
    variants and the posterior pass it also runs (about five times the work), and without
    needing gold answers, so unlabelled test records can be scored too. Each batch's prompts
    are encoded once for all of its choices (:meth:`AMVLModel.choices_nll`). With
    ``num_workers`` > 0 the coming batches are built (images decoded and processed) in that
    many DataLoader worker processes while the model scores this one.

    ``split_across_processes``: in a process group (torchrun, each process with a whole copy
    of the model), each process scores a contiguous share of the batches, and every process
    gets all of the scores (one gather): the batches one process would score; the progress
    bar is the main process's.

    Warns once (UserWarning; in a group, on the main process) when some examples have choices
    that tokenize to the same ids: their NLLs tie, and the predictions over them mean nothing.
    """
    n_choices = max(len(ex["choices"]) for ex in examples)
    if not (split_across_processes and several_processes()):
        nll, choice_ids = _score_choices(model, collator, examples, n_choices, batch_size,
                                         progress, num_workers)
        warn_indistinguishable_choices(examples, choice_ids)
        return nll
    if sharded_across_processes(model):
        raise ValueError("split_across_processes needs a whole model in each process; this "
                         "one is sharded across them (its processes score every example "
                         "together)")
    rank, world = dist.get_rank(), dist.get_world_size()
    # whole batches each, so that every batch (its padding, its shapes) is one process's
    batches = np.array_split(np.arange(-(-len(examples) // batch_size)), world)[rank]
    share = np.arange(len(examples))[batches[0] * batch_size:(batches[-1] + 1) * batch_size] \
        if len(batches) else np.arange(0)
    mine = _score_choices(model, collator, [examples[i] for i in share], n_choices,
                          batch_size, progress and rank == 0, num_workers) \
        if len(share) else (np.full((0, n_choices), np.inf), [])
    shares: list = [None] * world
    dist.all_gather_object(shares, (share.tolist(), *mine))
    nll = np.full((len(examples), n_choices), np.inf)
    choice_ids: list[list[tuple[int, ...]]] = [[] for _ in examples]
    for indices, part, ids in shares:
        nll[indices] = part
        for i, example_ids in zip(indices, ids):
            choice_ids[i] = example_ids
    if rank == 0:
        warn_indistinguishable_choices(examples, choice_ids)
    return nll


def _score_choices(model: AMVLModel, collator: AMVLCollator, examples: Sequence[dict],
                   n_choices: int, batch_size: int, progress: bool, num_workers: int
                   ) -> tuple[np.ndarray, list[list[tuple[int, ...]]]]:
    """:func:`prior_choice_nll`'s scores of ``examples`` ((N, n_choices), ``inf`` past an
    example's last choice) and each example's choices as answer token ids."""
    device = model.device
    dtype = model.dtype
    sharded, passes = choices_to_score(model, len(examples), batch_size, n_choices)
    nll = np.full((len(examples), n_choices), np.inf)
    # Each example's choices as the answer token ids the collator builds (read on the host,
    # before the batch moves): choices with the same ids tie, whatever the model.
    choice_ids: list[list[tuple[int, ...]]] = [[] for _ in examples]
    # A sharded model's processes must run alike: all of them the most choices of any.
    chunks = ChoiceChunks(collator, examples, batch_size, passes if sharded else None)
    built = iter(prefetching_loader(_FailuresReturned(chunks), num_workers,
                                    device.type == "cuda", seed=0)) \
        if num_workers else (chunks[i] for i in range(len(chunks)))
    try:
        for index, batches in enumerate(tqdm(built, total=len(chunks), desc="evaluate",
                                             disable=not progress)):
            if isinstance(batches, WorkerFailure):
                batches.reraise()
            start = index * batch_size
            chunk = list(examples[start:start + batch_size])
            rows = list(range(len(chunk)))
            for c, batch in enumerate(batches):
                record_choice_ids(choice_ids, start, chunk, rows, c, batch)
            first = {k: v.to(device, non_blocking=True) for k, v in batches[0].items()}
            images = {k: first[k] for k in ("pixel_values", "image_grid_thw") if k in first}
            if "pixel_values" in images:
                images["pixel_values"] = images["pixel_values"].to(dtype)
            answers = [(b["answer_ids"].to(device, non_blocking=True),
                        b["answer_mask"].to(device, non_blocking=True)) for b in batches]
            values = model.choices_nll(first["prompt_ids"], first["prompt_mask"], answers,
                                       **images).float().cpu().numpy()
            for c in range(len(batches)):
                have = [i for i in rows if c < len(chunk[i]["choices"])]
                nll[start + np.array(have, dtype=int), c] = values[have, c]
    finally:
        stop_workers(built)
    return nll, choice_ids


class ChoiceChunks(torch.utils.data.Dataset):
    """Item i: the :func:`choice_batches` of ``examples[i * batch_size:(i + 1) *
    batch_size]``, every row answering ``passes`` choices (None: the chunk's most), a row
    past its last one with a stand-in (dropped), so that all of a chunk's answers follow the
    same prompts, encoded once (:meth:`AMVLModel.choices_nll`)."""

    def __init__(self, collator: AMVLCollator, examples: Sequence[dict], batch_size: int,
                 passes: int | None) -> None:
        self.collator, self.examples = collator, examples
        self.batch_size, self.passes = batch_size, passes

    def __len__(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def __getitem__(self, index: int) -> list[dict[str, torch.Tensor]]:
        if not 0 <= index < len(self):
            raise IndexError(f"chunk {index} of {len(self)}")
        chunk = list(self.examples[index * self.batch_size:(index + 1) * self.batch_size])
        count = self.passes or max(len(ex["choices"]) for ex in chunk)
        return choice_batches(self.collator, chunk, count)


class WorkerTraceback(Exception):
    """The traceback, as text, of an exception raised in a DataLoader worker process: the
    cause of the exception :meth:`WorkerFailure.reraise` raises in the main process."""


class WorkerFailure:
    """What a DataLoader worker hands back in place of a chunk it could not build: the
    exception, raised again in the main process by :meth:`reraise` as building the chunk
    there would have raised it. (Torch re-raises a worker's exception with the worker's
    traceback in its message, which ``amvl eval`` would print as its one-line error.)"""

    def __init__(self, error: Exception) -> None:
        self.traceback = "".join(traceback.format_exception(error))
        self.description = f"{type(error).__name__}: {error}"
        try:  # the exception itself where it survives the way back (pickled) as it is
            self.pickled: bytes | None = pickle.dumps(error)
            pickle.loads(self.pickled)
        except Exception:  # noqa: BLE001 - e.g. an __init__ that takes other arguments
            self.pickled = None

    def reraise(self) -> NoReturn:
        """Raise the worker's exception (a RuntimeError with its type and message where it
        does not unpickle, as torch does), caused by a :class:`WorkerTraceback`."""
        error = pickle.loads(self.pickled) if self.pickled is not None \
            else RuntimeError(self.description)
        raise error from WorkerTraceback(self.traceback)


class _FailuresReturned(torch.utils.data.Dataset):
    """``dataset``, whose items' exceptions are returned as :class:`WorkerFailure` instead
    of raised, for a DataLoader's workers to hand back."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except Exception as err:  # noqa: BLE001 - whatever building raised, raised in the loop
            return WorkerFailure(err)


def choice_batches(collator: AMVLCollator, chunk: Sequence[dict], count: int
                   ) -> list[dict[str, torch.Tensor]]:
    """The batches of choices 0 .. ``count - 1`` of ``chunk``: the first whole (prompts and
    images), the others :func:`choice_answers` to its prompts."""
    first = collator([with_choice(ex, 0) for ex in chunk])
    return [first] + choice_answers(collator, chunk, range(1, count), first["prompt_ids"])


def choice_answers(collator: AMVLCollator, chunk: Sequence[dict], choices: range,
                   prompt_ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """The answers of ``chunk``'s choices ``choices`` (a row past its last choice: its
    stand-in, :func:`with_choice`) to its prompts already built (``prompt_ids``):
    ``AMVLCollator.answers``, which builds no prompt and processes no image. A collator of
    one's own without it builds whole batches, whose prompts must be ``prompt_ids``
    (ValueError otherwise): every choice is scored after one encoding of them."""
    if hasattr(collator, "answers"):
        return [collator.answers([with_choice(ex, c) for ex in chunk]) for c in choices]
    batches = [collator([with_choice(ex, c) for ex in chunk]) for c in choices]
    if any(not torch.equal(b["prompt_ids"], prompt_ids) for b in batches):
        raise ValueError("the collator built other prompts for other answers: choices are "
                         "scored after one encoding of each prompt")
    return batches


def record_choice_ids(choice_ids: list[list[tuple[int, ...]]], start: int,
                      chunk: Sequence[dict], run: list[int], choice: int,
                      batch: dict[str, torch.Tensor]) -> None:
    """Append choice ``choice``'s answer token ids, as the collator built them in ``batch``
    (rows ``run`` of ``chunk``, the examples from ``start`` on), to ``choice_ids``, for
    :func:`warn_indistinguishable_choices`. ``batch`` is the collator's, still on the host (on
    a GPU each row would be a device read). A sharded run's stand-in rows are skipped."""
    for row, i in enumerate(run):
        if choice < len(chunk[i]["choices"]):
            answer = batch["answer_ids"][row][batch["answer_mask"][row].bool()]
            choice_ids[start + i].append(tuple(answer.tolist()))


def warn_indistinguishable_choices(examples: Sequence[dict],
                                    choice_ids: list[list[tuple[int, ...]]]) -> None:
    """Warn once, naming how many examples have two or more choices of the same answer token
    ids and the first of them: their NLLs tie, so the earliest of those choices is predicted
    whatever the model does, and an accuracy over them measures nothing. ``choice_ids[i]``:
    example i's choices as token id tuples, in order."""
    tied_examples = [i for i, ids in enumerate(choice_ids) if len(set(ids)) < len(ids)]
    if not tied_examples:
        return
    first = tied_examples[0]
    ids = choice_ids[first]
    tied_ids = next(key for key in ids if ids.count(key) > 1)
    tied_choices = [c for c, key in zip(examples[first]["choices"], ids) if key == tied_ids]
    warnings.warn(
        f"{len(tied_examples)} of {len(examples)} examples have choices that tokenize to the "
        f"same ids, so their NLLs tie and the earlier choice is always predicted (first: "
        f"example {examples[first].get('id', first)!r}, choices {tied_choices} all tokenize "
        f"to {list(tied_ids)}): the tokenizer cannot tell them apart (e.g. characters it lacks "
        "become its unknown token), and accuracy on these examples is meaningless",
        stacklevel=2)


def _subtask_order(names: set[str]) -> list[str]:
    from amvl.puzzles import FAMILIES

    for known in (list(BLINK_SUBTASKS), list(VISUALPUZZLES_CATEGORIES), list(FAMILIES)):
        if names <= set(known):
            return [s for s in known if s in names]
    return sorted(names)


def evaluate_benchmark(model: AMVLModel, collator: AMVLCollator, examples: Sequence[dict],
                       batch_size: int = 8, progress: bool = True, num_workers: int = 0,
                       split_across_processes: bool = False) -> dict:
    """Predict every example's choice from prior latents and score the predictions.

    Args:
        model: an :class:`amvl.model.AMVLModel` (any objective; "none" scores without latents).
        collator: the :class:`amvl.data.AMVLCollator` for its tokenizer and image processor.
        examples: from :func:`load_blink` / :func:`load_visualpuzzles` (or any examples with
            "choices", "answer" and optionally "id" and "subtask"; missing ones default to the
            index and "all").
        batch_size: examples per forward pass (each choice is one pass per batch).
        progress: show a progress bar.
        num_workers: DataLoader worker processes building the coming batches ahead (0: each
            built in turn, while the model waits).
        split_across_processes: in a process group, each process (with a whole model) scores
            a share of the examples, and every process returns the results of all of them
            (:func:`prior_choice_nll`).

    Returns:
        ``{"objective", "scoring", "num_examples", "predictions", "counts", "accuracy",
        "mean_over_subtasks", "overall"}``: ``predictions`` holds one ``{"id", "subtask",
        "prediction", "answer", "correct", "nll"}`` per example (``nll`` over its choices);
        ``accuracy`` maps subtask -> accuracy in [0, 1]; ``mean_over_subtasks`` is their
        unweighted mean (BLINK's average), ``overall`` the accuracy over all examples
        (VisualPuzzles'). For unlabelled examples the accuracies are None and ``correct`` too.
    """
    labelled = _check_scorable(examples)
    nll = prior_choice_nll(model, collator, examples, batch_size, progress, num_workers,
                           split_across_processes)
    predictions, by_subtask = [], {}
    for i, (ex, scores) in enumerate(zip(examples, nll)):
        scores = scores[:len(ex["choices"])]
        ident = str(ex.get("id", i))
        if not np.isfinite(scores).all():
            raise FloatingPointError(f"example {ident!r}: non-finite choice NLL {scores}")
        prediction = ex["choices"][int(scores.argmin())]
        correct = prediction == ex["answer"] if labelled else None
        subtask = ex.get("subtask", "all")
        predictions.append({"id": ident, "subtask": subtask, "prediction": prediction,
                            "answer": ex.get("answer"), "correct": correct,
                            "nll": scores.tolist()})
        by_subtask.setdefault(subtask, []).append(correct)
    order = _subtask_order(set(by_subtask))
    counts = {s: len(by_subtask[s]) for s in order}
    accuracy = mean = overall = None
    if labelled:
        accuracy = {s: float(np.mean(by_subtask[s])) for s in order}
        mean = float(np.mean(list(accuracy.values())))
        overall = float(np.mean([p["correct"] for p in predictions]))
    has_latents = model.objective.latent_source != "none"
    return {"objective": model.config.objective,
            "scoring": "prior latents (z = mu_p)" if has_latents else "no latent block",
            "num_examples": len(examples), "predictions": predictions, "counts": counts,
            "accuracy": accuracy, "mean_over_subtasks": mean, "overall": overall}


# ------------------------------------------------------------------------------------ table


def format_accuracy_table(results_by_model: dict[str, dict], benchmark: str) -> str:
    """A markdown table (aligned, so it reads as plain text too) in the paper's format.

    One row per model (the keys, e.g. "amvl (prior latents)", "none"), one column per subtask
    in the paper's order (BLINK: its 14 subtasks under the paper's short headers; VisualPuzzles:
    the five categories), then the paper's average (BLINK: "Avg", the unweighted mean over
    subtasks; VisualPuzzles: "Overall", accuracy over all puzzles). Accuracies are percentages
    with one decimal; "-" marks a subtask a model was not evaluated on, and a note under the
    table says which averages cover fewer subtasks than the benchmark has.
    """
    key = _benchmark_key(benchmark)
    if key == "blink":
        columns, average, title = dict(BLINK_SUBTASKS), ("Avg", "mean_over_subtasks"), "BLINK"
    elif key == "puzzles":
        from amvl.puzzles import FAMILIES

        columns = {f: f for f in FAMILIES}
        average, title = ("Avg", "mean_over_subtasks"), "amvl puzzles"
    elif key == "jsonl":  # the subtasks the file has
        columns, average, title = {}, ("Overall", "overall"), "multiple choice"
    else:
        columns = {c: c for c in VISUALPUZZLES_CATEGORIES}
        average, title = ("Overall", "overall"), "VisualPuzzles"
    if not results_by_model:
        raise ValueError("no results to tabulate")
    for name, result in results_by_model.items():
        if not result.get("accuracy"):
            raise ValueError(f"{name}: no accuracies to tabulate (were the examples unlabelled?)")
        columns.update({s: s for s in result["accuracy"] if s not in columns})

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    header = ["Model", *columns.values(), average[0]]
    rows, notes = [], []
    for name, result in results_by_model.items():
        accuracy = result["accuracy"]
        rows.append([name, *(pct(accuracy.get(s)) for s in columns),
                     pct(result[average[1]])])
        missing = [h for s, h in columns.items() if s not in accuracy]
        if missing:
            notes.append(f"{name}: {average[0]} covers {len(accuracy)} of {len(columns)} "
                         f"subtasks (not evaluated: {', '.join(missing)})")
    unit, explain = {"visualpuzzles": ("category", "accuracy over all puzzles"),
                     "jsonl": ("subtask", "accuracy over all examples")}.get(
        key, ("subtask", "unweighted mean over subtasks"))
    caption = f"{title}: accuracy (%) per {unit}; {average[0]} = {explain}."
    return "\n".join([caption, "", markdown_table(header, rows),
                      *([""] + notes if notes else [])])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """An aligned markdown table (it reads as plain text too): the first column left-aligned,
    the others right-aligned, as numbers are. A "|" in a cell (a model's or a subtask's name)
    is escaped, where it would split the cell."""
    header = [cell.replace("|", "\\|") for cell in header]
    rows = [[cell.replace("|", "\\|") for cell in row] for row in rows]
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if j == 0 else c.rjust(w)
                  for j, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 2)) if j == 0 else ("-" * (w + 1) + ":")
                          for j, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
