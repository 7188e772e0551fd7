#include "vocab.h"

#include "errors.h"

#include <ggml.h>
#include <llama.h>

#include <algorithm>
#include <cstdio>

namespace simkv {

Vocab::Vocab(const std::string & path) {
    llama_model_params mp = llama_model_default_params();
    mp.vocab_only = true;
    model_ = llama_model_load_from_file(path.c_str(), mp);
    if (!model_) throw BadInput("libllama could not load the vocabulary of " + path);
    vocab_ = llama_model_get_vocab(model_);
}

Vocab::~Vocab() {
    if (model_) llama_model_free(model_);
}

std::vector<int32_t> Vocab::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    std::vector<int32_t> out(text.size() + 8);
    int32_t n = llama_tokenize(vocab_, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(), add_special, parse_special);
    if (n < 0) {
        out.resize((size_t) -n);
        n = llama_tokenize(vocab_, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(), add_special, parse_special);
    }
    if (n < 0) throw std::runtime_error("tokenization failed");
    out.resize((size_t) n);
    return out;
}

std::string Vocab::token_to_piece(int32_t token, bool special) const {
    if (token < 0 || token >= n_vocab()) throw BadInput("token id " + std::to_string(token) + " is outside the vocabulary");
    char buf[256];
    int32_t n = llama_token_to_piece(vocab_, token, buf, sizeof buf, 0, special);
    if (n >= 0) return std::string(buf, (size_t) n);
    std::string big((size_t) -n, '\0');
    n = llama_token_to_piece(vocab_, token, big.data(), (int32_t) big.size(), 0, special);
    big.resize((size_t) std::max(n, 0));
    return big;
}

int32_t Vocab::n_vocab() const { return llama_vocab_n_tokens(vocab_); }
int32_t Vocab::bos() const { return llama_vocab_bos(vocab_); }
int32_t Vocab::eos() const { return llama_vocab_eos(vocab_); }
bool Vocab::add_bos() const { return llama_vocab_get_add_bos(vocab_); }
bool Vocab::is_eog(int32_t token) const { return llama_vocab_is_eog(vocab_, token); }

}  // namespace simkv
