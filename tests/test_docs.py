"""The documentation: README.md and docs/ (an mkdocs-material site).

- `mkdocs build --strict` passes (broken links, missing pages and API references fail it);
- docs/cli.md is what scripts/cli_reference.py renders from the CLI's own parser;
- every repository path the pages name exists;
- the Python code blocks run, against the embedded model (those that talk to `simkv serve` against one
  started here on a free port);
- no page, source file or benchmark speaks of how the software was made (work periods, issue numbers,
  commit hashes): results are stated as measurements.
"""
import glob
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_mkdocs_build_strict(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "site" / "python-api" / "index.html").read_text().count("create_completion") > 0


def test_cli_reference_is_generated_from_the_parser():
    spec = importlib.util.spec_from_file_location("cli_reference", os.path.join(ROOT, "scripts", "cli_reference.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert _read(os.path.join(ROOT, "docs", "cli.md")) == mod.render(), \
        "docs/cli.md is stale: run python scripts/cli_reference.py"


# A repository path in backquotes or a relative link: src/..., native/..., docs/x.md, (LICENSE) ...
_PATH = re.compile(r"`((?:src|native|tests|benchmarks|scripts|docs|models)/[\w./*-]+)`|\]\(((?!https?:|#)[^)#\s]+)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_named_paths_exist(page):
    base = os.path.dirname(page)
    missing = []
    for code, link in _PATH.findall(_read(page)):
        path = os.path.join(ROOT, code) if code else os.path.normpath(os.path.join(base, link))
        if code and ".simkv.json" in code and "profiles/" not in code:
            continue  # a file a command writes
        if not glob.glob(path.rstrip("/")):
            missing.append(code or link)
    assert not missing, missing


def _blocks():
    for page in PAGES:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", _read(page), re.S)):
            yield pytest.param(block, id=f"{os.path.relpath(page, ROOT)}:{i}")


@pytest.fixture(scope="module")
def serve_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([shutil.which("simkv"), "serve", "--port", str(port), "--threads", "2", "--n-ctx", "2048",
                             "--parallel", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "simkv serve exited"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            time.sleep(0.2)
    yield port
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.parametrize("block", list(_blocks()))
def test_python_blocks_run(block, request, tmp_path):
    if "rpc_servers=" in block:
        pytest.skip("needs ggml RPC servers at the addresses it names (tests/test_rpc.py runs the same calls)")
    if "127.0.0.1:8000" in block:
        block = block.replace("127.0.0.1:8000", f"127.0.0.1:{request.getfixturevalue('serve_port')}")
    r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


# How the software was made has no place in its text: numbered work periods, references to this project's
# issues, commit hashes. (Other projects' issues, e.g. llama.cpp#21038, are sources and stay.)
_HISTORY = [re.compile(p) for p in (r"\b[Ss]ession \d+", r"(?<![\w.-])#\d{1,3}\b", r"\bissue #?\d+",
                                    r"\bgit show [0-9a-f]{7,40}", r"\bcommit [0-9a-f]{7,40}\b", r"\bpart \d of #")]


def test_no_history_in_the_text():
    files = PAGES + [f for d in ("src", "native", "benchmarks", "scripts") for f in
                     glob.glob(os.path.join(ROOT, d, "**", "*"), recursive=True)
                     if f.endswith((".py", ".cpp", ".h", ".md", ".sh"))]
    found = []
    for f in files:
        for n, line in enumerate(_read(f).splitlines(), 1):
            if any(p.search(line) for p in _HISTORY):
                found.append(f"{os.path.relpath(f, ROOT)}:{n}: {line.strip()[:100]}")
    assert not found, "\n".join(found)
