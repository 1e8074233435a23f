"""Which implementation runs an op: Triton, the CUDA extension or the PyTorch reference."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

from amvl_kernels._validation import check_choice

BACKENDS = ("auto", "triton", "cuda", "torch")


def _read_interpret_flag() -> bool:
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except ImportError:  # triton < 3.4 has no knobs
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Triton reads the flag when a kernel is decorated, i.e. when amvl_kernels is imported, so the
# value at import is the one that holds (and a constant keeps torch.compile tracing cheap).
_INTERPRETED = _read_interpret_flag()


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``.

    The variable has to be set before ``amvl_kernels`` is imported.
    """
    return _INTERPRETED


# torch.compile calls it while tracing and keeps the answer as a constant: it cannot trace the
# import and file reads inside, and would break the graph at every op asked for the CUDA
# backend. (A functools.cache wrapper would be traced through, so the cache sits beneath.)
@torch.compiler.assume_constant_result
def cuda_extension_available() -> bool:
    """True when the compiled ``amvl_kernels._C`` module imports and, in a source checkout
    (csrc/ beside the package), was built from the sources there: a module left by an
    earlier build is refused with a warning instead of run against changed sources."""
    return _load_and_check_extension()


@functools.cache
def _load_and_check_extension() -> bool:
    try:
        from amvl_kernels import _C
    except ImportError:
        return False
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    if csrc.is_dir():
        from amvl_kernels._source_hash import source_hash

        if getattr(_C, "source_hash", None) != source_hash(csrc):
            warnings.warn(f"amvl_kernels._C ({_C.__file__}) was built from other sources than "
                          f"{csrc} holds; rebuild it (pip install -e . --no-build-isolation). "
                          "backend='cuda' is unavailable until then", stacklevel=2)
            return False
    return True


cuda_extension_available.cache_clear = _load_and_check_extension.cache_clear


def resolve_backend(backend: str, device: torch.device, *, has_cuda_kernel: bool = False) -> str:
    """Turn a user's ``backend`` argument into the backend that will run on ``device``.

    ``"auto"`` picks Triton on a GPU and the PyTorch path on the CPU (the Triton
    interpreter is for tests: ask for it with ``backend="triton"``). The CUDA extension runs
    only when asked for by name.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        if device.type == "cpu" and not triton_interpreted():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before importing amvl_kernels, or use backend='torch'"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' supports cpu and cuda tensors, got {device.type}")
    if backend == "cuda":
        if not has_cuda_kernel:
            raise ValueError("this op has no CUDA-extension kernel; use 'triton' or 'torch'")
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {device.type} tensors")
        if not cuda_extension_available():
            raise RuntimeError(
                "backend='cuda' needs the compiled extension amvl_kernels._C, which is not "
                "built, or was built from other sources than csrc/ holds: (re)install with "
                "nvcc on PATH (pip install -e . --no-build-isolation), or use "
                "backend='triton'"
            )
    return backend
