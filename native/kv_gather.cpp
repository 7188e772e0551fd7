#include "kv_gather.h"

#include <ggml-cpu.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SIMKV_X86 1
#endif

namespace simkv {

namespace {

constexpr size_t kQ4Block = 18;  // ggml's block_q4_0: ggml_half d; uint8_t qs[16] (32 values)

#ifdef SIMKV_X86
__attribute__((target("avx2,f16c"))) void dequantize_q4_0_f16_avx2(const uint8_t * x, ggml_fp16_t * y, size_t nb) {
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
            const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(v), d);  // exact: an f16 times a small integer
            _mm_storeu_si128((__m128i *) (y + 8 * p), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
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

// One row of a store (ne0 values of its type) as f16 values; tmp: scratch for types converted through f32.
void row_to_f16(const ggml_tensor * store, const char * row, ggml_fp16_t * y, std::vector<float> & tmp) {
    const int64_t ne0 = store->ne[0];
    switch (store->type) {
        case GGML_TYPE_F16: std::memcpy(y, row, (size_t) ne0 * sizeof(ggml_fp16_t)); return;
        case GGML_TYPE_Q4_0: dequantize_q4_0_f16((const uint8_t *) row, y, (size_t) ne0 / 32); return;
        default:
            tmp.resize((size_t) ne0);
            ggml_get_type_traits(store->type)->to_float(row, tmp.data(), ne0);
            ggml_cpu_fp32_to_fp16(tmp.data(), y, ne0);
    }
}

// ggml custom op: dst row r = store row idx[r], byte for byte; each thread takes a contiguous share of rows.
void gather_raw(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * store = dst->src[0];
    const ggml_tensor * idx = dst->src[1];
    const size_t row = ggml_row_size(store->type, store->ne[0]);
    const int64_t n = idx->ne[0], per = (n + nth - 1) / nth;
    for (int64_t r = ith * per; r < std::min(n, (ith + 1) * per); ++r) {
        const int32_t cell = ((const int32_t *) idx->data)[r];
        std::memcpy((char *) dst->data + (size_t) r * dst->nb[1], (const char *) store->data + (size_t) cell * store->nb[1], row);
    }
}

// ggml custom op: dst = [store rows idx] [residual rows res_idx] [own rows], all f16, rows split across
// threads. src: store, idx[, own[, residual, res_idx]] (dst's rows beyond idx's say how many own rows).
void gather_span(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * store = dst->src[0];
    const ggml_tensor * idx = dst->src[1];
    const ggml_tensor * own = dst->src[2];
    const ggml_tensor * residual = dst->src[3];
    const ggml_tensor * res_idx = dst->src[4];
    const int64_t ne0 = store->ne[0], n_idx = idx->ne[0], n_res = res_idx ? res_idx->ne[0] : 0;
    const int64_t n = dst->ne[1], per = (n + nth - 1) / nth;
    std::vector<float> tmp;
    for (int64_t r = ith * per; r < std::min(n, (ith + 1) * per); ++r) {
        auto * y = (ggml_fp16_t *) ((char *) dst->data + (size_t) r * dst->nb[1]);
        if (r < n_idx) {
            const int32_t cell = ((const int32_t *) idx->data)[r];
            row_to_f16(store, (const char *) store->data + (size_t) cell * store->nb[1], y, tmp);
        } else if (r < n_idx + n_res) {
            const int32_t cell = ((const int32_t *) res_idx->data)[r - n_idx];
            std::memcpy(y, (const char *) residual->data + (size_t) cell * residual->nb[1], (size_t) ne0 * sizeof(ggml_fp16_t));
        } else {
            const auto * x = (const float *) ((const char *) own->data + (size_t) (r - n_idx - n_res) * own->nb[1]);
            ggml_cpu_fp32_to_fp16(x, y, ne0);
        }
    }
}

}  // namespace

void dequantize_q4_0_f16(const uint8_t * blocks, ggml_fp16_t * out, size_t n_blocks) {
#ifdef SIMKV_X86
    if (has_avx2()) return dequantize_q4_0_f16_avx2(blocks, out, n_blocks);
#endif
    const ggml_to_float_t to_float = ggml_get_type_traits(GGML_TYPE_Q4_0)->to_float;  // ggml's scalar loop
    float block[32];
    for (size_t i = 0; i < n_blocks; ++i) {  // a block at a time: no allocation on the gather's path
        to_float(blocks + i * kQ4Block, block, 32);
        ggml_cpu_fp32_to_fp16(block, out + i * 32, 32);
    }
}

ggml_tensor * gather_rows_as_stored(ggml_context * ctx, ggml_tensor * store, ggml_tensor * idx, bool on_cpu) {
    if (!on_cpu) return ggml_cast(ctx, ggml_get_rows(ctx, store, idx), GGML_TYPE_F16);
    ggml_tensor * args[2] = {store, idx};
    return ggml_custom_4d(ctx, store->type, store->ne[0], idx->ne[0], 1, 1, args, 2, gather_raw, GGML_N_TASKS_MAX,
                          nullptr);
}

ggml_tensor * gather_span_rows_f16(ggml_context * ctx, ggml_tensor * store, ggml_tensor * idx, ggml_tensor * residual,
                                   ggml_tensor * res_idx, ggml_tensor * own, bool on_cpu) {
    if (!on_cpu) {
        ggml_tensor * rows = ggml_get_rows(ctx, store, idx);  // f32
        if (res_idx) rows = ggml_concat(ctx, rows, ggml_get_rows(ctx, residual, res_idx), 1);
        if (own) rows = ggml_concat(ctx, rows, own, 1);
        return ggml_cast(ctx, rows, GGML_TYPE_F16);
    }
    ggml_tensor * args[5] = {store, idx, own, residual, res_idx};
    const int64_t n = idx->ne[0] + (res_idx ? res_idx->ne[0] : 0) + (own ? own->ne[1] : 0);
    return ggml_custom_4d(ctx, GGML_TYPE_F16, store->ne[0], n, 1, 1, args, res_idx ? 5 : own ? 3 : 2, gather_span,
                          GGML_N_TASKS_MAX, nullptr);
}

}  // namespace simkv
