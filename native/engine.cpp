#include "engine.h"

#include "errors.h"
#include "graph.h"
#include "rpc_devices.h"

#include <ggml-cpu.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
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

uint32_t residual_positions(ggml_type lazy_type, int64_t lazy_residual, int64_t n_window) {
    // An f16 (or bf16) ring needs none; positions older than the window are not seen anyway.
    return ggml_is_quantized(lazy_type) ? (uint32_t) std::max<int64_t>(0, std::min(lazy_residual, n_window)) : 0;
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
    if (c.type_k != c.type_v) {
        throw BadInput(std::string("type_k and type_v must be equal (got ") + ggml_type_name(c.type_k) + " and " +
                       ggml_type_name(c.type_v) + "): mixed K/V types fall off the fast flash-attention kernels");
    }
    if (c.lazy_mode == LazyMode::Dynamic && !c.lazy_layers.empty()) {
        throw BadInput("lazy_mode='dynamic' chooses the lazy layers itself: do not give lazy_layers");
    }
    std::vector<ggml_type> used = {c.type_k};
    if (!c.lazy_layers.empty() || c.lazy_mode == LazyMode::Dynamic) used.push_back(c.lazy_type);
    for (ggml_type t : used) {
        if (hp.head_dim % ggml_blck_size(t) != 0) {
            throw BadInput(std::string("cache type ") + ggml_type_name(t) + " needs a head size divisible by " +
                           std::to_string(ggml_blck_size(t)) + "; this model's is " + std::to_string(hp.head_dim));
        }
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

Engine::Engine(std::shared_ptr<Model> model, const EngineConfig & cfg)
    : model_(std::move(model)), cfg_(validated(cfg, model_->hp())),
      // Nodes: ~64 per layer, plus ~12 per attention span (one per sequence in a ubatch, at most) and ~14
      // more where a span reads and writes a ring's residual.
      arena_(std::max<size_t>(2048, (size_t) model_->hp().n_layer *
                                        (64 + 28 * (size_t) std::min(cfg_.n_seq_max, cfg_.n_ubatch)))) {
    const HParams & hp = model_->hp();
    cpu_.reset(ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr));
    if (!cpu_) throw std::runtime_error("ggml CPU backend unavailable");
    ggml_backend_cpu_set_n_threads(cpu_.get(), (int) cfg_.n_threads);

    kv_cfg_.n_ctx = (uint32_t) cfg_.n_ctx;
    kv_cfg_.n_seq_max = (uint32_t) cfg_.n_seq_max;
    n_past_.assign(cfg_.n_seq_max, 0);
    n_written_.assign(cfg_.n_seq_max, 0);
    kv_cfg_.n_ubatch = (uint32_t) cfg_.n_ubatch;
    kv_cfg_.type_full = cfg_.type_k;
    kv_cfg_.type_lazy = cfg_.lazy_type;
    kv_cfg_.n_sink = (uint32_t) cfg_.n_sink;
    kv_cfg_.n_window = (uint32_t) cfg_.n_window;
    kv_cfg_.n_residual = residual_positions(cfg_.lazy_type, cfg_.lazy_residual, cfg_.n_window);
    if (!exact() || staged()) {  // exact prefill of one sequence: all full until the compaction
        for (int64_t il : cfg_.lazy_layers) kv_cfg_.lazy_layers.push_back((int) il);
    }
    // Each layer's KV store lives on its layer's device (devices.h); the scheduler runs each op where its
    // weights are, the CPU backend last, and offloads large CPU-weight batches to a GPU as llama.cpp does.
    for (ggml_backend_dev_t dev : model_->placement().devices) {
        offload_.emplace_back(ggml_backend_dev_init(dev, nullptr));
        if (!offload_.back()) throw std::runtime_error("cannot start the backend of " + device_name(dev));
    }
    bufts_.resize(hp.n_layer);
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        ggml_backend_dev_t dev = model_->layer_device(il);
        bufts_[il] = dev ? ggml_backend_dev_buffer_type(dev) : ggml_backend_get_default_buffer_type(cpu_.get());
    }
    check_memory(kv_cfg_);
    kv_ = new_cache();
    peak_kv_bytes_ = kv_->total_bytes();
    std::vector<ggml_backend_t> backends;
    for (const ggml_backend_ptr & b : offload_) backends.push_back(b.get());
    backends.push_back(cpu_.get());
    sched_.reset(ggml_backend_sched_new(backends.data(), nullptr, (int) backends.size(), arena_.n_nodes(), false,
                                        !offload_.empty()));
}

Engine::~Engine() {
    if (!model_->uses_remote()) return;
    // Remote buffers are freed by messages to their server, on the remote-call thread; after a failure
    // they are left alone (rpc_devices.h).
    free_remote_or_leak(
        [&] {
            drop_graph(false);
            sched_.reset();
            kv_.reset();
            offload_.clear();
        },
        [&] {
            (void) sched_.release();
            (void) kv_.release();
            for (ggml_backend_ptr & b : offload_) (void) b.release();
        });
}

std::vector<float> Engine::eval(const int32_t * tokens, uint32_t n, bool all_logits, const ProbeSpec * probe,
                                uint32_t n_probe, const BetweenUbatches & between) {
    if (n == 0) throw BadInput("eval() needs at least one token");
    return std::move(decode({SeqTokens{0, tokens, n, all_logits}}, probe, n_probe, between)[0]);
}

std::vector<std::vector<float>> Engine::decode(const std::vector<SeqTokens> & batch, const BetweenUbatches & between) {
    return decode(batch, nullptr, 0, between);
}

std::vector<float> Engine::eval_stream(const int32_t * tokens, uint32_t n, const LayerStream & stream,
                                       const ProbeSpec * probe, uint32_t n_probe, const BetweenUbatches & between) {
    const HParams & hp = model_->hp();
    if (n == 0) throw BadInput("eval_stream() needs at least one token");
    if (stream.first_layer >= hp.n_layer) {
        throw BadInput("first_layer " + std::to_string(stream.first_layer) + " is out of range (0.." +
                       std::to_string(hp.n_layer - 1) + ")");
    }
    if (stream.first_layer > 0 && !stream.hidden) throw BadInput("starting at a later layer needs its input stream");
    if (stream.first_layer > 0 && stream.capture) throw BadInput("the stream is captured from layer 0 only");
    if (stream.tap_layer >= (int64_t) hp.n_layer || (stream.tap_layer >= 0 && (uint32_t) stream.tap_layer < stream.first_layer)) {
        throw BadInput("tap_layer " + std::to_string(stream.tap_layer) + " is not a layer this call computes");
    }
    if (stream.first_layer > 0 && probe && n_probe) throw BadInput("the probe needs every layer computed (first_layer 0)");
    // A what-if on one plain context: exact prefill and several sequences rearrange cells between calls.
    if (exact() || cfg_.n_seq_max > 1) throw BadInput("eval_stream() needs one sequence with streaming prefill");
    if (embeddings_) throw BadInput("eval_stream() computes logits: turn embeddings off");
    for (uint32_t i = 0; stream.targets && i < n; ++i) {
        if (stream.targets[i] < -1 || stream.targets[i] >= (int64_t) hp.n_vocab) {
            throw BadInput("target " + std::to_string(stream.targets[i]) + " is not a token id (0.." +
                           std::to_string(hp.n_vocab - 1) + ", or -1: none)");
        }
    }
    struct Reset {
        Engine & e;
        ~Reset() { e.stream_ = nullptr; e.stream_n_ = 0; }
    } reset{*this};
    stream_ = &stream;
    stream_n_ = n;
    return std::move(decode({SeqTokens{0, tokens, n, true}}, probe, n_probe, between)[0]);
}

void Engine::set_n_threads(int n) {
    if (n < 1) throw BadInput("n_threads must be >= 1");
    cfg_.n_threads = n;
    ggml_backend_cpu_set_n_threads(cpu_.get(), n);
}

namespace {

// Memory a new CPU allocation can take without swapping or the OOM killer: MemAvailable (Linux).
uint64_t available_host_memory() {
    if (FILE * f = std::fopen("/proc/meminfo", "r")) {
        char line[256];
        unsigned long long kb = 0;
        while (std::fgets(line, sizeof line, f)) {
            if (std::sscanf(line, "MemAvailable: %llu kB", &kb) == 1) break;
        }
        std::fclose(f);
        if (kb) return (uint64_t) kb * 1024;
    }
    return UINT64_MAX;  // unknown: let the allocation decide
}

}  // namespace

void Engine::check_memory(const KvConfig & kv_cfg) const {
    // Each device's stores together, against what that device has free: a cache that cannot fit is refused
    // with its size instead of being killed by the OOM killer half-way through (a zeroed buffer is touched).
    const HParams & hp = model_->hp();
    std::vector<std::pair<ggml_backend_dev_t, uint64_t>> need;  // device (null = host), bytes
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        ggml_backend_dev_t dev = model_->layer_device(il);
        const uint64_t b = KvCache::planned_bytes(hp, kv_cfg, il);
        auto it = std::find_if(need.begin(), need.end(), [&](const auto & p) { return p.first == dev; });
        if (it == need.end()) need.emplace_back(dev, b);
        else it->second += b;
    }
    for (const auto & [dev, bytes] : need) {
        size_t free = 0, total = 0;
        if (dev) ggml_backend_dev_memory(dev, &free, &total);
        const uint64_t avail = dev ? (uint64_t) free : available_host_memory();
        if (bytes > avail) {
            throw BadInput("the KV cache needs " + std::to_string(bytes >> 20) + " MiB on " +
                           (dev ? std::string(ggml_backend_dev_name(dev)) : std::string("the host")) + " but only " +
                           std::to_string(avail >> 20) + " MiB are available: lower n_ctx (" + std::to_string(cfg_.n_ctx) +
                           "), n_seq_max, n_window or the prompt, or use a smaller cache type");
        }
    }
}

size_t Engine::checked_seq(int32_t seq) const {
    if (seq < 0 || seq >= cfg_.n_seq_max) {
        throw BadInput("sequence " + std::to_string(seq) + " is out of range (0.." + std::to_string(cfg_.n_seq_max - 1) +
                       ": n_seq_max " + std::to_string(cfg_.n_seq_max) + ")");
    }
    return (size_t) seq;
}

std::vector<std::vector<float>> Engine::decode(const std::vector<SeqTokens> & batch, const ProbeSpec * probe,
                                               uint32_t n_probe, const BetweenUbatches & between) {
    check_batch(batch, probe, n_probe);
    if (!staged()) return evaluate(batch, probe, n_probe, between);
    // Exact prefill with several sequences: a sequence's first tokens after it was emptied are its prompt,
    // evaluated alone with every layer full, then taken into the shared cache (eval_prompt). Its later
    // tokens, and the other sequences', share ubatches as in streaming mode.
    uint32_t longest = 0;  // the largest prompt cache this call needs must fit before anything is evaluated
    for (const SeqTokens & b : batch) {
        if (n_past_[b.seq] == 0) longest = std::max(longest, b.n);
    }
    if (longest) check_memory(prompt_config(longest));
    std::vector<std::vector<float>> logits(batch.size());
    std::vector<SeqTokens> rest;
    std::vector<size_t> rest_at;
    for (size_t i = 0; i < batch.size(); ++i) {
        if (n_past_[batch[i].seq] == 0) {
            logits[i] = eval_prompt(batch[i], between);
        } else {
            rest.push_back(batch[i]);
            rest_at.push_back(i);
        }
    }
    if (!rest.empty()) {
        std::vector<std::vector<float>> out = evaluate(rest, nullptr, 0, between);
        for (size_t j = 0; j < rest.size(); ++j) logits[rest_at[j]] = std::move(out[j]);
    }
    return logits;
}

KvConfig Engine::prompt_config(uint32_t n_tokens) const {
    // A cache of the prompt's length (as many sequences, so that ids carry over) with every layer full.
    KvConfig c = kv_cfg_;
    c.n_ctx = pad_cells(n_tokens);
    c.lazy_layers.clear();
    return c;
}

std::vector<float> Engine::eval_prompt(const SeqTokens & b, const BetweenUbatches & between) {
    const KvConfig prompt_cfg = prompt_config(b.n);  // decode() checked that the largest one fits
    drop_graph(true);  // the graphs below read other stores
    std::unique_ptr<KvCache> shared = std::move(kv_);
    auto restore = [&] {
        kv_ = std::move(shared);
        drop_graph(true);
        n_past_[b.seq] = 0;
        n_written_[b.seq] = 0;
    };
    std::vector<float> logits;
    std::unique_ptr<KvCache> prompt;
    // Dynamic mode: the probe on the prompt's last w_last tokens picks the layers lazy for this sequence.
    const bool dynamic = cfg_.lazy_mode == LazyMode::Dynamic;
    const ProbeSpec spec{(uint32_t) cfg_.n_sink, (uint32_t) cfg_.n_window};
    try {
        kv_ = std::make_unique<KvCache>(model_->hp(), prompt_cfg, bufts_);
        logits = std::move(evaluate({b}, dynamic ? &spec : nullptr, dynamic ? std::min((uint32_t) cfg_.w_last, b.n) : 0,
                                    between)[0]);
        prompt = std::move(kv_);
        peak_kv_bytes_ = std::max(peak_kv_bytes_, shared->total_bytes() + prompt->total_bytes());
        shared->adopt_sequence(*prompt, b.seq, dynamic ? dynamic_lazy_layers() : std::vector<int>{}, sched_.get(), arena_);
    } catch (...) {
        restore();  // the sequence stays empty
        throw;
    }
    kv_ = std::move(shared);
    drop_graph(true);
    return logits;
}

void Engine::check_batch(const std::vector<SeqTokens> & batch, const ProbeSpec * probe, uint32_t n_probe) const {
    const HParams & hp = model_->hp();
    // Check everything first: a refused call changes nothing.
    if (batch.empty()) throw BadInput("decode() needs at least one sequence");
    std::vector<bool> seen(cfg_.n_seq_max, false);
    uint64_t n_total = 0;
    for (const SeqTokens & b : batch) {
        const size_t s = checked_seq(b.seq);
        if (seen[s]) throw BadInput("sequence " + std::to_string(b.seq) + " appears twice in one decode() call");
        seen[s] = true;
        if (b.n == 0) throw BadInput("sequence " + std::to_string(b.seq) + ": no tokens");
        if ((uint64_t) n_past_[s] + b.n > (uint64_t) cfg_.n_ctx) {
            throw BadInput("context overflow: " + std::to_string(n_past_[s]) + " tokens in context + " +
                           std::to_string(b.n) + " new > n_ctx " + std::to_string(cfg_.n_ctx));
        }
        for (uint32_t i = 0; i < b.n; ++i) {
            if (b.tokens[i] < 0 || (uint32_t) b.tokens[i] >= hp.n_vocab) {
                throw BadInput("token id " + std::to_string(b.tokens[i]) + " is outside the vocabulary (0.." +
                               std::to_string(hp.n_vocab - 1) + ")");
            }
        }
        n_total += b.n;
    }
    if (n_total > kv_->free_cells()) {
        throw BadInput("the KV cache is full: " + std::to_string(n_total) + " new tokens, " +
                       std::to_string(kv_->free_cells()) + " free cells (clear or truncate a sequence, or raise n_ctx)");
    }
    if (!probe) n_probe = 0;
    if (n_probe > n_total) throw BadInput("cannot probe more tokens than are evaluated");
    if (n_probe && batch.size() > 1) throw BadInput("the probe runs on one sequence at a time");
    if (n_probe && probe->n_window < 1) throw BadInput("probe n_window must be >= 1");
    if (n_probe && staged()) throw BadInput("the probe needs n_seq_max=1 with exact prefill");
}

std::vector<std::vector<float>> Engine::evaluate(const std::vector<SeqTokens> & batch, const ProbeSpec * probe,
                                                 uint32_t n_probe, const BetweenUbatches & between) {
    const HParams & hp = model_->hp();
    uint32_t n = 0;
    for (const SeqTokens & b : batch) n += b.n;
    if (!probe) n_probe = 0;

    // Lay the batch out token by token, with each output row's destination.
    std::vector<int32_t> tok(n), pos(n), seq(n);
    std::vector<float *> dest(n, nullptr);
    std::vector<std::vector<float>> logits(batch.size());
    uint32_t k = 0;
    for (size_t bi = 0; bi < batch.size(); ++bi) {
        const SeqTokens & b = batch[bi];
        logits[bi].resize((size_t) (b.all_logits ? b.n : 1) * out_width());
        for (uint32_t i = 0; i < b.n; ++i, ++k) {
            tok[k] = b.tokens[i];
            pos[k] = (int32_t) (n_past_[b.seq] + i);
            seq[k] = b.seq;
            if (b.all_logits) dest[k] = logits[bi].data() + (size_t) i * out_width();
            else if (i + 1 == b.n) dest[k] = logits[bi].data();
        }
    }
    // Exact prefill: the first eval of a context is its prompt; its end triggers the compaction of the lazy
    // layers. In dynamic mode the probe (on the prompt's last w_last tokens, unless the caller probes)
    // picks them.
    const bool compact_after = exact() && !staged() && !compacted_;
    const bool dynamic = compact_after && cfg_.lazy_mode == LazyMode::Dynamic;
    const ProbeSpec dynamic_spec{(uint32_t) cfg_.n_sink, (uint32_t) cfg_.n_window};
    if (dynamic && n_probe == 0) {
        probe = &dynamic_spec;
        n_probe = std::min((uint32_t) cfg_.w_last, n);
    }
    if (n_probe) probe_acc_.reset(hp.n_layer);
    // Split like llama.cpp: n_batch chunks, each cut into ubatches (kernels' numerics depend on the
    // batch shape, so the same split gives the same logits).
    const uint32_t n_batch = (uint32_t) cfg_.n_batch;
    const uint32_t step = std::min((uint32_t) cfg_.n_ubatch, kv_->max_ubatch());
    std::vector<uint32_t> rows;
    std::vector<float *> out;
    for (uint32_t b0 = 0; b0 < n; b0 += n_batch) {
        const uint32_t b1 = std::min(n, b0 + n_batch);
        for (uint32_t i = b0; i < b1; i += step) {
            const uint32_t m = std::min(step, b1 - i);
            // Probed rows: the ubatch's share of the call's last n_probe tokens.
            const uint32_t first_probed = n - n_probe;
            const uint32_t n_sel = i + m <= first_probed ? 0 : std::min(m, i + m - first_probed);
            rows.clear();
            out.clear();
            for (uint32_t r = 0; r < m; ++r) {
                if (dest[i + r]) {
                    rows.push_back(r);
                    out.push_back(dest[i + r]);
                }
            }
            if (between) between();
            eval_ubatch(tok.data() + i, pos.data() + i, seq.data() + i, m, rows, out, n_sel, probe, i);
        }
    }
    if (compact_after) {
        std::vector<int> layers;
        if (dynamic) {
            layers = dynamic_lazy_layers();
        } else {
            for (int64_t il : cfg_.lazy_layers) layers.push_back((int) il);
        }
        if (!layers.empty()) {
            drop_graph(true);  // the scheduler runs the compaction graph; layers change groups
            peak_kv_bytes_ = std::max(peak_kv_bytes_, kv_->make_lazy(hp, kv_cfg_, layers, bufts_, sched_.get(), arena_));
        }
        compacted_ = true;
    }
    peak_kv_bytes_ = std::max(peak_kv_bytes_, kv_->total_bytes());
    return logits;
}

std::vector<int> Engine::dynamic_lazy_layers() const {
    const HParams & hp = model_->hp();
    const std::vector<double> mass = probe_acc_.mass();
    std::vector<int> layers;
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        // A model's own sliding-window layers have no full history to probe and stay as they are.
        if (!hp.is_swa(il) && mass[il] > cfg_.dynamic_threshold) layers.push_back((int) il);
    }
    return layers;
}

std::unique_ptr<KvCache> Engine::new_cache() const {
    return std::make_unique<KvCache>(model_->hp(), kv_cfg_, bufts_);
}

void Engine::set_masked_layers(const std::vector<int> & layers, uint32_t n_sink, uint32_t n_window) {
    if (exact()) throw BadInput("masked layers cannot be combined with exact prefill or dynamic mode");
    if (n_window < 1) throw BadInput("n_window must be >= 1");
    std::set<int> seen;
    for (int il : layers) {
        if (il < 0 || (uint32_t) il >= model_->hp().n_layer) throw BadInput("layer " + std::to_string(il) + " is out of range");
        if (!seen.insert(il).second) throw BadInput("layer " + std::to_string(il) + " is listed twice");
        if (kv_->kind_of(il) != KvKind::Full && kv_->kind_of(il) != KvKind::Masked) {
            throw BadInput("only full layers can be masked");
        }
    }
    // Layers that change groups read another mask: the cache's layout_version() tells graph_for to rebuild.
    kv_->regroup(kv_->layers_of_kind(KvKind::Masked), make_full_policy(kv_cfg_.n_ctx));
    kv_->regroup(layers, make_masked_policy(kv_cfg_.n_ctx, n_sink, n_window));
}

void Engine::eval_ubatch(const int32_t * tokens, const int32_t * pos, const int32_t * seq, uint32_t n,
                         const std::vector<uint32_t> & out_rows, const std::vector<float *> & out, uint32_t n_probe,
                         const ProbeSpec * probe, uint32_t call_row) {
    const HParams & hp = model_->hp();
    kv_->plan_ubatch(pos, seq, n, n_probe > 0);

    // A ubatch with no output still needs a graph sink: keep the last row's logits and drop them.
    const std::vector<uint32_t> rows = out_rows.empty() ? std::vector<uint32_t>{n - 1} : out_rows;
    const uint32_t n_rows = (uint32_t) rows.size();
    BuiltGraph & g = graph_for(n, n_rows, n_probe);
    UbatchInputs & in = g.in;
    if (in.tokens) ggml_backend_tensor_set(in.tokens, tokens, 0, sizeof(int32_t) * n);
    if (in.hidden) {
        const size_t row = (size_t) hp.n_embd;
        ggml_backend_tensor_set(in.hidden, stream_->hidden + (size_t) call_row * row, 0, sizeof(float) * row * n);
    }
    ggml_backend_tensor_set(in.pos, pos, 0, sizeof(int32_t) * n);
    if (in.targets) ggml_backend_tensor_set(in.targets, stream_->targets + call_row, 0, sizeof(int32_t) * n_rows);
    if (in.out_ids) {
        const std::vector<int32_t> ids(rows.begin(), rows.end());
        ggml_backend_tensor_set(in.out_ids, ids.data(), 0, sizeof(int32_t) * n_rows);
    }
    const auto & groups = kv_->groups();
    for (size_t gi = 0; gi < groups.size(); ++gi) {
        if (!in.write_idx[gi]) continue;
        const KvGroup & grp = groups[gi];
        for (size_t r = 0; r < grp.spans.size(); ++r) {
            const SpanInputs & si = in.spans[gi][r];
            const AttnSpan & sp = grp.spans[r];
            ggml_backend_tensor_set(si.kq_mask, grp.mask.data() + sp.mask_offset, 0, ggml_nbytes(si.kq_mask));
            if (si.gather) ggml_backend_tensor_set(si.gather, grp.gather.data() + sp.gather_offset, 0, ggml_nbytes(si.gather));
            if (si.res_read) {
                ggml_backend_tensor_set(si.res_read, grp.res_read.data() + sp.res_read_offset, 0, ggml_nbytes(si.res_read));
            }
            if (si.res_dst) {
                ggml_backend_tensor_set(si.res_dst, grp.res_dst.data() + sp.res_write_offset, 0, ggml_nbytes(si.res_dst));
            }
        }
        ggml_backend_tensor_set(in.write_idx[gi], groups[gi].write_cells.data(), 0, ggml_nbytes(in.write_idx[gi]));
    }
    in.rotations.set();
    if (n_probe) {
        std::vector<int32_t> probe_rows, probe_pos, probe_seq;
        for (uint32_t r = n - n_probe; r < n; ++r) {
            probe_rows.push_back((int32_t) r);
            probe_pos.push_back(pos[r]);
            probe_seq.push_back(seq[r]);
        }
        ProbeAccumulator::set_inputs(g.probe, *kv_, *probe, probe_rows, probe_pos, probe_seq);
    }
    if (ggml_backend_sched_graph_compute(sched_.get(), g.gf) != GGML_STATUS_SUCCESS) {
        throw std::runtime_error("graph compute failed");
    }
    if (n_probe) probe_acc_.collect(g.probe, hp.n_head, n_probe);
    if (stream_ && stream_->capture) {  // the stream entering each layer: [layer][call row][n_embd]
        const size_t row = (size_t) hp.n_embd;
        for (uint32_t il = 0; il < hp.n_layer; ++il) {
            float * dst = stream_->capture + ((size_t) il * stream_n_ + call_row) * row;
            ggml_backend_tensor_get(in.layer_in.at(il), dst, 0, sizeof(float) * row * n);
        }
    }
    if (stream_ && stream_->tap_layer >= 0) {
        const size_t row = (size_t) hp.n_head * hp.head_dim;
        ggml_backend_tensor_get(in.tap_q, stream_->tap_q + (size_t) call_row * row, 0, sizeof(float) * row * n);
        ggml_backend_tensor_get(in.tap_out, stream_->tap_out + (size_t) call_row * row, 0, sizeof(float) * row * n);
    }
    const uint32_t width = out_width();
    if (stream_ && stream_->targets && !in.targets) {
        // Rows to score here, not in the graph (graph_token_nll.cpp): read back a few rows of logits at a time.
        const size_t vocab = hp.n_vocab, block = 32;
        std::vector<float> logits(block * vocab);
        for (size_t j0 = 0; j0 < out.size(); j0 += block) {
            const size_t m = std::min(block, out.size() - j0);  // rows j0.. are consecutive in g.logits
            ggml_backend_tensor_get(g.logits, logits.data(), j0 * vocab * sizeof(float), m * vocab * sizeof(float));
            for (size_t j = j0; j < j0 + m; ++j) {
                out[j][0] = token_nll(logits.data() + (j - j0) * vocab, (int64_t) vocab, stream_->targets[call_row + rows[j]]);
            }
        }
    } else {
        // The rows of consecutive outputs to consecutive destinations come in one read.
        const size_t row_bytes = sizeof(float) * width;
        for (size_t j = 0; j < out.size();) {
            size_t run = 1;
            while (j + run < out.size() && out[j + run] == out[j] + (size_t) run * width) ++run;
            ggml_backend_tensor_get(g.logits, out[j], j * row_bytes, run * row_bytes);
            j += run;
        }
    }
    for (uint32_t i = 0; i < n; ++i) {
        n_past_[seq[i]] = std::max<uint32_t>(n_past_[seq[i]], (uint32_t) pos[i] + 1);
        n_written_[seq[i]] = std::max(n_written_[seq[i]], n_past_[seq[i]]);
    }
    // A file with broken weights or hyperparameters computes NaN or inf: say so instead of sampling from it.
    // (The tokens stay in the context, as evaluated; the caller decides whether to go on.)
    for (float * row : out) {
        for (uint32_t v = 0; v < width; ++v) {
            if (!std::isfinite(row[v])) {
                throw BadInput("the model computed non-finite logits (NaN or inf): its weights or hyperparameters "
                               "are broken");
            }
        }
    }
}

Engine::BuiltGraph & Engine::graph_for(uint32_t n_tokens, uint32_t n_rows, uint32_t n_probe) {
    std::vector<uint32_t> shape = {n_tokens, n_rows, n_probe};
    for (const KvGroup & grp : kv_->groups()) {
        shape.push_back((uint32_t) grp.spans.size());
        for (const AttnSpan & sp : grp.spans) {  // the views' sizes and offsets are part of the graph
            shape.insert(shape.end(), {sp.t0, sp.n_tokens, sp.n_kv, sp.kv_lo, sp.gather_offset >= 0, sp.residual, sp.n_res,
                                       sp.n_res_write});
        }
    }
    shape.push_back(embeddings_);
    if (kv_->layout_version() != layout_seen_) {  // layers moved between groups: another graph, planned afresh
        layout_seen_ = kv_->layout_version();
        groups_changed_ = true;
        drop_graph(true);
    }
    const uint32_t first_layer = stream_ ? stream_->first_layer : 0;
    const bool capture = stream_ && stream_->capture;
    const bool scored = stream_ && stream_->targets;
    const int32_t tap_layer = stream_ ? stream_->tap_layer : -1;
    shape.insert(shape.end(), {first_layer, capture, scored, (uint32_t) tap_layer});
    // Captured and tapped tensors are outputs, kept until the graph ends; the allocator's plan for a graph
    // with the same nodes but other outputs would let later nodes overwrite them: plan afresh (below).
    const std::pair<bool, int32_t> outputs = {capture, tap_layer};
    if (outputs != planned_outputs_) groups_changed_ = true;
    planned_outputs_ = outputs;
    if (graph_.ctx && graph_.shape == shape) return graph_;

    drop_graph(false);
    ++graph_builds_;
    auto build = [&](BuiltGraph & g) {
        g.ctx = arena_.context();
        g.gf = ggml_new_graph_custom(g.ctx.get(), arena_.n_nodes(), false);
        GraphBuild b{g.ctx.get(), g.gf, *model_, *kv_, n_tokens, n_rows, {}, n_probe ? &g.probe : nullptr, n_probe,
                     embeddings_, first_layer, capture, tap_layer};
        g.logits = build_graph(b);
        // Rows are scored in the graph where the vocabulary projection runs on the CPU (graph_token_nll.cpp).
        if (scored && ggml_backend_buffer_is_host(model_->output->buffer)) {
            b.in.targets = cb(ggml_new_tensor_1d(b.ctx, GGML_TYPE_I32, n_rows), "targets", -1);
            ggml_set_input(b.in.targets);
            g.logits = build_token_nll(b.ctx, g.logits, b.in.targets);
        }
        ggml_build_forward_expand(g.gf, g.logits);
        g.in = b.in;
    };
    ggml_backend_sched_reset(sched_.get());
    // alloc_graph reuses the previous allocation plan whenever the sizes fit, which is only valid for the
    // same topology. After layers change groups, a group's mask or write index could share memory with a
    // node computed before its last reader: plan afresh, on a graph of its own. (Splitting a graph between
    // backends points its nodes at the scheduler's copies of their inputs, so a graph is split only once: a
    // second split of the same graph finds no inputs to copy to another device.)
    bool planned = true;
    if (groups_changed_) {
        BuiltGraph measure;
        build(measure);
        planned = ggml_backend_sched_reserve(sched_.get(), measure.gf);
    }
    groups_changed_ = false;
    if (planned) build(graph_);
    if (!planned || !ggml_backend_sched_alloc_graph(sched_.get(), graph_.gf)) {
        drop_graph(false);
        throw std::runtime_error("failed to allocate the compute graph");
    }
    graph_.shape = std::move(shape);
    return graph_;
}

bool Engine::truncate(uint32_t n_keep, int32_t seq) {
    const size_t s = checked_seq(seq);
    if (n_keep >= n_past_[s]) return true;
    if (!kv_->truncate(seq, (int32_t) n_keep, (int32_t) n_written_[s])) return false;
    n_past_[s] = n_keep;
    return true;
}

void Engine::clear(int32_t seq) {
    const size_t s = checked_seq(seq);
    kv_->clear(seq);
    n_past_[s] = 0;
    n_written_[s] = 0;
}

void Engine::set_embeddings(bool on) {
    if (on == embeddings_) return;
    embeddings_ = on;
    drop_graph(true);  // another topology (no vocabulary projection): plan its memory afresh
}

void Engine::reset() {
    if (compacted_) {
        // Exact prefill: the next prompt starts with every layer full again.
        drop_graph(true);
        kv_.reset();  // the compacted stores go before the new full ones are allocated
        kv_ = new_cache();
        compacted_ = false;
    }
    kv_->clear();
    std::fill(n_past_.begin(), n_past_.end(), 0);
    std::fill(n_written_.begin(), n_written_.end(), 0);
}

}  // namespace simkv
