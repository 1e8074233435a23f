"""Experiment trackers (TrainConfig.report_to, amvl train's train.report_to): the history's
entries reach accelerate's trackers at their steps, and a tracker that cannot log is named
before anything trains."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from amvl.config import AMVLConfig
from amvl.data import AMVLCollator
from amvl.model import AMVLModel
from amvl.tiny import tiny_qwen2, word_tokenizer
from amvl.trackers import RESUMABLE, RUNS_FILE, check_trackers, start_trackers
from amvl.training import TrainConfig, train

WORDS = [f"w{i}" for i in range(30)]
RECORDED: list[dict] = []  # what each RecordingTracker saw, in order


def _recording_tracker() -> str:
    """Register (once) a tracker that records what it is given, as accelerate's own are
    named, and return its name."""
    import accelerate.tracking

    if not hasattr(accelerate.tracking, "register_tracker_class"):  # an older accelerate
        pytest.skip("this accelerate cannot register a tracker of the test's own")
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, register_tracker_class

    class RecordingTracker(GeneralTracker):
        name = "amvl_test_recorder"
        requires_logging_directory = True

        def __init__(self, run_name, logging_dir, **kwargs):
            super().__init__()
            self.record = {"project": run_name, "logging_dir": str(logging_dir),
                           "kwargs": kwargs, "config": None, "logged": [], "finished": False,
                           "id": f"run-{len(RECORDED)}"}  # a server's id of the new run
            RECORDED.append(self.record)

        @property
        def tracker(self):
            return self.record

        def store_init_configuration(self, values):
            self.record["config"] = dict(values)

        def log(self, values, step=None, **kwargs):
            self.record["logged"].append((step, dict(values)))

        def finish(self):
            self.record["finished"] = True

    if RecordingTracker.name not in LOGGER_TYPE_TO_CLASS:
        register_tracker_class(RecordingTracker)
    return RecordingTracker.name


def _model() -> tuple[AMVLModel, AMVLCollator]:
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    model = AMVLModel(tiny_qwen2(tokenizer), tokenizer,
                      AMVLConfig(num_slots=2, latent_dim=4, kernel_backend="torch"))
    return model, AMVLCollator(tokenizer)


def _data(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"question": " ".join(WORDS[int(i)] for i in torch.randint(0, 30, (3,), generator=g)),
             "answer": WORDS[int(torch.randint(0, 30, (2,), generator=g)[0])]}
            for _ in range(n)]


def test_trackers_get_the_history_at_its_steps_and_the_run_config(tmp_path):
    name = _recording_tracker()
    RECORDED.clear()
    model, collator = _model()
    out = tmp_path / "my-run"
    config = TrainConfig(steps=4, batch_size=4, log_every=2, eval_every=2, report_to=[name])
    assert config.report_to == (name,)  # a YAML list, kept as a tuple
    history = train(model, collator, _data(), config, output_dir=out,
                    eval_examples=_data(3), progress=False)
    (record,) = RECORDED
    assert record["project"] == "amvl" and record["logging_dir"] == str(out / "logs")
    assert record["config"]["train.steps"] == 4 and record["config"]["amvl.objective"] == "amvl"
    assert record["config"]["train.report_to"] == str((name,))  # a scalar, as TensorBoard's
    assert record["finished"]
    expected = [(entry["step"], {key if key.startswith("eval/") else f"train/{key}": value
                                 for key, value in entry.items() if key != "step"})
                for entry in history]
    assert [step for step, _ in expected] == [2, 2, 4, 4]  # training, then validation
    assert record["logged"] == expected
    assert {"train/loss", "train/lr", "train/nll", "train/kl_fwd"} <= record["logged"][0][1].keys()
    assert "eval/nll_prior" in record["logged"][1][1]


def test_trackers_are_finished_when_the_loop_raises(tmp_path, monkeypatch):
    name = _recording_tracker()
    RECORDED.clear()
    model, collator = _model()

    def fails(batch):
        raise RuntimeError("a broken batch")

    with pytest.raises(RuntimeError, match="a broken batch"):
        train(model, fails, _data(), TrainConfig(steps=2, batch_size=4, report_to=[name]),
              output_dir=tmp_path, progress=False)
    assert RECORDED and RECORDED[0]["finished"]


def test_a_resumed_run_continues_its_trackers_runs(tmp_path, monkeypatch):
    """A checkpoint records the trackers' run ids; the resumed run takes its runs up again
    (for Weights & Biases, MLflow and trackio: ``RESUMABLE``) instead of starting new ones."""
    name = _recording_tracker()
    RECORDED.clear()
    monkeypatch.setitem(RESUMABLE, name, (lambda tracker: tracker.record["id"],
                                          lambda run_id: {"continue_run": run_id}))
    config = TrainConfig(steps=4, batch_size=4, log_every=1, save_every=2, report_to=[name])

    def stop_at_three(entry):
        if entry["step"] == 3:
            raise KeyboardInterrupt

    model, collator = _model()
    with pytest.raises(KeyboardInterrupt):
        train(model, collator, _data(), config, output_dir=tmp_path, on_log=stop_at_three,
              progress=False)
    assert json.loads((tmp_path / "checkpoint-2" / RUNS_FILE).read_text()) == {name: "run-0"}
    model, collator = _model()
    train(model, collator, _data(), config, output_dir=tmp_path, resume=True, progress=False)
    first, resumed = RECORDED
    assert "continue_run" not in first["kwargs"] and resumed["kwargs"]["continue_run"] == "run-0"
    assert [step for step, _ in resumed["logged"]] == [3, 4]
    # its checkpoints record the run it continued (the id the server gives back)
    assert json.loads((tmp_path / "checkpoint-4" / RUNS_FILE).read_text()) == {name: "run-1"}


def test_server_trackers_are_resumed_by_their_own_arguments():
    """What accelerate's W&B, MLflow and trackio trackers are given back on resume, and where
    their started runs' ids are read (accelerate 1.15's tracker objects)."""
    started = []

    class Accelerator:
        is_main_process = True
        trackers = [SimpleNamespace(name="wandb", run=SimpleNamespace(id="w1")),
                    SimpleNamespace(name="mlflow",
                                    active_run=SimpleNamespace(info=SimpleNamespace(run_id="m1"))),
                    SimpleNamespace(name="trackio", init_kwargs={"name": "my-run"}),
                    SimpleNamespace(name="tensorboard")]

        def init_trackers(self, project, config, init_kwargs):
            started.append(init_kwargs)

    runs = start_trackers(Accelerator(), Path("runs/my-run"), AMVLConfig(), TrainConfig(),
                          {"wandb": "w0", "mlflow": "m0", "trackio": "my-run"})
    assert runs == {"wandb": "w1", "mlflow": "m1", "trackio": "my-run"}
    assert started == [{"wandb": {"name": "my-run", "id": "w0", "resume": "allow"},
                        "mlflow": {"run_name": "my-run", "run_id": "m0"},
                        "trackio": {"name": "my-run", "resume": "allow"}}]
    start_trackers(Accelerator(), Path("runs/my-run"), AMVLConfig(), TrainConfig())
    assert started[1] == {"wandb": {"name": "my-run"}, "mlflow": {"run_name": "my-run"},
                          "trackio": {"name": "my-run"}}


def test_report_to_mistakes_are_named(tmp_path):
    with pytest.raises(ValueError, match="report_to must be a list of distinct tracker names"):
        TrainConfig(report_to="tensorboard")
    with pytest.raises(ValueError, match="report_to must be a list of distinct tracker names"):
        TrainConfig(report_to=["wandb", "wandb"])
    with pytest.raises(ValueError, match=r"unknown tracker 'tensorbored'; accelerate's are "
                                         r"\[.*'tensorboard'"):
        check_trackers(["tensorbored"])
    for package in ("tensorboard", "wandb"):
        if importlib.util.find_spec(package) is None:  # accelerate would drop it silently
            with pytest.raises(ValueError, match=f"needs its package, which is not installed: "
                                                 f"pip install {package}"):
                check_trackers([package])
    name = _recording_tracker()
    model, collator = _model()
    from accelerate import Accelerator

    with pytest.raises(ValueError, match="with an accelerator of your own: build it with "
                                         "log_with"):
        train(model, collator, _data(), TrainConfig(steps=1, batch_size=4, report_to=[name]),
              output_dir=tmp_path, accelerator=Accelerator(), progress=False)
    with pytest.raises(ValueError, match="needs an output_dir"):
        train(model, collator, _data(), TrainConfig(steps=1, batch_size=4, report_to=[name]),
              progress=False)


def test_amvl_train_names_a_missing_tracker_package_before_the_model_loads(tmp_path,
                                                                         monkeypatch):
    from amvl.cli import main

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the trackers were checked")

    monkeypatch.setattr("amvl.cli.load_base", no_loading)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": "tiny-qwen2-vl", "hidden_size": 32},
        "train": {"steps": 1, "batch_size": 4, "report_to": ["tensorboard"]},
        "output_dir": str(tmp_path / "run")}))
    with pytest.raises(SystemExit, match="amvl train: train.report_to: 'tensorboard' needs its "
                                         "package, which is not installed: pip install "
                                         "tensorboard"):
        main(["train", "--config", str(config), "--no-progress"])
