// FULL: one cell per position, causal mask. What every layer of a normal transformer keeps.
//
// A quantized full store may also keep each sequence's n_residual most recent positions in f16, as a
// quantized lazy ring does (kv_policy_lazy.cpp has the rule and why): a query at q reads the key at k in f16
// iff q - k < n_residual and the key is in f16 (the span's own, or one the residual holds), every other
// visible key from the quantized cells. Every position is still written to its cell.
#include "kv_policy.h"

namespace simkv {

namespace {

class FullPolicy final : public KvPolicy {
public:
    FullPolicy(uint32_t n_ctx, uint32_t n_residual) : capacity_(pad_cells(n_ctx)), residual_(n_residual) {}
    KvKind kind() const override { return KvKind::Full; }
    bool pooled() const override { return true; }
    uint32_t capacity() const override { return capacity_; }
    uint32_t cell_of(int32_t pos) const override { return (uint32_t) pos; }
    bool visible(int32_t, int32_t) const override { return true; }
    uint32_t max_ubatch() const override { return capacity_; }
    bool can_rewind_to(int32_t, int32_t) const override { return true; }
    std::string key() const override {
        return "full/" + std::to_string(capacity_) + (residual_ ? "/r" + std::to_string(residual_) : "");
    }
    uint32_t residual() const override { return residual_; }

private:
    uint32_t capacity_, residual_;
};

}  // namespace

const char * kv_kind_name(KvKind kind) {
    switch (kind) {
        case KvKind::Full: return "full";
        case KvKind::Lazy: return "lazy";
        case KvKind::Swa: return "swa";
        case KvKind::Masked: return "masked";
    }
    return "?";
}

std::unique_ptr<KvPolicy> make_full_policy(uint32_t n_ctx, uint32_t n_residual) {
    return std::make_unique<FullPolicy>(n_ctx, n_residual);
}

}  // namespace simkv
