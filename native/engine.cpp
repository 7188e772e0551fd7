#include "engine.h"

#include "errors.h"
#include "graph.h"

#include <ggml-cpu.h>

#include <algorithm>
#include <cstring>
#include <set>

namespace simkv {

ggml_type parse_cache_type(const std::string & name, const char * what) {
    if (name == "f16") return GGML_TYPE_F16;
    if (name == "bf16") return GGML_TYPE_BF16;
    if (name == "q8_0") return GGML_TYPE_Q8_0;
    if (name == "q4_0") return GGML_TYPE_Q4_0;
    throw BadInput(std::string("unknown ") + what + " '" + name + "' (expected one of: f16, bf16, q8_0, q4_0)");
}

namespace {

void validate(const HParams & hp, const EngineConfig & c) {
    if (c.n_ctx < 1) throw BadInput("n_ctx must be >= 1");
    if (c.n_batch < 1 || c.n_ubatch < 1) throw BadInput("n_batch and n_ubatch must be >= 1");
    if (c.n_threads < 1) throw BadInput("n_threads must be >= 1");
    if (c.n_window < 1) throw BadInput("n_window must be >= 1");
    ggml_type tk = parse_cache_type(c.type_k, "type_k"), tv = parse_cache_type(c.type_v, "type_v");
    ggml_type tl = parse_cache_type(c.lazy_type, "lazy_type");
    if (tk != tv) {
        throw BadInput("type_k and type_v must be equal (got " + c.type_k + " and " + c.type_v +
                       "): mixed K/V types fall off the fast flash-attention kernels");
    }
    std::vector<ggml_type> used = {tk};
    if (!c.lazy_layers.empty()) used.push_back(tl);
    for (ggml_type t : used) {
        if (hp.head_dim % ggml_blck_size(t) != 0) {
            throw BadInput(std::string("cache type ") + ggml_type_name(t) + " needs a head size divisible by " +
                           std::to_string(ggml_blck_size(t)) + "; this model's is " + std::to_string(hp.head_dim));
        }
    }
    std::set<int> seen;
    for (int il : c.lazy_layers) {
        if (il < 0 || (uint32_t) il >= hp.n_layer) {
            throw BadInput("lazy layer " + std::to_string(il) + " is out of range: the model has " +
                           std::to_string(hp.n_layer) + " layers (0.." + std::to_string(hp.n_layer - 1) + ")");
        }
        if (!seen.insert(il).second) throw BadInput("lazy layer " + std::to_string(il) + " is listed twice");
    }
}

}  // namespace

Engine::Engine(std::shared_ptr<Model> model, const EngineConfig & cfg) : model_(std::move(model)), cfg_(cfg) {
    const HParams & hp = model_->hp();
    validate(hp, cfg_);
    cfg_.n_ubatch = std::min(cfg_.n_ubatch, cfg_.n_batch);

    cpu_ = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    if (!cpu_) throw std::runtime_error("ggml CPU backend unavailable");
    ggml_backend_cpu_set_n_threads(cpu_, cfg_.n_threads);

    if (cfg_.lazy_prefill != "streaming" && cfg_.lazy_prefill != "exact") {
        throw BadInput("lazy_prefill must be 'streaming' or 'exact', got '" + cfg_.lazy_prefill + "'");
    }
    if (cfg_.lazy_mode != "static" && cfg_.lazy_mode != "dynamic") {
        throw BadInput("lazy_mode must be 'static' or 'dynamic', got '" + cfg_.lazy_mode + "'");
    }
    if (cfg_.lazy_mode == "dynamic" && !cfg_.lazy_layers.empty()) {
        throw BadInput("lazy_mode='dynamic' chooses the lazy layers itself: do not give lazy_layers");
    }
    if (cfg_.w_last < 1) throw BadInput("w_last must be >= 1");
    exact_ = cfg_.lazy_prefill == "exact" || cfg_.lazy_mode == "dynamic";
    kv_cfg_.n_ctx = cfg_.n_ctx;
    kv_cfg_.n_ubatch = cfg_.n_ubatch;
    kv_cfg_.type_full = parse_cache_type(cfg_.type_k, "type_k");
    kv_cfg_.type_lazy = parse_cache_type(cfg_.lazy_type, "lazy_type");
    kv_cfg_.n_sink = cfg_.n_sink;
    kv_cfg_.n_window = cfg_.n_window;
    kv_cfg_.lazy_layers = exact_ ? std::vector<int>{} : cfg_.lazy_layers;  // exact: all full until compaction
    // Each layer's KV store lives on its layer's device (devices.h); the scheduler runs each op where its
    // weights are, the CPU backend last, and offloads large CPU-weight batches to the GPU as llama.cpp does.
    const Placement & placement = model_->placement();
    if (placement.any_on_gpu()) {
        gpu_ = ggml_backend_dev_init(placement.gpu, nullptr);
        if (!gpu_) throw std::runtime_error(std::string("cannot start the GPU backend ") + ggml_backend_dev_name(placement.gpu));
    }
    bufts_.resize(hp.n_layer);
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        ggml_backend_dev_t dev = model_->layer_device(il);
        bufts_[il] = dev ? ggml_backend_dev_buffer_type(dev) : ggml_backend_get_default_buffer_type(cpu_);
    }
    kv_ = new_cache();
    peak_kv_bytes_ = kv_->total_bytes();
    graph_nodes_ = std::max<size_t>(2048, (size_t) hp.n_layer * 64);
    graph_meta_.resize(ggml_tensor_overhead() * graph_nodes_ + ggml_graph_overhead_custom(graph_nodes_, false));
    std::vector<ggml_backend_t> backends;
    if (gpu_) backends.push_back(gpu_);
    backends.push_back(cpu_);
    sched_ = ggml_backend_sched_new(backends.data(), nullptr, (int) backends.size(), graph_nodes_, false, gpu_ != nullptr);
}

Engine::~Engine() {
    if (graph_.ctx) ggml_free(graph_.ctx);
    if (sched_) ggml_backend_sched_free(sched_);
    kv_.reset();
    if (gpu_) ggml_backend_free(gpu_);
    if (cpu_) ggml_backend_free(cpu_);
}

std::vector<float> Engine::eval(const int32_t * tokens, uint32_t n, bool all_logits) {
    return eval_probed(tokens, n, all_logits, ProbeSpec{}, 0);
}

std::vector<float> Engine::eval_probed(const int32_t * tokens, uint32_t n, bool all_logits, const ProbeSpec & spec,
                                       uint32_t n_probe) {
    const HParams & hp = model_->hp();
    if (n == 0) throw BadInput("eval() needs at least one token");
    if ((uint64_t) n_past_ + n > cfg_.n_ctx) {
        throw BadInput("context overflow: " + std::to_string(n_past_) + " tokens in context + " + std::to_string(n) +
                       " new > n_ctx " + std::to_string(cfg_.n_ctx));
    }
    for (uint32_t i = 0; i < n; ++i) {
        if (tokens[i] < 0 || (uint32_t) tokens[i] >= hp.n_vocab) {
            throw BadInput("token id " + std::to_string(tokens[i]) + " is outside the vocabulary (0.." +
                           std::to_string(hp.n_vocab - 1) + ")");
        }
    }
    if (n_probe > n) throw BadInput("cannot probe more tokens than are evaluated");
    if (n_probe && spec.n_window < 1) throw BadInput("probe n_window must be >= 1");
    const uint32_t n_out = all_logits ? n : 1;
    std::vector<float> logits((size_t) n_out * hp.n_vocab);
    // Exact prefill: the first eval of a context is its prompt; its end triggers the compaction of the lazy
    // layers. In dynamic mode the probe (on the prompt's last w_last tokens, unless the caller probes)
    // picks them.
    const bool compact_after = exact_ && !compacted_;
    const bool dynamic = compact_after && cfg_.lazy_mode == "dynamic";
    ProbeSpec dynamic_spec;
    dynamic_spec.n_sink = cfg_.n_sink;
    dynamic_spec.n_window = cfg_.n_window;
    const ProbeSpec * use_spec = &spec;
    if (dynamic && n_probe == 0) {
        use_spec = &dynamic_spec;
        n_probe = std::min(cfg_.w_last, n);
    }
    probe_spec_ = n_probe ? use_spec : nullptr;
    if (n_probe) probe_acc_.reset(hp.n_layer);
    // Split like llama.cpp: n_batch chunks, each cut into ubatches (kernels' numerics depend on the
    // batch shape, so the same split gives the same logits).
    const uint32_t step = std::min(cfg_.n_ubatch, kv_->max_ubatch());
    for (uint32_t b0 = 0; b0 < n; b0 += cfg_.n_batch) {
        const uint32_t b1 = std::min(n, b0 + cfg_.n_batch);
        for (uint32_t i = b0; i < b1; i += step) {
            const uint32_t m = std::min(step, b1 - i);
            // Probed rows: the ubatch's share of the call's last n_probe tokens.
            const uint32_t first_probed = n - n_probe;
            const uint32_t n_sel = i + m <= first_probed ? 0 : std::min(m, i + m - first_probed);
            if (all_logits) {
                eval_ubatch(tokens + i, m, m, logits.data() + (size_t) i * hp.n_vocab, n_sel);
            } else {
                const bool last = i + m == n;
                eval_ubatch(tokens + i, m, last ? 1 : 0, last ? logits.data() : nullptr, n_sel);
            }
        }
    }
    probe_spec_ = nullptr;
    if (compact_after) {
        std::vector<int> layers = cfg_.lazy_layers;
        if (dynamic) {
            layers.clear();
            const std::vector<double> mass = probe_acc_.mass();
            for (uint32_t il = 0; il < hp.n_layer; ++il) {
                // A model's own sliding-window layers have no full history to probe and stay as they are.
                if (!hp.is_swa(il) && mass[il] > cfg_.dynamic_threshold) layers.push_back((int) il);
            }
        }
        make_lazy(layers);
        compacted_ = true;
    }
    peak_kv_bytes_ = std::max(peak_kv_bytes_, kv_->total_bytes());
    return logits;
}

std::unique_ptr<KvCache> Engine::new_cache() const {
    return std::make_unique<KvCache>(model_->hp(), kv_cfg_, bufts_);
}

void Engine::make_lazy(const std::vector<int> & layers) {
    if (layers.empty()) return;
    KvCache::Conversion conv = kv_->prepare_lazy(model_->hp(), kv_cfg_, layers, bufts_);
    size_t added = 0;
    for (const KvStore & s : conv.stores) added += s.bytes();
    peak_kv_bytes_ = std::max(peak_kv_bytes_, kv_->total_bytes() + added);
    const int64_t n = (int64_t) conv.src_cells.size();
    if (n > 0) {
        // Copy the kept cells: rows of the full store -> F32 (-> rotated, kv_rotation.h, when the lazy store
        // is quantized and the full one is not) -> the lazy store's type, at the ring's cells.
        if (graph_.ctx) ggml_free(graph_.ctx);  // the scheduler is reset below: the cached graph is stale
        graph_ = BuiltGraph{};
        ggml_init_params ip = {graph_meta_.size(), graph_meta_.data(), true};
        ggml_context * ctx = ggml_init(ip);
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, graph_nodes_, false);
        ggml_tensor * src = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
        ggml_tensor * dst = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n);
        ggml_set_input(src);
        ggml_set_input(dst);
        RotationInputs rotations;
        for (size_t i = 0; i < conv.layers.size(); ++i) {
            const KvStore & from = kv_->store(conv.layers[i]);
            const KvStore & to = conv.stores[i];
            ggml_tensor * k = rerotate(ctx, rotations, ggml_get_rows(ctx, from.k, src), from.rot.k, to.rot.k);
            ggml_tensor * v = rerotate(ctx, rotations, ggml_get_rows(ctx, from.v, src), from.rot.v, to.rot.v);
            ggml_build_forward_expand(gf, ggml_set_rows(ctx, to.k, k, dst));
            ggml_build_forward_expand(gf, ggml_set_rows(ctx, to.v, v, dst));
        }
        ggml_backend_sched_reset(sched_);
        const bool ok = ggml_backend_sched_alloc_graph(sched_, gf);
        if (ok) {
            ggml_backend_tensor_set(src, conv.src_cells.data(), 0, ggml_nbytes(src));
            ggml_backend_tensor_set(dst, conv.dst_cells.data(), 0, ggml_nbytes(dst));
            rotations.set();
        }
        const bool done = ok && ggml_backend_sched_graph_compute(sched_, gf) == GGML_STATUS_SUCCESS;
        ggml_backend_sched_reset(sched_);
        ggml_free(ctx);
        if (!done) {
            KvCache::discard(std::move(conv));
            throw std::runtime_error("failed to compact the lazy layers");
        }
    }
    kv_->commit_lazy(std::move(conv));
    groups_changed_ = true;
}

void Engine::set_masked_layers(const std::vector<int> & layers, uint32_t n_sink, uint32_t n_window) {
    if (exact_) throw BadInput("masked layers cannot be combined with exact prefill or dynamic mode");
    if (n_window < 1) throw BadInput("n_window must be >= 1");
    std::set<int> seen;
    for (int il : layers) {
        if (il < 0 || (uint32_t) il >= model_->hp().n_layer) throw BadInput("layer " + std::to_string(il) + " is out of range");
        if (!seen.insert(il).second) throw BadInput("layer " + std::to_string(il) + " is listed twice");
    }
    std::vector<int> masked;
    for (size_t il = 0; il < kv_->n_layer(); ++il) {
        const std::string kind = kv_->groups()[kv_->store((int) il).group].policy->kind();
        if (kind == "masked") masked.push_back((int) il);
        else if (seen.count((int) il) && kind != "full") throw BadInput("only full layers can be masked");
    }
    // Each change of group membership changes the graph (which mask each layer reads): rebuild it.
    if (graph_.ctx) ggml_free(graph_.ctx);
    graph_ = BuiltGraph{};
    groups_changed_ = true;
    kv_->regroup(masked, make_full_policy(cfg_.n_ctx));
    kv_->regroup(layers, make_masked_policy(cfg_.n_ctx, n_sink, n_window));
}

std::vector<int> Engine::lazy_layers() const {
    std::vector<int> out;
    for (size_t il = 0; il < kv_->n_layer(); ++il) {
        if (kv_->groups()[kv_->store((int) il).group].policy->kind() == "lazy") out.push_back((int) il);
    }
    return out;
}

void Engine::eval_ubatch(const int32_t * tokens, uint32_t n, uint32_t n_outputs, float * out, uint32_t n_probe) {
    const HParams & hp = model_->hp();
    std::vector<int32_t> pos(n);
    for (uint32_t i = 0; i < n; ++i) pos[i] = (int32_t) (n_past_ + i);
    kv_->plan_ubatch(pos.data(), n);

    // A ubatch with no output still needs a graph sink: keep one row of logits and drop it.
    const uint32_t n_rows = std::max<uint32_t>(n_outputs, 1);
    BuiltGraph & g = graph_for(n, n_rows, n_probe);
    UbatchInputs & in = g.in;
    ggml_backend_tensor_set(in.tokens, tokens, 0, sizeof(int32_t) * n);
    ggml_backend_tensor_set(in.pos, pos.data(), 0, sizeof(int32_t) * n);
    if (in.out_ids) {
        std::vector<int32_t> ids(n_rows);
        for (uint32_t i = 0; i < n_rows; ++i) ids[i] = (int32_t) (n - n_rows + i);  // the last rows
        ggml_backend_tensor_set(in.out_ids, ids.data(), 0, sizeof(int32_t) * n_rows);
    }
    const auto & groups = kv_->groups();
    for (size_t gi = 0; gi < groups.size(); ++gi) {
        if (!in.kq_mask[gi]) continue;
        ggml_backend_tensor_set(in.kq_mask[gi], groups[gi].mask.data(), 0, ggml_nbytes(in.kq_mask[gi]));
        ggml_backend_tensor_set(in.write_idx[gi], groups[gi].write_cells.data(), 0, ggml_nbytes(in.write_idx[gi]));
    }
    in.rotations.set();
    std::vector<int32_t> probe_rows, probe_pos;
    if (n_probe) {
        for (uint32_t r = n - n_probe; r < n; ++r) {
            probe_rows.push_back((int32_t) r);
            probe_pos.push_back(pos[r]);
        }
        ProbeAccumulator::set_inputs(g.probe, *kv_, *probe_spec_, probe_rows, probe_pos);
    }
    if (ggml_backend_sched_graph_compute(sched_, g.gf) != GGML_STATUS_SUCCESS) {
        throw std::runtime_error("graph compute failed");
    }
    if (n_probe) probe_acc_.collect(g.probe, hp.n_head, n_probe);
    if (out && n_outputs > 0) ggml_backend_tensor_get(g.logits, out, 0, sizeof(float) * (size_t) n_outputs * hp.n_vocab);
    n_past_ += n;
    n_written_ = std::max(n_written_, n_past_);
}

Engine::BuiltGraph & Engine::graph_for(uint32_t n_tokens, uint32_t n_rows, uint32_t n_probe) {
    std::vector<uint32_t> shape = {n_tokens, n_rows, n_probe};
    for (const KvGroup & grp : kv_->groups()) shape.push_back(grp.n_kv);
    if (graph_.ctx && graph_.shape == shape) return graph_;

    if (graph_.ctx) ggml_free(graph_.ctx);
    graph_ = BuiltGraph{};
    ggml_init_params ip = {graph_meta_.size(), graph_meta_.data(), true};
    graph_.ctx = ggml_init(ip);
    graph_.gf = ggml_new_graph_custom(graph_.ctx, graph_nodes_, false);
    GraphBuild b{graph_.ctx, graph_.gf, *model_, *kv_, n_tokens, n_rows, {}, n_probe ? &graph_.probe : nullptr,
                 n_probe};
    graph_.logits = build_graph(b);
    ggml_build_forward_expand(graph_.gf, graph_.logits);
    graph_.in = b.in;

    ggml_backend_sched_reset(sched_);
    // alloc_graph reuses the previous allocation plan whenever the sizes fit, which is only valid for the
    // same topology. After layers change groups, a group's mask or write index could share memory with a
    // node computed before its last reader: plan afresh.
    const bool planned = !groups_changed_ || ggml_backend_sched_reserve(sched_, graph_.gf);
    groups_changed_ = false;
    if (!planned || !ggml_backend_sched_alloc_graph(sched_, graph_.gf)) {
        ggml_free(graph_.ctx);
        graph_ = BuiltGraph{};
        throw std::runtime_error("failed to allocate the compute graph");
    }
    graph_.shape = std::move(shape);
    return graph_;
}

bool Engine::truncate(uint32_t n_keep) {
    if (n_keep >= n_past_) return true;
    if (!kv_->truncate((int32_t) n_keep, (int32_t) n_written_)) return false;
    n_past_ = n_keep;
    return true;
}

void Engine::reset() {
    if (compacted_) {
        // Exact prefill: the next prompt starts with every layer full again.
        if (graph_.ctx) ggml_free(graph_.ctx);
        graph_ = BuiltGraph{};
        kv_.reset();
        kv_ = new_cache();
        compacted_ = false;
        groups_changed_ = true;
    }
    kv_->clear();
    n_past_ = 0;
    n_written_ = 0;
}

}  // namespace simkv
