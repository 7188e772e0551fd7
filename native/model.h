// A decoder-only transformer loaded from GGUF: hyperparameters and weight tensors, each on the device of
// its layer (devices.h). CPU weights are memory-mapped from the file (use_mmap) or copied into memory;
// offloaded weights (a GPU, an RPC server) are copied into a buffer of their device.
#pragma once
#include "devices.h"

#include <ggml-backend.h>
#include <ggml-cpp.h>
#include <ggml.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace simkv {

class GgufFile;

enum class Arch { LLAMA, QWEN2, QWEN3, GEMMA3 };

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
    int rope_type = 0;  // GGML_ROPE_TYPE_NORM (llama) or GGML_ROPE_TYPE_NEOX (qwen2/3, gemma3)
    // Sliding-window layers (gemma3): each sees only the n_swa most recent positions and has its own RoPE
    // base; their stores are sliding rings (kv_policy_lazy.cpp) of the full layers' type.
    uint32_t n_swa = 0;
    std::vector<bool> swa_layers;  // per layer; empty = none
    float rope_freq_base_swa = 10000.0f;
    bool is_swa(uint32_t il) const { return il < swa_layers.size() && swa_layers[il]; }

    uint32_t n_embd_k_gqa() const { return head_dim * n_head_kv; }
    uint32_t n_embd_v_gqa() const { return head_dim * n_head_kv; }
};

struct LoadOptions {
    int n_gpu_layers = 0;  // the last n layers (and the output layer when n > n_layer) offloaded; -1 = all
    int main_gpu = 0;      // which GPU device
    bool use_mmap = true;  // CPU weights read in place from the file; false = copied into memory
    std::vector<ggml_backend_dev_t> remote;  // RPC devices (rpc_devices.h) that join the offload devices
    std::vector<float> tensor_split;         // shares of the offloaded layers per offload device; empty = by free memory
};

struct LayerWeights {
    ggml_tensor * attn_norm = nullptr;
    ggml_tensor * wq = nullptr, * wk = nullptr, * wv = nullptr, * wo = nullptr;
    ggml_tensor * bq = nullptr, * bk = nullptr, * bv = nullptr;  // qwen2
    ggml_tensor * q_norm = nullptr, * k_norm = nullptr;          // qwen3, gemma3
    ggml_tensor * attn_post_norm = nullptr, * ffn_post_norm = nullptr;  // gemma3
    ggml_tensor * ffn_norm = nullptr;
    ggml_tensor * ffn_gate = nullptr, * ffn_up = nullptr, * ffn_down = nullptr;
    ggml_tensor * rope_freqs = nullptr;  // the model's, on this layer's device (null if the model has none)
};

// A read-only memory map of a whole file, unmapped when dropped.
class FileMapping {
public:
    FileMapping(const std::string & path, size_t size);
    ~FileMapping();
    FileMapping(const FileMapping &) = delete;
    FileMapping & operator=(const FileMapping &) = delete;
    void * data() const { return data_; }
    size_t size() const { return size_; }

private:
    void * data_ = nullptr;
    size_t size_ = 0;
};

class Model {
public:
    explicit Model(const std::string & path, const LoadOptions & opts = {});
    ~Model();
    Model(const Model &) = delete;
    Model & operator=(const Model &) = delete;

    const HParams & hp() const { return hp_; }
    const std::map<std::string, std::string> & metadata() const { return metadata_; }
    const std::string & path() const { return path_; }
    size_t weight_bytes() const { return weight_bytes_; }
    const Placement & placement() const { return placement_; }
    // The device of layer il (null = CPU): its weights and its KV store live there.
    ggml_backend_dev_t layer_device(uint32_t il) const { return placement_.layer_device.at(il); }
    // Some layer is on an RPC server: calls that compute or move data go through remote_call.
    bool uses_remote() const;

    ggml_tensor * tok_embd = nullptr;
    ggml_tensor * output_norm = nullptr;
    ggml_tensor * output = nullptr;      // == tok_embd when the embeddings are tied (a copy if on the GPU)
    ggml_tensor * rope_freqs = nullptr;  // optional per-dimension frequency factors (Llama 3.1), on the CPU
    std::vector<LayerWeights> layers;

private:
    void load_hparams(const GgufFile & f);
    void bind_tensors(const GgufFile & f);
    void load_weights(const GgufFile & f, bool use_mmap);

    std::string path_;
    HParams hp_;
    std::map<std::string, std::string> metadata_;
    Placement placement_;
    // Owned in the order they are needed; destroyed in reverse (buffers, then descriptors, then the mapping).
    std::unique_ptr<FileMapping> mapping_;  // null once every weight was copied out of it
    ggml_context_ptr ctx_;         // descriptors of the weights that stay in the mapping
    ggml_context_ptr ctx_copied_;  // ... copied into CPU memory (use_mmap = false)
    ggml_backend_buffer_ptr buffer_, buffer_copied_;
    struct DeviceWeights {         // ... copied to an offload device
        ggml_backend_dev_t dev;
        ggml_context_ptr ctx;
        ggml_backend_buffer_ptr buffer;
    };
    std::vector<DeviceWeights> on_device_;
    size_t weight_bytes_ = 0;
};

}  // namespace simkv
