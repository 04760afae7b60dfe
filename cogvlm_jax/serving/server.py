"""An OpenAI-compatible HTTP server over the continuous-batching ``engine.Engine`` (FastAPI + uvicorn).

Routes: ``POST /v1/chat/completions`` (OpenAI's request and response shapes, SSE streaming),
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health`` and the chat page at ``/``. If the engine's
thread dies (a device failure it cannot recover from), every request, running or new, and ``/health`` get a
503 ``engine_failed`` error: the process must be restarted.

A conversation maps onto the model's template: earlier user/assistant turns become the history, the
last user message the query, the latest image in any user message the image (none is fine). System
messages are put before the first question. Every error is an OpenAI error object
``{"error": {"message", "type", "param", "code"}}`` with its HTTP status; a parameter we do not
support is a 400 that names it. Images come inline as ``data:`` URLs (any format PIL reads), or as
``file://`` URLs under ``--image-root`` only; the server never fetches ``http(s)://`` URLs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hmac
import json
import os
import secrets
import signal
import socket
import stat
import threading
import time
import uuid
from typing import Optional
from urllib.parse import unquote, urlsplit

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cogvlm_jax.generation.errors import InputError
from cogvlm_jax.inputs.preprocess import MAX_IMAGE_PIXELS, ImageError, ImageTooLargeError
from cogvlm_jax.serving.engine import (
    ContextLengthError,
    Engine,
    EngineFailedError,
    EngineStoppedError,
    QueueFullError,
    Request,
)

PAGE = os.path.join(os.path.dirname(__file__), "static", "chat.html")
MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_key: Optional[str] = None
    image_root: Optional[str] = None  # file:// image URLs are read only under this directory
    max_image_bytes: int = 20 * MiB
    max_image_pixels: int = MAX_IMAGE_PIXELS  # width x height an image may declare (checked before decoding)
    default_max_tokens: int = 256  # when a request sets neither max_tokens nor max_completion_tokens
    drain_seconds: float = 30.0


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
    image_url: Optional[str]
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


def _content(message: dict, index: int) -> tuple[str, Optional[str]]:
    """(text, last image URL) of one message's content: a string, or a list of text / image_url parts."""
    content = message.get("content")
    where = f"messages[{index}]"
    if content is None or isinstance(content, str):
        return content or "", None
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of parts", "messages")
    texts, image = [], None
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}.content[{j}].text must be a string", "messages")
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise APIError(400, f"{where}.content[{j}].image_url.url must be a string", "messages")
            image = url
        else:
            raise APIError(400, f"{where}.content[{j}]: unsupported content part type {json.dumps(kind)} "
                                "(supported: text, image_url)", "messages")
    return "\n".join(texts), image


def parse_messages(messages) -> tuple[str, list, Optional[str]]:
    """OpenAI messages -> (query, history [(q, a), ...], latest image URL or None)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    system, history, pending, image = [], [], [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if m.get("tool_calls") or m.get("function_call"):
            raise APIError(400, f"messages[{i}]: tool calls are not supported", "messages")
        text, url = _content(m, i)
        if url is not None and role != "user":
            raise APIError(400, f"messages[{i}]: only user messages may carry an image", "messages")
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            pending.append(text)
            image = url if url is not None else image
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
    return query, history, image


def parse_chat_request(body, model_name: str) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for key, value in body.items():
        if key in SUPPORTED or value is None:
            continue
        if key in NEUTRAL and value in NEUTRAL[key]:
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
    query, history, image = parse_messages(body.get("messages"))
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
    if options and not stream:  # as OpenAI: usage would silently never come
        raise APIError(400, "'stream_options' is allowed only with 'stream': true", "stream_options")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(31)
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise APIError(400, f"'seed' must be an integer, got {json.dumps(seed)}", "seed")
    return ChatRequest(
        query=query, history=history, image_url=image, max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1, lo_open=True)),
        top_k=int(_number(body, "top_k", 0, 0, None, integer=True)), seed=seed,
        stop=tuple(stop or ()), stream=stream, include_usage=bool(options.get("include_usage")))


# ------------------------------------------------------------------------------------- images
def read_image_url(url: str, image_root: Optional[str], max_bytes: int) -> bytes:
    """The bytes of a ``data:`` URL, or of a ``file://`` URL under ``image_root``; anything else is refused."""
    too_big = lambda n: APIError(413, f"image of {n} bytes exceeds the limit of {max_bytes} bytes "  # noqa: E731
                                      "(--max-image-bytes)", "messages", "image_too_large")
    if url[:5].lower() == "data:":
        header, comma, data = url[5:].partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise APIError(400, "image data: URLs must be base64 (data:image/...;base64,...)", "messages",
                           "invalid_image")
        if len(data) * 3 // 4 > max_bytes + 2:
            raise too_big(len(data) * 3 // 4)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"image data: URL is not valid base64: {e}", "messages", "invalid_image") from None
        if len(raw) > max_bytes:
            raise too_big(len(raw))
        return raw
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        raise APIError(400, f"image URLs over {scheme}:// are refused: this server fetches nothing from the "
                            "network; send the image inline as a data: URL", "messages", "invalid_image_url")
    if scheme != "file":
        raise APIError(400, f"unsupported image URL scheme {json.dumps(scheme or url[:20])}: send a data: URL",
                       "messages", "invalid_image_url")
    if image_root is None:
        raise APIError(400, "file:// image URLs are refused: the server was started without --image-root",
                       "messages", "invalid_image_url")
    if parts.netloc not in ("", "localhost"):
        raise APIError(400, f"file:// URL with host {parts.netloc!r} refused", "messages", "invalid_image_url")
    asked = unquote(parts.path)
    if "\0" in asked:  # the OS cannot take it (os.path raises ValueError): a bad URL, not a server error
        raise APIError(400, f"image path {asked!r} contains a NUL byte", "messages", "invalid_image_url")
    root = os.path.realpath(image_root)
    outside = APIError(400, f"image path {asked} is outside --image-root", "messages", "invalid_image_url")
    missing = APIError(400, f"image file {asked} not found under --image-root", "messages", "invalid_image_url")
    path = os.path.realpath(asked)
    if os.path.commonpath([root, path]) != root:
        raise outside
    try:  # O_NONBLOCK: a FIFO swapped in does not hang the thread in open (fstat refuses it below)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise missing from None
    with os.fdopen(fd, "rb") as f:
        # Between the check and the open a link may have been swapped in (anywhere on the path) and followed.
        # What counts is the file opened: it must be the one that now sits at the checked path, under the root.
        opened = os.fstat(f.fileno())
        if not stat.S_ISREG(opened.st_mode):
            raise missing
        try:
            there = os.path.realpath(path)
            inside = os.path.commonpath([root, there]) == root and os.path.samestat(opened, os.stat(there))
        except OSError:
            inside = False
        if not inside:
            raise outside
        if opened.st_size > max_bytes:
            raise too_big(opened.st_size)
        raw = f.read(max_bytes + 1)  # the file may have grown since
        if len(raw) > max_bytes:
            raise too_big(len(raw))
        return raw


# ------------------------------------------------------------------------------------- responses
def _chunk(rid, created, model, delta, finish=None, include_usage=False, usage=None) -> dict:
    """A ``chat.completion.chunk``: one choice with ``delta``, or (``usage`` given) none and the usage. With
    ``include_usage`` every chunk has a ``usage`` field, null but in the last (OpenAI's stream shape)."""
    choices = [] if usage is not None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if include_usage:
        out["usage"] = usage
    return out


def _usage(prompt, completion) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _not_json(name: str):
    """Python's json reads NaN and Infinity, which JSON has not (a NaN temperature passed every range check)."""
    raise APIError(400, f"request body is not valid JSON: {name} is not a JSON number", code="invalid_json")


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _BearerAuth:
    """ASGI middleware: every path but ``open_paths`` needs ``Authorization: Bearer KEY`` (else 401)."""

    def __init__(self, app, key: str, open_paths, reject):
        self.app, self.want, self.open_paths, self.reject = app, f"Bearer {key}".encode(), open_paths, reject

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.want):
                response = self.reject(APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                                code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, config: ServerConfig, manage_engine: bool = True):
    """The FastAPI app serving ``engine``; its lifespan starts the engine and (if ``manage_engine``) shuts it
    down at the end. Several apps may share one engine with ``manage_engine=False``."""
    max_body = 2 * config.max_image_bytes + 4 * MiB  # base64 is 4/3 the bytes; room for the text
    model = engine.model

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await run_in_threadpool(engine.start)
        yield
        if manage_engine:  # uvicorn has already let in-flight requests finish (its graceful-shutdown timeout)
            await run_in_threadpool(engine.shutdown, 0.0)

    app = FastAPI(title="cogvlm-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error(e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    def engine_failed(message: str) -> APIError:
        return APIError(503, message, code="engine_failed", type="server_error")

    def failed_request(message: str) -> APIError:
        """A request the engine ended with an error: 503 when the engine died of it, else 500 (it serves on)."""
        return engine_failed(message) if engine.failure is not None else APIError(500, message, type="server_error")

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        return error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, e):
        return error(APIError(400, f"invalid request: {e.errors()}"))

    @app.exception_handler(Exception)
    async def _server_error(_request, e):
        return error(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    if config.api_key is not None:
        app.add_middleware(_BearerAuth, key=config.api_key, open_paths=("/health", "/"), reject=error)

    @app.get("/")
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.get("/health")
    async def health():
        stats = {"model": config.model_name, **engine.stats()}
        if engine.failure is not None:
            body = {**engine_failed(engine.failure_message()).body(), "status": "failed", **stats}
            return JSONResponse(body, status_code=503)
        return {"status": "ok", **stats}

    def model_card():
        return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "cogvlm-jax",
                "context_length": model.config.context_length, "max_length": engine.max_length}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name != config.model_name:
            raise APIError(404, f"The model {json.dumps(name)} does not exist", "model", "model_not_found")
        return model_card()

    async def read_json(request: HTTPRequest):
        size = int(request.headers.get("content-length") or 0)
        if size > max_body:
            raise APIError(413, f"request body of {size} bytes exceeds {max_body} bytes", code="request_too_large")
        chunks, total = [], 0
        async for part in request.stream():
            total += len(part)
            if total > max_body:
                raise APIError(413, f"request body exceeds {max_body} bytes", code="request_too_large")
            chunks.append(part)
        try:
            return json.loads(b"".join(chunks), parse_constant=_not_json)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None

    def build(req: ChatRequest) -> dict:
        image = None
        if req.image_url is not None:
            image = read_image_url(req.image_url, config.image_root, config.max_image_bytes)
        try:
            return model.build_inputs(req.query, req.history, image, max_image_pixels=config.max_image_pixels)
        except ImageTooLargeError as e:
            raise APIError(400, f"{e} (--max-image-pixels)", "messages", "image_too_large") from None
        except ImageError as e:
            raise APIError(400, f"the image cannot be decoded: {e}", "messages", "invalid_image") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        req = parse_chat_request(await read_json(request), config.model_name)
        inputs = await run_in_threadpool(build, req)
        n = len(inputs["input_ids"])
        max_tokens = req.max_tokens or max(1, min(config.default_max_tokens, engine.room(n)))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(ev):
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is exiting
                loop.call_soon_threadsafe(events.put_nowait, ev)

        job = Request(inputs, max_tokens, on_event, temperature=req.temperature, top_p=req.top_p,
                      top_k=req.top_k, seed=req.seed, stop=req.stop)
        try:
            engine.submit(job)  # checks the lengths and the sampling settings first
        except ContextLengthError as e:
            raise APIError(400, str(e), "messages", "context_length_exceeded") from None
        except InputError as e:
            raise APIError(400, str(e)) from None
        except QueueFullError as e:
            raise APIError(429, f"server busy: {e}; retry later", code="queue_full", type="rate_limit_error") from None
        except EngineFailedError as e:
            raise engine_failed(str(e)) from None
        except EngineStoppedError as e:
            raise APIError(503, str(e), code="shutting_down", type="server_error") from None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if req.stream:
            def chunk(delta, finish=None, usage=None) -> str:
                return _sse(_chunk(rid, created, config.model_name, delta, finish, req.include_usage, usage))

            async def sse():
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    while True:
                        ev = await events.get()
                        if ev.error is not None:
                            yield _sse(failed_request(ev.error).body())
                            break
                        if ev.text:
                            yield chunk({"content": ev.text})
                        if ev.finish_reason is not None:
                            yield chunk({}, ev.finish_reason)
                            if req.include_usage:
                                yield chunk(None, usage=_usage(n, ev.completion_tokens))
                            break
                    yield "data: [DONE]\n\n"
                finally:
                    job.cancel()  # a no-op when finished; frees the slot when the client went away

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def gone():
            """Wait for the client to hang up (the body is read: the next message is the disconnect), then wake the
            loop below. Polling between events missed it while tokens kept coming, and the slot ran to the end."""
            while (await request.receive())["type"] != "http.disconnect":
                pass
            events.put_nowait(None)

        watcher = asyncio.create_task(gone())
        parts = []
        try:
            while True:
                ev = await events.get()
                if ev is None:
                    return JSONResponse({}, status_code=499)
                if ev.error is not None:
                    raise failed_request(ev.error)
                parts.append(ev.text)
                if ev.finish_reason is not None:
                    break
        finally:
            watcher.cancel()
            job.cancel()
        return {"id": rid, "object": "chat.completion", "created": created, "model": config.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                             "logprobs": None, "finish_reason": ev.finish_reason}],
                "usage": _usage(n, ev.completion_tokens)}

    return app


# ------------------------------------------------------------------------------------- running it
def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app, drain_seconds: float, log_level: str):
    cfg = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=max(int(round(drain_seconds)), 0),
                         lifespan="on", access_log=log_level in ("info", "debug", "trace"))
    return uvicorn.Server(cfg)


def serve(engine: Engine, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "warning", announce=print) -> int:
    """Serve until SIGINT/SIGTERM; then stop accepting, let running requests finish for up to
    ``config.drain_seconds``, and return 0."""
    sock = bind(host, port)
    engine.start()  # compile the decode step before the first request
    server = _uvicorn_server(create_app(engine, config), config.drain_seconds, log_level)
    shown = f"[{host}]" if ":" in host else host
    announce(f"cogvlm-jax serve: {config.model_name} on http://{shown}:{sock.getsockname()[1]} "
             f"({engine.slots} slots, {engine.max_length} tokens each)")
    # uvicorn handles SIGINT/SIGTERM while it serves (stop accepting, drain), then re-raises the signal to
    # the handler that was there before: make that one a no-op so a drained shutdown exits 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


class BackgroundServer:
    """The server on a thread of this process (tests, benchmarks): ``url``, then ``stop()``."""

    def __init__(self, engine: Engine, config: ServerConfig, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning", manage_engine: bool = True):
        self.engine = engine
        self._sock = bind(host, port)
        self.url = f"http://{host}:{self._sock.getsockname()[1]}"
        self._server = _uvicorn_server(create_app(engine, config, manage_engine), config.drain_seconds, log_level)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True,
                                        name="cogvlm-http")

    def start(self, timeout: float = 300.0) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)
        self._sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
