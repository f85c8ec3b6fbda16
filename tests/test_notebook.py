"""A Jupyter notebook run by nbclient: fit shows a progress-bar widget, the plots render as images (no magic)."""

from __future__ import annotations

import pytest
from conftest import subprocess_env

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")

CELLS = [
    # no %matplotlib magic anywhere, no pyplot
    "import numpy as np\nimport fastmlp\nfrom fastmlp.plotting import plot_history\n"
    "rng = np.random.default_rng(0)\ncenters = rng.normal(0, 2, size=(3, 6))\ny = rng.integers(0, 3, size=300)\n"
    "X = centers[y] + rng.normal(size=(300, 6))\n"
    "net = fastmlp.Network([6, 16, 3], activation='relu', loss='ce', backend='numpy', seed=0)",
    "hist = net.fit(X, y, epochs=2, batch_size=20, lr=0.3, validation_split=0.2)",
    "plot_history(hist)",
    "fastmlp.lr_find(net, X, y, num_iter=60, batch_size=20, seed=0).plot()",
    "net.summary()",
]


def _mime_types(cell) -> list[str]:
    types = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            types.append(f"stream:{out['name']}")
        elif out["output_type"] == "error":
            types.append(f"error:{out['ename']}")
        else:
            types.extend(f"{out['output_type']}:{m}" for m in out.get("data", {}))
    return types


def test_notebook_shows_a_bar_widget_and_plot_images(tmp_path, monkeypatch):
    for key, value in subprocess_env().items():  # the kernel imports the fastmlp this test imports
        monkeypatch.setenv(key, value)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in CELLS])
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    found = {i: _mime_types(cell) for i, cell in enumerate(nb.cells)}
    print("output types found:", found)  # the issue asks which types the notebook test found
    assert not [t for ts in found.values() for t in ts if t.startswith("error")], found
    fit = found[1]
    assert fit.count("display_data:application/vnd.jupyter.widget-view+json") == 2, fit  # one tqdm widget an epoch
    assert "stream:stdout" in fit  # the "Training Network(...)" line
    bar = [o for o in nb.cells[1].outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert bar[0]["data"]["text/plain"].startswith("Epoch 1/2")
    # the bars' final state (kept by nbclient as the notebook's widget state): all steps, then the validation numbers
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    texts = [str(m["state"].get("value", "")) for m in state.values()]
    assert sum("12/12" in t and "val_accuracy=" in t for t in texts) == 2, texts
    assert any(m["state"].get("value") == 12 and m["state"].get("max") == 12 for m in state.values())
    for i in (2, 3):  # the figures render as PNG images by themselves
        assert "execute_result:image/png" in found[i], found[i]
        png = next(o for o in nb.cells[i].outputs if o["output_type"] == "execute_result")["data"]["image/png"]
        assert len(png) > 10000
    assert any("Total parameters" in o.get("text", "") for o in nb.cells[4].outputs)
