"""The control plane's cost as workers are added: one study on PostgreSQL and `mlflow server` on
loopback, on tiny synthetic data, run by 1, 4 and 16 worker processes.

    python experiments/control_plane.py [--workers 1 4 16] [--trials-per-worker 2] [--epochs 3]

run from the repository root (it uses tests/helpers.py's throw-away cluster and server; needs
Debian's postgresql). For each worker count, a fresh cluster and tracking server; the workers
start as several machines would start them, commands of `--workers 4` (fewer for the last),
on the MLP space with pruning off. Meanwhile it polls `pg_stat_activity` for the number of
database connections, and every worker's /proc/PID/smaps_rollup for its private (unshared) and
proportional (PSS) memory. Prints one row per count: trials finished, failed, given back (over
budget) and running, the parent and trial runs in MLflow (and any left RUNNING), the seconds per
finished trial spent in Optuna storage calls and in MLflow calls (the trials' user attributes
`storage_seconds` and `tracking_seconds`, retries included), the peak connections, each worker's
peak private and PSS memory (mean and max), and the wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/helpers.py: the cluster, the server, the wrapper

import optuna  # noqa: E402
import psutil  # noqa: E402
import psycopg  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from mnist_search import fetch  # noqa: E402
from tests.helpers import Cluster, TrackingServer, wrapper, write_synthetic_mnist  # noqa: E402

PER_COMMAND = 4  # workers per `study` command, as one machine would start them


def memory_mb(pid: int) -> tuple[float, float]:
    """(private, proportional) resident memory of a process in MB, from smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        fields[key] = int(value.split()[0]) / 1024
    return fields["Private_Clean"] + fields["Private_Dirty"], fields["Pss"]


class Watch(threading.Thread):
    """Polls connections and worker memory every 0.5 s until stopped; keeps the peaks."""

    def __init__(self, url: str, commands: list[subprocess.Popen]):
        super().__init__(daemon=True)
        self.url, self.commands, self.stop = url, commands, threading.Event()
        self.connections, self.memory = 0, {}  # memory: pid -> (peak private, peak PSS)

    def run(self) -> None:
        with psycopg.connect(f"{self.url}/postgres", autocommit=True) as db:
            while not self.stop.wait(0.5):
                (count,) = db.execute(
                    "select count(*) from pg_stat_activity where datname in ('optuna', 'mlflow')"
                ).fetchone()
                self.connections = max(self.connections, count)
                for command in self.commands:
                    try:
                        workers = [command.pid] + [
                            c.pid for c in psutil.Process(command.pid).children()
                        ]
                    except psutil.NoSuchProcess:
                        continue
                    for pid in workers:
                        try:
                            private, pss = memory_mb(pid)
                        except OSError:  # it has just ended
                            continue
                        peak = self.memory.get(pid, (0.0, 0.0))
                        self.memory[pid] = (max(peak[0], private), max(peak[1], pss))


def measure(workers: int, trials: int, epochs: int, folder: Path) -> dict:
    data = folder / "data"
    digests = write_synthetic_mnist(data)
    fetch.OFFICIAL_SHA256 = digests  # what the wrapper tells the workers to verify against
    cluster = Cluster.create(max_connections=400)
    server = TrackingServer(cluster, folder)
    try:
        server.start()
        (folder / "worker.py").write_text(wrapper())
        flags = ["--data-dir", str(data), "--storage", f"{cluster}/optuna", "--device", "cpu"]
        flags += ["--study-name", "scale", "--trials", str(trials), "--epochs", str(epochs)]
        flags += ["--space", "mlp", "--pruner", "none", "--no-champion"]
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.url}
        start = time.monotonic()
        commands = []
        for first in range(0, workers, PER_COMMAND):
            n = min(PER_COMMAND, workers - first)
            commands.append(
                subprocess.Popen(
                    [sys.executable, str(folder / "worker.py"), *flags, "--workers", str(n)],
                    cwd=folder,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )  # fmt: skip
            )
        watch = Watch(cluster, commands)
        watch.start()
        errors = [c.communicate(timeout=3600)[1] for c in commands]
        seconds = time.monotonic() - start
        watch.stop.set()
        watch.join()
        codes = [c.returncode for c in commands]
        for code, err in zip(codes, errors, strict=True):
            if code or "Traceback" in err:  # what went wrong, for the record
                print(f"--- a command exited {code}:\n{err[-4000:]}", file=sys.stderr)
        study = optuna.load_study(study_name="scale", storage=f"{cluster}/optuna")
        finished = [t for t in study.trials if t.state.name == "COMPLETE"]
        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name("scale").experiment_id
        runs = client.search_runs([experiment], max_results=5000)
        role = lambda r: r.data.tags.get("mnist_search.role")  # noqa: E731
        private = [m[0] for m in watch.memory.values()]
        pss = [m[1] for m in watch.memory.values()]
        return {
            "workers": workers,
            "exit codes": codes,
            "tracebacks": sum("Traceback" in e for e in errors),
            "complete / fail / given back / running": (
                len(finished),
                sum(
                    t.state.name == "FAIL" and not t.user_attrs.get("over_budget")
                    for t in study.trials
                ),
                sum(bool(t.user_attrs.get("over_budget")) for t in study.trials),
                sum(t.state.name == "RUNNING" for t in study.trials),
            ),
            "parent runs / trial runs / runs RUNNING": (
                sum(role(r) == "study" for r in runs),
                sum(role(r) == "trial" for r in runs),
                sum(r.info.status == "RUNNING" for r in runs),
            ),
            "storage s/trial": statistics.mean(t.user_attrs["storage_seconds"] for t in finished),
            "tracking s/trial": statistics.mean(t.user_attrs["tracking_seconds"] for t in finished),
            "peak connections": watch.connections,
            "private MB (mean, max)": f"{statistics.mean(private):.0f}, {max(private):.0f}",
            "PSS MB (mean, max)": f"{statistics.mean(pss):.0f}, {max(pss):.0f}",
            "wall s": seconds,
        }
    finally:
        server.stop()
        cluster.destroy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--trials-per-worker", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args(argv)
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            row = measure(workers, workers * args.trials_per_worker, args.epochs, Path(tmp))
        print(" | ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}"
                         for k, v in row.items()), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
