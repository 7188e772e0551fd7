#include "kv_cache.h"

#include "errors.h"
#include "model.h"

#include <algorithm>
#include <cmath>
#include <map>

namespace simkv {

KvCache::KvCache(const HParams & hp, const KvConfig & cfg, const std::vector<ggml_backend_buffer_type_t> & buft_per_layer) {
    std::vector<bool> lazy(hp.n_layer, false);
    for (int il : cfg.lazy_layers) lazy.at(il) = true;

    // One group per distinct policy; layers point at their group.
    std::map<std::string, int> group_of_key;
    stores_.resize(hp.n_layer);
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        std::unique_ptr<KvPolicy> policy = lazy[il] ? make_lazy_policy(cfg.n_sink, cfg.n_window, cfg.n_ubatch)
                                                    : make_full_policy(cfg.n_ctx);
        const std::string key = policy->key();
        auto it = group_of_key.find(key);
        int g;
        if (it == group_of_key.end()) {
            g = (int) groups_.size();
            group_of_key[key] = g;
            KvGroup grp;
            grp.policy = std::move(policy);
            grp.cell_pos.assign(grp.policy->capacity(), -1);
            groups_.push_back(std::move(grp));
        } else {
            g = it->second;
        }
        groups_[g].layers.push_back((int) il);

        KvStore & s = stores_[il];
        s.layer = (int) il;
        s.group = g;
        s.type = lazy[il] ? cfg.type_lazy : cfg.type_full;
        const uint32_t cap = groups_[g].policy->capacity();
        ggml_init_params ip = {2 * ggml_tensor_overhead(), nullptr, true};
        s.ctx = ggml_init(ip);
        s.k = ggml_new_tensor_2d(s.ctx, s.type, hp.n_embd_k_gqa(), cap);
        s.v = ggml_new_tensor_2d(s.ctx, s.type, hp.n_embd_v_gqa(), cap);
        ggml_format_name(s.k, "cache_k_l%u", il);
        ggml_format_name(s.v, "cache_v_l%u", il);
        s.buffer = ggml_backend_alloc_ctx_tensors_from_buft(s.ctx, buft_per_layer[il]);
        if (!s.buffer) throw std::runtime_error("failed to allocate the KV store of layer " + std::to_string(il));
        // Zero it: masked cells are skipped on the CPU, but a NaN in a never-written cell times a zero
        // weight would still poison a GPU kernel.
        ggml_backend_buffer_clear(s.buffer, 0);
        s.device = ggml_backend_buft_name(buft_per_layer[il]);
    }
}

KvCache::~KvCache() {
    for (auto & s : stores_) {
        if (s.buffer) ggml_backend_buffer_free(s.buffer);
        if (s.ctx) ggml_free(s.ctx);
    }
}

uint32_t KvCache::max_ubatch() const {
    uint32_t m = UINT32_MAX;
    for (const auto & g : groups_) m = std::min(m, g.policy->max_ubatch());
    return m;
}

void KvCache::plan_ubatch(const int32_t * pos, uint32_t n_tokens) {
    static const ggml_fp16_t kZero = ggml_fp32_to_fp16(0.0f);
    static const ggml_fp16_t kHidden = ggml_fp32_to_fp16(-INFINITY);
    for (auto & g : groups_) {
        const KvPolicy & p = *g.policy;
        // Write first: the ubatch's own keys must be visible to its queries.
        g.write_cells.resize(n_tokens);
        for (uint32_t i = 0; i < n_tokens; ++i) {
            const uint32_t c = p.cell_of(pos[i]);
            g.write_cells[i] = c;
            g.cell_pos[c] = pos[i];
            g.n_used = std::max(g.n_used, c + 1);
        }
        g.n_kv = std::min(p.capacity(), pad_cells(g.n_used));
        g.mask.assign((size_t) n_tokens * g.n_kv, kHidden);
        for (uint32_t i = 0; i < n_tokens; ++i) {
            ggml_fp16_t * row = g.mask.data() + (size_t) i * g.n_kv;
            const int32_t q = pos[i];
            for (uint32_t c = 0; c < g.n_used; ++c) {
                const int32_t k = g.cell_pos[c];
                if (k >= 0 && k <= q && p.visible(q, k)) row[c] = kZero;
            }
        }
    }
}

bool KvCache::truncate(int32_t n_keep, int32_t n_written) {
    for (const auto & g : groups_) {
        if (!g.policy->can_rewind_to(n_keep, n_written)) return false;
    }
    for (auto & g : groups_) {
        // Forget the cut positions and shrink the viewed range to the highest cell still in use, so the
        // next ubatch attends over as few cells as a fresh context would (llama.cpp does the same).
        uint32_t n_used = 0;
        for (uint32_t c = 0; c < g.cell_pos.size(); ++c) {
            if (g.cell_pos[c] >= n_keep) g.cell_pos[c] = -1;
            if (g.cell_pos[c] >= 0) n_used = c + 1;
        }
        g.n_used = n_used;
    }
    return true;
}

void KvCache::clear() {
    for (auto & g : groups_) {
        std::fill(g.cell_pos.begin(), g.cell_pos.end(), -1);
        g.n_used = 0;
    }
}

size_t KvCache::total_bytes() const {
    size_t t = 0;
    for (const auto & s : stores_) t += s.bytes();
    return t;
}

}  // namespace simkv
