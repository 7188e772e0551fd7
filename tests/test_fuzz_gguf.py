"""Corrupted GGUFs never crash or hang the process: each of 200+ variants of a real-tokenizer model is
loaded, evaluated, completed and chatted in a worker process with a timeout, and must either work or raise
one of the documented exceptions (ValueError, TypeError, FileNotFoundError).

Variants (seeded, deterministic): truncations at every structure of the file (header, each metadata key,
the tensor table, the data), corruptions of each metadata field's type and length, seeded byte flips in the
metadata, and semantic edits that libllama or ggml assert on (duplicate tokens, no vocabulary, a
sentencepiece tokenizer type on a BPE vocabulary, NaN / negative norm epsilon, zero RoPE dimensions, bad
RoPE bases, a block_count that disagrees with the blocks) or that are valid but were refused (a u64
parameter count, a negative int, a string that is not UTF-8).
"""
import json
import os
import select
import subprocess
import sys
import textwrap
import time

import gguf
import numpy as np
import pytest

from conftest import write_model

WORKER = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("ignore")
    from py_simkv import Llama
    DOCUMENTED = (ValueError, TypeError, FileNotFoundError)
    for line in sys.stdin:
        path = line.strip()
        result = "ok"
        try:
            llm = Llama(path, n_ctx=64, n_threads=1)
            _ = llm.metadata
            llm.eval(llm.tokenize(b"Hello world", add_bos=True)[:8])
            llm.create_completion("Once", max_tokens=4, temperature=0)
            if "tokenizer.chat_template" in llm.metadata:
                llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=4)
        except DOCUMENTED as e:
            result = type(e).__name__
        except BaseException as e:
            result = "UNDOCUMENTED " + type(e).__name__ + ": " + str(e)[:200]
        print("RESULT " + json.dumps(result), flush=True)  # native code may print to stdout too
""")
TIMEOUT_S = 30


class Worker:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)

    def run(self, path):
        """'ok', an exception name, or 'signal N' / 'timeout' (the worker is then gone)."""
        self.proc.stdin.write(path + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                self.proc.kill()
                self.proc.wait()
                return "timeout"
            line = self.proc.stdout.readline()
            if not line:
                return f"signal {-self.proc.wait()}"
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(10)


def _fields(path):
    """(key, byte offset of the field, byte offset of its value) of every metadata field, and where the
    tensor table and the data start."""
    r = gguf.GGUFReader(path)
    fields = [(k, f.offset, int(f.parts[-1].ctypes.data - r.data.ctypes.data) if len(f.parts) > 1 else f.offset)
              for k, f in r.fields.items() if not k.startswith("GGUF.")]
    tensors = [int(t.field.offset) for t in r.tensors]
    return fields, tensors, r.data_offset


def _rewrite(src, dst, edit=None, drop_tensors=()):
    """Copy a GGUF through the gguf package, with edit(writer, key, field) deciding each key (True = copied
    by the edit), and some tensors left out."""
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if edit and edit(w, key, f):
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub)
    for t in r.tensors:
        if t.name in drop_tensors:
            continue
        w.add_tensor(t.name, t.data, raw_shape=list(t.data.shape), raw_dtype=t.tensor_type)  # byte shape if quantized
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _semantic(base, folder):
    """The edits the hostile probe found crashing, hanging or wrongly refused; name -> path."""
    out = {}

    def variant(name, **kw):
        out[name] = _rewrite(base, os.path.join(folder, name + ".gguf"), **kw)

    def replace(target, vtype, value, sub=None):
        def edit(w, key, f):
            if key == target:
                if value is not None:
                    w.add_key_value(key, value, vtype, sub)
                return True
            return False
        return edit

    T = gguf.GGUFValueType
    tokens = gguf.GGUFReader(base).fields["tokenizer.ggml.tokens"].contents()
    dup = list(tokens)
    dup[5] = dup[6]
    variant("duplicate_token", edit=replace("tokenizer.ggml.tokens", T.ARRAY, dup, T.STRING))
    variant("no_vocab", edit=replace("tokenizer.ggml.model", T.STRING, "no_vocab"))
    variant("spm_on_bpe", edit=replace("tokenizer.ggml.model", T.STRING, "llama"))
    variant("no_tokenizer_model", edit=replace("tokenizer.ggml.model", T.STRING, None))
    for name, value in (("eps_nan", float("nan")), ("eps_negative", -1e-5), ("eps_zero", 0.0)):
        variant(name, edit=replace("llama.attention.layer_norm_rms_epsilon", T.FLOAT32, value))
    variant("rope_dims_zero", edit=replace("llama.rope.dimension_count", T.UINT32, 0))
    for name, value in (("rope_base_zero", 0.0), ("rope_base_nan", float("nan")), ("rope_base_negative", -1.0)):
        variant(name, edit=replace("llama.rope.freq_base", T.FLOAT32, value))
    variant("blocks_fewer_than_file", edit=replace("llama.block_count", T.UINT32, 3))
    variant("blocks_huge", edit=replace("llama.block_count", T.UINT32, 0xFFFFFFFF))
    variant("embedding_huge", edit=replace("llama.embedding_length", T.UINT32, 0xFFFFFFF0))
    variant("missing_tensor", drop_tensors=("blk.1.attn_k.weight",))

    def add(key, vtype, value):
        def edit(w, k, f):
            if k == "general.name":
                w.add_key_value(key, value, vtype)
            return False
        return edit
    variant("valid_u64_parameter_count", edit=add("general.parameter_count", T.UINT64, 8030261248))
    variant("valid_negative_int", edit=add("general.some_offset", T.INT32, -7))
    variant("valid_non_utf8_string", edit=add("general.description", T.STRING, b"caf\xe9 \xff"))
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    return write_model(str(folder / "base.gguf"), "tiny", weight_type="q4_0"), folder


def test_corrupted_ggufs_never_crash_or_hang(base):
    path, folder = base
    data = open(path, "rb").read()
    fields, tensors, data_offset = _fields(path)
    rng = np.random.default_rng(20261129)
    variants = []  # (name, bytes or path)
    # Truncations: inside the header, at and just after each field and each tensor entry, in the data.
    cuts = {0, 3, 4, 8, 12, 16, 20, 24}
    for _, off, val in fields:
        cuts.update((off, off + 5, val, val + 3))
    for off in tensors[:: max(len(tensors) // 12, 1)]:
        cuts.update((off, off + 9))
    cuts.update((data_offset, data_offset + 1000, len(data) - 1))
    for c in sorted(x for x in cuts if x < len(data)):
        variants.append((f"truncate@{c}", data[:c]))
    # Field corruptions: the value type, and a length or count, of every field.
    for key, off, _ in fields:
        key_len = int.from_bytes(data[off:off + 8], "little")
        type_at = off + 8 + key_len
        for code in (13, 255, 9):  # no such type; array
            b = bytearray(data)
            b[type_at:type_at + 4] = code.to_bytes(4, "little")
            variants.append((f"type{code}:{key}", bytes(b)))
        b = bytearray(data)
        b[type_at + 4:type_at + 12] = (2**62 + int(rng.integers(1, 2**20))).to_bytes(8, "little")
        variants.append((f"length:{key}", bytes(b)))
    # Seeded byte flips in the metadata and tensor table.
    for i in range(80):
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 9))):
            b[int(rng.integers(0, data_offset))] ^= int(rng.integers(1, 256))
        variants.append((f"flips#{i}", bytes(b)))
    semantic = _semantic(path, str(folder))
    variants += list(semantic.items())
    assert len(variants) >= 200

    worker, results = Worker(), {}
    target = os.path.join(str(folder), "variant.gguf")
    try:
        for name, content in variants:
            if isinstance(content, bytes):
                with open(target, "wb") as f:
                    f.write(content)
                result = worker.run(target)
            else:
                result = worker.run(content)
            results[name] = result
            if result == "timeout" or result.startswith("signal"):
                worker = Worker()
    finally:
        worker.close()
    outcomes = {}
    for v in results.values():
        outcomes[v] = outcomes.get(v, 0) + 1
    print(f"{len(results)} variants: {outcomes}")
    bad = {k: v for k, v in results.items() if v == "timeout" or v.startswith(("signal", "UNDOCUMENTED"))}
    assert not bad, bad
    # The valid edits load and run; the broken semantic edits are refused, never silently run.
    for name in semantic:
        if name.startswith("valid_"):
            assert results[name] == "ok", (name, results[name])
        else:
            assert results[name] == "ValueError", (name, results[name])
    assert results["truncate@0"] in ("ValueError", "FileNotFoundError")
