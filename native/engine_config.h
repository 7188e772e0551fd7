// An engine's settings: each with its one default, the checks against a model (one message per rule), and
// what follows from them: the cache's configuration and the way a prompt reaches the cache.
#pragma once
#include "kv_cache.h"
#include "model.h"

#include <ggml.h>

#include <cstdint>
#include <map>
#include <string>
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
struct HParams;
// Refuse a cache type whose blocks do not tile one head of this model (`what` names it in the message).
void check_cache_type(const HParams & hp, ggml_type t, const std::string & what);

// Every setting of an engine, with its one default (Python reads these defaults through the binding).
// Counts are signed and wide so that any value a caller passes arrives here and is refused by
// validated() with one message, rather than wrapping on the way.
struct EngineConfig {
    int64_t n_ctx = 4096;
    int64_t n_batch = 512;
    int64_t n_ubatch = 512;
    int64_t n_threads = default_threads();
    ggml_type type_k = GGML_TYPE_F16, type_v = GGML_TYPE_F16, lazy_type = GGML_TYPE_Q4_0;
    // Per-layer K and V types: where a layer is listed, its store takes these types whatever its kind (full,
    // lazy, or the model's own sliding window) instead of type_k/type_v or lazy_type.
    std::map<int64_t, KvTypes> layer_types;
    std::vector<int64_t> lazy_layers;
    int64_t n_sink = 4;
    int64_t n_window = 1024;
    // Most recent positions per sequence that a quantized lazy ring also keeps in f16 (kv_policy_lazy.cpp).
    int64_t lazy_residual = 32;
    // The same for a quantized full store (kv_policy_full.cpp); 0: none.
    int64_t full_residual = 32;
    LazyPrefill lazy_prefill = LazyPrefill::Streaming;
    LazyMode lazy_mode = LazyMode::Static;
    double dynamic_threshold = 0.9;
    int64_t w_last = 32;
    // Sequences (conversations) the engine holds at once. They share the pool of n_ctx cells of the full
    // layers; each has its own sink + ring in the lazy layers.
    int64_t n_seq_max = 1;

    static int64_t default_threads();  // half the cores, as llama-cpp-python
};

// The K and V types of layer il's store when it is full, and when it is lazy (a validated configuration).
KvTypes full_types(const EngineConfig & cfg, int64_t il);
KvTypes lazy_types(const EngineConfig & cfg, int64_t il);

// The f16 residual the lazy rings keep per sequence (kv_policy_lazy.cpp): lazy_residual positions (at most
// the window) where some layer's ring would be quantized, none where every ring is f16 or bf16.
uint32_t residual_positions(const EngineConfig & cfg, uint32_t n_layer);

// The largest context an engine accepts (positions are int32 and cell maps are allocated up front).
constexpr int64_t kMaxContext = int64_t(1) << 26;
constexpr int64_t kMaxSequences = 256;

// Checks every setting against the model (one message per rule) and returns the configuration the engine
// runs with: n_ubatch <= n_batch, n_sink and n_window no larger than the context.
EngineConfig validated(const EngineConfig & cfg, const HParams & hp);

// How a prompt reaches the cache (Engine's prefill strategies).
//   Streaming: every token goes straight into the cache as configured (lazy layers lazy from the first).
//   Compacted: one sequence with exact prefill or dynamic mode: the prompt is evaluated with every layer
//              full, then the lazy layers (dynamic: those the probe chose) are compacted into rings.
//   Staged:    several sequences with exact prefill or dynamic mode: each prompt is evaluated alone in an
//              all-full cache of its own, then adopted into the shared cache.
enum class PrefillStrategy { Streaming, Compacted, Staged };
PrefillStrategy prefill_strategy(const EngineConfig & cfg);
// The cache's share of a validated configuration: its lazy layers are lazy from the start except where
// the prompt is compacted (Compacted: all full until then).
KvConfig kv_config(const EngineConfig & cfg, uint32_t n_layer);

}  // namespace simkv
