// ggml-cpu's vector routines that simkv's own CPU kernels call and no installed header declares.
#pragma once

// ggml's vectorized exponentials (ggml-cpu's vec.h, built for the CPU it is built on, as ggml is):
// y[i] = e^(x[i] - max) (0 where x[i] is -inf), and their sum in double. The exact pin of
// llama-cpp-python (pyproject.toml: ggml has no stable ABI) keeps this signature.
extern "C" double ggml_vec_soft_max_f32(int n, float * y, const float * x, float max);
