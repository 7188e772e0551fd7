// Engine: one model + one per-layer KV cache + a backend scheduler. eval(tokens) appends tokens to the
// context in ubatches and returns logits (of the last token or of every token).
#pragma once
#include "graph.h"
#include "kv_cache.h"
#include "model.h"
#include "probe.h"

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
    // "streaming": lazy layers are sink + ring stores from the first token (bounded memory).
    // "exact": every layer is full while the prompt is evaluated; at its end the lazy layers are
    // compacted into sink + ring stores (the paper's procedure; the peak is a full cache).
    std::string lazy_prefill = "streaming";
    // "static": lazy_layers. "dynamic": exact prefill where the lazy layers are those whose probed
    // attention mass (last w_last prompt tokens) exceeds dynamic_threshold, decided per prompt.
    std::string lazy_mode = "static";
    float dynamic_threshold = 0.9f;
    uint32_t w_last = 32;
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
    // The same, probing the last n_probe tokens of the call (probe.h); read the scores with probe_mass()
    // and probe_change() (per layer, NaN where not probed).
    std::vector<float> eval_probed(const int32_t * tokens, uint32_t n, bool all_logits, const ProbeSpec & spec,
                                   uint32_t n_probe);
    std::vector<double> probe_mass() const { return probe_acc_.mass(); }
    std::vector<double> probe_change() const { return probe_acc_.change(); }
    // Drops positions >= n_keep. False if a store cannot (a lazy ring overwrote what is needed): then
    // nothing changed and the caller must reset and re-evaluate.
    bool truncate(uint32_t n_keep);
    void reset();
    // What-if trimming for the profiler: these layers keep their full store but attend only to the sinks
    // and the n_window most recent keys from now on (kv_policy_masked.cpp); the layers masked before are
    // unmasked. Together with truncate() this scores trimming each layer over one shared full prefix.
    void set_masked_layers(const std::vector<int> & layers, uint32_t n_sink, uint32_t n_window);

    uint32_t n_past() const { return n_past_; }
    std::vector<int> lazy_layers() const;  // the layers whose store is lazy now
    size_t peak_kv_bytes() const { return peak_kv_bytes_; }
    const Model & model() const { return *model_; }
    const KvCache & kv() const { return *kv_; }
    const EngineConfig & config() const { return cfg_; }

private:
    void make_lazy(const std::vector<int> & layers);  // exact prefill: compact full stores into lazy ones
    std::unique_ptr<KvCache> new_cache() const;
    void eval_ubatch(const int32_t * tokens, uint32_t n, uint32_t n_outputs, float * out, uint32_t n_probe);

    std::shared_ptr<Model> model_;
    EngineConfig cfg_;
    std::unique_ptr<KvCache> kv_;
    ggml_backend_t cpu_ = nullptr;
    ggml_backend_t gpu_ = nullptr;  // when the model has layers on a GPU
    ggml_backend_sched_t sched_ = nullptr;
    // The last ubatch graph, kept allocated: a decode step whose shapes (tokens, outputs, viewed cells
    // per group) equal the previous one's only refreshes inputs, as llama.cpp's graph reuse does.
    struct BuiltGraph {
        ggml_context * ctx = nullptr;
        ggml_cgraph * gf = nullptr;
        ggml_tensor * logits = nullptr;
        UbatchInputs in;
        ProbeGraph probe;
        bool probed = false;
        std::vector<uint32_t> shape;  // n_tokens, n_rows, n_probe, n_kv of each group
    };
    BuiltGraph & graph_for(uint32_t n_tokens, uint32_t n_rows, uint32_t n_probe);
    BuiltGraph graph_;
    std::vector<uint8_t> graph_meta_;  // storage for the graph's tensor descriptors
    size_t graph_nodes_ = 0;
    uint32_t n_past_ = 0;
    uint32_t n_written_ = 0;  // positions ever written since the last reset (for ring rewinds)
    const ProbeSpec * probe_spec_ = nullptr;  // set during eval_probed
    KvConfig kv_cfg_;
    std::vector<ggml_backend_buffer_type_t> bufts_;
    bool exact_ = false;      // lazy_prefill == "exact" (or dynamic mode)
    bool compacted_ = false;  // the lazy layers of this context were compacted already
    bool groups_changed_ = false;  // layers moved between KV groups since the last graph: replan memory
    size_t peak_kv_bytes_ = 0;
    ProbeAccumulator probe_acc_;
};

}  // namespace simkv
