// The byte layout of a saved state (kv_state.cpp, engine_state.cpp): values in host byte order, strings and
// lists with their length first. A reader checks every length against what is left and what can be, so a
// truncated or damaged state is a BadInput, never a read past its end.
#pragma once
#include "errors.h"

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace simkv {

struct StateWriter {
    std::string out;
    template <typename T> void put(const T & v) { out.append(reinterpret_cast<const char *>(&v), sizeof v); }
    void put_str(const std::string & s) {
        put((uint32_t) s.size());
        out.append(s);
    }
    template <typename T> void put_vec(const std::vector<T> & v) {
        put((uint64_t) v.size());
        out.append(reinterpret_cast<const char *>(v.data()), v.size() * sizeof(T));
    }
};

struct StateReader {
    const char * p;
    size_t left;
    void need(size_t n) const {
        if (n > left) throw BadInput("the state is truncated or not a simkv state");
    }
    template <typename T> T get() {
        need(sizeof(T));
        T v;
        std::memcpy(&v, p, sizeof v);
        p += sizeof v;
        left -= sizeof v;
        return v;
    }
    std::string get_str() {
        const uint32_t n = get<uint32_t>();
        need(n);
        std::string s(p, n);
        p += n;
        left -= n;
        return s;
    }
    template <typename T> std::vector<T> get_vec(uint64_t max_items) {
        const uint64_t n = get<uint64_t>();
        if (n > max_items) throw BadInput("the state is corrupt (a list is longer than its store)");
        need(n * sizeof(T));
        std::vector<T> v(n);
        std::memcpy(v.data(), p, n * sizeof(T));
        p += n * sizeof(T);
        left -= n * sizeof(T);
        return v;
    }
};

}  // namespace simkv
