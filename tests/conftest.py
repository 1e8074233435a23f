"""Fixtures shared by the kernel tests: the device and the backends that can run on it."""

from __future__ import annotations

import secrets

import pytest
import torch

import amvl_kernels as ak

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_backends() -> list[str]:
    """Backends of the Gaussian op that run on this machine: torch always, triton on a GPU or
    under the interpreter, cuda when the extension is built and a GPU is present."""
    backends = ["torch", "triton"]
    if DEVICE.type == "cuda" and ak.cuda_extension_available():
        backends.append("cuda")
    return backends


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def rng_seed(request: pytest.FixtureRequest) -> int:
    """A fresh seed every run, printed on failure so a failing draw can be replayed."""
    seed = secrets.randbelow(2**31 - 1)
    print(f"{request.node.name}: torch.manual_seed({seed})")
    torch.manual_seed(seed)
    return seed
