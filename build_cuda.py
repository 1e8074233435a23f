"""Build of the optional CUDA extension ``amvl_kernels._C`` (csrc/), used by setup.py and tests.

The extension is plain CUDA + pybind11 without torch headers, so nvcc does the whole job: it
compiles every csrc/*.cu and csrc/*.cpp to an object (in parallel) and links them into the
module with the CUDA runtime linked statically. No ninja, no torch.utils.cpp_extension.

Switches (environment variables, read by setup.py and here):

    AMVL_SKIP_CUDA_BUILD=1    never build the extension (setup.py)
    AMVL_FORCE_CUDA_BUILD=1   a failed build fails the install (otherwise: warning, no extension)
    AMVL_CUDA_ARCHS="80;90"   compute capabilities to compile for; default 80 and 90 plus the
                              newer 100 and 120 when the local nvcc knows them. The newest one is
                              also embedded as PTX so later GPUs can JIT it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

from setuptools import Extension
from setuptools.command.build_ext import build_ext

EXTENSION_NAME = "amvl_kernels._C"
DEFAULT_ARCHS = ("80", "90")
NEWER_ARCHS = ("100", "120")  # added to the default when the local nvcc supports them

# -O3 without --use_fast_math: fast-math swaps expf/logf for approximations that would eat the
# "2x PyTorch's error" budget of DESIGN.md section 5.
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"]


def find_nvcc() -> str | None:
    """Path of nvcc from CUDA_HOME / CUDA_PATH or PATH, or None (the same order as setup.py)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def supported_archs(nvcc: str) -> list[str]:
    """Compute capabilities nvcc can compile for, e.g. ["75", "80", ..., "120"]."""
    out = subprocess.run([nvcc, "--list-gpu-arch"], check=True, capture_output=True,
                         text=True).stdout
    return re.findall(r"compute_(\w+)", out)


def _arch_name(arch: str) -> str:
    """"90" from "9.0", "sm_90", "SM_90", "compute_90" or torch's "9.0+PTX"; "90a" from
    "sm_90a" or "9.0a"."""
    arch = arch.strip().lower().removesuffix("+ptx").replace(".", "")
    return arch.removeprefix("sm_").removeprefix("compute_")


def _arch_key(arch: str) -> tuple[int, str]:
    digits = re.match(r"\d+", arch)
    return (int(digits.group()) if digits else 0, arch)


def select_archs(nvcc: str, requested: str | None = None) -> list[str]:
    """The architectures to build: ``requested`` ("80;90", also "8.0 9.0" or "sm_90"), else
    AMVL_CUDA_ARCHS, else the default. Ones the local nvcc cannot build are dropped with a
    warning; none left is an error."""
    requested = requested if requested is not None else os.environ.get("AMVL_CUDA_ARCHS")
    supported = supported_archs(nvcc)
    if requested and requested.strip():
        wanted = [_arch_name(a) for a in re.split(r"[;,\s]+", requested.strip()) if a]
        # arch-specific targets (90a, 100f) are not listed by nvcc: their base is
        supported = supported + [a for a in wanted if a[-1:] in ("a", "f")
                                 and a[:-1] in supported]
    else:
        wanted = list(DEFAULT_ARCHS) + [a for a in NEWER_ARCHS if a in supported]
    dropped = [a for a in wanted if a not in supported]
    if dropped:
        print(f"amvl: warning: {nvcc} cannot build for {dropped}, skipping them",
              file=sys.stderr)
    archs = sorted({a for a in wanted if a in supported}, key=_arch_key)
    if not archs:
        raise RuntimeError(f"none of the CUDA architectures {wanted} is supported by {nvcc} "
                           f"(it supports {supported})")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    """SASS for every arch, plus PTX of the newest portable one (not an arch-specific 90a or
    100f, whose PTX runs on that GPU only) so that future GPUs can JIT it."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    portable = [a for a in archs if a.isdigit()]
    if not portable:
        return flags
    newest = portable[-1]
    return flags + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]


def _source_hash(csrc: Path) -> int:
    """:func:`amvl_kernels._source_hash.source_hash`, loaded by path: importing the package
    would import torch, which a build need not have."""
    path = Path(__file__).resolve().parent / "amvl_kernels" / "_source_hash.py"
    spec = importlib.util.spec_from_file_location("_amvl_source_hash", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_hash(csrc)


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"command failed ({result.returncode}): {' '.join(cmd)}\n"
                           f"{result.stdout}{result.stderr}")


def build_module(nvcc: str, sources: list[Path], output: Path, build_dir: Path,
                 archs: list[str] | None = None, defines: dict[str, int] | None = None) -> Path:
    """Compile ``sources`` (.cu and .cpp) and link the Python module ``output``.

    Objects go to ``build_dir``. ``defines`` become ``-DNAME=VALUE`` on every compile (the
    launch-shape macros of csrc/gaussian_kl.cu, for the sweep script). Returns ``output``.
    Raises RuntimeError with the compiler's messages when a step fails.
    """
    import pybind11

    archs = archs if archs is not None else select_archs(nvcc)
    build_dir.mkdir(parents=True, exist_ok=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{Path(sources[0]).parent}", f"-I{pybind11.get_include()}",
                f"-I{sysconfig.get_paths()['include']}"]
    device_flags = gencode_flags(archs) + ["--threads", "0"]
    # The sources' fingerprint, which the package checks before it runs the module.
    defines = {"AMVL_SOURCE_HASH": f"{_source_hash(Path(sources[0]).parent)}LL",
               **(defines or {})}
    jobs = []
    for src in map(Path, sources):
        obj = build_dir / (src.name + ".o")
        extra = device_flags if src.suffix == ".cu" else []
        macros = [f"-D{name}={value}" for name, value in defines.items()]
        jobs.append((obj, [nvcc, "-c", str(src), "-o", str(obj), *NVCC_FLAGS, *includes,
                           *macros, *extra]))
    # The .cu (device passes) and the pybind11 binding (host only) take similar times.
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        list(pool.map(_run, [cmd for _, cmd in jobs]))
    # Static cudart keeps the module independent of the CUDA runtime torch ships; its symbols
    # stay private so they cannot clash with torch's libcudart.
    _run([nvcc, "-shared", "-cudart", "static", "-Xlinker", "--exclude-libs,ALL",
          "-o", str(output), *[str(obj) for obj, _ in jobs]])
    return output


def import_built(path: Path, package: str) -> ModuleType:
    """Import the module ``build_module`` linked at ``path`` as ``package._C`` (its init
    symbol is PyInit__C, so the name has to end in "._C"), without installing it."""
    spec = importlib.util.spec_from_file_location(f"{package}._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_sources(root: Path, cu_sources: list[Path]) -> list[Path]:
    """The .cu files setup.py found plus the pybind11 binding(s) in csrc/*.cpp."""
    return sorted(set(map(Path, cu_sources)) | set((Path(root) / "csrc").glob("*.cpp")))


def cuda_extension_and_cmdclass(root: Path, nvcc: str, sources: list[Path], *,
                                force: bool = False) -> tuple[list[Extension], dict]:
    """(ext_modules, cmdclass) for setup(): the extension and an nvcc-driven build_ext.

    With ``force`` False a failed build prints a warning and the install goes on without the
    extension (the package falls back to Triton); with ``force`` True it fails the install.
    """
    all_sources = extension_sources(root, sources)
    # Paths relative to setup.py, as setuptools wants them in an sdist.
    rel_sources = [os.path.relpath(s, root) for s in all_sources]
    headers = [os.path.relpath(h, root) for pattern in ("*.h", "*.cuh")
               for h in sorted((Path(root) / "csrc").glob(pattern))]
    ext = Extension(EXTENSION_NAME, sources=rel_sources, depends=headers)

    class NvccBuildExt(build_ext):
        """build_ext that hands the extension to nvcc instead of the C compiler."""

        def build_extension(self, ext: Extension) -> None:
            if ext.name != EXTENSION_NAME:
                super().build_extension(ext)
                return
            output = Path(self.get_ext_fullpath(ext.name))
            start = time.monotonic()
            archs = select_archs(nvcc)
            print(f"amvl: building {ext.name} with {nvcc} for sm_{', sm_'.join(archs)}")
            build_module(nvcc, [Path(root) / s for s in ext.sources], output,
                         Path(self.build_temp) / "amvl_cuda", archs)
            print(f"amvl: built {output.name} in {time.monotonic() - start:.0f} s")

        def build_extensions(self) -> None:
            built = []
            for ext in self.extensions:
                try:
                    self.build_extension(ext)
                except Exception as err:  # noqa: BLE001 - any failure means "no extension"
                    # No module of an earlier build may stay behind as if this one had
                    # worked: in the build folder, and beside the sources when the build is
                    # for them (in place, or an editable install, which copies it there).
                    stale = {Path(self.get_ext_fullpath(ext.name))}
                    if self.inplace or getattr(self, "editable_mode", False):
                        stale.add(Path(root) / self.get_ext_filename(ext.name))
                    for path in stale:
                        path.unlink(missing_ok=True)
                    if force:
                        raise
                    print(f"amvl: warning: could not build the CUDA extension {ext.name}; "
                          f"installing without it (backend='cuda' will be unavailable, "
                          f"set AMVL_FORCE_CUDA_BUILD=1 to make this an error).\n{err}",
                          file=sys.stderr)
                    continue
                built.append(ext)
            # Later steps (the in-place copy of an editable install) only see what was built.
            self.extensions[:] = built

    return [ext], {"build_ext": NvccBuildExt}
