// The KV cache: one store per layer (K and V tensors of that layer, typed and sized by its policy).
// Layers whose policies are equal form a group that shares one cell map, one write index and one mask
// per ubatch: usually the full layers are one group and the lazy layers another; a model's own
// sliding-window layers, layers masked for a what-if, and (dynamic mode with several sequences) layers lazy
// for different sets of sequences form groups of their own.
//
// Sequences (independent conversations, up to n_seq_max) are a dimension of the cell map, not more
// caches: each cell records the sequence and position it holds, and a query sees only its own sequence's
// cells. A pooled group (full layers) hands out cells from one pool shared by every sequence; a ring group
// (lazy layers) gives each sequence a region of its own (one sink + ring per conversation).
// Dynamic mode with several sequences chooses lazy layers per sequence: there a full layer's pool keeps,
// for a sequence it is lazy for, only the cells that sequence's next query sees (KvGroup::seq_lazy), and
// layers lazy for different sequences are split into groups of their own.
//
// Where a lazy layer's cache is handled:
//   written  - plan_ubatch() picks the cells (KvPolicy::cell_of), graph_attention.cpp writes them (set_rows)
//   masked   - plan_ubatch() builds the group's mask (kv_mask.h: causal + KvPolicy::visible; a sequence
//              lazy in a pool: the lazy view's rule, after its cells out of sight went back to the pool)
//   read     - graph_attention.cpp: one flash attention per run of a sequence's tokens (AttnSpan), over
//              only the cells of that sequence it can see (a lazy ring's visible cells are gathered)
//   encoded  - a quantized store (a q4_0 ring by default) holds K and V Hadamard-rotated (kv_rotation.h)
//   compacted - exact prefill turns full stores into lazy ones after the prompt, or with several sequences
//              copies a prompt's own all-full cache into the shared one (kv_compaction.cpp)
#pragma once
#include "kv_policy.h"
#include "kv_rotation.h"

#include <ggml-backend.h>
#include <ggml-cpp.h>
#include <ggml.h>

#include <memory>
#include <string>
#include <vector>

namespace simkv {

struct HParams;
class GraphArena;

// The cache's share of the engine's configuration (engine.h has the defaults and the checks).
struct KvConfig {
    uint32_t n_ctx;      // cells of a pooled store, shared by every sequence
    uint32_t n_seq_max;  // sequences: one region each in a ring store
    uint32_t n_ubatch;
    ggml_type type_full;  // K and V of full layers (always the same type: fast CUDA FA pairs)
    ggml_type type_lazy;  // K and V of lazy layers
    uint32_t n_sink;
    uint32_t n_window;
    uint32_t n_residual;  // f16 positions per sequence beside a quantized lazy ring (kv_policy_lazy.cpp)
    std::vector<int> lazy_layers;
};

// One layer's K and V. It owns its tensors' context and buffer: moving a store moves them, dropping it
// frees them (ggml-cpp.h's owning pointers), so a store is never copied or freed by hand.
struct KvStore {
    int layer = 0;
    int group = 0;
    ggml_type type = GGML_TYPE_F16;
    KvRotation rot;             // quantized stores hold K and V Hadamard-rotated (kv_rotation.h)
    ggml_tensor * k = nullptr;  // [n_embd_k_gqa, capacity], in ctx
    ggml_tensor * v = nullptr;  // [n_embd_v_gqa, capacity], in ctx
    // A quantized lazy ring's residual: f16 rows [n_embd_gqa, n_seq * n_residual] (rotated as k, v are),
    // null elsewhere.
    ggml_tensor * k_res = nullptr;
    ggml_tensor * v_res = nullptr;
    ggml_context_ptr ctx;
    ggml_backend_buffer_ptr buffer;
    std::string device;
    size_t bytes() const { return buffer ? ggml_backend_buffer_get_size(buffer.get()) : 0; }
    uint32_t capacity() const { return k ? (uint32_t) k->ne[1] : 0; }
};

// One flash attention of a ubatch in a group: a run of consecutive tokens of one sequence, and the cells
// it reads. Its mask rows are [n_tokens][n_kv] at mask_offset in the group's mask.
//   contiguous (pooled groups): the span of cells [kv_lo, kv_lo + n_kv) that holds the sequence. One
//     sequence alone: one span from cell 0, as llama.cpp's single stream; several: one each, as llama.cpp's
//     per-sequence streams, without reserving a stream's cells for a sequence that does not hold them.
//   gathered (lazy rings): only the cells some query of the run can see (sinks + window, not the ring's
//     ubatch headroom), listed at gather_offset in the group's gather list and copied out as f16 rows.
//     A pooled span is gathered too where a chunk's sequence holds scattered cells (it outgrew its share of
//     the pool, or wrapped around its end): every cell it holds, in position order, copied out in the
//     store's own type, so that the chunk computes what it would over a contiguous span, and not over the
//     other sequences' cells in between (a chunk's flash attention computes every column, hidden or not).
//     ggml's CPU flash attention has its fast paths (split-KV for a lone query, tiles for a chunk) only for
//     f16/f32 K and V: read in place, a q4_0 ring was 0.6x an f16 ring's prefill speed.
//   with a residual (a quantized lazy ring, kv_policy_lazy.cpp), the columns are, in order: the gathered
//     ring cells some query reads in 4 bits (n_kv - n_res - n_tokens of them, padding included), then the
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
    size_t res_read_offset = 0, res_write_offset = 0;  // into the group's res_read, res_dst
    uint32_t n_gathered() const { return n_kv - (residual ? n_res + n_tokens : 0); }
};

struct KvGroup {
    std::unique_ptr<KvPolicy> policy;
    std::vector<int> layers;
    std::vector<int32_t> cell_pos;  // position held by each cell, -1 = empty
    std::vector<int32_t> cell_seq;  // the sequence that position belongs to (where cell_pos >= 0)
    std::vector<int32_t> res_pos;   // residual cells (n_seq * policy->residual_capacity()): position held, -1 = empty
    // Dynamic mode with several sequences: the sequences for which this pooled group's layers are lazy.
    // There a sequence keeps only the cells its next query can see (sinks + window: KvCache::lazy_view_),
    // in the shared pool of the layers' full stores; every other sequence keeps all of its positions.
    // Layers lazy for different sets of sequences are in different groups (one cell map each).
    std::vector<uint8_t> seq_lazy;
    uint32_t n_used = 0;            // cells [0, n_used) may hold a position (the rest are empty)
    uint32_t n_free = 0;            // empty cells
    // Cells of one sequence's region (ring groups); the whole store for pooled groups.
    uint32_t region() const { return policy->capacity(); }
    // (position, cell) of every position sequence seq holds here, in position order.
    std::vector<std::pair<int32_t, uint32_t>> positions_of(int32_t seq) const;
    // Plan of the current ubatch (filled by plan_ubatch).
    std::vector<int64_t> write_cells;  // cell for each token of the ubatch
    std::vector<AttnSpan> spans;       // the ubatch's attentions, in token order
    std::vector<ggml_fp16_t> mask;     // every span's rows, one after another: 0 = visible, -inf = hidden
    std::vector<int32_t> gather;       // the cells gathered spans read, one span after another
    std::vector<int32_t> res_read;     // residual cells spans read, one span after another
    std::vector<int64_t> res_dst;      // residual cells of each span's last positions, one span after another
};

// The lazy layers' policy for this configuration (one home: the cache and exact prefill's compaction).
std::unique_ptr<KvPolicy> lazy_policy(const KvConfig & cfg);

class KvCache {
public:
    KvCache(const HParams & hp, const KvConfig & cfg, const std::vector<ggml_backend_buffer_type_t> & buft_per_layer);
    // Bytes layer il's store will take with this configuration (checked against free memory first).
    static uint64_t planned_bytes(const HParams & hp, const KvConfig & cfg, uint32_t il);

    // Largest ubatch every policy accepts.
    uint32_t max_ubatch() const;
    // Choose cells for the tokens of a ubatch (token i: position pos[i] of sequence seq[i]), record them,
    // and build each group's mask. Throws, changing nothing, if a pool has fewer free cells than tokens.
    // in_place: read pooled stores in place even where a sequence's cells are scattered (the probe reads
    // each span's cells as one contiguous range).
    void plan_ubatch(const int32_t * pos, const int32_t * seq, uint32_t n_tokens, bool in_place = false);
    // Free cells of the fullest pool: how many more tokens the cache can take now.
    uint32_t free_cells() const;
    // Exact prefill (lazy_prefill="exact"): after the prompt, these FULL layers become LAZY. Their lazy
    // stores are allocated, the kept cells (sinks + the most recent positions the ring holds) copied into
    // them (converting type and rotation) by a graph run on `sched`, and the full stores freed.
    // Returns the KV bytes held at the peak of the conversion. On failure nothing changes.
    size_t make_lazy(const HParams & hp, const KvConfig & cfg, const std::vector<int> & layers,
                     const std::vector<ggml_backend_buffer_type_t> & buft_per_layer, ggml_backend_sched_t sched,
                     GraphArena & arena);

    // Exact prefill with several sequences (Engine): sequence seq's prompt was evaluated alone in `prompt`,
    // a cache whose layers are all full; its positions join this cache as if they had been written here
    // (every one into a pooled store; into a ring, what it keeps: sinks, the latest positions, the
    // residual), by a graph run on `sched`. The sequence must hold nothing here. Throws, changing nothing,
    // if a pool has too few free cells or the copy fails.
    // lazy_layers (dynamic mode): the full layers the probe found lazy for this sequence's prompt; there it
    // joins the group's lazy sequences (seq_lazy), and a group part of whose layers are lazy for it is split.
    void adopt_sequence(const KvCache & prompt, int seq, const std::vector<int> & lazy_layers,
                        ggml_backend_sched_t sched, GraphArena & arena);

    // Move layers to the group of `policy` without touching their stores: allowed only where the store
    // already holds each of its positions in the cell the new policy would put it (e.g. full <-> masked).
    void regroup(const std::vector<int> & layers, std::unique_ptr<KvPolicy> policy);

    // Forget every position >= n_keep of sequence seq. Returns false (and changes nothing) if some store no
    // longer holds what a query at n_keep would need; the caller then clears and re-evaluates.
    bool truncate(int seq, int32_t n_keep, int32_t n_written);
    // A loaded state's cell map for one group (kv_state.cpp checked it against the group's stores).
    void restore_cells(int group, const std::vector<int32_t> & cell_pos, const std::vector<int32_t> & cell_seq,
                       const std::vector<int32_t> & res_pos, uint32_t n_used, uint32_t n_free);
    void clear(int seq);  // one sequence
    void clear();         // every sequence

    // Cells sequence seq holds in layer il's store, and the KV bytes that are its own (pooled cells it
    // holds; its whole region in a ring store).
    uint32_t seq_cells(int seq, int il) const;
    size_t seq_bytes(int seq) const;
    uint32_t n_seq() const { return n_seq_; }
    // The layers that are lazy for sequence seq: lazy stores, and pooled ones it is lazy in (dynamic mode).
    std::vector<int> seq_lazy_layers(int seq) const;
    // Changes whenever layers move between groups: a graph built before reads the wrong masks.
    uint64_t layout_version() const { return layout_version_; }

    const std::vector<KvGroup> & groups() const { return groups_; }
    const KvStore & store(int il) const { return stores_[il]; }
    size_t n_layer() const { return stores_.size(); }
    size_t total_bytes() const;

    // The layers whose store is of this kind now.
    std::vector<int> layers_of_kind(KvKind kind) const;
    KvKind kind_of(int il) const { return groups_[stores_[il].group].policy->kind(); }

private:
    // kv_compaction.cpp: rows copied between the stores of the same layers, by one graph. K and V rows
    // src_cells[i] of each `from` store go to dst_cells[i] of its `to` store (converted to its type, and
    // rotated where exactly one side is), rows res_src_cells to the `to` store's residual at res_dst_cells.
    struct CellCopy {
        std::vector<std::pair<const KvStore *, const KvStore *>> stores;  // (from, to), one pair per layer
        std::vector<int32_t> src_cells;
        std::vector<int64_t> dst_cells;
        std::vector<int32_t> res_src_cells;
        std::vector<int64_t> res_dst_cells;
    };
    static bool copy_cells(const std::vector<CellCopy> & copies, ggml_backend_sched_t sched, GraphArena & arena);
    // Which cells of sequence `seq` in `src` (a group's map, positions in order) go where in group g: each
    // position is placed by take_cell as if written in order (a ring keeps what survives), and a quantized
    // ring's residual gets the last positions. Records them in g's maps and returns the rows to copy.
    CellCopy place_positions(KvGroup & g, const KvGroup & src, int32_t seq) const;
    // The positions of seq in `src` that group g keeps (all, but what the next query sees where seq is lazy
    // in a pool), with their source cells, in order.
    std::vector<std::pair<int32_t, uint32_t>> kept_positions(const KvGroup & g, const KvGroup & src, int32_t seq) const;

    // Exact prefill of one sequence: its lazy layers' full stores become lazy ones.
    struct Conversion {
        std::vector<int> layers;
        std::vector<KvStore> stores;  // the new lazy stores, one per layer
        int group = -1;               // the lazy group (created if needed)
    };
    Conversion plan_lazy(const HParams & hp, const KvConfig & cfg, const std::vector<int> & layers,
                         const std::vector<ggml_backend_buffer_type_t> & buft_per_layer);
    void commit_lazy(Conversion && c);

    int group_for(std::unique_ptr<KvPolicy> policy);
    // A group of its own for this policy (an empty one is reused), with an empty cell map.
    int new_group(std::unique_ptr<KvPolicy> policy);
    // What sequence seq's queries see in group g: the group's policy, or the lazy view where it is lazy.
    const KvPolicy & view(const KvGroup & g, int32_t seq) const {
        return g.seq_lazy[(size_t) seq] ? *lazy_view_ : *g.policy;
    }
    // Dynamic mode: make `layers` (pooled, full) lazy for sequence seq, which holds nothing yet; groups
    // whose layers are only partly among them are split (both halves keep the cell map).
    void make_seq_lazy(const std::vector<int> & layers, int seq);
    // Layers of groups with equal policies, lazy sequences and cell maps join one group again.
    void merge_groups();
    static KvStore alloc_store(const HParams & hp, int il, int group, ggml_type type, uint32_t capacity,
                               uint32_t residual_cells, ggml_backend_buffer_type_t buft);
    // Plans a gathered span's columns and mask (kv_cache.cpp), with or without a residual.
    void plan_gathered_span(KvGroup & g, AttnSpan & sp, const int32_t * pos, const int32_t * seq) const;
    // A pooled span that reads its sequence's scattered cells through a gather, in position order.
    void plan_pooled_gather(KvGroup & g, AttnSpan & sp, const int32_t * pos, const int32_t * seq) const;

    // Pooled groups: where sequence seq starts looking for free cells. Each sequence has a home share of
    // the pool (1/n_seq of it), so conversations that fit their share stay contiguous and their spans do
    // not overlap; one that outgrows it takes free cells beyond, wherever they are (nothing is reserved).
    uint32_t home_cell(const KvGroup & g, int seq) const;
    // The cell position `pos` of sequence `seq` is written to in group g, recorded in its cell map: a
    // pooled group hands out a free cell from the sequence's home on (the cursor carries the search from one
    // token to the next), a ring places it by KvPolicy::cell_of in the sequence's region.
    struct CellCursor {
        uint32_t cell = 0;
        int32_t seq = -1;
    };
    uint32_t take_cell(KvGroup & g, int32_t pos, int32_t seq, CellCursor & cursor) const;

    uint32_t n_seq_ = 1;
    std::unique_ptr<KvPolicy> lazy_view_;  // a lazy sequence's view of a pooled store (sinks + window)
    uint64_t layout_version_ = 0;
    std::vector<KvGroup> groups_;
    std::vector<KvStore> stores_;
};

}  // namespace simkv
