"""Bounded retries for the two stores a study writes to: an Optuna RDB storage and an MLflow
tracking store. A database or tracking server that restarts (an upgrade, a failover) for up to
`--store-retry-seconds` (default 120, or $MNIST_SEARCH_STORE_RETRY_SECONDS) costs no trial: each
call is tried again, with backoff, until it goes through. Past that time the call raises
StoreUnavailable, whose one-line message names the store and the fix.

Retried calls must be safe to repeat: the callers make them so (writes of the same value, MLflow
runs created under a request tag looked up before a second try, a trial state already set).
Imports nothing else of the package.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("mnist_search")
RETRY_SECONDS_ENV = "MNIST_SEARCH_STORE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0


def retry_seconds(given: float | None = None) -> float:
    """How long a store may be unreachable before its calls fail: `given` (the flag), else
    $MNIST_SEARCH_STORE_RETRY_SECONDS, else 120. ValueError for a negative or non-number."""
    value = given if given is not None else os.environ.get(RETRY_SECONDS_ENV, DEFAULT_RETRY_SECONDS)
    try:
        seconds = float(value)
    except ValueError:
        message = f"${RETRY_SECONDS_ENV} must be a number of seconds, not {value!r}"
        raise ValueError(message) from None
    if not seconds >= 0:
        raise ValueError(f"--store-retry-seconds must be 0 or more, not {value}")
    return seconds


class StoreUnavailable(RuntimeError):
    """A store did not answer for the whole retry time."""

    def __init__(self, store: str, seconds: float, error: BaseException):
        while error.__cause__ is not None:  # the driver's own words, not a wrapper's
            error = error.__cause__
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        super().__init__(
            f"the {store} did not answer for {seconds:g} s ({type(error).__name__}: {reason}); "
            f"start it again, or allow longer with --store-retry-seconds or ${RETRY_SECONDS_ENV}, "
            "and rerun: the study resumes"
        )
        self.store = store


class Retrier:
    """Calls `fn(*args)` until it returns, while `transient(error)` says its errors are the
    store being away, for at most `seconds`; counts the seconds spent in calls (`.seconds`)."""

    def __init__(self, store: str, transient: Callable[[BaseException], bool], seconds: float):
        self.store, self.transient, self.limit = store, transient, seconds
        self.seconds = 0.0  # in calls to the store, retries and waits included
        self._inside = threading.local()  # a retried call that makes another: only one retries

    def __call__(self, fn, *args, replayed: Callable[[BaseException], bool] | None = None, **kw):
        """`replayed(error)`: on a second or later try, whether `error` only says that an
        earlier try went through after all (its answer was lost): the call then returns True."""
        if getattr(self._inside, "call", False):
            return fn(*args, **kw)
        start = time.monotonic()
        delay, tries = 0.5, 0
        self._inside.call = True
        try:
            while True:
                tries += 1
                try:
                    return fn(*args, **kw)
                except Exception as e:  # noqa: BLE001 - sorted by transient() below
                    if tries > 1 and replayed is not None and replayed(e):
                        return True
                    if not self.transient(e):
                        raise
                    if time.monotonic() - start + delay > self.limit:
                        raise StoreUnavailable(self.store, self.limit, e) from e
                    if tries == 1:
                        log.warning("the %s is unreachable; retrying for up to %g s",
                                    self.store, self.limit)  # fmt: skip
                    time.sleep(delay)
                    delay = min(delay * 2, 10.0)
        finally:
            self._inside.call = False
            self.seconds += time.monotonic() - start
