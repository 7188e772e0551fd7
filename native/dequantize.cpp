#include "dequantize.h"

#include "quant_blocks.h"

#include <ggml-cpu.h>

#include <cstring>
#include <vector>

namespace simkv {

namespace {

#ifdef SIMKV_X86
// Leave no dirty upper halves for the SSE code around (this module is built for baseline x86-64): with
// them, runs were bimodal, half of them at 0.55x speed.
SIMKV_AVX2 void rows_f32_avx2(ggml_type type, const char * x, float * y, int64_t nb) {
    const size_t block = ggml_type_size(type);
    __m256 v[4];
    for (int64_t i = 0; i < nb; ++i, y += 32) {
        block_f32(type, x + i * block, v);
        for (int p = 0; p < 4; ++p) _mm256_storeu_ps(y + 8 * p, v[p]);
    }
    _mm256_zeroupper();
}

SIMKV_AVX2 void rows_f16_avx2(ggml_type type, const char * x, ggml_fp16_t * y, int64_t nb) {
    const size_t block = ggml_type_size(type);
    __m256 v[4];
    for (int64_t i = 0; i < nb; ++i, y += 32) {
        block_f32(type, x + i * block, v);
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
    if (avx2_block_type(type)) return rows_f32_avx2(type, (const char *) row, out, n / 32);
#endif
    if (type == GGML_TYPE_F32) {
        std::memcpy(out, row, (size_t) n * sizeof(float));
        return;
    }
    ggml_get_type_traits(type)->to_float(row, out, n);
}

void dequantize_row_f16(ggml_type type, const void * row, ggml_fp16_t * out, int64_t n) {
#ifdef SIMKV_X86
    if (avx2_block_type(type)) return rows_f16_avx2(type, (const char *) row, out, n / 32);
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
