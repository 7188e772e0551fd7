"""A quantized full store's f16 residual (full_residual, kv_policy_full.cpp): its attention recomputed
independently from what the store holds, against what each path computed, and what it buys.

SmolLM2-135M with q4_0 or q8_0 full layers and a residual of 32, after a 600-token prompt. For one layer the
engine reports a step's query rows and attention output (lab.attention_tap); the reference reads the store
(its quantized cells, the f16 residual, the cell map), dequantizes with the gguf package, turns K and V back
with the Hadamard matrix, reads each key a query is fewer than 32 positions ahead of from the residual and
every older one from the cells, and computes softmax(q k / sqrt(d)) v in float64.

Bounds, relative to the largest output value of each head. A chunk of 64 queries reads the cells dequantized
to f32 (exact) and the residual's f16 rows beside them through ggml's tiled kernel: summation order only,
measured at most 3e-6, bound 1e-4. One query (simkv's kernel over the cells in place) dots the cells with the
query rounded to q8_0, as ggml does, which the reference does too, and the f16 columns with the query as it
is: measured at most 2e-6, bound 1e-4. A recent key read from its 4-bit cell instead of the residual moves
a head's output by more than ten times that (checked in the test). On a device (ggml RPC servers on
127.0.0.1) the cells and the residual are joined as f16 rows for ggml's flash attention, which the
reference rounds too; one query there also has its Q rounded to f16 and V accumulated in f16: bound 8e-3,
as tests/test_ring_reference.py's."""
import numpy as np
import pytest

from py_simkv import Llama, lab
from py_simkv import _native
from py_simkv.logprobs import log_softmax
from test_ring_reference import _check, _hadamard, _rows

N_PROMPT, RESIDUAL = 600, 32
BOUND = 1e-4
# ggml's flash attention on a device (here an RPC server's CPU) reads f16 rows; for one query its vector
# kernel also rounds Q to f16 and accumulates V in f16 (tests/test_ring_reference.py: 3.2e-3 measured there)
BOUND_ONE_DEVICE = 8e-3


@pytest.fixture(scope="module")
def tokens(prose_tokens):
    return prose_tokens[: N_PROMPT + 200]


def _q8_0(x):
    """x rounded as ggml-cpu quantizes a query row to q8_0 (per 32 values: an f16 scale, int8 values)."""
    b = x.reshape(-1, 32)
    d = np.abs(b).max(axis=1, keepdims=True) / 127
    q = np.round(np.where(d > 0, b / np.where(d > 0, d, 1), 0))
    return (q * d.astype(np.float16).astype(np.float64)).reshape(x.shape)


def reference(store, q_rows, positions, hp, n_residual, q8_query, misread=None, f16_cells=False):
    d, H, Hkv = hp["head_dim"], hp["n_head"], hp["n_head_kv"]
    assert d == 64
    cell_pos, cell_seq = np.array(store["cell_pos"]), np.array(store["cell_seq"])
    k = _rows(store["k"], store["type_k"], len(cell_pos))
    v = _rows(store["v"], store["type_v"], len(cell_pos))
    if f16_cells:  # a device reads the cells beside the residual as f16 rows (graph_attention.cpp)
        k, v = (x.astype(np.float16).astype(np.float64) for x in (k, v))
    res_pos = np.array(store["residual_pos"][: store["residual_capacity"]])
    k_res = _rows(store["k_residual"], "f16", len(store["residual_pos"]))
    v_res = _rows(store["v_residual"], "f16", len(store["residual_pos"]))
    h = _hadamard(d)
    turn = lambda x: (x.reshape(-1, d) @ h).reshape(x.shape)  # noqa: E731  (H H = I)
    out = []
    for q_row, p in zip(q_rows, positions):
        q = turn(q_row.astype(np.float64).reshape(H, d))  # the query as the rotated keys see it
        q_cells = _q8_0(q) if q8_query else q
        o = np.empty((H, d))
        for head in range(H):
            g = head // (H // Hkv)
            scores, vals = [], []
            for kp in range(p + 1):
                if p - kp < n_residual and kp != misread:
                    c = np.nonzero(res_pos == kp)[0]
                    assert len(c) == 1, f"position {kp} is not in the residual"
                    kr, vr, qq = k_res[c[0]], v_res[c[0]], q[head]
                else:
                    c = np.nonzero((cell_pos == kp) & (cell_seq == 0))[0]
                    assert len(c) == 1, f"position {kp} is not in the store"
                    kr, vr, qq = k[c[0]], v[c[0]], q_cells[head]
                scores.append(kr.reshape(Hkv, d)[g] @ qq / np.sqrt(d))
                vals.append(vr.reshape(Hkv, d)[g])
            s = np.array(scores)
            a = np.exp(s - s.max())
            o[head] = turn((a / a.sum()) @ np.array(vals))  # turned back, as the engine's output is
        out.append(o.reshape(-1))
    return np.array(out)


@pytest.mark.parametrize("where", ["cpu", "rpc"])
@pytest.mark.parametrize("kv_type", ["q4_0", "q8_0"])
def test_full_store_attention_with_a_residual_equals_the_reference(smollm_path, tokens, request, where, kv_type):
    kw = {} if where == "cpu" else dict(n_gpu_layers=-1, rpc_servers=request.getfixturevalue("rpc_servers"))
    llm = Llama(smollm_path, n_ctx=1024, n_threads=2, n_ubatch=128, type_k=kv_type, type_v=kv_type,
                full_residual=RESIDUAL, **kw)
    engine, hp = llm._engine, llm._model.hparams
    assert llm.kv_cache_stats()["layers"][5]["residual"] == RESIDUAL
    engine.eval(np.array(tokens[:N_PROMPT], dtype=np.int32), False)
    for layer in (2, 27):
        for n in (64, 1):  # a chunk (dequantized cells, ggml's tiled kernel), then one query (simkv's kernel)
            p0 = engine.n_past
            q, out = _native.lab.attention_tap(engine, np.array(tokens[p0:p0 + n], dtype=np.int32), layer)
            store = _native.lab.store_contents(engine, layer)
            assert store["kind"] == "full" and store["type_k"] == kv_type
            rows = [n - 1]  # after the chunk, only its last query's f16 keys are all still in the residual
            cpu = where == "cpu"
            want = reference(store, q[rows], [p0 + n - 1], hp, RESIDUAL, q8_query=cpu and n == 1, f16_cells=not cpu)
            err = _check(out[rows], want, hp)
            assert err < (BOUND if cpu or n > 1 else BOUND_ONE_DEVICE), (where, kv_type, layer, n, err)
            # the bound sees one recent key read from its quantized cell instead of the residual
            if kv_type == "q4_0" and cpu:
                worse = reference(store, q[rows], [p0 + n - 1], hp, RESIDUAL, q8_query=n == 1, misread=p0 + n - 3)
                assert _check(out[rows], worse, hp) > 10 * BOUND
    llm.close()


def test_the_residual_recovers_most_of_what_4_bit_full_layers_cost(smollm_path, tokens):
    # Divergence from the f16 cache's next-token distributions over the last 300 positions of the prompt.
    def run(**kw):
        llm = Llama(smollm_path, n_ctx=1024, n_threads=2, logits_all=True, **kw)
        llm.eval(tokens[:N_PROMPT])
        return log_softmax(llm.scores[N_PROMPT - 300:N_PROMPT])

    def kld(p, q):
        return float((np.exp(p) * (p - q)).sum(-1).mean())

    f16 = run()
    plain = kld(f16, run(type_k="q4_0", type_v="q4_0", full_residual=0))
    kept = kld(f16, run(type_k="q4_0", type_v="q4_0", full_residual=RESIDUAL))
    # measured on this text: 0.055 without, 0.011 with
    assert kept < plain / 3, (plain, kept)


def test_state_and_rewind_keep_the_residual(smollm_path, tokens):
    kw = dict(n_ctx=1024, n_threads=2, type_k="q4_0", type_v="q4_0", full_residual=RESIDUAL)
    a = Llama(smollm_path, **kw)
    a.eval(tokens[:300])
    saved = a.save_state()
    want = lab.what_if_nll(a, tokens[300:320])  # (a what-if rewinds 20 positions: within the residual)
    b = Llama(smollm_path, **kw)
    b.load_state(saved)
    assert np.array_equal(lab.what_if_nll(b, tokens[300:320]), want)
    # after a rewind of up to the residual + 1 positions, the next query still finds every recent key in f16
    # (the reference asserts each is in the residual)
    b.eval(tokens[300:310])
    assert b._rewind(305)
    q, out = _native.lab.attention_tap(b._engine, np.array(tokens[305:306], dtype=np.int32), 7)
    store = _native.lab.store_contents(b._engine, 7)
    assert _check(out, reference(store, q, [305], b._model.hparams, RESIDUAL, q8_query=True), b._model.hparams) < BOUND
    # f16 full layers keep no residual, whatever full_residual says
    assert Llama(smollm_path, n_ctx=256, full_residual=RESIDUAL).kv_cache_stats()["layers"][0]["residual"] == 0
    with pytest.raises(ValueError, match="full_residual"):
        Llama(smollm_path, n_ctx=256, full_residual=-1)
