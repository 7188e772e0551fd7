"""Chat completion through llama-cpp-python's own chat handlers.

The prompt, the grammar for `response_format` (JSON, JSON schema) and for `tools`/`functions`, and the
conversion of a completion into a chat message or tool call all come from the pinned llama-cpp-python
(`llama_chat_format`): its handler gets this Llama as `llama` and calls back its `create_completion`, so
users get the prompts and dicts they already know. The handler is the Llama's `chat_handler`, else the one
registered as its `chat_format` ("chatml", "chatml-function-calling", "functionary", ...), else one made
from the model's own template (`tokenizer.chat_template`, Jinja2), as llama-cpp-python chooses.
"""
from __future__ import annotations

from typing import List, Optional

import jinja2

from llama_cpp.llama_chat_format import (Jinja2ChatFormatter, LlamaChatCompletionHandlerNotFoundException,
                                         get_chat_completion_handler)

from .completion import create_completion


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")


class ChatTemplate:
    """The model's chat template with its BOS/EOS strings; renders messages to prompt tokens."""

    def __init__(self, llm):
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{llm.model_path} has no tokenizer.chat_template: use create_completion instead")
        self.llm = llm
        self.eos_token = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", errors="ignore")
        self.bos_token = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", errors="ignore")
        try:
            self.formatter = Jinja2ChatFormatter(template=template, eos_token=self.eos_token, bos_token=self.bos_token,
                                                 stop_token_ids=[llm.token_eos()])
        except jinja2.TemplateError as e:
            raise ValueError(f"{llm.model_path} has a chat template Jinja2 cannot read: {e}") from None

        self.handler = self.formatter.to_chat_handler()

    def render(self, messages: List[dict]):
        """(prompt tokens, stop strings) for `messages`, ready for an assistant reply."""
        check_messages(messages)
        try:
            result = self.formatter(messages=messages)
        except jinja2.TemplateError as e:  # a message the template cannot render (missing content, ...)
            raise ValueError(f"the chat template cannot render these messages: {e}") from None
        tokens = self.llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        stop = result.stop if isinstance(result.stop, list) else [result.stop]
        return tokens, [s for s in stop if s]


def chat_handler(llm):
    """The llama-cpp-python chat handler `llm` replies with (see the module docstring)."""
    if llm.chat_handler is not None:
        return llm.chat_handler
    if llm.chat_format is not None:
        try:
            return get_chat_completion_handler(llm.chat_format)
        except LlamaChatCompletionHandlerNotFoundException as e:
            raise ValueError(str(e)) from None
    return llm.chat_template().handler


class _SlotLlama:
    """The Llama as a chat handler sees it when a server slot generates: its completions draw their tokens
    from `token_source` (scheduler.py); everything else is the Llama's."""

    def __init__(self, llm, token_source):
        self._llm, self._token_source = llm, token_source

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def create_completion(self, prompt, **kwargs):
        return create_completion(self._llm, prompt, token_source=self._token_source, **kwargs)


def llama_cpp_response_format(response_format: dict) -> Optional[dict]:
    """OpenAI's structured-output form {"type": "json_schema", "json_schema": {"schema": ...}} as
    llama-cpp-python's handlers take it ({"type": "json_object", "schema": ...}); "text" constrains nothing."""
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise TypeError("response_format must be a dict with a 'type'")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
        return {"type": "json_object", "schema": spec["schema"]}
    if kind != "json_object":
        raise ValueError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    return response_format


def create_chat_completion(llm, messages: List[dict], token_source=None, **kwargs):
    """A `chat.completion` dict, or an iterator of chunks with stream=True. kwargs: those of llama-cpp-python's
    create_chat_completion (given in full: a handler's own defaults differ). token_source: where tokens come
    from (completion.py; `simkv serve` passes its scheduler's slot)."""
    check_messages(messages)
    if kwargs.get("logprobs") and kwargs.get("top_logprobs") is None:
        # OpenAI: logprobs=True alone gives the chosen tokens' logprobs (llama-cpp-python's handlers would
        # give none without top_logprobs).
        kwargs["top_logprobs"] = 0
    if kwargs.get("response_format") is not None:
        kwargs["response_format"] = llama_cpp_response_format(kwargs["response_format"])
    handler = chat_handler(llm)
    target = llm if token_source is None else _SlotLlama(llm, token_source)
    try:
        return handler(llama=target, messages=messages, **kwargs)
    except jinja2.TemplateError as e:  # a message the template cannot render (missing content, ...)
        raise ValueError(f"the chat template cannot render these messages: {e}") from None
