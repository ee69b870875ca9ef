// y[M, N] = x[M, K] @ W[N, K]^T for decode-sized M (1..32): W is read once for all M rows.
// Each code path lives in its own file, compiled with its own instruction-set flags; the
// entry point (linear.cpp) picks one. Everything here has internal linkage or a distinct
// name per path, so no inline function compiled for AVX-512 can leak into the scalar path.
#pragma once

#include <new>

#include "common.h"

namespace llama {

struct LinearArgs {
    int layout;
    int64_t m, n, k;
    const void* x;       // [m, k], contiguous, x_dtype
    int x_dtype;
    const uint8_t* w;    // [n, row_bytes(layout, k)]
    void* y;             // [m, n], contiguous, y_dtype
    int y_dtype;
    int threads;         // 1: the calling thread only; otherwise the OpenMP team (torch's)
};

// Runs fn(begin, end) over [0, count) split in contiguous ranges across the OpenMP team
// that torch's intra-op parallelism also uses (the same libgomp), so the two never compete
// for the cores.
using RangeFn = void (*)(const void* ctx, int64_t begin, int64_t end);
void parallel_ranges(const void* ctx, int64_t count, RangeFn fn, int threads);

// A scratch buffer per calling thread that grows and is reused (no allocation per call).
constexpr int SCRATCH_SLOTS = 32;
void* scratch(size_t bytes, int slot);

// A matmul ready to run: its activations prepared (converted to fp32 or quantized to int8
// blocks, in scratch slots base .. base + SLOTS_PER_PLAN - 1 of the planning thread), its
// output columns split into `count` units that fn(ctx, begin, end) computes, from any
// thread. The context points into the plan itself, so a plan stays where it was made.
constexpr int SLOTS_PER_PLAN = 5;
struct Plan {
    LinearArgs args;
    RangeFn fn = nullptr;
    int64_t count = 0;
    alignas(64) unsigned char ctx[192];
};

// Plans a.x @ W^T on a code path; 0, or a negative error code (see api.cpp).
int plan_linear(Plan& p, const LinearArgs& a, int path, int scratch_base);

// Plans, then runs on the thread team (a.threads).
int run_linear(const LinearArgs& a, int path);

template <class Ctx>
Ctx& plan_context(Plan& p) {
    static_assert(sizeof(Ctx) <= sizeof(Plan::ctx), "plan context too large");
    return *new (p.ctx) Ctx();
}

static inline void store_output(void* y, int y_dtype, int64_t index, float value) {
    if (y_dtype == DT_F32) ((float*)y)[index] = value;
    else ((uint16_t*)y)[index] = f32_to_bf16(value);
}

// Activations as fp32 rows: x itself, or x converted into scratch slot `base`.
const float* activations_f32(const LinearArgs& a, int base);

// Activations as int8 blocks in their natural order (scratch slots base .. base + 3):
// q [m, k], d and s [m, k/32] (see quantize_activation_row).
struct ActBlocks { const int8_t* q; const float* d; const int32_t* s; };
ActBlocks activation_blocks(const LinearArgs& a, int base);

// The code paths' planners (p.args is set); each returns 0, or -1 for a layout it lacks.
int plan_scalar(Plan& p, int base);
int plan_avx2(Plan& p, int base);
int plan_avx512(Plan& p, int base);
int plan_avx512_bf16(Plan& p, int base);
int plan_amx(Plan& p, int base);

// Rows [begin, end) of a quantized weight (GGML's blocks or an interleaved form) to fp32 or
// bf16 rows of k (dtype), as dequantize_row does them, with AVX-512 (CPUs that have it).
void dequantize_rows_avx512(int layout, const uint8_t* w, int64_t k, int64_t begin, int64_t end, void* out,
                            int dtype);

// Whether this process may use the AMX tile unit (asks Linux once; false where not built).
bool amx_usable();

}  // namespace llama
