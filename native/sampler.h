// Token sampling: libllama's samplers applied to our logits, in llama-cpp-python's order: logit bias,
// repetition penalties, grammar, then the draw (greedy; mirostat; or top-k, typical, top-p, min-p,
// temperature and a seeded draw). accept() takes each generated token; accept_context() the tokens already
// in the context (the prompt), of which only the penalties see the last penalty_last_n: a grammar
// constrains the reply.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

struct llama_sampler;
struct llama_token_data;
struct llama_vocab;

namespace simkv {

struct SamplerParams {
    float temperature = 0.8f;  // 0: greedy; < 0: a draw from the untruncated distribution (as llama-cpp-python)
    int32_t top_k = 40;
    float top_p = 0.95f;
    float min_p = 0.05f;
    float typical_p = 1.0f;
    float repeat_penalty = 1.0f;
    float frequency_penalty = 0.0f;
    float presence_penalty = 0.0f;
    int32_t penalty_last_n = 64;
    int32_t mirostat = 0;  // 0 off, 1 mirostat, 2 mirostat v2 (they replace top-k ... temperature)
    float mirostat_tau = 5.0f;
    float mirostat_eta = 0.1f;
    uint32_t seed = 0xFFFFFFFF;  // LLAMA_DEFAULT_SEED: random
    std::vector<std::pair<int32_t, float>> logit_bias;  // added to the logits first (-inf bans a token)
    std::string grammar;       // GBNF; empty: unconstrained
    std::string grammar_root = "root";
};

struct SamplerFree {
    void operator()(llama_sampler * s) const;
};
using SamplerPtr = std::unique_ptr<llama_sampler, SamplerFree>;

class Sampler {
public:
    // vocab: needed by a grammar (it matches token texts); may be null without one.
    Sampler(const llama_vocab * vocab, int32_t n_vocab, const SamplerParams & p);

    int32_t sample(const float * logits);
    void accept(int32_t token);
    void accept_context(const std::vector<int32_t> & context);
    void reset();
    int32_t n_vocab() const { return n_vocab_; }

private:
    // Applied in this order; null where unused.
    SamplerPtr bias_, penalties_, grammar_, draw_;
    int32_t n_vocab_;
    int32_t penalty_last_n_;
    std::vector<llama_token_data> candidates_;
};

}  // namespace simkv
