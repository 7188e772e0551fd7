#include "probe.h"

#include "graph.h"
#include "kv_cache.h"
#include "kv_mask.h"
#include "kv_policy.h"
#include "model.h"

#include <ggml-backend.h>

#include <cmath>
#include <limits>

namespace simkv {

void create_probe_inputs(GraphBuild & b) {
    ProbeGraph & pg = *b.probe;
    pg = ProbeGraph{};
    pg.ids = ggml_new_tensor_1d(b.ctx, GGML_TYPE_I32, b.n_probe);
    ggml_set_input(pg.ids);
    for (size_t gi = 0; gi < b.kv.groups().size(); ++gi) {
        const KvGroup & g = b.kv.groups()[gi];
        // The probe runs on one sequence (Engine::decode checks), so a group has one span. It reads the
        // store's cells (a residual's f16 columns are left out: the same keys, less rounded).
        const bool full = g.policy->kind() == KvKind::Full && !g.layers.empty();
        const uint32_t n_kv = full ? b.plan.groups[gi].spans.at(0).n_store() : 0;
        ggml_tensor * all = full ? ggml_new_tensor_2d(b.ctx, GGML_TYPE_F16, n_kv, b.n_probe) : nullptr;
        ggml_tensor * win = full ? ggml_new_tensor_2d(b.ctx, GGML_TYPE_F16, n_kv, b.n_probe) : nullptr;
        ggml_tensor * in = full ? ggml_new_tensor_2d(b.ctx, GGML_TYPE_F32, n_kv, b.n_probe) : nullptr;
        for (ggml_tensor * t : {all, win, in}) if (t) ggml_set_input(t);
        pg.mask_all.push_back(all);
        pg.mask_window.push_back(win);
        pg.in_window.push_back(in);
    }
    const size_t n_layer = b.model.hp().n_layer;
    pg.mass.assign(n_layer, nullptr);
    pg.num.assign(n_layer, nullptr);
    pg.den.assign(n_layer, nullptr);
}

void build_probe(GraphBuild & b, int il, ggml_tensor * q_cur, ggml_tensor * k, ggml_tensor * v) {
    ProbeGraph & pg = *b.probe;
    const KvStore & s = b.kv.store(il);
    if (!pg.mask_all[s.group]) return;  // this layer's group keeps no full history
    ggml_context * ctx = b.ctx;
    const HParams & hp = b.model.hp();
    const int64_t d = hp.head_dim, n_sel = pg.ids->ne[0];
    const float scale = 1.0f / std::sqrt((float) d);

    ggml_tensor * q = ggml_get_rows(ctx, ggml_reshape_2d(ctx, q_cur, d * hp.n_head, b.n_tokens), pg.ids);
    q = ggml_permute(ctx, ggml_reshape_3d(ctx, q, d, hp.n_head, n_sel), 0, 2, 1, 3);  // [d, n_sel, n_head]

    // Attention weights of the probed rows over every viewed cell (GQA: q head h reads k head h / group).
    ggml_tensor * kq = ggml_mul_mat(ctx, k, q);  // [n_kv, n_sel, n_head]
    ggml_mul_mat_set_prec(kq, GGML_PREC_F32);
    ggml_tensor * p = ggml_soft_max_ext(ctx, kq, pg.mask_all[s.group], scale, 0.0f);
    ggml_tensor * mass = ggml_sum_rows(ctx, ggml_mul(ctx, p, pg.in_window[s.group]));  // [1, n_sel, n_head]

    ggml_tensor * o_all = ggml_flash_attn_ext(ctx, q, k, v, pg.mask_all[s.group], scale, 0.0f, 0.0f);
    ggml_tensor * o_win = ggml_flash_attn_ext(ctx, q, k, v, pg.mask_window[s.group], scale, 0.0f, 0.0f);
    ggml_flash_attn_ext_set_prec(o_all, GGML_PREC_F32);
    ggml_flash_attn_ext_set_prec(o_win, GGML_PREC_F32);  // both [d, n_head, n_sel]
    ggml_tensor * num = ggml_sum_rows(ctx, ggml_sqr(ctx, ggml_sub(ctx, o_all, o_win)));  // [1, n_head, n_sel]
    ggml_tensor * den = ggml_sum_rows(ctx, ggml_sqr(ctx, o_all));

    for (ggml_tensor * t : {mass, num, den}) {
        ggml_set_output(t);
        ggml_build_forward_expand(b.gf, t);
    }
    pg.mass[il] = mass;
    pg.num[il] = num;
    pg.den[il] = den;
}

void ProbeAccumulator::reset(uint32_t n_layer) {
    mass_sum_.assign(n_layer, 0.0);
    change_sum_.assign(n_layer, 0.0);
    n_.assign(n_layer, 0);
}

void ProbeAccumulator::set_inputs(const ProbeGraph & pg, const UbatchPlan & plan, const ProbeSpec & spec,
                                  const std::vector<int32_t> & q_rows, const std::vector<int32_t> & q_pos,
                                  const std::vector<int32_t> & q_seq) {
    ggml_backend_tensor_set(pg.ids, q_rows.data(), 0, sizeof(int32_t) * q_rows.size());
    for (size_t gi = 0; gi < plan.groups.size(); ++gi) {
        if (!pg.mask_all[gi]) continue;
        const GroupPlan & g = plan.groups[gi];  // the cells once the probed ubatch is written
        const AttnSpan & sp = g.spans.at(0);
        const size_t n_sel = q_pos.size(), n_kv = sp.n_store();
        // What the full layer's query sees, and the same trimmed to sinks + window (kv_mask.h's rule).
        std::vector<ggml_fp16_t> all(n_sel * n_kv), win(n_sel * n_kv);
        fill_mask_rows(g.cells, sp.kv_lo, q_pos.data(), q_seq.data(), n_sel, (uint32_t) n_kv,
                       [](int32_t, int32_t) { return true; }, all.data());
        fill_mask_rows(g.cells, sp.kv_lo, q_pos.data(), q_seq.data(), n_sel, (uint32_t) n_kv,
                       [&spec](int32_t q, int32_t k) { return in_sink_or_window(spec.n_sink, spec.n_window, q, k); },
                       win.data());
        std::vector<float> in(n_sel * n_kv);
        for (size_t i = 0; i < in.size(); ++i) in[i] = win[i] == mask_visible() ? 1.0f : 0.0f;
        ggml_backend_tensor_set(pg.mask_all[gi], all.data(), 0, ggml_nbytes(pg.mask_all[gi]));
        ggml_backend_tensor_set(pg.mask_window[gi], win.data(), 0, ggml_nbytes(pg.mask_window[gi]));
        ggml_backend_tensor_set(pg.in_window[gi], in.data(), 0, ggml_nbytes(pg.in_window[gi]));
    }
}

void ProbeAccumulator::collect(const ProbeGraph & pg, uint32_t n_head, uint32_t n_sel) {
    std::vector<float> mass(n_head * n_sel), num(n_head * n_sel), den(n_head * n_sel);
    for (size_t il = 0; il < pg.mass.size(); ++il) {
        if (!pg.mass[il]) continue;
        ggml_backend_tensor_get(pg.mass[il], mass.data(), 0, sizeof(float) * mass.size());
        ggml_backend_tensor_get(pg.num[il], num.data(), 0, sizeof(float) * num.size());
        ggml_backend_tensor_get(pg.den[il], den.data(), 0, sizeof(float) * den.size());
        for (size_t i = 0; i < mass.size(); ++i) {
            mass_sum_[il] += mass[i];
            change_sum_[il] += den[i] > 0 ? std::sqrt((double) num[i] / den[i]) : 0.0;
        }
        n_[il] += mass.size();
    }
}

std::vector<double> ProbeAccumulator::mass() const {
    std::vector<double> out(n_.size(), std::numeric_limits<double>::quiet_NaN());
    for (size_t i = 0; i < n_.size(); ++i) if (n_[i]) out[i] = mass_sum_[i] / n_[i];
    return out;
}

std::vector<double> ProbeAccumulator::change() const {
    std::vector<double> out(n_.size(), std::numeric_limits<double>::quiet_NaN());
    for (size_t i = 0; i < n_.size(); ++i) if (n_[i]) out[i] = change_sum_[i] / n_[i];
    return out;
}

}  // namespace simkv
