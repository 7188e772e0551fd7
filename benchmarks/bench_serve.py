"""Serving benchmark: several long conversations that go on turn by turn, against llama-cpp-python's server.

Every system is a real HTTP server on 127.0.0.1, driven by the same client threads over the same
completions API (streaming, so the time to first token is seen):

  simkv-full   simkv serve --parallel C, no lazy layers
  simkv-lazy   simkv serve --parallel C, layers 15..29 lazy (q4_0 rings, window 1024)
  lcp          python -m llama_cpp.server (f16 KV, flash attention): one context, requests one at a time
  lcp-cache    the same with its RAM cache on (it saves and restores whole contexts between requests)
  llama-server llama.cpp's own server from the pinned llama-cpp-python's source (benchmarks/build_llama_cpp.sh),
               --parallel C slots, f16 KV, flash attention, one unified cache of the budget's cells, and its
               host-memory prompt cache off (--cache-ram 0) so that it has the same KV memory as the others

Workload A (conversations): C clients, each with a 2K..6K-token history of real text, T turns each of
~100 new tokens and 64 generated (end-of-generation banned, greedy), turns interleaved across clients.
Every system gets the same KV budget: simkv's caches are sized to it (--kv-budget), llama-cpp-python's
RAM cache gets it as its size (its live context of n_ctx cells comes on top). The budget holds every
conversation with half the layers lazy and not with full f16 caches.
Workload B (decoding together): C clients at depth ~4K each (prompts prefilled first), then all decode
128 tokens at once; aggregate tok/s against one client alone, and against Llama decoding in process. Here
the budget holds every sequence with full caches too.

    python benchmarks/bench_serve.py --workload A --clients 4 --turns 3
    python benchmarks/bench_serve.py --workload B --clients 4
llama-cpp-python's server needs its extra: pip install "llama-cpp-python[server]==0.3.36".
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from py_simkv import Llama, default_model_path
from py_simkv.memory import kv_bytes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import corpus_text  # noqa: E402

LAZY = list(range(15, 30))
N_NEW, N_GEN = 100, 64
# llama-cpp-python 0.3.36's AMX weight buffers crash on some of this project's machines: load its server
# without extra buffer types, as tests/llama_cpp_reference.py loads the baseline.
LCP_LAUNCHER = """
import sys, llama_cpp, llama_cpp.llama as m
orig = llama_cpp.llama_model_default_params
def params():
    p = orig(); p.use_extra_bufts = False; return p
m.llama_cpp.llama_model_default_params = params
from llama_cpp.server.__main__ import main
sys.argv = ["llama_cpp.server"] + sys.argv[1:]
main()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, label, argv, port):
        self.label, self.port = label, port
        self.proc = subprocess.Popen(argv, cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{label} did not start: {self.proc.stderr.read()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/v1/models")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"{label} did not start in time")

    def get(self, path):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())

    def complete(self, prompt: str, max_tokens: int, ban: dict):
        """Streamed completion: (text, seconds to the first token, seconds in all)."""
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3600)
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "logit_bias": ban}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"{self.label}: HTTP {resp.status}: {resp.read()[:300]}")
        text, first = [], None
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:  # an error inside the stream (llama-server: e.g. no room in its KV cache)
                raise RuntimeError(f"{self.label}: {event['error']}")
            piece = event["choices"][0]["text"]
            if piece and first is None:
                first = time.perf_counter() - t0
            text.append(piece)
        conn.close()
        return "".join(text), first or 0.0, time.perf_counter() - t0

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def llama_server_path():
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "llamacpp-build", "bin", "llama-server")
    return os.environ.get("LLAMA_SERVER") or (here if os.path.exists(here) else shutil.which("llama-server"))


def start(system, path, clients, budget_mib, n_ctx_lcp, threads, llm=None):
    port = free_port()
    if system == "llama-server":
        exe = llama_server_path()
        if not exe:
            raise RuntimeError("llama-server not found: run benchmarks/build_llama_cpp.sh or set LLAMA_SERVER")
        cells = int(budget_mib * 2**20 / (kv_bytes(llm, 1024) / 1024)) // 256 * 256
        argv = [exe, "-m", path, "--host", "127.0.0.1", "--port", str(port), "-np", str(clients), "-c", str(cells),
                "-kvu", "-t", str(threads), "-tb", str(threads), "-fa", "on", "--cache-ram", "0", "--no-webui"]
    elif system.startswith("simkv"):
        argv = [shutil.which("simkv"), "serve", path, "--port", str(port), "--parallel", str(clients), "--threads",
                str(threads), "--kv-budget", str(budget_mib)]
        argv += ["--lazy-layers", ",".join(map(str, LAZY))] if system == "simkv-lazy" else ["--no-lazy"]
    else:
        argv = [sys.executable, "-c", LCP_LAUNCHER, "--model", path, "--n_ctx", str(n_ctx_lcp), "--n_threads",
                str(threads), "--n_threads_batch", str(threads), "--flash_attn", "true", "--port", str(port),
                "--verbose", "false"]
        if system == "lcp-cache":
            argv += ["--cache", "true", "--cache_type", "ram", "--cache_size", str(int(budget_mib * 2**20))]
    return Server(system, argv, port)


def histories(llm, clients, depth=None):
    """Per client: a history of 2K..6K tokens (or `depth`) and the new user texts of its turns, from real
    text."""
    toks = llm.tokenize(corpus_text().encode(), add_bos=False)
    lengths = [depth or 2048 + (4096 * i) // max(clients - 1, 1) for i in range(clients)]
    out, at = [], 0
    for n in lengths:
        hist = llm.detokenize(toks[at:at + n]).decode("utf-8", errors="ignore")
        at += n
        turns = []
        for _ in range(8):
            turns.append(llm.detokenize(toks[at:at + N_NEW]).decode("utf-8", errors="ignore"))
            at += N_NEW
        out.append((hist, turns))
        at %= max(len(toks) - 8000, 1)
    return out


def workload_a(server, convs, turns, ban):
    records, failures, lock = [], [], threading.Lock()

    def client(i):
        prompt, news = convs[i]
        for t in range(turns):
            prompt += "\n\n" + news[t]
            try:
                text, ttft, total = server.complete(prompt, N_GEN, ban)
            except RuntimeError as e:  # a failed turn is counted, not timed; the conversation goes on
                with lock:
                    failures.append(str(e)[:300])
                continue
            prompt += text
            with lock:
                records.append((i, t, ttft, total))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(convs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    later = [r for r in records if r[1] > 0]
    ttfts = sorted(r[2] for r in later) or [float("nan")]
    return {"turns/min": 60 * len(records) / wall, "wall s": wall, "failed turns": len(failures),
            "first failure": failures[0] if failures else "",
            "later ttft p50": statistics.median(ttfts), "later ttft p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]}


def workload_b(server, prompts, ban, n_gen=128):
    for p in prompts:  # prefill every conversation first (not timed)
        server.complete(p, 1, ban)
    rates = {}
    for label, group in (("one client", prompts[:1]), (f"{len(prompts)} clients", prompts)):
        results = []
        t0 = time.perf_counter()
        threads = [threading.Thread(target=lambda p=p: results.append(server.complete(p, n_gen, ban))) for p in group]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        rates[label] = n_gen * len(group) / (time.perf_counter() - t0)
    return rates


def in_process_decode(path, prompt_text, threads, n_gen=128):
    """tok/s of Llama decoding n_gen greedy tokens after the prompt, in this process (the 5% target)."""
    llm = Llama(path, n_ctx=8192, n_threads=threads)
    toks = llm.tokenize(prompt_text.encode(), add_bos=False)
    llm.eval(toks)
    t0 = time.perf_counter()
    for _ in range(n_gen):
        llm.eval([int(llm.last_logits.argmax())])
    return n_gen / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--workload", choices=["A", "B"], default="A")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--systems", nargs="+", default=["simkv-full", "simkv-lazy", "lcp", "lcp-cache"])
    args = ap.parse_args()
    path = args.model or default_model_path()
    llm = Llama(path, n_ctx=256, n_threads=1)
    ban = {str(t): -100.0 for t in llm.eog_tokens()}
    convs = histories(llm, args.clients, depth=4000 if args.workload == "B" else None)
    if args.workload == "B":
        args.turns = 1  # room for the 128 decoded tokens
    longest = 6144 + args.turns * (N_NEW + N_GEN) + 256
    n_ctx_lcp = (longest + 255) // 256 * 256
    # Tokens every conversation holds at its end, and the budget: what half-lazy caches need for all of them.
    need = sum(len(llm.tokenize(h.encode(), add_bos=False)) + args.turns * (N_NEW + N_GEN) + 64 for h, _ in convs)
    lazy_bytes = kv_bytes(llm, need, lazy_layers=LAZY, n_seq_max=args.clients)
    budget_mib = round(lazy_bytes * 1.05 / 2**20, 1)
    if args.workload == "B":  # decoding together: every system holds every sequence
        budget_mib = round(kv_bytes(llm, need, n_seq_max=args.clients) * 1.05 / 2**20, 1)
    full_holds = budget_mib * 2**20 / kv_bytes(llm, 1024) * 1024
    print(f"# workload {args.workload}: {args.clients} clients, {need} tokens in all conversations at the end; "
          f"KV budget {budget_mib} MiB (full f16 holds {full_holds:.0f} tokens of them); lcp n_ctx {n_ctx_lcp}",
          flush=True)
    rows = []
    if args.workload == "B":
        rate = in_process_decode(path, convs[0][0], args.threads)
        rows.append(("Llama in process", {"one client": rate, f"{args.clients} clients": float("nan")}))
        print("Llama in process", rows[-1][1], flush=True)
    for system in args.systems:
        server = start(system, path, args.clients, budget_mib, n_ctx_lcp, args.threads, llm)
        try:
            if args.workload == "A":
                r = workload_a(server, convs, args.turns, ban)
                if system.startswith("simkv"):
                    slots = server.get("/slots")
                    r["KV MiB"] = slots["total_bytes"] / 2**20
                    r["held"] = sum(1 for s in slots["slots"] if s["n_tokens"] > 1500)
                elif system == "llama-server":
                    r["KV MiB"] = budget_mib
                    r["held"] = "?"  # llama-server's /slots does not say how many tokens a slot's cache holds
                else:
                    r["KV MiB"] = kv_bytes(llm, n_ctx_lcp) / 2**20 + (budget_mib if system == "lcp-cache" else 0)
                    r["held"] = "1" + (" + RAM cache" if system == "lcp-cache" else "")
            else:
                prompts = [h for h, _ in convs]
                r = workload_b(server, prompts, ban)
            rows.append((system, r))
            print(system, r, flush=True)
        finally:
            server.stop()
    keys = list(rows[-1][1])
    base = dict(rows).get("lcp")
    print("\n| system | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for system, r in rows:
        cells = []
        for k in keys:
            v = r[k]
            cell = f"{v:.2f}" if isinstance(v, float) else str(v)
            if base and k in ("turns/min", "one client", f"{args.clients} clients") and base.get(k):
                cell += f" ({v / base[k]:.2f}x lcp)"
            cells.append(cell)
        print(f"| {system} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
