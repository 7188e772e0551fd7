// Attention of a few queries over a quantized KV store on the CPU, reading its q8_0/q4_0 blocks in place.
//
// ggml's CPU flash attention has fast paths for f16/f32 K and V only (split over cells for one query,
// tiled matrix multiplies from 64 queries); over a quantized store it walks each query row alone,
// dequantizing every V row once per query head, and splits work by query rows (9 heads on 2 threads: 5
// and 4). Here a thread takes a block of cells of one KV head: each key is dotted with the head group's
// queries as ggml dots them (the query quantized to q8_0, an integer dot per 32-value block), each value
// row is dequantized once for the whole group and added to its accumulators. Partial results of the cell
// blocks are combined by a second op. Many queries (prefill) read the store as f16 once instead and take
// ggml's tiled kernel (graph_attention.cpp); a GPU keeps ggml's flash attention, which reads these
// types itself.
#pragma once
#include <ggml.h>

#include <cstdint>

namespace simkv {

// Spans of at most this many queries read a quantized store with attention_quantized; longer ones read
// it as f16 and take ggml's tiled flash attention (it tiles from GGML_FA_TILE_Q = 64 queries).
constexpr int64_t kDirectMaxQueries = 63;

// Whether attention_quantized reads this pair of K and V types (each q8_0 or q4_0).
bool attention_quantized_reads(ggml_type k, ggml_type v);

// softmax(scale * q k^T + mask) v, as ggml_flash_attn_ext computes it with GGML_PREC_F32.
//   q:    F32 [d, n_head, n_tokens] (any strides: a view of the projected queries)
//   k, v: [d, n_kv, n_head_kv] views of the store (q8_0/q4_0 rows), n_head a multiple of n_head_kv
//   mask: F16 [n_kv (+ n_tail), n_tokens], 0 or -inf (a fully masked row gives zeros, as ggml's does)
//   k_tail, v_tail: optional F16 [d, n_tail, n_head_kv] (any strides) beside the cells: a store's f16
//     residual columns (kv_policy_full.cpp), the mask's last n_tail columns; dotted in f32, their partial
//     sums combined with the cells' as the cells' blocks are combined
// Returns F32 [d, n_head, n_tokens]. portable: ggml's own dot products and dequantization (ggml-cpu's
// type traits) instead of the AVX2 code; the tests compare the two.
ggml_tensor * attention_quantized(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v,
                                  ggml_tensor * mask, float scale, bool portable = false,
                                  ggml_tensor * k_tail = nullptr, ggml_tensor * v_tail = nullptr);

}  // namespace simkv
