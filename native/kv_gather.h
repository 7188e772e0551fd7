// Reading a store's cells for attention: a lazy ring's visible cells as f16 rows (AttnSpan's gathered
// read, kv_cache.h), a pooled span's scattered cells as stored, and a quantized store's cells dequantized
// for a span of many queries on the CPU (once per ubatch, so that ggml's tiled flash attention takes
// them, rather than its row-by-row loop that dequantizes each value row once per query:
// attention_quantized.h).
//
// A ring's gathered cells reach flash attention as f16 rows on every backend. A GPU's flash attention takes
// f16; on the CPU the same rows keep the CPU and a device computing the same attention. With f32 rows on
// the CPU, the one f16 rounding of the dequantized values that a device makes and the CPU did not was
// amplified by every later quantization (of the next lazy layers' K and V, of the activations entering
// q4/q8 weights) into logits up to 7.7 apart on SmolLM2-135M. The rounding itself (2^-11 relative) is 30x
// below q4_0's step and 4x below q8_0's.
//
// ggml's get_rows dequantizes q4_0 with ggml-base's scalar loop and returns f32; on the CPU a ring is
// gathered here instead, straight to f16, with AVX2 where the CPU has it: the values are ggml's
// (d * (q - 8), rounded to nearest even as ggml's f32 -> f16 conversion rounds).
#pragma once
#include <ggml.h>

#include <cstddef>
#include <cstdint>

namespace simkv {

// [store->ne[0], n_rows] of the store's type: rows idx[0..n_rows) copied as they are (on the CPU; elsewhere
// through f32 to f16, which GPU flash attention takes).
ggml_tensor * gather_rows_as_stored(ggml_context * ctx, ggml_tensor * store, ggml_tensor * idx, bool on_cpu);

// A ring span's rows (kv_cache.h, AttnSpan), F16 [store->ne[0], n_idx + n_res + n_own]: rows idx of the
// store, then, beside a residual, rows res_idx of the f16 residual (res_idx may be null: none) and the
// rows of `own` (F32) rounded to f16 (own may be null: a ring without a residual reads only its cells). On the CPU one pass writes them in place (ggml's concat copies element by
// element: two of them per K and V made a q4_0 ring decode at a third of its speed); elsewhere ggml ops.
ggml_tensor * gather_span_rows_f16(ggml_context * ctx, ggml_tensor * store, ggml_tensor * idx, ggml_tensor * residual,
                                   ggml_tensor * res_idx, ggml_tensor * own, bool on_cpu);

// [ne0, ne1, ne2] cells of any type (a view of a store, or gathered rows) as contiguous F32 or F16 (on the
// CPU one pass of dequantize.h's loops; elsewhere ggml's cast).
ggml_tensor * cells_converted(ggml_context * ctx, ggml_tensor * cells, ggml_type type, bool on_cpu);

}  // namespace simkv
