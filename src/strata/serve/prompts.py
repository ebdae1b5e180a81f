"""Turning request prompts into token ids: completion prompts, chat templates, and the length checks.

Tokenization happens on the server's event loop, before a request reaches the engine, so that the server
knows every prompt's length (usage, the max_tokens check) and answers 400 before anything is queued.
The engine thread detokenizes with its own tokenizer; the server uses a private copy so the two threads
never share one (fast tokenizers are not safe to share across threads).
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any

from strata.core.sampling_params import ParameterError

logger = logging.getLogger("strata.serve")

_CONTINUE_MARK = "\u2063strata-continue\u2063"


class ServerTokenizer:
    def __init__(self, tokenizer: Any, chat_template: str | None = None, vocab_size: int | None = None):
        try:
            self.tok = copy.deepcopy(tokenizer)
        except Exception:  # noqa: BLE001 - fall back to sharing; encode/decode only, no state changes
            logger.warning("could not copy the tokenizer; sharing it with the engine thread")
            self.tok = tokenizer
        if chat_template and os.path.exists(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        self.chat_template = chat_template
        hf = getattr(self.tok, "hf", None)
        sizes = [getattr(self.tok, "vocab_size", 0) or 0]
        if hf is not None:
            try:
                sizes.append(len(hf))
            except TypeError:
                pass
        # ids the model accepts (its embedding may be larger than the tokenizer's vocabulary)
        self.vocab_size = vocab_size or max(sizes)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_str(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

    def token_strs(self, ids: list[int]) -> list[str]:
        hf = getattr(self.tok, "hf", None)
        if hf is not None:
            return [str(t) for t in hf.convert_ids_to_tokens(ids)]
        return [self.token_str(i) for i in ids]

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool, continue_final_message: bool,
                    chat_template: str | None = None, kwargs: dict | None = None) -> str:
        """The conversation as the model's chat template writes it. With continue_final_message, the text ends
        right after the final (assistant) message's content, so the model continues it."""
        template = chat_template or self.chat_template
        msgs = messages
        if continue_final_message:
            if messages[-1].get("role") != "assistant":
                raise ParameterError("continue_final_message",
                                     "continue_final_message needs the final message to be from the assistant")
            msgs = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + _CONTINUE_MARK}]
        text = self._apply(msgs, add_generation_prompt=add_generation_prompt and not continue_final_message,
                           template=template, kwargs=kwargs or {})
        if continue_final_message:
            cut = text.rfind(_CONTINUE_MARK)
            if cut < 0:
                raise ParameterError("continue_final_message",
                                     "the chat template did not keep the final message's content")
            text = text[:cut]
        return text

    def _apply(self, messages, *, add_generation_prompt: bool, template: str | None, kwargs: dict) -> str:
        extra = dict(kwargs)
        if template is not None:
            extra["chat_template"] = template
        try:
            return self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                tokenize=False, **extra)
        except ParameterError:
            raise
        except Exception as e:  # noqa: BLE001 - template errors (or no template) are the request's problem
            raise ParameterError("messages", f"the chat template failed on these messages: "
                                             f"{type(e).__name__}: {e}") from None


def check_token_ids(ids: list[int], vocab_size: int, param: str = "prompt") -> None:
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0 or t >= vocab_size:
            raise ParameterError(param, f"token id {t!r} is outside the vocabulary [0, {vocab_size})")


def completion_prompts(tok: ServerTokenizer, prompt: Any, add_special_tokens: bool) -> list[tuple[str | None, list[int]]]:
    """The prompts of a /v1/completions request as (text or None, token ids)."""
    if prompt is None:
        raise ParameterError("prompt", "prompt is required")
    if isinstance(prompt, str):
        items: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        items = [list(prompt)]
    elif isinstance(prompt, list):
        items = list(prompt)
    else:
        raise ParameterError("prompt", "prompt must be a string, a list of strings, a list of token ids "
                                       "or a list of lists of token ids")
    if not items:
        raise ParameterError("prompt", "prompt must not be empty")
    out = []
    for p in items:
        if isinstance(p, str):
            if not p:
                raise ParameterError("prompt", "prompt must not be empty")
            ids = tok.encode(p, add_special_tokens)
            if not ids:
                raise ParameterError("prompt", "prompt is empty after tokenization")
            out.append((p, ids))
        else:
            if not p:
                raise ParameterError("prompt", "prompt must not be empty")
            check_token_ids(p, tok.vocab_size)
            out.append((None, list(p)))
    return out


def check_lengths(num_prompt: int, max_tokens: int | None, max_model_len: int, *, prompt_param: str,
                  max_tokens_param: str, prompt_word: str = "prompt") -> None:
    if num_prompt >= max_model_len:
        raise ParameterError(prompt_param,
                             f"This model's maximum context length is {max_model_len} tokens. However, your "
                             f"{prompt_word} has {num_prompt} tokens, which leaves no room for a completion. "
                             f"Please reduce the length of the {prompt_word}.")
    if max_tokens is not None and num_prompt + max_tokens > max_model_len:
        raise ParameterError(max_tokens_param,
                             f"This model's maximum context length is {max_model_len} tokens. However, you "
                             f"requested {num_prompt + max_tokens} tokens ({num_prompt} in the {prompt_word}, "
                             f"{max_tokens} in the completion). Please reduce the length of the {prompt_word} "
                             f"or {max_tokens_param}.")
