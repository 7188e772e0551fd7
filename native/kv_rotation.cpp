#include "kv_rotation.h"

#include <ggml-backend.h>

#include <cmath>
#include <stdexcept>

namespace simkv {

KvRotation rotation_for(KvTypes types, uint32_t head_dim) {
    KvRotation r;
    if (head_dim == 0 || head_dim % 64 != 0) return r;
    // K and V each by their own type, as llama.cpp decides them.
    if (ggml_is_quantized(types.k)) {
        r.k = 64;
        while (head_dim % (2 * r.k) == 0) r.k *= 2;
    }
    // A smaller V rotation measured better in llama.cpp (ggml-org/llama.cpp#21038); kept identical here.
    if (ggml_is_quantized(types.v)) r.v = 64;
    return r;
}

std::vector<float> hadamard_matrix(uint32_t n) {
    if (n == 0 || (n & (n - 1)) != 0) throw std::invalid_argument("Hadamard size must be a power of two");
    std::vector<float> h((size_t) n * n);
    h[0] = 1.0f / std::sqrt((float) n);
    // Sylvester: H_2s = [[H_s, H_s], [H_s, -H_s]], grown in place from the top-left corner.
    for (uint32_t s = 1; s < n; s *= 2) {
        for (uint32_t i = 0; i < s; ++i) {
            for (uint32_t j = 0; j < s; ++j) {
                const float x = h[(size_t) i * n + j];
                h[(size_t) (i + s) * n + j] = x;
                h[(size_t) i * n + j + s] = x;
                h[(size_t) (i + s) * n + j + s] = -x;
            }
        }
    }
    return h;
}

ggml_tensor * RotationInputs::get(ggml_context * ctx, uint32_t n) {
    auto it = by_size_.find(n);
    if (it != by_size_.end()) return it->second;
    ggml_tensor * h = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, n);
    ggml_set_input(h);
    ggml_format_name(h, "hadamard_%u", n);
    by_size_[n] = h;
    return h;
}

void RotationInputs::set() {
    for (const auto & [n, t] : by_size_) {
        std::vector<float> & d = data_[n];
        if (d.empty()) d = hadamard_matrix(n);
        ggml_backend_tensor_set(t, d.data(), 0, ggml_nbytes(t));
    }
}

ggml_tensor * rotate(ggml_context * ctx, ggml_tensor * x, ggml_tensor * h) {
    const int64_t n = h->ne[0];
    ggml_tensor * rows = ggml_reshape_2d(ctx, x, n, ggml_nelements(x) / n);
    ggml_tensor * out = ggml_mul_mat(ctx, h, rows);  // each row r -> H r (H is symmetric)
    ggml_mul_mat_set_hint(out, GGML_HINT_SRC0_IS_HADAMARD);
    return ggml_reshape_4d(ctx, out, x->ne[0], x->ne[1], x->ne[2], x->ne[3]);
}

ggml_tensor * rerotate(ggml_context * ctx, RotationInputs & in, ggml_tensor * rows, uint32_t from, uint32_t to) {
    if (from == to) return rows;
    if (from && to) throw std::runtime_error("stores of one layer rotate by different sizes");
    return rotate(ctx, rows, in.get(ctx, from ? from : to));
}

}  // namespace simkv
