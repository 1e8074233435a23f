"""Compile every Triton kernel for a GPU architecture on a machine without a GPU, and report
what each costs: registers per thread, bytes spilled to local memory, shared memory.

The configurations are the launchers' own defaults (``_tile_config``, ``_block_sizes``), so this
is what a GPU would run. The interpreter that the CPU tests use never compiles a kernel, so a
construct it accepts but the compiler rejects would otherwise surface only on a GPU; ``--check``
turns any compile failure into a non-zero exit (a test runs it). Spills inside a kernel's main
loop are a usual cause of a slow kernel, and this finds them without a GPU.

    python scripts/kernel_resources.py [--arch 90] [--check]
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Compiling needs the real JIT, not the interpreter; triton reads the flag at import.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amvl_kernels import gaussian_kl, layout  # noqa: E402

# the module (the package attribute of the same name is the function)
la = importlib.import_module("amvl_kernels.latent_attention")

BF16_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
FP32_POINTERS = {"LSE", "DELTA", "kl_fwd_ptr", "kl_rev_ptr", "dkl_fwd_ptr", "dkl_rev_ptr"}
INT_POINTERS = {"KIND", "VIS", "BLK", "DOC", "ROW_FULL", "ROW_FULL_COUNT", "ROW_PARTIAL",
                "ROW_PARTIAL_COUNT", "COL_FULL", "COL_FULL_COUNT", "COL_PARTIAL",
                "COL_PARTIAL_COUNT"}


def signature(fn, constexprs: dict, data: str = "bf16") -> dict[str, str]:
    """Triton types of a kernel's arguments, from the naming conventions of amvl_kernels;
    ``data`` is the element type of the data tensors (q, k, v, mu, ...)."""
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in BF16_POINTERS or (name.endswith("_ptr") and name not in FP32_POINTERS):
            types[name] = f"*{data}"
        elif name in FP32_POINTERS:
            types[name] = "*fp32"
        elif name in INT_POINTERS:
            types[name] = "*i32"
        elif name == "CLASSES":
            types[name] = "*i8"
        elif name == "seed":
            types[name] = "i64"
        elif name in ("scale", "scale_log2"):
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


def variants():
    """(kernel, label, constexprs, num_warps, num_stages, data type) at the launchers'
    defaults: bf16 throughout, plus the attention kernels' fp32 (IEEE) and d=256 paths."""
    for rows, d in [(4096, 4096), (512, 3584), (65536, 256)]:
        block_r, block_d, warps = gaussian_kl._block_sizes(rows, d)
        common = dict(ACC=tl.float32, BLOCK_R=block_r, BLOCK_D=block_d)
        yield (gaussian_kl._gaussian_kl_fwd_kernel, f"gaussian fwd {rows}x{d}",
               dict(HAS_EPS=False, WITH_KL=True, **common), warps, 3, "bf16")
        yield (gaussian_kl._gaussian_kl_bwd_kernel, f"gaussian bwd {rows}x{d}",
               dict(HAS_EPS=False, HAS_DZ=True, HAS_DKL_FWD=True, HAS_DKL_REV=True,
                    NEED_MU_Q=True, NEED_LV_Q=True, NEED_MU_P=True, NEED_LV_P=True,
                    FWD_TO_Q=False, FWD_TO_P=True, REV_TO_Q=True, REV_TO_P=False, **common),
               warps, 3, "bf16")
    kernels = {"forward": la._attention_fwd, "dkdv": la._attention_bwd_dkdv,
               "dq": la._attention_bwd_dq}
    for head_dim, dtype in ((64, torch.bfloat16), (128, torch.bfloat16), (256, torch.bfloat16),
                            (64, torch.float32)):
        data = "fp32" if dtype == torch.float32 else "bf16"
        block_d = la._block_d(head_dim)
        yield (la._attention_bwd_delta, f"attention delta d={head_dim} {data}",
               dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=16), 4, 3, data)
        for name, fn in kernels.items():
            bm, bn, warps, stages = la._tile_config(head_dim, dtype, name)
            for has_layout in (False, True):
                yield (fn, f"attention {name} d={head_dim} {data} {bm}x{bn} "
                           f"{'layout' if has_layout else 'causal'}",
                       dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn,
                            HAS_LAYOUT=has_layout, UPCAST=False, IEEE=dtype == torch.float32),
                       warps, stages, data)
            yield (layout._classify_tiles, f"tile classifier {bm}x{bn}",
                   dict(BLOCK_M=bm, BLOCK_N=bn), 4, 3, "bf16")


def ptxas_report(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers, spill-store bytes) from the newest bundled ptxas that reads this PTX."""
    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        for tool in sorted(folder.glob("ptxas*"), reverse=True):
            done = subprocess.run([str(tool), "-v", f"-arch=sm_{arch}a" if arch >= 90
                                   else f"-arch=sm_{arch}", str(source), "-o",
                                   str(Path(tmp) / "kernel.cubin")],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                text = done.stdout + done.stderr
                registers = re.search(r"Used (\d+) registers", text)
                spills = re.search(r"(\d+) bytes spill stores", text)
                return (int(registers.group(1)) if registers else None,
                        int(spills.group(1)) if spills else 0)
    return None, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a kernel does not compile (skips the ptxas report)")
    args = parser.parse_args()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    print(f"{'kernel':<52} {'regs':>5} {'spill B':>8} {'smem B':>8}")
    for fn, label, constexprs, warps, stages, data in variants():
        try:
            source = ASTSource(fn=fn, signature=signature(fn, constexprs, data),
                               constexprs=constexprs)
            compiled = triton.compile(source, target=target,
                                      options={"num_warps": warps, "num_stages": stages})
        except Exception as exc:  # noqa: BLE001 - report every kernel, then fail
            failures += 1
            print(f"{label:<52} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        registers, spills = (None, None) if args.check else ptxas_report(
            compiled.asm["ptx"], args.arch)
        print(f"{label:<52} {registers if registers is not None else '-':>5} "
              f"{spills if spills is not None else '-':>8} {compiled.metadata.shared:>8}")
    return 1 if failures and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
