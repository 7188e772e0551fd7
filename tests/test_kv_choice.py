"""The joint choice of every layer's kind and K/V types from a profile (kv_choice.py), its profile format,
and its use at load time (Llama(kv_fraction=...), the CLI)."""
import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from py_simkv import LazyProfile, Llama, _native, profile_model
from py_simkv.kv_choice import BYTE_STEPS, choose_kv
from py_simkv.memory import kv_layers
from py_simkv.lazy_profile import model_identity

TEXTS = [("prose", "The quick brown fox jumps over the lazy dog. " * 200)]
OPTIONS = ["q8_0", "q8_0/q4_0", "q4_0", "lazy"]


def _profile(path, costs, base=0.004):
    """A version-2 profile of the model at `path` whose type measurements are `costs` {option: [n_layer]}."""
    model = _native.load_model(path)
    n = model.hparams["n_layer"]
    types = {"base": base, **{o: [base + c for c in v] for o, v in costs.items()}}
    sample = {"source": "s", "n_tokens": 1, "mass": [0.5] * n, "change": [0.5] * n, "loss": [0.001] * n, "types": types}
    return LazyProfile(model=model_identity(path, model), params={}, samples=[sample])


def _bytes_of(path, n_ctx, combo, **config):
    llm = _native.load_model(path)
    lazy = [il for il, o in enumerate(combo) if o == "lazy"]
    types = {il: tuple((o.split("/") * 2)[:2]) if "/" in o else (o, o) for il, o in enumerate(combo) if o != "lazy"}
    return sum(x["bytes"] for x in kv_layers(llm, n_ctx, lazy_layers=lazy, kv_types=types, **config))


def test_the_choice_is_the_least_cost_within_the_bytes(tiny_model):
    path = tiny_model("llama")
    costs = {"q8_0/q4_0": [0.001, 0.0002, 0.003, 0.0005], "q4_0": [0.01, 0.002, 0.02, 0.0008],
             "lazy": [0.05, 0.004, 0.001, 0.03]}
    prof = _profile(path, costs)
    n_ctx, cfg = 4096, dict(n_window=64, n_sink=4, n_ubatch=64)
    llm = _native.load_model(path)
    f16 = sum(x["bytes"] for x in kv_layers(llm, n_ctx, **cfg))
    combos = list(itertools.product(OPTIONS, repeat=4))
    cost = {c: sum(0 if o == "q8_0" else costs[o][il] for il, o in enumerate(c)) for c in combos}
    size = {c: _bytes_of(path, n_ctx, c, **cfg) for c in combos}
    step = f16 / BYTE_STEPS
    for fraction in (0.2, 0.3, 0.45, 0.6):
        choice = choose_kv(prof, llm, n_ctx, fraction=fraction, **cfg)
        chosen = tuple("lazy" if il in choice.lazy_layers else
                       (choice.kv_types[il][0] if choice.kv_types[il][0] == choice.kv_types[il][1] else "/".join(choice.kv_types[il]))
                       for il in range(4))
        assert choice.bytes == size[chosen] <= fraction * f16
        assert choice.predicted_kld == pytest.approx(0.004 + cost[chosen])
        # no combination within the budget costs less (the bytes are counted in steps of f16 / BYTE_STEPS,
        # rounded up: a combination within 4 steps of the budget may be out of the choice's reach)
        assert cost[chosen] <= min(cost[c] for c in combos if size[c] <= fraction * f16 - 4 * step) + 1e-12
        assert cost[chosen] >= min(cost[c] for c in combos if size[c] <= fraction * f16) - 1e-12
        # what a Llama allocates with the choice is what it planned
        built = Llama(path, n_ctx=n_ctx, n_threads=2, kv_fraction=fraction, lazy_profile=_save(prof, path, fraction), **cfg)
        assert built.kv_cache_stats()["total_bytes"] == choice.bytes
        assert built.lazy_layers == choice.lazy_layers and built.kv_choice == choice
    # a divergence budget: the fewest bytes whose predicted divergence fits
    choice = choose_kv(prof, llm, n_ctx, kld=0.0045, **cfg)
    assert choice.predicted_kld <= 0.0045
    fits = [c for c in combos if 0.004 + cost[c] <= 0.0045]
    assert choice.bytes <= min(size[c] for c in fits) + 4 * step


def _save(prof, path, tag):
    out = f"{path}.{tag}.simkv.json"
    prof.save(out)
    return out


def test_budgets_that_nothing_meets_are_refused(tiny_model):
    path = tiny_model("llama")
    prof = _profile(path, {"q8_0/q4_0": [0.001] * 4, "q4_0": [0.002] * 4, "lazy": [0.003] * 4})
    llm = _native.load_model(path)
    with pytest.raises(ValueError, match="too small"):
        choose_kv(prof, llm, 1024, fraction=0.01)
    with pytest.raises(ValueError, match="below what the profile measured"):
        choose_kv(prof, llm, 1024, kld=0.001)
    for bad in (0, -0.5, float("nan"), True, "0.3"):
        with pytest.raises(ValueError, match="kv_fraction"):
            choose_kv(prof, llm, 1024, fraction=bad)
    with pytest.raises(ValueError, match="one of"):
        choose_kv(prof, llm, 1024)
    # a profile without type measurements says how to get them
    old = LazyProfile(model=prof.model, params={}, samples=[{k: v for k, v in prof.samples[0].items() if k != "types"}])
    with pytest.raises(ValueError, match="simkv profile"):
        choose_kv(old, llm, 1024, fraction=0.5)
    # the Llama arguments that would contradict a choice
    saved = _save(prof, path, "refuse")
    with pytest.raises(ValueError, match="do not give lazy_layers"):
        Llama(path, n_ctx=256, lazy_profile=saved, kv_fraction=0.5, lazy_layers=[1])


def test_kv_types_given_win_over_the_choice(tiny_model):
    path = tiny_model("llama")
    prof = _profile(path, {"q8_0/q4_0": [0.001] * 4, "q4_0": [0.002] * 4, "lazy": [0.5] * 4})
    saved = _save(prof, path, "own")
    llm = Llama(path, n_ctx=256, n_threads=2, lazy_profile=saved, kv_fraction=0.9, kv_types={0: "f16"})
    layers = llm.kv_cache_stats()["layers"]
    assert (layers[0]["type_k"], layers[0]["type_v"]) == ("f16", "f16")
    assert all(x["type_k"] == "q8_0" for x in layers[1:])  # 0.9 of f16 holds q8_0 everywhere: the least cost


def test_profile_measures_types_and_round_trips(tiny_model, tmp_path):
    path = tiny_model("llama")
    prof = profile_model(path, texts=TEXTS, n_ctx=128, n_window=16, w_last=8, max_samples=1, loss_samples=1,
                         loss_tokens=48, type_tokens=24, n_threads=2, progress=False)
    assert prof.params["type_tokens"] == 24 and prof.params["type_base"] == "q8_0"
    types = prof.samples[0]["types"]
    assert set(types) == {"base", "q8_0/q4_0", "q4_0", "lazy"}
    assert types["base"] > 0
    for o in ("q8_0/q4_0", "q4_0", "lazy"):
        assert len(types[o]) == 4 and all(x > 0 and math.isfinite(x) for x in types[o])
    costs = prof.type_costs()
    assert all(np.all(c >= 0) for c in costs.values())
    out = prof.save(str(tmp_path / "p.simkv.json"))
    again = LazyProfile.load(out)
    assert again.samples == prof.samples and json.load(open(out))["version"] == 2
    # a damaged measurement is refused
    data = json.load(open(out))
    data["samples"][0]["types"]["q4_0"] = [1.0]
    json.dump(data, open(out, "w"))
    with pytest.raises(ValueError, match="damaged"):
        LazyProfile.load(out)


def test_a_version_1_profile_still_loads(tiny_model, tmp_path):
    path = tiny_model("llama")
    prof = _profile(path, {"q8_0/q4_0": [0.001] * 4, "q4_0": [0.002] * 4, "lazy": [0.003] * 4})
    data = {"format": "simkv-lazy-profile", "version": 1, "model": prof.model, "params": {},
            "samples": [{k: v for k, v in prof.samples[0].items() if k != "types"}]}
    out = tmp_path / "v1.simkv.json"
    out.write_text(json.dumps(data))
    old = LazyProfile.load(str(out))
    assert not old.has_types and old.select(ratio=0.5)
    llm = Llama(path, n_ctx=256, lazy_profile=str(out), lazy_ratio=0.5)
    assert len(llm.lazy_layers) == 2


def test_cli_info_shows_the_choice(tiny_model):
    path = tiny_model("llama")
    prof = _profile(path, {"q8_0/q4_0": [0.001, 0.5, 0.5, 0.5], "q4_0": [0.5] * 4, "lazy": [0.5, 0.5, 0.5, 0.0001]})
    saved = _save(prof, path, "cli")
    r = subprocess.run([sys.executable, "-m", "py_simkv.cli", "info", path, "--n-ctx", "4096", "--n-window", "64",
                        "--lazy-profile", saved, "--kv-fraction", "0.41"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "predicted mean KLD" in r.stdout
    assert "layers 3       lazy" in r.stdout and "layers 0       full  K q8_0  V q4_0" in r.stdout
