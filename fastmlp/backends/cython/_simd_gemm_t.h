/* fastmlp: body of the SIMD kernels, included by _simd_gemm.h once per dtype
 * with T (element), V (vector), VN (lanes), SUF (name suffix) and the V_* operations defined;
 * undefines them all at the end, ready for the next dtype. */

#define FM_CAT_(a, b) a##_##b
#define FM_CAT(a, b) FM_CAT_(a, b)
#define FN(name) FM_CAT(name, SUF)

/* One NT tile: c[r*ldc + j] = dot(a[r], w[j]) over K, for r < mr, j < nr (mr, nr constants after inlining). */
FM_INLINE void FN(fm_nt_tile)(const int mr, const int nr, int64_t K, const T *const *a, const T *const *w, T *c,
                              int64_t ldc) {
    V acc[NT_MR][NT_NR];
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nr; j++) acc[r][j] = V_ZERO();
    int64_t k = 0;
    for (; k + VN <= K; k += VN) {
        V wv[NT_NR];
        for (int j = 0; j < nr; j++) wv[j] = V_LOAD(w[j] + k);
        for (int r = 0; r < mr; r++) {
            V av = V_LOAD(a[r] + k);
            for (int j = 0; j < nr; j++) acc[r][j] = V_FMA(av, wv[j], acc[r][j]);
        }
    }
    if (k < K) {
        const int rem = (int)(K - k);
        V wv[NT_NR];
        for (int j = 0; j < nr; j++) wv[j] = V_LOADM(w[j] + k, rem);
        for (int r = 0; r < mr; r++) {
            V av = V_LOADM(a[r] + k, rem);
            for (int j = 0; j < nr; j++) acc[r][j] = V_FMA(av, wv[j], acc[r][j]);
        }
    }
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nr; j++) c[r * ldc + j] = V_RSUM(acc[r][j]);
}

/* Tiles with nr outputs: the full NT_MR rows, or one row. */
static void FN(fm_nt_full_rows)(int nr, int64_t K, const T *const *a, const T *const *w, T *c, int64_t ldc) {
    switch (nr) {
#if NT_NR >= 6
    case 6: FN(fm_nt_tile)(NT_MR, 6, K, a, w, c, ldc); break;
#endif
#if NT_NR >= 5
    case 5: FN(fm_nt_tile)(NT_MR, 5, K, a, w, c, ldc); break;
#endif
#if NT_NR >= 4
    case 4: FN(fm_nt_tile)(NT_MR, 4, K, a, w, c, ldc); break;
#endif
    case 3: FN(fm_nt_tile)(NT_MR, 3, K, a, w, c, ldc); break;
    case 2: FN(fm_nt_tile)(NT_MR, 2, K, a, w, c, ldc); break;
    default: FN(fm_nt_tile)(NT_MR, 1, K, a, w, c, ldc); break;
    }
}

static void FN(fm_nt_one_row)(int nr, int64_t K, const T *const *a, const T *const *w, T *c, int64_t ldc) {
    switch (nr) {
#if NT_NR >= 6
    case 6: FN(fm_nt_tile)(1, 6, K, a, w, c, ldc); break;
#endif
#if NT_NR >= 5
    case 5: FN(fm_nt_tile)(1, 5, K, a, w, c, ldc); break;
#endif
#if NT_NR >= 4
    case 4: FN(fm_nt_tile)(1, 4, K, a, w, c, ldc); break;
#endif
    case 3: FN(fm_nt_tile)(1, 3, K, a, w, c, ldc); break;
    case 2: FN(fm_nt_tile)(1, 2, K, a, w, c, ldc); break;
    default: FN(fm_nt_tile)(1, 1, K, a, w, c, ldc); break;
    }
}

/* C (M, N; ldc) = A (M, K; lda) @ W (N, K; ldw).T */
static void FN(fm_nt)(int64_t M, int64_t N, int64_t K, const T *A, int64_t lda, const T *W,
                      int64_t ldw, T *C, int64_t ldc) {
    const T *a[NT_MR];
    const T *w[NT_NR];
    int64_t slab = NT_SLAB_BYTES / ((K > 0 ? K : 1) * (int64_t)sizeof(T));
    slab = slab < NT_NR ? NT_NR : (slab / NT_NR) * NT_NR;
    for (int64_t j0 = 0; j0 < N; j0 += slab) {
        const int64_t j1 = j0 + slab < N ? j0 + slab : N;
        int64_t i = 0;
        for (; i + NT_MR <= M; i += NT_MR) {
            for (int r = 0; r < NT_MR; r++) a[r] = A + (i + r) * lda;
            for (int64_t j = j0; j < j1; j += NT_NR) {
                const int nr = (int)(j1 - j < NT_NR ? j1 - j : NT_NR);
                for (int q = 0; q < nr; q++) w[q] = W + (j + q) * ldw;
                FN(fm_nt_full_rows)(nr, K, a, w, C + i * ldc + j, ldc);
            }
        }
        for (; i < M; i++) {
            a[0] = A + i * lda;
            for (int64_t j = j0; j < j1; j += NT_NR) {
                const int nr = (int)(j1 - j < NT_NR ? j1 - j : NT_NR);
                for (int q = 0; q < nr; q++) w[q] = W + (j + q) * ldw;
                FN(fm_nt_one_row)(nr, K, a, w, C + i * ldc + j, ldc);
            }
        }
    }
}

/* One TN tile: pr rows of C from s (row p at s + p*sp), kv vectors from column k0; the last vector
 * holds only `last` lanes (VN when full).  pr, kv and whether last < VN are constants after inlining. */
FM_INLINE void FN(fm_tn_tile)(const int pr, const int kv, const int masked, int last, int64_t Q, const T *s,
                              int64_t sp, int64_t sq, const T *R, int64_t ldr, int64_t k0,
                              T *c, int64_t ldc, T alpha, T beta) {
    V acc[TN_PR][TN_KV];
    for (int p = 0; p < pr; p++)
        for (int v = 0; v < kv; v++) acc[p][v] = V_ZERO();
    for (int64_t q = 0; q < Q; q++) {
        const T *rq = R + q * ldr + k0;
        V rv[TN_KV];
        for (int v = 0; v < kv; v++)
            rv[v] = (masked && v == kv - 1) ? V_LOADM(rq + v * VN, last) : V_LOAD(rq + v * VN);
        const T *sq_ = s + q * sq;
        for (int p = 0; p < pr; p++) {
            V sv = V_SET1(sq_[p * sp]);
            for (int v = 0; v < kv; v++) acc[p][v] = V_FMA(sv, rv[v], acc[p][v]);
        }
    }
    const V va = V_SET1(alpha);
    if (beta == 0) {
        for (int p = 0; p < pr; p++)
            for (int v = 0; v < kv; v++) {
                T *cp = c + p * ldc + k0 + v * VN;
                V out = V_MUL(acc[p][v], va);
                if (masked && v == kv - 1)
                    V_STOREM(cp, out, last);
                else
                    V_STORE(cp, out);
            }
    } else {
        const V vb = V_SET1(beta);
        for (int p = 0; p < pr; p++)
            for (int v = 0; v < kv; v++) {
                T *cp = c + p * ldc + k0 + v * VN;
                if (masked && v == kv - 1)
                    V_STOREM(cp, V_FMA(acc[p][v], va, V_MUL(V_LOADM(cp, last), vb)), last);
                else
                    V_STORE(cp, V_FMA(acc[p][v], va, V_MUL(V_LOAD(cp), vb)));
            }
    }
}

#define FM_TN_ARGS Q, s, sp, sq, R, ldr, k0, c, ldc, alpha, beta

/* pr rows (pr == TN_PR, or 1), kv full vectors (1 <= kv <= TN_KV), optionally one masked vector after them */
static void FN(fm_tn_rows)(int pr, int kv, int last, int64_t Q, const T *s, int64_t sp, int64_t sq, const T *R,
                           int64_t ldr, int64_t k0, T *c, int64_t ldc, T alpha, T beta) {
    /* kv counts vectors including a masked last one when last < VN */
    const int masked = last < VN;
    if (pr == TN_PR) {
        if (!masked) {
            switch (kv) {
            case TN_KV: FN(fm_tn_tile)(TN_PR, TN_KV, 0, VN, FM_TN_ARGS); return;
#if TN_KV >= 4
            case 3: FN(fm_tn_tile)(TN_PR, 3, 0, VN, FM_TN_ARGS); return;
#endif
            case 2: FN(fm_tn_tile)(TN_PR, 2, 0, VN, FM_TN_ARGS); return;
            default: FN(fm_tn_tile)(TN_PR, 1, 0, VN, FM_TN_ARGS); return;
            }
        }
        switch (kv) {
        case TN_KV: FN(fm_tn_tile)(TN_PR, TN_KV, 1, last, FM_TN_ARGS); return;
#if TN_KV >= 4
        case 3: FN(fm_tn_tile)(TN_PR, 3, 1, last, FM_TN_ARGS); return;
#endif
        case 2: FN(fm_tn_tile)(TN_PR, 2, 1, last, FM_TN_ARGS); return;
        default: FN(fm_tn_tile)(TN_PR, 1, 1, last, FM_TN_ARGS); return;
        }
    }
    if (!masked) {
        switch (kv) {
        case TN_KV: FN(fm_tn_tile)(1, TN_KV, 0, VN, FM_TN_ARGS); return;
#if TN_KV >= 4
        case 3: FN(fm_tn_tile)(1, 3, 0, VN, FM_TN_ARGS); return;
#endif
        case 2: FN(fm_tn_tile)(1, 2, 0, VN, FM_TN_ARGS); return;
        default: FN(fm_tn_tile)(1, 1, 0, VN, FM_TN_ARGS); return;
        }
    }
    switch (kv) {
    case TN_KV: FN(fm_tn_tile)(1, TN_KV, 1, last, FM_TN_ARGS); return;
#if TN_KV >= 4
    case 3: FN(fm_tn_tile)(1, 3, 1, last, FM_TN_ARGS); return;
#endif
    case 2: FN(fm_tn_tile)(1, 2, 1, last, FM_TN_ARGS); return;
    default: FN(fm_tn_tile)(1, 1, 1, last, FM_TN_ARGS); return;
    }
}
#undef FM_TN_ARGS

/* C (P, K; ldc) = beta C + alpha S (P, Q; strides sp, sq) @ R (Q, K; ldr) */
static void FN(fm_tn)(int64_t P, int64_t K, int64_t Q, const T *S, int64_t sp, int64_t sq, const T *R, int64_t ldr,
                      T *C, int64_t ldc, T alpha, T beta) {
    const int64_t kblk = (int64_t)TN_KV * VN;
    for (int64_t k0 = 0; k0 < K; k0 += kblk) {
        const int64_t width = K - k0 < kblk ? K - k0 : kblk;
        const int kv = (int)((width + VN - 1) / VN);
        const int last = (int)(width - (int64_t)(kv - 1) * VN);
        int64_t p = 0;
        for (; p + TN_PR <= P; p += TN_PR)
            FN(fm_tn_rows)(TN_PR, kv, last, Q, S + p * sp, sp, sq, R, ldr, k0, C + p * ldc, ldc, alpha, beta);
        for (; p < P; p++)
            FN(fm_tn_rows)(1, kv, last, Q, S + p * sp, sp, sq, R, ldr, k0, C + p * ldc, ldc, alpha, beta);
    }
}

#undef FN
#undef FM_CAT
#undef FM_CAT_
#undef T
#undef SUF
#undef V
#undef VN
#undef V_ZERO
#undef V_LOAD
#undef V_LOADM
#undef V_STORE
#undef V_STOREM
#undef V_SET1
#undef V_FMA
#undef V_MUL
#undef V_RSUM
