"""DataLoader workers that outlive a SIGTERM, SIGUSR1 or Ctrl-C meant for the whole job.

SLURM (time limit, preemption, `scancel`) signals every process of a job step, and `kill -TERM -PGID` a whole
process group: the DataLoader workers get SIGTERM together with the training process. A worker that dies of it
makes PyTorch raise "DataLoader worker ... is killed by signal: Terminated" in the training process at whatever
line it runs (mid-backward), so the run could not stop at the end of its step and save it
(`simmim.train.trainer.SignalCheckpoint`). With `worker_init_fn=stop_signal_shield()`, only the SIGTERM of the
process that owns the DataLoader (its shutdown of a stuck worker) ends a worker, as PyTorch's own worker handler
does; anyone else's is ignored, and the worker serves batches until the training process has stopped and shuts it
down. If that process dies instead, the worker ends by itself as before (PyTorch watches the parent). Ctrl-C in a
terminal sends SIGINT to every process of the foreground group, workers included, and SLURM's `--signal=USR1@...`
(its requeue signal in Lightning's convention) reaches every process of the job step; a worker ignores both (it
would end, and the next batch would fail), and the training process decides what they mean.

The shield blocks SIGTERM in the worker's thread and waits for it in a thread of its own, which sees the sender. A
worker started by fork (Linux's default up to Python 3.13) has one thread at `worker_init_fn`, and every later
thread inherits the block; one started by spawn or forkserver (macOS; Linux from Python 3.14) already has a second
thread there, which can take the signal, so it may still die of it as before. `ShieldedDataLoader` forks its
workers with the three signals blocked, so one that comes before `worker_init_fn` waits for the shield instead of
ending the worker (a SIGTERM to the process group just as the workers of an epoch start killed one).
"""
from __future__ import annotations

import os
import signal
import threading
from functools import partial
from typing import Callable

from torch.utils.data import DataLoader

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}


class ShieldedDataLoader(DataLoader):
    """A DataLoader whose workers run `stop_signal_shield`, started with `STOP_SIGNALS` blocked (in the thread that
    starts them, whose mask forked workers inherit; a signal to the training process meanwhile waits until they
    have started)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, worker_init_fn=stop_signal_shield(), **kwargs)

    def _get_iterator(self):
        if self.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
            return super()._get_iterator()
        before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


def stop_signal_shield() -> Callable[[int], None]:
    """The `worker_init_fn` of a DataLoader made in this process: `ignore_outside_stop_signals` owned by it."""
    return partial(ignore_outside_stop_signals, owner=os.getpid())


def ignore_outside_stop_signals(worker_id: int, owner: int) -> None:
    """`worker_init_fn`: SIGINT and SIGUSR1 are ignored; SIGTERM from `owner` (the pid that made the DataLoader) or
    from the parent (the same process, unless workers start from a fork server) ends this worker with status 0, from
    anyone else it is ignored. Without `signal.sigwaitinfo` (macOS) the worker keeps PyTorch's handling of SIGTERM."""
    for ignored in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(ignored, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # (blocked by a ShieldedDataLoader's start)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the mask
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGUSR1})  # ignored: one pending is dropped
    threading.Thread(target=_exit_on_sigterm_from, args=({owner, os.getppid()},), name="sigterm",
                     daemon=True).start()


def _exit_on_sigterm_from(senders: set[int]) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid not in senders:
        pass
    os._exit(0)
