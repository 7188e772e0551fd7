// Errors that cross into Python. nanobind maps std::invalid_argument to ValueError and
// std::runtime_error to RuntimeError, so bad input never reaches a ggml assert (which aborts).
#pragma once
#include <stdexcept>
#include <string>

namespace simkv {

struct BadInput : std::invalid_argument {
    explicit BadInput(const std::string & what) : std::invalid_argument(what) {}
};

}  // namespace simkv
