"""The training engine against outside oracles: finite differences, scikit-learn's and PyTorch's optimizers,
duplicated rows for sample weights, and an uninterrupted run for continued training, resume and Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest

import fastmlp
from fastmlp import get_backend
from fastmlp.backends.contract import OptimizerState, plan_epoch
from fastmlp.callbacks import Callback, EarlyStopping, Plateau
from fastmlp.optimizers import SGD, Adam, AdamW, get_optimizer

BACKENDS = fastmlp.available_backends()
REF = get_backend("numpy")

#: (output, loss, target) triples whose full-batch gradient is checked
PAIRS = [
    ("sigmoid", "mse", "labels"),
    ("softmax", "mse", "labels"),
    ("identity", "mse", "dense"),
    ("softmax", "ce", "labels"),
    ("softmax", "ce", "soft"),
    ("sigmoid", "ce", "labels"),
    ("sigmoid", "ce", "dense"),
    ("identity", "squared_error", "dense"),
    ("exp", "poisson", "dense"),
]


def _data(rng, n, sizes, output, loss, target):
    X = rng.normal(size=(n, sizes[0]))
    k = sizes[-1]
    if target == "labels":
        Y = rng.integers(0, max(k, 2), size=n)
    elif target == "soft":
        p = rng.uniform(0.1, 1, size=(n, k))
        Y = p / p.sum(1, keepdims=True)
    elif loss == "ce":
        Y = (rng.uniform(size=(n, k)) < 0.5).astype(float)
    elif loss == "poisson":
        Y = rng.poisson(1.5, size=(n, k)).astype(float)
    else:
        Y = rng.normal(size=(n, k))
    return X, Y


def _net(rng, sizes, scale=0.5):
    W = [rng.normal(size=(o, i)) * scale / np.sqrt(i) for i, o in zip(sizes[:-1], sizes[1:])]
    b = [rng.normal(size=o) * 0.1 for o in sizes[1:]]
    return W, b


def _objective(be, X, Y, W, b, plan, sw):
    """The full-batch objective whose gradient the kernels compute (see the test below for the k factor)."""
    grads = OptimizerState.zeros("gradient", plan.sizes, plan.dtype)
    stats = be.train_epoch(X, Y, np.arange(len(X)), (W, b), grads, 1.0, plan, sample_weight=sw)
    k = plan.sizes[-1] if plan.loss in ("mse", "squared_error") else 1
    return (k * stats.loss_sum + stats.penalty_sum) / len(X), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("output,loss,target", PAIRS)
def test_full_batch_gradient_is_the_finite_difference(backend, output, loss, target, weighted):
    """Central differences of the objective: the notebook's MSE and scikit-learn's squared error use the
    delta ``2(a-y)`` / ``(a-y)`` summed, not averaged, over the ``k`` outputs, so their gradient is that of
    ``k`` times the reported loss; every other pair is the gradient of its loss.  ``alpha`` included."""
    be = get_backend(backend)
    rng = np.random.default_rng(abs(hash((output, loss, target, weighted))) % 2**32)
    sizes = [5, 4, 3] if output != "exp" else [5, 4, 2]
    n = 9
    X, Y = _data(rng, n, sizes, output, loss, target)
    sw = rng.uniform(0.3, 2.0, size=n) if weighted else None
    plan = plan_epoch(sizes, "float64", batch_size=n, hidden="tanh", output=output, loss=loss,
                      target="labels" if target == "labels" else "dense", alpha=0.3, optimizer="gradient")  # fmt: skip
    W, b = _net(rng, sizes)
    f0, grads = _objective(be, X, Y, W, b, plan, sw)
    h = 1e-6
    for params, gl in ((W, grads.weights[0]), (b, grads.biases[0])):
        for p, g in zip(params, gl):
            for idx in [tuple(i) for i in np.ndindex(p.shape)][:12]:
                old = p[idx]
                p[idx] = old + h
                fp, _ = _objective(REF, X, Y, W, b, plan, sw)
                p[idx] = old - h
                fm, _ = _objective(REF, X, Y, W, b, plan, sw)
                p[idx] = old
                fd = (fp - fm) / (2 * h)
                assert g[idx] == pytest.approx(fd, rel=1e-5, abs=1e-8), (idx, g[idx], fd)
    assert np.isfinite(f0)


# ------------------------------------------------------------------ optimizers against their authors' code
def _steps(be, opt, n_steps, X, Y, W, b, plan_kw):
    o = get_optimizer(opt)
    plan = plan_epoch([6, 5, 3], "float64", batch_size=len(X), hidden="tanh", output="softmax", loss="ce",
                      l2=o.weight_decay, **o.plan_fields(), **plan_kw)  # fmt: skip
    state = OptimizerState.zeros(plan.optimizer, plan.sizes, plan.dtype)
    for _ in range(n_steps):
        be.train_epoch(X, Y, np.arange(len(X)), (W, b), state, 0.05, plan)
    return state


def _grads(X, Y, W, b, alpha):
    plan = plan_epoch([6, 5, 3], "float64", batch_size=len(X), hidden="tanh", output="softmax", loss="ce", alpha=alpha,
                      optimizer="gradient")  # fmt: skip
    g = OptimizerState.zeros("gradient", plan.sizes, plan.dtype)
    REF.train_epoch(X, Y, np.arange(len(X)), (W, b), g, 1.0, plan)
    return [*g.weights[0], *g.biases[0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", ["sgd", "momentum", "nesterov", "adam"])
def test_optimizers_are_sklearns(backend, spec):
    """Five steps of each optimizer equal scikit-learn's SGDOptimizer/AdamOptimizer fed the same gradients."""
    from sklearn.neural_network._stochastic_optimizers import AdamOptimizer, SGDOptimizer

    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(20, 6)), rng.integers(0, 3, 20)
    W, b = _net(rng, [6, 5, 3])
    W2, b2 = [w.copy() for w in W], [v.copy() for v in b]
    alpha = 1e-2
    _steps(get_backend(backend), spec, 5, X, Y, W, b, {"alpha": alpha})
    params = [*W2, *b2]
    o = get_optimizer(spec)
    if spec == "adam":
        sk = AdamOptimizer(params, 0.05, o.beta1, o.beta2, o.eps)
    else:
        sk = SGDOptimizer(params, 0.05, "constant", getattr(o, "momentum", 0.0), getattr(o, "nesterov", False))
    for _ in range(5):
        sk.update_params(params, _grads(X, Y, params[:2], params[2:], alpha))
    for got, want in zip([*W, *b], params):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def _torch_adamw(params, grads_fn, lr, betas, eps, wd, steps):
    """PyTorch's AdamW (torch.optim.AdamW, single tensor, no amsgrad) written out from its documentation."""
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    decay = [True] * (len(params) // 2) + [False] * (len(params) // 2)  # fastmlp decays weights, not biases
    for t in range(1, steps + 1):
        grads = grads_fn(params)
        for i, (p, g) in enumerate(zip(params, grads)):
            if decay[i]:
                p *= 1 - lr * wd
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            bc1, bc2 = 1 - betas[0] ** t, 1 - betas[1] ** t
            p -= (lr / bc1) * m[i] / (np.sqrt(v[i]) / np.sqrt(bc2) + eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_is_pytorchs(backend):
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(20, 6)), rng.integers(0, 3, 20)
    W, b = _net(rng, [6, 5, 3])
    params = [w.copy() for w in W] + [v.copy() for v in b]
    _steps(get_backend(backend), AdamW(weight_decay=0.1), 6, X, Y, W, b, {})
    _torch_adamw(params, lambda p: _grads(X, Y, p[:2], p[2:], 0.0), 0.05, (0.9, 0.999), 1e-8, 0.1, 6)
    for got, want in zip([*W, *b], params):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_adamw_matches_torch_itself_when_installed():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    X, Y = rng.normal(size=(20, 6)), rng.integers(0, 3, 20)
    W, b = _net(rng, [6, 5, 3])
    tw = [torch.tensor(a.copy(), requires_grad=True) for a in (*W, *b)]
    opt = torch.optim.AdamW([{"params": tw[:2], "weight_decay": 0.1}, {"params": tw[2:], "weight_decay": 0.0}], lr=0.05)
    for _ in range(6):
        opt.zero_grad()
        for t, g in zip(tw, _grads(X, Y, [t.detach().numpy() for t in tw[:2]], [t.detach().numpy() for t in tw[2:]], 0.0)):
            t.grad = torch.tensor(g)
        opt.step()
    _steps(REF, AdamW(weight_decay=0.1), 6, X, Y, W, b, {})
    for got, want in zip([*W, *b], tw):
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_optimizer_specs():
    assert get_optimizer("sgd") == SGD() and SGD(momentum=0.0, nesterov=True).kind == "sgd"
    assert get_optimizer("nesterov").kind == "nesterov" and get_optimizer("momentum").kind == "momentum"
    assert get_optimizer(Adam(eps_mode="torch")).plan_fields()["eps_mode"] == "torch"
    with pytest.raises(ValueError, match="unknown optimizer"):
        get_optimizer("rmsprop")
    with pytest.raises(TypeError, match="optimizer must be"):
        get_optimizer(3)
    with pytest.raises(ValueError, match="beta1"):
        Adam(beta1=1.0)


# ------------------------------------------------------------------ sample weights
@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_sample_weights_equal_duplicated_rows(backend):
    """Full-batch steps with integer weights give the weights of the same steps on duplicated rows."""
    rng = np.random.default_rng(4)
    X, y = rng.normal(size=(30, 8)), rng.integers(0, 3, 30)
    w = rng.integers(1, 4, size=30)
    Xd, yd = np.repeat(X, w, axis=0), np.repeat(y, w)
    nets = [fastmlp.Network([8, 6, 3], loss="ce", backend=backend, seed=0) for _ in range(2)]
    h1 = nets[0].fit(X, y, sample_weight=w.astype(float), epochs=4, batch_size=None, lr=0.2, alpha=1e-2,
                     optimizer="adam", verbose=False)  # fmt: skip
    h2 = nets[1].fit(Xd, yd, epochs=4, batch_size=None, lr=0.2, alpha=1e-2, optimizer="adam", verbose=False)
    for a, b in zip(nets[0].weights + nets[0].biases, nets[1].weights + nets[1].biases):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h1.train_loss, h2.train_loss, rtol=1e-10)


def test_sample_weight_errors():
    net = fastmlp.Network([3, 2], loss="ce", backend="numpy", seed=0)
    X, y = np.ones((4, 3)), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="sample_weight must be 1-D"):
        net.fit(X, y, sample_weight=np.ones(3), epochs=1, verbose=False)
    with pytest.raises(ValueError, match=">= 0"):
        net.fit(X, y, sample_weight=-np.ones(4), epochs=1, verbose=False)
    with pytest.raises(ValueError, match="sums to 0 over minibatch"):
        net.fit(X, y, sample_weight=np.array([0.0, 0.0, 1.0, 1.0]), batch_size=2, shuffle=False, epochs=1,
                verbose=False)  # fmt: skip


# ------------------------------------------------------------------ targets through fit
def test_every_target_kind_trains():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(300, 4))
    # regression, one output from a 1-D y and two from a 2-D y
    y = X @ [1.0, -2.0, 0.5, 0.0]
    reg = fastmlp.Network([4, 16, 1], activation="tanh", loss="squared_error", backend="numpy", seed=0)
    h = reg.fit(X, y, epochs=60, lr=0.01, optimizer="adam", batch_size=20, verbose=False, validation_split=0.2)
    assert h.task == "regression" and h.train_acc is None and h.valid_score[-1] > 0.95
    assert reg.predict(X).shape == (300,)
    Y2 = np.column_stack([y, -y])
    reg2 = fastmlp.Network([4, 16, 2], activation="tanh", loss="squared_error", backend="numpy", seed=0)
    reg2.fit(X, Y2, epochs=40, lr=0.01, optimizer="adam", batch_size=20, verbose=False)
    assert reg2.predict(X).shape == (300, 2) and reg2.evaluate(X, Y2)[1] > 0.9
    # multi-label indicators and soft labels
    L = np.column_stack([X[:, 0] > 0, X[:, 1] > 0, X[:, 0] + X[:, 1] > 0]).astype(float)
    ml = fastmlp.Network([4, 16, 3], loss="ce", output="sigmoid", backend="numpy", seed=0)
    h = ml.fit(X, L, epochs=40, lr=0.01, optimizer="adam", batch_size=20, verbose=False)
    assert h.task == "multilabel" and h.train_acc[-1] > 0.85
    soft = np.exp(X[:, :3])
    soft /= soft.sum(1, keepdims=True)
    sl = fastmlp.Network([4, 16, 3], loss="ce", backend="numpy", seed=0)
    assert sl.output == "softmax"
    h = sl.fit(X, soft, epochs=20, lr=0.01, optimizer="adam", batch_size=20, verbose=False)
    assert h.task == "soft labels" and h.train_loss[-1] < h.train_loss[0]
    # binary with one logistic unit and 0/1 labels
    yb = (X[:, 0] > 0).astype(int)
    bn = fastmlp.Network([4, 8, 1], loss="ce", backend="numpy", seed=0)
    assert bn.output == "sigmoid"
    h = bn.fit(X, yb, epochs=30, lr=0.05, optimizer="adam", batch_size=20, verbose=False)
    assert h.train_acc[-1] > 0.9 and set(np.unique(bn.predict(X))) <= {0, 1}
    # counts
    counts = rng.poisson(np.exp(0.5 * X[:, 0]))
    po = fastmlp.Network([4, 8, 1], loss="poisson", backend="numpy", seed=0)
    assert po.output == "exp"
    h = po.fit(X, counts.astype(float), epochs=30, lr=0.01, optimizer="adam", batch_size=20, verbose=False)
    assert h.train_loss[-1] < h.train_loss[0]


def test_target_errors_say_how_to_fix():
    net = fastmlp.Network([4, 3], loss="ce", backend="numpy", seed=0)
    X = np.zeros((5, 4))
    with pytest.raises(ValueError, match=r"argmax\(1\)"):
        net.fit(X, np.eye(5)[:, :5], epochs=1, verbose=False)
    with pytest.raises(ValueError, match="sum to 1"):
        net.fit(X, np.full((5, 3), 0.5), epochs=1, verbose=False)
    reg = fastmlp.Network([4, 1], loss="poisson", backend="numpy", seed=0)
    with pytest.raises(ValueError, match=">= 0"):
        reg.fit(X, -np.ones(5), epochs=1, verbose=False)


# ------------------------------------------------------------------ continued training, resume, interrupts
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "nesterov", "adam"])
def test_fit_after_fit_continues_the_optimizer(backend, optimizer):
    """fit(2) then fit(3) is fit(5): the optimizer state (velocities, moments, t) lives with the network."""
    rng = np.random.default_rng(6)
    X, y = rng.normal(size=(120, 10)), rng.integers(0, 4, 120)
    kw = dict(batch_size=16, lr=0.01, optimizer=optimizer, shuffle=False, verbose=False, alpha=1e-3)
    a = fastmlp.Network([10, 8, 4], loss="ce", backend=backend, seed=1)
    a.fit(X, y, epochs=2, **kw)
    h = a.fit(X, y, epochs=3, **kw)
    assert h.epoch == [3, 4, 5]
    b = fastmlp.Network([10, 8, 4], loss="ce", backend=backend, seed=1)
    b.fit(X, y, epochs=5, **kw)
    for p, q in zip(a.weights + a.biases, b.weights + b.biases):
        np.testing.assert_array_equal(p, q)
    assert a.optimizer_state_.t == b.optimizer_state_.t == 5 * 8
    h = a.fit(X, y, epochs=1, reset=True, **kw)
    assert h.epoch == [1] and a.epochs_ == 1


class _StopAt(Callback):
    def __init__(self, epoch: int, how: str) -> None:
        self.epoch, self.how = epoch, how

    def on_epoch_end(self, net, history):
        if history.epoch[-1] == self.epoch:
            if self.how == "signal":
                os.kill(os.getpid(), signal.SIGINT)  # the real Ctrl-C: waits for the commit to finish
            else:
                raise KeyboardInterrupt  # raised inside the commit itself: the epoch is rolled back
        return False


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
@pytest.mark.parametrize("how", ["signal", "raise"])
@pytest.mark.parametrize("target", ["labels", "dense"])
def test_interrupt_then_resume_ends_like_an_uninterrupted_run(tmp_path, how, target):
    rng = np.random.default_rng(7)
    X = rng.normal(size=(200, 6))
    y = rng.integers(0, 3, 200) if target == "labels" else X[:, :2] @ [1.0, -1.0]
    loss = "ce" if target == "labels" else "squared_error"
    k = 3 if target == "labels" else 1
    kw = dict(epochs=6, batch_size=32, lr=0.01, optimizer="adam", dropout=0.2, seed=11, verbose=False,
              X_valid=X[:40], y_valid=y[:40])  # fmt: skip
    full = fastmlp.Network([6, 8, k], loss=loss, backend="numpy", seed=2)
    full.fit(X, y, **kw)
    ck = tmp_path / "run.ckpt"
    net = fastmlp.Network([6, 8, k], loss=loss, backend="numpy", seed=2)
    h = net.fit(X, y, checkpoint=ck, callbacks=[_StopAt(3, how)], **kw)
    assert h.interrupted
    done = 3 if how == "signal" else 2  # a signal waits for the commit; an exception inside it rolls it back
    assert h.epoch == list(range(1, done + 1)) and net.epochs_ == done
    again = fastmlp.Network([6, 8, k], loss=loss, backend="numpy", seed=2)
    h2 = again.fit(X, y, checkpoint=ck, resume=True, callbacks=[_StopAt(99, how)], **kw)
    assert h2.epoch == list(range(1, 7)) and not h2.interrupted
    for p, q in zip(again.weights + again.biases, full.weights + full.biases):
        np.testing.assert_array_equal(p, q)


def test_checkpoint_refuses_other_runs_and_damage(tmp_path):
    rng = np.random.default_rng(8)
    X, y = rng.normal(size=(60, 5)), rng.integers(0, 2, 60)
    ck = tmp_path / "c.npz"
    net = fastmlp.Network([5, 4, 2], loss="ce", backend="numpy", seed=0)
    net.fit(X, y, epochs=2, lr=0.1, checkpoint=ck, verbose=False)
    with pytest.raises(ValueError, match=r"lr: checkpoint '0\.1', this run '0\.05'"):
        fastmlp.Network([5, 4, 2], loss="ce", backend="numpy", seed=0).fit(
            X, y, epochs=2, lr=0.05, checkpoint=ck, resume=True, verbose=False)
    with pytest.raises(ValueError, match="data"):
        fastmlp.Network([5, 4, 2], loss="ce", backend="numpy", seed=0).fit(
            X + 1, y, epochs=2, lr=0.1, checkpoint=ck, resume=True, verbose=False)
    raw = bytearray(ck.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    ck.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=str(ck)):
        fastmlp.Network([5, 4, 2], loss="ce", backend="numpy", seed=0).fit(
            X, y, epochs=2, lr=0.1, checkpoint=ck, resume=True, verbose=False)


def test_checkpoint_path_is_checked_before_training(tmp_path):
    net = fastmlp.Network([3, 2], loss="ce", backend="numpy", seed=0)
    with pytest.raises(ValueError, match="does not exist"):
        net.fit(np.zeros((4, 3)), [0, 1, 0, 1], epochs=1, checkpoint=tmp_path / "no" / "c.npz", verbose=False)
    assert net.epochs_ == 0


# ------------------------------------------------------------------ the one plateau rule
def _sklearn_count(values, tol, n_iter_no_change):
    """scikit-learn's _update_no_improvement_count on the training loss, and the epoch it stops after."""
    best, count = np.inf, 0
    for i, v in enumerate(values, 1):
        count = count + 1 if v > best - tol else 0
        best = min(best, v)
        if count > n_iter_no_change:
            return i
    return None


def test_plateau_rule_is_sklearns_and_keras():
    rng = np.random.default_rng(9)
    for _ in range(200):
        values = list(np.cumsum(rng.normal(-0.01, 0.05, size=30)) + 1)
        tol, n = float(rng.choice([0.0, 0.01, 0.05])), int(rng.integers(1, 4))
        es = EarlyStopping(patience=n, min_delta=tol, monitor="train_loss", convention="sklearn", restore_best=False)
        stop = None
        for i, v in enumerate(values, 1):
            hist = type("H", (), {"epoch": [i], "train_loss": [v], "best_epoch": None})()
            if es.on_epoch_end(None, hist):
                stop = i
                break
        assert stop == _sklearn_count(values, tol, n)
    keras = Plateau("min", 0.0, 1)  # EarlyStopping(patience=2): two bad epochs stop
    for v in (3.0, 2.0, 2.5, 2.0):
        keras.update(v)
    assert keras.exhausted and keras.best == 2.0


def test_validated_inputs_are_not_rescanned_but_nan_is_still_caught():
    """A fit(epochs=1) loop scans a large X once; a NaN written in place later is still refused or rolled back."""
    from fastmlp import _validation as V

    rng = np.random.default_rng(10)
    X = rng.normal(size=(3000, 40))
    y = rng.integers(0, 3, 3000)
    calls = []
    real = V.all_finite
    try:
        V.all_finite = lambda a: calls.append(a.shape) or real(a)
        net = fastmlp.Network([40, 8, 3], loss="ce", backend="numpy", seed=0)
        for _ in range(3):
            net.fit(X, y, epochs=1, verbose=False)
    finally:
        V.all_finite = real
    assert calls.count(X.shape) == 1, calls
    x00 = X[0, 0]
    X[0, 0] = np.nan  # a sampled row: found again
    with pytest.raises(ValueError, match="NaN"):
        net.fit(X, y, epochs=1, verbose=False)
    X[0, 0], X[1, 1] = x00, np.nan  # outside the sample: the non-finite loss rolls the epoch back
    before = net.get_params()
    with pytest.raises(FloatingPointError, match="diverged"):
        net.fit(X, y, epochs=1, verbose=False)
    for a, b in zip(net.weights + net.biases, before[0] + before[1]):
        np.testing.assert_array_equal(a, b)


def test_mc_predict_memory_does_not_grow_with_n_samples():
    """8,000 Monte-Carlo samples of 256 rows: a (n_samples, rows, classes) stack alone would take 164 MB."""
    import tracemalloc

    rng = np.random.default_rng(11)
    net = fastmlp.Network([20, 16, 10], loss="ce", seed=0)
    X = rng.normal(size=(256, 20))
    small = net.mc_predict(X, n_samples=50, seed=1, dropout=0.5)
    tracemalloc.start()
    big = net.mc_predict(X, n_samples=8000, seed=1, dropout=0.5)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100 * 2**20, f"{peak / 2**20:.0f} MiB"
    assert np.abs(big.mean - small.mean).max() < 0.1  # the same distribution, more samples
    np.testing.assert_allclose(big.mean.sum(axis=1), 1.0, rtol=1e-12)
    assert (big.std >= 0).all() and (big.mutual_info >= 0).all()
