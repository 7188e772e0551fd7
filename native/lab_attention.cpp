#include "lab_attention.h"

#include "attention_quantized.h"
#include "errors.h"
#include "kv_gather.h"

#include <ggml-cpp.h>
#include <ggml-cpu.h>

#include <chrono>
#include <cstring>
#include <memory>

namespace simkv {

namespace {

struct ThreadpoolFree {
    void operator()(ggml_threadpool * p) const { ggml_threadpool_free(p); }
};

void check(const AttentionCase & c, const std::string & kernel) {
    if (c.d <= 0 || c.n_head <= 0 || c.n_head_kv <= 0 || c.n_tokens <= 0 || c.n_kv <= 0) {
        throw BadInput("attention sizes must be positive");
    }
    if (c.n_head % c.n_head_kv != 0) throw BadInput("n_head must be a multiple of n_head_kv");
    if (c.d % 32 != 0) throw BadInput("head size must be a multiple of 32 (a quantized block)");
    const size_t row = (size_t) (c.n_head_kv * c.d);
    if (c.k_bytes != ggml_row_size(c.k_type, row) * c.n_kv || c.v_bytes != ggml_row_size(c.v_type, row) * c.n_kv) {
        throw BadInput("k and v must hold n_kv rows of n_head_kv * head size values of their types");
    }
    if (kernel != "simkv" && kernel != "simkv-portable" && kernel != "dequantized" && kernel != "ggml") {
        throw BadInput("kernel must be simkv, simkv-portable, dequantized or ggml, got '" + kernel + "'");
    }
    if ((kernel == "simkv" || kernel == "simkv-portable") && !attention_quantized_reads(c.k_type, c.v_type)) {
        throw BadInput("the simkv kernel reads q8_0 and q4_0 K and V only");
    }
}

}  // namespace

std::vector<float> run_attention(const AttentionCase & c, const std::string & kernel, int n_threads, int repeats,
                                 std::vector<double> & seconds) {
    check(c, kernel);
    if (n_threads < 1 || repeats < 1) throw BadInput("n_threads and repeats must be >= 1");
    const int64_t row = c.n_head_kv * c.d;
    const size_t k_bytes = c.k_bytes, v_bytes = c.v_bytes;
    const size_t f32_cells = (size_t) row * c.n_kv * sizeof(float);
    const size_t out = (size_t) c.d * c.n_head * c.n_tokens * sizeof(float);
    const size_t partials = (size_t) (c.d + 2) * c.n_head * c.n_tokens * (c.n_kv / 256 + 1) * sizeof(float);
    const size_t mem = out * 3 + k_bytes + v_bytes + 2 * f32_cells + partials + (size_t) c.n_tokens * c.n_kv * 2 +
                       ggml_tensor_overhead() * 32 + ggml_graph_overhead() + (1 << 20);
    ggml_init_params ip = {mem, nullptr, false};
    ggml_context_ptr ctx_owner(ggml_init(ip));
    ggml_context * ctx = ctx_owner.get();

    ggml_tensor * q = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, c.d, c.n_head, c.n_tokens);
    std::memcpy(q->data, c.q, ggml_nbytes(q));
    ggml_tensor * k_store = ggml_new_tensor_2d(ctx, c.k_type, row, c.n_kv);
    ggml_tensor * v_store = ggml_new_tensor_2d(ctx, c.v_type, row, c.n_kv);
    std::memcpy(k_store->data, c.k, k_bytes);
    std::memcpy(v_store->data, c.v, v_bytes);
    ggml_tensor * mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, c.n_kv, c.n_tokens);
    ggml_fp32_to_fp16_row(c.mask, (ggml_fp16_t *) mask->data, c.n_kv * c.n_tokens);
    // A store's cells as graph_attention.cpp views them: [d, n_kv, n_head_kv]
    auto cells = [&](ggml_tensor * s) {
        return ggml_view_3d(ctx, s, c.d, c.n_kv, c.n_head_kv, s->nb[1], ggml_row_size(s->type, c.d), 0);
    };
    ggml_tensor * k = cells(k_store), * v = cells(v_store);
    ggml_tensor * o = nullptr;
    if (kernel == "simkv" || kernel == "simkv-portable") {
        o = attention_quantized(ctx, q, k, v, mask, c.scale, kernel == "simkv-portable");
    } else {
        if (kernel == "dequantized") {
            k = cells_converted(ctx, k, GGML_TYPE_F32, true);
            v = cells_converted(ctx, v, GGML_TYPE_F32, true);
        }
        o = ggml_flash_attn_ext(ctx, ggml_permute(ctx, q, 0, 2, 1, 3), k, v, mask, c.scale, 0.0f, 0.0f);
        ggml_flash_attn_ext_set_prec(o, GGML_PREC_F32);
    }
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, o);

    ggml_threadpool_params tpp = ggml_threadpool_params_default(n_threads);
    std::unique_ptr<ggml_threadpool, ThreadpoolFree> pool(ggml_threadpool_new(&tpp));
    ggml_cplan plan = ggml_graph_plan(gf, n_threads, pool.get());
    std::vector<uint8_t> work(plan.work_size);
    plan.work_data = work.data();
    seconds.clear();
    for (int r = 0; r < repeats; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        if (ggml_graph_compute(gf, &plan) != GGML_STATUS_SUCCESS) throw std::runtime_error("attention graph failed");
        seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::vector<float> result((size_t) c.d * c.n_head * c.n_tokens);
    std::memcpy(result.data(), o->data, result.size() * sizeof(float));
    return result;
}

}  // namespace simkv
