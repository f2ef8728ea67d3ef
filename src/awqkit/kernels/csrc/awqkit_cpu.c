/* awqkit cpu-avx2 kernels: fp32-exact GEMV for few-row inputs (decode) on x86-64 with AVX2 + FMA + F16C.
 *
 * Built at first use by awqkit/kernels/cpu_avx2.py (gcc/cc -O3 -mavx2 -mfma -mf16c -fopenmp -shared) and
 * called through ctypes with raw pointers; every shape and layout check happens in Python before a call.
 * OpenMP: the library names libgomp.so.1, which resolves to the copy torch has already loaded, so these
 * loops share torch's thread pool (the caller passes torch.get_num_threads()).
 *
 * awqkit_int4_gemv: y[m, n] = sum_k x[m, k] * (q[k, n] - z[k/g, n]) * s[k/g, n] (+ bias[n])
 *   arguments: the layer's (wq, sp, zs, bias, K, N, g) first, then the call's (x, y, M, n_threads)
 *   x      float32 [M, K] row-major
 *   wq     uint32  [N/64, K, 8]: word (b, k, j) = AWQ GEMM qweight[k, 8b + j] (a copy re-blocked so one
 *          64-column block streams contiguously); nibble i (bits 4i..4i+3) of word j holds column
 *          64b + 8j + AWQ_ORDER[i], AWQ_ORDER = {0, 2, 4, 6, 1, 3, 5, 7}
 *   sp     float16 [N/64, K/g, 8, 8]: scale of column 64b + 8j + AWQ_ORDER[i] at (b, g, i, j)
 *   zq     uint8   [N/64, K/g, 8, 8]: zero point of the same column
 *   Per group it accumulates a[i][j] = sum_k x[k] * q (exact small integers as floats, fp32 FMA) and adds
 *   s * a - (z * s) * sum_k x[k]: the reference's (q - z) * s expanded, fp32 throughout (s widened exactly,
 *   z * s exact in fp32: an 8-bit integer times an 11-bit significand).
 *
 *   3..16 rows (int4_gemv_rows): each 64-column block is unpacked once per chunk of <= 64 input rows into an
 *   L1 tile of floats that every input row then reads, instead of unpacking it again per row; the same FMAs
 *   in the same order per output, so the results are bit-identical to the one-row loop.
 *   accumulate != 0 adds the result to y instead of overwriting it (y += W x + b: a fused residual add,
 *   (W x + b) + y as the unfused sum computes it).
 *
 * awqkit_f16_gemv: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]); w float16 [N, K] row-major, widened to
 *   fp32 exactly (F16C), fp32 FMA accumulation. K % 8 == 0.
 *
 * Decoder glue for awqkit.runtime's decode loop (float32, row-major, every size checked in Python):
 * awqkit_rmsnorm: y[r, :] = (x[r, :] * (1 / sqrt(mean(x[r, :]^2) + eps))) * (offset + w), as transformers'
 *   RMSNorm (offset 0: Llama's w, 1: Gemma's 1 + w).
 * awqkit_silu_mul: y[r, i] = silu(gu[r, i]) * gu[r, n + i] for a fused [gate | up] output of width 2n.
 * awqkit_decode_attention: one decode step of grouped-query attention for B rows at position pos:
 *   qkv [B, row_stride] holds q (H heads), k, v (KV heads) of head_dim D, contiguous from column 0;
 *   optional per-head RMSNorm of q and k (qn/kn weights [D], Qwen3), rotary embedding (transformers'
 *   rotate_half convention, cos/sin [B, D]) in place, k and v written to the caches kc/vc
 *   [B, KV, maxlen, D] at pos, then softmax(q k^T * scale) v over cache positions max(0, pos - window + 1)
 *   .. pos (window 0: all) into out [B, H * D]; scratch holds B * H * maxlen floats. D % 8 == 0.
 * awqkit_decode_layers: a whole decode step of n_layers Llama-style layers on the residual stream h [B, hidden]
 *   in place, one call instead of ~9 per layer: per layer the calls above in the order of awqkit.runtime's
 *   per-op path (rmsnorm, qkv GEMV, attention, o GEMV += h, rmsnorm, gate|up GEMV, silu_mul, down GEMV += h),
 *   so the numbers are the same. Layers are awqkit_layer structs (mirrored by ctypes in awqkit/runtime/
 *   stack.py); scratch holds B * (hidden + qkv.N + H*D + gu.N + gu.N/2 + H * maxlen) floats.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "awqkit_cpu.h"

static const int AWQ_ORDER[8] = {0, 2, 4, 6, 1, 3, 5, 7};

int awqkit_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

int awqkit_abi_version(void) { return 6; }

static void split(int64_t total, int nt, int t, int64_t *lo, int64_t *hi) {
    int64_t base = total / nt, rem = total % nt;
    *lo = t * base + (t < rem ? t : rem);
    *hi = *lo + base + (t < rem ? 1 : 0);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define ROWS_MAX 16 /* = cpu_avx2.MAX_ROWS: the row buffers of int4_gemv_rows */

/* Shared pieces of the two int4 GEMV loops (inlined; the same operations as written out in each). */
static inline int gemv_threads(int n_threads, int64_t n_blocks) {
    if (n_threads < 1) n_threads = 1;
    return n_threads > n_blocks ? (int)n_blocks : n_threads;
}

/* nibble i (bits 4i..4i+3) of each of the 8 words, widened to fp32 */
static inline __m256 nibble(__m256i w, int i, __m256i mask) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w, 4 * i), mask));
}

/* scale s and z * s of the 8 columns (nibble i of the 8 words) of block b, group g */
static inline void scale_zero(const uint16_t *sp, const uint8_t *zq, int64_t bg, int i, __m256 *s, __m256 *zs) {
    *s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sp + bg * 64 + 8 * i)));
    const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zq + bg * 64 + 8 * i))));
    *zs = _mm256_mul_ps(z, *s);
}

/* out [8 nibbles][8 words] of one 64-column block -> ym[column] (+ bias), overwritten or accumulated */
static inline void store_block(const float *out, float *ym, const float *bias_b, int accumulate) {
    for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 8; ++j) {
            const int64_t c = 8 * j + AWQ_ORDER[i];
            const float r = out[8 * i + j] + (bias_b ? bias_b[c] : 0.0f);
            ym[c] = accumulate ? r + ym[c] : r;
        }
}

/* multi-row variant: unpack each 64-column block chunk once into an L1 tile, reuse for every row. */
static void int4_gemv_rows(const uint32_t *wq, const uint16_t *sp, const uint8_t *zq, const float *bias, int64_t K,
                           int64_t N, int64_t group, const float *x, float *y, int64_t M, int n_threads,
                           int accumulate) {
    const int64_t NB = N / 64, G = K / group, KC = 64;
    n_threads = gemv_threads(n_threads, NB);
#pragma omp parallel num_threads(n_threads)
    {
        int64_t lo, hi;
        split(NB, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
        const __m256i mask = _mm256_set1_epi32(0xF);
        float qt[64 * 64] __attribute__((aligned(32)));      /* [k in chunk][i][j]: nibble i of word j */
        float acc[ROWS_MAX * 64] __attribute__((aligned(32))); /* per row: a[i][j] of the current group */
        float outb[ROWS_MAX * 64] __attribute__((aligned(32)));
        float xs[ROWS_MAX];
        for (int64_t b = lo; b < hi; ++b) {
            const uint32_t *wb = wq + b * K * 8;
            memset(outb, 0, sizeof(float) * 64 * M);
            for (int64_t g = 0; g < G; ++g) {
                memset(acc, 0, sizeof(float) * 64 * M);
                for (int64_t m = 0; m < M; ++m) xs[m] = 0.0f;
                for (int64_t k0 = 0; k0 < group; k0 += KC) {
                    const int64_t kn = group - k0 < KC ? group - k0 : KC;
                    const uint32_t *wg = wb + (g * group + k0) * 8;
                    for (int64_t k = 0; k < kn; ++k) {
                        const __m256i w = _mm256_loadu_si256((const __m256i *)(wg + k * 8));
                        float *t = qt + k * 64;
                        for (int i = 0; i < 8; ++i) _mm256_store_ps(t + 8 * i, nibble(w, i, mask));
                    }
                    for (int64_t m = 0; m < M; ++m) {
                        const float *xg = x + m * K + g * group + k0;
                        float *am = acc + m * 64;
                        __m256 a0 = _mm256_load_ps(am), a1 = _mm256_load_ps(am + 8), a2 = _mm256_load_ps(am + 16),
                               a3 = _mm256_load_ps(am + 24), a4 = _mm256_load_ps(am + 32), a5 = _mm256_load_ps(am + 40),
                               a6 = _mm256_load_ps(am + 48), a7 = _mm256_load_ps(am + 56);
                        float s = xs[m];
                        for (int64_t k = 0; k < kn; ++k) {
                            const float *t = qt + k * 64;
                            const __m256 xk = _mm256_broadcast_ss(xg + k);
                            s += xg[k];
                            a0 = _mm256_fmadd_ps(_mm256_load_ps(t), xk, a0);
                            a1 = _mm256_fmadd_ps(_mm256_load_ps(t + 8), xk, a1);
                            a2 = _mm256_fmadd_ps(_mm256_load_ps(t + 16), xk, a2);
                            a3 = _mm256_fmadd_ps(_mm256_load_ps(t + 24), xk, a3);
                            a4 = _mm256_fmadd_ps(_mm256_load_ps(t + 32), xk, a4);
                            a5 = _mm256_fmadd_ps(_mm256_load_ps(t + 40), xk, a5);
                            a6 = _mm256_fmadd_ps(_mm256_load_ps(t + 48), xk, a6);
                            a7 = _mm256_fmadd_ps(_mm256_load_ps(t + 56), xk, a7);
                        }
                        xs[m] = s;
                        _mm256_store_ps(am, a0); _mm256_store_ps(am + 8, a1); _mm256_store_ps(am + 16, a2);
                        _mm256_store_ps(am + 24, a3); _mm256_store_ps(am + 32, a4); _mm256_store_ps(am + 40, a5);
                        _mm256_store_ps(am + 48, a6); _mm256_store_ps(am + 56, a7);
                    }
                }
                for (int i = 0; i < 8; ++i) {
                    __m256 s, zs;
                    scale_zero(sp, zq, b * G + g, i, &s, &zs);
                    for (int64_t m = 0; m < M; ++m) {
                        __m256 o = _mm256_load_ps(outb + m * 64 + 8 * i);
                        o = _mm256_fmadd_ps(s, _mm256_load_ps(acc + m * 64 + 8 * i), o);
                        o = _mm256_fnmadd_ps(zs, _mm256_set1_ps(xs[m]), o);
                        _mm256_store_ps(outb + m * 64 + 8 * i, o);
                    }
                }
            }
            for (int64_t m = 0; m < M; ++m)
                store_block(outb + m * 64, y + m * N + b * 64, bias ? bias + b * 64 : NULL, accumulate);
        }
    }
}

void awqkit_int4_gemv(const uint32_t *wq, const uint16_t *sp, const uint8_t *zq, const float *bias, int64_t K,
                      int64_t N, int64_t group, const float *x, float *y, int64_t M, int n_threads,
                      int accumulate) {
    if (M >= 3 && M <= ROWS_MAX) {
        int4_gemv_rows(wq, sp, zq, bias, K, N, group, x, y, M, n_threads, accumulate);
        return;
    }
    const int64_t NB = N / 64, G = K / group;
    n_threads = gemv_threads(n_threads, NB);
#pragma omp parallel num_threads(n_threads)
    {
        int64_t lo, hi;
        split(NB, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
        const __m256i mask = _mm256_set1_epi32(0xF);
        float out[64] __attribute__((aligned(32)));
        for (int64_t b = lo; b < hi; ++b) {
            const uint32_t *wb = wq + b * K * 8;
            for (int64_t m = 0; m < M; ++m) {
                const float *xm = x + m * K;
                __m256 o[8];
                for (int i = 0; i < 8; ++i) o[i] = _mm256_setzero_ps();
                for (int64_t g = 0; g < G; ++g) {
                    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
                    __m256 xs = _mm256_setzero_ps();
                    const uint32_t *wg = wb + g * group * 8;
                    const float *xg = xm + g * group;
                    for (int64_t k = 0; k < group; ++k) {
                        const __m256i w = _mm256_loadu_si256((const __m256i *)(wg + k * 8));
                        const __m256 xk = _mm256_broadcast_ss(xg + k);
                        xs = _mm256_add_ps(xs, xk);
                        a0 = _mm256_fmadd_ps(nibble(w, 0, mask), xk, a0);
                        a1 = _mm256_fmadd_ps(nibble(w, 1, mask), xk, a1);
                        a2 = _mm256_fmadd_ps(nibble(w, 2, mask), xk, a2);
                        a3 = _mm256_fmadd_ps(nibble(w, 3, mask), xk, a3);
                        a4 = _mm256_fmadd_ps(nibble(w, 4, mask), xk, a4);
                        a5 = _mm256_fmadd_ps(nibble(w, 5, mask), xk, a5);
                        a6 = _mm256_fmadd_ps(nibble(w, 6, mask), xk, a6);
                        a7 = _mm256_fmadd_ps(nibble(w, 7, mask), xk, a7);
                    }
                    __m256 acc[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
                    for (int i = 0; i < 8; ++i) {
                        __m256 s, zs;
                        scale_zero(sp, zq, b * G + g, i, &s, &zs);
                        o[i] = _mm256_fmadd_ps(s, acc[i], o[i]);
                        o[i] = _mm256_fnmadd_ps(zs, xs, o[i]);
                    }
                }
                for (int i = 0; i < 8; ++i) _mm256_store_ps(out + 8 * i, o[i]);
                store_block(out, y + m * N + b * 64, bias ? bias + b * 64 : NULL, accumulate);
            }
        }
    }
}

void awqkit_f16_gemv(const float *x, const uint16_t *w, const float *bias, float *y, int64_t M, int64_t K,
                     int64_t N, int n_threads) {
    const int64_t R = 4, NR = N / R;  /* rows in fours; the N % 4 tail row by row */
    if (n_threads < 1) n_threads = 1;
#pragma omp parallel num_threads(n_threads)
    {
        int64_t lo, hi;
        split(NR, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
        const int64_t CH = 64;  /* row-fours per chunk: 256 rows, reused from L2 across the M inputs */
        for (int64_t c0 = lo; c0 < hi; c0 += CH) {
            const int64_t c1 = c0 + CH < hi ? c0 + CH : hi;
            for (int64_t m = 0; m < M; ++m) {
                const float *xm = x + m * K;
                for (int64_t r4 = c0; r4 < c1; ++r4) {
                    const uint16_t *w0 = w + r4 * R * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
                    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                    for (int64_t k = 0; k < K; k += 8) {
                        const __m256 xv = _mm256_loadu_ps(xm + k);
                        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w0 + k))), xv, a0);
                        a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w1 + k))), xv, a1);
                        a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w2 + k))), xv, a2);
                        a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w3 + k))), xv, a3);
                    }
                    float *ym = y + m * N + r4 * R;
                    ym[0] = hsum(a0) + (bias ? bias[r4 * R] : 0.0f);
                    ym[1] = hsum(a1) + (bias ? bias[r4 * R + 1] : 0.0f);
                    ym[2] = hsum(a2) + (bias ? bias[r4 * R + 2] : 0.0f);
                    ym[3] = hsum(a3) + (bias ? bias[r4 * R + 3] : 0.0f);
                }
            }
        }
    }
    for (int64_t n = NR * R; n < N; ++n)
        for (int64_t m = 0; m < M; ++m) {
            __m256 a = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k += 8)
                a = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + n * K + k))),
                                    _mm256_loadu_ps(x + m * K + k), a);
            y[m * N + n] = hsum(a) + (bias ? bias[n] : 0.0f);
        }
}

void awqkit_rmsnorm(const float *x, const float *w, float *y, int64_t R, int64_t n, float eps, float offset) {
    for (int64_t r = 0; r < R; ++r) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        float ss = 0.0f;
        for (int64_t i = 0; i < n; ++i) ss += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(ss / (float)n + eps);
        for (int64_t i = 0; i < n; ++i) yr[i] = (xr[i] * inv) * (offset + w[i]);
    }
}

void awqkit_silu_mul(const float *gu, float *y, int64_t R, int64_t n) {
    for (int64_t r = 0; r < R; ++r) {
        const float *g = gu + r * 2 * n, *u = g + n;
        float *yr = y + r * n;
        for (int64_t i = 0; i < n; ++i) yr[i] = (g[i] / (1.0f + expf(-g[i]))) * u[i];
    }
}

static void head_rmsnorm(float *v, const float *w, int64_t D, float eps) {
    float ss = 0.0f;
    for (int64_t i = 0; i < D; ++i) ss += v[i] * v[i];
    const float inv = 1.0f / sqrtf(ss / (float)D + eps);
    for (int64_t i = 0; i < D; ++i) v[i] = w[i] * (v[i] * inv);
}

static void rope(float *v, const float *cos, const float *sin, int64_t D) {
    const int64_t h = D / 2;
    for (int64_t i = 0; i < h; ++i) {
        const float a = v[i], b = v[i + h];
        v[i] = a * cos[i] + (-b) * sin[i];
        v[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

static inline float dot8(const float *a, const float *b, int64_t D) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    return hsum(acc);
}

void awqkit_decode_attention(float *qkv, int64_t row_stride, float *kc, float *vc, const float *cos,
                             const float *sin, const float *qn, const float *kn, float norm_eps, float *out,
                             float *scratch, int64_t B, int64_t H, int64_t KV, int64_t D, int64_t pos,
                             int64_t maxlen, int64_t window, float scale, int n_threads) {
    const int64_t rep = H / KV;
    for (int64_t b = 0; b < B; ++b) {
        float *q = qkv + b * row_stride, *k = q + H * D, *v = k + KV * D;
        const float *cb = cos + b * D, *sb = sin + b * D;
        for (int64_t h = 0; h < H; ++h) {
            if (qn) head_rmsnorm(q + h * D, qn, D, norm_eps);
            rope(q + h * D, cb, sb, D);
        }
        for (int64_t h = 0; h < KV; ++h) {
            if (kn) head_rmsnorm(k + h * D, kn, D, norm_eps);
            rope(k + h * D, cb, sb, D);
            memcpy(kc + ((b * KV + h) * maxlen + pos) * D, k + h * D, (size_t)D * sizeof(float));
            memcpy(vc + ((b * KV + h) * maxlen + pos) * D, v + h * D, (size_t)D * sizeof(float));
        }
    }
    const int64_t start = (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0, L = pos + 1 - start;
    if (n_threads < 1) n_threads = 1;
    if (B * H * L * D < 65536) n_threads = 1;  /* below this the fork costs more than it saves */
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t b = bh / H, h = bh % H, kh = h / rep;
        const float *q = qkv + b * row_stride + h * D;
        const float *kb = kc + ((b * KV + kh) * maxlen + start) * D, *vb = vc + ((b * KV + kh) * maxlen + start) * D;
        float *p = scratch + bh * maxlen, mx = -INFINITY, den = 0.0f;
        for (int64_t j = 0; j < L; ++j) {
            p[j] = dot8(q, kb + j * D, D) * scale;
            if (p[j] > mx) mx = p[j];
        }
        for (int64_t j = 0; j < L; ++j) {
            p[j] = expf(p[j] - mx);
            den += p[j];
        }
        const float inv = 1.0f / den;
        float *o = out + b * H * D + h * D;
        for (int64_t d = 0; d < D; d += 8) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t j = 0; j < L; ++j)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j] * inv), _mm256_loadu_ps(vb + j * D + d), acc);
            _mm256_storeu_ps(o + d, acc);
        }
    }
}

static void lin(const awqkit_linear *l, const float *x, float *y, int64_t B, int n_threads, int accumulate) {
    awqkit_int4_gemv(l->wq, l->sp, l->zq, l->bias, l->K, l->N, l->group, x, y, B, n_threads, accumulate);
}

void awqkit_decode_layers(const awqkit_layer *layers, int64_t n_layers, float *h, int64_t B, int64_t hidden,
                          int64_t pos, const float *cos, const float *sin, float *scratch, int n_threads) {
    for (int64_t i = 0; i < n_layers; ++i) {
        const awqkit_layer *L = layers + i;
        const int64_t inter = L->gu.N / 2;
        float *x = scratch, *qkv = x + B * hidden, *a = qkv + B * L->qkv.N, *gu = a + B * L->H * L->D;
        float *m = gu + B * L->gu.N, *att = m + B * inter;
        awqkit_rmsnorm(h, L->in_norm, x, B, hidden, L->eps, 0.0f);
        lin(&L->qkv, x, qkv, B, n_threads, 0);
        awqkit_decode_attention(qkv, L->qkv.N, L->kc, L->vc, cos, sin, L->q_norm, L->k_norm, L->norm_eps, a, att, B,
                                L->H, L->KV, L->D, pos, L->maxlen, L->window, L->scale, n_threads);
        lin(&L->o, a, h, B, n_threads, 1);
        awqkit_rmsnorm(h, L->post_norm, x, B, hidden, L->eps, 0.0f);
        lin(&L->gu, x, gu, B, n_threads, 0);
        awqkit_silu_mul(gu, m, B, inter);
        lin(&L->down, m, h, B, n_threads, 1);
    }
}
