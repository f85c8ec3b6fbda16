"""fastmlp.sklearn against scikit-learn itself: the same numbers for the same random_state (float64).

scikit-learn's own ``MLPClassifier``/``MLPRegressor`` are the oracle: every case
fits both with identical parameters and compares ``coefs_``, ``intercepts_``,
``loss_curve_``, ``validation_scores_``, ``n_iter_``, ``t_`` and the predictions.
Tolerances: relative 1e-9 for the stochastic solvers after several epochs,
1e-6 for lbfgs (its line search amplifies last-bit differences).
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import sklearn
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, make_multilabel_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier as SkClassifier
from sklearn.neural_network import MLPRegressor as SkRegressor
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import fastmlp
from fastmlp.sklearn import MLPClassifier, MLPRegressor

BACKENDS = fastmlp.available_backends()
SK_VERSION = tuple(int(p) for p in sklearn.__version__.split(".")[:2])
needs_sample_weight = pytest.mark.skipif(SK_VERSION < (1, 7), reason="scikit-learn's MLP takes sample_weight from 1.7")

#: relative agreement with scikit-learn
RTOL = {"sgd": 1e-9, "adam": 1e-9, "lbfgs": 1e-6}


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)) if b.size else 0.0


def _digits(n=300):
    X, y = load_digits(return_X_y=True)
    return X[:n] / 16.0, y[:n]


def _binary(n=200):
    X, y = load_breast_cancer(return_X_y=True)
    return StandardScaler().fit_transform(X[:n]), y[:n]


def _multilabel(n=150):
    X, Y = make_multilabel_classification(n_samples=n, n_features=12, n_classes=4, random_state=0)
    return X / X.max(), Y


def _diabetes(n=200, outputs=1):
    X, y = load_diabetes(return_X_y=True)
    X, y = StandardScaler().fit_transform(X[:n]), y[:n]
    y = (y - y.mean()) / y.std()
    if outputs > 1:
        y = np.column_stack([y, 0.5 * y + X[:, 0], np.sin(X[:, 1])])
    return X, y


def compare(ours, theirs, X, *, rtol, what=""):
    """The fitted attributes and predictions of both estimators agree; returns the largest difference seen."""
    diffs = {}
    assert ours.n_iter_ == theirs.n_iter_, f"{what}: n_iter_ {ours.n_iter_} != {theirs.n_iter_}"
    assert ours.n_layers_ == theirs.n_layers_ and ours.n_outputs_ == theirs.n_outputs_
    assert ours.out_activation_ == theirs.out_activation_
    assert ours.t_ == theirs.t_
    for i, (a, b) in enumerate(zip(ours.coefs_, theirs.coefs_, strict=True)):
        diffs[f"coefs_[{i}]"] = _rel(a, b)
    for i, (a, b) in enumerate(zip(ours.intercepts_, theirs.intercepts_, strict=True)):
        diffs[f"intercepts_[{i}]"] = _rel(a, b)
    if hasattr(theirs, "loss_curve_"):
        diffs["loss_curve_"] = _rel(ours.loss_curve_, theirs.loss_curve_)
        assert (ours.validation_scores_ is None) == (theirs.validation_scores_ is None)
        if theirs.validation_scores_ is not None:
            diffs["validation_scores_"] = _rel(ours.validation_scores_, theirs.validation_scores_)
            assert ours.best_validation_score_ == pytest.approx(theirs.best_validation_score_, rel=rtol)
        else:
            assert ours.best_loss_ == pytest.approx(theirs.best_loss_, rel=rtol)
    diffs["loss_"] = _rel(ours.loss_, theirs.loss_)
    if hasattr(theirs, "predict_proba"):
        diffs["predict_proba"] = _rel(ours.predict_proba(X), theirs.predict_proba(X))
        np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))
        np.testing.assert_array_equal(ours.classes_, theirs.classes_)
    else:
        diffs["predict"] = _rel(ours.predict(X), theirs.predict(X))
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= rtol, f"{what}: {worst} differs by {diffs[worst]:.3g} (all: {diffs})"
    return diffs[worst]


def _fit_both(Ours, Theirs, X, y, fit_kw=None, backend="numpy", **params):
    fit_kw = fit_kw or {}
    with warnings.catch_warnings(record=True) as w_theirs:
        warnings.simplefilter("always")
        theirs = Theirs(**params).fit(X, y, **fit_kw)
    with warnings.catch_warnings(record=True) as w_ours:
        warnings.simplefilter("always")
        ours = Ours(backend=backend, **params).fit(X, y, **fit_kw)
    conv = [issubclass(w.category, ConvergenceWarning) for w in w_theirs]
    assert any(conv) == any(issubclass(w.category, ConvergenceWarning) for w in w_ours), "ConvergenceWarning differs"
    return ours, theirs


# ------------------------------------------------------------------ parity cases
CLASSIFIER_CASES = {
    "adam-defaults": dict(data=_digits, params=dict(hidden_layer_sizes=(20,), max_iter=8)),
    "sgd-nesterov": dict(data=_digits, params=dict(solver="sgd", learning_rate_init=0.05, max_iter=8)),
    "sgd-momentum": dict(data=_digits, params=dict(solver="sgd", nesterovs_momentum=False, momentum=0.5, max_iter=6)),
    "sgd-plain": dict(data=_digits, params=dict(solver="sgd", momentum=0.0, learning_rate_init=0.2, max_iter=6)),
    "sgd-invscaling": dict(data=_digits, params=dict(solver="sgd", learning_rate="invscaling", power_t=0.25,
                                                     learning_rate_init=0.5, max_iter=6)),
    "sgd-adaptive": dict(data=_digits, params=dict(solver="sgd", learning_rate="adaptive", n_iter_no_change=1, tol=0.5,
                                                   learning_rate_init=0.1, max_iter=12)),
    "logistic-two-layers": dict(data=_digits, params=dict(hidden_layer_sizes=(16, 12), activation="logistic",
                                                          max_iter=6, batch_size=32)),
    "tanh": dict(data=_digits, params=dict(hidden_layer_sizes=(15,), activation="tanh", max_iter=6, alpha=1e-2)),
    "identity": dict(data=_digits, params=dict(hidden_layer_sizes=(10,), activation="identity", max_iter=5)),
    "no-shuffle": dict(data=_digits, params=dict(hidden_layer_sizes=(10,), shuffle=False, max_iter=5)),
    "binary": dict(data=_binary, params=dict(hidden_layer_sizes=(8,), max_iter=10, learning_rate_init=0.01)),
    "binary-sgd": dict(data=_binary, params=dict(hidden_layer_sizes=(8,), solver="sgd", max_iter=10)),
    "multilabel": dict(data=_multilabel, params=dict(hidden_layer_sizes=(12,), max_iter=10, learning_rate_init=0.01)),
    "early-stopping": dict(data=_digits, params=dict(hidden_layer_sizes=(20,), early_stopping=True, max_iter=30,
                                                     n_iter_no_change=3, learning_rate_init=0.01)),
    "early-stopping-binary": dict(data=_binary, params=dict(hidden_layer_sizes=(6,), early_stopping=True, max_iter=20,
                                                            validation_fraction=0.2, n_iter_no_change=2)),
    "converges": dict(data=_binary, params=dict(hidden_layer_sizes=(6,), tol=1e-2, max_iter=200,
                                                learning_rate_init=0.01)),
    "batch-larger-than-data": dict(data=lambda: _digits(80), params=dict(hidden_layer_sizes=(5,), batch_size=500,
                                                                         max_iter=4)),
    "lbfgs": dict(data=_digits, params=dict(hidden_layer_sizes=(10,), solver="lbfgs", max_iter=30)),
    "lbfgs-binary": dict(data=_binary, params=dict(hidden_layer_sizes=(5,), solver="lbfgs", max_iter=40, alpha=1e-3)),
}


@pytest.mark.parametrize("case", list(CLASSIFIER_CASES))
def test_classifier_parity(case):
    cfg = CLASSIFIER_CASES[case]
    X, y = cfg["data"]()
    params = dict(cfg["params"], random_state=7)
    ours, theirs = _fit_both(MLPClassifier, SkClassifier, X, y, backend="numpy", **params)
    compare(ours, theirs, X, rtol=RTOL[params.get("solver", "adam")], what=case)


REGRESSOR_CASES = {
    "adam": dict(data=_diabetes, params=dict(hidden_layer_sizes=(20,), max_iter=10)),
    "sgd": dict(data=_diabetes, params=dict(hidden_layer_sizes=(10,), solver="sgd", learning_rate_init=0.01, max_iter=8)),
    "multi-output": dict(data=lambda: _diabetes(outputs=3), params=dict(hidden_layer_sizes=(12, 6), max_iter=8)),
    "poisson": dict(data=lambda: (_diabetes()[0], np.exp(_diabetes()[1] * 0.5)),
                    params=dict(loss="poisson", hidden_layer_sizes=(8,), max_iter=8, learning_rate_init=0.01)),
    "early-stopping": dict(data=_diabetes, params=dict(hidden_layer_sizes=(10,), early_stopping=True, max_iter=40,
                                                       n_iter_no_change=3, learning_rate_init=0.01)),
    "tanh-invscaling": dict(data=_diabetes, params=dict(activation="tanh", solver="sgd", learning_rate="invscaling",
                                                        learning_rate_init=0.05, max_iter=6)),
    "lbfgs": dict(data=_diabetes, params=dict(hidden_layer_sizes=(8,), solver="lbfgs", max_iter=50)),
    "lbfgs-multi-output": dict(data=lambda: _diabetes(outputs=3), params=dict(hidden_layer_sizes=(6,), solver="lbfgs",
                                                                              max_iter=30, alpha=1e-2)),
}


@pytest.mark.parametrize("case", list(REGRESSOR_CASES))
def test_regressor_parity(case):
    cfg = REGRESSOR_CASES[case]
    X, y = cfg["data"]()
    params = dict(cfg["params"], random_state=3)
    ours, theirs = _fit_both(MLPRegressor, SkRegressor, X, y, backend="numpy", **params)
    compare(ours, theirs, X, rtol=RTOL[params.get("solver", "adam")], what=case)


@needs_sample_weight
@pytest.mark.parametrize("solver", ["adam", "sgd", "lbfgs"])
@pytest.mark.parametrize("early", [False, True])
def test_sample_weight_parity(solver, early):
    if solver == "lbfgs" and early:
        pytest.skip("early stopping is for the stochastic solvers")
    X, y = _digits(250)
    sw = np.random.default_rng(0).uniform(0.2, 3.0, size=len(y))
    params = dict(hidden_layer_sizes=(12,), solver=solver, max_iter=6 if solver != "lbfgs" else 25, random_state=1,
                  early_stopping=early, learning_rate_init=0.01)
    ours, theirs = _fit_both(MLPClassifier, SkClassifier, X, y, fit_kw={"sample_weight": sw}, backend="numpy", **params)
    compare(ours, theirs, X, rtol=RTOL[solver], what=f"classifier {solver} early={early}")
    Xr, yr = _diabetes()
    swr = np.random.default_rng(1).uniform(0.2, 3.0, size=len(yr))
    ours, theirs = _fit_both(MLPRegressor, SkRegressor, Xr, yr, fit_kw={"sample_weight": swr}, backend="numpy", **params)
    compare(ours, theirs, Xr, rtol=RTOL[solver], what=f"regressor {solver} early={early}")


@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_partial_fit_parity(solver):
    X, y = _digits(240)
    kw = dict(hidden_layer_sizes=(10,), solver=solver, random_state=0, learning_rate_init=0.02)
    if solver == "sgd":
        kw["learning_rate"] = "invscaling"
    ours, theirs = MLPClassifier(backend="numpy", **kw), SkClassifier(**kw)
    classes = np.unique(y)
    for i in range(4):
        part = slice(60 * i, 60 * (i + 1))
        ours.partial_fit(X[part], y[part], classes=classes)
        theirs.partial_fit(X[part], y[part], classes=classes)
    compare(ours, theirs, X, rtol=RTOL[solver], what="partial_fit")
    assert ours.n_iter_ == 1  # scikit-learn's meaning: epochs of the last call
    Xr, yr = _diabetes()
    ours, theirs = MLPRegressor(backend="numpy", **kw), SkRegressor(**kw)
    for i in range(3):
        ours.partial_fit(Xr[i::3], yr[i::3])
        theirs.partial_fit(Xr[i::3], yr[i::3])
    compare(ours, theirs, Xr, rtol=RTOL[solver], what="partial_fit regressor")


@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_warm_start_parity(solver):
    X, y = _digits()
    kw = dict(hidden_layer_sizes=(10,), solver=solver, random_state=0, warm_start=True, max_iter=4)
    ours, theirs = MLPClassifier(backend="numpy", **kw), SkClassifier(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(2):
            ours.fit(X, y)
            theirs.fit(X, y)
    compare(ours, theirs, X, rtol=RTOL[solver], what="warm_start")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
@pytest.mark.parametrize("case", ["adam-defaults", "sgd-nesterov", "binary", "multilabel", "early-stopping"])
def test_compiled_backends_match_sklearn_too(backend, case):
    """The compiled epochs give scikit-learn's numbers as well (float64)."""
    cfg = CLASSIFIER_CASES[case]
    X, y = cfg["data"]()
    params = dict(cfg["params"], random_state=7)
    ours, theirs = _fit_both(MLPClassifier, SkClassifier, X, y, backend=backend, **params)
    compare(ours, theirs, X, rtol=RTOL[params.get("solver", "adam")], what=f"{case} on {backend}")


# ------------------------------------------------------------------ behaviour beyond the numbers
def test_same_constructor_as_sklearn():
    """Every scikit-learn parameter with its default; fastmlp's own ones after them."""
    for Ours, Theirs in ((MLPClassifier, SkClassifier), (MLPRegressor, SkRegressor)):
        ours, theirs = Ours().get_params(), Theirs().get_params()
        for k, v in theirs.items():
            assert k in ours, f"{Ours.__name__} lacks {k}"
            assert ours[k] == v, f"{Ours.__name__}.{k} default {ours[k]!r} != {v!r}"
        assert set(ours) - set(theirs) == {"dropout", "input_dropout", "l1", "dtype", "backend", "n_threads",
                                           "callbacks"}  # fmt: skip


def test_errors_in_sklearn_words():
    X, y = _digits(50)
    with pytest.raises(ValueError, match="solver"):
        MLPClassifier(solver="newton").fit(X, y)
    with pytest.raises(ValueError, match="partial_fit does not support early_stopping"):
        MLPClassifier(early_stopping=True).partial_fit(X, y, classes=np.unique(y))
    with pytest.raises(ValueError, match="classes must be passed on the first call to partial_fit"):
        MLPClassifier().partial_fit(X, y)
    with pytest.raises(AttributeError, match=r"has no attribute .partial_fit."):
        MLPClassifier(solver="lbfgs").partial_fit(X, y, classes=np.unique(y))
    with pytest.raises(ValueError, match="validation set is too small"):
        MLPClassifier(early_stopping=True, validation_fraction=0.01).fit(X[:20], y[:20])


def test_float32_stays_float32_and_pickles():
    X, y = _digits(200)
    clf = MLPClassifier(hidden_layer_sizes=(10,), max_iter=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X.astype(np.float32), y)
    assert clf.coefs_[0].dtype == np.float32 and clf.predict_proba(X.astype(np.float32)).dtype == np.float32
    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(again.predict_proba(X), clf.predict_proba(X))
    assert clone(clf).get_params() == clf.get_params()


def test_dropout_and_l1_extras_train():
    X, y = _digits(300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=60, learning_rate_init=0.01, dropout=0.2, l1=1e-5,
                            random_state=0).fit(X, y)
    assert clf.score(X, y) > 0.9


def test_deprecated_aliases():
    import fastmlp.sklearn as fs

    with pytest.warns(FutureWarning, match="MLPClassifier"):
        assert fs.FastMLPClassifier is MLPClassifier
    with pytest.warns(FutureWarning, match="MLPRegressor"):
        assert fs.FastMLPRegressor is MLPRegressor


@parametrize_with_checks([MLPClassifier(n_threads=1, max_iter=100), MLPRegressor(n_threads=1, max_iter=100)])
def test_check_estimator(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)
