"""Continuous batching for `simkv serve`: tasks, slots, and the loop that decodes them together.

Each slot is one sequence of the engine (`Llama(n_seq_max=N).sequences`), in one state (SlotState): idle,
reading a task's prompt, or generating. A task is one request: its prompt, sampler chain, where it ends
(GenerationEnd, the rule the completion loop uses too) and the typed events its consumer reads. The loop
runs on its own thread and is the only one that touches the engine. Each step it
1. admits waiting tasks to free slots: the idle slot whose cached tokens share the longest prefix with
   the prompt (so a chat's next turn evaluates only its new tokens), else the least recently used one,
   while the shared pool of full-layer cells can hold them. The pool is counted in cells, as the cache
   counts them (Sequences.cells_needed): a sequence lazy in the pool (dynamic mode) holds only its sinks
   and window there, and lazy rings take no pool cells at all;
2. builds one batch: the next token of every generating slot, then prompt chunks of the slots still reading
   their prompt (chunked prefill), up to n_batch tokens in all;
3. makes room in the pool when the batch needs it, by dropping the cached KV of idle slots, least recently
   used first;
4. decodes the batch, samples each slot's next token with its task's own sampler chain, and hands it to
   the task's consumer.
A task's consumer (the HTTP handler, through completion.py) iterates its tokens; closing the iterator
(client gone, stop string found) frees the slot at the next step.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import enum
import threading
import time
from typing import Callable, Deque, Iterator, List, Optional, Tuple, Union

import numpy as np

from .generation_end import GenerationEnd
from .prefix import positions_to_keep

# Generated tokens a task reserves room for in the pool when admitted (a longer reply goes on while the
# pool has room, and ends where it has none).
RESERVED_GEN = 256


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full (the server answers 503)."""


class CacheFull(Exception):
    """The KV pool has no room for the request now (the server answers 503: retry later)."""


class SchedulerStopped(Exception):
    """The scheduler was stopped (server shutting down) before the request finished."""


class SlotState(enum.Enum):
    IDLE = "idle"              # no task; it may still hold a finished conversation's KV (prefix reuse)
    PROMPT = "prompt"          # reading its task's prompt, a chunk per step (or whole: prompts_alone)
    GENERATING = "generating"  # a sampled token waits to be evaluated at the next step


@dataclasses.dataclass
class TokenEvent:
    token: int
    logits: Optional[np.ndarray]


@dataclasses.dataclass
class DoneEvent:
    reason: str  # GenerationEnd's: "stop" or "length"; "cache" where the KV cache ran out


@dataclasses.dataclass
class ErrorEvent:
    error: BaseException


Event = Union[TokenEvent, DoneEvent, ErrorEvent]


class Task:
    """One request: its prompt, its sampler chain, where it ends (GenerationEnd), and the events its consumer
    reads (put by the loop, got by the consumer's thread)."""

    def __init__(self, prompt: List[int], sampler, end: GenerationEnd, want_logits: bool):
        self.prompt = prompt
        self.sampler = sampler
        self.end = end
        self.want_logits = want_logits
        self.n_generated = 0
        self.cancelled = False
        self.n_cached = 0  # prompt tokens found in the slot's cache (not evaluated again)
        self._events: Deque[Event] = collections.deque()
        self._ready = threading.Condition()

    def reserved_gen(self) -> int:
        """Generated tokens the task still reserves room for (at most RESERVED_GEN)."""
        return min(self.end.max_new - self.n_generated, RESERVED_GEN)

    def put(self, event: Event) -> None:
        with self._ready:
            self._events.append(event)
            self._ready.notify()

    def get(self) -> Event:
        with self._ready:
            while not self._events:
                self._ready.wait()
            return self._events.popleft()


class Slot:
    """One sequence of the engine and what it is doing. Its state changes only through start/generate/release."""

    def __init__(self, seq: int):
        self.seq = seq
        self.state = SlotState.IDLE
        self.task: Optional[Task] = None
        self.pending: List[int] = []           # PROMPT: prompt tokens still to evaluate
        self.next_token: Optional[int] = None  # GENERATING: sampled, evaluated at the next step
        self.last_used = 0.0

    def start(self, task: Task, pending: List[int]) -> None:
        self.state, self.task, self.pending, self.next_token = SlotState.PROMPT, task, pending, None

    def generate(self, token: int) -> None:
        self.state, self.pending, self.next_token = SlotState.GENERATING, [], token

    def release(self) -> None:
        # The slot keeps what it evaluated (its cached tokens) for the next task that shares a prefix.
        self.state, self.task, self.pending, self.next_token = SlotState.IDLE, None, [], None
        self.last_used = time.monotonic()

    @property
    def active(self) -> bool:
        return self.state is not SlotState.IDLE

class Scheduler:
    def __init__(self, llm, max_queue: int = 64):
        self.llm = llm
        self.seqs = llm.sequences
        self.slots = [Slot(s) for s in range(llm.n_seq_max)]
        self.max_queue = max_queue
        self._waiting: Deque[Task] = collections.deque()
        self._jobs: Deque[Tuple[Callable, concurrent.futures.Future]] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="simkv-scheduler", daemon=True)
        self._thread.start()

    # --- the consumer's side (any thread) ------------------------------------------------------------
    def tokens(self, prompt_tokens: List[int], want_logits: bool, end: GenerationEnd,
               **sampling) -> Iterator[Tuple[int, Optional[np.ndarray]]]:
        """A token source for completion.py: queues a task (refused with QueueFull when the queue is full)
        and yields (token, logits or None) as the loop samples them, up to where `end` ends the generation.
        sampling: the settings of Llama.make_sampler (Python logits processors are not run here: in process
        only)."""
        if "logits_processor" in sampling:
            raise ValueError("logits_processor runs only in process (Llama.create_completion), not in a server slot")
        sampler = self.llm.make_sampler(**sampling)
        task = Task([int(t) for t in prompt_tokens], sampler, end, want_logits)
        with self._cv:
            if self._stopping:
                raise SchedulerStopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"all {len(self.slots)} slots are busy and {self.max_queue} requests are waiting")
            self._waiting.append(task)
            self._cv.notify()
        return self._events(task)

    def _events(self, task: Task) -> Iterator[Tuple[int, Optional[np.ndarray]]]:
        try:
            while True:
                event = task.get()
                if isinstance(event, TokenEvent):
                    yield event.token, event.logits
                elif isinstance(event, ErrorEvent):
                    raise event.error
                else:
                    return
        finally:
            self.cancel(task)

    def cancel(self, task: Task) -> None:
        """Stop a task (its consumer is gone or has what it needs); its slot is free at the next step."""
        with self._cv:
            task.cancelled = True
            if task in self._waiting:
                self._waiting.remove(task)
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
            stats["slots"] = [{"id": slot.seq, "state": "processing" if slot.active else "idle",
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
                active = [s for s in self.slots if s.active]
                if not active and not self._jobs:
                    self._cv.wait(timeout=1.0)
                    continue
            if active:
                self._step(active)

    def _shut_down(self) -> None:
        error = ErrorEvent(SchedulerStopped("the server is shutting down"))
        for slot in self.slots:
            if slot.active:
                slot.task.put(error)
                slot.release()
        while self._waiting:
            self._waiting.popleft().put(error)
        for _, future in self._jobs:
            future.set_exception(error.error)
        self._jobs.clear()

    def _release_cancelled(self) -> None:
        for slot in self.slots:
            if slot.active and slot.task.cancelled:
                slot.release()

    # --- admission by cells: what each sequence takes of the shared pool (kv_cache.h, cells_needed) -----
    def _reserved_cells(self, slot: Slot) -> int:
        """Pool cells an active slot may still take: for the rest of its prompt and (up to RESERVED_GEN) of
        its generation. A slot lazy in the pool (dynamic mode) takes few: its ring's worth at most."""
        n = self.seqs.n_tokens(slot.seq)
        return max(self.seqs.cells_needed(slot.seq, n, len(slot.pending) + slot.task.reserved_gen()), 0)

    def _admit(self) -> None:
        """Waiting tasks take free slots in order while the pool can hold them: a task whose prompt does not
        fit beside the active ones waits (idle slots' cached KV counts as free: it is dropped, least recently
        used first, when needed)."""
        while self._waiting:
            free = [s for s in self.slots if not s.active]
            if not free:
                return
            task = self._waiting[0]
            # As llama-server: the slot that already holds the longest prefix of the prompt, else the one
            # idle the longest.
            kept, _, slot = max(((self.seqs.common_prefix(s.seq, task.prompt), -s.last_used, s) for s in free),
                                key=lambda c: c[:2])
            if len(task.prompt) + min(task.end.max_new, RESERVED_GEN) > self.llm.n_ctx():
                self._waiting.popleft()
                task.put(ErrorEvent(ValueError(f"the prompt ({len(task.prompt)} tokens) and its reply do not fit "
                                               f"the KV cache ({self.llm.n_ctx()} cells)")))
                continue
            keep = positions_to_keep(self.seqs.tokens(slot.seq), task.prompt)
            need = self.seqs.cells_needed(slot.seq, keep, len(task.prompt) - keep + task.reserved_gen())
            room = (self.seqs.free_cells + sum(self.seqs.cells_held(s.seq) for s in free if s is not slot)
                    - sum(self._reserved_cells(s) for s in self.slots if s.active))
            if need > room:
                return  # it waits until active tasks finish and give their cells back
            self._waiting.popleft()
            slot.start(task, self.seqs.prepare(slot.seq, task.prompt))
            task.n_cached = len(task.prompt) - len(slot.pending)
            task.sampler.accept_context(task.prompt)  # penalties look at the prompt too (as Llama.generate)

    def _step(self, active: List[Slot]) -> None:
        budget = max(self.llm.n_batch, len(active))
        batch = {}
        for slot in active:  # generating slots first: one token each keeps every stream moving
            if slot.state is SlotState.GENERATING:
                batch[slot.seq] = [slot.next_token]
        budget -= len(batch)
        for slot in active:  # then prompt chunks, as many tokens as the batch has room for
            if slot.state is SlotState.PROMPT and budget > 0:
                batch[slot.seq] = slot.pending if self._whole(slot) else slot.pending[:budget]
                budget -= len(batch[slot.seq])
        if not batch:
            return
        self._fit(batch, active)
        if not batch:
            # Only prompts are left and the pool has no cell for any of them (active slots hold it all):
            # the newest gives up its cells so the others can go on.
            slot = max(active, key=lambda s: s.last_used, default=None)
            if slot is not None:
                slot.task.put(ErrorEvent(CacheFull("the KV cache is full: too many long prompts at once")))
                self.seqs.clear(slot.seq)
                slot.release()
            return
        try:
            logits = self.seqs.decode(batch)
        except Exception as e:  # refused as a whole (nothing evaluated): fail those tasks, keep serving
            for slot in active:
                if slot.seq in batch:
                    slot.task.put(ErrorEvent(e))
                    slot.release()
            return
        now = time.monotonic()
        for slot in active:
            if slot.seq not in batch:
                continue
            slot.last_used = now
            if slot.state is SlotState.PROMPT:
                slot.pending = slot.pending[len(batch[slot.seq]):]
                if slot.pending:
                    continue  # more of the prompt to read before the first token
            self._sample(slot, logits[slot.seq])

    def _fit(self, batch: dict, active: List[Slot]) -> None:
        """Make the batch fit the pool: drop idle slots' cached KV (least recently used first), then shorten
        prompt chunks; a generating slot that still finds no cell ends its task (the context is full)."""
        def needed(seq: int, n: int) -> int:
            return max(self.seqs.cells_needed(seq, self.seqs.n_tokens(seq), n), 0)
        need = sum(needed(seq, len(t)) for seq, t in batch.items())
        idle = sorted((s for s in self.slots if not s.active and self.seqs.n_tokens(s.seq)), key=lambda s: s.last_used)
        while self.seqs.free_cells < need and idle:
            self.seqs.clear(idle.pop(0).seq)
        free = self.seqs.free_cells - sum(needed(s.seq, 1) for s in active if s.seq in batch and s.state is SlotState.GENERATING)
        for slot in active:
            if slot.seq in batch and slot.state is SlotState.PROMPT:
                chunk = batch[slot.seq]
                # The whole chunk if its cells fit, else as many tokens as there are free cells (one each).
                cost = needed(slot.seq, len(chunk))
                take = len(chunk) if cost <= free else max(min(len(chunk), free), 0)
                if self._whole(slot) and take < len(chunk):
                    take = 0  # a whole prompt or nothing: it waits for room
                if 0 < take < len(chunk):
                    cost = needed(slot.seq, take)
                free -= cost if take else 0
                if take:
                    batch[slot.seq] = chunk[:take]
                else:
                    del batch[slot.seq]
        if free < 0:  # not even one cell for some generating slots: they end where the cache does
            for slot in reversed(active):
                if free >= 0:
                    break
                if slot.seq in batch and slot.state is SlotState.GENERATING:
                    free += needed(slot.seq, 1)
                    del batch[slot.seq]
                    slot.task.put(DoneEvent("cache"))
                    slot.release()

    def _whole(self, slot: Slot) -> bool:
        """Whether this slot's pending prompt must be evaluated in one piece (a new prompt where the engine
        evaluates prompts alone: exact prefill, dynamic mode)."""
        return self.seqs.prompts_alone and self.seqs.n_tokens(slot.seq) == 0

    def _sample(self, slot: Slot, logits: np.ndarray) -> None:
        task = slot.task
        token = task.sampler.sample(logits)
        task.sampler.accept(token)
        task.put(TokenEvent(token, logits if task.want_logits else None))
        task.n_generated += 1
        reason = task.end.reason(token, task.n_generated)
        if reason:
            task.put(DoneEvent(reason))
            slot.release()
        else:
            slot.generate(token)
