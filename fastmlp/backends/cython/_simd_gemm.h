/* fastmlp: register-tiled AVX-512 kernels for the two matrix products training needs.
 *
 * Every matrix is row-major with its own leading dimension.
 *
 *   fm_nt_<t>:  C[i, o]  = sum_k A[i, k] * W[o, k]
 *               (forward pass: both operands contiguous along k, one dot product
 *               per output; register tile NT_MR rows x NT_NR outputs)
 *   fm_tn_<t>:  C[p, k]  = beta * C[p, k] + alpha * sum_q S[p*sp + q*sq] * R[q, k]
 *               (weight gradient fused with the SGD update, and hidden deltas:
 *               vectorized along k; register tile TN_PR rows x TN_KV vectors)
 *
 * With beta == 0, C is not read.  The summation order depends on the shapes
 * only (never on threads or alignment), so results are reproducible bit for bit.
 *
 * Why not BLAS: the products of small-MLP training are skinny (100 x 784 x 50),
 * where a BLAS call spends much of its time packing both operands, and the
 * scipy-openblas build SciPy ships runs its AVX2 (Haswell) kernels on CPUs it
 * does not know, AVX-512 ones included.  `pytest bench/test_kernels.py
 * --benchmark-only -k 100x784x50` on a 2-core Zen 5, one run, medians: forward
 * float32 44 us here (one thread) vs 52 us for NumPy (its BLAS on two threads),
 * update 37 vs 56 us; float64 forward 101 vs 91 us, update 73 vs 104 us.
 *
 * FM_SIMD_GEMM tells whether this build has the kernels (AVX-512F at compile
 * time).  Without them the Cython code calls BLAS; the plain loops at the end
 * only keep the symbols defined.
 */
#ifndef FASTMLP_SIMD_GEMM_H
#define FASTMLP_SIMD_GEMM_H

#include <stdint.h>

#if defined(__AVX512F__) && defined(__FMA__)
#  include <immintrin.h>
#define FM_SIMD_GEMM 1
#else
#define FM_SIMD_GEMM 0
#endif

#define FM_INLINE static inline __attribute__((always_inline))

#if FM_SIMD_GEMM

/* 32 vector registers: NT 4 x 5 = 20 accumulators (+ 5 + 1 operands), TN 6 x 4 = 24 (+ 4 + 1) */
#define NT_MR 4
#define NT_NR 5
#define TN_PR 6
#define TN_KV 4
/* outputs of the forward product per pass over the rows: keeps that slab of W (about 256 KiB) in L2 */
#define NT_SLAB_BYTES (256 * 1024)

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
#include "_simd_gemm_t.h" /* undefines T, SUF, V, VN and V_* again */

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
#include "_simd_gemm_t.h" /* undefines T, SUF, V, VN and V_* again */

#else /* no SIMD kernels in this build: plain loops keep the symbols defined (the Cython code uses BLAS) */

#define FM_SCALAR_KERNELS(T, SUF)                                                                          \
    static void fm_nt_##SUF(int64_t M, int64_t N, int64_t K, const T *A, int64_t lda, const T *W, int64_t ldw,  \
                            T *C, int64_t ldc) {                                                             \
        for (int64_t i = 0; i < M; i++)                                                                      \
            for (int64_t o = 0; o < N; o++) {                                                                \
                T s = 0;                                                                                     \
                for (int64_t k = 0; k < K; k++) s += A[i * lda + k] * W[o * ldw + k];                        \
                C[i * ldc + o] = s;                                                                          \
            }                                                                                                \
    }                                                                                                        \
    static void fm_tn_##SUF(int64_t P, int64_t K, int64_t Q, const T *S, int64_t sp, int64_t sq, const T *R,  \
                            int64_t ldr, T *C, int64_t ldc, T alpha, T beta) {                               \
        for (int64_t p = 0; p < P; p++)                                                                      \
            for (int64_t k = 0; k < K; k++) {                                                                \
                T s = 0;                                                                                     \
                for (int64_t q = 0; q < Q; q++) s += S[p * sp + q * sq] * R[q * ldr + k];                    \
                C[p * ldc + k] = (beta == 0 ? 0 : beta * C[p * ldc + k]) + alpha * s;                        \
            }                                                                                                \
    }
FM_SCALAR_KERNELS(float, f32)
FM_SCALAR_KERNELS(double, f64)
#undef FM_SCALAR_KERNELS

#endif /* FM_SIMD_GEMM */
#endif /* FASTMLP_SIMD_GEMM_H */
