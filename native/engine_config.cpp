#include "engine_config.h"

#include "errors.h"

#include <algorithm>
#include <cctype>
#include <set>
#include <thread>

namespace simkv {

ggml_type parse_cache_type(const std::string & name, const char * what) {
    std::string n = name;
    for (char & ch : n) ch = (char) std::tolower((unsigned char) ch);
    if (n == "f16") return GGML_TYPE_F16;
    if (n == "bf16") return GGML_TYPE_BF16;
    if (n == "q8_0") return GGML_TYPE_Q8_0;
    if (n == "q4_0") return GGML_TYPE_Q4_0;
    throw BadInput(std::string("unknown ") + what + " '" + name + "' (expected one of: f16, bf16, q8_0, q4_0)");
}

LazyPrefill parse_lazy_prefill(const std::string & name) {
    if (name == "streaming") return LazyPrefill::Streaming;
    if (name == "exact") return LazyPrefill::Exact;
    throw BadInput("lazy_prefill must be 'streaming' or 'exact', got '" + name + "'");
}

LazyMode parse_lazy_mode(const std::string & name) {
    if (name == "static") return LazyMode::Static;
    if (name == "dynamic") return LazyMode::Dynamic;
    throw BadInput("lazy_mode must be 'static' or 'dynamic', got '" + name + "'");
}

const char * lazy_prefill_name(LazyPrefill p) { return p == LazyPrefill::Exact ? "exact" : "streaming"; }
const char * lazy_mode_name(LazyMode m) { return m == LazyMode::Dynamic ? "dynamic" : "static"; }

KvTypes full_types(const EngineConfig & cfg, int64_t il) {
    const auto it = cfg.layer_types.find(il);
    return it != cfg.layer_types.end() ? it->second : KvTypes{cfg.type_k, cfg.type_v};
}

KvTypes lazy_types(const EngineConfig & cfg, int64_t il) {
    const auto it = cfg.layer_types.find(il);
    return it != cfg.layer_types.end() ? it->second : KvTypes{cfg.lazy_type, cfg.lazy_type};
}

uint32_t residual_positions(const EngineConfig & cfg, uint32_t n_layer) {
    // The layers that may be lazy: those listed, or (dynamic mode) any. An f16 (or bf16) ring needs no
    // residual; positions older than the window are not seen anyway.
    bool quantized = false;
    if (cfg.lazy_mode == LazyMode::Dynamic) {
        for (uint32_t il = 0; il < n_layer; ++il) quantized = quantized || lazy_types(cfg, il).quantized();
    } else {
        for (int64_t il : cfg.lazy_layers) quantized = quantized || lazy_types(cfg, il).quantized();
    }
    return quantized ? (uint32_t) std::max<int64_t>(0, std::min(cfg.lazy_residual, cfg.n_window)) : 0;
}

int64_t EngineConfig::default_threads() {
    return std::max<int64_t>(std::thread::hardware_concurrency() / 2, 1);
}

namespace {

void check_at_least(const char * name, int64_t value, int64_t minimum) {
    if (value < minimum) throw BadInput(std::string(name) + " must be >= " + std::to_string(minimum) + ", got " + std::to_string(value));
}

void check_at_most(const char * name, int64_t value, int64_t maximum, const char * why) {
    if (value > maximum) {
        throw BadInput(std::string(name) + " must be <= " + std::to_string(maximum) + ", got " + std::to_string(value) + why);
    }
}

}  // namespace

void check_cache_type(const HParams & hp, ggml_type t, const std::string & what) {
    if (hp.head_dim % ggml_blck_size(t) != 0) {
        throw BadInput(what + " " + ggml_type_name(t) + " needs a head size divisible by " +
                       std::to_string(ggml_blck_size(t)) + "; this model's is " + std::to_string(hp.head_dim));
    }
}

EngineConfig validated(const EngineConfig & cfg, const HParams & hp) {
    EngineConfig c = cfg;
    check_at_least("n_ctx", c.n_ctx, 1);
    check_at_most("n_ctx", c.n_ctx, kMaxContext, "");
    check_at_least("n_batch", c.n_batch, 1);
    check_at_least("n_ubatch", c.n_ubatch, 1);
    check_at_least("n_threads", c.n_threads, 1);
    check_at_most("n_threads", c.n_threads, 4096, "");
    check_at_least("n_sink", c.n_sink, 0);
    check_at_least("n_window", c.n_window, 1);
    check_at_least("lazy_residual", c.lazy_residual, 0);
    check_at_least("full_residual", c.full_residual, 0);
    check_at_least("w_last", c.w_last, 1);
    check_at_least("n_seq_max", c.n_seq_max, 1);
    check_at_most("n_seq_max", c.n_seq_max, kMaxSequences, "");
    if (!(c.dynamic_threshold == c.dynamic_threshold)) throw BadInput("dynamic_threshold must be a number, got NaN");
    // A batch never exceeds the context, and a window or sink set covering the context is the whole context
    // (clamping keeps every ring size far from overflow).
    c.n_batch = std::min(c.n_batch, c.n_ctx);
    c.n_ubatch = std::min(c.n_ubatch, c.n_batch);
    c.n_sink = std::min(c.n_sink, c.n_ctx);
    c.n_window = std::min(c.n_window, c.n_ctx);
    if (c.lazy_mode == LazyMode::Dynamic && !c.lazy_layers.empty()) {
        throw BadInput("lazy_mode='dynamic' chooses the lazy layers itself: do not give lazy_layers");
    }
    // K and V may differ (on the CPU simkv's attention reads every pair; a device's flash attention is asked
    // by the engine, devices.h); every type must fill whole blocks of a head.
    auto check_type = [&](ggml_type t, const std::string & what) { check_cache_type(hp, t, what); };
    check_type(c.type_k, "cache type");
    check_type(c.type_v, "cache type");
    if (!c.lazy_layers.empty() || c.lazy_mode == LazyMode::Dynamic) check_type(c.lazy_type, "cache type");
    for (const auto & [il, t] : c.layer_types) {
        if (il < 0 || il >= (int64_t) hp.n_layer) {
            throw BadInput("kv_types: layer " + std::to_string(il) + " is out of range: the model has " +
                           std::to_string(hp.n_layer) + " layers (0.." + std::to_string(hp.n_layer - 1) + ")");
        }
        check_type(t.k, "layer " + std::to_string(il) + "'s K type");
        check_type(t.v, "layer " + std::to_string(il) + "'s V type");
    }
    std::set<int64_t> seen;
    for (int64_t il : c.lazy_layers) {
        if (il < 0 || il >= (int64_t) hp.n_layer) {
            throw BadInput("lazy layer " + std::to_string(il) + " is out of range: the model has " +
                           std::to_string(hp.n_layer) + " layers (0.." + std::to_string(hp.n_layer - 1) + ")");
        }
        if (!seen.insert(il).second) throw BadInput("lazy layer " + std::to_string(il) + " is listed twice");
    }
    return c;
}

PrefillStrategy prefill_strategy(const EngineConfig & cfg) {
    if (cfg.lazy_prefill == LazyPrefill::Streaming && cfg.lazy_mode == LazyMode::Static) return PrefillStrategy::Streaming;
    return cfg.n_seq_max > 1 ? PrefillStrategy::Staged : PrefillStrategy::Compacted;
}

KvConfig kv_config(const EngineConfig & cfg, uint32_t n_layer) {
    KvConfig kv;
    kv.n_ctx = (uint32_t) cfg.n_ctx;
    kv.n_seq_max = (uint32_t) cfg.n_seq_max;
    kv.n_ubatch = (uint32_t) cfg.n_ubatch;
    for (uint32_t il = 0; il < n_layer; ++il) {
        kv.full_types.push_back(full_types(cfg, il));
        kv.lazy_types.push_back(lazy_types(cfg, il));
    }
    kv.n_sink = (uint32_t) cfg.n_sink;
    kv.n_window = (uint32_t) cfg.n_window;
    kv.n_residual = residual_positions(cfg, n_layer);
    kv.n_full_residual = (uint32_t) std::min<int64_t>(cfg.full_residual, cfg.n_ctx);
    if (prefill_strategy(cfg) != PrefillStrategy::Compacted) {
        for (int64_t il : cfg.lazy_layers) kv.lazy_layers.push_back((int) il);
    }
    return kv;
}

}  // namespace simkv
