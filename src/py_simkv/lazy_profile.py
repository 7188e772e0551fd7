"""Lazy-layer profiles: the per-layer scores of one model, saved beside it (`MODEL.gguf.simkv.json`), and
the selection of lazy layers from them at load time. Making a profile (running the model over calibration
text) is profiler.py's job; this module never runs a model.

Three criteria, all measured on the last `w_last` tokens of each calibration sample:
- "mass" (SimLayerKV's): attention weight on the first n_sink keys + the n_window most recent ones,
  averaged over heads and queries. Higher = lazier; the paper's thresholds apply.
- "change" (effect-based): relative change of the layer's attention output when it keeps only those keys.
  Lower = lazier. It measures what trimming does rather than a proxy for it.
- "loss" (effect-based, the default criterion when a profile has it): increase of the mean next-token loss
  on the second half of a sample when only this layer is trimmed after a full first half (the paper's
  exact prefill). Lower = lazier. It catches layers that put almost all attention on sinks + window yet do
  long-range copying with the rest.

A version-2 profile also holds, per loss sample, "types": the KL divergence from the f16 model of a cache
whose lazy-able layers hold q8_0 ("base") and of that cache with one layer at a time changed to each
option (profiler.TYPE_OPTIONS, and "lazy"); kv_choice.py chooses every layer's kind and types from them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import List, Optional, Tuple

import numpy as np

PROFILE_SUFFIX = ".simkv.json"
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)  # version 1: no per-layer type measurements
CRITERIA = {"mass": "higher is lazier", "change": "lower is lazier", "loss": "lower is lazier"}
# The paper's thresholds on the attention-mass score, by model family (matched in general.name/basename).
FAMILY_THRESHOLDS = (("llama-3", 0.9), ("llama3", 0.9), ("llama-2", 0.65), ("llama2", 0.65), ("mistral", 0.8),
                     ("qwen", 0.85))
DEFAULT_MASS_THRESHOLD = 0.9
# "loss" with an explicit threshold: a layer is lazy when trimming it alone raises the calibration loss by
# less than this (nats, so 0.005 = 0.5% perplexity).
DEFAULT_LOSS_THRESHOLD = 0.005
# "loss" by default: the laziest layers while the sum of their losses stays within this budget (nats of
# calibration loss). Chosen by measurement (README, "Choosing lazy layers"): on SmolLM2 at the shipped
# settings (8K, window 1024, q4_0 rings with their f16 residual, streaming) 0.005 picks 8 layers and costs
# +1.1% / +1.1% / +0.4% held-out perplexity: within "at most 2%". (Before the residual, 4-bit recent keys
# cost as much as the trimming: 0.005 cost +3.3% / +2.5% / +1.4% and the default was 0.002.) The
# calibration losses do not add up to the held-out cost, so the budget is set by that measurement, not from
# the nats. A per-layer threshold bounds each layer, not the total: 15 layers under 0.005 each cost +4.9%.
DEFAULT_LOSS_BUDGET = 0.005
# Profiles shipped inside the package (profiles/), found by the model file's identity.
SHIPPED_PROFILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")


def default_profile_path(model_path: str) -> str:
    return os.fspath(model_path) + PROFILE_SUFFIX


def find_profile(model_path: str) -> Optional[str]:
    """The profile saved beside the model, else one shipped with simkv for this very file, if any."""
    path = default_profile_path(model_path)
    if os.path.isfile(path):
        return path
    return shipped_profile(model_path)


def shipped_profile(model_path: str) -> Optional[str]:
    """The profile in the package's profiles/ made for this model file (same size and fingerprint)."""
    if not os.path.isdir(SHIPPED_PROFILES):
        return None
    size, fingerprint = file_fingerprint(model_path)
    for name in sorted(os.listdir(SHIPPED_PROFILES)):
        if not name.endswith(PROFILE_SUFFIX):
            continue
        path = os.path.join(SHIPPED_PROFILES, name)
        with open(path) as f:
            ident = json.load(f).get("model", {})
        if ident.get("file_size") == size and ident.get("fingerprint") == fingerprint:
            return path
    return None


def file_fingerprint(model_path: str) -> Tuple[int, str]:
    """(size, sha256 of the first and last MiB): cheap even for a multi-GB file."""
    size = os.path.getsize(model_path)
    h = hashlib.sha256()
    with open(model_path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(size - (1 << 20), 0))
        h.update(f.read(1 << 20))
    return size, h.hexdigest()


def model_identity(model_path: str, model) -> dict:
    """What ties a profile to one model file: name, shape and a fingerprint of the file's bytes.
    `model` is the file's loaded native model (its metadata and hyperparameters)."""
    size, fingerprint = file_fingerprint(model_path)
    md = model.metadata
    return {"name": md.get("general.name", os.path.basename(model_path)), "arch": model.hparams["arch"],
            "n_layer": model.hparams["n_layer"], "file_size": size, "fingerprint": fingerprint}


def family_threshold(identity: dict) -> float:
    name = identity.get("name", "").lower()
    for key, value in FAMILY_THRESHOLDS:
        if key in name:
            return value
    return DEFAULT_MASS_THRESHOLD


def mean_of_measured(scores: np.ndarray) -> np.ndarray:
    """Per-layer mean of [n_samples, n_layer] scores over the samples that measured the layer. A "loss" entry
    is null (NaN here) where a sample did not re-measure the layer (profiler.py: later samples re-measure
    only the layers still in the running); a layer that cannot be lazy is NaN in every sample, and stays NaN."""
    measured = ~np.isnan(scores)
    n = measured.sum(axis=0)
    total = np.where(measured, scores, 0.0).sum(axis=0)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


@dataclasses.dataclass
class LazyProfile:
    model: dict       # model_identity()
    params: dict      # n_ctx, n_sink, n_window, w_last
    samples: List[dict]  # {"source", "n_tokens", "mass": [n_layer], "change": [n_layer], "loss"?: [n_layer]}
    # (a "loss" entry is None where that sample did not re-measure the layer: mean_of_measured)

    # --- scores ------------------------------------------------------------------------------------
    @property
    def n_layer(self) -> int:
        return int(self.model["n_layer"])

    @property
    def default_criterion(self) -> str:
        """"loss" where the profile measured it (it predicts quality best in benchmarks/eval_quality.py),
        else the paper's "mass"."""
        return "loss" if any("loss" in s for s in self.samples) else "mass"

    def scores(self, criterion: Optional[str] = None) -> np.ndarray:
        """[n_samples that have this criterion, n_layer]"""
        criterion = self._criterion(criterion)
        rows = [s[criterion] for s in self.samples if criterion in s]
        if not rows:
            raise ValueError(f"this profile has no '{criterion}' scores: make it with `simkv profile` "
                             "(--loss-samples above 0)")
        return np.array(rows, dtype=np.float64)

    def mean(self, criterion: Optional[str] = None) -> np.ndarray:
        return mean_of_measured(self.scores(criterion))

    @property
    def has_types(self) -> bool:
        return any("types" in s for s in self.samples)

    def type_costs(self) -> dict:
        """{option: [n_layer]}: how much changing that one layer to the option raised the KL divergence of
        the all-q8_0 cache from the f16 model, averaged over the samples (NaN: not measured; below zero,
        which is noise, counts as zero)."""
        rows = [s["types"] for s in self.samples if "types" in s]
        if not rows:
            raise ValueError("this profile has no per-layer type measurements: make it again with `simkv profile` "
                             "(this simkv's profiles measure them)")
        options = [k for k in rows[0] if k != "base"]
        out = {}
        for o in options:
            raised = np.array([np.array(r[o], dtype=np.float64) - r["base"] for r in rows])
            out[o] = np.maximum(mean_of_measured(raised), 0.0)
        return out

    def default_threshold(self, criterion: Optional[str] = None) -> Optional[float]:
        criterion = self._criterion(criterion)
        return {"mass": family_threshold(self.model), "loss": DEFAULT_LOSS_THRESHOLD}.get(criterion)

    def select(self, threshold: Optional[float] = None, ratio: Optional[float] = None,
               criterion: Optional[str] = None, budget: Optional[float] = None) -> List[int]:
        """Lazy layers: by threshold on the mean score, as the laziest `ratio` of the layers, or ("loss") the
        laziest layers whose summed loss stays within `budget` nats.

        criterion: default_criterion unless given. With none of threshold, ratio, budget: the budget
        DEFAULT_LOSS_BUDGET ("loss") or the paper's threshold for this model's family ("mass")."""
        criterion = self._criterion(criterion)
        if sum(x is not None for x in (threshold, ratio, budget)) > 1:
            raise ValueError("give one of a threshold, a ratio or a budget")
        if criterion == "loss" and threshold is None and ratio is None:
            return self._within_budget(DEFAULT_LOSS_BUDGET if budget is None else budget)
        if budget is not None:
            raise ValueError("a budget applies to the 'loss' criterion (summed loss increases)")
        mean = self.mean(criterion)
        # NaN scores belong to layers that cannot be lazy (a model's sliding-window layers): the ratio is
        # of the others, and NaN never passes a threshold.
        candidates = np.flatnonzero(~np.isnan(mean))
        order = np.argsort(-mean[candidates] if criterion == "mass" else mean[candidates], kind="stable")
        lazier_first = candidates[order]
        if ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
                raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}")
            return sorted(int(i) for i in lazier_first[: int(round(ratio * len(candidates)))])
        if threshold is None:
            threshold = self.default_threshold(criterion)
            if threshold is None:
                raise ValueError(f"the '{criterion}' criterion has no default threshold: give a threshold or a ratio")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a number, got {threshold!r}")
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        lazy = mean > threshold if criterion == "mass" else mean < threshold
        return [int(i) for i in np.flatnonzero(lazy)]

    def _within_budget(self, budget: float) -> List[int]:
        """Layers in order of measured loss while their summed loss stays within `budget`. Negative losses
        (trimming helped on the calibration text) count as zero: they buy no room for other layers."""
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget < 0:
            raise ValueError(f"budget must be a finite number >= 0 (nats), got {budget!r}")
        mean = self.mean("loss")
        chosen, spent = [], 0.0
        for il in np.argsort(mean, kind="stable"):
            if np.isnan(mean[il]):
                continue
            cost = max(float(mean[il]), 0.0)
            if spent + cost > budget:
                break
            chosen.append(int(il))
            spent += cost
        return sorted(chosen)

    def _criterion(self, criterion: Optional[str]) -> str:
        if criterion is None:
            return self.default_criterion
        _check_criterion(criterion)
        return criterion

    # --- files -------------------------------------------------------------------------------------
    def save(self, path: str) -> str:
        data = {"format": "simkv-lazy-profile", "version": FORMAT_VERSION, "model": self.model,
                "params": self.params, "samples": self.samples}
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str) -> "LazyProfile":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"lazy profile not found: {path}")
        try:
            with open(path) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"not a simkv lazy profile (invalid JSON): {path}: {e}") from None
        if not isinstance(data, dict) or data.get("format") != "simkv-lazy-profile":
            raise ValueError(f"not a simkv lazy profile: {path}")
        if data.get("version") not in READS_VERSIONS:
            raise ValueError(f"lazy profile {path} has version {data.get('version')}, this simkv reads "
                             f"{', '.join(map(str, READS_VERSIONS))}")
        bad = _problem(data)
        if bad:
            raise ValueError(f"lazy profile {path} is damaged: {bad}")
        return cls(model=data["model"], params=data["params"], samples=data["samples"])

    def check_model(self, model_path: str, model) -> None:
        """Refuse a profile made for another model (`model`: the file's loaded native model)."""
        ident = model_identity(model_path, model)
        diff = [k for k in ("arch", "n_layer", "file_size", "fingerprint") if self.model.get(k) != ident[k]]
        if diff:
            raise ValueError(f"this lazy profile was made for '{self.model.get('name')}' ({self.model.get('file_size')} "
                             f"bytes), not for {model_path} ('{ident['name']}', {ident['file_size']} bytes): "
                             f"{', '.join(diff)} differ. Run `simkv profile` on this model.")

    # --- picture -----------------------------------------------------------------------------------
    def plot(self, path: str, criterion: Optional[str] = None, threshold: Optional[float] = None) -> str:
        """Heat map (layers x samples) and the per-layer mean with the threshold line, as a PNG."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ValueError("plotting needs matplotlib: pip install matplotlib") from None
        criterion = self._criterion(criterion)
        scores = self.scores(criterion)
        if threshold is None:
            threshold = self.default_threshold(criterion)
        fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(max(6, self.n_layer * 0.3), 7), sharex=True)
        im = ax0.imshow(scores, aspect="auto", cmap="viridis", interpolation="nearest")  # blank: not measured
        ax0.set_ylabel("sample")
        ax0.set_title(f"{self.model.get('name')}: '{criterion}' ({CRITERIA[criterion]})")
        fig.colorbar(im, ax=ax0)
        ax1.bar(range(self.n_layer), self.mean(criterion))
        if threshold is not None:
            ax1.axhline(threshold, color="red", linestyle="--", label=f"threshold {threshold}")
            ax1.legend()
        ax1.set_xlabel("layer")
        ax1.set_ylabel("mean")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _problem(data: dict) -> Optional[str]:
    """What is wrong with a loaded profile's structure and scores, or None. Scores are numbers; NaN marks a
    layer that cannot be lazy (a model's own sliding-window layers) and must be NaN in every sample. "loss"
    scores may be null for a layer a sample did not re-measure, never for all of a layer's samples."""
    model, params, samples = data.get("model"), data.get("params"), data.get("samples")
    if not isinstance(model, dict) or not isinstance(params, dict) or not isinstance(samples, list) or not samples:
        return "it needs 'model', 'params' and a non-empty list of 'samples'"
    n_layer = model.get("n_layer")
    if isinstance(n_layer, bool) or not isinstance(n_layer, int) or n_layer < 1:
        return "model.n_layer must be a positive int"
    for c in CRITERIA:
        pattern, ever = None, None
        for i, sample in enumerate(samples):
            if not isinstance(sample, dict):
                return f"sample {i} is not an object"
            if c not in sample:
                continue
            scores = sample[c]
            if not isinstance(scores, list) or len(scores) != n_layer:
                return f"sample {i} has no list of {n_layer} '{c}' scores"
            if c == "loss":  # null: not re-measured by this sample
                ever = [e or x is not None for e, x in zip(ever or [False] * n_layer, scores)]
                scores = [x for x in scores if x is not None]
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
                return f"sample {i} has a '{c}' score that is not a number"
            if any(math.isinf(x) for x in scores):
                return f"sample {i} has an infinite '{c}' score"
            nans = [x is not None and math.isnan(x) for x in sample[c]]
            if all(nans) or (pattern is not None and nans != pattern):
                return f"the '{c}' scores are NaN for other layers than those that cannot be lazy"
            pattern = nans
        if ever is not None and not all(ever):
            return f"layer {ever.index(False)} has no '{c}' score in any sample"
    if "mass" not in samples[0]:
        return "samples have no 'mass' scores"
    for i, sample in enumerate(samples):
        types = sample.get("types")
        if types is None:
            continue
        if not isinstance(types, dict) or not isinstance(types.get("base"), (int, float)) or isinstance(types.get("base"), bool):
            return f"sample {i}'s 'types' need a number 'base'"
        for o, scores in types.items():
            if o == "base":
                continue
            if not isinstance(scores, list) or len(scores) != n_layer or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isinf(x) for x in scores):
                return f"sample {i}'s '{o}' types need {n_layer} finite numbers (NaN where not measured)"
    return None


def _check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}: expected one of {', '.join(CRITERIA)}")


def load_profile(model_path: str, model, lazy_profile) -> Tuple[Optional[LazyProfile], Optional[str]]:
    """The profile `lazy_profile` names (a path, or "auto" = the one saved beside the model, else the one
    shipped for this model file; None if there is none), checked against the model. Returns (profile, path)."""
    path = find_profile(model_path) if lazy_profile == "auto" else os.fspath(lazy_profile)
    if path is None:
        return None, None
    prof = LazyProfile.load(path)
    prof.check_model(model_path, model)
    return prof, path


def resolve_lazy_layers(model_path: str, model, lazy_layers, lazy_profile, lazy_ratio, lazy_threshold,
                        lazy_criterion: Optional[str] = None,
                        lazy_budget: Optional[float] = None) -> Tuple[Optional[List[int]], Optional[str]]:
    """Which layers are lazy at load time: explicit lazy_layers win; else a profile (a path, or "auto" = the
    one saved beside the model, else the one shipped for this model file) with a ratio, threshold or loss
    budget (LazyProfile.select). `model` is the loaded native model. Returns (layers or None, profile path
    used)."""
    if lazy_layers is not None:
        return lazy_layers, None
    if lazy_profile is None:
        if lazy_ratio is not None or lazy_threshold is not None or lazy_budget is not None:
            raise ValueError("lazy_ratio/lazy_threshold/lazy_budget need a profile: lazy_profile='auto' or a path "
                             "(make one with `simkv profile`)")
        return None, None
    prof, path = load_profile(model_path, model, lazy_profile)
    if prof is None:
        if lazy_ratio is not None or lazy_threshold is not None or lazy_budget is not None:
            raise FileNotFoundError(f"no lazy profile beside {model_path} ({default_profile_path(model_path)}): "
                                    "run `simkv profile` first")
        return None, None
    return prof.select(threshold=lazy_threshold, ratio=lazy_ratio, criterion=lazy_criterion, budget=lazy_budget), path
