// One layer's attention alone, on the CPU, over K/V cells given as bytes of a cache type: how the tests
// check simkv's attention kernels against a reference, and how benchmarks/bench_attention.py times them
// against ggml's flash attention. Not on the product's path (the graph builds attention in
// graph_attention.cpp).
#pragma once
#include <ggml.h>

#include <cstdint>
#include <string>
#include <vector>

namespace simkv {

struct AttentionCase {
    int64_t d = 0, n_head = 0, n_head_kv = 0, n_tokens = 0, n_kv = 0;
    const float * q = nullptr;         // [n_tokens][n_head][d]
    ggml_type k_type = GGML_TYPE_F16, v_type = GGML_TYPE_F16;
    const void * k = nullptr;          // n_kv rows of n_head_kv * d values, as a store holds them
    const void * v = nullptr;
    size_t k_bytes = 0, v_bytes = 0;   // the lengths of k and v, checked against the shape
    const float * mask = nullptr;      // [n_tokens][n_kv], 0 or -inf
    float scale = 1.0f;
};

// kernel: "simkv" (attention_quantized.h), "simkv-portable" (the same without AVX2), "dequantized" (the cells
// converted to f32, then ggml's flash attention: the path of many queries), "ggml" (ggml's flash attention
// over the cells as given). Returns the output [n_tokens][n_head][d]; seconds: one entry per repeat (a
// graph computed on a thread pool that lives across the repeats).
std::vector<float> run_attention(const AttentionCase & c, const std::string & kernel, int n_threads, int repeats,
                                 std::vector<double> & seconds);

}  // namespace simkv
