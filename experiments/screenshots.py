"""The README's MLflow UI screenshots, taken from a real study in a real headless browser.

    python experiments/screenshots.py STUDY_DIR [--out docs] [--study-name mnist-cnn]

STUDY_DIR is the folder a study ran in (its `mlflow.db` and `mlruns/`), e.g. after the default
`python -m mnist_search.study --trials 50` there. It starts `mlflow ui` on
loopback in that folder and Debian's chromium through chromedriver (`apt-get install -y chromium
chromium-driver`), drives them over the WebDriver protocol (plain HTTP, so no selenium), and
writes, in --out:

- `mlflow-training-runs.png`: the experiment's runs in the "Model training" view, sorted by
  `best_val_accuracy`, with the objective and the parameters that read a row as columns;
- `mlflow-study-run.png`: the study's parent run, its "Model metrics" charts;
- `mlflow-registry.png`: the registered model, its description and versions.

Not part of the test suite. Everything it starts is stopped when it ends.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlencode

# A fresh, quiet browser: nothing from outside loopback, nothing kept.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--window-size=1600,1000",
]


TRAINING = "machine_learning"  # the UI's "Model training" switch, top left, not "GenAI"
# The runs table's columns: off, the empty ones; on, the objective and what reads a row.
COLUMNS_OFF = ["Source"]
# the objective, then the params that read a row, by the study's space
COLUMNS_ON = {
    "cnn": ["best_val_accuracy", "channels_0", "channels_1", "kernel", "head_width", "augment",
            "lr", "batch_size"],
    "mlp": ["best_val_accuracy", "n_layers", "width_0", "width_1", "width_2", "lr", "batch_size"],
}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{proc.args[0]} did not start ({url})") from None
            time.sleep(0.5)


def start(stack: ExitStack, cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """Start `cmd` in its own process group, stopped with all its children when `stack` ends
    (`mlflow ui` runs uvicorn workers and a job consumer; chromedriver runs chromium)."""
    out = stack.enter_context(open(log, "w"))
    proc = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
    )

    def stop():
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break  # the whole group is gone
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue

    stack.callback(stop)
    return proc


class Browser:
    """The few WebDriver calls this script needs (https://www.w3.org/TR/webdriver2/)."""

    def __init__(self, driver_url: str, user_data_dir: str):
        self.url = driver_url
        options = {
            "binary": shutil.which("chromium") or "/usr/bin/chromium",
            "args": [*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"],
        }
        caps = {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}
        self.session = self._call("POST", "/session", {"capabilities": caps})["sessionId"]
        self.url = f"{driver_url}/session/{self.session}"

    def _call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                return json.loads(answer.read())["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{method} {path}: {e.read().decode()[:500]}") from None

    def open(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def find(self, xpath: str, seconds: float = 60) -> str:
        """The first element matching `xpath`, waiting for the single-page app to render it."""
        deadline = time.monotonic() + seconds
        while True:
            found = self._call("POST", "/elements", {"using": "xpath", "value": xpath})
            if found:
                return next(iter(found[0].values()))
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing matches {xpath}")
            time.sleep(0.5)

    def exists(self, xpath: str) -> bool:
        return bool(self._call("POST", "/elements", {"using": "xpath", "value": xpath}))

    def resize(self, width: int, height: int) -> None:
        self._call("POST", "/window/rect", {"width": width, "height": height})

    def click(self, xpath: str) -> None:
        self._call("POST", f"/element/{self.find(xpath)}/click", {})

    def screenshot(self, path: Path) -> None:
        """A PNG of the window, reduced to 256 colors: UI screenshots stay sharp and small."""
        from PIL import Image

        png = base64.b64decode(self._call("GET", "/screenshot"))
        image = Image.open(io.BytesIO(png)).convert("RGB")
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        print(f"{path} ({path.stat().st_size // 1024} KiB)")

    def close(self) -> None:
        self._call("DELETE", "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study_dir", type=Path, help="the folder the study ran in")
    p.add_argument("--out", type=Path, default=Path("docs"), help="where the PNGs go")
    p.add_argument("--study-name", default="mnist-cnn")
    p.add_argument("--register-as", default="mnist-cnn")
    p.add_argument("--space", choices=sorted(COLUMNS_ON), default="cnn", help="the study's")
    args = p.parse_args(argv)
    study_dir = args.study_dir.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{study_dir}/mlflow.db")
    experiment = client.get_experiment_by_name(args.study_name).experiment_id
    (parent,) = client.search_runs(
        [experiment], f"tags.`mnist_search.role` = 'study' and run_name = 'study-{args.study_name}'"
    )

    with ExitStack() as stack:
        # first in, so removed last: after the browser that writes in it has stopped
        tmp = stack.enter_context(tempfile.TemporaryDirectory(ignore_cleanup_errors=True))
        ui_port, driver_port = free_port(), free_port()
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{study_dir}/mlflow.db"}
        ui = start(
            stack,
            [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(ui_port)],
            Path(tmp, "mlflow-ui.log"),
            cwd=study_dir,
            env=env,
        )
        wait_for_http(f"http://127.0.0.1:{ui_port}/health", ui, 120)
        driver = start(
            stack, ["chromedriver", f"--port={driver_port}"], Path(tmp, "chromedriver.log")
        )
        wait_for_http(f"http://127.0.0.1:{driver_port}/status", driver, 30)
        browser = Browser(f"http://127.0.0.1:{driver_port}", f"{tmp}/profile")
        stack.callback(browser.close)
        site = f"http://127.0.0.1:{ui_port}/#"

        # 1. The training view of the experiment, sorted by best_val_accuracy, with the columns
        #    that read a row (a sort by a metric lists the runs flat, best first).
        query = urlencode(
            {
                "workflowType": TRAINING,
                "orderByKey": "metrics.`best_val_accuracy`",
                "orderByAsc": "false",
            }
        )
        browser.open(f"{site}/experiments/{experiment}/runs?{query}")
        browser.find(f"//*[normalize-space(text())='study-{args.study_name}']")
        if browser.exists("//button[@aria-label='Close']"):  # the MLflow Assistant's panel
            browser.click("//button[@aria-label='Close']")
        browser.click("//button[normalize-space()='Columns']")
        for column in COLUMNS_OFF + COLUMNS_ON[args.space]:
            browser.click(f"(//*[normalize-space(text())='{column}'])[last()]")
        browser.click("//button[normalize-space()='Columns']")
        time.sleep(2)
        browser.screenshot(out / "mlflow-training-runs.png")

        # 2. The study's run: its per-trial series and its summary, as charts
        browser.resize(1600, 1500)  # all eight charts
        run_page = f"{site}/experiments/{experiment}/runs/{parent.info.run_id}"
        browser.open(f"{run_page}/model-metrics?workflowType={TRAINING}")
        browser.find("//*[normalize-space(text())='search_seconds']")
        time.sleep(3)  # the charts draw after their titles
        browser.screenshot(out / "mlflow-study-run.png")

        # 3. The registry: the model's description, its versions and aliases
        browser.resize(1600, 1000)
        browser.open(f"{site}/models/{args.register_as}?workflowType={TRAINING}")
        browser.find("//*[contains(text(), 'Input')]")
        time.sleep(2)
        browser.screenshot(out / "mlflow-registry.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
