"""A lazy ring's attention, recomputed independently from what its store holds, against what each path
computed: the CPU and a device (ggml RPC servers on 127.0.0.1).

SmolLM2-135M, lazy layers 0,3,...,27 with q4_0 or q8_0 rings (and f16 as the control), after a 600-token
prompt that has wrapped the rings. For one layer, the engine reports the query rows of a step as they enter
attention (after RoPE) and the attention's output (rotated back); the reference reads the layer's store
(K/V rows as stored, the f16 residual, the cell map), dequantizes the rows with the gguf package's
dequantizer, turns them back with the Hadamard matrix, picks the keys each query sees (the n_sink first
positions and the n_window latest, from the f16 residual where the query is fewer than lazy_residual
positions ahead, else from the ring) and computes softmax(q k / sqrt(d)) v in float64.

Bounds, relative to the largest output value of each head: the paths read a ring's cells as f16 rows
(kv_gather.h), and the reference rounds K and V as they do. A chunk of queries (ggml's tiled kernel, f32
arithmetic) then differs only in summation order: measured at most 2.7e-6, bound 1e-4. One query (ggml's
vector kernel) also has its Q rounded to f16, which the reference does too, and V accumulated in an f16
accumulator, which it does not: measured at most 3.2e-3 (the f16 ring as much as the quantized ones), bound
8e-3. One key read from the wrong cell (a recent one replaced by one out of the window) moves the output by
0.035-0.23 (one query, two steps measured) and 2.5 (a chunk): the last test shows each bound catching it."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGML
from gguf.quants import dequantize

from py_simkv import Llama
from py_simkv import _native

LAZY = list(range(0, 30, 3))
N_PROMPT, N_WINDOW, N_SINK = 600, 128, 4
BOUND_CHUNK, BOUND_ONE = 1e-4, 8e-3


@pytest.fixture(scope="module")
def tokens(prose_tokens):
    return prose_tokens[: N_PROMPT + 200]


def _hadamard(n):
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def _rows(data, type_name, n_rows):
    raw = np.frombuffer(data, dtype=np.uint8).reshape(n_rows, -1)
    if type_name == "f16":
        return raw.view(np.float16).astype(np.float64)
    return dequantize(raw, GGML[type_name.upper()]).astype(np.float64)


def reference(store, q_rows, positions, hp, n_residual, f16_query):
    """Attention output rows [len(positions), n_head * head_dim] of sequence 0's queries at `positions`."""
    d, H, Hkv = hp["head_dim"], hp["n_head"], hp["n_head_kv"]
    cell_pos, cell_seq = np.array(store["cell_pos"]), np.array(store["cell_seq"])
    k = _rows(store["k"], store["type_k"], len(cell_pos))
    v = _rows(store["v"], store["type_v"], len(cell_pos))
    res_pos = np.array(store["residual_pos"][: store["residual_capacity"]])  # sequence 0's residual cells
    if store["k_residual"] is not None:
        k_res = _rows(store["k_residual"], "f16", len(store["residual_pos"]))
        v_res = _rows(store["v_residual"], "f16", len(store["residual_pos"]))
    f16 = lambda x: x.astype(np.float16).astype(np.float64)  # noqa: E731
    # Quantized stores hold K and V rotated, each head by H (H H = I): turn them (and Q) by it.
    # (K by the largest power of two dividing the head size, V by 64: the same H at SmolLM2's head size 64.)
    assert d == 64
    h = _hadamard(d)
    turn_k, turn_v = ((lambda x: (x.reshape(-1, d) @ h).reshape(x.shape)) if store[t] != "f16" else (lambda x: x)
                      for t in ("type_k", "type_v"))
    k, v = turn_k(f16(k)), turn_v(f16(v))  # the gathered rows attention reads (kv_gather.h), turned back
    if store["k_residual"] is not None:
        k_res, v_res = turn_k(k_res), turn_v(v_res)
    out = []
    for q_row, p in zip(q_rows, positions):
        keys, vals = [], []
        for kp in range(p + 1):
            if not (kp < N_SINK or p - kp < N_WINDOW):
                continue
            if p - kp < n_residual:
                c = np.nonzero(res_pos == kp)[0]
                assert len(c) == 1, f"position {kp} is not in the residual"
                keys.append(k_res[c[0]]), vals.append(v_res[c[0]])
            else:
                c = np.nonzero((cell_pos == kp) & (cell_seq == 0))[0]
                assert len(c) == 1, f"position {kp} is not in the ring"
                keys.append(k[c[0]]), vals.append(v[c[0]])
        K, V = np.array(keys).reshape(-1, Hkv, d), np.array(vals).reshape(-1, Hkv, d)
        q = q_row.astype(np.float64).reshape(H, d)
        if f16_query:  # rounded after its rotation, as the kernel rounds it
            q = turn_k(f16(turn_k(q)))  # Q turns with K
        o = np.empty((H, d))
        for head in range(H):
            g = head // (H // Hkv)
            s = K[:, g] @ q[head] / np.sqrt(d)
            a = np.exp(s - s.max())
            o[head] = (a / a.sum()) @ V[:, g]
        out.append(o.reshape(-1))
    return np.array(out)


def _check(got, want, hp):
    g = got.reshape(len(got), hp["n_head"], -1)
    w = want.reshape(len(want), hp["n_head"], -1)
    scale = np.abs(w).max(axis=2, keepdims=True)
    err = (np.abs(g - w) / scale).max()
    return err


def _engine(path, lazy_type, residual, **kw):
    llm = Llama(path, n_ctx=1024, n_threads=2, n_ubatch=128, lazy_layers=LAZY, n_window=N_WINDOW,
                lazy_type=lazy_type, lazy_residual=residual, verbose=False, **kw)
    return llm, llm._engine


CASES = [("q4_0", 0), ("q4_0", 32), ("q8_0", 0), ("q8_0", 32), ("f16", 0)]


@pytest.mark.parametrize("where", ["cpu", "rpc"])
@pytest.mark.parametrize("lazy_type,residual", CASES)
def test_ring_attention_equals_the_reference(smollm_path, tokens, request, where, lazy_type, residual):
    kw = {} if where == "cpu" else dict(n_gpu_layers=-1, rpc_servers=request.getfixturevalue("rpc_servers"))
    llm, engine = _engine(smollm_path, lazy_type, residual, **kw)
    hp = llm._model.hparams
    n_res = llm.kv_cache_stats()["layers"][LAZY[0]]["residual"]
    assert n_res == (residual if lazy_type != "f16" else 0)
    engine.eval(np.array(tokens[:N_PROMPT], dtype=np.int32), False)
    for layer in (3, 27):
        # a chunk of 64 queries (ggml's tiled kernel), then one (its vector kernel)
        for n in (64, 1):
            p0 = engine.n_past
            chunk = tokens[p0:p0 + n]
            q, out = _native.lab.attention_tap(engine, np.array(chunk, dtype=np.int32), layer)
            store = _native.lab.store_contents(engine, layer)
            assert store["kind"] == "lazy" and store["type_k"] == store["type_v"] == lazy_type
            # with a residual, only the last query's f16 keys are all still in it after the chunk
            rows = range(len(chunk)) if n_res == 0 else [len(chunk) - 1]
            rows = list(rows)
            want = reference(store, q[rows], [p0 + r for r in rows], hp, n_res, f16_query=len(chunk) == 1)
            err = _check(out[rows], want, hp)
            assert err < (BOUND_ONE if n == 1 else BOUND_CHUNK), (where, lazy_type, residual, layer, n, err)
    llm.close()


def test_the_reference_sees_one_misread_key(smollm_path, tokens):
    # The bounds' margin: the same checks with one visible key swapped for an older one fail them.
    llm, engine = _engine(smollm_path, "q4_0", 0)
    hp = llm._model.hparams
    engine.eval(np.array(tokens[:N_PROMPT], dtype=np.int32), False)
    for n, bound in ((64, BOUND_CHUNK), (1, BOUND_ONE)):
        p0 = engine.n_past
        q, out = _native.lab.attention_tap(engine, np.array(tokens[p0:p0 + n], dtype=np.int32), 27)
        store = dict(_native.lab.store_contents(engine, 27))
        positions = [p0 + r for r in range(n)]
        assert _check(out, reference(store, q, positions, hp, 0, f16_query=n == 1), hp) < bound
        cell_pos = list(store["cell_pos"])
        a, b = cell_pos.index(p0 - 5), cell_pos.index(p0 - 200)  # one seen by every query, one by none
        cell_pos[a], cell_pos[b] = cell_pos[b], cell_pos[a]  # the older key read in place of the recent one
        store["cell_pos"] = cell_pos
        err = _check(out, reference(store, q, positions, hp, 0, f16_query=n == 1), hp)
        assert err > 4 * bound, (n, err)
    llm.close()
