// A prompt's causal attention in bf16 with VDPBF16PS (AVX512-BF16), flash-attention style:
// per query head, 4 query rows at a time walk the keys in blocks of 64 up to the diagonal,
// with an online softmax in fp32. Keys and values are first reordered (per key/value head)
// into the pair layouts VDPBF16PS reads, so that both products are dense:
//   keys:   [head_dim/2][keys][2]  lane j of a load = key j's two elements  -> scores of 16 keys
//   values: [keys/2][head_dim][2]  lane d of a load = element d of two keys -> 16 output elements
// Scores and the output accumulate in fp32; probabilities enter the second product as bf16.
#include <algorithm>
#include <cmath>

#include "attention.h"
#include "linear.h"

namespace llama {
namespace {

constexpr int KEYS = 64;  // keys per block
constexpr int ROWS = 4;   // query rows per tile
constexpr int MAX_HEAD_DIM = 256;

inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }
inline __m512bh pair_of(const uint16_t* p) { return as_bh(_mm512_set1_epi32(*(const int32_t*)p)); }

// e^x for 16 lanes, as exp_approx in common.h (x clamped to [-87.3, 88.3]).
inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    return _mm512_scalef_ps(p, n);
}

// Lane j of the result: the sum of v[j]'s 16 lanes (a transposing tree: 15 adds, 30 shuffles).
inline __m512 sum16(const __m512* v) {
    __m512 a[8], c[4], e[2];
    for (int i = 0; i < 8; i++)  // per 128-bit lane: x0+x2, y0+y2, x1+x3, y1+y3 (x, y = v[2i], v[2i+1])
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)  // per 128-bit lane: that lane's sums of v[4i] .. v[4i + 3]
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; i++)  // 128-bit lanes: v[8i..8i+3] over lanes 0-1, then 2-3; v[8i+4..8i+7] alike
        e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(e[0], e[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

struct Packed {
    const uint32_t* keys;    // per (batch, kv head): [head_dim/2][padded] pairs of bf16
    const uint32_t* values;  // per (batch, kv head): [padded/2][head_dim] pairs of bf16
    int64_t padded;          // keys rounded up to a block
};

void pack_head(const AttentionArgs& a, const Packed& p, int64_t b, int64_t g) {
    const int64_t d2n = a.head_dim / 2, bg = b * a.kv_heads + g;
    uint32_t* keys = (uint32_t*)p.keys + bg * d2n * p.padded;
    uint32_t* values = (uint32_t*)p.values + bg * (p.padded / 2) * a.head_dim;
    for (int64_t s = 0; s < p.padded; s++) {
        const uint32_t* k = (const uint32_t*)(a.k + b * a.k_batch + s * a.k_token + g * a.head_dim);
        for (int64_t d2 = 0; d2 < d2n; d2++) keys[d2 * p.padded + s] = s < a.seqlen ? k[d2] : 0;
    }
    for (int64_t s2 = 0; s2 < p.padded / 2; s2++) {
        const int64_t s = 2 * s2;
        const uint16_t* v0 = a.v + b * a.v_batch + s * a.v_token + g * a.head_dim;
        const uint16_t* v1 = v0 + a.v_token;
        uint32_t* out = values + s2 * a.head_dim;
        for (int64_t d = 0; d < a.head_dim; d++)
            out[d] = (s < a.seqlen ? v0[d] : 0) | (uint32_t)(s + 1 < a.seqlen ? v1[d] : 0) << 16;
    }
}

// Query rows i0 .. i0 + ROWS - 1 of head h in batch item b (rows past the prompt are
// computed on a copy of its last row and not written).
void attend_rows(const AttentionArgs& a, const Packed& p, int64_t b, int64_t h, int64_t i0) {
    const int64_t dim = a.head_dim, d2n = dim / 2, g = h / (a.heads / a.kv_heads), bg = b * a.kv_heads + g;
    const uint32_t* keys = p.keys + bg * d2n * p.padded;
    const uint32_t* values = p.values + bg * (p.padded / 2) * dim;
    const uint16_t* q[ROWS];
    for (int r = 0; r < ROWS; r++)
        q[r] = a.q + b * a.q_batch + std::min(i0 + r, a.seqlen - 1) * a.q_token + h * dim;
    alignas(64) float o[ROWS][MAX_HEAD_DIM];
    alignas(64) uint16_t probs[ROWS][KEYS];
    float m[ROWS], l[ROWS];
    for (int r = 0; r < ROWS; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        std::fill(o[r], o[r] + dim, 0.0f);
    }
    const int64_t last = i0 + ROWS - 1;  // the last key any row here sees
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t j0 = 0; j0 <= last && j0 < a.seqlen; j0 += KEYS) {
        __m512 s[ROWS][4];
        for (int r = 0; r < ROWS; r++)
            for (int v = 0; v < 4; v++) s[r][v] = _mm512_setzero_ps();
        for (int64_t d2 = 0; d2 < d2n; d2++) {
            const uint32_t* kd = keys + d2 * p.padded + j0;
            __m512bh kv[4];
            for (int v = 0; v < 4; v++) kv[v] = as_bh(_mm512_loadu_si512(kd + 16 * v));
            for (int r = 0; r < ROWS; r++) {
                const __m512bh qp = pair_of(q[r] + 2 * d2);
                for (int v = 0; v < 4; v++) s[r][v] = _mm512_dpbf16_ps(s[r][v], qp, kv[v]);
            }
        }
        for (int r = 0; r < ROWS; r++) {  // online softmax of this block's scores
            const __m512i seen = _mm512_set1_epi32((int)(i0 + r - j0));  // keys j0 .. i0 + r
            __mmask16 visible[4];
            __m512 top = _mm512_set1_ps(-INFINITY);
            for (int v = 0; v < 4; v++) {
                visible[v] = _mm512_cmple_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32(16 * v)), seen);
                s[r][v] = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), visible[v], s[r][v], _mm512_set1_ps(a.scale));
                top = _mm512_max_ps(top, s[r][v]);
            }
            const float high = std::max(m[r], _mm512_reduce_max_ps(top));
            const float alpha = std::exp(m[r] - high);  // 0 at the first block
            __m512 sum = _mm512_setzero_ps();
            for (int v = 0; v < 4; v++) {
                const __m512 e = _mm512_maskz_mov_ps(visible[v], exp16(_mm512_sub_ps(s[r][v], _mm512_set1_ps(high))));
                sum = _mm512_add_ps(sum, e);
                _mm256_storeu_si256((__m256i*)(probs[r] + 16 * v), (__m256i)_mm512_cvtneps_pbh(e));
            }
            l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
            m[r] = high;
            if (alpha != 1.0f)
                for (int64_t d = 0; d < dim; d += 16)
                    _mm512_store_ps(o[r] + d, _mm512_mul_ps(_mm512_load_ps(o[r] + d), _mm512_set1_ps(alpha)));
        }
        const int64_t pairs = (std::min<int64_t>(KEYS, last - j0 + 1) + 1) / 2;  // past the diagonal: zeros
        for (int64_t d0 = 0; d0 < dim; d0 += 64) {
            __m512 acc[ROWS][4];
            for (int r = 0; r < ROWS; r++)
                for (int v = 0; v < 4; v++) acc[r][v] = _mm512_load_ps(o[r] + d0 + 16 * v);
            for (int64_t k2 = 0; k2 < pairs; k2++) {
                const uint32_t* vd = values + (j0 / 2 + k2) * dim + d0;
                __m512bh vv[4];
                for (int v = 0; v < 4; v++) vv[v] = as_bh(_mm512_loadu_si512(vd + 16 * v));
                for (int r = 0; r < ROWS; r++) {
                    const __m512bh pp = pair_of(probs[r] + 2 * k2);
                    for (int v = 0; v < 4; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], pp, vv[v]);
                }
            }
            for (int r = 0; r < ROWS; r++)
                for (int v = 0; v < 4; v++) _mm512_store_ps(o[r] + d0 + 16 * v, acc[r][v]);
        }
    }
    for (int r = 0; r < ROWS && i0 + r < a.seqlen; r++) {
        uint16_t* out = a.out + ((b * a.seqlen + i0 + r) * a.heads + h) * dim;
        const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
        for (int64_t d = 0; d < dim; d += 16)
            _mm256_storeu_si256((__m256i*)(out + d), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(o[r] + d), inv)));
    }
}

}  // namespace

int causal_attention_bf16(const AttentionArgs& a) {
    if (a.head_dim % 64 || a.head_dim > MAX_HEAD_DIM || a.heads % a.kv_heads) return -1;
    Packed p;
    p.padded = (a.seqlen + KEYS - 1) / KEYS * KEYS;
    const size_t per_head = sizeof(uint32_t) * (a.head_dim / 2) * p.padded;  // keys; values the same
    p.keys = (const uint32_t*)scratch(per_head * a.batch * a.kv_heads, SCRATCH_SLOTS - 3);
    p.values = (const uint32_t*)scratch(per_head * a.batch * a.kv_heads, SCRATCH_SLOTS - 4);
    const int64_t heads = a.batch * a.kv_heads, tiles = (a.seqlen + ROWS - 1) / ROWS;
    const int64_t tasks = a.batch * a.heads * tiles;
#pragma omp parallel if (a.threads != 1)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < heads; i++) pack_head(a, p, i / a.kv_heads, i % a.kv_heads);
        // the longest rows first, taken one at a time, so that no thread ends long after the rest
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            const int64_t tile = tiles - 1 - t / (a.batch * a.heads), bh = t % (a.batch * a.heads);
            attend_rows(a, p, bh / a.heads, bh % a.heads, tile * ROWS);
        }
    }
    return 0;
}

// ---- a decode step's attention over a bf16 KV cache ----------------------------------------
// Keys and values are read in place (no reordering: each is read once per step), 16
// positions at a time, so that a block's cache lines are all taken while they are in L1
// (software prefetching measured no faster on the AMD EPYC, where it was written):
//   scores: VDPBF16PS of a bf16 query with a key row leaves 16 pair sums per position; 16
//           positions' sums are folded into one vector of 16 scores (sum16);
//   values: rows s and s+1 interleaved (unpacklo/hi) give pairs (V[s][d], V[s+1][d]) for
//           VDPBF16PS against the pair (p[s], p[s+1]); the accumulators hold the dims in
//           that interleaved order until the end.

int decode_attention_bf16(const DecodeAttentionArgs& a) {
    const int64_t hd = a.head_dim, G = a.heads, len = a.len, stride = a.kv_heads * hd;
    if (hd % 32 || len < 1) return -1;
    const int64_t first_kv = a.h0 / a.group, last_kv = (a.h0 + G - 1) / a.group;
    const int64_t pairs = (len + 1) / 2 * 2;  // probabilities per head, padded with a zero to pairs
    uint16_t* qb = a.scratch16;               // [G, hd] bf16 queries
    uint16_t* pb = qb + G * hd;               // [G, pairs] bf16 probabilities
    for (int64_t i = 0; i < G * hd; i++) qb[i] = f32_to_bf16(a.q[i]);
    const __m512 scale = _mm512_set1_ps(a.scale);

    // scores[g][s] = scale * q_g . K[s]
    for (int64_t s0 = 0; s0 < len; s0 += 16) {
        const int64_t n = std::min<int64_t>(16, len - s0);
        for (int64_t kvh = first_kv; kvh <= last_kv; kvh++) {
            const uint16_t* row[16];  // past the last position: the last one again (its lanes are not kept)
            for (int r = 0; r < 16; r++) row[r] = a.keys + (s0 + std::min<int64_t>(r, n - 1)) * stride + kvh * hd;
            const int64_t g_end = std::min(G, (kvh + 1) * a.group - a.h0);
            for (int64_t g = std::max<int64_t>(0, kvh * a.group - a.h0); g < g_end; g++) {
                __m512 part[16];
                for (int r = 0; r < 16; r++) part[r] = _mm512_setzero_ps();
                for (int64_t d = 0; d < hd; d += 32) {
                    const __m512bh qd = as_bh(_mm512_loadu_si512(qb + g * hd + d));
                    for (int r = 0; r < 16; r++)
                        part[r] = _mm512_dpbf16_ps(part[r], qd, as_bh(_mm512_loadu_si512(row[r] + d)));
                }
                _mm512_mask_storeu_ps(a.scores + g * a.score_stride + s0, (__mmask16)((1u << n) - 1),
                                      _mm512_mul_ps(sum16(part), scale));
            }
        }
    }

    // softmax in fp32; the probabilities rounded to bf16
    auto lanes = [len](int64_t s) { return (__mmask16)((1u << std::min<int64_t>(16, len - s)) - 1); };
    for (int64_t g = 0; g < G; g++) {
        float* sg = a.scores + g * a.score_stride;
        __m512 top = _mm512_set1_ps(-INFINITY);
        for (int64_t s = 0; s < len; s += 16) top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, lanes(s), sg + s));
        const __m512 high = _mm512_set1_ps(_mm512_reduce_max_ps(top));
        __m512 total = _mm512_setzero_ps();
        for (int64_t s = 0; s < len; s += 16) {
            const __mmask16 k = lanes(s);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sg + s), high));
            total = _mm512_add_ps(total, _mm512_maskz_mov_ps(k, e));
            _mm512_mask_storeu_ps(sg + s, k, e);
        }
        const float inv = 1.0f / _mm512_reduce_add_ps(total);
        for (int64_t s = 0; s < len; s++) pb[g * pairs + s] = f32_to_bf16(sg[s] * inv);
        if (pairs > len) pb[g * pairs + len] = 0;
    }

    // acc[g] = sum over s of p_g[s] V[s], in interleaved dim order
    for (int64_t i = 0; i < G * hd; i++) a.acc[i] = 0.0f;
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t s0 = 0; s0 < len; s0 += 16) {
        const int64_t end = std::min(s0 + 16, len);
        for (int64_t kvh = first_kv; kvh <= last_kv; kvh++) {
            const int64_t g_begin = std::max<int64_t>(0, kvh * a.group - a.h0);
            const int64_t g_end = std::min(G, (kvh + 1) * a.group - a.h0);
            for (int64_t g0 = g_begin; g0 < g_end; g0 += 4) {
                const int nh = (int)std::min<int64_t>(4, g_end - g0);
                for (int64_t d0 = 0; d0 < hd; d0 += 64) {
                    const int nc = (int)std::min<int64_t>(2, (hd - d0) / 32);  // 32-dim chunks here
                    __m512 acc[4][4];  // [head][lo0, hi0, lo1, hi1]
                    for (int h = 0; h < 4; h++)
                        for (int j = 0; j < 4; j++)
                            acc[h][j] = h < nh && j < 2 * nc ? _mm512_loadu_ps(a.acc + (g0 + h) * hd + d0 + 16 * j)
                                                             : _mm512_setzero_ps();
                    for (int64_t s = s0; s < end; s += 2) {
                        const uint16_t* v0 = a.values + s * stride + kvh * hd + d0;
                        __m512bh pairs_of[4];
                        for (int c = 0; c < 2; c++) {
                            if (c >= nc) break;
                            const __m512i x = _mm512_loadu_si512(v0 + 32 * c);
                            const __m512i y = s + 1 < len ? _mm512_loadu_si512(v0 + stride + 32 * c) : zero;
                            pairs_of[2 * c] = as_bh(_mm512_unpacklo_epi16(x, y));
                            pairs_of[2 * c + 1] = as_bh(_mm512_unpackhi_epi16(x, y));
                        }
                        for (int h = 0; h < 4; h++) {
                            if (h >= nh) break;
                            const __m512bh p = pair_of(pb + (g0 + h) * pairs + s);
                            for (int j = 0; j < 4; j++)
                                if (j < 2 * nc) acc[h][j] = _mm512_dpbf16_ps(acc[h][j], pairs_of[j], p);
                        }
                    }
                    for (int h = 0; h < nh; h++)
                        for (int j = 0; j < 2 * nc; j++)
                            _mm512_storeu_ps(a.acc + (g0 + h) * hd + d0 + 16 * j, acc[h][j]);
                }
            }
        }
    }
    // back to dim order: in each 32-dim chunk, lane 4L + i of the lo vector is dim 8L + i, of the hi vector 8L + 4 + i
    for (int64_t g = 0; g < G; g++)
        for (int64_t c = 0; c < hd; c += 32)
            for (int half = 0; half < 2; half++)
                for (int lane = 0; lane < 16; lane++)
                    a.out[g * hd + c + 8 * (lane / 4) + 4 * half + lane % 4] = a.acc[g * hd + c + 16 * half + lane];
    return 0;
}

}  // namespace llama
