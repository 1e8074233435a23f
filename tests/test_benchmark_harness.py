"""The benchmarks stay runnable: run them on tiny shapes (AMVL_BENCH_SMOKE=1) in a subprocess.

Timings from this run mean nothing (CPU, Triton interpreter); the test checks that every
provider runs, the summary prints and the JSON is written with device and versions.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gaussian_benchmark_runs_and_writes_json(tmp_path):
    env = {**os.environ, "AMVL_BENCH_SMOKE": "1", "AMVL_BENCH_OUT": str(tmp_path)}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "benchmarks/bench_gaussian_kl.py", "--benchmark", "-k", "float32"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[gaussian_kl] fwd+bwd float32" in proc.stdout
    payload = json.loads((tmp_path / "gaussian_kl.json").read_text())
    assert {"torch", "triton", "device"} <= payload["device"].keys()
    providers = {row["provider"] for row in payload["rows"]}
    assert {"eager", "torch.compile", "triton"} <= providers
    assert all(row["median_ms"] > 0 and row["metrics"]["GBps"] > 0 for row in payload["rows"])
