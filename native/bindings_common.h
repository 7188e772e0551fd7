// What every binding file shares: the one way an engine call is made from Python (engine_call), the one
// way its state is read (read_claim), Ctrl-C between ubatches, and arrays handed to numpy without a copy.
#pragma once
#include "engine.h"
#include "model.h"
#include "rpc_devices.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

namespace simkv::py {

namespace nb = nanobind;

using FloatArray2 = nb::ndarray<nb::numpy, float, nb::ndim<2>>;
using TokenArray = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// Between ubatches of a long call (GIL released): take the GIL for a moment and let a pending signal
// (Ctrl-C) raise here, so a long prefill stops within a ubatch instead of after the whole call. Python
// handles signals on its main thread only: a call from another thread (a server's scheduler) does not
// check, and so never waits for the GIL between ubatches.
inline const BetweenUbatches check_signals = [] {
    nb::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw nb::python_error();
};

// Runs f where a call that may reach a remote device must run (rpc_devices.h): on the remote-call thread
// when the model has layers on an RPC server, else right here.
template <class F>
void on_device_thread(const Model & model, F && f) {
    if (model.uses_remote()) remote_call(f);
    else f();
}

// One engine call from Python, the one way every binding makes it: the GIL released (other Python threads
// run meanwhile), the engine claimed (one call at a time: a racing thread gets an error, not a corrupted
// cache), and the work run on the device thread. Returns what f returns.
template <class F>
auto engine_call(const Engine & e, F && f) -> decltype(f()) {
    nb::gil_scoped_release release;
    auto busy = e.claim();
    if constexpr (std::is_void_v<decltype(f())>) {
        on_device_thread(e.model(), f);
    } else {
        std::optional<decltype(f())> result;
        on_device_thread(e.model(), [&] { result.emplace(f()); });
        return std::move(*result);
    }
}

// A read of the engine's state from Python (counts, cells, bytes, lazy layers): under the engine's claim
// too, so it never sees a cache half-way through a call, but a reader waits for a running call to end
// instead of failing: a server's status route must not answer "busy". The GIL is released only to wait:
// a free engine is claimed at once, since giving the GIL up lets another Python thread hold it for up to
// its switch interval (5 ms), and a server's scheduler reads the cache several times a step.
inline std::unique_lock<std::mutex> read_claim(const Engine & e) {
    if (std::unique_lock<std::mutex> now = e.try_claim()) return now;
    nb::gil_scoped_release release;
    return e.wait_claim();
}

// The interpreter's main thread, read once when the module is imported.
extern unsigned long g_main_thread;

// Called with the GIL held, before it is released for the call.
inline BetweenUbatches signal_check_for_this_thread() {
    return PyThread_get_thread_ident() == g_main_thread ? check_signals : BetweenUbatches();
}

inline FloatArray2 to_numpy(std::vector<float> && v, size_t rows, size_t cols) {
    auto * heap = new std::vector<float>(std::move(v));
    nb::capsule owner(heap, [](void * p) noexcept { delete static_cast<std::vector<float> *>(p); });
    return FloatArray2(heap->data(), {rows, cols}, owner);
}

// bindings_lab.cpp: the `lab` submodule (research hooks).
void define_lab(nb::module_ & m);

}  // namespace simkv::py
