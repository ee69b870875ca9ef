// Shared plumbing of the matmul kernels (thread team, scratch, fp32 activations) and the
// portable scalar path, which every machine can run.
#include "linear.h"

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "quant.h"

namespace llama {

void parallel_ranges(const void* ctx, int64_t count, RangeFn fn, int threads) {
#ifdef _OPENMP
    if (threads != 1 && count > 1 && omp_get_max_threads() > 1 && !omp_in_parallel()) {
        // No num_threads clause: a team of another size makes GNU OpenMP rebuild its pool
        // (PyTorch avoids it for the same reason), so the whole team runs and idle
        // members simply get an empty range.
#pragma omp parallel
        {
            const int64_t team = omp_get_num_threads(), id = omp_get_thread_num();
            const int64_t per = (count + team - 1) / team;
            const int64_t begin = id * per, end = std::min(count, begin + per);
            if (begin < end) fn(ctx, begin, end);
        }
        return;
    }
#endif
    (void)threads;
    fn(ctx, 0, count);
}

void* scratch(size_t bytes, int slot) {
    struct Buffer {
        void* data = nullptr;
        size_t size = 0;
        ~Buffer() { std::free(data); }
    };
    static thread_local Buffer buffers[SCRATCH_SLOTS];
    Buffer& b = buffers[slot];
    if (b.size < bytes) {
        std::free(b.data);
        b.size = (bytes + 4095) & ~(size_t)4095;
        b.data = std::aligned_alloc(64, b.size);
    }
    return b.data;
}

const float* activations_f32(const LinearArgs& a, int base) {
    if (a.x_dtype == DT_F32) return (const float*)a.x;
    float* xf = (float*)scratch(sizeof(float) * a.m * a.k, base);
    const uint16_t* xb = (const uint16_t*)a.x;
    for (int64_t i = 0; i < a.m * a.k; i++) xf[i] = bf16_to_f32(xb[i]);
    return xf;
}

ActBlocks activation_blocks(const LinearArgs& a, int base) {
    const float* xf = activations_f32(a, base);
    const int64_t nb = a.k / QK;
    int8_t* q = (int8_t*)scratch(a.m * a.k, base + 1);
    float* d = (float*)scratch(sizeof(float) * a.m * nb, base + 2);
    int32_t* s = (int32_t*)scratch(sizeof(int32_t) * a.m * nb, base + 3);
    for (int64_t m = 0; m < a.m; m++) quantize_activation_row(xf + m * a.k, a.k, q + m * a.k, d + m * nb, s + m * nb);
    return {q, d, s};
}

// ---- scalar path ------------------------------------------------------------------------

namespace {

struct ScalarCtx {
    const LinearArgs* a;
    const float* xf;                                 // float layouts
    const int8_t* q; const float* d; const int32_t* s;  // quantized layouts: x as int8 blocks
};

float weight_at(int layout, const uint8_t* row, int64_t j) {
    if (layout == F32) return ((const float*)row)[j];
    return bf16_to_f32(((const uint16_t*)row)[j]);
}

void scalar_float_range(const void* vctx, int64_t begin, int64_t end) {
    const ScalarCtx& c = *(const ScalarCtx*)vctx;
    const LinearArgs& a = *c.a;
    const size_t rb = row_bytes(a.layout, a.k);
    for (int64_t n = begin; n < end; n++) {
        const uint8_t* row = a.w + n * rb;
        for (int64_t m = 0; m < a.m; m++) {
            const float* x = c.xf + m * a.k;
            float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 partial sums, as SIMD lanes would
            for (int64_t j = 0; j < a.k; j += 8)
                for (int l = 0; l < 8; l++) part[l] += x[j + l] * weight_at(a.layout, row, j + l);
            float sum = 0.0f;
            for (int l = 0; l < 8; l++) sum += part[l];
            store_output(a.y, a.y_dtype, m * a.n + n, sum);
        }
    }
}

void scalar_quant_range(const void* vctx, int64_t begin, int64_t end) {
    const ScalarCtx& c = *(const ScalarCtx*)vctx;
    const LinearArgs& a = *c.a;
    const int64_t nb = a.k / QK;
    const size_t rb = row_bytes(a.layout, a.k);
    for (int64_t n = begin; n < end; n++) {
        const uint8_t* row = a.w + n * rb;
        for (int64_t m = 0; m < a.m; m++) {
            const int8_t* q = c.q + m * a.k;
            const float* d = c.d + m * nb;
            const int32_t* s = c.s + m * nb;
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const int8_t* xq = q + b * QK;
                int32_t dot = 0;
                if (a.layout == Q8_0) {
                    const BlockQ8_0& blk = ((const BlockQ8_0*)row)[b];
                    for (int j = 0; j < QK; j++) dot += (int32_t)blk.qs[j] * xq[j];
                    sum += (f16_to_f32(blk.d) * d[b]) * (float)dot;
                } else if (a.layout == Q4_0) {
                    const BlockQ4_0& blk = ((const BlockQ4_0*)row)[b];
                    for (int j = 0; j < QK / 2; j++)
                        dot += ((blk.qs[j] & 15) - 8) * xq[j] + ((blk.qs[j] >> 4) - 8) * xq[j + 16];
                    sum += (f16_to_f32(blk.d) * d[b]) * (float)dot;
                } else {  // Q4_1: (q*dw + mw) . x = dw*dx*(q . qx) + mw*dx*sum(qx)
                    const BlockQ4_1& blk = ((const BlockQ4_1*)row)[b];
                    for (int j = 0; j < QK / 2; j++) dot += (blk.qs[j] & 15) * xq[j] + (blk.qs[j] >> 4) * xq[j + 16];
                    sum += (f16_to_f32(blk.d) * d[b]) * (float)dot + f16_to_f32(blk.m) * (d[b] * (float)s[b]);
                }
            }
            store_output(a.y, a.y_dtype, m * a.n + n, sum);
        }
    }
}

}  // namespace

int plan_scalar(Plan& p, int base) {
    if (interleaved(p.args.layout)) return -1;  // only the AVX-512 path reads these
    ScalarCtx& c = plan_context<ScalarCtx>(p);
    const LinearArgs& a = p.args;
    c.a = &p.args;
    p.count = a.n;
    if (a.layout == F32 || a.layout == BF16) {
        c.xf = activations_f32(a, base);
        p.fn = scalar_float_range;
    } else {
        const ActBlocks x = activation_blocks(a, base);
        c.q = x.q; c.d = x.d; c.s = x.s;
        p.fn = scalar_quant_range;
    }
    return 0;
}

int plan_linear(Plan& p, const LinearArgs& a, int path, int scratch_base) {
    p.args = a;
    switch (path) {
        case SCALAR: return plan_scalar(p, scratch_base);
#ifdef LLAMA_X86
        case AVX2: return plan_avx2(p, scratch_base);
        case AVX512: return plan_avx512(p, scratch_base);
        case AVX512_BF16: return plan_avx512_bf16(p, scratch_base);
        case AMX: return plan_amx(p, scratch_base);
#endif
    }
    return -2;
}

int run_linear(const LinearArgs& a, int path) {
    Plan p;
    const int rc = plan_linear(p, a, path, 0);
    if (rc == 0) parallel_ranges(p.ctx, p.count, p.fn, a.threads);
    return rc;
}

}  // namespace llama
