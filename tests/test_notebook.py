"""The guided notebook runs top to bottom on a small budget, so it never rots."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "tour.ipynb"


@pytest.mark.mnist
@pytest.mark.slow
def test_the_notebook_executes(real_mnist, tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_SEARCH_DATA", str(real_mnist))
    monkeypatch.setenv("NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute(env=dict(os.environ))
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 9  # 4 data figures, 2 study figures, 3 champion figures
    assert (tmp_path / "exports" / "notebook" / "model.onnx").exists()
