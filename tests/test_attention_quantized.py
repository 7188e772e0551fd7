"""Attention over a quantized store on the CPU (native/attention_quantized.cpp for a few queries, the cells
dequantized to f32 for many), one layer alone (`_native.lab.attention`), against a float64 NumPy
reference over the same dequantized cells (the gguf package's dequantizer).

Tolerances:
- The cells dequantized to f32 are exact, so that path is the reference's attention up to f32 rounding:
  measured <= 1.7e-6 on outputs of magnitude ~1; bound 1e-5.
- The decode kernel dots keys as ggml's flash attention does, with the query quantized to q8_0 (the
  quantized dot product), so it is compared with ggml's flash attention over the same cells: the same
  arithmetic in another order, measured <= 1.2e-6; bound 1e-5. Both differ from the exact reference by the
  query's 8-bit rounding (measured 7e-3..3e-2, far above the bound above: the comparison can tell them
  apart); the kernel's error there must not exceed ggml's by more than the same 1e-5.
"""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGML
from gguf.quants import dequantize, quantize

from py_simkv import _native

KIND = {"q8_0": GGML.Q8_0, "q4_0": GGML.Q4_0}
F32_ROUNDING = 1e-5
PAIRS = [("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "q4_0"), ("q4_0", "q8_0")]


def _case(rng, d, n_head, n_head_kv, n_tokens, n_kv, k_type, v_type, n_sink=4, n_window=200):
    """Queries at the last n_tokens positions of n_kv cells, each seeing the first n_sink positions and the
    n_window most recent ones (a lazy layer's view; a full layer's when n_window >= n_kv)."""
    q = rng.standard_normal((n_tokens, n_head, d)).astype(np.float32)
    k = (rng.standard_normal((n_kv, n_head_kv * d)) * rng.uniform(0.5, 3, (1, n_head_kv * d))).astype(np.float32)
    v = rng.standard_normal((n_kv, n_head_kv * d)).astype(np.float32)
    kb, vb = quantize(k, KIND[k_type]), quantize(v, KIND[v_type])
    pos = n_kv - n_tokens + np.arange(n_tokens)
    cells = np.arange(n_kv)
    seen = (cells[None, :] <= pos[:, None]) & ((cells[None, :] < n_sink) | (pos[:, None] - cells[None, :] < n_window))
    mask = np.where(seen, 0.0, -np.inf).astype(np.float32)
    keys = dequantize(kb, KIND[k_type]).reshape(n_kv, n_head_kv, d)
    values = dequantize(vb, KIND[v_type]).reshape(n_kv, n_head_kv, d)
    return q, kb.tobytes(), vb.tobytes(), mask, keys, values


def _reference(q, keys, values, mask, scale):
    n_tokens, n_head, d = q.shape
    group = n_head // keys.shape[1]
    out = np.zeros((n_tokens, n_head, d))
    for h in range(n_head):
        s = q[:, h].astype(np.float64) @ keys[:, h // group].astype(np.float64).T * scale + mask
        with np.errstate(invalid="ignore"):  # a row that sees nothing: all -inf
            p = np.exp(s - s.max(1, keepdims=True))
            p = np.nan_to_num(p / p.sum(1, keepdims=True))
        out[:, h] = p @ values[:, h // group]
    return out


def _run(case, k_type, v_type, n_head_kv, kernel, scale):
    q, kb, vb, mask, _, _ = case
    out, seconds = _native.lab.attention(q, kb, vb, k_type, v_type, n_head_kv, mask, scale, kernel, 2, 1)
    assert len(seconds) == 1
    return out


@pytest.mark.parametrize("k_type,v_type", PAIRS)
@pytest.mark.parametrize("d,n_head,n_head_kv", [(64, 9, 3), (256, 4, 1), (64, 4, 4)])
@pytest.mark.parametrize("n_tokens,n_kv", [(1, 1), (1, 37), (1, 700), (5, 300), (63, 63 + 37)])
def test_decode_kernel_is_ggml_arithmetic_and_dequantized_path_is_exact(k_type, v_type, d, n_head, n_head_kv,
                                                                        n_tokens, n_kv):
    rng = np.random.default_rng(n_kv * 7 + d)
    case = _case(rng, d, n_head, n_head_kv, n_tokens, n_kv, k_type, v_type)
    scale = 1 / np.sqrt(d)
    want = _reference(case[0], case[4], case[5], case[3], scale)
    ggml = _run(case, k_type, v_type, n_head_kv, "ggml", scale)
    ours = _run(case, k_type, v_type, n_head_kv, "simkv", scale)
    portable = _run(case, k_type, v_type, n_head_kv, "simkv-portable", scale)
    dequantized = _run(case, k_type, v_type, n_head_kv, "dequantized", scale)
    assert np.abs(dequantized - want).max() < F32_ROUNDING
    assert np.abs(ours - ggml).max() < F32_ROUNDING
    assert np.abs(portable - ggml).max() < F32_ROUNDING
    assert np.abs(ours - want).max() <= np.abs(ggml - want).max() + F32_ROUNDING
    if n_kv > 1:  # the query's 8-bit rounding shows: the bounds above can tell the two arithmetics apart
        assert np.abs(ggml - want).max() > 100 * F32_ROUNDING


def test_rows_that_see_nothing_and_whole_blocks_masked():
    """A query row whose mask hides every cell gives zeros (as ggml's flash attention does); a block of 256
    cells hidden from every row is skipped without changing the others."""
    rng = np.random.default_rng(3)
    case = list(_case(rng, 64, 6, 2, 3, 900, "q8_0", "q4_0", n_window=10_000))
    mask = case[3]
    mask[1] = -np.inf                # token 1 sees nothing
    mask[:, 256:512] = -np.inf       # cells 256..511 hidden from all
    want = _reference(case[0], case[4], case[5], mask, 0.125)
    for kernel in ("simkv", "simkv-portable", "dequantized"):
        got = _run(case, "q8_0", "q4_0", 2, kernel, 0.125)
        assert np.all(got[1] == 0.0)
        assert np.abs(got - want).max() < 0.05  # within the query's 8-bit rounding (bounded tightly above)
    np.testing.assert_allclose(_run(case, "q8_0", "q4_0", 2, "simkv", 0.125),
                               _run(case, "q8_0", "q4_0", 2, "ggml", 0.125), rtol=0, atol=F32_ROUNDING)


def _f16_rows(n_kv, width):
    return np.zeros((n_kv, width), np.float16).tobytes()


def _q8_rows(n_kv, width):
    return quantize(np.zeros((n_kv, width), np.float32), GGML.Q8_0).tobytes()


@pytest.mark.parametrize("bad,match", [
    (dict(kernel="nope"), "kernel must be"),
    (dict(k_type="f16", v_type="f16", k=_f16_rows(40, 192), v=_f16_rows(40, 192)), "q8_0 and q4_0"),
    (dict(n_head_kv=4, k=_q8_rows(40, 256), v=_q8_rows(40, 256)), "multiple of n_head_kv"),
    (dict(k=b"\0" * 10), "n_kv rows"),
    (dict(k_type="q5_1"), "unknown k_type"),
])
def test_bad_input_is_refused(bad, match):
    rng = np.random.default_rng(0)
    q, kb, vb, mask, _, _ = _case(rng, 64, 9, 3, 1, 40, "q8_0", "q8_0")
    args = dict(q=q, k=kb, v=vb, k_type="q8_0", v_type="q8_0", n_head_kv=3, mask=mask, scale=0.125, kernel="simkv")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        _native.lab.attention(**args)
