"""`Llama`: the user-facing model object, shaped like llama-cpp-python's.

It validates arguments (so that nothing invalid reaches ggml, whose asserts abort the process), owns one
native Engine (model + per-layer KV cache) and one Vocab (libllama's tokenizer), and keeps the tokens and
logits of the current context.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from . import _native
from .chat import ChatTemplate, create_chat_completion
from .checks import check_float, check_int, check_layer_list, check_model_file, check_str
from .completion import create_completion
from .engine_config import DEFAULTS, engine_config
from .lazy_profile import family_threshold, model_identity, resolve_lazy_layers
from .logprobs import log_softmax

LLAMA_DEFAULT_SEED = 0xFFFFFFFF


def gpu_devices() -> List[str]:
    """GPU devices simkv can offload to: those of the ggml build that llama-cpp-python installed (built with
    CMAKE_ARGS="-DGGML_CUDA=on" for CUDA). Empty on a CPU-only install."""
    return list(_native.gpu_devices())


_warned_no_gpu = False
# ggml's CPU threads come from OpenMP (libgomp), whose thread pool does not survive fork(): a multi-threaded
# call in a forked child would hang. Llama objects used in such a child compute with one thread, and say so.
_forked_child = False


def _after_fork_in_child() -> None:
    global _forked_child
    _forked_child = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _warn_forked() -> None:
    warnings.warn("simkv in a fork()ed child process computes with one thread (ggml's OpenMP threads do not "
                  "survive fork()); use multiprocessing's 'spawn' start method for full speed",
                  RuntimeWarning, stacklevel=4)


def _warn_no_gpu() -> None:
    global _warned_no_gpu
    if not _warned_no_gpu:
        _warned_no_gpu = True
        warnings.warn("n_gpu_layers ignored: llama-cpp-python was installed without GPU support, so simkv runs on "
                      "the CPU (reinstall it with CMAKE_ARGS=\"-DGGML_CUDA=on\" to offload)", RuntimeWarning, stacklevel=3)


class Llama:
    """A GGUF model with a per-layer KV cache.

    lazy_layers: indices of layers whose cache keeps only `n_sink` initial tokens plus a ring of the last
    `n_window` tokens, stored as `lazy_type`. The other layers keep all `n_ctx` tokens as `type_k`/`type_v`.
    Or let a profile choose them (`simkv profile`): lazy_profile=PATH or "auto" (the MODEL.gguf.simkv.json
    saved beside the model, if any) with lazy_ratio (the laziest fraction of layers) or lazy_threshold on
    lazy_criterion: "loss" (the default where the profile has it: the measured loss increase of trimming
    each layer alone; default threshold 0.005 nats), "mass" (the paper's attention mass; default threshold
    by model family) or "change".
    Explicit lazy_layers win over a profile.

    lazy_prefill="streaming" (default): lazy layers hold only sinks + ring from the first token: memory is
    bounded throughout. "exact": every layer is full while a prompt is evaluated (the paper's procedure,
    peak memory of a full cache); at the prompt's end the lazy layers are compacted into their sink + ring
    store. lazy_mode="dynamic": exact prefill where the lazy layers are chosen per prompt by the probe
    (attention mass on sinks + window of the last 32 prompt tokens > lazy_threshold, default the paper's
    threshold for the model family).

    n_seq_max > 1 holds that many independent conversations in one cache (the full layers' n_ctx cells are
    one pool they share; each has its own sink + ring in the lazy layers). Drive them through
    `llm.sequences` (sequences.py: decoded together, continuous batching); the single-conversation methods
    (eval, generate, completions) refuse then, and once `llm.sequences` was used.
    """

    def __init__(
        self,
        model_path,
        n_ctx: int = DEFAULTS.n_ctx,
        n_batch: int = DEFAULTS.n_batch,
        n_ubatch: int = DEFAULTS.n_ubatch,
        n_threads: Optional[int] = None,
        n_gpu_layers: int = 0,
        main_gpu: int = 0,
        use_mmap: bool = True,
        type_k: str = DEFAULTS.type_k,
        type_v: str = DEFAULTS.type_v,
        lazy_layers: Optional[Sequence[int]] = None,
        lazy_type: str = DEFAULTS.lazy_type,
        lazy_profile: Optional[str] = None,
        lazy_ratio: Optional[float] = None,
        lazy_threshold: Optional[float] = None,
        lazy_criterion: Optional[str] = None,
        lazy_prefill: str = DEFAULTS.lazy_prefill,
        lazy_mode: str = DEFAULTS.lazy_mode,
        n_sink: int = DEFAULTS.n_sink,
        n_window: int = DEFAULTS.n_window,
        logits_all: bool = False,
        seed: int = LLAMA_DEFAULT_SEED,
        verbose: bool = False,
        n_seq_max: int = DEFAULTS.n_seq_max,
    ):
        self.verbose = bool(verbose)
        _native.set_logging(self.verbose)
        self.model_path = check_model_file(model_path)
        self.n_gpu_layers = check_int("n_gpu_layers", n_gpu_layers, -1)
        self.main_gpu = check_int("main_gpu", main_gpu, 0)
        if self.n_gpu_layers != 0 and not gpu_devices():
            _warn_no_gpu()
        self.logits_all = bool(logits_all)
        self._seed = check_int("seed", seed, 0) & 0xFFFFFFFF
        # Types here; values are checked natively when the config is assigned or the engine is built.
        settings = dict(n_ctx=check_int("n_ctx", n_ctx), n_batch=check_int("n_batch", n_batch),
                        n_ubatch=check_int("n_ubatch", n_ubatch), n_sink=check_int("n_sink", n_sink),
                        n_window=check_int("n_window", n_window),
                        type_k=check_str("type_k", type_k, "f16"), type_v=check_str("type_v", type_v, "f16"),
                        lazy_type=check_str("lazy_type", lazy_type, "q4_0"),
                        lazy_prefill=check_str("lazy_prefill", lazy_prefill, "exact"),
                        lazy_mode=check_str("lazy_mode", lazy_mode, "dynamic"))
        if n_threads is not None:
            settings["n_threads"] = check_int("n_threads", n_threads)
        if _forked_child:
            _warn_forked()
            settings["n_threads"] = 1
        settings["n_seq_max"] = check_int("n_seq_max", n_seq_max)
        config = engine_config(**settings)

        self._model = _native.load_model(self.model_path, n_gpu_layers=self.n_gpu_layers, main_gpu=self.main_gpu,
                                         use_mmap=bool(use_mmap))
        self._hparams = self._model.hparams
        if config.lazy_mode == "dynamic":
            if lazy_layers is not None or lazy_profile is not None or lazy_ratio is not None:
                raise ValueError("lazy_mode='dynamic' chooses lazy layers per prompt: give only lazy_threshold")
            config.dynamic_threshold = (family_threshold({"name": self._model.metadata.get("general.name", "")})
                                        if lazy_threshold is None else check_float("lazy_threshold", lazy_threshold))
            self.lazy_profile_path = None
        else:
            lazy_layers, self.lazy_profile_path = resolve_lazy_layers(
                self.model_path, self._model, lazy_layers, lazy_profile, lazy_ratio, lazy_threshold, lazy_criterion)
            if lazy_layers is not None:
                config.lazy_layers = check_layer_list("lazy_layers", lazy_layers)
        self._vocab = _native.Vocab(self.model_path)
        if self._vocab.n_vocab != self._hparams["n_vocab"]:
            raise ValueError(
                f"tokenizer has {self._vocab.n_vocab} tokens but the model's embedding has {self._hparams['n_vocab']}"
            )
        self._engine = _native.Engine(self._model, config)
        # What the engine runs with (validated: n_ubatch <= n_batch, windows no larger than the context).
        config = self._engine.config
        self._n_ctx, self.n_batch, self.n_ubatch, self.n_threads = config.n_ctx, config.n_batch, config.n_ubatch, config.n_threads
        self.type_k, self.type_v, self.lazy_type = config.type_k, config.type_v, config.lazy_type
        self.n_sink, self.n_window = config.n_sink, config.n_window
        self.lazy_prefill, self.lazy_mode = config.lazy_prefill, config.lazy_mode
        self.lazy_layers = sorted(config.lazy_layers)
        self.n_seq_max = config.n_seq_max
        self._sequences = None
        self._chat_template: Optional[ChatTemplate] = None
        self._eog: Optional[List[int]] = None
        # One call at a time: a second thread waits its turn. Every call that changes the context starts a
        # new epoch; a generator from an older epoch (stale, or another thread's) stops with an error.
        self._lock = threading.RLock()
        self._epoch = 0
        self._single_threaded = _forked_child
        self.n_evaluated = 0  # tokens evaluated since construction (prefix reuse skips some)
        self._input_ids: List[int] = []
        self._last_logits: Optional[np.ndarray] = None
        self._scores_all = np.empty((self._n_ctx, self.n_vocab()), dtype=np.float32) if self.logits_all else None

    @contextlib.contextmanager
    def _use(self, new_epoch: bool = True):
        """Hold this Llama for one call (threads take turns). new_epoch: the call changes the context."""
        if self._engine is None:
            raise ValueError("this Llama is closed")
        with self._lock:
            if _forked_child and not self._single_threaded:
                _warn_forked()
                self._engine.set_n_threads(1)
                self._single_threaded = True
            if new_epoch:
                self._epoch += 1
            yield

    def _stale(self, epoch: int) -> None:
        if self._epoch != epoch:
            raise RuntimeError("this generation was superseded: the same Llama was used by another call since "
                               "(a newer generator, or another thread); start a new one")

    # --- model facts -------------------------------------------------------------------------------
    @property
    def metadata(self) -> dict:
        return dict(self._model.metadata)

    @property
    def hparams(self) -> dict:
        return dict(self._hparams)

    def n_ctx(self) -> int:
        return self._n_ctx

    def model_identity(self) -> dict:
        """What ties a lazy profile to this model file (lazy_profile.model_identity)."""
        return model_identity(self.model_path, self._model)

    def n_vocab(self) -> int:
        return self._hparams["n_vocab"]

    def token_bos(self) -> int:
        return self._vocab.bos

    def token_eos(self) -> int:
        return self._vocab.eos

    def token_is_eog(self, token: int) -> bool:
        """End of generation: EOS, EOT and the other tokens the GGUF marks as ending a turn."""
        return bool(self._vocab.is_eog(int(token)))

    # --- tokens ------------------------------------------------------------------------------------
    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> List[int]:
        if not isinstance(text, (bytes, bytearray)):
            raise TypeError("tokenize() takes bytes; use text.encode('utf-8')")
        if self._vocab is None:
            raise ValueError("this Llama is closed")
        return self._vocab.tokenize(bytes(text), add_bos, special)

    def detokenize(self, tokens: Sequence[int], prev_tokens: Optional[Sequence[int]] = None, special: bool = False) -> bytes:
        if self._vocab is None:
            raise ValueError("this Llama is closed")
        return b"".join(self._vocab.token_to_piece(check_int("token", t), special) for t in tokens)

    # --- context -----------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return len(self._input_ids)

    @property
    def input_ids(self) -> np.ndarray:
        return np.asarray(self._input_ids, dtype=np.int32)

    @property
    def last_logits(self) -> Optional[np.ndarray]:
        """Logits after the last token of the context (what the next token is sampled from); None if empty."""
        return self._last_logits

    @property
    def scores(self) -> np.ndarray:
        """Logits [n_tokens, n_vocab]: every row when logits_all=True, otherwise only the last row is set."""
        if self._scores_all is not None:
            return self._scores_all[: self.n_tokens]
        out = np.zeros((self.n_tokens, self.n_vocab()), dtype=np.float32)
        if self._last_logits is not None and self.n_tokens:
            out[-1] = self._last_logits
        return out

    @property
    def sequences(self):
        """The n_seq_max conversations of this model's cache (sequences.Sequences). From the first use on, they
        are driven only through it: the single-conversation methods refuse."""
        if self._sequences is None:
            self._engine.reset()  # the single conversation, if any, ends here
            self._input_ids, self._last_logits = [], None
            from .sequences import Sequences

            self._sequences = Sequences(self, self._engine)
        return self._sequences

    def _single(self) -> None:
        if self.n_seq_max != 1 or self._sequences is not None:
            raise ValueError(f"this Llama's conversations (n_seq_max={self.n_seq_max}) are driven through "
                             "llm.sequences: use llm.sequences")

    def _checked_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        """Token ids as a flat int64 array, in the vocabulary and fitting the remaining context."""
        self._single()
        raw = np.asarray(tokens)
        if raw.size and raw.dtype.kind not in "iu":
            raise TypeError(f"token ids must be ints, got {raw.dtype} values")
        try:
            arr = np.ascontiguousarray(raw.astype(np.int64).reshape(-1))
        except OverflowError:
            raise ValueError("token ids must be in the vocabulary") from None
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_vocab()):
            raise ValueError(f"token ids must be in 0..{self.n_vocab() - 1}")
        if self.n_tokens + arr.size > self._n_ctx:
            raise ValueError(f"Requested tokens ({self.n_tokens + arr.size}) exceed context window of {self._n_ctx}")
        return arr

    def eval(self, tokens: Sequence[int], probe: Optional[dict] = None) -> Optional[dict]:
        """Append tokens to the context and compute their logits.

        probe={"n_probe": 32, "n_sink": 4, "n_window": 512} also scores every full layer on the last n_probe
        tokens: returns {"mass": [n_layer], "change": [n_layer]} (NaN for lazy layers): the attention
        weight on the sinks + window (SimLayerKV's lazy score) and the relative change of the attention
        output if the layer kept only those keys."""
        with self._use():
            return self._eval(tokens, probe)

    def _eval(self, tokens: Sequence[int], probe: Optional[dict] = None) -> Optional[dict]:
        arr = self._checked_tokens(tokens)
        if arr.size == 0:
            return None
        self._sync()
        if probe is not None:
            n_probe = check_int("n_probe", probe.get("n_probe", DEFAULTS.w_last), 1)
            if n_probe > arr.size:
                raise ValueError(f"cannot probe {n_probe} tokens of an eval of {arr.size}")
            logits = self._engine.eval_probed(arr.astype(np.int32), self.logits_all,
                                              n_sink=check_int("n_sink", probe.get("n_sink", DEFAULTS.n_sink), 0),
                                              n_window=check_int("n_window", probe.get("n_window", DEFAULTS.n_window), 1),
                                              n_probe=n_probe)
        else:
            logits = self._engine.eval(arr.astype(np.int32), self.logits_all)
        self.n_evaluated += int(arr.size)
        if self._scores_all is not None:
            self._scores_all[self.n_tokens : self.n_tokens + arr.size] = logits
        self._last_logits = logits[-1]
        self._input_ids.extend(int(t) for t in arr)
        if probe is not None:
            return {"mass": np.array(self._engine.probe_mass()), "change": np.array(self._engine.probe_change())}
        return None

    def _sync(self) -> None:
        """Re-align the engine with our token list after an interrupted eval (Ctrl-C lands in Python right
        after a native call returns, possibly before the bookkeeping that follows it)."""
        if self._engine.n_past != len(self._input_ids) and not self._engine.truncate(len(self._input_ids)):
            self._reset()

    def nll(self, tokens: Sequence[int], keep: bool = True) -> np.ndarray:
        """Append `tokens` and return the negative log-likelihood of each of them given what precedes it
        (the context must not be empty: the first token is scored from the current last logits).
        keep=False scores them as a what-if: the context is left as it was afterwards."""
        with self._use():
            return self._nll(tokens, keep)

    def _nll(self, tokens: Sequence[int], keep: bool) -> np.ndarray:
        if self._last_logits is None:
            raise ValueError("nll() needs a context: eval() a prompt first")
        arr = self._checked_tokens(tokens)
        if arr.size == 0:
            return np.zeros(0)
        self._sync()
        first = prev = self._last_logits
        # One n_batch chunk at a time (the engine splits a call the same way, so the numbers are the same):
        # all rows of a long call at once would be n x n_vocab floats several times over (4K tokens of
        # Gemma's 262K vocabulary: over 20 GB).
        out = np.empty(arr.size)
        for s in range(0, arr.size, self.n_batch):
            part = arr[s:s + self.n_batch]
            logits = self._engine.eval(part.astype(np.int32), True)  # every row, for this chunk only
            self.n_evaluated += int(part.size)
            rows = np.concatenate([prev[None], logits[:-1]], axis=0)
            out[s:s + part.size] = -log_softmax(rows)[np.arange(part.size), part]
            if keep and self._scores_all is not None:
                self._scores_all[self.n_tokens + s : self.n_tokens + s + part.size] = logits
            prev = logits[-1]
        if not keep:
            if not self._engine.truncate(self.n_tokens):  # a lazy ring overwrote the context: rebuild it
                prefix = list(self._input_ids)
                self._reset()
                self._eval(prefix)
            self._last_logits = first
            return out
        self._last_logits = prev
        self._input_ids.extend(int(t) for t in arr)
        return out

    def set_masked_layers(self, layers: Sequence[int], n_sink: int = DEFAULTS.n_sink, n_window: Optional[int] = None) -> None:
        """Trimming as a what-if (the profiler's "loss" criterion): from now on these layers attend only to
        the first n_sink and the n_window most recent keys, as lazy layers would, but keep their full store,
        so `set_masked_layers([])` undoes it. Full layers only; not with exact prefill or dynamic mode."""
        with self._use():
            self._engine.set_masked_layers(check_layer_list("layers", layers), check_int("n_sink", n_sink, 0),
                                           check_int("n_window", self.n_window if n_window is None else n_window, 1))

    def reset(self) -> None:
        """Forget the context (the KV cache is cleared)."""
        with self._use():
            self._reset()

    def _reset(self) -> None:
        self._single()
        self._engine.reset()
        self._input_ids = []
        self._last_logits = None

    def _rewind(self, n_keep: int) -> bool:
        """Cut the context back to n_keep tokens. False if a lazy ring no longer holds what that needs."""
        if n_keep >= self.n_tokens:
            return True
        if not self._engine.truncate(n_keep):
            return False
        del self._input_ids[n_keep:]
        self._last_logits = self._scores_all[n_keep - 1].copy() if (self._scores_all is not None and n_keep) else None
        return True

    def kv_cache_stats(self) -> dict:
        """total_bytes now, peak_bytes since construction (exact prefill peaks at a full cache), the lazy
        layers now (with exact prefill: those compacted after the prompt), and each layer's store."""
        with self._use(new_epoch=False):
            return {"total_bytes": int(self._engine.kv_total_bytes), "peak_bytes": int(self._engine.peak_kv_bytes),
                    "lazy_layers": list(self._engine.lazy_layers), "layers": self._engine.kv_layers()}

    # --- generation --------------------------------------------------------------------------------
    def generate(
        self,
        tokens: Sequence[int],
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        temp: float = 0.80,
        repeat_penalty: float = 1.0,
        reset: bool = True,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        seed: Optional[int] = None,
        logit_bias: Optional[Dict[int, float]] = None,
    ) -> Iterator[int]:
        """Yield sampled tokens after `tokens`, forever (the caller stops). temp <= 0 is greedy.

        With reset=True the context restarts from `tokens`, reusing the longest common prefix with the
        current context where every store still holds it. logit_bias {token id: bias} is added to the
        logits before sampling (-inf bans a token), as in llama-cpp-python.
        """
        with self._use():
            self._single()
            tokens = [check_int("token", t) for t in tokens]
            sampler = self.make_sampler(temp, top_k, top_p, min_p, repeat_penalty, frequency_penalty,
                                        presence_penalty, seed, logit_bias)
            if reset:
                tokens = self._reuse_prefix(tokens)
            if tokens:
                self._eval(tokens)
            if self._last_logits is None:
                raise ValueError("generate() needs at least one token in the context")
            for t in self._input_ids[-64:]:
                sampler.accept(t)  # repetition penalties look at the prompt too
            epoch = self._epoch
        while True:
            with self._lock:
                self._stale(epoch)
                token = sampler.sample(self._last_logits)
                sampler.accept(token)
            yield token
            with self._lock:
                self._stale(epoch)
                self._eval([token])

    def _logit_bias_pairs(self, logit_bias) -> List[tuple]:
        """(token, bias) pairs for libllama's logit-bias sampler; -inf bans a token."""
        if logit_bias is None:
            return []
        if not isinstance(logit_bias, dict):
            raise TypeError(f"logit_bias must be a dict of token id -> bias, got {type(logit_bias).__name__}")
        pairs = []
        for token, value in logit_bias.items():
            token = int(token)  # the OpenAI API sends ids as strings
            if not 0 <= token < self.n_vocab():
                raise ValueError(f"logit_bias token id {token} is outside the vocabulary (0..{self.n_vocab() - 1})")
            if isinstance(value, (int, float)) and value == float("-inf"):
                pairs.append((token, float("-inf")))
                continue
            pairs.append((token, check_float(f"logit_bias for token {token}", value)))
        return pairs

    def eog_tokens(self) -> List[int]:
        """Every token that ends a generation (EOS, EOT, ...): what `ignore_eos` bans."""
        if self._eog is None:
            self._eog = [t for t in range(self.n_vocab()) if self._vocab.is_eog(t)]
        return list(self._eog)

    def _reuse_prefix(self, tokens: List[int]) -> List[int]:
        """Keep the common prefix of the context and `tokens`; return the tokens still to evaluate."""
        self._sync()
        if self._engine.compacted:
            # The context was compacted after its prompt; a fresh exact evaluation of a new prompt keeps
            # every layer full throughout, so reuse would not give the same result: start over.
            self._reset()
            return tokens
        common = 0
        for a, b in zip(self._input_ids, tokens):
            if a != b:
                break
            common += 1
        if common == len(tokens) and common > 0:
            common -= 1  # re-evaluate the last prompt token to get fresh logits
        if common == 0 or not self._rewind(common):
            self._reset()
            return tokens
        return tokens[common:]

    def make_sampler(self, temp=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, frequency_penalty=0.0,
                     presence_penalty=0.0, seed=None, logit_bias=None):
        """libllama's sampler chain for these settings (temp <= 0: greedy); seed None = this Llama's seed;
        logit_bias {token id: bias} is added to the logits first (-inf bans a token)."""
        seed = self._seed if seed is None else (check_int("seed", seed, 0) & 0xFFFFFFFF)
        temp, top_p, min_p, repeat_penalty, frequency_penalty, presence_penalty = (
            check_float(name, v) for name, v in (("temperature", temp), ("top_p", top_p), ("min_p", min_p),
                                                 ("repeat_penalty", repeat_penalty),
                                                 ("frequency_penalty", frequency_penalty),
                                                 ("presence_penalty", presence_penalty)))
        return _native.Sampler(
            n_vocab=self.n_vocab(), temperature=temp, top_k=check_int("top_k", top_k), top_p=top_p,
            min_p=float(min_p), repeat_penalty=float(repeat_penalty), frequency_penalty=float(frequency_penalty),
            presence_penalty=float(presence_penalty), penalty_last_n=64, seed=seed,
            logit_bias=self._logit_bias_pairs(logit_bias),
        )

    # --- completions and chat (llama-cpp-python's dict shapes) ---------------------------------------
    def create_completion(
        self,
        prompt: Union[str, List[int]],
        max_tokens: Optional[int] = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        stop: Optional[Union[str, List[str]]] = None,
        stream: bool = False,
        seed: Optional[int] = None,
        logprobs: Optional[int] = None,
        echo: bool = False,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: Optional[Dict[int, float]] = None,
    ):
        """Complete `prompt`; a `text_completion` dict, or an iterator of chunks with stream=True."""
        kw = dict(stream=stream, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                  min_p=min_p, repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                  presence_penalty=presence_penalty, stop=stop, seed=seed, logprobs=logprobs, echo=echo,
                  logit_bias=logit_bias)
        if stream:  # each step of the stream holds this Llama in turn
            return create_completion(self, prompt, **kw)
        with self._use(new_epoch=False):  # the whole call: another thread's call waits for it
            return create_completion(self, prompt, **kw)

    __call__ = create_completion

    def create_chat_completion(self, messages: List[dict], **kwargs):
        """Reply to `messages` with the model's chat template; a `chat.completion` dict or chunk iterator.
        Keyword arguments: temperature=0.2, top_p, top_k, min_p, stream, stop, seed, max_tokens,
        presence_penalty, frequency_penalty, repeat_penalty, logprobs, top_logprobs, logit_bias."""
        if kwargs.get("stream"):
            return create_chat_completion(self, messages, **kwargs)
        with self._use(new_epoch=False):
            return create_chat_completion(self, messages, **kwargs)

    def chat_template(self) -> ChatTemplate:
        if self._chat_template is None:
            self._chat_template = ChatTemplate(self)
        return self._chat_template

    def close(self) -> None:
        """Free the model and its cache; any later call raises ValueError."""
        with self._lock:
            self._engine = None
            self._model = None
            self._vocab = None
