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

// One block of 32 activations: q = round(x / d) (halves away from zero, like roundf),
// d = max|x| / 127, s = sum(q); the same numbers as quantize_activation_row.
inline void quantize_block(const float* x, int8_t* q, float* d, int32_t* s) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float scale = _mm_cvtss_f32(m4) / 127.0f, inv = scale != 0.0f ? 1.0f / scale : 0.0f;
    __m256i qi[4], sum = _mm256_setzero_si256();
    for (int i = 0; i < 4; i++) {
        const __m256 r = _mm256_mul_ps(v[i], _mm256_set1_ps(inv));
        __m256 t = _mm256_round_ps(r, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        const __m256 up = _mm256_cmp_ps(_mm256_andnot_ps(sign_bit, _mm256_sub_ps(r, t)), _mm256_set1_ps(0.5f), _CMP_GE_OQ);
        const __m256 away = _mm256_or_ps(_mm256_set1_ps(1.0f), _mm256_and_ps(r, sign_bit));  // +-1
        t = _mm256_add_ps(t, _mm256_and_ps(up, away));
        qi[i] = _mm256_cvttps_epi32(t);
        sum = _mm256_add_epi32(sum, qi[i]);
    }
    // int32 -> int8; the packs interleave 128-bit lanes, the permute restores the order
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
    _mm256_storeu_si256((__m256i*)q, _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    *d = scale;
    *s = _mm_cvtsi128_si32(s4);
}

struct Ctx {
    const LinearArgs* a;
    const float* xf;                                    // float layouts
    const int8_t* q; const float* d; const int32_t* s;  // quantized: x as int8 blocks
};

// Up to MT_FLOAT rows of x, one weight row at a time with 4 loads in flight (one sequential
// stream, see linear_avx512.cpp); more rows share each x load across NT weight rows.
template <int L, int W, int R>
inline void float_tile(const Ctx& c, const uint8_t* const rows[W], int64_t m0, float out[][W]) {
    constexpr int U = W == 1 ? 4 : 1;
    const LinearArgs& a = *c.a;
    __m256 acc[R][W][U];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < W; j++)
            for (int u = 0; u < U; u++) acc[r][j][u] = _mm256_setzero_ps();
    auto step = [&](int64_t k, int u) __attribute__((always_inline)) {
        __m256 w[W];
        for (int j = 0; j < W; j++) {
            if constexpr (L == F32) w[j] = _mm256_loadu_ps((const float*)rows[j] + k);
            else w[j] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
                    _mm_loadu_si128((const __m128i*)((const uint16_t*)rows[j] + k))), 16));
        }
        for (int r = 0; r < R; r++) {
            const __m256 x = _mm256_loadu_ps(c.xf + (m0 + r) * a.k + k);
            for (int j = 0; j < W; j++) acc[r][j][u] = _mm256_fmadd_ps(w[j], x, acc[r][j][u]);
        }
    };
    unrolled<U>(a.k, 8, step);
    reduce_tile(acc, out, [](__m256 x, __m256 y) { return _mm256_add_ps(x, y); }, hsum);
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

template <int L, int W>
void float_tiles(const Ctx& c, int64_t begin, int64_t end) {
    for_each_tile<W, MT_FLOAT>(*c.a, begin, end, [&](const uint8_t* const rows[W], int64_t m0, int r,
                                                      float out[MT_FLOAT][W]) {
        if (r == 1) float_tile<L, W, 1>(c, rows, m0, out);
        else float_tile<L, W, 2>(c, rows, m0, out);
    });
}

template <int L>
void float_range(const void* vctx, int64_t begin, int64_t end) {
    const Ctx& c = *(const Ctx*)vctx;
    if (c.a->m <= MT_FLOAT) float_tiles<L, 1>(c, begin, end);
    else float_tiles<L, NT>(c, begin, end);
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
    const float* xf = activations_f32(a, base);
    const int64_t nb = a.k / QK;
    int8_t* q = (int8_t*)scratch(a.m * a.k, base + 1);
    float* d = (float*)scratch(sizeof(float) * a.m * nb, base + 2);
    int32_t* s = (int32_t*)scratch(sizeof(int32_t) * a.m * nb, base + 3);
    for (int64_t i = 0; i < a.m * nb; i++) quantize_block(xf + i * QK, q + i * QK, d + i, s + i);
    c.q = q; c.d = d; c.s = s;
    switch (a.layout) {
        case Q8_0: p.fn = quant_range<Q8_0>; return 0;
        case Q4_0: p.fn = quant_range<Q4_0>; return 0;
        case Q4_1: p.fn = quant_range<Q4_1>; return 0;
    }
    return -1;
}

}  // namespace llama
