"""Integer arithmetic of the launchers, in plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` wrappers in recent
Triton (about 3 us a call on our CPUs); a launcher calls them a few times per launch, and a
decoding step launches per layer, so the host pays that on every token.
"""

from __future__ import annotations

MAX_GRID_Y = 65535
"""CUDA's limit on a grid's axis 1 (axis 0 takes up to 2**31 - 1)."""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative a and positive b."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
