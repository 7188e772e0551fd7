"""One conversation in an engine: the tokens its sequence holds and the logits after the last one, kept in
step with the engine. `Llama` holds one (sequence 0) and `Sequences` one per sequence; keeping them in step,
reusing a prefix for a new prompt, cutting back and forgetting are written here once."""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from .prefix import positions_to_keep


class Conversation:
    def __init__(self, engine, seq: int, owns_engine: bool = False, scores: Optional[np.ndarray] = None):
        """owns_engine: the engine holds this conversation alone (Llama), so forgetting it resets the whole
        engine (which also undoes exact prefill's compaction). scores: every position's logits, row i after
        token i (Llama(logits_all=True)), from which a cut-back conversation gets its last logits again."""
        self._engine = engine
        self.seq = seq
        self._owns_engine = owns_engine
        self._scores = scores
        self.tokens: List[int] = []
        self.last_logits: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.tokens)

    def appended(self, tokens: Sequence[int], last_logits: np.ndarray) -> None:
        """Record tokens the engine has just evaluated for this conversation, and the logits after the last."""
        self.tokens.extend(int(t) for t in tokens)
        self.last_logits = last_logits

    def sync(self) -> None:
        """Re-align the engine with the token list after an interrupted evaluation (Ctrl-C lands in Python
        right after a native call returns, possibly before the bookkeeping that follows it)."""
        if self._engine.n_past_of(self.seq) != len(self.tokens) and not self._engine.truncate(len(self.tokens), self.seq):
            self.clear()

    def rewind(self, n_keep: int) -> bool:
        """Cut the conversation back to n_keep tokens. False (nothing changed) if a lazy ring no longer holds
        what that needs."""
        if n_keep >= len(self.tokens):
            return True
        if not self._engine.truncate(n_keep, self.seq):
            return False
        del self.tokens[n_keep:]
        # Only the last token's logits are kept, unless every position's are: re-evaluate one to sample again.
        self.last_logits = self._scores[n_keep - 1].copy() if (self._scores is not None and n_keep) else None
        return True

    def prepare(self, tokens: Sequence[int]) -> List[int]:
        """Make the conversation ready to continue into `tokens` (a whole prompt): keep the longest common
        prefix that every store still holds, and return the tokens still to evaluate (at least the last one,
        for fresh logits)."""
        tokens = [int(t) for t in tokens]
        self.sync()
        if self._engine.compacted_of(self.seq):
            # Exact prefill: the lazy layers were compacted after the prompt; a fresh exact evaluation of a new
            # prompt keeps every layer full throughout, which a reused prefix would not: start over.
            self.clear()
            return tokens
        keep = positions_to_keep(self.tokens, tokens)
        if keep == 0 or not self.rewind(keep):
            self.clear()
            return tokens
        return tokens[keep:]

    def clear(self) -> None:
        """Forget the conversation; its cells return to the pool."""
        if self._owns_engine:
            self._engine.reset()
        else:
            self._engine.clear(self.seq)
        self.tokens = []
        self.last_logits = None
