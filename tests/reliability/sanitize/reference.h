/* Plain C references and test data for harness.c (see there): random numbers, exact-size buffers, fp16
 * helpers, an int4 layer in natural form packed into the kernel's layout (wq / sp / zq, as
 * src/awqkit/kernels/csrc/awqkit_cpu.c documents it) and double-precision reference loops of every kernel.
 * Included once, by harness.c (static functions).
 */
#ifndef AWQKIT_SANITIZE_REFERENCE_H
#define AWQKIT_SANITIZE_REFERENCE_H

#include <immintrin.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "awqkit_cpu.h"  /* the kernels' declarations and structs (on the include path the test passes) */

static const int AWQ_ORDER[8] = {0, 2, 4, 6, 1, 3, 5, 7};

/* ------------------------------------------------------------------ buffers and random numbers */
static void *xalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) { fprintf(stderr, "out of memory\n"); exit(2); }
    return p;
}
static float *falloc(int64_t n) { return xalloc((size_t)n * sizeof(float)); }
static double *dalloc(int64_t n) { return xalloc((size_t)n * sizeof(double)); }

static uint64_t rng = 0x9E3779B97F4A7C15ULL;
static uint32_t next_u32(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}
static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)(next_u32() % 1000003) / 1000003.0f; }
static float *frand(int64_t n, float lo, float hi) {
    float *p = falloc(n);
    for (int64_t i = 0; i < n; ++i) p[i] = uniform(lo, hi);
    return p;
}
static uint16_t to_half(float f) { return _cvtss_sh(f, 0); }
static float from_half(uint16_t h) { return _cvtsh_ss(h); }

/* ------------------------------------------------------------------ int4 layers */
typedef struct {
    int64_t K, N, g, G;
    uint8_t *q;    /* [K][N] 0..15 */
    uint8_t *z;    /* [G][N] 0..15 */
    float *s;      /* [G][N] fp16-exact scales */
    float *bias;   /* [N] or NULL */
    uint32_t *wq;  /* [N/64][K][8] */
    uint16_t *sp;  /* [N/64][G][8][8] */
    uint8_t *zq;   /* [N/64][G][8][8] */
    awqkit_linear c;
} Lin;

static Lin make_lin(int64_t K, int64_t N, int64_t g, int with_bias) {
    Lin L = {K, N, g, K / g, NULL, NULL, NULL, NULL, NULL, NULL, NULL, {0}};
    L.q = xalloc((size_t)(K * N));
    L.z = xalloc((size_t)(L.G * N));
    L.s = falloc(L.G * N);
    for (int64_t i = 0; i < K * N; ++i) L.q[i] = (uint8_t)(next_u32() % 16);
    for (int64_t i = 0; i < L.G * N; ++i) {
        L.z[i] = (uint8_t)(next_u32() % 16);
        L.s[i] = from_half(to_half(uniform(0.005f, 0.05f)));
    }
    L.bias = with_bias ? frand(N, -1.0f, 1.0f) : NULL;
    const int64_t NB = N / 64;
    L.wq = xalloc((size_t)(NB * K * 8) * sizeof(uint32_t));
    L.sp = xalloc((size_t)(NB * L.G * 64) * sizeof(uint16_t));
    L.zq = xalloc((size_t)(NB * L.G * 64));
    for (int64_t b = 0; b < NB; ++b)
        for (int64_t j = 0; j < 8; ++j)
            for (int i = 0; i < 8; ++i) {
                const int64_t col = 64 * b + 8 * j + AWQ_ORDER[i];
                for (int64_t k = 0; k < K; ++k) {
                    uint32_t *w = L.wq + (b * K + k) * 8 + j;
                    if (i == 0) *w = 0;
                    *w |= (uint32_t)L.q[k * N + col] << (4 * i);
                }
                for (int64_t gg = 0; gg < L.G; ++gg) {
                    L.sp[(b * L.G + gg) * 64 + 8 * i + j] = to_half(L.s[gg * N + col]);
                    L.zq[(b * L.G + gg) * 64 + 8 * i + j] = L.z[gg * N + col];
                }
            }
    L.c = (awqkit_linear){L.wq, L.sp, L.zq, L.bias, K, N, g};
    return L;
}

static void free_lin(Lin *L) {
    free(L->q); free(L->z); free(L->s); free(L->bias); free(L->wq); free(L->sp); free(L->zq);
}

/* y[m][n] (+)= sum_k x[m][k] (q - z) s + bias, in double; mag: the sum of the terms' magnitudes */
static void ref_lin(const Lin *L, const double *x, double *y, double *mag, int64_t M, int accumulate) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < L->N; ++n) {
            double acc = L->bias ? L->bias[n] : 0.0, a = L->bias ? fabs(L->bias[n]) : 0.0;
            for (int64_t k = 0; k < L->K; ++k) {
                const int64_t gi = (k / L->g) * L->N + n;
                const double w = ((double)L->q[k * L->N + n] - L->z[gi]) * L->s[gi];
                acc += x[m * L->K + k] * w;
                a += fabs(x[m * L->K + k] * w);
            }
            const int64_t o = m * L->N + n;
            if (mag) mag[o] = a + (accumulate ? fabs(y[o]) : 0.0);
            y[o] = accumulate ? y[o] + acc : acc;
        }
}

static void ref_rmsnorm(const double *x, const float *w, double *y, int64_t R, int64_t n, double eps, double off) {
    for (int64_t r = 0; r < R; ++r) {
        double ss = 0.0;
        for (int64_t i = 0; i < n; ++i) ss += x[r * n + i] * x[r * n + i];
        const double inv = 1.0 / sqrt(ss / (double)n + eps);
        for (int64_t i = 0; i < n; ++i) y[r * n + i] = x[r * n + i] * inv * (off + w[i]);
    }
}

static double silu(double g) { return g / (1.0 + exp(-g)); }


/* ------------------------------------------------------------------ attention */
typedef struct {
    int64_t B, H, KV, D, maxlen, window;
    double scale, norm_eps;
} Att;

static void ref_head_prep(double *v, const float *norm, const float *cos, const float *sin, int64_t D, double eps) {
    if (norm) {
        double ss = 0.0;
        for (int64_t i = 0; i < D; ++i) ss += v[i] * v[i];
        const double inv = 1.0 / sqrt(ss / (double)D + eps);
        for (int64_t i = 0; i < D; ++i) v[i] = norm[i] * (v[i] * inv);
    }
    const int64_t h = D / 2;
    for (int64_t i = 0; i < h; ++i) {
        const double a = v[i], b = v[i + h];
        v[i] = a * cos[i] - b * sin[i];
        v[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

/* qkv [B][(H + 2 KV) D] (double copy, modified), caches [B][KV][maxlen][D] (double), out [B][H D] */
static void ref_attention(const Att *a, double *qkv, double *kc, double *vc, const float *cos, const float *sin,
                          const float *qn, const float *kn, int64_t pos, double *out) {
    const int64_t H = a->H, KV = a->KV, D = a->D, W = (H + 2 * KV) * D, ml = a->maxlen;
    for (int64_t b = 0; b < a->B; ++b) {
        double *q = qkv + b * W, *k = q + H * D, *v = k + KV * D;
        for (int64_t h = 0; h < H; ++h) ref_head_prep(q + h * D, qn, cos + b * D, sin + b * D, D, a->norm_eps);
        for (int64_t h = 0; h < KV; ++h) {
            ref_head_prep(k + h * D, kn, cos + b * D, sin + b * D, D, a->norm_eps);
            memcpy(kc + ((b * KV + h) * ml + pos) * D, k + h * D, (size_t)D * sizeof(double));
            memcpy(vc + ((b * KV + h) * ml + pos) * D, v + h * D, (size_t)D * sizeof(double));
        }
        const int64_t start = (a->window > 0 && pos - a->window + 1 > 0) ? pos - a->window + 1 : 0;
        double *p = dalloc(pos + 1);
        for (int64_t h = 0; h < H; ++h) {
            const int64_t kh = h / (H / KV);
            double mx = -INFINITY, den = 0.0;
            for (int64_t j = start; j <= pos; ++j) {
                double s = 0.0;
                for (int64_t d = 0; d < D; ++d) s += q[h * D + d] * kc[((b * KV + kh) * ml + j) * D + d];
                p[j] = s * a->scale;
                mx = fmax(mx, p[j]);
            }
            for (int64_t j = start; j <= pos; ++j) den += (p[j] = exp(p[j] - mx));
            for (int64_t d = 0; d < D; ++d) {
                double o = 0.0;
                for (int64_t j = start; j <= pos; ++j) o += p[j] / den * vc[((b * KV + kh) * ml + j) * D + d];
                out[b * H * D + h * D + d] = o;
            }
        }
        free(p);
    }
}

/* cos/sin [B][D] of position pos + b (transformers' rotate_half tables: both halves share a frequency) */
static void rope_tables(int64_t B, int64_t D, int64_t pos, float **cos_out, float **sin_out) {
    float *c = falloc(B * D), *s = falloc(B * D);
    for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < D; ++i) {
            const double ang = (double)(pos + b) * pow(10000.0, -2.0 * (double)(i % (D / 2)) / (double)D);
            c[b * D + i] = (float)cos(ang);
            s[b * D + i] = (float)sin(ang);
        }
    *cos_out = c;
    *sin_out = s;
}

#endif
