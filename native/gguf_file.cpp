#include "gguf_file.h"

#include "errors.h"

#include <ggml.h>
#include <gguf.h>

#include <cstdio>
#include <cstring>
#include <sys/stat.h>

namespace simkv {

GgufFile::GgufFile(const std::string & path) : path_(path) {
    struct stat st {};
    if (stat(path.c_str(), &st) != 0) throw BadInput("model file not found: " + path);
    if (!S_ISREG(st.st_mode)) throw BadInput("model path is not a regular file: " + path);
    file_size_ = (size_t) st.st_size;

    // Check the magic ourselves so a non-GGUF file gets a precise message.
    char magic[4] = {0, 0, 0, 0};
    FILE * f = std::fopen(path.c_str(), "rb");
    if (!f) throw BadInput("cannot open model file: " + path);
    size_t n = std::fread(magic, 1, 4, f);
    std::fclose(f);
    if (n < 4 || std::memcmp(magic, "GGUF", 4) != 0) {
        throw BadInput("not a GGUF file (bad magic): " + path);
    }

    gguf_init_params params = {/*no_alloc =*/true, /*ctx =*/&meta_};
    gguf_ = gguf_init_from_file(path.c_str(), params);
    if (!gguf_) throw BadInput("invalid or truncated GGUF file (header/tensor table unreadable): " + path);

    // gguf_init does not read tensor data: make sure every tensor lies inside the file.
    const int64_t n_tensors = gguf_get_n_tensors(gguf_);
    const size_t base = gguf_get_data_offset(gguf_);
    for (int64_t i = 0; i < n_tensors; ++i) {
        const char * name = gguf_get_tensor_name(gguf_, i);
        ggml_tensor * t = ggml_get_tensor(meta_, name);
        const size_t end = base + gguf_get_tensor_offset(gguf_, i) + ggml_nbytes(t);
        if (end > file_size_) {
            throw BadInput("truncated GGUF file: tensor '" + std::string(name) + "' ends at byte " +
                           std::to_string(end) + " but the file has " + std::to_string(file_size_) + " bytes: " + path);
        }
    }
}

GgufFile::~GgufFile() {
    if (gguf_) gguf_free(gguf_);
    if (meta_) ggml_free(meta_);
}

size_t GgufFile::data_offset() const { return gguf_get_data_offset(gguf_); }

int64_t GgufFile::find(const std::string & key) const { return gguf_find_key(gguf_, key.c_str()); }

bool GgufFile::has(const std::string & key) const { return find(key) >= 0; }

std::string GgufFile::get_str(const std::string & key) const {
    int64_t id = find(key);
    if (id < 0) throw BadInput("GGUF key missing: " + key + " in " + path_);
    if (gguf_get_kv_type(gguf_, id) != GGUF_TYPE_STRING) throw BadInput("GGUF key is not a string: " + key);
    return gguf_get_val_str(gguf_, id);
}

uint32_t GgufFile::get_u32(const std::string & key) const {
    int64_t id = find(key);
    if (id < 0) throw BadInput("GGUF key missing: " + key + " in " + path_);
    int64_t v;
    switch (gguf_get_kv_type(gguf_, id)) {
        case GGUF_TYPE_UINT8: v = gguf_get_val_u8(gguf_, id); break;
        case GGUF_TYPE_INT8: v = gguf_get_val_i8(gguf_, id); break;
        case GGUF_TYPE_UINT16: v = gguf_get_val_u16(gguf_, id); break;
        case GGUF_TYPE_INT16: v = gguf_get_val_i16(gguf_, id); break;
        case GGUF_TYPE_UINT32: v = gguf_get_val_u32(gguf_, id); break;
        case GGUF_TYPE_INT32: v = gguf_get_val_i32(gguf_, id); break;
        case GGUF_TYPE_UINT64: v = (int64_t) gguf_get_val_u64(gguf_, id); break;
        case GGUF_TYPE_INT64: v = gguf_get_val_i64(gguf_, id); break;
        case GGUF_TYPE_ARRAY:
            throw BadInput("GGUF key " + key + " is a per-layer array; per-layer values are not supported");
        default: throw BadInput("GGUF key is not an integer: " + key);
    }
    if (v < 0 || v > 0xFFFFFFFFLL) throw BadInput("GGUF key out of range: " + key);
    return (uint32_t) v;
}

uint32_t GgufFile::get_u32(const std::string & key, uint32_t dflt) const { return has(key) ? get_u32(key) : dflt; }

float GgufFile::get_f32(const std::string & key, float dflt) const {
    int64_t id = find(key);
    if (id < 0) return dflt;
    switch (gguf_get_kv_type(gguf_, id)) {
        case GGUF_TYPE_FLOAT32: return gguf_get_val_f32(gguf_, id);
        case GGUF_TYPE_FLOAT64: return (float) gguf_get_val_f64(gguf_, id);
        default: return (float) get_u32(key);
    }
}

std::map<std::string, std::string> GgufFile::metadata() const {
    std::map<std::string, std::string> out;
    const int64_t n = gguf_get_n_kv(gguf_);
    for (int64_t i = 0; i < n; ++i) {
        const std::string key = gguf_get_key(gguf_, i);
        std::string val;
        switch (gguf_get_kv_type(gguf_, i)) {
            case GGUF_TYPE_STRING: val = gguf_get_val_str(gguf_, i); break;
            case GGUF_TYPE_BOOL: val = gguf_get_val_bool(gguf_, i) ? "true" : "false"; break;
            case GGUF_TYPE_FLOAT32: val = std::to_string(gguf_get_val_f32(gguf_, i)); break;
            case GGUF_TYPE_FLOAT64: val = std::to_string(gguf_get_val_f64(gguf_, i)); break;
            case GGUF_TYPE_ARRAY: continue;
            // Each integer with its own type (a u64 parameter count or a negative value is valid metadata).
            case GGUF_TYPE_UINT8: val = std::to_string(gguf_get_val_u8(gguf_, i)); break;
            case GGUF_TYPE_INT8: val = std::to_string(gguf_get_val_i8(gguf_, i)); break;
            case GGUF_TYPE_UINT16: val = std::to_string(gguf_get_val_u16(gguf_, i)); break;
            case GGUF_TYPE_INT16: val = std::to_string(gguf_get_val_i16(gguf_, i)); break;
            case GGUF_TYPE_UINT32: val = std::to_string(gguf_get_val_u32(gguf_, i)); break;
            case GGUF_TYPE_INT32: val = std::to_string(gguf_get_val_i32(gguf_, i)); break;
            case GGUF_TYPE_UINT64: val = std::to_string(gguf_get_val_u64(gguf_, i)); break;
            case GGUF_TYPE_INT64: val = std::to_string(gguf_get_val_i64(gguf_, i)); break;
            default: continue;
        }
        out[key] = val;
    }
    return out;
}

}  // namespace simkv
