// Building one ubatch's compute graph: inputs, shared helpers, and one builder per architecture family.
#pragma once
#include <ggml-cpp.h>
#include <ggml.h>

#include "kv_rotation.h"

#include <cstdio>
#include <vector>

namespace simkv {

class Model;
class KvCache;
struct ProbeGraph;
struct UbatchPlan;

// Memory for graph descriptors (tensor metadata only; data lives in the scheduler's buffers). One per
// engine, reused by every graph it builds, one graph at a time.
class GraphArena {
public:
    explicit GraphArena(size_t n_nodes)
        : n_nodes_(n_nodes), meta_(ggml_tensor_overhead() * n_nodes + ggml_graph_overhead_custom(n_nodes, false)) {}
    size_t n_nodes() const { return n_nodes_; }
    // A fresh no-alloc context over the arena; the previous one must be gone.
    ggml_context_ptr context() {
        ggml_init_params ip = {meta_.size(), meta_.data(), true};
        return ggml_context_ptr(ggml_init(ip));
    }

private:
    size_t n_nodes_;
    std::vector<uint8_t> meta_;
};

// Names an intermediate tensor as llama.cpp's graph callback does ("Qcur-5"), so a layer's tensors can be
// compared with llama.cpp's by name (GGML_SCHED debugging, eval callbacks).
inline ggml_tensor * cb(ggml_tensor * t, const char * name, int il) {
    if (il >= 0) ggml_format_name(t, "%s-%d", name, il);
    else ggml_set_name(t, name);
    return t;
}

// One attention span's inputs (kv_plan.h, AttnSpan).
struct SpanInputs {
    ggml_tensor * kq_mask = nullptr;   // F16 [n_kv, n_tokens]
    ggml_tensor * gather = nullptr;    // I32 [n_store] cells, or null (read in place)
    ggml_tensor * res_read = nullptr;  // I32 [n_res] residual cells, or null
    ggml_tensor * res_dst = nullptr;   // I64 [n_res_write] residual cells of the span's last rows, or null
};

// Graph inputs, filled after the scheduler has allocated them.
struct UbatchInputs {
    ggml_tensor * tokens = nullptr;   // I32 [n_tokens] (null when the graph starts at a later layer)
    ggml_tensor * hidden = nullptr;   // F32 [n_embd, n_tokens]: the stream entering GraphBuild::first_layer, if > 0
    std::vector<ggml_tensor *> layer_in;  // with GraphBuild::capture: the stream entering each layer (outputs)
    ggml_tensor * tap_q = nullptr;    // with GraphBuild::tap_layer: that layer's query and attention output (outputs)
    ggml_tensor * tap_out = nullptr;
    ggml_tensor * pos = nullptr;      // I32 [n_tokens]
    ggml_tensor * out_ids = nullptr;  // I32 [n_outputs], null when every token is output
    ggml_tensor * targets = nullptr;  // I32 [n_outputs]: the token each output row is scored on (Engine::LayerStream)
    std::vector<std::vector<SpanInputs>> spans;  // per KV group, per span
    std::vector<ggml_tensor *> write_idx;        // per KV group: I64 [n_tokens]
    RotationInputs rotations;                    // H of each size the quantized stores rotate by
};

struct GraphBuild {
    ggml_context * ctx;
    ggml_cgraph * gf;
    const Model & model;
    const KvCache & kv;
    const UbatchPlan & plan;  // the ubatch's cells, spans and masks (kv_plan.h)
    uint32_t n_tokens;
    uint32_t n_outputs;
    UbatchInputs in;
    ProbeGraph * probe = nullptr;  // lazy-layer probe of some rows (probe.h), or none
    uint32_t n_probe = 0;
    bool embeddings = false;       // output the final norm's rows ("result_norm"), not the logits
    // What-ifs on the residual stream (Engine::LayerStream): compute layers first_layer.. only, from
    // in.hidden; or keep the stream entering every layer as an output (capture).
    uint32_t first_layer = 0;
    bool capture = false;
    int32_t tap_layer = -1;  // keep this layer's attention query and output as outputs (Engine::LayerStream)
};

// rms_norm(x) * w
ggml_tensor * build_rms_norm(GraphBuild & b, ggml_tensor * x, ggml_tensor * w, float eps);
// down(silu(gate(x)) * up(x))
ggml_tensor * build_ffn_swiglu(GraphBuild & b, ggml_tensor * x, ggml_tensor * gate, ggml_tensor * up, ggml_tensor * down);
// down(gelu(gate(x)) * up(x))
ggml_tensor * build_ffn_geglu(GraphBuild & b, ggml_tensor * x, ggml_tensor * gate, ggml_tensor * up, ggml_tensor * down);
// Writes this ubatch's K/V into layer il's store, then attends over the store's visible cells.
// q_cur [head_dim, n_head, n_tokens], k_cur/v_cur [head_dim, n_head_kv, n_tokens], all F32, RoPE applied.
// kq_scale multiplies Q·K (1/sqrt(head_dim) unless the architecture scales Q itself). Returns
// [head_dim * n_head, n_tokens].
ggml_tensor * build_attention(GraphBuild & b, int il, ggml_tensor * q_cur, ggml_tensor * k_cur, ggml_tensor * v_cur,
                              float kq_scale);

// Creates b.in (and the probe's inputs when b.probe is set) and returns the logits [n_vocab, n_outputs]
// (with b.embeddings: the final norm's output [n_embd, n_outputs]).
ggml_tensor * build_graph_llama(GraphBuild & b);   // llama, qwen2, qwen3
ggml_tensor * build_graph_gemma3(GraphBuild & b);  // gemma3
ggml_tensor * build_graph(GraphBuild & b);         // the one for b.model's architecture
// A row's next-token loss, -log softmax(logits)[target], or 0 where target is -1 (graph_token_nll.cpp).
float token_nll(const float * logits, int64_t n_vocab, int32_t target);
// F32 [1, n_rows]: token_nll of each row of logits (F32 [n_vocab, n_rows]), as a CPU-only node.
ggml_tensor * build_token_nll(ggml_context * ctx, ggml_tensor * logits, ggml_tensor * targets);
// The graph inputs every architecture shares (tokens, positions, output rows, per-group masks and write
// indices, the probe's).
void create_ubatch_inputs(GraphBuild & b);
// The residual stream entering the first layer computed: embed(token rows) from layer 0, else in.hidden.
template <class Embed>
ggml_tensor * first_layer_input(GraphBuild & b, Embed embed) {
    return b.first_layer ? b.in.hidden : embed();
}
// Called with the stream x entering layer il: kept as an output when the call captures the stream.
void note_layer_input(GraphBuild & b, uint32_t il, ggml_tensor * x);

}  // namespace simkv
