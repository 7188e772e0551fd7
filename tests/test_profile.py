"""Offline profiles: scores from the probe, selection, files, model identity, use at load time."""
import json
import os
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

from py_simkv import LazyProfile, Llama, profile_model
from py_simkv import _native, lab
from py_simkv.lazy_profile import find_profile
from py_simkv.profiler import default_calibration_texts

TEXTS = [("prose", "The quick brown fox jumps over the lazy dog. " * 200),
         ("code", "def f(x):\n    return x * 2 + 1\n\n" * 200)]


@pytest.fixture(scope="module")
def tiny_profile(tiny_model):
    return profile_model(tiny_model("llama"), texts=TEXTS, n_ctx=256, n_window=32, w_last=16, max_samples=4,
                         loss_samples=2, n_threads=2, progress=False)


def test_profile_holds_the_probe_scores(tiny_model, tiny_profile):
    prof = tiny_profile
    assert prof.n_layer == 4 and len(prof.samples) == 4
    assert [s["source"].split("[")[0] for s in prof.samples] == ["prose", "code", "prose", "code"]
    assert prof.params == {"n_ctx": 256, "n_sink": 4, "n_window": 32, "w_last": 16, "loss_tokens": 128,  # half the sample
                           "type_tokens": 128, "type_base": "q8_0", "full_residual": 32}  # at most the scored tokens
    # Each sample's scores are what the probe reports for that sample.
    llm = Llama(tiny_model("llama"), n_ctx=256, n_threads=2)
    toks = llm.tokenize(TEXTS[0][1].encode(), add_bos=True)[:256]
    direct = llm.eval(toks, probe={"n_probe": 16, "n_sink": 4, "n_window": 32})
    # (Sample 0 also measures loss, so its probe runs on the sample's tail after its prefix: two ubatches
    # instead of one, which moves the last digits.)
    np.testing.assert_allclose(prof.samples[0]["mass"], direct["mass"], rtol=1e-5)
    np.testing.assert_allclose(prof.samples[0]["change"], direct["change"], rtol=1e-5)
    assert prof.scores("mass").shape == (4, 4)
    # loss only on the first loss_samples samples (one per text); it becomes the default criterion
    assert ["loss" in s for s in prof.samples] == [True, True, False, False]
    assert prof.scores("loss").shape == (2, 4) and prof.default_criterion == "loss"
    assert prof.select(ratio=0.5) == prof.select(ratio=0.5, criterion="loss")
    assert np.all((prof.scores("mass") > 0) & (prof.scores("mass") <= 1 + 1e-6))


def _fake(mass, change=None, loss=None, **model):
    ident = dict({"name": "Meta-Llama-3-8B", "arch": "llama", "n_layer": len(mass), "file_size": 1, "fingerprint": "x"},
                 **model)
    sample = {"source": "s", "n_tokens": 1, "mass": list(mass), "change": list(change if change is not None else mass)}
    if loss is not None:
        sample["loss"] = list(loss)
    return LazyProfile(model=ident, params={}, samples=[sample])


def test_select_by_threshold_and_ratio():
    prof = _fake([0.5, 0.95, 0.3, 0.92, 0.91, 0.85], change=[0.9, 0.05, 0.8, 0.2, 0.1, 0.3])
    assert prof.select() == [1, 3, 4]                      # Llama-3: the paper's 0.9
    assert _fake([0.5, 0.7, 0.6], name="Llama-2-7b").select() == [1]  # Llama-2: 0.65
    assert prof.select(threshold=0.8) == [1, 3, 4, 5]
    assert prof.select(ratio=0.5) == [1, 3, 4]
    assert prof.select(ratio=0.0) == [] and prof.select(ratio=1.0) == list(range(6))
    assert prof.select(ratio=0.5, criterion="change") == [1, 3, 4]   # lowest change = laziest
    assert prof.select(threshold=0.25, criterion="change") == [1, 3, 4]
    with pytest.raises(ValueError, match="one of a threshold, a ratio or a budget"):
        prof.select(threshold=0.9, ratio=0.5)
    with pytest.raises(ValueError, match="ratio must be"):
        prof.select(ratio=1.5)
    with pytest.raises(ValueError, match="no default threshold"):
        prof.select(criterion="change")
    with pytest.raises(ValueError, match="unknown criterion"):
        prof.select(criterion="entropy")
    # With loss scores, loss is the default criterion: lowest = laziest; by default the laziest layers whose
    # summed loss stays within DEFAULT_LOSS_BUDGET (0.005 nats); a negative loss counts as zero.
    with_loss = _fake([0.5, 0.95, 0.3, 0.92, 0.91, 0.85], loss=[0.001, 0.2, 0.004, 0.006, -0.001, 0.03])
    assert with_loss.default_criterion == "loss" and prof.default_criterion == "mass"
    assert with_loss.select() == with_loss.select(budget=0.005) == [0, 2, 4]  # 0 + 0.001 + 0.004; + 0.006 > 0.005
    assert with_loss.select(budget=0.002) == [0, 4]                          # 0 + 0.001; + 0.004 > 0.002
    assert with_loss.select(budget=0.01) == [0, 2, 4]                        # 0.005; + 0.006 > 0.01
    assert with_loss.select(budget=0.02) == [0, 2, 3, 4]
    assert with_loss.select(budget=0.001) == [0, 4] and with_loss.select(budget=0.0) == [4]
    assert with_loss.select(threshold=0.005) == [0, 2, 4]                     # each layer alone below 0.005
    assert with_loss.select(ratio=0.5) == [0, 2, 4]
    assert with_loss.select(criterion="mass") == [1, 3, 4]
    with pytest.raises(ValueError, match="budget applies to the 'loss' criterion"):
        with_loss.select(criterion="mass", budget=0.01)
    with pytest.raises(ValueError, match="budget must be"):
        with_loss.select(budget=-1)


def test_round_trip_and_bad_files(tiny_profile, tmp_path):
    path = tiny_profile.save(str(tmp_path / "p.json"))
    back = LazyProfile.load(path)
    assert back == tiny_profile
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        LazyProfile.load(str(tmp_path / "bad.json"))
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a simkv lazy profile"):
        LazyProfile.load(str(tmp_path / "other.json"))
    with pytest.raises(FileNotFoundError):
        LazyProfile.load(str(tmp_path / "missing.json"))


def test_runtime_use_auto_and_path(tiny_model, tiny_profile, tmp_path):
    model = str(tmp_path / "m.gguf")
    shutil.copy(tiny_model("llama"), model)
    assert find_profile(model) is None
    assert Llama(model, n_ctx=64, lazy_profile="auto").lazy_layers == []  # no profile yet: nothing lazy
    with pytest.raises(FileNotFoundError, match="simkv profile"):
        Llama(model, n_ctx=64, lazy_profile="auto", lazy_ratio=0.5)
    tiny_profile.save(model + ".simkv.json")
    want = tiny_profile.select(ratio=0.5)
    llm = Llama(model, n_ctx=64, lazy_profile="auto", lazy_ratio=0.5)
    assert llm.lazy_layers == want and len(want) == 2
    assert [l["kind"] for l in llm.kv_cache_stats()["layers"]] == ["lazy" if i in want else "full" for i in range(4)]
    assert Llama(model, n_ctx=64, lazy_profile=model + ".simkv.json", lazy_ratio=0.25).lazy_layers == \
        tiny_profile.select(ratio=0.25)
    # explicit layers win
    assert Llama(model, n_ctx=64, lazy_profile="auto", lazy_ratio=0.5, lazy_layers=[0]).lazy_layers == [0]
    with pytest.raises(ValueError, match="need a profile"):
        Llama(model, n_ctx=64, lazy_ratio=0.5)


def test_foreign_profile_is_refused(tiny_model, tiny_profile, tmp_path):
    other = tiny_model("qwen2")
    path = tiny_profile.save(str(tmp_path / "llama.json"))
    with pytest.raises(ValueError, match="was made for"):
        Llama(other, n_ctx=64, lazy_profile=path, lazy_ratio=0.5)
    # Same shape, different weights: the fingerprint tells them apart.
    same_shape = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="fingerprint"):
        Llama(same_shape, n_ctx=64, lazy_profile=path, lazy_ratio=0.5)


def test_default_calibration_set_is_shipped():
    texts = default_calibration_texts()
    # prose, code and dialogue, each long enough for at least two 8K-token samples
    assert [s for s, _ in texts] == ["python_reference_prose.txt", "python_stdlib_code.txt", "dialogue_chatterbot.txt"]
    assert all(len(t) > 60_000 for _, t in texts)
    assert texts[2][1].startswith("A: ") and "\nB: " in texts[2][1]


def test_cli_profile(tiny_model, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXTS[0][1])
    out = tmp_path / "prof.json"
    r = subprocess.run([shutil.which("simkv"), "profile", tiny_model("llama"), "--calib", str(calib), "--n-ctx", "128",
                        "--n-window", "16", "--w-last", "8", "--samples", "2", "-o", str(out)],
                       capture_output=True, text=True, cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr
    assert "laziest half by mass" in r.stdout and "laziest half by loss" in r.stdout and "profiling [" in r.stderr
    prof = LazyProfile.load(str(out))
    assert len(prof.samples) == 2 and prof.params["n_ctx"] == 128
    # the default choice is by the loss budget, and the line says so
    assert f"lazy by the default loss budget (summed loss <= 0.005 nats): {prof.select()}" in r.stdout
    r = subprocess.run([shutil.which("simkv"), "generate", tiny_model("llama"), "-p", "hi", "-n", "2",
                        "--lazy-profile", str(out), "--lazy-ratio", "0.5", "--n-ctx", "64"],
                       capture_output=True, text=True, cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr
    assert f"from {out}" in r.stderr


def test_loss_criterion_is_the_loss_of_trimming_each_layer_alone(tiny_model):
    path = tiny_model("llama")
    prof = profile_model(path, texts=TEXTS[:1], n_ctx=128, n_window=16, w_last=8, max_samples=1, n_threads=2,
                         loss_samples=1, progress=False)
    toks = Llama(path, n_ctx=128).tokenize(TEXTS[0][1].encode(), add_bos=True)[:128]

    def second_half_nll(**kw):
        llm = Llama(path, n_ctx=128, n_threads=2, logits_all=True, **kw)
        llm.eval(toks)
        lp = llm.scores[63:127].astype(np.float64)
        lp = lp - lp.max(1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
        return -lp[np.arange(64), toks[64:]].mean()

    base = second_half_nll()
    # Layer 2 alone trimmed, with exact prefill of the first half: full attention for the prompt rows.
    llm = Llama(path, n_ctx=128, n_threads=2, lazy_layers=[2], lazy_type="f16", n_window=16, lazy_prefill="exact")
    llm.eval(toks[:64])
    trimmed = llm.nll(toks[64:]).mean()
    assert prof.samples[0]["loss"][2] == pytest.approx(trimmed - base, abs=1e-4)
    assert len(prof.select(ratio=0.5, criterion="loss")) == 2
    # A profile made without loss scores says how to get them.
    with pytest.raises(ValueError, match="--loss-samples"):
        _fake([0.5, 0.9]).select(ratio=0.5, criterion="loss")


def test_nll_equals_log_softmax_of_the_logits(tiny_model):
    path = tiny_model("llama")
    toks = list(range(100, 160))
    a = Llama(path, n_ctx=128, n_threads=2, logits_all=True)
    a.eval(toks)
    lp = a.scores[29:59].astype(np.float64)
    lp = lp - lp.max(1, keepdims=True)
    want = -(lp - np.log(np.exp(lp).sum(1, keepdims=True)))[np.arange(30), toks[30:]]
    b = Llama(path, n_ctx=128, n_threads=2)
    b.eval(toks[:30])
    np.testing.assert_allclose(b.nll(toks[30:]), want, rtol=1e-5, atol=1e-5)
    assert b.n_tokens == 60
    with pytest.raises(ValueError, match="needs a context"):
        Llama(path, n_ctx=128).nll([1, 2])


def test_nll_in_n_batch_chunks_equals_one_call(tiny_model):
    """nll() scores long inputs one n_batch chunk at a time (bounded memory for large vocabularies); the
    engine splits a call into the same chunks, so it equals one eval() call of the same tokens."""
    path = tiny_model("llama")
    toks = [int(t) for t in np.random.default_rng(7).integers(0, 49152, 300)]
    a = Llama(path, n_ctx=512, n_threads=2, n_batch=64, logits_all=True)
    a.eval(toks[:10])
    a.eval(toks[10:])  # one call: chunks of 64 from position 10, as nll's
    lp = a.scores[9:299].astype(np.float64)
    lp = lp - lp.max(1, keepdims=True)
    want = -(lp - np.log(np.exp(lp).sum(1, keepdims=True)))[np.arange(290), toks[10:]]
    b = Llama(path, n_ctx=512, n_threads=2, n_batch=64, logits_all=True)
    b.eval(toks[:10])
    np.testing.assert_array_equal(b.nll(toks[10:], keep=False), want)
    assert b.n_tokens == 10
    np.testing.assert_array_equal(b.nll(toks[10:]), want)
    assert b.n_tokens == 300
    np.testing.assert_array_equal(b.scores[: b.n_tokens], a.scores[: a.n_tokens])


def test_the_shipped_profile_belongs_to_the_shipped_model(smollm_path):
    """The embedded SmolLM2 has a profile inside the package, found by its file's identity; Llama itself keeps
    llama-cpp-python's defaults (no lazy layer unless asked)."""
    from py_simkv import Llama
    from py_simkv.lazy_profile import SHIPPED_PROFILES, find_profile, shipped_profile

    path = shipped_profile(smollm_path)
    assert path is not None and os.path.dirname(path) == SHIPPED_PROFILES and find_profile(smollm_path) == path
    llm = Llama(smollm_path, n_ctx=256, n_threads=2, lazy_profile="auto")
    LazyProfile.load(path).check_model(smollm_path, llm._model)
    assert llm.lazy_profile_path == path and llm.lazy_layers == LazyProfile.load(path).select()
    assert Llama(smollm_path, n_ctx=256, n_threads=2).lazy_layers == []


def test_the_per_token_loss_matches_a_float64_log_softmax():
    # native/graph_token_nll.cpp sums e^x with ggml-cpu's vector code, over whole vectors and then the logits
    # left over one by one: vocabularies of every remainder, logits spread narrow to wide, and logits far
    # below the rest (their e^x underflows to 0). Against numpy in float64 the result may differ by its own
    # float32 rounding (2^-24 relative; 2^-23 allowed) and by ggml's vector expf error (under 2 ulp, 2.4e-7
    # relative) carried into the log (1e-6 allowed).
    from py_simkv import _native

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 1000, 49152, 49155):
        for scale in (0.01, 1.0, 8.0, 40.0):
            x = (rng.standard_normal(n) * scale).astype(np.float32)
            if n > 3:
                x[1::3] = -1e30
            for target in {0, n - 1, int(rng.integers(n))}:
                x64 = x.astype(np.float64)
                top = x64.max()
                ref = np.log(np.exp(x64 - top).sum()) + top - x64[target]
                got = _native.token_nll(x, target)
                assert abs(got - ref) <= 1e-6 + 2.0 ** -23 * abs(ref), (n, scale, target, got, ref)
    assert _native.token_nll(np.zeros(5, np.float32), -1) == 0.0  # a row with no next token
    with pytest.raises(ValueError, match="target must be"):
        _native.token_nll(np.zeros(5, np.float32), 5)


def test_a_what_if_from_a_later_layer_equals_the_whole_what_if(smollm_path):
    # The profiler trims one layer at a time and starts each what-if at that layer, from the residual stream
    # the untrimmed run kept: below it nothing changed, so the losses must be those of computing every layer,
    # bit for bit (a tail of two ubatches: the stream's rows are found by their place in the call).
    llm = Llama(smollm_path, n_ctx=1024, n_threads=2, n_batch=256)
    text = default_calibration_texts()[0][1]
    toks = llm.tokenize(text.encode(), add_bos=True)[:700]
    llm.eval(toks[:300])
    tail = toks[300:]
    probe = {"n_probe": 32, "n_sink": 4, "n_window": 64}
    with llm._use():
        base, streams = lab.what_if_nll(llm, tail, capture=True, probe=probe)
        scores = lab.probe_scores(llm)
    assert streams.shape == (30, len(tail), 576)
    # The engine scores each row itself (graph_token_nll.cpp): against numpy's float64 log-softmax of the
    # logits nll() takes, it differs by the rounding of its float32 result (a loss below 32: 2^-19) and by the
    # error of the float32 exponentials it sums (ggml's vector expf: under 2 ulp, so about 2.4e-7 in the
    # log): 1e-5 bounds both.
    reference = llm.nll(tail, keep=False)
    assert base[0] == reference[0]  # the first token from the context's logits, in numpy either way
    np.testing.assert_allclose(base, reference, rtol=0, atol=1e-5)
    assert np.abs(base - reference).max() > 0  # the engine's own numbers, not numpy's
    for il in (0, 7, 29):
        llm.set_masked_layers([il], n_sink=4, n_window=64)
        with llm._use():
            whole = lab.what_if_nll(llm, tail)
            part = lab.what_if_nll(llm, tail, first_layer=il, hidden=streams[il])
        assert np.array_equal(whole, part), il
        assert not np.array_equal(whole, base)  # the trim does something here
    llm.set_masked_layers([])
    assert llm.n_tokens == 300  # what-ifs leave the context as it was
    rows = np.array(tail[:4], dtype=np.int32)
    with pytest.raises(ValueError, match="first_layer 30 is out of range"):
        _native.lab.eval_stream(llm._engine, rows, 30, streams[0][:4], False)
    with pytest.raises(ValueError, match="hidden must be"):
        _native.lab.eval_stream(llm._engine, rows, 3, streams[0][:5], False)
    with pytest.raises(ValueError, match="not a token id"):
        _native.lab.eval_stream(llm._engine, rows, 3, streams[3][:4], False, np.array([1, 2, -2, 3], dtype=np.int32))
    with pytest.raises(ValueError, match="not a token id"):
        _native.lab.eval_stream(llm._engine, rows, 3, streams[3][:4], False, np.array([1, 2, 49152, 3], dtype=np.int32))
    with pytest.raises(ValueError, match="one token per row"):
        _native.lab.eval_stream(llm._engine, rows, 3, streams[3][:4], False, rows[:3].copy())
    assert llm._engine.n_past == 300  # nothing was evaluated
    with llm._use():
        assert np.array_equal(lab.what_if_nll(llm, tail), base)  # and it still works
    with pytest.raises(ValueError, match="every layer computed"):
        with llm._use():
            lab.what_if_nll(llm, tail, first_layer=3, hidden=streams[3], probe=probe)
    # The probe watching the untrimmed what-if scores what it scores on an eval of the same tokens.
    probed = llm.eval(tail, probe=probe)
    for key in ("mass", "change"):
        assert np.array_equal(scores[key], probed[key], equal_nan=True), key


def test_the_time_estimate_counts_the_vocabulary_projection(capsys):
    # simkv profile prints its total time once two what-ifs ran: what-ifs start at their layer, so a token's
    # cost is a share of the layers plus the vocabulary projection, whose cost (in layers) the top and the
    # bottom layer's what-ifs measure. Here k = 1 ms per token-layer and the projection costs 3 layers: 100
    # tokens take 3.3 s from layer 0 (30 layers), 0.4 s from layer 29.
    from py_simkv.profiler import _Progress, _Work

    total = _Work()
    total.add(100, 30)  # the untrimmed tail
    for il in range(30):
        total.add(100, 30 - il)  # the what-ifs
    meter = _Progress(total, on=True, calibrates=True)
    meter.add(100, 30)
    assert "about" not in capsys.readouterr().err  # no estimate before the calibration
    meter.add(100, 1)  # from layer 29
    meter.calibrate(100, 30, (29, 0.4), (0, 3.3))
    assert meter.per_unit == pytest.approx(1e-3) and meter.head == pytest.approx(3.0)
    meter.add(100, 30)  # from layer 0
    # left: the what-ifs from layers 1..28, 100 tokens each through (30 - il) + 3 layers, at 1 ms each
    left = sum(100 * (30 - il + 3) for il in range(1, 29)) * 1e-3
    assert f"~{left:.0f} s left" in capsys.readouterr().err
    # a profile without what-ifs estimates from its first evaluation
    meter = _Progress(total, on=True, calibrates=False)
    meter.add(100, 30)
    assert "tokens of evaluation: about" in capsys.readouterr().err


def test_racing_re_measures_only_the_layers_still_in_the_running(tiny_model):
    # Later loss samples skip the what-ifs of layers already ranked among the worst (profiler.py,
    # PROFILE_RACE_KEEP); the what-ifs that do run are the same evaluations, so the same numbers to the bit.
    kw = dict(texts=TEXTS, n_ctx=256, n_window=32, w_last=16, max_samples=3, loss_samples=3, n_threads=2,
              progress=False)
    raced = profile_model(tiny_model("llama"), **kw)
    every = profile_model(tiny_model("llama"), race=False, **kw)
    assert all(x is not None for s in every.samples for x in s["loss"])
    first, second, third = (s["loss"] for s in raced.samples)
    assert first == every.samples[0]["loss"]  # the first sample measures every layer
    # The second re-measures the ceil(0.55 * 4) = 3 lowest by the first sample's loss, the third the
    # ceil(0.4 * 4) = 2 lowest of those by the mean of the two.
    by_first = sorted(range(4), key=lambda il: first[il])
    assert [il for il in range(4) if second[il] is not None] == sorted(by_first[:3])
    mean2 = {il: (first[il] + second[il]) / 2 for il in by_first[:3]}
    assert [il for il in range(4) if third[il] is not None] == sorted(sorted(mean2, key=mean2.get)[:2])
    for s_raced, s_every in zip(raced.samples, every.samples):
        assert [x for x in s_raced["loss"] if x is not None] == \
            [y for x, y in zip(s_raced["loss"], s_every["loss"]) if x is not None]
    # A layer's loss is the mean over the samples that measured it.
    want = [np.mean([s["loss"][il] for s in raced.samples if s["loss"][il] is not None]) for il in range(4)]
    np.testing.assert_allclose(raced.mean("loss"), want, rtol=1e-12)
    assert raced.select(ratio=0.5) == sorted(sorted(range(4), key=lambda il: want[il])[:2])


def test_a_layer_never_measured_is_a_damaged_profile(tmp_path):
    prof = _fake([0.9, 0.8, 0.7], loss=[0.01, None, 0.02])
    path = prof.save(str(tmp_path / "p.json"))
    with pytest.raises(ValueError, match="layer 1 has no 'loss' score in any sample"):
        LazyProfile.load(path)
    prof.samples.insert(0, dict(prof.samples[0], loss=[0.01, 0.03, 0.02]))
    back = LazyProfile.load(prof.save(path))
    np.testing.assert_allclose(back.mean("loss"), [0.01, 0.03, 0.02])
    assert back.select(ratio=1 / 3) == [0]
