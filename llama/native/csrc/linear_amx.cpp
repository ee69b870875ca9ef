// AMX path (Intel Sapphire Rapids and later): bf16 weights times bf16 activations on the
// tile unit, fp32 accumulation. Everything else (fp32 activations, other layouts) goes to
// the AVX-512 BF16 path.
//
// The product is computed transposed, y^T [N, M] = W [N, K] . x^T [K, M], so that the
// weights are the tiles' A operand and load straight from their rows (16 rows of 32 bf16 a
// tile, strided), and only x, a few KB, is repacked: into B's pair layout,
// xp[k / 2][m][k % 2], once per matmul. A step of 32 weights per row runs two A tiles
// (32 weight rows) against one or two B tiles (up to 32 rows of x).
//
// Built with AMX flags only where the compiler has them (see build.py); otherwise this
// file builds to a stub and the path is never offered.
#include "linear.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>

namespace llama {
namespace {

constexpr int TILE_ROWS = 16;   // weight rows per A tile, and x rows per B tile
constexpr int UNIT_ROWS = 32;   // weight rows per unit of work: two A tiles
constexpr int KSTEP = 32;       // weights per A tile row (64 bytes)

struct TileConfig {
    uint8_t palette = 1, start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "the tile configuration is 64 bytes");

// Tiles: 0..3 accumulators C[n block][m block] (index 2 * mb + nb), 4 and 5 the two A
// (weight) tiles, 6 and 7 the B (x) tiles.
struct AmxCtx {
    const LinearArgs* a;
    const uint16_t* xp;   // [k / 2][mpad][2]
    int64_t mpad;         // 16 or 32
    int mblocks;          // 1 or 2
    TileConfig config;
};

// Accumulator tile c [16 weight rows][16 x rows] (fp32) -> y[m0 + m][n0 .. n0 + 15] for the
// first ms rows of x: one column of the tile (a gather) per row of y.
void store_block(const LinearArgs& a, const float* c, int64_t n0, int64_t m0, int64_t ms) {
    const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(TILE_ROWS));
    for (int64_t m = 0; m < ms; m++) {
        const __m512 v = _mm512_i32gather_ps(column, c + m, 4);
        const int64_t at = (m0 + m) * a.n + n0;
        if (a.y_dtype == DT_F32) {
            _mm512_storeu_ps((float*)a.y + at, v);
        } else {  // round to nearest even, as f32_to_bf16; NaN stays NaN
            const __m512i u = _mm512_castps_si512(v);
            const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
            __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
            const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                         _mm512_set1_epi32(0x7f800000));
            r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
            _mm256_storeu_si256((__m256i*)((uint16_t*)a.y + at), _mm512_cvtepi32_epi16(r));
        }
    }
}

// Weight rows n0 .. n0 + 31 against every row of x.
template <int MB>
inline void unit(const AmxCtx& c, int64_t n0) {
    const LinearArgs& a = *c.a;
    const uint16_t* w = (const uint16_t*)a.w;
    const int64_t stride = 2 * a.k, bstride = 4 * c.mpad;
    _tile_zero(0); _tile_zero(1);
    if (MB == 2) { _tile_zero(2); _tile_zero(3); }
    for (int64_t j = 0; j < a.k; j += KSTEP) {
        _tile_stream_loadd(4, w + n0 * a.k + j, stride);
        _tile_stream_loadd(5, w + (n0 + TILE_ROWS) * a.k + j, stride);
        _tile_loadd(6, c.xp + (j / 2) * c.mpad * 2, bstride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if (MB == 2) {
            _tile_loadd(7, c.xp + (j / 2) * c.mpad * 2 + TILE_ROWS * 2, bstride);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    alignas(64) float out[TILE_ROWS * TILE_ROWS];
    const int64_t m_first = std::min<int64_t>(a.m, TILE_ROWS);
    _tile_stored(0, out, 64); store_block(a, out, n0, 0, m_first);
    _tile_stored(1, out, 64); store_block(a, out, n0 + TILE_ROWS, 0, m_first);
    if (MB == 2) {
        _tile_stored(2, out, 64); store_block(a, out, n0, TILE_ROWS, a.m - TILE_ROWS);
        _tile_stored(3, out, 64); store_block(a, out, n0 + TILE_ROWS, TILE_ROWS, a.m - TILE_ROWS);
    }
}

// The last rows of W when N is not a multiple of 32, one dot product at a time.
void tail_rows(const AmxCtx& c, int64_t n0) {
    const LinearArgs& a = *c.a;
    for (int64_t n = n0; n < a.n; n++) {
        const uint16_t* row = (const uint16_t*)a.w + n * a.k;
        for (int64_t m = 0; m < a.m; m++) {
            const uint16_t* x = (const uint16_t*)a.x + m * a.k;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t j = 0; j < a.k; j += 32)
                acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x + j), (__m512bh)_mm512_loadu_si512(row + j));
            store_output(a.y, a.y_dtype, m * a.n + n, _mm512_reduce_add_ps(acc));
        }
    }
}

void unit_range(const void* vctx, int64_t begin, int64_t end) {
    const AmxCtx& c = *(const AmxCtx*)vctx;
    const int64_t full = c.a->n / UNIT_ROWS;
    _tile_loadconfig(&c.config);  // per thread: tile state is the thread's own
    for (int64_t u = begin; u < std::min(end, full); u++) {
        if (c.mblocks == 2) unit<2>(c, u * UNIT_ROWS);
        else unit<1>(c, u * UNIT_ROWS);
    }
    _tile_release();
    if (end > full) tail_rows(c, full * UNIT_ROWS);
}

}  // namespace

// Asks Linux for the tile data state (once per process): without it the first tile
// instruction faults.
bool amx_usable() {
    static const bool granted = [] {
        constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
        return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }();
    return granted;
}

int plan_amx(Plan& p, int base) {
    const LinearArgs& a = p.args;
    if (a.layout != BF16 || a.x_dtype != DT_BF16 || a.m > 2 * TILE_ROWS) return plan_avx512_bf16(p, base);
    AmxCtx& c = plan_context<AmxCtx>(p);
    c.a = &p.args;
    c.mblocks = a.m > TILE_ROWS ? 2 : 1;
    c.mpad = TILE_ROWS * c.mblocks;
    // x -> xp[k / 2][mpad][2], rows past m zero: per pair of columns of x, a gather of 16 rows.
    uint32_t* xp = (uint32_t*)scratch(sizeof(uint32_t) * (a.k / 2) * c.mpad, base);
    const int32_t* x = (const int32_t*)a.x;  // pairs of bf16
    const __m512i row_starts = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                  _mm512_set1_epi32((int32_t)(a.k / 2)));
    for (int mb = 0; mb < c.mblocks; mb++) {
        const int64_t rows = std::min<int64_t>(TILE_ROWS, a.m - mb * TILE_ROWS);
        const __mmask16 present = (__mmask16)((1u << rows) - 1);
        const int32_t* block = x + mb * TILE_ROWS * (a.k / 2);
        for (int64_t kp = 0; kp < a.k / 2; kp++)
            _mm512_storeu_si512(xp + kp * c.mpad + mb * TILE_ROWS,
                                _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), present, row_starts, block + kp, 4));
    }
    c.xp = (const uint16_t*)xp;
    const uint16_t first = (uint16_t)(4 * std::min<int64_t>(a.m, TILE_ROWS)), second = (uint16_t)(4 * (a.m - TILE_ROWS));
    for (int t = 0; t < 4; t++) {  // accumulators: 16 weight rows x (rows of x) fp32
        c.config.rows[t] = TILE_ROWS;
        c.config.colsb[t] = t < 2 ? first : (c.mblocks == 2 ? second : 0);
        if (c.config.colsb[t] == 0) c.config.rows[t] = 0;
    }
    for (int t = 4; t < 6; t++) { c.config.rows[t] = TILE_ROWS; c.config.colsb[t] = 2 * KSTEP; }
    c.config.rows[6] = KSTEP / 2; c.config.colsb[6] = first;
    if (c.mblocks == 2) { c.config.rows[7] = KSTEP / 2; c.config.colsb[7] = second; }
    p.fn = unit_range;
    p.count = (a.n + UNIT_ROWS - 1) / UNIT_ROWS;
    return 0;
}

}  // namespace llama

#else  // no AMX in this compiler

namespace llama {
bool amx_usable() { return false; }
int plan_amx(Plan& p, int base) { return plan_avx512_bf16(p, base); }
}  // namespace llama

#endif
