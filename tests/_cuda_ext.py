"""The CUDA extension compiled fresh from csrc/ for the tests, once per test session.

Built with build_cuda.build_module, the code path setup.py takes, into a temporary folder and
imported from there, so the tests always see the current sources (not a stale in-place build).
One architecture only, to keep the build short: the GPU's own when there is one.
"""

from __future__ import annotations

import atexit
import shutil
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

import pytest
import torch

import build_cuda

ROOT = Path(__file__).resolve().parents[1]

_cache: dict[str, object] = {}


def nvcc_or_skip() -> str:
    nvcc = build_cuda.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH): cannot build the CUDA "
                    "extension")
    return nvcc


def _build() -> ModuleType:
    nvcc = nvcc_or_skip()
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}{minor}"
    else:
        arch = build_cuda.DEFAULT_ARCHS[0]
    folder = Path(tempfile.mkdtemp(prefix="amvl_cuda_test_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    sources = build_cuda.extension_sources(ROOT, sorted((ROOT / "csrc").glob("*.cu")))
    output = folder / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    path = build_cuda.build_module(nvcc, sources, output, folder / "obj",
                                   build_cuda.select_archs(nvcc, arch))
    return build_cuda.import_built(path, "amvl_cuda_test_build")


def built_extension() -> ModuleType:
    """The freshly built ``_C`` module; a build failure fails every test that asks (once)."""
    if "module" not in _cache and "error" not in _cache:
        try:
            _cache["module"] = _build()
        except pytest.skip.Exception:
            raise
        except Exception as err:  # noqa: BLE001 - remembered, re-raised below
            _cache["error"] = err
    if "error" in _cache:
        raise RuntimeError("building the CUDA extension failed") from _cache["error"]
    return _cache["module"]  # type: ignore[return-value]
