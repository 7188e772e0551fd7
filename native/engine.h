// Engine: one model + the per-layer KV cache of its sequences (and, while exact prefill with several
// sequences evaluates a prompt, a temporary all-full cache for it) + a backend scheduler. eval(tokens)
// appends tokens to the context in ubatches and returns logits (of the last token or of every token). It
// orchestrates: the cache decides cells and masks (kv_cache.h), the graph builders compute (graph.h), the
// probe scores (probe.h).
#pragma once
#include "engine_config.h"
#include "graph.h"
#include "graph_cache.h"
#include "kv_cache.h"
#include "model.h"
#include "probe.h"

#include <ggml-backend.h>
#include <ggml-cpp.h>

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace simkv {

// The residual stream between layers, for what-ifs that change only layers >= first_layer: the profiler
// trims one layer at a time, and every layer below it computes what the untrimmed run computed.
struct LayerStream {
    uint32_t first_layer = 0;        // compute layers first_layer.. only
    const float * hidden = nullptr;  // [n][n_embd]: the stream entering first_layer (needed when it is > 0)
    float * capture = nullptr;       // [n_layer][n][n_embd]: the stream entering each layer (first_layer 0), or null
    // [n]: score row i on token targets[i] and return its loss, -log p(targets[i]), instead of its logits
    // (one float per row instead of n_vocab; 0 for a row whose target is -1: none); or null.
    const int32_t * targets = nullptr;
    // Layer tap_layer's attention, for a reference to check it against (tests): its query rows as they enter
    // (after RoPE, before a store's rotation) and its output rows (rotated back), [n][n_head * head_dim] each.
    int32_t tap_layer = -1;
    float * tap_q = nullptr;
    float * tap_out = nullptr;
};

// Tokens to append to one sequence in a decode() call.
struct SeqTokens {
    int32_t seq = 0;
    const int32_t * tokens = nullptr;
    uint32_t n = 0;
    bool all_logits = false;  // logits of every token, or of the last one
};

// Called between ubatches of a long evaluation; it may throw to stop (the bindings raise Ctrl-C's
// KeyboardInterrupt there). What was evaluated before stays in the context.
using BetweenUbatches = std::function<void()>;

class Engine {
public:
    Engine(std::shared_ptr<Model> model, const EngineConfig & cfg);
    ~Engine();
    Engine(const Engine &) = delete;
    Engine & operator=(const Engine &) = delete;

    // Appends tokens to sequence 0 at positions n_past.. and returns logits, row-major [n_out, n_vocab]
    // (n_out = n if all_logits else 1). With a probe spec, also probes the last n_probe tokens of the call
    // (probe.h); read the scores with probe_mass() and probe_change() (per layer, NaN where not probed).
    std::vector<float> eval(const int32_t * tokens, uint32_t n, bool all_logits, const ProbeSpec * probe = nullptr,
                            uint32_t n_probe = 0, const BetweenUbatches & between = {});
    // eval() of sequence 0 with every row's logits (or, with stream.targets, every row's loss), on a residual
    // stream: from a later layer, or keeping what enters each layer. A probe (first_layer 0 only) scores
    // the last n_probe tokens as eval()'s does.
    std::vector<float> eval_stream(const int32_t * tokens, uint32_t n, const LayerStream & stream,
                                   const ProbeSpec * probe = nullptr, uint32_t n_probe = 0,
                                   const BetweenUbatches & between = {});
    // Appends tokens to several sequences at once (each at most once per call): their tokens share ubatches
    // (continuous batching: one sequence's decode token beside another's prompt chunk). Returns each entry's
    // logits as eval() does. Everything is checked before anything is evaluated.
    std::vector<std::vector<float>> decode(const std::vector<SeqTokens> & batch, const BetweenUbatches & between = {});
    // CPU threads for the next calls (a fork()ed child must compute with one: ggml's OpenMP pool is gone).
    void set_n_threads(int n);
    std::vector<double> probe_mass() const { return probe_acc_.mass(); }
    std::vector<double> probe_change() const { return probe_acc_.change(); }
    // Drops positions >= n_keep of a sequence. False if a store cannot (a lazy ring overwrote what is
    // needed): then nothing changed and the caller must clear the sequence and re-evaluate.
    bool truncate(uint32_t n_keep, int32_t seq = 0);
    void clear(int32_t seq);  // forget one sequence (its cells return to the pool)
    void reset();             // forget every sequence
    // What-if trimming for the profiler: these layers keep their full store but attend only to the sinks
    // and the n_window most recent keys from now on (kv_policy_masked.cpp); the layers masked before are
    // unmasked. Together with truncate() this scores trimming each layer over one shared full prefix.
    void set_masked_layers(const std::vector<int> & layers, uint32_t n_sink, uint32_t n_window);
    // What-if types for the profiler: each listed full layer's store takes K and V of its types from now on,
    // holding the cells it held converted (KvCache::retype); the layers given types before get their own
    // stores back. Together with truncate() this scores each layer's types over one shared prefix.
    void set_what_if_types(const std::vector<std::pair<int, KvTypes>> & layers);
    // One conversation's context as bytes, and back (engine_state.cpp). load_state checks everything before it
    // changes anything; on a mismatch the engine is left empty (reset), never half-loaded.
    std::string save_state() const;
    // Embeddings mode (Llama(embedding=True).embed): each output row is the model's last hidden state after
    // its final norm ([n_embd]) instead of the logits ([n_vocab]).
    void set_embeddings(bool on);
    // Floats per output row: an embedding, a row's loss (during eval_stream with targets), or its logits.
    uint32_t out_width() const {
        if (embeddings_) return model_->hp().n_embd;
        return stream_ && stream_->targets ? 1 : model_->hp().n_vocab;
    }
    void load_state(const std::string & blob);

    uint32_t n_past(int32_t seq = 0) const { return n_past_.at(checked_seq(seq)); }
    uint32_t free_cells() const { return kv_->free_cells(); }
    // Admission by cells (kv_cache.h): what a sequence would take of the pool, and what it holds there.
    int64_t cells_needed(int32_t seq, uint32_t n_keep, uint32_t n_new) const {
        return kv_->cells_needed((int) checked_seq(seq), n_keep, n_new);
    }
    uint32_t cells_held(int32_t seq) const { return kv_->cells_held((int) checked_seq(seq)); }
    // Exact prefill has compacted lazy layers of this context: a new prompt must start from scratch (a
    // fresh exact evaluation keeps every layer full throughout, which a reused prefix would not).
    // With several sequences (each prompt evaluated alone, then taken into the shared cache): whether this
    // sequence's prompt was.
    // (Dynamic mode chooses a sequence's lazy layers per prompt: with several sequences, always.)
    bool compacted(int32_t seq = 0) const {
        if (staged()) return (cfg_.lazy_mode == LazyMode::Dynamic || !lazy_layers().empty()) && n_past(seq) > 0;
        return !lazy_layers().empty() && compacted_;
    }
    std::vector<int> lazy_layers() const { return kv_->layers_of_kind(KvKind::Lazy); }
    // A sequence's first decode() after it was emptied is its prompt, evaluated alone in one piece (exact
    // prefill or dynamic mode with several sequences): callers should not cut a new prompt into chunks.
    bool prompts_alone() const { return staged(); }
    // The layers lazy for one sequence: the lazy stores, and in dynamic mode with several sequences the
    // full layers its prompt's probe chose (kv_cache.h: KvGroup::seq_lazy).
    std::vector<int> lazy_layers_of(int32_t seq) const { return kv_->seq_lazy_layers((int) checked_seq(seq)); }
    size_t peak_kv_bytes() const { return peak_kv_bytes_; }
    // Compute graphs built so far: a decode step that reuses the last one's graph adds none.
    size_t graph_builds() const { return graphs_->builds(); }
    const Model & model() const { return *model_; }
    const KvCache & kv() const { return *kv_; }
    const EngineConfig & config() const { return cfg_; }

    // An engine runs one call at a time. Callers that may race (the bindings release the GIL while a call
    // runs) hold this claim for the call; a second thread gets an error instead of corrupting the cache.
    std::unique_lock<std::mutex> claim() const {
        std::unique_lock<std::mutex> lk(busy_, std::try_to_lock);
        if (!lk) throw std::runtime_error("this model is busy with a call from another thread: serialize calls "
                                          "on one Llama (or use one per thread)");
        return lk;
    }
    // The same claim for a read of the engine's state: taken now if free (an empty lock if not), or waiting
    // for a running call to end instead of failing.
    std::unique_lock<std::mutex> try_claim() const { return std::unique_lock<std::mutex>(busy_, std::try_to_lock); }
    std::unique_lock<std::mutex> wait_claim() const { return std::unique_lock<std::mutex>(busy_); }

private:
    // The prompt is evaluated with every layer full (exact prefill, dynamic mode): Compacted or Staged.
    bool prompt_all_full() const { return prefill_ != PrefillStrategy::Streaming; }
    bool staged() const { return prefill_ == PrefillStrategy::Staged; }
    // engine_prefill.cpp: the prefill strategies. Compacted: the prompt in kv_ with every layer full, then
    // its lazy layers compacted. Staged: each new prompt alone in a cache of its own (eval_prompt), then
    // adopted into kv_.
    std::vector<std::vector<float>> eval_compacted(const std::vector<SeqTokens> & batch, const ProbeSpec * probe,
                                                   uint32_t n_probe, const BetweenUbatches & between);
    std::vector<std::vector<float>> eval_staged(const std::vector<SeqTokens> & batch, const BetweenUbatches & between);
    std::vector<float> eval_prompt(const SeqTokens & b, const BetweenUbatches & between);
    KvConfig prompt_config(uint32_t n_tokens) const;  // the cache eval_prompt evaluates a prompt in
    void check_batch(const std::vector<SeqTokens> & batch, const ProbeSpec * probe, uint32_t n_probe) const;
    // decode() once checked: lays the batch out in ubatches and evaluates it in `kv` (kv_, or a prompt's own).
    std::vector<std::vector<float>> evaluate(KvCache & kv, const std::vector<SeqTokens> & batch, const ProbeSpec * probe,
                                             uint32_t n_probe, const BetweenUbatches & between);
    std::vector<int> dynamic_lazy_layers() const;  // dynamic mode: the layers the probe found lazy
    size_t checked_seq(int32_t seq) const;
    std::vector<std::vector<float>> decode(const std::vector<SeqTokens> & batch, const ProbeSpec * probe,
                                           uint32_t n_probe, const BetweenUbatches & between);
    // refuse a store type that an offload device's flash attention does not read (devices.h)
    void check_device_types() const;
    void check_device_reads(uint32_t il, KvTypes t) const;  // the same for one layer's full store
    void check_memory(const KvConfig & kv_cfg) const;  // refuse, before allocating, a KV cache that cannot fit
    std::unique_ptr<KvCache> new_cache() const;
    // One ubatch: token i is tokens[i] at pos[i] of sequence seq[i]; the logits of row out_rows[j] go to
    // out[j] (n_vocab floats each).
    void eval_ubatch(KvCache & kv, const int32_t * tokens, const int32_t * pos, const int32_t * seq, uint32_t n,
                     const std::vector<uint32_t> & out_rows, const std::vector<float *> & out, uint32_t n_probe,
                     const ProbeSpec * probe, uint32_t call_row);

    // The graph of a ubatch of `kv` (graph_cache.h: the last one is reused where its shape is the same).
    BuiltGraph & graph_for(const KvCache & kv, const UbatchPlan & plan, uint32_t n_tokens, uint32_t n_rows, uint32_t n_probe);

    std::shared_ptr<Model> model_;
    EngineConfig cfg_;
    PrefillStrategy prefill_;
    KvConfig kv_cfg_;
    // Members are destroyed in reverse order: the graph, then the scheduler, the stores, the backends.
    ggml_backend_ptr cpu_;
    std::vector<ggml_backend_ptr> offload_;  // a backend per offload device that holds a layer (devices.h)
    std::vector<ggml_backend_buffer_type_t> bufts_;
    std::unique_ptr<KvCache> kv_;
    ggml_backend_sched_ptr sched_;
    GraphArena arena_;
    std::unique_ptr<GraphCache> graphs_;  // over sched_ and arena_
    std::vector<uint32_t> n_past_;     // per sequence
    std::vector<uint32_t> n_written_;  // per sequence: positions ever written since its last clear (ring rewinds)
    std::vector<uint32_t> what_if_from_;  // per sequence: positions when what-if types were set (set_what_if_types)
    bool compacted_ = false;  // the lazy layers of this context were compacted already
    bool embeddings_ = false;
    size_t peak_kv_bytes_ = 0;
    ProbeAccumulator probe_acc_;
    const LayerStream * stream_ = nullptr;  // during eval_stream(): the stream and the call's token count
    uint32_t stream_n_ = 0;
    mutable std::mutex busy_;
};

}  // namespace simkv
