"""Stopping a training run on a signal: a checkpoint of the steps it trained, handlers put back,
all processes stopping after the same step, and a resume that continues exactly."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from signal import SIGTERM, getsignal

import pytest
import torch
from safetensors.torch import load_file

from amvl.stopping import StopSignals, TrainingStopped
from amvl.training import TrainConfig, latest_checkpoint, train
from tests.test_training import _data, _model, _two_processes

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")


@pytest.mark.parametrize("workers", [0, 1])
def test_a_signal_saves_the_steps_trained_and_the_resume_continues_exactly(tmp_path, workers):
    """SIGTERM during step 4 stops the run after step 4 with checkpoint-4, whose resume ends
    as the run that went straight through. A scheduler signals every process of the job, the
    batch workers too, which ended on it (here signalled at step 1, so that the loop asks
    them for batches afterwards: "DataLoader worker exited unexpectedly")."""
    config = TrainConfig(steps=6, batch_size=4, learning_rate=5e-3, warmup_steps=1,
                         log_every=1, save_every=0, seed=1, num_workers=workers)
    straight, collator = _model()
    train(straight, collator, _data(), config, progress=False)

    def send_signals(entry):
        if entry["step"] == 1:
            for child in multiprocessing.active_children():  # the loop's batch workers
                os.kill(child.pid, SIGTERM)
        if entry["step"] == 4:
            os.kill(os.getpid(), SIGTERM)

    before = getsignal(SIGTERM)
    stopped, collator = _model()
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM after step 4") as raised:
        train(stopped, collator, _data(), config, output_dir=tmp_path, on_log=send_signals,
              progress=False)
    assert (raised.value.step, raised.value.signal_name) == (4, "SIGTERM")
    assert raised.value.checkpoint == tmp_path / "checkpoint-4"
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert getsignal(SIGTERM) is before
    logged = [json.loads(line)["step"] for line in
              (tmp_path / "history.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]

    resumed, collator = _model()
    train(resumed, collator, _data(), config, output_dir=tmp_path, resume=True,
          progress=False)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_signal_in_the_last_step_lets_the_run_end_as_it_would(tmp_path):
    """The last step's checkpoint ends the run anyway: it returns, and amvl train writes
    final/, rather than stopping a complete run."""
    def signal_at_two(entry):
        if entry["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    model, collator = _model()
    history = train(model, collator, _data(), TrainConfig(steps=2, batch_size=4, log_every=1),
                    output_dir=tmp_path, on_log=signal_at_two, progress=False)
    assert [entry["step"] for entry in history] == [1, 2]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


def test_without_stop_signals_or_an_output_dir_the_handlers_stay(tmp_path):
    seen = []

    def look(entry):
        seen.append(signal.getsignal(signal.SIGTERM))

    config = TrainConfig(steps=2, batch_size=4, log_every=1, seed=1)
    model, collator = _model()
    train(model, collator, _data(), config, on_log=look, progress=False)  # nowhere to save
    train(model, collator, _data(), TrainConfig(**{**config.__dict__, "stop_signals": []}),
          output_dir=tmp_path, on_log=look, progress=False)
    assert seen == [signal.getsignal(signal.SIGTERM)] * 4


def test_stop_signals_note_the_first_one_and_put_the_handlers_back():
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    stops = StopSignals(["SIGUSR1", "SIGTERM"])
    try:
        assert stops.agreed() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second one is noted, not obeyed
        assert stops.agreed() == "SIGUSR1"
    finally:
        stops.close()
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before


def test_a_second_ctrl_c_interrupts():
    stops = StopSignals(["SIGINT"])
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stops.agreed() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # where the handler runs, if not already
    finally:
        stops.close()


def test_outside_the_main_thread_no_signal_is_caught_and_it_says_so():
    caught = []

    def build():
        with pytest.warns(UserWarning, match="outside the main thread"):
            stops = StopSignals(["SIGTERM"])
        caught.append(stops._previous)
        stops.close()

    thread = threading.Thread(target=build)
    thread.start()
    thread.join()
    assert caught == [{}]


def test_without_a_gloo_group_the_signals_are_left_alone(monkeypatch):
    """Processes that cannot agree on a step must not stop at different ones: where gloo
    cannot start, the handlers stay as they were, with a warning."""
    import torch.distributed as dist

    def no_gloo(**kwargs):
        raise RuntimeError("no usable network interface")

    monkeypatch.setattr(dist, "new_group", no_gloo)
    before = getsignal(SIGTERM)
    with pytest.warns(UserWarning, match="cannot agree on a stop step without a gloo group "
                                         r"\(no usable network interface\)"):
        stops = StopSignals(["SIGTERM"], world=2)
    assert getsignal(SIGTERM) is before and stops.agreed() is None
    stops.close()


@pytest.mark.parametrize("names, match", [
    (["SIGKILL"], "SIGKILL"), (["TERM"], "TERM"), (["SIGTERM", "SIGTERM"], "distinct"),
    ("SIGTERM", "list")])
def test_bad_stop_signals_are_named(names, match):
    with pytest.raises(ValueError, match=f"stop_signals.*{match}"):
        TrainConfig(stop_signals=names)


def test_two_processes_stop_after_the_same_step_when_one_gets_the_signal(tmp_path):
    """Rank 1 alone gets SIGUSR1 in its first step: both ranks stop after step 2 (they agree
    one step later, without waiting for the device), save checkpoint-2 and name the signal;
    resumed, they end as the run that went straight through."""
    if not torch.distributed.is_available():
        pytest.skip("torch without distributed")
    proc = _two_processes(tmp_path, "signal")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checkpoint = str(tmp_path / "resumed" / "checkpoint-2")
    for rank in (0, 1):
        assert json.loads((tmp_path / f"stopped-{rank}.json").read_text()) == {
            "step": 2, "signal": "SIGUSR1", "checkpoint": checkpoint}
    straight, resumed = (load_file(str(tmp_path / f"{run}.safetensors"))
                         for run in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name


def test_amvl_train_stops_on_sigterm_with_a_checkpoint_and_the_shells_status(tmp_path, capsys):
    """What a job sees: ``amvl train`` ends with status 128 + 15 and a line naming the
    checkpoint, and ``--resume`` goes on from it to final/."""
    from amvl.cli import main
    from amvl.training import read_history
    from tests.test_cli import _run_config

    run = tmp_path / "run"

    def signal_once_training():
        deadline = time.monotonic() + 300
        while not (run / "history.jsonl").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_once_training, daemon=True).start()
    with pytest.raises(SystemExit) as ended:
        main(["train", "--config", _run_config(tmp_path, steps=100_000, save_every=0),
              "--no-progress"])
    assert ended.value.code == 128 + signal.SIGTERM
    step = read_history(run)[-1]["step"]
    assert f"amvl train: stopped by SIGTERM after step {step}, saved in " \
           f"{run / f'checkpoint-{step}'}: continue the run with --resume" \
           in capsys.readouterr().err
    assert latest_checkpoint(run) == run / f"checkpoint-{step}"
    assert not (run / "final").exists()
    assert main(["train", "--config", _run_config(tmp_path, steps=step + 1, save_every=0),
                 "--resume", "--no-progress"]) == 0
    assert [entry["step"] for entry in read_history(run)] == list(range(1, step + 2))
    assert json.loads((run / "final" / "trained_step.json").read_text()) == {"step": step + 1}


def test_torchrun_passes_its_sigterm_on_and_its_processes_stop_with_a_checkpoint(tmp_path):
    """``torchrun ... amvl train`` sent SIGTERM (as `scancel` or a preemption does): torchrun
    signals its two processes, which agree on a step, save it and stop before torchrun's
    grace period ends."""
    import subprocess
    import sys

    from amvl.training import read_history
    from tests.test_cli import _run_config

    if not torch.distributed.is_available():
        pytest.skip("torch without distributed")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "1"}
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
         "--standalone", "-m", "amvl", "train", "--config",
         _run_config(tmp_path, steps=100_000, save_every=0), "--no-progress"],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "history.jsonl").is_file() and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0  # torchrun itself re-raises the signal
    step = read_history(run)[-1]["step"]
    assert output.count(f"amvl train: stopped by SIGTERM after step {step}, saved in "
                        f"{run / f'checkpoint-{step}'}") == 1, output[-3000:]
    assert latest_checkpoint(run) == run / f"checkpoint-{step}"
    assert json.loads((run / f"checkpoint-{step}" / "state.json").read_text())["step"] == step
