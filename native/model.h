// A decoder-only transformer loaded from GGUF: hyperparameters and weight tensors.
// CPU weights are memory-mapped from the file, never copied.
#pragma once
#include <ggml-backend.h>
#include <ggml.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace simkv {

class GgufFile;

enum class Arch { LLAMA, QWEN2, QWEN3 };

struct HParams {
    Arch arch = Arch::LLAMA;
    std::string arch_name;
    uint32_t n_layer = 0;
    uint32_t n_embd = 0;
    uint32_t n_head = 0;
    uint32_t n_head_kv = 0;
    uint32_t head_dim = 0;  // per-head size of Q, K and V
    uint32_t n_rot = 0;     // rotary dimensions
    uint32_t n_ff = 0;
    uint32_t n_vocab = 0;
    uint32_t n_ctx_train = 0;
    float rms_eps = 1e-5f;
    float rope_freq_base = 10000.0f;
    float rope_freq_scale = 1.0f;
    int rope_type = 0;  // GGML_ROPE_TYPE_NORM (llama) or GGML_ROPE_TYPE_NEOX (qwen2/3)

    uint32_t n_embd_k_gqa() const { return head_dim * n_head_kv; }
    uint32_t n_embd_v_gqa() const { return head_dim * n_head_kv; }
};

struct LayerWeights {
    ggml_tensor * attn_norm = nullptr;
    ggml_tensor * wq = nullptr, * wk = nullptr, * wv = nullptr, * wo = nullptr;
    ggml_tensor * bq = nullptr, * bk = nullptr, * bv = nullptr;  // qwen2
    ggml_tensor * q_norm = nullptr, * k_norm = nullptr;          // qwen3
    ggml_tensor * ffn_norm = nullptr;
    ggml_tensor * ffn_gate = nullptr, * ffn_up = nullptr, * ffn_down = nullptr;
};

class Model {
public:
    explicit Model(const std::string & path);
    ~Model();
    Model(const Model &) = delete;
    Model & operator=(const Model &) = delete;

    const HParams & hp() const { return hp_; }
    const std::map<std::string, std::string> & metadata() const { return metadata_; }
    const std::string & path() const { return path_; }
    size_t weight_bytes() const { return weight_bytes_; }

    ggml_tensor * tok_embd = nullptr;
    ggml_tensor * output_norm = nullptr;
    ggml_tensor * output = nullptr;      // == tok_embd when the embeddings are tied
    ggml_tensor * rope_freqs = nullptr;  // optional per-dimension frequency factors (Llama 3.1)
    std::vector<LayerWeights> layers;

private:
    void load_hparams(const GgufFile & f);
    void bind_tensors(const GgufFile & f);
    void map_weights(const GgufFile & f);

    std::string path_;
    HParams hp_;
    std::map<std::string, std::string> metadata_;
    ggml_context * ctx_ = nullptr;  // tensor descriptors; data points into the mapping
    void * mapping_ = nullptr;
    size_t mapping_size_ = 0;
    ggml_backend_buffer_t buffer_ = nullptr;
    size_t weight_bytes_ = 0;
};

}  // namespace simkv
