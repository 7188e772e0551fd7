"""`simkv` command line. This first version has `generate` (stream a completion); `chat`, `info` and
`profile` come with their issues."""
from __future__ import annotations

import argparse
import codecs
import sys
import time
from typing import List, Optional


def _layer_list(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 3,5,7, got {text!r}")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="GGUF file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--n-ctx", type=int, default=4096, help="context length in tokens (default 4096)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: half the cores)")
    p.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload (CPU-only for now)")
    p.add_argument("--lazy-layers", type=_layer_list, default=None, help="lazy layers, e.g. 15,16,17")
    p.add_argument("--n-sink", type=int, default=4, help="initial tokens a lazy layer keeps (default 4)")
    p.add_argument("--n-window", type=int, default=1024, help="recent tokens a lazy layer keeps (default 1024)")
    p.add_argument("--type-k", default="f16", help="K cache type of full layers: f16, bf16, q8_0, q4_0")
    p.add_argument("--type-v", default="f16", help="V cache type of full layers (must equal --type-k)")
    p.add_argument("--lazy-type", default="q4_0", help="K/V type of lazy layers (default q4_0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")


def _open(args):
    from . import Llama, default_model_path

    path = args.model
    if path is None:
        path = default_model_path()
        print(f"simkv: using the embedded default model {path}", file=sys.stderr)
    kw = {}
    if args.seed is not None:
        kw["seed"] = args.seed
    return Llama(path, n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                 lazy_layers=args.lazy_layers, n_sink=args.n_sink, n_window=args.n_window, type_k=args.type_k,
                 type_v=args.type_v, lazy_type=args.lazy_type, **kw)


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
                                           repeat_penalty=args.repeat_penalty), start=1):
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="simkv", description="Local LLM runtime with a per-layer KV cache (SimLayerKV).")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete a prompt, streaming the text")
    _add_model_options(g)
    g.add_argument("-p", "--prompt", required=True, help="prompt text")
    g.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.set_defaults(func=cmd_generate)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"simkv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
