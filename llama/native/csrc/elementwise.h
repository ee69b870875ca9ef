// A bf16 model's elementwise work between its matmuls, fused into one pass over each row:
// the residual add with RMSNorm, and SwiGLU's SiLU and product. Each rounds to bf16 where
// the PyTorch model (llama/model/transformer.py) rounds: a result differs from PyTorch's
// only where its fp32 sums or e^x (exp_approx, 2 ulp) land on the other side of a bf16
// rounding boundary. AVX-512 CPUs (their own file, compiled with AVX-512 enabled).
#pragma once

#include "common.h"

namespace llama {

// Rows begin .. end - 1 of x [rows, dim] bf16: h = bf16(x + add) where add is given (else
// h = x, not written), then y = bf16(bf16(h * rsqrt(mean(h^2) + eps)) * weight).
void add_rms_norm_rows_avx512(const uint16_t* x, const uint16_t* add, const uint16_t* weight, int64_t dim, float eps,
                              int64_t begin, int64_t end, uint16_t* h, uint16_t* y);

// Rows begin .. end - 1: out [rows, hidden] = bf16(bf16(silu(gate)) * up), gate and up bf16
// with their own row strides (elements).
void swiglu_rows_avx512(const uint16_t* gate, const uint16_t* up, int64_t gate_stride, int64_t up_stride,
                        int64_t hidden, int64_t begin, int64_t end, uint16_t* out);

}  // namespace llama
