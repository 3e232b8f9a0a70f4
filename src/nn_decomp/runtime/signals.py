"""Preemption: a signal stops training at the next step boundary, with a checkpoint written there.

SIGTERM (what SLURM and most schedulers send before killing a job), SIGINT (Ctrl-C) and SIGUSR2
(SLURM's `--signal` warning, submitit's default) only set a flag while `stop_requests()` is open;
the training loop reads it between steps (every rank agrees: distributed.any_rank), checkpoints each
run and raises `Preempted`. The command then marks the run "preempted", and under submitit hands the
signal to submitit's own handler, which requeues the job (train.resume=auto continues it); otherwise
it exits with one line saying how to resume. Nothing is lost beyond the step in flight.
"""
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


class Preempted(Exception):
    """Training stopped by `signum` after `step`, every run checkpointed there."""

    def __init__(self, signum: int, step: int, previous_handler=None):
        self.signum, self.step, self.previous_handler = signum, step, previous_handler
        super().__init__(f"{signal.Signals(signum).name} at step {step}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal ended

    def hand_on(self) -> None:
        """Call the handler that was installed before ours (submitit's requeue), if any: not Python's
        own SIGINT handler, whose KeyboardInterrupt would only add a traceback."""
        if callable(self.previous_handler) and self.previous_handler is not signal.default_int_handler:
            self.previous_handler(self.signum, None)


@dataclass
class StopRequest:
    """The first stop signal received (None: none yet) and the handlers ours replaced."""

    signum: int | None = None
    previous: dict = field(default_factory=dict)

    def handler(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def preempted(self, step: int) -> Preempted:
        return Preempted(self.signum, step, self.previous.get(self.signum))


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Catch the stop signals while training (main thread only: Python delivers signals there); the
    handlers before are back afterwards."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    request.previous = {s: signal.signal(s, request.handler) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        for s, previous in request.previous.items():
            signal.signal(s, previous)
