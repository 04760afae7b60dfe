"""OpenAI's chat-completions shapes: the request read from JSON, the response and stream chunks, the error object.

``parse_chat_request`` turns a request body into a ``ChatRequest`` or raises an ``APIError`` (a 400 that
names the parameter; 404 for another model). Every number is checked for its JSON type (``true`` is no
number) and its range, within what the device programs hold (``sampling.check_sampling``); ``parse_json``
refuses what Python's json would read but JSON is not, and what no later layer could take. A parameter we do not implement is refused, unless it has its
neutral value (``NEUTRAL``). A conversation maps onto the model's template: earlier user/assistant turns
become the history, the last user message the query, every image of the user messages an image, in order
(none is fine); system messages are put before the first question.

A stream is server-sent events: one ``data:`` line of JSON per chunk (:func:`sse`), ``SSE_DONE`` last.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets
from typing import Optional

from cogvlm_jax.generation.sampling import INT32_MAX, SEED_RANGE


class APIError(Exception):
    """An error answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------- the request
# Parameters we implement, and parameters accepted only at their neutral value (anything else is a 400).
SUPPORTED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
             "stop", "stream", "stream_options", "n",
             # identifiers and bookkeeping that change no answer
             "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}
NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (False,), "top_logprobs": (0,),
           "logit_bias": ({},), "tools": ([],), "tool_choice": ("none", "auto"), "parallel_tool_calls": (True, False),
           "functions": ([],), "function_call": ("none", "auto"), "response_format": ({"type": "text"},),
           "modalities": (["text"],)}


@dataclasses.dataclass
class ChatRequest:
    query: str
    history: list
    image_urls: tuple  # every image_url of the user messages, in order
    max_tokens: Optional[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple
    stream: bool
    include_usage: bool


def _number(body, name, default, lo, hi, integer=False, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, (int,) if integer else (int, float)):
        raise APIError(400, f"'{name}' must be {kind}, got {json.dumps(v)}", name)
    if v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {'inf)' if hi is None else f'{hi}]'}"
        raise APIError(400, f"'{name}' must be in {rng}, got {v}", name)
    return v


def _neutral(value, options) -> bool:
    """Whether ``value`` is one of a parameter's neutral ``options``, of the same JSON type (false is not 0)."""
    return any(type(value) is type(o) and value == o for o in options)


class VideoURL(str):
    """The URL of a ``video_url`` part (a video model's input): a ``str`` that says it is a video."""


def _content(message: dict, index: int) -> tuple[str, list]:
    """(text, image and video URLs in order) of one message's content: a string, or a list of text /
    image_url / video_url parts (OpenAI-style: ``{"type": "video_url", "video_url": {"url": ...}}``; a
    ``VideoURL``)."""
    content = message.get("content")
    where = f"messages[{index}]"
    if content is None or isinstance(content, str):
        return content or "", []
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of parts", "messages")
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}.content[{j}].text must be a string", "messages")
            texts.append(part["text"])
        elif kind in ("image_url", "video_url"):
            url = part.get(kind)
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise APIError(400, f"{where}.content[{j}].{kind}.url must be a string", "messages")
            images.append(VideoURL(url) if kind == "video_url" else url)
        else:
            raise APIError(400, f"{where}.content[{j}]: unsupported content part type {json.dumps(kind)} "
                                "(supported: text, image_url, video_url)", "messages")
    return "\n".join(texts), images


def parse_messages(messages) -> tuple[str, list, list]:
    """OpenAI messages -> (query, history [(q, a), ...], every image URL of every user message, in order).
    One image is the official single-image prompt; several are one span each, in this order."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    system, history, pending, images = [], [], [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if m.get("tool_calls") or m.get("function_call"):
            raise APIError(400, f"messages[{i}]: tool calls are not supported", "messages")
        text, urls = _content(m, i)
        if urls and role != "user":
            raise APIError(400, f"messages[{i}]: only user messages may carry an image", "messages")
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            pending.append(text)
            images += urls
        elif role == "assistant":
            if not pending:
                raise APIError(400, f"messages[{i}]: an assistant message must follow a user message", "messages")
            history.append(("\n".join(pending), text))
            pending = []
        else:
            raise APIError(400, f"messages[{i}]: unsupported role {json.dumps(role)} "
                                "(supported: system, developer, user, assistant)", "messages")
    if not pending:
        raise APIError(400, "the last message must be a user message", "messages")
    query = "\n".join(pending)
    if system:
        prefix = "\n".join(system)
        if history:
            history[0] = (f"{prefix}\n{history[0][0]}", history[0][1])
        else:
            query = f"{prefix}\n{query}"
    return query, history, images


def parse_chat_request(body, model_name: str) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for key, value in body.items():
        if key in SUPPORTED or value is None:
            continue
        if key in NEUTRAL and _neutral(value, NEUTRAL[key]):
            continue
        what = "is not supported" if key in NEUTRAL else "is not a parameter this server knows"
        raise APIError(400, f"'{key}' {what} (got {json.dumps(value)[:80]})", key, "unsupported_parameter")
    if _number(body, "n", 1, 1, None, integer=True) != 1:
        raise APIError(400, f"'n' > 1 is not supported (got {body['n']}): ask once per answer", "n",
                       "unsupported_parameter")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"The model {json.dumps(model)} does not exist: this server serves "
                            f"{json.dumps(model_name)}", "model", "model_not_found")
    query, history, images = parse_messages(body.get("messages"))
    max_tokens = _number(body, "max_completion_tokens", None, 1, None, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", None, 1, None, integer=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 16
                             or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 16 of them", "stop")
    stream = body.get("stream", False) or False
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise APIError(400, "'stream_options' supports only include_usage", "stream_options")
    if not isinstance(options.get("include_usage", False), bool):
        raise APIError(400, "'stream_options.include_usage' must be true or false", "stream_options")
    if options and not stream:  # as OpenAI: usage would silently never come
        raise APIError(400, "'stream_options' is allowed only with 'stream': true", "stream_options")
    seed = _number(body, "seed", None, SEED_RANGE[0], SEED_RANGE[1], integer=True)
    if seed is None:
        seed = secrets.randbits(31)
    return ChatRequest(
        query=query, history=history, image_urls=tuple(images), max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1, lo_open=True)),
        top_k=int(_number(body, "top_k", 0, 0, INT32_MAX, integer=True)), seed=seed,
        stop=tuple(stop or ()), stream=stream, include_usage=bool(options.get("include_usage")))


MAX_JSON_DEPTH = 32  # nesting a request body may have (an image part of a message is 6 deep)
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a str holding one is no Unicode text


def _invalid_json(message: str) -> APIError:
    return APIError(400, f"request body is not valid JSON: {message}", code="invalid_json")


def _not_json(name: str):
    """Python's json reads NaN and Infinity, which JSON has not (a NaN temperature passed every range check)."""
    raise _invalid_json(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    """A JSON number with a fraction or exponent; one too large for a double (1e400) is refused, not inf."""
    v = float(text)
    if not math.isfinite(v):
        raise _invalid_json(f"the number {text[:40]} is out of range")
    return v


def _check_tree(value, escaped: bool) -> None:
    """Refuse nesting deeper than ``MAX_JSON_DEPTH`` and strings with lone surrogates (escapes like
    \\ud800 that name no character: no tokenizer or encoder can take them). Iterative: no recursion limit.
    ``escaped``: whether the body has a \\u escape at all (strict UTF-8 cannot spell a surrogate, so only an
    escape makes one); an ASCII string (``isascii`` reads a flag) has none either."""
    todo = [(value, 1)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise _invalid_json(f"nested deeper than {MAX_JSON_DEPTH} levels")
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, x in items:
                if isinstance(k, str):
                    todo.append((k, depth))
                todo.append((x, depth + 1))
        elif escaped and isinstance(v, str) and not v.isascii() and LONE_SURROGATE.search(v):
            raise _invalid_json("a string holds a lone UTF-16 surrogate (an invalid \\u escape): not a character")


def parse_json(raw: bytes):
    """A request body's JSON or a 400 ``invalid_json``: the body must be UTF-8 (strict: Python's json
    reads bytes with ``surrogatepass``), and NaN, Infinity and numbers a double cannot hold, integers of
    more digits than Python converts, nesting deeper than ``MAX_JSON_DEPTH`` and lone surrogates are
    refused with the rest of what is not JSON."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
    except UnicodeDecodeError as e:
        raise _invalid_json(f"not UTF-8: {e}") from None
    try:
        value = json.loads(text, parse_constant=_not_json, parse_float=_finite_float)
    except RecursionError:
        raise _invalid_json(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # json.JSONDecodeError, and int()'s limit on the digits of an integer literal
        raise _invalid_json(str(e)) from None
    _check_tree(value, "\\u" in text)
    return value


# ------------------------------------------------------------------------------------- the response
def completion_chunk(rid, created, model, delta, finish=None, include_usage=False, usage=None) -> dict:
    """A ``chat.completion.chunk``: one choice with ``delta``, or (``usage`` given) none and the usage. With
    ``include_usage`` every chunk has a ``usage`` field, null but in the last (OpenAI's stream shape)."""
    choices = [] if usage is not None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if include_usage:
        out["usage"] = usage
    return out


def usage(prompt_tokens, completion_tokens, cached_tokens=0) -> dict:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens the prefix cache held (not prefilled)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion(rid, created, model, text, finish, prompt_tokens, completion_tokens, cached_tokens=0) -> dict:
    """A whole ``chat.completion``: one choice, the assistant's ``text``."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def model_card(name: str, context_length: int, max_length: int) -> dict:
    """One entry of ``/v1/models``."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "cogvlm-jax",
            "context_length": context_length, "max_length": max_length}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"  # the stream's last event
