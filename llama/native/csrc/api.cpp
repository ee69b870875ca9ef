// The C ABI that llama/native loads with ctypes. All pointers are to contiguous memory
// owned by the caller (torch tensors); every function returns 0 or a negative error code.
#include "attention.h"
#include "elementwise.h"
#include "linear.h"
#include "quant.h"

#ifdef LLAMA_X86
#include <cpuid.h>
#endif

namespace {

using namespace llama;

constexpr int ABI_VERSION = 5;

enum Error : int { OK = 0, BAD_LAYOUT = -1, BAD_PATH = -2, BAD_SHAPE = -3, BAD_DTYPE = -4 };

bool detect(int path) {
#ifdef LLAMA_X86
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512vnni");
    const bool avx512_bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
    unsigned eax, ebx, ecx, edx;  // CPUID 7.0 EDX: bit 22 AMX-BF16, bit 24 AMX-TILE
    const bool tiles = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx >> 22 & 1) && (edx >> 24 & 1);
    switch (path) {
        case SCALAR: return true;
        case AVX2: return avx2;
        case AVX512: return avx512;
        case AVX512_BF16: return avx512_bf16;
        case AMX: return avx512_bf16 && tiles && amx_usable();
    }
    return false;
#else
    return path == SCALAR;
#endif
}

// Whether code path `path` is built and this CPU (and OS) runs it; detected once (CPUID
// traps to the hypervisor in a VM: too slow for every call).
bool cpu_has(int path) {
    static const int mask = [] {
        int bits = 0;
        for (int p = SCALAR; p <= AMX; p++)
            if (detect(p)) bits |= 1 << p;
        return bits;
    }();
    return path >= SCALAR && path <= AMX && (mask >> path & 1);
}

bool quantized(int layout) { return layout == Q8_0 || layout == Q4_0 || layout == Q4_1; }

// An interleaved layout's row count must fill its groups.
bool rows_fit(int layout, int64_t rows) { return !interleaved(layout) || rows % GROUP_ROWS == 0; }

}  // namespace

extern "C" {

int llama_native_abi(void) { return ABI_VERSION; }

// Bit p set: code path p (SCALAR, AVX2, AVX512, AVX512_BF16, AMX) is built and this CPU runs it.
int llama_native_paths(void) {
    int mask = 0;
    for (int p = SCALAR; p <= AMX; p++)
        if (cpu_has(p)) mask |= 1 << p;
    return mask;
}

// The size of the OpenMP team the kernels use (torch's intra-op threads).
int llama_native_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// y[m, n] = x[m, k] @ W[n, k]^T. x: fp32 or bf16 (x_dtype), y: fp32 or bf16 (y_dtype).
// threads: 1 for the calling thread only, else the OpenMP team.
int llama_linear(int layout, int path, const void* x, int x_dtype, int64_t m, int64_t k, const void* w,
                 int64_t n, void* y, int y_dtype, int threads) {
    if (layout < F32 || layout > LAST_LAYOUT) return BAD_LAYOUT;
    if (!cpu_has(path)) return BAD_PATH;
    if (m < 1 || n < 1 || k < QK || k % QK != 0 || !rows_fit(layout, n)) return BAD_SHAPE;
    if ((x_dtype != DT_F32 && x_dtype != DT_BF16) || (y_dtype != DT_F32 && y_dtype != DT_BF16)) return BAD_DTYPE;
    return run_linear({layout, m, n, k, x, x_dtype, (const uint8_t*)w, y, y_dtype, threads}, path);
}

namespace {
struct RowsJob {
    int layout;
    int64_t k;
    const void* src;
    void* dst;
    int dtype;
};

void quantize_rows(const void* ctx, int64_t begin, int64_t end) {
    const RowsJob& j = *(const RowsJob*)ctx;
    const size_t rb = row_bytes(j.layout, j.k);
    for (int64_t r = begin; r < end; r++)
        quantize_row(j.layout, (const float*)j.src + r * j.k, j.k, (uint8_t*)j.dst + r * rb);
}

void dequantize_row_to(const RowsJob& j, const uint8_t* in, int64_t r, float* tmp) {
    if (j.dtype == DT_F32) {
        dequantize_row(j.layout, in, j.k, (float*)j.dst + r * j.k);
    } else {
        dequantize_row(j.layout, in, j.k, tmp);
        uint16_t* out = (uint16_t*)j.dst + r * j.k;
        for (int64_t i = 0; i < j.k; i++) out[i] = f32_to_bf16(tmp[i]);
    }
}

void dequantize_rows(const void* ctx, int64_t begin, int64_t end) {
    const RowsJob& j = *(const RowsJob*)ctx;
    const size_t rb = row_bytes(j.layout, j.k);
    float* tmp = (float*)scratch(sizeof(float) * j.k, SCRATCH_SLOTS - 1);  // per thread
    for (int64_t r = begin; r < end; r++) dequantize_row_to(j, (const uint8_t*)j.src + r * rb, r, tmp);
}

// An interleaved layout: each group back to 16 base-layout rows (in scratch), then those.
void dequantize_groups(const void* ctx, int64_t begin, int64_t end) {
    const RowsJob& j = *(const RowsJob*)ctx;
    const RowsJob rows{base_layout(j.layout), j.k, nullptr, j.dst, j.dtype};
    const size_t rb = row_bytes(j.layout, j.k);
    float* tmp = (float*)scratch(sizeof(float) * j.k, SCRATCH_SLOTS - 1);
    uint8_t* plain = (uint8_t*)scratch(GROUP_ROWS * rb, SCRATCH_SLOTS - 2);
    for (int64_t g = begin; g < end; g++) {
        interleave_group(j.layout, plain, j.k, (uint8_t*)j.src + g * GROUP_ROWS * rb, true);
        for (int i = 0; i < GROUP_ROWS; i++) dequantize_row_to(rows, plain + i * rb, g * GROUP_ROWS + i, tmp);
    }
}

void interleave_groups(const void* ctx, int64_t begin, int64_t end, bool inverse) {
    const RowsJob& j = *(const RowsJob*)ctx;
    const size_t group_bytes = GROUP_ROWS * row_bytes(j.layout, j.k);
    for (int64_t g = begin; g < end; g++) {
        uint8_t* rows = (uint8_t*)(inverse ? j.dst : j.src) + g * group_bytes;
        uint8_t* group = (uint8_t*)(inverse ? j.src : j.dst) + g * group_bytes;
        interleave_group(j.layout, rows, j.k, group, inverse);
    }
}
void interleave_forward(const void* ctx, int64_t begin, int64_t end) { interleave_groups(ctx, begin, end, false); }
void interleave_inverse(const void* ctx, int64_t begin, int64_t end) { interleave_groups(ctx, begin, end, true); }
}  // namespace

// src fp32 [rows, k] -> dst blocks [rows, row_bytes], as ggml-quants.c does it.
int llama_quantize(int layout, const float* src, int64_t rows, int64_t k, void* dst, int threads) {
    if (!quantized(layout)) return BAD_LAYOUT;
    if (rows < 0 || k < QK || k % QK != 0) return BAD_SHAPE;
    const RowsJob j{layout, k, src, dst, DT_F32};
    parallel_ranges(&j, rows, quantize_rows, threads);
    return OK;
}

// src blocks [rows, row_bytes] (a quantized or interleaved layout) -> dst [rows, k] in
// fp32 or bf16 (dtype). path: SCALAR or AVX512, or -1 for the faster this CPU runs.
int llama_dequantize(int layout, const void* src, int64_t rows, int64_t k, void* dst, int dtype, int threads,
                     int path) {
    if (path < 0) path = cpu_has(AVX512) ? AVX512 : SCALAR;
    if ((path != SCALAR && path != AVX512) || !cpu_has(path)) return BAD_PATH;
    if (!quantized(base_layout(layout))) return BAD_LAYOUT;
    if (rows < 0 || k < QK || k % QK != 0 || !rows_fit(layout, rows)) return BAD_SHAPE;
    if (dtype != DT_F32 && dtype != DT_BF16) return BAD_DTYPE;
    const RowsJob j{layout, k, src, dst, dtype};
#ifdef LLAMA_X86
    if (path == AVX512) {
        parallel_ranges(&j, rows, [](const void* ctx, int64_t begin, int64_t end) {
            const RowsJob& job = *(const RowsJob*)ctx;
            dequantize_rows_avx512(job.layout, (const uint8_t*)job.src, job.k, begin, end, job.dst, job.dtype);
        }, threads);
        return OK;
    }
#endif
    if (interleaved(layout)) parallel_ranges(&j, rows / GROUP_ROWS, dequantize_groups, threads);
    else parallel_ranges(&j, rows, dequantize_rows, threads);
    return OK;
}

// Base-layout blocks [rows, row_bytes] -> interleaved `layout` (the same bytes reordered;
// see common.h), or back when `inverse`. rows: a multiple of 16.
int llama_interleave(int layout, const void* src, int64_t rows, int64_t k, void* dst, int inverse, int threads) {
    if (!interleaved(layout)) return BAD_LAYOUT;
    if (rows < 0 || k < QK || k % QK != 0 || !rows_fit(layout, rows)) return BAD_SHAPE;
    const RowsJob j{layout, k, src, dst, DT_F32};
    parallel_ranges(&j, rows / GROUP_ROWS, inverse ? interleave_inverse : interleave_forward, threads);
    return OK;
}

// The fused elementwise passes of a bf16 model (see elementwise.h), rows split across the
// team. add may be null (then h is not written). AVX-512 CPUs.
int llama_add_rms_norm_bf16(const void* x, const void* add, const void* weight, int64_t rows, int64_t dim, float eps,
                            void* h, void* y, int threads) {
    if (!cpu_has(AVX512)) return BAD_PATH;
    if (rows < 0 || dim < 1) return BAD_SHAPE;
    struct Job { const uint16_t *x, *add, *weight; int64_t dim; float eps; uint16_t *h, *y; };
    const Job j{(const uint16_t*)x, (const uint16_t*)add, (const uint16_t*)weight, dim, eps,
                (uint16_t*)h, (uint16_t*)y};
#ifdef LLAMA_X86
    parallel_ranges(&j, rows, [](const void* ctx, int64_t begin, int64_t end) {
        const Job& a = *(const Job*)ctx;
        add_rms_norm_rows_avx512(a.x, a.add, a.weight, a.dim, a.eps, begin, end, a.h, a.y);
    }, threads);
#endif
    return OK;
}

int llama_swiglu_bf16(const void* gate, const void* up, int64_t rows, int64_t hidden, int64_t gate_stride,
                      int64_t up_stride, void* out, int threads) {
    if (!cpu_has(AVX512)) return BAD_PATH;
    if (rows < 0 || hidden < 1 || gate_stride < hidden || up_stride < hidden) return BAD_SHAPE;
    struct Job { const uint16_t *gate, *up; int64_t hidden, gate_stride, up_stride; uint16_t* out; };
    const Job j{(const uint16_t*)gate, (const uint16_t*)up, hidden, gate_stride, up_stride, (uint16_t*)out};
#ifdef LLAMA_X86
    parallel_ranges(&j, rows, [](const void* ctx, int64_t begin, int64_t end) {
        const Job& a = *(const Job*)ctx;
        swiglu_rows_avx512(a.gate, a.up, a.gate_stride, a.up_stride, a.hidden, begin, end, a.out);
    }, threads);
#endif
    return OK;
}

// A prompt's causal attention over its own keys in bf16 (see attention.h): q, k, v with
// the given token and batch strides (in elements), out contiguous [batch, seqlen, heads,
// head_dim]. AVX512-BF16 CPUs; head_dim a multiple of 64 up to 256.
int llama_causal_attention(const void* q, const void* k, const void* v, void* out, int64_t batch, int64_t seqlen,
                           int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t q_token, int64_t k_token,
                           int64_t v_token, int64_t q_batch, int64_t k_batch, int64_t v_batch, float scale,
                           int threads) {
    if (!cpu_has(AVX512_BF16)) return BAD_PATH;
    if (batch < 1 || seqlen < 1 || heads < 1 || kv_heads < 1 || heads % kv_heads || head_dim % 64 || head_dim > 256)
        return BAD_SHAPE;
#ifdef LLAMA_X86
    const AttentionArgs a{(const uint16_t*)q, (const uint16_t*)k, (const uint16_t*)v, (uint16_t*)out,
                          batch, seqlen, heads, kv_heads, head_dim, q_token, k_token, v_token,
                          q_batch, k_batch, v_batch, scale, threads};
    return causal_attention_bf16(a);
#else
    return BAD_PATH;
#endif
}

// Reads the whole 4 KB pages of `bytes` of memory on the thread team and returns the XOR of
// their 64-bit words: a probe of the memory bandwidth that the kernels' own loads can reach
// (benchmarks/kernel_bandwidth.py), where PyTorch's reductions may fall short of it.
uint64_t llama_read_probe(const void* data, int64_t bytes, int threads) {
    struct Job { const uint64_t* words; uint64_t result; } job{(const uint64_t*)data, 0};
    constexpr int64_t PAGE = 4096 / 8;  // words per unit of work
    parallel_ranges(&job, bytes / 8 / PAGE, [](const void* ctx, int64_t begin, int64_t end) {
        Job& j = *(Job*)ctx;
        uint64_t acc = 0;
        const uint64_t* w = j.words + begin * PAGE;
        const int64_t n = (end - begin) * PAGE;
#pragma omp simd reduction(^ : acc)
        for (int64_t i = 0; i < n; i++) acc ^= w[i];
        __atomic_fetch_xor(&j.result, acc, __ATOMIC_RELAXED);
    }, threads);
    return job.result;
}

}  // extern "C"
