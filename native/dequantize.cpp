#include "dequantize.h"

#include <ggml-cpu.h>

#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SIMKV_X86 1
#endif

namespace simkv {

namespace {

constexpr size_t kQ4Block = 18;  // ggml's block_q4_0: ggml_half d; uint8_t qs[16] (value j: nibble j % 16, low first)
constexpr size_t kQ8Block = 34;  // ggml's block_q8_0: ggml_half d; int8_t qs[32]

#ifdef SIMKV_X86
#define SIMKV_AVX2 __attribute__((target("avx2,fma,f16c")))

// The 32 values of a block, as four vectors of 8 floats.
SIMKV_AVX2 inline void q8_0_block(const uint8_t * x, __m256 out[4]) {
    uint16_t h;
    std::memcpy(&h, x, 2);
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(h));
    for (int p = 0; p < 4; ++p) {
        const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (x + 2 + 8 * p)));
        out[p] = _mm256_mul_ps(_mm256_cvtepi32_ps(v), d);  // exact: an f16 times an int8
    }
}

SIMKV_AVX2 inline void q4_0_block(const uint8_t * x, __m256 out[4]) {
    uint16_t h;
    std::memcpy(&h, x, 2);
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(h));
    const __m128i low4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
    const __m128i q = _mm_loadu_si128((const __m128i *) (x + 2));
    const __m128i lo = _mm_sub_epi8(_mm_and_si128(q, low4), eight);
    const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), low4), eight);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int p = 0; p < 4; ++p) out[p] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[p])), d);
}

// Leave no dirty upper halves for the SSE code around (this module is built for baseline x86-64): with
// them, runs were bimodal, half of them at 0.55x speed.
SIMKV_AVX2 void rows_f32_avx2(ggml_type type, const uint8_t * x, float * y, int64_t nb) {
    __m256 v[4];
    for (int64_t i = 0; i < nb; ++i, y += 32) {
        if (type == GGML_TYPE_Q8_0) q8_0_block(x + i * kQ8Block, v);
        else q4_0_block(x + i * kQ4Block, v);
        for (int p = 0; p < 4; ++p) _mm256_storeu_ps(y + 8 * p, v[p]);
    }
    _mm256_zeroupper();
}

SIMKV_AVX2 void rows_f16_avx2(ggml_type type, const uint8_t * x, ggml_fp16_t * y, int64_t nb) {
    __m256 v[4];
    for (int64_t i = 0; i < nb; ++i, y += 32) {
        if (type == GGML_TYPE_Q8_0) q8_0_block(x + i * kQ8Block, v);
        else q4_0_block(x + i * kQ4Block, v);
        for (int p = 0; p < 4; ++p) {
            _mm_storeu_si128((__m128i *) (y + 8 * p), _mm256_cvtps_ph(v[p], _MM_FROUND_TO_NEAREST_INT));
        }
    }
    _mm256_zeroupper();
}
#endif

bool avx2_block_type(ggml_type type) {
#ifdef SIMKV_X86
    return (type == GGML_TYPE_Q8_0 || type == GGML_TYPE_Q4_0) && cpu_has_avx2();
#else
    (void) type;
    return false;
#endif
}

}  // namespace

bool cpu_has_avx2() {
#ifdef SIMKV_X86
    static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                            __builtin_cpu_supports("f16c");
    return yes;
#else
    return false;
#endif
}

void dequantize_row_f32(ggml_type type, const void * row, float * out, int64_t n) {
#ifdef SIMKV_X86
    if (avx2_block_type(type)) return rows_f32_avx2(type, (const uint8_t *) row, out, n / 32);
#endif
    if (type == GGML_TYPE_F32) {
        std::memcpy(out, row, (size_t) n * sizeof(float));
        return;
    }
    ggml_get_type_traits(type)->to_float(row, out, n);
}

void dequantize_row_f16(ggml_type type, const void * row, ggml_fp16_t * out, int64_t n) {
#ifdef SIMKV_X86
    if (avx2_block_type(type)) return rows_f16_avx2(type, (const uint8_t *) row, out, n / 32);
#endif
    if (type == GGML_TYPE_F16) {
        std::memcpy(out, row, (size_t) n * sizeof(ggml_fp16_t));
        return;
    }
    const ggml_to_float_t to_float = ggml_get_type_traits(type)->to_float;
    float block[32];
    for (int64_t i = 0; i < n; i += 32) {  // a block at a time: no allocation on the gather's path
        const int64_t m = n - i < 32 ? n - i : 32;
        to_float((const char *) row + ggml_row_size(type, i), block, m);
        ggml_cpu_fp32_to_fp16(block, out + i, m);
    }
}

}  // namespace simkv
