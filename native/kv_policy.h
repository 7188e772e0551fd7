// What a layer's KV store keeps: how many cells, which cell a position goes to, and which keys a query
// may see. A store is one layer's K/V tensors plus one of these; a new per-layer policy is one new file
// that implements this interface and a factory, nothing else.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

namespace simkv {

// What a store keeps. FULL: every position. LAZY: SimLayerKV's sinks + ring. SWA: a model's own sliding
// window (a ring without sinks). MASKED: a full store seen through a lazy layer's mask (profiler what-ifs).
enum class KvKind { Full, Lazy, Swa, Masked };
const char * kv_kind_name(KvKind kind);

constexpr uint32_t kCellPad = 256;  // CUDA's vector FA kernel wants n_kv % 256 == 0; keep shapes stable
inline uint32_t pad_cells(uint32_t n) { return (n + kCellPad - 1) / kCellPad * kCellPad; }

// SimLayerKV's trimmed view: a query at q_pos sees the first n_sink positions and the n_window most recent
// ones (itself included). The lazy and masked policies and the probe all use this one rule.
inline bool in_sink_or_window(uint32_t n_sink, uint32_t n_window, int32_t q_pos, int32_t k_pos) {
    return (uint32_t) k_pos < n_sink || (int64_t) q_pos - k_pos < (int64_t) n_window;
}

class KvPolicy {
public:
    virtual ~KvPolicy() = default;
    virtual KvKind kind() const = 0;
    // Pooled (full, masked): the store is one pool of cells shared by every sequence; a position takes a
    // free cell when written and gives it back when dropped, so a short conversation holds few cells.
    // Not pooled (rings): each sequence owns a region of capacity() cells, placed by cell_of().
    virtual bool pooled() const = 0;
    virtual uint32_t capacity() const = 0;           // cells of the pool, or of one region (a multiple of kCellPad)
    virtual uint32_t cell_of(int32_t pos) const = 0; // rings: where position `pos` goes in its sequence's region
    // Whether a query at q_pos attends to the key at k_pos (k_pos <= q_pos is checked by the caller).
    virtual bool visible(int32_t q_pos, int32_t k_pos) const = 0;
    // Largest ubatch that can be written before being attended to without overwriting a key that one of
    // its own queries still needs (or writing one cell twice).
    virtual uint32_t max_ubatch() const = 0;
    // Whether, after positions [0, n_written) were written, the store still holds every key that a query
    // at n_keep needs, so the context can be cut back to n_keep tokens without re-evaluating.
    virtual bool can_rewind_to(int32_t n_keep, int32_t n_written) const = 0;
    // Parameters that identify the policy (stores with equal keys share masks and cell maps).
    virtual std::string key() const = 0;
    // Whether a span reads the store through a gather of the cells some query of it sees (kv_plan.h,
    // AttnSpan), rather than in place: a lazy ring's visible cells are few, and are read as f16 rows.
    virtual bool gathered() const { return false; }
    // Positions of each sequence a quantized store also keeps in f16: its most recent ones, which take most
    // of a lazy layer's attention and whose 4-bit rounding cost the most perplexity (KIVI's residual;
    // kv_policy_lazy.cpp), and, where asked, a quantized full store's (kv_policy_full.cpp). 0 elsewhere.
    virtual uint32_t residual() const { return 0; }
    // Cells of each sequence's residual: residual() read by queries, as many again kept so that a rewind of
    // up to residual() + 1 tokens still finds every f16 key the next query reads (bit-identical to a fresh
    // evaluation; after a longer one the lost keys are read in 4 bits).
    uint32_t residual_capacity() const { return 2 * residual(); }
    // Whether a query at q_pos reads the key at k_pos in f16 (from the residual, or as just computed) rather
    // than from the store: the residual() most recent keys.
    bool reads_residual(int32_t q_pos, int32_t k_pos) const { return (int64_t) q_pos - k_pos < (int64_t) residual(); }
    // The residual cell of position pos of sequence seq: each sequence's last residual_capacity() positions,
    // in its own residual_capacity() cells.
    uint32_t residual_cell(int32_t seq, int32_t pos) const {
        return (uint32_t) seq * residual_capacity() + (uint32_t) pos % residual_capacity();
    }
};

// n_residual: f16 positions per sequence beside a quantized full store (kv_policy_full.cpp; 0: none).
std::unique_ptr<KvPolicy> make_full_policy(uint32_t n_ctx, uint32_t n_residual = 0);
// n_residual: f16 positions beside a quantized ring (0: none, e.g. an f16 ring).
std::unique_ptr<KvPolicy> make_lazy_policy(uint32_t n_sink, uint32_t n_window, uint32_t n_ubatch, uint32_t n_residual);
// A model's own sliding-window layers (gemma3): the same ring without sinks, kind "swa".
std::unique_ptr<KvPolicy> make_sliding_policy(uint32_t n_window, uint32_t n_ubatch);
std::unique_ptr<KvPolicy> make_masked_policy(uint32_t n_ctx, uint32_t n_sink, uint32_t n_window);

}  // namespace simkv
