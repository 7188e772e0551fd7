// FULL: one cell per position, causal mask. What every layer of a normal transformer keeps.
#include "kv_policy.h"

namespace simkv {

namespace {

class FullPolicy final : public KvPolicy {
public:
    explicit FullPolicy(uint32_t n_ctx) : capacity_(pad_cells(n_ctx)) {}
    KvKind kind() const override { return KvKind::Full; }
    bool pooled() const override { return true; }
    uint32_t capacity() const override { return capacity_; }
    uint32_t cell_of(int32_t pos) const override { return (uint32_t) pos; }
    bool visible(int32_t, int32_t) const override { return true; }
    uint32_t max_ubatch() const override { return capacity_; }
    bool can_rewind_to(int32_t, int32_t) const override { return true; }
    std::string key() const override { return "full/" + std::to_string(capacity_); }

private:
    uint32_t capacity_;
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

std::unique_ptr<KvPolicy> make_full_policy(uint32_t n_ctx) { return std::make_unique<FullPolicy>(n_ctx); }

}  // namespace simkv
