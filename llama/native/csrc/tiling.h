// The loop every SIMD path shares: output columns (weight rows) in tiles of NT, x rows in
// tiles of up to MT. Each path's file includes it and gets its own copy (internal
// linkage), compiled with that file's instruction-set flags.
#pragma once

#include <algorithm>

#include "linear.h"

namespace llama {

namespace {

// Threads take contiguous ranges of column groups; a group of GROUP columns is a multiple
// of every tile width, so tiles never straddle two threads.
constexpr int GROUP = 4;

inline int64_t column_groups(int64_t n) { return (n + GROUP - 1) / GROUP; }

// Columns of groups [begin, end), NT at a time. A last, narrower tile repeats its last
// column (the extra results are dropped). tile(rows, m0, r, out) fills out[0:r][0:NT] for
// x rows m0 .. m0 + r - 1, r <= MT.
template <int NT, int MT, class TileFn>
inline void for_each_tile(const LinearArgs& a, int64_t begin, int64_t end, TileFn&& tile) {
    static_assert(GROUP % NT == 0, "tiles must not straddle groups");
    const size_t rb = row_bytes(a.layout, a.k);
    const int64_t last = std::min(a.n, end * GROUP);
    float out[MT][NT];
    for (int64_t n0 = begin * GROUP; n0 < last; n0 += NT) {
        const int cols = (int)std::min<int64_t>(NT, last - n0);
        const uint8_t* rows[NT];
        for (int i = 0; i < NT; i++) rows[i] = a.w + (n0 + std::min(i, cols - 1)) * rb;
        for (int64_t m0 = 0; m0 < a.m; m0 += MT) {
            const int r = (int)std::min<int64_t>(MT, a.m - m0);
            tile(rows, m0, r, out);
            for (int i = 0; i < r; i++)
                for (int j = 0; j < cols; j++) store_output(a.y, a.y_dtype, (m0 + i) * a.n + n0 + j, out[i][j]);
        }
    }
}

// step(j, u) for j = 0, width, 2 * width, ... < k: in groups of U (u = 0 .. U-1, independent
// accumulators, U loads in flight), then the rest one at a time (u = 0).
template <int U, class StepFn>
inline void unrolled(int64_t k, int64_t width, StepFn&& step) {
    int64_t j = 0;
    for (; j + width * U <= k; j += width * U)
        for (int u = 0; u < U; u++) step(j + width * u, u);
    for (; j < k; j += width) step(j, 0);
}

// out[r][c] = the sum over u and over all lanes of acc[r][c][u].
template <int R, int W, int U, class V, class Add, class Lanes>
inline void reduce_tile(V (&acc)[R][W][U], float out[][W], Add add, Lanes lanes) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < W; c++) {
            V sum = acc[r][c][0];
            for (int u = 1; u < U; u++) sum = add(sum, acc[r][c][u]);
            out[r][c] = lanes(sum);
        }
}

}  // namespace
}  // namespace llama
