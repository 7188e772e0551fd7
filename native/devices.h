// Where each layer lives: llama.cpp's n_gpu_layers / tensor_split, over the offload devices of this Model:
// the remote devices of its RPC servers (rpc_devices.h), then the local GPU main_gpu of the ggml build that
// llama-cpp-python installed (CUDA when it was built with -DGGML_CUDA=on; none otherwise).
//
// A layer's weights and its KV store share a device. The last n_gpu_layers repeating layers are offloaded;
// the output layer (final norm + output matrix) too when n_gpu_layers > n_layer (-1 = all of it); the token
// embedding stays on the CPU, read by get_rows (as in llama.cpp). The offloaded layers are split between the
// offload devices in order, in proportion to tensor_split, or to each device's free memory when it is empty
// or all zero (llama.cpp's layer split). Several local GPUs are not split between: main_gpu takes them.
#pragma once
#include <ggml-backend.h>

#include <cstdint>
#include <string>
#include <vector>

namespace simkv {

struct Placement {
    std::vector<ggml_backend_dev_t> layer_device;  // per repeating layer; null = the CPU
    ggml_backend_dev_t output_device = nullptr;    // the output layer's; null = the CPU
    std::vector<ggml_backend_dev_t> devices;       // the offload devices that hold a layer, each once, in order
};

// GPU devices of this ggml build, in registry order (index = main_gpu). RPC devices are not registered.
std::vector<ggml_backend_dev_t> gpu_devices();
// "CUDA0 (NVIDIA H200, 139 GiB)"; a remote device: "RPC0 (127.0.0.1:50052, 23 GiB)".
std::string device_label(ggml_backend_dev_t dev);
// What kv_cache_stats() and layer_devices show for a layer: "CPU", "CUDA0", "RPC0[127.0.0.1:50052]" (device
// 0 of the server at that endpoint).
std::string device_name(ggml_backend_dev_t dev);

// Memory a new allocation on dev (null: the host) can take: the device's free memory, or the host's
// MemAvailable (Linux; without the OOM killer or swapping). UINT64_MAX where it is unknown.
uint64_t available_memory(ggml_backend_dev_t dev);
// Refuses, before anything is allocated, `bytes` of `what` on dev that do not fit in available_memory(dev):
// a BadInput with the sizes and `advice`, instead of an OOM kill half-way through (a zeroed buffer is touched).
void check_fits(ggml_backend_dev_t dev, uint64_t bytes, const std::string & what, const std::string & advice);

// Whether dev's flash attention reads K and V of these types, asked of the device itself with the shapes a
// span reads (one query over kCellPad cells of [head_dim, n_head_kv] rows), so that a store the device
// cannot read is refused rather than its attention quietly run on the CPU. (ggml-cuda's default build reads
// f16/bf16 and the symmetric q8_0/q4_0 pairs; an RPC server's CPU reads any pair.)
bool flash_attention_reads(ggml_backend_dev_t dev, int64_t head_dim, int64_t n_head, int64_t n_head_kv, ggml_type k,
                           ggml_type v);

// Throws BadInput for a main_gpu that does not exist, n_gpu_layers < -1, or a tensor_split that is negative
// or longer than the offload devices. With no offload device every layer stays on the CPU (the caller warns).
Placement plan_placement(uint32_t n_layer, int n_gpu_layers, int main_gpu, const std::vector<ggml_backend_dev_t> & remote,
                         const std::vector<float> & tensor_split);

}  // namespace simkv
