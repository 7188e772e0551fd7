"""Several conversations in one per-layer KV cache, decoded together.

`Llama(..., n_seq_max=N).sequences` drives the N sequences of that Llama's engine. Each has its own tokens,
positions and logits; decode() appends tokens to several of them in shared ubatches, so one conversation's
prompt chunk and the others' next tokens are evaluated in one pass (continuous batching, as llama-server
does). The full layers' n_ctx cells are one pool: a sequence takes cells only for the positions it holds.
The lazy layers give each sequence its own sink + ring. Prefix reuse, truncation (with the lazy-ring rule)
and clearing are per sequence. With exact prefill a sequence's first decode() after it was empty is its
prompt: evaluated alone with every layer full (its own temporary cache, of the prompt's length), then
trimmed into the shared cache; pass a prompt whole to get that. Sampling is the caller's: `llm.make_sampler(...)` gives each sequence its
own chain and seed.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from .checks import check_int
from .conversation import Conversation
from .prefix import common_prefix


class Sequences:
    def __init__(self, llm, engine):
        self.llm = llm
        self._engine = engine
        self.n_seq_max = llm.n_seq_max
        self._convs = [Conversation(engine, s) for s in range(self.n_seq_max)]

    def _seq(self, seq) -> int:
        seq = check_int("seq", seq)
        if not 0 <= seq < self.n_seq_max:
            raise ValueError(f"sequence {seq} is out of range (0..{self.n_seq_max - 1})")
        return seq

    # --- state -------------------------------------------------------------------------------------
    def tokens(self, seq: int) -> List[int]:
        return list(self._convs[self._seq(seq)].tokens)

    def n_tokens(self, seq: int) -> int:
        return len(self._convs[self._seq(seq)])

    def last_logits(self, seq: int) -> Optional[np.ndarray]:
        """Logits after the sequence's last token (what its next token is sampled from); None if empty."""
        return self._convs[self._seq(seq)].last_logits

    @property
    def prompts_alone(self) -> bool:
        """Whether a sequence's first decode() after it was emptied is evaluated alone, as one whole prompt
        (exact prefill, dynamic mode): a new prompt should then be passed in one piece."""
        return bool(self._engine.prompts_alone)

    @property
    def free_cells(self) -> int:
        """Free cells of the shared pool of the full layers (all sequences together)."""
        return int(self._engine.free_cells)

    def cells_needed(self, seq: int, n_keep: int, n_new: int) -> int:
        """Pool cells that cutting `seq` back to n_keep tokens, then appending n_new, takes beyond what it holds
        now (negative: it gives cells back). One per token, except where the sequence is lazy in the pool
        (dynamic mode): there it holds at most its sinks, its window and a ubatch."""
        return int(self._engine.cells_needed(self._seq(seq), check_int("n_keep", n_keep, 0), check_int("n_new", n_new, 0)))

    def cells_held(self, seq: int) -> int:
        """Pool cells the sequence holds: what clearing it gives back."""
        return int(self._engine.cells_held(self._seq(seq)))

    # --- evaluation --------------------------------------------------------------------------------
    def decode(self, batch: Mapping[int, Sequence[int]], all_logits: bool = False) -> Dict[int, np.ndarray]:
        """Append tokens to the sequences of `batch` ({seq: tokens}) in shared ubatches. Returns each
        sequence's logits: of its last token ([n_vocab]), or of every token ([n, n_vocab]) with all_logits.
        Nothing is evaluated if any part is refused (bad id, context or pool full)."""
        if not isinstance(batch, Mapping) or not batch:
            raise TypeError("decode() takes a non-empty {seq: tokens} mapping")
        seqs, arrays = [], []
        for seq, tokens in batch.items():
            seq = self._seq(seq)
            self._convs[seq].sync()
            arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
            if arr.size and (arr.min() < -2**31 or arr.max() >= 2**31):
                raise ValueError("token ids must be in the vocabulary")
            seqs.append(seq)
            arrays.append(np.ascontiguousarray(arr, dtype=np.int32))
        logits = self._engine.decode(seqs, arrays, [bool(all_logits)] * len(seqs))
        out = {}
        for seq, arr, lg in zip(seqs, arrays, logits):
            self._convs[seq].appended(arr, lg[-1])
            out[seq] = lg if all_logits else lg[-1]
        self.llm.n_evaluated += sum(int(a.size) for a in arrays)
        return out

    # --- context per sequence ----------------------------------------------------------------------
    def common_prefix(self, seq: int, tokens: Sequence[int]) -> int:
        """How many leading tokens of `tokens` the sequence already holds."""
        return common_prefix(self._convs[self._seq(seq)].tokens, tokens)

    def prepare(self, seq: int, tokens: Sequence[int]) -> List[int]:
        """Make `seq` ready to continue into `tokens` (a whole prompt): keep the longest common prefix that
        every store still holds, and return the tokens still to evaluate (at least the last one, for fresh
        logits). With exact prefill a sequence whose prompt was compacted starts over."""
        return self._convs[self._seq(seq)].prepare(tokens)

    def truncate(self, seq: int, n_keep: int) -> bool:
        """Cut the sequence back to n_keep tokens. False (nothing changed) if a lazy ring no longer holds
        what that needs."""
        return self._convs[self._seq(seq)].rewind(check_int("n_keep", n_keep, 0))

    def clear(self, seq: int) -> None:
        """Forget the sequence; its cells return to the shared pool."""
        self._convs[self._seq(seq)].clear()

    def kv_cache_stats(self) -> dict:
        """The whole cache (as Llama.kv_cache_stats) plus each sequence's share: tokens held, KV bytes that
        are its own (pooled cells it holds; its whole ring in lazy layers), cells per layer, and the layers
        that are lazy for it (the lazy stores; in dynamic mode, those its prompt chose)."""
        stats = self.llm.kv_cache_stats()
        stats["free_cells"] = self.free_cells
        stats["sequences"] = [dict(self._engine.seq_stats(s), seq=s) for s in range(self.n_seq_max)]
        return stats
