"""`simkv chat` through a pseudo-terminal, and `simkv info`, as a user drives them."""
import os
import re
import shutil
import subprocess
import tempfile

import pexpect
import pytest

from py_simkv import Llama

PROMPT = "> "


def _spawn(*extra):
    exe = shutil.which("simkv")
    assert exe
    return pexpect.spawn(exe, ["chat", "--n-ctx", "2048", "--temp", "0", "--threads", "2", *extra],
                         cwd=tempfile.gettempdir(), env=dict(os.environ, TERM="dumb"), encoding="utf-8",
                         timeout=120, dimensions=(40, 200))


@pytest.fixture
def chat():
    child = _spawn("-n", "300", "--no-lazy")  # the replies' content is checked: the model as trained
    yield child
    if child.isalive():
        child.terminate(force=True)


@pytest.fixture
def endless_chat():
    """Replies cannot end before the context is full (about 2,000 tokens, several seconds even on a fast
    CPU): an interrupt sent as soon as a reply starts always lands while it streams."""
    child = _spawn("-n", "100000", "--ignore-eos")
    yield child
    if child.isalive():
        child.terminate(force=True)


def test_chat_session(chat):
    chat.expect("using the embedded default model")
    chat.expect("Commands: /reset /stats /exit")
    chat.expect_exact(PROMPT)

    chat.sendline("What is the capital of France? Answer in one word.")
    chat.expect_exact(PROMPT)
    first = chat.before
    assert "Paris" in first

    chat.sendline("And of Italy?")
    chat.expect_exact(PROMPT)
    assert "Rome" in chat.before  # the second turn sees the history

    chat.sendline("/stats")
    chat.expect(r"context: (\d+) / 2048 tokens; last reply: (\d+) tokens, ([\d.]+) tok/s")
    assert int(chat.match.group(1)) > 20
    chat.expect(r"KV full :\s+30 layers,\s+([\d.]+) MiB")
    chat.expect(r"KV total: ([\d.]+) MiB")
    chat.expect_exact(PROMPT)

    chat.sendline("/reset")
    chat.expect_exact("(history cleared)")
    chat.expect_exact(PROMPT)
    chat.sendline("/stats")
    chat.expect(r"context: 0 / 2048 tokens")
    chat.expect_exact(PROMPT)

    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_chat_uses_the_shipped_profile_by_default():
    """No lazy flags: the chat uses the profile shipped for the embedded model, and says so in one line."""
    child = _spawn("-n", "40")
    child.expect(r"simkv: (\d+) of 30 layers lazy \(([\d,]+)\) from \S+profiles\S+; KV ([\d.]+) MiB vs ([\d.]+) MiB "
                 r"full at n_ctx 2048; --no-lazy turns them off")
    n_lazy = int(child.match.group(1))
    assert 0 < n_lazy < 30 and float(child.match.group(3)) < float(child.match.group(4))
    child.expect_exact(PROMPT)
    child.sendline("What is the capital of France? Answer in one word.")
    child.expect_exact(PROMPT)
    assert "Paris" in child.before
    child.sendline("/stats")
    child.expect(rf"KV full :\s+{30 - n_lazy} layers,\s+([\d.]+) MiB")
    child.expect(rf"KV lazy :\s+{n_lazy} layers,\s+([\d.]+) MiB")
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_chat_defaults_to_the_trained_context_and_no_lazy_turns_it_off():
    exe = shutil.which("simkv")
    child = pexpect.spawn(exe, ["chat", "--no-lazy", "--threads", "2"], cwd=tempfile.gettempdir(),
                          env=dict(os.environ, TERM="dumb"), encoding="utf-8", timeout=120, dimensions=(40, 200))
    child.expect(r"simkv: every layer full \(--no-lazy\); KV ([\d.]+) MiB vs ([\d.]+) MiB full at n_ctx 8192")
    assert child.match.group(1) == child.match.group(2)
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_chat_ctrl_c_stops_a_reply(endless_chat):
    """Ctrl-C during a reply stops it and returns to the prompt; the session goes on."""
    chat = endless_chat
    chat.expect_exact(PROMPT)
    chat.sendline("Write a very long story about a dragon, with many chapters.")
    chat.expect_exact("chapters.\r\n")  # our line, echoed by the terminal
    chat.expect(r"\w+ \w+ \w+")  # the reply has started streaming
    chat.sendintr()
    chat.expect_exact("[stopped]")
    chat.expect_exact(PROMPT)
    chat.sendline("/stats")  # the stopped reply stayed in the context, far from filling it
    chat.expect(r"context: (\d+) / 2048 tokens")
    assert 20 < int(chat.match.group(1)) < 2000
    chat.expect_exact(PROMPT)
    chat.sendline("/reset")
    chat.expect_exact(PROMPT)
    chat.sendline("Say hello.")
    chat.expect_exact("hello.\r\n")  # the echo of our line
    chat.expect(r"[Hh]ello")  # the session goes on (this reply, too, would run to the context's end)
    chat.sendintr()
    chat.expect_exact("[stopped]")
    chat.expect_exact(PROMPT)
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_chat_ctrl_d_exits(chat):
    chat.expect_exact(PROMPT)
    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_info_table(smollm_path):
    out = subprocess.run([shutil.which("simkv"), "info", smollm_path, "--n-ctx", "8192"], capture_output=True,
                         text=True, cwd=tempfile.gettempdir())
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "architecture llama, 30 layers, n_embd 576, 9 heads (3 KV heads, head size 64)" in text
    full = float(re.search(r"full f16\s+([\d.]+)\s+1\.00", text).group(1))
    assert full == pytest.approx(30 * 2 * 8192 * 192 * 2 / 2**20)
    lazy = re.search(r"SimLayerKV 50% lazy, f16 \+ q4_0 ring \(window 1024\)\s+([\d.]+)\s+([\d.]+)", text)
    # The table's numbers are what the engine allocates for that configuration.
    llm = Llama(smollm_path, n_ctx=8192, lazy_layers=range(15, 30), n_threads=1)
    assert float(lazy.group(1)) == pytest.approx(llm.kv_cache_stats()["total_bytes"] / 2**20, abs=0.05)
    assert float(lazy.group(2)) < 0.55
