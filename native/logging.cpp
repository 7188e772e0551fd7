#include "logging.h"

#include <ggml.h>
#include <llama.h>

#include <atomic>
#include <cstdio>
#include <string>

namespace simkv {

namespace {

std::atomic<bool> g_verbose{false};  // read from whichever thread logs
thread_local std::string * g_capture = nullptr;  // this thread's innermost LogCapture, if any

void log_callback(ggml_log_level level, const char * text, void *) {
    if (g_capture && (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_CONT)) {
        g_capture->append(text);
        return;
    }
    if (g_verbose || level == GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
}

}  // namespace

void set_native_logging(bool verbose) {
    g_verbose = verbose;
    llama_log_set(log_callback, nullptr);
    ggml_log_set(log_callback, nullptr);
}

LogCapture::LogCapture() : outer_(g_capture) { g_capture = &text_; }

LogCapture::~LogCapture() { g_capture = outer_; }

}  // namespace simkv
