"""Runs llama-cpp-python's own tests/test_llama.py (from the pinned sdist, read in place: not copied here)
twice, on llama_cpp.Llama and on py_simkv.Llama, changing only the class and the GGUF (SmolLM2, offline), and
prints which tests pass on each side by side. What passes on llama_cpp.Llama must pass on simkv.

    python tests/llama_cpp_python_tests.py [--sdist DIR]

The sdist is fetched with pip into ../llamacpp-build/src (as build_llama_cpp.sh does) unless it is there.
Models its tests download from Hugging Face are replaced by SmolLM2; the embedding (BERT), recurrent (Mamba)
and hybrid (Falcon-H1) models have no offline copy and architectures simkv does not run: skipped on both.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.3.36"

# The harness pytest loads beside their test file: SmolLM2 for every download, llama-cpp-python loaded as
# tests/llama_cpp_reference.py loads it (no AMX weight buffers), and with IMPL=simkv the class swapped.
CONFTEST = '''
import os, sys, types
import pytest
import llama_cpp
import py_simkv
from py_simkv import default_model_path

sys.path.insert(0, os.environ["SIMKV_TESTS"])
from llama_cpp_reference import without_extra_buffers

hub = types.ModuleType("huggingface_hub")
def hf_hub_download(repo_id, filename):
    if any(x in filename for x in ("bge", "mamba", "Falcon-H1")):
        pytest.skip(f"{filename}: no offline copy, and an architecture simkv does not run")
    return default_model_path()
hub.hf_hub_download = hf_hub_download
sys.modules["huggingface_hub"] = hub

without_extra_buffers()
if os.environ.get("IMPL") == "simkv":
    llama_cpp.Llama = py_simkv.Llama
'''


def sdist_dir(given: str | None) -> str:
    if given:
        return given
    src = os.path.join(HERE, "..", "..", "llamacpp-build", "src")
    root = os.path.join(src, f"llama_cpp_python-{VERSION}")
    if not os.path.isdir(root):
        os.makedirs(src, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", src], check=True)
        subprocess.run(["tar", "-xzf", os.path.join(src, f"llama_cpp_python-{VERSION}.tar.gz"), "-C", src], check=True)
    return root


def run(root: str, impl: str) -> dict:
    """{test id: outcome} of their test_llama.py on one implementation."""
    with tempfile.TemporaryDirectory() as work:
        harness = os.path.join(work, "harness")
        os.makedirs(harness)
        with open(os.path.join(harness, "conftest.py"), "w") as f:
            f.write(CONFTEST)
        os.symlink(os.path.join(root, "tests", "test_llama.py"), os.path.join(harness, "test_llama.py"))
        # Their vocab-only test opens ./vendor/llama.cpp/models/...: run where that path resolves, but not
        # in the sdist itself (its llama_cpp sources would shadow the installed package).
        os.symlink(os.path.join(root, "vendor"), os.path.join(work, "vendor"))
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--rootdir",
                              harness, os.path.join(harness, "test_llama.py")], cwd=work,
                             env=dict(os.environ, IMPL=impl, SIMKV_TESTS=HERE),
                             capture_output=True, text=True).stdout
    results = {}
    for line in out.splitlines():
        m = re.match(r"^(PASSED|FAILED|SKIPPED|ERROR)\s+(?:\[\d+\]\s+)?(\S+)(?:\s+-\s+(.*))?", line)
        if m:
            name = m.group(2).split("::")[-1].rstrip(":")
            results[name] = (m.group(1), (m.group(3) or "")[:70])
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdist", help="the unpacked llama-cpp-python sdist (default: fetch it)")
    args = ap.parse_args()
    root = sdist_dir(args.sdist)
    theirs, ours = run(root, "llama_cpp"), run(root, "simkv")
    print(f"{'test (llama-cpp-python ' + VERSION + ' tests/test_llama.py)':<86} {'llama_cpp':>9} {'simkv':>9}")
    missed = 0
    for name in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(name, ("-", ""))[0], ours.get(name, ("-", ""))[0]
        missed += a == "PASSED" and b != "PASSED"
        print(f"{name[:86]:<86} {a:>9} {b:>9}" + (f"   {ours[name][1]}" if b == "FAILED" else ""))
    print(f"\n{missed} test(s) pass on llama_cpp.Llama and not on simkv")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
