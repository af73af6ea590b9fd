"""Fixtures: tiny synthetic MNIST in torchvision's layout, the real one (cached), a folder with its
own MLflow store, and a throw-away PostgreSQL cluster. Plain helpers live in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnist_search import fetch
from tests.helpers import PG_BIN, REPO, Cluster, use_synthetic_mnist


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


@pytest.fixture
def postgres(tmp_path):
    """A throw-away cluster on 127.0.0.1 with databases `optuna` and `mlflow`; yields its URL, a
    Cluster that can also `.stop()` and `.start()`."""
    if PG_BIN is None:
        pytest.skip("PostgreSQL server binaries not found: apt-get install postgresql")
    pytest.importorskip("psycopg", reason="pip install -e '.[postgres]'")
    cluster = Cluster.create()
    try:
        yield cluster
    finally:
        cluster.destroy()
