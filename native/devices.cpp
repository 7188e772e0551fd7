#include "devices.h"

#include "errors.h"

#include <ggml-cpp.h>

#include <algorithm>
#include <cstdio>

namespace simkv {

std::vector<ggml_backend_dev_t> gpu_devices() {
    std::vector<ggml_backend_dev_t> out;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU) out.push_back(dev);
    }
    return out;
}

bool flash_attention_reads(ggml_backend_dev_t dev, int64_t head_dim, int64_t n_head, int64_t n_head_kv, ggml_type k,
                           ggml_type v) {
    constexpr int64_t n_kv = 256;  // kCellPad (kv_policy.h)
    ggml_init_params ip = {8 * ggml_tensor_overhead(), nullptr, true};
    ggml_context_ptr ctx(ggml_init(ip));
    ggml_tensor * q = ggml_new_tensor_3d(ctx.get(), GGML_TYPE_F32, head_dim, 1, n_head);
    auto cells = [&](ggml_type t) {  // a view of a store, as graph_attention.cpp reads one
        ggml_tensor * store = ggml_new_tensor_2d(ctx.get(), t, head_dim * n_head_kv, n_kv);
        return ggml_view_3d(ctx.get(), store, head_dim, n_kv, n_head_kv, store->nb[1], ggml_row_size(t, head_dim), 0);
    };
    ggml_tensor * mask = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F16, n_kv, 1);
    ggml_tensor * fa = ggml_flash_attn_ext(ctx.get(), q, cells(k), cells(v), mask, 1.0f, 0.0f, 0.0f);
    ggml_flash_attn_ext_set_prec(fa, GGML_PREC_F32);
    return ggml_backend_dev_supports_op(dev, fa);
}

std::string device_label(ggml_backend_dev_t dev) {
    size_t free = 0, total = 0;
    ggml_backend_dev_memory(dev, &free, &total);
    return std::string(ggml_backend_dev_name(dev)) + " (" + ggml_backend_dev_description(dev) + ", " +
           std::to_string(total >> 30) + " GiB)";
}

std::string device_name(ggml_backend_dev_t dev) {
    // The name of the device's buffer type, which is what a KV store reports (kv_cache_stats): "CUDA0",
    // and for a remote device its index on its server and the server's endpoint.
    return dev ? ggml_backend_buft_name(ggml_backend_dev_buffer_type(dev)) : "CPU";
}

uint64_t available_memory(ggml_backend_dev_t dev) {
    if (dev) {
        size_t free = 0, total = 0;
        ggml_backend_dev_memory(dev, &free, &total);
        return (uint64_t) free;
    }
    if (FILE * f = std::fopen("/proc/meminfo", "r")) {
        char line[256];
        unsigned long long kb = 0;
        while (std::fgets(line, sizeof line, f)) {
            if (std::sscanf(line, "MemAvailable: %llu kB", &kb) == 1) break;
        }
        std::fclose(f);
        if (kb) return (uint64_t) kb * 1024;
    }
    return UINT64_MAX;  // unknown: let the allocation decide
}

void check_fits(ggml_backend_dev_t dev, uint64_t bytes, const std::string & what, const std::string & advice) {
    const uint64_t avail = available_memory(dev);
    if (bytes > avail) {
        throw BadInput(what + " needs " + std::to_string(bytes >> 20) + " MiB on " +
                       (dev ? std::string(ggml_backend_dev_name(dev)) : std::string("the host")) + " but only " +
                       std::to_string(avail >> 20) + " MiB are available: " + advice);
    }
}

Placement plan_placement(uint32_t n_layer, int n_gpu_layers, int main_gpu, const std::vector<ggml_backend_dev_t> & remote,
                         const std::vector<float> & tensor_split) {
    if (n_gpu_layers < -1) throw BadInput("n_gpu_layers must be >= -1 (-1 = all layers)");
    const std::vector<ggml_backend_dev_t> gpus = gpu_devices();
    if (main_gpu < 0 || (!gpus.empty() && (size_t) main_gpu >= gpus.size())) {
        throw BadInput("main_gpu " + std::to_string(main_gpu) + " does not exist: this build has " +
                       std::to_string(gpus.size()) + " GPU device(s)");
    }
    std::vector<ggml_backend_dev_t> offload = remote;  // remote first, as llama.cpp orders them
    if (!gpus.empty()) offload.push_back(gpus[main_gpu]);
    const bool beyond = tensor_split.size() > offload.size() &&
                        std::any_of(tensor_split.begin() + (long) offload.size(), tensor_split.end(), [](float x) { return x != 0.0f; });
    if (beyond) {
        throw BadInput("tensor_split has " + std::to_string(tensor_split.size()) + " entries for " +
                       std::to_string(offload.size()) + " offload device(s) (RPC servers, then the GPU)");
    }
    for (float x : tensor_split) {
        if (!(x >= 0.0f)) throw BadInput("tensor_split entries must be >= 0");
    }
    Placement p;
    p.layer_device.assign(n_layer, nullptr);
    if (n_gpu_layers == 0 || offload.empty()) return p;

    // Split points: cumulative shares of the offloaded layers, by tensor_split or by free memory.
    std::vector<double> split(offload.size(), 0.0);
    const bool by_memory = std::all_of(tensor_split.begin(), tensor_split.end(), [](float x) { return x == 0.0f; });
    for (size_t i = 0; i < offload.size(); ++i) {
        if (by_memory) {
            size_t free = 0, total = 0;
            ggml_backend_dev_memory(offload[i], &free, &total);
            split[i] = (double) free;
        } else {
            split[i] = i < tensor_split.size() ? tensor_split[i] : 0.0;
        }
    }
    double sum = 0.0;
    for (double & s : split) s = (sum += s);
    if (sum <= 0.0) throw BadInput("the offload devices report no free memory: give tensor_split");
    for (double & s : split) s /= sum;

    const int64_t n_off = n_gpu_layers < 0 ? (int64_t) n_layer + 1 : n_gpu_layers;
    const int64_t first = std::max<int64_t>((int64_t) n_layer - n_off, 0);  // the last n_off layers
    const bool output = n_off > (int64_t) n_layer;
    const int64_t n_units = (int64_t) n_layer - first + (output ? 1 : 0);
    auto device_of = [&](int64_t unit) {
        const double at = (double) unit / (double) n_units;
        size_t i = std::upper_bound(split.begin(), split.end(), at) - split.begin();
        return offload[std::min(i, offload.size() - 1)];
    };
    for (int64_t il = first; il < n_layer; ++il) p.layer_device[il] = device_of(il - first);
    if (output) p.output_device = device_of(n_layer - first);
    for (ggml_backend_dev_t d : offload) {
        const bool used = d == p.output_device ||
                          std::find(p.layer_device.begin(), p.layer_device.end(), d) != p.layer_device.end();
        if (used) p.devices.push_back(d);
    }
    return p;
}

}  // namespace simkv
