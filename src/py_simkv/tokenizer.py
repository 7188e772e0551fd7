"""llama-cpp-python's tokenizer interface (`BaseLlamaTokenizer`: tokenize/detokenize on bytes, encode/decode
on str) over simkv's libllama vocabulary. `Llama.tokenize` goes through `Llama.tokenizer_`, which is this
unless the user passed another (e.g. llama_cpp.llama_tokenizer.LlamaHFTokenizer), as in llama-cpp-python."""
from __future__ import annotations

from typing import List, Optional, Sequence

from llama_cpp.llama_tokenizer import BaseLlamaTokenizer

from .checks import check_int


class Tokenizer(BaseLlamaTokenizer):
    def __init__(self, vocab):
        self._vocab = vocab

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> List[int]:
        if not isinstance(text, (bytes, bytearray)):
            raise TypeError("tokenize() takes bytes; use text.encode('utf-8')")
        return self._vocab.tokenize(bytes(text), bool(add_bos), bool(special))

    def detokenize(self, tokens: Sequence[int], prev_tokens: Optional[Sequence[int]] = None,
                   special: bool = False) -> bytes:
        """The tokens' text. As llama-cpp-python: after a leading BOS one leading space goes (sentencepiece
        vocabularies add one at the start of a prompt)."""
        tokens = [check_int("token", t) for t in tokens]
        out = b"".join(self._vocab.token_to_piece(t, bool(special)) for t in tokens)
        if tokens and tokens[0] == self._vocab.bos and out[:1] == b" ":
            return out[1:]
        return out

    def encode(self, text: str, add_bos: bool = True, special: bool = True) -> List[int]:
        return self.tokenize(text.encode("utf-8", errors="ignore"), add_bos=add_bos, special=special)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.detokenize(tokens).decode("utf-8", errors="ignore")
