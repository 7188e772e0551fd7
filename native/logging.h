// Where ggml's and libllama's log messages go: stderr when verbose, else errors only.
#pragma once

namespace simkv {

void set_native_logging(bool verbose);

}  // namespace simkv
