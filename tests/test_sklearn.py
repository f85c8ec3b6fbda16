"""scikit-learn estimators: check_estimator, equivalence with Network.fit, the regression loop, pipelines and search."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, cross_validate, train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import fastmlp
from fastmlp import Network
from fastmlp._regression import fit_regression
from fastmlp.sklearn import FastMLPClassifier, FastMLPRegressor, _in_joblib_worker, _limit_threads

ALL_BACKENDS = fastmlp.available_backends()
COMPILED = [b for b in ALL_BACKENDS if b != "numpy"]

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X / 16.0, y


def _onehot(y: np.ndarray, k: int) -> np.ndarray:
    Y = np.zeros((y.shape[0], k))
    Y[np.arange(y.shape[0]), y] = 1.0
    return Y


# ---------------------------------------------------------------------- check_estimator
# One thread per estimator: scikit-learn's checks fit hundreds of tiny models, where a
# minibatch split over threads only costs synchronisation (and this CI machine is shared).
# The second pair runs the checks through early stopping, dropout, penalties and the numpy backend.
@parametrize_with_checks(
    [
        FastMLPClassifier(n_threads=1),
        FastMLPRegressor(n_threads=1),
        FastMLPClassifier(n_threads=1, backend="numpy", early_stopping=True, dropout=0.1, l2=1e-4, max_iter=100),
        FastMLPRegressor(
            n_threads=1, backend="numpy", hidden_layer_sizes=(20, 10), early_stopping=True, l1=1e-5, learning_rate=0.05
        ),
    ]
)
def test_sklearn_check_estimator(estimator, check):
    check(estimator)


# ---------------------------------------------------------------------- classifier == Network.fit
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_classifier_matches_network_fit_bit_for_bit(digits, backend, dtype):
    X, y = digits
    X = X[:500].astype(dtype)
    y = y[:500]
    settings = dict(activation="sigmoid", output="sigmoid", loss="mse")
    train = dict(batch_size=50, l2=1e-3, l1=1e-5, dropout=0.2, input_dropout=0.1)
    clf = FastMLPClassifier(hidden_layer_sizes=(20,), **settings, **train, learning_rate=0.2, max_iter=4,
                            backend=backend, random_state=7, n_threads=1).fit(X, y)  # fmt: skip
    net = Network([64, 20, 10], **settings, dtype=dtype, backend=backend, seed=7)
    with _limit_threads(1):  # the same thread count as the estimator: compiled epochs may round differently
        hist = net.fit(X, y, epochs=clf.n_iter_, lr=0.2, seed=7, verbose=False, **train)
    assert clf.network_.dtype == np.dtype(dtype)
    for W_clf, W_net in zip(clf.network_.weights + clf.network_.biases, net.weights + net.biases):
        np.testing.assert_array_equal(W_clf, W_net)
    assert clf.loss_curve_ == hist.train_loss
    np.testing.assert_array_equal(clf.predict(X), net.predict(X))


def test_classifier_early_stopping_matches_network_fit(digits):
    X, y = digits
    clf = FastMLPClassifier(hidden_layer_sizes=(16,), learning_rate=0.5, max_iter=60, early_stopping=True,
                            n_iter_no_change=3, tol=0.0, validation_fraction=0.2, random_state=3,
                            backend="numpy").fit(X, y)  # fmt: skip
    best = clf.history_.best_epoch
    assert clf.history_.stopped_epoch is not None and best < clf.n_iter_
    # the same split and seed, trained up to the best epoch, gives the restored weights
    X_tr, X_va, y_tr, y_va = train_test_split(X, y, test_size=0.2, random_state=3, stratify=y)
    net = Network([64, 16, 10], activation="relu", output="softmax", loss="ce", backend="numpy", seed=3)
    hist = net.fit(X_tr, y_tr, epochs=best, lr=0.5, seed=3, verbose=False, X_valid=X_va, y_valid=y_va)
    for W_clf, W_net in zip(clf.network_.weights, net.weights):
        np.testing.assert_array_equal(W_clf, W_net)
    assert clf.validation_scores_[:best] == hist.valid_acc
    assert clf.best_validation_score_ == max(clf.validation_scores_) == hist.valid_acc[-1]
    assert clf.best_loss_ == min(clf.loss_curve_)


# ---------------------------------------------------------------------- labels, dtypes, API
@pytest.mark.parametrize("labels", [np.array(["cat", "dog", "emu"]), np.array([-5, 7, 100]), np.array([-1.0, 2.0, 30.0])])
def test_classifier_arbitrary_labels(digits, labels):
    X, y = digits
    y3 = y % 3
    base = FastMLPClassifier(max_iter=5, random_state=0, backend="numpy").fit(X, y3)
    clf = FastMLPClassifier(max_iter=5, random_state=0, backend="numpy").fit(X, labels[y3])
    np.testing.assert_array_equal(clf.classes_, labels)
    # sorted labels encode to 0, 1, 2: the same network as on the integer codes
    np.testing.assert_array_equal(clf.predict(X), labels[base.predict(X)])
    np.testing.assert_array_equal(clf.predict_proba(X), base.predict_proba(X))
    # unsorted ones: classes_ sorted, output unit k stands for classes_[k]
    shuffled = labels[[2, 0, 1]]
    clf2 = FastMLPClassifier(max_iter=5, random_state=0, backend="numpy").fit(X, shuffled[y3])
    np.testing.assert_array_equal(clf2.classes_, labels)
    assert clf2.predict(X).dtype == labels.dtype and clf2.score(X, shuffled[y3]) > 0.5
    np.testing.assert_allclose(clf2.predict_proba(X).sum(axis=1), 1.0)


def test_classifier_sigmoid_output_probabilities_sum_to_one(digits):
    X, y = digits
    clf = FastMLPClassifier(output="sigmoid", loss="mse", max_iter=3, random_state=0, backend="numpy").fit(X, y)
    P = clf.predict_proba(X)
    np.testing.assert_allclose(P.sum(axis=1), 1.0)
    np.testing.assert_array_equal(clf.classes_[P.argmax(axis=1)], clf.predict(X))
    np.testing.assert_allclose(np.exp(clf.predict_log_proba(X)), P)


@pytest.mark.parametrize(
    ("X_dtype", "param", "expected"),
    [
        (np.float32, None, np.float32),
        (np.float64, None, np.float64),
        (np.int64, None, np.float64),
        (np.float16, None, np.float64),
        (np.float32, "float64", np.float64),
        (np.float64, "float32", np.float32),
    ],
)
def test_dtype_policy(digits, X_dtype, param, expected):
    X, y = digits
    X = (X * 16).astype(X_dtype) if np.dtype(X_dtype).kind == "i" else X.astype(X_dtype)
    clf = FastMLPClassifier(max_iter=2, dtype=param, random_state=0, backend="numpy").fit(X, y)
    assert clf.network_.dtype == expected
    assert clf.predict_proba(X).dtype == expected
    reg = FastMLPRegressor(max_iter=2, dtype=param, random_state=0, backend="numpy").fit(X, y.astype(float))
    assert reg.network_.dtype == expected and reg.predict(X).dtype == expected


def test_nan_and_inf_rejected_with_sklearn_messages(digits):
    X, y = digits
    for Est in (FastMLPClassifier, FastMLPRegressor):
        Xbad = X.copy()
        Xbad[3, 5] = np.nan
        with pytest.raises(ValueError, match="Input X contains NaN"):
            Est(max_iter=1).fit(Xbad, y)
        est = Est(max_iter=1, backend="numpy").fit(X, y)
        Xbad[3, 5] = np.inf
        with pytest.raises(ValueError, match="Input X contains infinity"):
            est.predict(Xbad)
        with pytest.raises(ValueError, match=r"X has 63 features, but .* is expecting 64 features"):
            est.predict(X[:, 1:])


def test_invalid_parameters_raise_at_fit_not_init(digits):
    X, y = digits
    bad = [dict(hidden_layer_sizes=(0,)), dict(learning_rate=-1.0), dict(max_iter=0), dict(dropout=1.0),
           dict(dtype="float16"), dict(backend="nope"), dict(output="identity"), dict(validation_fraction=1.0),
           dict(n_threads=0), dict(early_stopping="yes"), dict(batch_size=0)]  # fmt: skip
    for params in bad:
        clf = FastMLPClassifier(**params)  # never raises
        with pytest.raises((ValueError, TypeError)):
            clf.fit(X[:50], y[:50])


def test_convergence_warning_and_tol_stopping(digits):
    X, y = digits
    with pytest.warns(ConvergenceWarning, match="Maximum iterations \\(3\\)"):
        FastMLPClassifier(max_iter=3, random_state=0, backend="numpy").fit(X, y)
    clf = FastMLPClassifier(max_iter=500, tol=10.0, n_iter_no_change=2, random_state=0, backend="numpy")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        clf.fit(X, y)  # the first epoch sets the reference; then more than n_iter_no_change epochs "stall"
    assert clf.n_iter_ == 4 and clf.history_.stopped_epoch == 4


def test_partial_fit_and_warm_start(digits):
    X, y = digits
    clf = FastMLPClassifier(random_state=0, backend="numpy")
    with pytest.raises(ValueError, match="classes must be passed"):
        clf.partial_fit(X, y)
    clf.partial_fit(X[:100], y[:100], classes=np.arange(10))
    for _ in range(5):
        clf.partial_fit(X, y)
    assert clf.n_iter_ == 6 and len(clf.loss_curve_) == 6
    assert clf.loss_curve_[-1] < clf.loss_curve_[1]
    with pytest.raises(ValueError, match="not in classes_"):
        clf.partial_fit(X[:5], np.array([0, 1, 2, 3, 11]))
    with pytest.raises(ValueError, match="expecting 64 features"):
        clf.partial_fit(X[:, :10], y)

    warm = FastMLPClassifier(max_iter=3, warm_start=True, random_state=0, backend="numpy").fit(X, y)
    W_after_first = warm.network_.weights[0].copy()
    warm.fit(X, y)
    assert warm.n_iter_ == 6 and len(warm.loss_curve_) == 6
    cold = FastMLPClassifier(max_iter=3, random_state=0, backend="numpy").fit(X, y)
    np.testing.assert_array_equal(cold.network_.weights[0], W_after_first)  # the first warm fit was a cold start
    assert not np.array_equal(warm.network_.weights[0], W_after_first)


def test_learning_rate_schedule_passed_through_and_not_mutated(digits):
    X, y = digits

    class Halving:
        def __init__(self, lr):
            self.lr = lr
            self.calls = 0

        def epoch_lrs(self, epoch, n_steps):
            self.calls += 1
            return np.full(n_steps, self.lr * 0.5**epoch)

    sched = Halving(0.4)
    for est in (FastMLPClassifier, FastMLPRegressor):
        fitted = est(learning_rate=sched, max_iter=3, random_state=0, backend="numpy").fit(X, y)
        np.testing.assert_allclose(fitted.history_.lr, [0.4, 0.2, 0.1])
        assert sched.calls == 0  # fit works on a copy: parameters are never mutated


# ---------------------------------------------------------------------- regressor
def test_regression_loop_matches_network_fit_on_onehot_targets(digits):
    """Identity output + MSE on one-hot targets is the same problem as Network.fit on the labels."""
    X, y = digits
    X, y = X[:400], y[:400]
    kw = dict(epochs=3, batch_size=32, lr=0.05, seed=11, l2=1e-3, l1=1e-4, dropout=0.3, input_dropout=0.1)
    a = Network([64, 24, 12, 10], activation="tanh", output="identity", loss="mse", backend="numpy", seed=5)
    b = Network([64, 24, 12, 10], activation="tanh", output="identity", loss="mse", backend="numpy", seed=5)
    ha = a.fit(X, y, verbose=False, **kw)
    hb = fit_regression(b, X, _onehot(y, 10), **kw)
    for Wa, Wb in zip(a.weights + a.biases, b.weights + b.biases):
        np.testing.assert_array_equal(Wa, Wb)
    # the loop reports the squared error summed over outputs; the library's MSE averages over them
    np.testing.assert_allclose(np.array(hb.train_data_loss) / 10, ha.train_data_loss, rtol=1e-12)
    for backend in COMPILED:
        c = Network([64, 24, 12, 10], activation="tanh", output="identity", loss="mse", backend=backend, seed=5)
        fit_regression(c, X, _onehot(y, 10), **kw)
        for Wa, Wc in zip(a.weights, c.weights):
            np.testing.assert_allclose(Wc, Wa, rtol=1e-9, atol=1e-12)


def test_regressor_linear_net_recovers_least_squares():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4))
    X[:, 1] += 0.5 * X[:, 0]  # correlated features (still well conditioned: plain GD converges)
    X = (X - X.mean(0)) / X.std(0)
    Y = X @ rng.normal(size=(4, 2)) + [3.0, -1.0] + 0.3 * rng.normal(size=(300, 2))
    reg = FastMLPRegressor(hidden_layer_sizes=(), standardize_y=False, batch_size=None, learning_rate=0.1,
                           max_iter=1000, tol=0.0, n_iter_no_change=1000, random_state=0,
                           backend="numpy").fit(X, Y)  # fmt: skip
    A = np.hstack([X, np.ones((300, 1))])
    coef, *_ = np.linalg.lstsq(A, Y, rcond=None)
    np.testing.assert_allclose(reg.network_.weights[0], coef[:4].T, atol=1e-8)
    np.testing.assert_allclose(reg.network_.biases[0], coef[4], atol=1e-8)
    np.testing.assert_allclose(reg.predict(X), A @ coef, atol=1e-7)
    # the recorded loss is the objective at the optimum: mean over samples of the summed squared error
    np.testing.assert_allclose(reg.loss_curve_[-1], np.sum((A @ coef - Y) ** 2) / 300, rtol=1e-8)


def test_regression_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(20, 3)), rng.normal(size=(20, 2))
    net = Network([3, 5, 4, 2], activation="tanh", output="identity", loss="mse", backend="numpy", seed=2)

    def loss() -> float:
        return float(np.sum((net.predict_proba(X) - Y) ** 2) / X.shape[0])

    W0, b0 = net.get_params()
    fit_regression(net, X, Y, epochs=1, batch_size=None, lr=1.0, shuffle=False)  # one step: W <- W - grad
    grads = [W_old - W_new for W_old, W_new in zip(W0 + b0, net.weights + net.biases)]
    net.set_params(W0, b0)
    eps = 1e-6
    for param, grad in zip(net.weights + net.biases, grads):
        flat, g = param.reshape(-1), grad.reshape(-1)
        for j in range(flat.size):
            old = flat[j]
            flat[j] = old + eps
            up = loss()
            flat[j] = old - eps
            down = loss()
            flat[j] = old
            assert abs((up - down) / (2 * eps) - g[j]) < 1e-7


def test_regressor_target_standardization_and_multioutput():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 5))
    y = np.sin(X[:, 0]) + X[:, 1] ** 2
    reg = FastMLPRegressor(max_iter=30, random_state=0, backend="numpy").fit(X, y)
    big = FastMLPRegressor(max_iter=30, random_state=0, backend="numpy").fit(X, 1000.0 * y + 5.0)
    np.testing.assert_allclose(big.predict(X), 1000.0 * reg.predict(X) + 5.0, rtol=1e-9, atol=1e-8)
    assert reg.predict(X).shape == (200,)
    multi = FastMLPRegressor(max_iter=30, random_state=0, backend="numpy").fit(X, np.c_[y, -3 * y])
    assert multi.n_outputs_ == 2 and multi.predict(X).shape == (200, 2)
    with pytest.raises(FloatingPointError, match="diverged"):
        FastMLPRegressor(standardize_y=False, learning_rate=1.0, random_state=0).fit(X, 1e6 * y)


def test_regressor_early_stopping_scores_are_r2():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(300, 4))
    y = X @ [1.0, 2.0, 0.0, -1.0] + 0.5 * rng.normal(size=300)
    reg = FastMLPRegressor(early_stopping=True, validation_fraction=0.25, n_iter_no_change=3, max_iter=200,
                           random_state=0, backend="numpy").fit(X, y)  # fmt: skip
    X_tr, X_va, y_tr, y_va = train_test_split(X, y, test_size=0.25, random_state=0)
    assert reg.validation_scores_ is not None and len(reg.validation_scores_) == reg.n_iter_
    assert reg.best_validation_score_ == pytest.approx(reg.score(X_va, y_va), abs=1e-12)  # best weights restored
    assert reg.best_validation_score_ > 0.9


# ---------------------------------------------------------------------- pipelines, search, clone, pickle
def test_pipeline_with_standard_scaler(digits):
    X, y = digits
    X_tr, X_te, y_tr, y_te = train_test_split(X * 16, y, test_size=0.3, random_state=0, stratify=y)
    pipe = make_pipeline(StandardScaler(), FastMLPClassifier(max_iter=30, random_state=0, n_threads=1))
    pipe.fit(X_tr, y_tr)
    assert pipe.score(X_te, y_te) > 0.93
    reg = make_pipeline(StandardScaler(), FastMLPRegressor(max_iter=30, random_state=0, n_threads=1))
    assert reg.fit(X_tr, y_tr.astype(float)).score(X_te, y_te) > 0.5


def _digits_search(n_jobs: int, **est_params) -> GridSearchCV:
    mlp = FastMLPClassifier(hidden_layer_sizes=(32,), max_iter=15, random_state=0, **est_params)
    pipe = Pipeline([("scale", StandardScaler()), ("mlp", mlp)])
    grid = {"mlp__l2": [0.0, 1e-2], "mlp__dropout": [0.0, 0.2]}
    return GridSearchCV(pipe, grid, cv=3, n_jobs=n_jobs)


def test_grid_search_on_digits(digits):
    X, y = digits
    search = _digits_search(1, n_threads=1).fit(X[:900], y[:900])
    assert set(search.best_params_) == {"mlp__l2", "mlp__dropout"}
    assert search.best_score_ > 0.85
    assert search.score(X[900:], y[900:]) > 0.85


def test_grid_search_n_jobs_2_matches_n_jobs_1_and_caps_threads(digits):
    X, y = digits
    X, y = X[:600], y[:600]
    serial = _digits_search(1, n_threads=1).fit(X, y)  # one explicit thread: fast on a busy machine
    parallel = _digits_search(2).fit(X, y)  # n_threads=None: each joblib worker caps itself at one
    assert parallel.best_params_ == serial.best_params_
    # cython and numpy epochs are bitwise independent of the thread count; Numba's may round differently
    atol = 0.02 if fastmlp.get_backend("auto").name == "numba" else 0.0
    for key in ("mean_test_score", "split0_test_score", "split2_test_score"):
        np.testing.assert_allclose(parallel.cv_results_[key], serial.cv_results_[key], rtol=0, atol=atol)
    # n_threads=None: no cap in the main process, one thread inside each joblib worker
    assert not _in_joblib_worker()
    assert parallel.best_estimator_[-1].n_threads_ is None  # refit in the main process
    res = cross_validate(FastMLPClassifier(max_iter=2, random_state=0), X, y, cv=2, n_jobs=2, return_estimator=True)
    assert [est.n_threads_ for est in res["estimator"]] == [1, 1]


def test_n_threads_caps_blas_and_epoch_threads_during_fit(digits):
    from threadpoolctl import threadpool_info

    from fastmlp import config

    X, y = digits
    seen = []

    class Probe:
        def epoch_lrs(self, epoch, n_steps):
            seen.append(([lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"],
                         config.NUM_THREADS))  # fmt: skip
            return np.full(n_steps, 0.1)

    before = config.NUM_THREADS
    FastMLPClassifier(learning_rate=Probe(), max_iter=2, n_threads=1, random_state=0).fit(X, y)
    assert seen and all(set(blas) <= {1} and cfg == 1 for blas, cfg in seen)
    assert config.NUM_THREADS == before


@pytest.mark.parametrize("Est", [FastMLPClassifier, FastMLPRegressor])
def test_clone_and_pickle_round_trips(digits, Est):
    X, y = digits
    est = Est(hidden_layer_sizes=(16, 8), max_iter=5, random_state=0, dropout=0.1, dropout_scaling="predict")
    unfitted = pickle.loads(pickle.dumps(est))
    assert unfitted.get_params() == est.get_params()
    est.fit(X, y)
    twin = clone(est)
    assert twin.get_params() == est.get_params() and not hasattr(twin, "network_")
    np.testing.assert_array_equal(twin.fit(X, y).predict(X), est.predict(X))
    back = pickle.loads(pickle.dumps(est))
    assert back.network_.backend.name == est.network_.backend.name
    assert back.network_.predict_keep == est.network_.predict_keep
    np.testing.assert_array_equal(back.predict(X), est.predict(X))
    assert back.loss_curve_ == est.loss_curve_ and back.n_features_in_ == 64
    back.partial_fit(X, y)  # the unpickled network keeps training
    assert back.n_iter_ == est.n_iter_ + 1


def test_thread_caps_restored_after_concurrent_fits_in_threads(digits):
    """joblib's threading backend: fits overlap in one process, and the process-wide caps must come back."""
    from joblib import Parallel, delayed, parallel_config
    from threadpoolctl import threadpool_info

    from fastmlp import config

    X, y = digits
    blas_before = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    cfg_before = config.NUM_THREADS

    def fit(seed):
        return FastMLPClassifier(max_iter=3, random_state=seed).fit(X, y).n_threads_

    with parallel_config(backend="threading", n_jobs=2):
        caps = Parallel()(delayed(fit)(s) for s in range(4))
    assert caps == [1, 1, 1, 1]  # a threading worker counts as a joblib worker too
    assert config.NUM_THREADS == cfg_before
    assert [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"] == blas_before
