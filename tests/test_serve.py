"""Serving: the continuous-batching engine and the OpenAI-compatible server, driven by real clients.

One cogvlm2 engine (4 slots) and one cogvlm1 engine (2 slots, queue of 4, text prompts prefilled 8
tokens per step, so most take several chunked-prefill steps) serve every test here; the
HTTP servers run on 127.0.0.1 with a free port and are stopped by their fixtures. The SIGTERM test
runs ``cogvlm-jax serve`` in a subprocess; the page test drives Debian's chromium with Playwright.
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
from conftest import CHROMIUM_FLAGS, cases, chromium_path, fixture_dir, huge_png

from cogvlm_jax.generation.buckets import bucket_length
from cogvlm_jax.serving.engine import Engine
from cogvlm_jax.serving.images import read_image_url
from cogvlm_jax.serving.protocol import APIError, parse_messages
from cogvlm_jax.serving.requests import ContextLengthError, Event, QueueFullError, Request, TextOutput
from cogvlm_jax.serving.server import BackgroundServer, ServerConfig

openai = pytest.importorskip("openai")

NAME = "tiny-cogvlm2"
IMG0 = os.path.join(fixture_dir("cogvlm2"), "images", "img0.png")
IMG1 = os.path.join(fixture_dir("cogvlm2"), "images", "img1.png")

# jax.monitoring listeners cannot be removed: one for the module, recording only while ``on``.
_COMPILES = {"on": False, "events": []}
jax.monitoring.register_event_duration_secs_listener(
    lambda event, *_a, **_k: _COMPILES["events"].append(event)
    if _COMPILES["on"] and event == "/jax/core/compile/backend_compile_duration" else None)


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model(f32_models):
    return f32_models["cogvlm2"]


@pytest.fixture(scope="module")
def engine(model):
    eng = Engine(model, slots=4, max_length=256, max_queue=64).start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    srv = BackgroundServer(engine, ServerConfig(NAME), manage_engine=False).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def engine1(f32_models):
    """A cogvlm1 engine whose every compile is counted, from construction on (no prefix cache: a repeated
    prompt would compile its programs, whose count tests/test_prefix_cache.py checks)."""
    _COMPILES["events"].clear()
    _COMPILES["on"] = True
    eng = Engine(f32_models["cogvlm1"], slots=2, max_length=128, max_queue=4, prefill_chunk=8,
                 prefix_cache_bytes=0).start()
    _COMPILES["on"] = False
    yield eng
    eng.shutdown()


def client(srv, **kw):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                         timeout=120, **kw)


def data_url(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def messages(query, image=None, history=()):
    """OpenAI messages; the image rides on the first user message (the latest image is the image)."""
    out = []
    turns = list(history) + [(query, None)]
    for i, (q, a) in enumerate(turns):
        content = q if (image is None or i > 0) else [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                                      {"type": "text", "text": q}]
        out.append({"role": "user", "content": content})
        if a is not None:
            out.append({"role": "assistant", "content": a})
    return out


def post(url, body, headers=None, method="POST"):
    """(status, parsed JSON) of a raw HTTP request; ``body`` bytes are sent as they are."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                         **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def assert_error(status_body, status, code=None, param=None, match=None):
    got, body = status_body
    assert got == status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    if match is not None:
        assert match in err["message"], err


def stream_text(cl, **kw):
    """(text, finish_reason, usage) of a streamed answer from the openai client."""
    parts, finish, usage = [], None, None
    for chunk in cl.chat.completions.create(model=NAME, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(parts), finish, usage


def chat_cases(family):
    return [c for c in cases(family) if c["template"] == "chat" and c["max_new_tokens"]]


def image_path(family, case):
    return None if case["image"] is None else os.path.join(fixture_dir(family), "images", case["image"])


# ----------------------------------------------------------------------------------------- engine
def test_text_output_holds_back_stop_strings(model):
    out = TextOutput(model.tokenizer, stop=("lo w", "zz"))
    ids = model.tokenizer.encode("hello world")
    emitted, hit = "", False
    for i in ids:
        piece, hit = out.add(i)
        emitted += piece
        if hit:
            break
    assert hit and emitted == "hel"
    plain = TextOutput(model.tokenizer)
    assert "".join(plain.add(i)[0] for i in ids) + plain.flush()[0] == "hello world"


def test_messages_map_onto_the_template():
    q, history, image = parse_messages([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:a"}},
                                     {"type": "text", "text": "A?"}]},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "B?"},
        {"role": "user", "content": [{"type": "text", "text": "C?"},
                                     {"type": "image_url", "image_url": {"url": "data:b"}}]},
    ])
    assert (q, history, image) == ("B?\nC?", [("Be brief.\nA?", "a")], ["data:a", "data:b"])
    for bad, match in (([], "non-empty"), ([{"role": "assistant", "content": "x"}], "must follow a user"),
                       ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "last message"),
                       ([{"role": "tool", "content": "x"}], "unsupported role"),
                       ([{"role": "user", "content": [{"type": "input_audio"}]}], "input_audio"),
                       ([{"role": "user", "content": [{"type": "text", "text": 5}]}], r"content\[0\].text must be")):
        with pytest.raises(APIError, match=match):
            parse_messages(bad)


@pytest.mark.parametrize("family", ["cogvlm1", "cogvlm2"])
def test_engine_greedy_equals_chat_and_reference_while_busy(family, f32_models, engine, engine1):
    """Every chat fixture case, submitted together with other traffic, gives the reference ids' text."""
    model = f32_models[family]
    eng = engine if family == "cogvlm2" else engine1
    jobs = []
    for case in chat_cases(family):
        x = model.build_inputs(case["query"], image=image_path(family, case))
        jobs.append((x, case["max_new_tokens"], case))
    for k in range(eng.slots + 2):  # more than the slots: the cases share the decode with these
        jobs.append((model.build_inputs(f"filler {k}"), 5 + 3 * k, None))
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(eng.complete, x, n) for x, n, _ in jobs]
        results = [f.result(timeout=300) for f in futures]
    eos = model.config.eos_token_ids
    for (x, n, case), (text, last) in zip(jobs, results):
        if case is None:
            assert last.finish_reason in ("stop", "length") and last.completion_tokens <= n
            continue
        ids = [int(i) for i in case["arrays"]["generated_ids"]]
        stop = [i for i, t in enumerate(ids) if t in eos]
        assert text == model.tokenizer.decode(ids[:stop[0]] if stop else ids), case["name"]
        assert text == model.chat(image_path(family, case), case["query"], max_new_tokens=n), case["name"]
        assert last.completion_tokens == (stop[0] + 1 if stop else n)
        assert last.finish_reason == ("stop" if stop else "length")


def test_engine_compiles_once_per_image_prefill_shape_and_once_per_step(f32_models, engine1):
    model = f32_models["cogvlm1"]
    img = os.path.join(fixture_dir("cogvlm1"), "images", "img0.png")
    # Construction compiled the decode chunk for 1 and 2 rows and the chunked-prefill step, nothing else.
    assert engine1.decode_sizes == (1, 2) and engine1.prefill_sizes == (8,)
    assert len(_COMPILES["events"]) == 3, _COMPILES["events"]
    text = [model.build_inputs("hi"), model.build_inputs("a longer question, long enough for the next bucket")]
    images = [model.build_inputs("hi", image=img), model.build_inputs("what is it? " * 3, image=img)]
    prompts = text + images
    assert len({bucket_length(len(x["input_ids"])) for x in text}) == 2  # prefilled alone, they would compile twice
    shapes = {(engine1.bucket(len(x["input_ids"]), image=True), True) for x in images}  # padded by their text
    assert len(shapes) == 2, shapes
    new = len(shapes - engine1.prefill_shapes)  # other tests may have prefilled some of them already
    _COMPILES["on"] = True
    try:
        for rnd in range(2):  # the second round, with other settings, compiles nothing
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(engine1.complete, x, 3 + k + rnd, temperature=0.5 * (k % 2),
                                       top_p=0.9, top_k=k, seed=k + rnd) for k, x in enumerate(prompts + prompts[:2])]
                for f in futures:
                    assert f.result(timeout=300)[1].finish_reason in ("stop", "length")
            assert len(_COMPILES["events"]) == 3 + new, _COMPILES["events"]
        assert shapes <= engine1.prefill_shapes
        assert all(image for _, image in engine1.prefill_shapes)  # no text prompt was prefilled alone
    finally:
        _COMPILES["on"] = False


def test_decode_and_prefill_chunk_sizes():
    """The decode chunk runs the rows up to the last busy slot, rounded up to a power of two or all of them;
    a prompt's last chunk is the shortest of 16, 32, 64, ... or the whole chunk that holds it."""
    from cogvlm_jax.generation.buckets import decode_sizes, prefill_sizes

    assert decode_sizes(1) == (1,) and decode_sizes(16) == (1, 2, 4, 8, 16) and decode_sizes(6) == (1, 2, 4, 6)
    assert prefill_sizes(0) == () and prefill_sizes(8) == (8,) and prefill_sizes(16) == (16,)
    assert prefill_sizes(48) == (16, 32, 48) and prefill_sizes(256) == (16, 32, 64, 128, 256)


def test_decode_runs_only_the_rows_up_to_the_last_busy_slot(model, engine, monkeypatch):
    """One request on 4 slots decodes one row, two decode two (requests take the lowest free slots); the
    answers are chat's either way."""
    rows = []
    device = engine._device

    def spy(op, *args):
        if op == "decode":
            rows.append(int(args[1]))
        return device(op, *args)

    monkeypatch.setattr(engine, "_device", spy)
    x = model.build_inputs("how many rows?")
    want = model.chat(None, "how many rows?", max_new_tokens=9)
    assert engine.complete(x, 9)[0] == want
    assert rows and set(rows) == {1}, rows
    rows.clear()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        both = [f.result(timeout=300)[0] for f in [pool.submit(engine.complete, x, 9) for _ in range(2)]]
    assert both == [want, want]
    assert 2 in rows and set(rows) <= {1, 2}, rows


def test_engine_seeded_sampling_equals_chat_whatever_else_runs(model, engine, server):
    case = next(c for c in chat_cases("cogvlm2") if c["image"] is None)
    kw = dict(temperature=0.9, top_p=0.9, seed=11)
    want = model.chat(None, case["query"], max_new_tokens=8, **kw)
    x = model.build_inputs(case["query"])
    alone = engine.complete(x, 8, **kw)[0]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        noise = [pool.submit(engine.complete, model.build_inputs(f"noise {k}"), 12 if k % 2 else 4,
                             temperature=0.0 if k % 2 else 1.0, seed=k) for k in range(5)]
        busy = pool.submit(engine.complete, x, 8, **kw).result(timeout=300)[0]
        assert all(f.result(timeout=300)[1].finish_reason for f in noise)
    other_seed = engine.complete(x, 8, temperature=0.9, top_p=0.9, seed=12)[0]
    assert alone == busy == want
    assert other_seed != want
    # Over HTTP any integer seed is model.chat's seed (2**31 + 11 is not 11; both sides take it mod 2**32).
    big = 2**31 + 11
    want_big = model.chat(None, case["query"], max_new_tokens=8, temperature=0.9, top_p=0.9, seed=big)
    r = client(server).chat.completions.create(model=NAME, messages=messages(case["query"]), max_tokens=8,
                                               temperature=0.9, top_p=0.9, seed=big)
    assert r.choices[0].message.content == want_big != want


def test_idle_slots_do_not_grow_the_part_of_the_cache_decode_reads(model, engine):
    """Decode attention reads every row up to the largest cache write index: an idle or finished slot must
    not advance its index (it did by one per step, forever, until every step read the whole cache)."""
    x = model.build_inputs("Tell me about a blue line.")
    for n in (9, 6):  # the second request runs alone after the first left its slot
        assert engine.complete(x, n, temperature=0)[1].completion_tokens <= n
    index = np.asarray(engine._state.cache.index)
    assert (index > 0).sum() == 1, index  # only the slot that served the last request
    assert index.max() <= bucket_length(len(x["input_ids"])) + 6 + engine.chunk, index


def test_a_prompt_that_fits_unpadded_is_served_up_to_the_last_cache_slot(model, engine):
    """A prompt just past a step of the ladder (its bucket, 256, is the whole cache) with max_tokens filling
    the cache to the last slot: offered by room() (the server's default max_tokens), served (padded less), equal
    to chat's answer."""
    query = "Tell me"
    while len(model.build_inputs(query)["input_ids"]) <= 192:
        query += " more"
    x = model.build_inputs(query)
    n = len(x["input_ids"])
    assert 192 < n < 200 and bucket_length(n) == engine.max_length
    room = engine.max_length - n
    assert engine.room(n) == room
    engine.check(n, room)
    with pytest.raises(ContextLengthError, match="--max-length"):  # one token more does not fit
        engine.check(n, room + 1)
    text, last = engine.complete(x, room, temperature=0)
    assert last.finish_reason in ("stop", "length") and last.completion_tokens <= room
    assert text == model.chat(None, query, max_new_tokens=room)


# ----------------------------------------------------------------------------------------- HTTP
def test_openai_client_answers_equal_chat(model, server):
    cl = client(server)
    assert [m.id for m in cl.models.list().data] == [NAME]
    convs = [("What color is the circle?", IMG0, ()), ("Tell me about a blue line.", None, ()),
             ("And now?", IMG1, [("Hi", "Hello!")]),  # multi-turn; the image sits on the first turn
             ("Why?", None, [("Blue line?", "Blue."), ("More.", "Long.")])]
    for query, image, history in convs:
        want = model.chat(image, query, history=history, max_new_tokens=8)
        msgs = messages(query, image, history)
        r = cl.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
        x = model.build_inputs(query, history, image)
        ids = model.generate(x["input_ids"][None], x["token_type_ids"][None], x["attention_mask"][None],
                             None if image is None else x["pixel_values"][None], max_new_tokens=8)[0].tolist()
        eos = [i for i, t in enumerate(ids) if t in model.config.eos_token_ids]
        n = len(x["input_ids"])
        m = eos[0] + 1 if eos else 8  # generated tokens, the eos included
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n, m, n + m), r.usage
        assert r.choices[0].finish_reason == ("stop" if eos else "length")
        text, finish, usage = stream_text(cl, messages=msgs, max_completion_tokens=8, temperature=0)
        assert (text, finish) == (want, r.choices[0].finish_reason)
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (n, m, n + m)


def test_stop_strings_end_the_answer(model, server):
    cl = client(server)
    full = model.chat(None, "Tell me about a blue line.", max_new_tokens=8)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    r = cl.chat.completions.create(model=NAME, messages=messages("Tell me about a blue line."), max_tokens=8,
                                   temperature=0, stop=[stop, "never-there"])
    assert r.choices[0].message.content == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    text, finish, _ = stream_text(cl, messages=messages("Tell me about a blue line."), max_tokens=8, temperature=0,
                                  stop=stop)
    assert (text, finish) == (full[:full.index(stop)], "stop")


def _sse_events(srv, body):
    """(status, the data of each SSE event) of a raw streamed request; checks the framing on the way."""
    conn = http.client.HTTPConnection("127.0.0.1", int(srv.url.rsplit(":", 1)[1]), timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.getheader("Content-Type").startswith("text/event-stream")
        raw = resp.read().decode()
    finally:
        conn.close()
    events = raw.split("\n\n")
    assert events[-1] == "" and all(e.startswith("data: ") and "\n" not in e for e in events[:-1]), raw
    return resp.status, [e[len("data: "):] for e in events[:-1]]


def test_sse_framing_and_the_usage_chunk(model, server):
    """Raw SSE: one ``data:`` line per event, one id, ``[DONE]`` last; with include_usage every chunk but the
    last carries ``"usage": null`` and the last has no choices and the usage (OpenAI's stream shape)."""
    status, events = _sse_events(server, {"model": NAME, "messages": messages("Tell me about a blue line."),
                                          "max_tokens": 8, "temperature": 0, "stream": True,
                                          "stream_options": {"include_usage": True}})
    assert status == 200 and events[-1] == "[DONE]", events
    chunks = [json.loads(e) for e in events[:-1]]
    assert {(c["id"], c["object"], c["created"], c["model"]) for c in chunks} == {
        (chunks[0]["id"], "chat.completion.chunk", chunks[0]["created"], NAME)}
    *answer, last = chunks
    assert all("usage" in c and c["usage"] is None for c in answer), answer
    assert answer[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert answer[-1]["choices"][0]["finish_reason"] in ("stop", "length") and answer[-1]["choices"][0]["delta"] == {}
    want = model.chat(None, "Tell me about a blue line.", max_new_tokens=8)  # compiled by the tests above
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in answer) == want
    n = len(model.build_inputs("Tell me about a blue line.")["input_ids"])
    assert last["choices"] == [] and last["usage"]["prompt_tokens"] == n
    assert last["usage"]["total_tokens"] == n + last["usage"]["completion_tokens"] <= n + 8


def test_a_device_failure_fails_what_runs_and_the_engine_serves_on(model, engine, server):
    """The decode chunk raises once: the streamed request ends with an error object and [DONE], the next is served."""
    programs, real = engine._programs, engine._programs.decode

    def fail_once(*args, **kw):
        programs.decode = real
        raise RuntimeError("injected device failure")

    programs.decode = fail_once
    try:
        status, events = _sse_events(server, {"model": NAME, "messages": messages("Go on and on."), "max_tokens": 50,
                                              "temperature": 0, "stream": True})
    finally:
        programs.decode = real
    assert status == 200 and events[-1] == "[DONE]", events
    err = json.loads(events[-2])["error"]
    assert err["type"] == "server_error" and "injected device failure" in err["message"], err
    q = "Tell me about a blue line."  # model.chat of 8 tokens compiled by the tests above
    r = client(server).chat.completions.create(model=NAME, messages=messages(q), max_tokens=8, temperature=0)
    assert r.choices[0].message.content == model.chat(None, q, max_new_tokens=8)
    assert engine.stats()["busy"] == 0


def test_an_engine_whose_thread_dies_answers_every_request_with_503(model):
    """The device fails, then so does rebuilding the slots: the engine thread cannot go on. The running request,
    one waiting (streamed), every later one and /health get a 503 ``engine_failed`` error, in bounded time.
    Fake device programs (nothing compiles): the first insert fails, and every empty() after the warm-up's."""
    eng = Engine(model, slots=2, max_length=64, max_queue=4)
    programs, make_empty = eng._programs, eng._programs.empty
    inserting, release, empties = threading.Event(), threading.Event(), []

    def insert(*args):
        inserting.set()
        release.wait(60)  # until the second request waits in the queue
        raise RuntimeError("injected device failure")

    def empty():
        empties.append(1)
        if len(empties) > 1:
            raise RuntimeError("injected: the device is gone")
        return make_empty()

    programs.insert, programs.empty = insert, empty
    programs.decode = lambda params, state, live, active: (state, np.zeros((active, eng.chunk), np.int32))
    body = {"model": NAME, "messages": messages("hi"), "max_tokens": 3, "temperature": 0}
    with BackgroundServer(eng, ServerConfig(NAME)) as srv, concurrent.futures.ThreadPoolExecutor(2) as pool:
        url = srv.url + "/v1/chat/completions"
        running = pool.submit(post, url, body)
        assert inserting.wait(60)
        waiting = pool.submit(_sse_events, srv, {**body, "stream": True})
        deadline = time.monotonic() + 60
        while eng.stats()["waiting"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        assert_error(running.result(timeout=30), 503, "engine_failed", match="injected device failure; then "
                     "rebuilding the slots failed: RuntimeError: injected: the device is gone")
        status, events = waiting.result(timeout=30)
        assert status == 200 and events[-1] == "[DONE]", events
        err = json.loads(events[-2])["error"]
        assert err["code"] == "engine_failed" and "the engine failed" in err["message"], err
        assert_error(post(url, body), 503, "engine_failed", match="restart the server")
        status, health = post(srv.url + "/health", None, method="GET")
        assert status == 503 and health["status"] == "failed" and health["error"]["code"] == "engine_failed"
        assert health["busy"] == health["waiting"] == 0, health
    assert len(empties) == 2


def test_32_concurrent_streams_on_4_slots_each_equal_to_its_solo_answer(model, engine, server):
    rng = __import__("random").Random(0)
    jobs = []
    for k in range(32):
        image = (None, IMG0, IMG1)[k % 3]
        words = " ".join(rng.choice(["what", "is", "the", "shape", "colour", "here", "left"]) for _ in range(1 + k % 5))
        # Lengths vary within two prefill shapes (text 16, image 32): each new shape costs a compile.
        query = words if image is None else "Look at this picture please: " + words
        # Two sampled requests (short: top-p over the 128k vocabulary is slow on this CPU), the rest greedy.
        sampled = dict(temperature=0.8, top_p=0.95, seed=k) if k % 16 == 5 else dict(temperature=0)
        jobs.append((query, image, 4 if sampled["temperature"] else 2 + (k * 7) % 23, sampled))
    solo = []
    for query, image, n, sampled in jobs:  # one at a time: nothing else in the slots
        solo.append(engine.complete(model.build_inputs(query, image=image), n, **sampled)[0])
    assert engine.stats()["busy"] == 0
    cl = client(server)
    deadline = time.monotonic() + 240

    def one(job):
        query, image, n, sampled = job
        return stream_text(cl, messages=messages(query, image), max_tokens=n, **sampled)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(one, job) for job in jobs]
        got = [f.result(timeout=max(1.0, deadline - time.monotonic())) for f in futures]
    for k, ((text, finish, usage), want, job) in enumerate(zip(got, solo, jobs)):
        assert text == want, k
        assert finish in ("stop", "length") and usage.completion_tokens <= job[2]
    assert engine.stats()["busy"] == 0 and engine.stats()["waiting"] == 0


def test_client_that_disconnects_frees_its_slot(model, engine, server):
    cl = client(server)
    before = engine.stats()["cancelled"]
    others = [("Tell me about a blue line.", None, 12), ("What color is the circle?", IMG0, 9)]
    want = [engine.complete(model.build_inputs(q, image=i), n, temperature=0)[0] for q, i, n in others]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        stream = cl.chat.completions.create(model=NAME, messages=messages("Go on and on."), max_tokens=200,
                                            temperature=0, stream=True)
        it = iter(stream)
        next(it), next(it)  # the role chunk and the first words
        futures = [pool.submit(stream_text, cl, messages=messages(q, i), max_tokens=n, temperature=0)
                   for q, i, n in others]
        stream.close()  # the client goes away mid-answer
        assert [f.result(timeout=120)[0] for f in futures] == want
    deadline = time.monotonic() + 30
    while engine.stats()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["cancelled"] == before + 1
    assert engine.stats()["busy"] == 0
    # A non-streaming client too, gone while its tokens keep coming (no pause in the events to notice it in).
    body = json.dumps({"model": NAME, "messages": messages("Go on and on."), "max_tokens": 200,
                       "temperature": 0}).encode()
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        while engine.stats()["busy"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    while engine.stats()["busy"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["cancelled"] == before + 2, f"not cancelled; ran {time.monotonic() - t0:.2f} s"


def test_every_error_is_an_openai_error_and_the_server_keeps_serving(model, engine, server, tmp_path):
    url = server.url + "/v1/chat/completions"
    ok = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    with_image = lambda u: {**ok, "messages": [{"role": "user", "content": [  # noqa: E731
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": u}}]}]}
    assert_error(post(url, b"{not json"), 400, "invalid_json")
    nan = json.dumps(ok).replace('"temperature": 0', '"temperature": NaN').encode()  # Python's json, not JSON
    assert_error(post(url, nan), 400, "invalid_json", match="NaN")
    assert_error(post(url, b"[1, 2]"), 400, match="JSON object")
    assert_error(post(url, {**ok, "n": 2}), 400, "unsupported_parameter", "n")
    assert_error(post(url, {**ok, "n": 0}), 400, param="n", match="must be in [1, inf)")
    assert_error(post(url, {**ok, "tools": [{"type": "function", "function": {"name": "f"}}]}), 400,
                 "unsupported_parameter", "tools")
    assert_error(post(url, {**ok, "logprobs": True}), 400, "unsupported_parameter", "logprobs")
    assert_error(post(url, {**ok, "stream_options": {"include_usage": True}}), 400, param="stream_options",
                 match="only with 'stream'")
    assert_error(post(url, {**ok, "temperature": "hot"}), 400, param="temperature")
    assert_error(post(url, {**ok, "max_tokens": 0}), 400, param="max_tokens")
    assert_error(post(url, {**ok, "model": "gpt-4o"}), 404, "model_not_found", "model")
    assert_error(post(url, {**ok, "max_tokens": 8192}), 400, "context_length_exceeded", match="context length 8192")
    assert_error(post(url, {**ok, "max_tokens": 250}), 400, "context_length_exceeded", match="--max-length")
    assert_error(post(url, with_image("data:image/png;base64,aGVsbG8gd29ybGQ=")), 400, "invalid_image")
    assert_error(post(url, with_image("data:image/png;base64,***")), 400, "invalid_image")
    huge = huge_png(7000, 6000)  # 40 kB declaring 42 MP: refused from its header (--max-image-pixels)
    assert_error(post(url, with_image("data:image/png;base64," + base64.b64encode(huge).decode())), 400,
                 "image_too_large", match="7000x6000 = 42.0 megapixels, over the limit of 40 megapixels")
    assert_error(post(url, with_image("https://example.com/cat.png")), 400, "invalid_image_url", match="https://")
    assert_error(post(url, with_image("file:///etc/passwd")), 400, "invalid_image_url", match="--image-root")
    assert_error(post(url, {**ok, "messages": [{"role": "assistant", "content": "x"}]}), 400, param="messages")
    assert_error(post(server.url + "/v1/nothing", ok), 404)
    assert_error(post(server.url + "/v1/models/gpt-4o", None, method="GET"), 404, "model_not_found")
    assert post(server.url + "/v1/models/" + NAME, None, method="GET")[1]["id"] == NAME
    # Oversized images, and file:// under --image-root only: a second app on the same engine.
    root = tmp_path / "images"
    root.mkdir()
    shutil.copy(IMG0, root / "img0.png")
    (tmp_path / "secret.png").write_bytes(open(IMG1, "rb").read())
    os.symlink(tmp_path / "secret.png", root / "link.png")
    small = ServerConfig(NAME, image_root=str(root), max_image_bytes=os.path.getsize(IMG0))
    with BackgroundServer(engine, small, manage_engine=False) as srv2:
        url2 = srv2.url + "/v1/chat/completions"
        big = b"\x89PNG" + b"\0" * (os.path.getsize(IMG0) + 10)
        assert_error(post(url2, with_image("data:image/png;base64," + base64.b64encode(big).decode())), 413,
                     "image_too_large")
        status, body = post(url2, with_image(f"file://{root}/img0.png"))
        assert status == 200, body
        inline = post(url2, with_image(data_url(IMG0)))[1]
        assert body["choices"][0]["message"] == inline["choices"][0]["message"]
        for escape in (f"file://{root}/../secret.png", f"file://{root}/link.png", "file:///etc/passwd",
                       f"file://{root}/missing.png", f"file://{root}/img0.png%00.txt"):
            assert_error(post(url2, with_image(escape)), 400, "invalid_image_url")
    status, body = post(url, ok)
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length"), body
    assert engine.stats()["busy"] == 0


def test_a_link_swapped_in_between_the_check_and_the_open_is_refused(tmp_path, monkeypatch):
    """The file:// path is checked (resolved under --image-root), then opened. A symlink to a file outside put in
    its place right after the check must not be read: the opened file itself is checked."""
    base = os.path.realpath(tmp_path)
    root, target, secret = os.path.join(base, "root"), os.path.join(base, "root", "img.png"), os.path.join(base, "s")
    os.mkdir(root)
    with open(secret, "wb") as f:
        f.write(b"outside")
    with open(target, "wb") as f:
        f.write(b"inside")
    assert read_image_url(f"file://{target}", root, 1 << 20) == b"inside"
    resolve, swapped = os.path.realpath, []

    def resolve_then_swap(p, *args, **kw):
        out = resolve(p, *args, **kw)
        if out == target and not swapped:  # the check has just seen the file under the root: swap it now
            os.remove(target)
            os.symlink(secret, target)
            swapped.append(p)
        return out

    monkeypatch.setattr(os.path, "realpath", resolve_then_swap)
    with pytest.raises(APIError) as e:
        read_image_url(f"file://{target}", root, 1 << 20)
    assert swapped and e.value.code == "invalid_image_url" and "outside --image-root" in e.value.message


def test_api_key_guards_every_endpoint_but_health(engine):
    with BackgroundServer(engine, ServerConfig(NAME, api_key="sesame"), manage_engine=False) as srv:
        assert post(srv.url + "/health", None, method="GET")[0] == 200
        for path, body, method in (("/v1/models", None, "GET"), ("/v1/chat/completions", {"messages": []}, "POST")):
            assert_error(post(srv.url + path, body, method=method), 401, "invalid_api_key")
            assert_error(post(srv.url + path, body, {"Authorization": "Bearer wrong"}, method), 401)
        with pytest.raises(openai.AuthenticationError):
            client(srv, api_key="wrong").models.list()
        r = client(srv, api_key="sesame").chat.completions.create(
            model=NAME, messages=messages("hi"), max_tokens=2, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")


def test_full_queue_is_429_and_the_queue_drains(f32_models, engine1):
    """Hold the engine thread inside one request's event; the next requests can only queue."""
    model = f32_models["cogvlm1"]
    release = threading.Event()
    blocked = threading.Event()

    def hold(ev: Event):
        blocked.set()
        release.wait(60)

    first = engine1.submit(Request(model.build_inputs("hi"), 4, hold))
    assert blocked.wait(120)
    with BackgroundServer(engine1, ServerConfig("tiny-cogvlm1"), manage_engine=False) as srv:
        url = srv.url + "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0}
        room = engine1.slots - 1 + engine1.max_queue  # the free slots (not taken yet: the thread is held) + queue
        with concurrent.futures.ThreadPoolExecutor(room) as pool:
            queued = [pool.submit(post, url, body) for _ in range(room)]
            deadline = time.monotonic() + 30
            while engine1.stats()["waiting"] < room and time.monotonic() < deadline:
                time.sleep(0.02)
            assert engine1.stats()["waiting"] == room
            assert_error(post(url, body), 429, "queue_full", match=f"--max-queue {engine1.max_queue}")
            with pytest.raises(QueueFullError):
                engine1.submit(Request(model.build_inputs("hi"), 2, lambda ev: None))
            first.cancel()
            release.set()
            answers = [f.result(timeout=120) for f in queued]
    want = model.chat(None, "hello", max_new_tokens=8)
    assert [(s, b["choices"][0]["message"]["content"]) for s, b in answers] == [(200, want)] * room


def test_cancelled_waiting_requests_leave_the_queue(f32_models, engine1):
    """Requests cancelled while they wait (their clients went away) neither hold queue places nor count as waiting."""
    import queue

    model = f32_models["cogvlm1"]
    release, blocked = threading.Event(), threading.Event()
    first = engine1.submit(Request(model.build_inputs("hi"), 4, lambda ev: (blocked.set(), release.wait(60))))
    try:
        assert blocked.wait(120)
        x = model.build_inputs("hello")
        waiting = [engine1.submit(Request(x, 8, lambda ev: None)) for _ in range(engine1.slots - 1 + engine1.max_queue)]
        with pytest.raises(QueueFullError):
            engine1.submit(Request(x, 8, lambda ev: None))
        for r in waiting:
            r.cancel()
        assert engine1.stats()["waiting"] == 0
        events: queue.Queue = queue.Queue()
        engine1.submit(Request(x, 8, events.put))
    finally:
        first.cancel()
        release.set()
    text = []
    while not text or text[-1].finish_reason is None:
        text.append(events.get(timeout=120))
    assert "".join(e.text for e in text) == model.chat(None, "hello", max_new_tokens=8)  # as in the 429 test


# ----------------------------------------------------------------------------------------- a real process
def _read_line(proc, deadline):
    import select

    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            ch = os.read(proc.stdout.fileno(), 1)
            if not ch:
                break
            if ch == b"\n":
                return buf.decode()
            buf += ch
        elif proc.poll() is not None:
            break
    raise AssertionError(f"no start line from the server (exit {proc.poll()}): {buf!r} {proc.stderr.read()!r}")


def test_sigterm_stops_accepting_drains_and_exits_0(model):
    d = fixture_dir("cogvlm2")
    # One slot and --max-length 512, as the servers of tests/test_serve_hostile.py: the same programs, which
    # they read back from the run's compilation cache.
    proc = subprocess.Popen(
        [sys.executable, "-m", "cogvlm_jax.cli", "serve", "--model", os.path.join(d, "checkpoint"), "--tokenizer",
         os.path.join(d, "tokenizer"), "--port", "0", "--slots", "1", "--max-length", "512",
         "--drain-seconds", "120", "--model-name", NAME],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    try:
        line = _read_line(proc, time.monotonic() + 240)
        port = int(line.rsplit(":", 1)[1].split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        n = 480
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"model": NAME, "messages": messages("Keep talking."), "max_tokens": n, "temperature": 0,
             "stream": True, "stream_options": {"include_usage": True}}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        arrivals = []  # (time, SSE data) as the stream comes in

        def read_stream():
            for raw in resp:
                if raw.startswith(b"data: "):
                    arrivals.append((time.monotonic(), raw[6:].strip().decode()))

        reader = threading.Thread(target=read_stream, daemon=True)
        reader.start()
        while len(arrivals) < 3 and reader.is_alive():
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        refused_at, deadline = None, time.monotonic() + 30
        while refused_at is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                time.sleep(0.02)
            except OSError:
                refused_at = time.monotonic()
        assert refused_at is not None, "still accepting connections after SIGTERM"
        reader.join(timeout=180)
        assert not reader.is_alive()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        data = [x for _, x in arrivals]
        assert data[-1] == "[DONE]"
        usage = json.loads(data[-2])["usage"]
        assert json.loads(data[-3])["choices"][0]["finish_reason"] == "length" and usage["completion_tokens"] == n
        after = [t for t, x in arrivals if t > refused_at and '"content"' in x]
        assert after, "nothing was generated after the server stopped accepting: the drain was not tested"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_every_image_of_every_user_message_is_a_span_in_order(model, server):
    """Three images over two user messages: the prompt holds three spans, history's first, and the answer
    is Model.chat's with the same images."""
    def image_part(path):
        return {"type": "image_url", "image_url": {"url": data_url(path)}}

    msgs = [{"role": "user", "content": [image_part(IMG0), {"type": "text", "text": "Look."}]},
            {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": [image_part(IMG1), {"type": "text", "text": "Which is red?"}, image_part(IMG0)]}]
    r = client(server).chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=0)
    history = [("Look.", "Yes.", IMG0)]
    x = model.build_inputs("Which is red?", history, [IMG1, IMG0])
    assert x["pixel_values"].shape[0] == 3 and int(x["token_type_ids"].sum()) == 3 * model.config.num_image_tokens
    assert r.usage.prompt_tokens == len(x["input_ids"])
    assert r.choices[0].message.content == model.chat([IMG1, IMG0], "Which is red?", history, max_new_tokens=6)


# ----------------------------------------------------------------------------------------- the page
def test_chat_page_in_headless_chromium_streams_the_api_answer(model, server):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    cl = client(server)
    q1, q2 = "What color is the circle?", "Tell me more."
    a1 = cl.chat.completions.create(model=NAME, messages=messages(q1, IMG0), max_tokens=8, temperature=0)
    a1 = a1.choices[0].message.content
    a2 = cl.chat.completions.create(model=NAME, messages=messages(q2, IMG0, [(q1, a1)]), max_tokens=8,
                                    temperature=0).choices[0].message.content
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent === %s" % json.dumps(NAME))
            page.fill("#max-tokens", "8")
            page.fill("#temperature", "0")
            page.set_input_files("#image", IMG0)
            page.wait_for_selector("#preview[src^='data:image/png;base64,']", state="attached")
            for k, (question, want) in enumerate(((q1, a1), (q2, a2)), start=1):
                page.fill("#question", question)
                page.click("#send")
                page.wait_for_function(
                    "n => document.body.dataset.state === 'idle' && "
                    "document.querySelectorAll('.msg.assistant').length === n", arg=k, timeout=120_000)
                assert page.locator(".msg.error").count() == 0, page.locator(".msg.error").all_inner_texts()
                shown = page.locator(".msg.assistant .text").nth(k - 1).text_content()
                assert shown == want, (k, shown, want)
            assert page.locator(".msg.user img").count() == 1  # the image was sent once, with the first question
        finally:
            browser.close()


def test_chat_page_draws_the_boxes_of_an_answer_on_the_conversations_image(server):
    """Grounding answers (canned here: the fixture model writes no boxes) are outlined on the latest image
    sent, at the thousandths they name; malformed box text draws nothing; an answer without boxes no image."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    answers = ["A dog [[100,200,499,699]] and a", " ball [[600,600,799,899;000,000,1000,999]] [[1,2,3]]",
               "Also here [[250,250,749,749]].", "No boxes [[x]]."]
    sent = []

    def fake_completion(route):
        sent.append(route.request.post_data_json)
        pieces = answers[:2] if len(sent) == 1 else [answers[len(sent)]]
        body = "".join("data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": p}}]}) + "\n\n"
                       for p in pieces) + "data: [DONE]\n\n"
        route.fulfill(status=200, content_type="text/event-stream", body=body)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.route("**/v1/chat/completions", fake_completion)
            page.goto(server.url + "/")
            page.set_input_files("#image", IMG0)
            page.wait_for_selector("#preview[src^='data:image/png;base64,']", state="attached")
            for k, question in enumerate(("Where is the dog?", "And the cat?", "Anything else?"), start=1):
                page.fill("#question", question)
                page.click("#send")
                page.wait_for_function("n => document.body.dataset.state === 'idle' && "
                                       "document.querySelectorAll('.msg.assistant').length === n", arg=k)
            assert page.locator(".msg.error").count() == 0, page.locator(".msg.error").all_inner_texts()
            assert sent[0]["messages"][0]["content"][0]["image_url"]["url"] == data_url(IMG0)
            bubbles = page.locator(".msg.assistant")
            assert [bubbles.nth(i).locator(".box").count() for i in range(3)] == [3, 1, 0]
            assert bubbles.nth(2).locator(".boxed").count() == 0
            for i in range(2):  # both drawn on the image of the first turn
                assert bubbles.nth(i).locator(".boxed img").get_attribute("src") == data_url(IMG0)
            styles = bubbles.nth(0).locator(".box").evaluate_all(
                "boxes => boxes.map(b => [b.style.left, b.style.top, b.style.width, b.style.height])")
            assert styles == [["10%", "20%", "40%", "50%"], ["60%", "60%", "20%", "30%"],
                              ["0%", "0%", "100%", "100%"]]
            # on screen: the box's outer edges at those fractions of the shown image
            rects = bubbles.nth(1).locator(".boxed").evaluate(
                "w => [w.querySelector('img').getBoundingClientRect(), w.querySelector('.box').getBoundingClientRect()]"
                ".map(r => [r.left, r.top, r.width, r.height])")
            (il, it, iw, ih), (bl, bt, bw, bh) = rects
            assert iw > 0 and abs(bl - il - 0.25 * iw) < 1 and abs(bt - it - 0.25 * ih) < 1
            assert abs(bw - 0.5 * iw) < 1 and abs(bh - 0.5 * ih) < 1
        finally:
            browser.close()
