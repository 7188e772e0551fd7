"""`simkv serve`: an OpenAI-compatible HTTP server, several conversations at once.

The routes and the request and response shapes are llama-cpp-python's server's (`/v1/completions`,
`/v1/chat/completions` with server-sent events ending in `data: [DONE]`, `/v1/models`, `/extras/tokenize`,
`/extras/tokenize/count`, `/extras/detokenize`), plus `/health` and `/slots` (the KV cache per slot and in
total). FastAPI and uvicorn carry HTTP, sse-starlette the event streams (the `[server]` extra).

Requests run through the continuous-batching scheduler (scheduler.py): each holds a slot (one sequence of
the per-layer cache) while it generates, and every slot decodes in the same batches. Errors use OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request, 401 without the API key,
404 for another model, 503 when every slot is busy and the queue is full.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import signal
import sys
from typing import Dict, List, Literal, Optional, Union

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from .chat import create_chat_completion
from .completion import create_completion
from .scheduler import CacheFull, QueueFull, Scheduler, SchedulerStopped


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


# --- request bodies (OpenAI's fields; unknown ones are ignored, as OpenAI clients send extras) ------------
class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(0.95, ge=0.0, le=1.0)
    top_k: int = Field(40, ge=0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, gt=0.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    seed: Optional[int] = Field(None, ge=0)
    logit_bias: Optional[Dict[str, float]] = None
    # llama-cpp-python's server's extra sampling fields
    typical_p: float = Field(1.0, ge=0.0, le=1.0)
    mirostat_mode: int = Field(0, ge=0, le=2)
    mirostat_tau: float = Field(5.0, gt=0.0)
    mirostat_eta: float = Field(0.1, gt=0.0)
    grammar: Optional[str] = Field(None, description="GBNF that the output must match")
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    user: Optional[str] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, List[int], List[str]] = ""
    max_tokens: Optional[int] = Field(16, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False


class _Function(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: Optional[str] = None
    parameters: Dict[str, object] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class _Tool(BaseModel):
    type: Literal["function"] = "function"
    function: _Function


class _NamedFunction(BaseModel):
    name: str


class _ToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: _NamedFunction


class _ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    schema_: Optional[Dict[str, object]] = Field(None, alias="schema")
    json_schema: Optional[Dict[str, object]] = None


class ChatCompletionRequest(_Sampling):
    messages: List[Dict[str, object]] = Field(min_length=1)
    temperature: float = Field(0.2, ge=0.0, le=2.0)
    max_tokens: Optional[int] = Field(None, ge=0)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[List[_Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], _ToolChoice]] = None
    functions: Optional[List[_Function]] = None
    function_call: Optional[Union[Literal["none", "auto"], _NamedFunction]] = None
    response_format: Optional[_ResponseFormat] = None

    def constraints(self) -> dict:
        """tools, functions and response_format as llama-cpp-python's chat handlers take them (plain dicts)."""
        dump = lambda x: None if x is None else (x if isinstance(x, str) else x.model_dump(by_alias=True, exclude_none=True))  # noqa: E731
        return dict(tools=None if self.tools is None else [dump(t) for t in self.tools],
                    functions=None if self.functions is None else [dump(f) for f in self.functions],
                    tool_choice=dump(self.tool_choice), function_call=dump(self.function_call),
                    response_format=dump(self.response_format))


class TokenizeRequest(BaseModel):
    input: str
    model: Optional[str] = None


class DetokenizeRequest(BaseModel):
    tokens: List[int]
    model: Optional[str] = None


def create_app(llm, scheduler: Scheduler, model_name: str, api_key: Optional[str] = None) -> FastAPI:
    """The app for one model; `llm` has n_seq_max slots, driven by `scheduler` (stopped with the app)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await anyio.to_thread.run_sync(scheduler.stop)

    app = FastAPI(title="simkv", lifespan=lifespan)

    async def authenticate(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", "authentication_error",
                           code="invalid_api_key")

    auth = [Depends(authenticate)]

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error")

    def check_model(name: Optional[str]) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"the model '{name}' does not exist: this server serves '{model_name}'",
                           param="model", code="model_not_found")

    def sampling(body: _Sampling) -> dict:
        bias = None
        if body.logit_bias:
            try:
                bias = {int(k): v for k, v in body.logit_bias.items()}
            except ValueError:
                raise ApiError(400, "logit_bias keys must be token ids", param="logit_bias") from None
        return dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                    repeat_penalty=body.repeat_penalty, frequency_penalty=body.frequency_penalty,
                    presence_penalty=body.presence_penalty, stop=body.stop, seed=body.seed, logit_bias=bias,
                    typical_p=body.typical_p, mirostat_mode=body.mirostat_mode, mirostat_tau=body.mirostat_tau,
                    mirostat_eta=body.mirostat_eta, grammar=body.grammar, token_source=scheduler.tokens,
                    model=model_name)

    async def run(make, stream: bool):
        """Start the completion on a worker thread; errors before its first chunk become HTTP errors."""
        try:
            if not stream:
                return await anyio.to_thread.run_sync(make)
            chunks = iter(await anyio.to_thread.run_sync(make))
            first = await anyio.to_thread.run_sync(next, chunks)  # the prompt is read: errors surface here
        except (QueueFull, CacheFull) as e:
            raise ApiError(503, f"the server is busy: {e}; retry later", "server_error", code="server_busy") from None
        except SchedulerStopped as e:
            raise ApiError(503, str(e), "server_error") from None
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e)) from None
        return EventSourceResponse(_events(first, chunks), ping=15)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest):
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request", param="prompt")
            prompt = prompt[0]
        if body.echo and body.logprobs is not None:
            raise ApiError(400, "echo with logprobs is not supported by this server", param="echo")
        kw = sampling(body)
        return await run(lambda: create_completion(llm, prompt, stream=body.stream, max_tokens=body.max_tokens,
                                                   logprobs=body.logprobs, echo=body.echo, **kw), body.stream)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest):
        check_model(body.model)
        kw = dict(sampling(body), **body.constraints())
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await run(lambda: create_chat_completion(llm, body.messages, stream=body.stream, max_tokens=max_tokens,
                                                        logprobs=body.logprobs, top_logprobs=body.top_logprobs, **kw),
                         body.stream)

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "me", "permissions": []}]}

    @app.post("/extras/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        return {"tokens": llm.tokenize(body.input.encode("utf-8"), special=True)}

    @app.post("/extras/tokenize/count", dependencies=auth)
    async def tokenize_count(body: TokenizeRequest):
        check_model(body.model)
        return {"count": len(llm.tokenize(body.input.encode("utf-8"), special=True))}

    @app.post("/extras/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        try:
            text = llm.detokenize(body.tokens).decode("utf-8", errors="replace")
        except (ValueError, TypeError, OverflowError) as e:
            raise ApiError(400, f"cannot detokenize: {e}", param="tokens") from None
        return {"text": text}

    @app.get("/health", dependencies=auth)
    async def health():
        return {"status": "ok"}

    @app.get("/slots", dependencies=auth)
    async def slots():
        """The KV cache per slot (tokens held, bytes of its own) and in total."""
        return await anyio.to_thread.run_sync(scheduler.slot_stats)

    return app


async def _events(first, chunks):
    """Server-sent events: each chunk as JSON, then [DONE]. A client that goes away cancels this; the
    worker's current wait ends with the next token, and closing the chunks frees the request's slot."""
    try:
        yield {"data": json.dumps(first)}
        while True:
            chunk = await anyio.to_thread.run_sync(next, chunks, None)
            if chunk is None:
                break
            yield {"data": json.dumps(chunk)}
        yield {"data": "[DONE]"}
    except Exception as e:  # after the 200: the error goes into the stream, OpenAI's shape
        yield {"data": json.dumps({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})}
    finally:
        await anyio.to_thread.run_sync(chunks.close)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(llm, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None, max_queue: int = 64,
          model_name: Optional[str] = None) -> None:
    """Run the server until SIGINT/SIGTERM (uvicorn's handlers stop it cleanly; the scheduler stops with it)."""
    import uvicorn

    if not is_loopback(host) and api_key is None:
        print(f"simkv serve: warning: listening on {host} without --api-key: anyone who can reach this port can "
              "use the model", file=sys.stderr)
    scheduler = Scheduler(llm, max_queue=max_queue)
    app = create_app(llm, scheduler, model_name or llm.model_path, api_key)
    # uvicorn shuts down cleanly on SIGINT/SIGTERM, then raises the signal again for the handler it found:
    # SIGTERM's then ends the process with status 0 (SIGINT's is Python's KeyboardInterrupt: status 130).
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_cleanly(signum, frame):
    raise SystemExit(0)
