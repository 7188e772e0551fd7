"""`simkv` command line: chat, generate, serve, info, profile, rpc-server."""
from __future__ import annotations

import argparse
import codecs
import os
import sys
import time
from typing import List, Optional

from .engine_config import DEFAULTS
from .kv_types import format_kv_types, layer_runs, parse_kv_types


def _layer_list(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 3,5,7, got {text!r}")


def _add_model_options(p: argparse.ArgumentParser, n_ctx_default=DEFAULTS.n_ctx, n_ctx_help: Optional[str] = None) -> None:
    p.add_argument("model", nargs="?", default=None, help="GGUF file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--n-ctx", type=int, default=n_ctx_default,
                   help=n_ctx_help or f"context length in tokens (default {n_ctx_default})")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: half the cores)")
    _add_device_options(p)
    p.add_argument("--lazy-layers", type=_layer_list, default=None, help="lazy layers, e.g. 15,16,17")
    p.add_argument("--n-sink", type=int, default=DEFAULTS.n_sink,
                   help=f"initial tokens a lazy layer keeps (default {DEFAULTS.n_sink})")
    p.add_argument("--n-window", type=int, default=DEFAULTS.n_window,
                   help=f"recent tokens a lazy layer keeps (default {DEFAULTS.n_window})")
    p.add_argument("--type-k", default=DEFAULTS.type_k, help="K cache type of full layers: f16, bf16, q8_0, q4_0")
    p.add_argument("--type-v", default=DEFAULTS.type_v, help="V cache type of full layers: f16, bf16, q8_0, q4_0")
    p.add_argument("--lazy-type", default=DEFAULTS.lazy_type, help=f"K/V type of lazy layers (default {DEFAULTS.lazy_type})")
    p.add_argument("--kv-types", default=None, metavar="LAYERS=K[/V],...",
                   help="layers with their own K/V types, whatever their kind, e.g. 0-3=q8_0,7=q8_0/q4_0")
    p.add_argument("--lazy-residual", type=int, default=DEFAULTS.lazy_residual, metavar="N",
                   help=f"most recent tokens a quantized lazy ring also keeps in f16 (default {DEFAULTS.lazy_residual})")
    p.add_argument("--full-residual", type=int, default=DEFAULTS.full_residual, metavar="N",
                   help=f"most recent tokens a quantized full layer also keeps in f16 (default {DEFAULTS.full_residual})")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--lazy-profile", default="auto", metavar="PATH|auto",
                   help="choose lazy layers from a profile (default auto: MODEL.gguf.simkv.json beside the model, "
                        "else the one shipped with simkv for this model file)")
    p.add_argument("--no-lazy", action="store_true", help="every layer keeps its full cache (no profile)")
    p.add_argument("--lazy-ratio", type=float, default=None, help="with a profile: the laziest fraction of layers")
    p.add_argument("--lazy-threshold", type=float, default=None, help="with a profile: score threshold")
    p.add_argument("--lazy-budget", type=float, default=None, metavar="NATS",
                   help="with a profile: the laziest layers whose summed loss stays within NATS (the default "
                        "selection, budget 0.005)")
    p.add_argument("--kv-fraction", type=float, default=None, metavar="SHARE",
                   help="with a profile: choose every layer's kind and K/V types for the least divergence within "
                        "this share of an f16 cache's bytes, e.g. 0.25")
    p.add_argument("--kv-kld", type=float, default=None, metavar="NATS",
                   help="with a profile: choose every layer's kind and K/V types for the fewest bytes whose "
                        "predicted divergence from the f16 model stays within NATS")
    p.add_argument("--lazy-criterion", default=None, choices=["mass", "change", "loss"],
                   help="profile score to use (default: loss where the profile has it, else mass)")
    p.add_argument("--lazy-prefill", default=DEFAULTS.lazy_prefill, choices=["streaming", "exact"],
                   help="streaming: bounded memory from the first token; exact: full prompt, then trim (paper)")
    p.add_argument("--lazy-mode", default=DEFAULTS.lazy_mode, choices=["static", "dynamic"],
                   help="dynamic: choose lazy layers per prompt by attention mass > --lazy-threshold")


def _add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0,
                   help="offload the last N layers to the GPU and the --rpc servers (-1 = all, with the output "
                        "layer); needs llama-cpp-python built with CUDA or RPC")
    p.add_argument("--main-gpu", type=int, default=0, help="GPU device that takes the offloaded layers")
    p.add_argument("--rpc", default=None, metavar="HOST:PORT,...",
                   help="offload layers to ggml RPC servers too (`simkv rpc-server` on each host; needs "
                        "llama-cpp-python built with -DGGML_RPC=on); give -ngl as for a GPU")
    p.add_argument("--tensor-split", type=_float_list, default=None, metavar="A,B,...",
                   help="shares of the offloaded layers per device, RPC servers first, then the GPU "
                        "(default: by free memory)")


def _float_list(text: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 3,1, got {text!r}")


def _add_ignore_eos(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ignore-eos", action="store_true",
                   help="never end a reply with an end-of-generation token (it runs to -n or the context's end)")


def _model_path(args) -> str:
    """MODEL, or the embedded default model (and say so)."""
    if args.model is not None:
        return args.model
    from . import default_model_path

    path = default_model_path()
    print(f"simkv: using the embedded default model {path}", file=sys.stderr)
    return path


def _devices(args) -> dict:
    """Llama's placement arguments from the command line."""
    return dict(n_gpu_layers=args.n_gpu_layers, main_gpu=args.main_gpu, rpc_servers=args.rpc,
                tensor_split=args.tensor_split)


def _load_model(args, path: str):
    """The native model alone (no engine, no KV cache), placed as the command line says."""
    from . import _native
    from .checks import check_model_file, check_rpc_servers, check_tensor_split

    return _native.load_model(check_model_file(path), n_gpu_layers=args.n_gpu_layers, main_gpu=args.main_gpu,
                              rpc_servers=check_rpc_servers(args.rpc), tensor_split=check_tensor_split(args.tensor_split))


def _open(args, **extra):
    from . import Llama

    path = _model_path(args)
    kw = dict(extra)
    if args.seed is not None:
        kw["seed"] = args.seed
    llm = Llama(path, n_ctx=args.n_ctx, n_threads=args.threads, **_devices(args), n_sink=args.n_sink,
                n_window=args.n_window, type_k=args.type_k, type_v=args.type_v, lazy_type=args.lazy_type,
                kv_types=args.kv_types, lazy_residual=args.lazy_residual, full_residual=args.full_residual, lazy_prefill=args.lazy_prefill, lazy_mode=args.lazy_mode,
                **_lazy_choice(args), **kw)
    print(f"simkv: {_lazy_summary(llm, args)}", file=sys.stderr)
    return llm


def _lazy_choice(args) -> dict:
    """The lazy-layer arguments of Llama from the command line: explicit layers, a profile (by default the
    model's own, if one is found), or none with --no-lazy."""
    if args.no_lazy:
        if args.lazy_layers or args.lazy_mode == "dynamic" or args.kv_fraction is not None or args.kv_kld is not None:
            raise ValueError("--no-lazy contradicts --lazy-layers / --lazy-mode dynamic / --kv-fraction / --kv-kld")
        return {}
    if args.lazy_mode == "dynamic":
        return dict(lazy_threshold=args.lazy_threshold)
    if args.kv_fraction is not None or args.kv_kld is not None:
        return dict(lazy_profile=args.lazy_profile, kv_fraction=args.kv_fraction, kv_kld=args.kv_kld)
    return dict(lazy_layers=args.lazy_layers, lazy_profile=args.lazy_profile, lazy_ratio=args.lazy_ratio,
                lazy_threshold=args.lazy_threshold, lazy_budget=args.lazy_budget, lazy_criterion=args.lazy_criterion)


def _kv_choice(args, path: str, model):
    """The profile's per-layer kinds and types for --kv-fraction / --kv-kld at --n-ctx (kv_choice.py)."""
    from .kv_choice import choose_kv
    from .lazy_profile import load_profile

    prof, _ = load_profile(path, model, args.lazy_profile)
    if prof is None:
        raise ValueError(f"--kv-fraction/--kv-kld need a profile: none for {path}; run `simkv profile` first")
    return choose_kv(prof, model, args.n_ctx, fraction=args.kv_fraction, kld=args.kv_kld, type_k=args.type_k,
                     type_v=args.type_v, lazy_type=args.lazy_type, n_sink=args.n_sink, n_window=args.n_window,
                     lazy_residual=args.lazy_residual, full_residual=args.full_residual, n_seq_max=getattr(args, "parallel", 1))


def _lazy_summary(llm, args) -> str:
    """One line: which layers are lazy and why, the KV memory against a full cache, how to change it."""
    from .memory import kv_bytes

    n_seq = getattr(args, "parallel", 1)
    full = kv_bytes(llm, llm.n_ctx(), type_k=llm.type_k, type_v=llm.type_v, n_seq_max=n_seq)
    kv = llm.kv_cache_stats()["total_bytes"]
    memory = f"KV {kv / 2**20:.1f} MiB vs {full / 2**20:.1f} MiB full at n_ctx {llm.n_ctx()}"
    if llm.lazy_mode == "dynamic":
        return f"lazy layers chosen per prompt (dynamic mode); {memory} before the first prompt"
    if not llm.lazy_layers:
        if args.no_lazy:
            return f"every layer full (--no-lazy); {memory}"
        if args.lazy_profile == "auto" and llm.lazy_profile_path is None and args.lazy_layers is None:
            return (f"no lazy profile for this model: every layer full ({memory}). Make one with "
                    f"`simkv profile {llm.model_path}` to make the laziest layers keep only sinks + a window")
        return f"no layer is lazy; {memory}"
    where = f"from {llm.lazy_profile_path}" if llm.lazy_profile_path else "as given"
    types = ""
    if llm.kv_choice is not None:
        types = f", full layers {format_kv_types(llm.kv_choice.kv_types)} (predicted KLD {llm.kv_choice.predicted_kld:.4f})"
    return (f"{len(llm.lazy_layers)} of {llm.hparams['n_layer']} layers lazy ({','.join(map(str, llm.lazy_layers))}) "
            f"{where}{types}; {memory}; --no-lazy turns them off")


def _eos_ban(llm, args):
    """--ignore-eos (llama.cpp's flag): the end-of-generation tokens can never be sampled."""
    return {t: float("-inf") for t in llm.eog_tokens()} if args.ignore_eos else None


def cmd_generate(args) -> int:
    llm = _open(args)
    prompt = llm.tokenize(args.prompt.encode("utf-8"), add_bos=True, special=True)
    if len(prompt) + args.n_predict > llm.n_ctx():
        raise ValueError(f"prompt ({len(prompt)} tokens) + {args.n_predict} new tokens exceed --n-ctx {llm.n_ctx()}")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # never print half a character
    sys.stdout.write(args.prompt)
    t0 = time.perf_counter()
    n = 0
    for n, token in enumerate(llm.generate(prompt, temp=args.temp, top_k=args.top_k, top_p=args.top_p,
                                           repeat_penalty=args.repeat_penalty, logit_bias=_eos_ban(llm, args)),
                              start=1):
        if llm.token_is_eog(token):
            break
        sys.stdout.write(decoder.decode(llm.detokenize([token])))
        sys.stdout.flush()
        if n >= args.n_predict:
            break
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    dt = time.perf_counter() - t0
    print(f"simkv: {n} tokens in {dt:.2f} s ({n / dt if dt else 0:.1f} tok/s), KV cache "
          f"{llm.kv_cache_stats()['total_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    llm = _open(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    last = {"tokens": 0, "seconds": 0.0}
    print(f"simkv chat: {os.path.basename(llm.model_path)}, n_ctx {llm.n_ctx()}. "
          "Commands: /reset /stats /exit. Ctrl-C stops a reply, Ctrl-D exits.", flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            history = list(system)
            llm.reset()
            print("(history cleared)")
            continue
        if cmd == "/stats":
            _print_stats(llm, last)
            continue
        history.append({"role": "user", "content": line})
        prompt_tokens = len(llm.chat_template().render(history)[0])
        if prompt_tokens >= llm.n_ctx():
            history.pop()
            print(f"simkv: the conversation ({prompt_tokens} tokens) no longer fits --n-ctx {llm.n_ctx()}: /reset")
            continue
        reply = []
        t0 = time.perf_counter()
        try:  # Ctrl-C anywhere in the reply (prompt evaluation included) ends the reply, not the session
            for chunk in llm.create_chat_completion(history, stream=True, temperature=args.temp,
                                                    max_tokens=args.n_predict, logit_bias=_eos_ban(llm, args)):
                piece = chunk["choices"][0]["delta"].get("content", "")
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        print(flush=True)
        last = {"tokens": max(llm.n_tokens - prompt_tokens, 0), "seconds": time.perf_counter() - t0}
        history.append({"role": "assistant", "content": "".join(reply)})


def _print_stats(llm, last) -> None:
    stats = llm.kv_cache_stats()
    by_kind = {}
    for layer in stats["layers"]:
        n, b = by_kind.get(layer["kind"], (0, 0))
        by_kind[layer["kind"]] = (n + 1, b + layer["bytes"])
    rate = last["tokens"] / last["seconds"] if last["seconds"] else 0.0
    print(f"context: {llm.n_tokens} / {llm.n_ctx()} tokens; last reply: {last['tokens']} tokens, {rate:.1f} tok/s")
    for kind, (n, b) in sorted(by_kind.items()):
        print(f"KV {kind:<5}: {n:3d} layers, {b / 2**20:8.1f} MiB")
    print(f"KV total: {stats['total_bytes'] / 2**20:.1f} MiB")


def cmd_info(args) -> int:
    from . import _native
    from .memory import kv_bytes, kv_layers, layers_that_can_be_lazy

    path = _model_path(args)
    model = _load_model(args, path)
    hp = model.hparams
    md = model.metadata
    print(f"model        {md.get('general.name', os.path.basename(path))}  ({path})")
    print(f"architecture {hp['arch']}, {hp['n_layer']} layers, n_embd {hp['n_embd']}, {hp['n_head']} heads "
          f"({hp['n_head_kv']} KV heads, head size {hp['head_dim']}), n_ff {hp['n_ff']}, vocabulary {hp['n_vocab']}")
    print(f"context      trained {hp['n_ctx_train']}, shown for n_ctx {args.n_ctx}")
    print(f"weights      {model.weight_bytes / 2**20:.1f} MiB")
    others = list(_native.gpu_devices()) + [d for d in model.offload_devices if d.startswith("RPC")]
    print(f"devices      CPU{''.join(', ' + d for d in others) or ' only (llama-cpp-python without GPU support)'}")
    print(f"placement    {_placement_summary(model.layer_devices)}")
    # Only layers with a full history can be lazy (a model's sliding-window layers already are rings).
    can_be_lazy = layers_that_can_be_lazy(hp)
    half = can_be_lazy[len(can_be_lazy) // 2:]
    what = "50% lazy" if len(can_be_lazy) == hp["n_layer"] else "50% of global layers lazy"
    rows = [("full f16", dict(type_k="f16")), ("full q8_0", dict(type_k="q8_0")), ("full q4_0", dict(type_k="q4_0")),
            (f"SimLayerKV {what}, f16 + q4_0 ring (window {args.n_window})",
             dict(type_k="f16", lazy_layers=half, n_window=args.n_window)),
            (f"SimLayerKV {what}, q4_0 + q4_0 ring (window {args.n_window})",
             dict(type_k="q4_0", lazy_layers=half, n_window=args.n_window))]
    # The configuration the command line names (lazy layers as given, none otherwise), layer by layer.
    if args.kv_fraction is not None or args.kv_kld is not None:
        kv = _kv_choice(args, path, model)
        args.lazy_layers = kv.lazy_layers
        args.kv_types = format_kv_types({**kv.kv_types, **parse_kv_types(args.kv_types)})
        print(f"choice       {'--kv-fraction ' + str(args.kv_fraction) if args.kv_fraction is not None else '--kv-kld ' + str(args.kv_kld)}"
              f" from the profile: predicted mean KLD {kv.predicted_kld:.4f} from the f16 model (on its calibration text)")
    given = dict(type_k=args.type_k, type_v=args.type_v, lazy_layers=args.lazy_layers or [], lazy_type=args.lazy_type,
                 kv_types=args.kv_types, n_sink=args.n_sink, n_window=args.n_window, lazy_residual=args.lazy_residual, full_residual=args.full_residual)
    rows.append(("as given: " + _config_label(args), given))
    base = kv_bytes(model, args.n_ctx)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'KV cache at n_ctx ' + str(args.n_ctx):<{width}}  {'MiB':>9}  {'vs f16':>7}")
    for label, kw in rows:
        b = kv_bytes(model, args.n_ctx, **kw)
        print(f"{label:<{width}}  {b / 2**20:9.1f}  {b / base:7.2f}")
    print(f"\nlayer by layer, as given ({_config_label(args)}):")
    alike = ((d["layer"], (d["kind"], d["type_k"], d["type_v"], d["bytes"])) for d in kv_layers(model, args.n_ctx, **given))
    for span, (kind, type_k, type_v, nbytes) in layer_runs(alike):
        print(f"  layers {span:<7} {kind:<5} K {type_k:<5} V {type_v:<5} {nbytes / 2**20:8.2f} MiB each")
    return 0


def _config_label(args) -> str:
    """'f16 full layers, lazy 15,16 as q4_0 rings, own types 0-3=q8_0' from the command line's cache options."""
    full = args.type_k if args.type_k == args.type_v else f"K {args.type_k} / V {args.type_v}"
    out = f"{full} full layers"
    if args.lazy_layers:
        out += f", lazy {','.join(map(str, args.lazy_layers))} as {args.lazy_type} rings"
    if args.kv_types:
        out += f", own types {format_kv_types(parse_kv_types(args.kv_types))}"
    return out


def _placement_summary(devices: List[str]) -> str:
    """'layers 0-14 CPU, 15-29 RPC0[127.0.0.1:50052]; output CPU' from each layer's device, then the output's."""
    runs = layer_runs(enumerate(devices[:-1]))
    return f"layers {', '.join(f'{span} {dev}' for span, dev in runs)}; output {devices[-1]}"


def cmd_rpc_server(args) -> int:
    import signal

    from . import _native

    if not _native.rpc_available():
        raise ValueError(f"cannot start an RPC server: {_native.rpc_install_hint()}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"simkv: warning: ggml's RPC protocol has no authentication or encryption: anyone who reaches "
              f"{args.host}:{args.port} can use this machine's memory and compute; bind it only on a trusted network "
              f"(llama.cpp's rpc-server says the same)", file=sys.stderr)
    # ggml serves until the process ends: let SIGINT/SIGTERM end it at once (Python would wait for the call).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threads = args.threads or max(1, (os.cpu_count() or 2) // 2)
    sys.stdout.flush()
    _native.serve_rpc(f"{args.host}:{args.port}", threads, args.cache_dir or "")
    return 1  # ggml returns only when it could not start (it said why)


def cmd_profile(args) -> int:
    from .lazy_profile import DEFAULT_LOSS_BUDGET, default_profile_path
    from .profiler import profile_model

    path = _model_path(args)
    texts = None
    if args.calib:
        texts = []
        for f in args.calib:
            with open(f, encoding="utf-8") as fh:
                texts.append((os.path.basename(f), fh.read()))
    prof = profile_model(path, texts=texts, n_ctx=args.n_ctx, n_sink=args.n_sink, n_window=args.n_window,
                         w_last=args.w_last, max_samples=args.samples, loss_samples=args.loss_samples,
                         loss_tokens=args.loss_tokens, n_threads=args.threads, devices=_devices(args),
                         race=args.race, type_tokens=args.type_tokens, type_samples=args.type_samples)
    crits = ["mass", "change"] + (["loss"] if prof.default_criterion == "loss" else [])
    means = {c: prof.mean(c) for c in crits}
    print(f"{'layer':>5}" + "".join(f"  {c:>7}" for c in crits))
    for il in range(prof.n_layer):
        print(f"{il:5d}" + "".join(f"  {means[c][il]:7.3f}" for c in crits))
    print(f"lazy by the paper's threshold (mass > {prof.default_threshold('mass')}): {prof.select(criterion='mass')}")
    if "loss" in crits:
        # select()'s default for "loss" is the budget (the laziest layers while their summed loss fits), not
        # a per-layer threshold
        print(f"lazy by the default loss budget (summed loss <= {DEFAULT_LOSS_BUDGET} nats): "
              f"{prof.select(criterion='loss')}")
    for c in crits:
        print(f"laziest half by {c + ':':<22}{prof.select(ratio=0.5, criterion=c)}")
    if prof.has_types:
        costs = prof.type_costs()
        print("what each option adds to the all-q8_0 cache's divergence from the f16 model (nats x 1000; "
              "--kv-fraction / --kv-kld choose from these):")
        print(f"{'layer':>5}" + "".join(f"  {o:>9}" for o in costs))
        for il in range(prof.n_layer):
            print(f"{il:5d}" + "".join(f"  {1000 * costs[o][il]:9.2f}" for o in costs))
    out = args.output or default_profile_path(path)
    try:
        prof.save(out)
    except OSError as e:
        raise ValueError(f"cannot write {out} ({e.strerror}): choose another place with -o") from None
    print(f"simkv: profile saved to {out}", file=sys.stderr)
    if args.plot:
        prof.plot(args.plot)
        print(f"simkv: plot saved to {args.plot}", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from .lazy_profile import resolve_lazy_layers
    from .memory import kv_bytes, n_ctx_for_budget

    try:
        from .server import serve
    except ImportError as e:
        raise ValueError(f"simkv serve needs the server extra ({e.name} is missing): pip install \"py_simkv[server]\"") from None
    path = args.model = _model_path(args)
    if args.parallel < 1:
        raise ValueError("--parallel must be >= 1")
    n_ctx = args.n_ctx
    if args.kv_budget is not None:
        # The pool of full-layer cells that fits the budget beside one ring per slot in the lazy layers (the
        # layers Llama will choose: the same profile, read from the same model).
        model = _load_model(args, path)
        choice = _lazy_choice(args)
        if "kv_fraction" in choice:
            # The profile's choice at --n-ctx fixes every layer's kind and types; the budget then sizes the pool.
            kv = _kv_choice(args, path, model)
            args.lazy_layers, args.kv_fraction, args.kv_kld = kv.lazy_layers, None, None
            args.kv_types = {**kv.kv_types, **parse_kv_types(args.kv_types)}
            lazy = kv.lazy_layers
        else:
            lazy = [] if args.lazy_mode == "dynamic" or not choice else resolve_lazy_layers(
                path, model, choice["lazy_layers"], choice["lazy_profile"], choice["lazy_ratio"], choice["lazy_threshold"],
                choice["lazy_criterion"], choice["lazy_budget"])[0] or []
        config = dict(type_k=args.type_k, type_v=args.type_v, kv_types=args.kv_types, lazy_layers=lazy, lazy_type=args.lazy_type, n_sink=args.n_sink,
                      n_window=args.n_window, n_seq_max=args.parallel, lazy_residual=args.lazy_residual, full_residual=args.full_residual)
        n_ctx = n_ctx_for_budget(model, int(args.kv_budget * 2**20), **config)
        if n_ctx == 0:
            raise ValueError(f"--kv-budget {args.kv_budget} MiB does not hold even the lazy rings of {args.parallel} slots")
        del model
    args.n_ctx = n_ctx
    llm = _open(args, n_seq_max=args.parallel)
    stats = llm.kv_cache_stats()
    full = kv_bytes(llm, n_ctx, type_k=args.type_k, type_v=args.type_v, n_seq_max=args.parallel)
    lazy = ("chosen per prompt, per slot (dynamic mode)" if llm.lazy_mode == "dynamic"
            else ",".join(map(str, llm.lazy_layers)) or "none")
    print(f"simkv serve: {args.parallel} slots sharing {n_ctx} KV cells in the full layers; lazy layers {lazy}; "
          f"KV {stats['total_bytes'] / 2**20:.1f} MiB ({stats['total_bytes'] / full:.2f}x a full cache); "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve(llm, host=args.host, port=args.port, api_key=args.api_key, max_queue=args.queue_size,
          model_name=args.model_alias or os.path.basename(llm.model_path))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .profiler import (PROFILE_LOSS_SAMPLES, PROFILE_LOSS_TOKENS, PROFILE_N_CTX, PROFILE_N_WINDOW, PROFILE_SAMPLES,
                           PROFILE_TYPE_TOKENS)

    ap = argparse.ArgumentParser(prog="simkv", description="Local LLM runtime with a per-layer KV cache (SimLayerKV).")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete a prompt, streaming the text")
    _add_model_options(g)
    g.add_argument("-p", "--prompt", required=True, help="prompt text")
    g.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="sample from the K likeliest tokens (0 = all; default 40)")
    g.add_argument("--top-p", type=float, default=0.95,
                   help="sample from the likeliest tokens whose probabilities sum to P (1 = all; default 0.95)")
    g.add_argument("--repeat-penalty", type=float, default=1.0,
                   help="divide the logits of recently generated tokens by this (1 = off; default 1.0)")
    _add_ignore_eos(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _add_model_options(c, n_ctx_default=0, n_ctx_help="context length in tokens (default: the model's trained "
                                                       "context, so a conversation reaches the lengths where lazy "
                                                       "layers matter)")
    c.add_argument("-s", "--system", default=None, help="system prompt")
    c.add_argument("-n", "--n-predict", type=int, default=512, help="most tokens per reply (default 512)")
    c.add_argument("--temp", type=float, default=0.2, help="temperature (default 0.2)")
    _add_ignore_eos(c)
    c.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server, several conversations at once")
    _add_model_options(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: the loopback only)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    sv.add_argument("-np", "--parallel", type=int, default=4,
                    help="slots: conversations decoded at once (default 4); --n-ctx is the full layers' pool of KV "
                         "cells they share")
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route")
    sv.add_argument("--kv-budget", type=float, default=None, metavar="MIB",
                    help="size the KV cache to this many MiB (sets --n-ctx to the pool that fits)")
    sv.add_argument("--queue-size", type=int, default=64, help="requests that may wait for a slot before 503s")
    sv.add_argument("--model-alias", default=None, help="the model's name in the API (default: the file name)")
    sv.set_defaults(func=cmd_serve)

    i = sub.add_parser("info", help="model facts and a KV-memory table by configuration")
    _add_model_options(i)
    i.set_defaults(func=cmd_info)

    r = sub.add_parser("rpc-server", help="serve this machine's CPU (or GPU) to other simkv/llama.cpp hosts over ggml RPC")
    r.add_argument("--host", default="127.0.0.1", help="address to listen on (default: the loopback only; the "
                                                       "protocol has no authentication)")
    r.add_argument("--port", type=int, default=50052, help="TCP port (default 50052, as llama.cpp's rpc-server)")
    r.add_argument("--threads", type=int, default=None, help="CPU threads (default: half the cores)")
    r.add_argument("--cache-dir", default=None, help="cache received weights here, so a reconnecting client "
                                                     "sends only their hashes (ggml's -c)")
    r.set_defaults(func=cmd_rpc_server)

    pr = sub.add_parser("profile", help="score every layer's laziness on calibration text; save the profile")
    pr.add_argument("model", nargs="?", default=None, help="GGUF file (default: embedded SmolLM2-135M-Instruct)")
    pr.add_argument("--calib", nargs="+", default=None, metavar="FILE",
                    help="calibration text files (default: the set shipped with simkv)")
    pr.add_argument("--n-ctx", type=int, default=PROFILE_N_CTX, help=f"tokens per sample (default {PROFILE_N_CTX})")
    pr.add_argument("--n-sink", type=int, default=DEFAULTS.n_sink,
                    help=f"initial tokens counted as sinks (default {DEFAULTS.n_sink})")
    pr.add_argument("--n-window", type=int, default=PROFILE_N_WINDOW,
                    help=f"recent keys counted as the window (default {PROFILE_N_WINDOW})")
    pr.add_argument("--w-last", type=int, default=DEFAULTS.w_last,
                    help=f"queries probed per sample: the last W (default {DEFAULTS.w_last})")
    pr.add_argument("--samples", type=int, default=PROFILE_SAMPLES, help=f"most samples (default {PROFILE_SAMPLES})")
    pr.add_argument("--threads", type=int, default=None, help="CPU threads (default: half the cores)")
    _add_device_options(pr)
    pr.add_argument("--loss-samples", type=int, default=PROFILE_LOSS_SAMPLES, metavar="N",
                    help="score each layer by the loss increase when it alone is trimmed on the first N samples "
                         f"(default {PROFILE_LOSS_SAMPLES}, one per kind of text; 0 = attention only)")
    pr.add_argument("--loss-tokens", type=int, default=None, metavar="N",
                    help=f"tokens at the end of each loss sample that are scored, n_layer + 1 times "
                         f"(default {PROFILE_LOSS_TOKENS}, at most half a sample)")
    pr.add_argument("--type-tokens", type=int, default=PROFILE_TYPE_TOKENS, metavar="N",
                    help="on each loss sample, score every layer's K/V options (q8_0, K q8_0 / V q4_0, q4_0, lazy) "
                         f"one layer at a time on N tokens, for --kv-fraction / --kv-kld (default {PROFILE_TYPE_TOKENS}; "
                         "0 = none)")
    pr.add_argument("--type-samples", type=int, default=None, metavar="N",
                    help="measure the K/V options on the first N loss samples only (default: every loss sample)")
    pr.add_argument("--no-race", dest="race", action="store_false",
                    help="measure every layer's loss on every loss sample (default: after the first sample, only "
                         "the layers still in the running; about 1.5x faster)")
    pr.add_argument("-o", "--output", default=None, help="profile path (default: MODEL.gguf.simkv.json)")
    pr.add_argument("--plot", default=None, metavar="PNG", help="also draw the scores (needs matplotlib)")
    pr.set_defaults(func=cmd_profile)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ConnectionError, RuntimeError) as e:
        print(f"simkv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
