// LAZY (SimLayerKV / StreamingLLM): the first n_sink positions keep fixed cells; every later position
// goes to a ring. A query sees the sinks plus the n_window most recent keys (itself included).
// SWA (a model's sliding-window layers, gemma3) is the same ring with no sinks.
//
// The ring holds at least n_window + n_ubatch - 1 positions so that a whole ubatch is written before it
// is attended to: the oldest key the ubatch's first query needs is still there when its last token
// lands. Capacity is padded to kCellPad and the padding joins the ring (free headroom).
//
// A quantized lazy ring also keeps its sequence's n_residual most recent positions in f16 (the residual,
// as in KIVI): a lazy layer's attention goes almost all to its sinks and its latest keys, and 4-bit
// rounding of the latest ones cost SmolLM2 three times the perplexity of trimming itself
// (benchmarks/ring_precision.py: f16 sinks did not help, the last 32 positions in f16 recovered it). The
// rule is per query, so the result does not depend on how tokens are split into ubatches: a query at q
// reads a key at k in f16 iff q - k < n_residual, older ones from the 4-bit ring. Every position is still
// written to the ring; the f16 keys come from the residual (earlier ubatches) and from the ubatch's own keys
// as computed, rounded to f16 (kv_cache.h, AttnSpan). The residual keeps each sequence's last
// residual_capacity() positions, cell seq * capacity + pos % capacity; a key it does not hold (after a
// long rewind) is read from the ring.
#include "kv_policy.h"

#include <algorithm>

namespace simkv {

namespace {

class SinkRingPolicy final : public KvPolicy {
public:
    SinkRingPolicy(KvKind kind, uint32_t n_sink, uint32_t n_window, uint32_t n_ubatch, uint32_t n_residual)
        : kind_(kind), n_sink_(n_sink), n_window_(n_window),
          capacity_(pad_cells(n_sink + n_window + n_ubatch - 1)), ring_(capacity_ - n_sink), residual_(n_residual) {}

    KvKind kind() const override { return kind_; }
    bool pooled() const override { return false; }
    uint32_t capacity() const override { return capacity_; }
    uint32_t cell_of(int32_t pos) const override {
        return (uint32_t) pos < n_sink_ ? (uint32_t) pos : n_sink_ + ((uint32_t) pos - n_sink_) % ring_;
    }
    bool visible(int32_t q_pos, int32_t k_pos) const override { return in_sink_or_window(n_sink_, n_window_, q_pos, k_pos); }
    uint32_t max_ubatch() const override { return ring_ - n_window_ + 1; }
    bool can_rewind_to(int32_t n_keep, int32_t n_written) const override {
        // The ring holds positions [n_written - ring, n_written). The next query (at n_keep) needs
        // positions [n_keep - n_window + 1, n_keep) besides the sinks; they must not have been overwritten.
        const int64_t needed_from = std::max<int64_t>(n_sink_, (int64_t) n_keep - n_window_ + 1);
        const int64_t kept_from = (int64_t) n_written - ring_;
        // (The residual holds [n_written - residual_capacity(), n_keep) afterwards: a rewind of up to
        // residual_ + 1 positions finds every f16 key the next queries read. After a longer one the keys it
        // lost are read from the ring, in 4 bits, until they are residual_ positions back: close to, not
        // equal to, a fresh evaluation, and much cheaper than one.)
        return needed_from >= n_keep || needed_from >= kept_from;
    }
    std::string key() const override {
        return std::string(kv_kind_name(kind_)) + "/" + std::to_string(n_sink_) + "/" + std::to_string(n_window_) + "/" +
               std::to_string(capacity_) + (residual_ ? "/r" + std::to_string(residual_) : "");
    }
    uint32_t residual() const override { return residual_; }
    bool gathered() const override { return kind_ == KvKind::Lazy; }  // a model's own window is read in place

private:
    KvKind kind_;
    uint32_t n_sink_, n_window_, capacity_, ring_, residual_;
};

}  // namespace

std::unique_ptr<KvPolicy> make_lazy_policy(uint32_t n_sink, uint32_t n_window, uint32_t n_ubatch, uint32_t n_residual) {
    return std::make_unique<SinkRingPolicy>(KvKind::Lazy, n_sink, n_window, n_ubatch, n_residual);
}

std::unique_ptr<KvPolicy> make_sliding_policy(uint32_t n_window, uint32_t n_ubatch) {
    return std::make_unique<SinkRingPolicy>(KvKind::Swa, 0, n_window, n_ubatch, 0);
}

}  // namespace simkv
