"""Serving hostile input: whatever a client sends, its request fails alone with an OpenAI error object and
the right status, and the requests around it are served as if it had not come.

One cogvlm2 engine (2 slots) behind one server with an ``--image-root`` serves the module; while most of
the bad requests here are sent, a long answer streams, and it must come out whole and equal to its solo
answer. The signal tests run ``cogvlm-jax serve`` in a subprocess.
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_dir, huge_png
from PIL import Image
from test_serve import _read_line, _sse_events, assert_error, messages, post

from cogvlm_jax.generation.errors import InputError
from cogvlm_jax.generation.sampling import INT32_MAX, SamplingParams, choose, filter_logits
from cogvlm_jax.serving import engine as engine_module
from cogvlm_jax.serving.engine import Engine
from cogvlm_jax.serving.protocol import ChatRequest
from cogvlm_jax.serving.requests import TextOutput
from cogvlm_jax.serving.server import BackgroundServer, ServerConfig, _Routes

NAME = "tiny-cogvlm2"
LONG = "Go on and on."  # a prompt whose greedy answer runs to max_tokens
LONG_TOKENS = 100


@pytest.fixture(scope="module")
def model(f32_models):
    return f32_models["cogvlm2"]


@pytest.fixture(scope="module")
def engine(model):
    eng = Engine(model, slots=2, max_length=128, max_queue=8).start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """An --image-root holding one of each thing that is not a regular file, and links to them."""
    base = tmp_path_factory.mktemp("images")
    os.mkdir(base / "dir")
    os.mkfifo(base / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(base / "sock"))
    os.symlink(base / "dir", base / "link-to-dir")
    os.symlink(base / "fifo", base / "link-to-fifo")
    yield base
    sock.close()


@pytest.fixture(scope="module")
def server(engine, root):
    srv = BackgroundServer(engine, ServerConfig(NAME, image_root=str(root)), manage_engine=False).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def solo(model, engine):
    """The long answer alone on the engine."""
    return engine.complete(model.build_inputs(LONG), LONG_TOKENS, temperature=0)[0]


def long_stream(srv):
    """Start the long answer streaming in a thread -> its future of (status, SSE data)."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    body = {"model": NAME, "messages": messages(LONG), "max_tokens": LONG_TOKENS, "temperature": 0, "stream": True}
    future = pool.submit(_sse_events, srv, body)
    pool.shutdown(wait=False)
    return future


def streamed_text(status_events) -> str:
    status, events = status_events
    assert status == 200 and events[-1] == "[DONE]", events
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks
    assert chunks[-1]["choices"][0]["finish_reason"] == "length", chunks[-1]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def raw_post(srv, body: bytes, content_type="application/json"):
    """(status, parsed JSON) of a POST whose body bytes and Content-Type (None: no header) are sent as given."""
    conn = http.client.HTTPConnection("127.0.0.1", int(srv.url.rsplit(":", 1)[1]), timeout=120)
    try:
        conn.putrequest("POST", "/v1/chat/completions")
        if content_type is not None:
            conn.putheader("Content-Type", content_type)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


OK = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}

# Every numeric parameter, with values of the wrong type, out of range, or beyond what the device holds
# (a max_tokens past the context is the context's error: ``context_length_exceeded``).
BAD_NUMBERS = {
    "temperature": [-1, -1e-9, 2.000001, 1e308, 10**400, "hot", True, False, [], {}],
    "top_p": [0, 0.0, -0.5, 1.0000001, 1e308, -10**400, "0.9", True, [0.9]],
    "top_k": [-1, 10**12, INT32_MAX + 1, 10**400, 1.5, 3.0, True, "3", [3]],
    "max_tokens": [0, -5, 10**30, 10**400, 1.5, 8.0, True, "8"],
    "max_completion_tokens": [0, -1, 10**30, 2.5, False, "8"],
    "seed": [2**63, -2**63 - 1, 10**400, 1.5, True, "1", [1]],
    "n": [0, -1, 2, 10**12, 1.0, True, "1"],
    "presence_penalty": [0.5, -2, 1e308, True, False, "0"],
    "frequency_penalty": [0.1, True, False, "0", [0]],
    "logprobs": [True, 0, 1, "false"],
    "top_logprobs": [1, 10**12, False, 0.0, "0"],
    "parallel_tool_calls": [1, 0, "true"],
    "stream_options": [{"include_usage": 1}, {"include_usage": "yes"}],
}


def test_every_bad_number_is_a_400_naming_it_and_a_live_stream_goes_on(model, engine, server, solo):
    """Out-of-range, overflowing and mistyped values of every numeric parameter: each a 400 naming the
    parameter, while a long answer streams; that answer comes out whole, equal to its solo run."""
    url = server.url + "/v1/chat/completions"
    running = long_stream(server)
    for name, values in BAD_NUMBERS.items():
        for v in values:
            too_long = name in ("max_tokens", "max_completion_tokens") and isinstance(v, int) and v > 1
            got = post(url, {**OK, name: v, **({"stream": True} if name == "stream_options" else {})})
            assert_error(got, 400, *(("context_length_exceeded", "messages") if too_long else (None, name)))
    # Literals Python's json reads as something else: NaN/Infinity, a double overflowing to inf, a huge integer.
    for literal in ("NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1" + "0" * 5000):
        for name in ("temperature", "top_p", "top_k", "seed", "max_tokens"):
            raw = json.dumps(OK)[:-1] + f', "{name}": {literal}}}'
            assert_error(post(url, raw.encode()), 400, "invalid_json")
    assert streamed_text(running.result(timeout=300)) == solo
    status, body = post(url, {**OK, "top_k": INT32_MAX, "seed": 2**63 - 1, "temperature": 0.5})  # the edges serve
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length"), body
    assert engine.stats()["busy"] == 0


def test_a_request_that_raises_inside_the_engine_fails_alone(model, engine, solo, monkeypatch):
    """With the engine's own admission check switched off, a top_k of 10**12 reaches the engine loop (its int32
    overflows there), and a request's callback raises: those two end with an error event, the answer running
    beside them is not disturbed, and the engine serves on."""
    monkeypatch.setattr(engine_module, "check_sampling", lambda *a, **k: None)
    x = model.build_inputs(LONG)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(engine.complete, x, LONG_TOKENS, temperature=0)
        while engine.stats()["busy"] == 0 and not running.done():
            time.sleep(0.005)
        overflow = list(engine.stream(model.build_inputs("hi"), 4, temperature=1.0, top_k=10**12))
        calls = []

        def raises(ev):
            calls.append(ev)
            if len(calls) == 1:
                raise RuntimeError("injected: the caller's callback fails")

        engine.submit(engine_module.Request(model.build_inputs("hello"), 6, raises))
        text, last = running.result(timeout=300)
    assert overflow[-1].finish_reason == "error" and "OverflowError" in overflow[-1].error, overflow
    deadline = time.monotonic() + 60
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls[-1].finish_reason == "error" and "injected" in calls[-1].error, calls
    assert (text, last.finish_reason) == (solo, "length")
    assert engine.failure is None
    assert engine.complete(x, LONG_TOKENS, temperature=0)[0] == solo
    assert engine.stats()["busy"] == 0


def test_with_chunked_prefill_a_request_that_raises_inside_the_engine_fails_alone(f32_models, monkeypatch):
    """The same with text prompts prefilled 8 tokens per step (the ``mix`` program's inputs): the overflowing
    request ends with an error event, the one decoding beside it is not disturbed."""
    model = f32_models["cogvlm1"]
    eng = Engine(model, slots=2, max_length=96, max_queue=4, prefill_chunk=8).start()
    try:
        x = model.build_inputs("Tell me a long story about the sea.")
        want = eng.complete(x, 48, temperature=0)[0]
        monkeypatch.setattr(engine_module, "check_sampling", lambda *a, **k: None)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(eng.complete, x, 48, temperature=0)
            while eng.stats()["busy"] == 0 and not running.done():
                time.sleep(0.005)
            overflow = list(eng.stream(model.build_inputs("hello there, a prompt of some tokens"), 4,
                                       temperature=1.0, top_k=10**12))
            text, last = running.result(timeout=300)
        assert overflow[-1].finish_reason == "error" and "OverflowError" in overflow[-1].error, overflow
        assert (text, last.finish_reason) == (want, "length") and eng.failure is None
    finally:
        eng.shutdown()


def test_stop_strings_of_any_length_cost_what_the_text_costs(model, server, solo):
    """16 stop strings of 200k characters each: the long answer streams as without them (checking every
    prefix of each stop string against each token's text would stall the engine thread for hours)."""
    out = TextOutput(model.tokenizer, stop=("hello wor" + "x" * 10**6,))
    text = "".join(out.add(i)[0] for i in model.tokenizer.encode("hello world"))
    assert text + out.flush()[0] == "hello world"
    stops = ["x" * 200_000 + str(k) for k in range(16)]
    body = {"model": NAME, "messages": messages(LONG), "max_tokens": LONG_TOKENS, "temperature": 0, "stream": True,
            "stop": stops}
    assert streamed_text(_sse_events(server, body)) == solo


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_file_urls_to_what_is_not_a_regular_file_are_400_and_leak_no_descriptor(engine, server, root, solo):
    """A directory, a FIFO, a socket, a device, links to them: each a 400 ``invalid_image_url``, 100 times
    over, with the server's (this process's) open descriptors counted before and after."""
    url = server.url + "/v1/chat/completions"
    with_image = lambda u: {**OK, "messages": [{"role": "user", "content": [  # noqa: E731
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": u}}]}]}
    targets = [f"file://{root}/{name}" for name in ("dir", "dir/", "fifo", "sock", "link-to-dir", "link-to-fifo")]
    running = long_stream(server)
    before = _fds()
    for _ in range(100):
        for target in targets:
            assert_error(post(url, with_image(target)), 400, "invalid_image_url", "messages", "not a regular file")
    with BackgroundServer(engine, ServerConfig(NAME, image_root="/dev"), manage_engine=False) as dev:
        for device in ("null", "zero", "urandom"):
            assert_error(post(dev.url + "/v1/chat/completions", with_image(f"file:///dev/{device}")), 400,
                         "invalid_image_url", match="not a regular file")
    assert streamed_text(running.result(timeout=300)) == solo
    assert _fds() <= before + 2, (before, _fds())  # +2: the pool's keep-alive sockets may come and go


def test_input_the_json_layer_or_the_tokenizer_chokes_on_is_400(model, engine, server):
    """Lone surrogates (escaped, or spelt in UTF-8's bytes), invalid UTF-8, nesting 10**5 deep and 40 deep,
    integers of 5000 digits: each a 400 ``invalid_json`` (type invalid_request_error); text the tokenizer
    cannot take is a 400 too."""
    nested = []
    for _ in range(40):
        nested = [nested]
    msg = lambda content: json.dumps({**OK, "messages": [{"role": "user", "content": content}]})  # noqa: E731
    bodies = [msg("\ud800"), msg("a\udfffb"), msg(["x"]).replace('"x"', '{"type": "text", "text": "\\udbff"}'),
              json.dumps({**OK, "metadata": {"\udc80": "key"}}),
              json.dumps({**OK, "messages": [{"role": "user", "content": "é\ud800"}]}, ensure_ascii=False),
              "[" * 100_000 + "]" * 100_000, json.dumps({**OK, "metadata": {"a": nested}}),
              json.dumps(OK)[:-1] + ', "seed": ' + "9" * 5000 + "}"]
    for body in bodies:
        got = raw_post(server, body.encode("utf-8", "surrogatepass"))
        assert_error(got, 400, "invalid_json")
        assert got[1]["error"]["type"] == "invalid_request_error"
    assert_error(raw_post(server, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'), 400, "invalid_json")
    # Past the JSON layer (a caller of the routes), text no encoder takes is still the request's error.
    routes = _Routes(engine, ServerConfig(NAME), manage_engine=False)
    req = ChatRequest("bad \ud800 text", [], None, 3, 0.0, 1.0, 0, 0, (), False, False)
    with pytest.raises(Exception) as e:
        routes.build(req)
    assert getattr(e.value, "status", None) == 400 and e.value.param == "messages", e.value
    status, body = post(server.url + "/v1/chat/completions", OK)
    assert status == 200, body


@pytest.mark.parametrize("top_p", [1e-300, 1e-46, 1.4e-45, 1e-40, 1e-30])
def test_a_top_p_that_rounds_to_zero_keeps_the_most_likely_token(top_p):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 300)).astype(np.float32) * 4)
    for top_k in (0, 5, 1000):
        kept = np.isfinite(np.asarray(filter_logits(logits, jnp.full(3, top_k, jnp.int32), jnp.full(3, top_p))))
        assert (kept.sum(-1) == 1).all() and (kept.argmax(-1) == np.asarray(logits).argmax(-1)).all(), (top_k, kept)


def test_tiny_top_p_and_tiny_temperature_answer_what_greedy_answers(model, server):
    """top_p down to 1e-300 (0 in float32) and a temperature that is a float32 subnormal: the most likely
    token each step, over HTTP and in the Python API, never an empty answer."""
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 300)).astype(np.float32))
    sp = SamplingParams.make(2, temperature=1e-40, seed=5)
    assert (np.asarray(choose(logits, sp, 0, True)) == np.asarray(logits).argmax(-1)).all()
    greedy = model.chat(None, "hi", max_new_tokens=6)
    assert greedy
    assert model.chat(None, "hi", max_new_tokens=6, temperature=1.0, top_p=1e-300, seed=3) == greedy
    url = server.url + "/v1/chat/completions"
    for kw in ({"temperature": 1.5, "top_p": 1e-300}, {"temperature": 1.0, "top_p": 1e-46, "top_k": 50},
               {"temperature": 1e-40}):
        status, body = post(url, {**OK, "messages": messages("hi"), "max_tokens": 6, "seed": 7, **kw})
        assert status == 200 and body["choices"][0]["message"]["content"] == greedy, (kw, body)


@pytest.mark.parametrize("kw", [dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=-1),
                                dict(temperature=True), dict(top_k=10**12), dict(top_k=-1), dict(top_k=True),
                                dict(top_k=2.0), dict(top_p=0.0), dict(top_p=float("nan")), dict(top_p=1.5),
                                dict(seed=2**63), dict(seed=1.5), dict(seed=True)])
def test_the_python_api_and_the_engine_refuse_what_the_device_cannot_represent(model, engine, kw):
    with pytest.raises(InputError, match="bad sampling settings"):
        model.chat(None, "hi", max_new_tokens=2, **{"temperature": 1.0, **kw})
    with pytest.raises(InputError, match="bad sampling settings"):
        engine.submit(engine_module.Request(model.build_inputs("hi"), 2, lambda ev: None, **{"temperature": 1.0,
                                                                                              **kw}))


def test_decompression_bombs_are_our_image_too_large(server):
    """Over PIL's decompression-bomb error (182 MP) and over its warning (90 MP) with warnings as errors:
    each our 400 ``image_too_large`` naming --max-image-pixels, never PIL's text or a 500."""
    url = server.url + "/v1/chat/completions"

    def with_png(png):
        u = "data:image/png;base64," + base64.b64encode(png).decode()
        return {**OK, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                                {"type": "image_url", "image_url": {"url": u}}]}]}

    assert_error(post(url, with_png(huge_png(14000, 13000))), 400, "image_too_large",
                 match="182.0 megapixels, over the limit of 40 megapixels (40000000 pixels) (--max-image-pixels)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert_error(post(url, with_png(huge_png(10000, 9000))), 400, "image_too_large",
                     match="90.0 megapixels, over the limit of 40 megapixels")


def test_a_huge_prompt_is_refused_before_it_is_tokenized_and_tokenizing_is_off_the_loop(model, server, solo,
                                                                                         monkeypatch):
    """A prompt past the bound (``Tokenizer.min_tokens`` over the tokens a prompt may have; byte-level BPE keeps
    whitespace, so spaces count) is a 400 ``context_length_exceeded`` that never reaches the tokenizer; one
    within it is tokenized on a worker thread, never the event loop's (``cogvlm-http``)."""
    url = server.url + "/v1/chat/completions"
    tok = model.tokenizer
    assert not tok.drops_whitespace
    bound = (min(model.config.context_length, 128) - 1) * tok.max_token_chars
    threads, encode = [], tok.encode
    monkeypatch.setattr(tok, "encode", lambda *a, **k: (threads.append(threading.current_thread().name),
                                                        encode(*a, **k))[1])
    running = long_stream(server)
    while not threads:  # the long stream's own prompt
        time.sleep(0.005)
    threads.clear()
    for content in ("x" * (bound + 1), "word " * bound, " " * (bound + 1) + "hi", "y" * 30_000_000,
                    " " * 40_000_000):
        assert_error(post(url, {**OK, "messages": [{"role": "user", "content": content}]}), 400,
                     "context_length_exceeded", "messages", "the messages need at least")
    split = [{"role": "user", "content": "z" * (bound // 2)}, {"role": "assistant", "content": "z" * (bound // 2)},
             {"role": "user", "content": "z" * 10}]
    assert_error(post(url, {**OK, "messages": split}), 400, "context_length_exceeded")
    assert threads == []
    # Within the bound: tokenized (on a worker thread), then checked exactly.
    assert_error(post(url, {**OK, "messages": [{"role": "user", "content": "x" * (bound - 30)}]}), 400,
                 "context_length_exceeded", match="tokens plus max_tokens")
    assert threads and "cogvlm-http" not in threads, threads
    assert streamed_text(running.result(timeout=300)) == solo


@pytest.mark.parametrize("family", ["cogvlm1", "cogvlm2"])
def test_min_tokens_is_a_lower_bound_on_the_tokens(f32_models, family):
    """Random texts of words, runs of whitespace, special tokens, long words and non-ASCII: never more than
    ``encode`` gives (cogvlm1's sentencepiece drops extra whitespace; cogvlm2's byte-level BPE keeps it)."""
    tok = f32_models[family].tokenizer
    assert tok.drops_whitespace == (family == "cogvlm1")
    rng = np.random.default_rng(0)
    specials = ["<s>", "</s>", "<|reserved_special_token_250|>", "<|begin_of_text|>"]
    parts = ["hello", " ", "   ", "\n\n\t", "x" * 50, "é", "汉字", "🙂", "=" * 30, "the", " world"] + specials
    for _ in range(200):
        text = "".join(rng.choice(parts, size=int(rng.integers(1, 60))))
        assert tok.min_tokens(text) <= len(tok.encode(text)), text
    assert tok.min_tokens(" " * 1000) == (0 if tok.drops_whitespace else -(-1000 // tok.max_token_chars))


def test_a_tokenizer_panic_is_the_requests_400(model, server, monkeypatch):
    """The Rust tokenizer panics (its regex engine gives up on some very long runs of whitespace: 40 MB of
    spaces take it 7 s here): a 400 naming the messages, and the server serves on."""
    class PanicException(BaseException):  # what pyo3 raises: no Exception
        pass

    real = model.tokenizer._tok

    class Panics:
        def __getattr__(self, name):
            return getattr(real, name)

        def encode_batch(self, *a, **k):
            raise PanicException("Onig: Regex search error: retry-limit-in-match over")

    monkeypatch.setattr(model.tokenizer, "_tok", Panics())
    assert_error(post(server.url + "/v1/chat/completions", OK), 400, param="messages", match="retry-limit")
    monkeypatch.setattr(model.tokenizer, "_tok", real)
    status, body = post(server.url + "/v1/chat/completions", OK)
    assert status == 200, body


@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain; charset=utf-8",
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                          "application/jsonp", "", "application/json-seq"])
def test_a_post_not_declared_json_is_415(server, content_type):
    got = raw_post(server, json.dumps(OK).encode(), content_type)
    assert_error(got, 415, "unsupported_media_type", match="application/json")
    assert got[1]["error"]["type"] == "invalid_request_error"


def test_json_content_types_with_parameters_are_served(server):
    for content_type in ("application/json; charset=utf-8", "Application/JSON"):
        status, body = raw_post(server, json.dumps(OK).encode(), content_type)
        assert status == 200, body


# ----------------------------------------------------------------------------------------- a real process
def _serve(drain_seconds: str):
    """``cogvlm-jax serve`` with the settings of tests/test_serve.py's SIGTERM server (one program set, compiled
    once per run)."""
    d = fixture_dir("cogvlm2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cogvlm_jax.cli", "serve", "--model", os.path.join(d, "checkpoint"), "--tokenizer",
         os.path.join(d, "tokenizer"), "--port", "0", "--slots", "1", "--max-length", "512",
         "--drain-seconds", drain_seconds, "--model-name", NAME],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    line = _read_line(proc, time.monotonic() + 240)
    return proc, int(line.rsplit(":", 1)[1].split()[0])


def _sigterm_until_exit(proc, every: float = 0.005) -> int:
    """SIGTERM, and again every ``every`` seconds until the process exits: -> its exit status."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            break
        time.sleep(every)
    return proc.wait(timeout=60)


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "streaming"])
def test_repeated_sigterms_exit_0_and_a_stream_cut_at_the_deadline_ends_with_an_error_and_done(busy):
    """SIGTERM after SIGTERM, every 5 ms until the process is gone, on an idle server and on one streaming an
    answer longer than the drain (0 s): the exit status is 0, and the cut stream's last events are an
    error object (503 shutting_down) and [DONE]."""
    proc, port = _serve("0")
    try:
        events, reader = [], None
        if busy:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", "/v1/chat/completions", json.dumps(
                {"model": NAME, "messages": messages("Keep talking."), "max_tokens": 480, "temperature": 0,
                 "stream": True}), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200

            def read():
                for raw in resp:
                    if raw.startswith(b"data: "):
                        events.append(raw[6:].strip().decode())

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            while len(events) < 3 and reader.is_alive():
                time.sleep(0.01)
        assert _sigterm_until_exit(proc) == 0, proc.stderr.read().decode()[-3000:]
        if busy:
            reader.join(timeout=60)
            assert events[-1] == "[DONE]", events[-3:]
            err = json.loads(events[-2])["error"]
            assert err["code"] == "shutting_down" and "--drain-seconds 0" in err["message"], err
            assert all("error" not in json.loads(e) for e in events[:-2])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
