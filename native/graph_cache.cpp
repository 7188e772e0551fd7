#include "graph_cache.h"

#include <stdexcept>

namespace simkv {

BuiltGraph & GraphCache::get(const std::vector<uint32_t> & shape, const GraphLayout & layout,
                             const std::function<void(BuiltGraph &)> & build) {
    if (!(layout == layout_)) forget(true);
    layout_ = layout;
    if (graph_.ctx && shape == shape_) return graph_;

    forget(false);
    ++builds_;
    auto make = [&](BuiltGraph & g) {
        g.ctx = arena_.context();
        g.gf = ggml_new_graph_custom(g.ctx.get(), arena_.n_nodes(), false);
        build(g);
    };
    ggml_backend_sched_reset(sched_);
    // alloc_graph reuses the previous allocation plan whenever the sizes fit, which is only valid for the
    // same topology (GraphLayout): after a change, plan afresh, on a graph of its own. (Splitting a graph
    // between backends points its nodes at the scheduler's copies of their inputs, so a graph is split only
    // once: a second split of the same graph finds no inputs to copy to another device.)
    bool planned = true;
    if (replan_) {
        BuiltGraph measure;
        make(measure);
        planned = ggml_backend_sched_reserve(sched_, measure.gf);
    }
    replan_ = false;
    if (planned) make(graph_);
    if (!planned || !ggml_backend_sched_alloc_graph(sched_, graph_.gf)) {
        forget(false);
        throw std::runtime_error("failed to allocate the compute graph");
    }
    shape_ = shape;
    return graph_;
}

}  // namespace simkv
