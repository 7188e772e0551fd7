// The KV cache: one store per layer (K and V tensors of that layer, typed and sized by its policy).
// Layers whose policies are equal form a group that shares one cell map, one write index and one mask
// per ubatch: all FULL layers are one group, all LAZY layers another.
//
// Where a lazy layer's cache is handled:
//   written  - plan_ubatch() picks the cells (KvPolicy::cell_of), graph_attention.cpp writes them (set_rows)
//   masked   - plan_ubatch() builds the group's mask (causal + KvPolicy::visible)
//   read     - graph_attention.cpp views the first n_kv cells of the store for flash attention
//   encoded  - a quantized store (a q4_0 ring by default) holds K and V Hadamard-rotated (kv_rotation.h)
#pragma once
#include "kv_policy.h"
#include "kv_rotation.h"

#include <ggml-backend.h>
#include <ggml.h>

#include <memory>
#include <string>
#include <vector>

namespace simkv {

struct HParams;

struct KvConfig {
    uint32_t n_ctx = 4096;
    uint32_t n_ubatch = 512;
    ggml_type type_full = GGML_TYPE_F16;  // K and V of full layers (always the same type: fast CUDA FA pairs)
    ggml_type type_lazy = GGML_TYPE_Q4_0; // K and V of lazy layers
    uint32_t n_sink = 4;
    uint32_t n_window = 1024;
    std::vector<int> lazy_layers;
};

struct KvStore {
    int layer = 0;
    int group = 0;
    ggml_type type = GGML_TYPE_F16;
    KvRotation rot;             // quantized stores hold K and V Hadamard-rotated (kv_rotation.h)
    ggml_tensor * k = nullptr;  // [n_embd_k_gqa, capacity]
    ggml_tensor * v = nullptr;  // [n_embd_v_gqa, capacity]
    ggml_context * ctx = nullptr;
    ggml_backend_buffer_t buffer = nullptr;
    std::string device;
    size_t bytes() const { return buffer ? ggml_backend_buffer_get_size(buffer) : 0; }
};

struct KvGroup {
    std::unique_ptr<KvPolicy> policy;
    std::vector<int> layers;
    std::vector<int32_t> cell_pos;  // position held by each cell, -1 = empty
    uint32_t n_used = 0;            // cells [0, n_used) may hold a position (the rest are empty)
    // Plan of the current ubatch (filled by plan_ubatch).
    std::vector<int64_t> write_cells;  // cell for each token of the ubatch
    uint32_t n_kv = 0;                 // cells viewed by attention (multiple of kCellPad)
    std::vector<ggml_fp16_t> mask;     // [n_tokens][n_kv]: 0 = visible, -inf = hidden
};

class KvCache {
public:
    KvCache(const HParams & hp, const KvConfig & cfg, const std::vector<ggml_backend_buffer_type_t> & buft_per_layer);
    ~KvCache();
    KvCache(const KvCache &) = delete;
    KvCache & operator=(const KvCache &) = delete;

    // Largest ubatch every policy accepts.
    uint32_t max_ubatch() const;
    // Choose cells for the positions of a ubatch, record them, and build each group's mask.
    void plan_ubatch(const int32_t * pos, uint32_t n_tokens);
    // Exact prefill (lazy_prefill="exact"): after the prompt, FULL layers become LAZY. prepare_lazy()
    // allocates their lazy stores and says which cell goes where (sinks + the most recent positions the
    // ring holds); the caller copies K/V (requantizing) and then commit_lazy() frees the full stores.
    struct Conversion {
        std::vector<int> layers;
        std::vector<KvStore> stores;       // the new lazy stores, one per layer
        std::vector<int32_t> src_cells;    // copy cell src_cells[i] of the full store ...
        std::vector<int64_t> dst_cells;    // ... to cell dst_cells[i] of the lazy store
        std::vector<int32_t> cell_pos;     // the lazy group's cell map afterwards
        int group = -1;                    // the lazy group (created if needed)
    };
    Conversion prepare_lazy(const HParams & hp, const KvConfig & cfg, const std::vector<int> & layers,
                            const std::vector<ggml_backend_buffer_type_t> & buft_per_layer);
    void commit_lazy(Conversion && c);
    static void discard(Conversion && c);  // frees the new stores of a conversion that failed

    // Move layers to the group of `policy` without touching their stores: allowed only where the store
    // already holds each of its positions in the cell the new policy would put it (e.g. full <-> masked).
    void regroup(const std::vector<int> & layers, std::unique_ptr<KvPolicy> policy);

    // Forget every position >= n_keep. Returns false (and changes nothing) if some store no longer holds
    // what a query at n_keep would need; the caller then clears and re-evaluates.
    bool truncate(int32_t n_keep, int32_t n_written);
    void clear();

    const std::vector<KvGroup> & groups() const { return groups_; }
    const KvStore & store(int il) const { return stores_[il]; }
    size_t n_layer() const { return stores_.size(); }
    size_t total_bytes() const;

private:
    int group_for(std::unique_ptr<KvPolicy> policy);
    static KvStore alloc_store(const HParams & hp, int il, int group, ggml_type type, uint32_t capacity,
                               ggml_backend_buffer_type_t buft);
    static void free_store(KvStore & s);

    std::vector<KvGroup> groups_;
    std::vector<KvStore> stores_;
};

}  // namespace simkv
