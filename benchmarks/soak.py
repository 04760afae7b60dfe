"""A bounded soak of ``cogvlm-jax serve`` on the shipped default model: mixed traffic for minutes, then
whether the server stayed whole.

    python -m benchmarks.soak                                  # 1000 requests over 600 s
    python -m benchmarks.soak --seconds 40 --requests 120 --out soak.json

The server runs as its own process (``cogvlm-jax serve`` on 127.0.0.1, ``--slots 4 --max-queue 4
--prefix-cache-mib 0``), so
its resident memory (``VmRSS``) and open descriptors (``/proc/PID/fd``) are its own; they are sampled
every ``sample_s`` seconds. The requests arrive on a schedule drawn beforehand (``requests`` of them spread over
``seconds``), a tenth of them in bursts of more than the slots plus the queue (so some get a 429), on
32 client threads. Each request is one of ``KINDS``: an image question or a text question, streamed
or not; a stream the client closes after its first event (a cancellation mid-stream); a non-streamed
request whose client hangs up before the answer (a disconnect); a malformed request (a 400).

Every question comes from a pool of coloured-shape questions (``recipes/synthetic.py``: what colour,
which shape, how many, where) whose greedy answers differ from one picture to the next; before the
soak each is asked alone, one at a time, and that answer is the reference. During the soak every
answer must equal its own question's reference (a streamed one: the text of its chunks; a cancelled
one: a prefix of it), so an answer handed to the wrong request shows up as ``crossed``.

Before the measured traffic, a warm-up sends ``2 * CLIENTS`` requests of every kind at once (their
outcomes count as well), so that the server's threads exist before the baseline sample. Outcomes:
``answered`` (200 and the reference answer), ``cancelled`` and ``hung_up`` (the client left
on purpose), ``refused_429`` (queue full), ``refused_400`` (the malformed requests, and only those);
the failures are ``crossed``, ``unexpected_status`` (any other status, or a 400 to a good request) and
``transport_error``. Memory and descriptors are judged after the warm-up (the first ``warm_up``
fraction of the run): their growth from the end of the warm-up to the end, and the descriptors once
the traffic has stopped against those before it started.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import http.client
import io
import json
import os
import random
import re
import subprocess
import sys
import threading
import time

import numpy as np

from benchmarks.common import emit, machine, record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("image", "image_stream", "text", "text_stream", "stream_cancel", "hang_up", "bad_request")
WEIGHTS = (0.3, 0.25, 0.08, 0.07, 0.12, 0.08, 0.1)
OK = ("answered", "cancelled", "hung_up", "refused_429", "refused_400")
SLOTS, MAX_QUEUE, CLIENTS = 4, 4, 32
MAX_TOKENS = 16


# ----------------------------------------------------------------------------------------- the server
class Server:
    """``cogvlm-jax serve`` of the shipped default model in a child process; ``port``, ``pid``, ``stop()``."""

    def __init__(self, slots: int = SLOTS, max_queue: int = MAX_QUEUE, timeout: float = 300.0):
        # without a prefix cache: the soak's questions repeat, and a cache filling to its bound and compiling
        # its programs (about 140 MiB over the first 20 s of a 60 s run of the shipped model, then flat:
        # 2 MiB in its second half) would be taken for growth after the warm-up
        cmd = [sys.executable, "-m", "cogvlm_jax.cli", "serve", "--port", "0", "--slots", str(slots),
               "--max-queue", str(max_queue), "--drain-seconds", "5", "--prefix-cache-mib", "0"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True)
        self.pid = self.proc.pid
        self._stderr: list[str] = []
        threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()
        line = self._first_line(time.monotonic() + timeout)
        self.port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line).group(1))

    def _first_line(self, deadline: float) -> str:
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        if not got or "http://" not in got[0]:
            self.proc.kill()
            raise RuntimeError(f"the server did not start (exit {self.proc.poll()}): {''.join(self._stderr)[-2000:]}")
        return got[0]

    def sample(self) -> dict:
        """The server's resident memory (MiB), open descriptors and threads now."""
        with open(f"/proc/{self.pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        return {"rss_mib": int(status["VmRSS"].split()[0]) / 1024, "fds": len(os.listdir(f"/proc/{self.pid}/fd")),
                "threads": int(status["Threads"])}

    def stderr(self) -> str:
        return "".join(self._stderr)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# ----------------------------------------------------------------------------------------- the requests
def question_pool(n_image: int, n_text: int, seed: int) -> list[dict]:
    """``n_image`` picture questions (``synthetic.examples``) and ``n_text`` text-only ones, as chat messages."""
    from cogvlm_jax.recipes import synthetic
    from cogvlm_jax.recipes.default_model import MAX_SHAPES

    pool = []
    for ex in synthetic.examples(seed, n_image, max_shapes=MAX_SHAPES):
        buf = io.BytesIO()
        synthetic.render(ex.scene).save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        pool.append({"image": True, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": ex.query}]}]})
    for q in synthetic.all_questions()[:n_text]:
        pool.append({"image": False, "messages": [{"role": "user", "content": q}]})
    return pool


def _body(q: dict, stream: bool) -> bytes:
    return json.dumps({"messages": q["messages"], "max_tokens": MAX_TOKENS, "temperature": 0,
                       "stream": stream}).encode()


def _post(port: int, body: bytes, timeout: float = 120.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def _sse(resp):
    """The JSON events of an SSE response (``[DONE]`` ends it)."""
    for raw in resp:
        if raw.startswith(b"data: "):
            data = raw[6:].strip()
            if data == b"[DONE]":
                return
            yield json.loads(data)


def ask_alone(port: int, q: dict) -> str:
    conn, resp = _post(port, _body(q, False))
    try:
        if resp.status != 200:
            raise RuntimeError(f"the reference request got {resp.status}: {resp.read()[:300]!r}")
        return json.loads(resp.read())["choices"][0]["message"]["content"]
    finally:
        conn.close()


def one_request(port: int, kind: str, q: dict, want: str, rng: random.Random) -> str:
    """Send one request of ``kind`` about ``q`` (reference answer ``want``) -> its outcome (see the module)."""
    try:
        if kind == "bad_request":
            body = json.dumps({"messages": q["messages"], "max_tokens": rng.choice([0, -3, "many"])}).encode()
            conn, resp = _post(port, body)
            resp.read()
            conn.close()
            return "refused_400" if resp.status == 400 else "unexpected_status"
        if kind == "hang_up":
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", "/v1/chat/completions", _body(q, False), {"Content-Type": "application/json"})
            time.sleep(rng.uniform(0.0, 0.05))
            conn.close()  # before the answer: the server sees the client go
            return "hung_up"
        stream = kind != "image" and kind != "text"
        conn, resp = _post(port, _body(q, stream))
        try:
            if resp.status != 200:
                resp.read()
                return "refused_429" if resp.status == 429 else "unexpected_status"
            if not stream:
                return "answered" if json.loads(resp.read())["choices"][0]["message"]["content"] == want else "crossed"
            text, finish, leave_after = [], None, rng.choice([1, 2])  # events: the role chunk, then text
            for i, ev in enumerate(_sse(resp)):
                if "error" in ev:
                    return "unexpected_status"
                if ev["choices"]:
                    text.append(ev["choices"][0]["delta"].get("content") or "")
                    finish = ev["choices"][0]["finish_reason"] or finish
                if kind == "stream_cancel" and i + 1 >= leave_after:
                    return "cancelled" if want.startswith("".join(text)) else "crossed"
            if kind == "stream_cancel":  # the answer was shorter than the events we meant to wait for
                return "cancelled" if "".join(text) == want else "crossed"
            return "answered" if finish is not None and "".join(text) == want else "crossed"
        finally:
            conn.close()
    except (OSError, http.client.HTTPException, ValueError):
        return "transport_error"


def schedule(requests: int, seconds: float, seed: int, bursts: int = 10) -> list[tuple[float, str, int]]:
    """(start time, kind, pool index) for every request: evenly spread, a tenth in ``bursts`` bursts of
    ``SLOTS + MAX_QUEUE + 2`` or more at once."""
    rng = random.Random(seed)
    burst = max(SLOTS + MAX_QUEUE + 2, requests // (10 * bursts))
    n_burst = min(bursts * burst, requests // 10) // burst * burst
    times = [seconds * (i + 0.5) / (requests - n_burst) for i in range(requests - n_burst)]
    for b in range(n_burst // burst):
        times += [seconds * (b + 0.5) / (n_burst // burst)] * burst
    times.sort()
    return [(t, rng.choices(KINDS, WEIGHTS)[0], rng.randrange(1 << 30)) for t in times]


# ----------------------------------------------------------------------------------------- the run
def run(seconds: float = 600.0, requests: int = 1000, seed: int = 20261202, sample_s: float = 5.0,
        warm_up: float = 0.1, pool_images: int = 48, pool_texts: int = 8) -> dict:
    """The soak; -> its figures (samples over time, outcome counts, latencies, the reference pool's spread)."""
    pool = question_pool(pool_images, pool_texts, seed)
    server = Server()
    try:
        t_ref = time.monotonic()
        want = [ask_alone(server.port, q) for q in pool]  # also compiles every prefill shape the soak uses
        ref_s = time.monotonic() - t_ref
        plan = schedule(requests, seconds, seed)
        images = [i for i, q in enumerate(pool) if q["image"]]
        texts = [i for i, q in enumerate(pool) if not q["image"]]
        samples, results, warm, lock, done = [], [], [], threading.Lock(), threading.Event()

        def job(t0: float, start: float, kind: str, pick: int, into: list):
            time.sleep(max(0.0, t0 + start - time.monotonic()))
            ids = texts if kind.startswith("text") else images
            i = ids[pick % len(ids)]
            t = time.monotonic()
            outcome = one_request(server.port, kind, pool[i], want[i], random.Random(pick))
            with lock:
                into.append({"kind": kind, "outcome": outcome, "s": time.monotonic() - t, "t": t - t0})

        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as ex:
            # warm-up: every client at once, every kind, so that the server's threads (and their allocator
            # arenas) exist before the baseline is taken
            t_warm = time.monotonic()
            list(ex.map(lambda k: job(t_warm, 0.0, KINDS[k % len(KINDS)], k, warm), range(2 * CLIENTS)))
            time.sleep(1.0)
            before = server.sample()
            t0 = time.monotonic()

            def sampler():
                while True:
                    s = server.sample()
                    s["t"] = round(time.monotonic() - t0, 1)
                    samples.append(s)
                    if done.wait(sample_s):
                        return

            threading.Thread(target=sampler, daemon=True).start()
            list(ex.map(lambda p: job(t0, *p, results), plan))
        wall = time.monotonic() - t0
        time.sleep(2 * sample_s)  # the traffic has stopped: what the server holds now is what it keeps
        done.set()
        after = server.sample()
        health = json.loads(_get(server.port, "/health"))
    finally:
        rc = server.stop()
    fig = summarize(samples, results, before, after, health, want, wall, ref_s, seconds, requests, warm_up, rc,
                    server.stderr())
    fig["warm_up_outcomes"] = {o: sum(r["outcome"] == o for r in warm) for o in sorted({r["outcome"] for r in warm})}
    fig["failures"] += sum(r["outcome"] not in OK for r in warm)
    return fig


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def summarize(samples, results, before, after, health, want, wall, ref_s, seconds, requests, warm_up, rc,
              stderr) -> dict:
    warm = [s for s in samples if s["t"] >= warm_up * seconds] or samples[-1:]
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    by_kind: dict[str, dict[str, int]] = {}
    for r in results:
        by_kind.setdefault(r["kind"], {}).setdefault(r["outcome"], 0)
        by_kind[r["kind"]][r["outcome"]] += 1
    answered = np.array([r["s"] for r in results if r["outcome"] == "answered"]) * 1e3
    rss, fds = [s["rss_mib"] for s in warm], [s["fds"] for s in warm]
    half = [s["rss_mib"] for s in samples if s["t"] >= seconds / 2] or rss[-1:]
    return {
        "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": seconds, "wall_s": round(wall, 1), "requests": requests, "sent": len(results),
        "outcomes": outcomes, "by_kind": by_kind, "failures": sum(v for k, v in outcomes.items() if k not in OK),
        "latency_ms": {"p50": float(np.percentile(answered, 50)) if answered.size else None,
                       "p99": float(np.percentile(answered, 99)) if answered.size else None,
                       "max": float(answered.max()) if answered.size else None},
        "latency_ms_by_kind": {k: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}
                               for k in KINDS if (v := [r["s"] * 1e3 for r in results
                                                        if r["kind"] == k and r["outcome"] == "answered"])},
        "references": {"questions": len(want), "distinct_answers": len(set(want)), "asked_alone_s": round(ref_s, 1)},
        "rss_mib": {"before": before["rss_mib"], "after_warm_up": rss[0], "max_after_warm_up": max(rss),
                    "end": rss[-1], "growth_after_warm_up": rss[-1] - rss[0],
                    "growth_second_half": half[-1] - half[0], "idle_after": after["rss_mib"]},
        "fds": {"before": before["fds"], "after_warm_up": fds[0], "min_after_warm_up": min(fds),
                "max_after_warm_up": max(fds), "idle_after": after["fds"]},
        "threads": {"before": before["threads"], "idle_after": after["threads"]},
        "health": health, "server_exit": rc, "server_stderr_tail": stderr[-2000:], "samples": samples,
    }


def records(fig: dict) -> list[dict]:
    """The soak's figures as benchmark records (``benchmarks.common.record``)."""
    common = dict(config="default_model", dtype="float32", batch=SLOTS)
    return [
        record("soak_requests", fig["sent"], "requests", wall_s=fig["wall_s"], failures=fig["failures"],
               **{f"n_{k}": v for k, v in sorted(fig["outcomes"].items())}, **common),
        record("soak_latency_p50", fig["latency_ms"]["p50"] or 0.0, "ms", p99_ms=fig["latency_ms"]["p99"], **common),
        record("soak_rss_growth", fig["rss_mib"]["growth_after_warm_up"], "MiB", **fig["rss_mib"], **common),
        record("soak_fds", fig["fds"]["idle_after"] - fig["fds"]["before"], "descriptors", **fig["fds"], **common),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=600.0, help="how long the requests keep coming")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--seed", type=int, default=20261202)
    p.add_argument("--sample-seconds", type=float, default=5.0, help="memory / descriptor sampling period")
    p.add_argument("--out", help="write every figure and sample here as JSON")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.requests < 20 or args.sample_seconds <= 0:
        p.error("need --seconds > 0, --requests >= 20 and --sample-seconds > 0")
    fig = run(args.seconds, args.requests, args.seed, args.sample_seconds)
    for rec in records(fig):
        emit(rec)
    if args.out:
        from cogvlm_jax import files

        files.write_json(args.out, fig)
    print(json.dumps({k: v for k, v in fig.items() if k not in ("samples", "server_stderr_tail")}, indent=1))
    return 1 if fig["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
