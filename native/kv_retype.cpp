// What-if types for the profiler: a full layer's store replaced by one of other K/V types that holds the
// same cells, converted (and rotated where the new types are) by one graph run, as compaction converts.
// Every query from then on writes and reads the new store, exactly as a cache built with those types
// would, over the prefix the full-precision run wrote: a quantized store with the f16 residual the
// configuration gives quantized full layers (kv_policy_full.cpp), filled with each sequence's latest
// positions from the rows being converted. The replaced store is kept aside and comes back, to its own
// group, with restore_types(): converting a quantized copy back would not give its rows back.
#include "errors.h"
#include "kv_cache.h"
#include "model.h"

#include <algorithm>

namespace simkv {

void KvCache::retype(const HParams & hp, int il, KvTypes types, uint32_t residual, ggml_backend_buffer_type_t buft,
                     ggml_backend_sched_t sched, GraphArena & arena) {
    if (il < 0 || (size_t) il >= stores_.size()) throw BadInput("layer " + std::to_string(il) + " is out of range");
    const KvKind kind = kind_of(il);
    if (kind != KvKind::Full && kind != KvKind::Masked) throw BadInput("only full layers can take what-if types");
    if (set_aside_.count(il)) throw BadInput("layer " + std::to_string(il) + " already has what-if types");
    const int src_group = stores_[il].group;
    // With a residual the layer joins a group whose policy has one: the same cells, and in the residual each
    // sequence's latest positions (or, where that group has layers already, the positions theirs hold).
    const uint32_t R = types.quantized() && kind == KvKind::Full ? residual : 0;
    const uint32_t n_cells = groups_[src_group].cells.size();
    const int dst_group = R ? group_for(make_full_policy(groups_[src_group].policy->capacity(), R)) : src_group;
    const KvGroup & src = groups_[src_group];  // (after group_for, which may grow groups_)
    KvGroup & dst = groups_[dst_group];
    CellCopy cc;
    for (uint32_t c = 0; c < src.cells.used(); ++c) {
        if (!src.cells.holds(c)) continue;
        cc.src_cells.push_back((int32_t) c);
        cc.dst_cells.push_back(c);
    }
    KvCells cells = src.cells;
    if (R && !dst.layers.empty()) {
        if (dst.cells.positions() != src.cells.positions() || dst.cells.sequences() != src.cells.sequences()) {
            throw std::runtime_error("what-if types: the residual group holds other positions");
        }
        cells = dst.cells;
    } else if (R) {
        const KvPolicy & p = *dst.policy;
        cells = KvCells(n_cells, n_seq_, p.residual_capacity());
        for (uint32_t c = 0; c < src.cells.used(); ++c) {
            if (src.cells.holds(c)) cells.set(c, src.cells.pos(c), src.cells.seq(c));
        }
        for (uint32_t seq = 0; seq < n_seq_; ++seq) {
            const auto held = src.cells.positions_of((int32_t) seq);
            for (size_t i = held.size() > p.residual_capacity() ? held.size() - p.residual_capacity() : 0; i < held.size(); ++i) {
                cells.set_residual(p.residual_cell((int32_t) seq, held[i].first), held[i].first);
            }
        }
    }
    if (R) {  // the residual's rows from the source's (f16) cells of the same positions
        for (uint32_t seq = 0; seq < n_seq_; ++seq) {
            for (const auto & [pos, c] : src.cells.positions_of((int32_t) seq)) {
                const uint32_t d = dst.policy->residual_cell((int32_t) seq, pos);
                if (cells.residual_pos(d) == pos) {
                    cc.res_src_cells.push_back((int32_t) c);
                    cc.res_dst_cells.push_back(d);
                }
            }
        }
    }
    KvStore s = alloc_store(hp, il, dst_group, types, n_cells, (uint32_t) cells.residual().size(), buft);
    cc.stores.emplace_back(&stores_[il], &s);
    if (!copy_cells({cc}, sched, arena)) throw std::runtime_error("failed to convert layer " + std::to_string(il) + "'s store");
    if (dst_group != src_group) {
        dst.cells = std::move(cells);
        KvGroup & from = groups_[src_group];
        from.layers.erase(std::find(from.layers.begin(), from.layers.end(), il));
        dst.layers.insert(std::upper_bound(dst.layers.begin(), dst.layers.end(), il), il);
    }
    set_aside_.emplace(il, std::exchange(stores_[il], std::move(s)));  // the kept store remembers its group
    ++layout_version_;  // the graph reads other tensors (and rotations) now
}

void KvCache::restore_types() { restore_types(retyped_layers()); }

void KvCache::restore_types(const std::vector<int> & layers) {
    for (int il : layers) {
        auto it = set_aside_.find(il);
        if (it == set_aside_.end()) continue;
        const int now = stores_[il].group;
        if (groups_[now].policy->residual()) {  // back from the residual group to its own
            KvGroup & g = groups_[now];
            g.layers.erase(std::find(g.layers.begin(), g.layers.end(), il));
            KvGroup & own = groups_[it->second.group];
            own.layers.insert(std::upper_bound(own.layers.begin(), own.layers.end(), il), il);
        } else {
            it->second.group = now;  // a what-if mask may have moved the layer meanwhile
        }
        stores_[il] = std::move(it->second);
        set_aside_.erase(it);
        ++layout_version_;
    }
}

std::vector<int> KvCache::retyped_layers() const {
    std::vector<int> out;
    for (const auto & [il, s] : set_aside_) out.push_back(il);
    return out;
}

}  // namespace simkv
