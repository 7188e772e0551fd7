"""Several sequences in one per-layer cache (Llama(n_seq_max=N).sequences): decoded together they compute
what each computes alone, and they never see each other's cells."""
import numpy as np
import pytest
import torch

from py_simkv import Llama
from test_lazy_reference import _reference, _tokens
from torch_reference import Weights, causal_mask, forward, sink_window_mask

PROMPTS = [
    "The three primary colours are",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker who",
    "Q: What is the capital of Italy?\nA:",
]
N_NEW = 64


def _greedy_together(llm, prompts):
    """Prompts prefilled in one batch, then one token per sequence per step, all sequences in each step."""
    seqs = llm.sequences
    toks = {s: llm.tokenize(p.encode()) for s, p in enumerate(prompts)}
    logits = seqs.decode(toks)
    out = {s: [] for s in toks}
    rows = {s: [] for s in toks}
    for _ in range(N_NEW):
        step = {}
        for s, lg in logits.items():
            rows[s].append(lg.copy())
            out[s].append(int(np.argmax(lg)))
            step[s] = [out[s][-1]]
        logits = seqs.decode(step)
    return out, rows


def _greedy_alone(llm, prompt):
    llm.reset()
    toks = llm.tokenize(prompt.encode())
    llm.eval(toks)
    out, rows = [], []
    for _ in range(N_NEW):
        rows.append(llm.last_logits.copy())
        out.append(int(np.argmax(llm.last_logits)))
        llm.eval([out[-1]])
    return out, rows


@pytest.mark.parametrize("lazy", [[], list(range(15, 30))])
def test_four_sequences_together_equal_each_alone(smollm_path, lazy):
    kw = dict(n_threads=2, lazy_layers=lazy, n_window=64, n_ubatch=64)  # small rings: they wrap within the test
    together, rows_t = _greedy_together(Llama(smollm_path, n_ctx=2048, n_seq_max=4, **kw), PROMPTS)
    alone_llm = Llama(smollm_path, n_ctx=512, **kw)
    for s, prompt in enumerate(PROMPTS):
        alone, rows_a = _greedy_alone(alone_llm, prompt)
        assert together[s] == alone, (s, alone_llm.detokenize(together[s]), alone_llm.detokenize(alone))
        # Batched with other sequences, a token's matrix products run in ubatches of another shape, where
        # some CPUs' kernels may re-associate float32 sums (relative ~1e-6 per op; measured here: none, the
        # logits are bit-identical); a cell of another sequence leaking into the mask moves them by O(1).
        err = np.abs(np.array(rows_t[s]) - np.array(rows_a))
        assert err.max() < 1e-2, (s, err.max())


def test_exact_prefill_per_sequence_equals_each_alone(smollm_path):
    # Exact prefill with several sequences: each prompt is evaluated alone with every layer full (a cache of
    # its own), then trimmed into the shared cache. Greedy text and logits equal a one-sequence exact
    # Llama's. The window is shorter than the longer prompts, where exact prefill differs from streaming
    # (checked, so that a staged prompt that silently streamed would fail here).
    kw = dict(n_threads=2, lazy_layers=list(range(15, 30)), n_window=8, n_ubatch=64, lazy_prefill="exact")
    llm = Llama(smollm_path, n_ctx=2048, n_seq_max=4, **kw)
    together, rows_t = _greedy_together(llm, PROMPTS)
    alone_llm = Llama(smollm_path, n_ctx=512, **kw)
    streaming = Llama(smollm_path, n_ctx=512, **dict(kw, lazy_prefill="streaming"))
    for s, prompt in enumerate(PROMPTS):
        alone, rows_a = _greedy_alone(alone_llm, prompt)
        assert together[s] == alone, (s, alone_llm.detokenize(together[s]), alone_llm.detokenize(alone))
        err = np.abs(np.array(rows_t[s]) - np.array(rows_a))
        assert err.max() < 1e-2, (s, err.max())  # as in the test above
        if len(alone_llm.tokenize(prompt.encode())) > 16:
            _, rows_s = _greedy_alone(streaming, prompt)
            assert np.abs(rows_s[0] - rows_a[0]).max() > 0.1
    seqs = llm.sequences
    stats = seqs.kv_cache_stats()
    assert stats["peak_bytes"] > stats["total_bytes"]  # a prompt's own cache came on top, then went
    # A prompt beside other sequences' decode steps, in one call: still evaluated alone, exactly.
    tokens = llm.tokenize(PROMPTS[2].encode())
    assert seqs.prepare(3, tokens) == tokens  # trimmed after its prompt: not reused as a prefix
    out = seqs.decode({0: [together[0][-1]], 3: tokens})
    _, rows_a = _greedy_alone(alone_llm, PROMPTS[2])
    assert np.abs(out[3] - rows_a[0]).max() < 1e-2


def _exact_masks(n, n_prompt, lazy):
    """Exact prefill's masks: the prompt's rows see every earlier key; later rows of a lazy layer see only
    the sinks and the window."""
    masks = []
    for il in range(4):
        m = causal_mask(n)
        if il in lazy:
            m[n_prompt:] = sink_window_mask(n, 4, 64)[n_prompt:]
        masks.append(m)
    return masks


def test_dynamic_mode_chooses_each_sequences_lazy_layers(tiny_model):
    """Dynamic mode with several sequences: each prompt is probed alone and chooses its own lazy layers, which
    then keep only that sequence's sinks + window in the shared pool, while the other sequence keeps what it
    chose. Against the PyTorch forward with exact prefill's masks, per sequence."""
    path = tiny_model("llama")
    prompts = {0: _tokens(300, seed=11), 1: _tokens(200, seed=12)}
    spec = dict(n_probe=32, n_sink=4, n_window=64)
    mass = {s: np.array(Llama(path, n_ctx=512, n_threads=2).eval(p, probe=spec)["mass"]) for s, p in prompts.items()}
    threshold = float(np.median(mass[0]))
    want = {s: [il for il in range(4) if m[il] > threshold] for s, m in mass.items()}
    assert 0 < len(want[0]) < 4 and want[0] != want[1]  # some layers lazy for one sequence only: groups split
    llm = Llama(path, n_ctx=1024, n_seq_max=2, n_threads=2, n_ubatch=128, lazy_mode="dynamic",
                lazy_threshold=threshold, n_sink=4, n_window=64)
    seqs = llm.sequences
    assert seqs.prompts_alone
    logits = seqs.decode(prompts)  # both prompts in one call: each is evaluated (and probed) alone
    assert [st["lazy_layers"] for st in seqs.kv_cache_stats()["sequences"]] == [want[0], want[1]]
    tokens = {s: list(p) for s, p in prompts.items()}
    rows = {0: [], 1: []}
    for _ in range(40):
        for s, lg in logits.items():
            rows[s].append(lg.copy())
            tokens[s].append(int(np.argmax(lg)))
        logits = seqs.decode({s: [tokens[s][-1]] for s in tokens})
    weights = Weights(path)
    for s, st in enumerate(seqs.kv_cache_stats()["sequences"]):
        n, n_prompt = len(tokens[s]), len(prompts[s])
        want_logits = forward(weights, tokens[s], _exact_masks(n, n_prompt, want[s]), ["f16"] * 4)[n_prompt - 1:n - 1]
        err = (torch.from_numpy(np.array(rows[s])) - want_logits).abs()
        # test_lazy_f16_matches_reference's bounds: f16 stores, V·softmax accumulated in f16 inside flash
        # attention. Another sequence's keys, or a trimmed key still seen, move logits by O(1).
        assert err.max().item() < 0.1 and err.mean().item() < 5e-3, (s, err.max().item(), err.mean().item())
        # Its lazy layers hold its sinks and the window the next query sees, its other layers every position.
        assert st["cells"] == [4 + 64 if il in want[s] else n for il in range(4)], (s, st["cells"])
        assert st["n_tokens"] == n
    # A lazy layer holds no key from before the window: a rewind that needs one is refused (nothing changes);
    # a new prompt chooses its layers anew, while sequence 0 goes on as if alone.
    assert not seqs.truncate(1, len(tokens[1]) - 10) and seqs.n_tokens(1) == len(tokens[1])
    assert seqs.truncate(1, len(tokens[1]) - 1)
    new_prompt = _tokens(150, seed=13)
    assert seqs.prepare(1, new_prompt) == new_prompt and seqs.n_tokens(1) == 0
    out = seqs.decode({0: [tokens[0][-1]], 1: new_prompt})
    n = len(tokens[0]) + 1
    want_logits = forward(weights, tokens[0] + [tokens[0][-1]], _exact_masks(n, 300, want[0]), ["f16"] * 4)[n - 1]
    assert (torch.from_numpy(out[0]) - want_logits).abs().max().item() < 0.1
    m = np.array(Llama(path, n_ctx=512, n_threads=2).eval(new_prompt, probe=spec)["mass"])
    assert seqs.kv_cache_stats()["sequences"][1]["lazy_layers"] == [il for il in range(4) if m[il] > threshold]


def test_dynamic_mode_holds_more_conversations_than_the_pool_has_cells(tiny_model):
    """Where every layer is lazy for every prompt (threshold 0: StreamingLLM), a conversation keeps sinks +
    window: two prompts of 300 tokens live in a pool of 512 cells, each as it would alone."""
    path = tiny_model("llama")
    kw = dict(n_threads=2, n_ubatch=128, lazy_mode="dynamic", lazy_threshold=0.0, lazy_type="f16", n_sink=4, n_window=64)
    llm = Llama(path, n_ctx=512, n_seq_max=2, **kw)
    seqs = llm.sequences
    a, b = _tokens(300, seed=14), _tokens(300, seed=15)
    first = {0: seqs.decode({0: a})[0], 1: seqs.decode({1: b})[1]}
    assert seqs.free_cells == 512 - 2 * (4 + 63)  # sinks, and the window of the next query but itself
    for s, p in ((0, a), (1, b)):
        alone = Llama(path, n_ctx=512, **kw)
        alone.eval(p)
        assert alone.kv_cache_stats()["lazy_layers"] == [0, 1, 2, 3]
        # Alone, the kept keys are compacted into f16 rings read through an f32 gather (Q not rounded to f16):
        # the same keys, another rounding of the query.
        assert np.abs(first[s] - alone.last_logits).max() < 0.1
    seqs.clear(0)
    seqs.clear(1)
    assert seqs.free_cells == 512


def test_two_sequences_of_different_lengths_match_the_reference(tiny_model):
    """Lazy layers (sink + window) with two sequences sharing every ubatch, each against an independent
    PyTorch forward of that sequence alone (the bounds of test_lazy_reference's f16 test)."""
    path = tiny_model("llama")
    lazy = [1, 3]
    llm = Llama(path, n_ctx=1024, n_seq_max=2, n_threads=2, n_ubatch=128, lazy_layers=lazy, lazy_type="f16",
                n_sink=4, n_window=64)
    a, b = _tokens(500, seed=3), _tokens(260, seed=4)
    seqs = llm.sequences
    got = {0: [], 1: []}
    for i in range(0, 500, 100):  # chunks of both in each call; b ends first
        batch = {0: a[i:i + 100]}
        if i < 260:
            batch[1] = b[i:i + 100]
        for s, lg in seqs.decode(batch, all_logits=True).items():
            got[s].append(lg)
    for s, toks in ((0, a), (1, b)):
        ours = torch.from_numpy(np.concatenate(got[s]))
        want = _reference(path, toks, lazy, "f16")
        err = (ours - want).abs()
        assert err.max().item() < 0.1 and err.mean().item() < 5e-3, (s, err.max().item(), err.mean().item())


def test_a_wrapping_ring_does_not_disturb_another_sequence(tiny_model):
    path = tiny_model("llama")
    kw = dict(n_threads=1, n_ubatch=32, lazy_layers=[0, 2], lazy_type="f16", n_sink=4, n_window=32)
    llm = Llama(path, n_ctx=2048, n_seq_max=2, **kw)
    seqs = llm.sequences
    short = _tokens(40, seed=5)
    seqs.decode({1: short})
    long = _tokens(700, seed=6)
    for i in range(0, 700, 50):  # sequence 0's ring (256 cells) wraps twice
        seqs.decode({0: long[i:i + 50]})
    assert llm.kv_cache_stats()["layers"][0]["capacity"] == 2 * 256  # one ring region per sequence
    after = seqs.decode({1: [7]})[1]

    # Alone, with the same calls (the same ubatches, so the same float sums) and one thread: the other
    # sequence's cells in the viewed range are masked out and change nothing, to the bit. (With more
    # threads ggml splits one query's keys among them at points that depend on the viewed range, and the
    # partial sums re-associate.)
    alone = Llama(path, n_ctx=2048, **kw)
    alone.eval(short)
    alone.eval([7])
    np.testing.assert_array_equal(after, alone.last_logits)
    # and sequence 0 still computes what it would alone
    last0 = seqs.decode({0: [9]})[0]
    alone.reset()
    for i in range(0, 700, 50):
        alone.eval(long[i:i + 50])
    alone.eval([9])
    np.testing.assert_array_equal(last0, alone.last_logits)


def test_a_sequence_outgrowing_its_share_of_the_pool(tiny_model):
    """Each sequence first takes cells in its own share of the pool (n_ctx / n_seq_max), so its attention
    scans only its own span. One that outgrows the share continues in free cells past another sequence's,
    and their spans then overlap: the mask alone keeps them apart, to the bit."""
    path = tiny_model("llama")
    # One thread and ubatches under 64 tokens: ggml's one-query-at-a-time kernel, which skips hidden cells
    # and sums the visible ones in cell order (= position order here), so the result cannot depend on
    # which other cells lie in between.
    kw = dict(n_threads=1, n_ubatch=32, lazy_layers=[1], lazy_type="f16", n_sink=4, n_window=64)
    llm = Llama(path, n_ctx=1024, n_seq_max=4, **kw)  # shares of 256 cells
    seqs = llm.sequences
    a, b = _tokens(400, seed=8), _tokens(100, seed=9)
    seqs.decode({1: b})  # cells 256..355
    first = seqs.decode({0: a})[0]  # cells 0..255, then 356..499 past sequence 1's
    steps = {0: _tokens(20, seed=10), 1: _tokens(20, seed=11)}
    got = {0: [], 1: []}
    for i in range(20):  # then their new cells interleave: 500, 501, ...
        for s in (0, 1):
            got[s].append(seqs.decode({s: [steps[s][i]]})[s])
    assert llm.kv_cache_stats()["layers"][0]["capacity"] == 1024

    alone = Llama(path, n_ctx=1024, **kw)
    for s, prompt in ((0, a), (1, b)):
        alone.reset()
        alone.eval(prompt)
        if s == 0:
            np.testing.assert_array_equal(first, alone.last_logits)
        for t, row in zip(steps[s], got[s]):
            alone.eval([t])
            np.testing.assert_array_equal(row, alone.last_logits)


def test_a_chunk_over_scattered_cells_reads_them_in_order(tiny_model):
    """A sequence that wrapped around the pool's end holds cells at both ends. A chunk of its tokens reads
    them through a gather, in position order, as over a contiguous span (not the whole pool between them,
    which a chunk's flash attention computes column by column, hidden or not): its logits equal the
    sequence's alone, to the bit. (Read in place, the same cells in another order sum otherwise.)"""
    path = tiny_model("llama")
    kw = dict(n_threads=2, n_ubatch=128, n_batch=128)  # every chunk large enough to be gathered
    llm = Llama(path, n_ctx=1024, n_seq_max=4, **kw)  # shares of 256 cells: sequence 3 starts at cell 768
    seqs = llm.sequences
    prompt, more = _tokens(384, seed=16), _tokens(128, seed=17)
    first = seqs.decode({3: prompt}, all_logits=True)[3]  # cells 768..1023, then 0..127
    later = seqs.decode({3: more}, all_logits=True)[3]    # cells 128..255
    assert seqs.kv_cache_stats()["sequences"][3]["cells"][0] == 512
    alone = Llama(path, n_ctx=1024, logits_all=True, **kw)
    alone.eval(prompt + more)
    np.testing.assert_array_equal(np.concatenate([first, later]), alone.scores[: alone.n_tokens])


def test_kv_stats_per_sequence_and_in_total(tiny_model):
    path = tiny_model("llama")
    llm = Llama(path, n_ctx=1024, n_seq_max=3, n_threads=1, lazy_layers=[1], n_window=32, n_ubatch=64)
    seqs = llm.sequences
    seqs.decode({0: _tokens(100), 2: _tokens(30)})
    stats = seqs.kv_cache_stats()
    by_layer = stats["layers"]
    full_row = by_layer[0]["bytes"] // by_layer[0]["capacity"]  # K + V bytes per cell of a full layer
    lazy_row = by_layer[1]["bytes"] // by_layer[1]["capacity"]
    region = by_layer[1]["capacity"] // 3
    assert by_layer[0]["capacity"] == 1024 and region == 256  # one pool; one ring region per sequence
    per = {s["seq"]: s for s in stats["sequences"]}
    assert [per[s]["n_tokens"] for s in range(3)] == [100, 0, 30]
    assert per[0]["cells"] == [100, 100, 100, 100] and per[2]["cells"] == [30, 30, 30, 30]
    # A sequence's own bytes: the pool cells it holds in the 3 full layers, plus its whole ring region.
    assert per[0]["bytes"] == 3 * 100 * full_row + region * lazy_row
    assert per[1]["bytes"] == region * lazy_row  # an empty sequence still owns its ring
    assert stats["free_cells"] == 1024 - 130
    assert stats["total_bytes"] == sum(x["bytes"] for x in by_layer)
    seqs.clear(0)
    assert seqs.kv_cache_stats()["free_cells"] == 1024 - 30 and seqs.n_tokens(0) == 0


def test_prefix_reuse_truncate_and_clear_per_sequence(tiny_model):
    path = tiny_model("llama")
    llm = Llama(path, n_ctx=512, n_seq_max=2, n_threads=1)
    seqs = llm.sequences
    turn1, turn2 = _tokens(80, seed=7), _tokens(20, seed=8)
    seqs.decode({0: turn1, 1: turn2})
    rest = seqs.prepare(0, turn1 + turn2)  # a chat's next turn: only the new tokens are evaluated
    assert rest == turn2
    got = seqs.decode({0: rest})[0]
    fresh = Llama(path, n_ctx=512, n_threads=1)
    fresh.eval(turn1)
    fresh.eval(turn2)  # the same ubatches: the same sums
    np.testing.assert_array_equal(got, fresh.last_logits)
    assert seqs.tokens(1) == turn2  # the other sequence untouched
    assert seqs.prepare(1, turn2[:10] + [5, 6]) == [5, 6] and seqs.n_tokens(1) == 10
    assert seqs.prepare(1, [9]) == [9] and seqs.n_tokens(1) == 0  # nothing in common: cleared


def test_refusals_change_nothing(tiny_model):
    path = tiny_model("llama")
    llm = Llama(path, n_ctx=256, n_seq_max=2, n_threads=1)
    seqs = llm.sequences
    seqs.decode({0: _tokens(200)})
    for bad, match in [({2: [1]}, "out of range"), ({0: [10**6]}, "vocabulary"), ({1: _tokens(100)}, "KV cache is full"),
                       ({0: _tokens(60)}, "context overflow|KV cache is full")]:
        with pytest.raises(ValueError, match=match):
            seqs.decode(bad)
    assert seqs.n_tokens(0) == 200 and seqs.n_tokens(1) == 0 and seqs.free_cells == 56
    seqs.decode({1: _tokens(56)})  # exactly what is left
    for call in (lambda: llm.eval([1]), lambda: llm.create_completion("x"), llm.reset):
        with pytest.raises(ValueError, match="use llm.sequences"):
            call()
    one = Llama(path, n_ctx=64, n_threads=1)
    one.eval([1, 2])
    assert one.sequences.decode({0: [3]})[0].shape == (one.n_vocab(),) and one.sequences.n_tokens(0) == 1
    with pytest.raises(ValueError, match="use llm.sequences"):
        one.eval([4])
