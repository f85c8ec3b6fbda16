# The Cython kernels of fastmlp, shared by every ISA variant.
#
# This file is ``include``d by ``_kernels.pyx`` (baseline ISA), ``_kernels_avx2.pyx``
# (``-mavx2 -mfma``) and ``_kernels_avx512.pyx`` (AVX-512, with its own matrix
# kernels from ``_simd_gemm.h`` instead of BLAS); setup.py compiles the three with
# different flags and ``fastmlp.backends.cython`` picks one at run time.
# Compiler directives (boundscheck, wraparound, cdivision) are set in setup.py.
# The semantics of every kernel are those of ``fastmlp.backends.reference`` (the
# formulas are in the docstring of ``fastmlp.backends.contract``).
#
# Layout: ``W`` is ``(n_out, n_in)`` C-contiguous, which BLAS (column-major)
# sees as its transpose ``Wc = W.T`` of shape ``(n_in, n_out)`` with leading
# dimension ``n_in``; likewise a C-contiguous activation ``A (n, n_in)`` is
# ``A.T`` with leading dimension ``n_in``.  Every gemm below is written in
# those column-major views.
#
# Numerics: the variants are compiled with ``-ffast-math`` so that gcc may
# call glibc's vectorized ``exp`` (libmvec; ``tanh`` is built from it, below).  The compiler then
# assumes that no NaN or Inf occurs: nothing here tests for them (the Python
# side checks finiteness), and ``exp`` arguments are clamped so that no Inf
# can arise in the first place.
#
# Nothing inside a ``nogil`` section allocates or raises: the Python entry
# points check every array and allocate every buffer before they release the GIL.

cimport numpy as cnp
from cpython.pycapsule cimport PyCapsule_GetName, PyCapsule_GetPointer
from cython cimport floating
from libc.float cimport DBL_EPSILON, FLT_EPSILON
from libc.math cimport copysign, copysignf, exp, expf, fabs, fabsf, log, pow, sqrt, sqrtf
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

import numpy as np

from fastmlp.backends._aligned import empty_aligned

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
    int FM_SIMD_KERNELS
    const char* FM_ISA_NAME
    int FM_PEAK_CHAINS
    int FM_PEAK_LANES_F32
    int FM_PEAK_LANES_F64
    void fm_nt_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* W, int64_t ldw,
                   float* C, int64_t ldc, int* bad)
    void fm_nt_f64(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* W, int64_t ldw,
                   double* C, int64_t ldc, int* bad)
    void fm_ntp_f32(int64_t M, int64_t N, int64_t K, float** arows, const float* W, int64_t ldw, float* C,
                    int64_t ldc)
    void fm_ntp_f64(int64_t M, int64_t N, int64_t K, double** arows, const double* W, int64_t ldw, double* C,
                    int64_t ldc)
    void fm_gemm_f32(int64_t P, int64_t K, int64_t Q, float** lrow, int64_t ls, float** rrow, int64_t roff,
                     float* C, int64_t ldc, float alpha, float beta)
    void fm_gemm_f64(int64_t P, int64_t K, int64_t Q, double** lrow, int64_t ls, double** rrow, int64_t roff,
                     double* C, int64_t ldc, double alpha, double beta)
    void fm_transpose_f32(int64_t rows, int64_t cols, const float* S, int64_t lds, float* D, int64_t ldd)
    void fm_transpose_f64(int64_t rows, int64_t cols, const double* S, int64_t lds, double* D, int64_t ldd)
    void fm_prefetch(const void* p, int64_t nbytes)
    int64_t fm_sp_compress_f32(const float* x, int64_t n, int64_t limit, int32_t* idx, float* val)
    int64_t fm_sp_compress_f64(const double* x, int64_t n, int64_t limit, int32_t* idx, double* val)
    void fm_sp_rows_f32(int64_t nr, const int32_t* idx, const float* val, int64_t stride, const int64_t* cnt,
                        const float* wt, int64_t ldt, int64_t n, float* z, int64_t ldz)
    void fm_sp_rows_f64(int64_t nr, const int32_t* idx, const double* val, int64_t stride, const int64_t* cnt,
                        const double* wt, int64_t ldt, int64_t n, double* z, int64_t ldz)
    double fm_fma_peak_f32(int64_t iters)
    double fm_fma_peak_f64(int64_t iters)

#: whether this build trains with its own SIMD matrix kernels (avx512; avx2 unless compiled with FASTMLP_AVX2_BLAS);
#: otherwise SciPy's BLAS does the products
SIMD_GEMM = bool(FM_SIMD_GEMM)
#: whether inference (``forward_network``) runs this build's own SIMD kernels (avx512 and avx2 builds)
SIMD_INFER = bool(FM_SIMD_KERNELS)
#: the instruction set this build's kernels were compiled for: 'avx512', 'avx2' or 'baseline'
ISA = FM_ISA_NAME.decode()

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
    TARGET_LABELS = 0
    TARGET_DENSE = 1
    OPT_SGD = 0
    OPT_MOMENTUM = 1
    OPT_NESTEROV = 2
    OPT_ADAM = 3
    OPT_ADAMW = 4
    OPT_GRADIENT = 5
    EPS_SKLEARN = 0
    EPS_TORCH = 1
    KEEP_BITS = 24
    NOTRANS = 78  # BLAS transpose flags: 'N'
    TRANS = 84    # 'T'

#: activation, loss, target, optimizer and epsilon-mode codes compiled into this module
ACT_CODES = {"identity": ACT_IDENTITY, "sigmoid": ACT_SIGMOID, "tanh": ACT_TANH, "relu": ACT_RELU,
             "softmax": ACT_SOFTMAX, "exp": ACT_EXP}
LOSS_CODES = {"mse": LOSS_MSE, "ce": LOSS_CE, "squared_error": LOSS_SQE, "poisson": LOSS_POISSON}
TARGET_CODES = {"labels": TARGET_LABELS, "dense": TARGET_DENSE}
OPTIMIZER_CODES = {"sgd": OPT_SGD, "momentum": OPT_MOMENTUM, "nesterov": OPT_NESTEROV, "adam": OPT_ADAM,
                   "adamw": OPT_ADAMW, "gradient": OPT_GRADIENT}
EPS_MODES = {"sklearn": EPS_SKLEARN, "torch": EPS_TORCH}
#: state slots of each optimizer code
cdef dict _SLOTS = {OPT_SGD: 0, OPT_MOMENTUM: 1, OPT_NESTEROV: 1, OPT_ADAM: 2, OPT_ADAMW: 2, OPT_GRADIENT: 1}
#: exp arguments (the sigmoid's, the softmax's and the exp output's) are capped at these, below the overflow of
#: expf (88.72) and exp (709.78), so that no Inf appears
cdef float CAP_F32 = 88.0
cdef double CAP_F64 = 708.0
EXP_CAP = {"float32": float(CAP_F32), "float64": float(CAP_F64)}
#: whether this build runs ``train_epoch`` on several OpenMP threads
HAVE_OPENMP = bool(FM_HAVE_OPENMP)

# spacing of the per-block accumulators (one cache line of doubles each)
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
    """``C (m, n) = A (m, k) @ W (n, k).T`` on ``W`` as stored (inference; BLAS builds: every forward pass);
    ``m, n, k >= 1``."""
    if FM_SIMD_GEMM:
        if floating is float:
            fm_nt_f32(m, n, k, A, lda, W, ldw, C, ldc, NULL)
        else:
            fm_nt_f64(m, n, k, A, lda, W, ldw, C, ldc, NULL)
    else:
        # C.T (n, m) = Wc.T @ A.T in BLAS's column-major view
        _gemm(TRANS, NOTRANS, <int>n, <int>m, <int>k, <floating>1, W, <int>ldw, A, <int>lda, <floating>0, C, <int>ldc)


cdef inline void _prod_tn(Py_ssize_t p, Py_ssize_t k, Py_ssize_t q, floating* S, Py_ssize_t sp, Py_ssize_t sq,
                          floating* R, Py_ssize_t ldr, floating* C, Py_ssize_t ldc, floating alpha,
                          floating beta) noexcept nogil:
    """BLAS builds: ``C (p, k) = beta C + alpha S (p, q) @ R (q, k)``, ``S`` with strides ``(sp, sq)``, one of
    them 1.  ``beta == 0`` never reads ``C``; ``p, k >= 1``, ``q >= 0``."""
    if sp == 1 and (sq != 1 or p == 1):
        # C.T (k, p) = alpha R.T (k, q) @ S (q, p) [S.T in column-major, ld sq] + beta C.T
        _gemm(NOTRANS, TRANS, <int>k, <int>p, <int>q, alpha, R, <int>ldr, S, <int>sq, beta, C, <int>ldc)
    else:
        # C.T (k, p) = alpha R.T (k, q) @ S.T (q, p) [S column-major (q, p), ld sp] + beta C.T
        _gemm(NOTRANS, NOTRANS, <int>k, <int>p, <int>q, alpha, R, <int>ldr, S, <int>sp, beta, C, <int>ldc)


cdef inline void _mm(Py_ssize_t P, Py_ssize_t K, Py_ssize_t Q, floating** lrow, Py_ssize_t ls, floating** rrow,
                     Py_ssize_t roff, floating* C, Py_ssize_t ldc, floating alpha, floating beta) noexcept nogil:
    """SIMD builds: ``C (P, K) = beta C + alpha L (P, Q) @ R (Q, K)`` with ``L[i][q] = lrow[i][q * ls]`` and
    ``R[q][j] = rrow[q][roff + j]`` (the outer-product kernel ``fm_gemm``; ``beta == 0`` never reads ``C``)."""
    if floating is float:
        fm_gemm_f32(P, K, Q, lrow, ls, rrow, roff, C, ldc, alpha, beta)
    else:
        fm_gemm_f64(P, K, Q, lrow, ls, rrow, roff, C, ldc, alpha, beta)


cdef inline void _transpose(Py_ssize_t rows, Py_ssize_t cols, floating* S, Py_ssize_t lds, floating* D,
                            Py_ssize_t ldd) noexcept nogil:
    """``D[j][i] = S[i][j]`` for ``i < rows``, ``j < cols``."""
    if floating is float:
        fm_transpose_f32(rows, cols, S, lds, D, ldd)
    else:
        fm_transpose_f64(rows, cols, S, lds, D, ldd)


def _empty64(shape, dt):
    """An uninitialised C-ordered array of ``shape`` on a 64-byte boundary (:mod:`fastmlp.backends._aligned`:
    NumPy's 16-byte alignment splits every vector load of a padded row across two cache lines)."""
    return empty_aligned(shape, dt)


def _ld(Py_ssize_t n, Py_ssize_t itemsize):
    """Row stride (elements) of a work buffer ``n`` wide in SIMD builds: whole cache lines, and an odd number of
    them once a row is wider than one register tile, so that the rows of a tile's column panel spread over
    every cache set instead of a few (a row of 1024 float32, 4 KiB, would put them all in one)."""
    cdef Py_ssize_t lines = (n * itemsize + 63) // 64
    if lines > 4 and lines % 2 == 0:
        lines += 1
    return max(1, lines * 64 // itemsize)


cdef object _rows_at(size_t base, Py_ssize_t n, Py_ssize_t stride_bytes):
    """``n`` addresses ``base + i * stride_bytes`` as a ``uintp`` array (a row table of the SIMD products)."""
    return np.arange(n, dtype=np.uintp) * np.uintp(stride_bytes) + np.uintp(base)


cdef object _rows(object a, Py_ssize_t n, Py_ssize_t stride, Py_ssize_t offset=0):
    """The addresses of ``n`` rows of ``a``: ``a + offset + i * stride`` (elements), as a ``uintp`` array."""
    cdef Py_ssize_t item = (<cnp.ndarray>a).itemsize
    return (np.arange(n, dtype=np.uintp) * np.uintp(stride * item)
            + np.uintp(<size_t>cnp.PyArray_DATA(<cnp.ndarray>a) + <size_t>(offset * item)))


# --------------------------------------------------------------- activations
cdef inline floating _exp(floating x) noexcept nogil:
    if floating is float:
        return expf(x)
    else:
        return exp(x)


# tanh from the exponential, branch-free so that gcc vectorizes it with the vector ``exp`` (libmvec's own
# vector tanh needs glibc 2.35; this keeps the wheels at manylinux_2_31): for |x| >= 0.625,
# tanh|x| = 1 - 2 / (exp(2|x|) + 1), which has no cancellation there; below, where it would, Cephes'
# odd minimax approximations (tanhf: a degree-11 polynomial; tanh: x + x^3 P(x^2) / Q(x^2)).  |x| is
# capped at 10 (float) and 20 (double), where tanh has rounded to 1 (from 9.02 and 19.07), so exp never
# overflows.  Within 2 ulp of the correctly rounded tanh, like libm's (tests/test_cython_tanh.py).
cdef inline floating _tanh(floating x) noexcept nogil:
    cdef floating a, s, e, big, small
    if floating is float:
        a = fabsf(x)
        a = a if a < <float>10.0 else <float>10.0
        e = expf(a + a)
        big = copysignf(1 - 2 / (e + 1), x)
        s = x * x
        small = x + (((((<float>-5.70498872745e-3) * s + <float>2.06390887954e-2) * s - <float>5.37397155531e-2) * s
                      + <float>1.33314422036e-1) * s - <float>3.33332819422e-1) * s * x
    else:
        a = fabs(x)
        a = a if a < 20.0 else 20.0
        e = exp(a + a)
        big = copysign(1 - 2 / (e + 1), x)
        s = x * x
        small = x + x * s * (((-9.64399179425052238628e-1 * s - 9.92877231001918586564e1) * s - 1.61468768441708447952e3)
                             / (((s + 1.12811678491632931402e2) * s + 2.23548839060100448583e3) * s
                                + 4.84406305325125486048e3))
    return small if a < <floating>0.625 else big


cdef inline void _bias_act_row(floating* z, floating* b, Py_ssize_t n, int act) noexcept nogil:
    """``z <- act(z + b)`` over one row of ``n`` units (the gemm's tile, still in cache)."""
    cdef Py_ssize_t j
    cdef floating t, cap, mx, s
    if floating is float:
        cap = CAP_F32
    else:
        cap = CAP_F64
    if act == ACT_SIGMOID:
        # 1 / (1 + exp(-z)); exp(-z) is capped below the type's overflow so no Inf appears: the result
        # is then ~1e-38 / ~1e-308 instead of 0
        for j in range(n):
            t = -(z[j] + b[j])
            if t > cap:
                t = cap
            z[j] = 1 / (1 + _exp(t))
    elif act == ACT_EXP:
        for j in range(n):
            t = z[j] + b[j]
            if t > cap:
                t = cap
            z[j] = _exp(t)
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


cdef void _forward_rows_infer(floating* A, floating* W, floating* b, floating* Z, Py_ssize_t n, Py_ssize_t n_in,
                              Py_ssize_t n_out, int act, int* bad) noexcept nogil:
    """:func:`_forward_rows` for inference: the SIMD dot-product kernel wherever the build has it (the avx2
    build too, which trains through BLAS), with the finiteness test of ``W`` when ``bad`` is given."""
    cdef Py_ssize_t r
    if not FM_SIMD_KERNELS:
        _forward_rows(A, W, b, Z, n, n_in, n_out, act)
        return
    if n <= 0 or n_out <= 0:
        return
    if n_in > 0:
        if floating is float:
            fm_nt_f32(n, n_out, n_in, A, n_in, W, n_in, Z, n_out, bad)
        else:
            fm_nt_f64(n, n_out, n_in, A, n_in, W, n_in, Z, n_out, bad)
    else:
        memset(Z, 0, n * n_out * sizeof(floating))
    for r in range(n):
        _bias_act_row(Z + r * n_out, b, n_out, act)


cdef void _forward_rows_t(floating** lrow, floating** wt_rows, floating* b, floating* Z, Py_ssize_t ldz, Py_ssize_t n,
                          Py_ssize_t n_in, Py_ssize_t n_out, int act) noexcept nogil:
    """SIMD builds: ``Z (n, n_out; ldz) = act(A W.T + b)`` with the rows of ``A`` in ``lrow`` and the rows of the
    transposed ``W`` (``n_in`` of them) in ``wt_rows``: the outer-product kernel, then bias and activation."""
    cdef Py_ssize_t r
    if n <= 0 or n_out <= 0:
        return
    _mm(n, n_out, n_in, lrow, 1, wt_rows, 0, Z, ldz, <floating>1, <floating>0)
    for r in range(n):
        _bias_act_row(Z + r * ldz, b, n_out, act)


cdef void _forward_rows_nt(floating** lrow, floating* W, Py_ssize_t ldw, floating* b, floating* Z, Py_ssize_t ldz,
                           Py_ssize_t n, Py_ssize_t n_in, Py_ssize_t n_out, int act) noexcept nogil:
    """SIMD builds: :func:`_forward_rows_t` by dot products on ``W (n_out, n_in; ldw)`` as stored (``fm_ntp``)."""
    cdef Py_ssize_t r
    if n <= 0 or n_out <= 0:
        return
    if floating is float:
        fm_ntp_f32(n, n_out, n_in, lrow, W, ldw, Z, ldz)
    else:
        fm_ntp_f64(n, n_out, n_in, lrow, W, ldw, Z, ldz)
    for r in range(n):
        _bias_act_row(Z + r * ldz, b, n_out, act)


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


cdef void _deriv_rows(floating* d, floating* a, floating* m, Py_ssize_t nr, Py_ssize_t n, Py_ssize_t ld,
                      int act) noexcept nogil:
    """:func:`_deriv` on ``nr`` rows of ``n`` elements ``ld`` apart (``m`` NULL: no mask)."""
    cdef Py_ssize_t r
    if ld == n:
        _deriv(d, a, m, nr * n, act)
        return
    for r in range(nr):
        _deriv(d + r * ld, a + r * ld, m + r * ld if m != NULL else NULL, n, act)


# --------------------------------------------------------------- output delta
cdef inline double _xlogy(double x, double y) noexcept nogil:
    """``x log y`` with ``0 log y = 0``."""
    return 0.0 if x == 0.0 else x * log(y)


cdef inline void _mse_chain(floating* o, floating* a, Py_ssize_t k, int output) noexcept nogil:
    """``o <- o * act'(a)`` for the notebook's MSE: the sigmoid's ``a (1 - a)``, the softmax's Jacobian
    ``a * (g - sum(g * a))``, nothing for the identity."""
    cdef Py_ssize_t j
    cdef floating sm
    if output == ACT_SIGMOID:
        for j in range(k):
            o[j] = o[j] * (a[j] * (1 - a[j]))
    elif output == ACT_SOFTMAX:
        sm = 0
        for j in range(k):
            sm = sm + o[j] * a[j]
        for j in range(k):
            o[j] = a[j] * (o[j] - sm)


cdef void _target_rows(floating* A, int64_t* y, floating* Yd, int64_t* idx, double* sw, double s,
                             int output, int loss, floating* out, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t k,
                             Py_ssize_t n, double* loss_sum, int64_t* n_correct) noexcept nogil:
    """:func:`_output_delta_rows` for any target: a dense row, or a label written into the row of ``out``
    first (then overwritten by the delta)."""
    cdef Py_ssize_t r, j, best, tbest, i
    cdef int64_t lab = 0
    cdef floating* a
    cdef floating* o
    cdef floating* t
    cdef floating d, cw, eps_, hi, fn = <floating>n
    cdef double ls = 0.0, li, p, tj
    cdef int64_t hits = 0
    cdef bint ok
    if floating is float:
        eps_ = FLT_EPSILON
    else:
        eps_ = DBL_EPSILON
    hi = 1 - eps_
    for r in range(r0, r1):
        i = idx[r] if idx != NULL else r
        a = A + r * k
        o = out + r * k
        if Yd != NULL:
            t = Yd + i * k
        else:
            lab = y[i]
            t = o
            if k == 1:
                o[0] = <floating>lab
            else:
                for j in range(k):
                    o[j] = 0
                if 0 <= lab < k:
                    o[lab] = 1
        # the prediction (contract: n_correct)
        if Yd != NULL and output == ACT_SIGMOID:
            ok = True
            for j in range(k):
                if (a[j] > 0.5) != (t[j] > 0.5):
                    ok = False
                    break
        elif k == 1:
            ok = (a[0] > 0.5) == ((t[0] > 0.5) if Yd != NULL else (lab == 1))
        else:
            best = 0
            for j in range(1, k):
                if a[j] > a[best]:
                    best = j
            if Yd == NULL:
                ok = best == lab
            else:
                tbest = 0
                for j in range(1, k):
                    if t[j] > t[tbest]:
                        tbest = j
                ok = best == tbest
        if ok:
            hits += 1
        # the data loss, in float64
        li = 0.0
        if loss == LOSS_MSE or loss == LOSS_SQE:
            for j in range(k):
                p = <double>a[j] - <double>t[j]
                li += p * p
            li = li / <double>k
            if loss == LOSS_SQE:
                li = 0.5 * li
        elif loss == LOSS_POISSON:
            for j in range(k):
                tj = <double>t[j]
                p = <double>a[j]
                li += (0.0 if tj == 0.0 else tj * log(tj / p)) - tj + p
        else:
            # cross-entropy of probabilities clipped to [eps, 1 - eps] in the dtype (scikit-learn's log_loss)
            for j in range(k):
                d = a[j]
                if d < eps_:
                    d = eps_
                if d > hi:
                    d = hi
                p = <double>d
                tj = <double>t[j]
                if output == ACT_SOFTMAX:
                    li -= _xlogy(tj, p)
                else:
                    li -= _xlogy(tj, p) + _xlogy(1.0 - tj, 1.0 - p)
        if sw != NULL:
            ls += sw[i] * li
        else:
            ls += li
        # the delta: (a - t) times the row's factor (2 c_i for the notebook's MSE)
        if sw == NULL:
            for j in range(k):
                d = a[j] - t[j]
                if loss == LOSS_MSE:
                    d = 2 * d
                o[j] = d / fn
        else:
            cw = <floating>(sw[i] / s)
            for j in range(k):
                d = a[j] - t[j]
                if loss == LOSS_MSE:
                    d = 2 * d
                o[j] = d * cw
        if loss == LOSS_MSE:
            _mse_chain(o, a, k, output)
    if sw != NULL:
        loss_sum[0] += (<double>n * ls) / s
    else:
        loss_sum[0] += ls
    n_correct[0] += hits


cdef void _label_rows(floating* A, int64_t* y, int64_t* idx, double* sw, double s, int output, int loss,
                      floating* out, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t k, Py_ssize_t n, double* loss_sum,
                      int64_t* n_correct) noexcept nogil:
    """:func:`_output_delta_rows` for labels and ``k >= 2`` units (one-hot targets, never materialised):
    the same numbers as :func:`_target_rows` on the one-hot rows (its terms of a zero target are exact
    zeros), with one log per row for the softmax's cross-entropy."""
    cdef Py_ssize_t r, j, best, i
    cdef int64_t lab
    cdef floating* a
    cdef floating* o
    cdef floating d, cw, eps_, hi, fn = <floating>n
    cdef double ls = 0.0, li, p
    cdef int64_t hits = 0
    if floating is float:
        eps_ = FLT_EPSILON
    else:
        eps_ = DBL_EPSILON
    hi = 1 - eps_
    for r in range(r0, r1):
        i = idx[r] if idx != NULL else r
        a = A + r * k
        o = out + r * k
        lab = y[i]
        best = 0
        for j in range(1, k):
            if a[j] > a[best]:
                best = j
        if best == lab:
            hits += 1
        li = 0.0
        if loss == LOSS_CE:
            if output == ACT_SOFTMAX:
                if 0 <= lab < k:
                    d = a[lab]
                    d = eps_ if d < eps_ else (hi if d > hi else d)
                    li = -log(<double>d)
            else:
                for j in range(k):
                    d = a[j]
                    d = eps_ if d < eps_ else (hi if d > hi else d)
                    p = <double>d
                    li -= log(p) if j == lab else log(1.0 - p)
        elif loss == LOSS_POISSON:
            for j in range(k):
                p = <double>a[j]
                li += (log(1.0 / p) - 1.0 + p) if j == lab else p
        else:
            for j in range(k):
                p = <double>a[j] - 1.0 if j == lab else <double>a[j]
                li += p * p
            li = li / <double>k
            if loss == LOSS_SQE:
                li = 0.5 * li
        if sw != NULL:
            ls += sw[i] * li
            cw = <floating>(sw[i] / s)
            for j in range(k):
                d = a[j] - 1 if j == lab else a[j]
                if loss == LOSS_MSE:
                    d = 2 * d
                o[j] = d * cw
        else:
            ls += li
            for j in range(k):
                d = a[j] - 1 if j == lab else a[j]
                if loss == LOSS_MSE:
                    d = 2 * d
                o[j] = d / fn
        if loss == LOSS_MSE:
            _mse_chain(o, a, k, output)
    if sw != NULL:
        loss_sum[0] += (<double>n * ls) / s
    else:
        loss_sum[0] += ls
    n_correct[0] += hits


cdef void _output_delta_rows(floating* A, int64_t* y, floating* Yd, int64_t* idx, double* sw, double s,
                             int output, int loss, floating* out, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t k,
                             Py_ssize_t n, double* loss_sum, int64_t* n_correct) noexcept nogil:
    """Delta ``out`` of rows ``[r0, r1)`` of the output activations ``A (n, k)`` of a minibatch of ``n`` rows.

    Row ``r``'s target is that of sample ``i = idx[r]`` (``i = r`` when ``idx`` is NULL): the dense row
    ``Yd[i]`` when ``Yd`` is not NULL, else the label ``y[i]`` (one-hot for ``k >= 2``, the label itself
    for one unit).  ``sw`` (NULL: unweighted) holds the sample weights and ``s`` their minibatch sum;
    unweighted the scaled difference is divided by ``n``, weighted it is multiplied by ``w_i / s``
    (taken in float64, then rounded to the dtype), as the reference does.  Adds the rows' data loss
    (float64; weighted: ``n sum w_i l_i / s``) to ``loss_sum`` and their hits to ``n_correct``.
    """
    if Yd == NULL and k >= 2:
        _label_rows(A, y, idx, sw, s, output, loss, out, r0, r1, k, n, loss_sum, n_correct)
    else:
        _target_rows(A, y, Yd, idx, sw, s, output, loss, out, r0, r1, k, n, loss_sum, n_correct)


# --------------------------------------------------------------- update
cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline floating _l1_step(floating w, floating c) noexcept nogil:
    """``c sign(w)`` (0 at an exact zero)."""
    return c if w > 0 else (-c if w < 0 else 0)


cdef double _sumsq(floating* W, Py_ssize_t n_out, Py_ssize_t ldw, Py_ssize_t j0, Py_ssize_t j1) noexcept nogil:
    """Sum of squares (float64) of the columns ``[j0, j1)`` of ``W (n_out, .)`` with row stride ``ldw``."""
    cdef double acc = 0.0, w
    cdef Py_ssize_t o, j
    cdef floating* row
    for o in range(n_out):
        row = W + o * ldw
        for j in range(j0, j1):
            w = <double>row[j]
            acc += w * w
    return acc


cdef inline void _bias_grad(floating* D, Py_ssize_t ldd, Py_ssize_t n, Py_ssize_t o0, Py_ssize_t o1,
                            floating* g) noexcept nogil:
    """``g[o] = sum_r D[r, o]`` for the units ``[o0, o1)`` of ``D (n, .)`` with row stride ``ldd``."""
    cdef Py_ssize_t o, r
    cdef floating s
    for o in range(o0, o1):
        s = 0
        for r in range(n):
            s = s + D[r * ldd + o]
        g[o] = s


cdef inline void _grad_block(floating* G, Py_ssize_t ldg, floating* D, Py_ssize_t ldd, floating* A, Py_ssize_t lda,
                             floating** dt_rows, floating** a_rows, Py_ssize_t n, Py_ssize_t n_out, Py_ssize_t j0,
                             Py_ssize_t j1, floating alpha, floating beta) noexcept nogil:
    """``G[:, j0:j1] = beta G[:, j0:j1] + alpha D.T A[:, j0:j1]`` with ``D (n, n_out; ldd)`` and ``A (n, .; lda)``:
    SIMD builds read ``D`` transposed through ``dt_rows`` (``D + o``, step ``ldd``) and ``A`` through ``a_rows``."""
    if j1 <= j0:
        return
    if FM_SIMD_GEMM:
        _mm(n_out, j1 - j0, n, dt_rows, ldd, a_rows, j0, G + j0, ldg, alpha, beta)
    else:
        _prod_tn(n_out, j1 - j0, n, D, 1, ldd, A + j0, lda, G + j0, ldg, alpha, beta)


cdef void _sgd_block(floating* W, Py_ssize_t ldw, floating* b, floating* D, Py_ssize_t ldd, floating* A,
                     Py_ssize_t lda, floating** dt_rows, floating** a_rows, Py_ssize_t n, Py_ssize_t n_out,
                     double lr, double beta, double l1, Py_ssize_t j0, Py_ssize_t j1, Py_ssize_t o0,
                     Py_ssize_t o1) noexcept nogil:
    """SGD step on the input columns ``[j0, j1)`` of ``W (n_out, .; ldw)`` and the units ``[o0, o1)`` of ``b``.

    ``W <- beta W - lr l1 sign(W) - lr D.T A`` with ``D (n, n_out)``, ``A (n, n_in)`` and ``beta`` the
    decay less ``lr alpha / s`` (scikit-learn's penalty, folded in): without L1 ``beta`` is the
    product's own and the gradient product writes straight into ``W``; with L1 one pass applies
    ``beta`` and the L1 term (sign of the old ``W``) first and the product then adds with ``beta = 1``.
    ``b <- b - lr sum_r D[r]``.
    """
    cdef floating fb, c, w, s
    cdef floating* row
    cdef Py_ssize_t o, j, r
    if l1 != 0.0:
        fb = <floating>beta
        c = <floating>(lr * l1)
        for o in range(n_out):
            row = W + o * ldw
            for j in range(j0, j1):
                w = row[j]
                row[j] = fb * w - _l1_step(w, c)
        fb = 1
    else:
        fb = <floating>beta
    # W[:, j0:j1] (n_out, j1 - j0) = fb W[:, j0:j1] - lr D.T (n_out, n) @ A[:, j0:j1] (n, j1 - j0)
    _grad_block(W, ldw, D, ldd, A, lda, dt_rows, a_rows, n, n_out, j0, j1, <floating>(-lr), fb)
    c = <floating>lr
    for o in range(o0, o1):
        s = 0
        for r in range(n):
            s = s + D[r * ldd + o]
        b[o] = b[o] - c * s


ctypedef struct OptStep:
    # the per-step scalars of an optimizer update, in float64 (each kernel rounds them to its dtype)
    int opt
    int eps_mode
    double lr
    double decay           # max(0, 1 - lr l2)
    double l1step          # lr l1
    double ga              # alpha / s
    double momentum
    double beta1
    double beta2
    double eps
    double step            # Adam's step size: lr sqrt(c2) / c1 (sklearn) or lr / c1 (torch)
    double sqrt_c2         # sqrt(1 - beta2^t)


cdef void _opt_run(OptStep* p, floating* w, floating* g, floating* m, floating* v, Py_ssize_t n,
                   bint penalized) noexcept nogil:
    """One optimizer step on ``n`` contiguous parameters ``w`` with gradients ``g`` and state ``m``, ``v``.

    ``penalized`` (weights): ``g`` gets ``alpha / s * w`` and ``w`` the decoupled decay and L1 term, all
    from the weights before the step; biases are never penalized.  Then
    ``w <- (decay w - lr l1 sign(w)) + u`` with ``u`` the optimizer's update (contract table).
    """
    cdef Py_ssize_t j
    cdef floating x, gj, vj, mj, u
    cdef floating ga = 0, dec = 1, cl = 0
    cdef floating lr = <floating>p.lr, mu = <floating>p.momentum
    cdef floating b1 = <floating>p.beta1, ob1 = <floating>(1.0 - p.beta1)
    cdef floating b2 = <floating>p.beta2, ob2 = <floating>(1.0 - p.beta2)
    cdef floating step = <floating>p.step, sc2 = <floating>p.sqrt_c2, eps = <floating>p.eps
    if penalized:
        ga = <floating>p.ga
        dec = <floating>p.decay
        cl = <floating>p.l1step
    if p.opt == OPT_MOMENTUM:
        for j in range(n):
            x = w[j]
            gj = g[j] + ga * x
            vj = mu * m[j] - lr * gj
            m[j] = vj
            w[j] = (dec * x - _l1_step(x, cl)) + vj
    elif p.opt == OPT_NESTEROV:
        for j in range(n):
            x = w[j]
            gj = g[j] + ga * x
            vj = mu * m[j] - lr * gj
            m[j] = vj
            w[j] = (dec * x - _l1_step(x, cl)) + (mu * vj - lr * gj)
    elif p.eps_mode == EPS_TORCH:  # Adam / AdamW, PyTorch's epsilon: sqrt(v / c2) + eps
        for j in range(n):
            x = w[j]
            gj = g[j] + ga * x
            mj = b1 * m[j] + ob1 * gj
            vj = b2 * v[j] + ob2 * (gj * gj)
            m[j] = mj
            v[j] = vj
            u = -step * mj / (_sqrt(vj) / sc2 + eps)
            w[j] = (dec * x - _l1_step(x, cl)) + u
    else:  # Adam / AdamW, scikit-learn's epsilon: sqrt(v) + eps
        for j in range(n):
            x = w[j]
            gj = g[j] + ga * x
            mj = b1 * m[j] + ob1 * gj
            vj = b2 * v[j] + ob2 * (gj * gj)
            m[j] = mj
            v[j] = vj
            u = -step * mj / (_sqrt(vj) + eps)
            w[j] = (dec * x - _l1_step(x, cl)) + u


cdef void _opt_block(OptStep* p, floating* W, Py_ssize_t ldw, floating* b, floating* G, Py_ssize_t ldg,
                     floating* Gb, floating* mW, floating* vW, floating* mb, floating* vb, floating* D,
                     Py_ssize_t ldd, floating* A, Py_ssize_t lda, floating** dt_rows, floating** a_rows, Py_ssize_t n,
                     Py_ssize_t n_out, Py_ssize_t n_in, Py_ssize_t j0, Py_ssize_t j1, Py_ssize_t o0,
                     Py_ssize_t o1) noexcept nogil:
    """Gradient and optimizer step on the columns ``[j0, j1)`` of ``W`` and the units ``[o0, o1)`` of ``b``.

    The gradient block ``G[:, j0:j1] = D.T A[:, j0:j1]`` comes from the matrix product (``beta = 0``),
    then one fused pass per row applies the penalties and the optimizer (:func:`_opt_run`).  For the
    ``gradient`` optimizer ``G`` and ``Gb`` are the state's own arrays: they get the gradient (with the
    ``alpha`` term) and nothing steps.  ``mW``/``vW``/``mb``/``vb`` are the state slots (NULL when unused),
    rows ``n_in`` apart; ``W`` and ``G`` have their own row strides.
    """
    cdef Py_ssize_t o, j, w0 = j1 - j0
    cdef floating ga
    cdef floating* row
    cdef floating* grow
    _grad_block(G, ldg, D, ldd, A, lda, dt_rows, a_rows, n, n_out, j0, j1, <floating>1, <floating>0)
    _bias_grad(D, ldd, n, o0, o1, Gb)
    if p.opt == OPT_GRADIENT:
        if p.ga != 0.0 and w0 > 0:
            ga = <floating>p.ga
            for o in range(n_out):
                row = W + o * ldw
                grow = G + o * ldg
                for j in range(j0, j1):
                    grow[j] = grow[j] + ga * row[j]
        return
    if w0 > 0:
        for o in range(n_out):
            _opt_run(p, W + o * ldw + j0, G + o * ldg + j0, mW + o * n_in + j0,
                     vW + o * n_in + j0 if vW != NULL else NULL, w0, True)
    if o1 > o0:
        _opt_run(p, b + o0, Gb + o0, mb + o0, vb + o0 if vb != NULL else NULL, o1 - o0, False)


# --------------------------------------------------------------- dropout
cdef inline uint64_t _mix64(uint64_t z) noexcept nogil:
    """splitmix64 finalizer (arithmetic modulo 2**64)."""
    z = (z ^ (z >> 30)) * FM_MIX1
    z = (z ^ (z >> 27)) * FM_MIX2
    return z ^ (z >> 31)


cdef inline uint64_t _mask_key(uint64_t seed, uint64_t step, uint64_t layer) noexcept nogil:
    return _mix64(_mix64(seed + FM_GOLDEN * (layer + 1)) + FM_GOLDEN * (step + 1))


cdef void _fill_mask(floating* out, uint64_t key, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t n_units, Py_ssize_t ld,
                     uint64_t thr, floating scale) noexcept nogil:
    """Rows ``[r0, r1)`` of the ``(n_rows, n_units)`` multipliers (rows ``ld`` apart in ``out``): ``scale`` where
    ``mix64(key + G c) >> 40 < thr``.

    ``c = r n_units + u + 1`` counts the units of the whole minibatch, so a row
    block drawn by one thread is the same as in the full matrix.
    """
    cdef Py_ssize_t r, u
    cdef uint64_t ctr
    cdef floating* o
    for r in range(r0, r1):
        o = out + r * ld
        ctr = <uint64_t>(r * n_units) + 1
        for u in range(n_units):
            o[u] = scale if (_mix64(key + FM_GOLDEN * (ctr + <uint64_t>u)) >> 40) < thr else 0


cdef void _gather_rows(floating* X, int64_t* idx, floating* out, Py_ssize_t ld, Py_ssize_t r0, Py_ssize_t r1,
                       Py_ssize_t n_in, bint drop, uint64_t key, uint64_t thr, floating scale) noexcept nogil:
    """``out[r] = X[idx[r]]`` (rows ``ld`` apart) for ``r`` in ``[r0, r1)``, times the input-dropout multipliers
    when ``drop``."""
    cdef Py_ssize_t r, u
    cdef uint64_t ctr
    cdef floating* src
    cdef floating* dst
    cdef floating m
    for r in range(r0, r1):
        src = X + idx[r] * n_in
        dst = out + r * ld
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
    int64_t* y             # labels (n_samples,), or NULL for dense targets
    void* Yd               # dense targets (n_samples, n_out), or NULL for labels
    double* sw             # sample weights (n_samples,), or NULL
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
    void** G               # (L,) weight gradients (the gradient optimizer: its state slot); unused by SGD
    void** Gb              # (L,) bias gradients, likewise
    void** mW              # (L,) state slot 0 of each W (velocity or first moment), or NULL
    void** vW              # (L,) state slot 1 of each W (second moment), or NULL
    void** mb              # (L,) the same slots of each b
    void** vb
    double* lrs
    int hidden_act
    int output_act
    int loss
    double l2
    double l1
    double alpha
    int opt
    int eps_mode
    double momentum
    double beta1
    double beta2
    double eps
    int64_t t0             # the optimizer's step count before the epoch
    int64_t* thr           # (L,) keep thresholds; >= 2**24 means no dropout
    double* scales         # (L,)
    uint64_t seed
    uint64_t step0
    double* loss_acc       # (n_blocks * PAD,)
    double* pen_acc        # (n_blocks * PAD,)
    int64_t* correct_acc   # (n_blocks * PAD,)
    int n_blocks           # row blocks of a minibatch and column blocks of a W; >= the thread count
    Py_ssize_t* ld         # (L + 1,) row stride of raw, inp, mask and delta of each layer width
    Py_ssize_t* ldw        # (L,) row stride of W[l] (SIMD builds: a private copy; otherwise the caller's, n_in)
    Py_ssize_t* ldg        # (L,) row stride of G[l]
    # SIMD builds only (NULL tables otherwise):
    void** Wt              # (L,) W[l] transposed, (n_in, ldt[l]), rewritten after every update of W[l]
    Py_ssize_t* ldt        # (L,)
    void*** t_wt           # (L,) row tables of Wt[l] (n_in rows): R of the forward products
    void*** t_w            # (L,) row tables of W[l] (n_out rows): R of the hidden deltas
    void*** t_inp          # (L,) row tables of inp[l] (batch rows): L of the forward, R of the update
    void*** t_del          # (L + 1,) row tables of delta[l]: L of the hidden deltas
    void*** t_dt           # (L,) delta[l + 1] + o (n_out entries, step ld[l + 1]): L of the update
    void** t_x             # (batch rows,) the step's rows of X, when layer 0 reads them in place (no input dropout)
    bint x_in_place        # layer 0 reads X's rows in place (else they are gathered into inp[0])
    int* fwd_nt            # (L,) 1: layer l's forward product is fm_ntp on W as stored (no Wt for it)


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

    Per minibatch: each thread forwards and back-propagates the deltas of its own blocks of rows
    (rows are independent until the weight gradient); after a barrier each thread updates its own
    blocks of input columns of every ``W`` (and blocks of units of every ``b``) from all rows, the
    optimizer fused into that pass; a second barrier keeps the next minibatch from reading ``W``
    before every block is updated.  All deltas are computed with the old weights before any update,
    which is what the reference's "lower delta, then update" order amounts to.  Every sum runs block
    by block in a fixed order, and the blocks depend on ``n_blocks`` only: any thread count computes
    the same bits.

    SIMD builds: without input dropout the first layer reads the rows of ``X`` where they are (a table of
    the step's row addresses, no gathered copy); the forward products read ``Wt``, which each thread
    rewrites for its own column block right after updating it.  BLAS builds gather the rows first.
    """
    cdef floating* X = <floating*>c.X
    cdef floating** W = <floating**>c.W
    cdef floating** B = <floating**>c.b
    cdef floating** raw = <floating**>c.raw
    cdef floating** inp = <floating**>c.inp
    cdef floating** mask = <floating**>c.mask
    cdef floating** delta = <floating**>c.delta
    cdef floating** G = <floating**>c.G
    cdef floating** Gb = <floating**>c.Gb
    cdef floating** mW = <floating**>c.mW
    cdef floating** vW = <floating**>c.vW
    cdef floating** mb = <floating**>c.mb
    cdef floating** vb = <floating**>c.vb
    cdef floating** Wt = <floating**>c.Wt
    cdef floating** xr = <floating**>c.t_x
    cdef floating** lrows = NULL
    cdef floating** arows
    cdef Py_ssize_t* sz = c.sizes
    cdef Py_ssize_t* ld = c.ld
    cdef Py_ssize_t* ldw = c.ldw
    cdef int L = c.L
    cdef int l, act
    cdef Py_ssize_t full = 1 << KEEP_BITS
    cdef bint in_place = c.x_in_place
    cdef Py_ssize_t bs = c.batch_size
    cdef Py_ssize_t n_steps = (c.n_used + bs - 1) // bs
    cdef Py_ssize_t step, start, nb, r0, r1, j0, j1, o0, o1, nr, i, align, r, u, ldn
    cdef int blk
    cdef int NB = c.n_blocks
    cdef int64_t* idx
    cdef uint64_t gstep
    cdef double lr, s, t, c1, c2
    cdef floating* hin
    cdef floating* hraw
    cdef floating* hm
    cdef OptStep p
    p.opt = c.opt
    p.eps_mode = c.eps_mode
    p.momentum = c.momentum
    p.beta1 = c.beta1
    p.beta2 = c.beta2
    p.eps = c.eps
    p.step = 0.0
    p.sqrt_c2 = 1.0
    for step in range(n_steps):
        start = step * bs
        nb = c.n_used - start
        if nb > bs:
            nb = bs
        idx = c.order + start
        gstep = c.step0 + <uint64_t>step
        lr = c.lrs[step]
        # the minibatch's weight sum s: every thread adds the same numbers in the same order
        if c.sw != NULL:
            s = 0.0
            for r in range(nb):
                s += c.sw[idx[r]]
        else:
            s = <double>nb
        # the row phase, block by block: the blocks depend on the shape only, so any thread count
        # computes the same bits
        blk = tid
        while blk < NB:
            _split(nb, blk, NB, 1, &r0, &r1)
            nr = r1 - r0
            if in_place:
                for r in range(r0, r1):
                    xr[r] = X + idx[r] * sz[0]
                lrows = xr + r0
            else:
                _gather_rows(X, idx, inp[0], ld[0], r0, r1, sz[0], c.thr[0] < full, _mask_key(c.seed, gstep, 0),
                             <uint64_t>c.thr[0], <floating>c.scales[0])
                if FM_SIMD_GEMM:
                    lrows = <floating**>c.t_inp[0] + r0
            for l in range(L):
                act = c.output_act if l == L - 1 else c.hidden_act
                if FM_SIMD_GEMM and c.fwd_nt[l]:
                    _forward_rows_nt(lrows, W[l], ldw[l], B[l], raw[l + 1] + r0 * ld[l + 1], ld[l + 1], nr, sz[l],
                                     sz[l + 1], act)
                elif FM_SIMD_GEMM:
                    _forward_rows_t(lrows, <floating**>c.t_wt[l], B[l], raw[l + 1] + r0 * ld[l + 1], ld[l + 1], nr,
                                    sz[l], sz[l + 1], act)
                else:
                    _forward_rows(inp[l] + r0 * sz[l], W[l], B[l], raw[l + 1] + r0 * sz[l + 1], nr, sz[l], sz[l + 1],
                                  act)
                if l + 1 < L and mask[l + 1] != NULL:
                    ldn = ld[l + 1]
                    hm = mask[l + 1]
                    _fill_mask(hm, _mask_key(c.seed, gstep, <uint64_t>(l + 1)), r0, r1, sz[l + 1], ldn,
                               <uint64_t>c.thr[l + 1], <floating>c.scales[l + 1])
                    hin = inp[l + 1]
                    hraw = raw[l + 1]
                    for r in range(r0, r1):
                        for u in range(sz[l + 1]):
                            i = r * ldn + u
                            hin[i] = hraw[i] * hm[i]
                if FM_SIMD_GEMM and l + 1 < L:
                    lrows = <floating**>c.t_inp[l + 1] + r0
            _output_delta_rows(raw[L], c.y, <floating*>c.Yd, idx, c.sw, s, c.output_act, c.loss, delta[L], r0, r1,
                               sz[L], nb, c.loss_acc + blk * PAD, c.correct_acc + blk * PAD)
            for l in range(L - 1, 0, -1):
                # delta[l] (nr, sz[l]) = delta[l+1] (nr, sz[l+1]) @ W[l] (sz[l+1], sz[l]), with the old W[l]
                if nr > 0:
                    if FM_SIMD_GEMM:
                        _mm(nr, sz[l], sz[l + 1], <floating**>c.t_del[l + 1] + r0, 1, <floating**>c.t_w[l], 0,
                            delta[l] + r0 * ld[l], ld[l], <floating>1, <floating>0)
                    else:
                        _prod_tn(nr, sz[l], sz[l + 1], delta[l + 1] + r0 * sz[l + 1], sz[l + 1], 1, W[l], sz[l],
                                 delta[l] + r0 * sz[l], sz[l], <floating>1, <floating>0)
                _deriv_rows(delta[l] + r0 * ld[l], raw[l] + r0 * ld[l],
                            mask[l] + r0 * ld[l] if mask[l] != NULL else NULL, nr, sz[l], ld[l], c.hidden_act)
            blk = blk + nth
        fm_barrier(nth)
        # the update phase: the step's scalars in float64, then column blocks of every W
        p.lr = lr
        p.decay = 1.0 - lr * c.l2
        if p.decay < 0.0:
            p.decay = 0.0
        p.l1step = lr * c.l1
        p.ga = c.alpha / s
        if c.opt == OPT_ADAM or c.opt == OPT_ADAMW:
            t = <double>(c.t0 + step + 1)
            c1 = 1.0 - pow(c.beta1, t)
            c2 = 1.0 - pow(c.beta2, t)
            p.sqrt_c2 = sqrt(c2)
            if c.eps_mode == EPS_TORCH:
                p.step = lr / c1
            else:
                p.step = lr * sqrt(c2) / c1
        for l in range(L):
            # column blocks of whole cache lines (16 float32 / 8 float64) keep threads off each other's lines of W
            align = (64 // sizeof(floating)) if sz[l] >= 64 * NB else 1
            arows = NULL
            if FM_SIMD_GEMM:
                arows = xr if (l == 0 and in_place) else <floating**>c.t_inp[l]
            blk = tid
            while blk < NB:
                _split(sz[l], blk, NB, align, &j0, &j1)
                _split(sz[l + 1], blk, NB, 1, &o0, &o1)
                if c.alpha != 0.0 and j1 > j0:
                    # scikit-learn's penalty, from this block of the weights before the step
                    c.pen_acc[blk * PAD] += <double>nb * (0.5 * c.alpha * _sumsq(W[l], sz[l + 1], ldw[l], j0, j1) / s)
                if c.opt == OPT_SGD:
                    _sgd_block(W[l], ldw[l], B[l], delta[l + 1], ld[l + 1], inp[l], ld[l], <floating**>c.t_dt[l], arows,
                               nb, sz[l + 1], lr, p.decay - lr * p.ga, c.l1, j0, j1, o0, o1)
                else:
                    _opt_block(&p, W[l], ldw[l], B[l], G[l], c.ldg[l], Gb[l], mW[l], vW[l], mb[l], vb[l], delta[l + 1],
                               ld[l + 1], inp[l], ld[l], <floating**>c.t_dt[l], arows, nb, sz[l + 1], sz[l], j0, j1,
                               o0, o1)
                if FM_SIMD_GEMM and j1 > j0 and c.opt != OPT_GRADIENT and not c.fwd_nt[l]:
                    # the forward products of the next step read this block of W through its transpose
                    _transpose(sz[l + 1], j1 - j0, W[l] + j0, ldw[l], Wt[l] + j0 * c.ldt[l], c.ldt[l])
                blk = blk + nth
        fm_barrier(nth)


cdef void _worker_f32(void* ctx, int tid, int nth) noexcept nogil:
    _epoch_worker(<EpochCtx*>ctx, <float*>NULL, tid, nth)


cdef void _worker_f64(void* ctx, int tid, int nth) noexcept nogil:
    _epoch_worker(<EpochCtx*>ctx, <double*>NULL, tid, nth)


cdef inline void* _data(object a):
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef _need(a, str name, dt, tuple shape, bint write=False):
    """Raise ValueError unless ``a`` is a C-contiguous, aligned ndarray of dtype ``dt`` and this shape
    (and writeable when ``write``): what every pointer handed to a kernel must be."""
    if (not isinstance(a, np.ndarray) or a.dtype != dt or a.shape != shape or not a.flags.c_contiguous
            or not a.flags.aligned or (write and not a.flags.writeable)):
        got = f"{a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name} must be a C-contiguous, aligned{' writeable' if write else ''} "
                         f"{np.dtype(dt).name} array of shape {shape}, got {got}")


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
        Activation code (``fastmlp.backends.contract.ACT_CODES``).
    out : ndarray (n_samples, n_out)
        Written in place.
    """
    cdef Py_ssize_t n = A.shape[0], n_in = A.shape[1], n_out = W.shape[0]
    if W.shape[1] != n_in or b.shape[0] != n_out or out.shape[0] != n or out.shape[1] != n_out:
        raise ValueError("forward: A (n, n_in), W (n_out, n_in), b (n_out,) and out (n, n_out) do not fit")
    if n == 0 or n_out == 0:
        return
    cdef floating* pa = NULL
    cdef floating* pw = NULL
    cdef floating[:, ::1] wt
    cdef floating** pl
    cdef floating** pr
    cdef Py_ssize_t ldt, item = sizeof(floating)
    if n_in > 0:
        # with no inputs the gemm is skipped and neither pointer is read
        pa = <floating*>&A[0, 0]
        pw = <floating*>&W[0, 0]
    if FM_SIMD_GEMM and n_in > 0:
        # the training epoch's forward product: W transposed into a padded copy, then the outer-product kernel
        ldt = _ld(n_out, item)
        wt_arr = _empty64((n_in, ldt), np.float32 if floating is float else np.float64)
        wt = wt_arr
        a_rows = _rows_at(<size_t>pa, n, n_in * item)
        t_rows = _rows(wt_arr, n_in, ldt)
        pl, pr = <floating**>_data(a_rows), <floating**>_data(t_rows)
        with nogil:
            _transpose(n_out, n_in, pw, n_in, &wt[0, 0], ldt)
            _forward_rows_t(pl, pr, <floating*>&b[0], &out[0, 0], n_out, n, n_in, n_out, act)
        return
    with nogil:
        _forward_rows(pa, pw, <floating*>&b[0], &out[0, 0], n, n_in, n_out, act)


def output_delta(const floating[:, ::1] A, Y, int output, int loss, floating[:, ::1] out):
    """Delta of the loss w.r.t. the output pre-activation, unweighted (``c_i = 1/n``).

    Parameters
    ----------
    A : ndarray (n_samples, n_out)
        Output activations.
    Y : ndarray
        int64 class indices ``(n_samples,)`` (one-hot targets for ``n_out >= 2``, the label itself for
        one unit), or dense targets ``(n_samples, n_out)`` of ``A``'s dtype.
    output, loss : int
        Output activation and loss codes (a pair of ``VALID_OUTPUT_LOSS``).
    out : ndarray (n_samples, n_out)
        The delta, written in place.

    Returns
    -------
    loss_sum : float
        Data loss summed over the samples (float64 accumulation).
    n_correct : int
        Rows whose prediction matches the target (``fastmlp.backends.contract``).
    """
    cdef Py_ssize_t n = A.shape[0], k = A.shape[1]
    cdef double ls = 0.0
    cdef int64_t nc = 0
    cdef const int64_t[::1] y
    cdef const floating[:, ::1] Yd
    cdef int64_t* py = NULL
    cdef floating* pY = NULL
    if out.shape[0] != n or out.shape[1] != k:
        raise ValueError(f"out must have the shape of A {(n, k)}, got {(out.shape[0], out.shape[1])}")
    if not isinstance(Y, np.ndarray):
        raise TypeError(f"Y must be a numpy array, got {type(Y).__name__}")
    if Y.ndim == 1:
        y = Y
        if y.shape[0] != n:
            raise ValueError(f"Y has {y.shape[0]} labels for {n} rows")
        if n:
            py = <int64_t*>&y[0]
    else:
        Yd = Y
        if Yd.shape[0] != n or Yd.shape[1] != k:
            raise ValueError(f"dense Y must have the shape of A {(n, k)}, got {(Yd.shape[0], Yd.shape[1])}")
        if n and k:
            pY = <floating*>&Yd[0, 0]
    if n == 0 or k == 0:
        return 0.0, 0
    with nogil:
        _output_delta_rows(<floating*>&A[0, 0], py, pY, NULL, NULL, <double>n, output, loss, &out[0, 0], 0, n, k, n,
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
    if (D_next.shape[0] != n or D_next.shape[1] != n_next or W_next.shape[1] != n_units or out.shape[0] != n
            or out.shape[1] != n_units):
        raise ValueError("hidden_delta: D_next (n, n_next), W_next (n_next, n_units), A and out (n, n_units) do not fit")
    if mask is not None:
        m = mask
        if m.shape[0] != n or m.shape[1] != n_units:
            raise ValueError("hidden_delta: mask must have the shape of A")
    if n == 0 or n_units == 0:
        return
    if mask is not None:
        pm = <floating*>&m[0, 0]
    cdef Py_ssize_t item = sizeof(floating)
    cdef floating** pl
    cdef floating** pr
    if FM_SIMD_GEMM and n_next > 0:
        d_rows = _rows_at(<size_t>&D_next[0, 0], n, n_next * item)
        w_rows = _rows_at(<size_t>&W_next[0, 0], n_next, n_units * item)
        pl, pr = <floating**>_data(d_rows), <floating**>_data(w_rows)
        with nogil:
            _mm(n, n_units, n_next, pl, 1, pr, 0, &out[0, 0], n_units, <floating>1, <floating>0)
            _deriv(&out[0, 0], <floating*>&A[0, 0], pm, n * n_units, act)
        return
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
    if b.shape[0] != n_out or D.shape[1] != n_out or A.shape[0] != n or A.shape[1] != n_in:
        raise ValueError("inplace_update: W (n_out, n_in), b (n_out,), D (n, n_out) and A (n, n_in) do not fit")
    if n_out == 0:
        return
    cdef double decay = 1.0 - lr * l2
    if decay < 0.0:
        decay = 0.0
    cdef floating* pd = <floating*>&D[0, 0] if n > 0 else &b[0]
    cdef floating* pa = <floating*>&A[0, 0] if n > 0 and n_in > 0 else &b[0]
    cdef Py_ssize_t item = sizeof(floating)
    if n_in == 0:
        # no weights: only the bias moves
        with nogil:
            _sgd_block(&b[0], 0, &b[0], pd, n_out, pa, 0, NULL, NULL, n, n_out, lr, decay, l1, 0, 0, 0, n_out)
        return
    # SIMD builds: D read transposed (D + o, step n_out) and the rows of A, through row tables
    dt_rows = _rows_at(<size_t>pd, n_out, item)
    a_rows = _rows_at(<size_t>pa, n, n_in * item)
    cdef floating** pl = <floating**>_data(dt_rows)
    cdef floating** pr = <floating**>_data(a_rows)
    with nogil:
        _sgd_block(&W[0, 0], n_in, &b[0], pd, n_out, pa, n_in, pl, pr, n, n_out, lr, decay, l1, 0, n_in, 0, n_out)


def dropout_mask(uint64_t seed, uint64_t step, uint64_t layer, int64_t keep_threshold, double scale,
                 floating[:, ::1] out):
    """Counter-based dropout multipliers, bit-identical to ``fastmlp.backends.contract.mask_bits``.

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
        _fill_mask(&out[0, 0], _mask_key(seed, step, layer), 0, n_rows, n_units, n_units, <uint64_t>keep_threshold,
                   <floating>scale)


#: rows from which forward_network runs the outer-product kernel on transposed copies of W (SIMD builds);
#: fewer rows take the dot-product kernel on W as stored (the copies would cost more than they save)
DEF _FORWARD_GEMM_ROWS_DEFAULT = 512
cdef Py_ssize_t _FORWARD_GEMM_ROWS = _FORWARD_GEMM_ROWS_DEFAULT


#: inference on the outer-product road (two layers or more) passes a row of X whose share of nonzeros is at most
#: this through the sparse first layer; below 0 the share follows the first layer's width (_sparse_share)
cdef double _SPARSE_ROW_DENSITY = -1.0


cdef double _sparse_share(Py_ssize_t n_out, bint f32) noexcept:
    """The share of nonzeros up to which a row's sparse first-layer product beats the outer-product kernel, by the
    layer's width: measured on an AMD EPYC (Zen 5) with the avx512 build, 10,000 rows with 784 inputs, the
    break-even came at about 38 % for 100 units float32 (32 % float64), 27 % (17 %) for 256 and 11 % for 1024;
    each share below keeps a margin."""
    if n_out <= 128:
        return 0.35 if f32 else 0.3
    if n_out <= 384:
        return 0.2 if f32 else 0.15
    return 0.08


def set_sparse_row_density(density=None):
    """Set the largest share of nonzeros of a row that inference sends through the sparse first layer (0: never,
    None: by the first layer's width, the default) and return the previous setting."""
    global _SPARSE_ROW_DENSITY
    if density is not None and not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be None or lie in [0, 1], got {density}")
    old = None if _SPARSE_ROW_DENSITY < 0 else _SPARSE_ROW_DENSITY
    _SPARSE_ROW_DENSITY = -1.0 if density is None else density
    return old


#: whether training (SIMD builds, no input dropout) reads rows of X that do not start on cache lines in place (1),
#: gathers them into an aligned buffer first (0) or decides by the first layer's width (-1: in place up to 128
#: units).  Rows on cache lines are always read in place.  Measured on the Zen 5 machine (avx512 build, MNIST,
#: X 16 bytes off a line, alternating epochs), in place / gathered: 784-50-10 0.96x float32, 0.93x float64;
#: 784-256-256-10 1.015x / 1.025x; 784-1024-1024-10 float32 1.012x.
cdef int _X_IN_PLACE_UNALIGNED = -1


def set_x_in_place_unaligned(on=None):
    """Set whether training reads rows of ``X`` that do not start on cache lines in place (True), gathers them
    first (False) or decides by the first layer's width (None, the default); returns the previous setting."""
    global _X_IN_PLACE_UNALIGNED
    old = None if _X_IN_PLACE_UNALIGNED < 0 else bool(_X_IN_PLACE_UNALIGNED)
    _X_IN_PLACE_UNALIGNED = -1 if on is None else int(bool(on))
    return old


#: training's forward products: -1 by the layer's shape (train_forward_nt), 0 always fm_gemm on the transposed
#: copy of W, 1 always fm_ntp on W as stored (train_forward_nt)
cdef int _TRAIN_FWD_NT = -1


cdef bint _ISA_AVX2 = ISA == "avx2"


cpdef int train_forward_nt(Py_ssize_t n_in, Py_ssize_t n_out, Py_ssize_t item):
    """1 when training forwards a layer ``n_in -> n_out`` by dot products on ``W`` (``fm_ntp``), 0 when by the
    outer-product kernel on ``W``'s transpose (rewritten after every update).

    Measured on an AMD EPYC (Zen 5) with the avx512 build, whole epochs, dot products / outer products: float32
    784-50-10 0.93-0.96 on uniform data (0.83 on MNIST), 784-100-10 0.97-0.98, 1024-1024-1024-10 0.82, but
    784-128-10 1.04, 784-256-10 1.02-1.03, 256-256-256-10 1.05, 64-30-10 1.13-1.16; float64 1.01-1.19 on every
    uniform-data shape.  So float32 layers with at most 112 units (the outer product's vectors are then
    partly empty and the transpose is a larger share of the step) or 768 by 768 and more take the dot products;
    everything else keeps the outer product.  The avx2 build (forced on the same machine), float32: 784-50-10
    0.94, 784-256-10 0.95, 256-256-256-10 0.94, 784-512-10 0.94, 784-128-10 1.01, 64-30-10 1.05; float64 1.01:
    so there every float32 layer of 128 inputs or more takes the dot products."""
    if _TRAIN_FWD_NT >= 0:
        return _TRAIN_FWD_NT
    if item != 4 or n_in < 128:
        return 0
    if _ISA_AVX2:
        return 1
    return 1 if n_out <= 112 or (n_in >= 768 and n_out >= 768) else 0


def set_train_forward_nt(mode=None):
    """Set how training's forward products run (None: by the layer's shape, the default; True: dot products on
    ``W`` as stored; False: the outer-product kernel on ``W``'s transpose) and return the previous setting."""
    global _TRAIN_FWD_NT
    old = None if _TRAIN_FWD_NT < 0 else bool(_TRAIN_FWD_NT)
    _TRAIN_FWD_NT = -1 if mode is None else int(bool(mode))
    return old


def set_forward_gemm_rows(Py_ssize_t rows):
    """Set the rows from which :func:`forward_network` takes the outer-product road (tests, benchmarks);
    returns the previous value."""
    global _FORWARD_GEMM_ROWS
    old = _FORWARD_GEMM_ROWS
    _FORWARD_GEMM_ROWS = max(1, rows)
    return old


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
    int check              # SIMD builds: test W for NaN / infinity in the first chunk's products
    int bad                # set to 1 by that test
    void** wt_rows         # NULL, or (sum of n_in,) rows of each layer's transposed W: the outer-product road
    void** lrows           # with wt_rows: (n_threads * chunk,) row pointers of each thread's layer input
    # the sparse first layer (outer-product road, two layers or more; NULL otherwise): a row of X with at most
    # sp_max nonzeros is compressed to them and the first layer's product visits those alone
    int32_t* sp_idx        # (n_threads * chunk, sp_stride) columns of the compressed rows
    void* sp_val           # (n_threads * chunk, sp_stride) their values
    int64_t* sp_cnt        # (n_threads * chunk,) entries of each compressed row
    Py_ssize_t* sp_rows    # (n_threads * 3 * chunk,) per thread: the sparse rows, the dense rows, each row's place
    Py_ssize_t sp_stride
    Py_ssize_t sp_max
    Py_ssize_t sp_ldt      # row stride of the first layer's transposed W


cdef void _forward_worker(ForwardCtx* c, floating* tag, int tid, int nth) noexcept nogil:
    """Thread ``tid`` of ``nth`` runs every ``nth``-th chunk of rows through the whole network."""
    cdef floating* X = <floating*>c.X
    cdef floating* out = <floating*>c.out
    cdef floating** bufs = <floating**>c.bufs
    cdef Py_ssize_t* sz = c.sizes
    cdef Py_ssize_t n_chunks = (c.n + c.chunk - 1) // c.chunk
    cdef Py_ssize_t k, start, nr, r
    cdef int l, act
    cdef int* bad
    cdef floating* src
    cdef floating* dst
    cdef floating** wt
    cdef floating** lrow
    cdef Py_ssize_t ns, nd, q, st = c.sp_stride
    cdef int32_t* spi = NULL
    cdef floating* spv = NULL
    cdef int64_t* spc = NULL
    cdef Py_ssize_t* srow = NULL
    cdef Py_ssize_t* drow = NULL
    cdef Py_ssize_t* place = NULL
    cdef bint placed
    if c.sp_idx != NULL:
        spi = c.sp_idx + tid * c.chunk * st
        spv = <floating*>c.sp_val + tid * c.chunk * st
        spc = c.sp_cnt + tid * c.chunk
        srow = c.sp_rows + tid * 3 * c.chunk
        drow = srow + c.chunk
        place = drow + c.chunk
    k = tid
    while k < n_chunks:
        start = k * c.chunk
        # the first chunk reads every weight once: the finiteness test rides on its products
        bad = &c.bad if (c.check and k == 0) else NULL
        k += nth
        nr = c.n - start
        if nr > c.chunk:
            nr = c.chunk
        src = X + start * sz[0]
        wt = <floating**>c.wt_rows
        placed = False
        for l in range(c.L):
            act = c.output_act if l == c.L - 1 else c.hidden_act
            dst = out + start * sz[c.L] if l == c.L - 1 else bufs[2 * tid + l % 2]
            if l == 0 and spi != NULL:
                # rows with few nonzeros through the sparse product, the others through the outer-product kernel;
                # in dst the dense rows come first, and the next layer reads each row from its place
                lrow = <floating**>c.lrows + tid * c.chunk
                ns = 0
                nd = 0
                for r in range(4 if nr > 4 else nr):
                    fm_prefetch(src + r * sz[0], sz[0] * sizeof(floating))
                for r in range(nr):
                    if r + 4 < nr:  # rows ahead on their way while this one is looked at
                        fm_prefetch(src + (r + 4) * sz[0], sz[0] * sizeof(floating))
                    if floating is float:
                        q = fm_sp_compress_f32(src + r * sz[0], sz[0], c.sp_max, spi + ns * st, spv + ns * st)
                    else:
                        q = fm_sp_compress_f64(src + r * sz[0], sz[0], c.sp_max, spi + ns * st, spv + ns * st)
                    if q <= c.sp_max:
                        spc[ns] = q
                        srow[ns] = r
                        ns += 1
                    else:
                        lrow[nd] = src + r * sz[0]
                        drow[nd] = r
                        nd += 1
                if nd > 0:
                    _forward_rows_t(lrow, wt, <floating*>c.b[0], dst, sz[1], nd, sz[0], sz[1], act)
                if ns > 0:
                    if floating is float:
                        fm_sp_rows_f32(ns, spi, spv, st, spc, wt[0], c.sp_ldt, sz[1], dst + nd * sz[1], sz[1])
                    else:
                        fm_sp_rows_f64(ns, spi, spv, st, spc, wt[0], c.sp_ldt, sz[1], dst + nd * sz[1], sz[1])
                    for q in range(nd, nd + ns):
                        _bias_act_row(dst + q * sz[1], <floating*>c.b[0], sz[1], act)
                for q in range(nd):
                    place[drow[q]] = q
                for q in range(ns):
                    place[srow[q]] = nd + q
                placed = True
                wt += sz[0]
            elif wt != NULL:
                lrow = <floating**>c.lrows + tid * c.chunk
                if placed:  # the layer after the sparse one: its rows from their places
                    for r in range(nr):
                        lrow[r] = src + place[r] * sz[l]
                    placed = False
                else:
                    for r in range(nr):
                        lrow[r] = src + r * sz[l]
                _forward_rows_t(lrow, wt, <floating*>c.b[l], dst, sz[l + 1], nr, sz[l], sz[l + 1], act)
                wt += sz[l]
            else:
                _forward_rows_infer(src, <floating*>c.W[l], <floating*>c.b[l], dst, nr, sz[l], sz[l + 1], act, bad)
            src = dst


cdef void _fwd_worker_f32(void* ctx, int tid, int nth) noexcept nogil:
    _forward_worker(<ForwardCtx*>ctx, <float*>NULL, tid, nth)


cdef void _fwd_worker_f64(void* ctx, int tid, int nth) noexcept nogil:
    _forward_worker(<ForwardCtx*>ctx, <double*>NULL, tid, nth)


cdef inline bint _fits(object a, int typenum, Py_ssize_t d0, Py_ssize_t d1, bint write):
    """Whether ``a`` is what :func:`_need` asks for (2-D ``(d0, d1)``, or 1-D ``(d0,)`` with ``d1 < 0``), in C:
    the cheap road of a call on small inputs; :func:`_need` words the error."""
    if not cnp.PyArray_Check(a):
        return False
    cdef cnp.ndarray x = <cnp.ndarray>a
    cdef int nd = 1 if d1 < 0 else 2
    if cnp.PyArray_TYPE(x) != typenum or cnp.PyArray_NDIM(x) != nd or not cnp.PyArray_IS_C_CONTIGUOUS(x) \
            or not cnp.PyArray_ISALIGNED(x) or (write and not cnp.PyArray_ISWRITEABLE(x)):
        return False
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(x)
    return dims[0] == d0 and (nd == 1 or dims[1] == d1)


cdef bint _finite_any(void* p, Py_ssize_t n, bint f32) noexcept nogil:
    if f32:
        return _finite32(<const uint32_t*>p, n)
    return _finite64(<const uint64_t*>p, n)


cdef bint _sample_has_sparse_row(object X, bint f32, Py_ssize_t n, Py_ssize_t m, Py_ssize_t limit):
    """Whether one of eight rows spread evenly over ``X`` has at most ``limit`` nonzeros: the sparse first layer
    then looks at every row of the call (a look costs a dense row about 5-10 % of its time, spent for nothing)."""
    cdef Py_ssize_t t, r, k, cnt, ns = 8 if n > 8 else n
    cdef float* xf = <float*>cnp.PyArray_DATA(<cnp.ndarray>X)
    cdef double* xd = <double*>xf
    for t in range(ns):
        r = (t * n) // ns
        cnt = 0
        for k in range(m):
            if (xf[r * m + k] != 0) if f32 else (xd[r * m + k] != 0):
                cnt += 1
                if cnt > limit:
                    break
        if cnt <= limit:
            return True
    return False


def forward_network(X, list weights, list biases, int hidden_act, int output_act, out, int n_threads=1,
                    bint check=False):
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
        OpenMP threads, each taking every ``n_threads``-th chunk of 64 rows (keep the BLAS on one
        thread meanwhile); ignored without OpenMP.
    check : bool
        Also test every weight and bias for NaN and infinity (SIMD builds: in the same pass as the
        first chunk's products; BLAS builds: one scan before).

    Returns
    -------
    bool
        False when ``check`` found a NaN or an infinity (``out`` then holds no meaningful values), else
        True.
    """
    # 64 rows: a chunk's rows of X stay in L2 while the outer-product kernel visits them block by block of
    # inputs (10,000 rows of 784-100-10 float32: 5.10 ms in chunks of 256 rows, 4.62 ms in chunks of 64)
    cdef Py_ssize_t chunk = 64
    cdef int l, L = len(weights)
    if not isinstance(X, np.ndarray) or X.ndim != 2 or X.dtype not in (np.float32, np.float64):
        raise ValueError("X must be a 2-D float32 or float64 array")
    if L < 1 or len(biases) != L:
        raise ValueError(f"weights and biases need one array per layer, got {L} and {len(biases)}")
    cdef int tn = cnp.PyArray_TYPE(<cnp.ndarray>X)
    cdef bint f32 = tn == cnp.NPY_FLOAT32
    cdef Py_ssize_t n = X.shape[0], wmax = 1, itemsize = 4 if f32 else 8
    keep = (tuple(weights), tuple(biases))  # the arrays stay alive while the kernels run, whatever the lists do
    cdef Py_ssize_t* sizes = <Py_ssize_t*>malloc((L + 1) * sizeof(Py_ssize_t))
    cdef void** tab = <void**>malloc((2 * L + 2 * max(n_threads, 1)) * sizeof(void*))
    cdef char* block = NULL
    cdef char* sp_block = NULL
    cdef void** ptrs = NULL
    cdef ForwardCtx c
    cdef int nth
    cdef Py_ssize_t rows, step, n_wt, n_in_total, q, r, ldt
    cdef size_t base, wt_at
    cdef bint gemm_road
    cdef bint ok = True
    if sizes == NULL or tab == NULL:
        free(sizes)
        free(tab)
        raise MemoryError()
    try:
        sizes[0] = X.shape[1]
        if not _fits(X, tn, n, sizes[0], False):
            _need(X, "X", X.dtype, X.shape)
        for l in range(L):
            w, bb = weights[l], biases[l]
            if not isinstance(w, np.ndarray) or w.ndim != 2:
                raise ValueError(f"weights[{l}] must be a 2-D array")
            sizes[l + 1] = w.shape[0]
            if not _fits(w, tn, sizes[l + 1], sizes[l], False):
                _need(w, f"weights[{l}]", X.dtype, (sizes[l + 1], sizes[l]))
            if not _fits(bb, tn, sizes[l + 1], -1, False):
                _need(bb, f"biases[{l}]", X.dtype, (sizes[l + 1],))
            tab[l] = cnp.PyArray_DATA(<cnp.ndarray>w)
            tab[L + l] = cnp.PyArray_DATA(<cnp.ndarray>bb)
            if sizes[l + 1] > wmax:
                wmax = sizes[l + 1]
        if not _fits(out, tn, n, sizes[L], True):
            _need(out, "out", X.dtype, (n, sizes[L]), True)
        # many rows (SIMD builds): the outer-product kernel on transposed copies of W, made once per call
        gemm_road = FM_SIMD_KERNELS and n >= _FORWARD_GEMM_ROWS
        if check:
            # biases always by a scan (small); weights too where the products do not test them
            for l in range(L):
                if not _finite_any(tab[L + l], sizes[l + 1], f32) or (
                        (gemm_road or not FM_SIMD_KERNELS) and not _finite_any(tab[l], sizes[l + 1] * sizes[l], f32)):
                    return False
        if n == 0 or sizes[L] == 0:
            return True
        if not HAVE_OPENMP or n_threads < 1:
            n_threads = 1
        nth = n_threads
        rows = n if n < chunk else chunk
        step = ((rows * wmax * itemsize + 63) // 64) * 64
        n_wt = 0
        n_in_total = 0
        if gemm_road:  # transposed copies with rows on cache lines
            for l in range(L):
                n_wt += sizes[l] * (((sizes[l + 1] * itemsize + 63) // 64) * 64)
                n_in_total += sizes[l]
        block = <char*>malloc(2 * nth * step + n_wt + 64)
        if block == NULL:
            raise MemoryError()
        base = ((<size_t>block) + 63) & ~(<size_t>63)
        for l in range(2 * nth):
            tab[2 * L + l] = <void*>(base + l * step)
        c.wt_rows = NULL
        c.lrows = NULL
        c.sp_idx = NULL
        c.sp_val = NULL
        c.sp_cnt = NULL
        c.sp_rows = NULL
        c.sp_stride = sizes[0] + 16  # the compressing stores whole vectors past a row's last entry
        c.sp_max = <Py_ssize_t>((_SPARSE_ROW_DENSITY if _SPARSE_ROW_DENSITY >= 0 else
                                  _sparse_share(sizes[1] if L > 1 else 1, f32)) * sizes[0])
        if gemm_road:
            ptrs = <void**>malloc((n_in_total + nth * chunk) * sizeof(void*))
            if ptrs == NULL:
                raise MemoryError()
            wt_at = base + 2 * nth * step
            q = 0
            with nogil:
                for l in range(L):
                    ldt = ((sizes[l + 1] * itemsize + 63) // 64) * (64 // itemsize)
                    if f32:
                        fm_transpose_f32(sizes[l + 1], sizes[l], <float*>tab[l], sizes[l], <float*>wt_at, ldt)
                    else:
                        fm_transpose_f64(sizes[l + 1], sizes[l], <double*>tab[l], sizes[l], <double*>wt_at, ldt)
                    for r in range(sizes[l]):
                        ptrs[q] = <void*>(wt_at + r * ldt * itemsize)
                        q += 1
                    if l == 0:
                        c.sp_ldt = ldt
                    wt_at += sizes[l] * ldt * itemsize
            c.wt_rows = ptrs
            c.lrows = ptrs + n_in_total
            if L >= 2 and c.sp_max > 0 and not _sample_has_sparse_row(X, f32, n, sizes[0], c.sp_max):
                c.sp_max = 0  # no row of an even sample is sparse: every row takes the outer-product kernel unlooked at
            if L >= 2 and c.sp_max > 0:
                sp_block = <char*>malloc(nth * chunk * (c.sp_stride * (4 + itemsize) + 8 + 3 * sizeof(Py_ssize_t))
                                         + 64)
                if sp_block == NULL:
                    raise MemoryError()
                q = ((<size_t>sp_block) + 63) & ~(<size_t>63)
                c.sp_val = <void*>q
                q += nth * chunk * c.sp_stride * itemsize
                c.sp_idx = <int32_t*>q
                q += nth * chunk * c.sp_stride * 4
                c.sp_cnt = <int64_t*>q
                q += nth * chunk * 8
                c.sp_rows = <Py_ssize_t*>q
        c.X = _data(X)
        c.out = _data(out)
        c.W = tab
        c.b = tab + L
        c.bufs = tab + 2 * L
        c.sizes = sizes
        c.L = L
        c.n = n
        c.chunk = chunk
        c.hidden_act = hidden_act
        c.output_act = output_act
        c.check = 1 if (check and FM_SIMD_KERNELS) else 0
        c.bad = 0
        with nogil:
            fm_run_parallel(_fwd_worker_f32 if f32 else _fwd_worker_f64, &c, nth)
        ok = c.bad == 0
    finally:
        free(sp_block)
        free(ptrs)
        free(block)
        free(tab)
        free(sizes)
    del keep
    return ok


ctypedef struct PeakCtx:
    int64_t iters
    int f64
    double* sink


cdef extern from *:
    """
    #include <time.h>
    /* CPU seconds of the calling thread, or -1 where the platform has no per-thread clock */
    static double fm_thread_seconds(void) {
    #if defined(CLOCK_THREAD_CPUTIME_ID)
        struct timespec t;
        if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t) == 0) return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
    #endif
        return -1.0;
    }
    """
    double fm_thread_seconds() nogil


cdef void _peak_worker(void* ctx, int tid, int nth) noexcept nogil:
    """One thread's FMA loop: its own CPU seconds in ``sink[tid * PAD]`` (a thread the OS leaves waiting on a
    shared machine does not lower the bound), the loop's value in the next slot so that nothing is optimized
    away."""
    cdef PeakCtx* c = <PeakCtx*>ctx
    cdef double t0 = fm_thread_seconds()
    if c.f64:
        c.sink[tid * PAD + 1] = fm_fma_peak_f64(c.iters)
    else:
        c.sink[tid * PAD + 1] = fm_fma_peak_f32(c.iters)
    c.sink[tid * PAD] = fm_thread_seconds() - t0 if t0 >= 0 else -1.0


def fma_peak(dtype="float32", int n_threads=1, double seconds=0.05, int repeats=3):
    """This build's FMA bound in GFLOP/s, measured: a compiled loop of nothing but independent vector FMAs.

    Every one of ``n_threads`` OpenMP threads (1 without OpenMP) runs ``FM_PEAK_CHAINS`` independent
    chains of fused multiply-adds on register-resident vectors of the build's width (avx512: 16 float32
    or 8 float64 lanes, avx2: 8 / 4; the SSE2 baseline has no FMA and times a multiply and an add on 4 / 2
    lanes instead); the bound is ``2 * lanes * FMAs / seconds`` over all threads, the best of ``repeats``
    runs of about ``seconds`` each, every thread's rate taken on its own CPU time where the platform has a
    per-thread clock (so that a busy machine does not hide the bound).  On an idle machine this is cores x FMA
    ports x lanes x 2 x clock.

    Parameters
    ----------
    dtype : {'float32', 'float64'}
    n_threads : int
        Threads that run the loop at once (each on its own core when the OS allows).
    seconds, repeats : float, int
        Length of one timed run and how many are made.

    Returns
    -------
    float
        GFLOP/s.
    """
    import time
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    if n_threads < 1 or not FM_HAVE_OPENMP:
        n_threads = 1
    sink = np.zeros(max(1, n_threads) * PAD, np.float64)
    cdef PeakCtx c
    c.f64 = dt == np.float64
    c.sink = <double*>_data(sink)
    cdef int nth = n_threads
    lanes = FM_PEAK_LANES_F64 if c.f64 else FM_PEAK_LANES_F32
    c.iters = 20000
    best = 0.0
    for rep in range(repeats + 1):
        t0 = time.perf_counter()
        with nogil:
            fm_run_parallel(_peak_worker, &c, nth)
        el = time.perf_counter() - t0
        if rep == 0:  # calibration run: scale the loop to about `seconds`
            c.iters = max(20000, <int64_t>(c.iters * seconds / max(el, 1e-6)))
            continue
        flops = c.iters * FM_PEAK_CHAINS * 2.0 * lanes
        cpu = sink[::PAD][:nth]
        if (cpu > 0).all():  # every thread's rate on its own CPU time
            rate = float(np.sum(flops / cpu))
        else:
            rate = nth * flops / el
        best = max(best, rate / 1e9)
    return best


def train_epoch(X, Y, order, list weights, list biases, list state_weights, list state_biases, lrs, sample_weight,
                int hidden_act, int output_act, int loss, int target, Py_ssize_t batch_size, double l2, double l1,
                double alpha, thresholds, scales, int optimizer, double momentum, double beta1, double beta2,
                double eps, int eps_mode, uint64_t seed, uint64_t step0, int64_t t0, int n_threads=1, int n_blocks=0):
    """One training epoch in one compiled call, without the GIL (semantics of ``reference.train_epoch``).

    Parameters
    ----------
    X : ndarray (n_samples, n_in)
    Y : ndarray
        int64 labels ``(n_samples,)`` (``target`` 0) or dense targets ``(n_samples, n_out)`` of ``X``'s
        dtype (``target`` 1).
    order : ndarray of int64 (n_used,)
        Rows in visiting order; the last minibatch may be partial.
    weights, biases : lists of ndarray ``(n_out, n_in)`` / ``(n_out,)``
        Updated in place.
    state_weights, state_biases : lists (one per state slot) of lists (one per layer) of ndarray
        The optimizer's arrays (``OptimizerState.weights`` / ``.biases``), updated in place.
    lrs : ndarray of float64 (n_steps,)
        Learning rate of each step.
    sample_weight : ndarray of float64 (n_samples,) or None
        Row weights; every minibatch must have a positive sum.
    hidden_act, output_act, loss, target : int
        Activation, loss and target codes.
    batch_size : int
    l2, l1, alpha : float
        Decoupled decay, L1 and scikit-learn's L2 penalty.
    thresholds : ndarray of int64 (n_layers,)
        Dropout keep threshold of each layer's input (``2**24``: no dropout).
    scales : ndarray of float64 (n_layers,)
        Multiplier of a kept unit.
    optimizer, eps_mode : int
        Optimizer and Adam epsilon-mode codes.
    momentum, beta1, beta2, eps : float
        The optimizer's hyper-parameters.
    seed, step0 : int
        Dropout hash seed and global step of the first minibatch.
    t0 : int
        The optimizer's step count before the epoch (step ``i`` uses ``t = t0 + i + 1``).
    n_threads : int
        OpenMP threads (each takes blocks of every minibatch's rows and blocks of every ``W``'s
        columns); the caller must keep BLAS single-threaded when this is above 1.  Ignored
        without OpenMP.
    n_blocks : int
        Row blocks of every minibatch and column blocks of every ``W`` (0: ``n_threads``).  The result
        depends on the blocks only, not on how many threads run them.

    Returns
    -------
    loss_sum, penalty_sum : float
    n_correct : int
    """
    cdef int L = len(weights), l, n_slots
    cdef Py_ssize_t n, n_used, n_steps
    cdef EpochCtx c
    # ---- every argument checked here, before the GIL is released (the raw kernel must never crash)
    if not isinstance(X, np.ndarray) or X.ndim != 2 or X.dtype not in (np.float32, np.float64):
        raise ValueError("X must be a 2-D float32 or float64 array")
    dt = X.dtype
    n = X.shape[0]
    _need(X, "X", dt, X.shape)
    if L < 1 or len(biases) != L:
        raise ValueError(f"weights and biases need one array per layer, got {L} and {len(biases)}")
    sz = [X.shape[1]]
    for l in range(L):
        W = weights[l]
        if not isinstance(W, np.ndarray) or W.ndim != 2:
            raise ValueError(f"weights[{l}] must be a 2-D array")
        sz.append(W.shape[0])
        _need(W, f"weights[{l}]", dt, (sz[l + 1], sz[l]), True)
        _need(biases[l], f"biases[{l}]", dt, (sz[l + 1],), True)
    if min(sz) < 1:
        raise ValueError(f"every layer needs at least one unit, got sizes {sz}")
    if optimizer not in _SLOTS:
        raise ValueError(f"unknown optimizer code {optimizer}")
    n_slots = _SLOTS[optimizer]
    if len(state_weights) != n_slots or len(state_biases) != n_slots:
        raise ValueError(f"optimizer code {optimizer} keeps {n_slots} state slots, got {len(state_weights)} and "
                         f"{len(state_biases)}")
    for s_ in range(n_slots):
        if len(state_weights[s_]) != L or len(state_biases[s_]) != L:
            raise ValueError(f"state slot {s_} needs one array per layer")
        for l in range(L):
            _need(state_weights[s_][l], f"state slot {s_} weights[{l}]", dt, (sz[l + 1], sz[l]), True)
            _need(state_biases[s_][l], f"state slot {s_} biases[{l}]", dt, (sz[l + 1],), True)
    if not (0 <= hidden_act <= ACT_RELU and output_act in (ACT_IDENTITY, ACT_SIGMOID, ACT_SOFTMAX, ACT_EXP)
            and LOSS_MSE <= loss <= LOSS_POISSON and eps_mode in (EPS_SKLEARN, EPS_TORCH)):
        raise ValueError("unknown activation, loss or epsilon-mode code")
    if target == TARGET_LABELS:
        _need(Y, "Y (labels)", np.int64, (n,))
    elif target == TARGET_DENSE:
        _need(Y, "Y (dense targets)", dt, (n, sz[L]))
    else:
        raise ValueError(f"unknown target code {target}")
    if not isinstance(order, np.ndarray) or order.ndim != 1:
        raise ValueError("order must be a 1-D int64 array")
    n_used = order.shape[0]
    _need(order, "order", np.int64, (n_used,))
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n_steps = (n_used + batch_size - 1) // batch_size
    if n_used and (order.min() < 0 or order.max() >= n):
        raise ValueError(f"order must index rows of X in [0, {n})")
    if not isinstance(lrs, np.ndarray) or lrs.ndim != 1 or lrs.shape[0] < n_steps:
        raise ValueError(f"lrs must be a float64 array of at least {n_steps} learning rates")
    _need(lrs, "lrs", np.float64, lrs.shape)
    if sample_weight is not None:
        _need(sample_weight, "sample_weight", np.float64, (n,))
    _need(thresholds, "thresholds", np.int64, (L,))
    _need(scales, "scales", np.float64, (L,))
    if n_used == 0:
        return 0.0, 0.0, 0
    if not FM_HAVE_OPENMP or n_threads < 1:
        n_threads = 1
    if n_blocks < 1:
        n_blocks = n_threads
    if n_threads > n_blocks:
        n_threads = n_blocks

    # ---- work buffers, allocated once per call; these lists hold them alive through the nogil section
    nb = min(batch_size, n_used)
    sizes = np.array(sz, dtype=np.intp)
    full = 1 << KEEP_BITS
    simd = bool(FM_SIMD_GEMM)
    item = dt.itemsize
    # row strides: SIMD builds pad the work buffers (the output layer's stay contiguous for the delta)
    ld = [_ld(sz[l], item) if simd and l < L else sz[l] for l in range(L + 1)]
    raw = [None] + [_empty64((nb, ld[l + 1]), dt) for l in range(L)]
    # SIMD builds without input dropout read the rows of X in place (see _X_IN_PLACE_UNALIGNED)
    x_in_place = (simd and thresholds[0] >= full and (sz[0] * item) % 64 == 0
                  and (X.ctypes.data % 64 == 0 or _X_IN_PLACE_UNALIGNED == 1
                       or (_X_IN_PLACE_UNALIGNED < 0 and sz[1] <= 128)))
    inp = [None if x_in_place else _empty64((nb, ld[0]), dt)]
    mask = [None]
    for l in range(1, L):
        if thresholds[l] < full:
            mask.append(_empty64((nb, ld[l]), dt))
            inp.append(_empty64((nb, ld[l]), dt))
        else:
            mask.append(None)
            inp.append(raw[l])
    delta = [None] + [_empty64((nb, ld[l + 1]), dt) for l in range(L)]
    fwd_nt = np.array([train_forward_nt(sz[l], sz[l + 1], item) if simd else 0 for l in range(L)], dtype=np.intc)
    if simd:
        # a private copy of each W with padded rows, and its transpose for the forward products
        ldw = [_ld(sz[l], item) for l in range(L)]
        ldt = [_ld(sz[l + 1], item) for l in range(L)]
        Wk = [_empty64((sz[l + 1], ldw[l]), dt) for l in range(L)]
        # (a layer forwarding by dot products on W has no transposed copy: its table below points nowhere)
        Wt = [_empty64((sz[l], ldt[l]), dt) if not fwd_nt[l] else None for l in range(L)]
        for l in range(L):
            Wk[l][:, :sz[l]] = weights[l]
            if not fwd_nt[l]:
                Wt[l][:, :sz[l + 1]] = weights[l].T
    else:
        ldw, ldt, Wk, Wt = sz[:L], sz[1:], list(weights), [None] * L
    if optimizer == OPT_SGD:
        G, Gb, ldg = [None] * L, [None] * L, ldw
    elif optimizer == OPT_GRADIENT:  # the gradient goes straight into the state
        G, Gb, ldg = state_weights[0], state_biases[0], sz[:L]
    else:
        G = [_empty64((sz[l + 1], ldw[l]), dt) for l in range(L)]
        Gb = [_empty64(sz[l + 1], dt) for l in range(L)]
        ldg = ldw
    none = [None] * L
    slot_w = [state_weights[0] if n_slots >= 1 and optimizer != OPT_GRADIENT else none,
              state_weights[1] if n_slots >= 2 else none]
    slot_b = [state_biases[0] if n_slots >= 1 and optimizer != OPT_GRADIENT else none,
              state_biases[1] if n_slots >= 2 else none]
    tables = [_ptr_array(list(t)) for t in (Wk, biases, raw, inp, mask, delta, G, Gb, *slot_w, *slot_b, Wt)]
    strides = [np.array(v, dtype=np.intp) for v in (ld, ldw, ldg, ldt)]
    # row tables of the SIMD products (empty in BLAS builds)
    if simd:
        rt_wt = [_rows(Wt[l], sz[l], ldt[l]) if Wt[l] is not None else np.zeros(1, np.uintp) for l in range(L)]
        rt_w = [_rows(Wk[l], sz[l + 1], ldw[l]) for l in range(L)]
        rt_inp = [_rows(inp[l], nb, ld[l]) if inp[l] is not None else np.zeros(nb, np.uintp) for l in range(L)]
        rt_del = [np.zeros(1, np.uintp)] + [_rows(delta[l], nb, ld[l]) for l in range(1, L + 1)]
        rt_dt = [_rows(delta[l + 1], sz[l + 1], 1) for l in range(L)]
    else:
        rt_wt = rt_w = rt_inp = rt_dt = [np.zeros(1, np.uintp)] * L
        rt_del = [np.zeros(1, np.uintp)] * (L + 1)
    rt_x = np.zeros(nb, np.uintp)
    rtabs = [_ptr_array(t) for t in (rt_wt, rt_w, rt_inp, rt_del, rt_dt)]
    loss_acc = np.zeros(n_blocks * PAD, np.float64)
    pen_acc = np.zeros(n_blocks * PAD, np.float64)
    correct_acc = np.zeros(n_blocks * PAD, np.int64)

    c.X = _data(X)
    c.y = <int64_t*>_data(Y) if target == TARGET_LABELS else NULL
    c.Yd = _data(Y) if target == TARGET_DENSE else NULL
    c.sw = <double*>_data(sample_weight) if sample_weight is not None else NULL
    c.order = <int64_t*>_data(order)
    c.n_used = n_used
    c.batch_size = batch_size
    c.L = L
    c.sizes = <Py_ssize_t*>_data(sizes)
    c.W = <void**>_data(tables[0])
    c.b = <void**>_data(tables[1])
    c.raw = <void**>_data(tables[2])
    c.inp = <void**>_data(tables[3])
    c.mask = <void**>_data(tables[4])
    c.delta = <void**>_data(tables[5])
    c.G = <void**>_data(tables[6])
    c.Gb = <void**>_data(tables[7])
    c.mW = <void**>_data(tables[8])
    c.vW = <void**>_data(tables[9])
    c.mb = <void**>_data(tables[10])
    c.vb = <void**>_data(tables[11])
    c.lrs = <double*>_data(lrs)
    c.hidden_act = hidden_act
    c.output_act = output_act
    c.loss = loss
    c.l2 = l2
    c.l1 = l1
    c.alpha = alpha
    c.opt = optimizer
    c.eps_mode = eps_mode
    c.momentum = momentum
    c.beta1 = beta1
    c.beta2 = beta2
    c.eps = eps
    c.t0 = t0
    c.thr = <int64_t*>_data(thresholds)
    c.scales = <double*>_data(scales)
    c.seed = seed
    c.step0 = step0
    c.loss_acc = <double*>_data(loss_acc)
    c.pen_acc = <double*>_data(pen_acc)
    c.correct_acc = <int64_t*>_data(correct_acc)
    c.n_blocks = n_blocks
    c.ld = <Py_ssize_t*>_data(strides[0])
    c.ldw = <Py_ssize_t*>_data(strides[1])
    c.ldg = <Py_ssize_t*>_data(strides[2])
    c.ldt = <Py_ssize_t*>_data(strides[3])
    c.Wt = <void**>_data(tables[12])
    c.t_wt = <void***>_data(rtabs[0])
    c.t_w = <void***>_data(rtabs[1])
    c.t_inp = <void***>_data(rtabs[2])
    c.t_del = <void***>_data(rtabs[3])
    c.t_dt = <void***>_data(rtabs[4])
    c.t_x = <void**>_data(rt_x)
    c.x_in_place = x_in_place
    c.fwd_nt = <int*>_data(fwd_nt)
    cdef fm_worker_t fn = _worker_f64
    if dt == np.float32:
        fn = _worker_f32
    cdef int nth = n_threads
    with nogil:
        fm_run_parallel(fn, &c, nth)
    if simd and optimizer != OPT_GRADIENT:
        for l in range(L):
            weights[l][...] = Wk[l][:, :sz[l]]
    return float(loss_acc.sum()), float(pen_acc.sum()), int(correct_acc.sum())


# --------------------------------------------------------------- finiteness
cdef bint _finite32(const uint32_t* p, Py_ssize_t n) noexcept nogil:
    """No NaN or infinity among ``n`` float32 (as bits): the largest magnitude's exponent is not all ones."""
    cdef Py_ssize_t i, j, e
    cdef uint32_t mx, v
    i = 0
    while i < n:
        e = min(i + 4096, n)
        mx = 0
        for j in range(i, e):
            v = p[j] & 0x7fffffffu
            mx = v if v > mx else mx
        if mx >= 0x7f800000u:
            return False
        i = e
    return True


cdef bint _finite64(const uint64_t* p, Py_ssize_t n) noexcept nogil:
    """No NaN or infinity among ``n`` float64 (as bits)."""
    cdef Py_ssize_t i, j, e
    cdef uint64_t mx, v
    i = 0
    while i < n:
        e = min(i + 2048, n)
        mx = 0
        for j in range(i, e):
            v = p[j] & 0x7fffffffffffffffULL
            mx = v if v > mx else mx
        if mx >= 0x7ff0000000000000ULL:
            return False
        i = e
    return True


def all_finite(list arrays):
    """Whether every array of ``arrays`` (C-contiguous float32/float64 ndarrays) holds no NaN or infinity.

    An integer test of the exponent bits, so the compiler's floating-point flags cannot fold it away; one
    pass at memory speed, no temporary.  ``TypeError`` for anything else (non-contiguous, other dtypes).
    """
    cdef cnp.ndarray a
    cdef Py_ssize_t n
    cdef bint ok
    for obj in arrays:
        if not isinstance(obj, np.ndarray):  # subclasses (np.memmap, ...) are arrays too
            raise TypeError(f"all_finite takes numpy arrays, got {type(obj).__name__}")
        a = <cnp.ndarray>obj
        if not cnp.PyArray_IS_C_CONTIGUOUS(a) or not cnp.PyArray_ISALIGNED(a):
            raise TypeError("all_finite takes aligned C-contiguous arrays")
        n = cnp.PyArray_SIZE(a)
        if a.dtype == np.float32:
            if n >= 65536:
                with nogil:
                    ok = _finite32(<const uint32_t*>cnp.PyArray_DATA(a), n)
            else:
                ok = _finite32(<const uint32_t*>cnp.PyArray_DATA(a), n)
        elif a.dtype == np.float64:
            if n >= 32768:
                with nogil:
                    ok = _finite64(<const uint64_t*>cnp.PyArray_DATA(a), n)
            else:
                ok = _finite64(<const uint64_t*>cnp.PyArray_DATA(a), n)
        else:
            raise TypeError(f"all_finite takes float32 or float64 arrays, got {a.dtype}")
        if not ok:
            return False
    return True


def same_arrays(list current, tuple params, tuple meta):
    """Whether ``current[i] is params[i]`` for every ``i`` and each array still has the ``(ndim, shape,
    type number, shape, strides)`` of ``meta[i]`` (``(ndim, dtype.num, *shape, *strides)``): the inference road's
    test that no parameter array was replaced, reshaped or retyped in place since it was checked."""
    cdef Py_ssize_t i, d, n = len(params)
    cdef cnp.ndarray a
    cdef tuple m
    cdef int nd
    if len(current) != n or len(meta) != n:
        return False
    for i in range(n):
        if current[i] is not params[i]:
            return False
        a = <cnp.ndarray>params[i]
        m = <tuple>meta[i]
        nd = cnp.PyArray_NDIM(a)
        if len(m) != 2 + 2 * nd or <int>m[0] != nd or <int>m[1] != cnp.PyArray_TYPE(a):
            return False
        for d in range(nd):
            if <Py_ssize_t>m[2 + d] != cnp.PyArray_DIMS(a)[d] or <Py_ssize_t>m[2 + nd + d] != cnp.PyArray_STRIDES(a)[d]:
                return False
    return True

