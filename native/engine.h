// Engine: one model + the per-layer KV cache of its sequences (and, while exact prefill with several
// sequences evaluates a prompt, a temporary all-full cache for it) + a backend scheduler. eval(tokens)
// appends tokens to the context in ubatches and returns logits (of the last token or of every token). It
// orchestrates: the cache decides cells and masks (kv_cache.h), the graph builders compute (graph.h), the
// probe scores (probe.h).
#pragma once
#include "graph.h"
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

// How lazy layers get their store. Streaming: sink + ring from the first token (bounded memory). Exact:
// every layer is full while the prompt is evaluated; at its end the lazy layers are compacted into sink +
// ring stores (the paper's procedure; the peak is a full cache).
enum class LazyPrefill { Streaming, Exact };
// Which layers are lazy. Static: lazy_layers. Dynamic: exact prefill where the lazy layers are those whose
// probed attention mass (last w_last prompt tokens) exceeds dynamic_threshold, decided per prompt. With
// several sequences, per sequence: each prompt is probed alone, and the layers it chose keep only that
// sequence's sinks + window, in f16, in their shared pools (KvGroup::seq_lazy).
enum class LazyMode { Static, Dynamic };

LazyPrefill parse_lazy_prefill(const std::string & name);
LazyMode parse_lazy_mode(const std::string & name);
const char * lazy_prefill_name(LazyPrefill p);
const char * lazy_mode_name(LazyMode m);
ggml_type parse_cache_type(const std::string & name, const char * what);

// Every setting of an engine, with its one default (Python reads these defaults through the binding).
// Counts are signed and wide so that any value a caller passes arrives here and is refused by
// validated() with one message, rather than wrapping on the way.
struct EngineConfig {
    int64_t n_ctx = 4096;
    int64_t n_batch = 512;
    int64_t n_ubatch = 512;
    int64_t n_threads = default_threads();
    ggml_type type_k = GGML_TYPE_F16, type_v = GGML_TYPE_F16, lazy_type = GGML_TYPE_Q4_0;
    std::vector<int64_t> lazy_layers;
    int64_t n_sink = 4;
    int64_t n_window = 1024;
    // Most recent positions per sequence that a quantized lazy ring also keeps in f16 (kv_policy_lazy.cpp).
    int64_t lazy_residual = 32;
    LazyPrefill lazy_prefill = LazyPrefill::Streaming;
    LazyMode lazy_mode = LazyMode::Static;
    double dynamic_threshold = 0.9;
    int64_t w_last = 32;
    // Sequences (conversations) the engine holds at once. They share the pool of n_ctx cells of the full
    // layers; each has its own sink + ring in the lazy layers.
    int64_t n_seq_max = 1;

    static int64_t default_threads();  // half the cores, as llama-cpp-python
};

// The f16 residual a lazy ring of this type keeps per sequence (kv_policy_lazy.cpp): lazy_residual
// positions beside a quantized ring (at most the window), none beside an f16 one.
uint32_t residual_positions(ggml_type lazy_type, int64_t lazy_residual, int64_t n_window);

// The largest context an engine accepts (positions are int32 and cell maps are allocated up front).
constexpr int64_t kMaxContext = int64_t(1) << 26;
constexpr int64_t kMaxSequences = 256;

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

// Checks every setting against the model (one message per rule) and returns the configuration the engine
// runs with: n_ubatch <= n_batch, n_sink and n_window no larger than the context.
EngineConfig validated(const EngineConfig & cfg, const HParams & hp);

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
    // One conversation's context as bytes, and back (kv_state.cpp). load_state checks everything before it
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
    size_t graph_builds() const { return graph_builds_; }
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

private:
    bool exact() const { return cfg_.lazy_prefill == LazyPrefill::Exact || cfg_.lazy_mode == LazyMode::Dynamic; }
    // Exact prefill with several sequences: the lazy layers are lazy from the start, and each sequence's
    // prompt is evaluated in a cache of its own with every layer full (eval_prompt).
    bool staged() const { return exact() && cfg_.n_seq_max > 1; }
    std::vector<float> eval_prompt(const SeqTokens & b, const BetweenUbatches & between);
    KvConfig prompt_config(uint32_t n_tokens) const;  // the cache eval_prompt evaluates a prompt in
    void check_batch(const std::vector<SeqTokens> & batch, const ProbeSpec * probe, uint32_t n_probe) const;
    // decode() once checked: lays the batch out in ubatches and evaluates it in kv_.
    std::vector<std::vector<float>> evaluate(const std::vector<SeqTokens> & batch, const ProbeSpec * probe,
                                             uint32_t n_probe, const BetweenUbatches & between);
    std::vector<int> dynamic_lazy_layers() const;  // dynamic mode: the layers the probe found lazy
    size_t checked_seq(int32_t seq) const;
    std::vector<std::vector<float>> decode(const std::vector<SeqTokens> & batch, const ProbeSpec * probe,
                                           uint32_t n_probe, const BetweenUbatches & between);
    void check_memory(const KvConfig & kv_cfg) const;  // refuse, before allocating, a KV cache that cannot fit
    std::unique_ptr<KvCache> new_cache() const;
    // One ubatch: token i is tokens[i] at pos[i] of sequence seq[i]; the logits of row out_rows[j] go to
    // out[j] (n_vocab floats each).
    void eval_ubatch(const int32_t * tokens, const int32_t * pos, const int32_t * seq, uint32_t n,
                     const std::vector<uint32_t> & out_rows, const std::vector<float *> & out, uint32_t n_probe,
                     const ProbeSpec * probe, uint32_t call_row);

    // The last ubatch graph, kept allocated: a decode step whose shapes (tokens, outputs, viewed cells
    // per group) equal the previous one's only refreshes inputs, as llama.cpp's graph reuse does.
    struct BuiltGraph {
        ggml_context_ptr ctx;
        ggml_cgraph * gf = nullptr;
        ggml_tensor * logits = nullptr;  // the output rows: logits, embeddings, or (with in.targets) each row's loss
        UbatchInputs in;
        ProbeGraph probe;
        std::vector<uint32_t> shape;  // n_tokens, n_rows, n_probe, each group's spans
    };
    BuiltGraph & graph_for(uint32_t n_tokens, uint32_t n_rows, uint32_t n_probe);
    // Forget the cached graph (layers changed groups, or the scheduler is about to run another graph).
    void drop_graph(bool replan) {
        graph_ = BuiltGraph{};
        groups_changed_ = groups_changed_ || replan;
    }

    std::shared_ptr<Model> model_;
    EngineConfig cfg_;
    KvConfig kv_cfg_;
    // Members are destroyed in reverse order: the graph, then the scheduler, the stores, the backends.
    ggml_backend_ptr cpu_;
    std::vector<ggml_backend_ptr> offload_;  // a backend per offload device that holds a layer (devices.h)
    std::vector<ggml_backend_buffer_type_t> bufts_;
    std::unique_ptr<KvCache> kv_;
    ggml_backend_sched_ptr sched_;
    GraphArena arena_;
    BuiltGraph graph_;
    std::vector<uint32_t> n_past_;     // per sequence
    std::vector<uint32_t> n_written_;  // per sequence: positions ever written since its last clear (ring rewinds)
    bool compacted_ = false;  // the lazy layers of this context were compacted already
    bool groups_changed_ = false;  // layers moved between KV groups since the last graph: replan memory
    uint64_t layout_seen_ = 0;     // the cache's layout_version() the cached graph was built for
    std::pair<bool, int32_t> planned_outputs_{false, -1};  // capture and tap_layer of the last planned graph
    bool embeddings_ = false;
    size_t peak_kv_bytes_ = 0;
    size_t graph_builds_ = 0;
    ProbeAccumulator probe_acc_;
    const LayerStream * stream_ = nullptr;  // during eval_stream(): the stream and the call's token count
    uint32_t stream_n_ = 0;
    mutable std::mutex busy_;
};

}  // namespace simkv
