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

}  // namespace llama
