"""Optuna's RDB storage (PostgreSQL, MySQL, SQLite), with every call retried while the database
is away: a restart of the server for up to the retry time costs no trial (see `retry`).

Optuna's own RDBStorage raises StorageInternalError on the first write that fails, and the trial
whose epoch it was reporting is lost with it. Here each public call is tried again, with
backoff; a database that stays away past the retry time raises StoreUnavailable. Repeating a
call is safe: Optuna's writes set values (a param, an attribute, an epoch's value) that a second
try sets again, and a trial state that a lost answer had already set is taken as set. Creating
a trial is the one call a lost answer could double (an extra RUNNING trial, which the heartbeat
then fails): that needs the answer lost after the commit, which a restart between transactions
does not do.
"""

from __future__ import annotations

import random
import time

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage

from mnist_search.retry import Retrier

# BaseStorage's and the heartbeat's public calls (Optuna 4-5), each retried as a whole
CALLS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_all_studies", "create_new_trial",
    "set_trial_param", "get_trial_param", "set_trial_intermediate_value", "set_trial_user_attr",
    "set_trial_system_attr", "get_trial_id_from_study_id_trial_number", "get_trial",
    "get_all_trials", "get_best_trial", "get_trial_user_attrs", "get_trial_system_attrs",
    "record_heartbeat", "_get_stale_trial_ids",
    # and the private ones Optuna's cache in front of it calls
    "_create_new_trial", "_get_best_trial_id", "_get_trials", "_set_trial_param",
)  # fmt: skip
DISCONNECTS = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)


def creating_together(error: BaseException) -> bool:
    """Another worker creating the schema at the same instant (workers started together on a new
    database): Optuna's CREATE of a type or table, or its stamp of the schema's version, that
    the other's has just made. A second try finds it and goes on."""
    schema = (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)
    signs = ("already exists", "duplicate key value")
    return isinstance(error, schema) and any(sign in str(error) for sign in signs)


def database_away(error: BaseException) -> bool:
    """A lost or refused connection (a restart, a failover), not a bad request."""
    while error is not None:
        if isinstance(error, DISCONNECTS) or getattr(error, "connection_invalidated", False):
            return True
        error = error.__cause__
    return False


class RetryingRDBStorage(RDBStorage):
    """An RDBStorage whose calls are retried for `retry_seconds` while the database is away;
    `retrier.seconds` is the time spent in its calls. Optuna still wraps it in its cache."""

    def __init__(self, url: str, retry_seconds: float, **kwargs):
        self.retrier = Retrier("Optuna storage (database)", database_away, retry_seconds)
        kwargs.setdefault("engine_kwargs", {"pool_pre_ping": True})  # drop dead connections
        for attempt in range(1, 11):
            try:  # connects (retried while away), creates the schema if need be
                return self.retrier(super().__init__, url, **kwargs)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
                if not creating_together(e) or attempt == 10:
                    raise
                time.sleep(random.uniform(0.1, 0.5))  # apart from the others doing the same

    def set_trial_state_values(self, trial_id, state, values=None):
        def already_set(error: BaseException) -> bool:  # a lost answer, not another worker
            if not isinstance(error, optuna.exceptions.UpdateFinishedTrialError):
                return False
            stored = super(RetryingRDBStorage, self).get_trial(trial_id)
            return stored.state == state and (values is None or stored.values == list(values))

        call = super().set_trial_state_values
        return self.retrier(call, trial_id, state, values, replayed=already_set)


def _retried(name: str):
    def call(self, *args, **kwargs):
        return self.retrier(getattr(RDBStorage, name).__get__(self), *args, **kwargs)

    call.__name__ = name
    call.__doc__ = getattr(RDBStorage, name).__doc__
    return call


for _name in CALLS:
    setattr(RetryingRDBStorage, _name, _retried(_name))
