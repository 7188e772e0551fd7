// The cache's part of a saved state (engine_state.cpp has the engine's): each group's cell map and, for each
// layer, the rows of K and V its store uses ([0, used) of the group), in the store's own type and rotation,
// and its f16 residual. A snapshot is parsed and checked against this cache whole before anything changes.
//
// Layout: the number of groups, then each group (policy key, kind, cell map, residual map, counts, layers),
// then each layer (group, type, capacity, rows of K, rows of V, its residual's K and V).
#include "kv_cache.h"

#include "errors.h"
#include "model.h"
#include "state_io.h"

namespace simkv {

void KvCache::write_state(StateWriter & w) const {
    for (const KvGroup & g : groups_) {
        if (g.policy->kind() == KvKind::Masked) throw BadInput("a state cannot hold masked layers (set_masked_layers([]) first)");
    }
    w.put((uint32_t) groups_.size());
    for (const KvGroup & g : groups_) {
        w.put_str(g.policy->key());
        w.put((uint32_t) g.policy->kind());
        w.put_vec(g.cells.positions());
        w.put_vec(g.cells.sequences());
        w.put_vec(g.cells.residual());
        w.put(g.cells.used());
        w.put(g.cells.n_free());
        w.put_vec(std::vector<int32_t>(g.layers.begin(), g.layers.end()));
    }
    for (const KvStore & s : stores_) {
        const uint32_t n_rows = groups_[s.group].cells.used();
        w.put((uint32_t) s.group);
        w.put((uint32_t) s.k->type);
        w.put((uint32_t) s.v->type);
        w.put(s.capacity());
        for (const ggml_tensor * t : {s.k, s.v, s.k_res, s.v_res}) {
            std::vector<uint8_t> rows(t ? (size_t) (t == s.k || t == s.v ? n_rows : t->ne[1]) * t->nb[1] : 0);
            if (!rows.empty()) ggml_backend_tensor_get(t, rows.data(), 0, rows.size());
            w.put_vec(rows);
        }
    }
}

KvSnapshot KvCache::read_state(StateReader & r, uint32_t n_layer, uint64_t max_cells, size_t max_bytes) {
    KvSnapshot snap;
    const uint32_t n_groups = r.get<uint32_t>();
    if (n_groups > n_layer) throw BadInput("the state is corrupt (more groups than layers)");
    snap.groups.resize(n_groups);
    for (KvSnapshot::Group & g : snap.groups) {
        g.key = r.get_str();
        g.kind = r.get<uint32_t>();
        g.cell_pos = r.get_vec<int32_t>(max_cells);
        g.cell_seq = r.get_vec<int32_t>(max_cells);
        g.res_pos = r.get_vec<int32_t>(max_cells);
        g.n_used = r.get<uint32_t>();
        g.n_free = r.get<uint32_t>();
        g.layers = r.get_vec<int32_t>(n_layer);
        if (g.cell_seq.size() != g.cell_pos.size() || g.n_used > g.cell_pos.size()) throw BadInput("the state is corrupt (cell map)");
    }
    snap.layers.resize(n_layer);
    for (KvSnapshot::Layer & l : snap.layers) {
        l.group = r.get<uint32_t>();
        l.type_k = r.get<uint32_t>();
        l.type_v = r.get<uint32_t>();
        l.capacity = r.get<uint32_t>();
        if (l.group >= n_groups) throw BadInput("the state is corrupt (a layer's group)");
        l.k = r.get_vec<uint8_t>(max_bytes);
        l.v = r.get_vec<uint8_t>(max_bytes);
        l.k_res = r.get_vec<uint8_t>(max_bytes);
        l.v_res = r.get_vec<uint8_t>(max_bytes);
    }
    return snap;
}

std::vector<int> KvCache::layers_compacted_in(const KvSnapshot & snap) const {
    std::vector<int> out;
    for (size_t il = 0; il < stores_.size(); ++il) {
        const KvSnapshot::Group & g = snap.groups[snap.layers[il].group];
        if (g.kind == (uint32_t) KvKind::Lazy && kind_of((int) il) == KvKind::Full) out.push_back((int) il);
    }
    return out;
}

void KvCache::restore(const KvSnapshot & snap) {
    // Everything is checked first: every store as the saved one, every cell map (KvCells::restore).
    for (size_t il = 0; il < stores_.size(); ++il) {
        const KvStore & s = stores_[il];
        const KvSnapshot::Layer & l = snap.layers[il];
        const KvSnapshot::Group & g = snap.groups[l.group];
        const KvGroup & now = groups_[s.group];
        if (g.key != now.policy->key() || l.type_k != (uint32_t) s.k->type || l.type_v != (uint32_t) s.v->type ||
            l.capacity != s.capacity() || g.cell_pos.size() != now.cells.size() ||
            g.res_pos.size() != now.cells.residual().size()) {
            auto name = [](uint32_t t) {
                return t < GGML_TYPE_COUNT && ggml_type_size((ggml_type) t) ? ggml_type_name((ggml_type) t) : "?";
            };
            throw BadInput("this state was saved by a Llama with other cache settings (layer " + std::to_string(il) +
                           ": saved " + g.key + " K " + name(l.type_k) + " V " + name(l.type_v) + ", here " +
                           now.policy->key() + " K " + ggml_type_name(s.k->type) + " V " + ggml_type_name(s.v->type) + ")");
        }
        const size_t want = (size_t) g.n_used * s.k->nb[1];
        const size_t want_res = s.k_res ? ggml_nbytes(s.k_res) : 0;
        if (l.k.size() != want || l.v.size() != (size_t) g.n_used * s.v->nb[1] || l.k_res.size() != want_res ||
            l.v_res.size() != want_res) {
            throw BadInput("the state is corrupt (a store's rows)");
        }
    }
    std::vector<std::pair<int, KvCells>> cells;  // each group's, once (its size was checked above)
    std::vector<bool> seen(groups_.size(), false);
    for (size_t il = 0; il < stores_.size(); ++il) {
        const int now = stores_[il].group;
        if (seen[now]) continue;
        seen[now] = true;
        const KvSnapshot::Group & g = snap.groups[snap.layers[il].group];
        cells.emplace_back(now, KvCells::restore(g.cell_pos, g.cell_seq, g.res_pos, n_seq_,
                                                 groups_[now].cells.residual_per_seq(), g.n_used, g.n_free));
    }
    for (size_t il = 0; il < stores_.size(); ++il) {
        const KvStore & s = stores_[il];
        const KvSnapshot::Layer & l = snap.layers[il];
        if (!l.k.empty()) ggml_backend_tensor_set(s.k, l.k.data(), 0, l.k.size());
        if (!l.v.empty()) ggml_backend_tensor_set(s.v, l.v.data(), 0, l.v.size());
        if (s.k_res) {
            ggml_backend_tensor_set(s.k_res, l.k_res.data(), 0, l.k_res.size());
            ggml_backend_tensor_set(s.v_res, l.v_res.data(), 0, l.v_res.size());
        }
    }
    for (auto & [group, map] : cells) groups_[group].cells = std::move(map);
}

}  // namespace simkv
