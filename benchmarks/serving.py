"""Serving throughput and time to first token through the whole stack: HTTP, engine, model.

A ``cogvlm-jax serve`` server (in this process, on 127.0.0.1) holds the model with random weights; C
client threads each stream ``per_stream`` chat completions back to back (a closed loop), each of
``max_tokens`` new tokens, greedy. Two workloads (``WORKLOADS``):

* ``image``: every request an image and a question. Each prefill runs the ViT and the image tokens alone
  (compute-bound, as long as many one-row decode steps), so at 64 new tokens the prefills are a large
  share of the work and batching the decode cannot make them cheaper.
* ``text``: text-only conversations of different lengths: short prefills, the run is decode-bound, which is
  what continuous batching speeds up (where decode is bandwidth-bound, batching is nearly free).

Measured per C: aggregate completion tokens per second
(the sum of every request's ``usage.completion_tokens`` over the wall time of the whole run) and the
p50/p95 time from sending a request to its first streamed text (TTFT; it includes the wait for a slot
and for the prefills of the requests admitted before it).

The C streams share a server of ``slots`` slots (the most C); the one-stream baseline that the
speedup is taken against runs on a 1-slot server, so it pays for no idle slot. Both servers are up
together and the runs alternate, ``rounds`` times: the baseline, then each C. A shared machine's speed
drifts within minutes, so a ratio is taken within a round, and the record holds the median
of the rounds (tok/s and speedup; TTFT over every request of every round). The model never stops
early: its eos is set to an id no token has, so every request generates exactly ``max_tokens``.

Axis legend: C concurrent streams, S slots.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import threading
import time
from typing import Optional

import numpy as np

from benchmarks.common import FIXTURES, load_bench_config, record
from benchmarks.decode import NEVER_EOS, make_params

# The tokenizer the prompts are written with: the mid config is CogVLM2-style, like this one.
TOKENIZERS = {"mid": "cogvlm2", "tiny-cogvlm1": "cogvlm1", "tiny-cogvlm2": "cogvlm2"}


def _image_data_url(size: int, seed: int) -> str:
    import base64

    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclasses.dataclass
class Result:
    ttft_s: float
    completion_tokens: int


def stream_once(port: int, body: dict) -> Result:
    """One streamed chat completion over a fresh connection; TTFT is the first chunk with text."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"server answered {resp.status}: {resp.read()[:300]!r}")
        ttft, tokens = None, None
        for raw in resp:
            if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(raw[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        if ttft is None or tokens is None:
            raise RuntimeError("the stream ended without text or usage")
        return Result(ttft, tokens)
    finally:
        conn.close()


def closed_loop(port: int, streams: int, per_stream: int, bodies: list[dict]) -> tuple[float, list[Result]]:
    """``streams`` threads, each sending ``per_stream`` requests one after the other -> (wall s, results)."""
    results: list[Result] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(i: int):
        try:
            for j in range(per_stream):
                r = stream_once(port, bodies[(i * per_stream + j) % len(bodies)])
                with lock:
                    results.append(r)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=1800)
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return wall, results


def _server(model, slots: int, max_length: int, prefill_chunk: int = 0):
    from cogvlm_jax.serving.engine import Engine
    from cogvlm_jax.serving.server import BackgroundServer, ServerConfig

    engine = Engine(model, slots=slots, max_length=max_length, max_queue=256, prefill_chunk=prefill_chunk)
    return BackgroundServer(engine, ServerConfig("bench")).start()


WORKLOADS = ("image", "text")
TOPICS = ("the sea", "a mountain village", "an old clock", "a red bicycle", "the night sky", "a busy market",
          "a quiet library", "winter rain")


def make_bodies(workload: str, n: int, image_size: int, max_tokens: int) -> list[dict]:
    """``n`` streamed greedy chat requests of ``workload``; text prompts grow with k (different lengths)."""
    bodies = []
    for k in range(n):
        if workload == "image":
            content = [{"type": "image_url", "image_url": {"url": _image_data_url(image_size, k)}},
                       {"type": "text", "text": f"Describe picture {k} in detail, please."}]
        elif workload == "text":
            topic = TOPICS[k % len(TOPICS)]
            content = f"Story {k}: tell me about {topic}" + ", and then some more" * (k % 5) + "."
        else:
            raise ValueError(f"unknown serving workload {workload!r}; expected one of {WORKLOADS}")
        bodies.append({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    return bodies


def _prompt_tokens(model, body: dict, image_size: int) -> int:
    from PIL import Image

    content = body["messages"][0]["content"]
    if isinstance(content, str):
        return len(model.build_inputs(content)["input_ids"])
    return len(model.build_inputs(content[1]["text"], image=Image.new("RGB", (image_size,) * 2))["input_ids"])


def run(quick: bool = False, config_name: str = "mid", dtype: str = "float32", streams=(1, 4, 16),
        max_tokens: Optional[int] = None, per_stream: Optional[int] = None, workloads=WORKLOADS,
        rounds: Optional[int] = None, prefill_chunk: int = 0) -> list[dict]:
    """Per workload: one record per concurrency (on a server of max(streams) slots) plus the 1-slot
    one-stream baseline. ``prefill_chunk``: the servers' chunked prefill (0: off, the default)."""
    return [r for w in workloads for r in _run_workload(w, quick, config_name, dtype, streams, max_tokens, per_stream,
                                                        rounds, prefill_chunk)]


def _run_workload(workload: str, quick: bool, config_name: str, dtype: str, streams, max_tokens: Optional[int],
                  per_stream: Optional[int], rounds: Optional[int], prefill_chunk: int) -> list[dict]:
    from cogvlm_jax.api import Model
    from cogvlm_jax.generation.buckets import bucket_length
    from cogvlm_jax.inputs.tokenizer import load_tokenizer

    max_tokens = max_tokens or (16 if quick else 64)
    per_stream = per_stream or (1 if quick else 2)
    rounds = rounds or (1 if quick else 3)
    config = dataclasses.replace(load_bench_config(config_name), eos_token_ids=(NEVER_EOS,))
    tokenizer = load_tokenizer(f"{FIXTURES}/{TOKENIZERS[config_name]}/tokenizer")
    model = Model(config, make_params(config, dtype), tokenizer, dtype)
    slots = max(streams)
    size = config.vision.image_size
    bodies = make_bodies(workload, max(streams) * per_stream, size, max_tokens)
    lengths = [_prompt_tokens(model, b, size) for b in bodies]
    prompt_tokens = max(lengths)
    max_length = bucket_length(prompt_tokens) + max_tokens

    servers = {n: _server(model, n, max_length, prefill_chunk) for n in sorted({1, slots})}
    try:
        for srv in servers.values():
            port = int(srv.url.rsplit(":", 1)[1])
            for k in sorted({bucket_length(n): i for i, n in enumerate(lengths)}.values()):
                stream_once(port, bodies[k])  # compile each prompt bucket's prefill (the decode step compiled at start)
        runs = [(1, 1)] + [(slots, c) for c in streams if slots > 1]  # (server slots, C); the baseline first
        done: dict[tuple[int, int], list] = {run: [] for run in runs}  # -> per round (tok/s, results, wall)
        for _ in range(rounds):
            for n_slots, c in runs:
                port = int(servers[n_slots].url.rsplit(":", 1)[1])
                wall, results = closed_loop(port, c, per_stream, bodies)
                tokens = sum(r.completion_tokens for r in results)
                if tokens != len(results) * max_tokens:
                    raise RuntimeError(f"{tokens} tokens generated, expected {len(results)} x {max_tokens}")
                done[(n_slots, c)].append((tokens / wall, results, wall))
    finally:
        for srv in servers.values():
            srv.stop()

    base = [tok_s for tok_s, _, _ in done[(1, 1)]]
    recs = []
    for (n_slots, c), per_round in done.items():
        tok_s = [x[0] for x in per_round]
        speedup = [t / b for t, b in zip(tok_s, base)]
        ttft = np.array([r.ttft_s for _, results, _ in per_round for r in results]) * 1e3
        recs.append(record(
            "serving", float(np.median(tok_s)), "tok/s", config=config_name, dtype=dtype, batch=c, slots=n_slots,
            workload=workload, requests=len(per_round[0][1]), rounds=rounds, max_tokens=max_tokens,
            prompt_tokens=prompt_tokens, mean_prompt_tokens=float(np.mean(lengths)), prefill_chunk=prefill_chunk,
            ttft_p50_ms=float(np.percentile(ttft, 50)), ttft_p95_ms=float(np.percentile(ttft, 95)),
            wall_s=float(np.median([x[2] for x in per_round])), speedup_vs_one_stream=float(np.median(speedup)),
            tok_s_rounds=[round(t, 1) for t in tok_s], speedup_rounds=[round(x, 2) for x in speedup]))
    return recs
