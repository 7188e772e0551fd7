#include "attention_quantized.h"

#include "dequantize.h"
#include "ggml_cpu_vec.h"
#include "quant_blocks.h"

#include <ggml-cpu.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>


namespace simkv {

namespace {

constexpr int64_t kCellBlock = 256;  // cells per work item (KV shapes are multiples of kCellPad = 256)

// The op's parameters travel in its userdata pointer (ggml keeps the pointer, not what it points to):
// the scale's bits, and whether to take the portable code.
struct OpParams {
    float scale;
    bool portable;
};
static_assert(sizeof(uintptr_t) >= 8, "64-bit pointers carry the op's parameters");
void * pack(OpParams p) {
    uint32_t bits;
    std::memcpy(&bits, &p.scale, 4);
    return (void *) (uintptr_t) ((uint64_t) bits | ((uint64_t) p.portable << 32));
}
OpParams unpack(void * ud) {
    const uint64_t v = (uint64_t) (uintptr_t) ud;
    OpParams p;
    const uint32_t bits = (uint32_t) v;
    std::memcpy(&p.scale, &bits, 4);
    p.portable = (v >> 32) & 1;
    return p;
}

// A work item's scratch, one per thread (ggml's threads live as long as the process's thread pool).
struct Scratch {
    std::vector<BlockQ8> q;        // the item's query rows quantized, rows x blocks
    std::vector<float> q_scale;    // their block scales as f32, rows x blocks
    std::vector<float> mask;       // n_tokens x kCellBlock
    std::vector<uint8_t> visible;  // kCellBlock: some token sees the cell
    std::vector<float> score;      // rows x kCellBlock
    std::vector<float> prob;       // rows x kCellBlock: e^(score - row max), 0 where hidden
    std::vector<float> acc;        // rows x d
    std::vector<float> v;          // one value's head row, dequantized (portable code)
    std::vector<float> row_max, row_sum;
};

// What an item reads: KV head hk's cells [c0, c0 + nc) of K and V, with its rows (token t, query head g
// of hk's group: row t * group + g).
struct Item {
    const ggml_tensor * k;
    const ggml_tensor * v;
    int64_t hk, c0, nc, d, n_rows, group;
    float scale;
    const char * key(int64_t j) const { return (const char *) k->data + (c0 + j) * k->nb[1] + hk * k->nb[2]; }
    const char * value(int64_t j) const { return (const char *) v->data + (c0 + j) * v->nb[1] + hk * v->nb[2]; }
    // the mask of row r's token at cell j, -inf where hidden
    float mask(const Scratch & s, int64_t r, int64_t j) const { return s.mask[(r / group) * kCellBlock + j]; }
};

// The two inner loops of an item: scores (scale * q.k + mask, -inf where hidden) of every row and cell,
// and acc[r] += prob[r][j] * v[j] over the cells. Portable: ggml-cpu's own vec_dot (the one its flash
// attention uses) and ggml's dequantization, a cell at a time.
struct PortableRows {
    ggml_vec_dot_t dot;
    ggml_to_float_t v_to_float;
    PortableRows(ggml_type k_type, ggml_type v_type)
        : dot(ggml_get_type_traits_cpu(k_type)->vec_dot), v_to_float(ggml_get_type_traits(v_type)->to_float) {}

    void scores(const Item & it, Scratch & s) const {
        for (int64_t j = 0; j < it.nc; ++j) {
            for (int64_t r = 0; r < it.n_rows; ++r) {
                float & out = s.score[r * kCellBlock + j];
                const float m = it.mask(s, r, j);
                if (m == -INFINITY) {
                    out = -INFINITY;
                    continue;
                }
                dot((int) it.d, &out, 0, it.key(j), 0, s.q.data() + r * (it.d / 32), 0, 1);
                out = out * it.scale + m;
            }
        }
    }
    void values(const Item & it, Scratch & s) const {
        s.v.resize((size_t) it.d);
        for (int64_t j = 0; j < it.nc; ++j) {
            if (!s.visible[j]) continue;
            v_to_float(it.value(j), s.v.data(), it.d);  // ggml-base's scalar loop
            for (int64_t r = 0; r < it.n_rows; ++r) {
                const float w = s.prob[r * kCellBlock + j];
                if (w == 0.0f) continue;
                float * a = s.acc.data() + r * it.d;
                for (int64_t i = 0; i < it.d; ++i) a[i] += w * s.v[i];
            }
        }
    }
};

#ifdef SIMKV_X86
SIMKV_AVX2 inline float hsum(__m256 x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// The same arithmetic as ggml's AVX2 q8_0 dot: per block, the scales' product times the integer dot
// product of 32 int8 pairs (sign trick for maddubs), accumulated with FMA; up to four rows per pass over
// a key, and a value block added to up to three rows' accumulators held in registers.
struct Avx2Rows {
    ggml_type k_type, v_type;

    SIMKV_AVX2 void scores(const Item & it, Scratch & s) const {
        const int64_t nb = it.d / 32;
        const size_t k_block = ggml_type_size(k_type);
        const __m256i ones = _mm256_set1_epi16(1);
        for (int64_t j = 0; j < it.nc; ++j) {
            if (!s.visible[j]) {
                for (int64_t r = 0; r < it.n_rows; ++r) s.score[r * kCellBlock + j] = -INFINITY;
                continue;
            }
            const char * key = it.key(j);
            for (int64_t r0 = 0; r0 < it.n_rows; r0 += 4) {
                const int64_t nr = std::min<int64_t>(4, it.n_rows - r0);
                __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
                for (int64_t b = 0; b < nb; ++b) {
                    const char * kb = key + b * k_block;
                    uint16_t h;
                    std::memcpy(&h, kb, 2);
                    const float dk = _cvtsh_ss(h);
                    const __m256i x = block_int8(k_type, kb);
                    const __m256i ax = _mm256_sign_epi8(x, x);
                    for (int64_t rr = 0; rr < nr; ++rr) {
                        const int64_t r = r0 + rr;
                        const __m256i y = _mm256_loadu_si256((const __m256i *) s.q[r * nb + b].qs);
                        const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(y, x)), ones);
                        acc[rr] = _mm256_fmadd_ps(_mm256_set1_ps(dk * s.q_scale[r * nb + b]), _mm256_cvtepi32_ps(dot),
                                                  acc[rr]);
                    }
                }
                for (int64_t rr = 0; rr < nr; ++rr) {
                    const float m = it.mask(s, r0 + rr, j);
                    s.score[(r0 + rr) * kCellBlock + j] = m == -INFINITY ? -INFINITY : hsum(acc[rr]) * it.scale + m;
                }
            }
        }
    }

    SIMKV_AVX2 void values(const Item & it, Scratch & s) const {
        const int64_t nb = it.d / 32;
        const size_t v_block = ggml_type_size(v_type);
        for (int64_t b = 0; b < nb; ++b) {
            for (int64_t r0 = 0; r0 < it.n_rows; r0 += 3) {
                const int64_t nr = std::min<int64_t>(3, it.n_rows - r0);
                __m256 acc[3][4];
                for (int64_t rr = 0; rr < 3; ++rr) {
                    for (int i = 0; i < 4; ++i) acc[rr][i] = _mm256_setzero_ps();
                }
                const float * p[3];
                for (int64_t rr = 0; rr < 3; ++rr) p[rr] = s.prob.data() + (r0 + std::min(rr, nr - 1)) * kCellBlock;
                for (int64_t j = 0; j < it.nc; ++j) {
                    if (p[0][j] == 0.0f && p[1][j] == 0.0f && p[2][j] == 0.0f) continue;
                    __m256 v[4];
                    block_f32(v_type, it.value(j) + b * v_block, v);
                    for (int64_t rr = 0; rr < nr; ++rr) {
                        const __m256 w = _mm256_set1_ps(p[rr][j]);
                        for (int i = 0; i < 4; ++i) acc[rr][i] = _mm256_fmadd_ps(w, v[i], acc[rr][i]);
                    }
                }
                for (int64_t rr = 0; rr < nr; ++rr) {
                    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(s.acc.data() + (r0 + rr) * it.d + 32 * b + 8 * i, acc[rr][i]);
                }
            }
        }
    }
};
#endif

// One work item: KV head hk over cell block `block`, for every token of the span and every query head of
// hk's group. Writes the item's partials [M, S, acc[d]] per (token, head) at its cell block.
template <class Rows>
void attend_block(const Rows & rows, ggml_tensor * dst, int64_t hk, int64_t block, float scale, Scratch & s) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * mask = dst->src[3];
    const int64_t d = q->ne[0], n_head = q->ne[1], n_tok = q->ne[2], n_kv = dst->src[1]->ne[1];
    const int64_t group = n_head / dst->src[1]->ne[2], n_rows = n_tok * group, nb = d / 32;
    const int64_t c0 = block * kCellBlock;
    const Item it{dst->src[1], dst->src[2], hk, c0, std::min(kCellBlock, n_kv - c0), d, n_rows, group, scale};

    s.q.resize((size_t) (n_rows * nb));
    s.q_scale.resize((size_t) (n_rows * nb));
    s.mask.resize((size_t) (n_tok * kCellBlock));
    s.visible.assign((size_t) kCellBlock, 0);
    s.score.resize((size_t) (n_rows * kCellBlock));
    s.prob.resize((size_t) (n_rows * kCellBlock));
    s.acc.assign((size_t) (n_rows * d), 0.0f);
    s.row_max.resize((size_t) n_rows);
    s.row_sum.resize((size_t) n_rows);

    for (int64_t t = 0; t < n_tok; ++t) {
        float * m = s.mask.data() + t * kCellBlock;
        ggml_fp16_to_fp32_row((const ggml_fp16_t *) ((const char *) mask->data + t * mask->nb[1]) + c0, m, it.nc);
        for (int64_t j = 0; j < it.nc; ++j) s.visible[j] |= m[j] != -INFINITY;
    }
    // The query rows quantized as ggml's flash attention quantizes them.
    const ggml_from_float_t to_q8 = ggml_get_type_traits_cpu(GGML_TYPE_Q8_0)->from_float;
    for (int64_t r = 0; r < n_rows; ++r) {
        const int64_t t = r / group, h = hk * group + r % group;
        to_q8((const float *) ((const char *) q->data + t * q->nb[2] + h * q->nb[1]), s.q.data() + r * nb, d);
        for (int64_t b = 0; b < nb; ++b) s.q_scale[r * nb + b] = ggml_fp16_to_fp32(s.q[r * nb + b].d);
    }

    rows.scores(it, s);
    for (int64_t r = 0; r < n_rows; ++r) {
        const float * sc = s.score.data() + r * kCellBlock;
        float * p = s.prob.data() + r * kCellBlock;
        const float mx = *std::max_element(sc, sc + it.nc);
        s.row_max[r] = mx;
        if (mx == -INFINITY) {
            std::fill(p, p + it.nc, 0.0f);
            s.row_sum[r] = 0.0f;
            continue;
        }
        s.row_sum[r] = (float) ggml_vec_soft_max_f32((int) it.nc, p, sc, mx);
        // Weights below f32's normal range add nothing a sum >= 1 can hold; as subnormals they would
        // slow every multiply they enter.
        for (int64_t j = 0; j < it.nc; ++j) p[j] = p[j] < 1e-30f ? 0.0f : p[j];
    }
    rows.values(it, s);

    for (int64_t r = 0; r < n_rows; ++r) {
        const int64_t t = r / group, h = hk * group + r % group;
        float * out = (float *) ((char *) dst->data + block * dst->nb[3] + t * dst->nb[2] + h * dst->nb[1]);
        out[0] = s.row_max[r];
        out[1] = s.row_sum[r];
        std::memcpy(out + 2, s.acc.data() + r * d, (size_t) d * sizeof(float));
    }
}

// ggml custom op: dst = partials F32 [2 + d, n_head, n_tokens, n_blocks]; src q, k, v, mask. Items (cell
// block, KV head), in that order, are split into one contiguous share per thread: a thread reads whole rows
// of its cells, each KV head's part in turn while the rows are in cache, so a row comes from memory once.
void attend_partials(ggml_tensor * dst, int ith, int nth, void * ud) {
    const OpParams prm = unpack(ud);
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];
    const int64_t n_head_kv = k->ne[2], n_items = n_head_kv * dst->ne[3];
    const int64_t per = (n_items + nth - 1) / nth, first = ith * per, last = std::min(n_items, first + per);
    thread_local Scratch s;
#ifdef SIMKV_X86
    if (!prm.portable && cpu_has_avx2()) {
        const Avx2Rows rows{k->type, v->type};
        for (int64_t i = first; i < last; ++i) attend_block(rows, dst, i % n_head_kv, i / n_head_kv, prm.scale, s);
        return;
    }
#endif
    const PortableRows rows(k->type, v->type);
    for (int64_t i = first; i < last; ++i) attend_block(rows, dst, i % n_head_kv, i / n_head_kv, prm.scale, s);
}

// ggml custom op: dst F32 [d, n_head, n_tokens] from the partials of every cell block (the max-shifted
// sums combined as ggml combines its split-KV chunks); rows (head, token) split across threads.
void combine_partials(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * part = dst->src[0];
    const int64_t d = dst->ne[0], n_head = dst->ne[1], n_rows = n_head * dst->ne[2], n_blocks = part->ne[3];
    std::vector<float> acc((size_t) d);
    for (int64_t row = ith; row < n_rows; row += nth) {
        const int64_t h = row % n_head, t = row / n_head;
        float m = -INFINITY, sum = 0.0f;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t b = 0; b < n_blocks; ++b) {
            const float * p = (const float *) ((const char *) part->data + b * part->nb[3] + t * part->nb[2] + h * part->nb[1]);
            if (p[1] == 0.0f) continue;
            const float m_new = std::max(m, p[0]);
            const float old_w = std::exp(m - m_new), new_w = std::exp(p[0] - m_new);
            for (int64_t i = 0; i < d; ++i) acc[i] = acc[i] * old_w + p[2 + i] * new_w;
            sum = sum * old_w + p[1] * new_w;
            m = m_new;
        }
        const float inv = sum == 0.0f ? 0.0f : 1.0f / sum;
        float * out = (float *) ((char *) dst->data + t * dst->nb[2] + h * dst->nb[1]);
        for (int64_t i = 0; i < d; ++i) out[i] = acc[i] * inv;
    }
}

// ggml custom op: dst = partials F32 [2 + d, n_head, n_tokens, 1] of f16 columns: src q, k_tail, v_tail
// ([d, n_tail, n_head_kv] F16 views), mask (their columns, [n_tail, n_tokens] F16). Each (token, head) row in
// f32: scores, their max and the shifted sum, the weighted sum of values; rows split across threads.
void attend_tail(ggml_tensor * dst, int ith, int nth, void * ud) {
    const float scale = unpack(ud).scale;
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];
    const ggml_tensor * mask = dst->src[3];
    const int64_t d = q->ne[0], n_head = q->ne[1], n_tok = q->ne[2], n = k->ne[1], group = n_head / k->ne[2];
    thread_local std::vector<float> row, sc, acc;  // a thread's scratch, as attend_partials' (no allocation per step)
    row.resize((size_t) d);
    sc.resize((size_t) n);
    acc.resize((size_t) d);
    for (int64_t r = ith; r < n_head * n_tok; r += nth) {
        const int64_t h = r % n_head, t = r / n_head, hk = h / group;
        const float * qr = (const float *) ((const char *) q->data + t * q->nb[2] + h * q->nb[1]);
        const auto * mr = (const ggml_fp16_t *) ((const char *) mask->data + t * mask->nb[1]);
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
            const float m = ggml_fp16_to_fp32(mr[j]);
            if (m == -INFINITY) {
                sc[j] = -INFINITY;
                continue;
            }
            ggml_fp16_to_fp32_row((const ggml_fp16_t *) ((const char *) k->data + j * k->nb[1] + hk * k->nb[2]), row.data(), d);
            float dot = 0.0f;
            for (int64_t i = 0; i < d; ++i) dot += qr[i] * row[i];
            sc[j] = dot * scale + m;
            mx = std::max(mx, sc[j]);
        }
        float sum = 0.0f;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t j = 0; mx != -INFINITY && j < n; ++j) {
            if (sc[j] == -INFINITY) continue;
            const float w = std::exp(sc[j] - mx);
            sum += w;
            ggml_fp16_to_fp32_row((const ggml_fp16_t *) ((const char *) v->data + j * v->nb[1] + hk * v->nb[2]), row.data(), d);
            for (int64_t i = 0; i < d; ++i) acc[i] += w * row[i];
        }
        float * out = (float *) ((char *) dst->data + t * dst->nb[2] + h * dst->nb[1]);
        out[0] = mx;
        out[1] = sum;
        std::memcpy(out + 2, acc.data(), (size_t) d * sizeof(float));
    }
}

bool reads_type(ggml_type t) { return t == GGML_TYPE_Q8_0 || t == GGML_TYPE_Q4_0; }

}  // namespace

bool attention_quantized_reads(ggml_type k, ggml_type v) { return reads_type(k) && reads_type(v); }

ggml_tensor * attention_quantized(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v,
                                  ggml_tensor * mask, float scale, bool portable, ggml_tensor * k_tail, ggml_tensor * v_tail) {
    const int64_t d = q->ne[0], n_head = q->ne[1], n_tok = q->ne[2], n_kv = k->ne[1];
    const int64_t n_blocks = (n_kv + kCellBlock - 1) / kCellBlock;
    ggml_tensor * cells_mask = k_tail ? ggml_view_2d(ctx, mask, n_kv, mask->ne[1], mask->nb[1], 0) : mask;
    ggml_tensor * args[4] = {q, k, v, cells_mask};
    ggml_tensor * part = ggml_custom_4d(ctx, GGML_TYPE_F32, 2 + d, n_head, n_tok, n_blocks, args, 4, attend_partials,
                                        GGML_N_TASKS_MAX, pack({scale, portable}));
    if (k_tail) {
        const int64_t n_tail = k_tail->ne[1];
        ggml_tensor * tail_mask = ggml_view_2d(ctx, mask, n_tail, mask->ne[1], mask->nb[1], n_kv * ggml_element_size(mask));
        ggml_tensor * targs[4] = {q, k_tail, v_tail, tail_mask};
        ggml_tensor * tail = ggml_custom_4d(ctx, GGML_TYPE_F32, 2 + d, n_head, n_tok, 1, targs, 4, attend_tail,
                                            GGML_N_TASKS_MAX, pack({scale, portable}));
        part = ggml_concat(ctx, part, tail, 3);
    }
    return ggml_custom_4d(ctx, GGML_TYPE_F32, d, n_head, n_tok, 1, &part, 1, combine_partials, GGML_N_TASKS_MAX, nullptr);
}

}  // namespace simkv
