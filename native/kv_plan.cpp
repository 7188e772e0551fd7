// Planning a ubatch (kv_plan.h): which cells its tokens are written to, what each span of a sequence's tokens
// reads and sees, and the cell maps once it is written. Everything here reads the cache and writes only the
// plan; KvCache::apply makes the plan's cell maps the cache's after the graph has run.
#include "kv_plan.h"

#include "graph.h"
#include "kv_cache.h"
#include "kv_mask.h"

#include <ggml-backend.h>

#include <algorithm>
#include <stdexcept>

namespace simkv {

namespace {

// Tokens from which a span over scattered cells is gathered (plan_ubatch). ggml's CPU flash attention
// computes every column for 64 queries or more (its tiled kernel) and skips hidden ones below.
constexpr uint32_t kGatherChunk = 32;

}  // namespace

UbatchPlan KvCache::plan_ubatch(const int32_t * pos, const int32_t * seq, uint32_t n_tokens, bool in_place) const {
    UbatchPlan plan;
    plan.layout_version = layout_version_;
    plan.groups.reserve(groups_.size());
    for (const KvGroup & g : groups_) {
        // A group without layers (e.g. the full group once exact prefill made every layer lazy) plans nothing.
        plan.groups.push_back(g.layers.empty() ? GroupPlan{} : plan_group(g, pos, seq, n_tokens, in_place));
    }
    return plan;
}

void KvCache::apply(UbatchPlan && plan) {
    if (plan.layout_version != layout_version_ || plan.groups.size() != groups_.size()) {
        throw std::logic_error("apply: the plan was made for another layout of the cache");
    }
    for (size_t gi = 0; gi < groups_.size(); ++gi) {
        if (!groups_[gi].layers.empty()) groups_[gi].cells = std::move(plan.groups[gi].cells);
    }
}

GroupPlan KvCache::plan_group(const KvGroup & g, const int32_t * pos, const int32_t * seq, uint32_t n_tokens,
                              bool in_place) const {
    const KvPolicy & p = *g.policy;
    GroupPlan gp;
    gp.cells = g.cells;  // the map this ubatch changes
    KvCells & cells = gp.cells;
    const uint32_t n_cells = cells.size();
    // Write first: the ubatch's own keys must be visible to its queries.
    gp.write_cells.resize(n_tokens);
    // A sequence lazy in this pool (dynamic mode) first gives back the cells its queries can no longer see
    // (the rule is monotone: a key out of the window stays out), so it holds sinks + window, as a ring.
    // Its first query here decides; one pass over the pool for every such sequence of the ubatch.
    std::vector<int32_t> first_q(n_seq_, -1);
    bool evict = false;
    for (uint32_t i = n_tokens; i-- > 0;) {
        if (g.seq_lazy[seq[i]]) {
            first_q[seq[i]] = pos[i];
            evict = true;
        }
    }
    if (evict) cells.drop_if([&](int32_t s, int32_t k) { return first_q[s] >= 0 && !lazy_view_->visible(first_q[s], k); });
    // The caller (Engine::decode) refuses a call the pool cannot take (cells_needed) before evaluating any of it.
    if (p.pooled() && cells.n_free() < n_tokens) throw std::runtime_error("plan_ubatch: more tokens than free cells");
    CellCursor cursor;
    for (uint32_t i = 0; i < n_tokens; ++i) gp.write_cells[i] = take_cell(g, cells, pos[i], seq[i], cursor);
    // Lazy rings are read through a gather of their visible cells (AttnSpan); the others in place, over
    // each sequence's span of cells (it holds at least the cells just written).
    const bool gathered = p.gathered();
    std::vector<uint32_t> lo(n_seq_, UINT32_MAX), hi(n_seq_, 0), held(n_seq_, 0);
    for (uint32_t c = 0; !gathered && c < cells.used(); ++c) {
        if (!cells.holds(c)) continue;
        const int32_t s = cells.seq(c);
        lo[s] = std::min(lo[s], c);
        hi[s] = c + 1;
        ++held[s];
    }
    // One attention per run of consecutive tokens of one sequence, over that sequence's cells only.
    for (uint32_t t0 = 0; t0 < n_tokens;) {
        uint32_t t1 = t0 + 1;
        while (t1 < n_tokens && seq[t1] == seq[t0]) ++t1;
        const int32_t s = seq[t0];
        AttnSpan sp;
        sp.t0 = t0;
        sp.n_tokens = t1 - t0;
        sp.mask_offset = gp.mask.size();
        // A chunk whose sequence's cells are scattered over a range half as large again as they are: a
        // gather (a lone query skips hidden columns cheaply and reads in place).
        const bool scattered = !gathered && !in_place && sp.n_tokens >= kGatherChunk && hi[s] - lo[s] > held[s] + held[s] / 2;
        if (gathered) {
            plan_gathered_span(g, gp, sp, pos, seq);
        } else if (scattered) {
            plan_pooled_gather(g, gp, sp, pos, seq);
        } else if (p.residual()) {
            plan_pooled_residual(g, gp, sp, pos, seq, lo[s], hi[s]);
        } else {
            sp.n_kv = std::min(n_cells, pad_cells(hi[s] - lo[s]));
            sp.kv_lo = std::min(lo[s], n_cells - sp.n_kv);
            gp.mask.resize(gp.mask.size() + (size_t) sp.n_tokens * sp.n_kv);
            const KvPolicy & v = view(g, s);
            auto visible = [&v](int32_t q, int32_t k) { return v.visible(q, k); };
            fill_mask_rows(cells, sp.kv_lo, pos + t0, seq + t0, sp.n_tokens, sp.n_kv, visible, gp.mask.data() + sp.mask_offset);
        }
        gp.spans.push_back(sp);
        t0 = t1;
    }
    return gp;
}

void KvCache::plan_pooled_gather(const KvGroup & g, GroupPlan & gp, AttnSpan & sp, const int32_t * pos,
                                 const int32_t * seq) const {
    const int32_t s = seq[sp.t0];
    const std::vector<std::pair<int32_t, uint32_t>> held = gp.cells.positions_of(s);
    const ResidualTail tail(*g.policy, gp.cells, s, pos[sp.t0], sp.n_tokens);
    // it holds at least the cells just written; with a residual the f16 columns follow, the whole padded
    const uint32_t n_tail = tail.columns();
    const uint32_t n_store = pad_cells((uint32_t) held.size() + n_tail) - n_tail;
    sp.n_kv = n_store + n_tail;
    sp.gather_offset = (int64_t) gp.gather.size();
    for (uint32_t j = 0; j < n_store; ++j) gp.gather.push_back((int32_t) held[j < held.size() ? j : 0].second);
    const KvPolicy & v = view(g, s);
    for (uint32_t i = 0; i < sp.n_tokens; ++i) {
        const int32_t q = pos[sp.t0 + i];
        for (uint32_t j = 0; j < n_store; ++j) {  // padding (j beyond the cells held) repeats a cell, hidden
            const int32_t k = j < held.size() ? held[j].first : -1;
            gp.mask.push_back(k >= 0 && k <= q && v.visible(q, k) && !tail.reads_f16(q, k) ? mask_visible() : mask_hidden());
        }
        tail.mask_row(q, [&v](int32_t qq, int32_t k) { return v.visible(qq, k); }, gp.mask);
    }
    tail.plan_io(gp, sp);
}

void KvCache::plan_pooled_residual(const KvGroup & g, GroupPlan & gp, AttnSpan & sp, const int32_t * pos,
                                   const int32_t * seq, uint32_t lo, uint32_t hi) const {
    // The sequence's span of cells in place, then the f16 columns; the whole a multiple of kCellPad where the
    // pool allows.
    const int32_t s = seq[sp.t0];
    const ResidualTail tail(*g.policy, gp.cells, s, pos[sp.t0], sp.n_tokens);
    const uint32_t n_cells = gp.cells.size(), n_tail = tail.columns();
    const uint32_t n_store = std::min(n_cells, pad_cells(hi - lo + n_tail) - n_tail);
    sp.kv_lo = std::min(lo, n_cells - n_store);
    sp.n_kv = n_store + n_tail;
    const KvPolicy & v = view(g, s);
    auto from_store = [&](int32_t q, int32_t k) { return v.visible(q, k) && !tail.reads_f16(q, k); };
    std::vector<ggml_fp16_t> rows((size_t) sp.n_tokens * n_store);
    fill_mask_rows(gp.cells, sp.kv_lo, pos + sp.t0, seq + sp.t0, sp.n_tokens, n_store, from_store, rows.data());
    for (uint32_t i = 0; i < sp.n_tokens; ++i) {
        gp.mask.insert(gp.mask.end(), rows.begin() + (size_t) i * n_store, rows.begin() + (size_t) (i + 1) * n_store);
        tail.mask_row(pos[sp.t0 + i], [&v](int32_t q, int32_t k) { return v.visible(q, k); }, gp.mask);
    }
    tail.plan_io(gp, sp);
}

void KvCache::plan_gathered_span(const KvGroup & g, GroupPlan & gp, AttnSpan & sp, const int32_t * pos,
                                 const int32_t * seq) const {
    const KvPolicy & p = *g.policy;
    const int32_t s = seq[sp.t0];
    const int32_t * q_pos = pos + sp.t0;
    const uint32_t n_q = sp.n_tokens, r0 = (uint32_t) s * g.region(), n_r = g.region();
    const ResidualTail tail(p, gp.cells, s, q_pos[0], n_q);
    auto from_ring = [&](int32_t q, int32_t k) { return p.visible(q, k) && !tail.reads_f16(q, k); };

    // The sequence's ring region, masked, then only the columns some query reads from it.
    std::vector<ggml_fp16_t> rows((size_t) n_q * n_r);
    fill_mask_rows(gp.cells, r0, q_pos, seq + sp.t0, n_q, n_r, from_ring, rows.data());
    std::vector<uint32_t> cols;
    for (uint32_t j = 0; j < n_r; ++j) {
        for (uint32_t i = 0; i < n_q; ++i) {
            if (rows[(size_t) i * n_r + j] == mask_visible()) {
                cols.push_back(j);
                break;
            }
        }
    }
    const uint32_t n_tail = tail.columns();  // f16 columns: the residual's, the span's own
    sp.n_kv = pad_cells(std::max<uint32_t>((uint32_t) cols.size(), 1) + n_tail);  // at least one ring row
    const uint32_t n_ring = sp.n_kv - n_tail;
    sp.gather_offset = (int64_t) gp.gather.size();
    // Padding (and a ring part no query reads) repeats a hidden cell. For a lone query (a decode step) it is
    // spread evenly among the read columns: ggml's flash attention splits a lone query's columns evenly
    // between threads, and padding bunched at the end left the last thread idle for much of its share.
    // Chunks keep it at the end, where their tiles see the columns in the order a full store has them
    // (a window covering the context then computes exactly what a full layer does).
    std::vector<int64_t> ring_col(n_ring, -1);  // index into cols, or -1 for padding
    const uint64_t n_pad = n_q == 1 ? n_ring - (uint32_t) cols.size() : 0;
    for (uint32_t k = 0, c = 0; k < n_ring && c < cols.size(); ++k) {
        const bool pad = (k + 1) * n_pad / n_ring > k * n_pad / n_ring;
        if (!pad) ring_col[k] = c++;
    }
    for (uint32_t k = 0; k < n_ring; ++k) gp.gather.push_back((int32_t) (r0 + (ring_col[k] >= 0 ? cols[ring_col[k]] : 0u)));
    for (uint32_t i = 0; i < n_q; ++i) {
        for (uint32_t k = 0; k < n_ring; ++k) gp.mask.push_back(ring_col[k] >= 0 ? rows[(size_t) i * n_r + cols[ring_col[k]]] : mask_hidden());
        tail.mask_row(q_pos[i], [&p](int32_t q, int32_t k) { return p.visible(q, k); }, gp.mask);
    }
    tail.plan_io(gp, sp);
}

KvCache::ResidualTail::ResidualTail(const KvPolicy & p, const KvCells & cells, int32_t seq, int32_t first, uint32_t n_q)
    : p_(p), cells_(cells), seq_(seq), first_(first), n_q_(n_q), R_((int32_t) p.residual()) {
    const uint32_t C = p.residual_capacity(), res0 = (uint32_t) seq * C;
    for (uint32_t c = res0; c < res0 + C; ++c) {
        const int32_t k = cells.residual_pos(c);
        if (k >= 0 && k > first - R_ && k < first) held_.push_back(k);
    }
    std::sort(held_.begin(), held_.end());
}

bool KvCache::ResidualTail::reads_f16(int32_t q, int32_t k) const {
    // in f16 here: the span's own key, or one the residual holds
    const bool in_f16 = R_ && (k >= first_ || cells_.residual_pos(p_.residual_cell(seq_, k)) == k);
    return in_f16 && p_.reads_residual(q, k);
}

template <class Visible>
void KvCache::ResidualTail::mask_row(int32_t q, Visible visible, std::vector<ggml_fp16_t> & mask) const {
    if (!R_) return;
    auto f16_mask = [&](int32_t k) { return k <= q && p_.reads_residual(q, k) && visible(q, k) ? mask_visible() : mask_hidden(); };
    for (int32_t k : held_) mask.push_back(f16_mask(k));
    for (size_t k = held_.size(); k < (size_t) R_ - 1; ++k) mask.push_back(mask_hidden());
    for (uint32_t t = 0; t < n_q_; ++t) mask.push_back(f16_mask(first_ + (int32_t) t));
}

void KvCache::ResidualTail::plan_io(GroupPlan & gp, AttnSpan & sp) const {
    sp.residual = R_ > 0;
    if (!sp.residual) return;
    // Always R - 1 residual columns (the most a span can read: positions first - R + 1 .. first - 1), padded
    // with a hidden cell: a decode step then has the shape of the one before, and its graph is reused.
    sp.n_res = (uint32_t) R_ - 1;
    // Read the residual, then keep the span's last C positions in it. (The graph writes them from the rows
    // it read, so a cell is overwritten only after it was read.)
    const uint32_t C = p_.residual_capacity(), res0 = (uint32_t) seq_ * C;
    sp.res_read_offset = gp.res_read.size();
    for (int32_t k : held_) gp.res_read.push_back((int32_t) p_.residual_cell(seq_, k));
    gp.res_read.resize(sp.res_read_offset + sp.n_res, (int32_t) res0);  // padding: hidden above
    sp.res_write_offset = gp.res_dst.size();
    for (uint32_t t = n_q_ > C ? n_q_ - C : 0; t < n_q_; ++t) {  // the last columns, in order
        const uint32_t cell = p_.residual_cell(seq_, first_ + (int32_t) t);
        gp.res_dst.push_back(cell);
        gp.cells.set_residual(cell, first_ + (int32_t) t);
    }
    sp.n_res_write = (uint32_t) (gp.res_dst.size() - sp.res_write_offset);
}

void UbatchPlan::set_inputs(const UbatchInputs & in) const {
    for (size_t gi = 0; gi < groups.size(); ++gi) {
        if (!in.write_idx[gi]) continue;  // a group without layers, or whose layers the graph skips
        const GroupPlan & gp = groups[gi];
        for (size_t r = 0; r < gp.spans.size(); ++r) {
            const SpanInputs & si = in.spans[gi][r];
            const AttnSpan & sp = gp.spans[r];
            ggml_backend_tensor_set(si.kq_mask, gp.mask.data() + sp.mask_offset, 0, ggml_nbytes(si.kq_mask));
            if (si.gather) ggml_backend_tensor_set(si.gather, gp.gather.data() + sp.gather_offset, 0, ggml_nbytes(si.gather));
            if (si.res_read) {
                ggml_backend_tensor_set(si.res_read, gp.res_read.data() + sp.res_read_offset, 0, ggml_nbytes(si.res_read));
            }
            if (si.res_dst) {
                ggml_backend_tensor_set(si.res_dst, gp.res_dst.data() + sp.res_write_offset, 0, ggml_nbytes(si.res_dst));
            }
        }
        ggml_backend_tensor_set(in.write_idx[gi], gp.write_cells.data(), 0, ggml_nbytes(in.write_idx[gi]));
    }
}

}  // namespace simkv
