"""Plots: PNG files of a History and of an LR range test (also under $FASTMLP_PLOT_DIR when set)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import subprocess_env

pytest.importorskip("matplotlib")

from fastmlp import EarlyStopping, LinearLR, Network, lr_find
from fastmlp.plotting import plot_history, plot_lr_find

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _blobs(rng, n=300, n_features=8, n_classes=3):
    centers = rng.normal(0, 1.5, size=(n_classes, n_features))
    y = rng.integers(0, n_classes, size=n)
    return centers[y] + rng.normal(size=(n, n_features)), y


def _check_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5000
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_MAGIC
    dest = os.environ.get("FASTMLP_PLOT_DIR")
    if dest:  # keep a copy at a stable place for people to look at
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(dest) / path.name)


def test_plot_history_png(tmp_path, rng):
    X, y = _blobs(rng, n=450)
    X, y, Xv, yv = X[:300], y[:300], X[300:], y[300:]
    net = Network([8, 32, 3], output="softmax", loss="ce", backend="numpy", seed=0)
    sched = LinearLR(0.5, start_factor=0.1, total_iters=30, per_step=True)
    hist = net.fit(X, y, epochs=15, batch_size=20, lr=sched, X_valid=Xv, y_valid=yv, l2=1e-3,
                   early_stopping=EarlyStopping(patience=4), verbose=False, seed=0)  # fmt: skip
    fig = plot_history(hist, tmp_path / "history", title="8-32-3 on blobs, warm-up then constant lr")
    _check_png(tmp_path / "history.png")  # .png appended
    axes = fig.get_axes()
    assert [a.get_title() for a in axes] == ["Loss per epoch", "Accuracy per epoch", "Learning rate per iteration"]
    assert all(a.get_xlabel() and a.get_ylabel() and a.get_legend() is not None for a in axes)
    plain = net.fit(X, y, epochs=3, lr=0.1, verbose=False)  # no validation, constant lr: two panels
    fig = plot_history(plain, tmp_path / "history_plain.png")
    assert len(fig.get_axes()) == 2
    _check_png(tmp_path / "history_plain.png")


def test_plot_lr_find_png(tmp_path, rng):
    X, y = _blobs(rng)
    net = Network([8, 16, 3], activation="tanh", output="softmax", loss="ce", backend="numpy", seed=0)
    res = lr_find(net, X, y, start=1e-4, end=1e3, num_iter=80, batch_size=30, seed=0)
    fig = plot_lr_find(res, tmp_path / "lr_find.png")
    _check_png(tmp_path / "lr_find.png")
    ax = fig.get_axes()[0]
    assert ax.get_xscale() == "log" and "learning rate" in ax.get_xlabel()
    assert any("suggestion" in t.get_text() for t in ax.get_legend().get_texts())
    fig2 = res.plot(tmp_path / "lr_find_method.png")  # the result's own plot method
    _check_png(tmp_path / "lr_find_method.png")
    assert fig2 is not fig
    from matplotlib.figure import Figure

    host = Figure()
    ax = host.add_subplot()
    assert res.plot(ax=ax) is host and ax.get_xscale() == "log"


def test_plot_history_of_a_regression_fit(tmp_path, rng):
    """A regression fit records no accuracy: the second panel shows the validation score (R²); without
    validation data only the loss is drawn."""
    X = rng.normal(size=(200, 4))
    t = np.sin(X[:, 0]) + X[:, 1]
    net = Network([4, 16, 1], activation="tanh", loss="squared_error", backend="numpy", seed=0)
    hist = net.fit(X[:150], t[:150], epochs=6, batch_size=25, lr=0.05, X_valid=X[150:], y_valid=t[150:],
                   verbose=False, seed=0)  # fmt: skip
    assert hist.train_acc is None and hist.valid_acc is None
    fig = plot_history(hist, tmp_path / "regression.png")
    _check_png(tmp_path / "regression.png")
    axes = fig.get_axes()
    assert [a.get_title() for a in axes] == ["Loss per epoch", "Validation score per epoch"]
    np.testing.assert_allclose(axes[1].get_lines()[0].get_ydata(), hist.valid_score)
    fig = plot_history(net.fit(X, t, epochs=2, batch_size=50, verbose=False), tmp_path / "regression_plain.png")
    assert [a.get_title() for a in fig.get_axes()] == ["Loss per epoch"]
    _check_png(tmp_path / "regression_plain.png")


def test_plot_errors(rng):
    from fastmlp.history import History

    with pytest.raises(ValueError, match="no epochs"):
        plot_history(History())


def test_matplotlib_is_lazy_and_pyplot_untouched(tmp_path):
    code = (
        "import sys, numpy as np, fastmlp\n"
        "assert 'matplotlib' not in sys.modules\n"
        "from fastmlp.plotting import plot_history\n"
        "assert 'matplotlib' not in sys.modules\n"
        "net = fastmlp.Network([3, 2], backend='numpy', seed=0)\n"
        "h = net.fit(np.eye(3), np.array([0, 1, 0]), epochs=2, verbose=False)\n"
        f"plot_history(h, {str(tmp_path / 'h.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    env = {k: v for k, v in subprocess_env().items() if k != "DISPLAY"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path, timeout=120)
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG_MAGIC
