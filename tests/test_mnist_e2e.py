"""End to end: the classic notebook protocol on real MNIST through fastmlp.compat.

the notebook's split (55,000 / 5,000 / 10,000), 784-50-10 sigmoid/MSE, 50 epochs,
batch 100, lr 0.1, ``np.random.seed(123)`` before training.  A run of the
original loop on this machine printed train 95.61 %, valid 94.78 %, test 94.54 %.
"""

import io
import time
from contextlib import redirect_stdout

import numpy as np
import pytest

import fastmlp
import fastmlp.compat as compat


@pytest.mark.slow
@pytest.mark.mnist
def test_notebook_protocol_50_epochs(mnist_notebook, capsys):
    X_tr, y_tr, X_va, y_va, X_te, y_te = mnist_notebook
    model = compat.NeuralNetMLP(num_features=784, num_hidden=50, num_classes=10)
    np.random.seed(123)
    out = io.StringIO()
    t0 = time.perf_counter()
    with redirect_stdout(out):
        _, train_acc, valid_acc = compat.train(model, X_tr, y_tr, X_va, y_va, num_epochs=50, learning_rate=0.1)
    seconds = time.perf_counter() - t0
    test_mse, test_acc = compat.compute_mse_and_acc(model, X_te, y_te)
    lines = out.getvalue().splitlines()
    assert len(lines) == 50 and lines[-1].startswith("Epoch: 050/050 | Train MSE: ")
    with capsys.disabled():
        print(f"\n[e2e] backend={fastmlp.get_backend(compat.backend).name} train {train_acc[-1]:.2f}% "
              f"valid {valid_acc[-1]:.2f}% test {100 * test_acc:.2f}% in {seconds:.1f}s")  # fmt: skip
    assert abs(100 * test_acc - 94.54) <= 0.10
    assert abs(train_acc[-1] - 95.61) <= 0.10
    assert abs(valid_acc[-1] - 94.78) <= 0.10
