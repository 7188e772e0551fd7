#include "kv_cells.h"

#include "errors.h"

#include <algorithm>

namespace simkv {

KvCells::KvCells(uint32_t n_cells, uint32_t n_seq, uint32_t residual_per_seq)
    : pos_(n_cells, -1), seq_(n_cells, -1), res_((size_t) residual_per_seq * n_seq, -1), res_per_seq_(residual_per_seq),
      n_free_(n_cells) {}

KvCells KvCells::restore(std::vector<int32_t> pos, std::vector<int32_t> seq, std::vector<int32_t> residual,
                         uint32_t n_seq, uint32_t residual_per_seq, uint32_t n_used, uint32_t n_free) {
    if (seq.size() != pos.size() || residual.size() != (size_t) residual_per_seq * n_seq) {
        throw BadInput("the state is corrupt (cell map sizes)");
    }
    KvCells m(0, 0, 0);
    m.res_per_seq_ = residual_per_seq;
    uint32_t used = 0, free = 0;
    for (uint32_t c = 0; c < pos.size(); ++c) {
        if (pos[c] < 0) {
            ++free;
            continue;
        }
        if (seq[c] < 0 || (uint32_t) seq[c] >= n_seq) throw BadInput("the state is corrupt (a cell's sequence)");
        used = c + 1;
    }
    if (used != n_used || free != n_free) throw BadInput("the state is corrupt (cell counts)");
    m.pos_ = std::move(pos);
    m.seq_ = std::move(seq);
    m.res_ = std::move(residual);
    m.n_used_ = used;
    m.n_free_ = free;
    return m;
}

std::vector<std::pair<int32_t, uint32_t>> KvCells::positions_of(int32_t seq) const {
    std::vector<std::pair<int32_t, uint32_t>> out;
    for (uint32_t c = 0; c < n_used_; ++c) {
        if (pos_[c] >= 0 && seq_[c] == seq) out.emplace_back(pos_[c], c);
    }
    std::sort(out.begin(), out.end());
    return out;
}

uint32_t KvCells::count(int32_t seq) const {
    uint32_t n = 0;
    for (uint32_t c = 0; c < n_used_; ++c) n += pos_[c] >= 0 && seq_[c] == seq;
    return n;
}

void KvCells::set(uint32_t c, int32_t pos, int32_t seq) {
    if (pos_[c] < 0) --n_free_;
    pos_[c] = pos;
    seq_[c] = seq;
    n_used_ = std::max(n_used_, c + 1);
}

}  // namespace simkv
