// Gemma 3, top to bottom: scaled embeddings, per-head Q/K RMS norms, Q scaled before attention, RMS norms
// after attention and after the FFN as well as before, GELU-gated FFN. Five of every six layers attend
// through a sliding window with their own RoPE base; their stores are sliding rings (kv_cache.cpp picks
// the policy from HParams::is_swa), so this graph does not treat them differently beyond RoPE.
#include "graph.h"

#include "kv_cache.h"
#include "model.h"

#include <cmath>

namespace simkv {

ggml_tensor * build_graph_gemma3(GraphBuild & b) {
    ggml_context * ctx = b.ctx;
    const Model & m = b.model;
    const HParams & hp = m.hp();
    const uint32_t n = b.n_tokens;

    create_ubatch_inputs(b);
    const float q_scale = 1.0f / std::sqrt((float) hp.head_dim);  // query_pre_attn_scalar = head size

    ggml_tensor * x = first_layer_input(b, [&] {  // [n_embd, n]
        return cb(ggml_scale(ctx, ggml_get_rows(ctx, m.tok_embd, b.in.tokens), std::sqrt((float) hp.n_embd)),
                  "inp_scaled", -1);
    });
    for (uint32_t il = b.first_layer; il < hp.n_layer; ++il) {
        note_layer_input(b, il, x);
        const LayerWeights & L = m.layers[il];
        const bool swa = hp.is_swa(il);
        const float base = swa ? hp.rope_freq_base_swa : hp.rope_freq_base;
        const float scale = swa ? 1.0f : hp.rope_freq_scale;
        auto rope = [&](ggml_tensor * t) {
            return ggml_rope_ext(ctx, t, b.in.pos, nullptr, hp.n_rot, hp.rope_type, hp.n_ctx_train, base, scale,
                                 0.0f, 1.0f, 32.0f, 1.0f);
        };
        ggml_tensor * cur = cb(build_rms_norm(b, x, L.attn_norm, hp.rms_eps), "attn_norm", il);

        ggml_tensor * q = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, L.wq, cur), hp.head_dim, hp.n_head, n);
        ggml_tensor * k = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, L.wk, cur), hp.head_dim, hp.n_head_kv, n);
        ggml_tensor * v = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, L.wv, cur), hp.head_dim, hp.n_head_kv, n);
        q = rope(build_rms_norm(b, q, L.q_norm, hp.rms_eps));
        k = cb(rope(build_rms_norm(b, k, L.k_norm, hp.rms_eps)), "Kcur", il);
        q = cb(ggml_scale(ctx, q, q_scale), "Qcur", il);
        cb(v, "Vcur", il);

        cur = cb(build_attention(b, (int) il, q, k, v, 1.0f), "kqv_out", il);
        cur = cb(ggml_mul_mat(ctx, L.wo, cur), "attn_out", il);

        if (il == hp.n_layer - 1 && b.in.out_ids) {
            cur = ggml_get_rows(ctx, cur, b.in.out_ids);
            x = ggml_get_rows(ctx, x, b.in.out_ids);
        }
        ggml_tensor * attn_out = cb(ggml_add(ctx, build_rms_norm(b, cur, L.attn_post_norm, hp.rms_eps), x), "ffn_inp", il);
        cur = cb(build_rms_norm(b, attn_out, L.ffn_norm, hp.rms_eps), "ffn_norm", il);
        cur = cb(build_ffn_geglu(b, cur, L.ffn_gate, L.ffn_up, L.ffn_down), "ffn_out", il);
        x = cb(ggml_add(ctx, build_rms_norm(b, cur, L.ffn_post_norm, hp.rms_eps), attn_out), "l_out", il);
    }
    x = cb(build_rms_norm(b, x, m.output_norm, hp.rms_eps), "result_norm", -1);
    if (b.embeddings) return x;
    return cb(ggml_mul_mat(ctx, m.output, x), "result_output", -1);
}

}  // namespace simkv
