"""Repository-wide pytest setup.

Without a GPU, Triton kernels run on the CPU through the interpreter. Triton reads
TRITON_INTERPRET when a kernel is decorated, so it is set here, before any test module imports
amvl_kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmarks in benchmarks/ (skipped otherwise)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmarks run only with `pytest benchmarks/ --benchmark`")
    for item in items:
        if "benchmarks" in item.path.parts:
            item.add_marker(skip)
