"""Input checks shared by every op: each error names the argument it is about."""

from __future__ import annotations

import numbers
import operator
from collections.abc import Iterable

import torch


def check_float_tensor(name: str, value: object) -> torch.Tensor:
    """Return ``value`` if it is a floating-point tensor, else raise ``TypeError``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def check_like(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor,
               *, same_dtype: bool = True) -> None:
    """Require ``value`` to match ``ref`` in shape and device (and dtype unless told not to)."""
    if value.shape != ref.shape:
        raise ValueError(
            f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(value.shape)}"
        )
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}")
    if same_dtype and value.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but {ref_name} has {ref.dtype}")


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """Require ``value`` to be one of ``choices``; raise ``ValueError`` listing them otherwise."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_seed(seed: object) -> int | None:
    """A seed is None or an int in [0, 2**63)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return int(seed)


def check_count(name: str, value: object, least: int = 0) -> int:
    """A size or index: an integer of at least ``least`` (Python, NumPy or a 0-d integer
    tensor, e.g. a length from ``mask.sum(1)[b]``; not a bool). A symbolic size (torch.compile
    with dynamic shapes; Dynamo shows it as an int) stays symbolic: ``operator.index`` would
    pin the graph to its value."""
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool) \
            and torch.compiler.is_compiling():
        if value < least:  # a guard on its range, not on its value
            raise ValueError(f"{name} must be >= {least}, got {value}")
        return value
    if isinstance(value, bool) or (isinstance(value, torch.Tensor)
                                   and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an int, got a bool {value!r}")
    try:
        count = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if count < least:
        raise ValueError(f"{name} must be >= {least}, got {count}")
    return count
