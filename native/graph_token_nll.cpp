// The next-token loss of each output row: -log softmax(logits)[target]. The profiler's what-ifs need one
// number per token, and copying n x n_vocab logits out to take their log-softmax in numpy (float64) took a
// sixth of `simkv profile`'s time. Where the vocabulary projection runs on the CPU the loss is a node of the
// graph, on ggml's threads; elsewhere (a GPU, an RPC server: they would be handed a CPU function) the engine
// takes it from the logits it reads back (Engine::eval_ubatch).
#include "graph.h"
#include "ggml_cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace simkv {

float token_nll(const float * logits, int64_t n_vocab, int32_t target) {
    if (target < 0) return 0.0f;
    // the exponentials from the row's maximum: none over- or underflows
    const float top = *std::max_element(logits, logits + n_vocab);
    thread_local std::vector<float> exps;  // ggml writes each exponential out: a row's worth per thread
    exps.resize((size_t) n_vocab);
    const double sum = ggml_vec_soft_max_f32((int) n_vocab, exps.data(), logits, top);
    return (float) (std::log(sum) + (double) top - (double) logits[target]);
}

namespace {

// ggml custom op: dst[0, r] = token_nll(logits[:, r], targets[r]), rows split across threads.
void token_nll_rows(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * logits = dst->src[0];
    const auto * targets = (const int32_t *) dst->src[1]->data;
    const int64_t n = logits->ne[1], per = (n + nth - 1) / nth;
    for (int64_t r = ith * per; r < std::min(n, (ith + 1) * per); ++r) {
        const auto * x = (const float *) ((const char *) logits->data + (size_t) r * logits->nb[1]);
        ((float *) dst->data)[r] = token_nll(x, logits->ne[0], targets[r]);
    }
}

}  // namespace

ggml_tensor * build_token_nll(ggml_context * ctx, ggml_tensor * logits, ggml_tensor * targets) {
    ggml_tensor * args[2] = {logits, targets};
    return cb(ggml_custom_4d(ctx, GGML_TYPE_F32, 1, logits->ne[1], 1, 1, args, 2, token_nll_rows, GGML_N_TASKS_MAX,
                             nullptr),
              "result_nll", -1);
}

}  // namespace simkv
