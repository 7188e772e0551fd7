"""When a generation ends: the one rule, asked on every drawn token by the completion loop (completion.py)
and by the token sources that feed it (Llama.generate through `llama_tokens`, a server slot in
scheduler.py), so a source stops exactly where the completion does."""
from __future__ import annotations

from typing import Callable, Iterable, Optional


class GenerationEnd:
    """A generation ends on a token that ends the turn (an end-of-generation token of the model, or one of
    the caller's stop ids: "stop", and the token is not part of the completion), or on the last token the
    limit allows ("length", the token is part of it)."""

    def __init__(self, max_new: int, is_eog: Callable[[int], bool], stop_ids: Iterable[int] = ()):
        self.max_new = int(max_new)
        self._is_eog = is_eog
        self._stop_ids = frozenset(int(t) for t in stop_ids)

    def ends_turn(self, token: int) -> bool:
        return token in self._stop_ids or bool(self._is_eog(token))

    def reason(self, token: int, n_drawn: int) -> Optional[str]:
        """Why the generation ends at `token`, the n_drawn-th token drawn (from 1): "stop", "length", or None
        to go on."""
        if self.ends_turn(token):
            return "stop"
        return "length" if n_drawn >= self.max_new else None
