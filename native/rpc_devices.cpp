#include "rpc_devices.h"

#include "devices.h"

#include <ggml.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>

namespace simkv {

const char * const k_rpc_install_hint =
    "this llama-cpp-python was built without ggml's RPC backend: reinstall it with it, "
    "CMAKE_ARGS=\"-DGGML_RPC=on\" pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python==0.3.36";

namespace {

constexpr int k_connect_timeout_ms = 3000;  // a server that does not accept in this time is not there
constexpr auto k_handshake_timeout = std::chrono::seconds(10);
constexpr auto k_poll = std::chrono::milliseconds(50);  // how often a waiting caller looks for a failure

std::atomic<bool> g_failed{false};
std::mutex g_failure_mutex;
std::string g_failure;

void mark_failed(const std::string & why) {
    {
        std::lock_guard<std::mutex> lk(g_failure_mutex);
        if (g_failure.empty()) g_failure = why;
    }
    g_failed = true;
}

std::string failure_message() {
    std::lock_guard<std::mutex> lk(g_failure_mutex);
    return "an RPC server stopped answering (" + g_failure +
           "): this process can make no more RPC calls; close the model and restart the process";
}

// ggml's abort callback. An abort raised in ggml-rpc (a dead socket, a malformed reply) parks the thread
// that hit it instead of ending the process; any other abort goes on as ggml's own (message, abort()).
void on_ggml_abort(const char * message) {
    if (std::strstr(message, "ggml-rpc") == nullptr) {
        std::fprintf(stderr, "%s\n", message);
        return;  // ggml_abort then calls abort()
    }
    mark_failed(message);
    for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
}

// One thread runs every call that may reach a remote device, one at a time. Leaked on purpose: it may be
// parked inside a dead call when the process exits.
class RemoteCallThread {
public:
    RemoteCallThread() { std::thread([this] { loop(); }).detach(); }

    // Returns false if the call did not finish before RPC failed or `limit` passed.
    bool run(const std::function<void()> & f, std::exception_ptr & error, std::chrono::milliseconds limit) {
        std::unique_lock<std::mutex> lk(m_);
        const uint64_t ticket = ++submitted_;
        task_ = &f;
        error_ = nullptr;
        cv_.notify_all();
        const auto deadline = std::chrono::steady_clock::now() + limit;
        while (finished_ != ticket) {
            cv_.wait_for(lk, k_poll);
            if (finished_ == ticket) break;
            if (g_failed || std::chrono::steady_clock::now() > deadline) return false;
        }
        error = error_;
        return true;
    }

private:
    void loop() {
        std::unique_lock<std::mutex> lk(m_);
        for (;;) {
            cv_.wait(lk, [&] { return task_ != nullptr; });
            const std::function<void()> * f = task_;
            task_ = nullptr;
            std::exception_ptr error;
            lk.unlock();
            try {
                (*f)();
            } catch (...) {
                error = std::current_exception();
            }
            lk.lock();
            error_ = error;
            ++finished_;
            cv_.notify_all();
        }
    }

    std::mutex m_;
    std::condition_variable cv_;
    const std::function<void()> * task_ = nullptr;
    std::exception_ptr error_;
    uint64_t submitted_ = 0, finished_ = 0;
};

std::mutex g_calls_mutex;  // one caller at a time on the remote-call thread

bool run_remote(const std::function<void()> & f, std::chrono::milliseconds limit) {
    static RemoteCallThread * thread = [] {
        ggml_set_abort_callback(on_ggml_abort);
        return new RemoteCallThread();
    }();
    if (g_failed) throw RemoteFailure(failure_message());
    std::lock_guard<std::mutex> one(g_calls_mutex);
    std::exception_ptr error;
    if (!thread->run(f, error, limit)) return false;
    if (error) std::rethrow_exception(error);
    return true;
}

ggml_backend_reg_t rpc_reg() { return ggml_backend_reg_by_name("RPC"); }

// Accepts a TCP connection within the timeout: a wrong host or port is a clear error here, not an abort
// inside ggml-rpc's connect.
void check_reachable(const std::string & host, const std::string & port, const std::string & endpoint) {
    addrinfo hints{}, * res = nullptr;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || !res) {
        throw RemoteFailure("RPC server " + endpoint + ": cannot resolve host '" + host + "'");
    }
    std::string error = "no answer within " + std::to_string(k_connect_timeout_ms / 1000) + " s";
    bool ok = false;
    for (addrinfo * a = res; a && !ok; a = a->ai_next) {
        const int fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
        if (fd < 0) continue;
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL, 0) | O_NONBLOCK);
        int rc = connect(fd, a->ai_addr, a->ai_addrlen);
        if (rc != 0 && errno == EINPROGRESS) {
            pollfd p{fd, POLLOUT, 0};
            if (poll(&p, 1, k_connect_timeout_ms) == 1) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
                rc = err == 0 ? 0 : -1;
                if (err) errno = err;
            } else {
                errno = ETIMEDOUT;
            }
        }
        if (rc == 0) ok = true;
        else error = std::strerror(errno);
        close(fd);
    }
    freeaddrinfo(res);
    if (!ok) throw RemoteFailure("cannot connect to the RPC server at " + endpoint + ": " + error);
}

}  // namespace

bool rpc_available() { return rpc_reg() != nullptr; }

bool rpc_failed() { return g_failed; }

bool is_remote(ggml_backend_dev_t dev) {
    return dev && std::strcmp(ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev)), "RPC") == 0;
}

void remote_call(const std::function<void()> & f) {
    if (!run_remote(f, std::chrono::hours(24 * 365))) throw RemoteFailure(failure_message());
}

void free_remote_or_leak(const std::function<void()> & free_remote, const std::function<void()> & leak) noexcept {
    try {
        remote_call(free_remote);
        return;
    } catch (...) {
    }
    leak();
}

std::vector<ggml_backend_dev_t> connect_rpc_servers(const std::string & servers) {
    ggml_backend_reg_t reg = rpc_reg();
    if (!reg) throw BadInput(std::string("rpc_servers given, but ") + k_rpc_install_hint);
    using add_server_t = ggml_backend_reg_t (*)(const char *);
    auto add_server = (add_server_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_rpc_add_server");
    if (!add_server) throw BadInput("this ggml's RPC backend has no ggml_backend_rpc_add_server");

    std::vector<ggml_backend_dev_t> out;
    size_t start = 0;
    while (start <= servers.size()) {
        size_t comma = servers.find(',', start);
        if (comma == std::string::npos) comma = servers.size();
        const std::string endpoint = servers.substr(start, comma - start);
        start = comma + 1;
        const size_t colon = endpoint.rfind(':');
        const std::string host = colon == std::string::npos ? "" : endpoint.substr(0, colon);
        const std::string port = colon == std::string::npos ? "" : endpoint.substr(colon + 1);
        const bool port_ok = !port.empty() && port.size() <= 5 && port.find_first_not_of("0123456789") == std::string::npos &&
                             std::stoi(port) > 0 && std::stoi(port) < 65536;
        if (host.empty() || !port_ok) {
            throw BadInput("rpc_servers: '" + endpoint + "' is not host:port (a list is comma-separated: "
                           "127.0.0.1:50052,127.0.0.1:50053)");
        }
        if (g_failed) throw RemoteFailure(failure_message());
        check_reachable(host, port, endpoint);
        ggml_backend_reg_t server = nullptr;
        // The handshake (and its aborts) on the remote-call thread, with a limit: a peer that accepts but is
        // not an RPC server of this protocol version never answers, or answers nonsense.
        if (!run_remote([&] { server = add_server(endpoint.c_str()); }, k_handshake_timeout)) {
            mark_failed("no handshake from " + endpoint);
            throw RemoteFailure("the server at " + endpoint + " did not complete ggml's RPC handshake within " +
                                std::to_string(k_handshake_timeout.count()) + " s: is it an rpc-server of the same ggml "
                                "version (llama-cpp-python 0.3.36), and not busy with another client (it serves one "
                                "at a time)? This process can make no more RPC calls");
        }
        if (!server || ggml_backend_reg_dev_count(server) == 0) {
            throw RemoteFailure("the RPC server at " + endpoint + " offers no device");
        }
        for (size_t i = 0; i < ggml_backend_reg_dev_count(server); ++i) {
            ggml_backend_dev_t dev = ggml_backend_reg_dev_get(server, i);
            if (std::find(out.begin(), out.end(), dev) != out.end()) throw BadInput("rpc_servers lists " + endpoint + " twice");
            out.push_back(dev);
        }
    }
    return out;
}

void serve_rpc(const std::string & endpoint, int n_threads, const std::string & cache_dir) {
    ggml_backend_reg_t reg = rpc_reg();
    if (!reg) throw BadInput(std::string("cannot start an RPC server: ") + k_rpc_install_hint);
    using start_t = void (*)(const char *, const char *, size_t, size_t, ggml_backend_dev_t *);
    auto start = (start_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_rpc_start_server");
    if (!start) throw BadInput("this ggml's RPC backend has no ggml_backend_rpc_start_server");
    if (n_threads < 1) throw BadInput("n_threads must be >= 1");
    // The GPUs when there are, else the CPU (as llama.cpp's rpc-server chooses).
    std::vector<ggml_backend_dev_t> devices = gpu_devices();
    if (devices.empty()) devices.push_back(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU));
    start(endpoint.c_str(), cache_dir.empty() ? nullptr : cache_dir.c_str(), (size_t) n_threads, devices.size(),
          devices.data());
}

}  // namespace simkv
