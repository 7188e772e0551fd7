// A snapshot of one conversation's context (Llama.save_state / load_state): the engine's positions, then
// the KV cache as it is now (kv_state.cpp). What exact prefill compacted is saved compacted: loading it
// makes those layers lazy again first, so a loaded state continues bit-identically.
//
// Layout (state_io.h): magic, version, the model's shape, the engine's positions, then the cache's part.
// Everything is parsed and checked before the engine is touched; on a mismatch found after the structure
// was rebuilt, the engine is left empty (reset), never half-loaded.
#include "engine.h"
#include "errors.h"
#include "state_io.h"

#include <algorithm>
#include <cstring>

namespace simkv {

namespace {

constexpr char kMagic[8] = {'S', 'I', 'M', 'K', 'V', 'S', 'T', '1'};
constexpr uint32_t kVersion = 3;  // 3: a K type and a V type per layer

}  // namespace

std::string Engine::save_state() const {
    if (cfg_.n_seq_max != 1) throw BadInput("a state holds one conversation: this engine holds several sequences");
    const HParams & hp = model_->hp();
    StateWriter w;
    w.out.append(kMagic, sizeof kMagic);
    w.put(kVersion);
    w.put((uint32_t) hp.n_layer);
    w.put((uint32_t) hp.n_embd_k_gqa());
    w.put((uint32_t) hp.n_embd_v_gqa());
    w.put((uint32_t) n_past_[0]);
    w.put((uint32_t) n_written_[0]);
    w.put((uint8_t) compacted_);
    kv_->write_state(w);
    return std::move(w.out);
}

void Engine::load_state(const std::string & blob) {
    if (cfg_.n_seq_max != 1) throw BadInput("a state holds one conversation: this engine holds several sequences");
    const HParams & hp = model_->hp();
    StateReader r{blob.data(), blob.size()};
    r.need(sizeof kMagic);
    if (std::memcmp(r.p, kMagic, sizeof kMagic) != 0) throw BadInput("not a simkv state");
    r.p += sizeof kMagic;
    r.left -= sizeof kMagic;
    if (r.get<uint32_t>() != kVersion) throw BadInput("a simkv state of another version");
    const uint32_t n_layer = r.get<uint32_t>(), n_k = r.get<uint32_t>(), n_v = r.get<uint32_t>();
    if (n_layer != hp.n_layer || n_k != hp.n_embd_k_gqa() || n_v != hp.n_embd_v_gqa()) {
        throw BadInput("this state was saved from a model of another shape");
    }
    const uint32_t n_past = r.get<uint32_t>(), n_written = r.get<uint32_t>();
    const bool compacted = r.get<uint8_t>() != 0;
    const KvSnapshot snap = KvCache::read_state(r, hp.n_layer, (uint64_t) kMaxContext, blob.size());
    if (r.left != 0) throw BadInput("the state has trailing bytes: not a simkv state of this version");
    if (n_past > cfg_.n_ctx) throw BadInput("the state holds more tokens than this context (n_ctx) takes");

    // The structure: a fresh cache, with the layers the state holds lazy made lazy (exact prefill compacted
    // them), then the cache checks every store against the saved one and restores it.
    reset();
    const std::vector<int> to_lazy = kv_->layers_compacted_in(snap);
    if (!to_lazy.empty()) {
        if (!prompt_all_full()) throw BadInput("the state has lazy layers that this Llama keeps full (other lazy settings)");
        kv_->make_lazy(hp, kv_cfg_, to_lazy, bufts_, graphs_->lend_scheduler(), arena_);  // nothing held: nothing copied
    }
    try {
        kv_->restore(snap);
    } catch (...) {
        reset();
        throw;
    }
    n_past_[0] = n_past;
    n_written_[0] = n_written;
    compacted_ = compacted;
    peak_kv_bytes_ = std::max(peak_kv_bytes_, kv_->total_bytes());
}

}  // namespace simkv
