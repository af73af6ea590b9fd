"""What the tests share that is not a fixture: tiny synthetic MNIST, the study command wrapped
for synthetic data, servers' ports, and checks that several test files make. One place,
imported by the test files and conftest.py; no test file imports another."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from mnist_search import data as mdata
from mnist_search import fetch
from mnist_search.data import Data, to_split
from mnist_search.space import suggest_config
from mnist_search.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
PG_BIN = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)), None)


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


def as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to its own user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


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


# --- the study command, run as a process on synthetic data ----------------------------------

WRAPPER = """
import signal
import sys
import tempfile
import time

# These tests signal this process: start it as a terminal would, whatever the suite inherited
# (a background job of a script inherits SIGINT ignored, and the study keeps it ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
from mnist_search import data, fetch
fetch.OFFICIAL_SHA256 = {digests!r}
data.VAL_SIZE = 100
{hooks}
from mnist_search.study import main
sys.exit(main(sys.argv[1:], launcher=[sys.executable, __file__]))  # workers start as this does
"""


def wrapper(hooks: str = "") -> str:
    """The study's command for the synthetic data, with `hooks` run before it starts."""
    return WRAPPER.format(digests=fetch.OFFICIAL_SHA256, hooks=hooks)


def every_worker_gets_a_trial(workers: int) -> str:
    """A hook: each process's first trial trains only once `workers` processes have a trial,
    so that every worker does trials however slowly the others start (bounded by 10 min)."""
    return f"""
from mnist_search import search as _search
_make_objective = _search.make_objective
def make_objective(*args, **kwargs):
    objective = _make_objective(*args, **kwargs)
    waited = []
    def first_trial_waits_for_all(trial):
        if not waited:
            waited.append(trial.number)
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                trials = trial.study.get_trials(deepcopy=False)
                if len({{t.user_attrs.get("pid") for t in trials}} - {{None}}) >= {workers}:
                    break
                time.sleep(0.2)
        return objective(trial)
    return first_trial_waits_for_all
_search.make_objective = make_objective
"""


# --- tiny data and configs for `fit` ---------------------------------------------------------

CNN_CONFIG = TrainConfig(
    family="cnn", channels=(4, 8), kernel=3, hidden=(16,), lr=3e-3, batch_size=32, epochs=3
)
MLP_CONFIG = TrainConfig(hidden=(32,), lr=3e-3, batch_size=32, epochs=3)


def band_data(n=600) -> Data:
    """Fake digits whose class is the row of a bright band (`synthetic_images`), normalized."""
    images, labels = synthetic_images(n, seed=0)
    mean, std = images.float().mean().item() / 255, images.float().std().item() / 255
    cpu = torch.device("cpu")
    train = to_split(images[:500], labels[:500], mean, std, cpu)
    return Data(train, to_split(images[500:], labels[500:], mean, std, cpu), mean, std)


# --- servers on loopback: PostgreSQL and the MLflow tracking server, restartable -----------


class Cluster(str):
    """A throw-away PostgreSQL cluster on 127.0.0.1 with databases `optuna` and `mlflow`: its
    URL, which can also stop and start the cluster (a restart) and destroy it."""

    @classmethod
    def create(cls, max_connections: int = 200) -> Cluster:
        root = Path(tempfile.mkdtemp(prefix="mnist-search-pg-"))  # outside pytest's 0700 dirs
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(root, user.pw_uid, user.pw_gid)
        data, port = root / "data", free_port()
        run = lambda cmd: subprocess.run(as_postgres(cmd), check=True, capture_output=True)  # noqa: E731
        run([f"{PG_BIN}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"])
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
        options += f" -c max_connections={max_connections}"
        cluster = cls(f"postgresql://postgres@127.0.0.1:{port}").control(
            data, options, root / "log"
        )
        cluster.root = root
        cluster.start()
        for db in ("optuna", "mlflow"):
            run([f"{PG_BIN}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db])
        return cluster

    def destroy(self) -> None:
        self._pg_ctl_unchecked("-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def control(self, data: Path, options: str, log: Path):
        command = lambda *args: as_postgres([f"{PG_BIN}/pg_ctl", "-D", str(data), *args])  # noqa: E731
        self._pg_ctl = lambda *a: subprocess.run(command(*a), check=True, capture_output=True)
        self._pg_ctl_unchecked = lambda *a: subprocess.run(command(*a), capture_output=True)
        self._start = ["-o", options, "-l", str(log), "-w", "start"]
        return self

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "-w", "stop")  # every session is disconnected

    def start(self) -> None:
        self._pg_ctl(*self._start)


class TrackingServer:
    """`mlflow server` on a loopback port, backed by PostgreSQL, serving artifacts itself; it
    can be stopped and started again on the same port (a restart)."""

    def __init__(self, postgres: str, folder):
        self.port, self.folder = free_port(), folder
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
        self.cmd += ["--port", str(self.port), "--workers", "1"]
        self.cmd += ["--backend-store-uri", f"{postgres}/mlflow"]
        self.cmd += ["--artifacts-destination", str(folder / "artifacts")]
        self.server = None

    def start(self) -> None:
        log = self.folder / "mlflow-server.log"
        with open(log, "a") as out:  # a file, not a pipe: a full pipe would stall the server
            self.server = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for_http(f"{self.url}/health", self.server, 600, log.read_text)  # the first start
        # migrates the database; 600 s bounds a hang only

    def stop(self) -> None:
        try:
            os.killpg(self.server.pid, signal.SIGTERM)  # the server and its uvicorn workers
            self.server.wait(timeout=20)
        except ProcessLookupError:  # it had already exited
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait()
