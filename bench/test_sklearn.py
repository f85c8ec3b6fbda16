"""scikit-learn's MLPClassifier defaults (784-100-10 relu, adam, batch 200) against fastmlp.sklearn's, fit side by side.

Group ``sklearn fit <dtype>``: the two rows of a group are the same estimator configuration, 5 epochs on the
first ``min(FASTMLP_BENCH_ROWS, 20000)`` MNIST rows; compare their times (``fastmlp bench`` prints the ratio).
"""

from __future__ import annotations

import warnings

import pytest
from conftest import bench_rows

EPOCHS = 5


@pytest.fixture(scope="module")
def sk_rows(mnist_rows):
    X, y, _ = mnist_rows
    n = min(bench_rows(), 20000)
    return X[:n], y[:n]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("who", ["scikit-learn", "fastmlp"])
def test_sklearn_defaults_fit(benchmark, sk_rows, who, dtype):
    from sklearn.exceptions import ConvergenceWarning

    if who == "scikit-learn":
        from sklearn.neural_network import MLPClassifier
    else:
        from fastmlp.sklearn import MLPClassifier
    X, y = sk_rows
    Xc = X.astype(dtype)
    benchmark.group = f"sklearn fit {dtype}"
    benchmark.extra_info.update(rows=len(X), epochs=EPOCHS)

    def fit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return MLPClassifier(max_iter=EPOCHS, random_state=0).fit(Xc, y)

    clf = benchmark.pedantic(fit, rounds=2, warmup_rounds=1)
    assert clf.n_iter_ == EPOCHS
