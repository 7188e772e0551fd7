// The prefill strategies (engine_config.h, PrefillStrategy): how a decode() call's tokens reach the cache.
// Each evaluates into the cache it is given (Engine::evaluate); only the staged one uses a second cache.
#include "engine.h"

#include "errors.h"

#include <algorithm>

namespace simkv {

std::vector<std::vector<float>> Engine::decode(const std::vector<SeqTokens> & batch, const ProbeSpec * probe,
                                               uint32_t n_probe, const BetweenUbatches & between) {
    check_batch(batch, probe, n_probe);
    switch (prefill_) {
        case PrefillStrategy::Compacted: return eval_compacted(batch, probe, n_probe, between);
        case PrefillStrategy::Staged: return eval_staged(batch, between);
        case PrefillStrategy::Streaming: break;
    }
    return evaluate(*kv_, batch, probe, n_probe, between);
}

std::vector<std::vector<float>> Engine::eval_compacted(const std::vector<SeqTokens> & batch, const ProbeSpec * probe,
                                                       uint32_t n_probe, const BetweenUbatches & between) {
    if (compacted_) return evaluate(*kv_, batch, probe, n_probe, between);
    // The first evaluation of a context is its prompt, with every layer full; its end triggers the
    // compaction of the lazy layers. In dynamic mode the probe (on the prompt's last w_last tokens, unless
    // the caller probes) picks them.
    const bool dynamic = cfg_.lazy_mode == LazyMode::Dynamic;
    const ProbeSpec dynamic_spec{(uint32_t) cfg_.n_sink, (uint32_t) cfg_.n_window};
    if (!probe) n_probe = 0;
    if (dynamic && n_probe == 0) {
        uint32_t n = 0;
        for (const SeqTokens & b : batch) n += b.n;
        probe = &dynamic_spec;
        n_probe = std::min((uint32_t) cfg_.w_last, n);
    }
    std::vector<std::vector<float>> logits = evaluate(*kv_, batch, probe, n_probe, between);
    std::vector<int> layers;
    if (dynamic) {
        layers = dynamic_lazy_layers();
    } else {
        for (int64_t il : cfg_.lazy_layers) layers.push_back((int) il);
    }
    if (!layers.empty()) {
        peak_kv_bytes_ = std::max(peak_kv_bytes_, kv_->make_lazy(model_->hp(), kv_cfg_, layers, bufts_,
                                                                 graphs_->lend_scheduler(), arena_));
    }
    compacted_ = true;
    return logits;
}

std::vector<std::vector<float>> Engine::eval_staged(const std::vector<SeqTokens> & batch, const BetweenUbatches & between) {
    // A sequence's first tokens after it was emptied are its prompt, evaluated alone with every layer full,
    // then taken into the shared cache (eval_prompt). Its later tokens, and the other sequences', share
    // ubatches as in streaming mode.
    uint32_t longest = 0;  // the largest prompt cache this call needs must fit before anything is evaluated
    for (const SeqTokens & b : batch) {
        if (n_past_[b.seq] == 0) longest = std::max(longest, b.n);
    }
    if (longest) check_memory(prompt_config(longest));
    std::vector<std::vector<float>> logits(batch.size());
    std::vector<SeqTokens> rest;
    std::vector<size_t> rest_at;
    for (size_t i = 0; i < batch.size(); ++i) {
        if (n_past_[batch[i].seq] == 0) {
            logits[i] = eval_prompt(batch[i], between);
        } else {
            rest.push_back(batch[i]);
            rest_at.push_back(i);
        }
    }
    if (!rest.empty()) {
        std::vector<std::vector<float>> out = evaluate(*kv_, rest, nullptr, 0, between);
        for (size_t j = 0; j < rest.size(); ++j) logits[rest_at[j]] = std::move(out[j]);
    }
    return logits;
}

KvConfig Engine::prompt_config(uint32_t n_tokens) const {
    // A cache of the prompt's length (as many sequences, so that ids carry over) with every layer full.
    KvConfig c = kv_cfg_;
    c.n_ctx = pad_cells(n_tokens);
    c.lazy_layers.clear();
    return c;
}

std::vector<float> Engine::eval_prompt(const SeqTokens & b, const BetweenUbatches & between) {
    // Dynamic mode: the probe on the prompt's last w_last tokens picks the layers lazy for this sequence.
    const bool dynamic = cfg_.lazy_mode == LazyMode::Dynamic;
    const ProbeSpec spec{(uint32_t) cfg_.n_sink, (uint32_t) cfg_.n_window};
    try {
        KvCache prompt(model_->hp(), prompt_config(b.n), bufts_);  // decode() checked that it fits
        std::vector<float> logits = std::move(
            evaluate(prompt, {b}, dynamic ? &spec : nullptr, dynamic ? std::min((uint32_t) cfg_.w_last, b.n) : 0, between)[0]);
        peak_kv_bytes_ = std::max(peak_kv_bytes_, kv_->total_bytes() + prompt.total_bytes());
        kv_->adopt_sequence(prompt, b.seq, dynamic ? dynamic_lazy_layers() : std::vector<int>{}, graphs_->lend_scheduler(),
                            arena_);
        return logits;
    } catch (...) {
        n_past_[b.seq] = 0;  // the sequence stays empty
        n_written_[b.seq] = 0;
        throw;
    }
}

std::vector<int> Engine::dynamic_lazy_layers() const {
    const HParams & hp = model_->hp();
    const std::vector<double> mass = probe_acc_.mass();
    std::vector<int> layers;
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        // A model's own sliding-window layers have no full history to probe and stay as they are.
        if (!hp.is_swa(il) && mass[il] > cfg_.dynamic_threshold) layers.push_back((int) il);
    }
    return layers;
}

}  // namespace simkv
