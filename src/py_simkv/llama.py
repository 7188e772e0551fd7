"""`Llama`: the user-facing model object, shaped like llama-cpp-python's.

It validates arguments (so that nothing invalid reaches ggml, whose asserts abort the process), owns one
native Engine (model + per-layer KV cache) and one Vocab (libllama's tokenizer), and keeps the tokens and
logits of the current context.
"""
from __future__ import annotations

import collections
import contextlib
import os
import random
import threading
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
from llama_cpp.llama import LlamaState

from . import _native
from .chat import ChatTemplate, chat_handler as chat_handler_for, create_chat_completion
from .checks import (check_float, check_int, check_layer_list, check_model_file, check_rpc_servers, check_str,
                     check_tensor_split)
from .compat import IGNORED_ARGS, cache_type_name, check_ignored, grammar_text, warn_ignored
from .completion import create_completion
from .engine_config import DEFAULTS, engine_config
from .kv_types import parse_kv_types
from .conversation import Conversation
from . import lab
from .kv_choice import choose_kv
from .lazy_profile import family_threshold, load_profile, model_identity, resolve_lazy_layers
from .logprobs import log_softmax
from .prefix import common_prefix
from .tokenizer import Tokenizer

LLAMA_DEFAULT_SEED = 0xFFFFFFFF
# llama-cpp-python's default context (the CLI and the server default to the engine's own, DEFAULTS.n_ctx).
LLAMA_CPP_DEFAULT_N_CTX = 512


# llama.cpp's pooling types (llama.h): what embed() makes of the rows of one input.
POOLING_NONE, POOLING_MEAN, POOLING_CLS, POOLING_LAST = 0, 1, 2, 3
POOLING_NAMES = {POOLING_NONE: "NONE", POOLING_MEAN: "MEAN", POOLING_CLS: "CLS", POOLING_LAST: "LAST"}


def _pooled(rows: np.ndarray, pooling: int, normalize: bool):
    """One input's embedding from its rows [n_tokens, n_embd]: every row (NONE) or one pooled vector."""
    def unit(v):
        norm = np.linalg.norm(v, axis=-1, keepdims=True)
        return v / np.where(norm == 0, 1.0, norm) if normalize else v
    if pooling == POOLING_NONE:
        return unit(rows).tolist()
    pooled = {POOLING_MEAN: lambda: rows.mean(axis=0), POOLING_CLS: lambda: rows[0], POOLING_LAST: lambda: rows[-1]}
    return unit(pooled[pooling]()).tolist()


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
    `n_window` tokens, stored as `lazy_type`; a quantized ring also keeps its `lazy_residual` most recent
    tokens in f16 (they take most of a lazy layer's attention). The other layers keep all `n_ctx` tokens as
    `type_k`/`type_v` (which may differ); a quantized full layer also keeps its `full_residual` most recent
    tokens in f16 (0: none). kv_types gives layers their own K and V types, whatever their kind:
    {layer: "q8_0" or ("q8_0", "q4_0")}, a list with one entry per layer (None: the defaults), or the command
    line's form "0-3=q8_0,7=q8_0/q4_0" (kv_types.py).
    Or let a profile choose them (`simkv profile`): lazy_profile=PATH or "auto" (the MODEL.gguf.simkv.json
    saved beside the model, else the profile shipped with simkv for this model file, if any) with lazy_ratio
    (the laziest fraction of layers), lazy_threshold or lazy_budget on lazy_criterion: "loss" (the default
    where the profile has it: the measured loss increase of trimming each layer alone; by default the
    laziest layers whose summed loss stays within 0.005 nats), "mass" (the paper's attention mass; default
    threshold by model family) or "change". Explicit lazy_layers win over a profile. Without lazy_profile
    no layer is lazy (a drop-in for llama-cpp-python); the CLI uses "auto" by default.
    kv_fraction (a share of the all-f16 cache's bytes at this n_ctx, e.g. 0.25) or kv_kld (a divergence
    budget, nats) let the profile (lazy_profile, "auto" if not given) choose every layer's kind and K/V types
    together: lazy, or full with q8_0, K q8_0 / V q4_0 or q4_0 (kv_choice.py); `llm.kv_choice` says what it
    chose and predicted. Layers in kv_types keep the types given there.

    lazy_prefill="streaming" (default): lazy layers hold only sinks + ring from the first token: memory is
    bounded throughout. "exact": every layer is full while a prompt is evaluated (the paper's procedure,
    peak memory of a full cache); at the prompt's end the lazy layers are compacted into their sink + ring
    store. lazy_mode="dynamic": exact prefill where the lazy layers are chosen per prompt by the probe
    (attention mass on sinks + window of the last 32 prompt tokens > lazy_threshold, default the paper's
    threshold for the model family).

    n_seq_max > 1 holds that many independent conversations in one cache (the full layers' n_ctx cells are
    one pool they share; each has its own sink + ring in the lazy layers). Drive them through
    `llm.sequences` (sequences.py: decoded together, continuous batching); the single-conversation methods
    (eval, generate, completions) refuse then, and once `llm.sequences` was used. Exact prefill works per
    sequence (each prompt is evaluated alone with every layer full, then trimmed into the shared cache), and
    so does dynamic mode: each prompt's probe chooses that sequence's lazy layers, which then keep only its
    sinks + window (in f16, in the full layers' shared pool; the other sequences keep what they chose).
    """

    def __init__(
        self,
        model_path,
        n_ctx: int = LLAMA_CPP_DEFAULT_N_CTX,
        n_batch: int = DEFAULTS.n_batch,
        n_ubatch: int = DEFAULTS.n_ubatch,
        n_threads: Optional[int] = None,
        n_gpu_layers: int = 0,
        main_gpu: int = 0,
        tensor_split: Optional[Sequence[float]] = None,
        rpc_servers: Optional[str] = None,
        use_mmap: bool = True,
        type_k: Union[str, int, None] = None,
        type_v: Union[str, int, None] = None,
        lazy_layers: Optional[Sequence[int]] = None,
        lazy_type: str = DEFAULTS.lazy_type,
        kv_types=None,
        lazy_residual: int = DEFAULTS.lazy_residual,
        full_residual: int = DEFAULTS.full_residual,
        lazy_profile: Optional[str] = None,
        lazy_ratio: Optional[float] = None,
        lazy_threshold: Optional[float] = None,
        lazy_criterion: Optional[str] = None,
        lazy_budget: Optional[float] = None,
        kv_fraction: Optional[float] = None,
        kv_kld: Optional[float] = None,
        lazy_prefill: str = DEFAULTS.lazy_prefill,
        lazy_mode: str = DEFAULTS.lazy_mode,
        n_sink: int = DEFAULTS.n_sink,
        n_window: int = DEFAULTS.n_window,
        logits_all: bool = False,
        seed: int = LLAMA_DEFAULT_SEED,
        verbose: bool = False,
        n_seq_max: int = DEFAULTS.n_seq_max,
        n_threads_batch: Optional[int] = None,
        vocab_only: bool = False,
        last_n_tokens_size: int = 64,
        chat_format: Optional[str] = None,
        chat_handler=None,
        tokenizer=None,
        spm_infill: bool = False,
        embedding: bool = False,
        pooling_type: int = -1,
        **ignored,
    ):
        """llama-cpp-python's other arguments (flash_attn, use_mlock, rope_freq_base, ...) are accepted; those
        asking for something simkv does not do are ignored with one warning each (compat.py says why)."""
        # A Llama pickles as the arguments that build it again, as llama-cpp-python's does (plus its seed).
        self._init_args = {k: v for k, v in locals().items() if k not in ("self", "ignored", "__class__")}
        self._init_args.update(ignored)
        self.verbose = bool(verbose)
        _native.set_logging(self.verbose)
        check_ignored(ignored)
        self.model_path = check_model_file(model_path)
        self.vocab_only = bool(vocab_only)
        self.n_gpu_layers = 0 if self.vocab_only else check_int("n_gpu_layers", n_gpu_layers, -1)
        self.main_gpu = check_int("main_gpu", main_gpu, 0)
        # Remote devices (ggml RPC servers, "host:port,host:port") join the local GPU as offload devices;
        # the offloaded layers are split between them by tensor_split or by their free memory.
        self.rpc_servers = check_rpc_servers(rpc_servers)
        self.tensor_split = check_tensor_split(tensor_split)
        if self.n_gpu_layers != 0 and not gpu_devices() and not self.rpc_servers:
            _warn_no_gpu()
        if self.rpc_servers and self.n_gpu_layers == 0:
            warnings.warn("rpc_servers given with n_gpu_layers=0: no layer goes to them (offload with n_gpu_layers, "
                          "-1 = all, as for a GPU)", RuntimeWarning, stacklevel=2)
        self.logits_all = bool(logits_all)
        # llama-cpp-python's seed: 0 means the default; each completion without a seed draws the next one
        # from it (set_seed, _call_seed), so a fresh Llama with the same seed repeats its outputs call by call.
        self._seed = check_int("seed", seed) or LLAMA_DEFAULT_SEED
        self.last_n_tokens_size = check_int("last_n_tokens_size", last_n_tokens_size, 0)
        if n_threads_batch is not None and n_threads_batch != n_threads:
            check_int("n_threads_batch", n_threads_batch, 1)
            warn_ignored("n_threads_batch", "simkv evaluates prompts and decodes with the same n_threads")
        n_ctx = check_int("n_ctx", n_ctx)
        if n_ctx < 0:
            raise ValueError(f"n_ctx must be >= 1, or 0 for the model's trained context; got {n_ctx}")
        # Types here; values are checked natively when the config is assigned or the engine is built.
        settings = dict(n_batch=check_int("n_batch", n_batch), n_ubatch=check_int("n_ubatch", n_ubatch),
                        n_sink=check_int("n_sink", n_sink), n_window=check_int("n_window", n_window),
                        lazy_residual=check_int("lazy_residual", lazy_residual),
                        full_residual=check_int("full_residual", full_residual),
                        type_k=cache_type_name("type_k", type_k, DEFAULTS.type_k),
                        type_v=cache_type_name("type_v", type_v, DEFAULTS.type_v),
                        lazy_type=check_str("lazy_type", lazy_type, "q4_0"),
                        lazy_prefill=check_str("lazy_prefill", lazy_prefill, "exact"),
                        lazy_mode=check_str("lazy_mode", lazy_mode, "dynamic"))
        settings["layer_types"] = parse_kv_types(kv_types)
        if n_threads is not None:
            settings["n_threads"] = check_int("n_threads", n_threads)
        if _forked_child:
            _warn_forked()
            settings["n_threads"] = 1
        settings["n_seq_max"] = check_int("n_seq_max", n_seq_max)

        if self.vocab_only:  # the tokenizer and the GGUF's metadata; no weights are loaded
            self._model = None
            self._vocab = _native.Vocab(self.model_path)
            md = self._vocab.metadata
            arch = md.get("general.architecture", "")
            self._hparams = {"n_vocab": self._vocab.n_vocab, "n_ctx_train": int(md.get(f"{arch}.context_length", 0)),
                             "n_embd": int(md.get(f"{arch}.embedding_length", 0))}
        else:  # the model first: its errors (architecture, tensors) name what is wrong before the tokenizer's
            self._model = _native.load_model(self.model_path, n_gpu_layers=self.n_gpu_layers, main_gpu=self.main_gpu,
                                             use_mmap=bool(use_mmap), rpc_servers=self.rpc_servers,
                                             tensor_split=self.tensor_split)
            self._hparams = self._model.hparams
            self._vocab = _native.Vocab(self.model_path)
            if self._vocab.n_vocab != self._hparams["n_vocab"]:
                raise ValueError(f"tokenizer has {self._vocab.n_vocab} tokens but the model's embedding has "
                                 f"{self._hparams['n_vocab']}")
        settings["n_ctx"] = n_ctx or int(self._hparams["n_ctx_train"]) or LLAMA_CPP_DEFAULT_N_CTX
        settings["n_batch"] = min(settings["n_ctx"], settings["n_batch"])
        settings["n_ubatch"] = min(settings["n_batch"], settings["n_ubatch"])
        config = engine_config(**settings)
        if self.vocab_only:
            pass
        elif config.lazy_mode == "dynamic":
            if lazy_layers is not None or lazy_profile is not None or lazy_ratio is not None or lazy_budget is not None \
                    or kv_fraction is not None or kv_kld is not None:
                raise ValueError("lazy_mode='dynamic' chooses lazy layers per prompt: give only lazy_threshold")
            config.dynamic_threshold = (family_threshold({"name": self._model.metadata.get("general.name", "")})
                                        if lazy_threshold is None else check_float("lazy_threshold", lazy_threshold))
        elif kv_fraction is not None or kv_kld is not None:
            if lazy_layers is not None or lazy_ratio is not None or lazy_threshold is not None or lazy_budget is not None:
                raise ValueError("kv_fraction/kv_kld choose the lazy layers too: do not give lazy_layers, lazy_ratio, "
                                 "lazy_threshold or lazy_budget with them")
            prof, self.lazy_profile_path = load_profile(self.model_path, self._model, lazy_profile or "auto")
            if prof is None:
                raise FileNotFoundError(f"kv_fraction/kv_kld need a profile: none beside {self.model_path} and none "
                                        "shipped for it; run `simkv profile` first")
            self.kv_choice = choose_kv(prof, self._model, config.n_ctx, fraction=kv_fraction, kld=kv_kld,
                                       n_sink=config.n_sink, n_window=config.n_window, lazy_type=config.lazy_type,
                                       type_k=config.type_k, type_v=config.type_v, n_ubatch=config.n_ubatch,
                                       n_seq_max=config.n_seq_max, lazy_residual=config.lazy_residual,
                                       full_residual=config.full_residual)
            config.lazy_layers = self.kv_choice.lazy_layers
            config.layer_types = {**self.kv_choice.kv_types, **settings["layer_types"]}  # kv_types given win
        else:
            lazy_layers, self.lazy_profile_path = resolve_lazy_layers(
                self.model_path, self._model, lazy_layers, lazy_profile, lazy_ratio, lazy_threshold, lazy_criterion,
                lazy_budget)
            if lazy_layers is not None:
                config.lazy_layers = check_layer_list("lazy_layers", lazy_layers)
        self.lazy_profile_path = getattr(self, "lazy_profile_path", None)
        self.kv_choice = getattr(self, "kv_choice", None)
        self.tokenizer_ = tokenizer if tokenizer is not None else Tokenizer(self._vocab)
        self.spm_infill = bool(spm_infill)
        self.embedding = bool(embedding)
        self._pooling = self._pooling_type(check_int("pooling_type", pooling_type))
        self.chat_format = check_str("chat_format", chat_format, "chatml") if chat_format is not None else None
        self.chat_handler = chat_handler
        if self.chat_format is not None:
            chat_handler_for(self)  # an unknown format is refused here, with the known ones
        # vocab_only: the tokenizer and the model's facts, no KV cache and no evaluation.
        self._engine = None if self.vocab_only else _native.Engine(self._model, config)
        # What the engine runs with (validated: n_ubatch <= n_batch, windows no larger than the context).
        config = config if self.vocab_only else self._engine.config
        self._n_ctx, self.n_batch, self.n_ubatch, self.n_threads = config.n_ctx, config.n_batch, config.n_ubatch, config.n_threads
        self.type_k, self.type_v, self.lazy_type = config.type_k, config.type_v, config.lazy_type
        self.kv_types = dict(config.layer_types)  # {layer: (K type, V type)}
        self.n_sink, self.n_window, self.lazy_residual = config.n_sink, config.n_window, config.lazy_residual
        self.full_residual = config.full_residual
        self.lazy_prefill, self.lazy_mode = config.lazy_prefill, config.lazy_mode
        self.lazy_layers = sorted(config.lazy_layers)
        self.n_seq_max = config.n_seq_max
        self._closed = False
        self.cache = None  # set_cache
        # llama-cpp-python's flags (its cache tests read them): simkv runs transformer architectures only.
        self._is_recurrent = self._is_hybrid = False
        self._sequences = None
        self._chat_template: Optional[ChatTemplate] = None
        self._eog: Optional[List[int]] = None
        # One call at a time: a second thread waits its turn. Every call that changes the context starts a
        # new epoch; a generator from an older epoch (stale, or another thread's) stops with an error.
        self._lock = threading.RLock()
        self._epoch = 0
        self._single_threaded = _forked_child
        self.n_evaluated = 0  # tokens evaluated since construction (prefix reuse skips some)
        self._scores_all = np.zeros((self._n_ctx, self.n_vocab()), dtype=np.float32) if self.logits_all else None
        self._conv = Conversation(self._engine, 0, owns_engine=True, scores=self._scores_all)  # the one conversation

    @contextlib.contextmanager
    def _use(self, new_epoch: bool = True):
        """Hold this Llama for one call (threads take turns). new_epoch: the call changes the context."""
        self._check_open()
        if self.vocab_only:
            raise ValueError("this Llama was created with vocab_only=True: it tokenizes, it does not evaluate")
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
        return dict(self._model.metadata if self._model is not None else self._vocab.metadata)

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

    def add_bos_token(self) -> bool:
        return bool(self._vocab.add_bos)

    def fim_tokens(self) -> tuple:
        """(prefix, suffix, middle) fill-in-the-middle token ids; -1 where the model has none."""
        return self._vocab.fim_pre, self._vocab.fim_suf, self._vocab.fim_mid

    def token_nl(self) -> int:
        return self._vocab.nl

    def n_embd(self) -> int:
        return self._hparams["n_embd"]

    @staticmethod
    def logits_to_logprobs(logits, axis: int = -1) -> np.ndarray:
        """log softmax as float32 (llama-cpp-python's static helper)."""
        return log_softmax(np.asarray(logits, dtype=np.float32), axis=axis).astype(np.float32)

    @staticmethod
    def longest_token_prefix(a: Sequence[int], b: Sequence[int]) -> int:
        return common_prefix(a, b)

    # --- pickling: the arguments that build this Llama again, with its current seed --------------------
    def __getstate__(self) -> dict:
        return dict(self._init_args, seed=self._seed)

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    # --- tokens ------------------------------------------------------------------------------------
    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> List[int]:
        self._check_open()
        return self.tokenizer_.tokenize(text, add_bos, special)

    def detokenize(self, tokens: Sequence[int], prev_tokens: Optional[Sequence[int]] = None, special: bool = False) -> bytes:
        self._check_open()
        return self.tokenizer_.detokenize(tokens, prev_tokens, special)

    def tokenizer(self) -> Tokenizer:
        """llama-cpp-python's tokenizer interface (encode/decode, tokenize/detokenize) on this model's vocabulary."""
        self._check_open()
        return Tokenizer(self._vocab)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this Llama is closed")

    # --- context -----------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return len(self._conv.tokens)

    @property
    def input_ids(self) -> np.ndarray:
        """The context's token ids in an n_ctx-long buffer, as llama-cpp-python shapes it: the first n_tokens
        are the context (a copy: writing to it changes nothing)."""
        out = np.zeros(self._n_ctx, dtype=np.intc)
        out[: self.n_tokens] = self._conv.tokens
        return out

    def _context_ids(self) -> np.ndarray:
        """The context's token ids alone (what processors and stopping criteria get, per token: no n_ctx
        buffer is built for them)."""
        return np.asarray(self._conv.tokens, dtype=np.intc)

    @property
    def _scores(self) -> np.ndarray:
        """The rows of `scores` that belong to the context (llama-cpp-python's name)."""
        return self.scores[: self.n_tokens]

    @property
    def eval_tokens(self) -> collections.deque:
        return collections.deque(self._conv.tokens, maxlen=self._n_ctx)

    @property
    def eval_logits(self) -> collections.deque:
        return collections.deque(self._scores.tolist(), maxlen=self._n_ctx if self.logits_all else 1)

    @property
    def last_logits(self) -> Optional[np.ndarray]:
        """Logits after the last token of the context (what the next token is sampled from); None if empty."""
        return self._conv.last_logits

    @property
    def scores(self) -> np.ndarray:
        """Logits. With logits_all=True: llama-cpp-python's [n_ctx, n_vocab] buffer, whose first n_tokens rows
        are the context's (row i: after token i). Otherwise [n_tokens, n_vocab] with only the last row set
        (llama-cpp-python leaves its rows unset then)."""
        if self._scores_all is not None:
            return self._scores_all
        out = np.zeros((self.n_tokens, self.n_vocab()), dtype=np.float32)
        if self._conv.last_logits is not None and self.n_tokens:
            out[-1] = self._conv.last_logits
        return out

    @property
    def sequences(self):
        """The n_seq_max conversations of this model's cache (sequences.Sequences). From the first use on, they
        are driven only through it: the single-conversation methods refuse."""
        self._check_open()
        if self._sequences is None:
            self._engine.reset()  # the single conversation, if any, ends here
            self._conv.tokens, self._conv.last_logits = [], None
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
            logits = _native.lab.eval_probed(self._engine, arr.astype(np.int32), self.logits_all,
                                             **lab.probe_args(probe, arr.size))
        else:
            logits = self._engine.eval(arr.astype(np.int32), self.logits_all)
        self.n_evaluated += int(arr.size)
        if self._scores_all is not None:
            self._scores_all[self.n_tokens : self.n_tokens + arr.size] = logits
        self._conv.last_logits = logits[-1]
        self._conv.tokens.extend(int(t) for t in arr)
        return None if probe is None else lab.probe_scores(self)

    def _sync(self) -> None:
        self._conv.sync()

    def nll(self, tokens: Sequence[int], keep: bool = True) -> np.ndarray:
        """Append `tokens` and return the negative log-likelihood of each of them given what precedes it
        (the context must not be empty: the first token is scored from the current last logits).
        keep=False scores them as a what-if: the context is left as it was afterwards."""
        with self._use():
            return self._nll(tokens, keep)

    def _nll(self, tokens: Sequence[int], keep: bool) -> np.ndarray:
        if self._conv.last_logits is None:
            raise ValueError("nll() needs a context: eval() a prompt first")
        arr = self._checked_tokens(tokens)
        if arr.size == 0:
            return np.zeros(0)
        self._sync()
        first = prev = self._conv.last_logits
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
            self._forget_what_if(first)
            return out
        self._conv.last_logits = prev
        self._conv.tokens.extend(int(t) for t in arr)
        return out

    def _forget_what_if(self, last_logits: np.ndarray) -> None:
        """Drop what a what-if evaluated after the context, which keeps its last logits."""
        if not self._engine.truncate(self.n_tokens):  # a lazy ring overwrote the context: rebuild it
            prefix = list(self._conv.tokens)
            self._reset()
            self._eval(prefix)
        self._conv.last_logits = last_logits

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
        self._conv.clear()

    def _rewind(self, n_keep: int) -> bool:
        """Cut the context back to n_keep tokens. False if a lazy ring no longer holds what that needs."""
        return self._conv.rewind(n_keep)

    # --- embeddings -----------------------------------------------------------------------------------
    def _pooling_type(self, requested: int) -> int:
        """llama.cpp's pooling type: -1 is the model's own (its GGUF's, else none for a causal LM)."""
        if requested == -1:
            metadata = self.metadata
            requested = int(metadata.get(f"{metadata.get('general.architecture', '')}.pooling_type", POOLING_NONE))
        if requested not in POOLING_NAMES:
            raise ValueError(f"pooling_type must be -1 (the model's) or one of {POOLING_NAMES} (RANK needs a "
                             f"classifier head, which simkv's architectures do not have); got {requested}")
        return requested

    def pooling_type(self) -> int:
        return self._pooling

    def embed(self, input: Union[str, List[str]], normalize: bool = False, truncate: bool = True,
              return_count: bool = False):
        """Embeddings of each input (llama-cpp-python's embed): the model's last hidden state after its final
        norm, per token with pooling NONE (the default for a causal LM), else pooled (MEAN, CLS, LAST) as
        llama.cpp pools. normalize: to unit length. truncate: to n_batch tokens (else longer is an error).
        The context is empty afterwards."""
        if not self.embedding:
            raise RuntimeError("Llama model must be created with embedding=True to call this method")
        texts = [input] if isinstance(input, str) else list(input)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("embed() takes a string or a list of strings")
        data, total = [], 0
        with self._use():
            self._single()
            try:
                self._engine.set_embeddings(True)
                for text in texts:
                    tokens = self.tokenize(text.encode("utf-8"))
                    if truncate:
                        tokens = tokens[: self.n_batch]
                    elif len(tokens) > self.n_batch:
                        raise ValueError(f"Requested tokens ({len(tokens)}) exceed batch size of {self.n_batch}")
                    if not tokens:
                        raise ValueError("cannot embed an empty input")
                    total += len(tokens)
                    self._reset()
                    rows = self._engine.eval(np.asarray(tokens, dtype=np.int32), True).astype(np.float64)
                    self.n_evaluated += len(tokens)
                    data.append(_pooled(rows, self._pooling, normalize))
            finally:
                self._engine.set_embeddings(False)
                self._reset()
        output = data[0] if isinstance(input, str) else data
        return (output, total) if return_count else output

    def create_embedding(self, input: Union[str, List[str]], model: Optional[str] = None) -> dict:
        """llama-cpp-python's (OpenAI's) embedding response."""
        embeds, total = self.embed(input if isinstance(input, list) else [input], return_count=True)
        return {"object": "list", "model": model if model is not None else self.model_path,
                "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(embeds)],
                "usage": {"prompt_tokens": total, "total_tokens": total}}

    # --- state: save, load, and llama-cpp-python's prompt caches --------------------------------------
    def save_state(self) -> LlamaState:
        """The context as llama-cpp-python's LlamaState: every layer's store as it is now (full stores and
        lazy rings, quantized or not, and which layers exact prefill made lazy), the tokens, the logits and
        the seed. load_state() continues from it bit-identically, on this Llama or another with the same
        model and cache settings."""
        with self._use(new_epoch=False):
            self._single()
            self._sync()
            blob = self._engine.save_state()
            if self._scores_all is not None:
                scores = self._scores_all[: self.n_tokens].copy()
            elif self._conv.last_logits is not None:
                scores = self._conv.last_logits[None].copy()  # only the last row is kept without logits_all
            else:
                scores = np.zeros((0, self.n_vocab()), dtype=np.float32)
            return LlamaState(input_ids=self.input_ids, scores=scores, n_tokens=self.n_tokens, llama_state=blob,
                              llama_state_size=len(blob), seed=self._seed)

    def load_state(self, state: LlamaState) -> None:
        """Continue from a save_state(). A state of another model or other cache settings is refused with
        ValueError, and the context is then empty."""
        with self._use():
            self._single()
            n = check_int("n_tokens", state.n_tokens, 0)
            ids = np.asarray(state.input_ids)[:n]
            if ids.size != n or (n and (ids.min() < 0 or ids.max() >= self.n_vocab())) or n > self._n_ctx:
                raise ValueError("the state's tokens do not fit this Llama (vocabulary or n_ctx)")
            scores = np.asarray(state.scores, dtype=np.float32)
            if n and (scores.ndim != 2 or scores.shape[1] != self.n_vocab() or scores.shape[0] not in (1, n)):
                raise ValueError("the state's logits do not have this model's shape")
            self._conv.tokens, self._conv.last_logits = [], None
            self._engine.load_state(bytes(state.llama_state))
            if self._engine.n_past != n:
                self._reset()
                raise ValueError(f"the state's KV cache holds {self._engine.n_past} tokens, its token list {n}")
            self._conv.tokens = [int(t) for t in ids]
            self._conv.last_logits = scores[-1].copy() if n else None
            if self._scores_all is not None:
                self._scores_all[:] = 0
                self._scores_all[n - scores.shape[0]: n] = scores if n else 0
            self._seed = state.seed

    def set_cache(self, cache) -> None:
        """llama-cpp-python's prompt cache (llama_cpp.LlamaRAMCache, LlamaDiskCache or None): completions load
        the cached state that shares the longest prefix with their prompt when it beats the current context,
        and save their context afterwards."""
        self.cache = cache

    def _load_cached_prefix(self, tokens: Sequence[int]) -> None:
        if self.cache is None:
            return
        try:
            item = self.cache[tokens]
        except KeyError:
            return
        cached = self.longest_token_prefix(np.asarray(item.input_ids)[: item.n_tokens].tolist(), tokens)
        if cached > self.longest_token_prefix(self._conv.tokens, tokens):
            self.load_state(item)

    def _save_to_cache(self) -> None:
        if self.cache is not None and self.n_tokens:
            self.cache[list(self._conv.tokens)] = self.save_state()

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
        typical_p: float = 1.0,
        temp: float = 0.80,
        repeat_penalty: float = 1.0,
        reset: bool = True,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        penalize_nl: bool = True,
        logits_processor=None,
        stopping_criteria=None,
        grammar=None,
        seed: Optional[int] = None,
        logit_bias: Optional[Dict[int, float]] = None,
    ) -> Iterator[int]:
        """Yield sampled tokens after `tokens` until the caller stops or `stopping_criteria(input_ids, logits)`
        says so. temp 0 is greedy, temp < 0 draws from the whole distribution (as llama-cpp-python).

        With reset=True the context restarts from `tokens`, reusing the longest common prefix with the
        current context where every store still holds it. logit_bias {token id: bias} is added to the
        logits before sampling (-inf bans a token); logits_processor(input_ids, logits) -> logits runs
        first; grammar (a llama_cpp.LlamaGrammar or GBNF text) constrains what may be sampled.
        """
        if penalize_nl is not True:
            warn_ignored("penalize_nl", IGNORED_ARGS["penalize_nl"][1])
        with self._use():
            self._single()
            tokens = [check_int("token", t) for t in tokens]
            sampler = self.make_sampler(temp, top_k, top_p, min_p, repeat_penalty, frequency_penalty,
                                        presence_penalty, seed, logit_bias, typical_p=typical_p, tfs_z=tfs_z,
                                        mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau,
                                        mirostat_eta=mirostat_eta, grammar=grammar)
            if reset:
                tokens = self._reuse_prefix(tokens)
            if tokens:
                self._eval(tokens)
            if self._conv.last_logits is None:
                raise ValueError("generate() needs at least one token in the context")
            sampler.accept_context(self._conv.tokens)  # repetition penalties look at the prompt too
            epoch = self._epoch
        while True:
            with self._lock:
                self._stale(epoch)
                logits = self._conv.last_logits
                token = sampler.sample(self._processed(logits_processor, logits))
                if stopping_criteria is not None and stopping_criteria(self._context_ids(), logits):
                    return
                sampler.accept(token)
            yield token
            with self._lock:
                self._stale(epoch)
                self._eval([token])

    def _processed(self, logits_processor, logits: np.ndarray) -> np.ndarray:
        """logits after llama-cpp-python's logits processors (callables (input_ids, scores) -> scores)."""
        if logits_processor is None:
            return logits
        out = logits_processor(self._context_ids(), logits.copy())
        return np.ascontiguousarray(out, dtype=np.float32)

    def sample(self, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
               temp: float = 0.80, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
               presence_penalty: float = 0.0, tfs_z: float = 1.0, mirostat_mode: int = 0, mirostat_eta: float = 0.1,
               mirostat_tau: float = 5.0, penalize_nl: bool = True, logits_processor=None, grammar=None,
               idx: Optional[int] = None) -> int:
        """A token drawn from the logits after the context, or after token idx (a row of `scores`: any with
        logits_all, else the last, idx = n_tokens - 1), with this Llama's seed; the context is not changed
        (as llama-cpp-python's sample)."""
        with self._use(new_epoch=False):
            self._single()
            if self.n_tokens == 0:
                raise ValueError("sample() needs a context: eval() a prompt first")
            last = self.n_tokens - 1
            if idx is None or idx == last:
                idx, logits = last, self._conv.last_logits
            else:
                idx = check_int("idx", idx, 0)
                if self._scores_all is None or idx > last:
                    raise ValueError(f"sample(idx={idx}) needs logits_all=True and 0 <= idx < n_tokens ({self.n_tokens})")
                logits = self._scores_all[idx]
            sampler = self.make_sampler(temp, top_k, top_p, min_p, repeat_penalty, frequency_penalty,
                                        presence_penalty, None, None, typical_p=typical_p, tfs_z=tfs_z,
                                        mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau,
                                        mirostat_eta=mirostat_eta, grammar=grammar)
            sampler.accept_context(self._conv.tokens[: idx + 1])
            return int(sampler.sample(self._processed(logits_processor, logits)))

    def set_seed(self, seed: int) -> None:
        """The seed of the next sampling call (and, through _call_seed, of those after it)."""
        self._seed = check_int("seed", seed)

    def _call_seed(self, seed: Optional[int]) -> int:
        """llama-cpp-python's seed for one completion: a given seed becomes this Llama's; without one, the
        next seed is drawn from the current one. A fresh Llama with the same seed thus repeats its outputs
        call by call, and two calls in a row differ."""
        self._seed = check_int("seed", seed) if seed is not None else random.Random(self._seed).randint(0, 2**32)
        return self._seed & 0xFFFFFFFF

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
        return self._conv.prepare(tokens)

    def make_sampler(self, temp=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, frequency_penalty=0.0,
                     presence_penalty=0.0, seed=None, logit_bias=None, typical_p=1.0, tfs_z=1.0, mirostat_mode=0,
                     mirostat_tau=5.0, mirostat_eta=0.1, grammar=None):
        """libllama's samplers for these settings (native/sampler.h: their order and meaning); seed None = this
        Llama's seed; logit_bias {token id: bias} is added to the logits first (-inf bans a token); grammar:
        a llama_cpp.LlamaGrammar or GBNF text."""
        seed = (self._seed if seed is None else check_int("seed", seed)) & 0xFFFFFFFF
        if tfs_z != 1.0:
            warn_ignored("tfs_z", IGNORED_ARGS["tfs_z"][1])
        temp, top_p, min_p, typical_p, repeat_penalty, frequency_penalty, presence_penalty, tau, eta = (
            check_float(name, v) for name, v in (("temperature", temp), ("top_p", top_p), ("min_p", min_p),
                                                 ("typical_p", typical_p), ("repeat_penalty", repeat_penalty),
                                                 ("frequency_penalty", frequency_penalty),
                                                 ("presence_penalty", presence_penalty),
                                                 ("mirostat_tau", mirostat_tau), ("mirostat_eta", mirostat_eta)))
        text, root = grammar_text(grammar)
        return _native.Sampler(
            self._vocab, temperature=temp, top_k=check_int("top_k", top_k), top_p=top_p, min_p=min_p,
            typical_p=typical_p, repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, penalty_last_n=self.last_n_tokens_size,
            mirostat=check_int("mirostat_mode", mirostat_mode), mirostat_tau=tau, mirostat_eta=eta, seed=seed,
            logit_bias=self._logit_bias_pairs(logit_bias), grammar=text, grammar_root=root,
        )

    # --- completions and chat (llama-cpp-python's dict shapes) ---------------------------------------
    def create_completion(
        self,
        prompt: Union[str, List[int]],
        suffix: Optional[str] = None,
        max_tokens: Optional[int] = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: Optional[int] = None,
        echo: bool = False,
        stop: Optional[Union[str, List[str]]] = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: Optional[int] = None,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: Optional[str] = None,
        stopping_criteria=None,
        logits_processor=None,
        grammar=None,
        logit_bias: Optional[Dict[int, float]] = None,
    ):
        """Complete `prompt` (llama-cpp-python's arguments, in its order); a `text_completion` dict, or an
        iterator of chunks with stream=True. Without a seed, each call draws the next seed from this Llama's
        (as llama-cpp-python: the same fresh Llama gives the same outputs call by call)."""
        kw = dict(suffix=suffix, max_tokens=max_tokens, temperature=temperature, top_p=top_p, min_p=min_p,
                  typical_p=typical_p, logprobs=logprobs, echo=echo, stop=stop, frequency_penalty=frequency_penalty,
                  presence_penalty=presence_penalty, repeat_penalty=repeat_penalty, top_k=top_k, tfs_z=tfs_z,
                  mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, model=model,
                  stopping_criteria=stopping_criteria, logits_processor=logits_processor, grammar=grammar,
                  logit_bias=logit_bias)
        if stream:  # each step of the stream holds this Llama in turn
            return create_completion(self, prompt, stream=True, seed=self._call_seed(seed), **kw)
        with self._use(new_epoch=False):  # the whole call: another thread's call waits for it
            return create_completion(self, prompt, seed=self._call_seed(seed), **kw)

    __call__ = create_completion

    def create_chat_completion(
        self,
        messages: List[dict],
        functions: Optional[List[dict]] = None,
        function_call=None,
        tools: Optional[List[dict]] = None,
        tool_choice=None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        stream: bool = False,
        stop: Optional[Union[str, List[str]]] = None,
        seed: Optional[int] = None,
        response_format: Optional[dict] = None,
        max_tokens: Optional[int] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: Optional[str] = None,
        logits_processor=None,
        grammar=None,
        logit_bias: Optional[Dict[int, float]] = None,
        logprobs: Optional[bool] = None,
        top_logprobs: Optional[int] = None,
    ):
        """Reply to `messages` (llama-cpp-python's arguments) through its chat handler for this model
        (chat.py): the model's template, or chat_format / chat_handler; a `chat.completion` dict or chunk
        iterator. response_format {"type": "json_object"[, "schema": ...]} and tools / tool_choice constrain
        the reply with a grammar, as in llama-cpp-python."""
        kw = dict(functions=functions, function_call=function_call, tools=tools, tool_choice=tool_choice,
                  temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p, stream=stream,
                  stop=stop, seed=seed, response_format=response_format, max_tokens=max_tokens,
                  presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                  repeat_penalty=repeat_penalty, tfs_z=tfs_z, mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau,
                  mirostat_eta=mirostat_eta, model=model, logits_processor=logits_processor, grammar=grammar,
                  logit_bias=logit_bias, logprobs=logprobs, top_logprobs=top_logprobs)
        if stream:
            return create_chat_completion(self, messages, **kw)
        with self._use(new_epoch=False):
            return create_chat_completion(self, messages, **kw)

    def chat_template(self) -> ChatTemplate:
        if self._chat_template is None:
            self._chat_template = ChatTemplate(self)
        return self._chat_template

    def close(self) -> None:
        """Free the model and its cache; any later call raises ValueError."""
        with self._lock:
            self._closed = True
            self._engine = None
            self._conv = Conversation(None, 0)  # the conversations hold the engine too
            self._sequences = None
            self._model = None
            self._vocab = None
