"""Private Numba kernels of the ``numba`` backend.

Nothing here validates: :mod:`fastmlp.backends.numba` is the only caller and
:class:`fastmlp.backends.Backend` validated every argument before it.  All
arrays are C-contiguous and of one float dtype (float32 or float64); labels,
orders and offsets are int64, sample weights and learning rates float64.

Entry kernels are :class:`LazyKernel` objects: ``kernel[dtype]`` compiles the
kernel with an explicit signature for that dtype on first use (or loads it
from Numba's on-disk cache), so importing this module compiles nothing.
Helpers (``_name``) have no signature and are compiled into their callers.
The formulas are those of :mod:`fastmlp.backends.contract`, in the rounding
order of :mod:`fastmlp.backends.reference`.

Numerics
--------
* The sigmoid, the softmax and the ``exp`` output use :func:`_exp32_py`/:func:`_exp64_py`,
  a branch-free ``exp`` (Cody–Waite range reduction, a Taylor polynomial, the
  power of two built in the exponent bits) that LLVM vectorizes; a scalar
  ``math.exp`` call does not vectorize without SVML and costs several ns an
  element.  Its argument is capped at the contract's :data:`~fastmlp.backends.contract.EXP_CAP`.
* Weights live in one flat vector per network (``theta``: ``W_0, b_0, W_1, b_1, ...``);
  the views ``W_l (n_out, n_in)`` and ``b_l (n_out,)`` are rebuilt from offsets
  inside the kernel, so one signature serves every depth.  The optimizer state
  is a matrix ``S (n_slots, n_params)`` whose rows have theta's layout, and the
  epoch's gradient buffer has it too, so the update is one pass over flat
  blocks of ``theta``, ``S`` and the gradient.
* Targets reach the loss as a dense row ``t``: labels become ``onehot(y)`` (or
  ``y`` itself for one output unit) in a per-minibatch buffer.
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
from numba.core import cgutils
from numba.extending import intrinsic, overload, register_jitable
from numba.np.arrayobj import make_array, populate_array

from fastmlp import config
from fastmlp.backends.contract import (
    ACT_CODES,
    EPS_MODES,
    EXP_CAP,
    GOLDEN,
    KEEP_BITS,
    LOSS_CODES,
    MIX1,
    MIX2,
    OPTIMIZER_CODES,
)

# integer codes, frozen into the kernels as compile-time constants
_IDENT = ACT_CODES["identity"]
_SIG = ACT_CODES["sigmoid"]
_TANH = ACT_CODES["tanh"]
_RELU = ACT_CODES["relu"]
_SOFT = ACT_CODES["softmax"]
_EXP = ACT_CODES["exp"]
_MSE = LOSS_CODES["mse"]
_CE = LOSS_CODES["ce"]
_SQE = LOSS_CODES["squared_error"]
_POIS = LOSS_CODES["poisson"]
_SGD = OPTIMIZER_CODES["sgd"]
_MOM = OPTIMIZER_CODES["momentum"]
_NAG = OPTIMIZER_CODES["nesterov"]
_GRAD = OPTIMIZER_CODES["gradient"]
_TORCH = EPS_MODES["torch"]
_FULL = 1 << KEEP_BITS

_G = np.uint64(GOLDEN)
_M1 = np.uint64(MIX1)
_M2 = np.uint64(MIX2)
_U1 = np.uint64(1)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_S40 = np.uint64(40)

# probabilities inside a log are clipped to [eps, 1 - eps], eps the dtype's machine epsilon (the contract)
_EPS_32 = np.float32(np.finfo(np.float32).eps)
_EPS_64 = float(np.finfo(np.float64).eps)


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


def _minmax(is_max):
    """An intrinsic ``min``/``max`` of two numbers with Python's semantics (``min(a, b)`` is ``b`` only when
    ``b < a``: a NaN first argument comes out), emitted as a compare and a select: the builtins compile a
    function of their own for every pair of argument types (a tenth of a second each)."""

    def impl(typingctx, a, b):
        if not (isinstance(a, (types.Integer, types.Float)) and isinstance(b, (types.Integer, types.Float))):
            return None
        ty = typingctx.unify_types(a, b)
        if ty is None:
            return None
        if isinstance(ty, types.Literal):  # pragma: no cover - two literals
            ty = ty.literal_type

        def codegen(context, builder, signature, args):
            x = context.cast(builder, args[0], signature.args[0], ty)
            y = context.cast(builder, args[1], signature.args[1], ty)
            if isinstance(ty, types.Float):
                take_y = builder.fcmp_ordered(">" if is_max else "<", y, x)
            else:
                op = ">" if is_max else "<"
                take_y = builder.icmp_signed(op, y, x) if ty.signed else builder.icmp_unsigned(op, y, x)
            return builder.select(take_y, y, x)

        return ty(a, b), codegen

    return intrinsic(impl)


_min = _minmax(False)
_max = _minmax(True)


# float64: ln 2 split so that k * _LN2HI_64 is exact for |k| < 2**11 (Cody–Waite)
_LOG2E_64 = 1.4426950408889634
_LN2HI_64 = 6.93147180369123816490e-01
_LN2LO_64 = 1.90821492927058770002e-10
# the argument is capped at the contract's EXP_CAP (exp(708) ~ 3e307 stays finite) and floored where 2**k
# stays a normal number (exp(-708) ~ 3e-308 instead of a subnormal or 0: a sigmoid or softmax is then off by
# less than 1e-307)
_XMAX_64 = float(EXP_CAP["float64"])
_XMIN_64 = -708.0
# 1/j! for the Taylor polynomial of degree 13 on |r| <= ln2/2: truncation
# error r**14/14! < 5e-18, below half an ulp
_C64 = tuple(1.0 / math.factorial(j) for j in range(14))

_LOG2E_32 = np.float32(1.4426950408889634)
_LN2HI_32 = np.float32(0.693359375)  # 8 significant bits: k * _LN2HI_32 exact for |k| < 2**15
_LN2LO_32 = np.float32(-2.12194440e-4)
# cap 88: k = 127, 2**127 * 1.x stays finite (exp(88) ~ 1.65e38); floor -87: k >= -126 keeps 2**k normal
_XMAX_32 = np.float32(EXP_CAP["float32"])
_XMIN_32 = np.float32(-87.0)
_HALF_32 = np.float32(0.5)
_ONE_32 = np.float32(1.0)
# degree 7 on |r| <= ln2/2: truncation error r**8/8! < 6e-9, below half an ulp of float32
_C32 = tuple(np.float32(1.0 / math.factorial(j)) for j in range(8))


def _exp64_py(x):
    """``exp(x)`` for a float64, branch-free (vectorizable), within ~1 ulp on [-708, 708]."""
    x = _min(_max(x, _XMIN_64), _XMAX_64)
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


def _exp32_py(x):
    """``exp(x)`` for a float32 in float32 arithmetic, branch-free, within ~1 ulp on [-87, 88]."""
    x = _min(_max(x, _XMIN_32), _XMAX_32)
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


# The range reduction must be evaluated as written: reassociating ``(x - k ln2_hi) - k ln2_lo`` into
# ``x - k ln2`` (allowed by fastmath's "reassoc") costs up to ~100 ulp near the cap, so the exp is compiled
# with the kernels' fastmath flags less "reassoc" (the overload's own jit options); LLVM still inlines it into
# the callers' loops (fast-math flags are per instruction) and vectorizes them.
_EXP_OPTS = {"fastmath": config.fastmath_without_reassoc(), "error_model": "numpy"}


def _vexp(x):  # pragma: no cover - typing stub, replaced by the overload below
    raise NotImplementedError


@overload(_vexp, jit_options=_EXP_OPTS)
def _ol_vexp(x):
    """Pick the exp of the argument's own precision (float32 stays float32: twice the SIMD lanes)."""
    if x == types.float32:
        return _exp32_py
    if x == types.float64:
        return _exp64_py
    return None


def _clip_prob(a):  # pragma: no cover - typing stub, replaced by the overload below
    raise NotImplementedError


@overload(_clip_prob, inline="always")
def _ol_clip_prob(a):
    """``clip(a, eps, 1 - eps)`` in the argument's own dtype, ``eps`` its machine epsilon (scikit-learn's clip)."""
    if a == types.float32:
        return lambda a: _min(_max(a, _EPS_32), _ONE_32 - _EPS_32)
    if a == types.float64:
        return lambda a: _min(_max(a, _EPS_64), 1.0 - _EPS_64)
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
                z[j] = _max(z[j] + b[j], zero)
        elif act == _TANH:
            for j in range(n_out):
                z[j] = np.tanh(z[j] + b[j])
        elif act == _EXP:
            for j in range(n_out):
                z[j] = _vexp(z[j] + b[j])
        elif act == _SOFT:
            # shift by the row maximum: exp(z - max) <= 1 never overflows
            zmax = z[0] + b[0]
            for j in range(n_out):
                z[j] = z[j] + b[j]
                zmax = _max(zmax, z[j])
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
def _copy_row(src, dst):
    """``dst[:] = src`` as a loop (Numba's slice assignment compiles a shape-error message formatter: seconds)."""
    for j in range(dst.shape[0]):
        dst[j] = src[j]


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
def _target_row(Yl, Yd, dense, src, t):
    """Target row ``t (k,)`` of sample ``src``: ``Yd[src]``, or from the label ``onehot(Yl[src])`` (``Yl[src]``
    itself when ``k == 1``)."""
    k = t.shape[0]
    if dense:
        for j in range(k):
            t[j] = Yd[src, j]
    else:
        for j in range(k):
            t[j] = 0.0
        if k == 1:
            t[0] = Yl[src]
        else:
            t[Yl[src]] = 1.0


@register_jitable
def _argmax(a):
    """The first index of the maximum (NumPy's ``argmax``)."""
    best = 0
    for j in range(1, a.shape[0]):
        if a[j] > a[best]:
            best = j
    return best


@register_jitable
def _sample_loss(a, t, output, loss):
    """Data loss ``l_i`` of one row (float64), the contract's table."""
    k = a.shape[0]
    li = 0.0
    if loss == _MSE or loss == _SQE:
        for j in range(k):
            dj = np.float64(a[j]) - np.float64(t[j])
            li = li + dj * dj
        li = li / k
        if loss == _SQE:
            li = 0.5 * li
    elif loss == _POIS:
        # t log(t / a) - t + a, with 0 log 0 = 0
        for j in range(k):
            tj = np.float64(t[j])
            aj = np.float64(a[j])
            x = 0.0
            if tj != 0.0:
                x = tj * math.log(tj / aj)
            li = li + ((x - tj) + aj)
    elif output == _SOFT:
        for j in range(k):
            tj = np.float64(t[j])
            if tj != 0.0:
                li = li - tj * math.log(np.float64(_clip_prob(a[j])))
    else:  # binary cross-entropy of every unit
        for j in range(k):
            p = np.float64(_clip_prob(a[j]))
            tj = np.float64(t[j])
            uj = 1.0 - tj
            x = 0.0
            if tj != 0.0:
                x = tj * math.log(p)
            if uj != 0.0:
                x = x + uj * math.log(1.0 - p)
            li = li - x
    return li


@register_jitable
def _output_rows(A, T, output, loss, subset, wts, weighted, s, out, r0, r1):
    """Output delta ``out`` and loss of rows ``r0 <= r < r1`` against the target rows ``T``.

    ``s`` is the minibatch's weight sum (its row count when not ``weighted``):
    ``c_i = wts[i] / s`` (in float64, then rounded) multiplies ``(a - t)``,
    or the difference is divided by ``s`` as the notebook writes it
    (``2 (a - t) / n`` for its MSE).  ``subset`` counts a row as correct when
    every unit is on the target's side of 0.5 (dense targets, sigmoid output),
    else when the arg-maxes agree (one unit: both above 0.5 or neither).

    Returns ``(sum_i l_i, n_correct)``, the sum weighted by ``wts`` when ``weighted``.
    """
    k = A.shape[1]
    dt = A.dtype.type
    one = dt(1.0)
    two = dt(2.0)
    half = dt(0.5)
    nf = dt(s)
    loss_sum = 0.0
    n_correct = 0
    for r in range(r0, r1):
        a = A[r]
        t = T[r]
        d = out[r]
        if subset:
            ok = True
            for j in range(k):
                if (a[j] > half) != (t[j] > half):
                    ok = False
        elif k == 1:
            ok = (a[0] > half) == (t[0] > half)
        else:
            ok = _argmax(a) == _argmax(t)
        if ok:
            n_correct += 1
        li = _sample_loss(a, t, output, loss)
        loss_sum = loss_sum + (li * wts[r] if weighted else li)
        for j in range(k):
            d[j] = a[j] - t[j]
        if loss == _MSE:
            for j in range(k):
                d[j] = two * d[j]
        if weighted:
            c = dt(wts[r] / s)
            for j in range(k):
                d[j] = d[j] * c
        else:
            for j in range(k):
                d[j] = d[j] / nf
        if loss == _MSE:
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
    return loss_sum, n_correct


# ----------------------------------------------------------------------- dropout
@register_jitable
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
def _sumsq(w):
    """``sum(w**2)`` in float64."""
    s = 0.0
    for j in range(w.shape[0]):
        x = np.float64(w[j])
        s = s + x * x
    return s


@register_jitable
def _opt_step(w, g, s0, s1, opt, lr, dec, l1s, alpha_s, mu, b1, b2, a_adam, d_adam, eps):
    """One optimizer step on a flat block ``w`` of parameters with gradient ``g``, in place (the contract's table).

    ``s0``/``s1`` are the matching blocks of the optimizer's state slots (unused
    ones may be anything).  The gradient is ``g + alpha_s w``; the weights become
    ``(dec w - l1s sign(w)) + u``, ``dec = max(0, 1 - lr l2)`` and
    ``l1s = lr l1`` (``1`` and ``0`` for biases).  Adam's update is
    ``u = -a_adam m / (sqrt(v) / d_adam + eps)``: ``a_adam = lr sqrt(c2) / c1``
    and ``d_adam = 1`` (scikit-learn) or ``lr / c1`` and ``sqrt(c2)`` (PyTorch).
    The ``gradient`` optimizer writes the gradient to ``s0`` and leaves ``w``.
    Every scalar arrives in float64 and is rounded to the dtype once.
    """
    dt = w.dtype.type
    n = w.shape[0]
    zero = dt(0.0)
    lr_t = dt(lr)
    dec_t = dt(dec)
    l1_t = dt(l1s)
    al_t = dt(alpha_s)
    if opt == _GRAD:
        for j in range(n):
            s0[j] = g[j] + al_t * w[j]
    elif opt == _SGD:
        for j in range(n):
            wj = w[j]
            gj = g[j] + al_t * wj
            w[j] = (wj * dec_t - l1_t * (dt(wj > zero) - dt(wj < zero))) - lr_t * gj
    elif opt == _MOM or opt == _NAG:
        mu_t = dt(mu)
        # u = v (momentum) or mu v - lr g (Nesterov), as one expression: 1 v - 0 g is exactly v
        u_mu = mu_t if opt == _NAG else dt(1.0)
        u_lr = lr_t if opt == _NAG else zero
        for j in range(n):
            wj = w[j]
            gj = g[j] + al_t * wj
            v = mu_t * s0[j] - lr_t * gj
            s0[j] = v
            w[j] = (wj * dec_t - l1_t * (dt(wj > zero) - dt(wj < zero))) + (u_mu * v - u_lr * gj)
    else:  # adam, adamw
        b1_t = dt(b1)
        c1_t = dt(1.0 - b1)
        b2_t = dt(b2)
        c2_t = dt(1.0 - b2)
        na_t = -dt(a_adam)
        d_t = dt(d_adam)
        e_t = dt(eps)
        for j in range(n):
            wj = w[j]
            gj = g[j] + al_t * wj
            m = b1_t * s0[j] + c1_t * gj
            v = b2_t * s1[j] + c2_t * (gj * gj)
            s0[j] = m
            s1[j] = v
            w[j] = (wj * dec_t - l1_t * (dt(wj > zero) - dt(wj < zero))) + na_t * m / (np.sqrt(v) / d_t + e_t)


@register_jitable
def _col_sums(D, out):
    """``out = D.sum(0)``, row by row."""
    w = D.shape[1]
    for j in range(w):
        out[j] = 0.0
    for r in range(D.shape[0]):
        d = D[r]
        for j in range(w):
            out[j] = out[j] + d[j]


# ------------------------------------------------------------------ register tiles
# The two products of an epoch, written so that LLVM emits register-tiled FMA code (the structure of the
# Cython backend's AVX-512 kernels): fixed tile shapes, the accumulators of a tile in registers for the
# whole reduction, the innermost loop unit-stride.  No BLAS call in the epoch.
#
# * NT (``Z = A W^T``: the forward product): a tile of 4 rows of ``A`` by 4 rows of ``W`` (AVX-512) or 3
#   (AVX2 and narrower: 16 accumulators spill from 16 registers), scalar accumulators over a unit-stride loop
#   along ``k``; LLVM vectorizes the loop into 16 (12) vector reductions (``reassoc``) and sums each vector
#   once at the end.
# * TN (``C = P^T R`` with a packed panel ``P``: the weight gradient ``D^T A`` and the hidden delta
#   ``D W``): a tile of 4 rows of ``C`` by _TN_VECS vectors (at least 16 columns) along ``k``, accumulated
#   in a fixed-size array on the stack (:func:`_tile_acc`) over the whole reduction; with a literal trip
#   count LLVM vectorizes and unrolls the lane loop and keeps the array in registers.  The columns go in
#   blocks of the tile width; the last block is shifted left to end at the last column (recomputing a few
#   columns with the same bits), so no lane reads past a row.
#
# Edge tiles repeat the last valid row or output (computed, not stored twice with other values), so every
# tile has the fixed shape.  Each output element is summed in an order that depends on the shapes only.


def _vector_bits() -> int:
    """Width of the SIMD registers LLVM targets on this CPU: 512 (AVX-512F), 256 (AVX) or 128."""
    feats = numba.core.config.CPU_FEATURES
    if feats is None:
        try:
            import llvmlite.binding as llvm

            feats = llvm.get_host_cpu_features().flatten()
        except Exception:  # pragma: no cover - llvmlite without host feature detection
            feats = ""
    flags = set(feats.split(","))
    if "+avx512f" in flags:
        return 512
    if "+avx" in flags:
        return 256
    return 128


#: SIMD register width in bits (the tile widths follow it)
VECTOR_BITS = _vector_bits()
#: vectors along ``k`` of a TN tile (4 rows x 4 vectors = 16 accumulators of 32 registers; 4 x 2 of 16)
_TN_VECS = 4 if VECTOR_BITS >= 512 else 2
_TN_ROWS = 4
#: at least this many columns in a TN tile: LLVM fully unrolls a lane loop of 8 or 12 before its loop vectorizer
#: runs, and its SLP vectorizer then leaves the unrolled lanes scalar (AVX2 float64's 2 x 4 lanes: 4.3 GFLOP/s
#: on one Zen 3 core, 17-25 with 16 columns)
_TN_MIN_COLS = 16


def _tn_cols(bitwidth: int) -> int:
    """Columns of a TN tile for elements of ``bitwidth`` bits: ``_TN_VECS`` SIMD vectors, at least 16."""
    return max(_TN_MIN_COLS, _TN_VECS * (VECTOR_BITS // bitwidth))

#: the forward product takes W in slabs of about this many bytes (kept in L2 across the row tiles)
_NT_SLAB_BYTES = 256 * 1024


@intrinsic
def _wide_vectors(typingctx):
    """Let LLVM vectorize the calling function with the full SIMD width.

    LLVM targets 256-bit vectors on AVX-512 CPUs unless a function asks for
    more (``"prefer-vector-width"="512"``); the tiles are sized for 32 vector
    registers of 512 bits.  A no-op on other CPUs.
    """

    def codegen(context, builder, signature, args):
        if VECTOR_BITS >= 512:
            try:  # llvmlite checks attribute names against a fixed list: add the string attribute past it
                set.add(builder.function.attributes, '"prefer-vector-width"="512"')
            except Exception:  # pragma: no cover - a llvmlite without this representation: narrower vectors
                pass
        return context.get_dummy_value()

    return types.none(), codegen


def _tn_width(a):  # pragma: no cover - typing stub, replaced by the overload below
    raise NotImplementedError


@overload(_tn_width, inline="always")
def _ol_tn_width(a):
    """Columns of a TN tile for ``a``'s dtype (:func:`_tn_cols`)."""
    n = _tn_cols(a.dtype.bitwidth)
    return lambda a: n


@intrinsic
def _tile_acc(typingctx, like):
    """An uninitialised 1-D array of ``_TN_ROWS`` times :func:`_tn_width` elements of ``like``'s dtype on the
    caller's stack (an ``alloca``: LLVM keeps it in registers when every index is known).  It lives as long
    as the calling function's frame: never return it."""
    dt = like.dtype
    n = _TN_ROWS * _tn_cols(dt.bitwidth)
    aryty = types.Array(dt, 1, "C")

    def codegen(context, builder, signature, args):
        lty = context.get_data_type(dt)
        ptr = cgutils.alloca_once(builder, lty, size=n)
        ary = make_array(aryty)(context, builder)
        size = context.get_abi_sizeof(lty)
        populate_array(ary, data=ptr, shape=[context.get_constant(types.intp, n)],
                       strides=[context.get_constant(types.intp, size)],
                       itemsize=context.get_constant(types.intp, size), meminfo=None)  # fmt: skip
        return ary._getvalue()

    return aryty(like), codegen


@register_jitable
def _nt_rows_4x4(A, W, Z, r0, r1):
    """``Z[r, j] = dot(A[r], W[j])`` for rows ``r0 <= r < r1`` and every row ``j`` of ``W``.

    ``A (n, K)``, ``W (N, K)``, ``Z (n, N)``.  4 x 4 register tiles (16 vector accumulators: AVX-512's 32
    registers); ``W`` in slabs that stay in L2 while every row tile passes over them.
    """
    _wide_vectors()
    K = A.shape[1]
    N = W.shape[0]
    if r1 <= r0 or N == 0:
        return
    z = Z.dtype.type(0.0)
    slab = _max(4, (_NT_SLAB_BYTES // _max(1, K * Z.itemsize)) // 4 * 4)
    last = r1 - 1
    for j0 in range(0, N, slab):
        jn = _min(j0 + slab, N) - 1
        for i in range(r0, r1, 4):
            i1 = _min(i + 1, last)
            i2 = _min(i + 2, last)
            i3 = _min(i + 3, last)
            a0 = A[i]
            a1 = A[i1]
            a2 = A[i2]
            a3 = A[i3]
            for j in range(j0, jn + 1, 4):
                j1 = _min(j + 1, jn)
                j2 = _min(j + 2, jn)
                j3 = _min(j + 3, jn)
                w0 = W[j]
                w1 = W[j1]
                w2 = W[j2]
                w3 = W[j3]
                c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = z
                c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = z
                for k in range(K):
                    x0 = w0[k]
                    x1 = w1[k]
                    x2 = w2[k]
                    x3 = w3[k]
                    y = a0[k]
                    c00 += y * x0
                    c01 += y * x1
                    c02 += y * x2
                    c03 += y * x3
                    y = a1[k]
                    c10 += y * x0
                    c11 += y * x1
                    c12 += y * x2
                    c13 += y * x3
                    y = a2[k]
                    c20 += y * x0
                    c21 += y * x1
                    c22 += y * x2
                    c23 += y * x3
                    y = a3[k]
                    c30 += y * x0
                    c31 += y * x1
                    c32 += y * x2
                    c33 += y * x3
                # repeated rows and outputs store the same values again
                Z[i3, j3] = c33
                Z[i3, j2] = c32
                Z[i3, j1] = c31
                Z[i3, j] = c30
                Z[i2, j3] = c23
                Z[i2, j2] = c22
                Z[i2, j1] = c21
                Z[i2, j] = c20
                Z[i1, j3] = c13
                Z[i1, j2] = c12
                Z[i1, j1] = c11
                Z[i1, j] = c10
                Z[i, j3] = c03
                Z[i, j2] = c02
                Z[i, j1] = c01
                Z[i, j] = c00


@register_jitable
def _nt_rows_4x3(A, W, Z, r0, r1):
    """:func:`_nt_rows_4x4` with 4 x 3 tiles: 12 vector accumulators and 3 rows of ``W`` fit AVX2's 16
    registers (``A``'s elements are FMA memory operands); the 4 x 4 tile spills six accumulators there, and
    runs at half the speed."""
    _wide_vectors()
    K = A.shape[1]
    N = W.shape[0]
    if r1 <= r0 or N == 0:
        return
    z = Z.dtype.type(0.0)
    slab = _max(3, (_NT_SLAB_BYTES // _max(1, K * Z.itemsize)) // 3 * 3)
    last = r1 - 1
    for j0 in range(0, N, slab):
        jn = _min(j0 + slab, N) - 1
        for i in range(r0, r1, 4):
            i1 = _min(i + 1, last)
            i2 = _min(i + 2, last)
            i3 = _min(i + 3, last)
            a0 = A[i]
            a1 = A[i1]
            a2 = A[i2]
            a3 = A[i3]
            for j in range(j0, jn + 1, 3):
                j1 = _min(j + 1, jn)
                j2 = _min(j + 2, jn)
                w0 = W[j]
                w1 = W[j1]
                w2 = W[j2]
                c00 = c01 = c02 = c10 = c11 = c12 = z
                c20 = c21 = c22 = c30 = c31 = c32 = z
                for k in range(K):
                    x0 = w0[k]
                    x1 = w1[k]
                    x2 = w2[k]
                    y = a0[k]
                    c00 += y * x0
                    c01 += y * x1
                    c02 += y * x2
                    y = a1[k]
                    c10 += y * x0
                    c11 += y * x1
                    c12 += y * x2
                    y = a2[k]
                    c20 += y * x0
                    c21 += y * x1
                    c22 += y * x2
                    y = a3[k]
                    c30 += y * x0
                    c31 += y * x1
                    c32 += y * x2
                # repeated rows and outputs store the same values again
                Z[i3, j2] = c32
                Z[i3, j1] = c31
                Z[i3, j] = c30
                Z[i2, j2] = c22
                Z[i2, j1] = c21
                Z[i2, j] = c20
                Z[i1, j2] = c12
                Z[i1, j1] = c11
                Z[i1, j] = c10
                Z[i, j2] = c02
                Z[i, j1] = c01
                Z[i, j] = c00


#: ``Z[r, j] = dot(A[r], W[j])`` for rows ``r0 <= r < r1``: the tile shape that fits this CPU's registers
_nt_rows = _nt_rows_4x4 if VECTOR_BITS >= 512 else _nt_rows_4x3


@register_jitable
def _tn_rows(Pn, Q, R, C, p0, p1):
    """``C[p, :] = sum_{q < Q} Pn[4 u + q... ] R[q, :]`` for ``p0 <= p < p1``: the rows of a TN product.

    ``Pn (>= n_tiles Q, 4)`` is the packed panel: tile ``u`` (rows ``p0 + 4 u ..``) in its rows
    ``u Q .. u Q + Q - 1``, the unused columns of the last tile repeating a valid one; ``R (>= Q, K)``,
    ``C (.., K)``.  The column blocks of the tile width go outermost so that ``R``'s block (``Q`` rows of
    the tile width) stays in cache across the row tiles; each element is summed over ``q`` in order.
    """
    _wide_vectors()
    K = R.shape[1]
    KW = _tn_width(R)
    z = C.dtype.type(0.0)
    n_t = (p1 - p0 + _TN_ROWS - 1) // _TN_ROWS
    if K < KW:  # narrow rows: accumulate in C
        for u in range(n_t):
            p = p0 + _TN_ROWS * u
            nv = _min(_TN_ROWS, p1 - p)
            for t in range(nv):
                ct = C[p + t]
                for l in range(K):
                    ct[l] = z
            for q in range(Q):
                rq = R[q]
                for t in range(nv):
                    s = Pn[u * Q + q, t]
                    ct = C[p + t]
                    for l in range(K):
                        ct[l] += s * rq[l]
        return
    acc = _tile_acc(R)
    for blk in range((K + KW - 1) // KW):
        kb = _min(blk * KW, K - KW)  # the last block ends at column K
        for u in range(n_t):
            p = p0 + _TN_ROWS * u
            nv = _min(_TN_ROWS, p1 - p)
            for l in range(4 * KW):
                acc[l] = z
            for q in range(Q):
                pq = Pn[u * Q + q]
                s0 = pq[0]
                s1 = pq[1]
                s2 = pq[2]
                s3 = pq[3]
                rq = R[q, kb : kb + KW]
                for l in range(KW):
                    x = rq[l]
                    acc[l] += s0 * x
                    acc[KW + l] += s1 * x
                    acc[2 * KW + l] += s2 * x
                    acc[3 * KW + l] += s3 * x
            for t in range(nv):
                ct = C[p + t, kb : kb + KW]
                for l in range(KW):
                    ct[l] = acc[t * KW + l]


# -------------------------------------------------------------------- the epoch's blocks
@intrinsic
def _view(typingctx, buf, off, rows, cols):
    """The matrix ``(rows, cols)`` stored C-ordered in the 1-D ``buf`` from element ``off``: a view, built
    directly (``reshape`` of a slice compiles its checks and error paths at every use, seconds in all).

    The view holds no reference of its own (no meminfo): it must not outlive ``buf``, so it never leaves the
    kernel that made it.  The caller keeps ``off + rows * cols <= buf.size``.
    """
    if not (isinstance(buf, types.Array) and buf.ndim == 1 and buf.layout == "C"):
        return None
    aryty = types.Array(buf.dtype, 2, "C")

    def codegen(context, builder, signature, args):
        src = make_array(signature.args[0])(context, builder, args[0])
        ints = [context.cast(builder, v, t, types.intp) for v, t in zip(args[1:], signature.args[1:])]
        off, n_rows, n_cols = ints
        size = context.get_abi_sizeof(context.get_data_type(buf.dtype))
        itemsize = context.get_constant(types.intp, size)
        out = make_array(aryty)(context, builder)
        populate_array(out, data=builder.gep(src.data, [off]), shape=[n_rows, n_cols],
                       strides=[builder.mul(n_cols, itemsize), itemsize], itemsize=itemsize, meminfo=None)  # fmt: skip
        return out._getvalue()

    return aryty(buf, off, rows, cols), codegen


# -------------------------------------------------------------------- parameters
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

    def _key(self, dtype, parallel: bool) -> tuple[str, bool]:
        return np.dtype(dtype).name, bool(parallel and self.parallel and config.PARALLEL)

    def __getitem__(self, key):
        dtype, parallel = key if isinstance(key, tuple) else (key, False)
        k = self._key(dtype, parallel)
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
        return self._key(dtype, parallel) in self._dispatchers

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
_bool = types.boolean


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


@_kernel(lambda T: types.Tuple((_f64, _i64))(_a2(T, True), _I64_RO, _a2(T, True), _bool, _i64, _i64, _a2(T)))
def output_delta(A, Yl, Yd, dense, output, loss, out):
    """Output delta ``out (n_samples, k)`` of activations ``A``, unweighted (``c_i = 1/n``).

    The targets are the labels ``Yl (n_samples,)`` or, when ``dense``, the rows
    of ``Yd (n_samples, k)`` (the other argument is not read).  Returns
    ``(loss_sum, n_correct)``.
    """
    n = A.shape[0]
    T = np.empty(A.shape, A.dtype)
    for r in range(n):
        _target_row(Yl, Yd, dense, r, T[r])
    return _output_rows(A, T, output, loss, dense and output == _SIG, np.empty(0), False, np.float64(n), out, 0, n)


@_kernel(lambda T: types.void(_a2(T, True), _a2(T, True), _a2(T, True), _i64, _a2(T, True), _bool, _a2(T)))
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
    gb = np.empty(b.shape[0], b.dtype)
    _col_sums(D, gb)
    w = W.reshape(W.size)
    _opt_step(w, G.reshape(G.size), w, w, _SGD, lr, _max(0.0, 1.0 - lr * l2), lr * l1, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    _opt_step(b, gb, b, b, _SGD, lr, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@_kernel(lambda T: types.void(types.uint64, _i64, _i64, _i64, _f64, _a2(T)))
def dropout_mask(seed, step, layer, thr, scale, out):
    """Fill ``out (n_rows, n_units)`` with ``scale`` where the counter hash keeps a unit, else 0."""
    key = _mask_key(seed, step, layer)
    _mask_rows(out, key, thr, scale, 0, out.shape[0])



def _block_arg_types(T):
    """Types of the arguments shared by the block kernels and the epoch."""
    return {
        "X": _a2(T, True), "Yl": _I64_RO, "Yd": _a2(T, True), "sw": _F64_RO, "order": _I64_RO, "theta": _a1(T),
        "S": _a2(T), "sizes": _I64_RO, "thr": _I64_RO, "scales": _F64_RO,
        "bufs": types.UniTuple(_a1(T), 5), "offs": types.UniTuple(_a1(types.int64), 4),
        "codes": types.UniTuple(_i64, 3), "hyper": types.UniTuple(_f64, 6),
    }  # fmt: skip


def _forward_block_sig(T):
    a = _block_arg_types(T)
    return _f64(
        _i64, _i64, _i64, _i64, _i64, _i64,  # c, n_chunks, nb, start, rows, pan
        a["X"], a["Yl"], a["Yd"], _bool, a["sw"], _bool, a["order"], a["theta"], a["sizes"],  # ... sizes
        a["bufs"], a["offs"], _a2(T), _a1(_f64), a["thr"], a["scales"],  # bufs, offs, T, wts, thresholds, scales
        types.uint64, _i64, a["codes"], _bool, _f64, _a1(_i64),  # seed, gstep, codes, subset, s, part_corr
    )  # fmt: skip


def _update_block_sig(T):
    a = _block_arg_types(T)
    return _f64(
        _i64, _i64, _i64, _i64, _i64,  # c, n_chunks, nb, rows, pan
        a["theta"], a["S"], _a1(T), a["sizes"], a["bufs"], a["offs"], a["thr"],  # theta, S, grad, ... thresholds
        _i64, _f64, _f64, _f64, _f64, _f64, a["hyper"],  # opt, lr, dec, l1s, alpha, alpha_s, hyper
    )  # fmt: skip


@_kernel(_forward_block_sig)
def forward_block(c, n_chunks, nb, start, rows, pan, X, Yl, Yd, dense, sw, weighted, order, theta, sizes, bufs,
                  offs, T, wts, thresholds, scales, seed, gstep, codes, subset, s, part_corr):  # fmt: skip
    """Phase 1 of a training step for row block ``c`` of ``n_chunks``: gather, forward, output delta and every
    hidden delta (with the weights before the step).

    ``bufs`` are the epoch's flat buffers ``(acts, ins, masks, deltas, panel)``, ``offs`` the offsets of each
    layer's matrix in them and in theta ``(woff, aoff, moff, doff)`` (see :func:`train_epoch`), ``codes``
    ``(hidden_act, output_act, loss)``.  Writes the block's correct rows to ``part_corr[c]`` and returns its
    loss sum.  A kernel of its own (called by :func:`train_epoch` through a function pointer): compiled once
    for both variants of the epoch, and the epoch's compilation does not optimize its code again.
    """
    _wide_vectors()
    acts, ins, masks, deltas, panel = bufs
    woff, aoff, moff, doff = offs
    hidden_act, output_act, loss = codes
    L = sizes.shape[0] - 1
    r0 = (c * nb) // n_chunks
    r1 = ((c + 1) * nb) // n_chunks
    part_corr[c] = 0
    if r1 <= r0:
        return 0.0
    A0 = _view(acts, 0, rows, sizes[0])
    for r in range(r0, r1):
        src = order[start + r]
        _copy_row(X[src], A0[r])
        _target_row(Yl, Yd, dense, src, T[r])
        if weighted:
            wts[r] = sw[src]
    for i in range(L):
        n_in = sizes[i]
        n_out = sizes[i + 1]
        A = _view(acts, aoff[i], rows, n_in)
        if thresholds[i] < _FULL:
            A_in = _view(ins, moff[i], rows, n_in)
            _dropout_rows(A, _view(masks, moff[i], rows, n_in), A_in, _mask_key(seed, gstep, i), thresholds[i],
                          scales[i], r0, r1)  # fmt: skip
        else:
            A_in = A
        wo = woff[i]
        Z = _view(acts, aoff[i + 1], rows, n_out)
        _nt_rows(A_in, _view(theta, wo, n_out, n_in), Z, r0, r1)
        bo = wo + n_out * n_in
        _bias_act_rows(Z, theta[bo : bo + n_out], output_act if i == L - 1 else hidden_act, r0, r1)
    k = sizes[L]
    ls, nc = _output_rows(_view(acts, aoff[L], rows, k), T, output_act, loss, subset, wts, weighted, s,
                          _view(deltas, doff[L - 1], rows, k), r0, r1)  # fmt: skip
    part_corr[c] = nc
    Pn = _view(panel, c * pan, pan // _TN_ROWS, _TN_ROWS)
    for i in range(L - 1, 0, -1):
        n_in = sizes[i]
        n_out = sizes[i + 1]
        D = _view(deltas, doff[i], rows, n_out)
        Dp = _view(deltas, doff[i - 1], rows, n_in)
        W = _view(theta, woff[i], n_out, n_in)
        for p in range(r0, r1, _TN_ROWS):  # Dp rows r0..r1 = D rows r0..r1 @ W: the panel of D's rows
            u = ((p - r0) // _TN_ROWS) * n_out
            for t in range(_TN_ROWS):
                d = D[_min(p + t, r1 - 1)]
                for q in range(n_out):
                    Pn[u + q, t] = d[q]
        _tn_rows(Pn, n_out, W, Dp, r0, r1)
        if thresholds[i] < _FULL:
            _mul_rows(Dp, _view(masks, moff[i], rows, n_in), r0, r1)
        _deriv_rows(_view(acts, aoff[i], rows, n_in), Dp, hidden_act, r0, r1)
    return ls


@_kernel(_update_block_sig)
def update_block(c, n_chunks, nb, rows, pan, theta, S, grad, sizes, bufs, offs, thresholds, opt, lr, dec, l1s, alpha,
                 alpha_s, hyper):  # fmt: skip
    """Phase 2 of a training step for block ``c``: rows ``o0 <= o < o1`` of every ``W`` (and those biases).

    The gradient ``D[:, o0:o1]^T A`` is one TN product over a panel of ``D``
    packed 4 columns at a time (the bias gradient summed while packing),
    followed by one pass of the optimizer over those rows of theta, the state
    and the gradient.  ``hyper`` is
    ``(momentum, beta1, beta2, a_adam, d_adam, eps)``.  Returns the block's
    ``sum(W**2)`` before the step (float64; 0 without ``alpha``).
    """
    _wide_vectors()
    acts, ins, _, deltas, panel = bufs
    woff, aoff, moff, doff = offs
    momentum, beta1, beta2, a_adam, d_adam, eps = hyper
    L = sizes.shape[0] - 1
    last = S.shape[0] - 1
    Pn = _view(panel, c * pan, pan // _TN_ROWS, _TN_ROWS)
    z = grad.dtype.type(0.0)
    sq = 0.0
    for i in range(L):
        n_in = sizes[i]
        n_out = sizes[i + 1]
        o0 = (c * n_out) // n_chunks
        o1 = ((c + 1) * n_out) // n_chunks
        if o1 <= o0:
            continue
        D = _view(deltas, doff[i], rows, n_out)
        A_in = _view(ins, moff[i], rows, n_in) if thresholds[i] < _FULL else _view(acts, aoff[i], rows, n_in)
        wo = woff[i]
        G = _view(grad, wo, n_out, n_in)
        bo = wo + n_out * n_in
        for p in range(o0, o1, _TN_ROWS):
            nv = _min(_TN_ROWS, o1 - p)
            u = ((p - o0) // _TN_ROWS) * nb
            for t in range(_TN_ROWS):  # the panel of D[:, p..p+3], and the bias gradient from it
                col = _min(p + t, o1 - 1)
                gb = z
                for q in range(nb):
                    v = D[q, col]
                    Pn[u + q, t] = v
                    gb = gb + v
                if t < nv:
                    grad[bo + p + t] = gb
            if alpha != 0.0:  # sum(W**2) of the block before the step, 4 rows at a time
                p0 = wo + p * n_in
                sq = sq + _sumsq(theta[p0 : p0 + nv * n_in])
        _tn_rows(Pn, nb, A_in, G, o0, o1)
        p0 = wo + o0 * n_in
        p1 = wo + o1 * n_in
        _opt_step(theta[p0:p1], grad[p0:p1], S[0, p0:p1], S[last, p0:p1], opt, lr, dec, l1s, alpha_s, momentum, beta1,
                  beta2, a_adam, d_adam, eps)  # fmt: skip
        q0 = bo + o0
        q1 = bo + o1
        _opt_step(theta[q0:q1], grad[q0:q1], S[0, q0:q1], S[last, q0:q1], opt, lr, 1.0, 0.0, 0.0, momentum, beta1,
                  beta2, a_adam, d_adam, eps)  # fmt: skip
    return sq


def _train_epoch_sig(T):
    a = _block_arg_types(T)
    args = (
        a["X"], a["Yl"], a["Yd"], _bool, a["sw"], _bool,  # X, Yl, Yd, dense, sw, weighted
        a["order"], a["theta"], a["S"], a["sizes"], _F64_RO, a["codes"], _i64,  # order, theta, S, sizes, lrs, codes, bs
        _f64, _f64, _f64, a["thr"], a["scales"],  # l2, l1, alpha, thresholds, scales
        _i64, types.UniTuple(_f64, 4), _i64,  # opt, (momentum, beta1, beta2, eps), eps_mode
        types.uint64, _i64, _i64, _i64,  # seed, step0, t0, n_chunks
        _i64, _i64, a["bufs"], a["offs"], _a2(T), _a1(_f64), _a1(T),  # rows, pan, bufs, offs, T, wts, grad
        _a2(_f64), _a1(_i64),  # parts, part_corr
        types.FunctionType(_forward_block_sig(T)), types.FunctionType(_update_block_sig(T)),  # fwd, upd
    )  # fmt: skip
    return types.Tuple((_f64, _f64, _i64))(*args)


@_kernel(_train_epoch_sig, parallel=True)
def train_epoch(
    X, Yl, Yd, dense, sw, weighted, order, theta, S, sizes, lrs, codes, batch_size, l2, l1, alpha, thresholds, scales,
    opt, opt_params, eps_mode, seed, step0, t0, n_chunks, rows, pan, bufs, offs, T, wts, grad, parts, part_corr, fwd,
    upd,
):  # fmt: skip
    """One training epoch on the flat parameters ``theta`` and optimizer state ``S``, in place.

    Each step runs two phases over ``n_chunks`` blocks, in parallel (``prange``) in the parallel variant:
    :data:`forward_block` (row blocks: gather, forward, output and hidden deltas) and :data:`update_block`
    (row blocks of every ``W``: gradient and optimizer).  The blocks are kernels of their own, passed in as
    ``fwd`` and ``upd`` and called through function pointers, so that their code is compiled once for both
    variants of the epoch and this kernel stays small.  The result depends on ``n_chunks``, never on the
    thread count.  The caller allocates every buffer (no allocation here).

    Parameters
    ----------
    X : ndarray (n_samples, n_in)
    Yl : ndarray of int64 (n_samples,)
        Class labels (read unless ``dense``).
    Yd : ndarray (n_samples, n_out)
        Dense targets (read when ``dense``).
    dense : bool
    sw : ndarray of float64 (n_samples,)
        Sample weights (read when ``weighted``).
    weighted : bool
    order : ndarray of int64 (n_used,)
        Rows in visiting order; step ``i`` takes ``order[i*bs:(i+1)*bs]``.
    theta : ndarray (n_params,)
        ``W_0, b_0, W_1, b_1, ...``; updated in place.
    S : ndarray (max(1, n_slots), n_params)
        The optimizer's state slots, each laid out as ``theta``; updated in
        place (for ``gradient``: slot 0 receives the last step's gradient).
    sizes : ndarray of int64 (n_layers + 1,)
    lrs : ndarray of float64 (n_steps,)
    codes : (hidden_act, output_act, loss)
    batch_size : int
    l2, l1, alpha : float
    thresholds : ndarray of int64 (n_layers,)
        24-bit keep thresholds of each layer input; ``2**24`` means no dropout.
    scales : ndarray of float64 (n_layers,)
        Multiplier of kept units.
    opt : int
        Optimizer code.
    opt_params : (momentum, beta1, beta2, eps)
    eps_mode : int
    seed : uint64
    step0 : int
        Global step number of the first minibatch (for the masks).
    t0 : int
        The optimizer's step count before the epoch (Adam's ``t - 1`` of the first step).
    n_chunks : int
        Blocks of each phase.
    rows, pan : int
        Rows of the buffers (the batch, at least 1) and elements of a block's panel (a multiple of 4: 4 columns
        by the block's rows of a TN product, rounded up to 4, times its reduction, the batch or a width).
    bufs : (acts, ins, masks, deltas, panel)
        Flat buffers: every layer's input and output activation (``rows`` rows each), the dropout masks and
        dropped-out inputs of the layers with dropout, the deltas, and one panel ``(pan / 4, 4)`` a block.
    offs : (woff, aoff, moff, doff)
        Where each layer's matrix starts: ``W_l`` in theta (``b_l`` follows it), its input in ``acts``
        (``aoff[L]``: the output), its mask and dropped-out input, its delta.
    T, wts, grad : ndarray
        The minibatch's target rows ``(rows, n_out)`` and weights, the gradient (laid out as theta).
    parts, part_corr : ndarray
        Per-block partial sums ``(2, n_chunks)`` (loss, squared weights) and correct counts.
    fwd, upd : compiled functions
        :data:`forward_block` and :data:`update_block` of this dtype.

    Returns
    -------
    loss_sum : float
        Data loss summed over the epoch, measured before each update.
    penalty_sum : float
        The ``alpha`` penalty summed over the epoch, from the weights before each step.
    n_correct : int
    """
    momentum, beta1, beta2, eps = opt_params
    n = order.shape[0]
    n_steps = (n + batch_size - 1) // batch_size
    subset = dense and codes[1] == _SIG
    loss_sum = 0.0
    pen_sum = 0.0
    n_correct = 0
    for step in range(n_steps):
        start = step * batch_size
        nb = n - start
        if nb > batch_size:
            nb = batch_size
        lr = lrs[step]
        gstep = step0 + step
        s = np.float64(nb)
        if weighted:
            s = 0.0
            for r in range(nb):
                s = s + sw[order[start + r]]
        # the step's scalars, in float64 as the reference computes them
        t = t0 + step + 1
        c1 = 1.0 - math.pow(beta1, t)
        c2 = 1.0 - math.pow(beta2, t)
        if eps_mode == _TORCH:
            a_adam = lr / c1
            d_adam = math.sqrt(c2)
        else:
            a_adam = lr * math.sqrt(c2) / c1
            d_adam = 1.0
        dec = 1.0 - lr * l2
        if dec < 0.0:
            dec = 0.0
        hyper = (momentum, beta1, beta2, a_adam, d_adam, eps)
        # the two phases: the row blocks (forward and deltas with the weights before the step), then the row
        # blocks of every W (gradient and update); one parallel loop for both
        for phase in range(2):
            for c in prange(n_chunks):
                if phase == 0:
                    parts[0, c] = fwd(np.int64(c), n_chunks, nb, start, rows, pan, X, Yl, Yd, dense, sw, weighted,
                                      order, theta, sizes, bufs, offs, T, wts, thresholds, scales, seed, gstep, codes,
                                      subset, s, part_corr)  # fmt: skip
                else:
                    parts[1, c] = upd(np.int64(c), n_chunks, nb, rows, pan, theta, S, grad, sizes, bufs, offs,
                                      thresholds, opt, lr, dec, lr * l1, alpha, alpha / s, hyper)  # fmt: skip
        ls = 0.0
        sq = 0.0
        for c in range(n_chunks):
            ls = ls + parts[0, c]
            sq = sq + parts[1, c]
            n_correct = n_correct + part_corr[c]
        loss_sum = loss_sum + (nb * ls / s if weighted else ls)
        if alpha != 0.0:
            pen_sum = pen_sum + nb * (0.5 * alpha * sq / s)
    return loss_sum, pen_sum, n_correct
