"""simkv's CPU kernels dequantize a store's rows themselves (native/dequantize.cpp): a lazy ring's gather
writes f16 rows, the attention of many queries over a quantized store reads f32 ones, the decode kernel
dequantizes value rows. Their values must be exactly the gguf package's (d * q, d * (q - 8)), and as f16
rounded as numpy rounds (to nearest, ties to even)."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGML
from gguf.quants import dequantize, quantize

from py_simkv import _native


def _blocks(kind):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 192)) * rng.uniform(0.01, 30, (64, 1))).astype(np.float32)
    x[3] = 0.0  # a zero scale
    x[5, :32] = 1e-8  # a tiny one (its values are f16 subnormals)
    x[7, :32] = 7e4  # beyond f16: inf, as ggml's conversion gives
    return quantize(x, kind)


@pytest.mark.parametrize("name,kind", [("q4_0", GGML.Q4_0), ("q8_0", GGML.Q8_0)])
def test_kernels_equal_gguf_dequantize(name, kind):
    blocks = _blocks(kind)
    want32 = dequantize(blocks, kind).reshape(-1).astype(np.float32)
    got32 = _native.dequantize_rows(name, blocks.tobytes(), False).view(np.float32)
    np.testing.assert_array_equal(got32, want32)
    with np.errstate(over="ignore"):  # the overflow to inf is the case under test
        want16 = want32.astype(np.float16)
    got16 = _native.dequantize_rows(name, blocks.tobytes(), True).view(np.float16)
    np.testing.assert_array_equal(got16, want16)
    assert np.isinf(got16[7 * 192:7 * 192 + 32]).any()  # the case above is exercised


def test_kernels_reject_partial_blocks():
    with pytest.raises(ValueError):
        _native.dequantize_rows("q4_0", b"\0" * 17, True)
    with pytest.raises(ValueError):
        _native.dequantize_rows("q5_1", b"\0" * 17, True)
