"""Compile every Triton kernel for a GPU architecture on a machine without a GPU, and report
what each costs: registers per thread, bytes spilled to local memory, shared memory, and three
counts from the PTX (Hopper MMAs, asynchronous copies, unvectorised 2-byte loads).

The launches are the launchers' own: every kernel of amvl_kernels is swapped for a recorder,
the launchers run on CPU tensors of the benchmark shapes, and each recorded launch is compiled
with the JIT's own argument specialisation (a stride of 1 becomes a constant, pointers and
integers divisible by 16 carry that hint). Without that specialisation the compiler cannot
vectorise or pipeline the loads, and the registers and spills it reports describe a kernel no
GPU would run. The interpreter that the CPU tests use never compiles a kernel, so a construct
it accepts but the compiler rejects would otherwise surface only on a GPU; ``--check`` turns
any compile failure into a non-zero exit (a test runs it).

    python scripts/kernel_resources.py [--arch 90] [--check]

With the GPU machine's Triton (3.6 there, 3.9 here), in a throwaway venv, to see what its
compiler makes of the kernels before a lease (both wheels lie on our machines' disk):

    python -m venv /tmp/v36 && /tmp/v36/bin/pip install torch==2.13.0 triton==3.6.0 "numpy<2.3"
    /tmp/v36/bin/python scripts/kernel_resources.py
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amvl_kernels import gaussian_kl, latent_attention_decode, layout  # noqa: E402

# the module (the package attribute of the same name is the function)
la = importlib.import_module("amvl_kernels.latent_attention")
ARCH = 90  # the compute capability compiled for; --arch sets it


class _Recorder:
    """Stands in for a jitted kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, fn, calls: list):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


@contextlib.contextmanager
def recorded_launches():
    """Replace every kernel of amvl_kernels with a recorder for the duration; yields the list
    of (kernel, args, kwargs) the launchers issue. The tile classifier runs under the same
    recorder, so layouts on CPU tensors get tile maps of the right shapes (values unset)."""
    calls: list = []
    modules = (gaussian_kl, la, latent_attention_decode, layout)
    patched = [(module, name) for module in modules for name, value in vars(module).items()
               if isinstance(value, triton.runtime.jit.JITFunction)]
    saved = [(module, name, getattr(module, name)) for module, name in patched]
    for module, name, fn in saved:
        setattr(module, name, _Recorder(fn, calls))
    interpreted = layout.triton_interpreted
    layout.triton_interpreted = lambda: True  # let CPU layouts build (recorded) tile maps
    target = latent_attention_decode._target_programs
    # decoding slices its keys as on an H100 (132 SMs), so the merge kernel is launched too
    latent_attention_decode._target_programs = lambda device: 2 * 132
    device_arch = la._device_arch
    la._device_arch = lambda device: divmod(ARCH, 10)  # tiles chosen for the target GPU
    dkdv_target = la._dkdv_target_programs
    la._dkdv_target_programs = lambda device: 2 * 132  # grouped heads split as on an H100
    try:
        yield calls
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)
        layout.triton_interpreted = interpreted
        latent_attention_decode._target_programs = target
        la._device_arch = device_arch
        la._dkdv_target_programs = dkdv_target


def gaussian_launches(rows: int, d: int, dtype: torch.dtype, seed_tensor: bool = False
                      ) -> list:
    """The launches of one forward and one AMVL-routed backward (every input gets gradient),
    with an int seed or (``seed_tensor``) one the kernels read from memory."""
    mu_q, lv_q, mu_p, lv_p = (torch.zeros(rows, d, dtype=dtype) for _ in range(4))
    seed = torch.tensor([1234]) if seed_tensor else 1234
    with recorded_launches() as calls:
        z, kl_fwd, kl_rev = gaussian_kl._triton_forward(mu_q, lv_q, mu_p, lv_p, None, seed)
        gaussian_kl._triton_backward(mu_q, lv_q, mu_p, lv_p, None, seed, z, kl_fwd, kl_rev,
                                     "p", "q", [True] * 4)
    return calls


def attention_launches(batch: int, heads: int, length: int, head_dim: int,
                       dtype: torch.dtype, with_layout: bool, dq_atomic: bool = False,
                       kv_heads: int | None = None) -> list:
    """The launches of one forward and one backward, plain causal or with a latent block
    (tile classifier included); with ``dq_atomic``, the backward whose dk/dv kernel adds dq
    with atomics; with ``kv_heads``, grouped query heads."""
    q = torch.zeros(batch, heads, length, head_dim, dtype=dtype)
    k, v = (torch.zeros(batch, kv_heads or heads, length, head_dim, dtype=dtype)
            for _ in range(2))
    chooser = la._dq_in_dkdv
    la._dq_in_dkdv = lambda *args: dq_atomic
    try:
        with recorded_launches() as calls:
            tiles = []
            if with_layout:
                blocks = [[(length * 3 // 4, 64)]] * batch
                tiles = la._tile_tensors(layout.LatentLayout.with_latent_blocks(length, blocks),
                                         length, heads // k.shape[1], head_dim, dtype,
                                         q.device)
            out, lse = la._forward(q, k, v, tiles, 1.0 / math.sqrt(head_dim))
            la._backward(out, q, k, v, out, lse, tiles, 1.0 / math.sqrt(head_dim))
    finally:
        la._dq_in_dkdv = chooser
    return calls


def decode_launches(batch: int, heads: tuple[int, int], length: int, head_dim: int,
                    dtype: torch.dtype, with_layout: bool) -> list:
    """The launches of one decoding step's forward: one query per head over ``length`` keys,
    plain causal or with a left-padded layout (no tile map: the decode kernel needs none)."""
    q = torch.zeros(batch, heads[0], 1, head_dim, dtype=dtype)
    k, v = (torch.zeros(batch, heads[1], length, head_dim, dtype=dtype) for _ in range(2))
    with recorded_launches() as calls:
        tiles = []
        if with_layout:
            padding = torch.ones(batch, length, dtype=torch.bool)
            padding[:, :5] = False
            tiles = la._tile_tensors(layout.LatentLayout.causal(batch, length, padding), 1,
                                     heads[0] // heads[1], head_dim, dtype, q.device,
                                     backward=False)
        la._forward(q, k, v, tiles, 1.0 / math.sqrt(head_dim))
    return calls


def variants():
    """(kernel, label, args, kwargs) of the real launches at benchmark shapes: the Gaussian
    op's, attention in bf16 at d = 64, 128, 256 and in fp32 at d = 64 (and the dk/dv kernel
    that adds dq with atomics, bf16 at d = 64 and 128), and decoding."""
    for rows, d, seed_tensor in [(4096, 4096, False), (512, 3584, False), (65536, 256, False),
                                 (512, 3584, True)]:
        for fn, args, kwargs in gaussian_launches(rows, d, torch.bfloat16, seed_tensor):
            kind = "fwd" if fn is gaussian_kl._gaussian_kl_fwd_kernel else "bwd"
            label = f"gaussian {kind} {rows}x{d}" + (", seed tensor" if seed_tensor else "")
            yield fn, label, args, kwargs
    names = {la._attention_fwd: "forward", la._attention_bwd_dkdv: "dkdv",
             la._attention_bwd_dq: "dq", la._attention_bwd_delta: "delta",
             layout._classify_tiles: "tile classifier"}
    for head_dim, dtype in ((64, torch.bfloat16), (128, torch.bfloat16), (256, torch.bfloat16),
                            (64, torch.float32)):
        data = "fp32" if dtype == torch.float32 else "bf16"
        for with_layout in (False, True):
            for fn, args, kwargs in attention_launches(1, 4, 4096, head_dim, dtype, with_layout):
                name = names[fn]
                if name == "tile classifier":
                    tile = f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_N']}"
                    yield fn, f"tile classifier {tile}", args, kwargs
                    continue
                if name == "delta":
                    if not with_layout:
                        yield fn, f"attention delta d={head_dim} {data}", args, kwargs
                    continue
                tile = f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_N']}"
                yield (fn, f"attention {name} d={head_dim} {data} {tile} "
                           f"{'layout' if with_layout else 'causal'}", args, kwargs)
            if dtype != torch.bfloat16 or head_dim > 128:
                continue
            for fn, args, kwargs in attention_launches(1, 4, 4096, head_dim, dtype,
                                                       with_layout, dq_atomic=True):
                if fn is la._attention_bwd_dkdv:  # the other launches are the same as above
                    tile = f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_N']}"
                    yield (fn, f"attention dkdv+dq d={head_dim} {data} {tile} "
                               f"{'layout' if with_layout else 'causal'}", args, kwargs)
    # a tile map's lists in one launch (layout.LISTS_BY_KERNEL): 4k tokens in 64-row tiles,
    # and a map with more key tiles than query tiles (a tail over a cached prefix)
    for shape in ((4, 64, 64), (4, 2, 130)):
        with recorded_launches() as calls:
            layout._lists_by_kernel(torch.zeros(shape, dtype=torch.int8))
        for fn, args, kwargs in calls:
            yield fn, f"tile lists {shape[1]}x{shape[2]}", args, kwargs
    # GQA 4 / 1 over 4k keys: 32 dk/dv programs, below two an SM, share the query heads
    for fn, args, kwargs in attention_launches(1, 4, 4096, 128, torch.bfloat16, True,
                                               kv_heads=1):
        if fn is la._attention_bwd_dkdv:
            tile = f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_N']}"
            yield fn, f"attention dkdv d=128 bf16 {tile} layout, heads shared", args, kwargs
        elif fn is la._sum_head_shares:
            yield fn, "head-share sum d=128 bf16", args, kwargs
    for head_dim in (64, 128):  # one query per head over 4k keys, GQA 28 / 4
        for with_layout in (False, True):
            for fn, args, kwargs in decode_launches(1, (28, 4), 4096, head_dim, torch.bfloat16,
                                                    with_layout):
                if fn is latent_attention_decode._decode_combine:
                    if not with_layout:
                        yield fn, f"attention decode-combine d={head_dim} bf16", args, kwargs
                    continue
                tile = f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_N']}"
                yield (fn, f"attention decode d={head_dim} bf16 {tile} "
                           f"{'layout' if with_layout else 'causal'}", args, kwargs)


def compile_launch(fn, args: tuple, kwargs: dict, target):
    """Compile one recorded launch exactly as the JIT would on a device of ``target``: the
    same specialisation of the arguments (integers equal to 1 become constants, pointers and
    integers divisible by 16 carry that hint), the same constexprs and options."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


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


def ptx_counts(ptx: str) -> tuple[int, int, int]:
    """(Hopper wgmma instructions, asynchronous global-to-shared copies, scalar 2-byte global
    loads) in a kernel's PTX. A tensor-core kernel without wgmma on sm_90, a main loop without
    async copies (no software pipelining) or element-wise 2-byte loads (no vectorisation) are
    each a likely reason for it to be slow."""
    return (len(re.findall(r"\bwgmma\.mma_async", ptx)),
            len(re.findall(r"\bcp\.async\.(?:ca|cg)\b|\bcp\.async\.bulk\.tensor", ptx)),
            len(re.findall(r"\bld\.global(?:\.\w+)*\.b16\b", ptx)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a kernel does not compile (skips the ptxas report)")
    args = parser.parse_args()
    from triton.backends.compiler import GPUTarget

    global ARCH
    ARCH = args.arch
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    print(f"{'kernel':<52} {'regs':>5} {'spill B':>8} {'smem B':>8} {'wgmma':>6} "
          f"{'async':>6} {'ld.b16':>6}")
    for fn, label, launch_args, launch_kwargs in variants():
        try:
            compiled = compile_launch(fn, launch_args, launch_kwargs, target)
        except Exception as exc:  # noqa: BLE001 - report every kernel, then fail
            failures += 1
            print(f"{label:<52} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        registers, spills = (None, None) if args.check else ptxas_report(
            compiled.asm["ptx"], args.arch)
        counts = ptx_counts(compiled.asm["ptx"])
        print(f"{label:<52} {registers if registers is not None else '-':>5} "
              f"{spills if spills is not None else '-':>8} {compiled.metadata.shared:>8} "
              + " ".join(f"{c:>6}" for c in counts))
    return 1 if failures and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
