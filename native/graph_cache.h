// The last ubatch graph, kept allocated, and when another must be built or its memory planned afresh.
// A decode step whose shape (tokens, outputs, each group's spans) equals the previous one's only refreshes
// the graph's inputs, as llama.cpp's graph reuse does.
#pragma once
#include "graph.h"
#include "probe.h"

#include <ggml-backend.h>
#include <ggml-cpp.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace simkv {

struct BuiltGraph {
    ggml_context_ptr ctx;
    ggml_cgraph * gf = nullptr;
    ggml_tensor * logits = nullptr;  // the output rows: logits, embeddings, or (with in.targets) each row's loss
    UbatchInputs in;
    ProbeGraph probe;
};

// What a graph's memory plan depends on beyond its shape: which cache it reads (a cache's identity and the
// layout of its groups: layers that change groups read other masks and write indices) and which tensors
// are outputs (captured and tapped tensors, embeddings instead of logits). A graph whose topology changed
// must not reuse the allocator's previous plan: a mask or index could share memory with a node computed
// before its last reader, or a later node overwrite an output.
struct GraphLayout {
    uint64_t kv_id = 0, kv_layout = 0;
    bool capture = false;
    int32_t tap_layer = -1;
    bool embeddings = false;
    bool operator==(const GraphLayout & o) const {
        return kv_id == o.kv_id && kv_layout == o.kv_layout && capture == o.capture && tap_layer == o.tap_layer &&
               embeddings == o.embeddings;
    }
};

class GraphCache {
public:
    // sched and arena belong to the engine and outlive this cache.
    GraphCache(ggml_backend_sched_t sched, GraphArena & arena) : sched_(sched), arena_(arena) {}
    GraphCache(const GraphCache &) = delete;
    GraphCache & operator=(const GraphCache &) = delete;

    // The graph of this shape and layout, allocated on the scheduler: the cached one, or a new one that
    // `build` fills (its ctx and gf are set; it adds the nodes and inputs).
    BuiltGraph & get(const std::vector<uint32_t> & shape, const GraphLayout & layout,
                     const std::function<void(BuiltGraph &)> & build);
    // The scheduler, for another graph (a compaction's copy): the cached graph's allocation is gone after it,
    // so it is forgotten and the next one is planned afresh.
    ggml_backend_sched_t lend_scheduler() {
        forget(true);
        return sched_;
    }
    ggml_backend_sched_t scheduler() const { return sched_; }
    // Drops the cached graph (replan: the next one plans its memory afresh).
    void forget(bool replan) {
        graph_ = BuiltGraph{};
        shape_.clear();
        replan_ = replan_ || replan;
    }
    // Graphs built so far: a decode step that reuses the last one's graph adds none.
    size_t builds() const { return builds_; }

private:
    ggml_backend_sched_t sched_;
    GraphArena & arena_;
    BuiltGraph graph_;
    std::vector<uint32_t> shape_;  // of graph_ (empty: none)
    GraphLayout layout_;           // of the last planned graph
    bool replan_ = true;
    size_t builds_ = 0;
};

}  // namespace simkv
