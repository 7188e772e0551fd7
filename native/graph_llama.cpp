// The Llama family (llama, qwen2 = + QKV bias, qwen3 = + per-head Q/K RMS norm), top to bottom.
#include "graph.h"

#include "kv_cache.h"
#include "model.h"

#include <cmath>

namespace simkv {

ggml_tensor * build_graph_llama(GraphBuild & b) {
    ggml_context * ctx = b.ctx;
    const Model & m = b.model;
    const HParams & hp = m.hp();
    const uint32_t n = b.n_tokens;

    create_ubatch_inputs(b);

    auto rope = [&](ggml_tensor * x, ggml_tensor * freqs) {
        return ggml_rope_ext(ctx, x, b.in.pos, freqs, hp.n_rot, hp.rope_type, hp.n_ctx_train,
                             hp.rope_freq_base, hp.rope_freq_scale, 0.0f, 1.0f, 32.0f, 1.0f);
    };

    ggml_tensor * x = first_layer_input(b, [&] {  // [n_embd, n]
        return cb(ggml_get_rows(ctx, m.tok_embd, b.in.tokens), "inp_embd", -1);
    });
    for (uint32_t il = b.first_layer; il < hp.n_layer; ++il) {
        note_layer_input(b, il, x);
        const LayerWeights & L = m.layers[il];
        ggml_tensor * cur = cb(build_rms_norm(b, x, L.attn_norm, hp.rms_eps), "attn_norm", il);

        ggml_tensor * q = ggml_mul_mat(ctx, L.wq, cur);
        ggml_tensor * k = ggml_mul_mat(ctx, L.wk, cur);
        ggml_tensor * v = ggml_mul_mat(ctx, L.wv, cur);
        if (L.bq) q = ggml_add(ctx, q, L.bq);
        if (L.bk) k = ggml_add(ctx, k, L.bk);
        if (L.bv) v = ggml_add(ctx, v, L.bv);
        q = ggml_reshape_3d(ctx, q, hp.head_dim, hp.n_head, n);
        k = ggml_reshape_3d(ctx, k, hp.head_dim, hp.n_head_kv, n);
        v = ggml_reshape_3d(ctx, v, hp.head_dim, hp.n_head_kv, n);
        if (L.q_norm) q = build_rms_norm(b, q, L.q_norm, hp.rms_eps);
        if (L.k_norm) k = build_rms_norm(b, k, L.k_norm, hp.rms_eps);
        q = cb(rope(q, L.rope_freqs), "Qcur", il);
        k = cb(rope(k, L.rope_freqs), "Kcur", il);
        cb(v, "Vcur", il);

        cur = cb(build_attention(b, (int) il, q, k, v, 1.0f / std::sqrt((float) hp.head_dim)), "kqv_out", il);
        cur = cb(ggml_mul_mat(ctx, L.wo, cur), "attn_out", il);

        if (il == hp.n_layer - 1 && b.in.out_ids) {
            // Only the output rows go through the last FFN and the vocabulary projection.
            cur = ggml_get_rows(ctx, cur, b.in.out_ids);
            x = ggml_get_rows(ctx, x, b.in.out_ids);
        }
        ggml_tensor * ffn_in = cb(ggml_add(ctx, cur, x), "ffn_inp", il);
        cur = cb(build_rms_norm(b, ffn_in, L.ffn_norm, hp.rms_eps), "ffn_norm", il);
        cur = cb(build_ffn_swiglu(b, cur, L.ffn_gate, L.ffn_up, L.ffn_down), "ffn_out", il);
        x = cb(ggml_add(ctx, cur, ffn_in), "l_out", il);
    }
    x = cb(build_rms_norm(b, x, m.output_norm, hp.rms_eps), "result_norm", -1);
    if (b.embeddings) return x;
    return cb(ggml_mul_mat(ctx, m.output, x), "result_output", -1);
}

}  // namespace simkv
