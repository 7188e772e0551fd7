#include "kv_cache.h"

#include "errors.h"
#include "kv_mask.h"
#include "model.h"

#include <algorithm>
#include <cmath>

namespace simkv {

namespace {

// Tokens from which a span over scattered cells is gathered (plan_ubatch). ggml's CPU flash attention
// computes every column for 64 queries or more (its tiled kernel) and skips hidden ones below.
constexpr uint32_t kGatherChunk = 32;

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
    return hp.is_swa(il) ? make_sliding_policy(hp.n_swa, cfg.n_ubatch) : make_full_policy(cfg.n_ctx);
}

uint64_t cells_of(const KvPolicy & p, uint32_t n_seq) {
    return p.pooled() ? p.capacity() : (uint64_t) p.capacity() * n_seq;
}

// A store's K + V bytes: its cells of `type`, and its residual's f16 cells.
uint64_t store_bytes(const HParams & hp, ggml_type type, uint64_t cells, uint64_t residual_cells) {
    const uint64_t k = hp.n_embd_k_gqa(), v = hp.n_embd_v_gqa();
    return cells * (ggml_row_size(type, k) + ggml_row_size(type, v)) +
           residual_cells * (ggml_row_size(GGML_TYPE_F16, k) + ggml_row_size(GGML_TYPE_F16, v));
}

// Empty the cells `drop` selects and shrink the viewed range to the highest cell still in use, so the
// next ubatch attends over as few cells as a fresh context would (llama.cpp does the same).
template <class Drop>
void drop_cells(KvGroup & g, Drop drop) {
    const uint32_t C = g.policy->residual_capacity();
    for (uint32_t c = 0; c < g.res_pos.size(); ++c) {
        if (g.res_pos[c] >= 0 && drop((int32_t) (c / C), g.res_pos[c])) g.res_pos[c] = -1;
    }
    uint32_t n_used = 0;
    for (uint32_t c = 0; c < g.cell_pos.size(); ++c) {
        if (g.cell_pos[c] >= 0 && drop(g.cell_seq[c], g.cell_pos[c])) {
            g.cell_pos[c] = -1;
            g.cell_seq[c] = -1;
            ++g.n_free;
        }
        if (g.cell_pos[c] >= 0) n_used = c + 1;
    }
    g.n_used = n_used;
}

}  // namespace

std::vector<std::pair<int32_t, uint32_t>> KvGroup::positions_of(int32_t seq) const {
    std::vector<std::pair<int32_t, uint32_t>> out;
    for (uint32_t c = 0; c < n_used; ++c) {
        if (cell_pos[c] >= 0 && cell_seq[c] == seq) out.emplace_back(cell_pos[c], c);
    }
    std::sort(out.begin(), out.end());
    return out;
}

std::unique_ptr<KvPolicy> lazy_policy(const KvConfig & cfg) {
    return make_lazy_policy(cfg.n_sink, cfg.n_window, cfg.n_ubatch, cfg.n_residual);
}

uint64_t KvCache::planned_bytes(const HParams & hp, const KvConfig & cfg, uint32_t il) {
    const auto p = policy_for(hp, cfg, il);
    const ggml_type t = is_lazy(cfg, il) ? cfg.type_lazy : cfg.type_full;
    return store_bytes(hp, t, cells_of(*p, cfg.n_seq_max), (uint64_t) p->residual_capacity() * cfg.n_seq_max);
}

KvCache::KvCache(const HParams & hp, const KvConfig & cfg, const std::vector<ggml_backend_buffer_type_t> & buft_per_layer)
    : n_seq_(cfg.n_seq_max), lazy_view_(make_masked_policy(cfg.n_ctx, cfg.n_sink, cfg.n_window)) {
    stores_.resize(hp.n_layer);
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const int g = group_for(policy_for(hp, cfg, il));
        groups_[g].layers.push_back((int) il);
        stores_[il] = alloc_store(hp, (int) il, g, is_lazy(cfg, il) ? cfg.type_lazy : cfg.type_full,
                                  (uint32_t) groups_[g].cell_pos.size(), (uint32_t) groups_[g].res_pos.size(),
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
            std::fill(e.cell_pos.begin(), e.cell_pos.end(), -1);
            std::fill(e.cell_seq.begin(), e.cell_seq.end(), -1);
            std::fill(e.res_pos.begin(), e.res_pos.end(), -1);
            std::fill(e.seq_lazy.begin(), e.seq_lazy.end(), 0);
            e.n_used = 0;
            e.n_free = (uint32_t) e.cell_pos.size();
            return (int) g;
        }
    }
    KvGroup grp;
    grp.policy = std::move(policy);
    const uint32_t cells = (uint32_t) cells_of(*grp.policy, n_seq_);
    grp.cell_pos.assign(cells, -1);
    grp.cell_seq.assign(cells, -1);
    grp.res_pos.assign((size_t) grp.policy->residual_capacity() * n_seq_, -1);
    grp.n_free = cells;
    grp.seq_lazy.assign(n_seq_, 0);
    groups_.push_back(std::move(grp));
    return (int) groups_.size() - 1;
}

KvStore KvCache::alloc_store(const HParams & hp, int il, int group, ggml_type type, uint32_t capacity,
                             uint32_t residual_cells, ggml_backend_buffer_type_t buft) {
    KvStore s;
    s.layer = il;
    s.group = group;
    s.type = type;
    s.rot = rotation_for(type, hp.head_dim);
    ggml_init_params ip = {4 * ggml_tensor_overhead(), nullptr, true};
    s.ctx.reset(ggml_init(ip));
    s.k = ggml_new_tensor_2d(s.ctx.get(), type, hp.n_embd_k_gqa(), capacity);
    s.v = ggml_new_tensor_2d(s.ctx.get(), type, hp.n_embd_v_gqa(), capacity);
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
    if (!dst.layers.empty() && (dst.cell_pos != src.cell_pos || dst.cell_seq != src.cell_seq || dst.n_used != src.n_used)) {
        throw std::runtime_error("regroup: the target group holds other positions");
    }
    dst.cell_pos = src.cell_pos;
    dst.cell_seq = src.cell_seq;
    dst.n_used = src.n_used;
    dst.n_free = src.n_free;
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
        const int h = new_group(make_full_policy(groups_[g].policy->capacity()));
        KvGroup & src = groups_[g];
        KvGroup & dst = groups_[h];
        dst.cell_pos = src.cell_pos;
        dst.cell_seq = src.cell_seq;
        dst.res_pos = src.res_pos;
        dst.n_used = src.n_used;
        dst.n_free = src.n_free;
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
            if (b.layers.empty() || b.policy->key() != a.policy->key() || b.seq_lazy != a.seq_lazy ||
                b.n_used != a.n_used || b.cell_pos != a.cell_pos || b.cell_seq != a.cell_seq || b.res_pos != a.res_pos) {
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
        if (!g.layers.empty() && g.policy->pooled()) m = std::min(m, g.n_free);
    }
    return m;
}

uint32_t KvCache::home_cell(const KvGroup & g, int seq) const {
    return (uint32_t) ((uint64_t) g.cell_pos.size() * (uint64_t) seq / n_seq_);
}

uint32_t KvCache::take_cell(KvGroup & g, int32_t pos, int32_t seq, CellCursor & cursor) const {
    const uint32_t cells = (uint32_t) g.cell_pos.size();
    uint32_t c;
    if (g.policy->pooled()) {
        // The first free cell from the sequence's home on, wrapping around: one sequence alone takes the
        // lowest free cell, so cell = position as in llama.cpp.
        if (seq != cursor.seq) {
            cursor.cell = home_cell(g, seq);
            cursor.seq = seq;
        }
        while (g.cell_pos[cursor.cell] >= 0) cursor.cell = cursor.cell + 1 == cells ? 0 : cursor.cell + 1;
        c = cursor.cell;
    } else {
        c = (uint32_t) seq * g.region() + g.policy->cell_of(pos);
    }
    if (g.cell_pos[c] < 0) --g.n_free;
    g.cell_pos[c] = pos;
    g.cell_seq[c] = seq;
    g.n_used = std::max(g.n_used, c + 1);
    return c;
}

void KvCache::plan_ubatch(const int32_t * pos, const int32_t * seq, uint32_t n_tokens, bool in_place) {
    // The caller (Engine::decode) refuses a call the pool cannot take before evaluating any of it.
    if (free_cells() < n_tokens) throw std::runtime_error("plan_ubatch: more tokens than free cells");
    for (auto & g : groups_) {
        if (g.layers.empty()) continue;  // e.g. the full group once exact prefill made every layer lazy
        const KvPolicy & p = *g.policy;
        const uint32_t cells = (uint32_t) g.cell_pos.size();
        // Write first: the ubatch's own keys must be visible to its queries.
        g.write_cells.resize(n_tokens);
        // A sequence lazy in this pool (dynamic mode) first gives back the cells its queries can no longer see
        // (the rule is monotone: a key out of the window stays out), so it holds sinks + window, as a ring.
        // Its first query here decides; one pass over the pool for every such sequence of the ubatch.
        std::vector<int32_t> first_q(n_seq_, -1);
        bool evict = false;
        for (uint32_t i = n_tokens; i-- > 0;) {
            if (g.seq_lazy[seq[i]]) {
                first_q[seq[i]] = pos[i];
                evict = true;
            }
        }
        if (evict) drop_cells(g, [&](int32_t s, int32_t k) { return first_q[s] >= 0 && !lazy_view_->visible(first_q[s], k); });
        CellCursor cursor;
        for (uint32_t i = 0; i < n_tokens; ++i) g.write_cells[i] = take_cell(g, pos[i], seq[i], cursor);
        // Lazy rings are read through a gather of their visible cells (AttnSpan); the others in place, over
        // each sequence's span of cells (it holds at least the cells just written).
        const bool gathered = p.kind() == KvKind::Lazy;
        std::vector<uint32_t> lo(n_seq_, UINT32_MAX), hi(n_seq_, 0), held(n_seq_, 0);
        for (uint32_t c = 0; !gathered && c < g.n_used; ++c) {
            if (g.cell_pos[c] < 0) continue;
            const int32_t s = g.cell_seq[c];
            lo[s] = std::min(lo[s], c);
            hi[s] = c + 1;
            ++held[s];
        }
        // One attention per run of consecutive tokens of one sequence, over that sequence's cells only.
        g.spans.clear();
        g.gather.clear();
        g.mask.clear();
        g.res_read.clear();
        g.res_dst.clear();
        for (uint32_t t0 = 0; t0 < n_tokens;) {
            uint32_t t1 = t0 + 1;
            while (t1 < n_tokens && seq[t1] == seq[t0]) ++t1;
            const int32_t s = seq[t0];
            AttnSpan sp;
            sp.t0 = t0;
            sp.n_tokens = t1 - t0;
            sp.mask_offset = g.mask.size();
            // A chunk whose sequence's cells are scattered over a range half as large again as they are: a
            // gather (a lone query skips hidden columns cheaply and reads in place).
            const bool scattered = !gathered && !in_place && sp.n_tokens >= kGatherChunk && hi[s] - lo[s] > held[s] + held[s] / 2;
            if (gathered) {
                plan_gathered_span(g, sp, pos, seq);
            } else if (scattered) {
                plan_pooled_gather(g, sp, pos, seq);
            } else {
                sp.n_kv = std::min(cells, pad_cells(hi[s] - lo[s]));
                sp.kv_lo = std::min(lo[s], cells - sp.n_kv);
                g.mask.resize(g.mask.size() + (size_t) sp.n_tokens * sp.n_kv);
                const KvPolicy & v = view(g, s);
                auto visible = [&v](int32_t q, int32_t k) { return v.visible(q, k); };
                fill_mask_rows(g.cell_pos, g.cell_seq, sp.kv_lo, g.n_used, pos + t0, seq + t0, sp.n_tokens, sp.n_kv,
                               visible, g.mask.data() + sp.mask_offset);
            }
            g.spans.push_back(sp);
            t0 = t1;
        }
    }
}

void KvCache::plan_pooled_gather(KvGroup & g, AttnSpan & sp, const int32_t * pos, const int32_t * seq) const {
    const int32_t s = seq[sp.t0];
    const std::vector<std::pair<int32_t, uint32_t>> held = g.positions_of(s);
    sp.n_kv = pad_cells((uint32_t) held.size());  // it holds at least the cells just written
    sp.gather_offset = (int64_t) g.gather.size();
    for (uint32_t j = 0; j < sp.n_kv; ++j) g.gather.push_back((int32_t) held[j < held.size() ? j : 0].second);
    const KvPolicy & v = view(g, s);
    for (uint32_t i = 0; i < sp.n_tokens; ++i) {
        const int32_t q = pos[sp.t0 + i];
        for (uint32_t j = 0; j < sp.n_kv; ++j) {  // padding (j beyond the cells held) repeats a cell, hidden
            const int32_t k = j < held.size() ? held[j].first : -1;
            g.mask.push_back(k >= 0 && k <= q && v.visible(q, k) ? mask_visible() : mask_hidden());
        }
    }
}

void KvCache::plan_gathered_span(KvGroup & g, AttnSpan & sp, const int32_t * pos, const int32_t * seq) const {
    const KvPolicy & p = *g.policy;
    const int32_t s = seq[sp.t0];
    const int32_t * q_pos = pos + sp.t0;
    const uint32_t n_q = sp.n_tokens, r0 = (uint32_t) s * g.region(), n_r = g.region();
    // With a residual (kv_policy_lazy.cpp) a query at q reads a key at k in f16 iff q - k < R and the key is
    // in f16 here: the span's own (first ..) or one the residual holds. Those columns come after the ring's.
    const int32_t R = (int32_t) p.residual();
    const uint32_t C = p.residual_capacity(), res0 = (uint32_t) s * C;
    const int32_t first = q_pos[0];
    auto in_f16 = [&](int32_t k) { return R && (k >= first || g.res_pos[res0 + (uint32_t) k % C] == k); };
    auto reads_f16 = [&](int32_t q, int32_t k) { return in_f16(k) && q - k < R; };
    auto visible = [&p](int32_t q, int32_t k) { return p.visible(q, k); };
    auto from_ring = [&](int32_t q, int32_t k) { return p.visible(q, k) && !reads_f16(q, k); };
    std::vector<int32_t> res_held;  // residual positions some query reads, oldest first
    for (uint32_t c = res0; c < res0 + C; ++c) {
        if (g.res_pos[c] >= 0 && g.res_pos[c] > first - R && g.res_pos[c] < first) res_held.push_back(g.res_pos[c]);
    }
    std::sort(res_held.begin(), res_held.end());

    // The sequence's ring region, masked, then only the columns some query reads from it.
    std::vector<ggml_fp16_t> rows((size_t) n_q * n_r);
    fill_mask_rows(g.cell_pos, g.cell_seq, r0, g.n_used, q_pos, seq + sp.t0, n_q, n_r, from_ring, rows.data());
    std::vector<uint32_t> cols;
    for (uint32_t j = 0; j < n_r; ++j) {
        for (uint32_t i = 0; i < n_q; ++i) {
            if (rows[(size_t) i * n_r + j] == mask_visible()) {
                cols.push_back(j);
                break;
            }
        }
    }
    sp.residual = R > 0;
    // Always R - 1 residual columns (the most a span can read: positions first - R + 1 .. first - 1), padded
    // with a hidden cell: a decode step then has the shape of the one before, and its graph is reused.
    sp.n_res = sp.residual ? (uint32_t) R - 1 : 0;
    const uint32_t n_tail = sp.residual ? sp.n_res + n_q : 0;  // f16 columns: the residual's, the span's own
    sp.n_kv = pad_cells(std::max<uint32_t>((uint32_t) cols.size(), 1) + n_tail);  // at least one ring row
    const uint32_t n_ring = sp.n_kv - n_tail;
    sp.gather_offset = (int64_t) g.gather.size();
    // Padding (and a ring part no query reads) repeats a hidden cell. For a lone query (a decode step) it is
    // spread evenly among the read columns: ggml's flash attention splits a lone query's columns evenly
    // between threads, and padding bunched at the end left the last thread idle for much of its share.
    // Chunks keep it at the end, where their tiles see the columns in the order a full store has them
    // (a window covering the context then computes exactly what a full layer does).
    std::vector<int64_t> ring_col(n_ring, -1);  // index into cols, or -1 for padding
    const uint64_t n_pad = n_q == 1 ? n_ring - (uint32_t) cols.size() : 0;
    for (uint32_t k = 0, c = 0; k < n_ring && c < cols.size(); ++k) {
        const bool pad = (k + 1) * n_pad / n_ring > k * n_pad / n_ring;
        if (!pad) ring_col[k] = c++;
    }
    for (uint32_t k = 0; k < n_ring; ++k) g.gather.push_back((int32_t) (r0 + (ring_col[k] >= 0 ? cols[ring_col[k]] : 0u)));
    auto f16_mask = [&](int32_t q, int32_t k) { return k <= q && q - k < R && visible(q, k) ? mask_visible() : mask_hidden(); };
    for (uint32_t i = 0; i < n_q; ++i) {
        for (uint32_t k = 0; k < n_ring; ++k) g.mask.push_back(ring_col[k] >= 0 ? rows[(size_t) i * n_r + cols[ring_col[k]]] : mask_hidden());
        for (int32_t k : res_held) g.mask.push_back(f16_mask(q_pos[i], k));
        for (size_t k = res_held.size(); k < sp.n_res; ++k) g.mask.push_back(mask_hidden());
        for (uint32_t t = 0; sp.residual && t < n_q; ++t) g.mask.push_back(f16_mask(q_pos[i], first + (int32_t) t));
    }
    if (!sp.residual) return;
    // Read the residual, then keep the span's last C positions in it. (The graph writes them from the rows
    // it read, so a cell is overwritten only after it was read.)
    sp.res_read_offset = g.res_read.size();
    for (int32_t k : res_held) g.res_read.push_back((int32_t) (res0 + (uint32_t) k % C));
    g.res_read.resize(sp.res_read_offset + sp.n_res, (int32_t) res0);  // padding: hidden above
    sp.res_write_offset = g.res_dst.size();
    for (uint32_t t = n_q > C ? n_q - C : 0; t < n_q; ++t) {  // the last columns, in order
        const uint32_t cell = res0 + (uint32_t) (first + (int32_t) t) % C;
        g.res_dst.push_back(cell);
        g.res_pos[cell] = first + (int32_t) t;
    }
    sp.n_res_write = (uint32_t) (g.res_dst.size() - sp.res_write_offset);
}


bool KvCache::truncate(int seq, int32_t n_keep, int32_t n_written) {
    for (const auto & g : groups_) {
        if (!g.policy->can_rewind_to(n_keep, n_written)) return false;
        // A sequence lazy in a pool keeps what its next query sees: rewinding needs what a query at n_keep sees.
        if (!g.layers.empty() && g.seq_lazy[seq]) {
            uint32_t needed = 0, held = 0;
            for (int32_t k = 0; k < n_keep; ++k) needed += lazy_view_->visible(n_keep, k);
            for (const auto & [k, cell] : g.positions_of(seq)) held += k < n_keep && lazy_view_->visible(n_keep, k);
            if (held != needed) return false;
        }
    }
    for (auto & g : groups_) drop_cells(g, [&](int32_t s, int32_t p) { return s == seq && p >= n_keep; });
    return true;
}

void KvCache::clear(int seq) {
    for (auto & g : groups_) {
        drop_cells(g, [&](int32_t s, int32_t) { return s == seq; });
        g.seq_lazy[seq] = 0;  // its next prompt chooses its lazy layers anew
    }
    merge_groups();
}

void KvCache::clear() {
    for (auto & g : groups_) {
        drop_cells(g, [](int32_t, int32_t) { return true; });
        std::fill(g.seq_lazy.begin(), g.seq_lazy.end(), 0);
    }
    merge_groups();
}

uint32_t KvCache::seq_cells(int seq, int il) const {
    const KvGroup & g = groups_[stores_[il].group];
    uint32_t n = 0;
    for (uint32_t c = 0; c < g.cell_pos.size(); ++c) n += g.cell_pos[c] >= 0 && g.cell_seq[c] == seq;
    return n;
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
