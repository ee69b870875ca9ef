// Quantize and dequantize rows in GGML's block formats (bit-exact with ggml-quants.c and
// the gguf package), plus the int8 activation blocks that the quantized matmuls use.
#include "quant.h"

#include <cmath>

namespace llama {

static inline float roundf_away(float v) { return std::round(v); }  // halves away from zero

void quantize_row(int layout, const float* x, int64_t k, uint8_t* out) {
    const int64_t nb = k / QK;
    for (int64_t b = 0; b < nb; b++) {
        const float* v = x + b * QK;
        if (layout == Q8_0) {
            BlockQ8_0* blk = (BlockQ8_0*)out + b;
            float amax = 0.0f;
            for (int j = 0; j < QK; j++) amax = std::fmax(amax, std::fabs(v[j]));
            const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            uint16_t dh = f32_to_f16(d);
            std::memcpy(&blk->d, &dh, 2);
            for (int j = 0; j < QK; j++) blk->qs[j] = (int8_t)roundf_away(v[j] * id);
        } else if (layout == Q4_0) {
            BlockQ4_0* blk = (BlockQ4_0*)out + b;
            float amax = 0.0f, max = 0.0f;  // max: the signed value of largest magnitude
            for (int j = 0; j < QK; j++)
                if (std::fabs(v[j]) > amax) { amax = std::fabs(v[j]); max = v[j]; }
            const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            uint16_t dh = f32_to_f16(d);
            std::memcpy(&blk->d, &dh, 2);
            for (int j = 0; j < QK / 2; j++) {
                int lo = (int)std::trunc(v[j] * id + 8.5f), hi = (int)std::trunc(v[j + 16] * id + 8.5f);
                lo = lo < 0 ? 0 : lo > 15 ? 15 : lo;
                hi = hi < 0 ? 0 : hi > 15 ? 15 : hi;
                blk->qs[j] = (uint8_t)(lo | (hi << 4));
            }
        } else {  // Q4_1
            BlockQ4_1* blk = (BlockQ4_1*)out + b;
            float lo_v = v[0], hi_v = v[0];
            for (int j = 1; j < QK; j++) { lo_v = std::fmin(lo_v, v[j]); hi_v = std::fmax(hi_v, v[j]); }
            const float d = (hi_v - lo_v) / 15.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            uint16_t dh = f32_to_f16(d), mh = f32_to_f16(lo_v);
            std::memcpy(&blk->d, &dh, 2);
            std::memcpy(&blk->m, &mh, 2);
            for (int j = 0; j < QK / 2; j++) {
                int lo = (int)std::trunc((v[j] - lo_v) * id + 0.5f);
                int hi = (int)std::trunc((v[j + 16] - lo_v) * id + 0.5f);
                lo = lo < 0 ? 0 : lo > 15 ? 15 : lo;
                hi = hi < 0 ? 0 : hi > 15 ? 15 : hi;
                blk->qs[j] = (uint8_t)(lo | (hi << 4));
            }
        }
    }
}

void dequantize_row(int layout, const uint8_t* in, int64_t k, float* out) {
    const int64_t nb = k / QK;
    for (int64_t b = 0; b < nb; b++) {
        float* o = out + b * QK;
        if (layout == Q8_0) {
            const BlockQ8_0* blk = (const BlockQ8_0*)in + b;
            const float d = f16_to_f32(blk->d);
            for (int j = 0; j < QK; j++) o[j] = (float)blk->qs[j] * d;
        } else if (layout == Q4_0) {
            const BlockQ4_0* blk = (const BlockQ4_0*)in + b;
            const float d = f16_to_f32(blk->d);
            for (int j = 0; j < QK / 2; j++) {
                o[j] = (float)((blk->qs[j] & 15) - 8) * d;
                o[j + 16] = (float)((blk->qs[j] >> 4) - 8) * d;
            }
        } else {  // Q4_1
            const BlockQ4_1* blk = (const BlockQ4_1*)in + b;
            const float d = f16_to_f32(blk->d), m = f16_to_f32(blk->m);
            for (int j = 0; j < QK / 2; j++) {
                o[j] = (float)(blk->qs[j] & 15) * d + m;
                o[j + 16] = (float)(blk->qs[j] >> 4) * d + m;
            }
        }
    }
}

void quantize_activation_row(const float* x, int64_t k, int8_t* q, float* d, int32_t* s) {
    for (int64_t b = 0; b < k / QK; b++) {
        const float* v = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = std::fmax(amax, std::fabs(v[j]));
        const float scale = amax / 127.0f, inv = scale != 0.0f ? 1.0f / scale : 0.0f;
        int32_t sum = 0;
        for (int j = 0; j < QK; j++) {
            const int qv = (int)roundf_away(v[j] * inv);
            q[b * QK + j] = (int8_t)qv;
            sum += qv;
        }
        d[b] = scale;  // kept in fp32 (GGML rounds it to fp16; fp32 is closer to x)
        s[b] = sum;
    }
}

void interleave_group(int layout, uint8_t* rows, int64_t k, uint8_t* group, bool inverse) {
    const int base = base_layout(layout);
    const int64_t nb = k / QK;
    const size_t rb = row_bytes(base, k);
    const int sb = base == Q4_1 ? 4 : 2, qb = base == Q8_0 ? QK : QK / 2;  // per row and block
    const uint8_t flip = base == Q8_0 ? 0x80 : 0;  // int8 q <-> unsigned q + 128
    for (int r = 0; r < GROUP_ROWS; r++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t* blk = rows + r * rb + b * (sb + qb);
            uint8_t* scales = group + b * GROUP_ROWS * (sb + qb);
            uint8_t* chunks = scales + GROUP_ROWS * sb + 4 * r;
            if (inverse) {
                std::memcpy(blk, scales + 2 * r, 2);
                if (base == Q4_1) std::memcpy(blk + 2, scales + 2 * GROUP_ROWS + 2 * r, 2);
                for (int c = 0; c < qb / 4; c++)
                    for (int i = 0; i < 4; i++) blk[sb + 4 * c + i] = chunks[64 * c + i] ^ flip;
            } else {
                std::memcpy(scales + 2 * r, blk, 2);
                if (base == Q4_1) std::memcpy(scales + 2 * GROUP_ROWS + 2 * r, blk + 2, 2);
                for (int c = 0; c < qb / 4; c++)
                    for (int i = 0; i < 4; i++) chunks[64 * c + i] = blk[sb + 4 * c + i] ^ flip;
            }
        }
}

}  // namespace llama
