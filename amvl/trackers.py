"""Experiment trackers for the training loop (``TrainConfig.report_to``): accelerate's
(TensorBoard, Weights & Biases, MLflow, ...), which log the history's entries as they come, on
the main process. Their packages are the user's to install; accelerate would leave out a
tracker whose package is missing without a word, so a missing one is refused here, before the
model loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import Accelerator

    from amvl.config import AMVLConfig
    from amvl.training import TrainConfig

PROJECT = "amvl"  # the trackers' project; each run is named after its output directory
LOGS_DIR = "logs"  # in the output directory: where TensorBoard and other local trackers write


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
                   train_config: TrainConfig) -> None:
    """Start the runs of ``accelerator``'s trackers (built with ``log_with``) on the main
    process: project :data:`PROJECT`, the run named after ``output_dir``, both configs as its
    hyperparameters (flat, ``amvl.<field>`` and ``train.<field>``)."""
    hyperparameters = {f"{section}.{key}": _scalar(value)
                       for section, config in (("amvl", amvl_config), ("train", train_config))
                       for key, value in dataclasses.asdict(config).items()}
    run = Path(output_dir).resolve().name
    accelerator.init_trackers(PROJECT, config=hyperparameters,
                              init_kwargs={"wandb": {"name": run}, "mlflow": {"run_name": run},
                                           "trackio": {"name": run}})


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
