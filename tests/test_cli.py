"""`simkv generate` as a user runs it: output text, errors as one line with exit status 2."""
import os
import shutil
import subprocess
import tempfile


def run(*args):
    """The installed console script, from a directory outside the repository (as a user runs it)."""
    exe = shutil.which("simkv")
    assert exe, "the simkv console script is not installed"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300, cwd=tempfile.gettempdir(),
                          env=dict(os.environ))


def test_generate_greedy_matches_the_api(smollm_path):
    """With no lazy flags the CLI uses the model's profile (lazy_profile="auto"): the same text as the API."""
    from py_simkv import Llama

    r = run("generate", smollm_path, "-p", "The capital of France is", "-n", "8", "--temp", "0", "--n-ctx", "256",
            "--threads", "2")
    assert r.returncode == 0, r.stderr
    llm = Llama(smollm_path, n_ctx=256, n_threads=2, lazy_profile="auto")
    assert llm.lazy_layers and f"{len(llm.lazy_layers)} of 30 layers lazy" in r.stderr
    toks = [t for _, t in zip(range(8), llm.generate(llm.tokenize(b"The capital of France is", special=True), temp=0))]
    assert r.stdout == "The capital of France is" + llm.detokenize(toks).decode() + "\n"
    assert "8 tokens" in r.stderr and "KV cache" in r.stderr


def test_generate_uses_default_model_and_says_so():
    r = run("generate", "-p", "Hi", "-n", "2", "--n-ctx", "64")
    assert r.returncode == 0, r.stderr
    assert "using the embedded default model" in r.stderr


def test_errors_are_one_line_with_status_2(tmp_path):
    for args, msg in [(["generate", str(tmp_path / "x.gguf"), "-p", "hi"], "model file not found"),
                      (["generate", "--lazy-layers", "99", "-p", "hi"], "out of range"),
                      (["generate", "--type-k", "q9", "--type-v", "q9", "-p", "hi"], "unknown type_k")]:
        r = run(*args)
        assert r.returncode == 2
        assert msg in r.stderr and "Traceback" not in r.stderr
    r = run("generate", "--lazy-layers", "a,b", "-p", "hi")
    assert r.returncode == 2 and "comma-separated" in r.stderr


def test_a_model_without_a_profile_runs_full_and_says_how_to_make_one(tiny_model):
    path = tiny_model("llama")
    r = run("generate", path, "-p", "hi", "-n", "2", "--n-ctx", "64", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "no lazy profile for this model: every layer full" in r.stderr and f"simkv profile {path}" in r.stderr
