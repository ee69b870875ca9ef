// Quantization in GGML's block formats, scalar and portable.
#pragma once

#include "common.h"

namespace llama {

// One row of k floats (k a multiple of 32) -> k/32 blocks of `layout` (Q8_0, Q4_0, Q4_1),
// rounding exactly as ggml-quants.c and the gguf package do.
void quantize_row(int layout, const float* x, int64_t k, uint8_t* out);

// k/32 blocks of `layout` -> k floats.
void dequantize_row(int layout, const uint8_t* in, int64_t k, float* out);

// 16 rows of base-layout blocks (rows, [16, row_bytes]) -> one group of interleaved
// `layout` (Q8_0_X16, Q4_0_X16, Q4_1_X16; see common.h), or back when `inverse`.
void interleave_group(int layout, uint8_t* rows, int64_t k, uint8_t* group, bool inverse);

// Activations for the quantized matmuls: per block of 32, q = round(x / d) with
// d = max|x| / 127 (fp32), and s = sum of q. q: [k], d and s: [k/32].
void quantize_activation_row(const float* x, int64_t k, int8_t* q, float* d, int32_t* s);

}  // namespace llama
