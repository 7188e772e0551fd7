"""Layers on ggml RPC servers (`rpc_servers`, `--rpc`, `simkv rpc-server`): placement across two servers and
the CPU, what users see of it, and what happens when a server is wrong or dies. The logits of every layer
kind on an RPC device against the CPU: test_offload.py (its `device` fixture runs them on RPC servers).

A failed RPC server leaves the whole process unable to use RPC (rpc_devices.h), so the tests that make one
fail run in a child process of their own."""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from conftest import require_rpc, start_rpc_server, stop_rpc_server
from py_simkv import Llama

TOKENS = [int(t) for t in np.random.default_rng(5).integers(0, 49152, 160)]


def _model(tiny_model):
    return tiny_model("llama", weight_type="f16", head_dim=64, n_layer=6)


def test_layers_split_over_two_servers_and_the_cpu(tiny_model, rpc_servers):
    path = _model(tiny_model)
    s1, s2 = rpc_servers.split(",")
    cpu = Llama(path, n_ctx=256, n_threads=2, logits_all=True)
    cpu.eval(TOKENS)
    # tensor_split 2:1 of the last 4 layers (and not the output): 2 + 1 would be 8/3 layers, so the shares
    # round as llama.cpp's split points do: layers 2,3,4 on the first server, 5 on the second.
    llm = Llama(path, n_ctx=256, n_threads=2, logits_all=True, rpc_servers=rpc_servers, n_gpu_layers=4,
                tensor_split=[2, 1])
    assert llm._model.layer_devices == ["CPU", "CPU", f"RPC0[{s1}]", f"RPC0[{s1}]", f"RPC0[{s1}]", f"RPC0[{s2}]", "CPU"]
    stats = llm.kv_cache_stats()
    assert [layer["device"] for layer in stats["layers"]] == llm._model.layer_devices[:-1]
    llm.eval(TOKENS)
    assert np.array_equal(llm.scores[: llm.n_tokens], cpu.scores[: cpu.n_tokens])  # same CPU kernels remotely
    # by free memory (the two servers report about the same): 7 units (6 layers and the output), the first
    # 4 below the split point at ~1/2
    even = Llama(path, n_ctx=64, n_threads=2, rpc_servers=rpc_servers, n_gpu_layers=-1)
    assert even._model.layer_devices == [f"RPC0[{s1}]"] * 4 + [f"RPC0[{s2}]"] * 3


def test_bad_rpc_arguments_are_clear_errors_at_load(tiny_model, rpc_servers):
    path = _model(tiny_model)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ConnectionError, match=f"cannot connect to the RPC server at {closed}"):
        Llama(path, n_ctx=64, rpc_servers=closed, n_gpu_layers=-1)
    for bad in ("localhost", "127.0.0.1:0", "127.0.0.1:http", ":50052", f"{rpc_servers},"):
        with pytest.raises(ValueError, match="host:port"):
            Llama(path, n_ctx=64, rpc_servers=bad, n_gpu_layers=-1)
    with pytest.raises(ValueError, match="twice"):
        Llama(path, n_ctx=64, rpc_servers=rpc_servers.split(",")[0] + "," + rpc_servers.split(",")[0], n_gpu_layers=-1)
    with pytest.raises(ValueError, match="tensor_split has 3 entries for 2 offload device"):
        Llama(path, n_ctx=64, rpc_servers=rpc_servers, n_gpu_layers=-1, tensor_split=[1, 1, 1])
    with pytest.raises(ValueError, match="tensor_split entries must be >= 0"):
        Llama(path, n_ctx=64, rpc_servers=rpc_servers, n_gpu_layers=-1, tensor_split=[1, -1])
    with pytest.raises(TypeError, match="rpc_servers"):
        Llama(path, n_ctx=64, rpc_servers=["127.0.0.1:1"])
    # nothing above broke RPC for this process
    llm = Llama(path, n_ctx=64, n_threads=2, rpc_servers=rpc_servers, n_gpu_layers=-1)
    llm.eval(TOKENS[:10])


def test_cli_names_each_layers_device(tiny_model, rpc_servers):
    path = _model(tiny_model)
    s1, s2 = rpc_servers.split(",")
    out = subprocess.run([sys.executable, "-m", "py_simkv.cli", "info", path, "--rpc", rpc_servers, "-ngl", "4",
                          "--tensor-split", "1,1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"placement    layers 0-1 CPU, 2-3 RPC0[{s1}], 4-5 RPC0[{s2}]; output CPU" in out.stdout
    assert f"({s1}," in out.stdout and f"({s2}," in out.stdout
    out = subprocess.run([sys.executable, "-m", "py_simkv.cli", "generate", path, "--rpc", rpc_servers, "-ngl", "-1",
                          "-p", "hello", "-n", "4", "--temp", "0", "--no-lazy", "--n-ctx", "128"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


_CHILD = textwrap.dedent("""
    import sys, time
    from py_simkv import Llama
    path, servers = sys.argv[1], sys.argv[2]
    llm = Llama(path, n_ctx=4096, n_threads=2, rpc_servers=servers, n_gpu_layers=-1, lazy_layers=[1, 3],
                n_window=32)
    print("loaded", flush=True)
    try:
        for i in range(4000):
            llm.eval([100 + i % 1000])
            if i == 20:
                print("decoding", flush=True)
        print("finished without an error", flush=True)
    except ConnectionError as e:
        print("error", repr(str(e)), flush=True)
    try:
        Llama(path, n_ctx=64, rpc_servers=servers, n_gpu_layers=-1)
    except ConnectionError as e:
        print("refused", repr(str(e)), flush=True)
    try:
        llm._model.offload_devices  # asks the dead server for its memory
    except ConnectionError:
        print("labels refused", flush=True)
    llm.close()
    del llm
    cpu = Llama(path, n_ctx=64, n_threads=2)  # the process goes on without RPC
    cpu.eval([1, 2, 3])
    print("closed", flush=True)
""")


def test_a_server_dying_mid_generation_is_a_python_error(tiny_model, rpc_servers):
    path = _model(tiny_model)
    server, endpoint = start_rpc_server()
    child = subprocess.Popen([sys.executable, "-c", _CHILD, path, endpoint], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in child.stdout:
            lines.append(line.strip())
            if line.startswith("decoding"):
                break
        assert lines[-1:] == ["decoding"], (lines, child.stderr.read())
        server.send_signal(signal.SIGKILL)
        killed = time.time()
        server.wait(timeout=10)
        line = child.stdout.readline().strip()
        waited = time.time() - killed
        assert line.startswith("error") and "RPC server stopped answering" in line, line
        assert waited < 5, waited  # bounded: the dead socket is noticed at the next call
        rest = child.stdout.read().split("\n")  # to the child's end (communicate() would skip what is buffered)
        child.wait(timeout=60)
        assert rest[0].startswith("refused") and "no more RPC calls" in rest[0], rest
        assert "labels refused" in rest and "closed" in rest, rest
        assert child.returncode == 0
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        if server.poll() is None:
            stop_rpc_server(server)
    assert server.poll() is not None and child.poll() is not None  # nothing left running


def test_a_peer_that_is_not_an_rpc_server_is_an_error_not_a_crash(tiny_model):
    require_rpc()
    path = _model(tiny_model)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]

    def answer_nonsense():  # an HTTP server, say: it answers the handshake with text
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                conn.recv(64)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" * 4)
            except OSError:
                pass
            conn.close()

    threading.Thread(target=answer_nonsense, daemon=True).start()
    code = ("import sys\nfrom py_simkv import Llama\ntry:\n    Llama(sys.argv[1], n_ctx=64, rpc_servers=sys.argv[2], "
            "n_gpu_layers=-1)\nexcept ConnectionError as e:\n    print('error', e)\n")
    try:
        out = subprocess.run([sys.executable, "-c", code, path, f"127.0.0.1:{port}"], capture_output=True, text=True,
                             timeout=60)
    finally:
        listener.close()
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("error"), (out.stdout, out.stderr[-2000:])


def test_several_sequences_with_exact_prefill_on_the_servers(tiny_model, rpc_servers):
    # Each prompt is evaluated in a cache of its own, on the layers' devices, then copied into the shared
    # cache there (KvCache::adopt_sequence): all of it on the servers here.
    path = _model(tiny_model)
    prompts = {0: TOKENS[:120], 1: TOKENS[40:100]}
    out = []
    for kw in ({}, dict(rpc_servers=rpc_servers, n_gpu_layers=-1)):
        llm = Llama(path, n_ctx=512, n_threads=2, n_seq_max=2, lazy_layers=[1, 4], n_window=16, lazy_type="f16",
                    lazy_prefill="exact", **kw)
        seqs = llm.sequences
        logits = seqs.decode(prompts)
        nxt = {s: [int(lg.argmax())] for s, lg in logits.items()}
        steps = []
        for _ in range(24):  # both rings wrap (window 16)
            logits = seqs.decode(nxt)
            steps.append(np.stack([logits[0], logits[1]]))
            nxt = {s: [int(lg.argmax())] for s, lg in logits.items()}
        out.append(np.stack(steps))
        llm.close()
    err = np.abs(out[0] - out[1])
    assert err.max() < 0.1 and err.mean() < 5e-3, (err.max(), err.mean())  # the f16 bound of test_offload.py


def test_close_hands_the_server_to_the_next_client(tiny_model):
    # A ggml RPC server serves one client connection at a time, and a model holds its connection: close()
    # must let it go, sequences included, so another process can use the server.
    require_rpc()
    path = _model(tiny_model)
    server, endpoint = start_rpc_server()
    try:
        llm = Llama(path, n_ctx=256, n_threads=2, n_seq_max=2, rpc_servers=endpoint, n_gpu_layers=-1)
        llm.sequences.decode({0: TOKENS[:20], 1: TOKENS[20:30]})
        llm.close()
        with pytest.raises(ValueError, match="closed"):
            llm.sequences
        code = ("import sys\nfrom py_simkv import Llama\nllm = Llama(sys.argv[1], n_ctx=64, rpc_servers=sys.argv[2], "
                "n_gpu_layers=-1)\nllm.eval([1, 2, 3])\nprint('ok')\n")
        out = subprocess.run([sys.executable, "-c", code, path, endpoint], capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "ok", out.stderr[-2000:]
    finally:
        stop_rpc_server(server)
