"""A lazy ring's cells are read for attention through a dequantizing gather (native/kv_gather.cpp) that
writes f16 rows; its q4_0 kernel must give exactly the gguf package's values (d * (q - 8)) rounded to
f16 as numpy rounds (to nearest, ties to even)."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGML
from gguf.quants import dequantize, quantize

from py_simkv import _native


def test_q4_0_kernel_equals_gguf_dequantize_rounded_to_f16():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 192)) * rng.uniform(0.01, 30, (64, 1))).astype(np.float32)
    x[3] = 0.0  # a zero scale
    x[5, :32] = 1e-8  # a tiny one (its values are f16 subnormals)
    x[7, :32] = 7e4  # beyond f16: inf, as ggml's conversion gives
    blocks = quantize(x, GGML.Q4_0)
    with np.errstate(over="ignore"):  # the overflow to inf is the case under test
        want = dequantize(blocks, GGML.Q4_0).reshape(-1).astype(np.float16)
    got = _native.dequantize_q4_0_f16(blocks.tobytes()).view(np.float16)
    np.testing.assert_array_equal(got, want)
    assert np.isinf(got[7 * 192:7 * 192 + 32]).any()  # the case above is exercised


def test_q4_0_kernel_rejects_partial_blocks():
    with pytest.raises(ValueError):
        _native.dequantize_q4_0_f16(b"\0" * 17)
