"""On a machine with a GPU: load the registered champion the ways the README says, and serve it.

Run from a study's folder (its ./mlflow.db), MNIST in $MNIST_SEARCH_DATA or ./data; the `load`
step of experiments/gpu_check.sh. MLflow's pyfunc picks the GPU when there is one, but the
champion is exported (torch.export) with its weights on the CPU.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import mlflow
import numpy as np

from mnist_search.fetch import default_data_dir, load_images

URI = "models:/default@champion"  # gpu_check.sh's study `default`, registered under its name
PORT = 5077


def serve(x: np.ndarray) -> np.ndarray:
    """The probabilities `mlflow models serve` answers for `x`, told to load on the CPU."""
    env = {**os.environ, "MLFLOW_DEFAULT_PREDICTION_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", URI, "--env-manager", "local"]
    cmd += ["--host", "127.0.0.1", "--port", str(PORT)]
    with open("serve.log", "w") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{PORT}/ping", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not come up; see serve.log") from None
                time.sleep(0.5)
        request = urllib.request.Request(
            f"http://127.0.0.1:{PORT}/invocations",
            data=json.dumps({"inputs": x.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        return np.asarray(json.load(urllib.request.urlopen(request, timeout=30))["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers
        server.wait()


def main() -> int:
    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    images, labels = load_images(default_data_dir(), train=False)
    x = images[:1000].reshape(1000, 784).float().numpy()  # raw pixels 0-255
    y = labels[:1000].numpy()
    try:
        mlflow.pyfunc.load_model(URI)
        print("pyfunc, default device: loaded")
    except Exception as e:  # what a user on a GPU machine meets without the README's setting
        print(f"pyfunc, default device: {type(e).__name__}: {str(e)[:160]}")
    model = mlflow.pyfunc.load_model(URI, model_config={"device": "cpu"})
    right = (np.asarray(model.predict(x)).argmax(1) == y).sum()
    print(f"pyfunc, device cpu: {right} of 1,000 test images right")
    print(f"mlflow.pytorch.load_model: a {type(mlflow.pytorch.load_model(URI)).__name__}")
    right = (serve(x[:100]).argmax(1) == y[:100]).sum()
    print(f"served with MLFLOW_DEFAULT_PREDICTION_DEVICE=cpu: {right} of 100 test images right")
    return 0


if __name__ == "__main__":
    sys.exit(main())
