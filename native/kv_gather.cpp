#include "kv_gather.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SIMKV_X86 1
#endif

namespace simkv {

namespace {

constexpr size_t kQ4Block = 18;  // ggml's block_q4_0: ggml_half d; uint8_t qs[16] (32 values)

#ifdef SIMKV_X86
__attribute__((target("avx2,f16c"))) void dequantize_q4_0_avx2(const uint8_t * x, float * y, size_t nb) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m256i eight = _mm256_set1_epi32(8);
    for (size_t i = 0; i < nb; ++i, x += kQ4Block, y += 32) {
        uint16_t h;
        std::memcpy(&h, x, 2);
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(h));
        const __m128i q = _mm_loadu_si128((const __m128i *) (x + 2));
        const __m128i lo = _mm_and_si128(q, low4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        for (int p = 0; p < 4; ++p) {
            const __m256i v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[p]), eight);
            _mm256_storeu_ps(y + 8 * p, _mm256_mul_ps(_mm256_cvtepi32_ps(v), d));
        }
    }
    // Leave no dirty upper halves for the SSE code around (this module is built for baseline x86-64): with
    // them, runs were bimodal, half of them at 0.55x speed.
    _mm256_zeroupper();
}

bool has_avx2() {
    static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    return yes;
}
#endif

// ggml custom op: dst row r = dequantized store row idx[r]; each thread takes a contiguous share of rows.
void gather_q4_0(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * store = dst->src[0];
    const ggml_tensor * idx = dst->src[1];
    const size_t nb = (size_t) store->ne[0] / 32;
    const int64_t n = idx->ne[0], per = (n + nth - 1) / nth;
    for (int64_t r = ith * per; r < std::min(n, (ith + 1) * per); ++r) {
        const int32_t cell = ((const int32_t *) idx->data)[r];
        dequantize_q4_0((const uint8_t *) store->data + (size_t) cell * store->nb[1],
                        (float *) ((char *) dst->data + (size_t) r * dst->nb[1]), nb);
    }
}

}  // namespace

void dequantize_q4_0(const uint8_t * blocks, float * out, size_t n_blocks) {
#ifdef SIMKV_X86
    if (has_avx2()) return dequantize_q4_0_avx2(blocks, out, n_blocks);
#endif
    ggml_get_type_traits(GGML_TYPE_Q4_0)->to_float(blocks, out, (int64_t) n_blocks * 32);  // ggml's scalar loop
}

ggml_tensor * gather_rows_f32(ggml_context * ctx, ggml_tensor * store, ggml_tensor * idx, bool on_cpu) {
    if (!on_cpu || store->type != GGML_TYPE_Q4_0) return ggml_get_rows(ctx, store, idx);
    ggml_tensor * args[2] = {store, idx};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, store->ne[0], idx->ne[0], 1, 1, args, 2, gather_q4_0, GGML_N_TASKS_MAX,
                          nullptr);
}

}  // namespace simkv
