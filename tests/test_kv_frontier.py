"""benchmarks/kv_frontier.py's quick mode: the table's measures are the ones they claim to be."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import kv_frontier  # noqa: E402


def test_quick_frontier(tmp_path, capsys):
    plot = tmp_path / "frontier.png"
    rows = {r["label"]: r for r in kv_frontier.main(["--quick", "--plot", str(plot)])}
    out = capsys.readouterr().out
    ref, q4, ours = rows["llama.cpp f16"], rows["llama.cpp q4_0"], rows["simkv 50% lazy, q8_0 full"]
    # the reference against itself
    assert ref["kld_mean"] == 0 and ref["top1"] == 1
    # llama.cpp's rule: 30 layers x 1024 cells x 192 values x (K + V), q4_0 at 18 bytes per 32 values
    assert ref["allocated"] == 30 * 1024 * 192 * 2 * 2 and q4["allocated"] == ref["allocated"] * 18 // 64
    # simkv's plan is its allocation: 15 q8_0 full layers and 15 q4_0 rings (768 cells and a 64-cell residual)
    assert ours["planned"] == ours["allocated"] < ref["allocated"] // 2
    assert ours["layers"].startswith("lazy 15,16,") and "0-14=q8_0" in ours["layers"] and "15-29=q4_0" in ours["layers"]
    for r in (q4, ours):
        assert 0 < r["kld_mean"] <= r["kld_p99"] <= r["kld_p999"] and 0.5 < r["top1"] < 1
        assert r["ppl"] > 1
    # the Pareto front: the reference (lowest KLD) is on it; the table marks it
    assert "**llama.cpp f16**" in out
    assert plot.stat().st_size > 10_000


def test_scores_are_kl_divergence_and_loss():
    rng = np.random.default_rng(0)
    ref, other = rng.normal(size=(5, 11)), rng.normal(size=(5, 11))
    targets = np.array([0, 3, 5, 7, 10])
    s = kv_frontier.Scores()
    s.add(kv_frontier.log_softmax(ref), kv_frontier.log_softmax(other), targets)
    p = np.exp(ref) / np.exp(ref).sum(1, keepdims=True)
    q = np.exp(other) / np.exp(other).sum(1, keepdims=True)
    kld = (p * np.log(p / q)).sum(1)
    got = s.summary()
    assert np.isclose(got["kld_mean"], kld.mean()) and np.isclose(got["kld_p999"], np.percentile(kld, 99.9))
    assert np.isclose(got["ppl"], np.exp(-np.log(q[np.arange(5), targets]).mean()))
    assert got["top1"] == (ref.argmax(1) == other.argmax(1)).mean()


def test_pareto_front():
    rows = [dict(label="a", allocated=10, kld_mean=0.0), dict(label="b", allocated=5, kld_mean=0.1),
            dict(label="c", allocated=6, kld_mean=0.2), dict(label="d", allocated=2, kld_mean=0.5)]
    assert kv_frontier.pareto(rows) == {"a", "b", "d"}
