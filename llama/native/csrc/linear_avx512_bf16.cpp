// AVX-512 BF16 path: bf16 weights times bf16 activations with VDPBF16PS (pairs of bf16
// products summed into fp32 lanes, exactly as a wider multiply would). Everything else
// (fp32 activations, other layouts) goes to the AVX-512 path.
#include "tiling.h"

namespace llama {
namespace {

constexpr int MT = 4;           // rows of x per tile
constexpr int STREAM_ROWS = 4;  // up to this many x rows: one weight row at a time (see linear_avx512.cpp)
constexpr int WIDE = 4;         // else tiles of this many weight rows

template <int NT, int R>
inline void tile(const LinearArgs& a, const uint8_t* const rows[NT], int64_t m0, float out[MT][NT]) {
    constexpr int U = NT == 1 ? 4 : 1;  // steps of 32 weights in flight
    __m512 acc[R][NT][U];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NT; c++)
            for (int u = 0; u < U; u++) acc[r][c][u] = _mm512_setzero_ps();
    const uint16_t* x = (const uint16_t*)a.x + m0 * a.k;
    const int64_t ahead = NT * row_bytes(BF16, a.k);
    auto step = [&](int64_t j, int u) __attribute__((always_inline)) {
        __m512bh w[NT];
        for (int c = 0; c < NT; c++) {
            if constexpr (NT > 1) _mm_prefetch((const char*)rows[c] + ahead + 2 * j, _MM_HINT_T0);
            w[c] = (__m512bh)_mm512_loadu_si512((const uint16_t*)rows[c] + j);
        }
        for (int r = 0; r < R; r++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * a.k + j);
            for (int c = 0; c < NT; c++) acc[r][c][u] = _mm512_dpbf16_ps(acc[r][c][u], xv, w[c]);
        }
    };
    unrolled<U>(a.k, 32, step);
    reduce_tile(acc, out, [](__m512 x, __m512 y) { return _mm512_add_ps(x, y); },
                [](__m512 x) { return _mm512_reduce_add_ps(x); });
}

template <int NT>
void tiles(const LinearArgs& a, int64_t begin, int64_t end) {
    for_each_tile<NT, MT>(a, begin, end, [&](const uint8_t* const rows[NT], int64_t m0, int r, float out[MT][NT]) {
        switch (r) {
            case 1: tile<NT, 1>(a, rows, m0, out); break;
            case 2: tile<NT, 2>(a, rows, m0, out); break;
            case 3: tile<NT, 3>(a, rows, m0, out); break;
            default: tile<NT, 4>(a, rows, m0, out); break;
        }
    });
}

void column_range(const void* vctx, int64_t begin, int64_t end) {
    const LinearArgs& a = **(const LinearArgs* const*)vctx;
    if (a.m <= STREAM_ROWS) tiles<1>(a, begin, end);
    else tiles<WIDE>(a, begin, end);
}

}  // namespace

int plan_avx512_bf16(Plan& p, int base) {
    if (p.args.layout != BF16 || p.args.x_dtype != DT_BF16) return plan_avx512(p, base);
    plan_context<const LinearArgs*>(p) = &p.args;
    p.fn = column_range;
    p.count = column_groups(p.args.n);
    return 0;
}

}  // namespace llama
