"""amvl.evaluation on small BLINK / VisualPuzzles fixtures written here in the public schemas."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amvl.config import AMVLConfig
from amvl.data import AMVLCollator, VisionTokens
from amvl.diagnostics import score_choices
from amvl.evaluation import (
    BLINK_SUBTASKS,
    BenchmarkRecordError,
    WorkerTraceback,
    evaluate_benchmark,
    format_accuracy_table,
    load_benchmark,
    load_blink,
    load_visualpuzzles,
    prior_choice_nll,
    reads_as_data,
)
from amvl.model import AMVLModel
from amvl.tiny import tiny_image_processor, tiny_qwen2_vl, word_tokenizer

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # parquet fixtures are skipped, JSON ones still run
    pa = pq = None
HAVE_PYARROW = pa is not None

WORDS = ["red", "blue", "green", "left", "right", "one", "two", "three", "cell", "which", "is"]


def _png(rng: np.random.Generator, size=(16, 16), mode="RGB") -> bytes:
    pixels = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _blink_record(rng, subtask: str, i: int, n_images: int = 1, n_choices: int = 3) -> dict:
    options = [str(w) for w in rng.choice(WORDS, size=n_choices, replace=False)]
    question = " ".join(rng.choice(WORDS, size=4))
    prompt = question + "\n" + "\n".join(f"({'ABCD'[k]}) {o}" for k, o in enumerate(options))
    record = {"idx": f"val_{subtask}_{i}", "question": question, "sub_task": subtask,
              "choices": options, "answer": f"({'ABCD'[int(rng.integers(n_choices))]})",
              "prompt": prompt, "explanation": ""}
    for k in range(4):  # HF stores every image slot; unused ones are null
        record[f"image_{k + 1}"] = {"bytes": _png(rng, (16, 16 + 8 * k)), "path": f"{k}.png"} \
            if k < n_images else None
    return record


def _write_parquet(file: Path, records: list[dict], image_fields: list[str]) -> None:
    if not HAVE_PYARROW:
        pytest.skip("pyarrow is not installed")
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    types = {f: image for f in image_fields} | {"choices": pa.list_(pa.string()),
                                                "options": pa.list_(pa.string())}
    schema = pa.schema([(k, types.get(k, pa.string())) for k in records[0]])
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records, schema=schema), file)


def _as_json(record: dict) -> dict:
    """A record as JSON holds it: image bytes as base64 text."""
    out = dict(record)
    for k, v in record.items():
        if isinstance(v, dict) and isinstance(v.get("bytes"), bytes):
            out[k] = {"bytes": base64.b64encode(v["bytes"]).decode(), "path": v["path"]}
    return out


BLINK_FIXTURE = {"Counting": (3, 1, 4), "Jigsaw": (2, 3, 2), "IQ_Test": (2, 2, 4)}


@pytest.fixture
def blink_dir(tmp_path) -> Path:
    """Three subtask folders as downloaded: val and test parquet files (JSON Lines where
    pyarrow is missing, so the scoring tests still run)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "BLINK"
    for subtask, (n, n_images, n_choices) in BLINK_FIXTURE.items():
        records = [_blink_record(rng, subtask, i, n_images, n_choices) for i in range(n)]
        test = [dict(r, idx=r["idx"].replace("val", "test"), answer="") for r in records]
        for split, rows in (("val", records), ("test", test)):
            if HAVE_PYARROW:
                _write_parquet(root / subtask / f"{split}-00000-of-00001.parquet", rows,
                               [f"image_{k}" for k in range(1, 5)])
            else:
                (root / subtask).mkdir(parents=True, exist_ok=True)
                (root / subtask / f"{split}.jsonl").write_text(
                    "\n".join(json.dumps(_as_json(r)) for r in rows))
    (root / "README.md").write_text("BLINK")
    return root


def _vp_record(rng, i: int, category: str, with_options: bool = True) -> dict:
    return {"id": str(i), "category": category, "question": " ".join(rng.choice(WORDS, size=5)),
            "options": [str(w) for w in rng.choice(WORDS, 4, replace=False)]
            if with_options else None, "answer": "ABCD"[int(rng.integers(4))],
            "image": {"bytes": _png(rng, (24, 16), mode="RGBA"), "path": None}}


@pytest.fixture
def vp_records() -> list[dict]:
    rng = np.random.default_rng(1)
    cats = ["Algorithmic", "Analogical", "Deductive", "Inductive", "Spatial", "Spatial"]
    return [_vp_record(rng, i, c, with_options=i != 2) for i, c in enumerate(cats)]


# ------------------------------------------------------------------------------ loading


def test_blink_parquet_folders_load_in_the_papers_order(blink_dir):
    examples = load_blink(blink_dir)
    order = [s for s in BLINK_SUBTASKS if s in BLINK_FIXTURE]
    assert [ex["subtask"] for ex in examples] == [s for s in order
                                                   for _ in range(BLINK_FIXTURE[s][0])]
    ex = next(e for e in examples if e["subtask"] == "Jigsaw")
    assert len(ex["images"]) == 3 and all(im.mode == "RGB" for im in ex["images"])
    assert ex["images"][2].size == (16, 32)
    assert ex["choices"] == ["(A)", "(B)"] and ex["answer"] in ex["choices"]
    assert ex["question"].endswith(f"(B) {ex['options'][1]}") and ex["id"].startswith("val_")
    only = load_blink(blink_dir, subtasks=["iq test"], instruction="which is")
    assert {ex["subtask"] for ex in only} == {"IQ_Test"} and len(only) == 2
    assert only[0]["question"].endswith("\nwhich is")
    assert len(load_blink(blink_dir / "Counting")) == 3  # one subtask's folder


def test_blink_test_split_needs_unlabelled(blink_dir):
    with pytest.raises(ValueError, match="withheld"):
        load_blink(blink_dir, split="test")
    test = load_blink(blink_dir, split="test", unlabelled=True)
    assert len(test) == 7 and all(ex["answer"] is None for ex in test)


def test_blink_json_with_base64_and_with_image_files(tmp_path):
    rng = np.random.default_rng(2)
    records = [_blink_record(rng, "Counting", i, n_images=2) for i in range(2)]
    jsonl = tmp_path / "jsonl" / "Counting" / "val.jsonl"
    jsonl.parent.mkdir(parents=True)
    jsonl.write_text("\n".join(json.dumps(_as_json(r)) for r in records) + "\n")
    files = []
    for i, r in enumerate(records):  # images as files beside the JSON, paths relative to it
        r = dict(r)
        for k in ("image_1", "image_2"):
            path = tmp_path / "files" / "img" / f"{i}_{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(r[k]["bytes"])
            relative = f"img/{path.name}"
            r[k] = relative if k == "image_1" else {"bytes": None, "path": relative}
        files.append(r)
    array = tmp_path / "files" / "val.json"
    array.write_text(json.dumps(files, indent=1))
    a, b = load_blink(tmp_path / "jsonl"), load_blink(array)
    for x, y in zip(a, b):
        assert x["id"] == y["id"] and x["answer"] == y["answer"]
        assert [np.asarray(i).tolist() for i in x["images"]] == \
            [np.asarray(i).tolist() for i in y["images"]]
    assert len(load_benchmark("BLINK", array)) == 2


def test_visualpuzzles_parquet_and_json(tmp_path, vp_records):
    _write_parquet(tmp_path / "hub" / "data.parquet", vp_records, ["image"])
    examples = load_visualpuzzles(tmp_path / "hub")
    assert [ex["subtask"] for ex in examples] == [r["category"] for r in vp_records]
    ex = examples[0]
    assert ex["question"].startswith("Question: ") and "\nOptions:\n(A) " in ex["question"]
    assert ex["choices"] == ["(A)", "(B)", "(C)", "(D)"]
    assert ex["answer"] == f"({vp_records[0]['answer']})" and ex["images"][0].mode == "RGB"
    assert examples[2]["options"] is None and examples[2]["question"].endswith("in the image.")
    raw = []  # the authors' raw JSON: image files under image_path
    for r in vp_records:
        path = tmp_path / "raw" / "images" / f"{r['id']}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(r["image"]["bytes"])
        raw.append({k: v for k, v in r.items() if k != "image"} | {
            "image_path": f"images/{path.name}", "category": r["category"].lower()})
    (tmp_path / "raw" / "test.json").write_text(json.dumps(raw))
    same = load_visualpuzzles(tmp_path / "raw", split="test", categories=["spatial"])
    assert [ex["id"] for ex in same] == ["4", "5"]
    assert np.array_equal(np.asarray(same[0]["images"][0]), np.asarray(examples[4]["images"][0]))
    # a hub revision with its files under data/
    _write_parquet(tmp_path / "rev" / "data" / "train-00000-of-00001.parquet", vp_records,
                   ["image"])
    assert [ex["id"] for ex in load_visualpuzzles(tmp_path / "rev")] == \
        [ex["id"] for ex in examples]
    # another JSON file in the folder (an earlier run's results) is named as such
    (tmp_path / "hub" / "results.json").write_text(json.dumps({"model": {}}, indent=1))
    with pytest.raises(ValueError, match=r"results.json: line 1 is not JSON.*Every \*.parquet"):
        load_visualpuzzles(tmp_path / "hub")


# ------------------------------------------------------------------------------ errors


def _blink_file(tmp_path, edit, as_json=True) -> Path:
    rng = np.random.default_rng(3)
    records = [_blink_record(rng, "Counting", i) for i in range(3)]
    edit(records[1])
    file = tmp_path / "Counting" / ("val.jsonl" if as_json else "val-00000-of-00001.parquet")
    file.parent.mkdir(parents=True, exist_ok=True)
    if as_json:
        file.write_text("\n".join(json.dumps(_as_json(r)) for r in records))
    else:
        _write_parquet(file, records, [f"image_{k}" for k in range(1, 5)])
    return file


# (edit of row 1, expected message, whether parquet's typed columns can hold the edit)
BLINK_ERRORS = [
    (lambda r: r.pop("choices"), "missing field 'choices'", False),
    (lambda r: r.update(answer="(D)"), r"answer '\(D\)' is not among the options", True),
    (lambda r: r.update(answer="maybe"), "not an option letter", True),
    (lambda r: r.update(choices="one two"), "'choices' must be a list of strings", False),
    (lambda r: r.update(prompt=3), "'prompt' must be a string", False),
    (lambda r: r.update(sub_task="Jigsaw"), "does not match its folder", True),
    (lambda r: r.update(sub_task="Juggling"), "unknown BLINK sub_task", True),
    (lambda r: r.update(image_1={"bytes": b"not an image", "path": None}), "cannot decode", True),
    (lambda r: r.update(image_1={"bytes": None, "path": "gone.png"}), "gone.png not found", True),
    (lambda r: r.update(image_1=None), "missing image", True),
    (lambda r: r.update(image_2=7), "must be image bytes", False),
]


@pytest.mark.parametrize("edit,match,as_json", [(e, m, True) for e, m, _ in BLINK_ERRORS]
                         + [(e, m, False) for e, m, ok in BLINK_ERRORS if ok])
def test_malformed_blink_records_name_file_row_and_id(tmp_path, edit, match, as_json):
    file = _blink_file(tmp_path, edit, as_json)
    with pytest.raises(BenchmarkRecordError, match=match) as info:
        load_blink(tmp_path)
    assert str(info.value).startswith(f"{file}: row 1 (id 'val_Counting_1')")
    assert info.value.row == 1 and info.value.record_id == "val_Counting_1"


def test_bad_base64_and_bad_json(tmp_path):
    file = _blink_file(tmp_path, lambda r: None)
    lines = file.read_text().splitlines()
    record = json.loads(lines[2])
    record["image_1"]["bytes"] = "@@not base64@@"
    file.write_text("\n".join([*lines[:2], json.dumps(record)]))
    with pytest.raises(BenchmarkRecordError, match=r"row 2 .*not valid base64"):
        load_blink(tmp_path)
    file.write_text(lines[0] + "\n{broken\n")
    with pytest.raises(ValueError, match=r"val.jsonl: line 2 is not JSON"):
        load_blink(tmp_path)
    file.write_text(json.dumps([json.loads(lines[0]), "just text"]))
    with pytest.raises(BenchmarkRecordError, match="row 1: a record must be an object"):
        load_blink(tmp_path)


def test_bare_and_mime_base64_images(tmp_path):
    """A bare base64 string (as VLMEvalKit-style exports write images) is decoded, not taken
    for a path (whose os.stat raised "File name too long", naming no row); base64 broken into
    lines (base64.encodebytes) is read, in {"bytes"} objects and bare."""
    from amvl.evaluation import load_choices

    rng = np.random.default_rng(4)
    png = _png(rng, (64, 64))  # noise: its base64 runs to many KB, far past a file name
    expected = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    bare, mime = base64.b64encode(png).decode(), base64.encodebytes(png).decode()
    assert len(bare) > 4096 and "\n" in mime
    images = [bare, mime, {"bytes": mime, "path": None}, f"data:image/png;base64,{mime}"]
    path = _write_lines(tmp_path / "mine.jsonl", [
        {"question": "q", "choices": ["a", "b"], "answer": "a", "images": images}])
    (example,) = load_choices(path)
    assert all(np.array_equal(np.asarray(i), expected) for i in example["images"])
    record = _vp_record(rng, 0, "Spatial") | {"image": bare}
    (tmp_path / "vp.jsonl").write_text(json.dumps(record))
    assert np.array_equal(np.asarray(load_visualpuzzles(tmp_path / "vp.jsonl")[0]["images"][0]),
                          expected)
    blink = _blink_record(rng, "Counting", 0, n_images=2)
    blink["image_2"] = base64.b64encode(blink["image_2"]["bytes"]).decode()
    (tmp_path / "Counting").mkdir()
    (tmp_path / "Counting" / "val.jsonl").write_text(json.dumps(_as_json(blink)))
    assert load_blink(tmp_path)[0]["images"][1].size == (16, 24)
    # a file whose name has only base64 characters is still the file
    (tmp_path / ("A" * 80)).write_bytes(png)
    path = _write_lines(tmp_path / "named.jsonl", [
        {"question": "q", "choices": ["a", "b"], "answer": "a", "images": ["A" * 80]}])
    assert np.array_equal(np.asarray(load_choices(path)[0]["images"][0]), expected)


@pytest.mark.parametrize("image,match", [
    ("QUJD" * 2000, r"image 'images\[0\]' \(base64 text\): cannot decode the image"),
    ("QUJDRA" * 1000 + "x", r"image 'images\[0\]': QUJDRA\w+\.\.\.\w+DRAx \(6001 "
                            r"characters\) is no file, nor valid base64 \(Invalid"),
    ("x" * 5000 + ".png", r"image 'images\[0\]': cannot read image file .*x\.\.\.x+\.png "
                          r"\(\d+ characters\) \(File name too long\)"),
    ({"bytes": None, "path": "QUJD" * 2000}, r"cannot read image file .* \(File name too long"),
], ids=["base64-not-an-image", "neither", "long-path", "struct-path"])
def test_images_that_are_neither_files_nor_base64_are_named_in_one_short_line(tmp_path, image,
                                                                              match):
    """What is not an image is a BenchmarkRecordError naming file, row and id, with the
    string shortened (no OSError dumping kilobytes of base64); a struct's path is never
    decoded as base64."""
    path = _write_lines(tmp_path / "mine.jsonl", [
        {"question": "q", "choices": ["a", "b"], "answer": "a"},
        {"question": "q", "choices": ["a", "b"], "answer": "a", "images": [image], "id": "q1"}])
    with pytest.raises(BenchmarkRecordError, match=match) as raised:
        load_benchmark("jsonl", path)
    assert str(raised.value).startswith(f"{path}: row 1 (id 'q1'): ")
    assert len(str(raised.value)) < 500 + len(str(path))


def test_unreadable_data_files_are_named(tmp_path, blink_dir, vp_records):
    """A file that is not UTF-8 is named with its line; an archive or an Arrow file given
    as the data is refused saying what is read (it was "'utf-8' codec can't decode",
    naming no file)."""
    record = {"question": "caf\u00e9", "choices": ["a", "b"], "answer": "a"}
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n"
                              for r in ({"question": "q", "choices": ["a", "b"], "answer": "a"},
                                        record)).encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(latin))}: line 2 is not UTF-8 "
                                         r"\(invalid continuation byte at byte 73\)"):
        load_benchmark("jsonl", latin)
    lines = blink_dir / "Counting" / "val.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + json.dumps(_as_json(_blink_record(
        np.random.default_rng(0), "Counting", 9))).encode() + b"\n\xff\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(lines))}: line 2 is not UTF-8 "
                                         r"\(invalid start byte at byte \d+\)"):
        load_blink(blink_dir)
    lines.unlink()
    for name in ("BLINK.zip", "data-00000-of-00001.arrow", "data"):
        file = tmp_path / name
        file.write_bytes(b"PK\x03\x04\xd4\xb3 not text")
        for benchmark in ("blink", "visualpuzzles", "jsonl"):
            with pytest.raises(ValueError, match=rf"^{re.escape(str(file))}: a .* is not read "
                                                 r"as benchmark data; the loaders read "
                                                 r"\.parquet, \.json, \.jsonl files"):
                load_benchmark(benchmark, file)


def test_which_files_the_loaders_read(tmp_path, blink_dir):
    """reads_as_data: the loaders' own discovery decides whether a (new) file would be read."""
    assert not reads_as_data("blink", blink_dir, blink_dir / "results.json")
    assert reads_as_data("blink", blink_dir, blink_dir / "Counting" / "val_results.json")
    assert not reads_as_data("blink", blink_dir, blink_dir / "Counting" / "results.json")
    assert reads_as_data("blink", blink_dir, blink_dir / "Counting" / "test.json", "test")
    assert not reads_as_data("blink", blink_dir, blink_dir / "Counting" / "val.txt")
    assert reads_as_data("blink", blink_dir / "Counting", blink_dir / "Counting" / "val.json")
    assert reads_as_data("jsonl", tmp_path / "a.jsonl", tmp_path / "a.jsonl")
    assert not reads_as_data("jsonl", tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    (tmp_path / "vp" / "data").mkdir(parents=True)
    for where in ("vp", "vp/data"):
        assert reads_as_data("visualpuzzles", tmp_path / "vp", tmp_path / where / "r.json")
        assert not reads_as_data("visualpuzzles", tmp_path / "vp", tmp_path / where / "r.csv")
    assert not reads_as_data("puzzles", tmp_path, tmp_path / "r.json")
    assert reads_as_data("blink", blink_dir, blink_dir / "Counting" / "val" / "r.json")
    assert not reads_as_data("blink", blink_dir, blink_dir / "Counting" / "other" / "r.json")


def test_blink_in_the_hubs_parquet_conversion_layout(tmp_path, blink_dir):
    """The hub's converted parquet (refs/convert/parquet) has a folder per split inside each
    subtask's (Counting/val/0000.parquet): it was "no 'val' data file"."""
    import shutil

    converted = tmp_path / "converted"
    for subtask in BLINK_FIXTURE:
        for split in ("val", "test"):
            (source,) = (blink_dir / subtask).glob(f"{split}[-.]*")
            (converted / subtask / split).mkdir(parents=True)
            shutil.copy(source, converted / subtask / split / f"0000{source.suffix}")
    assert [(ex["id"], ex["answer"]) for ex in load_blink(converted)] == \
        [(ex["id"], ex["answer"]) for ex in load_blink(blink_dir)]
    assert len(load_blink(converted, "test", unlabelled=True)) == len(load_blink(blink_dir))


def test_an_image_struct_of_nulls_is_an_empty_slot(tmp_path):
    """{"bytes": null, "path": null} (how pandas / polars write a null struct) in image_2..4
    is an unused slot, as null is; in image_1 a missing image."""
    rng = np.random.default_rng(5)
    records = [_blink_record(rng, "Counting", i, n_images=2) for i in range(2)]
    for record in records:
        record["image_3"] = {"bytes": None, "path": None}
    folders = {"parquet": tmp_path / "parquet", "json": tmp_path / "json"}
    (folders["json"] / "Counting").mkdir(parents=True)
    (folders["json"] / "Counting" / "val.jsonl").write_text(
        "\n".join(json.dumps(_as_json(r)) for r in records))
    if HAVE_PYARROW:
        _write_parquet(folders["parquet"] / "Counting" / "val-00000-of-00001.parquet", records,
                       [f"image_{k}" for k in range(1, 5)])
    else:
        del folders["parquet"]
    for folder in folders.values():
        assert [len(ex["images"]) for ex in load_blink(folder)] == [2, 2]
    records[1]["image_1"] = {"bytes": None, "path": None}
    (folders["json"] / "Counting" / "val.jsonl").write_text(
        "\n".join(json.dumps(_as_json(r)) for r in records))
    with pytest.raises(BenchmarkRecordError, match=r"row 1 .*missing image: 'image_1' is "
                                                   "absent, null or a struct of nulls"):
        load_blink(folders["json"])


@pytest.mark.parametrize("edit,match", [
    (lambda r: r.update(category="Lateral"), "unknown VisualPuzzles category"),
    (lambda r: r.update(answer="E"), r"answer 'E' is not among the options"),
    (lambda r: r.pop("options"), "missing field 'options'"),
    (lambda r: r.pop("image"), "missing image"),
    (lambda r: r.update(image={"bytes": None, "path": "nowhere/x.png"}), "x.png not found"),
    (lambda r: r.update(id=None), "'id' must be a string or an integer"),
])
def test_malformed_visualpuzzles_records(tmp_path, vp_records, edit, match):
    edit(vp_records[3])
    file = tmp_path / "data.jsonl"
    file.write_text("\n".join(json.dumps(_as_json(r)) for r in vp_records))
    with pytest.raises(BenchmarkRecordError, match=match) as info:
        load_visualpuzzles(file)
    assert str(info.value).startswith(f"{file}: row 3")


def test_missing_files_and_duplicates(tmp_path, blink_dir, vp_records):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_blink(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither BLINK subtask folders"):
        load_blink(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no data file"):
        load_visualpuzzles(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"no folder for .*\['Art_Style'\]"):
        load_blink(blink_dir, subtasks=["Counting", "Art_Style"])
    with pytest.raises(FileNotFoundError, match="no 'dev' data file"):
        load_blink(blink_dir, split="dev")
    with pytest.raises(ValueError, match="unknown BLINK subtask 'Chess'"):
        load_blink(blink_dir, subtasks=["Chess"])
    # one file is read whatever the split: a labelled val file read as "test" lost its answers
    val_file = next((blink_dir / "Counting").glob("val*"))
    with pytest.raises(ValueError, match="is a 'val' file, but split='test'"):
        load_blink(val_file, split="test", unlabelled=True)
    assert all(ex["answer"] is not None for ex in load_blink(val_file))
    (blink_dir / "Counting" / "val-copy.jsonl").write_text(json.dumps(_as_json(_blink_record(
        np.random.default_rng(0), "Counting", 0))))
    with pytest.raises(ValueError, match="'val_Counting_0' .* already loaded"):
        load_blink(blink_dir)
    file = tmp_path / "vp.jsonl"
    file.write_text(json.dumps(_as_json(vp_records[0])))
    with pytest.raises(ValueError, match=r"no records for \['Spatial'\]"):
        load_visualpuzzles(file, categories=["spatial"])
    # An empty selection was "all" for the folders and "none" for the records.
    with pytest.raises(ValueError, match="subtasks is empty"):
        load_blink(blink_dir, subtasks=[])
    with pytest.raises(ValueError, match="categories is empty"):
        load_visualpuzzles(file, categories=[])


def test_a_split_of_a_snapshot_without_splits_is_explained(tmp_path, vp_records):
    """The hub's VisualPuzzles holds one split ("test" on its card) in data/data.parquet:
    --split test said only "no data file for split 'test'"."""
    (tmp_path / "vp" / "data").mkdir(parents=True)
    (tmp_path / "vp" / "data" / "data.jsonl").write_text(
        "\n".join(json.dumps(_as_json(r)) for r in vp_records))
    with pytest.raises(FileNotFoundError, match=r"no data file for split 'test' .*its data "
                                                r"files \(data.jsonl\) are not named after a "
                                                r"split: give no split to read them"):
        load_visualpuzzles(tmp_path / "vp", split="test")
    assert len(load_visualpuzzles(tmp_path / "vp")) == len(vp_records)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"inside it$"):
        load_visualpuzzles(tmp_path / "empty", split="test")


def test_files_with_a_byte_order_mark(tmp_path, vp_records):
    records = [_as_json(r) for r in vp_records]
    (tmp_path / "plain.json").write_text(json.dumps(records), encoding="utf-8")
    (tmp_path / "array.json").write_text(json.dumps(records), encoding="utf-8-sig")
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(r) for r in records),
                                          encoding="utf-8-sig")
    expected = [ex["id"] for ex in load_visualpuzzles(tmp_path / "plain.json")]
    assert len(expected) == len(records)
    for name in ("array.json", "lines.jsonl"):
        assert [ex["id"] for ex in load_visualpuzzles(tmp_path / name)] == expected


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_images_are_composited_onto_white(tmp_path, mode):
    # A black square on a transparent background: dropping alpha made the image all black.
    pixels = np.zeros((16, 16, 4), np.uint8)
    pixels[4:12, 4:12] = (0, 0, 0, 255)
    image = Image.fromarray(pixels, "RGBA")
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":
        image = image.convert("P")
        image.info["transparency"] = image.getpixel((0, 0))  # the background's index
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    record = _blink_record(np.random.default_rng(0), "Counting", 0)
    record["image_1"] = {"bytes": buffer.getvalue(), "path": None}
    (tmp_path / "Counting").mkdir()
    (tmp_path / "Counting" / "val.jsonl").write_text(json.dumps(_as_json(record)))
    loaded = load_blink(tmp_path)[0]["images"][0]
    rgb = np.asarray(loaded)
    assert loaded.mode == "RGB"
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[8, 8].tolist() == [0, 0, 0]


# ------------------------------------------------------------------------------ scoring


def _model(examples: list[dict], objective: str) -> tuple[AMVLModel, AMVLCollator]:
    words = sorted({w for ex in examples for w in " ".join([ex["question"], *ex["choices"]])
                    .split()})
    tokenizer = word_tokenizer(words, vision=True)
    torch.manual_seed(0)
    base = tiny_qwen2_vl(tokenizer)
    config = AMVLConfig(num_slots=2, latent_dim=4, objective=objective, kernel_backend="torch")
    collator = AMVLCollator(tokenizer, tiny_image_processor(),
                            VisionTokens.from_model_config(base.config))
    return AMVLModel(base, tokenizer, config), collator


def test_prior_scores_equal_the_diagnostics_prior_column(blink_dir):
    examples = load_blink(blink_dir)
    model, collator = _model(examples, "amvl")
    model.train()
    ours = prior_choice_nll(model, collator, examples, batch_size=3, progress=False)
    assert model.training  # left as it was found
    theirs = score_choices(model, collator, examples, batch_size=3, progress=False)
    np.testing.assert_allclose(ours, theirs["nll"]["prior"], rtol=1e-5)


def test_encoded_images_score_as_decoded_ones_in_a_tenth_of_the_memory(tmp_path, blink_dir,
                                                                       vp_records):
    """Every process of amvl eval held every benchmark image decoded (a few GB for BLINK,
    times the processes); ``encoded=True`` keeps the files' bytes once they decode, and the
    collator decodes them per batch: the same scores."""
    from amvl.data import EncodedImage

    decoded, encoded = load_blink(blink_dir), load_blink(blink_dir, encoded=True)
    assert all(isinstance(im, Image.Image) for ex in decoded for im in ex["images"])
    assert all(isinstance(im, EncodedImage) for ex in encoded for im in ex["images"])
    assert [len(ex["images"]) for ex in encoded] == [len(ex["images"]) for ex in decoded]
    for ex_decoded, ex_encoded in zip(decoded, encoded):
        for image, kept in zip(ex_decoded["images"], ex_encoded["images"]):
            assert np.array_equal(np.asarray(kept.decode()), np.asarray(image))
    rng = np.random.default_rng(2)  # a photograph-sized image compresses, noise does not
    photo = Image.fromarray(np.kron(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8),
                                    np.ones((10, 10, 1), dtype=np.uint8)))
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    record = _blink_record(rng, "Counting", 0)
    record["image_1"] = {"bytes": buffer.getvalue(), "path": None}
    (tmp_path / "one.jsonl").write_text(json.dumps(_as_json(record)))
    (kept,) = load_blink(tmp_path / "one.jsonl", encoded=True)[0]["images"]
    assert len(kept.data) * 10 < photo.width * photo.height * 3
    model, collator = _model(decoded, "amvl")
    np.testing.assert_array_equal(
        prior_choice_nll(model, collator, encoded, batch_size=3, progress=False),
        prior_choice_nll(model, collator, decoded, batch_size=3, progress=False))
    (tmp_path / "vp.jsonl").write_text("\n".join(json.dumps(_as_json(r)) for r in vp_records))
    assert all(isinstance(ex["images"][0], EncodedImage)
               for ex in load_visualpuzzles(tmp_path / "vp.jsonl", encoded=True))
    broken = dict(_as_json(record), image_1={"bytes": base64.b64encode(b"\x89PNG...").decode()})
    (tmp_path / "broken.jsonl").write_text(json.dumps(broken))
    with pytest.raises(BenchmarkRecordError, match="cannot decode the image"):
        load_blink(tmp_path / "broken.jsonl", encoded=True)  # still checked when loading


def test_choices_process_each_image_once(blink_dir, monkeypatch):
    """Every choice's batch processed the question's images again (4 choices, 4 times);
    the prompts and images are now built once a batch, the other choices' answers alone."""
    examples = load_blink(blink_dir)
    model, collator = _model(examples, "amvl")
    calls = []
    real = AMVLCollator._process_image
    monkeypatch.setattr(AMVLCollator, "_process_image",
                        lambda self, image: calls.append(1) or real(self, image))
    scores = prior_choice_nll(model, collator, examples, batch_size=3, progress=False)
    assert len(calls) == sum(len(ex["images"]) for ex in examples)
    calls.clear()  # the diagnostics too (and the last example's, the first one's swap partner)
    score_choices(model, collator, examples, batch_size=3, progress=False)
    assert len(calls) == sum(len(ex["images"]) for ex in examples + examples[-1:])

    class Own:  # a collator of one's own, without answers: each choice's batch built whole
        def __call__(self, chunk):
            return collator(chunk)

    np.testing.assert_allclose(prior_choice_nll(model, Own(), examples, batch_size=3,
                                                progress=False), scores, rtol=1e-6)

    class AnswerInPrompt:  # prompts that differ per choice cannot share one encoding
        def __call__(self, chunk):
            return collator([dict(ex, question=f"{ex['question']} {ex['answer']}")
                             for ex in chunk])

    for score in (prior_choice_nll, score_choices):
        with pytest.raises(ValueError, match="other prompts for other answers"):
            score(model, AnswerInPrompt(), examples, batch_size=3, progress=False)


@pytest.mark.parametrize("objective", ["amvl", "none"])
def test_evaluate_and_tabulate_blink(blink_dir, objective):
    examples = load_blink(blink_dir)
    model, collator = _model(examples, objective)
    result = evaluate_benchmark(model, collator, examples, batch_size=4, progress=False)
    assert result["num_examples"] == 7 and len(result["predictions"]) == 7
    assert result["scoring"] == ("no latent block" if objective == "none"
                                 else "prior latents (z = mu_p)")
    assert list(result["accuracy"]) == ["Counting", "Jigsaw", "IQ_Test"]
    for p, ex in zip(result["predictions"], examples):
        assert p["prediction"] == ex["choices"][int(np.argmin(p["nll"]))]
        assert len(p["nll"]) == len(ex["choices"]) and p["correct"] == (p["prediction"]
                                                                          == ex["answer"])
    for s, acc in result["accuracy"].items():
        hits = [p["correct"] for p in result["predictions"] if p["subtask"] == s]
        assert acc == pytest.approx(np.mean(hits)) and result["counts"][s] == len(hits)
    accuracies = list(result["accuracy"].values())
    hits = [p["correct"] for p in result["predictions"]]
    assert result["mean_over_subtasks"] == pytest.approx(np.mean(accuracies))
    assert result["overall"] == pytest.approx(np.mean(hits))
    table = format_accuracy_table({"amvl (prior latents)": result, "none": result}, "blink")
    lines = table.splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["Model", *BLINK_SUBTASKS.values(), "Avg"]
    row = [c.strip() for c in lines[4].strip("|").split("|")]
    assert row[0] == "amvl (prior latents)"
    assert row[2] == f"{100 * result['accuracy']['Counting']:.1f}"
    assert row[1] == "-" and row[-1] == f"{100 * result['mean_over_subtasks']:.1f}"
    assert "Avg covers 3 of 14 subtasks" in table and len({len(x) for x in lines[2:6]}) == 1


def test_evaluate_visualpuzzles_and_unlabelled(tmp_path, vp_records, blink_dir):
    file = tmp_path / "data.jsonl"
    file.write_text("\n".join(json.dumps(_as_json(r)) for r in vp_records))
    examples = load_visualpuzzles(file)
    model, collator = _model(examples, "prior")
    result = evaluate_benchmark(model, collator, examples, batch_size=4, progress=False)
    assert list(result["accuracy"]) == ["Algorithmic", "Analogical", "Deductive", "Inductive",
                                        "Spatial"] and result["counts"]["Spatial"] == 2
    table = format_accuracy_table({"prior": result}, "VisualPuzzles")
    assert table.splitlines()[2].split("|")[-2].strip() == "Overall"
    assert table.splitlines()[4].split("|")[-2].strip() == f"{100 * result['overall']:.1f}"
    test = load_blink(blink_dir, split="test", unlabelled=True, subtasks=["Counting"])
    model, collator = _model(test, "amvl")
    blind = evaluate_benchmark(model, collator, test, progress=False)
    assert blind["accuracy"] is None and all(p["correct"] is None for p in blind["predictions"])
    with pytest.raises(ValueError, match="no accuracies"):
        format_accuracy_table({"amvl": blind}, "blink")
    with pytest.raises(ValueError, match="some examples have answers"):
        evaluate_benchmark(model, collator, [test[0], dict(test[1], answer="(A)")])
    with pytest.raises(ValueError, match="unknown benchmark"):
        format_accuracy_table({"prior": result}, "mmmu")
    # "|" in a model's or a subtask's name is escaped: every line has the header's cells
    table = format_accuracy_table({"a|b": {"accuracy": {"x|y": 0.5}, "overall": 0.5}}, "jsonl")
    lines = table.splitlines()[2:]
    assert "x\\|y" in lines[0] and "a\\|b" in lines[2]
    assert {len(re.findall(r"(?<!\\)\|", line)) for line in lines} == {4}


def test_choices_the_tokenizer_cannot_tell_apart_are_warned_about(blink_dir):
    """A tokenizer without "(C)" and "(D)" reads both as its unknown token: their NLLs tie and
    the earlier always won, so an accuracy over those examples was meaningless, silently."""
    import warnings

    examples = load_blink(blink_dir)
    words = sorted(({w for ex in examples for w in ex["question"].split()} | {"(A)", "(B)"})
                   - {"(C)", "(D)"})
    tokenizer = word_tokenizer(words, vision=True)
    torch.manual_seed(0)
    base = tiny_qwen2_vl(tokenizer)
    model = AMVLModel(base, tokenizer, AMVLConfig(num_slots=2, latent_dim=4,
                                                  kernel_backend="torch"))
    collator = AMVLCollator(tokenizer, tiny_image_processor(),
                            VisionTokens.from_model_config(base.config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate_benchmark(model, collator, examples, batch_size=3, progress=False)
    tied = [str(w.message) for w in caught if "tokenize to the same ids" in str(w.message)]
    # the 4-choice examples (Counting's 3, IQ_Test's 2) tie; Jigsaw's (A)/(B) do not
    assert len(tied) == 1, tied
    assert tied[0].startswith("5 of 7 examples") and "'val_Counting_0'" in tied[0]
    assert "['(C)', '(D)']" in tied[0]
    first = result["predictions"][0]
    assert first["nll"][2] == first["nll"][3]
    # a tokenizer that knows every label: no warning
    model, collator = _model(examples, "amvl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate_benchmark(model, collator, examples, batch_size=3, progress=False)
    assert not [w for w in caught if "tokenize to the same ids" in str(w.message)]


def _write_lines(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


def test_multiple_choice_records_of_ones_own(tmp_path):
    """--benchmark jsonl: questions as written, each choice's text scored as the answer, the
    answer given as a choice or its label, images relative to the file, subtasks optional."""
    from amvl.evaluation import load_choices

    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "red.png")
    path = _write_lines(tmp_path / "mine.jsonl", [
        {"question": "which is red ?", "choices": ["left", "right"], "answer": "right",
         "images": ["red.png"], "subtask": "colour"},
        {"question": "one two \u2028 three ?", "choices": ["one", "two", "three"],
         "answer": "(C)", "id": "q7"},
        {"question": "is it red ?", "choices": ["one", "two"], "answer": "B"},
    ])
    examples = load_benchmark("jsonl", path)
    assert [(e["id"], e["subtask"], e["answer"]) for e in examples] == \
        [("0", "colour", "right"), ("q7", "all", "three"), ("2", "all", "two")]
    assert examples[1]["question"] == "one two \u2028 three ?"  # one line, as written
    assert examples[0]["images"][0].getpixel((0, 0)) == (200, 10, 10)
    assert load_choices(path) == examples
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS + ["?", "it"], vision=True)
    base = tiny_qwen2_vl(tokenizer)
    model = AMVLModel(base, tokenizer, AMVLConfig(num_slots=2, latent_dim=4,
                                                  kernel_backend="torch"))
    collator = AMVLCollator(tokenizer, tiny_image_processor(),
                            VisionTokens.from_model_config(base.config))
    result = evaluate_benchmark(model, collator, examples, batch_size=2, progress=False)
    assert result["overall"] == np.mean([p["correct"] for p in result["predictions"]])
    table = format_accuracy_table({"mine": result}, "jsonl")
    assert table.startswith("multiple choice: accuracy (%) per subtask; Overall = accuracy "
                            "over all examples.")
    header = table.splitlines()[2]
    assert [c.strip() for c in header.strip("|").split("|")] == ["Model", "all", "colour",
                                                                 "Overall"]


@pytest.mark.parametrize("record,match", [
    ({"question": "q", "choices": ["a", "b"], "answer": "c"},
     r"'answer' 'c' is none of the choices \['a', 'b'\] nor the label of one \(\(A\), \(B\)\)"),
    ({"question": "q", "choices": ["a", "b"], "answer": "(C)"}, "none of the choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": "maybe"}, "none of the choices"),
    ({"question": "q", "choices": ["a", "a"], "answer": "a"}, "the same text twice"),
    ({"question": "q", "choices": ["a"], "answer": "a"}, "2 to 26 options"),
    ({"question": "q", "choices": ["a", "b"], "answer": "a", "images": ["none.png"]},
     "image file .*none.png not found"),
    ({"question": "q", "choices": ["a", "b"], "answer": "a", "subtask": 3}, "'subtask' must"),
    ({"choices": ["a", "b"], "answer": "a"}, "missing field 'question'"),
])
def test_multiple_choice_records_that_cannot_be_scored_are_named(tmp_path, record, match):
    path = _write_lines(tmp_path / "mine.jsonl", [
        {"question": "q", "choices": ["a", "b"], "answer": "a"}, record])
    with pytest.raises(BenchmarkRecordError, match=f"mine.jsonl: row 1 .*{match}"):
        load_benchmark("jsonl", path)
    with pytest.raises(ValueError, match="has no splits"):
        load_benchmark("jsonl", path, split="val")


def test_workers_build_the_batches_the_loop_would(blink_dir):
    """num_workers builds the coming batches (images decoded and processed) in DataLoader
    workers while the model scores: the same scores; a collator's error reaches the caller
    with its message and the workers stop."""
    import multiprocessing

    examples = load_blink(blink_dir)
    model, collator = _model(examples, "amvl")
    in_turn = prior_choice_nll(model, collator, examples, batch_size=3, progress=False)
    ahead = prior_choice_nll(model, collator, examples, batch_size=3, progress=False,
                             num_workers=2)
    np.testing.assert_array_equal(ahead, in_turn)
    assert evaluate_benchmark(model, collator, examples, batch_size=3, progress=False,
                              num_workers=1)["predictions"] == evaluate_benchmark(
        model, collator, examples, batch_size=3, progress=False)["predictions"]

    class Breaks:
        def __call__(self, chunk):
            raise ValueError("a broken image")

    with pytest.raises(ValueError, match="a broken image") as raised:
        prior_choice_nll(model, Breaks(), examples, batch_size=3, progress=False,
                         num_workers=2)
    assert raised.traceback and not multiprocessing.active_children()
    # the worker's exception as it was raised (amvl eval prints its message as one line),
    # not torch's "Caught ValueError in DataLoader worker process 0. Original Traceback ..."
    assert type(raised.value) is ValueError and str(raised.value) == "a broken image"
    assert isinstance(raised.value.__cause__, WorkerTraceback)
    assert "in __call__\n" in str(raised.value.__cause__)

    class Unpicklable(OSError):  # local, and its __init__ takes other arguments: no pickle
        def __init__(self, file: str, problem: str):
            super().__init__(f"{file}: {problem}")

    class BreaksOddly:
        def __call__(self, chunk):
            raise Unpicklable("x.png", "truncated")

    with pytest.raises(RuntimeError) as raised:
        prior_choice_nll(model, BreaksOddly(), examples, batch_size=3, progress=False,
                         num_workers=1)
    assert str(raised.value) == "Unpicklable: x.png: truncated"


def test_two_processes_score_a_share_each_and_return_every_score(tmp_path):
    """``split_across_processes``: under torchrun each process encodes its share of the
    prompts (4 and 3 of 7) and both return the scores one process computes for all."""
    import os
    import subprocess
    import sys

    from tests import eval_worker

    if not torch.distributed.is_available():
        pytest.skip("torch without distributed")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
         "--standalone", str(root / "tests" / "eval_worker.py"), str(tmp_path)],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [rank["scored"] for rank in ranks] == [4, 3]
    model, collator, examples = eval_worker.build()
    expected = prior_choice_nll(model, collator, examples, batch_size=2, progress=False)
    assert np.isinf(expected).any()  # examples with fewer choices: padded columns
    for rank in ranks:
        np.testing.assert_allclose(np.array(rank["nll"]), expected, rtol=1e-5)
