#include "logging.h"

#include <ggml.h>
#include <llama.h>

#include <atomic>
#include <cstdio>

namespace simkv {

namespace {

std::atomic<bool> g_verbose{false};  // read from whichever thread logs

void log_callback(ggml_log_level level, const char * text, void *) {
    if (g_verbose || level == GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
}

}  // namespace

void set_native_logging(bool verbose) {
    g_verbose = verbose;
    llama_log_set(log_callback, nullptr);
    ggml_log_set(log_callback, nullptr);
}

}  // namespace simkv
