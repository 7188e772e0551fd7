// What every architecture's graph shares: the ubatch's inputs, and the choice of builder.
#include "graph.h"

#include "kv_cache.h"
#include "model.h"
#include "probe.h"

namespace simkv {

void create_ubatch_inputs(GraphBuild & b) {
    ggml_context * ctx = b.ctx;
    const uint32_t n = b.n_tokens;
    b.in.tokens = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
    b.in.pos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
    ggml_set_input(b.in.tokens);
    ggml_set_input(b.in.pos);
    if (b.n_outputs < n) {
        b.in.out_ids = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, b.n_outputs);
        ggml_set_input(b.in.out_ids);
    }
    for (const KvGroup & g : b.kv.groups()) {
        if (g.layers.empty()) {  // a group left without layers (exact prefill moved them all)
            b.in.kq_mask.emplace_back();
            b.in.gather.emplace_back();
            b.in.write_idx.push_back(nullptr);
            continue;
        }
        std::vector<ggml_tensor *> masks, gather;
        for (const AttnSpan & sp : g.spans) {
            masks.push_back(ggml_new_tensor_2d(ctx, GGML_TYPE_F16, sp.n_kv, sp.n_tokens));
            ggml_set_input(masks.back());
            gather.push_back(sp.gather_offset >= 0 ? ggml_new_tensor_1d(ctx, GGML_TYPE_I32, sp.n_kv) : nullptr);
            if (gather.back()) ggml_set_input(gather.back());
        }
        b.in.gather.push_back(std::move(gather));
        ggml_tensor * idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n);
        ggml_set_input(idx);
        b.in.kq_mask.push_back(std::move(masks));
        b.in.write_idx.push_back(idx);
    }
    if (b.probe) create_probe_inputs(b);
}

ggml_tensor * build_graph(GraphBuild & b) {
    return b.model.hp().arch == Arch::GEMMA3 ? build_graph_gemma3(b) : build_graph_llama(b);
}

}  // namespace simkv
