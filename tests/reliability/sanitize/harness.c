/* Sanitizer harness for awqkit's native CPU kernels (src/awqkit/kernels/csrc/awqkit_cpu.c).
 *
 * Built by tests/reliability/test_native_sanitizers.py together with the kernel source, with
 * -fsanitize=address,undefined and native.FLAGS (-O3 -mavx2 -mfma -mf16c -fopenmp), and run with
 * OMP_NUM_THREADS=2. Every buffer is its own malloc of exactly the size the kernel's contract gives, so
 * AddressSanitizer reports any read or write one element past it.
 *
 *   harness check     every exported kernel on valid edge-case shapes, each result compared with a plain C
 *                     reference (reference.h) in double precision (|y - ref| <= 1e-4 * magnitude + 1e-6);
 *                     prints one "ok <case>" line per case and "checked <n> cases"; exit 1 on a mismatch.
 *   harness overflow  negative control: awqkit_rmsnorm on an x buffer one float short of R * n, so the
 *                     kernel reads exactly one element past it: AddressSanitizer must report it.
 *   harness ub        negative control for UBSan: a signed integer overflow.
 *   Exit 77: this CPU lacks AVX2/FMA/F16C (the test skips).
 *
 * The kernels' declarations and structs come from the kernel's own header (awqkit_cpu.h).
 */
#include "reference.h"

static const double REL = 1e-4, ABS = 1e-6;
static int n_cases = 0, n_failed = 0;
static int THREADS = 2;

/* ------------------------------------------------------------------ comparison */
static void compare(const char *name, const float *y, const double *ref, const double *mag, int64_t n) {
    int64_t bad = -1;
    for (int64_t i = 0; i < n; ++i) {
        const double tol = REL * mag[i] + ABS;
        if (!(fabs((double)y[i] - ref[i]) <= tol)) { bad = i; break; }
    }
    ++n_cases;
    if (bad >= 0) {
        ++n_failed;
        printf("FAIL %s: element %lld is %.9g, reference %.9g (magnitude %.3g)\n", name, (long long)bad,
               (double)y[bad], ref[bad], mag[bad]);
    } else {
        printf("ok %s\n", name);
    }
}

/* magnitude = max |ref| over the whole output (for results whose terms are not tracked one by one) */
static void compare_max(const char *name, const float *y, const double *ref, int64_t n) {
    double m = 0.0;
    for (int64_t i = 0; i < n; ++i) m = fmax(m, fabs(ref[i]));
    double *mag = dalloc(n);
    for (int64_t i = 0; i < n; ++i) mag[i] = m;
    compare(name, y, ref, mag, n);
    free(mag);
}

static void case_int4(int64_t K, int64_t N, int64_t g, int64_t M, int with_bias, int accumulate, int threads) {
    Lin L = make_lin(K, N, g, with_bias);
    float *x = frand(M * K, -2.0f, 2.0f), *y = frand(M * N, -1.0f, 1.0f);
    double *xd = dalloc(M * K), *ref = dalloc(M * N), *mag = dalloc(M * N);
    for (int64_t i = 0; i < M * K; ++i) xd[i] = x[i];
    for (int64_t i = 0; i < M * N; ++i) ref[i] = y[i];
    awqkit_int4_gemv(L.wq, L.sp, L.zq, L.bias, K, N, g, x, y, M, threads, accumulate);
    ref_lin(&L, xd, ref, mag, M, accumulate);
    char name[160];
    snprintf(name, sizeof name, "int4_gemv K=%lld N=%lld g=%lld M=%lld bias=%d accumulate=%d threads=%d",
             (long long)K, (long long)N, (long long)g, (long long)M, with_bias, accumulate, threads);
    compare(name, y, ref, mag, M * N);
    free(x); free(y); free(xd); free(ref); free(mag); free_lin(&L);
}

/* ------------------------------------------------------------------ fp16 GEMV, norms, SiLU */
static void case_f16(int64_t M, int64_t K, int64_t N, int with_bias) {
    float *x = frand(M * K, -1.0f, 1.0f), *y = falloc(M * N), *bias = with_bias ? frand(N, -1.0f, 1.0f) : NULL;
    uint16_t *w = xalloc((size_t)(N * K) * sizeof(uint16_t));
    for (int64_t i = 0; i < N * K; ++i) w[i] = to_half(uniform(-1.0f, 1.0f));
    awqkit_f16_gemv(x, w, bias, y, M, K, N, THREADS);
    double *ref = dalloc(M * N), *mag = dalloc(M * N);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
            double acc = bias ? bias[n] : 0.0, a = bias ? fabs(bias[n]) : 0.0;
            for (int64_t k = 0; k < K; ++k) {
                acc += (double)x[m * K + k] * from_half(w[n * K + k]);
                a += fabs((double)x[m * K + k] * from_half(w[n * K + k]));
            }
            ref[m * N + n] = acc;
            mag[m * N + n] = a;
        }
    char name[96];
    snprintf(name, sizeof name, "f16_gemv M=%lld K=%lld N=%lld bias=%d", (long long)M, (long long)K, (long long)N,
             with_bias);
    compare(name, y, ref, mag, M * N);
    free(x); free(y); free(bias); free(w); free(ref); free(mag);
}

static void case_rmsnorm(int64_t R, int64_t n, float offset) {
    float *x = frand(R * n, -3.0f, 3.0f), *w = frand(n, 0.5f, 1.5f), *y = falloc(R * n);
    double *xd = dalloc(R * n), *ref = dalloc(R * n);
    for (int64_t i = 0; i < R * n; ++i) xd[i] = x[i];
    awqkit_rmsnorm(x, w, y, R, n, 1e-5f, offset);
    ref_rmsnorm(xd, w, ref, R, n, 1e-5, offset);
    char name[64];
    snprintf(name, sizeof name, "rmsnorm R=%lld n=%lld offset=%g", (long long)R, (long long)n, (double)offset);
    compare_max(name, y, ref, R * n);
    free(x); free(w); free(y); free(xd); free(ref);
}

static void case_silu_mul(int64_t R, int64_t n) {
    float *gu = frand(R * 2 * n, -6.0f, 6.0f), *y = falloc(R * n);
    double *ref = dalloc(R * n);
    awqkit_silu_mul(gu, y, R, n);
    for (int64_t r = 0; r < R; ++r)
        for (int64_t i = 0; i < n; ++i) ref[r * n + i] = silu(gu[r * 2 * n + i]) * gu[r * 2 * n + n + i];
    char name[48];
    snprintf(name, sizeof name, "silu_mul R=%lld n=%lld", (long long)R, (long long)n);
    compare_max(name, y, ref, R * n);
    free(gu); free(y); free(ref);
}

static void case_attention(Att a, int64_t pos, int norms) {
    const int64_t B = a.B, H = a.H, KV = a.KV, D = a.D, W = (H + 2 * KV) * D, C = B * KV * a.maxlen * D;
    float *qkv = frand(B * W, -1.5f, 1.5f), *kc = frand(C, -1.0f, 1.0f), *vc = frand(C, -1.0f, 1.0f);
    float *qn = norms ? frand(D, 0.5f, 1.5f) : NULL, *kn = norms ? frand(D, 0.5f, 1.5f) : NULL, *cos, *sin;
    rope_tables(B, D, pos, &cos, &sin);
    float *out = falloc(B * H * D), *scratch = falloc(B * H * a.maxlen);
    double *q2 = dalloc(B * W), *kc2 = dalloc(C), *vc2 = dalloc(C), *ref = dalloc(B * H * D);
    for (int64_t i = 0; i < B * W; ++i) q2[i] = qkv[i];
    for (int64_t i = 0; i < C; ++i) { kc2[i] = kc[i]; vc2[i] = vc[i]; }
    awqkit_decode_attention(qkv, W, kc, vc, cos, sin, qn, kn, (float)a.norm_eps, out, scratch, B, H, KV, D, pos,
                            a.maxlen, a.window, (float)a.scale, THREADS);
    ref_attention(&a, q2, kc2, vc2, cos, sin, qn, kn, pos, ref);
    char name[160];
    snprintf(name, sizeof name, "decode_attention B=%lld H=%lld KV=%lld D=%lld maxlen=%lld pos=%lld window=%lld "
             "norms=%d", (long long)B, (long long)H, (long long)KV, (long long)D, (long long)a.maxlen,
             (long long)pos, (long long)a.window, norms);
    compare_max(name, out, ref, B * H * D);
    char cname[176];
    snprintf(cname, sizeof cname, "%s (caches)", name);
    double *both = dalloc(2 * C);
    float *got = falloc(2 * C);
    for (int64_t i = 0; i < C; ++i) { both[i] = kc2[i]; both[C + i] = vc2[i]; got[i] = kc[i]; got[C + i] = vc[i]; }
    compare_max(cname, got, both, 2 * C);
    free(both); free(got);
    free(qkv); free(kc); free(vc); free(qn); free(kn); free(cos); free(sin); free(out); free(scratch);
    free(q2); free(kc2); free(vc2); free(ref);
}

/* ------------------------------------------------------------------ the whole decode step */
typedef struct {
    Lin qkv, o, gu, down;
    float *in_norm, *post_norm, *q_norm, *k_norm, *kc, *vc;
    double *kcd, *vcd;
    Att a;
} RefLayer;

static void case_decode_layers(int64_t B, int64_t pos, int qk_norms) {
    enum { NL = 2 };
    const int64_t hidden = 64, H = 4, KV = 2, D = 16, inter = 64, maxlen = 8, g = 32;
    const int64_t C = B * KV * maxlen * D, W = (H + 2 * KV) * D;
    RefLayer R[NL];
    awqkit_layer S[NL];
    for (int i = 0; i < NL; ++i) {
        RefLayer *L = &R[i];
        L->qkv = make_lin(hidden, W, g, 1);
        L->o = make_lin(H * D, hidden, g, 0);
        L->gu = make_lin(hidden, 2 * inter, g, 1);
        L->down = make_lin(inter, hidden, g, 0);
        L->in_norm = frand(hidden, 0.5f, 1.5f);
        L->post_norm = frand(hidden, 0.5f, 1.5f);
        L->q_norm = qk_norms ? frand(D, 0.5f, 1.5f) : NULL;
        L->k_norm = qk_norms ? frand(D, 0.5f, 1.5f) : NULL;
        L->kc = frand(C, -1.0f, 1.0f);
        L->vc = frand(C, -1.0f, 1.0f);
        L->kcd = dalloc(C);
        L->vcd = dalloc(C);
        for (int64_t j = 0; j < C; ++j) { L->kcd[j] = L->kc[j]; L->vcd[j] = L->vc[j]; }
        L->a = (Att){B, H, KV, D, maxlen, i == 1 ? 3 : 0, 0.25, 1e-6};  /* layer 1: a sliding window of 3 */
        S[i] = (awqkit_layer){L->qkv.c, L->o.c, L->gu.c, L->down.c, L->in_norm, L->post_norm, L->q_norm,
                              L->k_norm, L->kc, L->vc, 1e-5f, 1e-6f, 0.25f, H, KV, D, maxlen, L->a.window};
    }
    float *h = frand(B * hidden, -1.0f, 1.0f), *cos, *sin;
    rope_tables(B, D, pos, &cos, &sin);
    const int64_t width = hidden + W + H * D + 2 * inter + inter + H * maxlen;
    float *scratch = falloc(B * width);
    double *hd = dalloc(B * hidden), *x = dalloc(B * hidden), *qkv = dalloc(B * W), *att = dalloc(B * H * D);
    double *gu = dalloc(B * 2 * inter), *m = dalloc(B * inter);
    for (int64_t i = 0; i < B * hidden; ++i) hd[i] = h[i];
    awqkit_decode_layers(S, NL, h, B, hidden, pos, cos, sin, scratch, THREADS);
    for (int i = 0; i < NL; ++i) {
        RefLayer *L = &R[i];
        ref_rmsnorm(hd, L->in_norm, x, B, hidden, 1e-5, 0.0);
        ref_lin(&L->qkv, x, qkv, NULL, B, 0);
        ref_attention(&L->a, qkv, L->kcd, L->vcd, cos, sin, L->q_norm, L->k_norm, pos, att);
        ref_lin(&L->o, att, hd, NULL, B, 1);
        ref_rmsnorm(hd, L->post_norm, x, B, hidden, 1e-5, 0.0);
        ref_lin(&L->gu, x, gu, NULL, B, 0);
        for (int64_t r = 0; r < B; ++r)
            for (int64_t j = 0; j < inter; ++j)
                m[r * inter + j] = silu(gu[r * 2 * inter + j]) * gu[r * 2 * inter + inter + j];
        ref_lin(&L->down, m, hd, NULL, B, 1);
    }
    char name[96];
    snprintf(name, sizeof name, "decode_layers 2 layers B=%lld pos=%lld maxlen=%lld qk_norms=%d", (long long)B,
             (long long)pos, (long long)maxlen, qk_norms);
    compare_max(name, h, hd, B * hidden);
    for (int i = 0; i < NL; ++i) {
        RefLayer *L = &R[i];
        free_lin(&L->qkv); free_lin(&L->o); free_lin(&L->gu); free_lin(&L->down);
        free(L->in_norm); free(L->post_norm); free(L->q_norm); free(L->k_norm); free(L->kc); free(L->vc);
        free(L->kcd); free(L->vcd);
    }
    free(h); free(cos); free(sin); free(scratch); free(hd); free(x); free(qkv); free(att); free(gu); free(m);
}

/* ------------------------------------------------------------------ modes */
static int run_checks(void) {
    /* int4 GEMV: one group (K = g), several groups, g = K > 64 (chunked in the multi-row loop), per-row
       groups of 128; N = 64 and 128; M = 1, 2 (one-row loop), 3, 5, 16 (multi-row loop), 17 (one-row
       loop again); with and without bias; overwrite and accumulate; 2 threads, 1, and 0 (clamped to 1). */
    const int64_t shapes[][3] = {{32, 64, 32}, {96, 64, 32}, {128, 128, 128}, {256, 128, 64}, {64, 128, 64}};
    const int64_t rows[] = {1, 2, 3, 5, 16, 17};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; ++s)
        for (size_t r = 0; r < sizeof rows / sizeof rows[0]; ++r)
            case_int4(shapes[s][0], shapes[s][1], shapes[s][2], rows[r], (int)((s + r) % 2), (int)(r % 2), THREADS);
    case_int4(64, 64, 32, 1, 1, 0, 1);
    case_int4(64, 64, 32, 7, 0, 1, 0);
    case_int4(64, 192, 64, 4, 1, 0, 8);  /* more threads than 64-column blocks */

    /* fp16 GEMV: N % 4 tails (the row-by-row loop), K = 8 (one vector), M up to 16 */
    case_f16(1, 8, 4, 1);
    case_f16(3, 24, 67, 0);
    case_f16(16, 64, 130, 1);
    case_f16(2, 16, 3, 1);

    case_rmsnorm(1, 1, 0.0f);
    case_rmsnorm(3, 576, 0.0f);
    case_rmsnorm(7, 40, 1.0f);
    case_silu_mul(1, 1);
    case_silu_mul(5, 96);

    /* attention: pos 0 and pos = maxlen - 1; GQA and MHA; D = 8 (one vector) .. 64; sliding windows shorter
       and longer than the history; q/k norms; one case large enough for the threaded loop (B H L D >= 65536) */
    case_attention((Att){1, 4, 2, 8, 6, 0, 0.35, 1e-6}, 0, 0);
    case_attention((Att){1, 4, 2, 8, 6, 0, 0.35, 1e-6}, 5, 1);
    case_attention((Att){3, 4, 4, 16, 9, 3, 0.25, 1e-6}, 8, 0);
    case_attention((Att){3, 4, 4, 16, 9, 3, 0.25, 1e-6}, 1, 1);
    case_attention((Att){2, 6, 3, 32, 12, 20, 0.18, 1e-5}, 11, 1);
    case_attention((Att){2, 8, 2, 64, 64, 0, 0.125, 1e-6}, 63, 0);

    /* the whole decode step: 2 layers (the second with a sliding window), 1, 3 and 16 rows, pos 0 and
       maxlen - 1, with and without q/k norms */
    case_decode_layers(1, 0, 0);
    case_decode_layers(3, 7, 1);
    case_decode_layers(16, 5, 0);
    case_decode_layers(1, 7, 1);

    printf("checked %d cases, %d failed\n", n_cases, n_failed);
    return n_failed ? 1 : 0;
}

static int run_overflow(void) {
    const int64_t R = 2, n = 16;
    float *x = falloc(R * n - 1), *w = frand(n, 0.5f, 1.5f), *y = falloc(R * n);  /* x: one float short */
    for (int64_t i = 0; i < R * n - 1; ++i) x[i] = 1.0f;
    awqkit_rmsnorm(x, w, y, R, n, 1e-5f, 0.0f);  /* reads x[R * n - 1]: one element past the buffer */
    printf("overflow not detected: %g\n", (double)y[R * n - 1]);
    free(x); free(w); free(y);
    return 0;
}

static int run_ub(int argc) {
    volatile int big = INT_MAX;
    const int sum = big + argc;  /* signed overflow: UBSan must report it */
    printf("ub not detected: %d\n", sum);
    return 0;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "check";
    if (!awqkit_cpu_supported()) {
        printf("skip: this CPU lacks AVX2, FMA or F16C\n");
        return 77;
    }
    printf("awqkit native ABI %d, mode %s\n", awqkit_abi_version(), mode);
    if (!strcmp(mode, "check")) return run_checks();
    if (!strcmp(mode, "overflow")) return run_overflow();
    if (!strcmp(mode, "ub")) return run_ub(argc);
    fprintf(stderr, "unknown mode %s (check, overflow, ub)\n", mode);
    return 2;
}
