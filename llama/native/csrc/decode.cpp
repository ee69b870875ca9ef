// One decode step of a LLaMA transformer in a single native call (model-parallel size 1,
// CPU): embedding, then per layer RMSNorm, q/k/v projections, interleaved-pair rotary
// (Meta's layout), KV-cache write at each row's own position, attention over the cache
// (kept in fp32 or bf16) with grouped-query heads, wo and the residual, RMSNorm, SwiGLU, w2
// and the residual; then the final norm and the output projection.
//
// It all runs in one OpenMP parallel region on torch's thread team: the matmuls split
// their output columns across threads (each thread prepares the activations itself),
// attention splits its (row, group of heads) tasks, norms and SiLU their rows and chunks,
// with barriers between phases. No Python, no per-op dispatch.
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <type_traits>

#include "attention.h"
#include "linear.h"

namespace llama {

struct Matrix {
    const void* w;   // [n, row_bytes(layout, k)]
    int64_t n, k;
    int32_t layout;
    int32_t path;    // the native code path that runs it
};

struct LayerWeights {
    const void* attention_norm;  // [dim], param_dtype
    const void* ffn_norm;        // [dim], param_dtype
    Matrix wq, wk, wv, wo, w1, w2, w3;
    void* cache_k;               // [max_batch, max_seq, n_kv_heads, head_dim], cache_dtype
    void* cache_v;
};

struct ModelWeights {
    int64_t dim, n_layers, n_heads, n_kv_heads, head_dim, hidden, vocab, max_batch, max_seq;
    float norm_eps;
    int32_t param_dtype;   // of the embedding and norm weights: DT_F32 or DT_BF16
    int32_t act_dtype;     // DT_BF16: activations rounded where a bf16 PyTorch model rounds them
    const void* tok_embeddings;  // [vocab, dim], param_dtype
    const void* norm;            // [dim], param_dtype
    Matrix output;
    const float* rope;           // [max_seq, head_dim / 2, 2]: cos, sin of each position's angles
    const LayerWeights* layers;
    int32_t cache_dtype;         // of the KV cache: DT_F32 or DT_BF16 (half the bytes a step reads)
    int32_t path;                // the newest code path this CPU runs: from AVX512_BF16 on, attention
                                 // over a bf16 cache runs on VDPBF16PS (decode_attention_bf16)
};

namespace {

inline float load_param(const void* p, int dtype, int64_t i) {
    return dtype == DT_F32 ? ((const float*)p)[i] : bf16_to_f32(((const uint16_t*)p)[i]);
}

inline float round_to(int dtype, float v) { return dtype == DT_BF16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

// A KV-cache element: fp32, or bf16 (stored rounded to nearest even, as PyTorch's .to() does).
inline float cache_load(const float* p, int64_t i) { return p[i]; }
inline float cache_load(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
inline void cache_store(float* p, int64_t i, float v) { p[i] = v; }
inline void cache_store(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }

// A thread's buffers for attention tasks (sized in step_all).
struct AttentionScratch {
    float* scores;   // [heads_per_task, max_seq]
    float* out;      // [heads_per_task, head_dim]
    float* acc;      // [heads_per_task, head_dim]
    uint16_t* half;  // [heads_per_task, head_dim + max_seq + 1]
};

// Barriers between phases; FOR_EACH shares a loop's iterations across the team (and ends
// in a barrier).
#ifdef _OPENMP
#define BARRIER _Pragma("omp barrier")
#define FOR_EACH(var, count) _Pragma("omp for schedule(static)") for (int64_t var = 0; var < (count); var++)
#else
#define BARRIER
#define FOR_EACH(var, count) for (int64_t var = 0; var < (count); var++)
#endif

struct Step {
    const ModelWeights& m;
    int64_t batch;
    const int64_t* positions;  // [batch]: each token's position
    const int64_t* rows;       // [batch]: each token's cache row
    bool bf16;  // emulate a bf16 model's rounding
    // activations: h is the residual stream (fp32, rounded to bf16 in a bf16 model)
    float *h, *q, *k, *v, *tmp, *gate, *up;
    void *xn, *att, *act;  // matmul inputs, in the activation dtype

    int xdt() const { return bf16 ? DT_BF16 : DT_F32; }

    void store_act(void* dst, int64_t i, float value) const {
        if (bf16) ((uint16_t*)dst)[i] = f32_to_bf16(value);
        else ((float*)dst)[i] = value;
    }

    // Row b: h += tmp (the last sublayer's output) if `add`, then
    // xn = RMSNorm(h) * weight, as F.rms_norm(h.float()).type_as(h) * weight does.
    void add_and_norm(int64_t b, bool add, const void* weight) const {
        const bool bf16_weight = m.param_dtype == DT_BF16;  // each loop compiled per dtype: it vectorizes
        if (bf16) bf16_weight ? add_and_norm_as<DT_BF16, DT_BF16>(b, add, weight) : add_and_norm_as<DT_BF16, DT_F32>(b, add, weight);
        else bf16_weight ? add_and_norm_as<DT_F32, DT_BF16>(b, add, weight) : add_and_norm_as<DT_F32, DT_F32>(b, add, weight);
    }

    template <int XDT, int PDT>
    void add_and_norm_as(int64_t b, bool add, const void* weight) const {
        const int64_t d = m.dim;
        float* x = h + b * d;
        const float* t = tmp + b * d;
        if (add) {
#pragma omp simd
            for (int64_t i = 0; i < d; i++) x[i] = round_to(XDT, x[i] + round_to(XDT, t[i]));
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < d; i++) ss += x[i] * x[i];
        const float inv = 1.0f / std::sqrt(ss / (float)d + m.norm_eps);
        using Act = std::conditional_t<XDT == DT_BF16, uint16_t, float>;
        Act* out = (Act*)xn + b * d;
#pragma omp simd
        for (int64_t i = 0; i < d; i++) {
            const float value = round_to(XDT, round_to(XDT, x[i] * inv) * load_param(weight, PDT, i));
            if constexpr (XDT == DT_BF16) out[i] = f32_to_bf16(value);
            else out[i] = value;
        }
    }

    // Every thread: y_i = x @ W_i^T (fp32) for up to 3 matrices sharing x. Each thread
    // prepares x itself, into its own scratch (the same work at the same time as one
    // thread doing it for all), so no thread waits for another before the matmuls start.
    void matmuls(std::initializer_list<const Matrix*> mats, const void* x, std::initializer_list<float*> ys) const {
        const int count = (int)mats.size();
        Plan plans[3];
        for (int i = 0; i < count; i++) {
            const Matrix& w = *mats.begin()[i];
            const LinearArgs a{w.layout, batch, w.n, w.k, x, xdt(), (const uint8_t*)w.w, ys.begin()[i], DT_F32, 0};
            plan_linear(plans[i], a, w.path, i * SLOTS_PER_PLAN);
        }
        run(plans, count);
        BARRIER
    }

    // Every thread: its share of the planned matmuls' units (no barrier).
    static void run(const Plan* plans, int count) {
        int64_t total = 0;
        for (int i = 0; i < count; i++) total += plans[i].count;
#ifdef _OPENMP
        const int64_t team = omp_get_num_threads(), id = omp_get_thread_num();
#else
        const int64_t team = 1, id = 0;
#endif
        const int64_t per = (total + team - 1) / team, begin = id * per, end = std::min(total, begin + per);
        int64_t offset = 0;
        for (int i = 0; i < count; i++) {
            const int64_t lo = std::max(begin, offset), hi = std::min(end, offset + plans[i].count);
            if (lo < hi) plans[i].fn(plans[i].ctx, lo - offset, hi - offset);
            offset += plans[i].count;
        }
    }

    // Rotate pairs (x[2i], x[2i+1]) by the angles of position pos, as complex numbers.
    void rotate(float* x, int64_t pos) const {
        const float* cs = m.rope + pos * m.head_dim;  // (cos, sin) per pair
        for (int64_t i = 0; i < m.head_dim / 2; i++) {
            const float re = x[2 * i], im = x[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
            x[2 * i] = re * c - im * s;
            x[2 * i + 1] = re * s + im * c;
        }
    }

    // Task t < batch * n_heads rotates a query head; the rest rotate a key head and write
    // it, with its value head, into the cache at the row's position.
    void rope_and_cache(const LayerWeights& lw, int64_t t) const {
        const int64_t hd = m.head_dim, qheads = batch * m.n_heads;
        if (t < qheads) {
            float* x = q + t * hd;
            for (int64_t i = 0; i < hd; i++) x[i] = round_to(xdt(), x[i]);
            rotate(x, positions[t / m.n_heads]);
            return;
        }
        t -= qheads;
        const int64_t b = t / m.n_kv_heads, kvh = t % m.n_kv_heads, pos = positions[b];
        float* x = k + t * hd;
        for (int64_t i = 0; i < hd; i++) x[i] = round_to(xdt(), x[i]);
        rotate(x, pos);
        const int64_t slot = ((rows[b] * m.max_seq + pos) * m.n_kv_heads + kvh) * hd;
        if (m.cache_dtype == DT_BF16) write_cache((uint16_t*)lw.cache_k, (uint16_t*)lw.cache_v, slot, x, v + t * hd);
        else write_cache((float*)lw.cache_k, (float*)lw.cache_v, slot, x, v + t * hd);
    }

    template <typename C>
    void write_cache(C* keys, C* values, int64_t slot, const float* key, const float* value) const {
        for (int64_t i = 0; i < m.head_dim; i++) {
            cache_store(keys, slot + i, key[i]);
            cache_store(values, slot + i, round_to(xdt(), value[i]));
        }
    }

    // Attention tasks: each takes `heads_per_task` consecutive query heads of one token, so
    // that it reads each cached position's keys and values of their KV heads (adjacent in
    // the cache) once, in one pass over the row: as many heads as still give every thread
    // two tasks or more.
    int64_t heads_per_task = 1;

    void plan_attention(int64_t team) {
        heads_per_task = 1;
        for (int64_t g = m.n_heads; g > 1; g--)
            if (m.n_heads % g == 0 && batch * (m.n_heads / g) >= 2 * team) {
                heads_per_task = g;
                break;
            }
    }

    int64_t attention_tasks() const { return batch * m.n_heads / heads_per_task; }

    // For query heads h0 .. h0 + G - 1 (G = heads_per_task) of token b:
    // softmax(q . K / sqrt(D)) . V over the token's cache row, slots 0 .. positions[b], each
    // head on its KV head's keys and values, in this thread's buffers.
    void attend(const LayerWeights& lw, int64_t task, const AttentionScratch& buf) const {
        if (m.cache_dtype == DT_BF16) attend_as((const uint16_t*)lw.cache_k, (const uint16_t*)lw.cache_v, task, buf);
        else attend_as((const float*)lw.cache_k, (const float*)lw.cache_v, task, buf);
    }

    template <typename C>  // the cache's element type: each loop compiled per type, so that it vectorizes
    void attend_as(const C* cache_k, const C* cache_v, int64_t task, const AttentionScratch& buf) const {
        const int64_t hd = m.head_dim, G = heads_per_task, tasks_per_token = m.n_heads / G;
        const int64_t b = task / tasks_per_token, h0 = task % tasks_per_token * G, group = m.n_heads / m.n_kv_heads;
        const int64_t first_kv = h0 / group, last_kv = (h0 + G - 1) / group;
        const int64_t len = positions[b] + 1, ms = m.max_seq, stride = m.n_kv_heads * hd;
        const int64_t span = (last_kv - first_kv + 1) * hd, ahead = 8 * stride;  // prefetch 8 slots ahead
        const float* qv = q + (b * m.n_heads + h0) * hd;
        const C* keys = cache_k + rows[b] * m.max_seq * stride;
        const C* values = cache_v + rows[b] * m.max_seq * stride;
        const float scale = 1.0f / std::sqrt((float)hd);
        float *scores = buf.scores, *out = buf.out;
#ifdef LLAMA_X86
        if constexpr (std::is_same_v<C, uint16_t>) {
            if (m.path >= AVX512_BF16 && hd % 32 == 0) {
                const DecodeAttentionArgs args{qv, keys, values, m.n_kv_heads, group, hd, h0, G, len, scale,
                                               scores, ms, buf.half, buf.acc, out};
                decode_attention_bf16(args);
                for (int64_t i = 0; i < G * hd; i++) store_act(att, (b * m.n_heads + h0) * hd + i, out[i]);
                return;
            }
        }
#endif
        for (int64_t s = 0; s < len; s++) {
            const C* ks = keys + s * stride;
            for (int64_t i = 0; i < span; i += 64 / sizeof(C)) __builtin_prefetch(ks + first_kv * hd + ahead + i);
            for (int64_t g = 0; g < G; g++) {
                const float* qg = qv + g * hd;
                const C* kv = ks + (h0 + g) / group * hd;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t i = 0; i < hd; i++) dot += qg[i] * cache_load(kv, i);
                scores[g * ms + s] = dot * scale;
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float* sg = scores + g * ms;
            float top = -INFINITY, total = 0.0f;
            for (int64_t s = 0; s < len; s++) top = std::max(top, sg[s]);
#pragma omp simd reduction(+ : total)
            for (int64_t s = 0; s < len; s++) total += (sg[s] = exp_approx(sg[s] - top));
            const float inv = 1.0f / total;
#pragma omp simd
            for (int64_t s = 0; s < len; s++) sg[s] *= inv;
            for (int64_t i = 0; i < hd; i++) out[g * hd + i] = 0.0f;
        }
        for (int64_t s = 0; s < len; s++) {
            const C* vs = values + s * stride;
            for (int64_t i = 0; i < span; i += 64 / sizeof(C)) __builtin_prefetch(vs + first_kv * hd + ahead + i);
            for (int64_t g = 0; g < G; g++) {
                const float p = scores[g * ms + s];
                const C* vv = vs + (h0 + g) / group * hd;
                float* og = out + g * hd;
#pragma omp simd
                for (int64_t i = 0; i < hd; i++) og[i] += p * cache_load(vv, i);
            }
        }
        for (int64_t i = 0; i < G * hd; i++) store_act(att, (b * m.n_heads + h0) * hd + i, out[i]);
    }

    static constexpr int64_t CHUNK = 512;  // elements of the SwiGLU per task
    int64_t swiglu_chunks() const { return (batch * m.hidden + CHUNK - 1) / CHUNK; }

    void swiglu(int64_t chunk) const {  // act = silu(gate) * up
        const int64_t begin = chunk * CHUNK, end = std::min(batch * m.hidden, (chunk + 1) * CHUNK);
        const float *g = gate, *u = up;
        if (bf16) {  // the loop once per activation dtype, so that each vectorizes
            uint16_t* out = (uint16_t*)act;
#pragma omp simd
            for (int64_t i = begin; i < end; i++) {
                const float gi = round_to(DT_BF16, g[i]);
                out[i] = f32_to_bf16(round_to(DT_BF16, gi / (1.0f + exp_approx(-gi))) * round_to(DT_BF16, u[i]));
            }
        } else {
            float* out = (float*)act;
#pragma omp simd
            for (int64_t i = begin; i < end; i++) out[i] = g[i] / (1.0f + exp_approx(-g[i])) * u[i];
        }
    }
};

void step_all(Step& st, const int64_t* tokens, float* logits) {
    const ModelWeights& m = st.m;
    FOR_EACH(b, st.batch)
        for (int64_t i = 0; i < m.dim; i++) st.h[b * m.dim + i] = load_param(m.tok_embeddings, m.param_dtype, tokens[b] * m.dim + i);
    // this thread's attention buffers
    const int64_t heads = st.heads_per_task;
    float* scores = (float*)scratch(sizeof(float) * heads * m.max_seq, SCRATCH_SLOTS - 2);
    float* out = (float*)scratch(sizeof(float) * 2 * heads * m.head_dim, SCRATCH_SLOTS - 6);
    uint16_t* half = (uint16_t*)scratch(sizeof(uint16_t) * heads * (m.head_dim + m.max_seq + 1), SCRATCH_SLOTS - 7);
    const AttentionScratch buf{scores, out, out + heads * m.head_dim, half};
    for (int64_t l = 0; l < m.n_layers; l++) {
        const LayerWeights& lw = m.layers[l];
        FOR_EACH(b, st.batch) st.add_and_norm(b, l > 0, lw.attention_norm);
        st.matmuls({&lw.wq, &lw.wk, &lw.wv}, st.xn, {st.q, st.k, st.v});
        FOR_EACH(t, st.batch * (m.n_heads + m.n_kv_heads)) st.rope_and_cache(lw, t);
        FOR_EACH(t, st.attention_tasks()) st.attend(lw, t, buf);
        st.matmuls({&lw.wo}, st.att, {st.tmp});
        FOR_EACH(b, st.batch) st.add_and_norm(b, true, lw.ffn_norm);
        st.matmuls({&lw.w1, &lw.w3}, st.xn, {st.gate, st.up});
        FOR_EACH(c, st.swiglu_chunks()) st.swiglu(c);
        st.matmuls({&lw.w2}, st.act, {st.tmp});
    }
    FOR_EACH(b, st.batch) st.add_and_norm(b, true, m.norm);
    st.matmuls({&m.output}, st.xn, {logits});
}

}  // namespace
}  // namespace llama

using namespace llama;

// Built twice (see build.py): for any CPU, and with AVX-512 enabled, which the first uses
// where the CPU has it.
#ifdef LLAMA_DECODE_AVX512
#define DECODE_STEP llama_decode_step_avx512
#else
#define DECODE_STEP llama_decode_step
#if defined(LLAMA_X86)
extern "C" int llama_decode_step_avx512(const ModelWeights*, int64_t, const int64_t*, const int64_t*,
                                        const int64_t*, float*, int);
#endif
#endif

extern "C" {

// logits [batch, vocab] (fp32) for one new token per row: tokens [batch] at positions [batch]
// (each below max_seq) in cache rows `rows` [batch] (distinct, below max_batch; null: rows
// 0 .. batch-1). Token b attends to slots 0 .. positions[b] of its row. Returns 0, or -3
// for shapes the step does not handle.
int DECODE_STEP(const ModelWeights* m, int64_t batch, const int64_t* tokens, const int64_t* positions,
                const int64_t* rows, float* logits, int threads) {
#if defined(LLAMA_X86) && !defined(LLAMA_DECODE_AVX512)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma"))
        return llama_decode_step_avx512(m, batch, tokens, positions, rows, logits, threads);
#endif
    if (batch < 1 || batch > m->max_batch || m->head_dim > 512 || m->head_dim % 2 ||
        m->n_heads % m->n_kv_heads || (m->cache_dtype != DT_F32 && m->cache_dtype != DT_BF16))
        return -3;
    for (int64_t b = 0; b < batch; b++)
        if (positions[b] < 0 || positions[b] >= m->max_seq || tokens[b] < 0 || tokens[b] >= m->vocab) return -3;
    int64_t* own_rows = (int64_t*)scratch(sizeof(int64_t) * batch, SCRATCH_SLOTS - 5);
    for (int64_t b = 0; b < batch; b++) {
        own_rows[b] = rows ? rows[b] : b;
        if (own_rows[b] < 0 || own_rows[b] >= m->max_batch) return -3;
        for (int64_t c = 0; c < b; c++)
            if (own_rows[c] == own_rows[b]) return -3;  // two tokens would write one cache slot
    }
    const bool bf16 = m->act_dtype == DT_BF16;
    const int64_t qd = m->n_heads * m->head_dim, kvd = m->n_kv_heads * m->head_dim, es = bf16 ? 2 : 4;
    // Buffers of the calling thread, reused across steps.
    float* f = (float*)scratch(sizeof(float) * batch * (2 * m->dim + qd + 2 * kvd + 2 * m->hidden), SCRATCH_SLOTS - 3);
    uint8_t* a = (uint8_t*)scratch(es * batch * (m->dim + qd + m->hidden), SCRATCH_SLOTS - 4);
    Step st{*m, batch, positions, own_rows, bf16,
            f, f + batch * m->dim, f + batch * (m->dim + qd), f + batch * (m->dim + qd + kvd),
            f + batch * (m->dim + qd + 2 * kvd), f + batch * (2 * m->dim + qd + 2 * kvd),
            f + batch * (2 * m->dim + qd + 2 * kvd + m->hidden),
            a, a + es * batch * m->dim, a + es * batch * (m->dim + qd)};
#ifdef _OPENMP
    const bool team = threads != 1 && !omp_in_parallel();
    st.plan_attention(team ? omp_get_max_threads() : 1);
#pragma omp parallel if (team)
#else
    st.plan_attention(1);
#endif
    step_all(st, tokens, logits);
    return 0;
}

}  // extern "C"
