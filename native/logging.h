// Where ggml's and libllama's log messages go: stderr when verbose, else errors only.
#pragma once
#include <string>

namespace simkv {

void set_native_logging(bool verbose);

// While one lives, the error messages logged on its thread are collected instead of printed, so that the
// exception that follows can say what libllama reported (a grammar's parse error, say).
class LogCapture {
public:
    LogCapture();
    ~LogCapture();
    LogCapture(const LogCapture &) = delete;
    LogCapture & operator=(const LogCapture &) = delete;
    const std::string & text() const { return text_; }

private:
    std::string text_;
    std::string * outer_;
};

}  // namespace simkv
