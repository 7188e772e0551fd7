"""How fast `simkv profile` is, and whether a faster profile ranks layers as the slow one did.

Runs profile_model with each setting given (samples, scored tokens per loss sample), times it, and compares
its loss ranking with a reference profile (default: the one shipped for the model; SmolLM2's has 6 samples,
each scoring its last 1,024 tokens with every layer measured; `--reference` takes another): Spearman's rank
correlation of the mean per-layer loss over the layers, and the 25% / 50% lazy sets each selects.

    python benchmarks/research/profile_speed.py --settings 3:256 3:512
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from py_simkv import LazyProfile, default_model_path, profile_model
from py_simkv.lazy_profile import shipped_profile


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--reference", default=None, help="profile to compare with (default: the shipped one)")
    ap.add_argument("--settings", nargs="+", default=["3:256"], metavar="SAMPLES:LOSS_TOKENS")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", default=None, metavar="PREFIX", help="also save each profile as PREFIX-S-T.json")
    ap.add_argument("--no-race", dest="race", action="store_false",
                    help="measure every layer on every loss sample (default: racing, as `simkv profile`)")
    args = ap.parse_args()
    path = args.model or default_model_path()
    ref = LazyProfile.load(args.reference or shipped_profile(path))
    ref_loss = ref.mean("loss")
    rows = []
    for setting in args.settings:
        samples, tokens = (int(x) for x in setting.split(":"))
        t0 = time.perf_counter()
        prof = profile_model(path, max_samples=samples, loss_samples=samples, loss_tokens=tokens,
                             n_threads=args.threads, progress=False, race=args.race)
        secs = time.perf_counter() - t0
        if args.save:
            prof.save(f"{args.save}-{samples}-{tokens}.json")
        loss = prof.mean("loss")
        sets = {r: (prof.select(ratio=r), ref.select(ratio=r)) for r in (0.25, 0.5)}
        rows.append((setting, secs, spearman(loss, ref_loss), sets))
        print(json.dumps({"setting": setting, "seconds": round(secs, 1), "spearman": round(rows[-1][2], 3),
                          "sets": {str(r): s for r, s in sets.items()}}), flush=True)
    print("\n| samples:scored tokens | time | Spearman vs reference | 25% set: shared with reference | 50% set: shared |")
    print("|---|---|---|---|---|")
    for setting, secs, rho, sets in rows:
        shared = [f"{len(set(a) & set(b))} of {len(b)}" for a, b in sets.values()]
        print(f"| {setting} | {secs / 60:.1f} min | {rho:.3f} | {shared[0]} | {shared[1]} |")


if __name__ == "__main__":
    main()
