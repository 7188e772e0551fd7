// Tokenizer and detokenizer: libllama's, loaded with vocab_only (no weights), from the same GGUF.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

struct llama_model;
struct llama_vocab;

namespace simkv {

class Vocab {
public:
    explicit Vocab(const std::string & path);
    ~Vocab();
    Vocab(const Vocab &) = delete;
    Vocab & operator=(const Vocab &) = delete;

    std::vector<int32_t> tokenize(const std::string & text, bool add_special, bool parse_special) const;
    std::string token_to_piece(int32_t token, bool special) const;
    int32_t n_vocab() const;
    int32_t bos() const;
    int32_t eos() const;
    bool add_bos() const;
    bool is_eog(int32_t token) const;
    int32_t nl() const;
    // The GGUF's metadata as strings (what a vocab-only Llama reports: no weights are loaded then).
    std::map<std::string, std::string> metadata() const;
    // Fill-in-the-middle markers; -1 where the model has none.
    int32_t fim_pre() const;
    int32_t fim_suf() const;
    int32_t fim_mid() const;
    const llama_vocab * get() const { return vocab_; }

private:
    std::vector<int32_t> tokenize_unchecked(const std::string & text, bool add_special, bool parse_special) const;
    llama_model * model_ = nullptr;
    const llama_vocab * vocab_ = nullptr;
};

}  // namespace simkv
