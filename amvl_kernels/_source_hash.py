"""A fingerprint of the CUDA sources, compiled into ``amvl_kernels._C``.

Standard library only: ``build_cuda`` loads this file by path while setup.py runs, before torch
may be importable. The package compares the fingerprint of the csrc/ beside it (a source
checkout, an editable install) with the one the module was built from, so a module left over
from an older build (a failed rebuild, ``AMVL_SKIP_CUDA_BUILD=1``) is never run against sources
that have changed since.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SUFFIXES = (".cu", ".cuh", ".h", ".cpp")


def source_hash(csrc: Path) -> int:
    """A 60-bit fingerprint of the names and bytes of the csrc/ sources (fits a C int64)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(csrc).iterdir() if p.suffix in SUFFIXES):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return int(digest.hexdigest()[:15], 16)
