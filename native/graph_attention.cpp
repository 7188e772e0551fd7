// Attention over one layer's KV store: the only place a store is written and read in the graph.
// Which cells are written and which are visible was decided by KvCache::plan_ubatch (the policy, kv_plan.h);
// here that becomes a set_rows into the store and one attention per span (a sequence's run of tokens over
// the cells that sequence holds): ggml's flash attention, or on the CPU over a quantized store and a few
// queries, simkv's own (attention_quantized.h).
#include "graph.h"

#include "attention_quantized.h"
#include "kv_cache.h"
#include "kv_gather.h"
#include "model.h"
#include "probe.h"

#include <cmath>

namespace simkv {

namespace {

// How a span reads a store: as stored (ggml's flash attention reads f16 and, on a GPU, q8_0/q4_0 itself),
// dequantized once (a quantized store on the CPU, many queries), or with attention_quantized (a quantized
// store on the CPU, few queries). A ring's gathered cells are f16 rows whatever it stores.
enum class StoreRead { AsStored, Dequantized, Direct };

// Dequantized cells are f32: exact (an f16 scale times a small integer), so this attention is the f32
// reference's over the stored values (tests/test_attention_quantized.py); ggml's tiled kernel converts
// f16 cells to f32 tile by tile anyway, and f16 cells measured no faster.
constexpr ggml_type kDequantized = GGML_TYPE_F32;

StoreRead store_read(const KvStore & s, const KvPolicy & policy, const AttnSpan & sp, bool on_cpu) {
    if (!on_cpu || policy.gathered() || !(ggml_is_quantized(s.k->type) || ggml_is_quantized(s.v->type))) {
        return StoreRead::AsStored;
    }
    if (sp.n_tokens <= kDirectMaxQueries && attention_quantized_reads(s.k->type, s.v->type)) return StoreRead::Direct;
    return StoreRead::Dequantized;
}

// What a span reads of one of a store's tensors (K or V), as [head_dim, n, n_head_kv] (kv_plan.h,
// AttnSpan): a pool's cells in place (as stored, or dequantized) or gathered (n_store of them: a residual's
// columns come from residual_tail), or a ring's gathered cells copied out as f16 rows on every backend
// (kv_gather.h says why), then, with a residual, the residual's rows and the span's own rows `cur` after
// them (all n_kv columns). With a residual, the span's last positions are written to it here: from the
// rows just read, so the write comes after the read of the cells it overwrites.
ggml_tensor * read_cells(GraphBuild & b, const KvStore & s, ggml_tensor * store, ggml_tensor * residual,
                         const AttnSpan & sp, const SpanInputs & in, ggml_tensor * cur, bool on_cpu, bool dequantized) {
    ggml_context * ctx = b.ctx;
    const HParams & hp = b.model.hp();
    const int64_t d = hp.head_dim;
    if (!in.gather) {
        const size_t row = ggml_row_size(store->type, store->ne[0]);
        ggml_tensor * cells =
            ggml_view_3d(ctx, store, d, sp.n_store(), hp.n_head_kv, row, ggml_row_size(store->type, d), sp.kv_lo * row);
        return dequantized && store->type != kDequantized ? cells_converted(ctx, cells, kDequantized, on_cpu) : cells;
    }
    ggml_tensor * rows = nullptr;
    if (b.kv.groups()[s.group].policy->pooled()) {  // scattered cells of a pooled store
        rows = gather_rows_as_stored(ctx, store, in.gather, on_cpu);
        if (dequantized && store->type != kDequantized) rows = cells_converted(ctx, rows, kDequantized, on_cpu);
        return ggml_view_3d(ctx, rows, d, sp.n_store(), hp.n_head_kv, rows->nb[1], ggml_row_size(rows->type, d), 0);
    } else {
        // the ring's rows; with a residual, the residual's, then the span's own as the residual holds them
        ggml_tensor * own = sp.residual ? ggml_view_2d(ctx, cur, cur->ne[0], sp.n_tokens, cur->nb[1], sp.t0 * cur->nb[1])
                                        : nullptr;
        rows = gather_span_rows_f16(ctx, store, in.gather, residual, in.res_read, own, on_cpu);
        if (in.res_dst) {  // the span's last n_res_write rows (its own, the last columns)
            ggml_tensor * last = ggml_view_2d(ctx, rows, rows->ne[0], sp.n_res_write, rows->nb[1],
                                              (sp.n_kv - sp.n_res_write) * rows->nb[1]);
            ggml_build_forward_expand(b.gf, ggml_set_rows(ctx, residual, last, in.res_dst));
        }
    }
    return ggml_view_3d(ctx, rows, d, sp.n_kv, hp.n_head_kv, rows->nb[1], ggml_row_size(rows->type, d), 0);
}

// A pooled span's f16 columns beside a residual: the residual's rows it reads, then its own rows `cur` rounded
// to f16, as [head_dim, n_res + n_tokens, n_head_kv] F16; the span's last positions are written to the
// residual from these rows (after their read).
ggml_tensor * residual_tail(GraphBuild & b, ggml_tensor * residual, const AttnSpan & sp, const SpanInputs & in,
                            ggml_tensor * cur, bool on_cpu) {
    ggml_context * ctx = b.ctx;
    const HParams & hp = b.model.hp();
    ggml_tensor * own = ggml_view_2d(ctx, cur, cur->ne[0], sp.n_tokens, cur->nb[1], sp.t0 * cur->nb[1]);
    ggml_tensor * rows = gather_span_rows_f16(ctx, residual, in.res_read, nullptr, nullptr, own, on_cpu);
    if (in.res_dst) {
        ggml_tensor * last = ggml_view_2d(ctx, rows, rows->ne[0], sp.n_res_write, rows->nb[1],
                                          (rows->ne[1] - sp.n_res_write) * rows->nb[1]);
        ggml_build_forward_expand(b.gf, ggml_set_rows(ctx, residual, last, in.res_dst));
    }
    return ggml_view_3d(ctx, rows, hp.head_dim, rows->ne[1], hp.n_head_kv, rows->nb[1],
                        ggml_row_size(rows->type, hp.head_dim), 0);
}

// The store's columns and the f16 columns of a pooled span with a residual, as one tensor of `type` for
// ggml's flash attention.
ggml_tensor * joined(ggml_context * ctx, ggml_tensor * cells, ggml_tensor * tail, ggml_type type, bool on_cpu) {
    if (on_cpu) {
        if (cells->type != type) cells = cells_converted(ctx, cells, type, on_cpu);
        return ggml_concat(ctx, cells, tail->type == type ? tail : ggml_cast(ctx, tail, type), 1);
    }
    // elsewhere ggml copies q8_0/q4_0 cells to f32 only
    ggml_tensor * all = ggml_concat(ctx, cells->type == GGML_TYPE_F32 ? cells : ggml_cast(ctx, cells, GGML_TYPE_F32),
                                    ggml_cast(ctx, tail, GGML_TYPE_F32), 1);
    return type == GGML_TYPE_F32 ? all : ggml_cast(ctx, all, type);
}

}  // namespace

ggml_tensor * build_attention(GraphBuild & b, int il, ggml_tensor * q_cur, ggml_tensor * k_cur, ggml_tensor * v_cur,
                              float kq_scale) {
    ggml_context * ctx = b.ctx;
    const HParams & hp = b.model.hp();
    const KvStore & s = b.kv.store(il);
    const std::vector<AttnSpan> & spans = b.plan.groups[s.group].spans;
    const int64_t d = hp.head_dim, n_embd_gqa = hp.n_embd_k_gqa();
    const bool tap = b.tap_layer == il;
    if (tap) {
        ggml_set_output(q_cur);  // not overwritten by later nodes: read after the compute
        b.in.tap_q = q_cur;
    }

    // A quantized store holds K and V rotated (kv_rotation.h): Q turns with K, the output turns back below.
    ggml_tensor * rot_k = s.rot.k ? b.in.rotations.get(ctx, s.rot.k) : nullptr;
    ggml_tensor * rot_v = s.rot.v ? b.in.rotations.get(ctx, s.rot.v) : nullptr;
    if (rot_k) {
        q_cur = rotate(ctx, q_cur, rot_k);
        k_cur = rotate(ctx, k_cur, rot_k);
    }
    if (rot_v) v_cur = rotate(ctx, v_cur, rot_v);

    // Write: rows of the store at the cells the policy chose (F32 -> store type, quantizing if needed).
    ggml_tensor * idx = b.in.write_idx[s.group];
    ggml_tensor * k_rows = ggml_reshape_2d(ctx, k_cur, n_embd_gqa, b.n_tokens);
    ggml_tensor * v_rows = ggml_reshape_2d(ctx, v_cur, n_embd_gqa, b.n_tokens);
    ggml_build_forward_expand(b.gf, ggml_set_rows(ctx, s.k, k_rows, idx));
    ggml_build_forward_expand(b.gf, ggml_set_rows(ctx, s.v, v_rows, idx));

    // Read: per span (a run of one sequence's tokens), the cells of that sequence it reads (kv_cache.h), as
    // [head_dim, n_kv, n_head_kv]; cell order does not matter, the mask does. The mask is the group's,
    // shared by all its layers (causal for FULL, sink + window for LAZY, window for SWA).
    const bool on_cpu = ggml_backend_buffer_is_host(s.buffer.get());
    const KvPolicy & policy = *b.kv.groups()[s.group].policy;
    ggml_tensor * out = nullptr;  // [head_dim, n_head, n_tokens]
    for (size_t r = 0; r < spans.size(); ++r) {
        const AttnSpan & sp = spans[r];
        const SpanInputs & in = b.in.spans[s.group][r];
        const StoreRead how = store_read(s, policy, sp, on_cpu);
        ggml_tensor * k = read_cells(b, s, s.k, s.k_res, sp, in, k_rows, on_cpu, how == StoreRead::Dequantized);
        ggml_tensor * v = read_cells(b, s, s.v, s.v_res, sp, in, v_rows, on_cpu, how == StoreRead::Dequantized);
        if (b.probe) build_probe(b, il, q_cur, k, v);  // one sequence: one span; the store's cells
        // A pool with a residual: its cells (k, v), then the f16 columns (kv_policy_full.cpp).
        ggml_tensor * k_tail = nullptr;
        ggml_tensor * v_tail = nullptr;
        if (sp.residual && policy.pooled()) {
            k_tail = residual_tail(b, s.k_res, sp, in, k_rows, on_cpu);
            v_tail = residual_tail(b, s.v_res, sp, in, v_rows, on_cpu);
            if (how != StoreRead::Direct) {
                const ggml_type t = how == StoreRead::Dequantized ? kDequantized : GGML_TYPE_F16;
                k = joined(ctx, k, k_tail, t, on_cpu);
                v = joined(ctx, v, v_tail, t, on_cpu);
            }
        }
        ggml_tensor * q = q_cur;
        if (spans.size() > 1) {
            q = ggml_view_3d(ctx, q_cur, d, hp.n_head, sp.n_tokens, q_cur->nb[1], q_cur->nb[2], sp.t0 * q_cur->nb[2]);
        }
        ggml_tensor * o = nullptr;
        if (how == StoreRead::Direct) {
            o = attention_quantized(ctx, q, k, v, in.kq_mask, kq_scale, false, k_tail, v_tail);
        } else {
            q = ggml_permute(ctx, q, 0, 2, 1, 3);  // [head_dim, n_tokens, n_head]
            o = ggml_flash_attn_ext(ctx, q, k, v, in.kq_mask, kq_scale, 0.0f, 0.0f);
            ggml_flash_attn_ext_set_prec(o, GGML_PREC_F32);
        }
        out = out ? ggml_concat(ctx, out, o, 2) : o;
    }
    out = ggml_reshape_2d(ctx, out, d * hp.n_head, b.n_tokens);
    if (rot_v) out = rotate(ctx, out, rot_v);
    if (tap) {
        ggml_set_output(out);
        b.in.tap_out = out;
    }
    return out;
}

}  // namespace simkv
