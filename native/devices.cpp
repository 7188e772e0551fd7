#include "devices.h"

#include "errors.h"

#include <algorithm>

namespace simkv {

bool Placement::any_layer_on_gpu() const {
    return std::find(layer_on_gpu.begin(), layer_on_gpu.end(), true) != layer_on_gpu.end();
}

std::vector<ggml_backend_dev_t> gpu_devices() {
    std::vector<ggml_backend_dev_t> out;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU) out.push_back(dev);
    }
    return out;
}

std::string device_label(ggml_backend_dev_t dev) {
    size_t free = 0, total = 0;
    ggml_backend_dev_memory(dev, &free, &total);
    return std::string(ggml_backend_dev_name(dev)) + " (" + ggml_backend_dev_description(dev) + ", " +
           std::to_string(total >> 30) + " GiB)";
}

Placement plan_placement(uint32_t n_layer, int n_gpu_layers, int main_gpu) {
    if (n_gpu_layers < -1) throw BadInput("n_gpu_layers must be >= -1 (-1 = all layers)");
    Placement p;
    p.layer_on_gpu.assign(n_layer, false);
    const std::vector<ggml_backend_dev_t> gpus = gpu_devices();
    if (main_gpu < 0 || (!gpus.empty() && (size_t) main_gpu >= gpus.size())) {
        throw BadInput("main_gpu " + std::to_string(main_gpu) + " does not exist: this build has " +
                       std::to_string(gpus.size()) + " GPU device(s)");
    }
    if (n_gpu_layers == 0 || gpus.empty()) return p;
    p.gpu = gpus[main_gpu];
    const int64_t n_off = n_gpu_layers < 0 ? (int64_t) n_layer + 1 : n_gpu_layers;
    const int64_t first = std::max<int64_t>((int64_t) n_layer - n_off, 0);  // the last n_off layers
    for (int64_t il = first; il < n_layer; ++il) p.layer_on_gpu[il] = true;
    p.output_on_gpu = n_off > (int64_t) n_layer;
    return p;
}

}  // namespace simkv
