// A layer store's K and V types. Each layer has its own (engine_config.h: type_k/type_v, lazy_type and
// per-layer overrides), and K and V may differ: keys are the more sensitive to rounding.
#pragma once
#include <ggml.h>

namespace simkv {

struct KvTypes {
    ggml_type k = GGML_TYPE_F16, v = GGML_TYPE_F16;  // f16, bf16, q8_0 or q4_0 each
    bool quantized() const { return ggml_is_quantized(k) || ggml_is_quantized(v); }
    bool operator==(const KvTypes & o) const { return k == o.k && v == o.v; }
};

}  // namespace simkv
