/* fastmlp: register-tiled SIMD kernels for the matrix products of training and inference.
 *
 * Every matrix is row-major with its own leading dimension.  Per dtype (suffix f32 / f64):
 *
 *   fm_gemm:       C[i][j] = beta C[i][j] + alpha sum_q L[i][q] R[q][j]
 *                  an outer-product kernel (L broadcast, R and C vectorized along j; no horizontal
 *                  sums), rows of L and R given by pointer tables: the forward pass (L = the layer
 *                  input, R = a transposed copy of W), the hidden deltas (R = W) and the weight
 *                  gradient fused with the update (L = the delta read transposed, R = the input);
 *   fm_nt:         C[i][o] = sum_k A[i][k] W[o][k], dot products on W as stored (inference; fm_ntp, rows of
 *                  A by a pointer table: training's forward products where they beat fm_gemm on the transpose);
 *   fm_transpose:  D = S.T, in register blocks (the transposed copy of W the forward pass reads);
 *   fm_sp_rows:    Z[r] = sum over row r's nonzeros x_k Wt[k], the sparse first layer of inference, on rows
 *                  that fm_sp_compress_<t> (end of this file) compressed to their nonzeros.
 *
 * The avx512 build (-mavx512f ...) has 16 float / 8 double lanes and 32 registers; the avx2 build
 * (-mavx2 -mfma) 8 / 4 lanes and 16 registers.
 * FM_SIMD_KERNELS builds compile these kernels (avx512, avx2); FM_SIMD_GEMM builds (avx512, and avx2 unless
 * compiled with FASTMLP_AVX2_BLAS) train with them too, the others train through BLAS.  Elsewhere the plain
 * loops at the end only keep the symbols defined.
 *
 * The summation order of every product depends on its shapes only (never on threads, alignment or
 * how the caller cuts rows and columns), so results are reproducible bit for bit.
 *
 * fm_fma_peak_<t>(iters) runs iters x FM_PEAK_CHAINS independent vector FMAs: the FMA bound of the
 * build, timed by the caller (the SSE2 baseline has no FMA: a multiply and an add per lane instead).
 */
#ifndef FASTMLP_SIMD_GEMM_H
#define FASTMLP_SIMD_GEMM_H

#include <stdint.h>
#include <string.h>

#define FM_INLINE static inline __attribute__((always_inline))
#define FM_UNROLL _Pragma("GCC unroll 16")

/* The avx2 build trains with its own kernels too, unless FASTMLP_AVX2_BLAS is defined (then SciPy's BLAS does
 * training's products).  An earlier version of these kernels measured slower than BLAS on a Xeon (Skylake-SP,
 * 2 vCPUs, OpenBLAS on its Haswell kernels: 784-256-256-10 b256 float64 about 1.4x, float32 about 1.1x) and no
 * better on the Zen 5 machine; with training's dot-product forward (fm_ntp) and X read in place, the forced
 * avx2 build on the Zen 5 machine (AMD EPYC, 2 vCPUs), own kernels / BLAS, alternating processes: 784-50-10
 * b100 float32 0.63-1.08x the epoch time (5 of 6 pairs below 0.8), float64 0.69-0.86x; 784-256-256-10 b256
 * float32 0.70-0.75x, float64 0.87-0.93x; 784-1024-1024-10 b512 float32 0.97-0.98x. */
#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__FMA__)
#define FM_SIMD_GEMM 1
#define FM_SIMD_KERNELS 1
#define FM_ISA_NAME "avx512"
#elif defined(__AVX2__) && defined(__FMA__) && !defined(FASTMLP_AVX2_BLAS)
#define FM_SIMD_GEMM 1
#define FM_SIMD_KERNELS 1
#define FM_ISA_NAME "avx2"
#elif defined(__AVX2__) && defined(__FMA__)
#define FM_SIMD_GEMM 0
/* FASTMLP_AVX2_BLAS: training keeps BLAS; inference still runs these kernels (measured on the Zen 5 machine
 * with the avx2 build forced, 784-100-10 float32, batch 1 about 4x and 10,000 rows about 3x faster than
 * SciPy's BLAS, whose per-call cost and thread start-up dominate such products) */
#define FM_SIMD_KERNELS 1
#define FM_ISA_NAME "avx2"
#else
#define FM_SIMD_GEMM 0
#define FM_SIMD_KERNELS 0
#define FM_ISA_NAME "baseline"
#endif

/* the FMA bound's loop: AVX-512 or AVX2 vectors where the build has them */
#if defined(__AVX512F__) && defined(__FMA__)
#define FM_PEAK_AVX512 1
#define FM_PEAK_AVX2 0
#elif defined(__AVX2__) && defined(__FMA__)
#define FM_PEAK_AVX512 0
#define FM_PEAK_AVX2 1
#else
#define FM_PEAK_AVX512 0
#define FM_PEAK_AVX2 0
#endif

#if FM_SIMD_KERNELS || FM_PEAK_AVX2 || FM_PEAK_AVX512
#include <immintrin.h>
#endif

#if FM_SIMD_KERNELS && defined(__AVX512F__)
/* ------------------------------------------------------------------------------------ AVX-512 */
/* 32 registers: fm_gemm up to 6 rows x 4 vectors = 24 accumulators (+ 4 + 1), 8 x 3, 12 x 2, 12 x 1; fm_nt 4 x 5 = 20
 * (+ 5 + 1) */
#define GM_KV 4
#define GM_PR_KV4 6
#define GM_PR_KV3 8
#define GM_PR_KV2 12
#define GM_PR_KV1 12
#define GM_QUNROLL 1
#define NT_MR 4
#define NT_NR 5
#define FM_VBYTES 64
/* the sparse first layer's tiles: vectors per column tile, interleaved accumulator sets per row */
#define SP_KV 2
#define SP_SETS 4
/* outputs of fm_nt per pass over the rows: keeps that slab of W (about 256 KiB) in L2 */
#define NT_SLAB_BYTES (256 * 1024)

FM_INLINE void fm_tr16_ps(__m512 *r) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    }
}

FM_INLINE void fm_tr8_pd(__m512d *r) {
    __m512d t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm512_unpacklo_pd(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_pd(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm512_shuffle_f64x2(t[i], t[i + 2], 0x88);
        u[i + 1] = _mm512_shuffle_f64x2(t[i], t[i + 2], 0xDD);
        u[i + 2] = _mm512_shuffle_f64x2(t[i + 1], t[i + 3], 0x88);
        u[i + 3] = _mm512_shuffle_f64x2(t[i + 1], t[i + 3], 0xDD);
    }
    /* u[0] rows 0-3 of columns 0,4 ; u[1] columns 2,6 ; u[2] columns 1,5 ; u[3] columns 3,7 */
    r[0] = _mm512_shuffle_f64x2(u[0], u[4], 0x88);
    r[4] = _mm512_shuffle_f64x2(u[0], u[4], 0xDD);
    r[2] = _mm512_shuffle_f64x2(u[1], u[5], 0x88);
    r[6] = _mm512_shuffle_f64x2(u[1], u[5], 0xDD);
    r[1] = _mm512_shuffle_f64x2(u[2], u[6], 0x88);
    r[5] = _mm512_shuffle_f64x2(u[2], u[6], 0xDD);
    r[3] = _mm512_shuffle_f64x2(u[3], u[7], 0x88);
    r[7] = _mm512_shuffle_f64x2(u[3], u[7], 0xDD);
}

/* ---- float32 ---- */
#define T float
#define SUF f32
#define V __m512
#define VN 16
#define V_ZERO() _mm512_setzero_ps()
#define V_LOAD(p) _mm512_loadu_ps(p)
#define V_LOADM(p, n) _mm512_maskz_loadu_ps((__mmask16)((1u << (n)) - 1u), (p))
#define V_STORE(p, v) _mm512_storeu_ps((p), (v))
#define V_STOREM(p, v, n) _mm512_mask_storeu_ps((p), (__mmask16)((1u << (n)) - 1u), (v))
#define V_SET1(x) _mm512_set1_ps(x)
#define V_FMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define V_MUL(a, b) _mm512_mul_ps((a), (b))
#define V_RSUM(v) _mm512_reduce_add_ps(v)
#define V_TRANSPOSE(r) fm_tr16_ps(r)
/* the finiteness test: VFPCLASS for QNaN, SNaN, +inf and -inf (0x99), the lanes' masks ORed */
#define VC_T __mmask16
#define VC_ZERO() ((__mmask16)0)
#define VC_ACC(acc, v) ((acc) = _kor_mask16((acc), _mm512_fpclass_ps_mask((v), 0x99)))
#define VC_OR(x, y) _kor_mask16((x), (y))
#define VC_ANY(x) ((x) != 0)
/* q per accumulation block: 256 (as in the avx2 build) rather than 64 re-reads C a quarter as often, which pays
 * where C is large: epochs on the Zen 5 machine, one process, 256 / 64: 784-1024-1024-10 b512 float32
 * 0.94-0.96x, float64 0.95x; 784-256-256-10 0.99-1.03x; 784-50-10 0.99-1.01x */
#define GM_KC 256
#include "_simd_gemm_t.h" /* undefines T, SUF, V, VN, GM_KC and V_* again */

/* ---- float64 ---- */
#define T double
#define SUF f64
#define V __m512d
#define VN 8
#define V_ZERO() _mm512_setzero_pd()
#define V_LOAD(p) _mm512_loadu_pd(p)
#define V_LOADM(p, n) _mm512_maskz_loadu_pd((__mmask8)((1u << (n)) - 1u), (p))
#define V_STORE(p, v) _mm512_storeu_pd((p), (v))
#define V_STOREM(p, v, n) _mm512_mask_storeu_pd((p), (__mmask8)((1u << (n)) - 1u), (v))
#define V_SET1(x) _mm512_set1_pd(x)
#define V_FMA(a, b, c) _mm512_fmadd_pd((a), (b), (c))
#define V_MUL(a, b) _mm512_mul_pd((a), (b))
#define V_RSUM(v) _mm512_reduce_add_pd(v)
#define V_TRANSPOSE(r) fm_tr8_pd(r)
#define VC_T __mmask8
#define VC_ZERO() ((__mmask8)0)
#define VC_ACC(acc, v) ((acc) = _kor_mask8((acc), _mm512_fpclass_pd_mask((v), 0x99)))
#define VC_OR(x, y) _kor_mask8((x), (y))
#define VC_ANY(x) ((x) != 0)
#define GM_KC 256
#include "_simd_gemm_t.h"

#elif FM_SIMD_KERNELS
/* ------------------------------------------------------------------------------------ AVX2 */
/* 16 registers: fm_gemm up to 4 rows x 3 vectors = 12 accumulators (+ 3 + 1), 6 x 2, 12 x 1; fm_nt 4 x 3 = 12 (+ 3 + 1) */
#define GM_KV 3
#define GM_PR_KV3 4
#define GM_PR_KV2 6
#define GM_PR_KV1 12
#define GM_PR_KV4 1 /* unused */
#define GM_QUNROLL 1
#define NT_MR 4
#define NT_NR 3
#define FM_VBYTES 32
#define SP_KV 2
#define SP_SETS 4
#define NT_SLAB_BYTES (256 * 1024)

static const int32_t fm_mask32[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
static const int64_t fm_mask64[8] = {-1, -1, -1, -1, 0, 0, 0, 0};

FM_INLINE void fm_tr8_ps(__m256 *r) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

FM_INLINE void fm_tr4_pd(__m256d *r) {
    const __m256d t0 = _mm256_unpacklo_pd(r[0], r[1]), t1 = _mm256_unpackhi_pd(r[0], r[1]);
    const __m256d t2 = _mm256_unpacklo_pd(r[2], r[3]), t3 = _mm256_unpackhi_pd(r[2], r[3]);
    r[0] = _mm256_permute2f128_pd(t0, t2, 0x20);
    r[1] = _mm256_permute2f128_pd(t1, t3, 0x20);
    r[2] = _mm256_permute2f128_pd(t0, t2, 0x31);
    r[3] = _mm256_permute2f128_pd(t1, t3, 0x31);
}

FM_INLINE float fm_rsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

FM_INLINE double fm_rsum4(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
}

/* ---- float32 ---- */
#define T float
#define SUF f32
#define V __m256
#define VN 8
#define V_ZERO() _mm256_setzero_ps()
#define V_LOAD(p) _mm256_loadu_ps(p)
#define V_LOADM(p, n) _mm256_maskload_ps((p), _mm256_loadu_si256((const __m256i *)(fm_mask32 + 8 - (n))))
#define V_STORE(p, v) _mm256_storeu_ps((p), (v))
#define V_STOREM(p, v, n) _mm256_maskstore_ps((p), _mm256_loadu_si256((const __m256i *)(fm_mask32 + 8 - (n))), (v))
#define V_SET1(x) _mm256_set1_ps(x)
#define V_FMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define V_MUL(a, b) _mm256_mul_ps((a), (b))
#define V_RSUM(v) fm_rsum8(v)
#define V_TRANSPOSE(r) fm_tr8_ps(r)
#define VC_T __m256i
#define VC_ZERO() _mm256_setzero_si256()
#define VC_ACC(acc, v) ((acc) = _mm256_or_si256((acc), _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7f800000)), _mm256_set1_epi32(0x7f800000))))
#define VC_OR(x, y) _mm256_or_si256((x), (y))
#define VC_ANY(x) (!_mm256_testz_si256((x), (x)))
#define GM_KC 256
#include "_simd_gemm_t.h"

/* ---- float64 ---- */
#define T double
#define SUF f64
#define V __m256d
#define VN 4
#define V_ZERO() _mm256_setzero_pd()
#define V_LOAD(p) _mm256_loadu_pd(p)
#define V_LOADM(p, n) _mm256_maskload_pd((p), _mm256_loadu_si256((const __m256i *)(fm_mask64 + 4 - (n))))
#define V_STORE(p, v) _mm256_storeu_pd((p), (v))
#define V_STOREM(p, v, n) _mm256_maskstore_pd((p), _mm256_loadu_si256((const __m256i *)(fm_mask64 + 4 - (n))), (v))
#define V_SET1(x) _mm256_set1_pd(x)
#define V_FMA(a, b, c) _mm256_fmadd_pd((a), (b), (c))
#define V_MUL(a, b) _mm256_mul_pd((a), (b))
#define V_RSUM(v) fm_rsum4(v)
#define V_TRANSPOSE(r) fm_tr4_pd(r)
#define VC_T __m256i
#define VC_ZERO() _mm256_setzero_si256()
#define VC_ACC(acc, v) ((acc) = _mm256_or_si256((acc), _mm256_cmpeq_epi64(_mm256_and_si256(_mm256_castpd_si256(v), _mm256_set1_epi64x(0x7ff0000000000000LL)), _mm256_set1_epi64x(0x7ff0000000000000LL))))
#define VC_OR(x, y) _mm256_or_si256((x), (y))
#define VC_ANY(x) (!_mm256_testz_si256((x), (x)))
#define GM_KC 256
#include "_simd_gemm_t.h"

#else /* no SIMD kernels in this build: plain loops keep the symbols defined (the Cython code uses BLAS) */

#define FM_VBYTES 16
#define FM_SCALAR_KERNELS(T, SUF)                                                                          \
    static void fm_sp_rows_##SUF(int64_t nr, const int32_t *idx, const T *val, int64_t stride, const int64_t *cnt, \
                                 const T *wt, int64_t ldt, int64_t n, T *z, int64_t ldz) {                   \
        for (int64_t r = 0; r < nr; r++) {                                                                   \
            T *zr = z + r * ldz;                                                                             \
            for (int64_t j = 0; j < n; j++) zr[j] = 0;                                                       \
            for (int64_t p = 0; p < cnt[r]; p++) {                                                           \
                const T x = val[r * stride + p], *w = wt + (int64_t)idx[r * stride + p] * ldt;               \
                for (int64_t j = 0; j < n; j++) zr[j] += x * w[j];                                           \
            }                                                                                                \
        }                                                                                                    \
    }                                                                                                        \
    static void fm_nt_##SUF(int64_t M, int64_t N, int64_t K, const T *A, int64_t lda, const T *W, int64_t ldw,  \
                            T *C, int64_t ldc, int *bad) {                                                   \
        (void)bad;                                                                                           \
        for (int64_t i = 0; i < M; i++)                                                                      \
            for (int64_t o = 0; o < N; o++) {                                                                \
                T s = 0;                                                                                     \
                for (int64_t k = 0; k < K; k++) s += A[i * lda + k] * W[o * ldw + k];                        \
                C[i * ldc + o] = s;                                                                          \
            }                                                                                                \
    }                                                                                                        \
    static void fm_ntp_##SUF(int64_t M, int64_t N, int64_t K, T *const *arows, const T *W, int64_t ldw,      \
                             T *C, int64_t ldc) {                                                          \
        for (int64_t i = 0; i < M; i++)                                                                      \
            for (int64_t o = 0; o < N; o++) {                                                                \
                T s = 0;                                                                                     \
                for (int64_t k = 0; k < K; k++) s += arows[i][k] * W[o * ldw + k];                           \
                C[i * ldc + o] = s;                                                                          \
            }                                                                                                \
    }                                                                                                        \
    static void fm_gemm_##SUF(int64_t P, int64_t K, int64_t Q, T *const *lrow, int64_t ls,             \
                              T *const *rrow, int64_t roff, T *C, int64_t ldc, T alpha, T beta) {     \
        for (int64_t i = 0; i < P; i++)                                                                      \
            for (int64_t j = 0; j < K; j++) {                                                                \
                T s = 0;                                                                                     \
                for (int64_t q = 0; q < Q; q++) s += lrow[i][q * ls] * rrow[q][roff + j];                    \
                C[i * ldc + j] = (beta == 0 ? 0 : beta * C[i * ldc + j]) + alpha * s;                        \
            }                                                                                                \
    }                                                                                                        \
    static void fm_transpose_##SUF(int64_t rows, int64_t cols, const T *S, int64_t lds, T *D, int64_t ldd) { \
        for (int64_t i = 0; i < rows; i++)                                                                   \
            for (int64_t j = 0; j < cols; j++) D[j * ldd + i] = S[i * lds + j];                              \
    }
FM_SCALAR_KERNELS(float, f32)
FM_SCALAR_KERNELS(double, f64)
#undef FM_SCALAR_KERNELS

#endif /* FM_SIMD_KERNELS */

/* ---------------------------------------------------------------------------- the FMA bound */
#define FM_PEAK_CHAINS 12
#if FM_PEAK_AVX2 || FM_PEAK_AVX512
#define FM_PEAK_BODY(VT, SET1, FMA, ADD, LANES, T)                                                           \
    VT acc[FM_PEAK_CHAINS];                                                                                  \
    const VT m = SET1((T)0.999999), c = SET1((T)1e-7);                                                       \
    FM_UNROLL for (int j = 0; j < FM_PEAK_CHAINS; j++) acc[j] = SET1((T)(j + 1));                            \
    for (int64_t i = 0; i < iters; i++) {                                                                    \
        FM_UNROLL for (int j = 0; j < FM_PEAK_CHAINS; j++) acc[j] = FMA(acc[j], m, c);                       \
        __asm__ volatile("" ::: "memory");                                                                   \
    }                                                                                                        \
    VT s = acc[0];                                                                                           \
    FM_UNROLL for (int j = 1; j < FM_PEAK_CHAINS; j++) s = ADD(s, acc[j]);                                   \
    T out[LANES];                                                                                            \
    memcpy(out, &s, sizeof(s));                                                                              \
    return (double)out[0];
#endif
#include <string.h>
/* returns a value of the chains so that nothing is optimized away; flops = iters * FM_PEAK_CHAINS * 2 * lanes */
static double fm_fma_peak_f32(int64_t iters) {
#if FM_PEAK_AVX512
    FM_PEAK_BODY(__m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps, 16, float)
#elif FM_PEAK_AVX2
    FM_PEAK_BODY(__m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps, 8, float)
#else
    float acc[FM_PEAK_CHAINS][4];
    for (int j = 0; j < FM_PEAK_CHAINS; j++)
        for (int l = 0; l < 4; l++) acc[j][l] = (float)(j + 1);
    for (int64_t i = 0; i < iters; i++) {
        FM_UNROLL for (int j = 0; j < FM_PEAK_CHAINS; j++) FM_UNROLL for (int l = 0; l < 4; l++)
            acc[j][l] = acc[j][l] * 0.999999f + 1e-7f;
        __asm__ volatile("" ::: "memory");
    }
    return (double)acc[0][0] + acc[FM_PEAK_CHAINS - 1][3];
#endif
}
static double fm_fma_peak_f64(int64_t iters) {
#if FM_PEAK_AVX512
    FM_PEAK_BODY(__m512d, _mm512_set1_pd, _mm512_fmadd_pd, _mm512_add_pd, 8, double)
#elif FM_PEAK_AVX2
    FM_PEAK_BODY(__m256d, _mm256_set1_pd, _mm256_fmadd_pd, _mm256_add_pd, 4, double)
#else
    double acc[FM_PEAK_CHAINS][2];
    for (int j = 0; j < FM_PEAK_CHAINS; j++)
        for (int l = 0; l < 2; l++) acc[j][l] = (double)(j + 1);
    for (int64_t i = 0; i < iters; i++) {
        FM_UNROLL for (int j = 0; j < FM_PEAK_CHAINS; j++) FM_UNROLL for (int l = 0; l < 2; l++)
            acc[j][l] = acc[j][l] * 0.999999 + 1e-7;
        __asm__ volatile("" ::: "memory");
    }
    return acc[0][0] + acc[FM_PEAK_CHAINS - 1][1];
#endif
}
/* vector lanes of the FMA bound's loop per dtype */
#define FM_PEAK_VBYTES (FM_PEAK_AVX512 ? 64 : FM_PEAK_AVX2 ? 32 : 16)
#define FM_PEAK_LANES_F32 (FM_PEAK_VBYTES / 4)
#define FM_PEAK_LANES_F64 (FM_PEAK_VBYTES / 8)

/* fm_prefetch: ask for the cache lines of [p, p + bytes) (a row of X ahead of its compressing) */
static inline void fm_prefetch(const void *p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch((const char *)p + o, 0, 3);
}

/* fm_sp_compress_<t>: the nonzeros of x[0:n] (NaN counts as nonzero) into idx / val, columns ascending;
 * returns their count, or a count above limit as soon as it passes limit (the row is then not compressed).
 * idx and val need room for n + 16 entries (the AVX-512 version stores whole vectors). */
#if defined(__AVX512F__) && defined(__AVX512VL__)
/* A first look counts (16 or 8 at a time, stopping once past limit): a dense row is left after it, and only a
 * sparse one pays the compressing stores.  T element, W lanes, MT mask, VI / IOTA / ISET1 / IADD / ISTORE /
 * ICOMP the int32 column vector of W lanes, P the float suffix of the intrinsics (ps / pd). */
#define FM_SP_AVX512(T, SUF, W, MT, VT, P, VI, IOTA, ISET1, IADD, ISTORE, ICOMP)                           \
    static inline int64_t fm_sp_count_##SUF(const T *x, int64_t n, int64_t limit) {                         \
        int64_t c = 0;                                                                                       \
        const VT zero = _mm512_setzero_##P();                                                                \
        for (int64_t k = 0; k < n; k += W) {                                                                 \
            const MT m = n - k >= W ? (MT)((1u << W) - 1u) : (MT)((1u << (n - k)) - 1u);                     \
            c += __builtin_popcount((unsigned)_mm512_mask_cmp_##P##_mask(m, _mm512_maskz_loadu_##P(m, x + k), \
                                                                        zero, _CMP_NEQ_UQ));                \
            if (c > limit)                                                                                   \
                return c;                                                                                    \
        }                                                                                                    \
        return c;                                                                                            \
    }                                                                                                        \
    static int64_t fm_sp_compress_##SUF(const T *x, int64_t n, int64_t limit, int32_t *idx, T *val) {       \
        const int64_t pre = fm_sp_count_##SUF(x, n, limit);                                                  \
        if (pre > limit)                                                                                     \
            return pre;                                                                                      \
        int64_t c = 0;                                                                                       \
        VI iota = IOTA;                                                                                      \
        const VI step = ISET1(W);                                                                            \
        const VT zero = _mm512_setzero_##P();                                                                \
        for (int64_t k = 0; k < n; k += W) {                                                                 \
            const MT m = n - k >= W ? (MT)((1u << W) - 1u) : (MT)((1u << (n - k)) - 1u);                     \
            const VT v = _mm512_maskz_loadu_##P(m, x + k);                                                   \
            const MT nz = _mm512_mask_cmp_##P##_mask(m, v, zero, _CMP_NEQ_UQ);                               \
            _mm512_storeu_##P(val + c, _mm512_maskz_compress_##P(nz, v));                                    \
            ISTORE((void *)(idx + c), ICOMP(nz, iota));                                                      \
            c += __builtin_popcount((unsigned)nz);                                                           \
            iota = IADD(iota, step);                                                                         \
        }                                                                                                    \
        return c;                                                                                            \
    }
FM_SP_AVX512(float, f32, 16, __mmask16, __m512, ps, __m512i,
             _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32,
             _mm512_add_epi32, _mm512_storeu_si512, _mm512_maskz_compress_epi32)
FM_SP_AVX512(double, f64, 8, __mmask8, __m512d, pd, __m256i, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
             _mm256_set1_epi32, _mm256_add_epi32, _mm256_storeu_si256, _mm256_maskz_compress_epi32)
#undef FM_SP_AVX512
#else
#if defined(__AVX2__)
/* the nonzeros of x[0:n] counted 8 or 4 at a time (NaN included), stopping once past limit: a dense row is left
 * after a short look, and only a sparse one pays the compressing loop below */
#define FM_SP_COUNT(T, SUF, VT, W, ZERO, LOAD, CMP, MOVEMASK, U, MAG)                                      \
    static inline int64_t fm_sp_count_##SUF(const T *x, int64_t n, int64_t limit) {                         \
        int64_t c = 0, k = 0;                                                                                \
        const VT zero = ZERO();                                                                              \
        for (; k + W <= n; k += W) {                                                                         \
            c += __builtin_popcount((unsigned)MOVEMASK(CMP(LOAD(x + k), zero, _CMP_NEQ_UQ)));                \
            if (c > limit)                                                                                   \
                return c;                                                                                    \
        }                                                                                                    \
        for (; k < n; k++) {                                                                                 \
            U bits;                                                                                          \
            memcpy(&bits, x + k, sizeof bits);                                                               \
            c += (bits & MAG) != 0;                                                                          \
        }                                                                                                    \
        return c;                                                                                            \
    }
FM_SP_COUNT(float, f32, __m256, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_cmp_ps, _mm256_movemask_ps, uint32_t,
            0x7fffffffu)
FM_SP_COUNT(double, f64, __m256d, 4, _mm256_setzero_pd, _mm256_loadu_pd, _mm256_cmp_pd, _mm256_movemask_pd, uint64_t,
            0x7fffffffffffffffull)
#undef FM_SP_COUNT
#define FM_SP_PRECOUNT(SUF)                                                                                \
    {                                                                                                        \
        const int64_t pre = fm_sp_count_##SUF(x, n, limit);                                                  \
        if (pre > limit)                                                                                     \
            return pre;                                                                                      \
    }
#else
#define FM_SP_PRECOUNT(SUF)
#endif
/* nonzero by the bits (NaN included), which -ffast-math cannot fold away */
#define FM_SP_COMPRESS(T, SUF, U, MAG)                                                                     \
    static int64_t fm_sp_compress_##SUF(const T *x, int64_t n, int64_t limit, int32_t *idx, T *val) {       \
        FM_SP_PRECOUNT(SUF)                                                                                  \
        int64_t c = 0;                                                                                       \
        for (int64_t k = 0; k < n; k++) {                                                                    \
            U bits;                                                                                          \
            memcpy(&bits, x + k, sizeof bits);                                                               \
            idx[c] = (int32_t)k;                                                                             \
            val[c] = x[k];                                                                                   \
            c += (bits & MAG) != 0;                                                                          \
            if (c > limit)                                                                                   \
                return c;                                                                                    \
        }                                                                                                    \
        return c;                                                                                            \
    }
FM_SP_COMPRESS(float, f32, uint32_t, 0x7fffffffu)
FM_SP_COMPRESS(double, f64, uint64_t, 0x7fffffffffffffffull)
#undef FM_SP_COMPRESS
#undef FM_SP_PRECOUNT
#endif

#endif /* FASTMLP_SIMD_GEMM_H */
