"""Admission counted in cells, as the cache counts them: a sequence lazy in the shared pool (dynamic mode)
holds only its sinks, window and a ubatch there, lazy rings take no pool cells, and a full layer's pool one
cell per token. The engine admits a decode() and the server's scheduler admits a task by those counts, and
queues (never fails) a task the pool cannot hold yet."""
import threading
import time

from py_simkv import Llama
from py_simkv.generation_end import GenerationEnd
from py_simkv.scheduler import Scheduler

N_THREADS = 2
SMALL = dict(n_sink=4, n_window=32, n_ubatch=64, n_batch=64)
RING_CELLS = 256  # a lazy ring's capacity for SMALL: 4 + 32 + 64 - 1 positions, padded to 256 cells


def dynamic_all_lazy(path, **kw):
    """Dynamic mode where every layer is lazy for every prompt (any attention mass exceeds threshold 0)."""
    return Llama(path, lazy_mode="dynamic", lazy_threshold=0.0, n_threads=N_THREADS, verbose=False, **SMALL, **kw)


def test_a_sequence_lazy_in_the_pool_needs_its_ring_not_its_tokens(smollm_path, prose_tokens):
    llm = dynamic_all_lazy(smollm_path, n_ctx=1024, n_seq_max=2)
    seqs = llm.sequences
    seqs.decode({0: prose_tokens[:300]})  # its prompt: evaluated alone, then only sinks + window kept
    held = seqs.cells_held(0)
    assert held <= 4 + 32
    # 600 more tokens take at most a ring's worth of the pool, not 600 cells.
    need = seqs.cells_needed(0, 300, 600)
    assert 0 < need <= RING_CELLS - held
    free = seqs.free_cells
    seqs.decode({1: prose_tokens[1000:1000 + 300]})
    assert seqs.free_cells == free - seqs.cells_held(1)
    seqs.decode({0: prose_tokens[300:900]})  # evaluated ubatch by ubatch, each after the keys out of sight left
    assert seqs.n_tokens(0) == 900 and seqs.cells_held(0) <= RING_CELLS
    # Cutting back and clearing: a cleared sequence needs a cell per token again (its next prompt chooses anew).
    seqs.clear(0)
    assert seqs.cells_held(0) == 0 and seqs.cells_needed(0, 0, 500) == 500


def test_full_layers_need_a_cell_per_token_and_rings_none(smollm_path, prose_tokens):
    full = Llama(smollm_path, n_ctx=1024, n_seq_max=2, lazy_layers=[], n_threads=N_THREADS, verbose=False, **SMALL)
    full.sequences.decode({0: prose_tokens[:200]})
    assert full.sequences.cells_held(0) == 200
    assert full.sequences.cells_needed(0, 200, 300) == 300
    assert full.sequences.cells_needed(0, 50, 10) == 50 + 10 - 200  # a cut gives cells back
    rings = Llama(smollm_path, n_ctx=1024, n_seq_max=2, lazy_layers=list(range(30)), n_threads=N_THREADS,
                  verbose=False, **SMALL)
    rings.sequences.decode({0: prose_tokens[:200]})
    assert rings.sequences.cells_held(0) == 0 and rings.sequences.cells_needed(0, 200, 800) == 0


def run_tasks(llm, tasks):
    """Runs {name: (prompt, max_new)} through a scheduler of llm, submitted in order (the rest once the first
    has its first token: the scheduler admits it before it sees them); returns the order tokens arrived in
    ([(name, i)]) and each task's tokens. EOG tokens do not end them: each generates max_new."""
    scheduler = Scheduler(llm)
    order, out, lock = [], {}, threading.Lock()

    def consume(name, prompt, max_new):
        tokens = []
        for token, _ in scheduler.tokens(prompt, False, GenerationEnd(max_new, lambda t: False), temp=0.0):
            with lock:
                order.append((name, len(tokens)))
            tokens.append(token)
        out[name] = tokens

    threads = []
    try:
        for name, (prompt, max_new) in tasks.items():
            threads.append(threading.Thread(target=consume, args=(name, prompt, max_new)))
            threads[-1].start()
            while not order and threads[0].is_alive():
                time.sleep(0.01)
        for t in threads:
            t.join(timeout=600)
    finally:
        scheduler.stop()
    return order, out


def test_the_scheduler_queues_what_the_pool_cannot_hold_and_admits_it_when_it_can(smollm_path, prose_tokens):
    """Full layers: two prompts of 600 tokens do not fit 1,024 cells together. The second waits (it is not
    failed) and starts once the first has given its slot back."""
    llm = Llama(smollm_path, n_ctx=1024, n_seq_max=2, lazy_layers=[], n_threads=N_THREADS, verbose=False, **SMALL)
    order, out = run_tasks(llm, {"a": (prose_tokens[:600], 16), "b": (prose_tokens[1000:1600], 4)})
    assert len(out["a"]) == 16 and len(out["b"]) == 4
    first_b = order.index(("b", 0))
    assert first_b > order.index(("a", 15))  # b started after a had finished


def test_the_scheduler_admits_by_cells_beside_a_slot_lazy_in_the_pool(smollm_path, prose_tokens):
    """Dynamic mode: the first task's sequence holds only its ring's worth of the pool once its prompt is in
    (600 tokens, about 36 cells), and its reservation for 64 more tokens is a ring's worth at most, so a
    second prompt of 700 tokens is admitted beside it in 1,024 cells."""
    llm = dynamic_all_lazy(smollm_path, n_ctx=1024, n_seq_max=2)
    order, out = run_tasks(llm, {"a": (prose_tokens[:600], 64), "b": (prose_tokens[1000:1700], 4)})
    assert len(out["a"]) == 64 and len(out["b"]) == 4
    assert order.index(("b", 3)) < order.index(("a", 63))  # b ran while a was still generating
