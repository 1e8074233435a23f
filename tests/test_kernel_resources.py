"""Every Triton kernel compiles for Hopper, also on machines without a GPU; the Gaussian
kernels stay lean enough to keep many warps in flight, and the bf16 attention kernels keep
their tensor-core MMAs and pipelined loads.

The CPU tests run the kernels through the interpreter, which never compiles them and accepts
some constructs the compiler rejects (a global read without tl.constexpr, for one). This runs
``scripts/kernel_resources.py`` in a subprocess without the interpreter: it compiles each
kernel as the launchers launch it (same configuration and argument specialisation) for sm_90
with Triton's bundled ptxas.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _report(compiling: subprocess.Popen) -> dict[str, tuple[str, ...]]:
    """label -> (registers, spill bytes, shared memory bytes, wgmma, async copies, ld.b16)
    of the script's run ``compiling``, once it has ended."""
    stdout, stderr = compiling.communicate(timeout=900)
    assert compiling.returncode == 0, stdout[-4000:] + stderr[-4000:]
    rows = {}
    for line in stdout.splitlines()[1:]:
        label, _, rest = line.partition("  ")
        rows[label.strip()] = tuple(rest.split()) if "FAILED" not in rest else ("FAILED",)
    return rows


@pytest.fixture(scope="module")
def reports() -> dict[int, subprocess.Popen]:
    """The script's runs for sm_90 and sm_86, started together: each compiles one kernel
    after another on one core, and the machine has two."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernel tests compile the kernels for the real device")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = {arch: subprocess.Popen([sys.executable, "scripts/kernel_resources.py", "--arch",
                                    str(arch)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
            for arch in (90, 86)}
    yield runs
    for run in runs.values():  # a test that failed first leaves its run behind
        if run.poll() is None:
            run.kill()
            run.communicate()


@pytest.fixture(scope="module")
def report(reports) -> dict[str, tuple[str, ...]]:
    return _report(reports[90])


def test_every_kernel_compiles_for_sm90(report):
    failed = [label for label, cells in report.items() if cells[0] == "FAILED"]
    assert not failed, failed
    for kernel in ("gaussian fwd", "gaussian bwd", "attention delta", "attention forward",
                   "attention dkdv ", "attention dkdv+dq ", "attention dq", "attention decode ",
                   "attention decode-combine", "tile classifier", "head-share sum"):
        assert any(label.startswith(kernel) for label in report), (kernel, sorted(report))


def test_gaussian_kernels_do_not_spill_and_leave_room_for_warps(report):
    """About four elements a thread: at most 128 registers (16 warps per SM and more), with
    an int seed at three shapes and with a seed tensor at one."""
    rows = {label: cells for label, cells in report.items() if label.startswith("gaussian")}
    assert len(rows) == 8
    if any(cells[0] == "-" for cells in rows.values()):
        pytest.skip("no bundled ptxas could report registers here")
    for label, (registers, spills, *_) in rows.items():
        assert int(spills) == 0, (label, spills)
        assert int(registers) <= 128, (label, registers)


# Scalars, not tiles: the dk/dv kernel with 128 keys at d = 128 holds its accumulators and K
# and V in 192 of its 255 registers and spills 0-88 bytes of loop scalars (Triton 3.9 here;
# 0-12 with the GPU machine's 3.6, the most in the grouped-heads split); a spilled tile (the
# 4-warp 128-row configurations) costs hundreds to thousands of bytes.
MAX_SCALAR_SPILL_BYTES = 128


def test_bf16_attention_kernels_use_wgmma_pipelined_and_spill_no_tiles(report):
    """At d = 64 and 128 (the benchmark's head dims) every bf16 attention kernel streams its
    tiles with asynchronous copies (software pipelining: a branch in a tile loop, for one,
    would take that away), loads vectors and spills no tile data; the flash kernels multiply
    on Hopper's warpgroup MMA (the decode kernel's 16-row tiles are too short for it, and it
    is bound by memory)."""
    rows = {label: cells for label, cells in report.items()
            if label.startswith("attention") and "bf16" in label
            and not any(word in label for word in ("delta", "combine"))
            and ("d=64 " in label or "d=128 " in label)}
    assert len(rows) == 21, sorted(rows)
    for label, (registers, spills, _, wgmma, copies, narrow) in rows.items():
        assert int(copies) > 0, (label, copies)
        assert "decode" in label or int(wgmma) > 0, (label, wgmma)
        assert int(narrow) == 0, (label, narrow)
        if spills != "-":
            assert int(spills) <= MAX_SCALAR_SPILL_BYTES, (label, spills)


# The opt-in maximum of a block on sm_86 and sm_89 (RTX 30x0 / 40x0, A10, L4, L40): the least
# of the GPUs the kernels take their non-Hopper tiles on (A100: 163 KB).
SM86_SHARED_MEMORY_BYTES = 99 * 1024


def test_every_kernel_fits_the_shared_memory_of_consumer_gpus(reports):
    """Compiled for sm_86, no kernel asks for more shared memory than a block can have there:
    a launch would fail with OutOfResources. Tile choices for Hopper must not leak here."""
    report = _report(reports[86])
    failed = [label for label, cells in report.items() if cells[0] == "FAILED"]
    assert not failed, failed
    too_big = {label: int(cells[2]) for label, cells in report.items()
               if int(cells[2]) > SM86_SHARED_MEMORY_BYTES}
    assert not too_big, too_big
