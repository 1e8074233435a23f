"""The benchmarks stay runnable: run each on tiny shapes (AMVL_BENCH_SMOKE=1) in a subprocess.

Timings from this run mean nothing (CPU, Triton interpreter); the test checks that every
provider runs, the summary prints and the JSON is written with device and versions.
"""

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {"AMVL_BENCH_SMOKE": "1"}
BENCHES = {  # benchmark file -> (bench -> providers it must time, its -k selection)
    "bench_gaussian_kl.py": ({"gaussian_kl": {"eager", "torch.compile", "triton"}}, "float32"),
    # compiled at one shape: compiling is most of the smoke run's time
    "bench_model_step.py": ({"model_step": {"plain", "naive", "shared", "shared_amvl"},
                             "model_step_compiled": {"plain", "plain_compiled", "shared_amvl",
                                                     "shared_amvl_compiled"}},
                            "not compiled or blink"),
    "bench_choice_scoring.py": ({"choice_scoring": {"per_choice", "one_encoding"}}, ""),
    "bench_latent_attention.py": ({"latent_attention": {
        "amvl", "amvl_auto", "amvl_split", "amvl_heads_fastest", "flex", "sdpa_dense",
        "sdpa_flash_causal"}}, ""),
}
PROFILE_PROVIDERS = ("plain,naive,shared_amvl,shared_amvl:nosplit,shared_amvl:unpaired,"
                     "shared_amvl:paired,shared_amvl:pair_all,shared_amvl:kept_grads,"
                     "shared_amvl:split,shared_amvl:lists_kernel,shared_amvl:short_sdpa,"
                     "plain:compiled,shared_amvl:compiled,shared_amvl:graphed")


def _script_commands(out: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (command, environment additions) of every script this module runs, the
    longest first; each writes under ``out / name``."""
    interpret = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
    commands = {}
    for module in ("bench_model_step.py", "bench_gaussian_kl.py", "bench_latent_attention.py",
                   "bench_choice_scoring.py"):
        select = BENCHES[module][1]
        commands[module] = ([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             f"benchmarks/{module}", "--benchmark"]
                            + (["-k", select] if select else []),
                            {**SMOKE, **interpret, "AMVL_BENCH_OUT": str(out / module)})
    commands["profile"] = ([sys.executable, "scripts/profile_model_step.py", "--repeats", "1",
                            "--providers", PROFILE_PROVIDERS, "--json",
                            str(out / "profile" / "profile.json"), "--host-only", "--python",
                            "5"], SMOKE)
    commands["tuning"] = ([sys.executable, "scripts/tune_latent_attention.py", "--smoke",
                           "--json", str(out / "tuning" / "tune.json")],
                          {"TRITON_INTERPRET": "1"})
    commands["traffic"] = ([sys.executable, "scripts/step_traffic.py", "--model", "tiny",
                            "--providers", "plain,shared_amvl,naive", "--vocab", "2000",
                            "--rows", "3"], SMOKE)
    commands["host_overhead"] = ([sys.executable, "scripts/host_overhead.py", "--backend",
                                  "torch", "--calls", "3", "--rows", "3"], {})
    return commands


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory) -> Callable[[str], tuple[Future, Path]]:
    """name -> (the future of script ``name``'s CompletedProcess, its output directory),
    started on first request, two at a time. In one pytest process every script starts at the
    module's first test: they spend most of their time in single-threaded Python (the Triton
    interpreter, compiling), so both cores work. Under pytest-xdist, whose workers share the
    module's tests, each starts only the scripts of its own tests."""
    out = tmp_path_factory.mktemp("scripts")
    commands = _script_commands(out)
    pool = ThreadPoolExecutor(max_workers=2)
    runs: dict[str, Future] = {}

    def run(name: str) -> tuple[Future, Path]:
        if name not in runs:
            command, extra = commands[name]
            (out / name).mkdir()
            runs[name] = pool.submit(subprocess.run, command, cwd=ROOT,
                                     env={**os.environ, **extra}, capture_output=True,
                                     text=True, timeout=600)
        return runs[name], out / name

    if "PYTEST_XDIST_WORKER" not in os.environ:
        for name in commands:
            run(name)
    yield run
    pool.shutdown(wait=True, cancel_futures=True)


def _finished(script_runs: Callable[[str], tuple[Future, Path]], name: str
              ) -> tuple[subprocess.CompletedProcess, Path]:
    """Script ``name``'s run, once it has ended successfully, and its output directory."""
    future, out = script_runs(name)
    proc = future.result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out


def _load_script(name: str):
    """A module of scripts/ (not a package), loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("module", list(BENCHES))
def test_benchmark_runs_and_writes_json(script_runs, module):
    proc, out = _finished(script_runs, module)
    assert " failed" not in proc.stdout
    for bench, providers in BENCHES[module][0].items():
        assert f"[{bench}]" in proc.stdout
        payload = json.loads((out / f"{bench}.json").read_text())
        assert {"torch", "triton", "device"} <= payload["device"].keys()
        assert providers <= {row["provider"] for row in payload["rows"]}
        assert all(row["median_ms"] > 0 for row in payload["rows"])


def test_tile_tuning_script_runs(script_runs):
    """scripts/tune_latent_attention.py --smoke: every kernel's sweep runs a non-default tile
    shape and checks it against the reference; the JSON holds every result."""
    _, out = _finished(script_runs, "tuning")
    rows = json.loads((out / "tune.json").read_text())["results"]
    assert sorted((row["kernel"], str(row["tiles"])) for row in rows) == sorted(
        (kernel, tiles) for kernel in ("forward", "dkdv", "dkdv+dq", "dq")
        for tiles in ("default", "[32, 16, 1, 1]"))
    assert all(not row["failure"] and row["max_rel_err"] < 1e-5 for row in rows), rows


def test_attention_benchmark_check_follows_the_design_criterion():
    """A flash row passes at up to 2x PyTorch's own error on the output and 3x on gradients;
    a mask that ignores the latent block fails it."""
    import torch.nn.functional as F

    from benchmarks.bench_latent_attention import (build_layout, result_errors,
                                                   within_criterion)

    bf16 = torch.bfloat16
    torch_errors = [0.03, 0.04, 0.04, 0.04]
    assert within_criterion([0.059, 0.119, 0.1, 0.1], torch_errors, bf16)
    assert not within_criterion([0.061, 0.1, 0.1, 0.1], torch_errors, bf16)
    assert not within_criterion([0.05, 0.1, 0.121, 0.1], torch_errors, bf16)
    assert not within_criterion([float("nan"), 0.1, 0.1, 0.1], torch_errors, bf16)
    assert within_criterion([0.009], [0.0], bf16)  # the floor under an exact PyTorch

    layout = build_layout("latent", 1, 64, "cpu")
    q, k, v, grad_out = (torch.randn(1, 3, 64, 16, requires_grad=i < 3) for i in range(4))
    masked = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
        q, k, v, attn_mask=layout.dense_mask()[:, None])
    causal = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    for mode in ("fwd", "fwd+bwd"):
        assert within_criterion(*result_errors(masked, q, k, v, grad_out, layout, mode),
                                torch.float32)
        assert not within_criterion(*result_errors(causal, q, k, v, grad_out, layout, mode),
                                    torch.float32)


def test_sweep_variant_specs():
    """scripts/sweep_cuda_gaussian.py's variant spelling: the short forms fill in the
    defaults (flat backward, one wave, the forward's threads = the backward's); a spec the
    macros cannot build is refused before nvcc runs (a GPU lease is too short for that)."""
    module = _load_script("sweep_cuda_gaussian")
    assert module.parse_variant("128:6:5") == (128, 6, 5, 1, 1, 128)
    assert module.parse_variant("128:3:5:1:4:256") == (128, 3, 5, 1, 4, 256)
    assert all(module.parse_variant(v) for v in module.DEFAULT_VARIANTS)
    for bad in ("128:6", "128:6:5:2", "128:6:5:1:0", "128:6:5:1:1:300", "128:6:5:1:1:16",
                "1:2:3:4:5:6:7"):
        with pytest.raises(ValueError):
            module.parse_variant(bad)


def test_providers_take_turns():
    """The interleaved timing: one call per provider per round, each round starting one
    provider later, and each provider's median over the rounds (a drift of the machine's speed
    then hits every provider alike)."""
    from benchmarks.common import take_turns

    calls, clock = [], iter([5.0, 1.0, 7.0, 3.0, 6.0, 2.0, 4.0, 9.0, 8.0])
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    medians = take_turns(fns, 3, lambda fn: (fn(), next(clock))[1])
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert medians == {"a": 5.0, "b": 3.0, "c": 6.0}


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_turn_orders_are_balanced(n):
    """Rotating one order put the same predecessor before a provider in 8-9 of 11 rounds;
    the Williams orders put every provider after every other one equally often."""
    from collections import Counter

    from benchmarks.common import balanced_orders, take_turns

    orders = balanced_orders(n)
    pairs = Counter((a, b) for order in orders for a, b in zip(order, order[1:]))
    assert all(sorted(order) == list(range(n)) for order in orders)
    assert len(pairs) == n * (n - 1) and len(set(pairs.values())) == 1
    assert len(set(Counter(order[0] for order in orders).values())) == 1
    calls = []
    take_turns({i: (lambda i=i: calls.append(i)) for i in range(n)}, len(orders),
               lambda fn: (fn(), 1.0)[1])
    assert calls == [i for order in orders for i in order]


def test_graph_replays_cycle_past_the_l2_cache(monkeypatch):
    """CUDA-graph replays do not flush L2: at 512 x 3584 a bf16 forward+backward touches 36.7
    MB, under an H100's 50 MB, so one buffer set was timed from cache. Enough sets for twice
    the L2 lie between two uses of one set."""
    from types import SimpleNamespace

    from benchmarks.bench_gaussian_kl import distinct_bytes
    from benchmarks.common import l2_cold_copies

    assert l2_cold_copies(10) == 1 or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(L2_cache_size=50 * 2**20))
    nbytes = distinct_bytes(512, 3584, torch.bfloat16, "fwd+bwd")
    assert abs(nbytes / 1e6 - 36.7) < 0.1
    # the set itself and enough others for 2 x L2 between two uses of one set
    copies = l2_cold_copies(nbytes)
    assert copies == 4 and (copies - 1) * nbytes >= 2 * 50 * 2**20
    assert l2_cold_copies(distinct_bytes(512, 3584, torch.bfloat16, "fwd")) == 7
    assert l2_cold_copies(distinct_bytes(4096, 4096, torch.bfloat16, "fwd+bwd")) == 1


def test_model_step_check_reads_the_nll_apart_from_the_kls():
    """The random heads' KLs are 99% of the loss: an answer pass off by one position moved
    the loss by 6e-5 (inside the loss tolerance) and the NLL by 0.04 nats."""
    from benchmarks.bench_model_step import path_differences

    naive = {"loss": 655.15, "nll": 7.11, "kl_fwd": 324.02, "kl_rev": 324.02}
    broken = dict(naive, loss=655.19, nll=7.15)
    off = path_differences({"naive": naive, "shared": broken}, "shared")
    assert off["loss"] < 1e-4 and abs(off["nll"] - 0.04) < 1e-9
    assert off["kl_fwd"] == off["kl_rev"] == 0


def test_model_step_profile_script_runs(script_runs):
    """scripts/profile_model_step.py on the smoke model: a row per provider, the operators
    that grew, and the JSON."""
    proc, out = _finished(script_runs, "profile")
    assert "against plain: the operators that grew most" in proc.stdout
    assert "at tiny widths (host time)" in proc.stdout
    assert "the Python functions that took the most host time in 5 steps" in proc.stdout
    results = json.loads((out / "profile.json").read_text())["results"]
    assert set(results) == set(PROFILE_PROVIDERS.split(","))
    assert all(r["wall_ms"] > 0 and r["ops"] and r["peak_mb"] > 0 for r in results.values())

    # The compiled steps run Inductor's graphs, not the eager operators
    assert any("CompiledFxGraph" in op for op in results["shared_amvl:compiled"]["ops"])
    assert not any("CompiledFxGraph" in op for op in results["shared_amvl"]["ops"])

    def paired(provider):  # the smoke model's weights are all under MIN_PAIRED_NUMEL
        return any("PairedLinear" in op for op in results[provider]["ops"])
    assert paired("shared_amvl:pair_all") and not paired("shared_amvl")


def test_profile_drops_a_provider_that_fails_and_keeps_the_rest(capsys):
    """A variant whose first step raises is reported and left out, so that one failure on a
    lent GPU does not cost the other providers' numbers; a failing baseline, or a comparison
    left with one provider, ends the run."""
    module = _load_script("profile_model_step")
    calls = []

    def works(name):
        return lambda: calls.append(name)

    def fails():
        raise RuntimeError("no kernel image for this device")
    steps = {"plain": works("plain"), "shared_amvl": works("shared_amvl"), "broken": fails,
             "later": works("later")}
    kept = module.working_providers(steps, ["plain", "broken", "shared_amvl", "later"])
    assert kept == ["plain", "shared_amvl", "later"]
    assert calls == ["plain", "shared_amvl", "later"]
    err = capsys.readouterr().err
    assert "provider broken left out" in err and "no kernel image" in err
    with pytest.raises(RuntimeError, match="no kernel image"):
        module.working_providers(steps, ["broken", "plain"])
    with pytest.raises(SystemExit, match="nothing to compare"):
        module.working_providers(steps, ["plain", "broken"])


def test_traffic_count_reads_inputs_writes_outputs_and_skips_views():
    """scripts/step_traffic.py's count: an addition moves its two inputs and its output, a
    view nothing, a matrix product counts 2 m n k FLOPs and no bytes."""
    module = _load_script("step_traffic")
    a, b = torch.randn(5, 7), torch.randn(7, 3, dtype=torch.float64)
    with module.TrafficCount() as count:
        (a + a).t().reshape(-1)
        b.to(torch.float32)
        a @ b.float()
        torch.nn.functional.embedding(torch.tensor([[2, 0, 2]]), torch.randn(1000, 4))
    assert count.bytes[("add", "[*, 7]", "float32")] == 3 * 35 * 4
    assert count.bytes[("_to_copy", "[*, 3]", "float32")] == 2 * 21 * (8 + 4)
    assert count.flops[("mm", "[*, 3]", "float32")] == 2 * 5 * 7 * 3
    assert count.bytes[("mm", "[*, 3]", "float32")] == 0
    assert count.bytes[("embedding", "[*, *, 4]", "float32")] == 2 * 3 * 4 * 4 + 3 * 8
    assert not any(op in ("t", "view", "_unsafe_view") for op, _, _ in count.calls)


def test_step_traffic_script_runs(script_runs):
    """scripts/step_traffic.py on the smoke model: a row per provider and the operators that
    grew, per layer and for the rest."""
    proc, _ = _finished(script_runs, "traffic")
    for provider in ("shared_amvl", "naive"):
        assert f"a decoder layer, {provider} against plain" in proc.stdout
        assert f"the rest of the model, {provider} against plain" in proc.stdout
    assert "vocabulary 2000" in proc.stdout and "[*, 2000]" in proc.stdout
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in
            proc.stdout.splitlines() if line.split()[:1] in (["plain"], ["shared_amvl"])}
    assert all(len(row) == 6 and row[0] > 0 and row[4] > 0 for row in rows.values()), rows


def test_peak_memory_on_the_cpu_follows_allocations_and_frees():
    """The CPU's peak: the most bytes of tensors alive at once during the call."""
    from benchmarks import common

    a = torch.randn(1000, 1000)

    def fn():
        b = a * 2
        c = b + 1  # b and c: 8 MB
        del b
        d = torch.empty(3000, 1000)  # c and d: 16 MB
        return c, d
    assert common.peak_memory_bytes(fn) == 4 * (1000 + 3000) * 1000


def test_host_overhead_script_runs(script_runs):
    """scripts/host_overhead.py on the PyTorch paths: a time and a profile per call pattern."""
    proc, _ = _finished(script_runs, "host_overhead")
    assert proc.stdout.count(" us a call") == 4 and "tottime" in proc.stdout


def test_device_timeline_charges_idle_to_the_late_launch():
    """The profile script's timeline on a made-up trace: a gap after which the launch came
    late is charged to the scopes open around that launch; a short gap is not counted; a
    sync is listed with its place."""
    module = _load_script("profile_model_step")

    def x(cat, name, ts, dur, tid=1, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid,
                "args": args}
    events = [
        x("kernel", "a", 0, 10, tid=7, correlation=1),
        x("cuda_runtime", "cudaLaunchKernel", -5, 2, correlation=1),
        x("user_annotation", "amvl.latent_pass", 15, 100),
        x("cpu_op", "aten::linear", 19, 12),
        x("cpu_op", "aten::mm", 20, 10),
        x("cuda_runtime", "cudaLaunchKernel", 25, 2, correlation=2),
        x("kernel", "b", 30, 10, tid=7, correlation=2),   # idle 20 us, launched late
        x("cuda_runtime", "cudaLaunchKernel", 26, 2, correlation=3),
        x("kernel", "c", 41, 5, tid=7, correlation=3),    # idle 1 us: not a gap
        x("cpu_op", "aten::item", 48, 7),
        x("cuda_runtime", "cudaStreamSynchronize", 50, 3),
        x("cuda_runtime", "cudaLaunchKernel", 44, 1, correlation=4),
        x("kernel", "d", 60, 10, tid=7, correlation=4),   # idle 14 us, launched early
    ]
    t = module.device_timeline(events)
    assert t["span_ms"] == pytest.approx(0.070) and t["busy_ms"] == pytest.approx(0.035)
    assert t["idle_ms"] == pytest.approx(0.035)
    assert t["host_late_ms"] == pytest.approx(0.020)
    gaps = {where: (ms, count) for where, ms, count in t["gaps"]}
    assert gaps["amvl.latent_pass / aten::linear / aten::mm"] == (pytest.approx(0.020), 1)
    assert gaps["amvl.latent_pass"] == (pytest.approx(0.014), 1)
    assert t["syncs"] == [("amvl.latent_pass / aten::item", 1, pytest.approx(0.003))]
