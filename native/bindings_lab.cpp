// The research hooks (`_native.lab`): what the profiler, the research benchmarks and the reference tests
// ask of an engine beyond the product's calls. A probe of attention mass, what-ifs on the residual stream
// (from a later layer, capturing each layer's input, scoring each row's loss), one layer's attention tapped,
// a store's raw contents, one layer's attention kernels alone. They reach Python here and through py_simkv/lab.py, not as Engine or Llama methods.
#include "bindings_common.h"
#include "errors.h"
#include "engine_config.h"
#include "kv_cache.h"
#include "lab_attention.h"
#include "probe.h"

#include <ggml.h>

#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

namespace nb = nanobind;
using namespace nb::literals;

namespace simkv::py {

namespace {

// What layer il's store holds, for a reference to recompute its attention from (tests): K and V rows as
// stored (bytes, [capacity] rows of the store's type), the f16 residual's rows, and the cell maps.
nb::dict store_contents(const Engine & e, int il) {
    const KvCache & kv = e.kv();
    if (il < 0 || (size_t) il >= kv.n_layer()) throw BadInput("layer " + std::to_string(il) + " is out of range");
    const KvStore & s = kv.store(il);
    const KvGroup & g = kv.groups()[s.group];
    auto bytes_of = [](const ggml_tensor * t) -> nb::object {
        if (!t) return nb::none();
        std::string buf(ggml_nbytes(t), '\0');
        ggml_backend_tensor_get(t, buf.data(), 0, buf.size());
        return nb::bytes(buf.data(), buf.size());
    };
    nb::dict d;
    d["type_k"] = std::string(ggml_type_name(s.k->type));
    d["type_v"] = std::string(ggml_type_name(s.v->type));
    d["kind"] = kv_kind_name(kv.kind_of(il));
    d["k"] = bytes_of(s.k);
    d["v"] = bytes_of(s.v);
    d["k_residual"] = bytes_of(s.k_res);
    d["v_residual"] = bytes_of(s.v_res);
    d["cell_pos"] = g.cells.positions();
    d["cell_seq"] = g.cells.sequences();
    d["residual_pos"] = g.cells.residual();
    d["residual_capacity"] = g.policy->residual_capacity();
    return d;
}

}  // namespace

void define_lab(nb::module_ & m) {
    nb::module_ lab = m.def_submodule("lab", "research hooks: probes, what-ifs, taps (py_simkv/lab.py)");
    lab.def("eval_probed",
             [](Engine & e, TokenArray tokens, bool all_logits, uint32_t n_sink, uint32_t n_window, uint32_t n_probe) {
                 const uint32_t n = (uint32_t) tokens.shape(0);
                 const BetweenUbatches between = signal_check_for_this_thread();
                 const ProbeSpec spec{n_sink, n_window};
                 std::vector<float> logits = engine_call(e, [&] { return e.eval(tokens.data(), n, all_logits, &spec, n_probe, between); });
                 return to_numpy(std::move(logits), all_logits ? n : 1, e.out_width());
             },
            "engine"_a, "tokens"_a, "all_logits"_a, "n_sink"_a, "n_window"_a, "n_probe"_a,
            "eval() that also probes the last n_probe tokens (probe.h); read the scores with probe_scores()");
    lab.def("eval_stream",
             [](Engine & e, TokenArray tokens, uint32_t first_layer,
                std::optional<nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>> hidden, bool capture,
                std::optional<TokenArray> targets, uint32_t n_sink, uint32_t n_window, uint32_t n_probe) {
                 const uint32_t n = (uint32_t) tokens.shape(0);
                 if (targets && targets->shape(0) != n) {
                     throw BadInput("targets must have one token per row (" + std::to_string(n) + ")");
                 }
                 const uint32_t n_embd = e.model().hp().n_embd, n_layer = e.model().hp().n_layer;
                 if (hidden && (hidden->shape(0) != n || hidden->shape(1) != n_embd)) {
                     throw BadInput("hidden must be [n_tokens, n_embd] = [" + std::to_string(n) + ", " +
                                    std::to_string(n_embd) + "]");
                 }
                 LayerStream stream;
                 stream.first_layer = first_layer;
                 stream.hidden = hidden ? hidden->data() : nullptr;
                 std::vector<float> captured(capture ? (size_t) n_layer * n * n_embd : 0);
                 stream.capture = capture ? captured.data() : nullptr;
                 stream.targets = targets ? targets->data() : nullptr;
                 const BetweenUbatches between = signal_check_for_this_thread();
                 const ProbeSpec spec{n_sink, n_window};
                 std::vector<float> logits = engine_call(e, [&] { return e.eval_stream(tokens.data(), n, stream, &spec, n_probe, between); });
                 nb::object layers = nb::none();
                 if (capture) {
                     auto * heap = new std::vector<float>(std::move(captured));
                     nb::capsule owner(heap, [](void * p) noexcept { delete static_cast<std::vector<float> *>(p); });
                     layers = nb::cast(nb::ndarray<nb::numpy, float, nb::ndim<3>>(heap->data(), {n_layer, n, n_embd}, owner));
                 }
                 const size_t width = logits.size() / n;  // the engine's out_width() during the call
                 nb::object rows = nb::cast(to_numpy(std::move(logits), n, width));
                 if (targets) rows = rows.attr("reshape")(n);  // one loss per row
                 return nb::make_tuple(rows, layers);
             },
            "engine"_a, "tokens"_a, "first_layer"_a = 0, "hidden"_a = nb::none(), "capture"_a = false, "targets"_a = nb::none(),
             "n_sink"_a = 0, "n_window"_a = 1, "n_probe"_a = 0,
             "eval() with every row's logits from layer first_layer on (hidden: the stream entering it, [n, n_embd]); "
             "capture: also return the stream entering each layer, [n_layer, n, n_embd]; targets ([n] token ids): "
             "return each row's loss on its target, -log softmax(row)[target] (0 for target -1), instead of its logits; "
             "n_probe > 0: probe the last n_probe tokens as eval_probed does (first_layer 0)");
    lab.def("attention_tap",
             [](Engine & e, TokenArray tokens, int32_t layer) {
                 const uint32_t n = (uint32_t) tokens.shape(0);
                 const size_t width = (size_t) e.model().hp().n_head * e.model().hp().head_dim;
                 std::vector<float> q((size_t) n * width), out((size_t) n * width);
                 LayerStream stream;
                 stream.tap_layer = layer;
                 stream.tap_q = q.data();
                 stream.tap_out = out.data();
                 engine_call(e, [&] { e.eval_stream(tokens.data(), n, stream); });
                 return nb::make_tuple(to_numpy(std::move(q), n, width), to_numpy(std::move(out), n, width));
             },
            "engine"_a, "tokens"_a, "layer"_a,
             "eval() that also returns layer `layer`'s attention query rows (after RoPE, before a store's rotation) "
             "and output rows (rotated back), each [n, n_head * head_dim], for a reference to check them against");
    lab.def("attention",
            [](nb::ndarray<const float, nb::ndim<3>, nb::c_contig, nb::device::cpu> q, nb::bytes k, nb::bytes v,
               const std::string & k_type, const std::string & v_type, int64_t n_head_kv,
               nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu> mask, float scale,
               const std::string & kernel, int n_threads, int repeats) {
                AttentionCase c;
                c.n_tokens = (int64_t) q.shape(0);
                c.n_head = (int64_t) q.shape(1);
                c.d = (int64_t) q.shape(2);
                c.n_head_kv = n_head_kv;
                c.n_kv = (int64_t) mask.shape(1);
                c.k_type = parse_cache_type(k_type, "k_type");
                c.v_type = parse_cache_type(v_type, "v_type");
                if ((int64_t) mask.shape(0) != c.n_tokens) throw BadInput("mask must be [n_tokens, n_kv]");
                c.q = q.data();
                c.k = k.c_str();
                c.v = v.c_str();
                c.k_bytes = k.size();
                c.v_bytes = v.size();
                c.mask = mask.data();
                c.scale = scale;
                std::vector<double> seconds;
                std::vector<float> out;
                {
                    nb::gil_scoped_release release;
                    out = run_attention(c, kernel, n_threads, repeats, seconds);
                }
                auto * heap = new std::vector<float>(std::move(out));
                nb::capsule owner(heap, [](void * p) noexcept { delete static_cast<std::vector<float> *>(p); });
                nb::object o = nb::cast(nb::ndarray<nb::numpy, float, nb::ndim<3>>(
                    heap->data(), {(size_t) c.n_tokens, (size_t) c.n_head, (size_t) c.d}, owner));
                return nb::make_tuple(o, seconds);
            },
            "q"_a, "k"_a, "v"_a, "k_type"_a, "v_type"_a, "n_head_kv"_a, "mask"_a, "scale"_a, "kernel"_a,
            "n_threads"_a = 1, "repeats"_a = 1,
            "One layer's attention alone (lab_attention.h): q [n_tokens, n_head, d] f32, k and v n_kv rows of a cache "
            "type (bytes), mask [n_tokens, n_kv] (0 / -inf); kernel simkv, simkv-portable, dequantized or ggml. "
            "Returns (output [n_tokens, n_head, d], seconds of each repeat)");
    lab.def("store_contents", [](const Engine & e, int il) { auto read = read_claim(e); return store_contents(e, il); },
            "engine"_a, "layer"_a, "What layer il's store holds: K/V rows as stored (bytes), the f16 residual's, the cell maps");
    lab.def("probe_scores",
            [](const Engine & e) {
                auto read = read_claim(e);
                return std::make_pair(e.probe_mass(), e.probe_change());
            },
            "engine"_a, "The last probed evaluation's scores per layer: (mass, change), NaN where not probed");
}

}  // namespace simkv::py
