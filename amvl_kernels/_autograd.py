"""What the ops' autograd Functions share: their kernels' gradients are not differentiable
again."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable


def first_order_only(op: str, remedy: str) -> Callable:
    """Decorate an autograd Function's ``backward`` whose kernels have no derivative of their
    own: as ``once_differentiable``, and refused where autograd asks for a graph of the
    gradients (``create_graph=True``, a gradient penalty or a second-order method).
    ``once_differentiable`` alone then returns the gradients without one, and the second-order
    gradient silently lacks their terms. The error names ``op`` and the ``remedy``."""

    def decorate(backward: Callable) -> Callable:
        once = once_differentiable(backward)

        @functools.wraps(backward)
        def checked(ctx, *grads):
            if torch.is_grad_enabled():  # the engine's grad mode is create_graph
                raise RuntimeError(f"{op}: its kernels' gradients cannot be differentiated "
                                   f"again (create_graph=True); {remedy}")
            return once(ctx, *grads)
        return checked
    return decorate
