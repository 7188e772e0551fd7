// Dequantizing rows of a KV store on the CPU: q8_0 and q4_0 with AVX2 where the CPU has it, other types
// through ggml's own conversion. The values are ggml's (d * q for q8_0, d * (q - 8) for q4_0: exact in
// f32, an f16 scale times a small integer), rounded to nearest even where the result is f16, as ggml's
// f32 -> f16 conversion rounds.
//
// ggml-base's dequantization is a scalar loop; attention reads every visible cell of a layer once per
// ubatch (kv_gather.h) or per decoded token (attention_quantized.h), so these loops are its hot path.
#pragma once
#include <ggml.h>

#include <cstddef>
#include <cstdint>

namespace simkv {

// n values (a multiple of 32 for the block types) of a row of type `type` into f32 or f16.
void dequantize_row_f32(ggml_type type, const void * row, float * out, int64_t n);
void dequantize_row_f16(ggml_type type, const void * row, ggml_fp16_t * out, int64_t n);

// Whether the CPU takes the AVX2 (with F16C and FMA) code of simkv's own kernels.
bool cpu_has_avx2();

}  // namespace simkv
