"""Time launch shapes of the Gaussian op's CUDA backend side by side, on a GPU.

Builds csrc/ once per variant (the ``AMVL_GAUSSIAN_BLOCK`` and ``AMVL_GAUSSIAN_MIN_BLOCKS_*``
macros of csrc/gaussian_kl.cu: threads per block, and the blocks per SM promised to
``__launch_bounds__`` for the forward and the backward kernel, which cap their registers; and
``AMVL_GAUSSIAN_BWD_FLAT``, the backward's flat launch or the 2-D grid it replaced;
``AMVL_GAUSSIAN_BWD_WAVES``, the flat grid's cap; ``AMVL_GAUSSIAN_BLOCK_FWD``, the forward's
own threads per block) into a temporary folder, all in parallel. Then
it replays forward and forward+backward of every variant, and of the Triton path, from CUDA
graphs at the benchmark's bf16 shapes, and checks every variant's result against the float64
formulas exactly as the benchmark does. Prints one row per (shape, provider) and writes them to
``--json``.

    python3 scripts/sweep_cuda_gaussian.py [--variants 128:6:5 128:6:5:0 256:3:2] [--json F]

``--once`` builds nothing and times nothing: it runs forward+backward of the Triton path and of
the installed CUDA extension twice each at 4096 x 4096, for a profiler to read the kernels'
counters (``gpu_check.sh counters`` runs it under ncu).
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import amvl_kernels as ak  # noqa: E402
import build_cuda  # noqa: E402
from amvl_kernels import _cuda_gaussian_kl, backends  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.bench_gaussian_kl import (  # noqa: E402
    NOISE_SIGMAS, TOLERANCE, buffer_sets, distinct_bytes, minimal_bytes, result_errors,
    timed_call)

SHAPES = [(4096, 4096), (512, 3584), (65536, 256)]
# threads per block : forward blocks per SM : backward blocks per SM [: backward launch, 1 flat
# (the default) or 0 the 2-D grid [: the flat grid's cap in GPU-fulls of blocks, default 1
# [: the forward's threads per block, default the first field]]]; the first is the default
# build, the second its old backward. The 16-bit forward takes 70 registers (ptxas, sm_90):
# 3 blocks of 256 threads or 1 of 512 fit an SM.
DEFAULT_VARIANTS = ["128:6:5", "128:6:5:0", "128:6:5:1:2", "128:6:5:1:4", "128:3:5:1:1:256",
                    "128:3:5:1:4:256", "128:1:5:1:4:512"]


def parse_variant(spec: str) -> tuple[int, int, int, int, int, int]:
    """(threads, forward blocks, backward blocks, flat backward, waves, forward threads) of
    "128:6:5", "128:6:5:0", "128:6:5:1:4" or "128:3:5:1:4:256"."""
    fields = [int(x) for x in spec.split(":")]
    if 3 <= len(fields) <= 6:
        fields += [1, 1, fields[0]][len(fields) - 3:]  # the missing flat, waves, fwd threads
    if len(fields) != 6 or fields[3] not in (0, 1) or fields[4] < 1 \
            or not 32 <= fields[5] <= 1024 or fields[5] & (fields[5] - 1):
        raise ValueError("want threads:fwd_blocks:bwd_blocks[:flat[:waves[:fwd_threads]]], "
                         "flat 0 or 1, waves >= 1, fwd_threads a power of two from 32 to 1024")
    return tuple(fields)  # type: ignore[return-value]


def variant_spec(spec: str) -> str:
    """argparse type: checks a variant and keeps its spelling, the provider's name."""
    try:
        parse_variant(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"variant {spec!r}: {err}") from err
    return spec


def build_variant(nvcc: str, spec: str, folder: Path) -> ModuleType:
    """The extension compiled with ``spec`` (see ``parse_variant``), imported under a name of
    its own."""
    block, fwd_blocks, bwd_blocks, flat, waves, fwd_block = parse_variant(spec)
    arch = "".join(map(str, torch.cuda.get_device_capability()))
    where = folder / f"v{spec.replace(':', '_')}"  # one folder per spelling: no shared builds
    sources = build_cuda.extension_sources(ROOT, sorted((ROOT / "csrc").glob("*.cu")))
    output = where / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    build_cuda.build_module(nvcc, sources, output, where / "obj", [arch],
                            defines={"AMVL_GAUSSIAN_BLOCK": block,
                                     "AMVL_GAUSSIAN_MIN_BLOCKS_FWD": fwd_blocks,
                                     "AMVL_GAUSSIAN_MIN_BLOCKS_BWD": bwd_blocks,
                                     "AMVL_GAUSSIAN_BWD_FLAT": flat,
                                     "AMVL_GAUSSIAN_BWD_WAVES": waves,
                                     "AMVL_GAUSSIAN_BLOCK_FWD": fwd_block})
    return build_cuda.import_built(output, f"amvl_sweep_{where.name}")


def measure(run_sets, copies: int, run_one, check, shape, mode) -> dict[str, float]:
    """Graph-replay time per call (``run_sets`` makes ``copies`` calls on as many buffer sets,
    so that no call reads from L2 what the previous one left there), share of copy bandwidth
    and the benchmark's error figures; ``graph_us_l2_warm``: ``run_one`` on one set."""
    slots, d = shape
    errors = check()
    graph_ms, timing = common.graph_time_ms(run_sets, calls=copies), "graph"
    if graph_ms is None:  # a capture that failed still gets a (host-inclusive) number
        from triton.testing import do_bench  # flushes L2 before each call

        graph_ms, timing = float(do_bench(run_one, rep=50, return_mode="median")), "stream"
    nbytes = minimal_bytes(slots, d, torch.bfloat16, mode)
    row = {**errors, "graph_us": 1e3 * graph_ms, "timing": timing, "copies": copies,
           "pct_of_copy": 100 * nbytes / graph_ms / 1e6 / common.copy_bandwidth_gbs()}
    warm = common.graph_time_ms(run_one) if copies > 1 and timing == "graph" else None
    if warm is not None:
        row["graph_us_l2_warm"] = 1e3 * warm
    return row


def run_once() -> None:
    """Forward+backward twice per backend (the first compiles Triton's kernels)."""
    inputs = [torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
              for _ in range(4)]
    for backend in ("triton", "cuda"):
        for _ in range(2):
            outputs = ak.gaussian_sample_kl(*inputs, seed=1234, backend=backend)
            torch.autograd.grad(outputs, inputs, [torch.ones_like(o) for o in outputs])
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, type=variant_spec,
                        help="threads per block:forward blocks per SM:backward blocks per SM"
                             "[:backward launch, 1 flat (default) or 0 the 2-D grid"
                             "[:flat grid cap in GPU-fulls of blocks[:forward threads per "
                             "block]]]")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--once", action="store_true",
                        help="only run each installed backend twice, for a profiler")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this sweep times kernels on a GPU"
    if args.once:
        run_once()
        return
    nvcc = build_cuda.find_nvcc()
    assert nvcc is not None, "nvcc not found"

    # The variants stand in for the installed extension, which need not exist.
    backends.cuda_extension_available = lambda: True
    folder = Path(tempfile.mkdtemp(prefix="amvl_cuda_sweep_"))
    with ThreadPoolExecutor(max_workers=len(args.variants)) as pool:
        modules = dict(zip(args.variants, pool.map(
            lambda spec: build_variant(nvcc, spec, folder), args.variants)))
    print(f"built {len(modules)} variants in {folder}", flush=True)

    device = torch.device("cuda")
    info = common.device_info()
    rows = []
    for shape in SHAPES:
        torch.manual_seed(0)
        copies = {mode: common.l2_cold_copies(distinct_bytes(*shape, torch.bfloat16, mode))
                  for mode in ("fwd", "fwd+bwd")}
        sets = buffer_sets(shape, torch.bfloat16, device, True, max(copies.values()))
        inputs, grad_outputs = sets[0]
        providers = {"triton": "triton", **{f"cuda {spec}": spec for spec in modules}}
        for name, spec in providers.items():
            backend = "triton" if spec == "triton" else "cuda"
            if backend == "cuda":  # the launcher looks the module up on every call
                _cuda_gaussian_kl._ext = lambda module=modules[spec]: module

            def op(*x, backend=backend):
                return ak.gaussian_sample_kl(*x, seed=1234, backend=backend)

            def forward():
                return op(*inputs)

            def check_forward():
                return result_errors(forward(), inputs, None, grad_outputs)

            def check_backward():
                outputs = forward()
                grads = torch.autograd.grad(outputs, inputs, grad_outputs)
                return result_errors(outputs, inputs, grads, grad_outputs)

            for mode, check in (("fwd", check_forward), ("fwd+bwd", check_backward)):
                call, n = timed_call(op, mode), copies[mode]

                def run_sets(call=call, n=n):  # outputs kept: distinct buffers per set
                    return [call(*buffers) for buffers in sets[:n]]

                row = {"shape": f"{shape[0]}x{shape[1]}", "provider": name, "mode": mode,
                       **measure(run_sets, n, lambda call=call: call(*sets[0]), check, shape,
                                 mode)}
                ok = (row["max_err"] <= TOLERANCE[torch.bfloat16]
                      and row["noise_sigmas"] <= NOISE_SIGMAS)
                row["ok"] = ok
                rows.append(row)
                print(f"{row['shape']:>10} {mode:>7} {name:>14}: {row['graph_us']:8.1f} us "
                      f"({row['timing']}) {row['pct_of_copy']:5.1f}% of copy  max_err "
                      f"{row['max_err']:.1e} {'ok' if ok else 'WRONG'}", flush=True)
                if args.json:  # after every row: a sweep cut short keeps what it measured
                    args.json.write_text(json.dumps({"device": info, "rows": rows}, indent=1))
    print(json.dumps(info))
    if not all(row["ok"] for row in rows):
        raise SystemExit("a provider gave a wrong result: see the rows marked WRONG")


if __name__ == "__main__":
    main()
