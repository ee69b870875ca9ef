// AVX2 path (AVX2, FMA, F16C), for x86 CPUs without AVX-512. Float layouts: FMA in fp32.
// Quantized layouts: int8 activation blocks and 16-bit multiply-adds (VPMADDUBSW, the
// sign trick making one operand unsigned), one fp32 FMA per block.
#include <type_traits>

#include "tiling.h"

namespace llama {
namespace {

constexpr int NT = 4;        // columns per tile
constexpr int MT_FLOAT = 2;  // x rows per tile, float layouts
constexpr int MT_QUANT = 1;  // x rows per tile, quantized layouts (16 registers only)

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

struct Ctx {
    const LinearArgs* a;
    const float* xf;                                    // float layouts
    const int8_t* q; const float* d; const int32_t* s;  // quantized: x as int8 blocks
};

template <int L, int R>
inline void float_tile(const Ctx& c, const uint8_t* const rows[NT], int64_t m0, float out[][NT]) {
    const LinearArgs& a = *c.a;
    __m256 acc[R][NT];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NT; j++) acc[r][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < a.k; k += 8) {
        __m256 w[NT];
        for (int j = 0; j < NT; j++) {
            if constexpr (L == F32) w[j] = _mm256_loadu_ps((const float*)rows[j] + k);
            else w[j] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
                    _mm_loadu_si128((const __m128i*)((const uint16_t*)rows[j] + k))), 16));
        }
        for (int r = 0; r < R; r++) {
            const __m256 x = _mm256_loadu_ps(c.xf + (m0 + r) * a.k + k);
            for (int j = 0; j < NT; j++) acc[r][j] = _mm256_fmadd_ps(w[j], x, acc[r][j]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NT; j++) out[r][j] = hsum(acc[r][j]);
}

template <int L>
inline void quant_tile(const Ctx& c, const uint8_t* const rows[NT], int64_t m, float out[][NT]) {
    const LinearArgs& a = *c.a;
    const int64_t nb = a.k / QK;
    const int8_t* xq = c.q + m * a.k;
    const float* xd = c.d + m * nb;
    const int32_t* xs = c.s + m * nb;
    const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0f), eight = _mm256_set1_epi8(8);
    __m256 acc[NT];
    float offset[NT] = {};  // Q4_1: sum of m * dx * sum(qx)
    for (int j = 0; j < NT; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256i x = _mm256_loadu_si256((const __m256i*)(xq + b * QK));
        for (int j = 0; j < NT; j++) {
            __m256i w, sx;
            float dw;
            if constexpr (L == Q8_0) {
                const BlockQ8_0& blk = ((const BlockQ8_0*)rows[j])[b];
                dw = _cvtsh_ss(blk.d);
                w = _mm256_loadu_si256((const __m256i*)blk.qs);
            } else {
                using B = std::conditional_t<L == Q4_0, BlockQ4_0, BlockQ4_1>;
                const B& blk = ((const B*)rows[j])[b];
                dw = _cvtsh_ss(blk.d);
                const __m128i q = _mm_loadu_si128((const __m128i*)blk.qs);
                w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), low4);  // lo | hi nibbles
                if constexpr (L == Q4_0) w = _mm256_sub_epi8(w, eight);
                else offset[j] += _cvtsh_ss(blk.m) * (xd[b] * (float)xs[b]);
            }
            if constexpr (L == Q4_1) {
                sx = x;  // nibbles are already unsigned
            } else {     // |w| * (x with w's sign): the same products, first operand unsigned
                sx = _mm256_sign_epi8(x, w);
                w = _mm256_sign_epi8(w, w);
            }
            const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w, sx), ones);
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * xd[b]), acc[j]);
        }
    }
    for (int j = 0; j < NT; j++) out[0][j] = hsum(acc[j]) + offset[j];
}

template <int L>
void float_range(const void* vctx, int64_t begin, int64_t end) {
    const Ctx& c = *(const Ctx*)vctx;
    for_each_tile<NT, MT_FLOAT>(*c.a, begin, end, [&](const uint8_t* const rows[NT], int64_t m0, int r,
                                                       float out[MT_FLOAT][NT]) {
        if (r == 1) float_tile<L, 1>(c, rows, m0, out);
        else float_tile<L, 2>(c, rows, m0, out);
    });
}

template <int L>
void quant_range(const void* vctx, int64_t begin, int64_t end) {
    const Ctx& c = *(const Ctx*)vctx;
    for_each_tile<NT, MT_QUANT>(*c.a, begin, end, [&](const uint8_t* const rows[NT], int64_t m0, int,
                                                       float out[MT_QUANT][NT]) {
        quant_tile<L>(c, rows, m0, out);
    });
}

}  // namespace

int plan_avx2(Plan& p, int base) {
    Ctx& c = plan_context<Ctx>(p);
    const LinearArgs& a = p.args;
    c.a = &p.args;
    p.count = column_groups(a.n);
    if (a.layout == F32 || a.layout == BF16) {
        c.xf = activations_f32(a, base);
        p.fn = a.layout == F32 ? float_range<F32> : float_range<BF16>;
        return 0;
    }
    const ActBlocks x = activation_blocks(a, base);
    c.q = x.q; c.d = x.d; c.s = x.s;
    switch (a.layout) {
        case Q8_0: p.fn = quant_range<Q8_0>; return 0;
        case Q4_0: p.fn = quant_range<Q4_0>; return 0;
        case Q4_1: p.fn = quant_range<Q4_1>; return 0;
    }
    return -1;
}

}  // namespace llama
