/* fastmlp: body of the SIMD kernels, included by _simd_gemm.h once per dtype with T (element), V (vector),
 * VN (lanes), SUF (name suffix), the tile sizes and the V_* operations defined; undefines them all at the
 * end, ready for the next dtype. */

#define FM_CAT_(a, b) a##_##b
#define FM_CAT(a, b) FM_CAT_(a, b)
#define FN(name) FM_CAT(name, SUF)

/* ================================================================================================
 * fm_gemm: C[i][j] = beta C[i][j] + alpha sum_q L[i][q] R[q][j]        (i < P, j < K, q < Q)
 *
 * L[i][q] = lrow[i][q * ls] is broadcast, R[q][j] = rrow[q][roff + j] is loaded as vectors along j
 * and C row i starts at C + i * ldc: an outer-product kernel, no horizontal sums.  Register tiles of
 * pr <= GM_PR rows by kv <= GM_KV vectors accumulate over a block of at most GM_KC values of q (the
 * tile's slice of R, at most 64 KiB, then stays in L1 or L2 while the row tiles take it in turn) and are
 * added into C block by block.  Rows and vectors are dealt into tiles as evenly as possible.  Every C[i][j] is the same
 * sequence of FMAs (q in order, block by block) whatever P and K are and whichever tile it falls in,
 * so results never depend on how the callers cut rows or columns.  With beta == 0, C is not read.
 * ================================================================================================ */

/* how a tile's sum goes into C: mode 0 C = alpha acc; 1 C = beta C + alpha acc; 2 C = C + alpha acc */
FM_INLINE void FN(gm_tile)(const int pr, const int kv, const int masked, int last, int64_t q0, int64_t q1,
                           T *const *lrow, int64_t ls, T *const *rrow, int64_t j, T *c, int64_t ldc,
                           T alpha, T beta, int mode) {
    V acc[GM_PR_KV1][GM_KV];
    const T *lp[GM_PR_KV1];
    FM_UNROLL for (int i = 0; i < pr; i++) {
        lp[i] = lrow[i] + q0 * ls;
        FM_UNROLL for (int v = 0; v < kv; v++) acc[i][v] = V_ZERO();
    }
#define GM_STEP(Q_)                                                                                            \
    {                                                                                                          \
        const T *r = rrow[Q_] + j;                                                                             \
        V rv[GM_KV];                                                                                           \
        FM_UNROLL for (int v = 0; v < kv; v++) rv[v] = (masked && v == kv - 1) ? V_LOADM(r + v * VN, last)     \
                                                                                 : V_LOAD(r + v * VN);         \
        FM_UNROLL for (int i = 0; i < pr; i++) {                                                               \
            const V b = V_SET1(lp[i][((Q_) - q0) * ls]);                                                       \
            FM_UNROLL for (int v = 0; v < kv; v++) acc[i][v] = V_FMA(b, rv[v], acc[i][v]);                     \
        }                                                                                                      \
    }
    int64_t q = q0;
#if GM_QUNROLL > 1
    for (; q + 2 <= q1; q += 2) {
        GM_STEP(q)
        GM_STEP(q + 1)
    }
#endif
    for (; q < q1; q++) GM_STEP(q)
#undef GM_STEP
    const V va = V_SET1(alpha);
    const V vb = V_SET1(beta);
    FM_UNROLL for (int i = 0; i < pr; i++) {
        T *ci = c + i * ldc;
        FM_UNROLL for (int v = 0; v < kv; v++) {
            const int m = masked && v == kv - 1;
            V out;
            if (mode == 0)
                out = V_MUL(acc[i][v], va);
            else if (mode == 1)
                out = V_FMA(acc[i][v], va, V_MUL(m ? V_LOADM(ci + v * VN, last) : V_LOAD(ci + v * VN), vb));
            else
                out = V_FMA(acc[i][v], va, m ? V_LOADM(ci + v * VN, last) : V_LOAD(ci + v * VN));
            if (m)
                V_STOREM(ci + v * VN, out, last);
            else
                V_STORE(ci + v * VN, out);
        }
    }
}

/* The tiles the dispatch instantiates: kv vectors by up to GM_PR_KV<kv> rows (the most accumulators the
 * registers hold for that width).  The callers never ask for more rows than that. */
#define GM_ARGS last, q0, q1, lrow, ls, rrow, j, c, ldc, alpha, beta, mode
#define GM_T(PR, KV) FN(gm_tile)(PR, KV, masked, GM_ARGS); return;
#define GM_UPTO4(KV) case 1: GM_T(1, KV) case 2: GM_T(2, KV) case 3: GM_T(3, KV) default: GM_T(4, KV)
#define GM_UPTO6(KV) case 1: GM_T(1, KV) case 2: GM_T(2, KV) case 3: GM_T(3, KV) case 4: GM_T(4, KV) \
                     case 5: GM_T(5, KV) default: GM_T(6, KV)
#define GM_UPTO8(KV) case 1: GM_T(1, KV) case 2: GM_T(2, KV) case 3: GM_T(3, KV) case 4: GM_T(4, KV) \
                     case 5: GM_T(5, KV) case 6: GM_T(6, KV) case 7: GM_T(7, KV) default: GM_T(8, KV)
#define GM_UPTO12(KV) case 1: GM_T(1, KV) case 2: GM_T(2, KV) case 3: GM_T(3, KV) case 4: GM_T(4, KV) \
                      case 5: GM_T(5, KV) case 6: GM_T(6, KV) case 7: GM_T(7, KV) case 8: GM_T(8, KV) \
                      case 9: GM_T(9, KV) case 10: GM_T(10, KV) case 11: GM_T(11, KV) default: GM_T(12, KV)
#define GM_CAT3(a, b) a##b
#define GM_UPTO(N, KV) GM_CAT3(GM_UPTO, N)(KV)

/* one tile of pr rows (lrow and c at its first row and column) by kv vectors from column j of R, the
 * last of them `last` lanes wide when masked (pr <= GM_PR_KV<kv>, kv <= GM_KV) */
FM_INLINE void FN(gm_dispatch_m)(const int masked, int pr, int kv, int last, int64_t q0, int64_t q1,
                                 T *const *lrow, int64_t ls, T *const *rrow, int64_t j, T *c, int64_t ldc, T alpha,
                                 T beta, int mode) {
    switch (kv) {
    case 1:
        switch (pr) { GM_UPTO(GM_PR_KV1, 1) }
#if GM_KV >= 2
    case 2:
        switch (pr) { GM_UPTO(GM_PR_KV2, 2) }
#endif
#if GM_KV >= 3
    case 3:
        switch (pr) { GM_UPTO(GM_PR_KV3, 3) }
#endif
#if GM_KV >= 4
    default:
        switch (pr) { GM_UPTO(GM_PR_KV4, 4) }
#endif
    }
}

static void FN(gm_dispatch)(int masked, int pr, int kv, int last, int64_t q0, int64_t q1, T *const *lrow,
                            int64_t ls, T *const *rrow, int64_t j, T *c, int64_t ldc, T alpha, T beta, int mode) {
    if (masked)
        FN(gm_dispatch_m)(1, pr, kv, last, q0, q1, lrow, ls, rrow, j, c, ldc, alpha, beta, mode);
    else
        FN(gm_dispatch_m)(0, pr, kv, last, q0, q1, lrow, ls, rrow, j, c, ldc, alpha, beta, mode);
}

/* rows of a tile kv vectors wide */
FM_INLINE int FN(gm_rows_for)(int kv) {
    return kv == 1 ? GM_PR_KV1 : kv == 2 ? GM_PR_KV2 : kv == 3 ? GM_PR_KV3 : GM_PR_KV4;
}
#undef GM_UPTO
#undef GM_CAT3
#undef GM_UPTO4
#undef GM_UPTO6
#undef GM_UPTO8
#undef GM_UPTO12
#undef GM_T
#undef GM_ARGS

static void FN(fm_gemm)(int64_t P, int64_t K, int64_t Q, T *const *lrow, int64_t ls, T *const *rrow,
                        int64_t roff, T *C, int64_t ldc, T alpha, T beta) {
    if (P <= 0 || K <= 0) return;
    const int64_t nv = (K + VN - 1) / VN;          /* vectors of a row of C */
    const int64_t npan = (nv + GM_KV - 1) / GM_KV; /* column panels */
    const int tail = (int)(K - (nv - 1) * VN);     /* lanes of the last vector */
    int64_t q0 = 0;
    do {
        const int64_t q1 = Q - q0 > GM_KC ? q0 + GM_KC : Q;
        const int mode = q0 > 0 ? 2 : (beta == 0 ? 0 : 1);
        for (int64_t pn = 0; pn < npan; pn++) {
            const int64_t v0 = pn * nv / npan, v1 = (pn + 1) * nv / npan;
            const int kv = (int)(v1 - v0), masked = v1 == nv && tail < VN;
            const int64_t rmax = FN(gm_rows_for)(kv), ntil = (P + rmax - 1) / rmax; /* row tiles */
            for (int64_t t = 0; t < ntil; t++) {
                const int64_t i0 = t * P / ntil, i1 = (t + 1) * P / ntil;
                FN(gm_dispatch)(masked, (int)(i1 - i0), kv, tail, q0, q1, lrow + i0, ls, rrow, roff + v0 * VN,
                                C + i0 * ldc + v0 * VN, ldc, alpha, beta, mode);
            }
        }
        q0 = q1;
    } while (q0 < Q);
}

/* ================================================================================================
 * fm_nt: C[i][o] = sum_k A[i][k] W[o][k]: dot products along k (both operands row-major), for
 * inference on W as stored (no transposed copy to make).  Register tile NT_MR rows x NT_NR outputs;
 * each output ends with one horizontal sum.  Each C[i][o] depends on row i and W only.
 * ================================================================================================ */
FM_INLINE void FN(nt_tile)(const int mr, const int nr, const int check, int64_t K, const T *const *a,
                           const T *const *w, T *c, int64_t ldc, VC_T *chk) {
    V acc[NT_MR][NT_NR];
    VC_T bad = VC_ZERO();
    FM_UNROLL for (int r = 0; r < mr; r++) FM_UNROLL for (int j = 0; j < nr; j++) acc[r][j] = V_ZERO();
    int64_t k = 0;
    for (; k + VN <= K; k += VN) {
        V wv[NT_NR];
        FM_UNROLL for (int j = 0; j < nr; j++) wv[j] = V_LOAD(w[j] + k);
        if (check) FM_UNROLL for (int j = 0; j < nr; j++) VC_ACC(bad, wv[j]);
        FM_UNROLL for (int r = 0; r < mr; r++) {
            const V av = V_LOAD(a[r] + k);
            FM_UNROLL for (int j = 0; j < nr; j++) acc[r][j] = V_FMA(av, wv[j], acc[r][j]);
        }
    }
    if (k < K) {
        const int rem = (int)(K - k);
        V wv[NT_NR];
        FM_UNROLL for (int j = 0; j < nr; j++) wv[j] = V_LOADM(w[j] + k, rem);
        if (check) FM_UNROLL for (int j = 0; j < nr; j++) VC_ACC(bad, wv[j]);
        FM_UNROLL for (int r = 0; r < mr; r++) {
            const V av = V_LOADM(a[r] + k, rem);
            FM_UNROLL for (int j = 0; j < nr; j++) acc[r][j] = V_FMA(av, wv[j], acc[r][j]);
        }
    }
    if (check) *chk = VC_OR(*chk, bad);
    FM_UNROLL for (int r = 0; r < mr; r++) FM_UNROLL for (int j = 0; j < nr; j++) c[r * ldc + j] = V_RSUM(acc[r][j]);
}

#define NT_N(n) (NT_NR >= (n) ? (n) : NT_NR)
#define NT_CASES(MR, CK)                                                                                       \
    switch (nr) {                                                                                              \
    case 1: FN(nt_tile)(MR, 1, CK, K, a, w, c, ldc, chk); return;                                              \
    case 2: FN(nt_tile)(MR, NT_N(2), CK, K, a, w, c, ldc, chk); return;                                        \
    case 3: FN(nt_tile)(MR, NT_N(3), CK, K, a, w, c, ldc, chk); return;                                        \
    case 4: FN(nt_tile)(MR, NT_N(4), CK, K, a, w, c, ldc, chk); return;                                        \
    default: FN(nt_tile)(MR, NT_N(5), CK, K, a, w, c, ldc, chk); return;                                       \
    }
static void FN(nt_full_rows)(int nr, int64_t K, const T *const *a, const T *const *w, T *c, int64_t ldc,
                             VC_T *chk) {
    if (chk) {
        NT_CASES(NT_MR, 1)
    } else {
        NT_CASES(NT_MR, 0)
    }
}
/* the last mr < NT_MR rows in one tile (each output's sum is the same whatever the tile's rows) */
static void FN(nt_part_rows)(int mr, int nr, int64_t K, const T *const *a, const T *const *w, T *c, int64_t ldc,
                             VC_T *chk) {
    if (chk) {
        switch (mr) {
        case 1: NT_CASES(1, 1)
        case 2: NT_CASES(2, 1)
        default: NT_CASES(3, 1)
        }
    } else {
        switch (mr) {
        case 1: NT_CASES(1, 0)
        case 2: NT_CASES(2, 0)
        default: NT_CASES(3, 0)
        }
    }
}
#undef NT_CASES
#undef NT_N

/* C (M, N; ldc) = A (M, K; lda) @ W (N, K; ldw).T.  With bad != NULL, also *bad = 1 when W holds a NaN or an
 * infinity (an integer test of the exponent bits, fused into the first row tile, which reads every W[o][k]
 * once), else *bad is left as it is; the products are the same either way. */
static void FN(nt_core)(int64_t M, int64_t N, int64_t K, const T *A, int64_t lda, T *const *arows, const T *W,
                        int64_t ldw, T *C, int64_t ldc, int *bad) {
    const T *a[NT_MR];
    const T *w[NT_NR];
    VC_T chk = VC_ZERO();
    int64_t slab = NT_SLAB_BYTES / ((K > 0 ? K : 1) * (int64_t)sizeof(T));
    slab = slab < NT_NR ? NT_NR : (slab / NT_NR) * NT_NR;
    for (int64_t j0 = 0; j0 < N; j0 += slab) {
        const int64_t j1 = j0 + slab < N ? j0 + slab : N;
        int64_t i = 0;
        for (; i + NT_MR <= M; i += NT_MR) {
            for (int r = 0; r < NT_MR; r++) a[r] = arows ? arows[i + r] : A + (i + r) * lda;
            for (int64_t j = j0; j < j1; j += NT_NR) {
                const int nr = (int)(j1 - j < NT_NR ? j1 - j : NT_NR);
                for (int q = 0; q < nr; q++) w[q] = W + (j + q) * ldw;
                FN(nt_full_rows)(nr, K, a, w, C + i * ldc + j, ldc, bad && i == 0 ? &chk : (VC_T *)0);
            }
        }
        if (i < M) {
            const int mr = (int)(M - i);
            for (int r = 0; r < mr; r++) a[r] = arows ? arows[i + r] : A + (i + r) * lda;
            for (int64_t j = j0; j < j1; j += NT_NR) {
                const int nr = (int)(j1 - j < NT_NR ? j1 - j : NT_NR);
                for (int q = 0; q < nr; q++) w[q] = W + (j + q) * ldw;
                FN(nt_part_rows)(mr, nr, K, a, w, C + i * ldc + j, ldc, bad && i == 0 ? &chk : (VC_T *)0);
            }
        }
    }
    if (bad && VC_ANY(chk)) *bad = 1;
}
static void FN(fm_nt)(int64_t M, int64_t N, int64_t K, const T *A, int64_t lda, const T *W, int64_t ldw, T *C,
                      int64_t ldc, int *bad) {
    FN(nt_core)(M, N, K, A, lda, (T *const *)0, W, ldw, C, ldc, bad);
}
/* fm_nt with row i of A at arows[i] (training's forward products on W as stored: no transposed copy) */
static void FN(fm_ntp)(int64_t M, int64_t N, int64_t K, T *const *arows, const T *W, int64_t ldw, T *C,
                       int64_t ldc) {
    FN(nt_core)(M, N, K, (const T *)0, 0, arows, W, ldw, C, ldc, (int *)0);
}

/* ================================================================================================
 * fm_transpose: D[j][i] = S[i][j] for i < rows, j < cols (S row stride lds, D row stride ldd), in
 * VN x VN blocks transposed in registers (V_TRANSPOSE); partial blocks load and store masked.
 * ================================================================================================ */
static void FN(fm_transpose)(int64_t rows, int64_t cols, const T *S, int64_t lds, T *D, int64_t ldd) {
    V blk[VN];
    for (int64_t i0 = 0; i0 < rows; i0 += VN) {
        const int ni = (int)(rows - i0 < VN ? rows - i0 : VN);
        for (int64_t j0 = 0; j0 < cols; j0 += VN) {
            const int nj = (int)(cols - j0 < VN ? cols - j0 : VN);
            if (ni == VN && nj == VN) {
                FM_UNROLL for (int r = 0; r < VN; r++) blk[r] = V_LOAD(S + (i0 + r) * lds + j0);
                V_TRANSPOSE(blk);
                FM_UNROLL for (int r = 0; r < VN; r++) V_STORE(D + (j0 + r) * ldd + i0, blk[r]);
            } else {
                for (int r = 0; r < VN; r++) blk[r] = r < ni ? V_LOADM(S + (i0 + r) * lds + j0, nj) : V_ZERO();
                V_TRANSPOSE(blk);
                for (int r = 0; r < nj; r++) V_STOREM(D + (j0 + r) * ldd + i0, blk[r], ni);
            }
        }
    }
}

/* ================================================================================================
 * The sparse first layer of inference: rows of X given as lists of (column, value) pairs, columns ascending
 * (fm_sp_compress_<t> makes them), at idx / val + r * stride, cnt[r] of them.
 *
 *   fm_sp_rows:    Z[r][0:n] = sum_p val_r[p] Wt[idx_r[p]][0:n]               (r < nr)
 *
 * It goes over Z in column tiles of up to SP_KV vectors and takes the rows in turn inside a tile, so that
 * the tile's slice of Wt stays in L1/L2 while every row visits it, and sums a row's list in SP_SETS
 * interleaved accumulator sets, added at the end: each sum's order depends on the row's list alone.
 * Skipping the zeros of X changes no value where W is finite: a zero's products are zeros.
 * ================================================================================================ */
FM_INLINE void FN(sp_rows_tile)(const int kv, const int masked, const int last, const int32_t *idx, const T *val,
                                int64_t nnz, const T *wt, int64_t ldt, int64_t j, T *z) {
    V a[SP_SETS][SP_KV];
    FM_UNROLL for (int s = 0; s < SP_SETS; s++) FM_UNROLL for (int v = 0; v < kv; v++) a[s][v] = V_ZERO();
    int64_t p = 0;
    for (; p + SP_SETS <= nnz; p += SP_SETS) {
        FM_UNROLL for (int s = 0; s < SP_SETS; s++) {
            const T *r = wt + (int64_t)idx[p + s] * ldt + j;
            const V x = V_SET1(val[p + s]);
            FM_UNROLL for (int v = 0; v < kv; v++) {
                const V w = (masked && v == kv - 1) ? V_LOADM(r + v * VN, last) : V_LOAD(r + v * VN);
                a[s][v] = V_FMA(x, w, a[s][v]);
            }
        }
    }
    for (; p < nnz; p++) {
        const T *r = wt + (int64_t)idx[p] * ldt + j;
        const V x = V_SET1(val[p]);
        FM_UNROLL for (int v = 0; v < kv; v++) {
            const V w = (masked && v == kv - 1) ? V_LOADM(r + v * VN, last) : V_LOAD(r + v * VN);
            a[0][v] = V_FMA(x, w, a[0][v]);
        }
    }
    const V one = V_SET1((T)1);
    FM_UNROLL for (int v = 0; v < kv; v++) {
        V t = a[0][v];
        FM_UNROLL for (int s = 1; s < SP_SETS; s++) t = V_FMA(one, a[s][v], t); /* t + a[s], rounded once */
        if (masked && v == kv - 1)
            V_STOREM(z + j + v * VN, t, last);
        else
            V_STORE(z + j + v * VN, t);
    }
}

#define SP_T(F, KV, ...) case KV: if (masked) FN(F)(KV, 1, __VA_ARGS__); else FN(F)(KV, 0, __VA_ARGS__); break;
#if SP_KV == 2
#define SP_CASES(F, ...) SP_T(F, 1, __VA_ARGS__) default: SP_T(F, 2, __VA_ARGS__)
#else
#error "SP_KV must be 2"
#endif

static void FN(fm_sp_rows)(int64_t nr, const int32_t *idx, const T *val, int64_t stride, const int64_t *cnt,
                           const T *wt, int64_t ldt, int64_t n, T *z, int64_t ldz) {
    const int64_t nv = (n + VN - 1) / VN;
    const int last = (int)(n - (nv - 1) * VN);
    for (int64_t v0 = 0; v0 < nv; v0 += SP_KV) {
        const int kv = (int)(nv - v0 < SP_KV ? nv - v0 : SP_KV);
        const int masked = (v0 + kv == nv) && last < VN;
        for (int64_t r = 0; r < nr; r++) {
            const int32_t *ir = idx + r * stride;
            const T *vr = val + r * stride;
            T *zr = z + r * ldz;
            switch (kv) { SP_CASES(sp_rows_tile, last, ir, vr, cnt[r], wt, ldt, v0 * VN, zr) }
        }
    }
}

#undef SP_CASES
#undef SP_T

#undef FN
#undef FM_CAT
#undef FM_CAT_
#undef T
#undef SUF
#undef V
#undef VN
#undef GM_KC
#undef V_ZERO
#undef V_LOAD
#undef V_LOADM
#undef V_STORE
#undef V_STOREM
#undef V_SET1
#undef V_FMA
#undef V_MUL
#undef V_RSUM
#undef V_TRANSPOSE
#undef VC_T
#undef VC_ZERO
#undef VC_ACC
#undef VC_OR
#undef VC_ANY
