"""Ctrl-C and SIGTERM as a flag that the code checks where stopping is safe.

A handler that raises wherever the signal lands can cut an MLflow or database write in half (a
half-written SQLite transaction keeps the store locked for every other worker). Inside
`deferred()`, the handlers only record the signal, and `check()` raises KeyboardInterrupt at the
points the caller chose: after an epoch, between trials, between the champion's steps. A second
Ctrl-C raises at once, for a user who will not wait. A signal the process inherited as ignored
(a background job of a script ignores SIGINT) stays ignored. Outside `deferred()` nothing is
installed and `check()` does nothing.

Imports nothing of the package, so that any module can check.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # the signals caught inside deferred(), in order of arrival
_active = False


def _handle(signum: int, frame) -> None:
    if signum == signal.SIGINT and signal.SIGINT in _received:
        raise KeyboardInterrupt("second Ctrl-C")
    _received.append(signum)


def received() -> int | None:
    """The first signal caught inside `deferred()`, or None."""
    return _received[0] if _received else None


def exit_code() -> int:
    """The shell's code for the signal that stopped us: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + (received() or signal.SIGINT)


def check() -> None:
    """Raise KeyboardInterrupt if a signal has arrived; call it where stopping is safe. It raises
    again at every later check, so an interrupt that a caller swallows is not lost."""
    if _received:
        raise KeyboardInterrupt(f"{signal.Signals(_received[0]).name} received")


@contextmanager
def deferred() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM only set the flag that `check()` reads (unless they
    were ignored); on leaving it, the previous handlers are back and the flag is cleared.
    Nested blocks and blocks outside the main thread (which may not set handlers) install
    nothing."""
    global _active
    if _active or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s, handler in previous.items():
        # ignored stays ignored; None is a handler set outside Python, which we could not restore
        if handler is not signal.SIG_IGN and handler is not None:
            signal.signal(s, _handle)
    _active = True
    try:
        yield
    finally:
        for s, handler in previous.items():
            if handler is not None:
                signal.signal(s, handler)
        _active = False
        _received.clear()
