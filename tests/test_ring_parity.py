"""A quantized lazy ring computes the same attention on the CPU and on a device, on the real model.

SmolLM2-135M (Q4_1 weights), lazy layers 0,3,...,27, text from the packaged calibration prose; every layer
on ggml RPC servers on 127.0.0.1 (the device path a GPU takes: buffers that are not host memory, rings
gathered with ggml ops) against the same configuration on the CPU, for q4_0 and q8_0 rings with and
without the f16 residual, in streaming and exact prefill, decode across the ring's wrap, several sequences
(pooled gathers), and dynamic mode.

Why the bound is absolute and tight: on this model any difference between two paths grows. A change at the
f16 level in one layer's attention (2^-11 relative) moves a few of the next quantized layer's K/V codes by a
whole step, and the activations entering the q4/q8 weights are themselves quantized, so logits of two paths
that differ only by one f16 rounding of a ring's values end up to 7.7 apart (the CPU reading f32 rows, a
device f16 rows). Both paths read a ring's cells as f16 rows (kv_gather.h), and an RPC server runs the CPU's
kernels with the same thread count, so the logits are equal bit for bit; the assertion is the f16 bound of
test_offload.py (max < 0.1, mean < 5e-3), met with room, and equality on RPC."""
import numpy as np
import pytest

from py_simkv import Llama

LAZY = list(range(0, 30, 3))
N_PROMPT, N_DECODE = 600, 80


@pytest.fixture(scope="module")
def tokens(prose_tokens):
    return prose_tokens[: N_PROMPT + N_DECODE]


def _one_sequence(path, tokens, **kw):
    """A prompt in ubatches of 128, then single-token decode that wraps the rings (512 cells: window 128 +
    ubatch headroom): logits of every position."""
    llm = Llama(path, n_ctx=1024, n_threads=2, n_ubatch=128, logits_all=True, lazy_layers=LAZY, n_window=128,
                verbose=False, **kw)
    llm.eval(tokens[:N_PROMPT])
    for t in tokens[N_PROMPT:]:
        llm.eval([t])
    out = llm.scores[: llm.n_tokens].copy()
    llm.close()
    return out


def _three_sequences(path, tokens, **kw):
    """Three conversations in one batch: the first outgrows its third of the full layers' pool, so its
    chunks read scattered cells through a pooled gather; then decode steps of all three."""
    llm = Llama(path, n_ctx=1024, n_seq_max=3, n_threads=2, n_ubatch=128, n_batch=256, lazy_layers=LAZY,
                n_window=128, verbose=False, **kw)
    seqs = llm.sequences
    out = seqs.decode({0: tokens[:420], 1: tokens[100:400], 2: tokens[200:350]}, all_logits=True)
    rows = [out[0], out[1], out[2]]
    for t in tokens[N_PROMPT:N_PROMPT + 30]:
        out = seqs.decode({0: [t], 1: [t], 2: [t]})
        rows += [out[0][None], out[1][None], out[2][None]]
    llm.close()
    return np.concatenate(rows)


CASES = {
    "f16 ring": (_one_sequence, dict(lazy_type="f16")),
    "q4_0 ring, no residual": (_one_sequence, dict(lazy_type="q4_0", lazy_residual=0)),
    "q4_0 ring, residual": (_one_sequence, dict(lazy_type="q4_0")),
    "q8_0 ring, no residual": (_one_sequence, dict(lazy_type="q8_0", lazy_residual=0)),
    "q8_0 ring, residual": (_one_sequence, dict(lazy_type="q8_0")),
    "q4_0 ring, exact prefill, no residual": (_one_sequence, dict(lazy_type="q4_0", lazy_residual=0, lazy_prefill="exact")),
    "q4_0 ring, exact prefill": (_one_sequence, dict(lazy_type="q4_0", lazy_prefill="exact")),
    "q4_0 ring, three sequences": (_three_sequences, dict(lazy_type="q4_0")),
    "q8_0 ring, three sequences, no residual": (_three_sequences, dict(lazy_type="q8_0", lazy_residual=0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ring_on_rpc_equals_the_cpu(smollm_path, tokens, rpc_servers, case):
    run, kw = CASES[case]
    cpu = run(smollm_path, tokens, **kw)
    dev = run(smollm_path, tokens, n_gpu_layers=-1, rpc_servers=rpc_servers, **kw)
    err = np.abs(dev - cpu)
    assert err.max() < 0.1 and err.mean() < 5e-3, (case, err.max(), err.mean())
    assert np.array_equal(dev, cpu), (case, err.max(), err.mean())


def test_dynamic_mode_ring_on_rpc_equals_the_cpu(smollm_path, tokens, rpc_servers):
    # The probe chooses the lazy layers at the end of the prompt; they are compacted into q4_0 rings.
    def run(**kw):
        llm = Llama(smollm_path, n_ctx=1024, n_threads=2, n_ubatch=128, logits_all=True, lazy_mode="dynamic",
                    lazy_threshold=0.5, n_window=128, verbose=False, **kw)
        llm.eval(tokens[:N_PROMPT])
        for t in tokens[N_PROMPT:]:
            llm.eval([t])
        lazy = llm.kv_cache_stats()["lazy_layers"]
        out = llm.scores[: llm.n_tokens].copy()
        llm.close()
        return out, lazy

    cpu, lazy_cpu = run()
    dev, lazy_dev = run(n_gpu_layers=-1, rpc_servers=rpc_servers)
    assert lazy_cpu == lazy_dev and 0 < len(lazy_cpu) < 30, (lazy_cpu, lazy_dev)
    err = np.abs(dev - cpu)
    assert err.max() < 0.1 and err.mean() < 5e-3, (err.max(), err.mean())
    assert np.array_equal(dev, cpu)
