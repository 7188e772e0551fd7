"""Chat completion with the model's own chat template (`tokenizer.chat_template`, Jinja2).

Rendering and the chat-shaped result come from the pinned llama-cpp-python (its Jinja2ChatFormatter
and completion-to-chat conversion), so prompts and dicts are the ones its users already get.
"""
from __future__ import annotations

from typing import List, Optional, Union

import jinja2

from llama_cpp.llama_chat_format import Jinja2ChatFormatter, _convert_completion_to_chat

from .completion import create_completion


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

    def render(self, messages: List[dict]):
        """(prompt tokens, stop strings) for `messages`, ready for an assistant reply."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
        try:
            result = self.formatter(messages=messages)
        except jinja2.TemplateError as e:  # a message the template cannot render (missing content, ...)
            raise ValueError(f"the chat template cannot render these messages: {e}") from None
        tokens = self.llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        stop = result.stop if isinstance(result.stop, list) else [result.stop]
        return tokens, [s for s in stop if s]


def create_chat_completion(
    llm,
    messages: List[dict],
    temperature: float = 0.2,
    top_p: float = 0.95,
    top_k: int = 40,
    min_p: float = 0.05,
    stream: bool = False,
    stop: Optional[Union[str, List[str]]] = None,
    seed: Optional[int] = None,
    max_tokens: Optional[int] = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repeat_penalty: float = 1.0,
    logprobs: bool = False,
    top_logprobs: Optional[int] = None,
    logit_bias: Optional[dict] = None,
    token_source=None,
    model: Optional[str] = None,
):
    """token_source / model: where tokens come from and the model's name in the result (completion.py);
    `simkv serve` passes its scheduler's slot and its model alias."""
    tokens, template_stop = llm.chat_template().render(messages)
    user_stop = [stop] if isinstance(stop, str) else list(stop or [])
    completion = create_completion(
        llm, tokens, stream=stream, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        min_p=min_p, repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty, stop=user_stop + template_stop, seed=seed,
        logprobs=(top_logprobs or 0) if logprobs else None, logit_bias=logit_bias, token_source=token_source,
        model=model,
    )
    return _convert_completion_to_chat(completion, stream=stream)
