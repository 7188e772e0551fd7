"""What a second thread, a boundary argument, a signal or a fork does to a Llama: a clear Python error or a
correct result, never an abort, a hang or a silent wrong answer (the hostile probe's findings)."""
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import numpy as np
import pytest

from py_simkv import Llama
from test_fuzz_gguf import _rewrite
from test_lazy_reference import _tokens


def test_two_threads_on_one_llama_take_turns(tiny_model):
    llm = Llama(tiny_model("llama"), n_ctx=512, n_threads=2)
    prompts = [_tokens(40, seed=s) for s in range(4)]
    want = [llm.create_completion(p, max_tokens=12, temperature=0)["choices"][0]["text"] for p in prompts]
    got, errors = {}, []

    def worker(k):
        try:
            for r in range(4):
                i = (k + r) % 4
                got[(k, r)] = (i, llm.create_completion(prompts[i], max_tokens=12, temperature=0)["choices"][0]["text"])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(got) == 8
    assert all(text == want[i] for i, text in got.values())


def test_reset_from_another_thread_waits_for_the_eval(tiny_model):
    llm = Llama(tiny_model("llama"), n_ctx=2048, n_threads=1)
    long = _tokens(1500)
    t = threading.Thread(target=llm.eval, args=(long,))
    t.start()
    time.sleep(0.05)
    llm.reset()  # waits for the eval, then clears
    t.join(60)
    assert llm.n_tokens == 0
    llm.eval(long[:10])
    assert llm.n_tokens == 10


def test_a_stale_generator_stops_with_an_error(tiny_model):
    llm = Llama(tiny_model("llama"), n_ctx=256, n_threads=1)
    first = llm.generate(_tokens(10, seed=1), temp=0)
    next(first)
    second = llm.generate(_tokens(10, seed=2), temp=0)
    a = [next(second) for _ in range(5)]
    with pytest.raises(RuntimeError, match="superseded"):
        next(first)
    # the newer one goes on undisturbed
    fresh = Llama(tiny_model("llama"), n_ctx=256, n_threads=1)
    want = [t for _, t in zip(range(6), fresh.generate(_tokens(10, seed=2), temp=0))]
    assert a + [next(second)] == want


@pytest.mark.parametrize("kw", [dict(n_sink=2**32 - 1024), dict(n_window=2**32 - 1), dict(n_window=10**6)])
def test_huge_sink_or_window_is_the_whole_context(tiny_model, kw):
    """A sink or window larger than the context keeps the whole context: the layer computes as a full one
    (it used to overflow the ring size and corrupt the heap, or shrink the ring)."""
    path = tiny_model("llama")
    toks = _tokens(1500)
    lazy = Llama(path, n_ctx=2048, n_threads=2, lazy_layers=[0], lazy_type="f16", logits_all=True, **kw)
    lazy.eval(toks)
    full = Llama(path, n_ctx=2048, n_threads=2, logits_all=True)
    full.eval(toks)
    err = np.abs(lazy.scores[: lazy.n_tokens] - full.scores[: full.n_tokens])
    assert err.max() < 0.1 and err.mean() < 5e-3  # test_lazy_reference's f16 bounds
    assert lazy.kv_cache_stats()["layers"][0]["capacity"] <= 2 * 2048 + 512


@pytest.mark.parametrize("n_ctx,match", [(10**7, "MiB"), (10**9, "n_ctx must be <="), (2**32 - 100, "n_ctx must be <=")])
def test_a_context_that_cannot_fit_is_refused_before_allocating(smollm_path, n_ctx, match):
    with pytest.raises(ValueError, match=match):
        Llama(smollm_path, n_ctx=n_ctx, n_threads=1)


def test_fork_after_use_does_not_hang(tiny_model):
    path = tiny_model("llama")
    llm = Llama(path, n_ctx=256, n_threads=2)
    llm.eval(_tokens(50))
    want = llm.last_logits.copy()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()

    def child():
        with pytest.warns(RuntimeWarning, match="fork"):
            llm.reset()
            llm.eval(_tokens(50))
        queue.put(float(np.abs(llm.last_logits - want).max()))
        other = Llama(path, n_ctx=64, n_threads=2)  # a new one in the child: one thread too
        queue.put(other.n_threads)

    p = ctx.Process(target=child)
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        pytest.fail("the forked child hung")
    assert p.exitcode == 0
    assert queue.get(timeout=5) < 1e-3 and queue.get(timeout=5) == 1


def test_ctrl_c_stops_a_long_prefill(smollm_path):
    script = textwrap.dedent(f"""
        import sys, time
        from py_simkv import Llama
        llm = Llama({smollm_path!r}, n_ctx=8192, n_threads=2)
        toks = (llm.tokenize(open({__file__!r}, "rb").read()) * 40)[:8000]
        print("started", flush=True)
        t0 = time.perf_counter()
        try:
            llm.eval(toks)
            print("finished", flush=True)
        except KeyboardInterrupt:
            print("interrupted", round(time.perf_counter() - t0, 2), llm.n_tokens, flush=True)
            llm.eval(toks[:5])  # still usable
            print("usable", llm.n_tokens, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
    assert proc.stdout.readline().strip() == "started"
    time.sleep(1.0)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    line = proc.stdout.readline().split()
    stopped_after = time.perf_counter() - sent
    rest = proc.stdout.read()
    proc.wait(60)
    assert line[0] == "interrupted", line
    # One ubatch of 512 tokens takes ~2 s on this machine; the whole prompt ~40 s.
    assert stopped_after < 10
    assert rest.split() == ["usable", "5"]


def test_non_finite_logits_raise(tiny_model, tmp_path):
    """Weights that compute NaN: an error instead of sampling from NaN (greedy used to return '')."""
    path = tiny_model("llama")

    def poison(w, key, f):
        return False

    bad = _rewrite(path, str(tmp_path / "nan.gguf"), edit=poison)
    # Put NaN into one norm weight (f32) of the copy.
    import gguf
    r = gguf.GGUFReader(bad, "r+")
    t = next(t for t in r.tensors if t.name == "blk.0.attn_norm.weight")
    t.data[:] = np.nan
    del r
    llm = Llama(bad, n_ctx=64, n_threads=1)
    with pytest.raises(ValueError, match="non-finite logits"):
        llm.eval([1, 2, 3])
    with pytest.raises(ValueError, match="non-finite logits"):
        llm.create_completion("Hi", max_tokens=4)


@pytest.mark.parametrize("call,exc,match", [
    (lambda llm: llm.eval([1.7, 2.2]), TypeError, "must be ints"),
    (lambda llm: llm.eval([2**63]), ValueError, "token ids"),
    (lambda llm: llm.create_completion("x", seed=2**70), ValueError, "seed"),
    (lambda llm: llm.create_completion("x", temperature=float("nan")), ValueError, "temperature"),
    (lambda llm: llm.create_completion("x", top_p=float("nan")), ValueError, "top_p"),
    (lambda llm: llm.create_completion("x", min_p=float("nan")), ValueError, "min_p"),
    (lambda llm: llm.create_completion("x", repeat_penalty=float("nan")), ValueError, "repeat_penalty"),
    (lambda llm: llm.create_completion("x", stop=b"."), TypeError, "stop"),
    (lambda llm: llm.create_chat_completion([{"role": "user"}]), ValueError, "chat template"),
])
def test_coercions_and_undocumented_errors(tiny_model, call, exc, match):
    llm = Llama(tiny_model("llama"), n_ctx=64, n_threads=1)
    with pytest.raises(exc, match=match):
        call(llm)
    llm.eval([1, 2])  # still usable
    assert llm.n_tokens == 2


def test_lazy_threshold_nan_and_calls_after_close(tiny_model):
    path = tiny_model("llama")
    with pytest.raises(ValueError, match="lazy_threshold"):
        Llama(path, n_ctx=64, n_threads=1, lazy_mode="dynamic", lazy_threshold=float("nan"))
    llm = Llama(path, n_ctx=64, n_threads=1)
    llm.close()
    for call in (lambda: llm.eval([1]), lambda: llm.tokenize(b"x"), lambda: llm.create_completion("x"), llm.reset,
                 llm.kv_cache_stats):
        with pytest.raises(ValueError, match="closed"):
            call()


def test_profile_files_that_are_damaged(tiny_model, tmp_path):
    import json

    from py_simkv import LazyProfile
    base = {"format": "simkv-lazy-profile", "version": 1, "params": {},
            "model": {"name": "x", "arch": "llama", "n_layer": 2, "file_size": 1, "fingerprint": "f"},
            "samples": [{"source": "s", "n_tokens": 1, "mass": [0.5, 0.9], "change": [0.1, 0.2]}]}
    cases = [(dict(base, model={}), "n_layer"), ({k: v for k, v in base.items() if k != "samples"}, "samples"),
             (dict(base, samples=[{"mass": [None, 0.9], "change": [0.1, 0.2]}]), "not a number"),
             (dict(base, samples=[{"mass": [float("inf"), 0.9], "change": [0.1, 0.2]}]), "infinite"),
             (dict(base, samples=[{"mass": [float("nan")] * 2, "change": [0.1, 0.2]}]), "NaN")]
    for data, match in cases:
        p = tmp_path / "p.json"
        p.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=match):
            LazyProfile.load(str(p))
    p.write_text(json.dumps(base))
    with pytest.raises(ValueError, match="finite"):
        LazyProfile.load(str(p)).select(threshold=float("nan"))


def test_cli_errors_are_one_line(tmp_path, tiny_model):
    bad = _rewrite(tiny_model("llama"), str(tmp_path / "huge.gguf"),
                   edit=lambda w, k, f: k == "llama.block_count" and (w.add_uint32(k, 0xFFFFFFFF) or True))
    out = subprocess.run(["simkv", "info", bad], capture_output=True, text=True, cwd=tempfile.gettempdir())
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "out of range" in out.stderr
    out = subprocess.run(["simkv", "profile", tiny_model("llama"), "--n-ctx", "64", "--n-window", "64"],
                         capture_output=True, text=True, cwd=tempfile.gettempdir())
    assert out.returncode == 2 and "n_window (64) must be smaller than n_ctx (64)" in out.stderr
    assert os.path.exists(bad)
