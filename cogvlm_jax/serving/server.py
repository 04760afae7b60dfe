"""An OpenAI-compatible HTTP server over the continuous-batching ``engine.Engine`` (FastAPI + uvicorn).

Routes: ``POST /v1/chat/completions`` (OpenAI's request and response shapes, ``protocol.py``; SSE
streaming), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health`` and the chat page at ``/``. If the
engine's thread dies (a device failure it cannot recover from), every request, running or new, and
``/health`` get a 503 ``engine_failed`` error: the process must be restarted.

Every error is an OpenAI error object ``{"error": {"message", "type", "param", "code"}}`` with its HTTP
status; a parameter we do not support is a 400 that names it, a body not sent as ``application/json`` a
415, a prompt too long for the context a 400 before it is tokenized (tokenizing runs off the event loop).
At the drain deadline of a shutdown the requests still running end with a 503 ``shutting_down`` error. Images come inline as ``data:`` URLs (any
format PIL reads), or as ``file://`` URLs under ``--image-root`` only (``images.py``); the server never
fetches ``http(s)://`` URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import os
import signal
import socket
import threading
import time
import uuid
import weakref
from typing import Optional

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cogvlm_jax.generation.errors import InputError
from cogvlm_jax.inputs.preprocess import MAX_IMAGE_PIXELS, ImageError, ImageTooLargeError
from cogvlm_jax.inputs.video import VideoError
from cogvlm_jax.parallel import compiles
from cogvlm_jax.serving.engine import Engine
from cogvlm_jax.serving.images import read_image_url
from cogvlm_jax.serving.protocol import (
    LONE_SURROGATE,
    SSE_DONE,
    VideoURL,
    APIError,
    ChatRequest,
    completion,
    completion_chunk,
    model_card,
    parse_chat_request,
    parse_json,
    sse,
    usage,
)
from cogvlm_jax.serving.requests import (
    ContextLengthError,
    EngineFailedError,
    EngineStoppedError,
    Event,
    QueueFullError,
    Request,
)

PAGE = os.path.join(os.path.dirname(__file__), "static", "chat.html")
MiB = 1 << 20
FLUSH_SECONDS = 5.0  # after the drain deadline: for the cut requests' last events to reach their clients


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_key: Optional[str] = None
    image_root: Optional[str] = None  # file:// image URLs are read only under this directory
    max_image_bytes: int = 20 * MiB
    max_image_pixels: int = MAX_IMAGE_PIXELS  # width x height an image may declare (checked before decoding)
    # the most tokens of an answer whose request sets neither max_tokens nor max_completion_tokens; None:
    # until eos or the context (or the slot, --max-length) is full, as OpenAI's servers do
    default_max_tokens: Optional[int] = None
    drain_seconds: float = 30.0


# ------------------------------------------------------------------------------------- errors
def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def engine_failed(message: str) -> APIError:
    return APIError(503, message, code="engine_failed", type="server_error")


async def _api_error(_request, e: APIError):
    return error_response(e)


async def _http_error(request, e):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code))


async def _validation_error(_request, e):
    return error_response(APIError(400, f"invalid request: {e.errors()}"))


async def _server_error(_request, e):
    return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))


ERROR_HANDLERS = ((APIError, _api_error), (StarletteHTTPException, _http_error),
                  (RequestValidationError, _validation_error), (Exception, _server_error))


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


# ------------------------------------------------------------------------------------- the routes
@dataclasses.dataclass(eq=False)  # hashed by identity: held in _Routes.live
class _Completion:
    """One chat completion in flight: the parsed request, the engine's request, and its events in this loop."""

    chat: ChatRequest
    job: Request
    events: asyncio.Queue
    prompt_tokens: int
    id: str = dataclasses.field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


class _Routes:
    """The app's routes over ``engine``; its lifespan starts the engine and (if ``manage_engine``) shuts it down."""

    def __init__(self, engine: Engine, config: ServerConfig, manage_engine: bool):
        self.engine, self.config, self.manage_engine = engine, config, manage_engine
        self.model = engine.model
        self.max_body = 2 * config.max_image_bytes + 4 * MiB  # base64 is 4/3 the bytes; room for the text
        # A prompt whose text alone needs more tokens than a request may have is refused before it is
        # tokenized: it has at least (the characters the tokenizer keeps) / max_token_chars tokens.
        self.max_tokens_in = min(self.model.config.context_length, engine.max_length) - 1
        self.max_prompt_chars = self.max_tokens_in * self.model.tokenizer.max_token_chars
        self.live: weakref.WeakSet = weakref.WeakSet()  # the _Completions in flight, ended by ``cut``
        self.draining = False

    @contextlib.asynccontextmanager
    async def lifespan(self, _app):
        await run_in_threadpool(self.engine.start)
        yield
        if self.manage_engine:  # uvicorn has already let in-flight requests finish (its graceful-shutdown timeout)
            await run_in_threadpool(self.engine.shutdown, 0.0)

    def failed_request(self, message: str) -> APIError:
        """A request the engine ended with an error: 503 when the engine died of it or the server is shutting
        down, else 500 (it serves on)."""
        if self.engine.failure is not None:
            return engine_failed(message)
        if self.draining:
            return APIError(503, message, code="shutting_down", type="server_error")
        return APIError(500, message, type="server_error")

    def cut(self, message: str) -> None:
        """End every request still in flight (the drain deadline): each gets an error event (a stream: an
        error object, then [DONE]) and its engine request is cancelled."""
        self.draining = True
        for c in list(self.live):
            c.job.cancel()
            c.events.put_nowait(Event("", "error", 0, message))

    # ------------------------------------------------------------------ pages and metadata
    async def page(self):
        with open(PAGE, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    async def health(self):
        stats = {"model": self.config.model_name, **self.engine.stats()}
        if self.engine.failure is not None:
            body = {**engine_failed(self.engine.failure_message()).body(), "status": "failed", **stats}
            return JSONResponse(body, status_code=503)
        return {"status": "ok", **stats}

    def card(self) -> dict:
        return model_card(self.config.model_name, self.model.config.context_length, self.engine.max_length)

    async def models(self):
        return {"object": "list", "data": [self.card()]}

    async def one_model(self, name: str):
        if name != self.config.model_name:
            raise APIError(404, f"The model {json.dumps(name)} does not exist", "model", "model_not_found")
        return self.card()

    # ------------------------------------------------------------------ chat completions
    async def chat_completions(self, request: HTTPRequest):
        check_json_content_type(request)
        req = parse_chat_request(await self.read_json(request), self.config.model_name)
        inputs = await run_in_threadpool(self.build, req)
        c = self.submit(req, inputs)
        self.live.add(c)
        if req.stream:
            return StreamingResponse(self.stream(c), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self.whole(request, c)

    async def read_json(self, request: HTTPRequest):
        size = int(request.headers.get("content-length") or 0)
        if size > self.max_body:
            raise APIError(413, f"request body of {size} bytes exceeds {self.max_body} bytes", code="request_too_large")
        chunks, total = [], 0
        async for part in request.stream():
            total += len(part)
            if total > self.max_body:
                raise APIError(413, f"request body exceeds {self.max_body} bytes", code="request_too_large")
            chunks.append(part)
        return parse_json(b"".join(chunks))

    def build(self, req: ChatRequest) -> dict:
        """The model's inputs for ``req`` (its image read and decoded); run off the event loop."""
        self.check_prompt_chars(req)
        urls = req.image_urls
        is_video = self.model.config.video
        if any(isinstance(u, VideoURL) != is_video for u in urls):
            raise APIError(400, "this model takes videos (video_url parts), not images" if self.model.config.video
                           else "this model takes images (image_url parts), not videos", "messages",
                           "unsupported_media")
        if is_video:  # the conversation's latest video, its bytes within the same limits as an image's
            urls = urls[-1:]
        images = [read_image_url(url, self.config.image_root, self.config.max_image_bytes) for url in urls]
        image = images[0] if len(images) == 1 else images or None
        try:
            if is_video:
                return self.model.build_inputs(req.query, req.history, video=image)
            return self.model.build_inputs(req.query, req.history, image, max_image_pixels=self.config.max_image_pixels)
        except VideoError as e:
            raise APIError(400, f"the video cannot be used: {e}", "messages", "invalid_video") from None
        except ImageTooLargeError as e:
            raise APIError(400, f"{e} (--max-image-pixels)", "messages", "image_too_large") from None
        except ImageError as e:
            raise APIError(400, f"the image cannot be decoded: {e}", "messages", "invalid_image") from None
        except (UnicodeError, ValueError) as e:  # text the tokenizer cannot take
            raise APIError(400, f"the messages cannot be tokenized: {type(e).__name__}: {e}", "messages") from None

    def check_prompt_chars(self, req: ChatRequest) -> None:
        """Refuse, before tokenizing it, a prompt whose text needs more tokens than the context holds
        (``Tokenizer.min_tokens``, worked out only past the plain bound on characters), or that is not
        Unicode text."""
        texts = [req.query, *(t for turn in req.history for t in turn)]
        if sum(map(len, texts)) > self.max_prompt_chars:
            need = self.model.tokenizer.min_tokens("".join(texts))  # the template only adds to the prompt
            if need > self.max_tokens_in:
                raise APIError(400, f"the messages need at least {need} tokens (more than "
                                    f"{self.model.tokenizer.max_token_chars} characters a token), over the "
                                    f"{self.max_tokens_in} a prompt may have here (context length "
                                    f"{self.model.config.context_length}, --max-length {self.engine.max_length})",
                               "messages", "context_length_exceeded")
        if any(LONE_SURROGATE.search(t) for t in texts):  # no encoder takes it (parse_json refuses it too)
            raise APIError(400, "the messages hold a lone UTF-16 surrogate: not Unicode text", "messages")

    def submit(self, req: ChatRequest, inputs: dict) -> _Completion:
        """Queue ``req`` on the engine (run in the event loop: its events come back to it)."""
        n = len(inputs["input_ids"])
        max_tokens = req.max_tokens
        if max_tokens is None:  # the room the slot has left (a prompt that fills it: the check's 400)
            room, default = self.engine.room(n), self.config.default_max_tokens
            max_tokens = max(1, room if default is None else min(default, room))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(ev):
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is exiting
                loop.call_soon_threadsafe(events.put_nowait, ev)

        job = Request(inputs, max_tokens, on_event, temperature=req.temperature, top_p=req.top_p,
                      top_k=req.top_k, seed=req.seed, stop=req.stop)
        try:
            self.engine.submit(job)  # checks the lengths and the sampling settings first
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
        return _Completion(req, job, events, n)

    async def stream(self, c: _Completion):
        """The answer as SSE events: a role chunk, the text chunks, the finish chunk (and the usage), [DONE]."""
        def chunk(delta, finish=None, totals=None) -> str:
            return sse(completion_chunk(c.id, c.created, self.config.model_name, delta, finish, c.chat.include_usage,
                                        totals))

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                ev = await c.events.get()
                if ev.error is not None:
                    yield sse(self.failed_request(ev.error).body())
                    break
                if ev.text:
                    yield chunk({"content": ev.text})
                if ev.finish_reason is not None:
                    yield chunk({}, ev.finish_reason)
                    if c.chat.include_usage:
                        yield chunk(None, totals=usage(c.prompt_tokens, ev.completion_tokens, ev.cached_tokens))
                    break
            yield SSE_DONE
        finally:
            c.job.cancel()  # a no-op when finished; frees the slot when the client went away
            self.live.discard(c)

    async def whole(self, request: HTTPRequest, c: _Completion):
        """The whole answer as one ``chat.completion``; a 499 if the client hangs up first."""
        watcher = asyncio.create_task(_hang_up(request, c.events))
        parts = []
        try:
            while True:
                ev = await c.events.get()
                if ev is None:
                    return JSONResponse({}, status_code=499)
                if ev.error is not None:
                    raise self.failed_request(ev.error)
                parts.append(ev.text)
                if ev.finish_reason is not None:
                    break
        finally:
            watcher.cancel()
            c.job.cancel()
            self.live.discard(c)
        return completion(c.id, c.created, self.config.model_name, "".join(parts), ev.finish_reason, c.prompt_tokens,
                          ev.completion_tokens, ev.cached_tokens)


def check_json_content_type(request: HTTPRequest) -> None:
    """A 415 unless the body is declared ``application/json``: a web page may POST text/plain (or a typeless
    body) to any origin without a CORS preflight, and must not drive a server on this machine that way."""
    declared = request.headers.get("content-type", "")
    if declared.split(";", 1)[0].strip().lower() != "application/json":
        raise APIError(415, f"the request body must be sent as Content-Type: application/json, got "
                            f"{json.dumps(declared[:80]) if declared else 'none'}", code="unsupported_media_type")


async def _hang_up(request: HTTPRequest, events: asyncio.Queue) -> None:
    """Wait for the client to hang up (the body is read: the next message is the disconnect), then put None
    on ``events``, so that a reader waiting for the next token wakes up even while tokens keep coming."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    events.put_nowait(None)


def create_app(engine: Engine, config: ServerConfig, manage_engine: bool = True):
    """The FastAPI app serving ``engine``; its lifespan starts the engine and (if ``manage_engine``) shuts it
    down at the end. Several apps may share one engine with ``manage_engine=False``."""
    routes = _Routes(engine, config, manage_engine)
    app = FastAPI(title="cogvlm-jax", lifespan=routes.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.routes = routes
    for kind, handler in ERROR_HANDLERS:
        app.add_exception_handler(kind, handler)
    if config.api_key is not None:
        app.add_middleware(_BearerAuth, key=config.api_key, open_paths=("/health", "/"), reject=error_response)
    app.get("/")(routes.page)
    app.get("/health")(routes.health)
    app.get("/v1/models")(routes.models)
    app.get("/v1/models/{name:path}")(routes.one_model)
    app.post("/v1/chat/completions")(routes.chat_completions)
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


class _Server(uvicorn.Server):
    """uvicorn's server, whose shutdown ends the requests still running at the drain deadline itself
    (``_Routes.cut``: an error event, and a stream's [DONE]) before uvicorn would cut their connections."""

    def __init__(self, config: uvicorn.Config, routes: "_Routes", drain_seconds: float):
        super().__init__(config)
        self.routes, self.drain_seconds = routes, max(float(drain_seconds), 0.0)

    async def shutdown(self, sockets=None) -> None:
        message = f"the server shut down before this request finished (--drain-seconds {self.drain_seconds:g})"
        deadline = asyncio.get_running_loop().call_later(self.drain_seconds, self.routes.cut, message)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()


def _uvicorn_server(app, drain_seconds: float, log_level: str):
    cfg = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=max(drain_seconds, 0.0) + FLUSH_SECONDS,
                         lifespan="on", access_log=log_level in ("info", "debug", "trace"))
    return _Server(cfg, app.state.routes, drain_seconds)


def serve(engine: Engine, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "warning", announce=print, exit_after: bool = False) -> int:
    """Serve until SIGINT/SIGTERM; then stop accepting, let running requests finish for up to
    ``config.drain_seconds`` (then end the rest with an error event), and return 0. More signals while it
    stops change nothing. ``exit_after`` (the CLI: the process exits next): SIGINT and SIGTERM stay ignored
    after serving, so that a repeated signal cannot turn the clean exit into a kill (143) or 130."""
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    address = f"http://{shown}:{sock.getsockname()[1]}"
    compiles.say(f"cogvlm-jax serve: compiling {engine.warm_up_programs()}, then serving")  # stderr
    t0 = time.perf_counter()
    engine.start()  # compile the decode step before the first request
    server = _uvicorn_server(create_app(engine, config), config.drain_seconds, log_level)

    # uvicorn handles SIGINT/SIGTERM while it serves (stop accepting, drain), then re-raises the signal to
    # the handler that was there before. That one only asks the server to stop: a signal before uvicorn
    # takes over (right after the start line, say) is not lost, and a drained shutdown exits 0.
    def stop(*_):
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        announce(f"cogvlm-jax serve: {config.model_name} on {address} ({engine.slots} slots, {engine.max_length} "
                 f"tokens each), ready after {time.perf_counter() - t0:.1f} s; each prompt bucket compiles at its "
                 "first request")
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if exit_after else handler)
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
