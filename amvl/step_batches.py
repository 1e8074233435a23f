"""The batches of the training loop's steps: which examples a step gives each process, and
their micro-batches, built in the loop or ahead of it in DataLoader worker processes.

Building a batch is host work (tokenizing, decoding images, the image processor) that the
device otherwise waits for at every step. With ``TrainConfig.num_workers`` > 0 the workers
build the next steps' batches while the device trains on this one, into pinned memory when
the device is a GPU, so the copy to the device need not wait either. The batches are the same
either way: a step's examples are a function of (seed, step) alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from amvl.stopping import ignore_stop_signals

Batch = dict[str, Tensor]


def batch_indices(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of optimisation step ``step``: consecutive slices of one fixed
    permutation per epoch, so the order depends only on (seed, step)."""
    out: list[int] = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, n_examples)
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch))
        take = min(batch_size - len(out), n_examples - offset)
        out += order[offset:offset + take].tolist()
        position += take
    return out


class StepBatches(torch.utils.data.Dataset):
    """Steps ``start`` .. ``steps - 1`` as seen by process ``rank`` of ``world``: item ``i``
    is step ``start + i``'s micro-batches (``batch_size / world / micro_size`` of them), each
    built by ``collator`` from ``micro_size`` consecutive examples of the process's share."""

    def __init__(self, examples: Sequence[dict], collator: Callable[[list[dict]], Batch], *,
                 start: int, steps: int, batch_size: int, seed: int, rank: int, world: int,
                 micro_size: int) -> None:
        self.examples, self.collator = examples, collator
        self.start, self.steps = start, steps
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.per_rank = rank, batch_size // world
        self.micro_size = micro_size

    def __len__(self) -> int:
        return self.steps - self.start

    def share(self, step: int) -> list[dict]:
        """This process's examples of step ``step``."""
        indices = batch_indices(len(self.examples), self.batch_size, step, self.seed)
        own = indices[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        return [self.examples[i] for i in own]

    def micro_batch(self, share: list[dict], index: int) -> Batch:
        """Micro-batch ``index`` of a step's ``share``."""
        return self.collator(share[index * self.micro_size:(index + 1) * self.micro_size])

    def build(self, share: list[dict]) -> list[Batch]:
        """Every micro-batch of a step's ``share``, in order."""
        return [self.micro_batch(share, i) for i in range(len(share) // self.micro_size)]

    def __getitem__(self, index: int) -> list[Batch]:
        if not 0 <= index < len(self):
            raise IndexError(f"step {self.start + index} is outside steps {self.start} .. "
                             f"{self.steps - 1}")
        return self.build(self.share(self.start + index))


def stop_workers(iterator: object) -> None:
    """Stop the worker processes of a DataLoader iterator now; nothing for other iterators.
    A loop that raised is kept alive by its traceback (the loader's own frames among them),
    and with it the workers and what they built ahead (pinned memory on a GPU). (A private
    method of torch's loader iterator, there since torch 1.x.)"""
    getattr(iterator, "_shutdown_workers", lambda: None)()


def prefetching_loader(steps: StepBatches, num_workers: int, pin_memory: bool, seed: int,
                       ignore_signals: Sequence[str] = ()) -> torch.utils.data.DataLoader:
    """A loader of ``steps`` in order, each built in one of ``num_workers`` processes, up to
    two steps a worker ahead of the loop. The workers ignore the signals ``ignore_signals``
    (the loop's stop signals, on which it saves before it stops them).

    The workers' seeds come from a generator of ``seed``: drawn from torch's global one, they
    would move the main process's random state (dropout's), so a run would differ with and
    without workers, and a resumed run from an uninterrupted one."""
    return torch.utils.data.DataLoader(
        steps, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=partial(_ignore_in_worker, tuple(ignore_signals)))


def _ignore_in_worker(names: tuple[str, ...], worker_id: int) -> None:
    ignore_stop_signals(names)
