"""Ctrl-C and SIGTERM: a flag set by the handler, raised at the next check, never lost.

Real signals, sent to this process with `signal.raise_signal` (delivered before it returns).
Each test first installs harmless recording handlers, so that a broken `deferred()` cannot stop
the test session, and so that the test sees which handlers are back afterwards.
"""

import signal
import threading

import pytest

from mnist_search import interrupts


@pytest.fixture
def recorded():
    """SIGINT and SIGTERM go to a list while the test runs; the suite's handlers come back."""
    calls = []
    before = {s: signal.getsignal(s) for s in interrupts.SIGNALS}

    def record(signum, frame):
        calls.append(signum)

    for s in interrupts.SIGNALS:
        signal.signal(s, record)
    yield calls, record
    for s, handler in before.items():
        signal.signal(s, handler)


def test_a_signal_only_sets_the_flag_and_the_next_check_raises(recorded):
    calls, record = recorded
    with interrupts.deferred():
        interrupts.check()  # nothing yet
        signal.raise_signal(signal.SIGTERM)  # would raise here if the handler did
        assert interrupts.received() == signal.SIGTERM
        assert interrupts.exit_code() == 143
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            interrupts.check()
        with pytest.raises(KeyboardInterrupt):  # still set: a swallowed interrupt is not lost
            interrupts.check()
    assert calls == []  # the handler of the block got it, not the one before
    assert interrupts.received() is None
    interrupts.check()  # cleared on leaving the block
    assert all(signal.getsignal(s) is record for s in interrupts.SIGNALS)  # handlers restored


def test_a_second_ctrl_c_stops_at_once(recorded):
    with interrupts.deferred():
        signal.raise_signal(signal.SIGTERM)  # e.g. the first worker terminating its children
        signal.raise_signal(signal.SIGINT)  # the first Ctrl-C: a flag only
        assert interrupts.exit_code() == 143  # the first signal decides
        with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
            signal.raise_signal(signal.SIGINT)
    with interrupts.deferred():
        signal.raise_signal(signal.SIGINT)
        assert interrupts.exit_code() == 130


def test_an_ignored_signal_stays_ignored(recorded):
    """A background job of a script inherits SIGINT ignored: Ctrl-C is not meant for it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with interrupts.deferred():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.raise_signal(signal.SIGINT)
        assert interrupts.received() is None
        interrupts.check()
        signal.raise_signal(signal.SIGTERM)  # SIGTERM was not ignored: it still stops us
        assert interrupts.received() == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_nested_blocks_and_other_threads_install_nothing(recorded):
    calls, record = recorded
    with interrupts.deferred():
        handler = signal.getsignal(signal.SIGINT)
        with interrupts.deferred():  # a library call inside a command that already defers
            assert signal.getsignal(signal.SIGINT) is handler
        signal.raise_signal(signal.SIGINT)
        with interrupts.deferred():
            pass
        assert interrupts.received() == signal.SIGINT  # the inner block cleared nothing
        assert signal.getsignal(signal.SIGINT) is handler

    seen = []

    def in_a_thread():
        with interrupts.deferred():  # signal.signal would raise ValueError here
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == [record]
