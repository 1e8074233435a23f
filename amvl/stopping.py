"""Stopping a training run on a signal, with a checkpoint of the steps it trained.

A cluster ends jobs with a signal and a grace period: SLURM's ``--signal=USR1@300`` (five
minutes before the time limit), SIGTERM before the kill when a job is preempted or cancelled,
Kubernetes' SIGTERM before a pod is evicted, torchrun's SIGTERM to its processes when it is
stopped itself. Without a handler each of them ends the process at once, and the steps since
the last checkpoint are lost. :class:`StopSignals` notes the signal instead; the training loop
asks :meth:`StopSignals.agreed` at the end of each step, saves a checkpoint and raises
:class:`TrainingStopped`, and ``--resume`` continues exactly where it stopped.

With several processes, each may see the signal at another step, or alone (a signal sent to one
rank): stopping where each saw it would leave the others waiting in a collective. They agree
through an all-reduce of their notes on a gloo group of their own, started at one step's end and
read at the next one's: it never waits for the device (a GPU process group's all-reduce would),
and every process stops after the same step, one step after the first that saw the signal.
"""

from __future__ import annotations

import signal
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

# The signals a run may stop on (TrainConfig.stop_signals): those a scheduler or a user sends
# to end a job gracefully. SIGKILL and SIGSTOP cannot be caught.
CATCHABLE_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGUSR1")  # a scheduler's: preemption, a time limit


class TrainingStopped(RuntimeError):
    """The training loop stopped on a signal after ``step`` steps, saved in ``checkpoint``
    (a directory of the run's output directory): continue the run from it (``train(...,
    resume=True)``, ``amvl train --resume``, a Trainer's ``resume_from_checkpoint``).
    ``signal_name`` is the signal, e.g. "SIGTERM"."""

    def __init__(self, step: int, signal_name: str, checkpoint: Path) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}, saved in {checkpoint}")
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint


def ignore_stop_signals(names: Sequence[str]) -> None:
    """Ignore the signals ``names`` in this process: for the loop's DataLoader workers, which a
    scheduler's signal reaches too and which would otherwise die while the loop saves (they
    end with it)."""
    for name in names:
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, signal.SIG_IGN)


class StopSignals:
    """Notes the signals ``names`` while it is open (their handlers are this object's until
    :meth:`close` puts the earlier ones back) and says when the ``world`` processes of a run
    agree to stop. Build it on every process of the run at the same point: with ``world`` > 1
    it starts a gloo group (a collective call).

    A repeated signal is noted again, not obeyed: a process often gets two (a scheduler
    signals every process of a job, torchrun passes its own on). A repeated SIGINT, though,
    raises KeyboardInterrupt as Ctrl-C twice should. Signals reach only the main thread: in
    another thread none is caught, with a warning."""

    def __init__(self, names: Sequence[str], world: int = 1) -> None:
        self.received: int | None = None  # the number of the first signal noted
        self._previous: dict[int, object] = {}
        self._group = None
        self._pending = None  # (all-reduce in flight, its tensor)
        numbers = [getattr(signal, name) for name in names if hasattr(signal, name)]
        if numbers and threading.current_thread() is not threading.main_thread():
            warnings.warn(f"training outside the main thread: the stop signals {list(names)} "
                          "cannot be caught there (they end the run without a checkpoint)",
                          stacklevel=3)
            numbers = []
        if numbers and world > 1:
            import torch.distributed as dist

            try:
                self._group = dist.new_group(backend="gloo")
            except (RuntimeError, ValueError) as err:  # gloo unusable here (no interface?)
                warnings.warn(f"the processes cannot agree on a stop step without a gloo "
                              f"group ({err}): the stop signals {list(names)} end the run as "
                              "they would, without a checkpoint", stacklevel=3)
                numbers = []
        try:
            for number in numbers:
                self._previous[number] = signal.signal(number, self._note)
        except BaseException:
            self.close()
            raise

    def _note(self, number: int, frame) -> None:
        if number == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = number

    def agreed(self) -> str | None:
        """Call at the end of each step, on every process: the name of the signal on which all
        processes stop after this step, or None to go on. One process stops at the step it
        noted the signal; several at the step after the first of them noted one (they then
        all name the same signal)."""
        if self._group is None:
            return None if self.received is None else signal.Signals(self.received).name
        import torch.distributed as dist

        decided = None
        if self._pending is not None:  # the notes of the step before, reduced meanwhile
            work, notes = self._pending
            work.wait()
            decided = int(notes.item()) or None
        notes = torch.tensor([self.received or 0], dtype=torch.int64)
        self._pending = (dist.all_reduce(notes, op=dist.ReduceOp.MAX, group=self._group,
                                         async_op=True), notes)
        return None if decided is None else signal.Signals(decided).name

    def close(self) -> None:
        """Put back the handlers there were before and end the group (after the all-reduce
        still in flight, which every process started)."""
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
        if self._group is not None:
            import torch.distributed as dist

            dist.destroy_process_group(self._group)
            self._group = None
