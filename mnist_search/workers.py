"""Worker processes on this machine: start them, wait for them, stop them, and free the places
of trials whose worker died."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import optuna
from optuna.trial import TrialState

from mnist_search import interrupts

DIED = "process died"  # the fail_reason of a trial whose worker process is gone


def spawn(command: list[str], workers: int) -> list[subprocess.Popen]:
    """Start workers 1..N-1, each running `command` plus its `--worker-id`."""
    return [subprocess.Popen([*command, "--worker-id", str(i)]) for i in range(1, workers)]


def wait(children: list[subprocess.Popen]) -> list[int]:
    """The worker processes' exit codes, once all have ended; a Ctrl-C meanwhile stops us."""
    while any(child.poll() is None for child in children):
        interrupts.check()
        time.sleep(0.2)
    return [child.returncode for child in children]


def stop(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()  # SIGTERM: each ends its trial as interrupted
    for child in children:
        child.wait()


def fail_dead_trials(study: optuna.Study, storage, tracker) -> list[int]:
    """Mark FAIL every RUNNING trial whose process (on this host) is gone, e.g. after kill -9,
    and close the MLflow runs of trials that are not running. Returns the trials it failed.
    (On an RDB storage, Optuna's heartbeat also catches dead workers on other hosts.)"""
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = t.user_attrs.get("host"), t.user_attrs.get("pid")
        if host == socket.gethostname() and pid is not None and not _alive(pid):
            try:
                storage.set_trial_user_attr(t._trial_id, "fail_reason", DIED)
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker failed it first
            failed.append(t.number)
    trials = study.get_trials(deepcopy=False)
    running = {t.number for t in trials if t.state == TrialState.RUNNING}
    died = {t.number for t in trials if t.user_attrs.get("fail_reason") == DIED}
    tracker.close_orphans(running.__contains__, died.__contains__)
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed worker stays a zombie until its parent reaps it: dead all the same
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (not Linux): trust kill(pid, 0)
        return True
