// Exact prefill's last step (lazy_prefill="exact", dynamic mode): after the prompt was evaluated with every
// layer full, the lazy layers' full stores are compacted into sink + ring stores. What a lazy store would
// hold had it been written all along is copied over (converting type, and rotating where exactly one side
// is rotated: kv_rotation.h), then the full stores are freed. With several sequences the prompt is
// evaluated in a cache of its own and its positions are copied into the shared one the same way
// (adopt_sequence): every one into the pooled stores, what a ring keeps into the sequence's region.
#include "errors.h"
#include "graph.h"
#include "kv_cache.h"
#include "model.h"

#include <algorithm>

namespace simkv {

std::vector<std::pair<int32_t, uint32_t>> KvCache::kept_positions(const KvGroup & g, const KvGroup & src,
                                                                  int32_t seq) const {
    std::vector<std::pair<int32_t, uint32_t>> by_pos = src.cells.positions_of(seq);  // (position, source cell)
    if (!by_pos.empty() && g.seq_lazy[seq]) {
        // Lazy for this sequence in a pool (dynamic mode): only what its next query sees is kept.
        const int32_t next = by_pos.back().first + 1;
        by_pos.erase(std::remove_if(by_pos.begin(), by_pos.end(),
                                    [&](const auto & pc) { return !view(g, seq).visible(next, pc.first); }),
                     by_pos.end());
    }
    return by_pos;
}

KvCache::CellCopy KvCache::place_positions(KvGroup & g, const KvGroup & src, int32_t seq) {
    const std::vector<std::pair<int32_t, uint32_t>> by_pos = kept_positions(g, src, seq);
    // Write every position in order: in a ring later positions overwrite earlier ones, so what survives is
    // exactly what it would hold had it been written all along.
    std::vector<int32_t> src_of(g.cells.size(), -1);
    CellCursor cursor;
    for (const auto & [pos, cell] : by_pos) src_of[take_cell(g, g.cells, pos, seq, cursor)] = (int32_t) cell;
    CellCopy cc;
    for (uint32_t d = 0; d < src_of.size(); ++d) {
        if (src_of[d] < 0) continue;
        cc.src_cells.push_back(src_of[d]);
        cc.dst_cells.push_back(d);
    }
    // A quantized ring's residual gets the last positions, still exact in the source (kv_policy_lazy.cpp).
    const uint32_t C = g.policy->residual_capacity();
    for (size_t i = by_pos.size() > C ? by_pos.size() - C : 0; C && i < by_pos.size(); ++i) {
        const uint32_t d = g.policy->residual_cell(seq, by_pos[i].first);
        g.cells.set_residual(d, by_pos[i].first);
        cc.res_src_cells.push_back((int32_t) by_pos[i].second);
        cc.res_dst_cells.push_back(d);
    }
    return cc;
}

KvCache::Conversion KvCache::plan_lazy(const HParams & hp, const KvConfig & cfg, const std::vector<int> & layers,
                                       const std::vector<ggml_backend_buffer_type_t> & buft_per_layer) {
    Conversion c;
    c.layers = layers;
    // Full layers, each group holding the same positions in the same cells (written in lockstep: quantized
    // full layers with an f16 residual are a group of their own), so one placement serves them all.
    const KvCells & first = groups_[stores_[layers[0]].group].cells;
    for (int il : layers) {
        const KvGroup & g = groups_[stores_[il].group];
        if (g.policy->kind() != KvKind::Full || g.cells.positions() != first.positions() ||
            g.cells.sequences() != first.sequences()) {
            throw std::runtime_error("only full layers holding the same cells can be made lazy");
        }
    }
    c.group = group_for(lazy_policy(cfg));
    const KvGroup & dst = groups_[c.group];
    if (!dst.layers.empty()) throw std::runtime_error("exact prefill cannot join layers that were lazy from the start");
    for (int il : layers) {
        c.stores.push_back(alloc_store(hp, il, c.group, cfg.lazy_types.at(il), dst.cells.size(),
                                       (uint32_t) dst.cells.residual().size(), buft_per_layer[il]));
    }
    return c;
}

bool KvCache::copy_cells(const std::vector<CellCopy> & copies, ggml_backend_sched_t sched, GraphArena & arena) {
    // Rows of the source store -> F32 (-> rotated) -> the destination's type, at its cells.
    ggml_context_ptr ctx = arena.context();
    ggml_cgraph * gf = ggml_new_graph_custom(ctx.get(), arena.n_nodes(), false);
    RotationInputs rotations;
    std::vector<std::pair<ggml_tensor *, const void *>> inputs;  // index tensors and their data
    auto index = [&](ggml_type type, const auto & cells) {
        ggml_tensor * t = ggml_new_tensor_1d(ctx.get(), type, (int64_t) cells.size());
        ggml_set_input(t);
        inputs.emplace_back(t, cells.data());
        return t;
    };
    auto copy = [&](ggml_tensor * from, uint32_t from_rot, ggml_tensor * to, uint32_t to_rot, ggml_tensor * src,
                    ggml_tensor * dst) {
        ggml_tensor * rows = rerotate(ctx.get(), rotations, ggml_get_rows(ctx.get(), from, src), from_rot, to_rot);
        ggml_build_forward_expand(gf, ggml_set_rows(ctx.get(), to, rows, dst));
    };
    for (const CellCopy & cc : copies) {
        ggml_tensor * src = cc.src_cells.empty() ? nullptr : index(GGML_TYPE_I32, cc.src_cells);
        ggml_tensor * dst = src ? index(GGML_TYPE_I64, cc.dst_cells) : nullptr;
        ggml_tensor * res_src = cc.res_src_cells.empty() ? nullptr : index(GGML_TYPE_I32, cc.res_src_cells);
        ggml_tensor * res_dst = res_src ? index(GGML_TYPE_I64, cc.res_dst_cells) : nullptr;
        for (const auto & [from, to] : cc.stores) {
            if (src) {
                copy(from->k, from->rot.k, to->k, to->rot.k, src, dst);
                copy(from->v, from->rot.v, to->v, to->rot.v, src, dst);
            }
            if (res_src) {  // f16 rows in the ring's rotation
                copy(from->k, from->rot.k, to->k_res, to->rot.k, res_src, res_dst);
                copy(from->v, from->rot.v, to->v_res, to->rot.v, res_src, res_dst);
            }
        }
    }
    if (inputs.empty()) return true;
    ggml_backend_sched_reset(sched);
    const bool ok = ggml_backend_sched_alloc_graph(sched, gf);
    if (ok) {
        for (const auto & [t, data] : inputs) ggml_backend_tensor_set(t, data, 0, ggml_nbytes(t));
        rotations.set();
    }
    const bool done = ok && ggml_backend_sched_graph_compute(sched, gf) == GGML_STATUS_SUCCESS;
    ggml_backend_sched_reset(sched);
    return done;
}

void KvCache::commit_lazy(Conversion && c) {
    KvGroup & dst = groups_[c.group];
    for (size_t i = 0; i < c.layers.size(); ++i) {
        const int il = c.layers[i];
        KvGroup & src = groups_[stores_[il].group];
        src.layers.erase(std::find(src.layers.begin(), src.layers.end(), il));
        stores_[il] = std::move(c.stores[i]);  // frees the full store
        dst.layers.push_back(il);
    }
    std::sort(dst.layers.begin(), dst.layers.end());
    ++layout_version_;
}

size_t KvCache::make_lazy(const HParams & hp, const KvConfig & cfg, const std::vector<int> & layers,
                          const std::vector<ggml_backend_buffer_type_t> & buft_per_layer, ggml_backend_sched_t sched,
                          GraphArena & arena) {
    if (layers.empty()) return total_bytes();
    Conversion c = plan_lazy(hp, cfg, layers, buft_per_layer);
    size_t peak = total_bytes();
    for (const KvStore & s : c.stores) peak += s.bytes();
    KvGroup & dst = groups_[c.group];
    CellCopy cc = place_positions(dst, groups_[stores_[layers[0]].group], 0);  // exact prefill runs one sequence
    for (size_t i = 0; i < layers.size(); ++i) cc.stores.emplace_back(&stores_[layers[i]], &c.stores[i]);
    if (!copy_cells({cc}, sched, arena)) {
        dst.cells.clear();  // the new group holds nothing again (c's stores go with c)
        throw std::runtime_error("failed to compact the lazy layers");
    }
    commit_lazy(std::move(c));
    return peak;
}

void KvCache::adopt_sequence(const KvCache & prompt, int seq, const std::vector<int> & lazy_layers,
                             ggml_backend_sched_t sched, GraphArena & arena) {
    // Check first: the sequence is empty here, and each pool has a free cell for each position it takes.
    for (size_t gi = 0; gi < groups_.size(); ++gi) {
        const KvGroup & g = groups_[gi];
        if (g.layers.empty()) continue;
        if (g.cells.count(seq)) throw std::runtime_error("adopt_sequence: the sequence holds cells");
        const KvGroup & src = prompt.groups_[prompt.stores_.at(g.layers[0]).group];
        for (int il : g.layers) {
            if (&prompt.groups_[prompt.stores_.at(il).group] != &src) {
                throw std::runtime_error("adopt_sequence: layers of one group here are in different groups there");
            }
        }
    }
    make_seq_lazy(lazy_layers, seq);  // undone by clear(seq) below
    try {
        std::vector<CellCopy> copies;
        for (KvGroup & g : groups_) {
            if (g.layers.empty()) continue;
            const KvGroup & src = prompt.groups_[prompt.stores_[g.layers[0]].group];
            const size_t n = kept_positions(g, src, seq).size();
            if (g.policy->pooled() && n > g.cells.n_free()) {
                throw BadInput("the KV cache is full: the prompt needs " + std::to_string(n) + " cells, " +
                               std::to_string(g.cells.n_free()) + " are free");
            }
        }
        for (KvGroup & g : groups_) {
            if (g.layers.empty()) continue;
            copies.push_back(place_positions(g, prompt.groups_[prompt.stores_[g.layers[0]].group], seq));
            for (int il : g.layers) copies.back().stores.emplace_back(&prompt.stores_[il], &stores_[il]);
        }
        if (!copy_cells(copies, sched, arena)) throw std::runtime_error("failed to copy a prompt's KV into the shared cache");
    } catch (...) {
        clear(seq);
        throw;
    }
}

}  // namespace simkv
