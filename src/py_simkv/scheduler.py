"""Continuous batching for `simkv serve`: requests, slots, and the loop that decodes them together.

Each slot is one sequence of the engine (`Llama(n_seq_max=N).sequences`). The loop runs on its own thread
and is the only one that touches the engine. Each step it
1. admits waiting requests to free slots: the idle slot whose cached tokens share the longest prefix with
   the prompt (so a chat's next turn evaluates only its new tokens), else the least recently used one;
2. builds one batch: the next token of every decoding slot, then prompt chunks of the slots still reading
   their prompt (chunked prefill), up to n_batch tokens in all;
3. makes room in the shared pool of full-layer cells when the batch needs it, by dropping the cached KV of
   idle slots, least recently used first;
4. decodes the batch, samples each slot's next token with that request's own sampler chain, and hands it
   to the request's consumer.
A request's consumer (the HTTP handler, through completion.py) iterates its tokens; closing the iterator
(client gone, stop string found, enough tokens) frees the slot at the next step.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from typing import Callable, Deque, Iterator, List, Optional, Tuple

import numpy as np

# Generated tokens a request reserves room for in the pool when admitted (a longer reply goes on while the
# pool has room, and ends where it has none).
RESERVED_GEN = 256


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full (the server answers 503)."""


class CacheFull(Exception):
    """The KV pool has no room for the request now (the server answers 503: retry later)."""


class SchedulerStopped(Exception):
    """The scheduler was stopped (server shutting down) before the request finished."""


class Request:
    def __init__(self, prompt: List[int], max_new: int, sampler, want_logits: bool):
        self.prompt = prompt
        self.max_new = max_new
        self.n_generated = 0
        self.sampler = sampler
        self.want_logits = want_logits
        self.events: "collections.deque" = collections.deque()
        self.ready = threading.Condition()
        self.cancelled = False
        self.n_cached = 0  # prompt tokens found in the slot's cache (not evaluated again)

    def put(self, event) -> None:
        with self.ready:
            self.events.append(event)
            self.ready.notify()

    def get(self):
        with self.ready:
            while not self.events:
                self.ready.wait()
            return self.events.popleft()


class Slot:
    def __init__(self, seq: int):
        self.seq = seq
        self.request: Optional[Request] = None
        self.pending: List[int] = []       # prompt tokens still to evaluate
        self.next_token: Optional[int] = None  # sampled, evaluated at the next step
        self.last_used = 0.0


class Scheduler:
    def __init__(self, llm, max_queue: int = 64):
        self.llm = llm
        self.seqs = llm.sequences
        self.slots = [Slot(s) for s in range(llm.n_seq_max)]
        # Exact prefill and dynamic mode evaluate a sequence's first decode() as its whole prompt
        # (sequences.py): a new prompt then goes in one piece, not in chunks beside the other slots' tokens.
        self.whole_prompts = self.seqs.prompts_alone
        self.max_queue = max_queue
        self._waiting: Deque[Request] = collections.deque()
        self._jobs: Deque[Tuple[Callable, concurrent.futures.Future]] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="simkv-scheduler", daemon=True)
        self._thread.start()

    # --- the consumer's side (any thread) ------------------------------------------------------------
    def tokens(self, prompt_tokens: List[int], want_logits: bool, max_new: int,
               **sampling) -> Iterator[Tuple[int, Optional[np.ndarray]]]:
        """A token source for completion.py: queues a request (refused with QueueFull when the queue is
        full) and yields (token, logits or None) as the loop samples them, at most max_new. sampling: the
        settings of Llama.make_sampler (Python logits processors are not run here: in process only)."""
        if "logits_processor" in sampling:
            raise ValueError("logits_processor runs only in process (Llama.create_completion), not in a server slot")
        sampler = self.llm.make_sampler(**sampling)
        request = Request([int(t) for t in prompt_tokens], max_new, sampler, want_logits)
        with self._cv:
            if self._stopping:
                raise SchedulerStopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"all {len(self.slots)} slots are busy and {self.max_queue} requests are waiting")
            self._waiting.append(request)
            self._cv.notify()
        return self._events(request)

    def _events(self, request: Request) -> Iterator[Tuple[int, Optional[np.ndarray]]]:
        try:
            while True:
                kind, value, logits = request.get()
                if kind == "token":
                    yield value, logits
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            self.cancel(request)

    def cancel(self, request: Request) -> None:
        """Stop a request (its consumer is gone or has what it needs); its slot is free at the next step."""
        with self._cv:
            request.cancelled = True
            if request in self._waiting:
                self._waiting.remove(request)
            self._cv.notify()

    def call(self, fn: Callable):
        """Run fn() on the loop's thread between steps (what reads the engine, e.g. KV statistics)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stopping:
                raise SchedulerStopped("the server is shutting down")
            self._jobs.append((fn, future))
            self._cv.notify()
        return future.result()

    def slot_stats(self) -> dict:
        """KV per slot and in total, and what each slot is doing (read on the loop's thread)."""
        def read():
            stats = self.seqs.kv_cache_stats()
            per = {s["seq"]: s for s in stats.pop("sequences")}
            stats["devices"] = sorted({layer["device"] for layer in stats.pop("layers")})  # where the KV lives
            stats["slots"] = [{"id": slot.seq, "state": "processing" if slot.request else "idle",
                               "n_tokens": per[slot.seq]["n_tokens"], "kv_bytes": per[slot.seq]["bytes"],
                               "lazy_layers": per[slot.seq]["lazy_layers"]}
                              for slot in self.slots]
            with self._cv:
                stats["queued"] = len(self._waiting)
            return stats
        return self.call(read)

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # --- the loop (its own thread) ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                jobs = list(self._jobs)
                self._jobs.clear()
            for fn, future in jobs:
                try:
                    future.set_result(fn())
                except BaseException as e:  # handed to the caller's thread
                    future.set_exception(e)
            with self._cv:
                if self._stopping:
                    self._shut_down()
                    return
                self._release_cancelled()
                self._admit()
                active = [s for s in self.slots if s.request is not None]
                if not active and not self._jobs:
                    self._cv.wait(timeout=1.0)
                    continue
            if active:
                self._step(active)

    def _shut_down(self) -> None:
        error = SchedulerStopped("the server is shutting down")
        for slot in self.slots:
            if slot.request is not None:
                slot.request.put(("error", error, None))
                slot.request = None
        while self._waiting:
            self._waiting.popleft().put(("error", error, None))
        for _, future in self._jobs:
            future.set_exception(error)
        self._jobs.clear()

    def _release_cancelled(self) -> None:
        for slot in self.slots:
            if slot.request is not None and slot.request.cancelled:
                self._release(slot)

    def _release(self, slot: Slot) -> None:
        # The slot keeps what it evaluated (its cached tokens) for the next request that shares a prefix.
        slot.request = None
        slot.pending = []
        slot.next_token = None
        slot.last_used = time.monotonic()

    def _reserved(self, slot: Slot) -> int:
        """Pool cells an active slot may still take: the rest of its prompt and (up to RESERVED_GEN) of its
        generation."""
        r = slot.request
        return len(slot.pending) + min(r.max_new - r.n_generated, RESERVED_GEN)

    def _admit(self) -> None:
        """Waiting requests take free slots in order while the pool can hold them: a request whose prompt
        does not fit beside the active ones waits (idle slots' cached KV counts as free: it is dropped, least
        recently used first, when needed)."""
        while self._waiting:
            free = [s for s in self.slots if s.request is None]
            if not free:
                return
            request = self._waiting[0]
            # As llama-server: the slot that already holds the longest prefix of the prompt, else the one
            # idle the longest.
            kept, _, slot = max(((self.seqs.common_prefix(s.seq, request.prompt), -s.last_used, s) for s in free),
                                key=lambda c: c[:2])
            need = len(request.prompt) - kept + min(request.max_new, RESERVED_GEN)
            if need > self.llm.n_ctx():
                self._waiting.popleft()
                request.put(("error", ValueError(f"the prompt ({len(request.prompt)} tokens) and its reply do not fit "
                                                 f"the KV cache ({self.llm.n_ctx()} cells)"), None))
                continue
            room = (self.seqs.free_cells + sum(self.seqs.n_tokens(s.seq) for s in free if s is not slot)
                    + self.seqs.n_tokens(slot.seq) - kept
                    - sum(self._reserved(s) for s in self.slots if s.request is not None))
            if need > room:
                return  # it waits until active requests finish and give their cells back
            self._waiting.popleft()
            slot.request = request
            slot.pending = self.seqs.prepare(slot.seq, request.prompt)
            request.n_cached = len(request.prompt) - len(slot.pending)
            slot.next_token = None
            request.sampler.accept_context(request.prompt)  # penalties look at the prompt too (as Llama.generate)

    def _step(self, active: List[Slot]) -> None:
        budget = max(self.llm.n_batch, len(active))
        batch = {}
        for slot in active:  # decoding slots first: one token each keeps every stream moving
            if slot.next_token is not None:
                batch[slot.seq] = [slot.next_token]
        budget -= len(batch)
        for slot in active:  # then prompt chunks, as many tokens as the batch has room for
            if slot.pending and budget > 0:
                batch[slot.seq] = slot.pending if self._whole(slot) else slot.pending[:budget]
                budget -= len(batch[slot.seq])
        if not batch:
            return
        self._fit(batch, active)
        if not batch:
            # Only prompts are left and the pool has no cell for any of them (active slots hold it all):
            # the newest gives up its cells so the others can go on.
            slot = max((s for s in active if s.request is not None), key=lambda s: s.last_used, default=None)
            if slot is not None:
                slot.request.put(("error", CacheFull("the KV cache is full: too many long prompts at once"), None))
                self.seqs.clear(slot.seq)
                self._release(slot)
            return
        try:
            logits = self.seqs.decode(batch)
        except Exception as e:  # refused as a whole (nothing evaluated): fail those requests, keep serving
            for slot in active:
                if slot.seq in batch:
                    slot.request.put(("error", e, None))
                    self._release(slot)
            return
        now = time.monotonic()
        for slot in active:
            if slot.seq not in batch:
                continue
            slot.last_used = now
            if slot.next_token is None:
                slot.pending = slot.pending[len(batch[slot.seq]):]
                if slot.pending:
                    continue  # more of the prompt to read before the first token
            self._sample(slot, logits[slot.seq])

    def _fit(self, batch: dict, active: List[Slot]) -> None:
        """Make the batch fit the pool: drop idle slots' cached KV (least recently used first), then shorten
        prompt chunks; a decoding slot that still finds no cell ends its request (the context is full)."""
        need = sum(len(t) for t in batch.values())
        idle = sorted((s for s in self.slots if s.request is None and self.seqs.n_tokens(s.seq)),
                      key=lambda s: s.last_used)
        while self.seqs.free_cells < need and idle:
            self.seqs.clear(idle.pop(0).seq)
        free = self.seqs.free_cells - sum(1 for s in active if s.seq in batch and s.next_token is not None)
        for slot in active:
            if slot.seq in batch and slot.next_token is None:
                take = max(min(len(batch[slot.seq]), free), 0)
                if self._whole(slot) and take < len(batch[slot.seq]):
                    take = 0  # a whole prompt or nothing: it waits for room
                free -= take
                if take:
                    batch[slot.seq] = batch[slot.seq][:take]
                else:
                    del batch[slot.seq]
        if free < 0:  # not even one cell for some decoding slots: they end where the cache does
            for slot in reversed(active):
                if free >= 0:
                    break
                if slot.seq in batch and slot.next_token is not None:
                    del batch[slot.seq]
                    slot.request.put(("done", None, None))
                    self._release(slot)
                    free += 1

    def _whole(self, slot: Slot) -> bool:
        """Whether this slot's pending prompt must be evaluated in one piece (exact prefill of a new prompt)."""
        return self.whole_prompts and self.seqs.n_tokens(slot.seq) == 0

    def _sample(self, slot: Slot, logits: np.ndarray) -> None:
        request = slot.request
        token = request.sampler.sample(logits)
        request.sampler.accept(token)
        request.put(("token", token, logits if request.want_logits else None))
        request.n_generated += 1
        if self.llm.token_is_eog(token) or request.n_generated >= request.max_new:
            request.put(("done", None, None))
            self._release(slot)
        else:
            slot.next_token = token
