// Python bindings (_native): Model, Engine, Vocab, Sampler. Thin: validation lives in the C++ classes
// (BadInput -> ValueError) and the Python layer; every value returned is asked of the engine, the cache or
// their policies, and every engine call goes through engine_call (GIL, claim, device thread).
#include "bindings_common.h"
#include "dequantize.h"
#include "engine.h"
#include "errors.h"
#include "graph.h"
#include "kv_policy.h"
#include "logging.h"
#include "model.h"
#include "rpc_devices.h"
#include "sampler.h"
#include "vocab.h"

#include <ggml.h>
#include <llama.h>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <type_traits>

namespace nb = nanobind;
using namespace nb::literals;
using namespace simkv;
using namespace simkv::py;

// The interpreter's main thread, read once when the module is imported.
unsigned long simkv::py::g_main_thread = 0;

namespace {

// Metadata strings as Python str; bytes that are not UTF-8 (a corrupted file) become U+FFFD.
nb::dict metadata_dict(const std::map<std::string, std::string> & md) {
    nb::dict d;
    for (const auto & [k, v] : md) {
        PyObject * key = PyUnicode_DecodeUTF8(k.data(), (Py_ssize_t) k.size(), "replace");
        PyObject * val = PyUnicode_DecodeUTF8(v.data(), (Py_ssize_t) v.size(), "replace");
        if (!key || !val) {
            Py_XDECREF(key);
            Py_XDECREF(val);
            throw nb::python_error();
        }
        d[nb::steal(key)] = nb::steal(val);
    }
    return d;
}

nb::dict hparams_dict(const HParams & h) {
    nb::dict d;
    d["arch"] = h.arch_name;
    d["n_layer"] = h.n_layer;
    d["n_embd"] = h.n_embd;
    d["n_head"] = h.n_head;
    d["n_head_kv"] = h.n_head_kv;
    d["head_dim"] = h.head_dim;
    d["n_ff"] = h.n_ff;
    d["n_vocab"] = h.n_vocab;
    d["n_ctx_train"] = h.n_ctx_train;
    d["rope_freq_base"] = h.rope_freq_base;
    d["n_swa"] = h.n_swa;  // sliding window of the model's SWA layers (0 = none)
    nb::list swa;
    for (uint32_t il = 0; il < h.n_layer; ++il) {
        if (h.is_swa(il)) swa.append(il);
    }
    d["swa_layers"] = swa;
    return d;
}

nb::list kv_stats(const Engine & e) {
    nb::list layers;
    const KvCache & kv = e.kv();
    for (size_t il = 0; il < kv.n_layer(); ++il) {
        const KvStore & s = kv.store((int) il);
        nb::dict d;
        d["layer"] = il;
        d["kind"] = kv_kind_name(kv.kind_of((int) il));
        d["type_k"] = std::string(ggml_type_name(s.k->type));
        d["type_v"] = std::string(ggml_type_name(s.v->type));
        d["capacity"] = s.capacity();
        d["residual"] = kv.groups()[s.group].policy->residual();  // f16 positions read beside a quantized ring
        d["bytes"] = s.bytes();
        d["device"] = s.device;
        layers.append(d);
    }
    return layers;
}

}  // namespace

NB_MODULE(_native, m) {
    g_main_thread = nb::cast<unsigned long>(nb::module_::import_("threading").attr("main_thread")().attr("ident"));
    llama_backend_init();
    set_native_logging(false);
    define_lab(m);
    m.def("set_logging", &set_native_logging, "verbose"_a);

    nb::class_<Model>(m, "Model")
        .def_prop_ro("hparams", [](const Model & md) { return hparams_dict(md.hp()); })
        .def_prop_ro("metadata", [](const Model & md) { return metadata_dict(md.metadata()); })
        .def_prop_ro("weight_bytes", &Model::weight_bytes)
        .def_prop_ro("layer_devices", [](const Model & md) {
            // The device of each repeating layer, then of the output layer ("CPU", "CUDA0", "RPC0[host:port]")
            std::vector<std::string> out;
            const Placement & p = md.placement();
            for (ggml_backend_dev_t d : p.layer_device) out.push_back(device_name(d));
            out.push_back(device_name(p.output_device));
            return out;
        })
        .def_prop_ro("offload_devices", [](const Model & md) {
            // A remote device's label asks its server for its memory: on the remote-call thread, like every
            // call that can reach a server (a dead one is then an error, not a wait that never ends).
            std::vector<std::string> out;
            nb::gil_scoped_release release;
            on_device_thread(md, [&] {
                for (ggml_backend_dev_t d : md.placement().devices) out.push_back(device_label(d));
            });
            return out;
        });
    m.def("load_model",
          [](const std::string & path, int n_gpu_layers, int main_gpu, bool use_mmap, const std::string & rpc_servers,
             const std::vector<float> & tensor_split) {
              LoadOptions o;
              o.n_gpu_layers = n_gpu_layers;
              o.main_gpu = main_gpu;
              o.use_mmap = use_mmap;
              o.tensor_split = tensor_split;
              if (rpc_servers.empty()) return std::make_shared<Model>(path, o);
              o.remote = connect_rpc_servers(rpc_servers);
              std::shared_ptr<Model> model;
              remote_call([&] { model = std::make_shared<Model>(path, o); });
              return model;
          },
          "path"_a, "n_gpu_layers"_a = 0, "main_gpu"_a = 0, "use_mmap"_a = true, "rpc_servers"_a = "",
          "tensor_split"_a = std::vector<float>(), nb::call_guard<nb::gil_scoped_release>());
    m.def("gpu_devices", [] {
        std::vector<std::string> out;
        for (ggml_backend_dev_t d : gpu_devices()) out.push_back(device_label(d));
        return out;
    }, "GPU devices of the ggml build llama-cpp-python installed (empty: CPU only)");
    m.def("rpc_available", &rpc_available, "This ggml build has the RPC backend (llama-cpp-python built with -DGGML_RPC=on)");
    m.def("rpc_install_hint", [] { return std::string(k_rpc_install_hint); });
    m.def("serve_rpc", &serve_rpc, "endpoint"_a, "n_threads"_a, "cache_dir"_a = "",
          nb::call_guard<nb::gil_scoped_release>(), "Serve this machine's devices over ggml RPC until killed");
    nb::exception<RemoteFailure>(m, "RemoteFailure", PyExc_ConnectionError);

    // Every engine setting with its one default (engine.h). Cache types and modes are strings here and
    // parsed once, on assignment.
    nb::class_<EngineConfig>(m, "EngineConfig")
        .def(nb::init<>())
        .def_rw("n_ctx", &EngineConfig::n_ctx)
        .def_rw("n_batch", &EngineConfig::n_batch)
        .def_rw("n_ubatch", &EngineConfig::n_ubatch)
        .def_rw("n_threads", &EngineConfig::n_threads)
        .def_rw("lazy_layers", &EngineConfig::lazy_layers)
        .def_rw("n_sink", &EngineConfig::n_sink)
        .def_rw("n_window", &EngineConfig::n_window)
        .def_rw("lazy_residual", &EngineConfig::lazy_residual)
        .def_rw("full_residual", &EngineConfig::full_residual)
        .def_rw("dynamic_threshold", &EngineConfig::dynamic_threshold)
        .def_rw("w_last", &EngineConfig::w_last)
        .def_rw("n_seq_max", &EngineConfig::n_seq_max)
        .def_prop_rw("type_k", [](const EngineConfig & c) { return std::string(ggml_type_name(c.type_k)); },
                     [](EngineConfig & c, const std::string & v) { c.type_k = parse_cache_type(v, "type_k"); })
        .def_prop_rw("type_v", [](const EngineConfig & c) { return std::string(ggml_type_name(c.type_v)); },
                     [](EngineConfig & c, const std::string & v) { c.type_v = parse_cache_type(v, "type_v"); })
        .def_prop_rw("lazy_type", [](const EngineConfig & c) { return std::string(ggml_type_name(c.lazy_type)); },
                     [](EngineConfig & c, const std::string & v) { c.lazy_type = parse_cache_type(v, "lazy_type"); })
        // {layer: (K type, V type)}: the layers whose store takes its own types (py_simkv/kv_types.py)
        .def_prop_rw("layer_types",
                     [](const EngineConfig & c) {
                         nb::dict d;
                         for (const auto & [il, t] : c.layer_types) {
                             d[nb::int_(il)] = nb::make_tuple(std::string(ggml_type_name(t.k)), std::string(ggml_type_name(t.v)));
                         }
                         return d;
                     },
                     [](EngineConfig & c, const std::map<int64_t, std::pair<std::string, std::string>> & m) {
                         std::map<int64_t, KvTypes> out;
                         for (const auto & [il, kv] : m) {
                             const std::string what = "layer " + std::to_string(il) + "'s ";
                             out[il] = KvTypes{parse_cache_type(kv.first, (what + "K type").c_str()),
                                               parse_cache_type(kv.second, (what + "V type").c_str())};
                         }
                         c.layer_types = std::move(out);
                     })
        .def_prop_rw("lazy_prefill", [](const EngineConfig & c) { return std::string(lazy_prefill_name(c.lazy_prefill)); },
                     [](EngineConfig & c, const std::string & v) { c.lazy_prefill = parse_lazy_prefill(v); })
        .def_prop_rw("lazy_mode", [](const EngineConfig & c) { return std::string(lazy_mode_name(c.lazy_mode)); },
                     [](EngineConfig & c, const std::string & v) { c.lazy_mode = parse_lazy_mode(v); });

    // The KV stores an engine with this configuration allocates once a prompt is in, from the cache's own planned
    // kinds, types and sizes (KvCache::planned_bytes, what Engine checks against free memory): memory.py and `simkv info`
    // ask here and never restate a policy. With exact prefill the lazy layers are these rings after the
    // prompt (the peak, while it is evaluated, is a full cache).
    m.def("planned_kv_layers",
          [](const Model & model, const EngineConfig & cfg) {
              const HParams & hp = model.hp();
              const EngineConfig c = validated(cfg, hp);
              KvConfig kv = kv_config(c, hp.n_layer);
              kv.lazy_layers.assign(c.lazy_layers.begin(), c.lazy_layers.end());
              nb::list layers;
              for (uint32_t il = 0; il < hp.n_layer; ++il) {
                  const KvTypes t = KvCache::planned_types(kv, il);
                  nb::dict d;
                  d["layer"] = il;
                  d["kind"] = kv_kind_name(KvCache::planned_kind(hp, kv, il));
                  d["type_k"] = std::string(ggml_type_name(t.k));
                  d["type_v"] = std::string(ggml_type_name(t.v));
                  d["bytes"] = KvCache::planned_bytes(hp, kv, il);
                  layers.append(d);
              }
              return layers;
          },
          "model"_a, "config"_a, "each layer's store with this configuration (kind, K and V types, bytes once a prompt is in)");
    // The CPU kernels' dequantization (dequantize.h), for a test against gguf's own dequantizer: the
    // values as f32, or as f16 bits (uint16).
    m.def("dequantize_rows",
          [](const std::string & type_name, nb::bytes blocks, bool f16) {
              const ggml_type type = parse_cache_type(type_name, "type");
              const size_t block = ggml_type_size(type), per = (size_t) ggml_blck_size(type);
              if (blocks.size() % block != 0) {
                  throw BadInput(type_name + " data is a whole number of " + std::to_string(block) + "-byte blocks");
              }
              const size_t n = blocks.size() / block * per;
              const size_t width = f16 ? 2 : 4;
              auto * out = new uint8_t[n * width];
              if (f16) dequantize_row_f16(type, blocks.c_str(), (ggml_fp16_t *) out, (int64_t) n);
              else dequantize_row_f32(type, blocks.c_str(), (float *) out, (int64_t) n);
              nb::capsule owner(out, [](void * p) noexcept { delete[] (uint8_t *) p; });
              return nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(out, {n * width}, owner);
          },
          "type"_a, "blocks"_a, "f16"_a, "blocks of a cache type -> their values' bytes (f32, or f16 with f16=True)");
    // The per-token loss the profiler's what-ifs score in the graph (graph_token_nll.cpp), for a test against
    // numpy's float64 log-softmax over every vocabulary size's leftover lanes.
    m.def("token_nll",
          [](nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> logits, int32_t target) {
              const auto n = (int64_t) logits.shape(0);
              if (n == 0) throw BadInput("token_nll needs at least one logit");
              if (target < -1 || target >= n) throw BadInput("target must be -1 or the index of a logit");
              return token_nll(logits.data(), n, target);
          },
          "logits"_a, "target"_a, "-log softmax(logits)[target] (float32 logits); 0 for target -1");
    m.def("ggml_type_name",
          [](int64_t type) {
              if (type < 0 || type >= GGML_TYPE_COUNT || ggml_type_size((ggml_type) type) == 0) {
                  throw BadInput("unknown ggml type id " + std::to_string(type));
              }
              return std::string(ggml_type_name((ggml_type) type));
          },
          "type"_a, "ggml's name of an integer type id (llama-cpp-python passes cache types as ids)");

    nb::class_<Engine>(m, "Engine")
        .def("__init__",
             [](Engine * e, std::shared_ptr<Model> model, const EngineConfig & cfg) {
                 on_device_thread(*model, [&] { new (e) Engine(std::move(model), cfg); });
             },
             "model"_a, "config"_a, nb::call_guard<nb::gil_scoped_release>())
        .def_prop_ro("config", &Engine::config)
        .def("eval",
             [](Engine & e, TokenArray tokens, bool all_logits) {
                 const uint32_t n = (uint32_t) tokens.shape(0);
                 const BetweenUbatches between = signal_check_for_this_thread();
                 std::vector<float> logits = engine_call(e, [&] { return e.eval(tokens.data(), n, all_logits, nullptr, 0, between); });
                 return to_numpy(std::move(logits), all_logits ? n : 1, e.out_width());
             },
             "tokens"_a, "all_logits"_a)
        .def("decode",
             [](Engine & e, const std::vector<int32_t> & seqs, const std::vector<TokenArray> & tokens,
                const std::vector<bool> & all_logits) {
                 if (seqs.size() != tokens.size() || seqs.size() != all_logits.size()) {
                     throw BadInput("decode(): seqs, tokens and all_logits must have the same length");
                 }
                 std::vector<SeqTokens> batch(seqs.size());
                 for (size_t i = 0; i < seqs.size(); ++i) {
                     batch[i] = SeqTokens{seqs[i], tokens[i].data(), (uint32_t) tokens[i].shape(0), all_logits[i]};
                 }
                 const BetweenUbatches between = signal_check_for_this_thread();
                 std::vector<std::vector<float>> logits = engine_call(e, [&] { return e.decode(batch, between); });
                 const size_t n_vocab = e.out_width();
                 nb::list out;
                 for (size_t i = 0; i < logits.size(); ++i) {
                     out.append(to_numpy(std::move(logits[i]), all_logits[i] ? batch[i].n : 1, n_vocab));
                 }
                 return out;
             },
             "seqs"_a, "tokens"_a, "all_logits"_a,
             "Append tokens to several sequences in shared ubatches; returns each one's logits")
        .def("truncate",
             [](Engine & e, uint32_t n_keep, int32_t seq) { return engine_call(e, [&] { return e.truncate(n_keep, seq); }); },
             "n_keep"_a, "seq"_a = 0)
        .def("clear", [](Engine & e, int32_t seq) { engine_call(e, [&] { e.clear(seq); }); }, "seq"_a)
        .def("set_n_threads", [](Engine & e, int n) { auto busy = e.claim(); e.set_n_threads(n); }, "n"_a)
        .def("reset", [](Engine & e) { engine_call(e, [&] { e.reset(); }); })
        .def("set_embeddings", [](Engine & e, bool on) { engine_call(e, [&] { e.set_embeddings(on); }); }, "on"_a,
             "Rows of the final norm's output instead of logits")
        .def("save_state",
             [](const Engine & e) {
                 const std::string s = engine_call(e, [&] { return e.save_state(); });
                 return nb::bytes(s.data(), s.size());
             },
             "The context (positions, cell maps, every store's used rows) as bytes")
        .def("load_state",
             [](Engine & e, nb::bytes blob) {
                 const std::string b(blob.c_str(), blob.size());
                 engine_call(e, [&] { e.load_state(b); });
             },
             "blob"_a, "Restore a save_state(); on a mismatch the engine is left empty")
        .def("set_masked_layers",
             [](Engine & e, const std::vector<int> & layers, uint32_t n_sink, uint32_t n_window) {
                 engine_call(e, [&] { e.set_masked_layers(layers, n_sink, n_window); });
             },
             "layers"_a, "n_sink"_a, "n_window"_a)
        .def("set_what_if_types",
             [](Engine & e, const std::vector<std::tuple<int, std::string, std::string>> & layers) {
                 std::vector<std::pair<int, KvTypes>> typed;
                 for (const auto & [il, k, v] : layers) {
                     typed.emplace_back(il, KvTypes{parse_cache_type(k, "type_k"), parse_cache_type(v, "type_v")});
                 }
                 engine_call(e, [&] { e.set_what_if_types(typed); });
             },
             "layers"_a,
             "Each (layer, K type, V type): that full layer's store takes these types from now on, its cells "
             "converted; the layers given types before get their own stores back (the profiler's what-ifs)")
        .def_prop_ro("n_past", [](const Engine & e) { auto read = read_claim(e); return e.n_past(0); })
        .def("n_past_of", [](const Engine & e, int32_t seq) { auto read = read_claim(e); return e.n_past(seq); }, "seq"_a)
        .def_prop_ro("free_cells", [](const Engine & e) { auto read = read_claim(e); return e.free_cells(); })
        .def(
            "cells_needed",
            [](const Engine & e, int32_t seq, uint32_t n_keep, uint32_t n_new) {
                auto read = read_claim(e);
                return e.cells_needed(seq, n_keep, n_new);
            },
            "seq"_a, "n_keep"_a, "n_new"_a,
            "Pool cells that cutting the sequence back to n_keep tokens, then appending n_new, takes beyond what it "
            "holds now (a sequence lazy in the pool holds at most sinks + window + a ubatch there)")
        .def("cells_held", [](const Engine & e, int32_t seq) { auto read = read_claim(e); return e.cells_held(seq); },
             "seq"_a, "Pool cells the sequence holds: what clearing it frees")
        .def_prop_ro("compacted", [](const Engine & e) { auto read = read_claim(e); return e.compacted(0); })
        .def("compacted_of", [](const Engine & e, int32_t seq) { auto read = read_claim(e); return e.compacted(seq); },
             nb::arg("seq"))
        .def_prop_ro("lazy_layers", [](const Engine & e) { auto read = read_claim(e); return e.lazy_layers(); })
        .def_prop_ro("prompts_alone", &Engine::prompts_alone)
        .def_prop_ro("peak_kv_bytes", [](const Engine & e) { auto read = read_claim(e); return e.peak_kv_bytes(); })
        .def_prop_ro("graph_builds", [](const Engine & e) { auto read = read_claim(e); return e.graph_builds(); })
        .def("kv_layers", [](const Engine & e) { auto read = read_claim(e); return kv_stats(e); })
        .def("seq_stats",
             [](const Engine & e, int32_t seq) {
                 auto read = read_claim(e);
                 nb::dict d;
                 d["n_tokens"] = e.n_past(seq);
                 d["bytes"] = e.kv().seq_bytes(seq);
                 std::vector<uint32_t> cells;
                 for (size_t il = 0; il < e.kv().n_layer(); ++il) cells.push_back(e.kv().seq_cells(seq, (int) il));
                 d["cells"] = cells;
                 d["lazy_layers"] = e.lazy_layers_of(seq);
                 return d;
             },
             "seq"_a, "One sequence's share of the KV cache: tokens, cells per layer, bytes")
        .def_prop_ro("kv_total_bytes", [](const Engine & e) { auto read = read_claim(e); return e.kv().total_bytes(); });

    nb::class_<Vocab>(m, "Vocab")
        .def(nb::init<const std::string &>(), "path"_a)
        .def("tokenize",
             [](const Vocab & v, nb::bytes text, bool add_special, bool parse_special) {
                 return v.tokenize(std::string(text.c_str(), text.size()), add_special, parse_special);
             },
             "text"_a, "add_special"_a, "parse_special"_a)
        .def("token_to_piece",
             [](const Vocab & v, int32_t token, bool special) {
                 std::string s = v.token_to_piece(token, special);
                 return nb::bytes(s.data(), s.size());
             },
             "token"_a, "special"_a)
        .def_prop_ro("n_vocab", &Vocab::n_vocab)
        .def_prop_ro("bos", &Vocab::bos)
        .def_prop_ro("eos", &Vocab::eos)
        .def_prop_ro("add_bos", &Vocab::add_bos)
        .def_prop_ro("nl", &Vocab::nl)
        .def_prop_ro("metadata", [](const Vocab & v) { return metadata_dict(v.metadata()); })
        .def_prop_ro("fim_pre", &Vocab::fim_pre)
        .def_prop_ro("fim_suf", &Vocab::fim_suf)
        .def_prop_ro("fim_mid", &Vocab::fim_mid)
        .def("is_eog", &Vocab::is_eog, "token"_a);

    nb::class_<Sampler>(m, "Sampler")
        .def("__init__",
             [](Sampler * self, const Vocab & vocab, float temperature, int32_t top_k, float top_p, float min_p,
                float typical_p, float repeat_penalty, float frequency_penalty, float presence_penalty,
                int32_t penalty_last_n, int32_t mirostat, float mirostat_tau, float mirostat_eta, uint32_t seed,
                std::vector<std::pair<int32_t, float>> logit_bias, const std::string & grammar,
                const std::string & grammar_root) {
                 SamplerParams p;
                 p.temperature = temperature; p.top_k = top_k; p.top_p = top_p; p.min_p = min_p;
                 p.typical_p = typical_p; p.repeat_penalty = repeat_penalty; p.frequency_penalty = frequency_penalty;
                 p.presence_penalty = presence_penalty; p.penalty_last_n = penalty_last_n; p.mirostat = mirostat;
                 p.mirostat_tau = mirostat_tau; p.mirostat_eta = mirostat_eta; p.seed = seed;
                 p.logit_bias = std::move(logit_bias); p.grammar = grammar; p.grammar_root = grammar_root;
                 new (self) Sampler(vocab.get(), vocab.n_vocab(), p);
             },
             // A grammar sampler points into the vocabulary: keep it alive as long as this sampler.
             nb::keep_alive<1, 2>(),
             "vocab"_a, "temperature"_a, "top_k"_a, "top_p"_a, "min_p"_a, "typical_p"_a = 1.0f, "repeat_penalty"_a,
             "frequency_penalty"_a, "presence_penalty"_a, "penalty_last_n"_a, "mirostat"_a = 0,
             "mirostat_tau"_a = 5.0f, "mirostat_eta"_a = 0.1f, "seed"_a,
             "logit_bias"_a = std::vector<std::pair<int32_t, float>>(), "grammar"_a = std::string(),
             "grammar_root"_a = std::string("root"))
        .def("sample",
             [](Sampler & s, nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> logits) {
                 if ((int64_t) logits.shape(0) != s.n_vocab()) {
                     throw BadInput("logits must have n_vocab (" + std::to_string(s.n_vocab()) + ") values, got " +
                                    std::to_string(logits.shape(0)));
                 }
                 return s.sample(logits.data());
             },
             "logits"_a)
        .def("accept", &Sampler::accept, "token"_a, "A generated token (penalties, grammar, mirostat)")
        .def("accept_context", &Sampler::accept_context, "context"_a,
             "The tokens already in the context: the penalties see the last penalty_last_n")
        .def("reset", &Sampler::reset);
}
