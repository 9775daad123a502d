// Element-wise and attention operators, with the rounding behaviour of llama.cpp's CPU backend.
#include "ops.h"

#include <math.h>
#include <string.h>

// --- public API

void ops_rmsnorm(float *y, const float *x, const float *w, int n, float eps) {
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += (double)(x[i] * x[i]); // float products, double sum
    const float mean = (float)(sum / n);
    const float scale = 1.0f / sqrtf(mean + eps);
    for (int i = 0; i < n; i++) y[i] = (x[i] * scale) * w[i];
}

void ops_rope(float *x, int n_heads, int head_dim, int n_rot, int pos, float base, float freq_scale,
              const float *freq_factors) {
    const float theta_scale = powf(base, -2.0f / (float)n_rot);
    for (int h = 0; h < n_heads; h++) {
        float *v = x + (size_t)h * head_dim;
        float theta = (float)pos;
        for (int i0 = 0; i0 < n_rot; i0 += 2) {
            float th = theta * freq_scale;
            if (freq_factors) th /= freq_factors[i0 / 2];
            const float c = cosf(th), s = sinf(th);
            const float a = v[i0], b = v[i0 + 1];
            v[i0] = a * c - b * s;
            v[i0 + 1] = a * s + b * c;
            theta *= theta_scale;
        }
    }
}

void ops_silu_mul(float *g, const float *u, size_t n) {
    for (size_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

void ops_attention(float *out, const float *q, const void *k, const void *v, size_t row_stride, int npos,
                   int head_dim, float scale, bool f16, float *scores) {
    float mx = -INFINITY;
    for (int t = 0; t < npos; t++) {
        float s;
        if (f16) {
            // Products of two halves are exact in float; summing them in double and rounding once is
            // what llama.cpp's F16 dot does for rows shorter than its SIMD step.
            const mlm_f16_t *kr = (const mlm_f16_t *)k + (size_t)t * row_stride;
            double sd = 0.0;
            for (int d = 0; d < head_dim; d++)
                sd += (double)(mlm_f16_to_f32(mlm_f32_to_f16(q[d])) * mlm_f16_to_f32(kr[d]));
            s = (float)sd;
        } else {
            const float *kr = (const float *)k + (size_t)t * row_stride;
            s = 0.0f;
            for (int d = 0; d < head_dim; d++) s += q[d] * kr[d];
        }
        s *= scale;
        scores[t] = s;
        if (s > mx) mx = s;
    }
    double sum = 0.0;
    for (int t = 0; t < npos; t++) {
        const float e = expf(scores[t] - mx);
        scores[t] = e;
        sum += e;
    }
    const float inv = (float)(1.0 / sum);
    for (int d = 0; d < head_dim; d++) out[d] = 0.0f;
    for (int t = 0; t < npos; t++) {
        float p = scores[t] * inv;
        if (f16) {
            p = mlm_f16_to_f32(mlm_f32_to_f16(p));
            const mlm_f16_t *vr = (const mlm_f16_t *)v + (size_t)t * row_stride;
            for (int d = 0; d < head_dim; d++) out[d] += p * mlm_f16_to_f32(vr[d]);
        } else {
            const float *vr = (const float *)v + (size_t)t * row_stride;
            for (int d = 0; d < head_dim; d++) out[d] += p * vr[d];
        }
    }
}

void ops_topk_route(const float *logits, int n_expert, int k, int *sel, float *w) {
    float p[1024]; // (n_expert) probabilities; n_expert <= 1024 is checked at load
    float mx = -INFINITY;
    for (int e = 0; e < n_expert; e++) mx = logits[e] > mx ? logits[e] : mx;
    double sum = 0.0;
    for (int e = 0; e < n_expert; e++) {
        p[e] = expf(logits[e] - mx);
        sum += p[e];
    }
    for (int e = 0; e < n_expert; e++) p[e] = (float)(p[e] / sum);
    float wsum = 0.0f;
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < n_expert; e++) {
            bool taken = false;
            for (int jj = 0; jj < j; jj++) taken |= sel[jj] == e;
            if (!taken && (best < 0 || p[e] > p[best])) best = e;
        }
        sel[j] = best;
        w[j] = p[best];
        wsum += p[best];
    }
    for (int j = 0; j < k; j++) w[j] /= wsum;
}
