"""The amvl command: demo (a seconds-long run), train with resume, eval on the puzzles."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from amvl.checkpoints import PROMPT_FORMAT_FILE, load_base, load_image_processor
from amvl.cli import build_parser, main
from amvl.run_config import PROMPT_KEYS, check_jsonl_texts, load_run_config, read_jsonl
from amvl.training import read_history


def test_demo_quick_writes_table_json_and_plots(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--objectives", "none,amvl",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| objective |" in printed and "| amvl |" in printed
    payload = json.loads((tmp_path / "results.json").read_text())
    assert set(payload["results"]) == {"none", "amvl"}
    report = payload["results"]["amvl"]["report"]
    assert {"acc_prior", "acc_posterior", "leakage_gap", "kl_fwd", "flip_swapped",
            "acc_prior/counting"} <= report.keys()
    for name in ("learning_curves.png", "kl_curves.png", "leakage_gap.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run_config(tmp_path, steps: int, save_every: int, objective: str = "elbo",
                lora: dict | None = None, **train) -> str:
    config = {"model": {"path": "tiny-qwen2-vl", "hidden_size": 32,
                        **({"lora": lora} if lora else {})},
              "amvl": {"num_slots": 2, "latent_dim": 4, "objective": objective},
              "train": {"steps": steps, "batch_size": 4, "save_every": save_every,
                        "log_every": 1, **train},
              "data": {"train": "puzzles", "per_family": 4},
              "output_dir": str(tmp_path / "run")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_train_resume_and_eval(tmp_path, capsys):
    config = _run_config(tmp_path, steps=2, save_every=1)
    assert main(["train", "--config", config, "--no-progress"]) == 0
    assert (tmp_path / "run" / "checkpoint-2" / "model.safetensors").is_file()
    config = _run_config(tmp_path, steps=3, save_every=1)
    assert main(["train", "--config", config, "--resume", "--no-progress"]) == 0
    state = json.loads((tmp_path / "run" / "checkpoint-3" / "state.json").read_text())
    assert [e["step"] for e in state["history"]] == [1, 2, 3]
    assert (tmp_path / "run" / "final" / "amvl_config.json").is_file()
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["eval", "--config", config, "--benchmark", "puzzles", "--split", "test",
                 "--out", str(out), "--no-progress"]) == 0
    assert "counting" in capsys.readouterr().out
    assert out.is_file()


def test_train_leaves_the_process_group_together_once_saved(tmp_path, monkeypatch):
    """Under torchrun the processes left their group to interpreter shutdown, where NCCL warns
    on every rank that it was never destroyed: after the main process has saved final/, they
    wait for each other and destroy it. A refused run destroys it too."""
    import accelerate

    events = []

    class TwoProcesses:  # what the command asks of accelerate's state, as rank 0 of two
        num_processes, is_main_process = 2, True

        def __init__(self, **settings):  # made once, with the run's group timeout
            events.append(("state", settings["timeout"]))

        def wait_for_everyone(self):
            events.append(("wait", (tmp_path / "run" / "final").is_dir()))

        def destroy_process_group(self):
            events.append(("destroy", None))

    monkeypatch.setattr(accelerate, "PartialState", TwoProcesses)
    assert main(["train", "--config", _run_config(tmp_path, steps=1, save_every=0,
                                                  ddp_timeout=2400), "--no-progress"]) == 0
    assert events == [("state", timedelta(seconds=2400)), ("wait", True), ("destroy", None)]
    events.clear()
    with pytest.raises(SystemExit, match="--resume"):  # the directory holds a run
        main(["train", "--config", _run_config(tmp_path, steps=1, save_every=0),
              "--no-progress"])
    assert events == [("state", timedelta(seconds=1800)), ("destroy", None)]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """``amvl <args>`` on 2 CPU processes, launched as the README says for a machine without
    GPUs."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
         "--standalone", "-m", "amvl", *args, "--no-progress"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)


def _torchrun_train(config: str, *extra: str) -> subprocess.CompletedProcess:
    return _torchrun("train", "--config", config, *extra)


@pytest.mark.parametrize("lora", [None, {"r": 4}], ids=["full", "lora"])
def test_train_under_torchrun_trains_as_one_process_on_the_whole_batch(tmp_path, lora):
    """``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m amvl train`` was refused ("launched
    as 2 processes, but accelerate sees 1"): the command made accelerate's process state
    before the loop's Accelerator, without the variable that makes torchrun's CPU processes
    one group. Now the two processes train what one process does on the whole batch (the
    "none" objective draws no noise, which is drawn per process), save once, and resume;
    with LoRA too (the adapter saved by the main process with the run's record, loaded by
    both on resume). Their checkpoint then continues on one process, with
    --any-process-count alone."""
    if not torch.distributed.is_available():
        pytest.skip("torch without distributed")
    if lora:
        pytest.importorskip("peft")
    from safetensors.torch import load_file

    two, one = tmp_path / "two", tmp_path / "one"
    for folder in (two, one):
        folder.mkdir()
    # a constant rate: a run of 2 steps resumed to 3 takes the 3-step run's rates
    settings = {"objective": "none", "lr_scheduler": "constant", "warmup_steps": 0,
                "lora": lora}
    proc = _torchrun_train(_run_config(two, steps=2, save_every=1, log_every=2, **settings))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("trained model saved to") == 1
    assert proc.stdout.count("amvl train: LoRA r=4") == (1 if lora else 0)
    run = two / "run"
    state = json.loads((run / "checkpoint-1" / "state.json").read_text())
    assert state["num_processes"] == 2 and state["pending_steps"] == 1
    assert (run / "checkpoint-1" / "lora_run.json").is_file() == bool(lora)
    shutil.rmtree(run / "checkpoint-2")  # resumed from step 1, inside a log window
    proc = _torchrun_train(_run_config(two, steps=4, save_every=2, log_every=2, **settings),
                           "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "plots" / "learning_curves.png").is_file()

    assert main(["train", "--config", _run_config(one, steps=4, save_every=0, log_every=2,
                                                  **settings), "--no-progress"]) == 0
    # the logged losses are the whole batch's, not the main process's share's
    histories = [read_history(folder / "run") for folder in (two, one)]
    assert [e["step"] for e in histories[0]] == [e["step"] for e in histories[1]] == [2, 4]
    assert [e["loss"] for e in histories[0]] == pytest.approx(
        [e["loss"] for e in histories[1]], rel=1e-6)
    saved = "adapter_model.safetensors" if lora else "model.safetensors"
    weights = [load_file(str(folder / "run" / "final" / "base" / saved))
               for folder in (two, one)]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[1].items():
        # A key projection's bias moves a query's scores all alike, which softmax ignores: its
        # gradient is rounding alone, which AdamW scales up to steps of the learning rate.
        if not name.endswith("k_proj.bias"):
            torch.testing.assert_close(weights[0][name], tensor, rtol=1e-5, atol=1e-6,
                                       msg=name)
    # the 2 processes' checkpoint continued on 1 process, asked to (each rank's random state
    # saved, the main process's taken)
    config = _run_config(two, steps=5, save_every=1, log_every=1, **settings)
    with pytest.raises(SystemExit, match="trained on 2 processes, this run has 1.*"
                                         "--any-process-count"):
        main(["train", "--config", config, "--resume", "--no-progress"])
    with pytest.warns(UserWarning, match="trained on 2 processes and continues on 1"):
        assert main(["train", "--config", config, "--resume", "--any-process-count",
                     "--no-progress"]) == 0
    assert [e["step"] for e in read_history(run)] == [2, 4, 5]
    with pytest.raises(SystemExit, match="--any-process-count goes with --resume"):
        main(["train", "--config", config, "--any-process-count", "--no-progress"])


def _resume_to_step_2_killed_writing_final(tmp_path, monkeypatch) -> None:
    """Resume the tiny run to step 2, its save of final/ failing once written (a full disk)."""
    from amvl.model import AMVLModel

    real = AMVLModel.save_pretrained

    def fails_halfway(self, directory, **kwargs):
        real(self, directory, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(AMVLModel, "save_pretrained", fails_halfway)
    with pytest.raises(OSError, match="No space left"):
        main(["train", "--config", _run_config(tmp_path, steps=2, save_every=1), "--resume",
              "--no-progress"])


def test_final_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """final/ was written in place, file by file: a run killed while saving left a directory
    that loaded as something it was not (an adapter without its record)."""
    assert main(["train", "--config", _run_config(tmp_path, steps=1, save_every=1),
                 "--no-progress"]) == 0
    final = tmp_path / "run" / "final"
    before = {str(p): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    (tmp_path / "run" / ".final.killed").mkdir()  # a save killed before its rename
    _resume_to_step_2_killed_writing_final(tmp_path, monkeypatch)
    assert {str(p): p.read_bytes() for p in final.rglob("*") if p.is_file()} == before
    assert not list((tmp_path / "run").glob(".final*"))
    monkeypatch.undo()
    # a kill while the old final/ is removed: it was moved aside whole first
    real_rmtree = shutil.rmtree

    def killed_in_retired(path, *args, **kwargs):
        if ".retired-" in str(path):
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_in_retired)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--config", _run_config(tmp_path, steps=3, save_every=1), "--resume",
              "--no-progress"])
    monkeypatch.undo()
    after = {str(p): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    assert after != before and {Path(k).name for k in after} == {Path(k).name for k in before}
    umask = os.umask(0)
    os.umask(umask)  # readable as any other directory is, not tempfile's 0700
    assert final.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "run" / "checkpoint-3").stat().st_mode & 0o777 == 0o777 & ~umask
    assert main(["train", "--config", _run_config(tmp_path, steps=4, save_every=1), "--resume",
                 "--no-progress"]) == 0
    assert not list((tmp_path / "run").glob(".final*"))  # the retired one of the killed run
    (tmp_path / "elsewhere").mkdir()
    os.replace(final, tmp_path / "elsewhere" / "final")
    final.symlink_to(tmp_path / "elsewhere" / "final")
    with pytest.raises(SystemExit, match="final is a symbolic link"):
        main(["train", "--config", _run_config(tmp_path, steps=5, save_every=1), "--resume",
              "--no-progress"])


def test_a_rerun_with_resume_writes_the_final_model_a_killed_run_did_not(tmp_path, capsys,
                                                                          monkeypatch):
    """A run killed after its last checkpoint, before final/ was written (a time limit, a full
    disk), could not be finished: --resume was refused forever ("already at step N"), and a
    resumed run's final/ stayed the shorter run's model, which amvl eval took. The rerun now
    writes final/ from the checkpoint, without training, and then has nothing left to do."""
    run = tmp_path / "run"
    assert main(["train", "--config", _run_config(tmp_path, steps=1, save_every=1),
                 "--no-progress"]) == 0
    written = {str(p): p.read_bytes() for p in (run / "final").rglob("*") if p.is_file()}
    assert json.loads((run / "final" / "trained_step.json").read_text()) == {"step": 1}
    history = (run / "history.jsonl").read_text()
    shutil.rmtree(run / "final")  # the run was killed before it wrote final/
    capsys.readouterr()
    assert main(["train", "--config", _run_config(tmp_path, steps=1, save_every=1),
                 "--resume", "--no-progress"]) == 0
    assert "checkpoint-1 is the run's last step, but" in capsys.readouterr().out
    # the same model, byte for byte, and no step trained
    assert {str(p): p.read_bytes() for p in (run / "final").rglob("*") if p.is_file()} \
        == written
    assert (run / "history.jsonl").read_text() == history
    with pytest.raises(SystemExit, match="checkpoint-1 is already at step 1"):
        main(["train", "--config", _run_config(tmp_path, steps=1, save_every=1), "--resume",
              "--no-progress"])
    # resumed to step 2, killed while writing final/: the step-1 model stays in final/
    _resume_to_step_2_killed_writing_final(tmp_path, monkeypatch)
    monkeypatch.undo()
    assert json.loads((run / "final" / "trained_step.json").read_text()) == {"step": 1}
    assert main(["train", "--config", _run_config(tmp_path, steps=2, save_every=1),
                 "--resume", "--no-progress"]) == 0
    assert json.loads((run / "final" / "trained_step.json").read_text()) == {"step": 2}
    assert not (run / "checkpoint-3").exists()
    assert {str(p): p.read_bytes() for p in (run / "final").rglob("*.safetensors")} != \
        {k: v for k, v in written.items() if k.endswith(".safetensors")}


def test_resuming_a_full_fine_tune_on_another_base_is_refused_before_it_loads(tmp_path,
                                                                             monkeypatch):
    """Only a LoRA run's checkpoint named its base model: a full fine-tune resumed on another
    one loaded it whole, then died in train with torch's size-mismatch list (or went on, on
    another base of the same shapes). Its checkpoints now name the base too; one that does
    not (an older run's) is refused in a line when its weights do not fit."""
    import amvl.cli

    assert main(["train", "--config", _run_config(tmp_path, steps=1, save_every=1),
                 "--no-progress"]) == 0
    config = _run_config(tmp_path, steps=2, save_every=1)
    raw = yaml.safe_load(Path(config).read_text())
    raw["model"]["hidden_size"] = 64
    Path(config).write_text(yaml.safe_dump(raw))
    real_load_base = amvl.cli.load_base

    def no_model(section):
        raise AssertionError("the model was built before the base was compared")
    monkeypatch.setattr(amvl.cli, "load_base", no_model)
    with pytest.raises(SystemExit, match=r"checkpoint-1 was trained on the base model .*"
                                         r"differs in \['model.hidden_size'\]\): resume it on "
                                         "the same base"):
        main(["train", "--config", config, "--resume", "--no-progress"])
    monkeypatch.setattr(amvl.cli, "load_base", real_load_base)
    (tmp_path / "run" / "checkpoint-1" / "base_model.json").unlink()  # an older checkpoint
    with pytest.raises(SystemExit, match=r"amvl train: .*checkpoint-1's weights do not fit this "
                                         r"model: size mismatch .*\(and \d+ more\)\. Was it "
                                         "trained from another base model"):
        main(["train", "--config", config, "--resume", "--no-progress"])


def test_train_keeps_runs_apart(tmp_path):
    """A new run into a directory holding another run's checkpoints is refused (its pruning
    would delete the new checkpoints among the old by step, and --resume would continue the
    newest); --resume refuses a checkpoint trained with other settings, and one that is not
    there."""
    config = _run_config(tmp_path, steps=2, save_every=1)
    assert main(["train", "--config", config, "--no-progress"]) == 0
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        main(["train", "--config", config, "--no-progress"])
    other = yaml.safe_load(Path(config).read_text())
    other["amvl"]["objective"] = "amvl"
    Path(config).write_text(yaml.safe_dump(other))
    with pytest.raises(SystemExit, match=r"another AMVLConfig \(differs in \['objective'\]\)"):
        main(["train", "--config", config, "--resume", "--no-progress"])
    other["output_dir"] = str(tmp_path / "empty")
    Path(config).write_text(yaml.safe_dump(other))
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(["train", "--config", config, "--resume", "--no-progress"])


@pytest.mark.parametrize("text,match", [
    ("amvl: {num_slots: 2}", "model.path"),
    ("model: {path: tiny-qwen2-vl}\namvl: {slots: 2}", "unknown keys in 'amvl'"),
    ("model: {path: tiny-qwen2-vl}\ntrain: {epochs: 2}", "unknown keys in 'train'"),
])
def test_bad_run_configs(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit, match=match):
        load_run_config(path)


def test_eval_under_torchrun_splits_the_examples_and_writes_once(tmp_path, capsys,
                                                                 monkeypatch):
    """Under torchrun the main process prints and writes what one process would (it was
    refused: every process would have scored every example and written --out); that each
    scores a share alone is tests/test_evaluation.py's. The models go on the device accelerate
    gives each process: with ACCELERATE_USE_CPU=1 on a machine with GPUs, every process put
    them on cuda:0."""
    import accelerate

    if not torch.distributed.is_available():
        pytest.skip("torch without distributed")
    config = _run_config(tmp_path, steps=1, save_every=0)
    assert main(["train", "--config", config, "--no-progress"]) == 0
    scoring = ["eval", "--config", config, "--benchmark", "puzzles", "--split", "test",
               "--batch-size", "2"]
    proc = _torchrun(*scoring, "--out", str(tmp_path / "two.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("| counting |") == 1  # the table, from the main process alone
    capsys.readouterr()
    assert main([*scoring, "--out", str(tmp_path / "one.json"), "--no-progress"]) == 0
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two.keys() == one.keys()
    for name in one:
        assert [p["id"] for p in two[name]["predictions"]] == \
            [p["id"] for p in one[name]["predictions"]]
        assert [n for p in two[name]["predictions"] for n in p["nll"]] == pytest.approx(
            [n for p in one[name]["predictions"] for n in p["nll"]], rel=1e-5)
        assert two[name]["accuracy"] == one[name]["accuracy"]

    class CPUProcessOfTwo:  # accelerate's state of rank 0 of two, launched on the CPU
        num_processes, is_main_process, device = 2, True, torch.device("cpu")

        def __init__(self, **settings):
            pass

        def wait_for_everyone(self):
            pass

        def destroy_process_group(self):
            pass

    monkeypatch.setattr(accelerate, "PartialState", CPUProcessOfTwo)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with GPUs
    monkeypatch.setenv("WORLD_SIZE", "2")  # without a group, this process scores them all
    assert main([*scoring, "--out", str(tmp_path / "cpu.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "cpu.json").read_text()).keys() == one.keys()


def test_eval_diagnostics_refuse_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="amvl eval --diagnostics runs in one process"):
        main(["eval", "--checkpoint", "x", "--benchmark", "puzzles", "--diagnostics"])


def test_eval_num_workers_is_a_count(capsys):
    assert build_parser().parse_args(["eval", "--checkpoint", "x", "--num-workers",
                                      "2"]).num_workers == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--checkpoint", "x", "--num-workers", "-1"])
    assert "must be at least 0, got -1" in capsys.readouterr().err


def test_eval_needs_data_for_real_benchmarks(tmp_path):
    with pytest.raises(SystemExit, match="--data"):
        main(["eval", "--checkpoint", "x", "--benchmark", "blink"])
    # --out was written over the data file, or into the folder the next run reads
    data = tmp_path / "mine.jsonl"
    data.write_text("{}\n")
    with pytest.raises(SystemExit, match="is the --data file"):
        main(["eval", "--checkpoint", "x", "--benchmark", "jsonl", "--data", str(data),
              "--out", str(data)])
    assert data.read_text() == "{}\n"
    (tmp_path / "data").mkdir()  # where VisualPuzzles snapshots keep their files
    for out in (tmp_path / "results.json", tmp_path / "data" / "results.json"):
        with pytest.raises(SystemExit, match="lies among the --data folder's files"):
            main(["eval", "--checkpoint", "x", "--benchmark", "visualpuzzles", "--data",
                  str(tmp_path), "--out", str(out)])
    assert build_parser().parse_args(["demo"]).out == "amvl-demo"


def test_eval_out_is_refused_where_the_blink_loader_reads(tmp_path):
    """BLINK reads its subtask folders' split files, not its root: --out at the root was
    refused, and Counting/val_results.json (read as records by the next run) was not."""
    (tmp_path / "BLINK" / "Counting").mkdir(parents=True)
    blink = tmp_path / "BLINK"
    for out, split, read_by in ((blink / "Counting" / "val_results.json", None, "val"),
                                (blink / "Counting" / "test-preds.jsonl", None, "test"),
                                (blink / "Counting" / "val.json", "test", "val")):
        with pytest.raises(SystemExit, match="lies among the --data folder's files.*the next "
                                             f"run with --split {read_by} would read it"):
            main(["eval", "--checkpoint", "x", "--benchmark", "blink", "--data", str(blink),
                  "--out", str(out), *(["--split", split] if split else [])])
    for out in (blink / "results.json", blink / "Counting" / "results.json"):
        with pytest.raises(SystemExit) as refused:  # past the check: no checkpoint x
            main(["eval", "--checkpoint", str(tmp_path / "x"), "--benchmark", "blink",
                  "--data", str(blink), "--out", str(out)])
        assert "lies among" not in str(refused.value) and "x" in str(refused.value)


def test_jsonl_training_data(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"images": ["a.png"], "question": "what colour ?", "answer": "red"}) + "\n"
        + json.dumps({"question": "no image", "answer": "ok"}) + "\n")
    examples = read_jsonl(tmp_path / "train.jsonl")
    assert examples[0]["images"] == [str(tmp_path / "a.png")] and examples[1]["images"] == []
    (tmp_path / "bad.jsonl").write_text(json.dumps({"images": ["missing.png"],
                                                    "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(SystemExit, match="line 1: missing image"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_shipped_configs_parse():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        run = load_run_config(path)
        assert run["amvl_config"].objective in {"amvl", "elbo", "prior", "none"}, path


def test_amvl_attention_from_the_run_config():
    """``attn_implementation: amvl`` puts the language model on the latent-block kernel and
    leaves the vision tower on SDPA; a training step runs on it."""
    import torch

    from amvl.config import AMVLConfig
    from amvl.data import AMVLCollator
    from amvl.model import AMVLModel

    base, tokenizer, _ = load_base({"path": "tiny-qwen2-vl", "attn_implementation": "amvl"})
    config = base.config
    assert config.get_text_config()._attn_implementation == "amvl"
    assert config.vision_config._attn_implementation == "sdpa"
    model = AMVLModel(base, tokenizer, AMVLConfig(num_slots=2, latent_dim=4))
    assert model._on_amvl_attention()
    words = [t for t in tokenizer.get_vocab() if t.isalpha()][:6]
    batch = AMVLCollator(tokenizer)([{"question": " ".join(words[:3]), "answer": words[3]}])
    loss = model(**batch, seed=0).loss
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("text,match", [
    ("model: {path: tiny-qwen2-vl}\noutputdir: runs/x", "unknown keys in 'top level'"),
    ("model: {path: tiny-qwen2-vl}\ndata: {max_prompt_token: 9}", "unknown keys in 'data'"),
    ("model: {path: tiny-qwen2-vl, dtpye: bfloat16}", "unknown keys in 'model'"),
    ("model: {path: tiny-qwen2-vl}\neval: {baseline: {}}", "unknown keys in 'eval'"),
    ("model: {path: tiny-qwen2-vl}\namvl: {num_slots: 0}", "bad.yaml: .*num_slots"),
    ("model: {path: tiny-qwen2-vl}\namvl: [1, 2]", "'amvl' must be a mapping"),
    ("- just\n- a list", "must hold a mapping"),
    ("model: {path: [unclosed", "not valid YAML"),
    # values, not only keys: these were tracebacks, or silently ignored
    ("model: {path: tiny-qwen2-vl}\neval: {baselines: [a, b]}", "eval.baselines must map"),
    ("model: {path: tiny-qwen2-vl}\neval: {baselines: {none: }}", "eval.baselines must map"),
    ("model: {path: tiny-qwen2-vl}\ndata: {per_family: many}", "data.per_family must be"),
    ("model: {path: tiny-qwen2-vl}\ndata: {max_prompt_tokens: lots}",
     "data.max_prompt_tokens must be"),
    ("model: {path: tiny-qwen2-vl}\ndata: {train: 3}", "data.train must be"),
    # sized the puzzles, silently ignored beside a data file
    ("model: {path: tiny-qwen2-vl}\ndata: {train: d.jsonl, per_family: 5}",
     "data.per_family sizes the built-in puzzles"),
    ("model: {path: tiny-qwen2-vl, dtype: bfloat}", "model.dtype must be one of"),
    # loaded for minutes, then refused by AMVLModel: its kernels ignore the latent masks
    ("model: {path: tiny-qwen2-vl, attn_implementation: flash_attention_2}",
     "model.attn_implementation 'flash_attention_2': flash-attention ignores the masks"),
    ("model: {path: tiny-qwen2-vl, hidden_size: 30}", "multiple of 32"),
    ("model: {path: /models/x, hidden_size: 64}", "hidden_size is for model.path tiny"),
    ("model: {path: tiny-qwen2-vl}\noutput_dir: [a]", "output_dir must be a path"),
    ("model: {path: tiny-qwen2-vl}\ndata: {chat_template: 1}", "data.chat_template must be"),
    ("model: {path: tiny-qwen2-vl}\ndata: {eval: [a]}", "data.eval must be a JSON-lines"),
    ("model: {path: tiny-qwen2-vl}\ntrain: {eval_every: 5}",
     "train.eval_every validates on data.eval, which is not set"),
    ("model: {path: tiny-qwen2-vl}\ndata: {chat_template: none.jinja}",
     "data.chat_template: no file none.jinja"),
    ("model: {path: tiny-qwen2-vl}\ndata: {system_prompt: be brief}",
     "data.system_prompt must be a string, and needs data.chat_template"),
    ("model: {path: tiny-qwen2-vl}\ndata: {chat_template: true, system_prompt: [a]}",
     "data.system_prompt must be a string"),
    ("model: {path: tiny-qwen2-vl}\ndata: {add_bos: sometimes}", "data.add_bos must be true"),
    ("model: {path: tiny-qwen2-vl}\ndata: {add_bos: true, chat_template: true}",
     "data.add_bos must be true or false, and true only without data.chat_template"),
    # PyYAML keeps the last of two equal keys: a second train section dropped the first whole
    ("model: {path: tiny-qwen2-vl}\ntrain: {steps: 5000, learning_rate: 1.0e-5}\n"
     "output_dir: runs/x\ntrain: {batch_size: 8}",
     r"bad.yaml: key 'train' appears twice \(the second time on line 4\)"),
    ("model: {path: tiny-qwen2-vl}\ntrain:\n  steps: 5\n  log_every: 1\n  steps: 6",
     r"key 'steps' appears twice \(the second time on line 5\)"),
])
def test_config_mistakes_are_named_not_ignored(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit, match=match):
        load_run_config(path)


def test_demo_arguments_checked_before_any_training(tmp_path, monkeypatch):
    import amvl.demo

    seen = {}
    monkeypatch.setattr(amvl.demo, "run_objective", lambda *a, **k: seen.setdefault("ran", 1))
    with pytest.raises(SystemExit, match="bogus"):
        main(["demo", "--quick", "--out", str(tmp_path), "--objectives", "none,bogus"])
    assert not seen and not list(tmp_path.iterdir())

    def record(out, config, progress):
        seen.update(steps=config.steps, objectives=config.objectives)
    monkeypatch.setattr(amvl.demo, "run_demo", record)
    main(["demo", "--quick", "--steps", "5", "--objectives", "none, amvl", "--out", "x"])
    assert seen == {"steps": 5, "objectives": ("none", "amvl")}


def test_jsonl_lines_that_are_not_examples(tmp_path):
    cases = {"array.jsonl": "[1, 2]", "field.jsonl": json.dumps({"question": "q"}),
             "empty.jsonl": "\n", "json.jsonl": '{"question": "q",'}
    expected = {"array.jsonl": "line 1: expected a JSON object",
                "field.jsonl": "line 1: no 'answer' field", "empty.jsonl": "holds no examples",
                "json.jsonl": "line 1: "}
    for name, text in cases.items():
        (tmp_path / name).write_text(text + "\n")
        with pytest.raises(SystemExit, match=expected[name]):
            read_jsonl(tmp_path / name)


def test_eval_checks_every_model_before_evaluating(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "tiny-qwen2-vl"},
                                      "eval": {"baselines": {"none": str(tmp_path / "gone")}}}))
    with pytest.raises(SystemExit, match="also_gone .*is not a model written by amvl train"):
        main(["eval", "--config", str(config), "--checkpoint", str(tmp_path / "also_gone")])
    # a checkpoint that would load (never reached): the baseline is refused first
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "amvl_config.json").write_text("{}")
    with pytest.raises(SystemExit, match="none: .*gone is not a model written by amvl train"):
        main(["eval", "--config", str(config), "--checkpoint", str(tmp_path / "final")])
    with pytest.raises(SystemExit, match="--unlabelled is for BLINK"):
        main(["eval", "--checkpoint", str(tmp_path), "--unlabelled"])
    with pytest.raises(SystemExit, match="--split val has them"):
        main(["eval", "--checkpoint", str(tmp_path), "--benchmark", "blink", "--data", "x",
              "--split", "val", "--unlabelled", "--out", "o.json"])
    config.write_text(yaml.safe_dump({"model": {"path": "tiny-qwen2-vl"},
                                      "eval": {"baselines": {"final": str(tmp_path)}}}))
    with pytest.raises(SystemExit, match="has the checkpoint's name"):
        main(["eval", "--config", str(config), "--checkpoint", str(tmp_path / "final")])


def test_eval_refuses_the_tiny_image_processor_for_another_vision_tower(tmp_path):
    """A saved VLM without its processor may only be the demo's tiny one: a real model would
    get images cut to the tiny processor's patches."""
    from amvl.checkpoints import load_trained
    from amvl.config import AMVLConfig
    from amvl.model import AMVLModel
    from amvl.puzzles import vocabulary
    from amvl.tiny import tiny_qwen2_vl, word_tokenizer

    tokenizer = word_tokenizer(vocabulary(), vision=True)
    for patch, ok in ((4, True), (14, False)):
        model = AMVLModel(tiny_qwen2_vl(tokenizer, patch_size=patch), tokenizer,
                          AMVLConfig(num_slots=2, latent_dim=4))
        model.save_pretrained(tmp_path / str(patch))
        if ok:
            assert load_trained(tmp_path / str(patch))[1].patch_size == 4
        else:
            with pytest.raises(SystemExit, match="no image processor in"):
                load_trained(tmp_path / str(patch))


def test_model_section_values_reach_the_model(tmp_path):
    import torch

    base, _, _ = load_base({"path": "tiny-qwen2-vl", "dtype": "bfloat16"})  # was ignored
    assert {p.dtype for p in base.parameters()} == {torch.bfloat16}
    (tmp_path / "config.json").write_text("{}")  # no architectures: was a KeyError
    with pytest.raises(SystemExit, match="names no model class"):
        load_base({"path": str(tmp_path)})


def test_command_line_values_checked_before_any_model_loads(tmp_path):
    checkpoint = ["eval", "--checkpoint", str(tmp_path)]
    for bad in ("0", "-2", "two"):  # 0 was a traceback after loading, -2 a non-finite NLL
        with pytest.raises(SystemExit):
            build_parser().parse_args(checkpoint + ["--batch-size", bad])
        with pytest.raises(SystemExit):
            build_parser().parse_args(["demo", "--steps", bad])
    # an unwritable --out failed only after the first model's evaluation
    with pytest.raises(SystemExit, match="no directory"):
        main(checkpoint + ["--out", str(tmp_path / "nodir" / "res.json")])
    with pytest.raises(SystemExit, match="is a directory"):
        main(checkpoint + ["--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--data is for blink"):
        main(checkpoint + ["--data", str(tmp_path)])
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="amvl demo: "):  # was a FileExistsError traceback
        main(["demo", "--quick", "--out", str(tmp_path / "file"), "--no-progress"])


def test_image_processor_loads_without_torchvision(tmp_path, monkeypatch):
    """transformers 5.17's AutoImageProcessor needs torchvision even for a processor with a
    pillow backend (the GPU machine's version): the saved type's pillow class loads it."""
    import transformers

    from amvl.tiny import tiny_image_processor

    saved = tiny_image_processor()
    saved.save_pretrained(tmp_path)

    def no_torchvision(*args, **kwargs):
        raise ImportError("AutoImageProcessor requires the Torchvision library")
    try:
        monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", no_torchvision)
    except ImportError:  # 5.17 without torchvision: AutoImageProcessor itself refuses
        pass
    loaded = load_image_processor(tmp_path)
    assert type(loaded).__name__.startswith("Qwen2VLImageProcessor")
    assert loaded.to_dict() | {"image_processor_type": None} == \
        saved.to_dict() | {"image_processor_type": None}
    (tmp_path / "preprocessor_config.json").write_text('{"image_processor_type": "Nothing"}')
    with pytest.raises(SystemExit, match="cannot load the image processor"):
        load_image_processor(tmp_path)


def test_train_seed_fixes_the_whole_run(tmp_path):
    """The heads and the injector (and the tiny model) were built before train() seeded
    torch: two runs of one config trained different models."""
    losses = []
    for run in ("a", "b"):
        config = yaml.safe_load(Path(_run_config(tmp_path, steps=2, save_every=2)).read_text())
        config["output_dir"] = str(tmp_path / run)
        path = tmp_path / f"{run}.yaml"
        path.write_text(yaml.safe_dump(config))
        torch.manual_seed(len(losses))  # whatever the generator held before
        assert main(["train", "--config", str(path), "--no-progress"]) == 0
        state = json.loads((tmp_path / run / "checkpoint-2" / "state.json").read_text())
        losses.append([e["loss"] for e in state["history"]])
    assert losses[0] == losses[1]
    with pytest.raises(SystemExit, match="already at step 2"):
        main(["train", "--config", str(path), "--resume", "--no-progress"])


def test_a_checkpoints_own_tokenizer_class(tmp_path):
    """A word-level tokenizer saved with a Qwen2 came back from AutoTokenizer as Qwen2's BPE
    tokenizer, which drops every word it does not know: the class it was saved as."""
    from amvl.tiny import tiny_qwen2, word_tokenizer

    tokenizer = word_tokenizer(["how", "many", "cells"])
    tiny_qwen2(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, loaded, _ = load_base({"path": str(tmp_path)})
    text = "how many cells"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"] != []


def test_eval_applies_the_config_attention_and_refuses_text_models_on_images(tmp_path, capsys):
    import amvl.evaluation

    config = _run_config(tmp_path, steps=1, save_every=1)
    assert main(["train", "--config", config, "--no-progress"]) == 0
    raw = yaml.safe_load(Path(config).read_text())
    raw["model"]["attn_implementation"] = "amvl"
    Path(config).write_text(yaml.safe_dump(raw))
    seen = []
    real = amvl.evaluation.evaluate_benchmark

    def spy(model, *args, **kwargs):
        seen.append(model._on_amvl_attention())
        return real(model, *args, **kwargs)
    amvl.evaluation.evaluate_benchmark = spy
    try:
        assert main(["eval", "--config", config, "--benchmark", "puzzles", "--split", "test",
                     "--no-progress"]) == 0
    finally:
        amvl.evaluation.evaluate_benchmark = real
    assert seen == [True]  # the saved model came back on sdpa, whatever the config said
    # a text-only model on the image puzzles: named before any evaluation
    text_only = tmp_path / "text"
    (text_only / "base").mkdir(parents=True)
    (text_only / "amvl_config.json").write_text("{}")
    (text_only / "base" / "config.json").write_text('{"model_type": "qwen2"}')
    with pytest.raises(SystemExit, match="text-only model, and the puzzles examples have "
                                         "images"):
        main(["eval", "--checkpoint", str(text_only), "--benchmark", "puzzles",
              "--no-progress"])


def test_train_checks_the_output_directory_before_building_the_model(tmp_path, monkeypatch):
    """A directory that already held checkpoints was refused only after the model was loaded
    and its embeddings resized (minutes on a real model); so were a resume of another run, of
    one already at its last step, and of a checkpoint that is not there."""
    import amvl.cli
    from amvl.config import AMVLConfig

    config = _run_config(tmp_path, steps=2, save_every=1)
    run = load_run_config(config)
    checkpoint = tmp_path / "run" / "checkpoint-2"  # what the checks read of a checkpoint
    checkpoint.mkdir(parents=True)
    run["amvl_config"].save(checkpoint)
    (checkpoint / "state.json").write_text(json.dumps(
        {"step": 2, "train_config": {"seed": 0, "batch_size": 4}, "num_processes": 1}))
    (tmp_path / "run" / "final").mkdir()  # a finished run's (without, --resume writes it)
    (tmp_path / "run" / "final" / "trained_step.json").write_text(json.dumps({"step": 2}))

    def no_model(section):
        raise AssertionError("the model was built before the output directory was checked")
    monkeypatch.setattr(amvl.cli, "load_base", no_model)
    with pytest.raises(SystemExit, match="amvl train: .*already holds checkpoints"):
        main(["train", "--config", config, "--no-progress"])
    with pytest.raises(SystemExit, match="amvl train: checkpoint-2 is already at step 2"):
        main(["train", "--config", config, "--resume", "--no-progress"])
    AMVLConfig(num_slots=3, latent_dim=4, objective="elbo").save(checkpoint)
    with pytest.raises(SystemExit, match=r"another AMVLConfig \(differs in \['num_slots'\]\)"):
        main(["train", "--config", config, "--resume", "--no-progress"])
    raw = yaml.safe_load(Path(config).read_text())
    raw["output_dir"] = str(tmp_path / "empty")
    Path(config).write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit, match="amvl train: resume=True but no checkpoint"):
        main(["train", "--config", config, "--resume", "--no-progress"])
    # a kernel backend this machine cannot run failed at the first step, with a traceback
    if not torch.cuda.is_available():
        raw["amvl"] = {**(raw.get("amvl") or {}), "kernel_backend": "cuda"}
        Path(config).write_text(yaml.safe_dump(raw))
        with pytest.raises(SystemExit, match="kernel_backend='cuda' cannot run here"):
            main(["train", "--config", config, "--no-progress"])


def test_train_checks_that_output_dir_can_be_a_directory_before_loading(tmp_path,
                                                                       monkeypatch):
    """An output_dir that is a file was refused at the first log, after the model had loaded
    and trained ("[Errno 17] File exists"); one inside a file raised a traceback there."""
    import amvl.cli

    def no_model(section):
        raise AssertionError("the model was built before output_dir was checked")
    monkeypatch.setattr(amvl.cli, "load_base", no_model)
    config = _run_config(tmp_path, steps=2, save_every=1)
    raw = yaml.safe_load(Path(config).read_text())
    (tmp_path / "outfile").write_text("not a directory")
    for out, match in [("outfile", r"amvl train: output_dir .*outfile is a file; give a "
                                   "directory"),
                       ("outfile/run", r"amvl train: output_dir .*outfile/run: .*outfile is a "
                                       "file, so no directory can be made inside it")]:
        raw["output_dir"] = str(tmp_path / out)
        Path(config).write_text(yaml.safe_dump(raw))
        for resume in ([], ["--resume"]):
            with pytest.raises(SystemExit, match=match):
                main(["train", "--config", config, "--no-progress", *resume])


def test_demo_options_are_named_in_their_errors_and_help(tmp_path, monkeypatch, capsys):
    """--seed -1 failed deep in numpy as "expected non-negative integer", without naming the
    option; an --out that is a file failed as "[Errno 17] File exists"; --help showed the
    module doc's reST ``literals``."""
    import amvl.demo

    monkeypatch.setattr(amvl.demo, "run_objective", lambda *a, **k: pytest.fail("trained"))
    for bad in ("-1", str(2**63), "one"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["demo", "--seed", bad])
        assert "argument --seed: " in capsys.readouterr().err
    assert build_parser().parse_args(["demo", "--seed", "7"]).seed == 7
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"amvl demo: --out .*file is a file; give a "
                                         r"directory"):
        main(["demo", "--quick", "--out", str(tmp_path / "file"), "--no-progress"])
    with pytest.raises(SystemExit, match=r"amvl demo: --out .*file is a file, so no "
                                         r"directory can be made inside it"):
        main(["demo", "--quick", "--out", str(tmp_path / "file" / "sub"), "--no-progress"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    top_help = capsys.readouterr().out
    assert "The amvl command: demo, train, eval, generate and plot." in top_help \
        and "``" not in top_help
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    assert "fixes the whole run" in capsys.readouterr().out


def test_every_option_with_a_default_says_it_in_help():
    """--help showed no defaults for --batch-size, --max-new-tokens, --steps, --out (demo)."""
    import argparse

    from amvl.demo import DemoConfig

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        for action in command._actions:
            if action.option_strings and action.default not in (None, False,
                                                                 argparse.SUPPRESS):
                assert f"default: {action.default}" in (action.help or "") \
                    or f"default {action.default}" in (action.help or "") \
                    or f"{action.default} (default)" in (action.help or ""), \
                    (name, action.option_strings, action.help)
            elif action.option_strings and action.required:
                assert action.help, (name, action.option_strings)
    steps = next(a for a in commands.choices["demo"]._actions if "--steps" in a.option_strings)
    assert f"default: {DemoConfig.steps}, DemoConfig.steps" in steps.help


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


def _puzzles_on_disk(folder: Path) -> list[tuple[dict, str]]:
    """The built-in test puzzles (one per family), each with the name of its image saved in
    ``folder``: what JSON-lines records of them refer to."""
    from amvl.puzzles import puzzle_suite

    saved = []
    for i, puzzle in enumerate(puzzle_suite("test", 1)):
        puzzle["images"][0].save(folder / f"puzzle{i}.png")
        saved.append((puzzle, f"puzzle{i}.png"))
    return saved


@pytest.mark.parametrize("field,value,match", [
    # str() made these "None" and "['one']", and trained on them
    ("answer", None, "line 2: 'answer' must be a string, got null"),
    ("question", None, "line 2: 'question' must be a string, got null"),
    ("answer", ["one"], r"line 2: 'answer' must be a string, got \[\"one\"\]"),
    ("answer", 4, "line 2: 'answer' must be a string, got 4"),
    # a string was read one character per image: "missing image .../s"
    ("images", "a.png", "line 2: 'images' must be a list of paths, got \"a.png\""),
    ("id", [1], r"line 2: 'id' must be a string or an integer, got \[1\]"),
    ("images", [3], "line 2: 'images' must hold paths"),
    ("images", [""], "line 2: 'images' must hold paths"),
])
def test_jsonl_fields_of_the_wrong_type_are_named(tmp_path, field, value, match):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = {"images": ["a.png"], "question": "q", "answer": "a"}
    path = _write_jsonl(tmp_path / "train.jsonl", [good, {**good, field: value}])
    with pytest.raises(SystemExit, match=f"amvl: {re.escape(str(path))} {match}"):
        read_jsonl(path)


def test_jsonl_empty_answers_are_counted_in_one_warning(tmp_path):
    """An empty answer trains on the EOS token alone: allowed, but said once, with how many
    there are and where the first is."""
    records = [{"question": "q", "answer": a} for a in ("a", "", "b", "", "c")]
    path = _write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.warns(UserWarning) as caught:
        examples = read_jsonl(path)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "an empty answer in 2 of 5 examples (the first on line 2)" in messages[0]
    assert "EOS token alone" in messages[0]
    assert [ex["answer"] for ex in examples] == ["a", "", "b", "", "c"]


def test_jsonl_images_are_kept_as_paths_relative_to_the_file(tmp_path, monkeypatch):
    """Every image was decoded into memory when the file was read, on every process: the
    examples hold paths (relative to the JSON-lines file, whatever the working directory),
    which the collator decodes when their batch is built, as it does an image."""
    import PIL.Image

    from amvl.data import AMVLCollator, VisionTokens
    from amvl.puzzles import vocabulary
    from amvl.tiny import tiny_image_processor, word_tokenizer

    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    image = PIL.Image.new("RGB", (24, 20), (200, 10, 30))
    image.save(data / "imgs" / "a.png")
    (data / "broken.png").write_bytes(b"not an image")
    path = _write_jsonl(data / "train.jsonl", [
        {"images": ["imgs/a.png"], "question": "how many", "answer": "one"},
        {"images": [str(data / "imgs" / "a.png")], "question": "how many", "answer": "one"},
        {"images": ["broken.png"], "question": "how many", "answer": "one"}])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the file's directory, not the working directory, counts
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: pytest.fail("decoded at load"))
    examples = read_jsonl(Path("..") / "data" / "train.jsonl")
    monkeypatch.setattr(PIL.Image, "open", real_open)
    expected = elsewhere / ".." / "data" / "imgs" / "a.png"
    assert [ex["images"] for ex in examples[:2]] == [[str(expected)],
                                                    [str(data / "imgs" / "a.png")]]
    tokenizer = word_tokenizer(vocabulary(), vision=True)
    vision = VisionTokens(*tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]))
    collator = AMVLCollator(tokenizer, tiny_image_processor(), vision)
    from_paths = collator(examples[:2])["pixel_values"]
    decoded = collator([{**examples[0], "images": [image]}])["pixel_values"]
    assert torch.equal(from_paths, torch.cat([decoded, decoded]))
    # only existence is checked at load (not opening every image on every process): a file
    # that is not an image is found, and named, when its batch is built
    with pytest.raises(OSError, match="broken.png"):  # PIL.UnidentifiedImageError
        collator(examples[2:])
    monkeypatch.chdir(tmp_path)
    (data / "imgs" / "a.png").unlink()
    with pytest.raises(SystemExit, match=r"train.jsonl line 1: missing image "):
        read_jsonl(path)


def test_run_config_and_jsonl_are_read_as_utf8(tmp_path, monkeypatch):
    """Both were read in the locale's encoding: under a Latin-1 locale "é" became "Ã©"."""
    import io

    path = _write_jsonl(tmp_path / "train.jsonl", [{"question": "wie viele ? é 日本",
                                                    "answer": "zwei ✓"}])
    config = tmp_path / "run.yaml"
    config.write_text("model: {path: tiny-qwen2-vl}\noutput_dir: runs/é\n", encoding="utf-8")
    real = io.text_encoding
    # what a Latin-1 locale gives a file opened without an encoding
    monkeypatch.setattr(io, "text_encoding", lambda encoding, stacklevel=2:
                        real(encoding) if encoding is not None else "latin-1")
    assert read_jsonl(path) == [{"images": [], "question": "wie viele ? é 日本",
                                 "answer": "zwei ✓"}]
    assert load_run_config(config)["output_dir"] == "runs/é"


def _jsonl_run_config(tmp_path, records: list) -> str:
    """A run config of the tiny model on ``records`` written as tmp_path/data/train.jsonl."""
    from PIL import Image

    (tmp_path / "data").mkdir(exist_ok=True)
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "data" / "a.png")
    data = _write_jsonl(tmp_path / "data" / "train.jsonl", records)
    config = yaml.safe_load(Path(_run_config(tmp_path, steps=1, save_every=1)).read_text())
    config["data"] = {"train": str(data)}
    path = tmp_path / "jsonl.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("bad,match", [
    ({"images": [], "question": "", "answer": "one"},
     "line 3: the prompt is empty"),
    ({"images": ["a.png"], "question": "how many", "answer": "<lat> one"},
     r"line 3: the answer spells the structural token\(s\) \['<lat>'\]"),
    ({"images": ["a.png"], "question": "how <|image_pad|> many", "answer": "one"},
     r"line 3: the question spells the structural token\(s\) \['<\|image_pad\|>'\]"),
])
def test_train_checks_each_jsonl_text_before_training(tmp_path, monkeypatch, bad, match):
    """What the collator refuses in a text (an empty prompt, a structural token spelt out)
    stopped the run only when the bad example's batch was built, maybe hours in, as "example
    1" of that batch: refused before the first step, naming the file and line."""
    import amvl.training

    good = {"images": ["a.png"], "question": "how many blue cells ?", "answer": "one"}
    config = _jsonl_run_config(tmp_path, [good, good, bad, good])
    monkeypatch.setattr(amvl.training, "train", lambda *a, **k: pytest.fail("trained"))
    data = re.escape(str(tmp_path / "data" / "train.jsonl"))
    with pytest.raises(SystemExit, match=f"amvl: {data} {match}"):
        main(["train", "--config", config, "--no-progress"])


def test_an_image_that_does_not_decode_stops_training_in_one_line(tmp_path):
    """It is found when its batch is built, maybe hours in: a traceback, where the other
    commands give one line. Now one line naming the file, and how to go on."""
    good = {"images": ["a.png"], "question": "how many blue cells ?", "answer": "one"}
    config = _jsonl_run_config(tmp_path, [good, {**good, "images": ["bad.png"]}] * 2)
    (tmp_path / "data" / "bad.png").write_bytes(b"not an image")
    bad = re.escape(str(tmp_path / "data" / "bad.png"))
    with pytest.raises(SystemExit, match=f"amvl train: cannot decode the image {bad} .*"
                                         "go on from the last checkpoint with --resume"):
        main(["train", "--config", config, "--no-progress"])


def test_jsonl_check_refuses_what_a_batch_refuses(tmp_path):
    """The load-time check is the collator's own, example by example: the same refusals with
    the same words, the example named by its line instead of its place in a batch."""
    from amvl.data import AMVLCollator
    from amvl.tiny import word_tokenizer

    tokenizer = word_tokenizer(["how", "many", "one"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<lat>"]})
    tokenizer.eos_token = None  # an empty answer is refused only without an EOS token
    collator = AMVLCollator(tokenizer, special_tokens=["<lat>"])
    for bad in ({"question": "", "answer": "one"}, {"question": "how <lat>", "answer": "one"},
                {"question": "how", "answer": ""}, {"question": "how", "answer": None},
                {"question": "how", "answer": "one", "images": ["a.png"]}):
        with pytest.raises((TypeError, ValueError)) as in_batch:
            collator([{"question": "how many", "answer": "one"}, bad])
        with pytest.raises(SystemExit) as at_load:
            check_jsonl_texts("d.jsonl", [{"question": "how", "answer": "one"}, bad],
                                  [1, 7], collator)
        assert str(at_load.value) == "amvl: " + str(in_batch.value).replace(
            "example 1", "d.jsonl line 7"), bad
    check_jsonl_texts("d.jsonl", [{"question": "how many", "answer": "one"}], [1],
                          collator)


def test_eval_loads_a_training_checkpoint(tmp_path, capsys):
    """amvl eval --checkpoint run/checkpoint-N passed the up-front check and then failed on
    a missing checkpoint-N/base/config.json: a training checkpoint holds the whole model's
    weights but not the base's config, tokenizer or processor. With the run's --config it is
    built on the config's model section and scores as final/ does (the same weights at the
    last step); without --config it is refused before anything loads."""
    config = _run_config(tmp_path, steps=2, save_every=1)
    assert main(["train", "--config", config, "--no-progress"]) == 0
    run = tmp_path / "run"
    scores = {}
    for name in ("final", "checkpoint-2", "checkpoint-1"):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "--config", config, "--checkpoint", str(run / name),
                     "--benchmark", "puzzles", "--out", str(out), "--no-progress"]) == 0
        (result,) = json.loads(out.read_text()).values()
        scores[name] = [nll for p in result["predictions"] for nll in p["nll"]]
    assert "checkpoint-2 (prior latents)" in capsys.readouterr().out
    assert scores["checkpoint-2"] == pytest.approx(scores["final"], rel=1e-5)
    assert scores["checkpoint-1"] != pytest.approx(scores["final"], rel=1e-5)  # its own step
    with pytest.raises(SystemExit, match=r"checkpoint-1: .*checkpoint-1 is a training "
                                         r"checkpoint.*give the run's --config"):
        main(["eval", "--checkpoint", str(run / "checkpoint-1"), "--benchmark", "puzzles"])
    other = yaml.safe_load(Path(config).read_text())
    other["model"]["hidden_size"] = 64  # another model than the run trained
    Path(config).write_text(yaml.safe_dump(other))
    with pytest.raises(SystemExit, match=r"checkpoint-1/model.safetensors does not fit the "
                                         r"model of the run config's model.path tiny-qwen2-vl"):
        main(["eval", "--config", config, "--checkpoint", str(run / "checkpoint-1"),
              "--benchmark", "puzzles", "--no-progress"])


def test_eval_refuses_a_training_checkpoint_of_a_text_model_on_images(tmp_path):
    """A training checkpoint's base is the run config's model.path: its config.json tells a
    text-only model, before anything loads."""
    checkpoint = tmp_path / "run" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    for name in ("amvl_config.json", "state.json", "model.safetensors"):
        (checkpoint / name).write_text("{}")
    (tmp_path / "text_model").mkdir()
    (tmp_path / "text_model" / "config.json").write_text('{"model_type": "qwen2"}')
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(tmp_path / "text_model")}}))
    with pytest.raises(SystemExit, match="checkpoint-5: .*holds a text-only model, and the "
                                         "puzzles examples have images"):
        main(["eval", "--config", str(config), "--checkpoint", str(checkpoint),
              "--benchmark", "puzzles", "--no-progress"])


# A chat template over the tiny tokenizer's words: the system turn, the user's message, and
# "<eos>" closing each turn and opening the assistant's.
TINY_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }} <eos> "
                 "{% else %}{{ m['content'] }} <eos> {% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}there is{% endif %}")


def test_a_chat_template_trains_and_evaluates_each_model_as_it_was_trained(tmp_path, capsys):
    """data.chat_template and data.system_prompt format the prompts; final/ records the
    format, and amvl eval prompts a final/ with it whatever the config's data section says
    (a training checkpoint takes the config's, as it has no record)."""
    (tmp_path / "chat.jinja").write_text(TINY_TEMPLATE)
    config = _run_config(tmp_path, steps=2, save_every=1)
    run = yaml.safe_load(Path(config).read_text())
    run["data"].update(chat_template=str(tmp_path / "chat.jinja"), system_prompt="the options")
    Path(config).write_text(yaml.safe_dump(run))
    assert main(["train", "--config", config, "--no-progress"]) == 0
    final = tmp_path / "run" / "final"
    assert json.loads((final / PROMPT_FORMAT_FILE).read_text()) == {
        "chat_template": TINY_TEMPLATE, "system_prompt": "the options", "add_bos": False}

    def scores(checkpoint: Path, config_path: str) -> list[float]:
        out = tmp_path / "eval.json"
        assert main(["eval", "--config", config_path, "--checkpoint", str(checkpoint),
                     "--benchmark", "puzzles", "--out", str(out), "--no-progress"]) == 0
        (result,) = json.loads(out.read_text()).values()
        return [nll for p in result["predictions"] for nll in p["nll"]]

    with_template = scores(final, config)
    # the same weights at the same step, prompted as trained
    assert scores(tmp_path / "run" / "checkpoint-2", config) == pytest.approx(with_template,
                                                                              rel=1e-5)
    plain = dict(run, data={k: v for k, v in run["data"].items()
                            if k not in PROMPT_KEYS})
    plain_config = tmp_path / "plain.yaml"
    plain_config.write_text(yaml.safe_dump(plain))
    capsys.readouterr()
    assert scores(final, str(plain_config)) == pytest.approx(with_template, rel=1e-5)
    assert "another prompt format" not in capsys.readouterr().err  # the config says nothing
    # a training checkpoint has no record: the config's format, here none, is another prompt
    assert scores(tmp_path / "run" / "checkpoint-2", str(plain_config)) != pytest.approx(
        with_template, rel=1e-5)
    plain["data"]["chat_template"] = False
    plain_config.write_text(yaml.safe_dump(plain))
    assert scores(final, str(plain_config)) == pytest.approx(with_template, rel=1e-5)
    assert "was trained with another prompt format" in capsys.readouterr().err
    # a final/ recorded before add_bos: its prompts had none, and it loads so
    record = json.loads((final / PROMPT_FORMAT_FILE).read_text())
    del record["add_bos"]
    (final / PROMPT_FORMAT_FILE).write_text(json.dumps(record))
    assert scores(final, config) == pytest.approx(with_template, rel=1e-5)


def test_a_tokenizer_without_the_chat_template_asked_for(tmp_path):
    config = _run_config(tmp_path, steps=1, save_every=1)
    run = yaml.safe_load(Path(config).read_text())
    run["data"]["chat_template"] = True  # the tiny word tokenizer has none
    Path(config).write_text(yaml.safe_dump(run))
    with pytest.raises(SystemExit, match="amvl train: chat_template=True, but the tokenizer "
                                         "has no chat template"):
        main(["train", "--config", config, "--no-progress"])


def test_generate_answers_a_jsonl_file_as_the_library_does(tmp_path, capsys):
    """amvl generate: one JSON line per question, in order, the answers of
    amvl.generation.generate_answers on the loaded model, exact match over the lines that
    carry an answer; --num-samples draws and votes."""
    from amvl.checkpoints import load_trained
    from amvl.data import AMVLCollator, VisionTokens
    from amvl.generation import generate_answers

    config = _run_config(tmp_path, steps=2, save_every=2)
    assert main(["train", "--config", config, "--no-progress"]) == 0
    saved = _puzzles_on_disk(tmp_path)
    puzzles = [puzzle for puzzle, _ in saved]
    records = []
    for i, (puzzle, image) in enumerate(saved):
        record = {"images": [image], "question": puzzle["question"]}
        if i % 2 == 0:
            record["answer"] = puzzle["answer"]
        if i == 1:
            record["id"] = "q-1"  # carried to the output
        records.append(record)
    data = _write_jsonl(tmp_path / "questions.jsonl", records)
    out = tmp_path / "answers.jsonl"
    capsys.readouterr()
    assert main(["generate", "--config", config, "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "3", "--batch-size", "2", "--no-progress"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["line"] for w in written] == [1, 2, 3, 4, 5]
    assert [w.get("id") for w in written] == [None, "q-1", None, None, None]
    assert [w["question"] for w in written] == [p["question"] for p in puzzles]
    assert [("answer" in w, "exact_match" in w) for w in written] == \
        [(i % 2 == 0,) * 2 for i in range(5)]
    model, processor = load_trained(tmp_path / "run" / "final")
    collator = AMVLCollator(model.tokenizer, processor,
                            VisionTokens.from_model_config(model.base.config))
    expected = list(generate_answers(model, collator, [dict(p, answer="") for p in puzzles],
                                     batch_size=2, max_new_tokens=3, progress=False))
    assert [w["prediction"] for w in written] == [e["prediction"] for e in expected]
    hits = sum(w["exact_match"] for w in written if "exact_match" in w)
    assert f"5 answers written to {out}; exact match {hits / 3:.1%} of the 3 with answers" \
        in capsys.readouterr().out
    assert main(["generate", "--config", config, "--data", str(data), "--out", str(out),
                 "--latent", "sample", "--num-samples", "3", "--seed", "1",
                 "--max-new-tokens", "2", "--no-progress"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(len(w["predictions"]) == 3 for w in written)
    assert "(majority vote; each draw alone:" in capsys.readouterr().out


def test_generate_refuses_what_it_cannot_do_before_loading(tmp_path, monkeypatch):
    config = _run_config(tmp_path, steps=1, save_every=1)
    assert main(["train", "--config", config, "--no-progress"]) == 0
    data = _write_jsonl(tmp_path / "q.jsonl", [{"question": "how many", "answer": None}])
    out = str(tmp_path / "a.jsonl")
    with pytest.raises(SystemExit, match="give --config or --checkpoint"):
        main(["generate", "--data", str(data), "--out", out])
    with pytest.raises(SystemExit, match="--out .* is a directory"):
        main(["generate", "--config", config, "--data", str(data), "--out", str(tmp_path)])
    import amvl.cli

    monkeypatch.setattr(amvl.cli, "load_trained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(SystemExit, match="--num-samples draws latents: add --latent sample"):
        main(["generate", "--config", config, "--data", str(data), "--out", out,
              "--num-samples", "2"])
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": 3}])
    with pytest.raises(SystemExit, match="bad.jsonl line 1: 'question' must be a string"):
        main(["generate", "--config", config, "--data", str(bad), "--out", out])
    with pytest.raises(SystemExit, match="is not a model written by amvl train"):
        main(["generate", "--checkpoint", str(tmp_path), "--data", str(data), "--out", out])
    run = tmp_path / "run"  # the run's output directory, not its final/: named as such
    with pytest.raises(SystemExit, match=f"it is a run's output directory, give "
                                         f"{re.escape(str(run / 'final'))}"):
        main(["generate", "--checkpoint", str(run), "--data", str(data), "--out", out])


def test_generate_settings_that_would_mislead_and_inputs_that_fail_midway(tmp_path, capsys):
    """Sampling from a model without latents (5 identical rows, and a "majority vote"), a
    seed for the means (ignored), --out on the questions (overwritten) are refused; an image
    that does not decode stops the run naming its batch's line, the answers before it kept;
    a line separator inside a question survives the round trip."""
    config = _run_config(tmp_path, steps=1, save_every=1)
    run = yaml.safe_load(Path(config).read_text())
    run["amvl"]["objective"] = "none"
    Path(config).write_text(yaml.safe_dump(run))
    assert main(["train", "--config", config, "--no-progress"]) == 0
    puzzle, good = _puzzles_on_disk(tmp_path)[0]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    question = puzzle["question"] + "\u2028" + puzzle["question"]
    records = [{"images": [good], "question": question, "answer": "one"}] * 3 + \
        [{"images": ["bad.png"], "question": puzzle["question"]}]
    data = _write_jsonl(tmp_path / "q.jsonl", records)
    out = tmp_path / "a.jsonl"
    args = ["generate", "--config", config, "--data", str(data), "--out", str(out),
            "--max-new-tokens", "2", "--batch-size", "2", "--no-progress"]
    with pytest.raises(SystemExit, match="trained with objective 'none' and has no latents"):
        main(args + ["--latent", "sample", "--num-samples", "5"])
    # its saved inference setting says "sample": still one answer each, no vote
    saved = tmp_path / "run" / "final" / "amvl_config.json"
    saved.write_text(saved.read_text().replace('"inference": "mean"', '"inference": "sample"'))
    assert '"inference": "sample"' in saved.read_text()
    good = _write_jsonl(tmp_path / "good.jsonl", records[:2])
    capsys.readouterr()
    assert main(args[:4] + [str(good)] + args[5:]) == 0
    assert all("predictions" not in json.loads(line) for line in out.read_text().splitlines())
    assert "majority vote" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="has no latents to sample: drop .*--seed"):
        main(args + ["--seed", "3"])
    with pytest.raises(SystemExit, match="is the --data file"):
        main(args[:6] + [str(data)] + args[7:])
    with pytest.raises(SystemExit, match=r"q.jsonl: the batch from line 3: .*bad.png.*the "
                                         r"answers before it are in"):
        main(args)
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n")
               if line]
    assert [w["question"] for w in written] == [question] * 2
    assert "\u2028" not in out.read_text(encoding="utf-8")  # escaped: one record a line
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2


def test_generate_resume_continues_a_killed_run_and_a_failed_rerun_keeps_the_answers(
        tmp_path, capsys):
    """--resume keeps the answers --out holds (a last line cut short by the kill dropped) and
    answers the rest: the file the uninterrupted run wrote. A rerun that failed before its
    first answer had already emptied --out; answers of another --data are refused."""
    config = _run_config(tmp_path, steps=1, save_every=1)
    assert main(["train", "--config", config, "--no-progress"]) == 0
    saved = _puzzles_on_disk(tmp_path)
    data = _write_jsonl(tmp_path / "q.jsonl", [{"images": [image], "question": p["question"],
                                                "answer": p["answer"]} for p, image in saved])
    out = tmp_path / "a.jsonl"
    args = ["generate", "--config", config, "--data", str(data), "--out", str(out),
            "--max-new-tokens", "2", "--batch-size", "2", "--no-progress"]
    assert main(args) == 0
    whole = out.read_text(encoding="utf-8")
    lines = whole.splitlines(keepends=True)
    cut = lines[2].encode("utf-8")[:9] + "é".encode("utf-8")[:1]  # killed mid-character
    out.write_bytes("".join(lines[:2]).encode("utf-8") + cut)
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    assert out.read_text(encoding="utf-8") == whole
    assert f"{len(lines)} answers written to {out} (2 of them before this run)" in \
        capsys.readouterr().out
    assert main(args + ["--resume"]) == 0
    assert "already answers all" in capsys.readouterr().out
    other = _write_jsonl(tmp_path / "other.jsonl", [{"question": "which is red",
                                                     "answer": "one"}] * len(lines))
    with pytest.raises(SystemExit, match=r"line 1 answers line 1 of another file than "
                                         r"--data \(its question differs\)"):
        main(args[:4] + [str(other)] + args[5:] + ["--resume"])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"images": ["bad.png"], "question": "which",
                                                 "answer": "one"}])
    with pytest.raises(SystemExit, match=rf"bad.jsonl: the batch from line 1: .*bad.png.*; "
                                         rf"{re.escape(str(out))} is as it was"):
        main(args[:4] + [str(bad)] + args[5:])
    assert out.read_text(encoding="utf-8") == whole


def test_jsonl_encodings_named_by_line(tmp_path):
    """A byte-order mark is not part of line 1; bytes that are not UTF-8 and escapes of half
    a surrogate pair are refused naming the line (a traceback, and an error deep in the
    tokenizer, before)."""
    path = tmp_path / "d.jsonl"
    line = json.dumps({"question": "how many", "answer": "one"})
    path.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\n")
    assert read_jsonl(path) == [{"images": [], "question": "how many", "answer": "one"}]
    path.write_bytes(line.encode() + b"\n" + line.encode()[:-2] + b"\xe9\"}\n")
    with pytest.raises(SystemExit, match="d.jsonl line 2: not UTF-8"):
        read_jsonl(path)
    path.write_text(line + "\n" + '{"question": "a \\ud83d b", "answer": "one"}\n')
    with pytest.raises(SystemExit, match="line 2: 'question' holds an unpaired surrogate"):
        read_jsonl(path)


def test_train_validates_on_held_out_data(tmp_path, capsys):
    """data.eval and train.eval_every: validation entries (eval/nll, eval/nll_prior, ...) in
    history.jsonl at every eval_every steps and the last, a line each on the console."""
    records = [{"images": [image], "question": puzzle["question"], "answer": puzzle["answer"]}
               for puzzle, image in _puzzles_on_disk(tmp_path)[:3]]
    held_out = _write_jsonl(tmp_path / "held_out.jsonl", records)
    config = _run_config(tmp_path, steps=3, save_every=3)
    run = yaml.safe_load(Path(config).read_text())
    run["data"]["eval"] = str(held_out)
    run["train"]["eval_every"] = 2
    Path(config).write_text(yaml.safe_dump(run))
    assert main(["train", "--config", config]) == 0
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text()
               .splitlines()]
    evals = [e for e in history if "eval/nll_prior" in e]
    assert [e["step"] for e in evals] == [2, 3]
    assert all(e["eval/nll"] > 0 and e["eval/kl_fwd"] >= 0 for e in evals)
    printed = capsys.readouterr()
    assert "step 2: eval/loss" in printed.out + printed.err
    _write_jsonl(held_out, [{"question": "how many <lat> cells", "answer": "one"}])
    run["output_dir"] = str(tmp_path / "other")
    Path(config).write_text(yaml.safe_dump(run))
    with pytest.raises(SystemExit, match="held_out.jsonl line 1: the question spells"):
        main(["train", "--config", config, "--no-progress"])


def test_eval_diagnostics_report_leakage_beside_accuracy(tmp_path, capsys):
    """--diagnostics: each model with latents also gets amvl.diagnostics.leakage_report (in
    --out and as a second table); its prior-latent accuracy is the benchmark's overall
    accuracy; a model without latents gets none."""
    config = _run_config(tmp_path, steps=2, save_every=2)
    assert main(["train", "--config", config, "--no-progress"]) == 0
    baseline = yaml.safe_load(Path(config).read_text())
    baseline["amvl"]["objective"] = "none"
    baseline["output_dir"] = str(tmp_path / "none")
    (tmp_path / "none.yaml").write_text(yaml.safe_dump(baseline))
    assert main(["train", "--config", str(tmp_path / "none.yaml"), "--no-progress"]) == 0
    run = yaml.safe_load(Path(config).read_text())
    run["eval"] = {"baselines": {"none": str(tmp_path / "none" / "final")}}
    Path(config).write_text(yaml.safe_dump(run))
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["eval", "--config", config, "--benchmark", "puzzles", "--diagnostics",
                 "--out", str(out), "--no-progress"]) == 0
    results = json.loads(out.read_text())
    ours = results["final (prior latents)"]
    assert "diagnostics" not in results["none"]
    report = ours["diagnostics"]
    assert report["acc_prior"] == pytest.approx(ours["overall"])
    assert {"acc_posterior", "leakage_gap", "flip_swapped", "probe_posterior_sampled",
            "acc_prior/counting"} <= report.keys()
    printed = capsys.readouterr().out
    table = printed[printed.index("Leakage diagnostics"):]
    assert "| final (prior latents) |" in table and "| none |" not in table
    with pytest.raises(SystemExit, match="--diagnostics compares latents on the gold answers"):
        main(["eval", "--benchmark", "blink", "--data", str(tmp_path / "blink"), "--split",
              "test", "--unlabelled", "--diagnostics", "--out", str(out), "--checkpoint", "x"])


def test_eval_on_multiple_choice_records_of_ones_own(tmp_path, capsys, monkeypatch):
    """--benchmark jsonl --data FILE: the puzzles written as records of one's own score as
    the built-in puzzles do (the same questions, choices and images), their images held
    encoded until their batches (every process held them decoded)."""
    from amvl import evaluation
    from amvl.data import EncodedImage

    loaded = []
    load = evaluation.load_benchmark
    monkeypatch.setattr(evaluation, "load_benchmark",
                        lambda *args, **kwargs: loaded.append(load(*args, **kwargs))
                        or loaded[-1])
    config = _run_config(tmp_path, steps=1, save_every=1)
    assert main(["train", "--config", config, "--no-progress"]) == 0
    saved = _puzzles_on_disk(tmp_path)
    puzzles = [puzzle for puzzle, _ in saved]
    records = [{"question": puzzle["question"], "choices": puzzle["choices"],
                "answer": puzzle["answer"], "images": [image], "subtask": puzzle["family"],
                "id": puzzle["id"]} for puzzle, image in saved]
    data = _write_jsonl(tmp_path / "mine.jsonl", records)
    mine = tmp_path / "mine.json"
    assert main(["eval", "--config", config, "--benchmark", "jsonl", "--data", str(data),
                 "--out", str(mine), "--no-progress"]) == 0
    assert "multiple choice: accuracy (%) per subtask" in capsys.readouterr().out
    assert all(isinstance(image, EncodedImage) for ex in loaded[0] for image in ex["images"])
    (ours,) = json.loads(mine.read_text()).values()
    from amvl.checkpoints import load_trained
    from amvl.data import AMVLCollator, VisionTokens
    from amvl.evaluation import evaluate_benchmark

    model, processor = load_trained(tmp_path / "run" / "final")
    collator = AMVLCollator(model.tokenizer, processor,
                            VisionTokens.from_model_config(model.base.config))
    reference = evaluate_benchmark(model, collator, [dict(p, subtask=p["family"])
                                                     for p in puzzles], progress=False)
    assert [n for p in ours["predictions"] for n in p["nll"]] == pytest.approx(
        [n for p in reference["predictions"] for n in p["nll"]], rel=1e-5)
    with pytest.raises(SystemExit, match="has no splits"):
        main(["eval", "--config", config, "--benchmark", "jsonl", "--data", str(data),
              "--split", "val", "--no-progress"])
    # a record the collator refuses midway is named by its id, without a traceback
    tight = yaml.safe_load(Path(config).read_text())
    tight["data"]["max_prompt_tokens"] = 2
    (tmp_path / "tight.yaml").write_text(yaml.safe_dump(tight))
    with pytest.raises(SystemExit, match=rf"amvl eval: final \(prior latents\): example 0 \(id "
                                         rf"'{records[0]['id']}'\): its images take"):
        main(["eval", "--config", str(tmp_path / "tight.yaml"), "--benchmark", "jsonl",
              "--data", str(data), "--no-progress"])


def _blink_on_disk(folder: Path) -> Path:
    """The built-in test puzzles as a BLINK folder (Counting/val.jsonl, images as base64)."""
    import base64
    import io

    from amvl.puzzles import puzzle_suite

    records = []
    for i, puzzle in enumerate(puzzle_suite("test", 1)):
        png = io.BytesIO()
        puzzle["images"][0].save(png, format="PNG")
        labels = [f"({'ABCDEFGH'[k]})" for k in range(len(puzzle["choices"]))]
        records.append({
            "idx": f"val_Counting_{i}", "question": puzzle["question"], "sub_task": "Counting",
            "choices": puzzle["choices"], "answer": labels[puzzle["choices"].index(
                puzzle["answer"])],
            "prompt": "\n".join([puzzle["question"], *(f"{label} {choice}" for label, choice
                                                       in zip(labels, puzzle["choices"]))]),
            "image_1": {"bytes": base64.b64encode(png.getvalue()).decode(), "path": None},
            "image_2": None, "image_3": None, "image_4": None})
    (folder / "BLINK" / "Counting").mkdir(parents=True)
    _write_jsonl(folder / "BLINK" / "Counting" / "val.jsonl", records)
    return folder / "BLINK"


@pytest.mark.filterwarnings("ignore:.*tokenize to the same ids")
def test_eval_instruction_is_appended_to_every_prompt(tmp_path, monkeypatch):
    """--instruction passes load_blink's / load_visualpuzzles' instruction through (lmms-eval
    appends "Answer with the option's letter ..."); refused where questions are as written."""
    from amvl import evaluation

    config = _run_config(tmp_path, steps=1, save_every=1)
    assert main(["train", "--config", config, "--no-progress"]) == 0
    blink = _blink_on_disk(tmp_path)
    scored = []

    def evaluate_benchmark(model, collator, examples, **settings):
        scored.extend(examples)
        return real(model, collator, examples, **settings)

    real = evaluation.evaluate_benchmark
    monkeypatch.setattr(evaluation, "evaluate_benchmark", evaluate_benchmark)
    instruction = "Answer with the option's letter from the given choices directly."
    assert main(["eval", "--config", config, "--benchmark", "blink", "--data", str(blink),
                 "--instruction", instruction, "--no-progress"]) == 0
    prompts = [json.loads(line)["prompt"] for line in
               (blink / "Counting" / "val.jsonl").read_text().splitlines()]
    assert [ex["question"] for ex in scored] == [f"{p}\n{instruction}" for p in prompts]
    for benchmark, data in (("jsonl", ["--data", str(blink / "Counting" / "val.jsonl")]),
                            ("puzzles", [])):
        with pytest.raises(SystemExit, match="--instruction is for blink and visualpuzzles"):
            main(["eval", "--config", config, "--benchmark", benchmark, *data,
                  "--instruction", instruction])
    with pytest.raises(SystemExit, match="--instruction is empty"):
        main(["eval", "--config", config, "--benchmark", "blink", "--data", str(blink),
              "--instruction", " "])


def test_eval_failures_midway_are_one_line(tmp_path, monkeypatch):
    """A non-finite score (FloatingPointError: a traceback) and a record the collator
    refuses in a DataLoader worker (torch's "Caught ValueError in DataLoader worker process
    0. Original Traceback ...") end amvl eval with the one line they give without workers."""
    from amvl import evaluation

    config = _run_config(tmp_path, steps=1, save_every=1)
    assert main(["train", "--config", config, "--no-progress"]) == 0
    tight = yaml.safe_load(Path(config).read_text())
    tight["data"]["max_prompt_tokens"] = 2
    (tmp_path / "tight.yaml").write_text(yaml.safe_dump(tight))
    messages = []
    for workers in ("0", "1"):
        with pytest.raises(SystemExit) as refused:
            main(["eval", "--config", str(tmp_path / "tight.yaml"), "--num-workers", workers,
                  "--no-progress"])
        messages.append(str(refused.value))
    assert re.fullmatch(r"amvl eval: final \(prior latents\): example 0 \(id '[^']+'\): its "
                        r"images take [^\n]+", messages[0])
    assert messages[1] == messages[0]
    monkeypatch.setattr(evaluation, "prior_choice_nll", lambda model, collator, examples, *a:
                        np.full((len(examples), 4), np.nan))
    with pytest.raises(SystemExit, match=r"^amvl eval: final \(prior latents\): example "
                                         r"'[^']+': non-finite choice NLL \[nan"):
        main(["eval", "--config", config, "--no-progress"])


def test_eval_out_is_replaced_whole_or_not_at_all(tmp_path, capsys):
    """--out is written beside itself and renamed over it: a write that fails midway (here
    past a file size limit, as on a full disk) leaves the previous results, not a truncated
    file, and ends in one line."""
    resource = pytest.importorskip("resource")
    import signal

    config = _run_config(tmp_path, steps=1, save_every=1)
    assert main(["train", "--config", config, "--no-progress"]) == 0
    out = tmp_path / "results.json"
    args = ["eval", "--config", config, "--out", str(out), "--no-progress"]
    assert main(args) == 0
    previous = out.read_text()
    assert len(previous) > 8192
    capsys.readouterr()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
    try:
        with pytest.raises(SystemExit, match=rf"amvl eval: --out {re.escape(str(out))} could "
                                             r"not be written \(File too large\)"):
            main(args)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert out.read_text() == previous
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_train_plots_its_curves_and_amvl_plot_draws_runs(tmp_path, capsys):
    """amvl train wrote no plots, and a run in progress had none to look at: it now writes its
    curves into output_dir/plots, and amvl plot draws those of one or several runs from
    their history.jsonl, the validation curves where they validated."""
    from amvl import plots
    from amvl.training import read_history

    config = _run_config(tmp_path, steps=2, save_every=0)
    assert main(["train", "--config", config, "--no-progress"]) == 0
    run = tmp_path / "run"
    assert {p.name for p in (run / "plots").iterdir()} == {"learning_curves.png",
                                                          "kl_curves.png"}
    history = read_history(run)
    validated = history + [{"step": 2, "eval/nll": 3.5, "eval/nll_prior": 4.25}]
    other = tmp_path / "other"
    other.mkdir()
    (other / "history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in validated))
    capsys.readouterr()
    assert main(["plot", str(run), str(other), "--out", str(tmp_path / "both")]) == 0
    assert "validation_curves.png" in capsys.readouterr().out
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()  # what the validation plot draws: the two NLLs of "other"
    plots._draw_curves(ax, {"run": history, "other": validated}, ["eval/nll", "eval/nll_prior"],
                       "", "")
    assert [(line.get_label(), list(line.get_ydata())) for line in ax.get_lines()] == [
        ("other eval/nll", [3.5]), ("other eval/nll_prior", [4.25])]
    plt.close(fig)
    with pytest.raises(SystemExit, match="give --out for the plots of several runs"):
        main(["plot", str(run), str(other)])
    with pytest.raises(SystemExit, match="no history.jsonl in"):
        main(["plot", str(tmp_path)])
    (other / "history.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(SystemExit, match="nothing to plot"):
        main(["plot", str(other)])
    (other / "history.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(SystemExit, match="line 2: not JSON"):
        main(["plot", str(other)])


def test_every_demo_objective_starts_from_the_same_model(monkeypatch):
    """The demo's claim: only the objective differs. Building an AMVLModel adds the latent
    tokens to its tokenizer, and with one tokenizer for all of them the later objectives'
    tiny models were built over a larger vocabulary, from other random weights."""
    import amvl.demo

    started = {}

    def first_weights(model, collator, examples, config, progress=True):
        started[model.objective.name] = {k: v.clone() for k, v in model.base.state_dict().items()}
        raise KeyboardInterrupt  # nothing more to see

    monkeypatch.setattr(amvl.demo, "train", first_weights)
    tokenizer = amvl.demo.word_tokenizer(amvl.demo.vocabulary(), vision=True)
    config = amvl.demo.DemoConfig(train_per_family=2, test_per_family=2, steps=1, batch_size=2)
    for name in ("none", "amvl", "prior"):
        with pytest.raises(KeyboardInterrupt):
            amvl.demo.run_objective(name, config, tokenizer, [], [], progress=False)
    assert started["none"].keys() == started["amvl"].keys() == started["prior"].keys()
    for key, weight in started["none"].items():
        assert torch.equal(weight, started["amvl"][key]) and torch.equal(weight,
                                                                       started["prior"][key]), key
