#include "model.h"

#include "errors.h"
#include "gguf_file.h"
#include "rpc_devices.h"

#include <gguf.h>
#include <ggml-cpu.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <sstream>

namespace simkv {

namespace {

std::string shape_str(const std::vector<int64_t> & ne) {
    std::ostringstream s;
    s << "[";
    for (size_t i = 0; i < ne.size(); ++i) s << (i ? ", " : "") << ne[i];
    s << "]";
    return s.str();
}

}  // namespace

Model::Model(const std::string & path, const LoadOptions & opts) : path_(path) {
    GgufFile f(path);
    load_hparams(f);
    metadata_ = f.metadata();
    placement_ = plan_placement(hp_.n_layer, opts.n_gpu_layers, opts.main_gpu, opts.remote, opts.tensor_split);
    bind_tensors(f);
    load_weights(f, opts.use_mmap);
}

Model::~Model() {
    if (!uses_remote()) return;
    free_remote_or_leak([&] { for (DeviceWeights & d : on_device_) d.buffer.reset(); },
                        [&] { for (DeviceWeights & d : on_device_) (void) d.buffer.release(); });
}

bool Model::uses_remote() const {
    return std::any_of(placement_.devices.begin(), placement_.devices.end(), is_remote);
}

FileMapping::FileMapping(const std::string & path, size_t size) : size_(size) {
    int fd = open(path.c_str(), O_RDONLY);
    if (fd < 0) throw BadInput("cannot open model file: " + path);
    void * p = mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) throw std::runtime_error("mmap failed for " + path);
    data_ = p;
}

FileMapping::~FileMapping() { munmap(data_, size_); }

void Model::load_hparams(const GgufFile & f) {
    if (!f.has("general.architecture")) throw BadInput("GGUF has no general.architecture: " + f.path());
    const std::string arch = f.get_str("general.architecture");
    hp_.arch_name = arch;
    if (arch == "llama") {
        hp_.arch = Arch::LLAMA;
        hp_.rope_type = 0;
    } else if (arch == "qwen2") {
        hp_.arch = Arch::QWEN2;
        hp_.rope_type = GGML_ROPE_TYPE_NEOX;
    } else if (arch == "qwen3") {
        hp_.arch = Arch::QWEN3;
        hp_.rope_type = GGML_ROPE_TYPE_NEOX;
    } else if (arch == "gemma3") {
        hp_.arch = Arch::GEMMA3;
        hp_.rope_type = GGML_ROPE_TYPE_NEOX;
    } else {
        throw BadInput("unsupported model architecture '" + arch + "' (supported: llama, qwen2, qwen3, gemma3)");
    }
    const std::string p = arch + ".";
    hp_.n_layer = f.get_u32(p + "block_count");
    hp_.n_embd = f.get_u32(p + "embedding_length");
    hp_.n_ff = f.get_u32(p + "feed_forward_length");
    hp_.n_head = f.get_u32(p + "attention.head_count");
    hp_.n_head_kv = f.get_u32(p + "attention.head_count_kv", hp_.n_head);
    hp_.n_ctx_train = f.get_u32(p + "context_length", 4096);
    if (hp_.n_layer == 0 || hp_.n_embd == 0 || hp_.n_head == 0 || hp_.n_head_kv == 0 || hp_.n_ff == 0) {
        throw BadInput("GGUF hyperparameters must be positive (block_count, embedding_length, head counts, feed_forward_length)");
    }
    if (hp_.n_head % hp_.n_head_kv != 0) throw BadInput("head_count must be a multiple of head_count_kv");
    // Far beyond any real model, and what keeps every size computed from these in range.
    if (hp_.n_layer > 4096 || hp_.n_embd > (1u << 20) || hp_.n_ff > (1u << 22) || hp_.n_head > 4096) {
        throw BadInput("GGUF hyperparameters out of range (block_count " + std::to_string(hp_.n_layer) + ", embedding_length " +
                       std::to_string(hp_.n_embd) + ", feed_forward_length " + std::to_string(hp_.n_ff) + ", head_count " +
                       std::to_string(hp_.n_head) + ")");
    }
    hp_.head_dim = f.get_u32(p + "attention.key_length", hp_.n_embd / hp_.n_head);
    if (f.get_u32(p + "attention.value_length", hp_.head_dim) != hp_.head_dim) {
        throw BadInput("models whose V head size differs from K head size are not supported");
    }
    hp_.n_rot = f.get_u32(p + "rope.dimension_count", hp_.head_dim);
    hp_.rms_eps = f.get_f32(p + "attention.layer_norm_rms_epsilon", 1e-5f);
    hp_.rope_freq_base = f.get_f32(p + "rope.freq_base", 10000.0f);
    // ggml asserts on a norm epsilon that is not positive, and a rotation over no dimensions never ends:
    // refuse such files here, with the key that is wrong.
    if (!(hp_.rms_eps > 0.0f) || !std::isfinite(hp_.rms_eps)) {
        throw BadInput(p + "attention.layer_norm_rms_epsilon must be a positive number, got " + std::to_string(hp_.rms_eps));
    }
    if (!(hp_.rope_freq_base > 0.0f) || !std::isfinite(hp_.rope_freq_base)) {
        throw BadInput(p + "rope.freq_base must be a positive number, got " + std::to_string(hp_.rope_freq_base));
    }
    if (hp_.n_rot == 0) throw BadInput(p + "rope.dimension_count must be > 0");
    if (f.has(p + "rope.scaling.type")) {
        const std::string st = f.get_str(p + "rope.scaling.type");
        if (st == "linear") {
            float factor = f.get_f32(p + "rope.scaling.factor", 1.0f);
            hp_.rope_freq_scale = factor > 0 ? 1.0f / factor : 1.0f;
        } else if (st != "none") {
            throw BadInput("unsupported RoPE scaling type '" + st + "' (supported: none, linear)");
        }
    }
    if (hp_.arch == Arch::GEMMA3) {
        // Five sliding-window layers, then one global one, unless the file says otherwise (llama.cpp's rule).
        hp_.n_swa = f.get_u32(p + "attention.sliding_window", 0);
        if (hp_.n_swa > 0) {
            const uint32_t pattern = f.get_u32(p + "attention.sliding_window_pattern", 6);
            hp_.swa_layers.resize(hp_.n_layer);
            for (uint32_t il = 0; il < hp_.n_layer; ++il) {
                hp_.swa_layers[il] = pattern == 0 || il % pattern < pattern - 1;
            }
            hp_.rope_freq_base_swa = f.get_f32(p + "rope.freq_base_swa", 10000.0f);
            if (!(hp_.rope_freq_base_swa > 0.0f) || !std::isfinite(hp_.rope_freq_base_swa)) {
                throw BadInput(p + "rope.freq_base_swa must be a positive number");
            }
        }
    }
    if (f.has("tokenizer.ggml.tokens")) {
        hp_.n_vocab = (uint32_t) gguf_get_arr_n(f.gguf(), gguf_find_key(f.gguf(), "tokenizer.ggml.tokens"));
    }
}

void Model::bind_tensors(const GgufFile & f) {
    ggml_context * meta = f.meta();
    std::vector<std::string> problems;
    auto get = [&](const std::string & name, std::vector<int64_t> ne, bool required) -> ggml_tensor * {
        ggml_tensor * t = ggml_get_tensor(meta, name.c_str());
        if (!t) {
            if (required) problems.push_back("missing tensor " + name + " " + shape_str(ne));
            return nullptr;
        }
        std::vector<int64_t> have;
        for (int i = 0; i < ggml_n_dims(t); ++i) have.push_back(t->ne[i]);
        while (have.size() < ne.size()) have.push_back(1);
        if (have != ne) problems.push_back("tensor " + name + " has shape " + shape_str(have) + ", expected " + shape_str(ne));
        return t;
    };
    const auto & h = hp_;
    ggml_tensor * te = ggml_get_tensor(meta, "token_embd.weight");
    if (te && h.n_vocab == 0) hp_.n_vocab = (uint32_t) te->ne[1];
    const int64_t nv = hp_.n_vocab, E = h.n_embd, Dq = (int64_t) h.head_dim * h.n_head, Dkv = h.n_embd_k_gqa();
    tok_embd = get("token_embd.weight", {E, nv}, true);
    output_norm = get("output_norm.weight", {E}, true);
    output = get("output.weight", {E, nv}, false);
    if (!output) output = tok_embd;  // tied embeddings
    rope_freqs = get("rope_freqs.weight", {(int64_t) h.n_rot / 2}, false);
    layers.resize(h.n_layer);
    for (uint32_t il = 0; il < h.n_layer; ++il) {
        const std::string b = "blk." + std::to_string(il) + ".";
        LayerWeights & L = layers[il];
        L.attn_norm = get(b + "attn_norm.weight", {E}, true);
        L.wq = get(b + "attn_q.weight", {E, Dq}, true);
        L.wk = get(b + "attn_k.weight", {E, Dkv}, true);
        L.wv = get(b + "attn_v.weight", {E, Dkv}, true);
        L.wo = get(b + "attn_output.weight", {Dq, E}, true);
        const bool qwen2 = h.arch == Arch::QWEN2;
        L.bq = get(b + "attn_q.bias", {Dq}, qwen2);
        L.bk = get(b + "attn_k.bias", {Dkv}, qwen2);
        L.bv = get(b + "attn_v.bias", {Dkv}, qwen2);
        if (h.arch == Arch::QWEN3 || h.arch == Arch::GEMMA3) {
            L.q_norm = get(b + "attn_q_norm.weight", {(int64_t) h.head_dim}, true);
            L.k_norm = get(b + "attn_k_norm.weight", {(int64_t) h.head_dim}, true);
        }
        if (h.arch == Arch::GEMMA3) {
            L.attn_post_norm = get(b + "post_attention_norm.weight", {E}, true);
            L.ffn_post_norm = get(b + "post_ffw_norm.weight", {E}, true);
        }
        L.ffn_norm = get(b + "ffn_norm.weight", {E}, true);
        L.ffn_gate = get(b + "ffn_gate.weight", {E, (int64_t) h.n_ff}, true);
        L.ffn_up = get(b + "ffn_up.weight", {E, (int64_t) h.n_ff}, true);
        L.ffn_down = get(b + "ffn_down.weight", {(int64_t) h.n_ff, E}, true);
    }
    // As llama.cpp's "wrong number of tensors" check: a tensor the architecture does not use means the file
    // and its metadata disagree (e.g. a block_count smaller than the file's blocks), and would compute wrong.
    {
        size_t n_used = 0;
        auto count = [&](ggml_tensor * t) { n_used += t != nullptr; };
        count(tok_embd); count(output_norm); count(output != tok_embd ? output : nullptr); count(rope_freqs);
        for (const LayerWeights & L : layers) {
            for (ggml_tensor * t : {L.attn_norm, L.wq, L.wk, L.wv, L.wo, L.bq, L.bk, L.bv, L.q_norm, L.k_norm,
                                    L.attn_post_norm, L.ffn_post_norm, L.ffn_norm, L.ffn_gate, L.ffn_up, L.ffn_down}) {
                count(t);
            }
        }
        const int64_t n_file = gguf_get_n_tensors(f.gguf());
        if (problems.empty() && (int64_t) n_used != n_file) {
            problems.push_back("the file has " + std::to_string(n_file) + " tensors, the architecture uses " +
                               std::to_string(n_used) + " (does block_count match the file's blocks?)");
        }
    }
    if (!problems.empty()) {
        std::string msg = "model '" + h.arch_name + "' in " + f.path() + " does not match the expected layout:";
        size_t shown = 0;
        for (const auto & p : problems) {
            if (++shown > 8) { msg += "\n  ... and " + std::to_string(problems.size() - 8) + " more"; break; }
            msg += "\n  " + p;
        }
        throw BadInput(msg);
    }
    if (h.n_rot > h.head_dim || h.n_rot % 2) throw BadInput("rope.dimension_count must be even and <= head size");
}

void Model::load_weights(const GgufFile & f, bool use_mmap) {
    mapping_ = std::make_unique<FileMapping>(f.path(), f.file_size());
    const uint32_t n_layer = hp_.n_layer;
    // The device a weight goes to (null = the CPU).
    auto device_of = [&](const std::string & name) -> ggml_backend_dev_t {
        if (name.rfind("blk.", 0) == 0) {
            const long il = std::strtol(name.c_str() + 4, nullptr, 10);
            return il >= 0 && il < (long) n_layer ? placement_.layer_device[il] : nullptr;
        }
        if (name == "output_norm.weight" || name == "output.weight") return placement_.output_device;
        return nullptr;  // token_embd stays on the CPU (get_rows); rope_freqs gets one copy per device below
    };
    // Descriptors we own (the GgufFile's context dies with it), in one context per destination buffer.
    const int64_t n = gguf_get_n_tensors(f.gguf());
    auto new_ctx = [](size_t n_tensors) {
        ggml_init_params ip = {ggml_tensor_overhead() * (n_tensors + 2), nullptr, true};
        return ggml_context_ptr(ggml_init(ip));
    };
    ctx_ = new_ctx(n);
    ctx_copied_ = new_ctx(n);
    for (ggml_backend_dev_t dev : placement_.devices) on_device_.push_back({dev, new_ctx(n), nullptr});
    auto ctx_of = [&](ggml_backend_dev_t dev) {
        for (DeviceWeights & d : on_device_) if (d.dev == dev) return d.ctx.get();
        throw std::logic_error("no weight context for a device");
    };
    struct Placed { ggml_tensor * dst; const char * data; };
    std::vector<Placed> mapped, copied;
    std::map<ggml_tensor *, ggml_tensor *> remap;
    std::map<ggml_tensor *, const char *> data_of;
    const char * base = (const char *) mapping_->data() + f.data_offset();
    for (int64_t i = 0; i < n; ++i) {
        const char * name = gguf_get_tensor_name(f.gguf(), i);
        ggml_tensor * src = ggml_get_tensor(f.meta(), name);
        const char * data = base + gguf_get_tensor_offset(f.gguf(), i);
        ggml_backend_dev_t dev = device_of(name);
        ggml_context * home = dev ? ctx_of(dev) : (use_mmap ? ctx_ : ctx_copied_).get();
        ggml_tensor * dst = ggml_dup_tensor(home, src);
        ggml_set_name(dst, name);
        (home == ctx_.get() ? mapped : copied).push_back({dst, data});
        remap[src] = dst;
        data_of[src] = data;
        weight_bytes_ += ggml_nbytes(dst);
    }
    // Second copies on offload devices: a tied output matrix (the CPU keeps the embedding for get_rows),
    // and the RoPE frequency factors for each device that holds a layer.
    ggml_tensor * output_dev = nullptr;
    std::map<ggml_backend_dev_t, ggml_tensor *> rope_freqs_on;
    if (placement_.output_device && output == tok_embd) {
        output_dev = ggml_dup_tensor(ctx_of(placement_.output_device), tok_embd);
        ggml_set_name(output_dev, "output.weight (tied)");
        copied.push_back({output_dev, data_of.at(tok_embd)});
    }
    if (rope_freqs) {
        for (ggml_backend_dev_t dev : placement_.layer_device) {
            if (!dev || rope_freqs_on.count(dev)) continue;
            ggml_tensor * t = ggml_dup_tensor(ctx_of(dev), rope_freqs);
            ggml_set_name(t, "rope_freqs.weight (copy)");
            copied.push_back({t, data_of.at(rope_freqs)});
            rope_freqs_on[dev] = t;
        }
    }

    auto alloc = [&](ggml_context * ctx, ggml_backend_buffer_type_t buft, const char * where, bool offloaded) {
        if (!ggml_get_first_tensor(ctx)) return ggml_backend_buffer_ptr();
        ggml_backend_buffer_ptr b(ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft));
        if (!b) {
            throw std::runtime_error(std::string("not enough memory for the model's weights on ") + where +
                                     (offloaded ? ": offload fewer layers (n_gpu_layers)" : ""));
        }
        ggml_backend_buffer_set_usage(b.get(), GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        return b;
    };
    if (!mapped.empty()) {
        // The CPU buffer wraps the mapping; ggml never writes weights.
        buffer_.reset(ggml_backend_cpu_buffer_from_ptr(mapping_->data(), mapping_->size()));
        ggml_backend_buffer_set_usage(buffer_.get(), GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        for (const Placed & p : mapped) ggml_backend_tensor_alloc(buffer_.get(), p.dst, (void *) p.data);
    }
    buffer_copied_ = alloc(ctx_copied_.get(), ggml_backend_cpu_buffer_type(), "the CPU", false);
    for (DeviceWeights & d : on_device_) {
        d.buffer = alloc(d.ctx.get(), ggml_backend_dev_buffer_type(d.dev), ggml_backend_dev_name(d.dev), true);
    }
    for (const Placed & p : copied) ggml_backend_tensor_set(p.dst, p.data, 0, ggml_nbytes(p.dst));
    if (mapped.empty()) mapping_.reset();  // every weight was copied: the mapping is no longer read

    auto fix = [&](ggml_tensor *& t) { if (t) t = remap.at(t); };
    ggml_tensor * rope_freqs_src = rope_freqs;
    fix(tok_embd); fix(output_norm); fix(output); fix(rope_freqs);
    if (output_dev) output = output_dev;
    for (uint32_t il = 0; il < n_layer; ++il) {
        LayerWeights & L = layers[il];
        for (ggml_tensor ** t : {&L.attn_norm, &L.wq, &L.wk, &L.wv, &L.wo, &L.bq, &L.bk, &L.bv, &L.q_norm, &L.k_norm,
                                 &L.attn_post_norm, &L.ffn_post_norm, &L.ffn_norm, &L.ffn_gate, &L.ffn_up, &L.ffn_down}) {
            fix(*t);
        }
        ggml_backend_dev_t dev = placement_.layer_device[il];
        L.rope_freqs = rope_freqs_src ? (dev ? rope_freqs_on.at(dev) : rope_freqs) : nullptr;
    }
}

}  // namespace simkv
