"""A lazy ring's cells are read for attention through a dequantizing gather (native/kv_gather.cpp); its
q4_0 kernel must give exactly what the gguf package's dequantizer gives (d * (q - 8) per value)."""
import numpy as np
from gguf import GGMLQuantizationType as GGML
from gguf.quants import dequantize, quantize

from py_simkv import _native


def test_q4_0_kernel_equals_gguf_dequantize():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 192)) * rng.uniform(0.01, 30, (64, 1))).astype(np.float32)
    x[3] = 0.0  # a zero scale
    x[5, :32] = 1e-8  # a tiny one
    blocks = quantize(x, GGML.Q4_0)
    want = dequantize(blocks, GGML.Q4_0).reshape(-1)
    got = _native.dequantize_q4_0(blocks.tobytes())
    np.testing.assert_array_equal(got, want)


def test_q4_0_kernel_rejects_partial_blocks():
    import pytest
    with pytest.raises(ValueError):
        _native.dequantize_q4_0(b"\0" * 17)
