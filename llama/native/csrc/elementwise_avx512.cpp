// The fused elementwise passes of elementwise.h. Plain loops over converted lanes: with
// AVX-512 enabled for this file they vectorize (bf16 <-> fp32 is a shift and a rounding add).
#include <cmath>

#include "elementwise.h"

namespace llama {

void add_rms_norm_rows_avx512(const uint16_t* x, const uint16_t* add, const uint16_t* weight, int64_t dim, float eps,
                              int64_t begin, int64_t end, uint16_t* h, uint16_t* y) {
    for (int64_t r = begin; r < end; r++) {
        const uint16_t* xr = x + r * dim;
        const uint16_t* hr = xr;
        if (add) {  // the residual stream, rounded as a bf16 add rounds
            const uint16_t* ar = add + r * dim;
            uint16_t* out = h + r * dim;
#pragma omp simd
            for (int64_t i = 0; i < dim; i++) out[i] = f32_to_bf16(bf16_to_f32(xr[i]) + bf16_to_f32(ar[i]));
            hr = out;
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < dim; i++) ss += bf16_to_f32(hr[i]) * bf16_to_f32(hr[i]);
        const float inv = 1.0f / std::sqrt(ss / (float)dim + eps);
        uint16_t* yr = y + r * dim;
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) {
            const float normed = bf16_to_f32(f32_to_bf16(bf16_to_f32(hr[i]) * inv));  // .type_as(x)
            yr[i] = f32_to_bf16(normed * bf16_to_f32(weight[i]));                     // * weight
        }
    }
}

void swiglu_rows_avx512(const uint16_t* gate, const uint16_t* up, int64_t gate_stride, int64_t up_stride,
                        int64_t hidden, int64_t begin, int64_t end, uint16_t* out) {
    for (int64_t r = begin; r < end; r++) {
        const uint16_t *g = gate + r * gate_stride, *u = up + r * up_stride;
        uint16_t* o = out + r * hidden;
#pragma omp simd
        for (int64_t i = 0; i < hidden; i++) {
            const float gi = bf16_to_f32(g[i]);
            const float silu = bf16_to_f32(f32_to_bf16(gi / (1.0f + exp_approx(-gi))));  // F.silu rounds
            o[i] = f32_to_bf16(silu * bf16_to_f32(u[i]));
        }
    }
}

}  // namespace llama
