#include "sampler.h"

#include "errors.h"

#include <llama.h>

namespace simkv {

Sampler::Sampler(int32_t n_vocab, const SamplerParams & p) : n_vocab_(n_vocab) {
    if (p.repeat_penalty <= 0.0f) throw BadInput("repeat_penalty must be > 0");
    if (p.top_p < 0.0f || p.top_p > 1.0f) throw BadInput("top_p must be in [0, 1]");
    if (p.min_p < 0.0f || p.min_p > 1.0f) throw BadInput("min_p must be in [0, 1]");
    chain_ = llama_sampler_chain_init(llama_sampler_chain_default_params());
    if (!p.logit_bias.empty()) {
        std::vector<llama_logit_bias> bias;
        for (const auto & [token, value] : p.logit_bias) {
            if (token < 0 || token >= n_vocab) throw BadInput("logit_bias token id " + std::to_string(token) + " is outside the vocabulary");
            bias.push_back({token, value});
        }
        llama_sampler_chain_add(chain_, llama_sampler_init_logit_bias(n_vocab, (int32_t) bias.size(), bias.data()));
    }
    // The same order llama-cpp-python uses: logit bias, penalties, top-k, top-p, min-p, temperature, draw.
    if (p.repeat_penalty != 1.0f || p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f) {
        llama_sampler_chain_add(chain_, llama_sampler_init_penalties(n_vocab, p.penalty_last_n, p.repeat_penalty,
                                                                      p.frequency_penalty, p.presence_penalty));
    }
    if (p.temperature <= 0.0f) {
        llama_sampler_chain_add(chain_, llama_sampler_init_greedy());
    } else {
        if (p.top_k > 0) llama_sampler_chain_add(chain_, llama_sampler_init_top_k(p.top_k));
        llama_sampler_chain_add(chain_, llama_sampler_init_top_p(p.top_p, 1));
        llama_sampler_chain_add(chain_, llama_sampler_init_min_p(p.min_p, 1));
        llama_sampler_chain_add(chain_, llama_sampler_init_temp(p.temperature));
        llama_sampler_chain_add(chain_, llama_sampler_init_dist(p.seed));
    }
    candidates_.resize((size_t) n_vocab);
}

Sampler::~Sampler() {
    if (chain_) llama_sampler_free(chain_);
}

int32_t Sampler::sample(const float * logits) {
    for (int32_t i = 0; i < n_vocab_; ++i) candidates_[(size_t) i] = llama_token_data{i, logits[i], 0.0f};
    llama_token_data_array arr{candidates_.data(), candidates_.size(), -1, false};
    llama_sampler_apply(chain_, &arr);
    if (arr.selected < 0 || (size_t) arr.selected >= arr.size) throw std::runtime_error("sampler selected no token");
    return arr.data[arr.selected].id;
}

void Sampler::accept(int32_t token) { llama_sampler_accept(chain_, token); }

void Sampler::reset() { llama_sampler_reset(chain_); }

}  // namespace simkv
