"""On a machine with a GPU: load the registered champion the ways the README says, and serve it.

Run from a study's folder (its ./mlflow.db) with MNIST in $MNIST_SEARCH_DATA or the repository's
data/. Step `load` of experiments/gpu_check.sh. MLflow's pyfunc picks the GPU when there is one,
but the champion is exported (torch.export) with its weights on the CPU.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np

from mnist_search.data import load_images

URI = "models:/mnist-mlp@champion"
mlflow.set_tracking_uri("sqlite:///mlflow.db")
data_dir = Path(os.environ.get("MNIST_SEARCH_DATA", Path(__file__).parents[1] / "data"))
images, labels = load_images(data_dir, train=False)
x = images[:1000].reshape(1000, 784).float().numpy()  # raw pixels 0-255
y = labels[:1000].numpy()


def accuracy(probs) -> float:
    return float((np.asarray(probs).argmax(1) == y).mean())


try:
    mlflow.pyfunc.load_model(URI)
    print("pyfunc, default device: loaded")
except Exception as e:  # what a user on a GPU machine meets without the README's device setting
    print(f"pyfunc, default device: {type(e).__name__}: {str(e)[:160]}")
model = mlflow.pyfunc.load_model(URI, model_config={"device": "cpu"})
print(f"pyfunc, device cpu: accuracy on 1,000 test images {accuracy(model.predict(x)):.4f}")
torch_model = mlflow.pytorch.load_model(URI)
print(f"mlflow.pytorch.load_model: {type(torch_model).__name__}")

env = {**os.environ, "MLFLOW_DEFAULT_PREDICTION_DEVICE": "cpu"}
cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", URI, "--env-manager", "local"]
cmd += ["--host", "127.0.0.1", "--port", "5077"]
server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open("serve.log", "w"))
try:
    start = time.monotonic()
    while time.monotonic() - start < 60:
        try:
            urllib.request.urlopen("http://127.0.0.1:5077/ping", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    request = urllib.request.Request(
        "http://127.0.0.1:5077/invocations",
        data=json.dumps({"inputs": x[:100].tolist()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    answer = json.load(urllib.request.urlopen(request, timeout=30))["predictions"]
    right = int((np.asarray(answer).argmax(1) == y[:100]).sum())
    print(f"served with MLFLOW_DEFAULT_PREDICTION_DEVICE=cpu: {right} of 100 test images right")
except Exception as e:
    print(f"serve: {type(e).__name__}: {e}; log tail: {Path('serve.log').read_text()[-800:]}")
finally:
    server.terminate()
