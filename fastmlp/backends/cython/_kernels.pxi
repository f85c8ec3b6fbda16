# The Cython kernels of fastmlp, shared by every ISA variant.
#
# This file is ``include``d by ``_kernels.pyx`` (baseline ISA) and
# ``_kernels_avx2.pyx`` (``-mavx2 -mfma``); setup.py compiles the two with
# different flags and ``fastmlp.backends.cython`` picks one at run time.
# Compiler directives (boundscheck, wraparound, cdivision) are set in setup.py.
#
# Layout: ``W`` is ``(n_out, n_in)`` C-contiguous, which BLAS (column-major)
# sees as its transpose ``Wc = W.T`` of shape ``(n_in, n_out)`` with leading
# dimension ``n_in``; likewise a C-contiguous activation ``A (n, n_in)`` is
# ``A.T`` with leading dimension ``n_in``.  Every gemm below is written in
# those column-major views.
#
# Numerics: the variants are compiled with ``-ffast-math`` so that gcc may
# call glibc's vectorized ``exp``/``tanh`` (libmvec).  The compiler then
# assumes that no NaN or Inf occurs: nothing here tests for them (the Python
# side checks finiteness), and ``exp`` arguments are clamped so that no Inf
# can arise in the first place.

cimport numpy as cnp
from cpython.pycapsule cimport PyCapsule_GetName, PyCapsule_GetPointer
from cython cimport floating
from libc.math cimport exp, expf, log, tanh, tanhf
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy, memset

import numpy as np

cnp.import_array()

cdef extern from *:
    """
    #ifndef FASTMLP_DEBUG_BUILD
    #define FASTMLP_DEBUG_BUILD 0
    #endif
    """
    int FASTMLP_DEBUG_BUILD

#: True in a ``FASTMLP_CYTHON_DEBUG=1`` build (bounds checking and wraparound on)
DEBUG_BUILD = bool(FASTMLP_DEBUG_BUILD)

cdef extern from "_simd_gemm.h" nogil:
    int FM_SIMD_GEMM
    void fm_nt_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* W, int64_t ldw,
                   float* C, int64_t ldc)
    void fm_nt_f64(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* W, int64_t ldw,
                   double* C, int64_t ldc)
    void fm_tn_f32(int64_t P, int64_t K, int64_t Q, const float* S, int64_t sp, int64_t sq, const float* R,
                   int64_t ldr, float* C, int64_t ldc, float alpha, float beta)
    void fm_tn_f64(int64_t P, int64_t K, int64_t Q, const double* S, int64_t sp, int64_t sq, const double* R,
                   int64_t ldr, double* C, int64_t ldc, double alpha, double beta)

#: whether this build has its own SIMD matrix kernels (the AVX-512 build); otherwise SciPy's BLAS does the products
SIMD_GEMM = bool(FM_SIMD_GEMM)

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FM_HAVE_OPENMP 1
    #else
    #define FM_HAVE_OPENMP 0
    #endif
    #define FM_GOLDEN 0x9E3779B97F4A7C15ULL
    #define FM_MIX1 0xBF58476D1CE4E5B9ULL
    #define FM_MIX2 0x94D049BB133111EBULL

    typedef void (*fm_worker_t)(void *, int, int);

    /* Run fn(ctx, thread_id, n_threads) on a team of nthreads (or inline). */
    static void fm_run_parallel(fm_worker_t fn, void *ctx, int nthreads) {
    #ifdef _OPENMP
        if (nthreads > 1) {
            #pragma omp parallel num_threads(nthreads)
            {
                fn(ctx, omp_get_thread_num(), omp_get_num_threads());
            }
            return;
        }
    #endif
        fn(ctx, 0, 1);
    }

    /* Orphaned barrier: binds to the team started by fm_run_parallel. */
    static void fm_barrier(int nthreads) {
    #ifdef _OPENMP
        if (nthreads > 1) {
            #pragma omp barrier
        }
    #endif
    }
    """
    ctypedef void (*fm_worker_t)(void*, int, int) noexcept nogil
    void fm_run_parallel(fm_worker_t fn, void* ctx, int nthreads) nogil
    void fm_barrier(int nthreads) nogil
    const int FM_HAVE_OPENMP
    const uint64_t FM_GOLDEN
    const uint64_t FM_MIX1
    const uint64_t FM_MIX2

# integer codes, checked against fastmlp.backends.contract by the adapter
cdef enum:
    ACT_IDENTITY = 0
    ACT_SIGMOID = 1
    ACT_TANH = 2
    ACT_RELU = 3
    ACT_SOFTMAX = 4
    ACT_EXP = 5
    LOSS_MSE = 0
    LOSS_CE = 1
    LOSS_SQE = 2
    LOSS_POISSON = 3
    KEEP_BITS = 24
    NOTRANS = 78  # BLAS transpose flags: 'N'
    TRANS = 84    # 'T'

#: activation and loss codes compiled into this module
ACT_CODES = {"identity": ACT_IDENTITY, "sigmoid": ACT_SIGMOID, "tanh": ACT_TANH, "relu": ACT_RELU,
             "softmax": ACT_SOFTMAX, "exp": ACT_EXP}
LOSS_CODES = {"mse": LOSS_MSE, "ce": LOSS_CE, "squared_error": LOSS_SQE, "poisson": LOSS_POISSON}
#: whether this build runs ``train_epoch`` on several OpenMP threads
HAVE_OPENMP = bool(FM_HAVE_OPENMP)

cdef double LOG_EPS = 1e-12
# spacing of the per-thread accumulators (one cache line of doubles each)
cdef Py_ssize_t PAD = 8

# ---------------------------------------------------------------------- BLAS
ctypedef void (*sgemm_t)(char *transa, char *transb, int *m, int *n, int *k, float *alpha, float *a,
                         int *lda, float *b, int *ldb, float *beta, float *c, int *ldc) noexcept nogil
ctypedef void (*dgemm_t)(char *transa, char *transb, int *m, int *n, int *k, double *alpha, double *a,
                         int *lda, double *b, int *ldb, double *beta, double *c, int *ldc) noexcept nogil

cdef sgemm_t _sgemm = NULL
cdef dgemm_t _dgemm = NULL


def _load_blas():
    """Take ``sgemm``/``dgemm`` from SciPy's Cython BLAS capsules (SciPy is a run-time dependency only)."""
    global _sgemm, _dgemm
    try:
        from scipy.linalg.cython_blas import __pyx_capi__ as capi
    except ImportError as exc:
        raise ImportError(f"fastmlp's Cython kernels need SciPy's BLAS (scipy.linalg.cython_blas): {exc}") from exc
    cap_s, cap_d = capi["sgemm"], capi["dgemm"]
    _sgemm = <sgemm_t>PyCapsule_GetPointer(cap_s, PyCapsule_GetName(cap_s))
    _dgemm = <dgemm_t>PyCapsule_GetPointer(cap_d, PyCapsule_GetName(cap_d))


_load_blas()


cdef inline void _gemm(char ta, char tb, int m, int n, int k, floating alpha, floating* A, int lda,
                       floating* B, int ldb, floating beta, floating* C, int ldc) noexcept nogil:
    """Column-major ``C <- alpha op(A) op(B) + beta C`` with ``C (m, n)``; nothing to do when C is empty."""
    if m <= 0 or n <= 0:
        return
    # BLAS rejects leading dimensions below 1 even for empty operands
    if lda < 1:
        lda = 1
    if ldb < 1:
        ldb = 1
    if ldc < 1:
        ldc = 1
    if floating is float:
        _sgemm(&ta, &tb, &m, &n, &k, &alpha, A, &lda, B, &ldb, &beta, C, &ldc)
    else:
        _dgemm(&ta, &tb, &m, &n, &k, &alpha, A, &lda, B, &ldb, &beta, C, &ldc)


# --------------------------------------------------------------- matrix products
cdef inline void _prod_nt(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, floating* A, Py_ssize_t lda, floating* W,
                          Py_ssize_t ldw, floating* C, Py_ssize_t ldc) noexcept nogil:
    """``C (m, n) = A (m, k) @ W (n, k).T``; ``m, n, k >= 1``."""
    if FM_SIMD_GEMM:
        if floating is float:
            fm_nt_f32(m, n, k, A, lda, W, ldw, C, ldc)
        else:
            fm_nt_f64(m, n, k, A, lda, W, ldw, C, ldc)
    else:
        # C.T (n, m) = Wc.T @ A.T in BLAS's column-major view
        _gemm(TRANS, NOTRANS, <int>n, <int>m, <int>k, <floating>1, W, <int>ldw, A, <int>lda, <floating>0, C, <int>ldc)


cdef inline void _prod_tn(Py_ssize_t p, Py_ssize_t k, Py_ssize_t q, floating* S, Py_ssize_t sp, Py_ssize_t sq,
                          floating* R, Py_ssize_t ldr, floating* C, Py_ssize_t ldc, floating alpha,
                          floating beta) noexcept nogil:
    """``C (p, k) = beta C + alpha S (p, q) @ R (q, k)``, ``S`` with strides ``(sp, sq)``, one of them 1.

    ``beta == 0`` never reads ``C``; ``p, k >= 1``, ``q >= 0``.
    """
    if FM_SIMD_GEMM:
        if floating is float:
            fm_tn_f32(p, k, q, S, sp, sq, R, ldr, C, ldc, alpha, beta)
        else:
            fm_tn_f64(p, k, q, S, sp, sq, R, ldr, C, ldc, alpha, beta)
    elif sp == 1 and (sq != 1 or p == 1):
        # C.T (k, p) = alpha R.T (k, q) @ S (q, p) [S.T in column-major, ld sq] + beta C.T
        _gemm(NOTRANS, TRANS, <int>k, <int>p, <int>q, alpha, R, <int>ldr, S, <int>sq, beta, C, <int>ldc)
    else:
        # C.T (k, p) = alpha R.T (k, q) @ S.T (q, p) [S column-major (q, p), ld sp] + beta C.T
        _gemm(NOTRANS, NOTRANS, <int>k, <int>p, <int>q, alpha, R, <int>ldr, S, <int>sp, beta, C, <int>ldc)


# --------------------------------------------------------------- activations
cdef inline floating _exp(floating x) noexcept nogil:
    if floating is float:
        return expf(x)
    else:
        return exp(x)


cdef inline floating _tanh(floating x) noexcept nogil:
    if floating is float:
        return tanhf(x)
    else:
        return tanh(x)


cdef inline void _bias_act_row(floating* z, floating* b, Py_ssize_t n, int act) noexcept nogil:
    """``z <- act(z + b)`` over one row of ``n`` units (the gemm's tile, still in cache)."""
    cdef Py_ssize_t j
    cdef floating t, cap, mx, s
    if act == ACT_SIGMOID:
        # 1 / (1 + exp(-z)); exp(-z) is capped below the type's overflow (expf overflows past 88.72,
        # exp past 709.78) so no Inf appears: the result is then ~1e-38 / ~1e-308 instead of 0
        if floating is float:
            cap = 88.0
        else:
            cap = 708.0
        for j in range(n):
            t = -(z[j] + b[j])
            if t > cap:
                t = cap
            z[j] = 1 / (1 + _exp(t))
    elif act == ACT_TANH:
        for j in range(n):
            z[j] = _tanh(z[j] + b[j])
    elif act == ACT_RELU:
        for j in range(n):
            t = z[j] + b[j]
            z[j] = t if t > 0 else 0
    elif act == ACT_SOFTMAX:
        # shift by the row maximum: every exp argument is <= 0, so no overflow
        for j in range(n):
            z[j] = z[j] + b[j]
        mx = z[0]
        for j in range(1, n):
            if z[j] > mx:
                mx = z[j]
        s = 0
        for j in range(n):
            z[j] = _exp(z[j] - mx)
            s = s + z[j]
        for j in range(n):
            z[j] = z[j] / s
    else:
        for j in range(n):
            z[j] = z[j] + b[j]


cdef void _forward_rows(floating* A, floating* W, floating* b, floating* Z, Py_ssize_t n, Py_ssize_t n_in,
                        Py_ssize_t n_out, int act) noexcept nogil:
    """``Z (n, n_out) = act(A (n, n_in) W.T + b)``: one product, then bias and activation row by row."""
    cdef Py_ssize_t r
    if n <= 0 or n_out <= 0:
        return
    if n_in > 0:
        _prod_nt(n, n_out, n_in, A, n_in, W, n_in, Z, n_out)
    else:
        memset(Z, 0, n * n_out * sizeof(floating))
    for r in range(n):
        _bias_act_row(Z + r * n_out, b, n_out, act)


cdef inline void _deriv(floating* d, floating* a, floating* m, Py_ssize_t n, int act) noexcept nogil:
    """``d <- d * m * act'(a)`` over ``n`` contiguous elements, the derivative written from the output ``a``."""
    cdef Py_ssize_t i
    if m != NULL:
        for i in range(n):
            d[i] = d[i] * m[i]
    if act == ACT_SIGMOID:
        for i in range(n):
            d[i] = d[i] * (a[i] * (1 - a[i]))
    elif act == ACT_TANH:
        for i in range(n):
            d[i] = d[i] * (1 - a[i] * a[i])
    elif act == ACT_RELU:
        for i in range(n):
            d[i] = 0 if a[i] <= 0 else d[i]


# --------------------------------------------------------------- output delta
cdef void _output_delta_rows(floating* A, int64_t* y, int64_t* idx, int output, int loss, floating* out,
                             Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t k, Py_ssize_t n,
                             double* loss_sum, int64_t* n_correct) noexcept nogil:
    """Delta of rows ``[r0, r1)`` of ``A (n, k)``, labels ``y[idx[r]]`` (``y[r]`` when ``idx`` is NULL).

    ``n`` is the whole minibatch's size (the gradient's ``1/n``); adds the rows'
    data loss (float64) to ``loss_sum`` and their first-arg-max hits to ``n_correct``.
    """
    cdef Py_ssize_t r, j, best
    cdef int64_t lab
    cdef floating* a
    cdef floating* o
    cdef floating d, s, fn = <floating>n
    cdef double ls = 0.0, row, p
    cdef int64_t hits = 0
    for r in range(r0, r1):
        a = A + r * k
        o = out + r * k
        lab = y[idx[r]] if idx != NULL else y[r]
        best = 0
        for j in range(1, k):
            if a[j] > a[best]:
                best = j
        if best == lab:
            hits += 1
        if loss == LOSS_CE:
            # (a - onehot) / n for softmax and for per-unit sigmoid cross-entropy
            for j in range(k):
                d = a[j] - 1 if j == lab else a[j]
                o[j] = d / fn
            if output == ACT_SOFTMAX:
                p = <double>a[lab]
                ls -= log(p if p > LOG_EPS else LOG_EPS)
            else:
                for j in range(k):
                    p = <double>a[j] if j == lab else 1.0 - <double>a[j]
                    ls -= log(p if p > LOG_EPS else LOG_EPS)
        else:
            # MSE with the notebook's scaling: g = 2 (a - onehot) / n, loss = mean over classes
            row = 0.0
            for j in range(k):
                d = a[j] - 1 if j == lab else a[j]
                row += <double>d * <double>d
                o[j] = (2 * d) / fn
            ls += row / k
            if output == ACT_SIGMOID:
                for j in range(k):
                    o[j] = o[j] * (a[j] * (1 - a[j]))
            elif output == ACT_SOFTMAX:
                # softmax Jacobian applied to g: a * (g - sum(g * a))
                s = 0
                for j in range(k):
                    s = s + o[j] * a[j]
                for j in range(k):
                    o[j] = a[j] * (o[j] - s)
    loss_sum[0] += ls
    n_correct[0] += hits


# --------------------------------------------------------------- update
cdef void _update_block(floating* W, floating* b, floating* D, floating* A, Py_ssize_t n, Py_ssize_t n_out,
                        Py_ssize_t n_in, double lr, double l2, double l1, Py_ssize_t j0, Py_ssize_t j1,
                        Py_ssize_t o0, Py_ssize_t o1) noexcept nogil:
    """SGD step on the input columns ``[j0, j1)`` of ``W (n_out, n_in)`` and the units ``[o0, o1)`` of ``b``.

    ``W <- max(0, 1 - lr l2) W - lr l1 sign(W) - lr D.T A`` with ``D (n, n_out)``,
    ``A (n, n_in)``: without L1 the decay is the gemm's ``beta`` and the gradient
    gemm writes straight into ``W``; with L1 one pass applies decay and the L1
    term (sign of the old ``W``) first and the gemm then adds with ``beta = 1``.
    """
    cdef double decay = 1.0 - lr * l2
    cdef floating beta, dec, c, w, s
    cdef floating* row
    cdef Py_ssize_t o, j, r
    if decay < 0.0:
        decay = 0.0
    if l1 != 0.0:
        dec = <floating>decay
        c = <floating>(lr * l1)
        for o in range(n_out):
            row = W + o * n_in
            for j in range(j0, j1):
                w = row[j]
                s = c if w > 0 else (-c if w < 0 else 0)
                row[j] = dec * w - s
        beta = 1
    else:
        beta = <floating>decay
    # W[:, j0:j1] (n_out, j1 - j0) = beta W[:, j0:j1] - lr D.T (n_out, n) @ A[:, j0:j1] (n, j1 - j0)
    if j1 > j0:
        _prod_tn(n_out, j1 - j0, n, D, 1, n_out, A + j0, n_in, W + j0, n_in, <floating>(-lr), beta)
    c = <floating>lr
    for o in range(o0, o1):
        s = 0
        for r in range(n):
            s = s + D[r * n_out + o]
        b[o] = b[o] - c * s


# --------------------------------------------------------------- dropout
cdef inline uint64_t _mix64(uint64_t z) noexcept nogil:
    """splitmix64 finalizer (arithmetic modulo 2**64)."""
    z = (z ^ (z >> 30)) * FM_MIX1
    z = (z ^ (z >> 27)) * FM_MIX2
    return z ^ (z >> 31)


cdef inline uint64_t _mask_key(uint64_t seed, uint64_t step, uint64_t layer) noexcept nogil:
    return _mix64(_mix64(seed + FM_GOLDEN * (layer + 1)) + FM_GOLDEN * (step + 1))


cdef void _fill_mask(floating* out, uint64_t key, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t n_units,
                     uint64_t thr, floating scale) noexcept nogil:
    """Rows ``[r0, r1)`` of the ``(n_rows, n_units)`` multipliers: ``scale`` where ``mix64(key + G c) >> 40 < thr``.

    ``c = r n_units + u + 1`` counts the units of the whole minibatch, so a row
    block drawn by one thread is the same as in the full matrix.
    """
    cdef Py_ssize_t r, u
    cdef uint64_t ctr
    cdef floating* o
    for r in range(r0, r1):
        o = out + r * n_units
        ctr = <uint64_t>(r * n_units) + 1
        for u in range(n_units):
            o[u] = scale if (_mix64(key + FM_GOLDEN * (ctr + <uint64_t>u)) >> 40) < thr else 0


cdef void _gather_rows(floating* X, int64_t* idx, floating* out, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t n_in,
                       bint drop, uint64_t key, uint64_t thr, floating scale) noexcept nogil:
    """``out[r] = X[idx[r]]`` for ``r`` in ``[r0, r1)``, times the input-dropout multipliers when ``drop``."""
    cdef Py_ssize_t r, u
    cdef uint64_t ctr
    cdef floating* src
    cdef floating* dst
    cdef floating m
    for r in range(r0, r1):
        src = X + idx[r] * n_in
        dst = out + r * n_in
        if not drop:
            memcpy(dst, src, n_in * sizeof(floating))
            continue
        ctr = <uint64_t>(r * n_in) + 1
        for u in range(n_in):
            m = scale if (_mix64(key + FM_GOLDEN * (ctr + <uint64_t>u)) >> 40) < thr else 0
            dst[u] = src[u] * m


# --------------------------------------------------------------- the epoch
ctypedef struct EpochCtx:
    void* X
    int64_t* y
    int64_t* order
    Py_ssize_t n_used
    Py_ssize_t batch_size
    int L
    Py_ssize_t* sizes      # (L + 1,) layer widths
    void** W               # (L,)
    void** b               # (L,)
    void** raw             # (L + 1,) activation of each layer before dropout; raw[0] unused
    void** inp             # (L,) input of each layer after dropout (== raw[l] without dropout)
    void** mask            # (L,) dropout multipliers of hidden layer inputs, NULL without dropout
    void** delta           # (L + 1,) delta w.r.t. each layer's pre-activation; delta[0] unused
    double* lrs
    int hidden_act
    int output_act
    int loss
    double l2
    double l1
    int64_t* thr           # (L,) keep thresholds; >= 2**24 means no dropout
    double* scales         # (L,)
    uint64_t seed
    uint64_t step0
    double* loss_acc       # (n_blocks * PAD,)
    int64_t* correct_acc   # (n_blocks * PAD,)
    int n_blocks           # row blocks of a minibatch and column blocks of a W; >= the thread count


cdef inline void _split(Py_ssize_t n, int t, int nth, Py_ssize_t align, Py_ssize_t* lo,
                        Py_ssize_t* hi) noexcept nogil:
    """Block ``t`` of ``nth`` of ``range(n)``, block size rounded up to ``align``."""
    cdef Py_ssize_t chunk = (n + nth - 1) // nth
    chunk = ((chunk + align - 1) // align) * align
    lo[0] = t * chunk
    if lo[0] > n:
        lo[0] = n
    hi[0] = lo[0] + chunk
    if hi[0] > n:
        hi[0] = n


cdef void _epoch_worker(EpochCtx* c, floating* tag, int tid, int nth) noexcept nogil:
    """Thread ``tid`` of ``nth``'s share of a whole epoch (``tag`` only selects the dtype).

    Per minibatch: each thread gathers, forwards and back-propagates the deltas
    of its own block of rows (rows are independent until the weight gradient);
    after a barrier each thread updates its own block of input columns of every
    ``W`` (and block of units of every ``b``) from all rows; a second barrier
    keeps the next minibatch from reading ``W`` before every block is updated.
    All deltas are computed with the old weights before any update, which is
    what the reference's "lower delta, then update" order amounts to.
    """
    cdef floating* X = <floating*>c.X
    cdef floating** W = <floating**>c.W
    cdef floating** B = <floating**>c.b
    cdef floating** raw = <floating**>c.raw
    cdef floating** inp = <floating**>c.inp
    cdef floating** mask = <floating**>c.mask
    cdef floating** delta = <floating**>c.delta
    cdef Py_ssize_t* sz = c.sizes
    cdef int L = c.L
    cdef int l, act
    cdef Py_ssize_t full = 1 << KEEP_BITS
    cdef Py_ssize_t bs = c.batch_size
    cdef Py_ssize_t n_steps = (c.n_used + bs - 1) // bs
    cdef Py_ssize_t step, start, nb, r0, r1, j0, j1, o0, o1, nr, i, n_el, align
    cdef int blk
    cdef int NB = c.n_blocks
    cdef int64_t* idx
    cdef uint64_t gstep
    cdef double lr
    cdef floating* hin
    cdef floating* hraw
    cdef floating* hm
    for step in range(n_steps):
        start = step * bs
        nb = c.n_used - start
        if nb > bs:
            nb = bs
        idx = c.order + start
        gstep = c.step0 + <uint64_t>step
        lr = c.lrs[step]
        # the row phase, block by block: the blocks depend on the shape only, so any thread count
        # computes the same bits
        blk = tid
        while blk < NB:
            _split(nb, blk, NB, 1, &r0, &r1)
            nr = r1 - r0

            _gather_rows(X, idx, inp[0], r0, r1, sz[0], c.thr[0] < full, _mask_key(c.seed, gstep, 0),
                         <uint64_t>c.thr[0], <floating>c.scales[0])
            for l in range(L):
                act = c.output_act if l == L - 1 else c.hidden_act
                _forward_rows(inp[l] + r0 * sz[l], W[l], B[l], raw[l + 1] + r0 * sz[l + 1], nr, sz[l], sz[l + 1], act)
                if l + 1 < L and mask[l + 1] != NULL:
                    hm = mask[l + 1]
                    _fill_mask(hm, _mask_key(c.seed, gstep, <uint64_t>(l + 1)), r0, r1, sz[l + 1],
                               <uint64_t>c.thr[l + 1], <floating>c.scales[l + 1])
                    hin = inp[l + 1]
                    hraw = raw[l + 1]
                    for i in range(r0 * sz[l + 1], r1 * sz[l + 1]):
                        hin[i] = hraw[i] * hm[i]
            _output_delta_rows(raw[L], c.y, idx, c.output_act, c.loss, delta[L], r0, r1, sz[L], nb,
                               c.loss_acc + blk * PAD, c.correct_acc + blk * PAD)
            for l in range(L - 1, 0, -1):
                # delta[l] (nr, sz[l]) = delta[l+1] (nr, sz[l+1]) @ W[l] (sz[l+1], sz[l]), with the old W[l]
                if nr > 0:
                    _prod_tn(nr, sz[l], sz[l + 1], delta[l + 1] + r0 * sz[l + 1], sz[l + 1], 1, W[l], sz[l],
                             delta[l] + r0 * sz[l], sz[l], <floating>1, <floating>0)
                n_el = nr * sz[l]
                _deriv(delta[l] + r0 * sz[l], raw[l] + r0 * sz[l],
                       mask[l] + r0 * sz[l] if mask[l] != NULL else NULL, n_el, c.hidden_act)
            blk = blk + nth
        fm_barrier(nth)
        for l in range(L):
            # column blocks a multiple of 16 wide keep threads off each other's cache lines of W
            align = 16 if sz[l] >= 64 * NB else 1
            blk = tid
            while blk < NB:
                _split(sz[l], blk, NB, align, &j0, &j1)
                _split(sz[l + 1], blk, NB, 1, &o0, &o1)
                _update_block(W[l], B[l], delta[l + 1], inp[l], nb, sz[l + 1], sz[l], lr, c.l2, c.l1, j0, j1, o0, o1)
                blk = blk + nth
        fm_barrier(nth)


cdef void _worker_f32(void* ctx, int tid, int nth) noexcept nogil:
    _epoch_worker(<EpochCtx*>ctx, <float*>NULL, tid, nth)


cdef void _worker_f64(void* ctx, int tid, int nth) noexcept nogil:
    _epoch_worker(<EpochCtx*>ctx, <double*>NULL, tid, nth)


cdef inline void* _data(object a):
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef object _ptr_array(list arrs):
    """The data addresses of ``arrs`` (0 for None) as a ``uintp`` array, for ``T**`` tables in C."""
    return np.array([0 if a is None else <size_t>cnp.PyArray_DATA(<cnp.ndarray>a) for a in arrs], dtype=np.uintp)


# =============================================================== Python API
def forward(const floating[:, ::1] A, const floating[:, ::1] W, const floating[::1] b, int act,
            floating[:, ::1] out):
    """Layer forward pass ``out = act(A @ W.T + b)`` into a caller-allocated buffer.

    Parameters
    ----------
    A : ndarray (n_samples, n_in)
    W : ndarray (n_out, n_in)
    b : ndarray (n_out,)
    act : int
        Activation code (``_contract.ACT_CODES``).
    out : ndarray (n_samples, n_out)
        Written in place.
    """
    cdef Py_ssize_t n = A.shape[0], n_in = A.shape[1], n_out = W.shape[0]
    if n == 0 or n_out == 0:
        return
    cdef floating* pa = NULL
    cdef floating* pw = NULL
    if n_in > 0:
        # with no inputs the gemm is skipped and neither pointer is read
        pa = <floating*>&A[0, 0]
        pw = <floating*>&W[0, 0]
    with nogil:
        _forward_rows(pa, pw, <floating*>&b[0], &out[0, 0], n, n_in, n_out, act)


def output_delta(const floating[:, ::1] A, const int64_t[::1] y, int output, int loss, floating[:, ::1] out):
    """Delta of the loss w.r.t. the output pre-activation, straight from integer labels.

    Parameters
    ----------
    A : ndarray (n_samples, n_classes)
        Output activations.
    y : ndarray of int64 (n_samples,)
        Class indices.
    output, loss : int
        Output activation and loss codes (a pair of ``VALID_OUTPUT_LOSS``).
    out : ndarray (n_samples, n_classes)
        The delta, written in place.

    Returns
    -------
    loss_sum : float
        Data loss summed over the samples (float64 accumulation).
    n_correct : int
        Rows whose first arg-max equals the label.
    """
    cdef Py_ssize_t n = A.shape[0], k = A.shape[1]
    cdef double ls = 0.0
    cdef int64_t nc = 0
    if n == 0 or k == 0:
        return 0.0, 0
    with nogil:
        _output_delta_rows(<floating*>&A[0, 0], <int64_t*>&y[0], NULL, output, loss, &out[0, 0], 0, n, k, n,
                           &ls, &nc)
    return ls, nc


def hidden_delta(const floating[:, ::1] D_next, const floating[:, ::1] W_next, const floating[:, ::1] A, int act,
                 mask, floating[:, ::1] out):
    """Hidden-layer delta ``out = (D_next @ W_next) * mask * act'(A)``.

    Parameters
    ----------
    D_next : ndarray (n_samples, n_next)
        Delta of the layer above.
    W_next : ndarray (n_next, n_units)
        Weights of the layer above (before their update).
    A : ndarray (n_samples, n_units)
        This layer's activation output, before dropout.
    act : int
        Hidden activation code.
    mask : ndarray (n_samples, n_units) or None
        Dropout multipliers of the forward pass.
    out : ndarray (n_samples, n_units)
        Written in place.
    """
    cdef Py_ssize_t n = A.shape[0], n_units = A.shape[1], n_next = W_next.shape[0]
    cdef const floating[:, ::1] m
    cdef floating* pm = NULL
    if n == 0 or n_units == 0:
        return
    if mask is not None:
        m = mask
        pm = <floating*>&m[0, 0]
    with nogil:
        if n_next > 0:
            _prod_tn(n, n_units, n_next, <floating*>&D_next[0, 0], n_next, 1, <floating*>&W_next[0, 0], n_units,
                     &out[0, 0], n_units, <floating>1, <floating>0)
        else:
            memset(&out[0, 0], 0, n * n_units * sizeof(floating))
        _deriv(&out[0, 0], <floating*>&A[0, 0], pm, n * n_units, act)


def inplace_update(floating[:, ::1] W, floating[::1] b, const floating[:, ::1] D, const floating[:, ::1] A,
                   double lr, double l2, double l1):
    """SGD step in place: ``W <- max(0, 1 - lr l2) W - lr l1 sign(W) - lr D.T @ A``, ``b <- b - lr D.sum(0)``.

    Parameters
    ----------
    W : ndarray (n_out, n_in)
    b : ndarray (n_out,)
    D : ndarray (n_samples, n_out)
        Delta w.r.t. the layer's pre-activation.
    A : ndarray (n_samples, n_in)
        The layer's input (after dropout).
    lr, l2, l1 : float
        Learning rate, L2 and L1 penalties (biases are never penalized).
    """
    cdef Py_ssize_t n_out = W.shape[0], n_in = W.shape[1], n = D.shape[0]
    if n_out == 0:
        return
    cdef floating* pd = <floating*>&D[0, 0] if n > 0 else &b[0]
    cdef floating* pa = <floating*>&A[0, 0] if n > 0 and n_in > 0 else &b[0]
    if n_in == 0:
        # no weights: only the bias moves
        with nogil:
            _update_block(&b[0], &b[0], pd, pa, n, n_out, 0, lr, l2, l1, 0, 0, 0, n_out)
        return
    with nogil:
        _update_block(&W[0, 0], &b[0], pd, pa, n, n_out, n_in, lr, l2, l1, 0, n_in, 0, n_out)


def dropout_mask(uint64_t seed, uint64_t step, uint64_t layer, int64_t keep_threshold, double scale,
                 floating[:, ::1] out):
    """Counter-based dropout multipliers, bit-identical to ``_contract.mask_bits``.

    Parameters
    ----------
    seed, step, layer : int
        Hash inputs (see ``fastmlp.backends.contract``).
    keep_threshold : int
        A unit is kept iff its 24-bit draw is below this.
    scale : float
        Value of a kept unit (``1/keep`` for inverted dropout).
    out : ndarray (n_rows, n_units)
        Filled with ``scale`` or 0.
    """
    cdef Py_ssize_t n_rows = out.shape[0], n_units = out.shape[1]
    if n_rows == 0 or n_units == 0:
        return
    with nogil:
        _fill_mask(&out[0, 0], _mask_key(seed, step, layer), 0, n_rows, n_units, <uint64_t>keep_threshold,
                   <floating>scale)


ctypedef struct ForwardCtx:
    void* X
    void* out
    void** W
    void** b
    void** bufs            # (2 * n_threads,) two ping-pong buffers of (chunk, widest layer) per thread
    Py_ssize_t* sizes      # (L + 1,)
    int L
    Py_ssize_t n
    Py_ssize_t chunk
    int hidden_act
    int output_act


cdef void _forward_worker(ForwardCtx* c, floating* tag, int tid, int nth) noexcept nogil:
    """Thread ``tid`` of ``nth`` runs every ``nth``-th chunk of rows through the whole network."""
    cdef floating* X = <floating*>c.X
    cdef floating* out = <floating*>c.out
    cdef floating** bufs = <floating**>c.bufs
    cdef Py_ssize_t* sz = c.sizes
    cdef Py_ssize_t n_chunks = (c.n + c.chunk - 1) // c.chunk
    cdef Py_ssize_t k, start, nr
    cdef int l, act
    cdef floating* src
    cdef floating* dst
    k = tid
    while k < n_chunks:
        start = k * c.chunk
        k += nth
        nr = c.n - start
        if nr > c.chunk:
            nr = c.chunk
        src = X + start * sz[0]
        for l in range(c.L):
            act = c.output_act if l == c.L - 1 else c.hidden_act
            dst = out + start * sz[c.L] if l == c.L - 1 else bufs[2 * tid + l % 2]
            _forward_rows(src, <floating*>c.W[l], <floating*>c.b[l], dst, nr, sz[l], sz[l + 1], act)
            src = dst


cdef void _fwd_worker_f32(void* ctx, int tid, int nth) noexcept nogil:
    _forward_worker(<ForwardCtx*>ctx, <float*>NULL, tid, nth)


cdef void _fwd_worker_f64(void* ctx, int tid, int nth) noexcept nogil:
    _forward_worker(<ForwardCtx*>ctx, <double*>NULL, tid, nth)


def forward_network(X, list weights, list biases, int hidden_act, int output_act, out, int n_threads=1):
    """Output activations of the whole network, in row chunks that stay in cache.

    Parameters
    ----------
    X : ndarray (n_samples, n_in)
    weights : list of ndarray (n_out, n_in)
    biases : list of ndarray (n_out,)
    hidden_act, output_act : int
        Activation codes.
    out : ndarray (n_samples, n_classes)
        Written in place.
    n_threads : int
        OpenMP threads, each taking every ``n_threads``-th chunk of 256 rows (keep the BLAS on one
        thread meanwhile); ignored without OpenMP.
    """
    cdef Py_ssize_t chunk = 256
    if not HAVE_OPENMP or n_threads < 1:
        n_threads = 1
    wmax = max([W.shape[0] for W in weights])
    bufs = [np.empty((chunk, wmax), dtype=X.dtype) for _ in range(2 * n_threads)]
    p_w, p_b, p_buf = _ptr_array(weights), _ptr_array(biases), _ptr_array(bufs)
    sizes = np.array([X.shape[1]] + [W.shape[0] for W in weights], np.intp)
    cdef ForwardCtx c
    c.X = _data(X)
    c.out = _data(out)
    c.W = <void**>_data(p_w)
    c.b = <void**>_data(p_b)
    c.bufs = <void**>_data(p_buf)
    c.sizes = <Py_ssize_t*>_data(sizes)
    c.L = len(weights)
    c.n = X.shape[0]
    c.chunk = chunk
    c.hidden_act = hidden_act
    c.output_act = output_act
    cdef bint f32 = X.dtype == np.float32
    cdef int nth = n_threads
    with nogil:
        fm_run_parallel(_fwd_worker_f32 if f32 else _fwd_worker_f64, &c, nth)


def train_epoch(X, y, order, list weights, list biases, lrs, int hidden_act, int output_act, int loss,
                Py_ssize_t batch_size, double l2, double l1, thresholds, scales, uint64_t seed, uint64_t step0,
                int n_threads=1, int n_blocks=0):
    """One epoch of minibatch SGD in one compiled call, without the GIL (see ``reference.train_epoch``).

    Parameters
    ----------
    X : ndarray (n_samples, n_in)
    y : ndarray of int64 (n_samples,)
    order : ndarray of int64 (n_used,)
        Rows in visiting order; the last minibatch may be partial.
    weights, biases : lists of ndarray ``(n_out, n_in)`` / ``(n_out,)``
        Updated in place.
    lrs : ndarray of float64 (n_steps,)
        Learning rate of each step.
    hidden_act, output_act, loss : int
        Activation and loss codes.
    batch_size : int
    l2, l1 : float
        Penalties.
    thresholds : ndarray of int64 (n_layers,)
        Dropout keep threshold of each layer's input (``2**24``: no dropout).
    scales : ndarray of float64 (n_layers,)
        Multiplier of a kept unit.
    seed, step0 : int
        Dropout hash seed and global step of the first minibatch.
    n_threads : int
        OpenMP threads (each takes a block of every minibatch's rows and a block
        of every ``W``'s columns); the caller must keep BLAS single-threaded
        when this is above 1.  Ignored without OpenMP.
    n_blocks : int
        Row blocks of every minibatch and column blocks of every ``W`` (0: ``n_threads``).  The result
        depends on the blocks only, not on how many threads run them.

    Returns
    -------
    loss_sum : float
    n_correct : int
    """
    cdef int L = len(weights), l
    cdef Py_ssize_t n_used = order.shape[0]
    cdef EpochCtx c
    if n_used == 0 or batch_size <= 0:
        return 0.0, 0
    if not FM_HAVE_OPENMP or n_threads < 1:
        n_threads = 1
    if n_blocks < 1:
        n_blocks = n_threads
    if n_threads > n_blocks:
        n_threads = n_blocks
    dt = X.dtype
    nb = min(batch_size, n_used)
    thr = np.ascontiguousarray(thresholds, dtype=np.int64)
    sc = np.ascontiguousarray(scales, dtype=np.float64)
    lr_arr = np.ascontiguousarray(lrs, dtype=np.float64)
    sizes = np.array([X.shape[1]] + [W.shape[0] for W in weights], dtype=np.intp)
    full = 1 << KEEP_BITS
    # work buffers, allocated once per call; `keep` holds them alive through the nogil section
    raw = [None] + [np.empty((nb, sizes[l + 1]), dt) for l in range(L)]
    inp = [np.empty((nb, sizes[0]), dt)]
    mask = [None]
    for l in range(1, L):
        if thr[l] < full:
            mask.append(np.empty((nb, sizes[l]), dt))
            inp.append(np.empty((nb, sizes[l]), dt))
        else:
            mask.append(None)
            inp.append(raw[l])
    delta = [None] + [np.empty((nb, sizes[l + 1]), dt) for l in range(L)]

    p_w, p_b, p_raw, p_inp, p_mask, p_delta = (_ptr_array(weights), _ptr_array(biases), _ptr_array(raw),
                                               _ptr_array(inp), _ptr_array(mask), _ptr_array(delta))
    loss_acc = np.zeros(n_blocks * PAD, np.float64)
    correct_acc = np.zeros(n_blocks * PAD, np.int64)
    yy = np.ascontiguousarray(y, dtype=np.int64)
    oo = np.ascontiguousarray(order, dtype=np.int64)

    c.X = _data(X)
    c.y = <int64_t*>_data(yy)
    c.order = <int64_t*>_data(oo)
    c.n_used = n_used
    c.batch_size = batch_size
    c.L = L
    c.sizes = <Py_ssize_t*>_data(sizes)
    c.W = <void**>_data(p_w)
    c.b = <void**>_data(p_b)
    c.raw = <void**>_data(p_raw)
    c.inp = <void**>_data(p_inp)
    c.mask = <void**>_data(p_mask)
    c.delta = <void**>_data(p_delta)
    c.lrs = <double*>_data(lr_arr)
    c.hidden_act = hidden_act
    c.output_act = output_act
    c.loss = loss
    c.l2 = l2
    c.l1 = l1
    c.thr = <int64_t*>_data(thr)
    c.scales = <double*>_data(sc)
    c.seed = seed
    c.step0 = step0
    c.loss_acc = <double*>_data(loss_acc)
    c.correct_acc = <int64_t*>_data(correct_acc)
    c.n_blocks = n_blocks
    cdef fm_worker_t fn = _worker_f64
    if dt == np.float32:
        fn = _worker_f32
    with nogil:
        fm_run_parallel(fn, &c, n_threads)
    return float(loss_acc.sum()), int(correct_acc.sum())
