#include "sampler.h"

#include "errors.h"
#include "logging.h"

#include <algorithm>
#include <cmath>

#include <llama.h>

namespace simkv {

void SamplerFree::operator()(llama_sampler * s) const { llama_sampler_free(s); }

Sampler::Sampler(const llama_vocab * vocab, int32_t n_vocab, const SamplerParams & p)
    : n_vocab_(n_vocab), penalty_last_n_(p.penalty_last_n) {
    if (p.repeat_penalty <= 0.0f) throw BadInput("repeat_penalty must be > 0");
    if (p.top_p < 0.0f || p.top_p > 1.0f) throw BadInput("top_p must be in [0, 1]");
    if (p.min_p < 0.0f || p.min_p > 1.0f) throw BadInput("min_p must be in [0, 1]");
    if (p.typical_p < 0.0f || p.typical_p > 1.0f) throw BadInput("typical_p must be in [0, 1]");
    if (p.mirostat < 0 || p.mirostat > 2) throw BadInput("mirostat_mode must be 0, 1 or 2");
    if (p.mirostat != 0 && (p.mirostat_tau <= 0.0f || p.mirostat_eta <= 0.0f)) {
        throw BadInput("mirostat_tau and mirostat_eta must be > 0");
    }
    if (p.penalty_last_n < 0) throw BadInput("penalty_last_n must be >= 0");
    if (!p.logit_bias.empty()) {
        std::vector<llama_logit_bias> bias;
        for (const auto & [token, value] : p.logit_bias) {
            if (token < 0 || token >= n_vocab) throw BadInput("logit_bias token id " + std::to_string(token) + " is outside the vocabulary");
            bias.push_back({token, value});
        }
        bias_.reset(llama_sampler_init_logit_bias(n_vocab, (int32_t) bias.size(), bias.data()));
    }
    if (p.repeat_penalty != 1.0f || p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f) {
        penalties_.reset(llama_sampler_init_penalties(n_vocab, p.penalty_last_n, p.repeat_penalty, p.frequency_penalty,
                                                      p.presence_penalty));
    }
    if (!p.grammar.empty()) {
        if (vocab == nullptr) throw BadInput("a grammar needs the model's vocabulary");
        // libllama's parser returns null (and logs why) for text that is not GBNF, an undefined rule or
        // left recursion; nothing is applied before it succeeded.
        LogCapture log;
        grammar_.reset(llama_sampler_init_grammar(vocab, p.grammar.c_str(), p.grammar_root.c_str()));
        if (!grammar_) {
            std::string why = log.text();
            while (!why.empty() && (why.back() == '\n' || why.back() == ' ')) why.pop_back();
            for (char & c : why) c = c == '\n' ? ';' : c;
            throw BadInput("the grammar is not valid GBNF" + (why.empty() ? std::string() : " (llama.cpp: " + why + ")"));
        }
    }
    draw_.reset(llama_sampler_chain_init(llama_sampler_chain_default_params()));
    llama_sampler * chain = draw_.get();
    if (p.temperature == 0.0f) {
        llama_sampler_chain_add(chain, llama_sampler_init_greedy());
    } else if (p.temperature < 0.0f) {
        llama_sampler_chain_add(chain, llama_sampler_init_dist(p.seed));
    } else if (p.mirostat == 1) {
        llama_sampler_chain_add(chain, llama_sampler_init_mirostat(n_vocab, p.seed, p.mirostat_tau, p.mirostat_eta, 100));
    } else if (p.mirostat == 2) {
        llama_sampler_chain_add(chain, llama_sampler_init_mirostat_v2(p.seed, p.mirostat_tau, p.mirostat_eta));
    } else {
        if (p.top_k > 0) llama_sampler_chain_add(chain, llama_sampler_init_top_k(p.top_k));
        if (p.typical_p < 1.0f) llama_sampler_chain_add(chain, llama_sampler_init_typical(p.typical_p, 1));
        llama_sampler_chain_add(chain, llama_sampler_init_top_p(p.top_p, 1));
        llama_sampler_chain_add(chain, llama_sampler_init_min_p(p.min_p, 1));
        llama_sampler_chain_add(chain, llama_sampler_init_temp(p.temperature));
        llama_sampler_chain_add(chain, llama_sampler_init_dist(p.seed));
    }
    candidates_.resize((size_t) n_vocab);
}

int32_t Sampler::sample(const float * logits) {
    for (int32_t i = 0; i < n_vocab_; ++i) candidates_[(size_t) i] = llama_token_data{i, logits[i], 0.0f};
    llama_token_data_array arr{candidates_.data(), candidates_.size(), -1, false};
    for (llama_sampler * s : {bias_.get(), penalties_.get(), grammar_.get()}) {
        if (s) llama_sampler_apply(s, &arr);
    }
    // A grammar that admits no token here (an empty character range, or banned by the logit bias) leaves
    // every logit at -inf: say so rather than draw a token the grammar then refuses to accept.
    if (grammar_) {
        bool any = false;
        for (size_t i = 0; i < arr.size && !any; ++i) any = arr.data[i].logit != -INFINITY;
        if (!any) throw BadInput("the grammar admits no token at this point of the output");
    }
    llama_sampler_apply(draw_.get(), &arr);
    if (arr.selected < 0 || (size_t) arr.selected >= arr.size) throw std::runtime_error("sampler selected no token");
    return arr.data[arr.selected].id;
}

void Sampler::accept(int32_t token) {
    if (token < 0 || token >= n_vocab_) throw BadInput("token id " + std::to_string(token) + " is outside the vocabulary");
    for (llama_sampler * s : {penalties_.get(), grammar_.get(), draw_.get()}) {
        if (s) llama_sampler_accept(s, token);
    }
}

void Sampler::accept_context(const std::vector<int32_t> & context) {
    if (!penalties_) return;
    const size_t first = context.size() - std::min(context.size(), (size_t) penalty_last_n_);
    for (size_t i = first; i < context.size(); ++i) {
        const int32_t token = context[i];
        if (token < 0 || token >= n_vocab_) throw BadInput("token id " + std::to_string(token) + " is outside the vocabulary");
        llama_sampler_accept(penalties_.get(), token);
    }
}

void Sampler::reset() {
    for (llama_sampler * s : {bias_.get(), penalties_.get(), grammar_.get(), draw_.get()}) {
        if (s) llama_sampler_reset(s);
    }
}

}  // namespace simkv
