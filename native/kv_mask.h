// The one rule that turns a group's cell map into attention-mask rows. A query at position q of sequence s
// sees the cell holding key position k iff the cell holds something (k >= 0) of the same sequence s,
// k <= q (causal), and the policy's own rule allows it (sinks + window for lazy layers). Used for every ubatch's masks (kv_cache.cpp) and
// for the probe's what-if masks (probe.cpp).
#pragma once
#include "kv_cells.h"

#include <ggml.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace simkv {

inline ggml_fp16_t mask_visible() {
    static const ggml_fp16_t v = ggml_fp32_to_fp16(0.0f);
    return v;
}

inline ggml_fp16_t mask_hidden() {
    static const ggml_fp16_t v = ggml_fp32_to_fp16(-INFINITY);
    return v;
}

// Fills rows [n_q][n_kv] of `out` for the viewed cells lo .. lo + n_kv (cells >= used() are empty and stay
// hidden).
template <class Rule>
void fill_mask_rows(const KvCells & cells, uint32_t lo, const int32_t * q_pos, const int32_t * q_seq, size_t n_q,
                    uint32_t n_kv, Rule visible, ggml_fp16_t * out) {
    const ggml_fp16_t shown = mask_visible(), hidden = mask_hidden();
    const std::vector<int32_t> & cell_pos = cells.positions();
    const std::vector<int32_t> & cell_seq = cells.sequences();
    const uint32_t n_used = cells.used();
    for (size_t i = 0; i < n_q; ++i) {
        ggml_fp16_t * row = out + i * n_kv;
        const int32_t q = q_pos[i], s = q_seq[i];
        for (uint32_t j = 0; j < n_kv; ++j) {
            const uint32_t c = lo + j;
            const int32_t k = c < n_used ? cell_pos[c] : -1;
            row[j] = k >= 0 && k <= q && cell_seq[c] == s && visible(q, k) ? shown : hidden;
        }
    }
}

}  // namespace simkv
