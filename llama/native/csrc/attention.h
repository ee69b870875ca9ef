// A prompt's causal attention over its own keys (prefill), for bf16 q, k, v: query i sees
// keys 0..i. Grouped heads: query head h reads key/value head h / (heads / kv_heads).
#pragma once

#include "common.h"

namespace llama {

struct AttentionArgs {
    const uint16_t* q;  // [batch, seqlen, heads, head_dim] bf16, with the strides below
    const uint16_t* k;  // [batch, seqlen, kv_heads, head_dim]
    const uint16_t* v;
    uint16_t* out;      // [batch, seqlen, heads, head_dim], contiguous
    int64_t batch, seqlen, heads, kv_heads, head_dim;
    int64_t q_token, k_token, v_token;  // elements from one token to the next (a head's rows are dense)
    int64_t q_batch, k_batch, v_batch;  // elements from one batch item to the next
    float scale;        // applied to q . k
    int threads;        // 1: the calling thread only; otherwise the OpenMP team
};

// head_dim a multiple of 64, at most 256 (else -1). AVX512-BF16 CPUs only.
int causal_attention_bf16(const AttentionArgs& a);

// A decode step's attention for one token over a bf16 KV cache row: query heads h0 ..
// h0 + heads - 1 (consecutive; head h reads KV head h / group) over cached positions
// 0 .. len - 1. As a bf16 model's attention in HF transformers: queries and probabilities
// rounded to bf16, products summed in fp32, the softmax in fp32.
struct DecodeAttentionArgs {
    const float* q;          // [heads, head_dim], rotated
    const uint16_t* keys;    // the row's position 0, KV head 0: [positions][kv_heads][head_dim]
    const uint16_t* values;
    int64_t kv_heads, group, head_dim, h0, heads, len;
    float scale;             // applied to q . k
    float* scores;           // scratch: [heads][score_stride]
    int64_t score_stride;    // >= len
    uint16_t* scratch16;     // scratch: heads * (head_dim + len + 1)
    float* acc;              // scratch: [heads, head_dim]
    float* out;              // [heads, head_dim] fp32
};

// head_dim a multiple of 32 (else -1). AVX512-BF16 CPUs only; the calling thread only.
int decode_attention_bf16(const DecodeAttentionArgs& a);

}  // namespace llama
