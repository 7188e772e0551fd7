#include "kv_gather.h"

#include "dequantize.h"

#include <ggml-cpu.h>

#include <algorithm>
#include <cstring>

namespace simkv {

namespace {

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
    for (int64_t r = ith * per; r < std::min(n, (ith + 1) * per); ++r) {
        auto * y = (ggml_fp16_t *) ((char *) dst->data + (size_t) r * dst->nb[1]);
        if (r < n_idx) {
            const int32_t cell = ((const int32_t *) idx->data)[r];
            dequantize_row_f16(store->type, (const char *) store->data + (size_t) cell * store->nb[1], y, ne0);
        } else if (r < n_idx + n_res) {
            const int32_t cell = ((const int32_t *) res_idx->data)[r - n_idx];
            std::memcpy(y, (const char *) residual->data + (size_t) cell * residual->nb[1], (size_t) ne0 * sizeof(ggml_fp16_t));
        } else {
            const auto * x = (const float *) ((const char *) own->data + (size_t) (r - n_idx - n_res) * own->nb[1]);
            ggml_cpu_fp32_to_fp16(x, y, ne0);
        }
    }
}

// ggml custom op: dst (F32 or F16, contiguous) = src, a [ne0, ne1, ne2] view of any type; rows of ne0
// values are converted one by one, the ne1 index split across threads.
void convert_rows(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * src = dst->src[0];
    const int64_t n = src->ne[1], per = (n + nth - 1) / nth;
    for (int64_t i1 = ith * per; i1 < std::min(n, (ith + 1) * per); ++i1) {
        for (int64_t i2 = 0; i2 < src->ne[2]; ++i2) {
            const char * x = (const char *) src->data + i1 * src->nb[1] + i2 * src->nb[2];
            char * y = (char *) dst->data + i1 * dst->nb[1] + i2 * dst->nb[2];
            if (dst->type == GGML_TYPE_F32) dequantize_row_f32(src->type, x, (float *) y, src->ne[0]);
            else dequantize_row_f16(src->type, x, (ggml_fp16_t *) y, src->ne[0]);
        }
    }
}

}  // namespace

ggml_tensor * gather_rows_as_stored(ggml_context * ctx, ggml_tensor * store, ggml_tensor * idx, bool on_cpu) {
    if (!on_cpu) return ggml_cast(ctx, ggml_get_rows(ctx, store, idx), GGML_TYPE_F16);
    ggml_tensor * args[2] = {store, idx};
    return ggml_custom_4d(ctx, store->type, store->ne[0], idx->ne[0], 1, 1, args, 2, gather_raw, GGML_N_TASKS_MAX,
                          nullptr);
}

ggml_tensor * cells_converted(ggml_context * ctx, ggml_tensor * cells, ggml_type type, bool on_cpu) {
    if (!on_cpu) return ggml_cast(ctx, cells, type);
    return ggml_custom_4d(ctx, type, cells->ne[0], cells->ne[1], cells->ne[2], 1, &cells, 1, convert_rows,
                          GGML_N_TASKS_MAX, nullptr);
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
