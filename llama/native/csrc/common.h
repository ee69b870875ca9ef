// Shared definitions of the native kernels: weight layouts, code paths, small helpers.
//
// Weight layouts are GGML's (GGUF) block formats, byte for byte, so a GGUF tensor can be
// used as it is. A row of K weights is K/32 blocks:
//   Q8_0: fp16 d, int8 q[32]                    value = q * d
//   Q4_0: fp16 d, uint8 nibbles[16]              value = (q - 8) * d
//   Q4_1: fp16 d, fp16 m, uint8 nibbles[16]      value = q * d + m
// where byte j of the nibbles holds element j in its low nibble and element j + 16 in its
// high nibble. BF16 and F32 rows are plain arrays.
//
// The interleaved layouts (Q8_0_X16, Q4_0_X16, Q4_1_X16) hold the same blocks reordered at
// load for the AVX-512 kernels, 16 rows at a time, so that one 512-bit load holds 4 bytes
// of each of 16 rows and the integer dot products land one row per lane (no horizontal sums).
// A group of 16 rows takes the bytes of 16 rows of its base layout, block after block: the
// block's 16 scales (fp16 d of rows 0..15; Q4_1: then their 16 fp16 m), then its quantized
// bytes in chunks of 4 per row: chunk c = bytes 4c..4c+3 of rows 0..15 (one sequential
// stream: measured faster than the scales apart). Q8_0_X16 stores q + 128 (unsigned, as
// VPDPBUSD takes it). N must be a multiple of 16.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#define LLAMA_X86 1
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace llama {

enum Layout : int { F32 = 0, BF16 = 1, Q8_0 = 2, Q4_0 = 3, Q4_1 = 4, Q8_0_X16 = 5, Q4_0_X16 = 6, Q4_1_X16 = 7 };
constexpr int LAST_LAYOUT = Q4_1_X16;
constexpr int GROUP_ROWS = 16;  // rows of an interleaved group

static inline bool interleaved(int layout) { return layout >= Q8_0_X16 && layout <= Q4_1_X16; }
// The block format of a layout (an interleaved layout's blocks are its base's).
static inline int base_layout(int layout) { return interleaved(layout) ? layout - Q8_0_X16 + Q8_0 : layout; }
enum Path : int { SCALAR = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3, AMX = 4 };
enum DType : int { DT_F32 = 0, DT_BF16 = 1 };

constexpr int QK = 32;  // weights per block

struct BlockQ8_0 { uint16_t d; int8_t qs[QK]; };
struct BlockQ4_0 { uint16_t d; uint8_t qs[QK / 2]; };
struct BlockQ4_1 { uint16_t d, m; uint8_t qs[QK / 2]; };
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20,
              "GGML block sizes");

// Bytes of one row of k weights in a layout.
static inline size_t row_bytes(int layout, int64_t k) {
    switch (base_layout(layout)) {
        case F32: return 4 * (size_t)k;
        case BF16: return 2 * (size_t)k;
        case Q8_0: return sizeof(BlockQ8_0) * (size_t)(k / QK);
        case Q4_0: return sizeof(BlockQ4_0) * (size_t)(k / QK);
        case Q4_1: return sizeof(BlockQ4_1) * (size_t)(k / QK);
    }
    return 0;
}

// ---- scalar conversions (portable) ------------------------------------------------------

static inline float bits_to_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

static inline float bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

// Round to nearest even, as torch does; NaN stays NaN. Branch-free, so loops over it vectorize.
static inline uint16_t f32_to_bf16(float f) {
    const uint32_t u = f32_to_bits(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet_nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// e^x for the decode step's softmax and SiLU, branch-free so that loops over it vectorize
// (std::exp is a library call per element): x = n ln2 + r with |r| <= ln2 / 2, e^r by its
// Taylor polynomial to degree 7, 2^n from exponent bits. Within 2 ulp of expf for x in
// [-87.3, 88.3]; outside, x is clamped (1.2e-38 for e^-100, not 0). NaN stays NaN.
static inline float exp_approx(float x) {
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.3f ? 88.3f : x;
    const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const float n = (x * 1.44269504088896341f + shifter) - shifter;
    const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-06f;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720; p = p * r + 1.0f / 120; p = p * r + 1.0f / 24; p = p * r + 1.0f / 6;
    p = p * r + 0.5f; p = p * r + 1.0f; p = p * r + 1.0f;
    return p * bits_to_f32((uint32_t)((int32_t)n + 127) << 23);
}

// IEEE half -> float, for any value (subnormals included).
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return bits_to_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {  // zero or subnormal: man * 2^-24
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
}

// float -> IEEE half, round to nearest even (numpy's astype(float16)).
static inline uint16_t f32_to_f16(float f) {
    uint32_t u = f32_to_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;                   // NaN
    if (a >= 0x477ff000u) return sign | 0x7c00u;                  // overflow -> inf
    if (a < 0x38800000u) {                                        // subnormal or zero
        float v = bits_to_f32(a) * 16777216.0f;                   // scale by 2^24, then round
        float r = __builtin_nearbyintf(v);                        // ties to even (default mode)
        return sign | (uint16_t)r;
    }
    uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
    return sign | (uint16_t)((rounded - 0x38000000u) >> 13);
}

}  // namespace llama
