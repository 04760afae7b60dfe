"""Serving across two processes, for real: ``cogvlm-jax serve`` on a two-process JAX cluster on 127.0.0.1
(4 CPU devices each, gloo collectives), on its default mesh (1, 2, 4). Process 0 serves HTTP; process 1
runs the device programs process 0's engine sends it.

The fixture ``served`` starts the pair (each killed if it outlives its deadline), sends it requests for both
slots and one more (it waits for a slot, then is inserted between decode chunks), reads /health, and
stops process 0 with SIGTERM: the follower must stop with it. The servers prefill text prompts in
chunks of 8 (``--prefill-chunk 8``), so the text-only request takes several chunked-prefill steps on
the sharded cache, and the image requests the prefill-alone path. Every pair here runs the same
settings, so the pairs after the first read its programs back from the run's compilation cache.

The fixture ``lost_follower`` starts another pair (``--peer-timeout 3``) once per way of losing the
follower: SIGKILL (gloo sees its socket close) and SIGSTOP (it hangs: process 0's collective would wait
for it forever). Once the pair has answered a request, the follower is lost and process 0 is asked again:
the request in flight, ``/health`` and a later request get a 503 ``engine_failed`` error naming process
1, and process 0 exits with status ``EXIT_PEER_LOST`` and a message naming it, within the timeout plus
the grace (``serving/peers.py``).
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request

import pytest
from conftest import cases, fixture_dir
from processes import finish, free_port, python, start

import cogvlm_jax

DEADLINE_S = 240  # hard limit for each child, well above what the children need
NAME = "tiny-two-processes"
# fixture cases (chat template, greedy): two slots, and a third request that waits for one
REQUESTS = ["chat_image", "chat_text_only", "chat_image"]
FOLLOW_UP = "And what else is there?"


def _case(name):
    return next(c for c in cases("cogvlm1") if c["name"] == name)


def _body(case):
    content = case["query"]
    if case["image"] is not None:
        with open(os.path.join(fixture_dir("cogvlm1"), "images", case["image"]), "rb") as f:
            url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": content}]
    return {"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": case["max_new_tokens"],
            "temperature": 0}


def _reference_text(case, model) -> str:
    """The reference implementation's greedy answer (the fixture's ids, up to eos)."""
    ids = [int(i) for i in case["arrays"]["generated_ids"]]
    stop = [i for i, t in enumerate(ids) if t in model.config.eos_token_ids]
    return model.tokenizer.decode(ids[:stop[0]] if stop else ids)


def _request(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _status_and_body(url, body=None):
    """-> (HTTP status, JSON body), an error status included."""
    try:
        return 200, _request(url, body)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_for_url(path, children) -> str:
    """The address process 0 announces on its stdout (None if a child exits or the deadline passes first)."""
    while time.monotonic() - children["t0"] < DEADLINE_S:
        with open(path) as f:
            found = re.search(r"on (http://\S+) ", f.read())
        if found:
            return found.group(1)
        if any(p.poll() is not None for p in children["procs"].values()):
            return None
        time.sleep(0.2)
    return None


def _serve_commands(*extra: str) -> dict:
    """``cogvlm-jax serve`` of the cogvlm1 fixture model on a new two-process cluster, for process 0 and 1
    (text prompts prefilled in chunks of 8)."""
    d = fixture_dir("cogvlm1")
    port = free_port()
    return {f"serve{i}": python("-m", "cogvlm_jax.cli", "serve", "--model", os.path.join(d, "checkpoint"),
                                "--tokenizer", os.path.join(d, "tokenizer"), "--model-name", NAME, "--port", "0",
                                "--slots", "2", "--decode-chunk", "2", "--max-length", "128", "--prefill-chunk", "8",
                                *extra,
                                "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                "--process-id", str(i), "--init-timeout", "60")
            for i in (0, 1)}


@pytest.fixture(scope="module")
def served(tmp_path_factory, f32_models):
    work = str(tmp_path_factory.mktemp("multihost_serve"))
    children = start(_serve_commands(), work)
    answers, health, stop_seconds, follow_up = None, None, None, None
    want = [_reference_text(_case(name), f32_models["cogvlm1"]) for name in REQUESTS]
    try:
        url = _wait_for_url(os.path.join(work, "serve0.out"), children)
        if url is not None:
            with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
                replies = list(pool.map(lambda b: _request(url + "/v1/chat/completions", b),
                                        [_body(_case(name)) for name in REQUESTS]))
            answers = [r["choices"][0]["message"]["content"] for r in replies]
            # the next turn of the first conversation: prefilled after its kept keys and values, on both processes
            body = _body(_case(REQUESTS[0]))
            body["messages"] += [{"role": "assistant", "content": answers[0]}, {"role": "user", "content": FOLLOW_UP}]
            follow_up = _request(url + "/v1/chat/completions", body)
            health = _request(url + "/health")
            t = time.monotonic()
            children["procs"]["serve0"].send_signal(signal.SIGTERM)
            children["procs"]["serve1"].wait(timeout=max(1.0, DEADLINE_S - (t - children["t0"])))
            stop_seconds = time.monotonic() - t
    finally:
        results = finish(children, DEADLINE_S)
    return {"results": results, "want": want, "answers": answers, "health": health, "stop_seconds": stop_seconds,
            "follow_up": follow_up}


def test_two_processes_serve_the_reference_answers(served):
    r = served["results"]
    assert served["answers"] is not None, f"no server: {r['serve0']['stderr'][-3000:]}\n{r['serve1']['stderr'][-3000:]}"
    print(f"\nanswers: {served['answers']}")
    assert served["answers"] == served["want"]
    assert served["health"]["completed"] == len(REQUESTS) + 1 and served["health"]["slots"] == 2


def test_two_processes_resume_a_conversation_from_the_prefix_cache(served, f32_models):
    """The follow-up turn of the first conversation is prefilled after its kept prefix (every process
    holds the kept keys and values) and answers what the whole prompt's prefill answers."""
    reply = served["follow_up"]
    assert reply is not None, "no server"
    case = _case(REQUESTS[0])
    image = os.path.join(fixture_dir("cogvlm1"), "images", case["image"])
    plain = cogvlm_jax.Model(f32_models["cogvlm1"].config, f32_models["cogvlm1"].params,
                             f32_models["cogvlm1"].tokenizer, prefix_cache_bytes=0)
    want = plain.chat(image, FOLLOW_UP, [(case["query"], served["answers"][0])], max_new_tokens=case["max_new_tokens"])
    assert reply["choices"][0]["message"]["content"] == want
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, reply["usage"]
    assert served["health"]["prefix_cache"]["hits"] >= 1, served["health"]


def test_follower_stops_with_process_0_and_only_process_0_serves(served):
    r = served["results"]
    print(f"\nthe follower stopped {served['stop_seconds']:.1f} s after process 0 was sent SIGTERM")
    for name in ("serve0", "serve1"):
        assert r[name]["rc"] == 0, f"{name} rc {r[name]['rc']}:\n{r[name]['stderr'][-3000:]}"
    assert len(r["serve0"]["stdout"].splitlines()) == 1 and f"{NAME} on http://" in r["serve0"]["stdout"]
    assert r["serve1"]["stdout"] == ""


PEER_TIMEOUT_S = 3.0


@pytest.fixture(scope="module", params=["SIGKILL", "SIGSTOP"])
def lost_follower(request, tmp_path_factory):
    work = str(tmp_path_factory.mktemp("multihost_serve_lost"))
    children = start(_serve_commands("--peer-timeout", str(PEER_TIMEOUT_S)), work)
    out = {"before": None}
    body = _body(_case("chat_text_only"))
    try:
        url = _wait_for_url(os.path.join(work, "serve0.out"), children)
        if url is not None:
            out["before"] = _status_and_body(url + "/v1/chat/completions", body)
            children["procs"]["serve1"].send_signal(getattr(signal, request.param))
            t = time.monotonic()
            out["in_flight"] = _status_and_body(url + "/v1/chat/completions", body)  # admitted, then its collective fails
            out["health"] = _status_and_body(url + "/health")
            out["after"] = _status_and_body(url + "/v1/chat/completions", body)  # refused at once
            children["procs"]["serve0"].wait(timeout=max(1.0, DEADLINE_S - (t - children["t0"])))
            out["exit_seconds"] = time.monotonic() - t
    finally:
        children["procs"]["serve1"].kill()  # a stopped follower stays until killed
        out["results"] = finish(children, DEADLINE_S)
    return out


def test_a_lost_follower_gets_503s_naming_it_and_process_0_exits(lost_follower):
    from cogvlm_jax.parallel.heartbeat import EXIT_PEER_LOST
    from cogvlm_jax.serving.peers import GRACE_S

    r = lost_follower["results"]
    assert lost_follower["before"] is not None, f"no server: {r['serve0']['stderr'][-3000:]}"
    assert lost_follower["before"][0] == 200
    for what in ("in_flight", "health", "after"):
        status, body = lost_follower[what]
        print(f"\n{what}: {status} {body['error']['message']}")
        assert status == 503, (what, status, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "engine_failed" and body["error"]["type"] == "server_error"
        assert "lost process 1: process 1 of 2 sent no heartbeat" in body["error"]["message"], body
    print(f"process 0 exited {lost_follower['exit_seconds']:.1f} s after the follower was lost")
    assert r["serve0"]["rc"] == EXIT_PEER_LOST, r["serve0"]["stderr"][-3000:]
    assert "cogvlm-jax serve: error: lost process 1: " in r["serve0"]["stderr"]
    # the heartbeat timeout, one beat, the grace, and room for two busy cores
    assert lost_follower["exit_seconds"] < PEER_TIMEOUT_S + GRACE_S + 10
