"""Where an AMVL training step spends its time beside plain fine-tuning, on one device.

Builds the model and batch of ``benchmarks/bench_model_step.py``, times each provider's step
(the benchmark's measure: the providers take turns, 12 rounds on a GPU, so that a drift of the
machine's speed hits all alike; and each one's synchronised wall time, median of a few), then
profiles one step
of each with ``torch.profiler`` and prints, per provider, the host's time, the device's kernel
time, the kernel launches and the host's waits for the device, then the operators whose device
time (on the CPU, host time) grew the most from the first provider to each of the others.
``--gaps N`` adds where the device sat idle (GPU only). ``--host-only`` keeps the model's
layers, heads and batch but shrinks its widths (head size 8, MLP 256), so that the device
finishes each kernel at once and a step's time is its host's: how much of a step the host
alone would take, per provider. ``--python N`` lists the N Python functions (torch's operator
calls among them) that took the most host time in 5 steps of each provider. The providers
``plain:compiled`` and ``shared_amvl:compiled`` are those two steps through ``torch.compile``,
``plain:graphed`` and ``shared_amvl:graphed`` through its "reduce-overhead" mode (CUDA graphs
on a GPU: no host work a step beyond the replay), the AMVL step taking its step and seed as
tensors, as AMVLTrainer passes them under that mode.

    python scripts/profile_model_step.py --model 7b-proxy --shape blink     # on a GPU
    AMVL_BENCH_SMOKE=1 python scripts/profile_model_step.py                 # harness, CPU
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
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


def profile_step(step, device: torch.device, trace: Path | None = None) -> dict:
    """One profiled step: totals and per-operator times (ms); ``trace`` also gets the Chrome
    trace (for :func:`device_timeline`)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    # Device time where there is a device, else the host's own time per operator.
    cost = (lambda e: e.self_device_time_total) if device.type == "cuda" else \
        (lambda e: e.self_cpu_time_total)
    return {"host_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
            # kernels only: an operator's device time is its kernels' again, and a
            # record_function range's is every kernel inside it
            "device_ms": sum(e.self_device_time_total for e in events
                             if e.device_type != DeviceType.CPU
                             and not getattr(e, "is_user_annotation", False)) / 1e3,
            "launches": sum(e.count for e in events if e.key in ("cudaLaunchKernel",
                                                               "cuLaunchKernel",
                                                               "cuLaunchKernelEx")),
            # The host waiting for the device: reads of device values (.item(), float(),
            # bool()) and the runtime's synchronisations (.tolist() and copies to the host).
            "syncs": sum(e.count for e in events if e.key == "aten::_local_scalar_dense"
                         or e.key.startswith("cuda") and e.key.endswith("Synchronize")),
            "ops": {e.key: cost(e) / 1e3 for e in events if cost(e) > 0 and not (
                device.type == "cuda" and getattr(e, "is_user_annotation", False))}}


DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


def _open_scopes(intervals: list[dict], times: list[float]) -> list[list[dict]]:
    """For each time (ascending) the intervals of one thread open at it, outermost first: a
    sweep with a stack, since a thread's operators nest."""
    intervals = sorted(intervals, key=lambda e: (e["ts"], -e["dur"]))
    stack: list[dict] = []
    out, i = [], 0
    for t in times:
        while i < len(intervals) and intervals[i]["ts"] <= t:
            stack = [e for e in stack if e["ts"] + e["dur"] >= intervals[i]["ts"]]
            stack.append(intervals[i])
            i += 1
        stack = [e for e in stack if e["ts"] + e["dur"] >= t]
        out.append(list(stack))
    return out


def _where(scopes: list[dict]) -> str:
    """A launch's place: the innermost of our annotations (record_function) and the outermost
    and innermost operators open around it."""
    notes = [e["name"] for e in scopes if e.get("cat") == "user_annotation"]
    ops = [e["name"].replace("autograd::engine::evaluate_function: ", "")
           for e in scopes if e.get("cat") == "cpu_op"]
    parts = [notes[-1] if notes else "-"]
    if ops:
        parts += [ops[0]] if len(ops) == 1 else [ops[0], ops[-1]]
    return " / ".join(parts)


def device_timeline(events: list[dict], min_gap_us: float = 5.0) -> dict:
    """Where the device idled in a profiled step, from its Chrome trace's events.

    An idle gap is the time between the end of all device work before a kernel (or copy) and
    its start. Each is charged to the host work that launched that kernel: the scopes open on
    the launching thread at the launch. "host late" gaps are those whose launch call began
    after the device had gone idle: the device waited for the host, which more device work
    queued ahead (no host syncs, fewer launches) would have hidden. Host syncs are listed with
    their places too.
    """
    work = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_WORK),
                  key=lambda e: e["ts"])
    if not work:
        return {"span_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "host_late_ms": 0.0,
                "gaps": [], "syncs": []}
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in
                e.get("args", {})}
    gaps, busy, end = [], 0.0, work[0]["ts"]
    for e in work:
        idle = e["ts"] - end
        if idle >= min_gap_us and (launch := launches.get(e.get("args", {}).get("correlation"))):
            gaps.append((launch, idle, launch["ts"] >= end))
        busy += max(0.0, e["ts"] + e["dur"] - max(end, e["ts"]))
        end = max(end, e["ts"] + e["dur"])
    span = end - work[0]["ts"]
    # the scopes around each gap's launch and each sync, thread by thread
    scopes = [e for e in events if e.get("ph") == "X"
              and e.get("cat") in ("cpu_op", "user_annotation")]
    syncs = [e for e in events if e.get("ph") == "X" and e.get("cat") in
             ("cuda_runtime", "cuda_driver") and "Synchronize" in e["name"]]
    points = [(g[0]["tid"], g[0]["ts"], ("gap", g)) for g in gaps] + \
        [(s["tid"], s["ts"], ("sync", s)) for s in syncs]
    by_gap: dict[str, list[float]] = {}
    by_sync: dict[str, list[float]] = {}
    for tid in {p[0] for p in points}:
        mine = sorted((p for p in points if p[0] == tid), key=lambda p: p[1])
        opened = _open_scopes([e for e in scopes if e["tid"] == tid], [p[1] for p in mine])
        for (_, _, (kind, item)), around in zip(mine, opened):
            if kind == "gap":
                by_gap.setdefault(_where(around), []).append(item[1])
            else:
                by_sync.setdefault(_where(around), []).append(item["dur"])
    ranked = sorted(((where, sum(v) / 1e3, len(v)) for where, v in by_gap.items()),
                    key=lambda r: -r[1])
    return {"span_ms": span / 1e3, "busy_ms": busy / 1e3, "idle_ms": (span - busy) / 1e3,
            "host_late_ms": sum(g[1] for g in gaps if g[2]) / 1e3,
            "gaps": ranked,
            "syncs": sorted(((where, len(v), sum(v) / 1e3) for where, v in by_sync.items()),
                            key=lambda r: -r[2])}


def with_setting(step, owner, name: str, value):
    """``step`` with attribute ``name`` of ``owner`` (an object, or a module's dotted name)
    set to ``value`` while it runs."""
    if isinstance(owner, str):
        owner = importlib.import_module(owner)

    def run():
        previous = getattr(owner, name)
        setattr(owner, name, value)
        try:
            return step()
        finally:
            setattr(owner, name, previous)
    return run


NO_SPLIT = "shared_amvl:nosplit"


def without_head_split(step):
    """``step`` with every dk/dv launch summing a KV head's query heads in one program."""
    return with_setting(step, "amvl_kernels.latent_attention", "_dkdv_head_split",
                        lambda programs, group, target: 1)


UNPAIRED, PAIRED = "shared_amvl:unpaired", "shared_amvl:paired"


def with_pairing(step, model, on: bool):
    """``step`` with ``pair_weight_grads`` on (each large decoder weight's gradients of the
    two passes paired in one product) or off (autograd adds them; the default since the
    H200 run of 2026-11-28)."""
    return with_setting(step, model.config, "pair_weight_grads", on)


PAIR_ALL = "shared_amvl:pair_all"


def with_every_weight_paired(step, model):
    """``step`` paired, every decoder linear's weight gradients, the attention projections
    too: at the 7B proxy's widths each of q_proj and o_proj (3,584 x 3,584, under
    ``MIN_PAIRED_NUMEL``) costs a bf16 addition of 77 MB a layer when left to autograd (counted
    on the CPU by a dispatch mode), about 26 us on an H100, against about 0.1 ms more host
    time per paired use."""
    return with_setting(with_pairing(step, model, True), "amvl.weight_grads",
                        "MIN_PAIRED_NUMEL", 0)


KEPT_GRADS = "shared_amvl:kept_grads"


def with_latent_gradients_kept(step, model):
    """``step`` paired, with the latent pass's weight gradients multiplied out in its own
    backward and kept for the prefix pass, instead of their factors
    (``weight_grads.KEEP_FACTORS`` off): more peak memory, the products where the device may
    wait for the host anyway."""
    return with_setting(with_pairing(step, model, True), "amvl.weight_grads",
                        "KEEP_FACTORS", False)


LISTS_KERNEL = "shared_amvl:lists_kernel"


def with_tile_lists_by_kernel(step):
    """``step`` with each tile map's index lists from one Triton launch instead of torch's
    sorts (``layout.LISTS_BY_KERNEL``): a dozen fewer launches a map, four maps a step."""
    return with_setting(step, "amvl_kernels.layout", "LISTS_BY_KERNEL", True)


SHORT_SDPA = "shared_amvl:short_sdpa"


def with_short_queries_on_sdpa(step):
    """``step`` with the latent pass's attention (82 queries a row over x's cached keys at the
    BLINK-style shape, 274 at 4:1) on SDPA with the layout's dense mask
    (``SHORT_QUERIES_TO_SDPA`` = 512) instead of our kernels: fewer and cheaper launches where
    the device waits for the host."""
    return with_setting(step, "amvl_kernels.latent_attention", "SHORT_QUERIES_TO_SDPA", 512)


SLOT_EMBEDDINGS = "shared_amvl:slot_embeddings"


def with_slot_embeddings(step, model):
    """``step`` with slot embeddings (``AMVLConfig.slot_embeddings``, off by default): the
    host time of their adds and concatenations, a step's gradients left to the others."""
    from amvl.heads import SlotEmbeddings

    embeddings = model.get_input_embeddings().weight
    slots = SlotEmbeddings(model.config.num_slots, embeddings.shape[1]).to(embeddings)
    return with_setting(step, model, "slot_embeddings", slots)


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


SPLIT = "shared_amvl:split"


def with_rows_split_off(step):
    """``step`` with x's plain causal rows handed to SDPA's causal kernel in training too:
    the split's threshold with a backward lowered to the forward's (CAUSAL_ROWS_TO_SDPA)."""
    module = importlib.import_module("amvl_kernels.latent_attention")
    return with_setting(step, module, "CAUSAL_ROWS_TO_SDPA_WITH_GRAD",
                        module.CAUSAL_ROWS_TO_SDPA)


PLAIN_COMPILED, SHARED_COMPILED = "plain:compiled", "shared_amvl:compiled"
PLAIN_GRAPHED, SHARED_GRAPHED = "plain:graphed", "shared_amvl:graphed"


def working_providers(steps: dict, providers: list[str]) -> list[str]:
    """``providers`` less those whose step raises on its first call (a compiled step
    compiles there), each reported with its error: a variant that fails on the device (a
    compile error, a kernel never run there) must not cost the lease the other providers'
    numbers. The baseline must work."""
    working = []
    for name in providers:
        try:
            steps[name]()
        except Exception as error:  # noqa: BLE001 - reported, and the rest go on
            if name == providers[0]:
                raise
            print(f"provider {name} left out: its first step raised "
                  f"{type(error).__name__}: {str(error)[:500]}", file=sys.stderr, flush=True)
            continue
        working.append(name)
    if len(working) < 2:
        raise SystemExit(f"nothing to compare: only {working} of {providers} ran")
    return working


def python_functions(step, device: torch.device, rows: int, steps: int = 5) -> str:
    """The ``rows`` Python functions (and built-ins: each torch operator's call) with the most
    time of their own in ``steps`` steps under cProfile, as cProfile prints them (totals of
    the ``steps`` steps)."""
    step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(rows)
    return out.getvalue()


def host_only_widths(widths: dict) -> dict:
    """``widths`` with the same layers, query and KV heads, and head size 8: the same
    operators and launches, each on a device that finishes it at once."""
    heads = widths["num_attention_heads"]
    return dict(widths, hidden_size=8 * heads, intermediate_size=256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=next(iter(bms.MODELS)), choices=list(bms.MODELS))
    parser.add_argument("--shape", default="blink", choices=list(bms.SHAPES))
    parser.add_argument("--batch", type=int, default=bms.BATCH)
    parser.add_argument("--providers", default="plain,shared_amvl",
                        help=f"comma-separated, first is the baseline, of {bms.PROVIDERS}; "
                             f"'{NO_SPLIT}' is shared_amvl with the dk/dv kernel's "
                             f"grouped query heads never split across programs, "
                             f"'{KERNELS_ONLY}' with every query row on our kernels, "
                             f"'{UNPAIRED}' without paired weight gradients, '{PAIRED}' "
                             f"with them, '{PAIR_ALL}' "
                             f"with every weight's paired, '{KEPT_GRADS}' with the latent "
                             f"pass's weight gradients kept instead of their factors, "
                             f"'{LISTS_KERNEL}' with tile maps' lists from one launch, "
                             f"'{SHORT_SDPA}' with the latent pass's attention on SDPA, "
                             f"'{SLOT_EMBEDDINGS}' with slot embeddings, "
                             f"'{PLAIN_COMPILED}' and '{SHARED_COMPILED}' through "
                             f"torch.compile, '{PLAIN_GRAPHED}' and '{SHARED_GRAPHED}' "
                             "through its mode 'reduce-overhead' (CUDA graphs), "
                             f"'{SPLIT}' "
                             "with x's rows on SDPA in training too")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=15, help="operators listed per comparison")
    parser.add_argument("--gaps", type=int, default=0, metavar="N",
                        help="also list, per provider, the N places whose launches the device "
                             "waited for longest, and the host syncs (GPU only)")
    parser.add_argument("--python", type=int, default=0, metavar="N",
                        help="also list, per provider, the N Python functions that took the "
                             "most host time in 5 of its steps (cProfile)")
    parser.add_argument("--host-only", action="store_true",
                        help="the model's layers and heads at tiny widths: each step's time "
                             "is then the host's")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    providers = args.providers.split(",")
    variants = {NO_SPLIT, KERNELS_ONLY, UNPAIRED, PAIRED, PAIR_ALL, KEPT_GRADS, SPLIT,
                LISTS_KERNEL, SHORT_SDPA, SLOT_EMBEDDINGS, PLAIN_COMPILED, SHARED_COMPILED, PLAIN_GRAPHED,
                SHARED_GRAPHED}
    unknown = set(providers) - set(bms.PROVIDERS) - variants
    if unknown or len(providers) < 2:
        parser.error(f"--providers needs two or more of {bms.PROVIDERS}, got {providers}")

    device = common.bench_device()
    bms.BATCH = args.batch  # read by the batch builder
    if args.host_only:
        bms.MODELS[args.model] = host_only_widths(bms.MODELS[args.model])
    base, tokenizer = bms._model(args.model)
    prefix, answer = bms.SHAPES[args.shape]
    steps, _ = bms._steps(base, tokenizer, prefix, answer, device)
    steps[NO_SPLIT] = without_head_split(steps["shared_amvl"])
    steps[KERNELS_ONLY] = on_our_kernels_only(steps["shared_amvl"])
    steps[SPLIT] = with_rows_split_off(steps["shared_amvl"])
    model = steps["shared_amvl"].model
    steps[UNPAIRED] = with_pairing(steps["shared_amvl"], model, False)
    steps[PAIRED] = with_pairing(steps["shared_amvl"], model, True)
    steps[PAIR_ALL] = with_every_weight_paired(steps["shared_amvl"], model)
    steps[KEPT_GRADS] = with_latent_gradients_kept(steps["shared_amvl"], model)
    steps[LISTS_KERNEL] = with_tile_lists_by_kernel(steps["shared_amvl"])
    steps[SHORT_SDPA] = with_short_queries_on_sdpa(steps["shared_amvl"])
    steps[SLOT_EMBEDDINGS] = with_slot_embeddings(steps["shared_amvl"], model)
    for (plain, shared), mode in (((PLAIN_COMPILED, SHARED_COMPILED), None),
                                  ((PLAIN_GRAPHED, SHARED_GRAPHED), "reduce-overhead")):
        if {plain, shared} & set(providers):  # compiling takes a while
            compiled = bms.compiled_steps(base, model, tokenizer, prefix, answer, device, mode)
            steps[plain] = compiled["plain_compiled"]
            steps[shared] = compiled["shared_amvl_compiled"]
    providers = working_providers(steps, providers)
    # The benchmark's own measure, side by side: the effects asked about (about 1% of a step)
    # are smaller than the drift between providers timed one after another (2.4% in run 5).
    # Whole cycles of the balanced orders (2n of them for an odd number n of providers).
    cycle = len(common.balanced_orders(len(providers)))
    bench_ms = common.time_ms_side_by_side({name: steps[name] for name in providers},
                                           warmup=100, cpu_rounds=args.repeats,
                                           gpu_rounds=-(-bms.GPU_ROUNDS // cycle) * cycle)
    results = {}
    for name in providers:
        results[name] = profile_step(steps[name], device)
        results[name]["wall_ms"] = wall_ms(steps[name], device, args.repeats)
        results[name]["bench_ms"] = bench_ms[name]
        results[name]["peak_mb"] = common.peak_memory_bytes(steps[name]) / 2**20
        if args.gaps and device.type == "cuda":
            with tempfile.TemporaryDirectory() as folder:
                trace = Path(folder) / "trace.json"
                profile_step(steps[name], device, trace)
                events = json.loads(trace.read_text())["traceEvents"]
            results[name]["timeline"] = device_timeline(events)
        if args.python:
            results[name]["python"] = python_functions(steps[name], device, args.python)

    unit = "device" if device.type == "cuda" else "host"
    host_only = ", at tiny widths (host time)" if args.host_only else ""
    print(f"{args.model}{host_only}, {args.shape} (prefix {prefix}, answer {answer}), batch "
          f"{args.batch}, {common.device_info()['device']}")
    print(f"{'provider':<20}{'bench ms':>10}{'ratio':>7}{'wall ms':>10}{'host ms':>10}"
          f"{'device ms':>11}{'ratio':>7}{'launches':>10}{'syncs':>7}{'peak MB':>9}")
    first = results[providers[0]]
    for name, r in results.items():
        device_ratio = r["device_ms"] / first["device_ms"] if first["device_ms"] else 0.0
        print(f"{name:<20}{r['bench_ms']:>10.1f}{r['bench_ms'] / first['bench_ms']:>7.3f}"
              f"{r['wall_ms']:>10.1f}{r['host_ms']:>10.1f}{r['device_ms']:>11.1f}"
              f"{device_ratio:>7.3f}{r['launches']:>10}{r['syncs']:>7}{r['peak_mb']:>9.0f}")
    for name, r in results.items():
        if "timeline" not in r:
            continue
        t = r["timeline"]
        print(f"\n{name}: device busy {t['busy_ms']:.1f} of {t['span_ms']:.1f} ms, idle "
              f"{t['idle_ms']:.1f} ms ({t['host_late_ms']:.1f} ms waiting for a late launch); "
              f"idle before the launches of")
        for where, ms, count in t["gaps"][:args.gaps]:
            print(f"  {ms:8.2f} ms {count:5d} gaps  {where[:110]}")
        for where, count, ms in t["syncs"]:
            print(f"  sync x{count} ({ms:.2f} ms)  {where[:110]}")
    for name, r in results.items():
        if "python" in r:
            print(f"\n{name}: the Python functions that took the most host time in 5 steps\n"
                  f"{r['python']}")
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
