// Reading a lazy ring's visible cells as f32 rows for attention (AttnSpan's gathered read, kv_cache.h), and a
// pooled span's scattered cells as they are stored.
// ggml's get_rows does it for every store type, but dequantizes q4_0 with ggml-base's scalar loop, which
// made a q4_0 ring's decode ~12% slower than an f16 ring's. On the CPU a q4_0 store is gathered here instead,
// with AVX2 where the CPU has it; the values are the same to the bit (d * (q - 8), as ggml computes them).
#pragma once
#include <ggml.h>

#include <cstddef>
#include <cstdint>

namespace simkv {

// [store->ne[0], n_rows] of the store's type: rows idx[0..n_rows) copied as they are (on the CPU; elsewhere
// through f32 to f16, which GPU flash attention takes).
ggml_tensor * gather_rows_as_stored(ggml_context * ctx, ggml_tensor * store, ggml_tensor * idx, bool on_cpu);

// F32 [store->ne[0], n_rows]: rows idx[0..n_rows) of a 2-D store.
ggml_tensor * gather_rows_f32(ggml_context * ctx, ggml_tensor * store, ggml_tensor * idx, bool on_cpu);

// A span's rows beside a residual (kv_cache.h, AttnSpan), F32 [store->ne[0], n_idx + n_res + n_own]: rows
// idx of the store, then rows res_idx of the f16 residual (res_idx may be null: none), then the rows of
// `own` (F32) rounded to f16. On the CPU one pass writes them in place (ggml's concat copies element by
// element: two of them per K and V made a q4_0 ring decode at a third of its speed); elsewhere ggml ops.
ggml_tensor * gather_span_rows_f32(ggml_context * ctx, ggml_tensor * store, ggml_tensor * idx, ggml_tensor * residual,
                                   ggml_tensor * res_idx, ggml_tensor * own, bool on_cpu);

// n q4_0 blocks (18 bytes each: f16 scale, 16 bytes of nibbles) -> 32 * n floats.
void dequantize_q4_0(const uint8_t * blocks, float * out, size_t n_blocks);

}  // namespace simkv
