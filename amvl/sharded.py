"""Models whose parameters are sharded across processes (DeepSpeed ZeRO-3, FSDP).

Every forward pass of such a model gathers each layer's parameters from all processes, so all
of them must run the same passes: a process whose rows have all ended keeps decoding (its rows
padded) until every process's have, as transformers' ``generate`` does with ``synced_gpus``.
Under FSDP2 the parameters of the root unit (the heads, the injector, the slot embeddings and
whatever of the base no layer unit holds) are gathered only by the root's own forward, which
``generate``, ``heads`` and ``answer_nll`` do not call: :func:`gathered_root` gathers them
around those.

A base model built under ZeRO-3 (transformers' ``from_pretrained`` with a ZeRO-3 Trainer
configuration alive) holds one partition of each parameter on a rank, an empty tensor outside
the forward of its module: writing rows of the embeddings (the latent special tokens') must
gather them first (:func:`gathered_for_update`). Scoring multiple-choice examples runs one
pass per choice: :func:`choices_to_score` makes every process run as many.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn


def sharded_across_processes(model: nn.Module) -> bool:
    """True when ``model``'s forward passes gather parameters from other processes: DeepSpeed
    ZeRO-3 (partitioned parameters carry ``ds_id``) or FSDP (1 or 2) units inside it, in a
    process group of more than one process."""
    if not several_processes():
        return False
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return True
    fsdp_types = _fsdp_types()
    return bool(fsdp_types) and any(isinstance(m, fsdp_types) for m in model.modules())


def several_processes() -> bool:
    """A process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_processes(flags: Tensor) -> Tensor:
    """Where ``flags`` (bool) are true on every process: their minimum over the processes,
    element by element, on every one (one collective)."""
    values = flags.to(torch.int32)
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values.bool()


@contextlib.contextmanager
def gathered_root(model: nn.Module) -> Iterator[None]:
    """The parameters of an FSDP2 root unit gathered for the block (resharded after it);
    nothing for any other model."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        FSDPModule = ()  # noqa: N806
    if not isinstance(model, FSDPModule):
        yield
        return
    # The root's first forward sets up its state (which unshard() does not); a layer unit
    # whose forward ran before would take itself for the root, and the next training forward
    # through the real root fails ("FSDP requires running forward through the root module
    # first"). Private torch API, guarded: without it only a pass before training suffers.
    lazy_init = getattr(getattr(model, "_get_fsdp_state", lambda: None)(), "_lazy_init", None)
    if lazy_init is not None:
        lazy_init()
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def choices_to_score(model: nn.Module, n_examples: int, batch_size: int,
                     n_choices: int) -> tuple[bool, int]:
    """(sharded, choices) for scoring multiple-choice examples one pass per choice. On a model
    sharded across processes every process must run the same passes: the examples and batch
    sizes must be alike on every process (ValueError otherwise), each scores the most choices
    any process has, and a row past its last choice scores a stand-in (its last choice),
    which the caller drops. Elsewhere: (False, ``n_choices``)."""
    if not sharded_across_processes(model):
        return False, n_choices
    device = next(model.parameters()).device
    counts = torch.tensor([n_examples, -n_examples, batch_size, -batch_size, n_choices],
                          device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    most, fewest, largest, smallest, choices = counts.tolist()
    if (most, largest) != (-fewest, -smallest):
        raise ValueError(f"the processes score {-fewest} to {most} examples in batches of "
                         f"{-smallest} to {largest}: on a model sharded across processes every "
                         "process must run the same passes, so give each as many examples "
                         "with the same batch_size")
    return True, choices


def with_choice(example: dict, c: int) -> dict:
    """``example`` answered with its choice ``c``, or with its last choice past its last (the
    stand-in of :func:`choices_to_score`)."""
    return dict(example, answer=example["choices"][min(c, len(example["choices"]) - 1)])


_Method = TypeVar("_Method", bound=Callable)


def with_gathered_root(method: _Method) -> _Method:
    """Decorator for a model method that runs passes outside ``forward``: it runs inside
    :func:`gathered_root`."""
    @functools.wraps(method)
    def wrapper(model, *args, **kwargs):
        with gathered_root(model):
            return method(model, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def gathered_for_update(params: list[nn.Parameter]) -> Iterator[None]:
    """``params`` whole for the block, where some are DeepSpeed ZeRO-3 partitions; what rank 0
    writes into them is every rank's afterwards. Nothing for parameters that are whole."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        yield


@contextlib.contextmanager
def gathered_for_reading(params: list[nn.Parameter]) -> Iterator[None]:
    """``params`` whole on every process for the block, where some are DeepSpeed ZeRO-3
    partitions (every process must enter it: the gather is collective); nothing for
    parameters that are whole. Writes into them are not kept."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        yield


def _fsdp_types() -> tuple[type, ...]:
    types: list[type] = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        types.append(FullyShardedDataParallel)
        from torch.distributed.fsdp import FSDPModule
        types.append(FSDPModule)
    except ImportError:
        pass
    return tuple(types)
