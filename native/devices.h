// Where each layer lives: llama.cpp's n_gpu_layers / main_gpu, over the devices of the ggml build that
// llama-cpp-python installed (CUDA when it was built with -DGGML_CUDA=on; CPU only otherwise).
//
// A layer's weights and its KV store share a device. The last n_gpu_layers repeating layers go to the GPU;
// the output layer (final norm + output matrix) too when n_gpu_layers > n_layer (-1 = all of it); the token
// embedding stays on the CPU, read by get_rows (as in llama.cpp). One GPU (main_gpu) takes every offloaded
// layer: multi-GPU splitting is not implemented.
#pragma once
#include <ggml-backend.h>

#include <string>
#include <vector>

namespace simkv {

struct Placement {
    ggml_backend_dev_t gpu = nullptr;  // the device offloaded layers go to; null = CPU only
    std::vector<bool> layer_on_gpu;    // per repeating layer
    bool output_on_gpu = false;
    bool any_layer_on_gpu() const;  // a repeating layer (they read rope_freqs)
    bool any_on_gpu() const { return output_on_gpu || any_layer_on_gpu(); }
};

// GPU devices of this ggml build, in registry order (index = main_gpu).
std::vector<ggml_backend_dev_t> gpu_devices();
std::string device_label(ggml_backend_dev_t dev);  // "CUDA0 (NVIDIA H200, 139 GiB)"

// With no GPU in the build every layer stays on the CPU (the caller warns). Throws BadInput for a
// main_gpu that does not exist or n_gpu_layers < -1.
Placement plan_placement(uint32_t n_layer, int n_gpu_layers, int main_gpu);

}  // namespace simkv
