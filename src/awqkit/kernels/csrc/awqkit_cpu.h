/* awqkit cpu-avx2 kernels: the exported functions and the structs of awqkit_decode_layers.
 *
 * Included by awqkit_cpu.c and by the sanitizer harness (tests/reliability/sanitize); awqkit/runtime/stack.py
 * mirrors the two structs with ctypes. What each function computes and the layouts it reads: awqkit_cpu.c.
 */
#ifndef AWQKIT_CPU_H
#define AWQKIT_CPU_H

#include <stdint.h>

typedef struct {
    const uint32_t *wq;
    const uint16_t *sp;
    const uint8_t *zq;
    const float *bias;
    int64_t K, N, group;
} awqkit_linear;

typedef struct {
    awqkit_linear qkv, o, gu, down;
    const float *in_norm, *post_norm, *q_norm, *k_norm;
    float *kc, *vc;
    float eps, norm_eps, scale;
    int64_t H, KV, D, maxlen, window;
} awqkit_layer;

int awqkit_cpu_supported(void);
int awqkit_abi_version(void);
void awqkit_int4_gemv(const uint32_t *wq, const uint16_t *sp, const uint8_t *zq, const float *bias, int64_t K,
                      int64_t N, int64_t group, const float *x, float *y, int64_t M, int n_threads, int accumulate);
void awqkit_f16_gemv(const float *x, const uint16_t *w, const float *bias, float *y, int64_t M, int64_t K,
                     int64_t N, int n_threads);
void awqkit_rmsnorm(const float *x, const float *w, float *y, int64_t R, int64_t n, float eps, float offset);
void awqkit_silu_mul(const float *gu, float *y, int64_t R, int64_t n);
void awqkit_decode_attention(float *qkv, int64_t row_stride, float *kc, float *vc, const float *cos,
                             const float *sin, const float *qn, const float *kn, float norm_eps, float *out,
                             float *scratch, int64_t B, int64_t H, int64_t KV, int64_t D, int64_t pos,
                             int64_t maxlen, int64_t window, float scale, int n_threads);
void awqkit_decode_layers(const awqkit_layer *layers, int64_t n_layers, float *h, int64_t B, int64_t hidden,
                          int64_t pos, const float *cos, const float *sin, float *scratch, int n_threads);

#endif
