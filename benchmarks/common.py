"""Measuring helpers shared by every benchmark (DESIGN.md section 5).

Times are medians after warm-up, synchronised with CUDA events through
``triton.testing.do_bench``; every provider of one comparison is measured in the same run on
the same device. Each benchmark adds rows with :func:`record`; at the end of the session
``benchmarks/conftest.py`` prints them grouped by case, with ratios, and writes them as JSON
together with :func:`device_info`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

SMOKE = os.environ.get("AMVL_BENCH_SMOKE") == "1"
"""Tiny shapes on the CPU: checks the harness runs, measures nothing worth reporting."""


@dataclass
class Row:
    """One provider measured on one case of one benchmark."""

    bench: str
    case: str
    provider: str
    median_ms: float
    metrics: dict[str, float] = field(default_factory=dict)


ROWS: list[Row] = []


def record(bench: str, case: str, provider: str, median_ms: float, **metrics: float) -> Row:
    row = Row(bench, case, provider, median_ms, dict(metrics))
    ROWS.append(row)
    out = os.environ.get("AMVL_BENCH_OUT")
    if out:  # streamed as measured, so a run cut off by a time limit still leaves its rows
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "rows.jsonl"), "a") as f:
            f.write(json.dumps(asdict(row)) + "\n")
    return row


def device_info() -> dict[str, str]:
    """Device and versions, recorded beside every set of numbers."""
    import triton

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def time_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` after warm-up.

    On a GPU, CUDA events through ``do_bench`` (``warmup`` and ``rep`` in ms); on the CPU, two
    warm-up calls and the median of ten wall-clock timings.
    """
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    for _ in range(2):
        fn()
    samples = []
    for _ in range(3 if SMOKE else 10):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def time_ms_side_by_side(fns: dict[str, Callable[[], object]], warmup: int = 25,
                         rep: int = 100, cpu_rounds: int = 10, gpu_rounds: int = 0
                         ) -> dict[str, float]:
    """Median milliseconds of each of several providers of one comparison.

    On a GPU, with ``gpu_rounds`` 0, each goes through :func:`time_ms` in turn. With
    ``gpu_rounds`` N, as on the CPU: after ``warmup`` ms of calls each, the providers take
    turns, one call each per round, each call timed alone by CUDA events, and the median of
    the N rounds is reported: for calls of tens of ms, where do_bench takes only a handful of
    samples of each provider minutes apart, so that a drift of the machine's speed (clocks,
    another process) hits every provider alike. On the CPU the providers always take turns,
    one call each per round after a warm-up round.
    """
    if torch.cuda.is_available() and gpu_rounds <= 0:
        return {name: time_ms(fn, warmup, rep) for name, fn in fns.items()}
    if torch.cuda.is_available():
        for fn in fns.values():
            started = time.perf_counter()
            while True:
                fn()
                torch.cuda.synchronize()
                if (time.perf_counter() - started) * 1e3 >= warmup:
                    break
        rounds, timer = gpu_rounds, _cuda_event_ms
    else:
        for fn in fns.values():
            fn()
        rounds, timer = (2 if SMOKE else cpu_rounds), _wall_ms
    return take_turns(fns, rounds, timer)


def take_turns(fns: dict[str, Callable[[], object]], rounds: int,
               timer: Callable[[Callable[[], object]], float]) -> dict[str, float]:
    """``rounds`` rounds of one ``timer(fn)`` per provider; each one's median. The rounds
    follow :func:`balanced_orders`, so that each provider comes after every other one equally
    often (whose leftovers in caches and the allocator it would meet), not after the same one
    in most rounds, as rotating one order would have it."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    orders = balanced_orders(len(names))
    for r in range(rounds):
        for i in orders[r % len(orders)]:
            samples[names[i]].append(timer(fns[names[i]]))
    return {name: statistics.median(times) for name, times in samples.items()}


def balanced_orders(n: int) -> list[list[int]]:
    """A Williams design: orders of ``range(n)`` in which every item directly follows every
    other item equally often (n orders for even n, 2n for odd n), each item first equally
    often too."""
    first, low, high = [0], 1, n - 1
    while len(first) < n:  # 0, 1, n-1, 2, n-2, ...
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    orders = [[(i + r) % n for i in first] for r in range(n)]
    return orders if n % 2 == 0 else orders + [order[::-1] for order in orders]


def _wall_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _cuda_event_ms(fn: Callable[[], object]) -> float:
    """One call between two CUDA events, the device idle before it and waited for after."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def allow_recompiles(limit: int = 64) -> None:
    """Raise dynamo's recompile limit (default 8): past it a compiled function silently runs
    eagerly, and a benchmark with many shapes would time eager code as "torch.compile"."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, limit)


def graph_time_ms(fn: Callable[[], object], calls: int = 1) -> float | None:
    """Median ms of ``fn`` replayed from a CUDA graph, divided by the ``calls`` calls it
    makes: GPU time without the host's launch overhead. None off the GPU or when ``fn``
    cannot be captured.

    Replays do not flush the L2 cache between calls (``do_bench`` does): a call whose buffers
    fit in L2 would be timed reading the previous call's data from cache. ``fn`` should then
    cycle through :func:`l2_cold_copies` independent sets of buffers, one call each."""
    if not torch.cuda.is_available():
        return None
    from triton.testing import do_bench_cudagraph

    try:
        return float(do_bench_cudagraph(fn, rep=50, return_mode="median")) / calls
    except Exception:  # noqa: BLE001 - a provider that cannot be captured just has no number
        return None


def l2_cold_copies(distinct_bytes: int) -> int:
    """How many independent sets of a call's buffers (``distinct_bytes`` each, outputs
    included) a replay must cycle through for twice the GPU's L2 cache to lie between two
    uses of one set, so that each call reads from memory, as the copy bandwidth it is
    compared with does: the set itself and enough others. 1 off the GPU and for calls large
    enough alone. The replayed function must keep each call's outputs until it returns, or
    the graph's allocator hands every call the same output buffers."""
    if not torch.cuda.is_available() or distinct_bytes <= 0:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()),
                 "L2_cache_size", 0) or 50 * 2**20
    others = math.ceil(2 * l2 / distinct_bytes)
    return 1 if distinct_bytes >= 2 * l2 else 1 + others


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before: CUDA's
    allocator statistics on a GPU; on the CPU, which keeps none, the running total of the
    allocations ``torch.profiler`` records (tensors only, not the Python heap)."""
    if not torch.cuda.is_available():
        return _cpu_peak_bytes(fn)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        trace = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    # Each allocation and free is a "[memory]" event whose "Total Allocated" is the running
    # total since the profile began.
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"
              and e["args"].get("Device Type") == 0]  # 0: the CPU
    return max([0, *totals])


_COPY_GBS: float | None = None


def copy_bandwidth_gbs() -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), cached."""
    global _COPY_GBS
    if _COPY_GBS is None:
        n = (1 << 16) if SMOKE or not torch.cuda.is_available() else (1 << 28)  # 1 GiB fp32
        src = torch.randn(n, dtype=torch.float32, device=bench_device())
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src))
        _COPY_GBS = 2 * src.numel() * src.element_size() / ms / 1e6
    return _COPY_GBS


def max_scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The worst element's error, max |actual - expected| / (|expected| + rms(expected)), in
    float64: relative to each element's own size, floored at the root mean square of
    ``expected`` so that values near zero are not held to a relative bound. NaN or inf when
    ``actual`` holds one, so that ``error <= tolerance`` fails then."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs() + expected.square().mean().sqrt()
    return float(((actual - expected).abs() / scale).max())


def rows_as_json() -> dict:
    return {"device": device_info(), "copy_GBps": _COPY_GBS, "rows": [asdict(r) for r in ROWS]}
