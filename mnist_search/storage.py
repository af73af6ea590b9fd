"""Where Optuna keeps studies: check a `--storage` value, open it, load a study from it.

A journal file (the default; safe for workers on one machine) or an RDB URL (sqlite:///...,
postgresql://...: workers on many machines). `check_storage` finds what is wrong with a value
without creating anything, so that a bad flag leaves no file behind. Imports only `retry` and
`rdb` of the package, when it opens an RDB storage: every command that reads a study stands on
it.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_STORAGE = "optuna-journal.log"
SQLITE = "sqlite:///"


def sqlite_path(url: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URL; None for any other URL or an in-memory one."""
    if not url.startswith(SQLITE):
        return None
    path = url.removeprefix(SQLITE).split("?", 1)[0]
    return Path(path) if path not in ("", ":memory:") else None


def _check_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a {what} inside it, e.g. {path / 'study.db'}")
    if not path.resolve().parent.is_dir():
        raise ValueError(f"the {what}'s folder {path.resolve().parent} does not exist; create it")


def check_storage(url: str) -> None:
    """ValueError naming what is wrong with `url`, if anything; creates nothing. A server URL
    is checked by connecting to it (an empty database is fine: Optuna adds its tables)."""
    if not url:
        raise ValueError("the storage is empty; give a journal file path or an RDB URL")
    if "://" not in url:
        _check_file(Path(url), "journal file")
    elif url.startswith(SQLITE):
        if (path := sqlite_path(url)) is not None:  # None: a database in memory
            _check_file(path, "SQLite file")
    else:
        import sqlalchemy

        try:
            engine = sqlalchemy.create_engine(url)
            try:
                with engine.connect():
                    pass
            finally:
                engine.dispose()
        except Exception as e:  # noqa: BLE001 - SQLAlchemy and its drivers raise many kinds
            raise ValueError(f"cannot connect: {type(e).__name__}: {str(e)[:300]}") from None


HEARTBEAT = (30, 120)  # RDB storages: seconds between a trial's heartbeats, and before one
# without any is failed (the grace period)


def open_storage(url: str, retry_seconds: float | None = None):
    """An Optuna storage from an RDB URL or a journal-file path (created if need be). An RDB
    storage's calls are retried while its database is away (`rdb`), for `retry_seconds`
    (default: `retry.retry_seconds()`)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if "://" in url:  # the heartbeat fails trials of workers that died on any host
        from mnist_search.rdb import RetryingRDBStorage
        from mnist_search.retry import retry_seconds as default_retry

        interval, grace = HEARTBEAT
        with warnings.catch_warnings():  # the heartbeat is experimental since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RetryingRDBStorage(
                url, default_retry(retry_seconds), heartbeat_interval=interval, grace_period=grace
            )
    return JournalStorage(JournalFileBackend(url))


def load_existing_study(name: str, url: str):
    """A study that a former `study` command made, or ValueError naming what is missing."""
    import optuna

    try:
        check_storage(url)
    except ValueError as e:
        raise ValueError(f"cannot open --storage {url!r}: {e}") from None
    path = Path(url) if "://" not in url else sqlite_path(url)
    if path is not None and not path.exists():
        raise ValueError(
            f"no study {name!r}: --storage {url} does not exist; run the study first, or pass "
            "the --storage it used"
        )
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        raise ValueError(f"--study-name: no study {name!r} in {url}; run the study first") from None


@contextmanager
def heartbeat(storage, trial_id: int) -> Iterator[None]:
    """While the block runs, record the trial's heartbeat every interval, as Optuna's own
    `optimize` does, on a storage that keeps heartbeats (an RDB storage opened with a
    `heartbeat_interval`): once this process stops, other workers fail the trial after the
    storage's grace period. Elsewhere it does nothing."""
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    if interval is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
