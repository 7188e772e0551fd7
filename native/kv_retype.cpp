// What-if types for the profiler: a full layer's store replaced by one of other K/V types that holds the
// same cells, converted (and rotated where the new types are) by one graph run, as compaction converts.
// Every query from then on writes and reads the new store, exactly as a cache built with those types
// would, over the prefix the full-precision run wrote. The replaced store is kept aside and comes back with
// restore_types(): converting a quantized copy back would not give its rows back.
#include "errors.h"
#include "kv_cache.h"
#include "model.h"

#include <algorithm>

namespace simkv {

void KvCache::retype(const HParams & hp, int il, KvTypes types, ggml_backend_buffer_type_t buft,
                     ggml_backend_sched_t sched, GraphArena & arena) {
    if (il < 0 || (size_t) il >= stores_.size()) throw BadInput("layer " + std::to_string(il) + " is out of range");
    const KvKind kind = kind_of(il);
    if (kind != KvKind::Full && kind != KvKind::Masked) throw BadInput("only full layers can take what-if types");
    if (set_aside_.count(il)) throw BadInput("layer " + std::to_string(il) + " already has what-if types");
    const KvGroup & g = groups_[stores_[il].group];
    KvStore s = alloc_store(hp, il, stores_[il].group, types, g.cells.size(), 0, buft);
    CellCopy cc;
    for (uint32_t c = 0; c < g.cells.used(); ++c) {
        if (!g.cells.holds(c)) continue;
        cc.src_cells.push_back((int32_t) c);
        cc.dst_cells.push_back(c);
    }
    cc.stores.emplace_back(&stores_[il], &s);
    if (!copy_cells({cc}, sched, arena)) throw std::runtime_error("failed to convert layer " + std::to_string(il) + "'s store");
    set_aside_.emplace(il, std::exchange(stores_[il], std::move(s)));
    ++layout_version_;  // the graph reads other tensors (and rotations) now
}

void KvCache::restore_types() { restore_types(retyped_layers()); }

void KvCache::restore_types(const std::vector<int> & layers) {
    for (int il : layers) {
        auto it = set_aside_.find(il);
        if (it == set_aside_.end()) continue;
        it->second.group = stores_[il].group;  // a what-if mask may have moved the layer meanwhile
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
