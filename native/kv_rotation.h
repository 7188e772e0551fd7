// Hadamard rotation of quantized KV stores: why, and where it is applied.
//
// Q4_0 and Q8_0 give each block of 32 values one scale, so a few large channels (post-RoPE keys have
// them) cost every other value of their block its precision. Rotating each head vector by an orthonormal
// Walsh-Hadamard matrix H before quantizing spreads such channels over the block. Attention is unchanged:
// (Hq)·(Hk) = q·k, and softmax(...)·(Hv) = H·(softmax(...)·v), which H turns back (H·H = I).
//
// llama.cpp rotates its quantized KV cache the same way (same sizes: K by the largest power of two that
// divides the head size, V by 64; head sizes that are multiples of 64 only), so a quantized simkv store
// holds what llama.cpp's would, and its q4_0 KV is an exact baseline for ours.
//
// Applied in graph_attention.cpp (Q, K, V before a rotated store, the attention output after it) and in
// the exact-prefill compaction in engine.cpp (rows moving between a rotated and an unrotated store).
#pragma once
#include "kv_types.h"

#include <ggml.h>

#include <cstdint>
#include <map>
#include <vector>

namespace simkv {

// Sizes of the rotations a store applies to K and to V; 0 = stored as computed.
struct KvRotation {
    uint32_t k = 0;
    uint32_t v = 0;
};

// A quantized K (or V) with a head size that is a multiple of 64 is rotated; f16/f32/bf16 ones are not.
KvRotation rotation_for(KvTypes types, uint32_t head_dim);

// The n x n orthonormal Walsh-Hadamard matrix (Sylvester order, entries +-1/sqrt(n)), row-major.
std::vector<float> hadamard_matrix(uint32_t n);

// One graph's H matrices, as inputs created on first use and filled once the graph is allocated.
// (ggml's CPU and CUDA backends see the op hint and run a fast transform instead of the product; the
// matrix is what any other backend multiplies by.)
class RotationInputs {
public:
    ggml_tensor * get(ggml_context * ctx, uint32_t n);
    void set();  // after the scheduler allocated the graph
private:
    std::map<uint32_t, ggml_tensor *> by_size_;
    std::map<uint32_t, std::vector<float>> data_;
};

// x rotated in consecutive blocks of h's size along its first dimension (x contiguous, F32; same shape out).
ggml_tensor * rotate(ggml_context * ctx, ggml_tensor * x, ggml_tensor * h);

// Rows moving from a store rotated by `from` to one rotated by `to` (sizes, 0 = none): H is its own
// inverse, so they are rotated once when exactly one side is rotated, and left alone otherwise.
ggml_tensor * rerotate(ggml_context * ctx, RotationInputs & in, ggml_tensor * rows, uint32_t from, uint32_t to);

}  // namespace simkv
