// Exact prefill's last step (lazy_prefill="exact", dynamic mode): after the prompt was evaluated with every
// layer full, the lazy layers' full stores are compacted into sink + ring stores. What a lazy store would
// hold had it been written all along is copied over (converting type, and rotating where exactly one side
// is rotated: kv_rotation.h), then the full stores are freed.
#include "errors.h"
#include "graph.h"
#include "kv_cache.h"
#include "model.h"

#include <algorithm>

namespace simkv {

KvCache::Conversion KvCache::plan_lazy(const HParams & hp, const KvConfig & cfg, const std::vector<int> & layers,
                                       const std::vector<ggml_backend_buffer_type_t> & buft_per_layer) {
    Conversion c;
    c.layers = layers;
    const int src_group = stores_[layers[0]].group;
    for (int il : layers) {
        if (stores_[il].group != src_group || groups_[src_group].policy->kind() != KvKind::Full) {
            throw std::runtime_error("only full layers of one group can be made lazy");
        }
    }
    c.group = group_for(lazy_policy(cfg));
    const KvGroup & src = groups_[src_group];
    const KvGroup & dst = groups_[c.group];
    if (!dst.layers.empty()) throw std::runtime_error("exact prefill cannot join layers that were lazy from the start");
    // Write every position in order through the lazy policy: later positions overwrite earlier ones, so
    // what survives is exactly what a lazy store would hold had it been written all along.
    std::vector<int32_t> src_of_cell(dst.cell_pos.size(), -1);
    c.cell_pos.assign(dst.cell_pos.size(), -1);
    std::vector<std::pair<int32_t, uint32_t>> by_pos;  // (position, source cell)
    for (uint32_t cell = 0; cell < src.cell_pos.size(); ++cell) {
        if (src.cell_pos[cell] >= 0) by_pos.emplace_back(src.cell_pos[cell], cell);
    }
    std::sort(by_pos.begin(), by_pos.end());
    for (const auto & [pos, cell] : by_pos) {
        const uint32_t d = dst.policy->cell_of(pos);
        c.cell_pos[d] = pos;
        src_of_cell[d] = (int32_t) cell;
    }
    for (uint32_t d = 0; d < src_of_cell.size(); ++d) {
        if (src_of_cell[d] < 0) continue;
        c.src_cells.push_back(src_of_cell[d]);
        c.dst_cells.push_back(d);
    }
    // A quantized ring's residual gets the prompt's last positions, still exact in the full store.
    const uint32_t C = dst.policy->residual_capacity();
    c.res_pos.assign(dst.res_pos.size(), -1);
    for (size_t i = by_pos.size() > C ? by_pos.size() - C : 0; i < by_pos.size(); ++i) {
        const uint32_t d = (uint32_t) by_pos[i].first % C;  // sequence 0's cells
        c.res_pos[d] = by_pos[i].first;
        c.res_src_cells.push_back((int32_t) by_pos[i].second);
        c.res_dst_cells.push_back(d);
    }
    for (int il : layers) {
        c.stores.push_back(alloc_store(hp, il, c.group, cfg.type_lazy, (uint32_t) dst.cell_pos.size(),
                                       (uint32_t) dst.res_pos.size(), buft_per_layer[il]));
    }
    return c;
}

bool KvCache::copy_cells(const Conversion & c, ggml_backend_sched_t sched, GraphArena & arena) const {
    const int64_t n = (int64_t) c.src_cells.size();
    if (n == 0) return true;
    // Rows of the full store -> F32 (-> rotated) -> the lazy store's type, at the ring's cells.
    ggml_context_ptr ctx = arena.context();
    ggml_cgraph * gf = ggml_new_graph_custom(ctx.get(), arena.n_nodes(), false);
    ggml_tensor * src = ggml_new_tensor_1d(ctx.get(), GGML_TYPE_I32, n);
    ggml_tensor * dst = ggml_new_tensor_1d(ctx.get(), GGML_TYPE_I64, n);
    ggml_set_input(src);
    ggml_set_input(dst);
    const int64_t n_res = (int64_t) c.res_src_cells.size();
    ggml_tensor * res_src = n_res ? ggml_new_tensor_1d(ctx.get(), GGML_TYPE_I32, n_res) : nullptr;
    ggml_tensor * res_dst = n_res ? ggml_new_tensor_1d(ctx.get(), GGML_TYPE_I64, n_res) : nullptr;
    if (n_res) {
        ggml_set_input(res_src);
        ggml_set_input(res_dst);
    }
    RotationInputs rotations;
    for (size_t i = 0; i < c.layers.size(); ++i) {
        const KvStore & from = stores_[c.layers[i]];
        const KvStore & to = c.stores[i];
        ggml_tensor * k = rerotate(ctx.get(), rotations, ggml_get_rows(ctx.get(), from.k, src), from.rot.k, to.rot.k);
        ggml_tensor * v = rerotate(ctx.get(), rotations, ggml_get_rows(ctx.get(), from.v, src), from.rot.v, to.rot.v);
        ggml_build_forward_expand(gf, ggml_set_rows(ctx.get(), to.k, k, dst));
        ggml_build_forward_expand(gf, ggml_set_rows(ctx.get(), to.v, v, dst));
        if (res_src) {  // f16 rows in the ring's rotation
            k = rerotate(ctx.get(), rotations, ggml_get_rows(ctx.get(), from.k, res_src), from.rot.k, to.rot.k);
            v = rerotate(ctx.get(), rotations, ggml_get_rows(ctx.get(), from.v, res_src), from.rot.v, to.rot.v);
            ggml_build_forward_expand(gf, ggml_set_rows(ctx.get(), to.k_res, k, res_dst));
            ggml_build_forward_expand(gf, ggml_set_rows(ctx.get(), to.v_res, v, res_dst));
        }
    }
    ggml_backend_sched_reset(sched);
    const bool ok = ggml_backend_sched_alloc_graph(sched, gf);
    if (ok) {
        ggml_backend_tensor_set(src, c.src_cells.data(), 0, ggml_nbytes(src));
        ggml_backend_tensor_set(dst, c.dst_cells.data(), 0, ggml_nbytes(dst));
        if (n_res) {
            ggml_backend_tensor_set(res_src, c.res_src_cells.data(), 0, ggml_nbytes(res_src));
            ggml_backend_tensor_set(res_dst, c.res_dst_cells.data(), 0, ggml_nbytes(res_dst));
        }
        rotations.set();
    }
    const bool done = ok && ggml_backend_sched_graph_compute(sched, gf) == GGML_STATUS_SUCCESS;
    ggml_backend_sched_reset(sched);
    return done;
}

void KvCache::commit_lazy(Conversion && c) {
    KvGroup & dst = groups_[c.group];
    KvGroup & src = groups_[stores_[c.layers[0]].group];
    for (size_t i = 0; i < c.layers.size(); ++i) {
        const int il = c.layers[i];
        stores_[il] = std::move(c.stores[i]);  // frees the full store
        src.layers.erase(std::find(src.layers.begin(), src.layers.end(), il));
        dst.layers.push_back(il);
    }
    std::sort(dst.layers.begin(), dst.layers.end());
    dst.cell_pos = std::move(c.cell_pos);
    dst.res_pos = std::move(c.res_pos);
    dst.n_used = 0;
    dst.n_free = 0;
    for (uint32_t cell = 0; cell < dst.cell_pos.size(); ++cell) {
        dst.cell_seq[cell] = dst.cell_pos[cell] >= 0 ? 0 : -1;  // exact prefill runs one sequence
        if (dst.cell_pos[cell] >= 0) dst.n_used = cell + 1;
        else ++dst.n_free;
    }
}

size_t KvCache::make_lazy(const HParams & hp, const KvConfig & cfg, const std::vector<int> & layers,
                          const std::vector<ggml_backend_buffer_type_t> & buft_per_layer, ggml_backend_sched_t sched,
                          GraphArena & arena) {
    if (layers.empty()) return total_bytes();
    Conversion c = plan_lazy(hp, cfg, layers, buft_per_layer);
    size_t peak = total_bytes();
    for (const KvStore & s : c.stores) peak += s.bytes();
    if (!copy_cells(c, sched, arena)) throw std::runtime_error("failed to compact the lazy layers");  // c's stores go
    commit_lazy(std::move(c));
    return peak;
}

}  // namespace simkv
