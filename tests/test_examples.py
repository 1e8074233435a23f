"""The examples run and do what their docstrings say."""

from __future__ import annotations

import importlib.util
import math
import runpy
import warnings
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_checks_its_own_gradients_and_seed(capsys):
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert printed.count(": True") == 3 and "False" not in printed, printed


def test_drop_in_example_trains_on_the_amvl_attention():
    """Without the amvl model layer: the layout and the Gaussian op alone train the toy task
    (the answer's loss from chance, ln 10, to near 0), on the "amvl" attention throughout."""
    spec = importlib.util.spec_from_file_location("drop_in", EXAMPLES / "drop_in.py")
    drop_in = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(drop_in)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = drop_in.train()
    fallbacks = [str(w.message) for w in caught if "'amvl' attention" in str(w.message)]
    assert not fallbacks, fallbacks
    assert abs(history[0]["nll"] - math.log(10)) < 0.1
    assert history[-1]["nll"] < 1.0, history[-1]  # seed 0 reaches 0.06 (0.06-0.22 over seeds)
    assert all(math.isfinite(v) for row in history for v in row.values())
