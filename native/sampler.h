// Token sampling: libllama's sampler chain applied to our logits. accept() must be called with each
// token that enters the context (penalties depend on it).
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

struct llama_sampler;
struct llama_token_data;

namespace simkv {

struct SamplerParams {
    float temperature = 0.8f;  // <= 0: greedy
    int32_t top_k = 40;
    float top_p = 0.95f;
    float min_p = 0.05f;
    float repeat_penalty = 1.0f;
    float frequency_penalty = 0.0f;
    float presence_penalty = 0.0f;
    int32_t penalty_last_n = 64;
    uint32_t seed = 0xFFFFFFFF;  // LLAMA_DEFAULT_SEED: random
    std::vector<std::pair<int32_t, float>> logit_bias;  // added to the logits first (-inf bans a token)
};

class Sampler {
public:
    Sampler(int32_t n_vocab, const SamplerParams & p);
    ~Sampler();
    Sampler(const Sampler &) = delete;
    Sampler & operator=(const Sampler &) = delete;

    int32_t sample(const float * logits);
    void accept(int32_t token);
    void reset();

private:
    llama_sampler * chain_ = nullptr;
    int32_t n_vocab_;
    std::vector<llama_token_data> candidates_;
};

}  // namespace simkv
