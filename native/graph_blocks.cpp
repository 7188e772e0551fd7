// The norm and feed-forward blocks the architectures share (graph.h declares them).
#include "graph.h"

namespace simkv {

ggml_tensor * build_rms_norm(GraphBuild & b, ggml_tensor * x, ggml_tensor * w, float eps) {
    return ggml_mul(b.ctx, ggml_rms_norm(b.ctx, x, eps), w);
}

ggml_tensor * build_ffn_swiglu(GraphBuild & b, ggml_tensor * x, ggml_tensor * gate, ggml_tensor * up, ggml_tensor * down) {
    ggml_tensor * u = ggml_mul_mat(b.ctx, up, x);
    ggml_tensor * g = ggml_mul_mat(b.ctx, gate, x);
    return ggml_mul_mat(b.ctx, down, ggml_swiglu_split(b.ctx, g, u));
}

ggml_tensor * build_ffn_geglu(GraphBuild & b, ggml_tensor * x, ggml_tensor * gate, ggml_tensor * up, ggml_tensor * down) {
    ggml_tensor * u = ggml_mul_mat(b.ctx, up, x);
    ggml_tensor * g = ggml_mul_mat(b.ctx, gate, x);
    return ggml_mul_mat(b.ctx, down, ggml_geglu_split(b.ctx, g, u));
}

}  // namespace simkv
