// AVX-512 path (F, BW, VL, DQ, VNNI). Built with those flags only; linear.cpp calls it
// only on CPUs that have them.
//
// Float layouts: weights widened to fp32, FMA with fp32 activations.
// Quantized layouts: activations quantized to int8 per block of 32 (fp32 scale), integer
// dot products with VPDPBUSD (unsigned weights x signed activations), then one fp32 FMA
// per pair of blocks. Two blocks (64 weights) fill one 512-bit register.
#include <algorithm>

#include "tiling.h"

namespace llama {
namespace {

constexpr int MT = 4;  // rows of x per tile

inline __m512 add_vectors(__m512 x, __m512 y) { return _mm512_add_ps(x, y); }
inline float sum_lanes(__m512 x) { return _mm512_reduce_add_ps(x); }

// ---- activations for the quantized layouts ----------------------------------------------
// Per row and per pair of blocks (a = 2p, b = 2p + 1; b is zero when K/32 is odd):
//   q:  64 int8 in the order the weights unpack to (Q8_0: a, b; Q4_x: a[0:16], b[0:16],
//       a[16:32], b[16:32], because a nibble byte holds elements j and j + 16)
//   dv: the activation scale of the block under each of the 16 int32 lanes of a dot product
//   iv: the integer each lane's dot product starts from (a correction, see prepare_activations)
//   sv: Q4_1 only: dx * sum(qx) / 8 under each lane, for the offset (m) term
struct Act {
    int64_t pairs = 0;
    const int8_t* q = nullptr;
    const float* dv = nullptr;
    const int32_t* iv = nullptr;
    const float* sv = nullptr;
};

// Lane i of a 16-lane vector belongs to block a (index 0) or b (index 1).
inline __m512i lane_blocks(int layout) {
    return layout == Q8_0 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                          : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
}

// Two values spread over the lanes of their blocks.
inline __m512 spread(__m512i lanes, __m128 ab) {
    return _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(ab));
}

// One block of 32 activations: q = round(x / d) (halves away from zero, like roundf),
// d = max|x| / 127, s = sum(q).
inline void quantize_block(const float* x, int8_t* q, float* d, int32_t* s) {
    const __m512 v[2] = {_mm512_loadu_ps(x), _mm512_loadu_ps(x + 16)};
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
    const float scale = amax / 127.0f, inv = scale != 0.0f ? 1.0f / scale : 0.0f;
    const __m512 vinv = _mm512_set1_ps(inv), half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    __m512i sum = _mm512_setzero_si512();
    for (int h = 0; h < 2; h++) {
        const __m512 r = _mm512_mul_ps(v[h], vinv);
        __m512 t = _mm512_roundscale_ps(r, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        const __mmask16 up = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(r, t)), half, _CMP_GE_OQ);
        const __m512 away = _mm512_or_ps(one, _mm512_and_ps(r, _mm512_set1_ps(-0.0f)));  // +-1
        t = _mm512_mask_add_ps(t, up, t, away);
        const __m512i qi = _mm512_cvttps_epi32(t);
        sum = _mm512_add_epi32(sum, qi);
        _mm_storeu_si128((__m128i*)(q + 16 * h), _mm512_cvtepi32_epi8(qi));
    }
    *d = scale;
    *s = _mm512_reduce_add_epi32(sum);
}

Act prepare_activations(const LinearArgs& a, int base) {
    const float* xf = activations_f32(a, base);  // scratch slot base when x is bf16
    const int64_t nb = a.k / QK;
    Act act;
    act.pairs = (nb + 1) / 2;
    const int64_t units = a.m * act.pairs;
    int8_t* q = (int8_t*)scratch(64 * units, base + 1);
    float* dv = (float*)scratch(64 * units, base + 2);
    int32_t* iv = (int32_t*)scratch(64 * units, base + 3);
    float* sv = a.layout == Q4_1 ? (float*)scratch(64 * units, base + 4) : nullptr;
    const __m512i lanes = lane_blocks(a.layout);
    alignas(64) int8_t qa[QK], qb[QK];
    for (int64_t m = 0; m < a.m; m++) {
        for (int64_t p = 0; p < act.pairs; p++) {
            const float* x = xf + m * a.k + 2 * p * QK;
            float da = 0.0f, db = 0.0f;
            int32_t sa = 0, sb = 0;
            quantize_block(x, qa, &da, &sa);
            if (2 * p + 1 < nb) quantize_block(x + QK, qb, &db, &sb);
            else std::memset(qb, 0, QK);
            const int64_t u = m * act.pairs + p;
            int8_t* qu = q + 64 * u;
            if (a.layout == Q8_0) {
                std::memcpy(qu, qa, 32); std::memcpy(qu + 32, qb, 32);
            } else {
                std::memcpy(qu, qa, 16); std::memcpy(qu + 16, qb, 16);
                std::memcpy(qu + 32, qa + 16, 16); std::memcpy(qu + 48, qb + 16, 16);
            }
            _mm512_storeu_ps(dv + 16 * u, spread(lanes, _mm_setr_ps(da, db, 0, 0)));
            // Each block spans 8 lanes. Q8_0 weights enter as q + 128, so a lane starts at
            // -16 * sum(qx) (8 lanes: -128 * sum(qx)); Q4_0 weights enter as q for q - 8, so
            // a lane starts at -sum(qx); Q4_1 needs no correction.
            const int ka = a.layout == Q8_0 ? -16 * sa : a.layout == Q4_0 ? -sa : 0;
            const int kb = a.layout == Q8_0 ? -16 * sb : a.layout == Q4_0 ? -sb : 0;
            _mm512_storeu_si512(iv + 16 * u, _mm512_permutexvar_epi32(lanes, _mm512_castsi128_si512(
                _mm_setr_epi32(ka, kb, 0, 0))));
            if (sv) _mm512_storeu_ps(sv + 16 * u, spread(lanes, _mm_setr_ps(da * (float)sa / 8.0f,
                                                                            db * (float)sb / 8.0f, 0, 0)));
        }
    }
    act.q = q; act.dv = dv; act.iv = iv; act.sv = sv;
    return act;
}

// ---- weights of the quantized layouts -----------------------------------------------------
// Blocks 2p and 2p + 1 of a row as 64 unsigned bytes in the activations' order, with
// their scales (and Q4_1 offsets) spread over the lanes. `single`: only block 2p exists.

template <int L> struct Blocks;
template <> struct Blocks<Q8_0> { using T = BlockQ8_0; };
template <> struct Blocks<Q4_0> { using T = BlockQ4_0; };
template <> struct Blocks<Q4_1> { using T = BlockQ4_1; };

template <int L>
inline __m512i weight_pair(const uint8_t* row, int64_t p, bool single, __m512i lanes, __m512* scale, __m512* offset) {
    using B = typename Blocks<L>::T;
    const B* blk = (const B*)row + 2 * p;
    if constexpr (L == Q4_1) {  // d and m side by side: one conversion gives da, ma, db, mb
        uint32_t a, b = 0;
        std::memcpy(&a, &blk[0], 4);
        if (!single) std::memcpy(&b, &blk[1], 4);
        const __m512 dm = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi64_si128((int64_t)a | ((int64_t)b << 32))));
        const __m512i even = _mm512_add_epi32(lanes, lanes);
        *scale = _mm512_permutexvar_ps(even, dm);
        *offset = _mm512_permutexvar_ps(_mm512_add_epi32(even, _mm512_set1_epi32(1)), dm);
    } else {
        const uint16_t db = single ? 0 : blk[1].d;
        *scale = spread(lanes, _mm_cvtph_ps(_mm_cvtsi32_si128((int)blk[0].d | ((int)db << 16))));
    }
    if constexpr (L == Q8_0) {
        const __m256i qa = _mm256_loadu_si256((const __m256i*)blk[0].qs);
        const __m256i qb = single ? _mm256_setzero_si256() : _mm256_loadu_si256((const __m256i*)blk[1].qs);
        const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(qa), qb, 1);
        return _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80));  // int8 q -> uint8 q + 128
    } else {
        const __m128i qa = _mm_loadu_si128((const __m128i*)blk[0].qs);
        const __m128i qb = single ? _mm_setzero_si128() : _mm_loadu_si128((const __m128i*)blk[1].qs);
        const __m256i ab = _mm256_inserti128_si256(_mm256_castsi128_si256(qa), qb, 1);
        const __m512i abab = _mm512_inserti64x4(_mm512_castsi256_si512(ab), ab, 1);
        // low nibbles from the first copy, high nibbles from the second: a_lo, b_lo, a_hi, b_hi
        const __m512i shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
        return _mm512_and_si512(_mm512_srlv_epi16(abab, shifts), _mm512_set1_epi8(0x0f));
    }
}

// Up to STREAM_ROWS rows of x, weight rows are read one at a time (one sequential stream,
// unrolled for loads in flight: what the hardware prefetcher handles best). More rows of x
// share each x load across tiles of WIDE weight rows instead.
constexpr int STREAM_ROWS = 4;
constexpr int WIDE = 4;

template <int L, int NT, int R>
inline void quant_tile(const LinearArgs& a, const Act& act, const uint8_t* const rows[NT], int64_t m0,
                       float out[MT][NT]) {
    constexpr int U = NT == 1 ? 2 : 1;  // pairs of blocks per step
    __m512 acc[R][NT][U];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NT; c++)
            for (int u = 0; u < U; u++) acc[r][c][u] = _mm512_setzero_ps();
    const __m512i lanes = lane_blocks(L);
    const int64_t full = a.k / QK / 2, ahead = NT * row_bytes(L, a.k);
    auto step = [&](int64_t p, int u, bool single) __attribute__((always_inline)) {
        __m512i w[NT];
        __m512 ws[NT], wm[NT];
        for (int c = 0; c < NT; c++) {
            if constexpr (NT > 1) {  // the next tile's rows follow these: fetch them meanwhile
                const char* next = (const char*)rows[c] + ahead + 2 * p * sizeof(typename Blocks<L>::T);
                _mm_prefetch(next, _MM_HINT_T0);
                if constexpr (L == Q8_0) _mm_prefetch(next + 64, _MM_HINT_T0);
            }
            w[c] = weight_pair<L>(rows[c], p, single, lanes, &ws[c], &wm[c]);
        }
        for (int r = 0; r < R; r++) {
            const int64_t i = (m0 + r) * act.pairs + p;
            const __m512i xq = _mm512_loadu_si512(act.q + 64 * i);
            const __m512 dv = _mm512_loadu_ps(act.dv + 16 * i);
            const __m512i iv = _mm512_loadu_si512(act.iv + 16 * i);
            for (int c = 0; c < NT; c++) {
                const __m512i dot = _mm512_dpbusd_epi32(iv, w[c], xq);
                acc[r][c][u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws[c], dv), acc[r][c][u]);
            }
            if constexpr (L == Q4_1) {
                const __m512 sv = _mm512_loadu_ps(act.sv + 16 * i);
                for (int c = 0; c < NT; c++) acc[r][c][u] = _mm512_fmadd_ps(wm[c], sv, acc[r][c][u]);
            }
        }
    };
    int64_t p = 0;
    for (; p + U <= full; p += U)
        for (int u = 0; u < U; u++) step(p + u, u, false);
    for (; p < full; p++) step(p, 0, false);
    if (act.pairs > full) step(full, 0, true);  // an odd block count: the last block alone
    reduce_tile(acc, out, add_vectors, sum_lanes);
}

// ---- float layouts ------------------------------------------------------------------------

template <int L>
inline __m512 widen(const uint8_t* row, int64_t j) {  // 16 weights from element j, as fp32
    if constexpr (L == F32) return _mm512_loadu_ps((const float*)row + j);
    // bf16 -> fp32 is a 16-bit shift
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)row + j))), 16));
}

template <int L, int NT, int R>
inline void float_tile(const LinearArgs& a, const float* xf, const uint8_t* const rows[NT], int64_t m0,
                       float out[MT][NT]) {
    constexpr int U = NT == 1 ? 4 : 1;  // steps of 16 weights in flight
    __m512 acc[R][NT][U];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NT; c++)
            for (int u = 0; u < U; u++) acc[r][c][u] = _mm512_setzero_ps();
    const int64_t ahead = NT * row_bytes(L, a.k);
    auto step = [&](int64_t j, int u) __attribute__((always_inline)) {
        __m512 w[NT];
        for (int c = 0; c < NT; c++) {
            if constexpr (NT > 1)
                if (L == F32 || j % 32 == 0) _mm_prefetch((const char*)rows[c] + ahead + j * (L == F32 ? 4 : 2), _MM_HINT_T0);
            w[c] = widen<L>(rows[c], j);
        }
        for (int r = 0; r < R; r++) {
            const __m512 x = _mm512_loadu_ps(xf + (m0 + r) * a.k + j);
            for (int c = 0; c < NT; c++) acc[r][c][u] = _mm512_fmadd_ps(w[c], x, acc[r][c][u]);
        }
    };
    unrolled<U>(a.k, 16, step);
    reduce_tile(acc, out, add_vectors, sum_lanes);
}

// ---- interleaved layouts (see common.h) ---------------------------------------------------
// One 512-bit load holds 4 weight bytes of each of 16 rows; its dot product with 4
// activation bytes broadcast to every lane gives each row's partial sum in its own lane.
// A block's 16 scales are one fp16 vector. x rows share each weight load, R at a time.

constexpr int XR = 4;  // x rows per pass over a group

// x quantized per block: q [m, k] in natural order, d [m, k/32] and c [m, k/32]: the int32
// each block's dot product starts from (the -8 or -128 offset of the weights times sum(q)).
struct XBlocks {
    const int8_t* q;
    const float* d;
    const int32_t* c;
    const float* s;  // Q4_1: d * sum(q), for the offset term
};

XBlocks prepare_x_blocks(const LinearArgs& a, int base) {
    const float* xf = activations_f32(a, base);
    const int64_t nb = a.k / QK, layout = base_layout(a.layout);
    int8_t* q = (int8_t*)scratch(a.m * a.k, base + 1);
    float* d = (float*)scratch(sizeof(float) * a.m * nb, base + 2);
    int32_t* c = (int32_t*)scratch(sizeof(int32_t) * a.m * nb, base + 3);
    float* s = (float*)scratch(sizeof(float) * a.m * nb, base + 4);
    const int32_t offset = layout == Q8_0 ? -128 : layout == Q4_0 ? -8 : 0;
    for (int64_t i = 0; i < a.m * nb; i++) {
        int32_t sum = 0;
        quantize_block(xf + i * QK, q + i * QK, d + i, &sum);
        c[i] = offset * sum;
        s[i] = d[i] * (float)sum;
    }
    return {q, d, c, s};
}

template <int L, int R>
inline void group_rows(const LinearArgs& a, const XBlocks& x, const uint8_t* group, int64_t m0, __m512 out[XR]) {
    constexpr bool Q8 = L == Q8_0_X16, OFFSET = L == Q4_1_X16;
    constexpr int scale_bytes = OFFSET ? 64 : 32, quant_bytes = Q8 ? 512 : 256;
    const int64_t nb = a.k / QK;
    const int32_t* xw[R];  // x rows as 32-bit words: word 8b + c holds elements 4c .. 4c+3 of block b
    for (int r = 0; r < R; r++) xw[r] = (const int32_t*)(x.q + (m0 + r) * a.k);
    __m512 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0f);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* block = group + b * (scale_bytes + quant_bytes);  // scales, then quants
        const uint8_t* wb = block + scale_bytes;
        __m512i even[R], odd[R];  // two dot-product chains per x row
        for (int r = 0; r < R; r++) {
            even[r] = _mm512_set1_epi32(x.c[(m0 + r) * nb + b]);
            odd[r] = _mm512_setzero_si512();
        }
        if constexpr (Q8) {
            for (int c = 0; c < 8; c += 2) {
                const __m512i w0 = _mm512_loadu_si512(wb + 64 * c), w1 = _mm512_loadu_si512(wb + 64 * c + 64);
                for (int r = 0; r < R; r++) {
                    even[r] = _mm512_dpbusd_epi32(even[r], w0, _mm512_set1_epi32(xw[r][8 * b + c]));
                    odd[r] = _mm512_dpbusd_epi32(odd[r], w1, _mm512_set1_epi32(xw[r][8 * b + c + 1]));
                }
            }
        } else {
            for (int c = 0; c < 4; c++) {  // low nibbles: elements 4c.., high nibbles: 16 + 4c..
                const __m512i w = _mm512_loadu_si512(wb + 64 * c);
                const __m512i lo = _mm512_and_si512(w, low), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
                for (int r = 0; r < R; r++) {
                    even[r] = _mm512_dpbusd_epi32(even[r], lo, _mm512_set1_epi32(xw[r][8 * b + c]));
                    odd[r] = _mm512_dpbusd_epi32(odd[r], hi, _mm512_set1_epi32(xw[r][8 * b + 4 + c]));
                }
            }
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)block));
        for (int r = 0; r < R; r++) {
            const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(even[r], odd[r]));
            acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, _mm512_set1_ps(x.d[(m0 + r) * nb + b])), acc[r]);
        }
        if constexpr (OFFSET) {
            const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(block + 32)));
            for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(x.s[(m0 + r) * nb + b]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = acc[r];
}

struct GroupCtx {
    const LinearArgs* a;
    XBlocks x;
};

template <int L>
void group_range(const void* vctx, int64_t begin, int64_t end) {
    const GroupCtx& c = *(const GroupCtx*)vctx;
    const LinearArgs& a = *c.a;
    const size_t group_bytes = GROUP_ROWS * row_bytes(L, a.k);
    __m512 out[XR];
    for (int64_t g = begin; g < end; g++) {
        const uint8_t* group = a.w + g * group_bytes;
        for (int64_t m0 = 0; m0 < a.m; m0 += XR) {
            const int r = (int)std::min<int64_t>(XR, a.m - m0);
            switch (r) {
                case 1: group_rows<L, 1>(a, c.x, group, m0, out); break;
                case 2: group_rows<L, 2>(a, c.x, group, m0, out); break;
                case 3: group_rows<L, 3>(a, c.x, group, m0, out); break;
                default: group_rows<L, 4>(a, c.x, group, m0, out); break;
            }
            for (int i = 0; i < r; i++) {
                const int64_t at = (m0 + i) * a.n + g * GROUP_ROWS;
                if (a.y_dtype == DT_F32) {
                    _mm512_storeu_ps((float*)a.y + at, out[i]);
                } else {
                    alignas(64) float lanes[GROUP_ROWS];
                    _mm512_store_ps(lanes, out[i]);
                    for (int j = 0; j < GROUP_ROWS; j++) ((uint16_t*)a.y)[at + j] = f32_to_bf16(lanes[j]);
                }
            }
        }
    }
}

// ---- dequantizing (prefill: the weights for PyTorch's GEMM) ---------------------------------

// 16 fp32 lanes -> 16 bf16, round to nearest even; NaN stays NaN (as f32_to_bf16).
inline __m256i to_bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
}

inline void store_values(void* out, int dtype, int64_t at, __m512 lo, __m512 hi) {
    if (dtype == DT_F32) {
        _mm512_storeu_ps((float*)out + at, lo);
        _mm512_storeu_ps((float*)out + at + 16, hi);
    } else {
        _mm256_storeu_si256((__m256i*)((uint16_t*)out + at), to_bf16(lo));
        _mm256_storeu_si256((__m256i*)((uint16_t*)out + at + 16), to_bf16(hi));
    }
}

inline float half_at(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return _cvtsh_ss(h); }
inline int32_t word_at(const uint8_t* p) { int32_t v; std::memcpy(&v, p, 4); return v; }

}  // namespace

void dequantize_rows_avx512(int layout, const uint8_t* w, int64_t k, int64_t begin, int64_t end, void* out,
                            int dtype) {
    const int base = base_layout(layout);
    const bool grouped = interleaved(layout);
    const int64_t nb = k / QK;
    const size_t rb = row_bytes(layout, k), bsz = rb / nb;  // bytes of a row, of one block of a row
    const int sb = base == Q4_1 ? 4 : 2;                      // scale bytes of one block of a row
    for (int64_t r = begin; r < end; r++) {
        const int64_t i = r % GROUP_ROWS;
        for (int64_t b = 0; b < nb; b++) {
            // where row r's block b keeps its d, m and quantized bytes (see common.h)
            const uint8_t *d, *m;
            __m256i q8;
            __m128i q4;
            if (grouped) {
                const uint8_t* block = w + (r - i) * rb + b * GROUP_ROWS * bsz;
                d = block + 2 * i;
                m = block + 2 * GROUP_ROWS + 2 * i;
                const uint8_t* quants = block + GROUP_ROWS * sb + 4 * i;
                if (base == Q8_0)
                    q8 = _mm256_xor_si256(_mm256_setr_epi32(word_at(quants), word_at(quants + 64), word_at(quants + 128),
                                                            word_at(quants + 192), word_at(quants + 256),
                                                            word_at(quants + 320), word_at(quants + 384),
                                                            word_at(quants + 448)),
                                          _mm256_set1_epi8((char)0x80));  // q + 128 -> q
                else
                    q4 = _mm_setr_epi32(word_at(quants), word_at(quants + 64), word_at(quants + 128), word_at(quants + 192));
            } else {
                const uint8_t* block = w + r * rb + b * bsz;
                d = block;
                m = block + 2;
                if (base == Q8_0) q8 = _mm256_loadu_si256((const __m256i*)(block + sb));
                else q4 = _mm_loadu_si128((const __m128i*)(block + sb));
            }
            const __m512 scale = _mm512_set1_ps(half_at(d));
            __m512 lo, hi;
            if (base == Q8_0) {
                lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q8))), scale);
                hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q8, 1))), scale);
            } else {  // byte j: element j in its low nibble, j + 16 in its high one
                const __m128i mask = _mm_set1_epi8(0x0f);
                lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q4, mask)));
                hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q4, 4), mask)));
                if (base == Q4_0) {
                    lo = _mm512_mul_ps(_mm512_sub_ps(lo, _mm512_set1_ps(8.0f)), scale);
                    hi = _mm512_mul_ps(_mm512_sub_ps(hi, _mm512_set1_ps(8.0f)), scale);
                } else {  // q * d + m, rounded after each, as dequantize_row
                    const __m512 offset = _mm512_set1_ps(half_at(m));
                    lo = _mm512_add_ps(_mm512_mul_ps(lo, scale), offset);
                    hi = _mm512_add_ps(_mm512_mul_ps(hi, scale), offset);
                }
            }
            store_values(out, dtype, r * k + b * QK, lo, hi);
        }
    }
}

namespace {

// ---- driver -------------------------------------------------------------------------------

struct Ctx {
    const LinearArgs* a;
    const float* xf;
    Act act;
};

template <int L, int NT, int R>
inline void tile(const Ctx& c, const uint8_t* const rows[NT], int64_t m0, float out[MT][NT]) {
    if constexpr (L == F32 || L == BF16) float_tile<L, NT, R>(*c.a, c.xf, rows, m0, out);
    else quant_tile<L, NT, R>(*c.a, c.act, rows, m0, out);
}

template <int L, int NT>
void tiles(const Ctx& c, int64_t begin, int64_t end) {
    for_each_tile<NT, MT>(*c.a, begin, end, [&](const uint8_t* const rows[NT], int64_t m0, int r, float out[MT][NT]) {
        switch (r) {
            case 1: tile<L, NT, 1>(c, rows, m0, out); break;
            case 2: tile<L, NT, 2>(c, rows, m0, out); break;
            case 3: tile<L, NT, 3>(c, rows, m0, out); break;
            default: tile<L, NT, 4>(c, rows, m0, out); break;
        }
    });
}

template <int L>
void column_range(const void* vctx, int64_t begin, int64_t end) {
    const Ctx& c = *(const Ctx*)vctx;
    if (c.a->m <= STREAM_ROWS) tiles<L, 1>(c, begin, end);
    else tiles<L, WIDE>(c, begin, end);
}

}  // namespace

int plan_avx512(Plan& p, int base) {
    Ctx& c = plan_context<Ctx>(p);
    const LinearArgs& a = p.args;
    c.a = &p.args;
    p.count = column_groups(a.n);
    switch (a.layout) {
        case F32: p.fn = column_range<F32>; c.xf = activations_f32(a, base); return 0;
        case BF16: p.fn = column_range<BF16>; c.xf = activations_f32(a, base); return 0;
        case Q8_0: p.fn = column_range<Q8_0>; break;
        case Q4_0: p.fn = column_range<Q4_0>; break;
        case Q4_1: p.fn = column_range<Q4_1>; break;
        case Q8_0_X16: case Q4_0_X16: case Q4_1_X16: {
            if (a.n % GROUP_ROWS) return -1;
            GroupCtx& g = plan_context<GroupCtx>(p);
            g.a = &p.args;
            g.x = prepare_x_blocks(a, base);
            p.count = a.n / GROUP_ROWS;
            p.fn = a.layout == Q8_0_X16 ? group_range<Q8_0_X16> : a.layout == Q4_0_X16 ? group_range<Q4_0_X16>
                                                                                      : group_range<Q4_1_X16>;
            return 0;
        }
        default: return -1;
    }
    c.act = prepare_activations(a, base);
    return 0;
}

}  // namespace llama
