"""Private Numba kernels of the ``numba`` backend.

Nothing here validates: :mod:`fastmlp.backends.numba` is the only caller and
:class:`fastmlp.backends.Backend` validated every argument before it.  All
arrays are C-contiguous and of one float dtype (float32 or float64); labels,
orders and offsets are int64.

Entry kernels are :class:`LazyKernel` objects: ``kernel[dtype]`` compiles the
kernel with an explicit signature for that dtype on first use (or loads it
from Numba's on-disk cache), so importing this module compiles nothing.
Helpers (``_name``) have no signature and are compiled into their callers.

Numerics
--------
* The sigmoid and the softmax use :func:`_exp32`/:func:`_exp64`, a branch-free
  ``exp`` (Cody–Waite range reduction, a Taylor polynomial, the power of two
  built in the exponent bits) that LLVM vectorizes; a scalar ``math.exp``
  call does not vectorize without SVML and costs several ns an element.
* Weights live in one flat vector per network (``theta``); the views
  ``W_l (n_out, n_in)`` and ``b_l (n_out,)`` are rebuilt from offsets inside
  the kernel, so one signature serves every depth.
* Dropout masks are the splitmix64 counter hash of
  :mod:`fastmlp.backends.contract`, in wrapping uint64 arithmetic (every
  operand is typed uint64: mixing int64 and uint64 in Numba gives float64).
"""

from __future__ import annotations

import math
import threading
import types as types_mod

import numba
import numpy as np
from numba import prange, types
from numba.extending import intrinsic, overload, register_jitable

from fastmlp import config
from fastmlp.backends.contract import ACT_CODES, GOLDEN, KEEP_BITS, LOSS_CODES, MIX1, MIX2

LOG_EPS = 1e-12

# integer codes, frozen into the kernels as compile-time constants
_IDENT = ACT_CODES["identity"]
_SIG = ACT_CODES["sigmoid"]
_TANH = ACT_CODES["tanh"]
_RELU = ACT_CODES["relu"]
_SOFT = ACT_CODES["softmax"]
_MSE = LOSS_CODES["mse"]
_CE = LOSS_CODES["ce"]
_FULL = 1 << KEEP_BITS

_G = np.uint64(GOLDEN)
_M1 = np.uint64(MIX1)
_M2 = np.uint64(MIX2)
_U1 = np.uint64(1)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_S40 = np.uint64(40)


# --------------------------------------------------------------------------- exp
@intrinsic
def _bits_as_f64(typingctx, bits):
    """Reinterpret an int64 as a float64 (LLVM ``bitcast``; vectorizes)."""
    if bits != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))

    return types.float64(types.int64), codegen


@intrinsic
def _bits_as_f32(typingctx, bits):
    """Reinterpret an int32 as a float32 (LLVM ``bitcast``; vectorizes)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.int32), codegen


# float64: ln 2 split so that k * _LN2HI_64 is exact for |k| < 2**11 (Cody–Waite)
_LOG2E_64 = 1.4426950408889634
_LN2HI_64 = 6.93147180369123816490e-01
_LN2LO_64 = 1.90821492927058770002e-10
# the argument is clamped so that 2**k stays a normal number: exp(708) ~ 3e307,
# exp(-708) ~ 3e-308; beyond, the sigmoid is 0 or 1 to within 1e-307
_XMAX_64 = 708.0
# 1/j! for the Taylor polynomial of degree 13 on |r| <= ln2/2: truncation
# error r**14/14! < 5e-18, below half an ulp
_C64 = tuple(1.0 / math.factorial(j) for j in range(14))

_LOG2E_32 = np.float32(1.4426950408889634)
_LN2HI_32 = np.float32(0.693359375)  # 8 significant bits: k * _LN2HI_32 exact for |k| < 2**15
_LN2LO_32 = np.float32(-2.12194440e-4)
_XMAX_32 = np.float32(87.0)  # 2**126 * 1.x stays finite, 2**-126 normal
_HALF_32 = np.float32(0.5)
_ONE_32 = np.float32(1.0)
# degree 7 on |r| <= ln2/2: truncation error r**8/8! < 6e-9, below half an ulp of float32
_C32 = tuple(np.float32(1.0 / math.factorial(j)) for j in range(8))


@register_jitable(inline="always")
def _exp64(x):
    """``exp(x)`` for a float64, branch-free (vectorizable), within ~1 ulp for |x| <= 708."""
    x = min(max(x, -_XMAX_64), _XMAX_64)
    k = np.floor(x * _LOG2E_64 + 0.5)
    r = (x - k * _LN2HI_64) - k * _LN2LO_64
    p = _C64[13]
    p = p * r + _C64[12]
    p = p * r + _C64[11]
    p = p * r + _C64[10]
    p = p * r + _C64[9]
    p = p * r + _C64[8]
    p = p * r + _C64[7]
    p = p * r + _C64[6]
    p = p * r + _C64[5]
    p = p * r + _C64[4]
    p = p * r + _C64[3]
    p = p * r + _C64[2]
    p = p * r + _C64[1]
    p = p * r + _C64[0]
    # 2**k: the biased exponent k + 1023 in bits 52..62
    return p * _bits_as_f64((np.int64(k) + 1023) << 52)


@register_jitable(inline="always")
def _exp32(x):
    """``exp(x)`` for a float32 in float32 arithmetic, branch-free, within ~1 ulp for |x| <= 87."""
    x = min(max(x, -_XMAX_32), _XMAX_32)
    k = np.floor(x * _LOG2E_32 + _HALF_32)
    r = (x - k * _LN2HI_32) - k * _LN2LO_32
    p = _C32[7]
    p = p * r + _C32[6]
    p = p * r + _C32[5]
    p = p * r + _C32[4]
    p = p * r + _C32[3]
    p = p * r + _C32[2]
    p = p * r + _C32[1]
    p = p * r + _C32[0]
    # 2**k: the biased exponent k + 127 in bits 23..30 (Numba widens int32 sums to int64: narrow back)
    return p * _bits_as_f32(np.int32((np.int64(k) + 127) << 23))


def _vexp(x):  # pragma: no cover - typing stub, replaced by the overload below
    raise NotImplementedError


@overload(_vexp, inline="always")
def _ol_vexp(x):
    """Pick the exp of the argument's own precision (float32 stays float32: twice the SIMD lanes)."""
    if x == types.float32:
        return lambda x: _exp32(x)
    if x == types.float64:
        return lambda x: _exp64(x)
    return None


# ------------------------------------------------------------------- activations
@register_jitable
def _bias_act_rows(Z, b, act, r0, r1):
    """``Z[r] = act(Z[r] + b)`` for rows ``r0 <= r < r1`` of ``Z (n, n_out)``, in place."""
    n_out = Z.shape[1]
    one = Z.dtype.type(1.0)
    zero = Z.dtype.type(0.0)
    for r in range(r0, r1):
        z = Z[r]
        if act == _SIG:
            # 1 / (1 + exp(-z)): one vectorized pass over the row still in cache
            for j in range(n_out):
                z[j] = one / (one + _vexp(-(z[j] + b[j])))
        elif act == _RELU:
            for j in range(n_out):
                z[j] = max(z[j] + b[j], zero)
        elif act == _TANH:
            for j in range(n_out):
                z[j] = np.tanh(z[j] + b[j])
        elif act == _SOFT:
            # shift by the row maximum: exp(z - max) <= 1 never overflows
            zmax = z[0] + b[0]
            for j in range(n_out):
                z[j] = z[j] + b[j]
                zmax = max(zmax, z[j])
            s = zero
            for j in range(n_out):
                z[j] = _vexp(z[j] - zmax)
                s = s + z[j]
            for j in range(n_out):
                z[j] = z[j] / s
        else:  # identity
            for j in range(n_out):
                z[j] = z[j] + b[j]


@register_jitable
def _deriv_rows(A, out, act, r0, r1):
    """``out[r] *= act'(A[r])`` for rows ``r0 <= r < r1``, the derivative written from the output ``A``."""
    n = A.shape[1]
    one = A.dtype.type(1.0)
    zero = A.dtype.type(0.0)
    for r in range(r0, r1):
        a = A[r]
        o = out[r]
        if act == _SIG:
            for j in range(n):
                o[j] = o[j] * (a[j] * (one - a[j]))
        elif act == _TANH:
            for j in range(n):
                o[j] = o[j] * (one - a[j] * a[j])
        elif act == _RELU:
            for j in range(n):
                if a[j] <= zero:
                    o[j] = zero


@register_jitable
def _mul_rows(out, M, r0, r1):
    """``out[r] *= M[r]`` (the dropout multipliers of the forward pass)."""
    n = out.shape[1]
    for r in range(r0, r1):
        o = out[r]
        m = M[r]
        for j in range(n):
            o[j] = o[j] * m[j]


# ------------------------------------------------------------------------ losses
@register_jitable
def _output_delta_rows(A, y, output, loss, out, r0, r1, n):
    """Output delta of rows ``r0 <= r < r1``; ``n`` is the whole batch's size (the gradient's divisor).

    Returns the float64 loss summed over those rows and their count of first
    arg-max hits (see the contract for the formulas).
    """
    k = A.shape[1]
    dt = A.dtype.type
    one = dt(1.0)
    two = dt(2.0)
    nf = dt(n)
    loss_sum = 0.0
    n_correct = 0
    for r in range(r0, r1):
        a = A[r]
        d = out[r]
        t = y[r]
        # n_correct: the first arg-max
        best = 0
        for j in range(1, k):
            if a[j] > a[best]:
                best = j
        if best == t:
            n_correct += 1
        # diff = a - onehot(t), in the network's dtype
        for j in range(k):
            d[j] = a[j]
        d[t] = a[t] - one
        if loss == _MSE:
            # per-sample mean over classes of (a - y)^2, squared in float64
            s = 0.0
            for j in range(k):
                dj = np.float64(d[j])
                s = s + dj * dj
            loss_sum = loss_sum + s / k
            # the notebook's scaling 2 (a - y) / batch_size
            for j in range(k):
                d[j] = (two * d[j]) / nf
            if output == _SIG:
                for j in range(k):
                    d[j] = d[j] * (a[j] * (one - a[j]))
            elif output == _SOFT:
                # Jacobian of the softmax: a * (g - sum(g * a))
                s2 = dt(0.0)
                for j in range(k):
                    s2 = s2 + d[j] * a[j]
                for j in range(k):
                    d[j] = a[j] * (d[j] - s2)
        else:
            if output == _SOFT:
                loss_sum = loss_sum - math.log(max(np.float64(a[t]), LOG_EPS))
            else:
                # binary cross-entropy per unit: target 1 on the label's unit, 0 elsewhere
                s = 0.0
                for j in range(k):
                    s = s + math.log(max(1.0 - np.float64(a[j]), LOG_EPS))
                at = np.float64(a[t])
                s = s + (math.log(max(at, LOG_EPS)) - math.log(max(1.0 - at, LOG_EPS)))
                loss_sum = loss_sum - s
            for j in range(k):
                d[j] = d[j] / nf
    return loss_sum, n_correct


# ----------------------------------------------------------------------- dropout
@register_jitable(inline="always")
def _mix64(z):
    """splitmix64 finalizer, wrapping uint64 arithmetic."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@register_jitable
def _mask_key(seed, step, layer):
    """``mix64(mix64(seed + G (layer + 1)) + G (step + 1))`` as in the contract."""
    inner = _mix64(seed + _G * (np.uint64(layer) + _U1))
    return _mix64(inner + _G * (np.uint64(step) + _U1))


@register_jitable
def _mask_rows(M, key, thr, scale, r0, r1):
    """Fill rows ``r0 <= r < r1`` of ``M (n_rows, n_units)`` with ``scale`` (kept) or 0.

    Unit ``(r, u)`` is kept iff ``mix64(key + G (r n_units + u + 1)) >> 40 < thr``,
    with ``r`` the row within the whole minibatch.
    """
    n_units = M.shape[1]
    zero = M.dtype.type(0.0)
    s = M.dtype.type(scale)
    t = np.uint64(thr)
    for r in range(r0, r1):
        m = M[r]
        base = np.uint64(r * n_units) + _U1
        for u in range(n_units):
            h = _mix64(key + _G * (base + np.uint64(u)))
            m[u] = s if (h >> _S40) < t else zero


@register_jitable
def _dropout_rows(A, M, A_in, key, thr, scale, r0, r1):
    """Draw the mask rows into ``M`` and write ``A_in = A * M`` for rows ``r0 <= r < r1``."""
    _mask_rows(M, key, thr, scale, r0, r1)
    n = A.shape[1]
    for r in range(r0, r1):
        a = A[r]
        m = M[r]
        o = A_in[r]
        for j in range(n):
            o[j] = a[j] * m[j]


# ------------------------------------------------------------------------ update
@register_jitable
def _update_rows(W, b, G, D, lr, l2, l1, o0, o1):
    """SGD step on rows ``o0 <= o < o1`` of ``W`` and ``b``.

    ``G (o1 - o0, n_in)`` holds ``(D.T @ A)[o0:o1]`` and ``D (n, o1 - o0)`` the
    matching columns of the delta (both indexed from 0).

    ``W <- decay W - lr l1 sign(W_old) - lr G`` with ``decay = max(0, 1 - lr l2)``
    (L2 as weight decay, clamped so that a huge ``lr l2`` cannot flip signs);
    ``b <- b - lr sum(D, 0)``: biases are never penalized.
    """
    dt = W.dtype.type
    n_in = W.shape[1]
    decay = max(0.0, 1.0 - lr * l2)
    dec = dt(decay)
    lr_t = dt(lr)
    l1_t = dt(lr * l1)
    zero = dt(0.0)
    for o in range(o0, o1):
        w = W[o]
        g = G[o - o0]
        if l1 != 0.0:
            for j in range(n_in):
                wj = w[j]
                sgn = dt(wj > zero) - dt(wj < zero)
                w[j] = (wj * dec - l1_t * sgn) - lr_t * g[j]
        elif decay != 1.0:
            for j in range(n_in):
                w[j] = w[j] * dec - lr_t * g[j]
        else:
            for j in range(n_in):
                w[j] = w[j] - lr_t * g[j]
    n = D.shape[0]
    for o in range(o0, o1):
        s = zero
        for r in range(n):
            s = s + D[r, o - o0]
        b[o] = b[o] - lr_t * s


# -------------------------------------------------------------------- parameters
@register_jitable
def _unpack(theta, sizes):
    """Views ``W_l (sizes[l+1], sizes[l])`` and ``b_l (sizes[l+1],)`` into the flat parameter vector."""
    L = sizes.shape[0] - 1
    Ws = []
    bs = []
    off = 0
    for i in range(L):
        n_out = sizes[i + 1]
        n_in = sizes[i]
        Ws.append(theta[off : off + n_out * n_in].reshape((n_out, n_in)))
        off += n_out * n_in
        bs.append(theta[off : off + n_out])
        off += n_out
    return Ws, bs


# ===================================================================== entries
class LazyKernel:
    """An entry kernel compiled per dtype on first use with an explicit signature.

    ``kernel[np.float32]`` (or ``kernel[np.float32, True]`` for the parallel
    variant of a ``prange`` kernel) returns a Numba dispatcher compiled, or
    loaded from the on-disk cache, for that dtype only.  Compilation is then
    disabled, so an argument of the wrong type raises instead of silently
    compiling another specialization.

    Numba's cache index does not record compiler flags, so each variant is
    compiled from a copy of the function whose ``__qualname__`` names its
    flags (``train_epoch__par1_fmsafe_bc0``): changing a flag in
    :mod:`fastmlp.config` never loads a stale binary.
    """

    def __init__(self, py_func, make_sig, parallel: bool = False) -> None:
        self.py_func = py_func
        self.make_sig = make_sig
        self.parallel = parallel
        self._dispatchers: dict[tuple[str, bool], object] = {}
        self._lock = threading.Lock()
        self.__name__ = py_func.__name__
        self.__doc__ = py_func.__doc__

    def __repr__(self) -> str:
        return f"LazyKernel({self.__name__!r}, compiled={sorted(self._dispatchers)})"

    def __getitem__(self, key):
        dtype, parallel = key if isinstance(key, tuple) else (key, False)
        k = (np.dtype(dtype).name, bool(parallel and self.parallel and config.PARALLEL))
        disp = self._dispatchers.get(k)
        if disp is None:
            with self._lock:
                disp = self._dispatchers.get(k)
                if disp is None:
                    disp = self._compile(*k)
                    self._dispatchers[k] = disp
        return disp

    def is_compiled(self, dtype, parallel: bool = False) -> bool:
        """Whether ``self[dtype, parallel]`` is ready (compiled or loaded) in this process."""
        return (np.dtype(dtype).name, bool(parallel and self.parallel and config.PARALLEL)) in self._dispatchers

    def _compile(self, dtype_name: str, parallel: bool):
        opts = config.jit_options(parallel=parallel)
        fm = config.FASTMATH
        tag = "safe" if isinstance(fm, frozenset) else ("full" if fm else "off")
        f = self.py_func
        variant = types_mod.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
        variant.__qualname__ = f"{f.__qualname__}__par{int(parallel)}_fm{tag}_bc{int(config.BOUNDSCHECK)}"
        variant.__module__ = f.__module__
        variant.__doc__ = f.__doc__
        sig = self.make_sig(numba.from_dtype(np.dtype(dtype_name)))
        return numba.njit(sig, **opts)(variant)


def _kernel(make_sig, parallel: bool = False):
    def deco(fn):
        return LazyKernel(fn, make_sig, parallel)

    return deco


def _a2(T, ro=False):
    return types.Array(T, 2, "C", readonly=ro)


def _a1(T, ro=False):
    return types.Array(T, 1, "C", readonly=ro)


_I64_RO = types.Array(types.int64, 1, "C", readonly=True)
_F64_RO = types.Array(types.float64, 1, "C", readonly=True)
_i64 = types.int64
_f64 = types.float64


@_kernel(lambda T: types.void(_a2(T, True), _a2(T, True), _a1(T, True), _i64, _a2(T)))
def forward(A, W, b, act, out):
    """``out = act(A @ W.T + b)``.

    Parameters
    ----------
    A : ndarray (n_samples, n_in)
    W : ndarray (n_out, n_in)
    b : ndarray (n_out,)
    act : int
        Activation code.
    out : ndarray (n_samples, n_out)
        Written in place.
    """
    n = A.shape[0]
    if n == 0:
        return
    np.dot(A, W.T, out)  # BLAS gemm
    _bias_act_rows(out, b, act, 0, n)


@_kernel(lambda T: types.Tuple((_f64, _i64))(_a2(T, True), _I64_RO, _i64, _i64, _a2(T)))
def output_delta(A, y, output, loss, out):
    """Output delta ``out (n_samples, n_classes)`` from activations ``A`` and labels ``y (n_samples,)``.

    Returns ``(loss_sum, n_correct)``.
    """
    n = A.shape[0]
    return _output_delta_rows(A, y, output, loss, out, 0, n, n)


@_kernel(lambda T: types.void(_a2(T, True), _a2(T, True), _a2(T, True), _i64, _a2(T, True), types.boolean, _a2(T)))
def hidden_delta(D_next, W_next, A, act, mask, use_mask, out):
    """``out = (D_next @ W_next) * mask * act'(A)``.

    Parameters
    ----------
    D_next : ndarray (n_samples, n_next)
    W_next : ndarray (n_next, n_units)
    A : ndarray (n_samples, n_units)
        The activation output before dropout.
    act : int
    mask : ndarray (n_samples, n_units)
        Dropout multipliers, used only when ``use_mask``.
    use_mask : bool
    out : ndarray (n_samples, n_units)
    """
    n = A.shape[0]
    if n == 0:
        return
    np.dot(D_next, W_next, out)
    if use_mask:
        _mul_rows(out, mask, 0, n)
    _deriv_rows(A, out, act, 0, n)


@_kernel(lambda T: types.void(_a2(T), _a1(T), _a2(T, True), _a2(T, True), _f64, _f64, _f64))
def inplace_update(W, b, D, A, lr, l2, l1):
    """SGD step on ``W (n_out, n_in)`` and ``b (n_out,)`` from ``D (n, n_out)`` and ``A (n, n_in)``.

    ``W <- max(0, 1 - lr l2) W - lr l1 sign(W) - lr D.T @ A``; ``b <- b - lr D.sum(0)``.
    """
    G = np.empty(W.shape, W.dtype)
    np.dot(D.T, A, G)
    _update_rows(W, b, G, D, lr, l2, l1, 0, W.shape[0])


@_kernel(lambda T: types.void(types.uint64, _i64, _i64, _i64, _f64, _a2(T)))
def dropout_mask(seed, step, layer, thr, scale, out):
    """Fill ``out (n_rows, n_units)`` with ``scale`` where the counter hash keeps a unit, else 0."""
    key = _mask_key(seed, step, layer)
    _mask_rows(out, key, thr, scale, 0, out.shape[0])


@_kernel(lambda T: types.void(_a2(T, True), _a1(T, True), _I64_RO, _i64, _i64, _a2(T)))
def forward_network(X, theta, sizes, hidden_act, output_act, out):
    """Output activations ``out (n_samples, n_classes)`` of the network with flat parameters ``theta``.

    ``sizes`` are the layer widths ``[n_in, n_1, ..., n_classes]``; ``theta``
    holds ``W_0, b_0, W_1, b_1, ...`` one after the other, each C-ordered.
    """
    Ws, bs = _unpack(theta, sizes)
    L = len(Ws)
    n = X.shape[0]
    A = X
    for i in range(L):
        if i == L - 1:
            Z = out
        else:
            Z = np.empty((n, sizes[i + 1]), X.dtype)
        np.dot(A, Ws[i].T, Z)
        _bias_act_rows(Z, bs[i], output_act if i == L - 1 else hidden_act, 0, n)
        A = Z


def _train_epoch_sig(T):
    A, I, F = _a2(T, True), _I64_RO, _F64_RO
    args = (A, I, I, _a1(T), I, F, _i64, _i64, _i64, _i64, _f64, _f64, I, F, types.uint64, _i64, _i64)
    return types.Tuple((_f64, _i64))(*args)


@_kernel(_train_epoch_sig, parallel=True)
def train_epoch(
    X, y, order, theta, sizes, lrs, hidden_act, output_act, loss, batch_size, l2, l1, thresholds, scales, seed, step0,
    n_chunks,
):  # fmt: skip
    """One epoch of minibatch SGD on the flat parameters ``theta``, in place.

    Parameters
    ----------
    X : ndarray (n_samples, n_in)
    y : ndarray of int64 (n_samples,)
    order : ndarray of int64 (n_used,)
        Rows in visiting order; step ``i`` takes ``order[i*bs:(i+1)*bs]``.
    theta : ndarray (n_params,)
        ``W_0, b_0, W_1, b_1, ...``; updated in place.
    sizes : ndarray of int64 (n_layers + 1,)
    lrs : ndarray of float64 (n_steps,)
    hidden_act, output_act, loss : int
    batch_size : int
    l2, l1 : float
    thresholds : ndarray of int64 (n_layers,)
        24-bit keep thresholds of each layer input; ``2**24`` means no dropout.
    scales : ndarray of float64 (n_layers,)
        Multiplier of kept units.
    seed : uint64
    step0 : int
        Global step number of the first minibatch (for the masks).
    n_chunks : int
        Each minibatch is split into ``n_chunks`` row blocks for the forward
        and delta passes and each ``W`` into ``n_chunks`` row blocks for the
        update, run in parallel (``prange``) when compiled parallel.

    Returns
    -------
    loss_sum : float
        Data loss summed over the epoch, measured before each update.
    n_correct : int
    """
    dt = X.dtype
    Ws, bs_ = _unpack(theta, sizes)
    L = len(Ws)
    n = order.shape[0]
    bsz = min(batch_size, n)
    n_steps = (n + batch_size - 1) // batch_size
    # buffers, allocated once per epoch at the full batch size
    acts = [np.empty((bsz, sizes[i]), dt) for i in range(L + 1)]  # raw activations; acts[0] = gathered X
    drop = [thresholds[i] < _FULL for i in range(L)]
    masks = [np.empty((bsz if drop[i] else 0, sizes[i]), dt) for i in range(L)]
    ins = [np.empty((bsz if drop[i] else 0, sizes[i]), dt) for i in range(L)]  # dropped-out layer inputs
    deltas = [np.empty((bsz, sizes[i + 1]), dt) for i in range(L)]
    grads = [np.empty((sizes[i + 1], sizes[i]), dt) for i in range(L)]
    max_out = 0
    for i in range(L):
        max_out = max(max_out, sizes[i + 1])
    # per chunk: a contiguous copy of its column block of a delta, so that the
    # gradient block D[:, o0:o1].T @ A goes to BLAS as a plain transposed matrix
    dblk = np.empty((n_chunks, bsz * ((max_out + n_chunks - 1) // n_chunks)), dt)
    ybuf = np.empty(bsz, np.int64)
    part_loss = np.zeros(n_chunks)
    part_corr = np.zeros(n_chunks, np.int64)
    loss_sum = 0.0
    n_correct = 0
    for step in range(n_steps):
        start = step * batch_size
        nb = min(batch_size, n - start)
        lr = lrs[step]
        gstep = step0 + step
        # ---- phase 1: row blocks; gather, forward, output delta and every
        # hidden delta (all with the not-yet-updated weights, as the reference)
        for c in prange(n_chunks):
            r0 = (c * nb) // n_chunks
            r1 = ((c + 1) * nb) // n_chunks
            part_loss[c] = 0.0
            part_corr[c] = 0
            if r1 > r0:
                A0 = acts[0]
                for r in range(r0, r1):
                    src = order[start + r]
                    A0[r, :] = X[src, :]
                    ybuf[r] = y[src]
                for i in range(L):
                    if drop[i]:
                        key = _mask_key(seed, gstep, i)
                        _dropout_rows(acts[i], masks[i], ins[i], key, thresholds[i], scales[i], r0, r1)
                        A_in = ins[i][r0:r1]
                    else:
                        A_in = acts[i][r0:r1]
                    Z = acts[i + 1][r0:r1]
                    np.dot(A_in, Ws[i].T, Z)
                    _bias_act_rows(Z, bs_[i], output_act if i == L - 1 else hidden_act, 0, r1 - r0)
                ls, nc = _output_delta_rows(acts[L], ybuf, output_act, loss, deltas[L - 1], r0, r1, nb)
                part_loss[c] = ls
                part_corr[c] = nc
                for i in range(L - 1, 0, -1):
                    Dp = deltas[i - 1][r0:r1]
                    np.dot(deltas[i][r0:r1], Ws[i], Dp)
                    if drop[i]:
                        _mul_rows(deltas[i - 1], masks[i], r0, r1)
                    _deriv_rows(acts[i], deltas[i - 1], hidden_act, r0, r1)
        for c in range(n_chunks):
            loss_sum = loss_sum + part_loss[c]
            n_correct = n_correct + part_corr[c]
        # ---- phase 2: row blocks of every W; gradient gemm and update
        for c in prange(n_chunks):
            for i in range(L):
                n_out = sizes[i + 1]
                o0 = (c * n_out) // n_chunks
                o1 = ((c + 1) * n_out) // n_chunks
                w = o1 - o0
                if w > 0:
                    D = deltas[i]
                    Dc = dblk[c, : nb * w].reshape((nb, w))
                    for r in range(nb):
                        for j in range(w):
                            Dc[r, j] = D[r, o0 + j]
                    A_in = ins[i][:nb] if drop[i] else acts[i][:nb]
                    Gc = grads[i][o0:o1]
                    np.dot(Dc.T, A_in, Gc)
                    _update_rows(Ws[i], bs_[i], Gc, Dc, lr, l2, l1, o0, o1)
    return loss_sum, n_correct
