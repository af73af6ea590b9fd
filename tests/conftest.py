"""Shared fixtures: tiny synthetic MNIST in torchvision's layout, the real one (cached), and a
throw-away PostgreSQL cluster."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from mnist_search import data as mdata
from mnist_search import fetch
from mnist_search.space import suggest_config

REPO = Path(__file__).resolve().parents[1]


def synthetic_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable fake digits: class c lights up a 4-pixel-high band at row 2 + 2c, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.randint(0, 60, (n, 28, 28), generator=g)
    for c in range(10):
        images[labels == c, 2 + 2 * c : 6 + 2 * c, 4:24] += 180
    return images.clamp(0, 255).to(torch.uint8), labels


def write_synthetic_mnist(data_dir: Path) -> dict[str, str]:
    """600 train / 200 test fake images in torchvision's layout; returns their digests."""
    raw = fetch.raw_dir(data_dir)
    raw.mkdir(parents=True)
    for prefix, n, seed in (("train", 600, 0), ("t10k", 200, 1)):
        images, labels = synthetic_images(n, seed)
        fetch.write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        fetch.write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return {name: fetch.sha256_file(raw / name) for name in fetch.OFFICIAL_SHA256}


def use_synthetic_mnist(monkeypatch, data_dir: Path) -> Path:
    """Let the synthetic files' digests stand in for the official ones, so the real
    verification and torchvision loading paths run on them."""
    monkeypatch.setattr(fetch, "OFFICIAL_SHA256", write_synthetic_mnist(data_dir))
    monkeypatch.setattr(mdata, "VAL_SIZE", 100)
    return data_dir


@pytest.fixture
def synthetic_mnist(tmp_path, monkeypatch) -> Path:
    return use_synthetic_mnist(monkeypatch, tmp_path / "data")


@pytest.fixture(scope="session")
def real_mnist() -> Path:
    """The real MNIST through the real fetch path, cached in ./data between runs."""
    data_dir = REPO / "data"
    fetch.ensure_mnist(data_dir)
    return data_dir


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking_uri():
    """CLIs called in-process may `mlflow.set_tracking_uri`: undo it after every test."""
    from mlflow.tracking._tracking_service import utils

    saved = utils._tracking_uri
    yield
    utils._tracking_uri = saved


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in tmp_path with MLflow pointed at a store inside it, so no test touches ./mlruns."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, server, seconds: float, log) -> None:
    """Poll `url` until it answers; fail with `log()` if `server` exits or time runs out."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()  # first, so that reading its log cannot block
                server.wait()
                pytest.fail(f"server did not start: {log()[-3000:]}")
            time.sleep(0.5)


PG_BIN = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)), None)


def as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to its own user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres(tmp_path):
    """A throw-away cluster on 127.0.0.1 with databases `optuna` and `mlflow`; yields its URL."""
    if PG_BIN is None:
        pytest.skip("PostgreSQL server binaries not found: apt-get install postgresql")
    pytest.importorskip("psycopg", reason="pip install -e '.[postgres]'")
    root = Path(tempfile.mkdtemp(prefix="mnist-search-pg-"))  # outside pytest's 0700 folders
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
    data, port = root / "data", free_port()
    run = lambda cmd: subprocess.run(as_postgres(cmd), check=True, capture_output=True)  # noqa: E731
    run([f"{PG_BIN}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"])
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200"
    run(
        [f"{PG_BIN}/pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"]
    )
    try:
        for db in ("optuna", "mlflow"):
            run([f"{PG_BIN}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db])
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            as_postgres([f"{PG_BIN}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"])
        )
        shutil.rmtree(root, ignore_errors=True)


def assert_parent_series(client, study, parent_id: str) -> None:
    """The parent run's series, as `get_metric_history` (and the UI's charts) show it: exactly
    one point per finished trial (step = its number); `best_val_accuracy` is what Optuna itself
    calls the best value of the trials numbered up to it, and never decreases."""
    import optuna

    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    expected_best = []
    for t in finished:
        so_far = optuna.create_study(direction="maximize")  # Optuna's own best_value, in memory
        so_far.add_trials([u for u in study.trials if u.number <= t.number])
        if any(u.state.name == "COMPLETE" for u in so_far.trials):  # else it has no best
            expected_best.append((t.number, so_far.best_value))
    best = client.get_metric_history(parent_id, "best_val_accuracy")
    assert sorted((m.step, m.value) for m in best) == expected_best
    assert [m.value for m in sorted(best, key=lambda m: m.step)] == sorted(
        v for _, v in expected_best
    )
    expected_trial = [
        (t.number, t.value if t.state.name == "COMPLETE" else max(t.intermediate_values.values()))
        for t in finished
    ]
    trial = client.get_metric_history(parent_id, "trial_val_accuracy")
    assert sorted((m.step, m.value) for m in trial) == expected_trial


def add_earlier_cnn_trial(study) -> None:
    """Make `study` a CNN study holding one completed trial as the CNN space sampled it until
    commit 2378146, with a `schedule` param the space no longer samples."""
    study.set_user_attr("space", "cnn")
    trial = study.ask()
    suggest_config(trial, epochs=1, seed=0, space="cnn")
    trial.suggest_categorical("schedule", ["constant", "cosine"])
    study.tell(trial, 0.5)
