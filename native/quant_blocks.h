// ggml's q8_0 and q4_0 blocks (ggml-common.h: 32 values with one f16 scale each), and, on x86, their values
// in AVX2 registers: the one place simkv's CPU kernels (dequantize.cpp, attention_quantized.cpp) unpack them.
#pragma once
#include <ggml.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SIMKV_X86 1
#define SIMKV_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace simkv {

struct BlockQ8 {
    uint16_t d;
    int8_t qs[32];
};
struct BlockQ4 {
    uint16_t d;
    uint8_t qs[16];  // value j: low nibble of qs[j] (j < 16) or high nibble of qs[j - 16], minus 8
};
static_assert(sizeof(BlockQ8) == 34 && sizeof(BlockQ4) == 18, "ggml's block layouts");

#ifdef SIMKV_X86
// 32 values of a block as int8 (q8_0 as stored; q4_0's nibbles minus 8).
SIMKV_AVX2 inline __m256i block_int8(ggml_type type, const char * block) {
    if (type == GGML_TYPE_Q8_0) return _mm256_loadu_si256((const __m256i *) ((const BlockQ8 *) block)->qs);
    const __m128i x = _mm_loadu_si128((const __m128i *) ((const BlockQ4 *) block)->qs);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(x, 4), low4), _mm_and_si128(x, low4));
    return _mm256_sub_epi8(q, _mm256_set1_epi8(8));
}

// 32 values of a block as four vectors of 8 floats (exact: an f16 scale times a small integer).
SIMKV_AVX2 inline void block_f32(ggml_type type, const char * block, __m256 out[4]) {
    uint16_t h;
    std::memcpy(&h, block, 2);
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(h));
    const __m256i q = block_int8(type, block);
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    out[0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)));
    out[1] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))));
    out[2] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)));
    out[3] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))));
}
#endif

}  // namespace simkv
