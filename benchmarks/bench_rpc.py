"""Layers on ggml RPC servers: prefill and decode speed with every layer local, offloaded to one
local RPC server, and split over two, at depth 0 and 4K; and the bytes that cross the sockets per decoded
token. Beside it, llama.cpp's own RPC (llama-bench --rpc with its ggml-rpc-server, built from the pinned source by
benchmarks/build_llama_cpp.sh) with the same placements.

    python benchmarks/bench_rpc.py --repeats 3

The servers run on this machine, so their compute shares its cores with the client: these figures are the
cost of the RPC path (serialization, copies, round trips), not a speed-up from more hardware. pp = a 512-token
prompt after `depth` tokens; tg = 64 single-token steps after `depth` tokens (no sampling, as llama-bench);
medians. Bytes per decoded token cross a counting relay in front of each server (both ways), in runs of
their own: for simkv around 64 decode steps; for llama-bench as the difference of a 64- and a 128-token run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

from py_simkv import Llama, default_model_path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import corpus_text  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA_BIN = os.path.join(HERE, "..", "..", "llamacpp-build", "bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"RPC server on {port} exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"RPC server on {port} did not listen")


def start_servers(kind: str, n: int, threads: int):
    procs, endpoints = [], []
    for _ in range(n):
        port = free_port()
        if kind == "simkv":
            cmd = [sys.executable, "-m", "py_simkv.cli", "rpc-server", "--port", str(port), "--threads", str(threads)]
        else:
            cmd = [os.path.join(LLAMA_BIN, "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(port, p)
        procs.append(p)
        endpoints.append(f"127.0.0.1:{port}")
    return procs, ",".join(endpoints)


def stop(procs) -> None:
    for p in procs:
        p.kill()
        p.wait()


class ByteCounter:
    """A TCP relay in front of each server that counts the bytes crossing it both ways: the clients of the
    bytes runs connect through it (the speed runs connect directly)."""

    def __init__(self, servers: str):
        self.total = 0
        self.lock = threading.Lock()
        self.endpoints = []
        for endpoint in servers.split(","):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            port = int(endpoint.rsplit(":", 1)[1])
            threading.Thread(target=self._accept, args=(listener, port), daemon=True).start()
            self.endpoints.append(f"127.0.0.1:{listener.getsockname()[1]}")

    @property
    def servers(self) -> str:
        return ",".join(self.endpoints)

    def _accept(self, listener, port):
        while True:
            client, _ = listener.accept()
            upstream = socket.create_connection(("127.0.0.1", port))
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                dst.sendall(data)
                with self.lock:
                    self.total += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def simkv_llama(path, servers, depths, n_pp, n_tg, threads):
    return Llama(path, n_ctx=max(depths) + n_pp + n_tg + 64, n_threads=threads, n_batch=512, n_ubatch=512,
                 rpc_servers=servers, n_gpu_layers=-1 if servers else 0)


def simkv_row(path, n_servers, depths, n_pp, n_tg, repeats, threads):
    procs, servers = start_servers("simkv", n_servers, threads) if n_servers else ([], None)
    try:
        toks = Llama(path, vocab_only=True).tokenize(corpus_text().encode(), add_bos=False)
        llm = simkv_llama(path, servers, depths, n_pp, n_tg, threads)
        seqs = llm.sequences
        out = {}
        for d in depths:
            seqs.clear(0)
            if d:
                seqs.decode({0: toks[:d]})
            pp, tg = [], []
            for _ in range(repeats):
                seqs.truncate(0, d)
                t0 = time.perf_counter()
                seqs.decode({0: toks[d:d + n_pp]})
                pp.append(n_pp / (time.perf_counter() - t0))
                seqs.truncate(0, d)
                t0 = time.perf_counter()
                for i in range(n_tg):
                    seqs.decode({0: [toks[d + i]]})
                tg.append(n_tg / (time.perf_counter() - t0))
            out[d] = [statistics.median(pp), statistics.median(tg), 0.0]
        seqs = None  # it holds the engine: a server's connection closes with the last reference
        llm.close()  # (a ggml RPC server takes one client connection at a time)
        if servers:  # bytes per decoded token, through the counting relay
            counter = ByteCounter(servers)
            llm = simkv_llama(path, counter.servers, depths, n_pp, n_tg, threads)
            seqs = llm.sequences
            for d in depths:
                seqs.clear(0)
                if d:
                    seqs.decode({0: toks[:d]})
                before = counter.total
                for i in range(n_tg):
                    seqs.decode({0: [toks[d + i]]})
                out[d][2] = (counter.total - before) / n_tg
            seqs = None
            llm.close()
        return out
    finally:
        stop(procs)


def llama_bench(path, servers, ngl, depths, n_pp, n_tg, repeats, threads):
    cmd = [os.path.join(LLAMA_BIN, "llama-bench"), "-m", path, "-p", str(n_pp), "-n", str(n_tg), "-d",
           ",".join(map(str, depths)), "-fa", "1", "-t", str(threads), "-ngl", str(ngl), "-r", str(repeats),
           "-o", "json", "-b", "512", "-ub", "512"]
    if servers:
        cmd += ["--rpc", servers]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"llama-bench failed: {res.stderr[-2000:]}")
    out = {}
    for r in json.loads(res.stdout):
        d = r.get("n_depth", 0)
        key = "pp" if r["n_prompt"] else "tg"
        out.setdefault(d, {})[key] = r["avg_ts"]
    return out


def llama_row(path, n_servers, depths, n_pp, n_tg, repeats, threads):
    procs, servers = start_servers("llama", n_servers, threads) if n_servers else ([], None)
    try:
        ngl = 99 if n_servers else 0
        speeds = llama_bench(path, servers, ngl, depths, n_pp, n_tg, repeats, threads)
        out = {}
        counter = ByteCounter(servers) if servers else None
        for d in depths:
            per_token = 0.0
            if counter:  # the same depth with 64 and with 128 tokens generated: the difference is 64 tokens'
                sizes = []
                for n in (n_tg, 2 * n_tg):
                    before = counter.total
                    llama_bench(path, counter.servers, ngl, [d], 0, n, 1, threads)
                    sizes.append(counter.total - before)
                per_token = (sizes[1] - sizes[0]) / n_tg
            out[d] = (speeds[d]["pp"], speeds[d]["tg"], per_token)
        return out
    finally:
        stop(procs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 4096])
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="of the client and of each server")
    ap.add_argument("--servers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-llama-cpp", action="store_true")
    args = ap.parse_args()
    path = args.model or default_model_path()
    have_llama = (not args.no_llama_cpp and shutil.which(os.path.join(LLAMA_BIN, "llama-bench"))
                  and shutil.which(os.path.join(LLAMA_BIN, "ggml-rpc-server")))
    rows = []
    for n in args.servers:
        s = simkv_row(path, n, args.depths, args.pp, args.tg, args.repeats, args.threads)
        rows.append(("simkv", n, s))
        print(f"simkv {n} server(s): {s}", file=sys.stderr, flush=True)
        if have_llama:
            l = llama_row(path, n, args.depths, args.pp, args.tg, args.repeats, args.threads)
            rows.append(("llama.cpp", n, l))
            print(f"llama.cpp {n} server(s): {l}", file=sys.stderr, flush=True)
    where = {0: "all local", 1: "all on 1 RPC server", 2: "split over 2 RPC servers"}
    head = "| system | layers |" + "".join(f" pp{args.pp} @{d} | tg{args.tg} @{d} | KiB/token @{d} |" for d in args.depths)
    print(head)
    print("|" + "---|" * (2 + 3 * len(args.depths)))
    for system, n, r in rows:
        cells = "".join(f" {r[d][0]:.1f} | {r[d][1]:.1f} | {r[d][2] / 1024:.1f} |" if n else
                        f" {r[d][0]:.1f} | {r[d][1]:.1f} | — |" for d in args.depths)
        print(f"| {system} | {where.get(n, n)} |{cells}")
    if have_llama:
        print("\nsimkv / llama.cpp, same placement:")
        for n in args.servers:
            s = next(r for sy, m, r in rows if sy == "simkv" and m == n)
            l = next(r for sy, m, r in rows if sy == "llama.cpp" and m == n)
            print(f"| {where.get(n, n)} |" + "".join(f" pp {s[d][0] / l[d][0]:.2f}x, tg {s[d][1] / l[d][1]:.2f}x @{d} |"
                                                  for d in args.depths))


if __name__ == "__main__":
    main()
