// The next-token loss of each output row: -log softmax(logits)[target]. The profiler's what-ifs need one
// number per token, and copying n x n_vocab logits out to take their log-softmax in numpy (float64) took a
// sixth of `simkv profile`'s time. Where the vocabulary projection runs on the CPU the loss is a node of the
// graph, on ggml's threads; elsewhere (a GPU, an RPC server: they would be handed a CPU function) the engine
// takes it from the logits it reads back (Engine::eval_ubatch).
#include "graph.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace simkv {

namespace {

// Vectors of floats by the compiler's vector extension, as wide as the target's registers: the loss reads all
// n_vocab logits of every scored row and takes an exponential of each: with scalar expf (built for size, -Os)
// that was near a tenth of a profile's time; this is 8x faster than scalar expf at -O3 on an AVX-512 machine.
// The file is built for the machine it is built on (CMakeLists.txt, SIMKV_NATIVE), as ggml is.
#if defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float floats __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t ints __attribute__((vector_size(kLanes * sizeof(int32_t))));

floats load(const float * p) {
    floats x;
    std::memcpy(&x, p, sizeof x);
    return x;
}

// e^x for x <= 0, lane by lane: x = n ln2 + r with |r| <= ln2/2, e^r by its Taylor polynomial to r^7/7!
// (truncation below 6e-9 relative; the float arithmetic adds a few ulp, ~3e-7), times 2^n written into the
// exponent bits. x below -87 counts as -87 (2^n stays in float's range): the result, under 2e-38 instead of
// less, is added to a sum of at least 1 (the maximum's e^0), which it cannot change.
floats exp_nonpositive(floats x) {
    const floats lowest = x - x - 87.0f;
    x = x < lowest ? lowest : x;
    const floats shifted = x * 1.44269504088896341f + 12582912.0f;  // + 1.5 * 2^23 rounds x / ln2 to n
    const floats n = shifted - 12582912.0f;
    const floats r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln2 in two parts
    floats p = r * (1.0f / 5040) + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const ints n_in_exponent = ((ints) shifted - 0x4B400000) << 23;  // n from the low bits of shifted
    return (floats) ((ints) p + n_in_exponent);
}

}  // namespace

float token_nll(const float * logits, int64_t n_vocab, int32_t target) {
    if (target < 0) return 0.0f;
    const int64_t n_whole = n_vocab / kLanes * kLanes;  // logits in whole vectors; the rest one by one
    // the exponentials from the row's maximum: none over- or underflows
    float top = logits[0];
    floats tops = top - floats{};
    for (int64_t v = 0; v < n_whole; v += kLanes) {
        const floats x = load(logits + v);
        tops = x > tops ? x : tops;
    }
    for (int k = 0; k < kLanes; ++k) top = std::max(top, tops[k]);
    for (int64_t v = n_whole; v < n_vocab; ++v) top = std::max(top, logits[v]);
    // float sums over blocks of 512 logits, added in double
    double sum = 0.0;
    for (int64_t v0 = 0; v0 < n_whole; v0 += 512) {
        floats part = {};
        for (int64_t v = v0; v < std::min(n_whole, v0 + 512); v += kLanes) part += exp_nonpositive(load(logits + v) - top);
        for (int k = 0; k < kLanes; ++k) sum += part[k];
    }
    for (int64_t v = n_whole; v < n_vocab; ++v) sum += std::exp(logits[v] - top);
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
