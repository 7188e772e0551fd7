#include "engine.h"

#include "devices.h"
#include "errors.h"
#include "graph.h"
#include "rpc_devices.h"

#include <ggml-cpu.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>
#include <thread>

namespace simkv {

Engine::Engine(std::shared_ptr<Model> model, const EngineConfig & cfg)
    : model_(std::move(model)), cfg_(validated(cfg, model_->hp())), prefill_(prefill_strategy(cfg_)), kv_cfg_(kv_config(cfg_, model_->hp().n_layer)),
      // Nodes: ~64 per layer, plus ~12 per attention span (one per sequence in a ubatch, at most) and ~14
      // more where a span reads and writes a ring's residual.
      arena_(std::max<size_t>(2048, (size_t) model_->hp().n_layer *
                                        (64 + 28 * (size_t) std::min(cfg_.n_seq_max, cfg_.n_ubatch)))) {
    const HParams & hp = model_->hp();
    cpu_.reset(ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr));
    if (!cpu_) throw std::runtime_error("ggml CPU backend unavailable");
    ggml_backend_cpu_set_n_threads(cpu_.get(), (int) cfg_.n_threads);

    n_past_.assign(cfg_.n_seq_max, 0);
    n_written_.assign(cfg_.n_seq_max, 0);
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
    check_device_types();
    check_memory(kv_cfg_);
    kv_ = new_cache();
    peak_kv_bytes_ = kv_->total_bytes();
    std::vector<ggml_backend_t> backends;
    for (const ggml_backend_ptr & b : offload_) backends.push_back(b.get());
    backends.push_back(cpu_.get());
    sched_.reset(ggml_backend_sched_new(backends.data(), nullptr, (int) backends.size(), arena_.n_nodes(), false,
                                        !offload_.empty()));
    graphs_ = std::make_unique<GraphCache>(sched_.get(), arena_);
}

Engine::~Engine() {
    if (!model_->uses_remote()) return;
    // Remote buffers are freed by messages to their server, on the remote-call thread; after a failure
    // they are left alone (rpc_devices.h).
    free_remote_or_leak(
        [&] {
            graphs_.reset();
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
    if (prompt_all_full() || cfg_.n_seq_max > 1) throw BadInput("eval_stream() needs one sequence with streaming prefill");
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

void Engine::check_device_types() const {
    // A store read in place by flash attention: a layer while it is full (every layer may be, during an exact
    // prefill or in dynamic mode). Lazy rings reach it as f16 rows (kv_gather.h) and read on any device.
    const HParams & hp = model_->hp();
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        if (KvCache::planned_kind(hp, kv_cfg_, il) != KvKind::Lazy) check_device_reads(il, KvCache::planned_types(kv_cfg_, il));
    }
}

void Engine::check_device_reads(uint32_t il, KvTypes t) const {
    const HParams & hp = model_->hp();
    ggml_backend_dev_t dev = model_->layer_device(il);
    if (!dev || (t.k == GGML_TYPE_F16 && t.v == GGML_TYPE_F16)) return;
    if (!flash_attention_reads(dev, hp.head_dim, hp.n_head, hp.n_head_kv, t.k, t.v)) {
        throw BadInput("layer " + std::to_string(il) + " is on " + device_name(dev) + ", whose flash attention does not read K " +
                       ggml_type_name(t.k) + " with V " + ggml_type_name(t.v) + " (ggml-cuda's default build reads f16, bf16 and "
                       "the symmetric q8_0 and q4_0 pairs): choose another pair for it, or keep the layer on the CPU");
    }
}

void Engine::check_memory(const KvConfig & kv_cfg) const {
    // Each device's stores together, against what that device has free (devices.h).
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
        check_fits(dev, bytes, "the KV cache", "lower n_ctx (" + std::to_string(cfg_.n_ctx) +
                                                   "), n_seq_max, n_window or the prompt, or use a smaller cache type");
    }
}

size_t Engine::checked_seq(int32_t seq) const {
    if (seq < 0 || seq >= cfg_.n_seq_max) {
        throw BadInput("sequence " + std::to_string(seq) + " is out of range (0.." + std::to_string(cfg_.n_seq_max - 1) +
                       ": n_seq_max " + std::to_string(cfg_.n_seq_max) + ")");
    }
    return (size_t) seq;
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
    int64_t need = 0;  // pool cells the whole batch takes (a sequence lazy in the pool takes few)
    for (const SeqTokens & b : batch) need += kv_->cells_needed(b.seq, n_past_[b.seq], b.n);
    if (need > (int64_t) kv_->free_cells()) {
        throw BadInput("the KV cache is full: " + std::to_string(n_total) + " new tokens need " + std::to_string(need) +
                       " cells, " + std::to_string(kv_->free_cells()) +
                       " are free (clear or truncate a sequence, or raise n_ctx)");
    }
    if (!probe) n_probe = 0;
    if (n_probe > n_total) throw BadInput("cannot probe more tokens than are evaluated");
    if (n_probe && batch.size() > 1) throw BadInput("the probe runs on one sequence at a time");
    if (n_probe && probe->n_window < 1) throw BadInput("probe n_window must be >= 1");
    if (n_probe && staged()) throw BadInput("the probe needs n_seq_max=1 with exact prefill");
}

std::vector<std::vector<float>> Engine::evaluate(KvCache & kv, const std::vector<SeqTokens> & batch,
                                                 const ProbeSpec * probe, uint32_t n_probe, const BetweenUbatches & between) {
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
    if (n_probe) probe_acc_.reset(hp.n_layer);
    // Split like llama.cpp: n_batch chunks, each cut into ubatches (kernels' numerics depend on the
    // batch shape, so the same split gives the same logits).
    const uint32_t n_batch = (uint32_t) cfg_.n_batch;
    const uint32_t step = std::min((uint32_t) cfg_.n_ubatch, kv.max_ubatch());
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
            eval_ubatch(kv, tok.data() + i, pos.data() + i, seq.data() + i, m, rows, out, n_sel, probe, i);
        }
    }
    peak_kv_bytes_ = std::max(peak_kv_bytes_, kv.total_bytes());
    return logits;
}

std::unique_ptr<KvCache> Engine::new_cache() const {
    return std::make_unique<KvCache>(model_->hp(), kv_cfg_, bufts_);
}

void Engine::set_masked_layers(const std::vector<int> & layers, uint32_t n_sink, uint32_t n_window) {
    if (prompt_all_full()) throw BadInput("masked layers cannot be combined with exact prefill or dynamic mode");
    if (n_window < 1) throw BadInput("n_window must be >= 1");
    std::set<int> seen;
    for (int il : layers) {
        if (il < 0 || (uint32_t) il >= model_->hp().n_layer) throw BadInput("layer " + std::to_string(il) + " is out of range");
        if (!seen.insert(il).second) throw BadInput("layer " + std::to_string(il) + " is listed twice");
        if (kv_->kind_of(il) != KvKind::Full && kv_->kind_of(il) != KvKind::Masked) {
            throw BadInput("only full layers can be masked");
        }
        if (kv_->groups()[kv_->store(il).group].policy->residual()) {
            throw BadInput("layer " + std::to_string(il) + " keeps an f16 residual (full_residual): it cannot be masked");
        }
    }
    // Layers that change groups read another mask: the cache's layout_version() tells graph_for to rebuild.
    kv_->regroup(kv_->layers_of_kind(KvKind::Masked), make_full_policy(kv_cfg_.n_ctx));
    kv_->regroup(layers, make_masked_policy(kv_cfg_.n_ctx, n_sink, n_window));
}

void Engine::set_what_if_types(const std::vector<std::pair<int, KvTypes>> & layers) {
    if (prompt_all_full()) throw BadInput("what-if types cannot be combined with exact prefill or dynamic mode");
    std::set<int> seen;
    for (const auto & [il, types] : layers) {
        if (il < 0 || (uint32_t) il >= model_->hp().n_layer) throw BadInput("layer " + std::to_string(il) + " is out of range");
        if (!seen.insert(il).second) throw BadInput("layer " + std::to_string(il) + " is listed twice");
        if (kv_->kind_of(il) != KvKind::Full && kv_->kind_of(il) != KvKind::Masked) {
            throw BadInput("only full layers can take what-if types");
        }
        check_device_reads((uint32_t) il, types);
        check_cache_type(model_->hp(), types.k, "layer " + std::to_string(il) + "'s K type");
        check_cache_type(model_->hp(), types.v, "layer " + std::to_string(il) + "'s V type");
    }
    // A store kept aside holds only the positions written before it was: the context must be as it was then.
    const bool typed = !kv_->retyped_layers().empty();
    bool kept_more = false;
    for (size_t s = 0; typed && s < n_past_.size(); ++s) kept_more = kept_more || n_past_[s] > what_if_from_[s];
    if (kept_more) {
        throw BadInput("tokens were kept in the context while what-if types were set: the layers' own stores do not "
                       "hold them (evaluate only what-ifs then, or reset())");
    }
    if (!typed) what_if_from_ = n_past_;
    // Layers that keep the types they have keep their converted store (converting every layer for each
    // what-if would cost more than the what-if); the others get their own store back first.
    std::map<int, KvTypes> want(layers.begin(), layers.end());
    std::vector<int> back;
    for (int il : kv_->retyped_layers()) {
        const KvStore & s = kv_->store(il);
        auto it = want.find(il);
        if (it == want.end() || it->second.k != s.k->type || it->second.v != s.v->type) back.push_back(il);
    }
    kv_->restore_types(back);
    const std::vector<int> kept = kv_->retyped_layers();
    for (const auto & [il, types] : want) {
        if (std::find(kept.begin(), kept.end(), il) != kept.end()) continue;
        try {
            kv_->retype(model_->hp(), il, types, kv_cfg_.n_full_residual, bufts_[il], sched_.get(), arena_);
        } catch (...) {
            kv_->restore_types();
            throw;
        }
    }
}

void Engine::eval_ubatch(KvCache & kv, const int32_t * tokens, const int32_t * pos, const int32_t * seq, uint32_t n,
                         const std::vector<uint32_t> & out_rows, const std::vector<float *> & out, uint32_t n_probe,
                         const ProbeSpec * probe, uint32_t call_row) {
    const HParams & hp = model_->hp();
    UbatchPlan plan = kv.plan_ubatch(pos, seq, n, n_probe > 0);

    // A ubatch with no output still needs a graph sink: keep the last row's logits and drop them.
    const std::vector<uint32_t> rows = out_rows.empty() ? std::vector<uint32_t>{n - 1} : out_rows;
    const uint32_t n_rows = (uint32_t) rows.size();
    BuiltGraph & g = graph_for(kv, plan, n, n_rows, n_probe);
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
    plan.set_inputs(in);
    in.rotations.set();
    if (n_probe) {
        std::vector<int32_t> probe_rows, probe_pos, probe_seq;
        for (uint32_t r = n - n_probe; r < n; ++r) {
            probe_rows.push_back((int32_t) r);
            probe_pos.push_back(pos[r]);
            probe_seq.push_back(seq[r]);
        }
        ProbeAccumulator::set_inputs(g.probe, plan, *probe, probe_rows, probe_pos, probe_seq);
    }
    if (ggml_backend_sched_graph_compute(graphs_->scheduler(), g.gf) != GGML_STATUS_SUCCESS) {
        throw std::runtime_error("graph compute failed");
    }
    kv.apply(std::move(plan));  // the ubatch is written: its cells are the cache's now
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

BuiltGraph & Engine::graph_for(const KvCache & kv, const UbatchPlan & plan, uint32_t n_tokens, uint32_t n_rows,
                               uint32_t n_probe) {
    const uint32_t first_layer = stream_ ? stream_->first_layer : 0;
    const bool capture = stream_ && stream_->capture;
    const bool scored = stream_ && stream_->targets;
    const int32_t tap_layer = stream_ ? stream_->tap_layer : -1;
    std::vector<uint32_t> shape = {n_tokens, n_rows, n_probe, first_layer, scored};
    for (const GroupPlan & grp : plan.groups) {
        shape.push_back((uint32_t) grp.spans.size());
        for (const AttnSpan & sp : grp.spans) {  // the views' sizes and offsets are part of the graph
            shape.insert(shape.end(), {sp.t0, sp.n_tokens, sp.n_kv, sp.kv_lo, sp.gather_offset >= 0, sp.residual, sp.n_res,
                                       sp.n_res_write});
        }
    }
    const GraphLayout layout{kv.id(), kv.layout_version(), capture, tap_layer, embeddings_};
    return graphs_->get(shape, layout, [&](BuiltGraph & g) {
        GraphBuild b{g.ctx.get(), g.gf, *model_, kv, plan, n_tokens, n_rows, {}, n_probe ? &g.probe : nullptr, n_probe,
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
    });
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
    embeddings_ = on;  // another topology (no vocabulary projection): GraphLayout plans its memory afresh
}

void Engine::reset() {
    if (compacted_) {
        // Exact prefill: the next prompt starts with every layer full again.
        kv_.reset();  // the compacted stores go before the new full ones are allocated
        kv_ = new_cache();
        compacted_ = false;
    }
    kv_->restore_types();  // what-if types end with the context they were set over
    kv_->clear();
    std::fill(n_past_.begin(), n_past_.end(), 0);
    std::fill(n_written_.begin(), n_written_.end(), 0);
}

}  // namespace simkv
