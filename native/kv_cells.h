// A group's cell map: which position of which sequence each cell of the group's stores holds, and which
// positions a quantized ring's f16 residual holds. It is the one owner of those facts and of the counts
// derived from them (cells in use, free cells): it changes only through the mutators below, which keep the
// counts consistent with the map, so no caller adjusts a count by hand.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

namespace simkv {

class KvCells {
public:
    KvCells() = default;
    // n_cells empty cells; a residual of residual_per_seq cells for each of n_seq sequences (0: none).
    KvCells(uint32_t n_cells, uint32_t n_seq, uint32_t residual_per_seq);
    // A saved map (kv_state.cpp), checked: sizes that fit, sequences in range, and the saved counts equal to
    // what the map says. Throws BadInput otherwise.
    static KvCells restore(std::vector<int32_t> pos, std::vector<int32_t> seq, std::vector<int32_t> residual,
                           uint32_t n_seq, uint32_t residual_per_seq, uint32_t n_used, uint32_t n_free);

    uint32_t size() const { return (uint32_t) pos_.size(); }
    // Cells [0, used()) may hold a position; the rest are empty (a view over [0, used()) misses nothing).
    uint32_t used() const { return n_used_; }
    uint32_t n_free() const { return n_free_; }
    bool holds(uint32_t c) const { return pos_[c] >= 0; }
    int32_t pos(uint32_t c) const { return pos_[c]; }  // -1: empty
    int32_t seq(uint32_t c) const { return seq_[c]; }  // meaningful where holds(c)
    // The whole map, for the mask rows (kv_mask.h) and the state file (kv_state.cpp).
    const std::vector<int32_t> & positions() const { return pos_; }
    const std::vector<int32_t> & sequences() const { return seq_; }

    // (position, cell) of every position sequence seq holds, in position order.
    std::vector<std::pair<int32_t, uint32_t>> positions_of(int32_t seq) const;
    uint32_t count(int32_t seq) const;

    // Cell c now holds position pos of sequence seq (whatever it held before is overwritten, as a ring does).
    void set(uint32_t c, int32_t pos, int32_t seq);
    // Empties every cell, and every residual cell, whose (sequence, position) `drop` selects, and shrinks
    // used() to the highest cell still holding something, so the next ubatch attends over as few cells as a
    // fresh context would (llama.cpp does the same).
    template <class Drop>
    void drop_if(Drop drop);
    void clear() {
        drop_if([](int32_t, int32_t) { return true; });
    }

    // The residual: residual_per_seq() cells per sequence, sequence s's from s * residual_per_seq().
    uint32_t residual_per_seq() const { return res_per_seq_; }
    const std::vector<int32_t> & residual() const { return res_; }
    int32_t residual_pos(uint32_t c) const { return res_[c]; }  // -1: empty
    void set_residual(uint32_t c, int32_t pos) { res_[c] = pos; }

    bool operator==(const KvCells & o) const { return pos_ == o.pos_ && seq_ == o.seq_ && res_ == o.res_; }
    bool operator!=(const KvCells & o) const { return !(*this == o); }

private:
    std::vector<int32_t> pos_, seq_, res_;
    uint32_t res_per_seq_ = 0;
    uint32_t n_used_ = 0, n_free_ = 0;
};

template <class Drop>
void KvCells::drop_if(Drop drop) {
    for (uint32_t c = 0; c < res_.size(); ++c) {
        if (res_[c] >= 0 && drop((int32_t) (c / res_per_seq_), res_[c])) res_[c] = -1;
    }
    uint32_t n_used = 0;
    for (uint32_t c = 0; c < n_used_; ++c) {
        if (pos_[c] >= 0 && drop(seq_[c], pos_[c])) {
            pos_[c] = -1;
            seq_[c] = -1;
            ++n_free_;
        }
        if (pos_[c] >= 0) n_used = c + 1;
    }
    n_used_ = n_used;
}

}  // namespace simkv
