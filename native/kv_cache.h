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
#include "kv_cells.h"
#include "kv_plan.h"
#include "kv_policy.h"
#include "kv_rotation.h"

#include <ggml-backend.h>
#include <ggml-cpp.h>
#include <ggml.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace simkv {

struct HParams;
class GraphArena;
struct StateWriter;
struct StateReader;

// A saved cache, parsed (kv_state.cpp): each group's cell map and each layer's rows, as saved.
struct KvSnapshot {
    struct Group {
        std::string key;
        uint32_t kind = 0;
        std::vector<int32_t> cell_pos, cell_seq, res_pos, layers;
        uint32_t n_used = 0, n_free = 0;
    };
    struct Layer {
        uint32_t group = 0, type_k = 0, type_v = 0, capacity = 0;
        std::vector<uint8_t> k, v, k_res, v_res;
    };
    std::vector<Group> groups;
    std::vector<Layer> layers;
};

// The cache's share of the engine's configuration (engine_config.h has the defaults and the checks).
struct KvConfig {
    uint32_t n_ctx;      // cells of a pooled store, shared by every sequence
    uint32_t n_seq_max;  // sequences: one region each in a ring store
    uint32_t n_ubatch;
    std::vector<KvTypes> full_types;  // per layer: its store's types while it is full (or a sliding window)
    std::vector<KvTypes> lazy_types;  // per layer: its ring's types when it is lazy
    uint32_t n_sink;
    uint32_t n_window;
    uint32_t n_residual;  // f16 positions per sequence beside a quantized lazy ring (kv_policy_lazy.cpp)
    uint32_t n_full_residual = 0;  // ... and beside a quantized full store (kv_policy_full.cpp)
    std::vector<int> lazy_layers;
};

// One layer's K and V. It owns its tensors' context and buffer: moving a store moves them, dropping it
// frees them (ggml-cpp.h's owning pointers), so a store is never copied or freed by hand.
struct KvStore {
    int layer = 0;
    int group = 0;
    KvRotation rot;             // quantized K and V are held Hadamard-rotated (kv_rotation.h)
    ggml_tensor * k = nullptr;  // [n_embd_k_gqa, capacity] of the layer's K type, in ctx
    ggml_tensor * v = nullptr;  // [n_embd_v_gqa, capacity] of its V type, in ctx
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

struct KvGroup {
    std::unique_ptr<KvPolicy> policy;
    std::vector<int> layers;
    KvCells cells;  // positions held by the group's cells and its residual (kv_cells.h)
    // Dynamic mode with several sequences: the sequences for which this pooled group's layers are lazy.
    // There a sequence keeps only the cells its next query can see (sinks + window: KvCache::lazy_view_),
    // in the shared pool of the layers' full stores; every other sequence keeps all of its positions.
    // Layers lazy for different sets of sequences are in different groups (one cell map each).
    std::vector<uint8_t> seq_lazy;
    // Cells of one sequence's region (ring groups); the whole store for pooled groups.
    uint32_t region() const { return policy->capacity(); }
};

// The lazy layers' policy for this configuration (one home: the cache and exact prefill's compaction).
std::unique_ptr<KvPolicy> lazy_policy(const KvConfig & cfg);

class KvCache {
public:
    KvCache(const HParams & hp, const KvConfig & cfg, const std::vector<ggml_backend_buffer_type_t> & buft_per_layer);
    KvCache(const KvCache &) = delete;  // one owner of its stores and cell maps (and one id)
    KvCache & operator=(const KvCache &) = delete;
    // Bytes layer il's store will take with this configuration (checked against free memory first).
    static uint64_t planned_bytes(const HParams & hp, const KvConfig & cfg, uint32_t il);
    // The kind and the K and V types layer il's store will have with this configuration.
    static KvKind planned_kind(const HParams & hp, const KvConfig & cfg, uint32_t il);
    static KvTypes planned_types(const KvConfig & cfg, uint32_t il);

    // Largest ubatch every policy accepts.
    uint32_t max_ubatch() const;
    // Plan a ubatch (token i: position pos[i] of sequence seq[i]): the cells its tokens are written to, each
    // group's masks and gathers, and the cell maps once it is written (kv_plan.h). Changes nothing; throws
    // if a pool has fewer free cells than tokens. in_place: read pooled stores in place even where a
    // sequence's cells are scattered (the probe reads each span's cells as one contiguous range).
    UbatchPlan plan_ubatch(const int32_t * pos, const int32_t * seq, uint32_t n_tokens, bool in_place = false) const;
    // The ubatch was written: its plan's cell maps become the cache's.
    void apply(UbatchPlan && plan);
    // Free cells of the fullest pool: how many more tokens the cache can take now.
    uint32_t free_cells() const;
    // Admission (Engine::decode, the server's scheduler): the pool cells that cutting sequence seq back to
    // n_keep positions, then appending n_new, takes beyond what it holds now, in the pool where that is most
    // (negative: it gives cells back; 0 without a pool). A sequence lazy in a pool holds there at most what
    // its ring would (sinks + window + a ubatch); every other one holds all of its positions.
    int64_t cells_needed(int seq, uint32_t n_keep, uint32_t n_new) const;
    // Pool cells sequence seq holds, in the pool where it holds the fewest: what clearing it frees at least.
    uint32_t cells_held(int seq) const;
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

    // What-if types (kv_retype.cpp, the profiler): full layer il's store is replaced by one of `types`
    // holding the same cells, converted by a graph run on `sched`; the store it replaces is kept aside until
    // restore_types() puts it back (every such store, or these layers'). Throws, changing nothing, if the
    // layer is not full, has what-if types already, or the copy fails.
    // residual: the f16 positions a quantized full store keeps (KvConfig::n_full_residual).
    void retype(const HParams & hp, int il, KvTypes types, uint32_t residual, ggml_backend_buffer_type_t buft,
                ggml_backend_sched_t sched, GraphArena & arena);
    void restore_types();
    void restore_types(const std::vector<int> & layers);
    std::vector<int> retyped_layers() const;

    // Forget every position >= n_keep of sequence seq. Returns false (and changes nothing) if some store no
    // longer holds what a query at n_keep would need; the caller then clears and re-evaluates.
    bool truncate(int seq, int32_t n_keep, int32_t n_written);
    // kv_state.cpp: the cache's part of a saved state. write_state appends it; read_state parses one (checking
    // every length); layers_compacted_in names the layers lazy in the snapshot but full here (exact prefill
    // compacted them: make them lazy first); restore checks every store and cell map against the snapshot,
    // then loads it (throws BadInput, changing nothing, on a mismatch).
    void write_state(StateWriter & w) const;
    static KvSnapshot read_state(StateReader & r, uint32_t n_layer, uint64_t max_cells, size_t max_bytes);
    std::vector<int> layers_compacted_in(const KvSnapshot & snap) const;
    void restore(const KvSnapshot & snap);
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
    // Unique among the caches of this process (never reused): a graph built for another cache is another graph.
    uint64_t id() const { return id_; }

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
    CellCopy place_positions(KvGroup & g, const KvGroup & src, int32_t seq);
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
    static KvStore alloc_store(const HParams & hp, int il, int group, KvTypes types, uint32_t capacity,
                               uint32_t residual_cells, ggml_backend_buffer_type_t buft);
    // kv_plan.cpp: one group's part of a ubatch's plan, and its spans'.
    GroupPlan plan_group(const KvGroup & g, const int32_t * pos, const int32_t * seq, uint32_t n_tokens, bool in_place) const;
    // A gathered span's columns and mask, with or without a residual (whose cells it records in gp.cells).
    void plan_gathered_span(const KvGroup & g, GroupPlan & gp, AttnSpan & sp, const int32_t * pos, const int32_t * seq) const;
    // A pooled span that reads its sequence's scattered cells through a gather, in position order.
    void plan_pooled_gather(const KvGroup & g, GroupPlan & gp, AttnSpan & sp, const int32_t * pos, const int32_t * seq) const;
    // A pooled span over its sequence's cells [lo, hi) in place, with the f16 columns of a residual after them.
    void plan_pooled_residual(const KvGroup & g, GroupPlan & gp, AttnSpan & sp, const int32_t * pos, const int32_t * seq,
                              uint32_t lo, uint32_t hi) const;
    // A span's f16 columns beside a store with a residual (kv_plan.h, AttnSpan), whatever reads the store's
    // cells (a ring's gather, a pool's cells in place or gathered): which keys a query reads in f16, the
    // columns' mask, and the residual's reads and writes. Nothing (columns() 0) for a store without one.
    class ResidualTail {
    public:
        ResidualTail(const KvPolicy & p, const KvCells & cells, int32_t seq, int32_t first, uint32_t n_q);
        uint32_t columns() const { return R_ ? (uint32_t) R_ - 1 + n_q_ : 0; }
        // a query at q reads the key at k in f16: the policy says so and the key is in f16 here (the span's own,
        // or one the residual holds); the store's column for it is hidden
        bool reads_f16(int32_t q, int32_t k) const;
        // the f16 columns of a query's mask row: the residual's, then the span's own
        template <class Visible>
        void mask_row(int32_t q, Visible visible, std::vector<ggml_fp16_t> & mask) const;
        // the residual cells the span reads, and those its last positions are written to (in gp's cell map)
        void plan_io(GroupPlan & gp, AttnSpan & sp) const;

    private:
        const KvPolicy & p_;
        const KvCells & cells_;
        int32_t seq_, first_;
        uint32_t n_q_;
        int32_t R_;
        std::vector<int32_t> held_;  // residual positions some query reads, oldest first
    };

    // Pooled groups: where sequence seq starts looking for free cells. Each sequence has a home share of
    // the pool (1/n_seq of it), so conversations that fit their share stay contiguous and their spans do
    // not overlap; one that outgrows it takes free cells beyond, wherever they are (nothing is reserved).
    uint32_t home_cell(const KvGroup & g, int seq) const;
    // The cell position `pos` of sequence `seq` is written to in group g, recorded in `cells` (g's map, or
    // a plan's copy of it): a pooled group hands out a free cell from the sequence's home on (the cursor
    // carries the search from one token to the next), a ring places it by KvPolicy::cell_of in the
    // sequence's region.
    struct CellCursor {
        uint32_t cell = 0;
        int32_t seq = -1;
    };
    uint32_t take_cell(const KvGroup & g, KvCells & cells, int32_t pos, int32_t seq, CellCursor & cursor) const;

    uint64_t id_;
    uint32_t n_seq_ = 1;
    uint32_t lazy_cells_ = 0;  // the most cells a lazy sequence holds in a pool: its ring's capacity
    std::unique_ptr<KvPolicy> lazy_view_;  // a lazy sequence's view of a pooled store (sinks + window)
    uint64_t layout_version_ = 0;
    std::vector<KvGroup> groups_;
    std::vector<KvStore> stores_;
    std::map<int, KvStore> set_aside_;  // layers with what-if types: the stores they held (kv_retype.cpp)
};

}  // namespace simkv
