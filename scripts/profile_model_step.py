"""Where an AMVL training step spends its time beside plain fine-tuning, on one device.

Builds the model and batch of ``benchmarks/bench_model_step.py``, times each provider's step
(synchronised wall time, median of a few), then profiles one step of each with
``torch.profiler`` and prints, per provider, the host's time, the device's kernel time, the
kernel launches and the host's waits for the device, then the operators whose device time
(on the CPU, host time) grew the most from the first provider to each of the others.

    python scripts/profile_model_step.py --model 7b-proxy --shape blink     # on a GPU
    AMVL_BENCH_SMOKE=1 python scripts/profile_model_step.py                 # harness, CPU
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package

from benchmarks import bench_model_step as bms  # noqa: E402
from benchmarks import common  # noqa: E402


def wall_ms(step, device: torch.device, repeats: int) -> float:
    """Median synchronised wall time of ``step`` after one warm-up call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def profile_step(step, device: torch.device) -> dict:
    """One profiled step: totals and per-operator times (ms)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    # Device time where there is a device, else the host's own time per operator.
    cost = (lambda e: e.self_device_time_total) if device.type == "cuda" else \
        (lambda e: e.self_cpu_time_total)
    return {"host_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
            "device_ms": sum(e.self_device_time_total for e in events) / 1e3,
            "launches": sum(e.count for e in events if e.key in ("cudaLaunchKernel",
                                                               "cuLaunchKernel",
                                                               "cuLaunchKernelEx")),
            # The host waiting for the device: reads of device values (.item(), float(),
            # bool()) and the runtime's synchronisations (.tolist() and copies to the host).
            "syncs": sum(e.count for e in events if e.key == "aten::_local_scalar_dense"
                         or e.key.startswith("cuda") and e.key.endswith("Synchronize")),
            "ops": {e.key: cost(e) / 1e3 for e in events if cost(e) > 0}}


NO_SPLIT = "shared_amvl:nosplit"


def without_head_split(step):
    """``step`` with every dk/dv launch summing a KV head's query heads in one program."""
    module = importlib.import_module("amvl_kernels.latent_attention")

    def run():
        chooser = module._dkdv_head_split
        module._dkdv_head_split = lambda programs, group, target: 1
        try:
            return step()
        finally:
            module._dkdv_head_split = chooser
    return run


KERNELS_ONLY = "shared_amvl:kernels"


def on_our_kernels_only(step):
    """``step`` with the "amvl" attention's backend "triton": our kernels for every query row,
    none of the layout's leading plain causal rows handed to SDPA (what "auto" does)."""
    import amvl_kernels.hf as akhf

    def run():
        previous = akhf.set_backend("triton")
        try:
            return step()
        finally:
            akhf.set_backend(previous)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=next(iter(bms.MODELS)), choices=list(bms.MODELS))
    parser.add_argument("--shape", default="blink", choices=list(bms.SHAPES))
    parser.add_argument("--batch", type=int, default=bms.BATCH)
    parser.add_argument("--providers", default="plain,shared_amvl",
                        help=f"comma-separated, first is the baseline, of {bms.PROVIDERS}; "
                             f"'{NO_SPLIT}' is shared_amvl with the dk/dv kernel's "
                             f"grouped query heads never split across programs, "
                             f"'{KERNELS_ONLY}' with every query row on our kernels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=15, help="operators listed per comparison")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    providers = args.providers.split(",")
    unknown = set(providers) - set(bms.PROVIDERS) - {NO_SPLIT, KERNELS_ONLY}
    if unknown or len(providers) < 2:
        parser.error(f"--providers needs two or more of {bms.PROVIDERS}, got {providers}")

    device = common.bench_device()
    bms.BATCH = args.batch  # read by the batch builder
    base, tokenizer = bms._model(args.model)
    prefix, answer = bms.SHAPES[args.shape]
    steps, _ = bms._steps(base, tokenizer, prefix, answer, device)
    steps[NO_SPLIT] = without_head_split(steps["shared_amvl"])
    steps[KERNELS_ONLY] = on_our_kernels_only(steps["shared_amvl"])
    results = {}
    for name in providers:
        results[name] = profile_step(steps[name], device)
        results[name]["wall_ms"] = wall_ms(steps[name], device, args.repeats)

    unit = "device" if device.type == "cuda" else "host"
    print(f"{args.model}, {args.shape} (prefix {prefix}, answer {answer}), batch {args.batch}, "
          f"{common.device_info()['device']}")
    print(f"{'provider':<20}{'wall ms':>10}{'host ms':>10}{'device ms':>11}{'launches':>10}"
          f"{'syncs':>7}")
    for name, r in results.items():
        print(f"{name:<20}{r['wall_ms']:>10.1f}{r['host_ms']:>10.1f}{r['device_ms']:>11.1f}"
              f"{r['launches']:>10}{r['syncs']:>7}")
    baseline = results[providers[0]]["ops"]
    for name in providers[1:]:
        ops = results[name]["ops"]
        growth = sorted(((ops.get(k, 0.0) - baseline.get(k, 0.0), k) for k in {*ops, *baseline}),
                        reverse=True)
        print(f"\n{unit} ms, {name} against {providers[0]}: the operators that grew most")
        for delta, key in growth[:args.rows]:
            print(f"  {delta:+9.2f}  {baseline.get(key, 0.0):8.2f} -> {ops.get(key, 0.0):8.2f}"
                  f"  {key[:90]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": common.device_info(),
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
