// Engine: one model + one per-layer KV cache + a backend scheduler. eval(tokens) appends tokens to the
// context in ubatches and returns logits (of the last token or of every token).
#pragma once
#include "graph.h"
#include "kv_cache.h"
#include "model.h"

#include <ggml-backend.h>

#include <memory>
#include <string>
#include <vector>

namespace simkv {

struct EngineConfig {
    uint32_t n_ctx = 4096;
    uint32_t n_batch = 512;
    uint32_t n_ubatch = 512;
    int n_threads = 1;
    std::string type_k = "f16", type_v = "f16", lazy_type = "q4_0";
    std::vector<int> lazy_layers;
    uint32_t n_sink = 4;
    uint32_t n_window = 1024;
};

ggml_type parse_cache_type(const std::string & name, const char * what);

class Engine {
public:
    Engine(std::shared_ptr<Model> model, const EngineConfig & cfg);
    ~Engine();
    Engine(const Engine &) = delete;
    Engine & operator=(const Engine &) = delete;

    // Appends tokens at positions n_past.. and returns logits, row-major [n_out, n_vocab]
    // (n_out = n if all_logits else 1).
    std::vector<float> eval(const int32_t * tokens, uint32_t n, bool all_logits);
    // Drops positions >= n_keep. False if a store cannot (a lazy ring overwrote what is needed): then
    // nothing changed and the caller must reset and re-evaluate.
    bool truncate(uint32_t n_keep);
    void reset();

    uint32_t n_past() const { return n_past_; }
    const Model & model() const { return *model_; }
    const KvCache & kv() const { return *kv_; }
    const EngineConfig & config() const { return cfg_; }

private:
    void eval_ubatch(const int32_t * tokens, uint32_t n, uint32_t n_outputs, float * out);

    std::shared_ptr<Model> model_;
    EngineConfig cfg_;
    std::unique_ptr<KvCache> kv_;
    ggml_backend_t cpu_ = nullptr;
    ggml_backend_sched_t sched_ = nullptr;
    // The last ubatch graph, kept allocated: a decode step whose shapes (tokens, outputs, viewed cells
    // per group) equal the previous one's only refreshes inputs, as llama.cpp's graph reuse does.
    struct BuiltGraph {
        ggml_context * ctx = nullptr;
        ggml_cgraph * gf = nullptr;
        ggml_tensor * logits = nullptr;
        UbatchInputs in;
        std::vector<uint32_t> shape;  // n_tokens, n_rows, n_kv of each group
    };
    BuiltGraph & graph_for(uint32_t n_tokens, uint32_t n_rows);
    BuiltGraph graph_;
    std::vector<uint8_t> graph_meta_;  // storage for the graph's tensor descriptors
    size_t graph_nodes_ = 0;
    uint32_t n_past_ = 0;
    uint32_t n_written_ = 0;  // positions ever written since the last reset (for ring rewinds)
};

}  // namespace simkv
