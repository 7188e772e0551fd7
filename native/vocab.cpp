#include "vocab.h"

#include "errors.h"
#include "gguf_file.h"

#include <ggml.h>
#include <gguf.h>
#include <llama.h>

#include <algorithm>
#include <cstdio>
#include <unordered_set>

namespace simkv {

namespace {

// libllama asserts (aborting the process) on vocabularies it cannot use: refuse them first, by name.
void check_vocabulary(const std::string & path) {
    GgufFile f(path);
    if (!f.has("tokenizer.ggml.model")) throw BadInput("the GGUF has no tokenizer (tokenizer.ggml.model): " + path);
    const std::string model = f.get_str("tokenizer.ggml.model");
    if (model == "none" || model == "no_vocab") {
        throw BadInput("the GGUF has no vocabulary (tokenizer.ggml.model = '" + model + "'): simkv needs one to tokenize");
    }
    const int64_t id = gguf_find_key(f.gguf(), "tokenizer.ggml.tokens");
    if (id < 0 || gguf_get_kv_type(f.gguf(), id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(f.gguf(), id) != GGUF_TYPE_STRING) {
        throw BadInput("the GGUF's tokenizer.ggml.tokens is missing or not a list of strings: " + path);
    }
    const size_t n = gguf_get_arr_n(f.gguf(), id);
    if (n == 0) throw BadInput("the GGUF's vocabulary is empty: " + path);
    std::unordered_set<std::string> seen;
    seen.reserve(n);
    for (size_t i = 0; i < n; ++i) {
        const char * tok = gguf_get_arr_str(f.gguf(), id, i);
        if (!seen.insert(tok).second) {
            throw BadInput("the GGUF's vocabulary lists the token '" + std::string(tok) + "' twice (id " + std::to_string(i) + ")");
        }
    }
    // A sentencepiece ('llama') vocabulary spells bytes as <0xNN> tokens and needs the newline one.
    if (model == "llama" && !seen.count("<0x0A>")) {
        throw BadInput("tokenizer.ggml.model is 'llama' (sentencepiece) but the vocabulary has no byte tokens "
                       "(<0x0A>): the file's tokenizer type does not match its vocabulary");
    }
}

}  // namespace

Vocab::Vocab(const std::string & path) {
    check_vocabulary(path);
    llama_model_params mp = llama_model_default_params();
    mp.vocab_only = true;
    model_ = llama_model_load_from_file(path.c_str(), mp);
    if (!model_) throw BadInput("libllama could not load the vocabulary of " + path);
    vocab_ = llama_model_get_vocab(model_);
    // Tokenizing with special tokens asserts that the BOS/EOS the vocabulary asks for exist.
    const int32_t n = llama_vocab_n_tokens(vocab_);
    auto valid = [n](int32_t t) { return t >= 0 && t < n; };
    if ((llama_vocab_get_add_bos(vocab_) && !valid(llama_vocab_bos(vocab_))) ||
        (llama_vocab_get_add_eos(vocab_) && !valid(llama_vocab_eos(vocab_)))) {
        llama_model_free(model_);
        model_ = nullptr;
        throw BadInput("the GGUF's vocabulary asks for a BOS/EOS token it does not have: " + path);
    }
}

Vocab::~Vocab() {
    if (model_) llama_model_free(model_);
}

std::vector<int32_t> Vocab::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    try {
        return tokenize_unchecked(text, add_special, parse_special);
    } catch (const std::exception & e) {  // libllama's own lookups (std::out_of_range) on a malformed vocabulary
        throw BadInput(std::string("the vocabulary cannot tokenize this text: ") + e.what());
    }
}

std::vector<int32_t> Vocab::tokenize_unchecked(const std::string & text, bool add_special, bool parse_special) const {
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
    int32_t n;
    try {
        n = llama_token_to_piece(vocab_, token, buf, sizeof buf, 0, special);
    } catch (const std::exception & e) {
        throw BadInput(std::string("the vocabulary cannot render token ") + std::to_string(token) + ": " + e.what());
    }
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
int32_t Vocab::nl() const { return llama_vocab_nl(vocab_); }

std::map<std::string, std::string> Vocab::metadata() const {
    std::map<std::string, std::string> out;
    std::vector<char> buf(256);
    auto read = [&](auto fn, int32_t i) {
        int32_t n = fn(model_, i, buf.data(), buf.size());
        if (n >= (int32_t) buf.size()) {
            buf.resize((size_t) n + 1);
            n = fn(model_, i, buf.data(), buf.size());
        }
        return n < 0 ? std::string() : std::string(buf.data(), (size_t) n);
    };
    for (int32_t i = 0; i < llama_model_meta_count(model_); ++i) {
        out[read(llama_model_meta_key_by_index, i)] = read(llama_model_meta_val_str_by_index, i);
    }
    return out;
}
int32_t Vocab::fim_pre() const { return llama_vocab_fim_pre(vocab_); }
int32_t Vocab::fim_suf() const { return llama_vocab_fim_suf(vocab_); }
int32_t Vocab::fim_mid() const { return llama_vocab_fim_mid(vocab_); }

}  // namespace simkv
