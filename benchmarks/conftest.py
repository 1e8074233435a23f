"""Benchmark session plumbing: the summary table with ratios and the JSON file.

Run with ``python -m pytest benchmarks/ --benchmark``; the root conftest skips these files
otherwise. Results go to ``$AMVL_BENCH_OUT`` (default ``benchmarks/.results``) as
``<bench>.json``, one file per benchmark module.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

from benchmarks import common


def _summary(rows: list[common.Row]) -> list[str]:
    """One block per case: each provider's median, metrics and speed relative to the others."""
    lines = [f"device: {common.device_info()}"]
    if common._COPY_GBS:
        lines.append(f"measured device copy bandwidth: {common._COPY_GBS:.0f} GB/s")
    by_case: dict[tuple[str, str], list[common.Row]] = defaultdict(list)
    for row in rows:
        by_case[(row.bench, row.case)].append(row)
    for (bench, case), group in by_case.items():
        lines.append(f"\n[{bench}] {case}")
        fastest = min(r.median_ms for r in group)
        for r in group:
            metrics = "  ".join(f"{k}={v:.3g}" for k, v in r.metrics.items())
            lines.append(f"  {r.provider:<18} {r.median_ms:10.4f} ms  x{r.median_ms / fastest:5.2f} "
                         f"of fastest  {metrics}")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not config.getoption("--benchmark") or not common.ROWS:
        return
    for line in _summary(common.ROWS):
        terminalreporter.write_line(line)
    out = Path(os.environ.get("AMVL_BENCH_OUT", Path(__file__).parent / ".results"))
    out.mkdir(parents=True, exist_ok=True)
    payload = common.rows_as_json()
    for bench in sorted({r["bench"] for r in payload["rows"]}):
        rows = [r for r in payload["rows"] if r["bench"] == bench]
        (out / f"{bench}.json").write_text(json.dumps({**payload, "rows": rows}, indent=1))
    terminalreporter.write_line(f"\nbenchmark JSON written to {out}")


@pytest.fixture(scope="session")
def bench_device():
    return common.bench_device()
