"""`simkv serve` on 127.0.0.1, driven by the real `openai` client and by raw HTTP: answers equal the
in-process ones, several requests decode at once, bad requests get OpenAI-style 4xx and the server keeps
serving, a vanished client frees its slot, a full queue gives 503, SIGTERM stops it cleanly."""
import concurrent.futures
import http.client
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import numpy as np
import openai
import pytest

from conftest import require_rpc, start_rpc_server, stop_rpc_server

from py_simkv import Llama

MODEL = "smollm2"  # --model-alias
CHAT = [[{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
        [{"role": "user", "content": "Write one sentence about the sea."}],
        [{"role": "user", "content": "What is 2 + 2?"}]]


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args):
        self.port = _free_port()
        self.key = None
        if "--api-key" in args:
            self.key = args[args.index("--api-key") + 1]
        self.proc = subprocess.Popen([shutil.which("simkv"), "serve", "--port", str(self.port), "--threads", "2",
                                      "--model-alias", MODEL, *args], cwd=tempfile.gettempdir(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("server did not start")

    def request(self, method, path, body=None, raw=None, headers=None, timeout=300):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        hdrs = {"Content-Type": "application/json"}
        if self.key:
            hdrs["Authorization"] = f"Bearer {self.key}"
        hdrs.update(headers or {})
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        try:
            return resp.status, json.loads(text)
        except json.JSONDecodeError:
            return resp.status, text

    def client(self, key=None):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key or self.key or "none",
                             max_retries=0, timeout=300)

    def stop(self):
        """SIGTERM: uvicorn's handler shuts down cleanly (exit status 0)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        return self.proc.returncode


@pytest.fixture(scope="module")
def server():
    s = Server("--parallel", "4", "--n-ctx", "4096", "--no-lazy")  # answers compared with a full Llama
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def local(smollm_path):
    """The same model in process: what every answer must equal (greedy)."""
    return Llama(smollm_path, n_ctx=4096, n_threads=2)


# Where greedy decoding may go another way: the server batches requests, and the batch's size picks ggml's
# flash-attention kernel (64 tokens or more: a tiled f32 kernel; fewer: one that accumulates in f16). On the
# same prompt the two kernels' logits differ by up to 0.80 on SmolLM2 (measured: 37 prompt tokens alone vs
# beside 27 more), so a top-2 margin under twice that may flip. Past a flip the texts differ; before it they
# must agree token for token, and a request answered from another conversation's context diverges at once.
NEAR_TIE = 1.6


def _greedy_pieces(local, prompt_tokens, n):
    """In-process greedy decoding: each token's text and the margin between the two best logits."""
    local.reset()
    local.eval(prompt_tokens)
    pieces, margins = [], []
    for _ in range(n):
        logits = local.last_logits
        token = int(np.argmax(logits))
        if local.token_is_eog(token):
            break
        top2 = np.partition(logits, -2)[-2:]
        pieces.append(local.detokenize([token]).decode("utf-8", errors="ignore"))
        margins.append(float(top2[1] - top2[0]))
        local.eval([token])
    return pieces, margins


def assert_greedy(local, prompt_tokens, got_pieces, n):
    want, margins = _greedy_pieces(local, prompt_tokens, n)
    for i, (got, expected) in enumerate(zip(got_pieces, want)):
        if got != expected:
            assert margins[i] < NEAR_TIE, (i, got_pieces, want)
            return
    assert got_pieces == want


def _chat_tokens(local, messages):
    return local.chat_template().render(messages)[0]


def _chat_pieces(response):
    return [c.token for c in response.choices[0].logprobs.content]


def test_openai_client_chat_completion_and_models(server, local):
    client = server.client()
    assert [m.id for m in client.models.list()] == [MODEL]
    r = client.chat.completions.create(model=MODEL, messages=CHAT[0], temperature=0, max_tokens=24, logprobs=True)
    assert r.choices[0].message.content == "".join(_chat_pieces(r))
    assert_greedy(local, _chat_tokens(local, CHAT[0]), _chat_pieces(r), 24)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 24
    c = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=16, logprobs=1)
    assert c.usage.completion_tokens == 16 and c.choices[0].finish_reason == "length"
    assert_greedy(local, local.tokenize(b"Once upon a time", special=True), c.choices[0].logprobs.tokens, 16)
    assert c.choices[0].text == "".join(c.choices[0].logprobs.tokens)


def test_streaming_chat(server, local):
    stream = server.client().chat.completions.create(model=MODEL, messages=CHAT[2], temperature=0, max_tokens=32,
                                                     stream=True, logprobs=True)
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    pieces = [c.token for ch in chunks if ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert text == "".join(pieces) and text
    assert_greedy(local, _chat_tokens(local, CHAT[2]), pieces, 32)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # on the wire: server-sent events ending in [DONE]
    status, body = server.request("POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3,
                                                              "stream": True})
    events = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_four_concurrent_requests_each_get_their_own_answer(server, local):
    client = server.client()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda m: client.chat.completions.create(model=MODEL, messages=m, temperature=0,
                                                                    max_tokens=40, logprobs=True), CHAT))
    for messages, r in zip(CHAT, got):
        assert_greedy(local, _chat_tokens(local, messages), _chat_pieces(r), 40)
    status, slots = server.request("GET", "/slots")
    assert status == 200 and len(slots["slots"]) == 4 and slots["queued"] == 0
    assert sum(s["n_tokens"] for s in slots["slots"]) > 0 and slots["total_bytes"] > 0
    assert all(s["state"] == "idle" for s in slots["slots"])


def test_next_turn_reuses_the_slot_cache(server, local):
    client = server.client()
    history = [{"role": "user", "content": "Tell me a fact about cats."}]
    first = client.chat.completions.create(model=MODEL, messages=history, temperature=0, max_tokens=20)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And one about dogs."}]
    second = client.chat.completions.create(model=MODEL, messages=history, temperature=0, max_tokens=20, logprobs=True)
    assert_greedy(local, _chat_tokens(local, history), _chat_pieces(second), 20)
    _, slots = server.request("GET", "/slots")
    # the slot that answered holds the whole second prompt (its first turn was not evaluated again)
    assert max(s["n_tokens"] for s in slots["slots"]) >= second.usage.prompt_tokens


def _two_concurrent_greedy_chats(client, reference, n):
    """CHAT[0] and CHAT[1] at once, greedy, n tokens each; each answer checked against `reference` in process."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda m: client.chat.completions.create(model=MODEL, messages=m, temperature=0,
                                                                    max_tokens=n, logprobs=True), CHAT[:2]))
    for messages, r in zip(CHAT[:2], got):
        assert_greedy(reference, _chat_tokens(reference, messages), _chat_pieces(r), n)
    return got


def test_exact_prefill_serves_several_conversations(smollm_path):
    # --lazy-prefill exact with 2 slots: each new prompt is evaluated alone with every layer full, then
    # trimmed into the shared cache. Two concurrent chats, then one's next turn (evaluated anew: its lazy
    # layers were trimmed), each as a one-conversation exact Llama answers it. A window shorter than the
    # prompts, so that exact prefill differs from streaming here.
    lazy = dict(lazy_layers=list(range(15, 30)), n_window=16, lazy_prefill="exact")
    s = Server("--parallel", "2", "--n-ctx", "2048", "--lazy-layers", ",".join(map(str, range(15, 30))), "--n-window", "16",
               "--lazy-prefill", "exact")
    try:
        exact = Llama(smollm_path, n_ctx=2048, n_threads=2, **lazy)
        client = s.client()
        got = _two_concurrent_greedy_chats(client, exact, 24)
        history = CHAT[0] + [{"role": "assistant", "content": got[0].choices[0].message.content},
                             {"role": "user", "content": "Say it again, shorter."}]
        second = client.chat.completions.create(model=MODEL, messages=history, temperature=0, max_tokens=16,
                                                logprobs=True)
        assert_greedy(exact, _chat_tokens(exact, history), _chat_pieces(second), 16)
        assert s.request("GET", "/health")[0] == 200
    finally:
        assert s.stop() == 0


def test_dynamic_mode_chooses_lazy_layers_per_slot(smollm_path):
    # --lazy-mode dynamic with 2 slots: each new prompt is probed alone and its slot keeps the layers it
    # chose; the other slot keeps its own. Each chat answers as a one-conversation dynamic Llama does (f16
    # rings there, the same f16 keys kept in the pool here), and /slots says which layers each slot trims.
    s = Server("--parallel", "2", "--n-ctx", "2048", "--lazy-mode", "dynamic", "--n-window", "16", "--lazy-type", "f16")
    try:
        alone = Llama(smollm_path, n_ctx=2048, n_threads=2, lazy_mode="dynamic", n_window=16, lazy_type="f16")
        _two_concurrent_greedy_chats(s.client(), alone, 24)
        chosen = []
        for messages in CHAT[:2]:
            alone.reset()
            alone.eval(_chat_tokens(alone, messages))
            chosen.append(alone.kv_cache_stats()["lazy_layers"])
        assert any(chosen)  # the probe found lazy layers for these prompts
        slots = s.request("GET", "/slots")[1]["slots"]
        assert sorted(slot["lazy_layers"] for slot in slots) == sorted(chosen)
        # Under load: slots taken and given back, layers split into groups and merged again as prompts come
        # and go; every request is answered and the server stays healthy.
        client = s.client()
        prompts = ["Hi", "Tell me about the moon. " * 20, "List three fruits.", "Explain gravity in detail. " * 60]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda i: client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompts[i % 4]}], max_tokens=8 + 4 * (i % 3),
                temperature=0.7, seed=i).usage.completion_tokens, range(12)))
        assert len(got) == 12 and all(0 <= n <= 16 for n in got)
        assert s.request("GET", "/health") == (200, {"status": "ok"})
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("body,status,match", [
    (None, 400, ""),  # malformed JSON (sent raw below)
    ({"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
    ({"model": MODEL, "prompt": "word " * 5000}, 400, "exceed context window"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"99999999": 1}}, 400, "vocabulary"),
    ({"model": MODEL, "prompt": ["a", "b"]}, 400, "one prompt"),
])
def test_bad_completion_requests_get_openai_errors(server, body, status, match):
    if body is None:
        got_status, got = server.request("POST", "/v1/completions", raw="{not json")
    else:
        got_status, got = server.request("POST", "/v1/completions", body)
    assert got_status == status, got
    assert set(got["error"]) == {"message", "type", "param", "code"} and match in got["error"]["message"]
    assert server.request("GET", "/health") == (200, {"status": "ok"})


@pytest.mark.parametrize("body,match", [
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": "hello"}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": MODEL, "messages": [{"content": "no role"}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 2}, "top_p"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "grammar": "not gbnf"}, "grammar is not valid GBNF"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
     "response_format"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": WEATHER,
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "Tool choice 'nope' not found"),
])
def test_bad_chat_requests_get_400(server, body, match):
    status, got = server.request("POST", "/v1/chat/completions", body)
    assert status == 400 and match in got["error"]["message"], got
    status, _ = server.request("POST", "/v1/chat/completions",
                               {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 200


def test_structured_output_and_tool_calls_through_the_openai_client(server):
    """response_format (OpenAI's json_schema form) and a named tool_choice go through llama-cpp-python's
    chat handler into a grammar that the server slot samples with."""
    client = server.client()
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a cat as JSON."}], max_tokens=100, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}})
    value = json.loads(out.choices[0].message.content, strict=False)
    assert isinstance(value["name"], str) and isinstance(value["age"], int)
    call = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=60,
        tools=WEATHER, tool_choice={"type": "function", "function": {"name": "get_weather"}}, seed=1)
    tool_call = call.choices[0].message.tool_calls[0]
    assert tool_call.function.name == "get_weather" and isinstance(json.loads(tool_call.function.arguments)["city"], str)
    status, got = server.request("POST", "/v1/completions", {"model": MODEL, "prompt": "Is the sky blue? Answer:",
                                                             "max_tokens": 4, "grammar": 'root ::= " yes" | " no"'})
    assert status == 200 and got["choices"][0]["text"] in (" yes", " no")


def test_tokenize_routes(server, local):
    status, got = server.request("POST", "/extras/tokenize", {"input": "Hello world"})
    assert status == 200 and got["tokens"] == local.tokenize(b"Hello world", special=True)
    assert server.request("POST", "/extras/tokenize/count", {"input": "Hello world"}) == (200, {"count": len(got["tokens"])})
    assert server.request("POST", "/extras/detokenize", {"tokens": got["tokens"]})[1]["text"].endswith("Hello world")


def _eos_ban(local):
    return {str(t): -100 for t in local.eog_tokens()}


def test_a_client_that_drops_mid_stream_frees_its_slot(server, local):
    body = json.dumps({"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 1500, "stream": True,
                       "logit_bias": _eos_ban(local)})
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    received = b""
    while received.count(b"data: ") < 3:
        received += sock.recv(4096)
    _, slots = server.request("GET", "/slots")
    assert [s["state"] for s in slots["slots"]].count("processing") == 1
    sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, slots = server.request("GET", "/slots")
        if all(s["state"] == "idle" for s in slots["slots"]):
            break
        time.sleep(0.05)
    assert all(s["state"] == "idle" for s in slots["slots"]), slots
    assert max(s["n_tokens"] for s in slots["slots"]) < 1000  # stopped long before its 1500 tokens
    status, _ = server.request("POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert status == 200


def test_bounded_load(server):
    """32 requests from 8 concurrent clients, mixed lengths: each gets its whole answer (or a clean error:
    none here, the queue holds them), none is lost, and the server is healthy afterwards."""
    client = server.client()
    prompts = ["Hi", "Tell me about the moon. " * 20, "List three fruits.", "Explain gravity in detail. " * 60]

    def one(i):
        max_tokens = 8 + 8 * (i % 5)
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompts[i % 4]}],
                                           max_tokens=max_tokens, temperature=0.7, seed=i)
        choice = r.choices[0]
        assert choice.finish_reason in ("stop", "length")
        assert r.usage.completion_tokens <= max_tokens
        assert choice.finish_reason == "stop" or r.usage.completion_tokens == max_tokens
        return i

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        done = list(pool.map(one, range(32)))
    assert done == list(range(32)) and time.monotonic() - t0 < 600
    assert server.request("GET", "/health") == (200, {"status": "ok"})
    _, slots = server.request("GET", "/slots")
    assert slots["queued"] == 0 and all(s["state"] == "idle" for s in slots["slots"])


def test_api_key_and_full_queue(local):
    """--api-key guards every route; with one slot and a queue of one, a third request gets 503."""
    s = Server("--parallel", "1", "--queue-size", "1", "--n-ctx", "2048", "--api-key", "sesame")
    try:
        # No lazy flags: the server uses the profile shipped for the embedded model.
        assert s.request("GET", "/slots")[1]["lazy_layers"]
        assert s.request("GET", "/v1/models", headers={"Authorization": ""})[0] == 401
        status, got = s.request("GET", "/health", headers={"Authorization": "Bearer wrong"})
        assert status == 401 and got["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            s.client(key="wrong").models.list()
        assert s.client().chat.completions.create(model=MODEL, messages=CHAT[3], max_tokens=4).choices

        long = {"model": MODEL, "prompt": "Count: 1, 2,", "max_tokens": 1500, "stream": True,
                "logit_bias": _eos_ban(local)}
        results = {}

        def run(name):
            try:
                results[name] = s.request("POST", "/v1/completions", long)
            except (http.client.HTTPException, OSError) as e:  # the shutdown below cuts the stream
                results[name] = e

        first = threading.Thread(target=run, args=("first",))
        first.start()
        _wait(s, lambda st: st["slots"][0]["state"] == "processing")
        second = threading.Thread(target=run, args=("second",))
        second.start()
        _wait(s, lambda st: st["queued"] == 1)
        status, got = s.request("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert status == 503 and got["error"]["code"] == "server_busy"
    finally:
        assert s.stop() == 0  # SIGTERM with requests in flight: they end, the process exits cleanly
    first.join(30)
    second.join(30)
    assert set(results) == {"first", "second"}  # neither client was left hanging


def _wait(server, cond, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, st = server.request("GET", "/slots")
        if status == 200 and cond(st):
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out: {st}")


def test_serve_with_its_layers_on_rpc_servers(local):
    # `simkv serve --rpc ... -ngl -1`: the slots' decode steps run on two ggml RPC servers (their own, as a
    # server takes one client at a time), and answer as the same model in process does.
    require_rpc()
    rpcs = [start_rpc_server() for _ in range(2)]
    s = None
    try:
        s = Server("--parallel", "2", "--n-ctx", "2048", "--no-lazy", "--rpc", ",".join(e for _, e in rpcs), "-ngl", "-1")
        status, slots = s.request("GET", "/slots")
        assert status == 200
        assert sorted(slots["devices"]) == sorted(f"RPC0[{e}]" for _, e in rpcs), slots["devices"]
        _two_concurrent_greedy_chats(s.client(), local, 16)
    finally:
        if s is not None:
            assert s.stop() == 0
        for proc, _ in rpcs:
            stop_rpc_server(proc)
