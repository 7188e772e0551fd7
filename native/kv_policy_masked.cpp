// MASKED: a full store (one cell per position, nothing dropped) whose queries see only the sinks and the
// n_window most recent keys, as a lazy layer's would. It is trimming as a what-if: the profiler's "loss"
// criterion masks one layer at a time over a shared full prefix, measures the loss, and unmasks it,
// instead of re-evaluating the prompt once per layer. Not memory-saving; never chosen for inference.
#include "kv_policy.h"

namespace simkv {

namespace {

class MaskedPolicy final : public KvPolicy {
public:
    MaskedPolicy(uint32_t n_ctx, uint32_t n_sink, uint32_t n_window)
        : capacity_(pad_cells(n_ctx)), n_sink_(n_sink), n_window_(n_window) {}
    KvKind kind() const override { return KvKind::Masked; }
    bool pooled() const override { return true; }
    uint32_t capacity() const override { return capacity_; }
    uint32_t cell_of(int32_t pos) const override { return (uint32_t) pos; }
    bool visible(int32_t q_pos, int32_t k_pos) const override { return in_sink_or_window(n_sink_, n_window_, q_pos, k_pos); }
    uint32_t max_ubatch() const override { return capacity_; }
    bool can_rewind_to(int32_t, int32_t) const override { return true; }
    std::string key() const override {
        return "masked/" + std::to_string(n_sink_) + "/" + std::to_string(n_window_) + "/" + std::to_string(capacity_);
    }

private:
    uint32_t capacity_, n_sink_, n_window_;
};

}  // namespace

std::unique_ptr<KvPolicy> make_masked_policy(uint32_t n_ctx, uint32_t n_sink, uint32_t n_window) {
    return std::make_unique<MaskedPolicy>(n_ctx, n_sink, n_window);
}

}  // namespace simkv
