#include "kv_cache.h"

#include "errors.h"
#include "kv_mask.h"
#include "model.h"

#include <algorithm>
#include <atomic>
#include <cmath>

namespace simkv {

namespace {

uint64_t next_cache_id() {
    static std::atomic<uint64_t> next{1};
    return next++;
}

bool is_lazy(const KvConfig & cfg, uint32_t il) {
    return std::find(cfg.lazy_layers.begin(), cfg.lazy_layers.end(), (int) il) != cfg.lazy_layers.end();
}

// The policy of layer il's store: lazy if asked, the model's own sliding window, else full.
std::unique_ptr<KvPolicy> policy_for(const HParams & hp, const KvConfig & cfg, uint32_t il) {
    if (is_lazy(cfg, il)) {
        if (hp.is_swa(il)) {
            throw BadInput("layer " + std::to_string(il) + " is a sliding-window layer of the model: only its "
                           "global layers can be lazy");
        }
        return lazy_policy(cfg);
    }
    if (hp.is_swa(il)) return make_sliding_policy(hp.n_swa, cfg.n_ubatch);
    return make_full_policy(cfg.n_ctx, cfg.full_types.at(il).quantized() ? cfg.n_full_residual : 0);
}

uint64_t cells_of(const KvPolicy & p, uint32_t n_seq) {
    return p.pooled() ? p.capacity() : (uint64_t) p.capacity() * n_seq;
}

// The types of layer il's store, by its kind.
KvTypes types_of(const KvConfig & cfg, uint32_t il) { return is_lazy(cfg, il) ? cfg.lazy_types.at(il) : cfg.full_types.at(il); }

// A store's K + V bytes: its cells of its types, and its residual's f16 cells.
uint64_t store_bytes(const HParams & hp, KvTypes types, uint64_t cells, uint64_t residual_cells) {
    const uint64_t k = hp.n_embd_k_gqa(), v = hp.n_embd_v_gqa();
    return cells * (ggml_row_size(types.k, k) + ggml_row_size(types.v, v)) +
           residual_cells * (ggml_row_size(GGML_TYPE_F16, k) + ggml_row_size(GGML_TYPE_F16, v));
}

}  // namespace

std::unique_ptr<KvPolicy> lazy_policy(const KvConfig & cfg) {
    return make_lazy_policy(cfg.n_sink, cfg.n_window, cfg.n_ubatch, cfg.n_residual);
}

uint64_t KvCache::planned_bytes(const HParams & hp, const KvConfig & cfg, uint32_t il) {
    const auto p = policy_for(hp, cfg, il);
    return store_bytes(hp, types_of(cfg, il), cells_of(*p, cfg.n_seq_max), (uint64_t) p->residual_capacity() * cfg.n_seq_max);
}

KvKind KvCache::planned_kind(const HParams & hp, const KvConfig & cfg, uint32_t il) { return policy_for(hp, cfg, il)->kind(); }

KvTypes KvCache::planned_types(const KvConfig & cfg, uint32_t il) { return types_of(cfg, il); }

KvCache::KvCache(const HParams & hp, const KvConfig & cfg, const std::vector<ggml_backend_buffer_type_t> & buft_per_layer)
    : id_(next_cache_id()), n_seq_(cfg.n_seq_max), lazy_cells_(lazy_policy(cfg)->capacity()), lazy_view_(make_masked_policy(cfg.n_ctx, cfg.n_sink, cfg.n_window)) {
    stores_.resize(hp.n_layer);
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const int g = group_for(policy_for(hp, cfg, il));
        groups_[g].layers.push_back((int) il);
        stores_[il] = alloc_store(hp, (int) il, g, types_of(cfg, il),
                                  groups_[g].cells.size(), (uint32_t) groups_[g].cells.residual().size(),
                                  buft_per_layer[il]);
    }
}

int KvCache::group_for(std::unique_ptr<KvPolicy> policy) {
    // One group per distinct policy: its layers share the cell map and the mask.
    for (size_t g = 0; g < groups_.size(); ++g) {
        if (groups_[g].policy->key() == policy->key()) return (int) g;
    }
    return new_group(std::move(policy));
}

int KvCache::new_group(std::unique_ptr<KvPolicy> policy) {
    for (size_t g = 0; g < groups_.size(); ++g) {  // one left empty by a merge or a compaction
        if (groups_[g].layers.empty() && groups_[g].policy->key() == policy->key()) {
            KvGroup & e = groups_[g];
            e.cells.clear();
            std::fill(e.seq_lazy.begin(), e.seq_lazy.end(), 0);
            return (int) g;
        }
    }
    KvGroup grp;
    grp.policy = std::move(policy);
    grp.cells = KvCells((uint32_t) cells_of(*grp.policy, n_seq_), n_seq_, grp.policy->residual_capacity());
    grp.seq_lazy.assign(n_seq_, 0);
    groups_.push_back(std::move(grp));
    return (int) groups_.size() - 1;
}

KvStore KvCache::alloc_store(const HParams & hp, int il, int group, KvTypes types, uint32_t capacity,
                             uint32_t residual_cells, ggml_backend_buffer_type_t buft) {
    KvStore s;
    s.layer = il;
    s.group = group;
    s.rot = rotation_for(types, hp.head_dim);
    ggml_init_params ip = {4 * ggml_tensor_overhead(), nullptr, true};
    s.ctx.reset(ggml_init(ip));
    s.k = ggml_new_tensor_2d(s.ctx.get(), types.k, hp.n_embd_k_gqa(), capacity);
    s.v = ggml_new_tensor_2d(s.ctx.get(), types.v, hp.n_embd_v_gqa(), capacity);
    ggml_format_name(s.k, "cache_k_l%d", il);
    ggml_format_name(s.v, "cache_v_l%d", il);
    if (residual_cells) {  // rows in the ring's rotation: they are read beside its rows
        s.k_res = ggml_new_tensor_2d(s.ctx.get(), GGML_TYPE_F16, hp.n_embd_k_gqa(), residual_cells);
        s.v_res = ggml_new_tensor_2d(s.ctx.get(), GGML_TYPE_F16, hp.n_embd_v_gqa(), residual_cells);
        ggml_format_name(s.k_res, "cache_k_res_l%d", il);
        ggml_format_name(s.v_res, "cache_v_res_l%d", il);
    }
    s.buffer.reset(ggml_backend_alloc_ctx_tensors_from_buft(s.ctx.get(), buft));
    if (!s.buffer) throw std::runtime_error("failed to allocate the KV store of layer " + std::to_string(il));
    // Zero it: masked cells are skipped on the CPU, but a NaN in a never-written cell times a zero
    // weight would still poison a GPU kernel.
    ggml_backend_buffer_clear(s.buffer.get(), 0);
    s.device = ggml_backend_buft_name(buft);
    return s;
}

std::vector<int> KvCache::layers_of_kind(KvKind kind) const {
    std::vector<int> out;
    for (size_t il = 0; il < stores_.size(); ++il) {
        if (kind_of((int) il) == kind) out.push_back((int) il);
    }
    return out;
}

void KvCache::regroup(const std::vector<int> & layers, std::unique_ptr<KvPolicy> policy) {
    if (layers.empty()) return;
    const int src_group = stores_.at(layers[0]).group;
    for (int il : layers) {
        if (stores_.at(il).group != src_group) throw std::runtime_error("regroup: layers of different groups");
        if (stores_[il].capacity() != policy->capacity()) throw std::runtime_error("regroup: capacity differs");
    }
    // Only between pooled policies, whose cells hold any position: the cell map carries over unchanged.
    if (!policy->pooled() || !groups_[src_group].policy->pooled()) throw std::runtime_error("regroup: pooled groups only");
    const int dst_group = group_for(std::move(policy));
    if (dst_group == src_group) return;
    KvGroup & src = groups_[src_group];
    KvGroup & dst = groups_[dst_group];
    // A group with layers has its own cell map; joining it needs the same one (both written in lockstep).
    if (!dst.layers.empty() && dst.cells != src.cells) throw std::runtime_error("regroup: the target group holds other positions");
    dst.cells = src.cells;
    for (int il : layers) {
        src.layers.erase(std::find(src.layers.begin(), src.layers.end(), il));
        dst.layers.push_back(il);
        stores_[il].group = dst_group;
    }
    std::sort(dst.layers.begin(), dst.layers.end());
    ++layout_version_;
}

void KvCache::make_seq_lazy(const std::vector<int> & layers, int seq) {
    std::vector<int> touched;  // groups with a layer among `layers`
    for (int il : layers) {
        const int g = stores_.at(il).group;
        if (groups_[g].policy->kind() != KvKind::Full) throw std::runtime_error("only full layers can be lazy per sequence");
        if (std::find(touched.begin(), touched.end(), g) == touched.end()) touched.push_back(g);
    }
    for (int g : touched) {
        std::vector<int> lazy, full;
        for (int il : groups_[g].layers) {
            (std::find(layers.begin(), layers.end(), il) != layers.end() ? lazy : full).push_back(il);
        }
        if (full.empty()) {
            groups_[g].seq_lazy[seq] = 1;
            continue;
        }
        // Split: the lazy part gets a group of its own with the same cell map (its stores hold the same
        // positions in the same cells); from now on the two are written and trimmed each by its own map.
        const int h = new_group(make_full_policy(groups_[g].policy->capacity(), groups_[g].policy->residual()));
        KvGroup & src = groups_[g];
        KvGroup & dst = groups_[h];
        dst.cells = src.cells;
        dst.seq_lazy = src.seq_lazy;
        dst.seq_lazy[seq] = 1;
        src.layers = full;
        dst.layers = lazy;
        for (int il : lazy) stores_[il].group = h;
    }
    ++layout_version_;
}

void KvCache::merge_groups() {
    for (size_t i = 0; i < groups_.size(); ++i) {
        KvGroup & a = groups_[i];
        if (a.layers.empty()) continue;
        for (size_t j = i + 1; j < groups_.size(); ++j) {
            KvGroup & b = groups_[j];
            if (b.layers.empty() || b.policy->key() != a.policy->key() || b.seq_lazy != a.seq_lazy || b.cells != a.cells) {
                continue;
            }
            for (int il : b.layers) stores_[il].group = (int) i;
            a.layers.insert(a.layers.end(), b.layers.begin(), b.layers.end());
            std::sort(a.layers.begin(), a.layers.end());
            b.layers.clear();
            ++layout_version_;
        }
    }
}

std::vector<int> KvCache::seq_lazy_layers(int seq) const {
    std::vector<int> out;
    for (size_t il = 0; il < stores_.size(); ++il) {
        const KvGroup & g = groups_[stores_[il].group];
        if (g.policy->kind() == KvKind::Lazy || g.seq_lazy.at((size_t) seq)) out.push_back((int) il);
    }
    return out;
}

uint32_t KvCache::max_ubatch() const {
    uint32_t m = UINT32_MAX;
    for (const auto & g : groups_) m = std::min(m, g.policy->max_ubatch());
    return m;
}

uint32_t KvCache::free_cells() const {
    uint32_t m = UINT32_MAX;
    for (const auto & g : groups_) {
        if (!g.layers.empty() && g.policy->pooled()) m = std::min(m, g.cells.n_free());
    }
    return m;
}

int64_t KvCache::cells_needed(int seq, uint32_t n_keep, uint32_t n_new) const {
    int64_t most = 0;
    bool pooled = false;
    for (const auto & g : groups_) {
        if (g.layers.empty() || !g.policy->pooled()) continue;
        int64_t after = (int64_t) n_keep + n_new;
        if (g.seq_lazy.at((size_t) seq)) after = std::min<int64_t>(after, lazy_cells_);
        const int64_t need = after - (int64_t) g.cells.count(seq);
        most = pooled ? std::max(most, need) : need;
        pooled = true;
    }
    return most;
}

uint32_t KvCache::cells_held(int seq) const {
    uint32_t least = UINT32_MAX;
    for (const auto & g : groups_) {
        if (!g.layers.empty() && g.policy->pooled()) least = std::min(least, g.cells.count(seq));
    }
    return least == UINT32_MAX ? 0 : least;
}

uint32_t KvCache::home_cell(const KvGroup & g, int seq) const {
    return (uint32_t) ((uint64_t) g.cells.size() * (uint64_t) seq / n_seq_);
}

uint32_t KvCache::take_cell(const KvGroup & g, KvCells & cells, int32_t pos, int32_t seq, CellCursor & cursor) const {
    uint32_t c;
    if (g.policy->pooled()) {
        // The first free cell from the sequence's home on, wrapping around: one sequence alone takes the
        // lowest free cell, so cell = position as in llama.cpp.
        if (seq != cursor.seq) {
            cursor.cell = home_cell(g, seq);
            cursor.seq = seq;
        }
        while (cells.holds(cursor.cell)) cursor.cell = cursor.cell + 1 == cells.size() ? 0 : cursor.cell + 1;
        c = cursor.cell;
    } else {
        c = (uint32_t) seq * g.region() + g.policy->cell_of(pos);
    }
    cells.set(c, pos, seq);
    return c;
}

bool KvCache::truncate(int seq, int32_t n_keep, int32_t n_written) {
    for (const auto & g : groups_) {
        if (!g.policy->can_rewind_to(n_keep, n_written)) return false;
        // A sequence lazy in a pool keeps what its next query sees: rewinding needs what a query at n_keep sees.
        if (!g.layers.empty() && g.seq_lazy[seq]) {
            uint32_t needed = 0, held = 0;
            for (int32_t k = 0; k < n_keep; ++k) needed += lazy_view_->visible(n_keep, k);
            for (const auto & [k, cell] : g.cells.positions_of(seq)) held += k < n_keep && lazy_view_->visible(n_keep, k);
            if (held != needed) return false;
        }
    }
    for (auto & g : groups_) g.cells.drop_if([&](int32_t s, int32_t p) { return s == seq && p >= n_keep; });
    return true;
}

void KvCache::clear(int seq) {
    for (auto & g : groups_) {
        g.cells.drop_if([&](int32_t s, int32_t) { return s == seq; });
        g.seq_lazy[seq] = 0;  // its next prompt chooses its lazy layers anew
    }
    merge_groups();
}

void KvCache::clear() {
    for (auto & g : groups_) {
        g.cells.clear();
        std::fill(g.seq_lazy.begin(), g.seq_lazy.end(), 0);
    }
    merge_groups();
}

uint32_t KvCache::seq_cells(int seq, int il) const {
    return groups_[stores_[il].group].cells.count(seq);
}

size_t KvCache::seq_bytes(int seq) const {
    std::vector<int64_t> held(groups_.size(), -1);  // cells of seq per group, counted once per group
    size_t total = 0;
    for (const KvStore & s : stores_) {
        const KvGroup & g = groups_[s.group];
        if (g.policy->pooled() && held[s.group] < 0) held[s.group] = seq_cells(seq, s.layer);
        const uint32_t cells = g.policy->pooled() ? (uint32_t) held[s.group] : g.region();
        total += (ggml_row_size(s.k->type, s.k->ne[0]) + ggml_row_size(s.v->type, s.v->ne[0])) * cells;
        if (s.k_res) {
            total += (ggml_row_size(s.k_res->type, s.k_res->ne[0]) + ggml_row_size(s.v_res->type, s.v_res->ne[0])) *
                     g.policy->residual_capacity();
        }
    }
    return total;
}

size_t KvCache::total_bytes() const {
    size_t t = 0;
    for (const auto & s : stores_) t += s.bytes();
    return t;
}

}  // namespace simkv
