"""Stop signals as exceptions, so that whatever holds an MLflow run open can end it KILLED.

Ctrl-C raises KeyboardInterrupt already; SIGTERM (`kill`, a scheduler cancelling a job or a whole
sweep) would end the process without unwinding it, leaving its run RUNNING forever. Signal
handlers belong to the process and can only be set from its main thread: elsewhere (a thread-based
launcher) these do nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

KILLED_RUN_ATTR = "killed_run_id"  # set on the KeyboardInterrupt of a run that tracked_run marked KILLED
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_replaced: dict[int, Any] = {}  # the handlers trap_stop_signals replaced: per process, like handlers


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler cancelling the job): the run ends KILLED, as on Ctrl-C."""


def interrupt(signum: int, _frame: Any = None) -> NoReturn:
    """A signal handler: SIGTERM raises Terminated, SIGINT KeyboardInterrupt (as Python's own does)."""
    if signum == signal.SIGTERM:
        raise Terminated(f"terminated by signal {signal.Signals(signum).name}")
    raise KeyboardInterrupt


def stopped(stop: KeyboardInterrupt) -> str:
    """What stopped the process, and the run it marked KILLED: none when it came before the run
    existed (or the store refused the status), so the line claims only what happened."""
    cause = "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C (SIGINT)"
    run_id = getattr(stop, KILLED_RUN_ATTR, None)
    return f"stopped by {cause}" + (f"; its MLflow run {run_id} is marked KILLED" if run_id else "")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into `Terminated` while the block runs, so the run's `finally` records it
    instead of the process dying with the run left RUNNING forever."""
    if not _main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def trap_stop_signals(noticed: Callable[[str], None]) -> None:
    """Until `release_stop_signals`, Ctrl-C and SIGTERM call `noticed(<signal name>)`, then raise as
    `interrupt` does: for what must know, once the exception has unwound the process (an atexit
    hook), that it was stopped rather than failed."""
    if not _main_thread():
        return

    def handler(signum: int, frame: Any) -> NoReturn:
        noticed(signal.Signals(signum).name)
        interrupt(signum, frame)

    for signum in STOP_SIGNALS:
        _replaced.setdefault(signum, signal.signal(signum, handler))


def release_stop_signals() -> None:
    """Put back the handlers `trap_stop_signals` replaced."""
    if not _main_thread():
        return
    while _replaced:
        signum, previous = _replaced.popitem()
        signal.signal(signum, previous)
