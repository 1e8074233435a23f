"""Experiment trackers for the training loop (``TrainConfig.report_to``): accelerate's
(TensorBoard, Weights & Biases, MLflow, ...), which log the history's entries as they come, on
the main process. Their packages are the user's to install; accelerate would leave out a
tracker whose package is missing without a word, so a missing one is refused here, before the
model loads. A resumed run continues the runs it started on the trackers that keep runs on a
server (:data:`RESUMABLE`), whose ids each checkpoint records.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from accelerate import Accelerator

    from amvl.config import AMVLConfig
    from amvl.training import TrainConfig

PROJECT = "amvl"  # the trackers' project; each run is named after its output directory
LOGS_DIR = "logs"  # in the output directory: where TensorBoard and other local trackers write
RUNS_FILE = "trackers.json"  # in each checkpoint: the trackers' run ids, which a resume continues

# The trackers whose runs live on a server, by accelerate's name: how to read a started run's id
# (from accelerate's tracker object) and the keyword arguments of their ``init`` that take that
# run up again, so that a resumed training run logs into the run it started, not a new one.
# (Local trackers, TensorBoard's, continue by writing into the same directory.)
RESUMABLE: dict[str, tuple[Callable[[Any], str], Callable[[str], dict]]] = {
    "wandb": (lambda tracker: tracker.run.id, lambda run_id: {"id": run_id, "resume": "allow"}),
    "mlflow": (lambda tracker: tracker.active_run.info.run_id,
               lambda run_id: {"run_id": run_id}),
    "trackio": (lambda tracker: tracker.init_kwargs["name"],  # taken up again by its name
                lambda run_id: {"name": run_id, "resume": "allow"}),
}


def check_trackers(names: Sequence[str]) -> None:
    """Raise a ValueError naming what is wrong with ``report_to``: a tracker accelerate does not
    know, one whose package is not installed, or "all" where none is."""
    if not names:
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from accelerate.utils import LoggerType

    available = {str(getattr(tracker, "value", tracker)) for tracker in get_available_trackers()}
    builtin = {kind.value for kind in LoggerType} - {"all"}  # not registered by the user
    for name in names:
        if name == "all":
            if not available:
                raise ValueError("report_to: 'all', but no tracker's package is installed "
                                 "(e.g. pip install tensorboard)")
        elif name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(f"report_to: unknown tracker {name!r}; accelerate's are "
                             f"{sorted(LOGGER_TYPE_TO_CLASS)}")
        elif name in builtin and name not in available:
            raise ValueError(f"report_to: {name!r} needs its package, which is not installed: "
                             f"pip install {name}")


def start_trackers(accelerator: Accelerator, output_dir: Path, amvl_config: AMVLConfig,
                   train_config: TrainConfig, resumed_runs: dict[str, str] | None = None
                   ) -> dict[str, str]:
    """Start the runs of ``accelerator``'s trackers (built with ``log_with``) on the main
    process: project :data:`PROJECT`, the run named after ``output_dir``, both configs as its
    hyperparameters (flat, ``amvl.<field>`` and ``train.<field>``). ``resumed_runs`` (a
    checkpoint's :data:`RUNS_FILE`): the run ids to continue, by tracker. Returns the started
    runs' ids of the :data:`RESUMABLE` trackers, for the checkpoints (empty off the main
    process)."""
    hyperparameters = {f"{section}.{key}": _scalar(value)
                       for section, config in (("amvl", amvl_config), ("train", train_config))
                       for key, value in dataclasses.asdict(config).items()}
    run = Path(output_dir).resolve().name
    init_kwargs = {"wandb": {"name": run}, "mlflow": {"run_name": run}, "trackio": {"name": run}}
    for name, run_id in (resumed_runs or {}).items():
        if name in RESUMABLE:
            init_kwargs.setdefault(name, {}).update(RESUMABLE[name][1](run_id))
    accelerator.init_trackers(PROJECT, config=hyperparameters, init_kwargs=init_kwargs)
    if not accelerator.is_main_process:  # where the runs did not start
        return {}
    return {tracker.name: RESUMABLE[tracker.name][0](tracker) for tracker in accelerator.trackers
            if tracker.name in RESUMABLE}


def read_runs(checkpoint: Path) -> dict[str, str] | None:
    """The tracker run ids a checkpoint recorded (None: none recorded)."""
    path = Path(checkpoint) / RUNS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_runs(directory: Path, runs: dict[str, str]) -> None:
    """Record the trackers' run ids in a checkpoint being written (nothing when there are
    none)."""
    if runs:
        (Path(directory) / RUNS_FILE).write_text(json.dumps(runs))


def _scalar(value):
    """A hyperparameter as trackers take it (TensorBoard's: numbers, strings and bools)."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def log_entry(accelerator: Accelerator, entry: dict) -> None:
    """Log a history entry to the trackers at its step: a training entry's values as
    ``train/<name>``, a validation entry's as they are (``eval/<name>``)."""
    if not accelerator.trackers:
        return
    values = {key if key.startswith("eval/") else f"train/{key}": value
              for key, value in entry.items() if key != "step"}
    accelerator.log(values, step=entry["step"])


def finish_trackers(accelerator: Accelerator) -> None:
    """End the trackers' runs (accelerate's ``end_training`` would also destroy the process
    group, which ``amvl train`` still needs after the loop)."""
    for tracker in accelerator.trackers:
        tracker.finish()
