// A ubatch's plan: computed by KvCache::plan_ubatch from the cache as it is (const), then used to build and
// feed the graph, and applied to the cache (KvCache::apply) once the graph has run. The plan is a value:
// nothing of the current ubatch is kept in the cache, and a ubatch whose graph fails changes no cell map.
#pragma once
#include "kv_cells.h"

#include <ggml.h>

#include <cstdint>
#include <vector>

namespace simkv {

struct UbatchInputs;

// One flash attention of a ubatch in a group: a run of consecutive tokens of one sequence, and the cells
// it reads. Its mask rows are [n_tokens][n_kv] at mask_offset in the group plan's mask.
//   contiguous (pooled groups): the span of cells [kv_lo, kv_lo + n_kv) that holds the sequence. One
//     sequence alone: one span from cell 0, as llama.cpp's single stream; several: one each, as llama.cpp's
//     per-sequence streams, without reserving a stream's cells for a sequence that does not hold them.
//   gathered (lazy rings): only the cells some query of the run can see (sinks + window, not the ring's
//     ubatch headroom), listed at gather_offset in the group plan's gather list and copied out as f16 rows.
//     A pooled span is gathered too where a chunk's sequence holds scattered cells (it outgrew its share of
//     the pool, or wrapped around its end): every cell it holds, in position order, copied out in the
//     store's own type, so that the chunk computes what it would over a contiguous span, and not over the
//     other sequences' cells in between (a chunk's flash attention computes every column, hidden or not).
//     ggml's CPU flash attention has its fast paths (split-KV for a lone query, tiles for a chunk) only for
//     f16/f32 K and V: read in place, a q4_0 ring was 0.6x an f16 ring's prefill speed.
//   with a residual (a quantized lazy ring, kv_policy_lazy.cpp, or a quantized full store,
//     kv_policy_full.cpp), the columns are, in order: the store's cells (a ring's gathered cells some query
//     reads in 4 bits, a pool's in place or gathered: n_kv - n_res - n_tokens of them, padding included), then the
//     n_res = R - 1 columns read from the residual (res_read: the positions it holds that some query reads,
//     then a hidden cell repeated, so that consecutive decode steps have one shape and reuse one graph),
//     then the span's own n_tokens keys as computed, rounded to f16. A key may be in both parts; the mask shows each query one. The span's last
//     n_res_write positions (its last columns) go to the residual, at cells res_dst.
// n_kv is a multiple of kCellPad (stable shapes for CUDA's kernels); gather padding repeats a hidden cell.
struct AttnSpan {
    uint32_t t0 = 0, n_tokens = 0;
    uint32_t kv_lo = 0, n_kv = 0;  // kv_lo: contiguous spans only
    size_t mask_offset = 0;
    int64_t gather_offset = -1;  // >= 0: gathered
    bool residual = false;       // the columns end with residual and own keys (above)
    uint32_t n_res = 0, n_res_write = 0;
    size_t res_read_offset = 0, res_write_offset = 0;  // into the group plan's res_read, res_dst
    uint32_t n_store() const { return n_kv - (residual ? n_res + n_tokens : 0); }  // columns of the store's cells
};

// One group's part of the plan.
struct GroupPlan {
    KvCells cells;                     // the group's cell map once the ubatch is written
    std::vector<int64_t> write_cells;  // cell for each token of the ubatch
    std::vector<AttnSpan> spans;       // the ubatch's attentions, in token order
    std::vector<ggml_fp16_t> mask;     // every span's rows, one after another: 0 = visible, -inf = hidden
    std::vector<int32_t> gather;       // the cells gathered spans read, one span after another
    std::vector<int32_t> res_read;     // residual cells spans read, one span after another
    std::vector<int64_t> res_dst;      // residual cells of each span's last positions, one span after another
};

struct UbatchPlan {
    uint64_t layout_version = 0;   // the cache's layout it was planned for (KvCache::apply checks)
    std::vector<GroupPlan> groups;  // one per cache group, in its order (empty for a group without layers)
    // The graph's KV inputs (masks, gathers, write and residual indices), after the scheduler allocated them.
    void set_inputs(const UbatchInputs & in) const;
};

}  // namespace simkv
