// A GGUF file opened for reading: header, metadata and tensor table parsed by ggml's gguf API,
// tensor data left on disk (memory-mapped later by Model). Every failure is a BadInput naming the file.
#pragma once
#include <cstdint>
#include <map>
#include <string>

struct gguf_context;
struct ggml_context;

namespace simkv {

class GgufFile {
public:
    explicit GgufFile(const std::string & path);
    ~GgufFile();
    GgufFile(const GgufFile &) = delete;
    GgufFile & operator=(const GgufFile &) = delete;

    const std::string & path() const { return path_; }
    size_t file_size() const { return file_size_; }
    size_t data_offset() const;

    bool has(const std::string & key) const;
    std::string get_str(const std::string & key) const;
    uint32_t get_u32(const std::string & key) const;          // any integer type, checked for range
    uint32_t get_u32(const std::string & key, uint32_t dflt) const;
    float get_f32(const std::string & key, float dflt) const;
    // Every scalar key rendered as text (arrays skipped), like llama-cpp-python's `metadata`.
    std::map<std::string, std::string> metadata() const;

    gguf_context * gguf() const { return gguf_; }
    ggml_context * meta() const { return meta_; }  // tensor descriptors only (no_alloc)

private:
    int64_t find(const std::string & key) const;
    std::string path_;
    size_t file_size_ = 0;
    gguf_context * gguf_ = nullptr;
    ggml_context * meta_ = nullptr;
};

}  // namespace simkv
