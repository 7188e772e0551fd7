// A snapshot of one conversation's context (Llama.save_state / load_state): the engine's positions and the
// KV cache as it is now. Each group's cell map and, for each layer, the rows of K and V its store uses
// ([0, n_used) of the group), in the store's own type and rotation. What exact prefill compacted is saved
// compacted: loading it makes those layers lazy again first, so a loaded state continues bit-identically.
//
// Layout (host byte order): magic, version, the model's shape, the engine's positions, then each group
// (policy key, cell map, residual map, layers) and each layer (group, type, capacity, rows of K, rows of V,
// its residual's K and V). Everything is parsed and checked before the engine is touched.
#include "engine.h"
#include "errors.h"

#include <algorithm>
#include <cstring>

namespace simkv {

namespace {

constexpr char kMagic[8] = {'S', 'I', 'M', 'K', 'V', 'S', 'T', '1'};
constexpr uint32_t kVersion = 2;  // 2: quantized rings' f16 residuals

struct Writer {
    std::string out;
    template <typename T> void put(const T & v) { out.append(reinterpret_cast<const char *>(&v), sizeof v); }
    void put_str(const std::string & s) {
        put((uint32_t) s.size());
        out.append(s);
    }
    template <typename T> void put_vec(const std::vector<T> & v) {
        put((uint64_t) v.size());
        out.append(reinterpret_cast<const char *>(v.data()), v.size() * sizeof(T));
    }
};

struct Reader {
    const char * p;
    size_t left;
    void need(size_t n) const {
        if (n > left) throw BadInput("the state is truncated or not a simkv state");
    }
    template <typename T> T get() {
        need(sizeof(T));
        T v;
        std::memcpy(&v, p, sizeof v);
        p += sizeof v;
        left -= sizeof v;
        return v;
    }
    std::string get_str() {
        const uint32_t n = get<uint32_t>();
        need(n);
        std::string s(p, n);
        p += n;
        left -= n;
        return s;
    }
    template <typename T> std::vector<T> get_vec(uint64_t max_items) {
        const uint64_t n = get<uint64_t>();
        if (n > max_items) throw BadInput("the state is corrupt (a list is longer than its store)");
        need(n * sizeof(T));
        std::vector<T> v(n);
        std::memcpy(v.data(), p, n * sizeof(T));
        p += n * sizeof(T);
        left -= n * sizeof(T);
        return v;
    }
};

struct SavedGroup {
    std::string key;
    uint32_t kind;
    std::vector<int32_t> cell_pos, cell_seq, res_pos, layers;
    uint32_t n_used, n_free;
};

struct SavedLayer {
    uint32_t group, type, capacity;
    std::vector<uint8_t> k, v, k_res, v_res;
};

}  // namespace

std::string Engine::save_state() const {
    if (cfg_.n_seq_max != 1) throw BadInput("a state holds one conversation: this engine holds several sequences");
    const HParams & hp = model_->hp();
    const KvCache & kv = *kv_;
    for (const KvGroup & g : kv.groups()) {
        if (g.policy->kind() == KvKind::Masked) throw BadInput("a state cannot hold masked layers (set_masked_layers([]) first)");
    }
    Writer w;
    w.out.append(kMagic, sizeof kMagic);
    w.put(kVersion);
    w.put((uint32_t) hp.n_layer);
    w.put((uint32_t) hp.n_embd_k_gqa());
    w.put((uint32_t) hp.n_embd_v_gqa());
    w.put((uint32_t) n_past_[0]);
    w.put((uint32_t) n_written_[0]);
    w.put((uint8_t) compacted_);
    w.put((uint32_t) kv.groups().size());
    for (const KvGroup & g : kv.groups()) {
        w.put_str(g.policy->key());
        w.put((uint32_t) g.policy->kind());
        w.put_vec(g.cells.positions());
        w.put_vec(g.cells.sequences());
        w.put_vec(g.cells.residual());
        w.put(g.cells.used());
        w.put(g.cells.n_free());
        w.put_vec(std::vector<int32_t>(g.layers.begin(), g.layers.end()));
    }
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const KvStore & s = kv.store((int) il);
        const uint32_t n_rows = kv.groups()[s.group].cells.used();
        w.put((uint32_t) s.group);
        w.put((uint32_t) s.type);
        w.put(s.capacity());
        for (const ggml_tensor * t : {s.k, s.v, s.k_res, s.v_res}) {
            std::vector<uint8_t> rows(t ? (size_t) (t == s.k || t == s.v ? n_rows : t->ne[1]) * t->nb[1] : 0);
            if (!rows.empty()) ggml_backend_tensor_get(t, rows.data(), 0, rows.size());
            w.put_vec(rows);
        }
    }
    return std::move(w.out);
}

void Engine::load_state(const std::string & blob) {
    if (cfg_.n_seq_max != 1) throw BadInput("a state holds one conversation: this engine holds several sequences");
    const HParams & hp = model_->hp();
    Reader r{blob.data(), blob.size()};
    r.need(sizeof kMagic);
    if (std::memcmp(r.p, kMagic, sizeof kMagic) != 0) throw BadInput("not a simkv state");
    r.p += sizeof kMagic;
    r.left -= sizeof kMagic;
    if (r.get<uint32_t>() != kVersion) throw BadInput("a simkv state of another version");
    const uint32_t n_layer = r.get<uint32_t>(), n_k = r.get<uint32_t>(), n_v = r.get<uint32_t>();
    if (n_layer != hp.n_layer || n_k != hp.n_embd_k_gqa() || n_v != hp.n_embd_v_gqa()) {
        throw BadInput("this state was saved from a model of another shape");
    }
    const uint32_t n_past = r.get<uint32_t>(), n_written = r.get<uint32_t>();
    const bool compacted = r.get<uint8_t>() != 0;
    const uint32_t n_groups = r.get<uint32_t>();
    if (n_groups > hp.n_layer) throw BadInput("the state is corrupt (more groups than layers)");
    const uint64_t max_cells = (uint64_t) kMaxContext;
    std::vector<SavedGroup> groups(n_groups);
    for (SavedGroup & g : groups) {
        g.key = r.get_str();
        g.kind = r.get<uint32_t>();
        g.cell_pos = r.get_vec<int32_t>(max_cells);
        g.cell_seq = r.get_vec<int32_t>(max_cells);
        g.res_pos = r.get_vec<int32_t>(max_cells);
        g.n_used = r.get<uint32_t>();
        g.n_free = r.get<uint32_t>();
        g.layers = r.get_vec<int32_t>(hp.n_layer);
        if (g.cell_seq.size() != g.cell_pos.size() || g.n_used > g.cell_pos.size()) throw BadInput("the state is corrupt (cell map)");
    }
    std::vector<SavedLayer> layers(hp.n_layer);
    for (SavedLayer & l : layers) {
        l.group = r.get<uint32_t>();
        l.type = r.get<uint32_t>();
        l.capacity = r.get<uint32_t>();
        if (l.group >= n_groups) throw BadInput("the state is corrupt (a layer's group)");
        l.k = r.get_vec<uint8_t>(blob.size());
        l.v = r.get_vec<uint8_t>(blob.size());
        l.k_res = r.get_vec<uint8_t>(blob.size());
        l.v_res = r.get_vec<uint8_t>(blob.size());
    }
    if (r.left != 0) throw BadInput("the state has trailing bytes: not a simkv state of this version");
    if (n_past > cfg_.n_ctx) throw BadInput("the state holds more tokens than this context (n_ctx) takes");

    // The structure: a fresh cache, with the layers the state holds lazy made lazy (exact prefill compacted
    // them), then every store must match the saved one exactly.
    reset();
    std::vector<int> to_lazy;
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const SavedGroup & g = groups[layers[il].group];
        if (g.kind == (uint32_t) KvKind::Lazy && kv_->kind_of((int) il) == KvKind::Full) to_lazy.push_back((int) il);
    }
    if (!to_lazy.empty()) {
        if (!prompt_all_full()) throw BadInput("the state has lazy layers that this Llama keeps full (other lazy settings)");
        kv_->make_lazy(hp, kv_cfg_, to_lazy, bufts_, graphs_->lend_scheduler(), arena_);  // nothing held: nothing copied
    }
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const KvStore & s = kv_->store((int) il);
        const SavedLayer & l = layers[il];
        const SavedGroup & g = groups[l.group];
        const KvGroup & now = kv_->groups()[s.group];
        if (g.key != now.policy->key() || l.type != (uint32_t) s.type || l.capacity != s.capacity() ||
            g.cell_pos.size() != now.cells.size() || g.res_pos.size() != now.cells.residual().size()) {
            reset();
            const char * saved_type = l.type < GGML_TYPE_COUNT && ggml_type_size((ggml_type) l.type) ? ggml_type_name((ggml_type) l.type) : "?";
            throw BadInput("this state was saved by a Llama with other cache settings (layer " + std::to_string(il) +
                           ": saved " + g.key + " " + saved_type + ", here " + now.policy->key() + " " +
                           ggml_type_name(s.type) + ")");
        }
        const size_t want = (size_t) g.n_used * s.k->nb[1];
        const size_t want_res = s.k_res ? ggml_nbytes(s.k_res) : 0;
        if (l.k.size() != want || l.v.size() != (size_t) g.n_used * s.v->nb[1] || l.k_res.size() != want_res ||
            l.v_res.size() != want_res) {
            reset();
            throw BadInput("the state is corrupt (a store's rows)");
        }
    }
    // Each group's cell map, checked before anything is written (KvCells::restore throws on a bad one).
    std::vector<std::pair<int, KvCells>> cells;
    std::vector<bool> seen(kv_->groups().size(), false);
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const int now = kv_->store((int) il).group;
        if (seen[now]) continue;
        seen[now] = true;
        const SavedGroup & g = groups[layers[il].group];
        try {
            cells.emplace_back(now, KvCells::restore(g.cell_pos, g.cell_seq, g.res_pos, kv_->n_seq(),
                                                     kv_->groups()[now].cells.residual_per_seq(), g.n_used, g.n_free));
        } catch (...) {
            reset();
            throw;
        }
    }
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const KvStore & s = kv_->store((int) il);
        if (!layers[il].k.empty()) ggml_backend_tensor_set(s.k, layers[il].k.data(), 0, layers[il].k.size());
        if (!layers[il].v.empty()) ggml_backend_tensor_set(s.v, layers[il].v.data(), 0, layers[il].v.size());
        if (s.k_res) {
            ggml_backend_tensor_set(s.k_res, layers[il].k_res.data(), 0, layers[il].k_res.size());
            ggml_backend_tensor_set(s.v_res, layers[il].v_res.data(), 0, layers[il].v_res.size());
        }
    }
    for (auto & [group, map] : cells) kv_->restore_cells(group, std::move(map));
    n_past_[0] = n_past;
    n_written_[0] = n_written;
    compacted_ = compacted;
    peak_kv_bytes_ = std::max(peak_kv_bytes_, kv_->total_bytes());
}

void KvCache::restore_cells(int group, KvCells cells) {
    if (cells.size() != groups_[group].cells.size()) throw BadInput("the state is corrupt (cell map sizes)");
    groups_[group].cells = std::move(cells);
}

}  // namespace simkv
