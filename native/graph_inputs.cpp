// What every architecture's graph shares: the ubatch's inputs, and the choice of builder.
#include "graph.h"

#include "kv_cache.h"
#include "model.h"
#include "probe.h"

#include <algorithm>

namespace simkv {

void create_ubatch_inputs(GraphBuild & b) {
    ggml_context * ctx = b.ctx;
    const uint32_t n = b.n_tokens;
    if (b.first_layer == 0) {
        b.in.tokens = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
        ggml_set_input(b.in.tokens);
    } else {
        b.in.hidden = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, b.model.hp().n_embd, n);
        ggml_set_input(b.in.hidden);
    }
    b.in.pos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
    ggml_set_input(b.in.pos);
    if (b.n_outputs < n) {
        b.in.out_ids = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, b.n_outputs);
        ggml_set_input(b.in.out_ids);
    }
    auto input = [ctx](ggml_type type, int64_t n) {
        ggml_tensor * t = ggml_new_tensor_1d(ctx, type, n);
        ggml_set_input(t);
        return t;
    };
    for (size_t gi = 0; gi < b.kv.groups().size(); ++gi) {
        const KvGroup & g = b.kv.groups()[gi];
        // A group left without layers (exact prefill moved them all), or whose layers this graph skips.
        const bool computed = std::any_of(g.layers.begin(), g.layers.end(), [&](int il) { return (uint32_t) il >= b.first_layer; });
        if (!computed) {
            b.in.spans.emplace_back();
            b.in.write_idx.push_back(nullptr);
            continue;
        }
        std::vector<SpanInputs> spans;
        for (const AttnSpan & sp : b.plan.groups[gi].spans) {
            SpanInputs si;
            si.kq_mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, sp.n_kv, sp.n_tokens);
            ggml_set_input(si.kq_mask);
            if (sp.gather_offset >= 0) si.gather = input(GGML_TYPE_I32, sp.n_store());
            if (sp.n_res) si.res_read = input(GGML_TYPE_I32, sp.n_res);
            if (sp.n_res_write) si.res_dst = input(GGML_TYPE_I64, sp.n_res_write);
            spans.push_back(si);
        }
        b.in.spans.push_back(std::move(spans));
        b.in.write_idx.push_back(input(GGML_TYPE_I64, n));
    }
    if (b.probe) create_probe_inputs(b);
}

void note_layer_input(GraphBuild & b, uint32_t il, ggml_tensor * x) {
    if (!b.capture) return;
    ggml_set_output(x);  // not overwritten by later nodes: read after the compute
    if (b.in.layer_in.size() <= il) b.in.layer_in.resize(il + 1, nullptr);
    b.in.layer_in[il] = x;
}

ggml_tensor * build_graph(GraphBuild & b) {
    return b.model.hp().arch == Arch::GEMMA3 ? build_graph_gemma3(b) : build_graph_llama(b);
}

}  // namespace simkv
