// Remote devices: ggml's RPC backend, found at run time through ggml's backend registry (as llama.cpp's
// --rpc finds it), so one simkv build runs on a llama-cpp-python built with or without -DGGML_RPC=on.
//
// A dead server. ggml-rpc reports a lost connection with GGML_ABORT, most often on its dispatcher thread,
// which would take the whole process down. Here the abort is caught by ggml's abort callback: the thread
// that hit it is parked for good, RPC is marked failed for this process, and the call that was waiting gets
// a RemoteFailure (ConnectionError in Python) within ~50 ms. That is why every call that can reach a remote
// device runs on the remote-call thread (remote_call): the caller's own thread never blocks on a dead
// socket. After a failure nothing more is sent: objects that hold remote buffers leak them when dropped
// (free_remote_or_leak) instead of asking a dead server to free them, and new RPC devices are refused until
// the process restarts (ggml-rpc keeps its dead connection, by endpoint, for the life of the process).
#pragma once
#include "errors.h"

#include <ggml-backend.h>

#include <functional>
#include <string>
#include <vector>

namespace simkv {

struct RemoteFailure : std::runtime_error {
    explicit RemoteFailure(const std::string & what) : std::runtime_error(what) {}
};

// This ggml build has the RPC backend.
bool rpc_available();
// What to do when it does not.
extern const char * const k_rpc_install_hint;

// Devices of the RPC servers "host:port,host:port", in that order. Throws BadInput for a malformed list and
// RemoteFailure for a server that does not accept a connection or answer ggml's handshake within a few
// seconds.
std::vector<ggml_backend_dev_t> connect_rpc_servers(const std::string & servers);

// Serve this machine's devices (its CPU; its GPUs too when ggml was built with them) to RPC clients at
// endpoint, until the process is killed.
void serve_rpc(const std::string & endpoint, int n_threads, const std::string & cache_dir);

bool is_remote(ggml_backend_dev_t dev);

// An RPC server of this process died or stopped answering: no remote call may be made any more.
bool rpc_failed();

// Runs f on the remote-call thread and waits; f's exception is rethrown here. Throws RemoteFailure if RPC
// has failed (before or during f). A caller without remote devices calls f directly instead.
void remote_call(const std::function<void()> & f);

// For destructors of objects that own remote buffers: free_remote runs on the remote-call thread; if RPC
// failed (before or during it), leak gives up what is left without freeing it. Never throws.
void free_remote_or_leak(const std::function<void()> & free_remote, const std::function<void()> & leak) noexcept;

}  // namespace simkv
