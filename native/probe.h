// Lazy-layer probe. For chosen query tokens of a ubatch, each FULL layer reports
//   mass   - the attention weight (softmax over all keys the query sees, averaged over heads) that falls on
//            the first n_sink keys plus the n_window most recent ones (itself included): SimLayerKV's score;
//   change - ||o_full - o_trimmed|| / ||o_full|| of the attention output, o_trimmed attending only to those
//            keys: the effect trimming the layer would have (an effect-based score, cheaper than a loss).
// Both run beside the main path (flash attention stays on): an explicit softmax over the probed rows and
// two small flash-attention calls. Layers without a full history (lazy stores) are not probed.
#pragma once
#include <ggml.h>

#include <cstdint>
#include <vector>

namespace simkv {

struct GraphBuild;
struct UbatchPlan;

// The trimmed view whose effect is measured: sinks + window (always given by the caller).
struct ProbeSpec {
    uint32_t n_sink;
    uint32_t n_window;
};

// Graph side: inputs shared by the layers of a group, outputs per layer.
struct ProbeGraph {
    ggml_tensor * ids = nullptr;                 // I32 [n_sel]: rows of the ubatch that are probed
    std::vector<ggml_tensor *> mask_all;         // per group: F16 [n_kv, n_sel], what the query sees
    std::vector<ggml_tensor *> mask_window;      // per group: F16 [n_kv, n_sel], sinks + window only
    std::vector<ggml_tensor *> in_window;        // per group: F32 [n_kv, n_sel], 1 on sinks + window
    std::vector<ggml_tensor *> mass, num, den;   // per layer (null if not probed)
};

// Creates the probe's inputs (b.n_probe rows) for the groups that keep a full history.
void create_probe_inputs(GraphBuild & b);
// Adds the probe of layer il (q_cur [head_dim, n_head, n_tokens]; k, v the viewed store cells).
void build_probe(GraphBuild & b, int il, ggml_tensor * q_cur, ggml_tensor * k, ggml_tensor * v);

// Running per-layer means over probed queries (and heads).
class ProbeAccumulator {
public:
    void reset(uint32_t n_layer);
    // Fill the probe inputs for the probed rows' queries (their positions and sequences).
    static void set_inputs(const ProbeGraph & pg, const UbatchPlan & plan, const ProbeSpec & spec,
                           const std::vector<int32_t> & q_rows, const std::vector<int32_t> & q_pos,
                           const std::vector<int32_t> & q_seq);
    void collect(const ProbeGraph & pg, uint32_t n_head, uint32_t n_sel);
    std::vector<double> mass() const;    // NaN for layers never probed
    std::vector<double> change() const;

private:
    std::vector<double> mass_sum_, change_sum_;
    std::vector<uint64_t> n_;
};

}  // namespace simkv
