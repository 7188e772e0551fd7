"""Every bad input raises a Python exception with a useful message; the process never aborts."""

import gguf
import numpy as np
import pytest

from py_simkv import Llama, _native


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Llama(str(tmp_path / "nope.gguf"))


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ValueError, match="not a file"):
        Llama(str(tmp_path))


def test_non_gguf_file(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("hello, I am not a model\n" * 10)
    with pytest.raises(ValueError, match="not a GGUF"):
        Llama(str(p))
    with pytest.raises(ValueError, match="not a GGUF"):
        _native.load_model(str(p))  # the native layer checks on its own too


@pytest.mark.parametrize("keep", [4, 100, 0.5, 0.999])
def test_truncated_file(tiny_model, tmp_path, keep):
    src = tiny_model("llama")
    data = open(src, "rb").read()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:n])
    with pytest.raises(ValueError, match="truncated|invalid"):
        Llama(str(p))


def _write_gguf(path, arch, tensors=()):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(2)
    w.add_context_length(128)
    for name, arr in tensors:
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unknown_architecture(tmp_path):
    p = tmp_path / "gpt2.gguf"
    _write_gguf(p, "gpt2")
    with pytest.raises(ValueError, match="unsupported model architecture 'gpt2'"):
        Llama(str(p))


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    p = tmp_path / "broken.gguf"
    _write_gguf(p, "llama", [("token_embd.weight", np.zeros((10, 64), np.float32)),
                             ("output_norm.weight", np.zeros(63, np.float32))])
    with pytest.raises(ValueError) as e:
        Llama(str(p))
    msg = str(e.value)
    assert "missing tensor blk.0.attn_q.weight" in msg
    assert "output_norm.weight has shape [63], expected [64]" in msg


@pytest.mark.parametrize("kw,exc,match", [
    (dict(n_ctx=-5), ValueError, "n_ctx must be >= 1, or 0 for the model's trained context"),
    (dict(n_ctx="4096"), TypeError, "n_ctx must be an int"),
    (dict(n_batch=0), ValueError, "n_batch"),
    (dict(n_threads=0), ValueError, "n_threads"),
    (dict(n_window=0), ValueError, "n_window must be >= 1"),
    (dict(n_sink=-1), ValueError, "n_sink"),
    (dict(lazy_layers=[4]), ValueError, "lazy layer 4 is out of range: the model has 4 layers"),
    (dict(lazy_layers=[-1]), ValueError, "out of range"),
    (dict(lazy_layers=[1, 2, 1]), ValueError, "lazy layer 1 is listed twice"),
    (dict(lazy_layers=["1"]), TypeError, "must be ints"),
    (dict(lazy_layers="1,2"), TypeError, "sequence of layer indices"),
    (dict(type_k="q5_7", type_v="q5_7"), ValueError, "unknown type_k 'q5_7'"),
    (dict(kv_types="4=q8_0"), ValueError, "kv_types: layer 4 is out of range: the model has 4 layers"),
    (dict(kv_types={1: ("q8_0", "q5_7")}), ValueError, "unknown layer 1's V type 'q5_7'"),
    (dict(kv_types="1:q8_0"), ValueError, "is not LAYERS=TYPE"),
    (dict(lazy_type="int4"), ValueError, "unknown lazy_type"),
    (dict(lazy_type=4), TypeError, "lazy_type must be a string"),
])
def test_bad_arguments(tiny_model, kw, exc, match):
    with pytest.raises(exc, match=match):
        Llama(tiny_model("llama"), **kw)


def test_native_engine_validates_without_python(tiny_model):
    """Values are checked once, natively: an EngineConfig filled without Python's type checks is refused."""
    model = _native.load_model(tiny_model("llama"))
    base = dict(n_ctx=64, n_batch=64, n_ubatch=64, n_threads=1, type_k="f16", type_v="f16", lazy_type="q4_0",
                lazy_layers=[], n_sink=4, n_window=16)
    for bad, match in [(dict(lazy_layers=[9]), "out of range"), (dict(lazy_layers=[0, 0]), "twice"),
                       (dict(n_window=0), "n_window"), (dict(n_ctx=0), "n_ctx"), (dict(lazy_type="x"), "unknown"),
                       (dict(n_ctx=2**40), "n_ctx must be <="), (dict(lazy_mode="sometimes"), "lazy_mode")]:
        with pytest.raises(ValueError, match=match):
            cfg = _native.EngineConfig()
            for name, value in dict(base, **bad).items():
                setattr(cfg, name, value)
            _native.Engine(model, cfg)


def test_engine_config_defaults_are_the_llama_defaults():
    """One home per default: Llama's signature and the CLI read the native config's; Llama's n_ctx default is
    llama-cpp-python's (a user changes only the import), and type_k/type_v None stand for the native ones."""
    import inspect

    import llama_cpp

    from py_simkv.engine_config import DEFAULTS
    sig = inspect.signature(Llama.__init__).parameters
    for name in ("n_batch", "n_ubatch", "n_sink", "n_window", "lazy_type", "lazy_prefill", "lazy_mode"):
        assert sig[name].default == getattr(DEFAULTS, name)
    assert sig["n_ctx"].default == inspect.signature(llama_cpp.Llama.__init__).parameters["n_ctx"].default == 512
    assert sig["type_k"].default is None and sig["type_v"].default is None
    assert (DEFAULTS.n_window, DEFAULTS.n_sink, DEFAULTS.lazy_type) == (1024, 4, "q4_0")


def test_prompt_longer_than_context(tiny_model):
    llm = Llama(tiny_model("llama"), n_ctx=64, n_threads=1)
    with pytest.raises(ValueError, match="exceed context window of 64"):
        llm.eval(list(range(65)))
    assert llm.n_tokens == 0
    llm.eval(list(range(60)))
    with pytest.raises(ValueError, match="exceed context window"):
        llm.eval(list(range(5)))
    assert llm.n_tokens == 60
    llm.eval(list(range(4)))  # exactly full is fine
    assert llm.n_tokens == 64


def test_bad_tokens(tiny_model):
    llm = Llama(tiny_model("llama"), n_ctx=64, n_threads=1)
    with pytest.raises(ValueError, match="token ids"):
        llm.eval([1, 2, 10 ** 6])
    with pytest.raises(ValueError, match="token ids"):
        llm.eval([-1])
    with pytest.raises(TypeError, match="bytes"):
        llm.tokenize("a str")
    with pytest.raises(ValueError, match="vocabulary"):
        llm.detokenize([10 ** 6])


def test_generate_needs_a_prompt(tiny_model):
    llm = Llama(tiny_model("llama"), n_ctx=64, n_threads=1)
    with pytest.raises(ValueError, match="at least one token"):
        next(llm.generate([]))


def test_cache_type_needs_divisible_head_size(tmp_path, tiny_model):
    # tiny head_dim is 32: quantized caches fine. A model with head size 16 cannot hold Q4_0 rows.
    from conftest import write_model
    p = write_model(str(tmp_path / "h16.gguf"), "tiny", head_dim=16, n_embd=64)
    Llama(p, n_ctx=64, n_threads=1)  # f16 works
    with pytest.raises(ValueError, match="head size divisible by 32"):
        Llama(p, n_ctx=64, n_threads=1, lazy_layers=[0])
