"""Continuous batching: many requests share one jitted decode over a fixed number of slots.

The ``Engine`` here schedules; the device programs it runs are ``programs.Programs`` (insert, decode,
mix), the requests and events it serves are ``requests.py``. A request takes a free slot of the shared
``[S, ...]`` KV cache, and its prompt is prefilled in one of two ways:

* on its own (the default, and every prompt with an image): left-padded to a bucket, as ``Model.chat``
  does, and inserted into the slot (``insert``), its padding dropped, so that it takes no room;
* with ``prefill_chunk=P``, a text prompt P tokens at a time inside the decode step (chunked prefill,
  ``mix``), so the other requests keep decoding while a long prompt is read. The prompt is not padded
  beyond its last chunk (``buckets.prefill_sizes``), and no prompt length compiles anything new. Prompts
  are prefilled first come, first served, one chunk per step; after its last chunk the request decodes
  with the others. On CPU it does not pay: a decode step of many slots is already compute-bound, so the
  prompt's rows cost what they cost alone (docs/benchmarks.md, Serving).

Without a prompt to prefill, a ``decode`` call runs ``chunk`` decode steps on device; the host reads the
new tokens once per call (no host round trip per token). It decodes the slots up to the last busy one,
rounded up to one of ``buckets.decode_sizes`` (1, 2, 4, ..., S: one compile each), so a lone request
costs one row, not S. A slot is freed the moment its request stops: eos, ``max_tokens``, a stop string, or
``cancel()`` (the client went away). Idle slots below the last busy one keep computing (static shapes);
their tokens are dropped.

With a prefix cache (``prefix_cache_bytes``, ``generation/prefix_cache.py``) a request that leaves its
slot after its answer has its row's keys and values kept (``keep``), and a new request whose prompt
begins with a kept prompt and answer (the next turn of the conversation) is prefilled alone from them,
only its new tokens run (``resume``); a prompt with images whose ViT features are kept skips the ViT.
Its events say how many prompt tokens came from the cache (``Event.cached_tokens``). On several
processes every process holds the kept values, under the ids process 0 gives them.

Compiles: one per decode size, one per prefill shape (prompt bucket, with or without an image), and with
chunked prefill one per chunk length in ``prefill_sizes`` (text prompts then add none), whatever the traffic.

Across several processes (a model loaded on a mesh over all of them) process 0's engine runs the requests
and sends each device program to the others before it runs it (``follower.py``); they run the same
programs in :meth:`Engine.follow` until it stops. While idle it sends a no-op every ``HEARTBEAT_S``
seconds, so that no process waits in a collective for longer than that.
"""

from __future__ import annotations

import collections
import dataclasses
import numbers
import queue
import sys
import threading
import time
from typing import Callable, Iterator, Optional

import jax
import numpy as np

from cogvlm_jax.generation.buckets import MIN_BUCKET, bucket_length, decode_sizes, prefill_sizes
from cogvlm_jax.generation import prefix_cache as prefix_lib
from cogvlm_jax.generation.errors import InputError
from cogvlm_jax.generation.sampling import check_sampling
from cogvlm_jax.inputs.preprocess import pad_batch
from cogvlm_jax.parallel import multihost
from cogvlm_jax.parallel.sharding import replicated
from cogvlm_jax.serving import follower
from cogvlm_jax.serving.programs import Programs, Slots
from cogvlm_jax.serving.requests import (
    ContextLengthError,
    EngineFailedError,
    EngineStoppedError,
    Event,
    QueueFullError,
    Request,
    TextOutput,
)

def _nbytes(value) -> int:
    return 0 if value is None else int(value.nbytes)


DEFAULT_CHUNK = 4  # decode steps per device call between two host reads
HEARTBEAT_S = 60.0  # several processes: an idle process 0 tells the others it is alive this often


# --------------------------------------------------------------------------------------- the engine
@dataclasses.dataclass
class _Live:
    request: Request
    text: TextOutput
    generated: int = 0
    prompt: Optional[np.ndarray] = None  # a text prompt's ids while it is prefilled in chunks
    tokens: list = dataclasses.field(default_factory=list)  # the ids generated so far
    images: tuple = ()  # the digests of the prompt's images (``prefix_cache.image_digests``)
    cached: int = 0  # prompt tokens taken from the prefix cache
    prefilled: int = 0  # of which written to the cache so far
    order: int = 0  # admission order: chunked prompts are prefilled first come, first served

    @property
    def decoding(self) -> bool:
        return self.prompt is None


class Engine:
    """Serve ``model`` (an ``api.Model`` with a tokenizer) to many callers at once from one thread.

    With several processes (``model`` loaded on a mesh over all of them) every process makes the engine;
    process 0 calls :meth:`start` and takes the requests, the others call :meth:`follow`.

    ``slots``: requests decoded together. ``max_length``: KV cache slots per request, prompt plus
    ``max_tokens`` (default: the model's context length). ``max_queue``:
    requests that may wait for a slot beyond the free ones; ``submit`` raises ``QueueFullError`` past
    that. ``prefill_chunk``: the most text-prompt tokens prefilled per decode step (chunked prefill,
    ``chunked_prefill.py``); 0, the default: every prompt is prefilled on its own.
    ``prefix_cache_bytes``: device memory for the keys and values of finished requests and the features of
    their images (``self.prefix_cache``); 0: no prefix cache.
    """

    def __init__(self, model, slots: int = 8, max_length: Optional[int] = None, chunk: int = DEFAULT_CHUNK,
                 max_queue: int = 64, prefill_chunk: int = 0, prefix_cache_bytes: int = prefix_lib.DEFAULT_BYTES):
        if model.tokenizer is None:
            raise InputError("serving needs a tokenizer: load the model with tokenizer=PATH")
        if slots < 1 or chunk < 1 or max_queue < 0 or prefill_chunk < 0:
            raise ValueError(f"need slots >= 1, chunk >= 1, max_queue >= 0, prefill_chunk >= 0; got {slots}, {chunk}, "
                             f"{max_queue}, {prefill_chunk}")
        self.model = model
        self.config = model.config
        self.slots = slots
        self.chunk = chunk
        self.max_queue = max_queue
        self.prefill_chunk = int(prefill_chunk)
        self.prefill_sizes = prefill_sizes(prefill_chunk)
        self.decode_sizes = decode_sizes(slots)
        self.max_length = int(max_length or self.config.context_length)
        if self.max_length <= MIN_BUCKET:
            raise ValueError(f"max_length {self.max_length} leaves no room: prompts take at least {MIN_BUCKET} slots")
        self.eos = frozenset(self.config.eos_token_ids)
        self.mesh = getattr(model, "mesh", None)
        if self.mesh is None and jax.process_count() > 1:
            raise ValueError(f"serving with {jax.process_count()} processes needs the model loaded on a mesh over "
                             "their devices")
        self._leader = jax.process_count() > 1 and multihost.is_main_process()  # tells the others what to run
        self._programs = Programs(model.module, slots, self.max_length, chunk, self.mesh)
        self._state: Optional[Slots] = None
        self._ops: dict[str, Callable] = {  # each device program, by the name sent to the other processes
            "noop": lambda: None,
            "empty": self._empty,
            "insert": self._insert_op,
            "resume": lambda kept, *inputs: self._call(self._programs.resume, inputs, before=self._kept[int(kept)]),
            "decode": lambda live, active: self._call(self._programs.decode, (live,), active=int(active)),
            "mix": lambda *inputs: self._call(self._programs.mix, inputs),
            "keep": self._keep_op,
            "drop": lambda kept: self._kept.pop(int(kept), None),
        }
        # the prefix cache: its index on process 0 (values: ids), the kept device values on every process
        self._kept: dict[int, object] = {}
        self._kept_ids = 0
        self.prefix_cache = (prefix_lib.PrefixCache(prefix_cache_bytes, self.config.num_image_tokens,
                                                    on_evict=lambda kept: self._device("drop", np.int64(kept)))
                             if prefix_cache_bytes and multihost.is_main_process() else None)
        self.resume_shapes: set[tuple[int, int]] = set()  # (kept slots, new tokens' bucket): one compile each
        self._live: list[Optional[_Live]] = [None] * slots
        self._waiting: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._accepting = False
        self._stop = False
        self.failure: Optional[str] = None  # why the serving thread died; then every request is refused
        # several processes: called when the serving thread dies, before its requests are failed; -> the cause
        # that explains it (a lost process, ``serving/peers.py``) or None
        self.explain_failure: Optional[Callable[[], Optional[str]]] = None
        self.completed = 0  # requests that left their slot (any reason), for /health and tests
        self.cancelled = 0  # of which cancelled (the client went away)
        self.prefill_shapes: set[tuple[int, int]] = set()  # (bucket, images) prefilled alone: one compile each
        self._admitted = 0  # requests given a slot so far

    # ------------------------------------------------------------------ admission
    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise ``ContextLengthError`` if a prompt of ``prompt_tokens`` plus ``max_tokens`` cannot be served."""
        if not isinstance(max_tokens, numbers.Integral) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise InputError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        ctx = self.config.context_length
        if prompt_tokens + max_tokens > ctx:
            raise ContextLengthError(f"prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} exceeds the "
                                     f"model's context length {ctx}")
        if prompt_tokens + max_tokens > self.max_length:
            raise ContextLengthError(
                f"prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} exceeds this server's cache of "
                f"{self.max_length} tokens per request (--max-length)")

    def bucket(self, prompt_tokens: int, image: bool = False) -> int:
        """The length a prompt prefilled alone is padded to: ``bucket_length`` within the slot, the text
        alone padded when it holds an ``image``. Its padding takes no room from the answer (``insert``
        drops it), so ``max_tokens`` plays no part: one compile per bucket whatever the request asks."""
        return bucket_length(prompt_tokens, self.max_length, self.config.num_image_tokens if image else 0)

    def room(self, prompt_tokens: int) -> int:
        """The largest ``max_tokens`` a prompt of this length can have."""
        return min(self.config.context_length, self.max_length) - prompt_tokens

    def submit(self, request: Request) -> Request:
        """Queue a request (checked first); its events arrive through ``request.on_event``."""
        self.check(request.prompt_tokens, request.max_tokens)
        check_sampling(request.temperature, request.top_k, request.top_p, request.seed)
        with self._cv:
            if self.failure is not None:
                raise EngineFailedError(self.failure_message())
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down")
            self._drop_cancelled()
            free = sum(s is None for s in self._live)
            if len(self._waiting) >= free + self.max_queue:
                raise QueueFullError(f"all {self.slots} slots are busy and {len(self._waiting)} requests are "
                                     f"waiting (--max-queue {self.max_queue})")
            self._waiting.append(request)
            self._cv.notify()
        return request

    def _drop_cancelled(self) -> None:
        """Forget waiting requests whose caller went away (call with ``self._cv`` held): they hold no place."""
        if any(r.cancelled for r in self._waiting):
            self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)

    def stats(self) -> dict:
        with self._cv:
            self._drop_cancelled()
            return {"slots": self.slots, "busy": sum(s is not None for s in self._live),
                    "waiting": len(self._waiting), "completed": self.completed, "cancelled": self.cancelled,
                    "max_length": self.max_length, "failure": self.failure,
                    "prefix_cache": None if self.prefix_cache is None else self.prefix_cache.stats()}

    def failure_message(self) -> str:
        return f"the engine failed and serves no more requests (restart the server): {self.failure}"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Engine":
        """Compile the decode chunk and start the serving thread."""
        if self._thread is not None:
            return self
        self._warm_up()
        self._accepting, self._stop = True, False
        self._thread = threading.Thread(target=self._run, name="cogvlm-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, drain_seconds: float = 0.0) -> None:
        """Take no new requests; let running and waiting ones finish for up to ``drain_seconds``; cancel the rest."""
        with self._cv:
            self._accepting = False
            self._cv.notify()
        deadline = time.monotonic() + max(drain_seconds, 0.0)
        while time.monotonic() < deadline and self.stats()["busy"] + self.stats()["waiting"]:
            time.sleep(0.01)
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    # ------------------------------------------------------------------ synchronous helpers
    def stream(self, inputs: dict, max_tokens: int, **sampling_kw) -> Iterator[Event]:
        """Submit and yield the events in this thread (tests, benchmarks); cancels if the caller stops early."""

        q: queue.Queue = queue.Queue()
        req = self.submit(Request(inputs, max_tokens, q.put, **sampling_kw))
        try:
            while True:
                ev = q.get()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            req.cancel()

    def complete(self, inputs: dict, max_tokens: int, **sampling_kw) -> tuple[str, Event]:
        """-> (the whole text, the last event)."""
        parts = []
        for ev in self.stream(inputs, max_tokens, **sampling_kw):
            parts.append(ev.text)
        return "".join(parts), ev

    def follow(self) -> None:
        """On every process but 0: run the device programs process 0's engine runs, in its order, until it
        stops (its :meth:`shutdown`)."""
        if multihost.is_main_process():
            raise RuntimeError("process 0 serves (start); the others follow")
        self._warm_up()
        follower.follow(self._apply)

    # ------------------------------------------------------------------ device programs
    def warm_up_programs(self) -> str:
        """What :meth:`start` compiles, in words."""
        rows_ = ", ".join(map(str, self.decode_sizes))
        out = f"the decode chunk for {rows_} busy slot{'s' if self.decode_sizes != (1,) else ''}"
        if self.prefill_sizes:
            out += f" and the chunked-prefill step for chunks of {', '.join(map(str, self.prefill_sizes))} tokens"
        return out

    def _warm_up(self) -> None:
        """Empty slots, the decode chunk (each of ``decode_sizes``) and the chunked-prefill step compiled
        (every process does this at start, unannounced). The step's empty chunk writes nothing valid; the
        slots are emptied again."""
        self._apply("empty", ())
        for rows_ in self.decode_sizes:
            self._apply("decode", (np.zeros(self.slots, bool), np.int32(rows_)))
        for size in self.prefill_sizes:
            self._apply("mix", self._mix_args(0, np.zeros(size, np.int32), 0, None)[0])
        if self.prefill_sizes:
            self._apply("empty", ())

    def _device(self, op: str, *args):
        """Run device program ``op`` (a key of ``self._ops``) with host inputs ``args``; process 0 of several
        first sends it to the others."""
        if self._leader:
            follower.send(op, args)
        return self._apply(op, args)

    def _apply(self, op: str, args: tuple):
        """Run device program ``op`` on this process only; -> its outputs."""
        return self._ops[op](*args)

    def _empty(self) -> None:
        self._state = self._programs.empty()

    def _host(self, inputs: tuple) -> tuple:
        """Host inputs as program inputs: on a mesh every process supplies the same ones, replicated."""
        if self.mesh is None:
            return inputs
        return tuple(None if a is None else multihost.to_global(np.asarray(a), replicated(self.mesh)) for a in inputs)

    def _call(self, program: Callable, inputs: tuple, before: tuple = (), **static):
        """``program(params, state, *before, *inputs, **static)`` -> its outputs; the state moves on.
        ``before``: device values (kept by the prefix cache); ``static``: the decode's row count, a
        compile-time constant, or the features an insert takes."""
        self._state, out = program(self.model.params, self._state, *before, *self._host(inputs), **static)
        return out

    def _insert_op(self, *inputs):
        """``insert``; its last two inputs: the ids of the kept features of the prompt's images, used in
        place of its pixels (then None), and the ids to keep the features of each of its images under
        (each None where not wanted)."""
        *inputs, use, keep = inputs
        kw = {}
        if use is not None:
            feats = [self._kept[int(i)] for i in use]
            kw["image_features"] = feats[0] if len(feats) == 1 else jax.numpy.concatenate(feats, axis=1)
        if keep is None:
            return self._call(self._programs.insert, tuple(inputs), **kw)
        first, feats = self._call(self._programs.insert, tuple(inputs), keep_features=True)
        n_img = self.config.num_image_tokens
        for i, k in enumerate(keep):
            self._kept[int(k)] = feats[:, i * n_img:(i + 1) * n_img]
        return first

    def _keep_op(self, slot, kept, length) -> None:
        """Keep the first ``length`` slots of row ``slot``'s keys and values under the id ``kept``."""
        self._kept[int(kept)] = self._programs.keep(self._state, *self._host((slot,)), length=int(length))

    def _new_id(self) -> int:
        self._kept_ids += 1
        return self._kept_ids

    # ------------------------------------------------------------------ the serving thread
    def _run(self) -> None:
        try:
            self._serve()
        except Exception as e:  # the thread cannot go on: say so to every caller, now and later
            self._die(f"{type(e).__name__}: {e}")

    def fail(self, message: str) -> None:
        """From any thread: the engine serves no more (``message`` says why). Every running and waiting
        request ends with an error event, every later one is refused with ``EngineFailedError``. Sends
        nothing to other processes, so it works while the serving thread waits in a collective (a process
        lost: ``serving/peers.py``)."""
        with self._cv:
            if self.failure is not None:  # the first cause stands
                return
            self.failure = message
            self._accepting = False
        print(f"cogvlm-jax engine: {self.failure_message()}", file=sys.stderr, flush=True)
        self._fail_all(self.failure_message())

    def _die(self, message: str) -> None:
        if self.explain_failure is not None:  # a collective that failed: first ask whether a process is lost
            cause = self.explain_failure()
            if cause is not None:
                message = f"{cause}; a device program then failed: {message}"
        self.fail(message)
        if self._leader:  # best effort: let the other processes leave follow()
            try:
                follower.send(follower.STOP)
            except Exception:
                pass

    def _serve(self) -> None:
        while True:
            with self._cv:
                busy = self._wait_for_work()
                if self._stop:
                    break
                admit, refused = self._admit() if busy else ([], [])
            for req, message in refused:
                self._fail_one(None, req, message)
            if not busy:
                self._device("noop")
                continue
            try:
                self._step(admit)
            except Exception as e:  # a device failure: start again from empty slots, fail what was running
                self._recover(f"{type(e).__name__}: {e}")
        self._fail_all("the server shut down before this request finished")
        if self._leader:
            follower.send(follower.STOP)

    def _wait_for_work(self) -> bool:
        """Wait (``self._cv`` held) for a request or the stop; False: ``HEARTBEAT_S`` passed with nothing to do
        (process 0 of several only: the others have no heartbeat to send)."""
        while not self._stop and not self._waiting and all(s is None for s in self._live):
            if not self._cv.wait(HEARTBEAT_S if self._leader else None):
                return False
        return True

    def _admit(self) -> tuple[list[tuple[int, Request]], list[tuple[Request, str]]]:
        """Give the free slots, lowest first, to the waiting requests, first come first served (``self._cv``
        held) -> ((slot, request) for each, (request, why) for each that could not be set up: it alone fails)."""
        admit, refused = [], []
        self._drop_cancelled()
        for s in range(self.slots):
            while self._live[s] is None and self._waiting:
                req = self._waiting.popleft()
                try:
                    live = _Live(req, TextOutput(self.model.tokenizer, req.stop), prompt=self._chunked_prompt(req))
                except Exception as e:
                    refused.append((req, f"{type(e).__name__}: {e}"))
                    continue
                admit.append((s, req))
                self._admitted += 1
                live.order = self._admitted
                self._live[s] = live
        return admit, refused

    def _step(self, admit: list[tuple[int, Request]]) -> None:
        """Prefill the admitted prompts that go alone, then one step: the next chunk of a chunked prompt
        (with a decode step of the others), or else a decode chunk."""
        for s, req in admit:
            if self._live[s].prompt is None:
                self._insert(s, req)
        self._free_cancelled()
        prefilling = [s for s, x in enumerate(self._live) if x is not None and not x.decoding]
        if prefilling:  # first come, first served: a prompt started is finished first
            self._mix(min(prefilling, key=lambda s: self._live[s].order))
        elif any(x is not None for x in self._live):
            self._decode()

    def _alone(self, slot: int, req: Request, fn: Callable, *args):
        """``fn(*args)``: host work for one request (its program inputs, its text, its callback) -> its
        result, or None if it raised: then that request alone ends with an error event, and the others go
        on. (A device program that fails is not one request's: ``_recover`` fails every request.)"""
        try:
            return fn(*args)
        except Exception as e:
            self._fail_one(slot, req, f"{type(e).__name__}: {e}")
            return None

    def _fail_one(self, slot: Optional[int], req: Request, message: str) -> None:
        """End ``req`` (in ``slot``, or None: not admitted) with an error event; free its slot."""
        print(f"cogvlm-jax engine: a request failed alone: {message}", file=sys.stderr, flush=True)
        with self._cv:
            if slot is not None and self._live[slot] is not None and self._live[slot].request is req:
                self._live[slot] = None
                self.completed += 1
        cancelled, req.cancelled = req.cancelled, True  # nothing more reaches it
        if not cancelled:
            try:
                req.on_event(Event("", "error", 0, message))
            except Exception as e:
                print(f"cogvlm-jax engine: a request's on_event failed: {type(e).__name__}: {e}", file=sys.stderr,
                      flush=True)

    def _recover(self, message: str) -> None:
        """After a device failure (``message``): empty slots again and fail every request. If the slots
        cannot be rebuilt either, raise: the thread dies (``_die``)."""
        try:
            self._device("empty")
        except Exception as again:
            raise RuntimeError(f"{message}; then rebuilding the slots failed: "
                               f"{type(again).__name__}: {again}") from again
        self._fail_all(message)

    def _insert(self, slot: int, req: Request) -> None:
        if self.prefix_cache is not None:
            resumed = self._alone(slot, req, self._resume_args, slot, req)
            if resumed is None:  # it failed alone
                return
            if resumed:
                first = self._device("resume", *resumed)
                self._alone(slot, req, self._take, slot, [int(first)])
                return
        args = self._alone(slot, req, self._insert_args, slot, req)
        if args is None:
            return
        pv = args[3]
        self.prefill_shapes.add((args[0].shape[1], 0 if pv is None else 1 if pv.ndim == 4 else pv.shape[1]))
        new_features = ()
        if pv is not None and self.prefix_cache is not None:  # the features kept, or computed and then kept
            ids = [self.prefix_cache.features(d) for d in self._live[slot].images]
            if all(i is not None for i in ids):
                args = args[:3] + (None,) + args[4:-2] + (np.array(ids, np.int64), None)
            else:
                ids = [self._new_id() for _ in ids]
                new_features = tuple(zip(self._live[slot].images, ids))
                args = args[:-1] + (np.array(ids, np.int64),)
        first = self._device("insert", *args)
        for digest, kept in new_features:  # after the insert that reads them: keeping one may evict another
            self.prefix_cache.put_features(digest, kept, _nbytes(self._kept.get(kept)))
        self._alone(slot, req, self._take, slot, [int(first)])

    def _resume_args(self, slot: int, req: Request) -> tuple:
        """The ``resume`` program's host inputs (the kept entry's id first) if the prefix cache holds the
        start of ``req``'s prompt, else (); either way the prompt's image digests are noted."""
        live, x = self._live[slot], req.inputs
        live.images = prefix_lib.image_digests(x["pixel_values"])
        ids, tt = np.asarray(x["input_ids"], np.int32), np.asarray(x["token_type_ids"], np.int32)
        entry, m = self.prefix_cache.match(ids, tt, live.images)
        if entry is None:
            return ()
        n = len(ids)
        new, new_pos = prefix_lib.new_tokens(ids, tt, np.asarray(x["attention_mask"], np.int32), m,
                                             self.config.pad_token_id, self.config.position_span, self.max_length - m)
        live.cached = m
        self.resume_shapes.add((int(self._kept[entry.value][0].shape[3]), new.shape[1]))
        return (np.int64(entry.value), np.int32(m), new, new_pos, np.int32(n - m), np.int32(slot),
                np.float32(req.temperature), np.int32(req.top_k), np.float32(req.top_p), np.uint32(req.seed % 2**32))

    def _insert_args(self, slot: int, req: Request) -> tuple:
        """The ``insert`` program's host inputs for ``req`` in ``slot``: its prompt padded to its bucket."""
        image = req.inputs["pixel_values"] is not None
        x = pad_batch([req.inputs], self.config.pad_token_id, self.bucket(req.prompt_tokens, image))  # [1, L]
        return (x["input_ids"], x["token_type_ids"], x["attention_mask"], x["pixel_values"], np.int32(slot),
                np.float32(req.temperature), np.int32(req.top_k), np.float32(req.top_p), np.uint32(req.seed % 2**32),
                None, None)

    def _chunked_prompt(self, req: Request) -> Optional[np.ndarray]:
        """A text prompt's ids if it is to be prefilled in chunks, else None (prefilled alone: ``insert``)."""
        x = req.inputs
        if not self.prefill_chunk or x.get("pixel_values") is not None or np.any(np.asarray(x["token_type_ids"])):
            return None
        if self.prefix_cache is not None and self.prefix_cache.match(x["input_ids"], x["token_type_ids"],
                                                                     count=False)[1]:
            return None  # a kept prefix: only the rest is prefilled, alone (``resume``)
        return np.asarray(x["input_ids"], np.int32)

    def _mix_args(self, slot: int, prompt: np.ndarray, start: int, req: Optional[Request]) -> tuple[tuple, int, bool]:
        """The ``mix`` program's host inputs for the chunk of ``prompt`` from ``start`` (``req``: its
        sampling settings; None: greedy) -> (inputs, the chunk's real tokens, whether it ends the prompt)."""
        rest = len(prompt) - start
        p = min((size for size in self.prefill_sizes if size >= rest), default=self.prefill_chunk)
        n = min(p, rest)
        ids = np.full(p, self.config.pad_token_id, np.int32)
        ids[:n] = prompt[start:start + n]
        pos = np.zeros(p, np.int32)
        pos[:n] = np.arange(start, start + n)  # a text prompt's positions (``positions.position_ids``)
        req = req or Request({}, 1, lambda ev: None)
        last = start + n == len(prompt)
        return (self._decoding_mask(), ids, pos, np.int32(n), np.int32(slot), np.int32(start), np.bool_(last),
                np.float32(req.temperature), np.int32(req.top_k), np.float32(req.top_p),
                np.uint32(req.seed % 2**32)), n, last

    def _mix(self, slot: int) -> None:
        """One decode step of the decoding slots plus the next chunk of ``slot``'s prompt."""
        live = self._live[slot]
        made = self._alone(slot, live.request, self._mix_args, slot, live.prompt, live.prefilled, live.request)
        if made is None:
            return
        args, n, last = made
        decoding = args[0]
        tokens, first = self._device("mix", *args)
        tokens = np.asarray(tokens)
        live.prefilled += n
        if last:
            live.prompt = None
        for s in np.flatnonzero(decoding):
            self._alone(int(s), self._live[s].request, self._take, int(s), [int(tokens[s])])
        if last:
            self._alone(slot, live.request, self._take, slot, [int(first)])

    def _decoding_mask(self) -> np.ndarray:
        return np.array([x is not None and x.decoding for x in self._live])

    def _decode(self) -> None:
        live = self._decoding_mask()
        last = max(s for s, x in enumerate(self._live) if x is not None)
        active = min(n for n in self.decode_sizes if n > last)
        out = np.asarray(self._device("decode", live, np.int32(active)))
        for s in np.flatnonzero(live):
            self._alone(int(s), self._live[s].request, self._take, int(s), out[s].tolist())

    def _take(self, slot: int, tokens: list[int]) -> None:
        """Hand a slot's new tokens to its request; free the slot when the request stops."""
        live = self._live[slot]
        req = live.request
        text, finish, hit = [], None, False
        for tok in tokens:
            live.generated += 1
            live.tokens.append(tok)
            if tok in self.eos:
                finish = "stop"
                break
            piece, hit = live.text.add(tok)
            text.append(piece)
            if hit:
                finish = "stop"
                break
            if live.generated >= req.max_tokens:
                finish = "length"
                break
        if finish is not None:
            if not hit:  # what the decoder and the stop check still hold; text after a stop string is dropped
                tail, hit = live.text.flush()
                text.append(tail)
                finish = "stop" if hit else finish
            self._keep(slot, live)
            self._free(slot)
        if not req.cancelled:
            req.on_event(Event("".join(text), finish, live.generated, cached_tokens=live.cached))

    def _keep(self, slot: int, live: _Live) -> None:
        """Keep the keys and values of a finished request's row in the prefix cache: its prompt and every
        generated token but the last (fed to the model only by a decode step after it)."""
        if self.prefix_cache is None:
            return
        x = live.request.inputs
        prompt = np.asarray(x["input_ids"], np.int32)
        ids = np.concatenate([prompt, np.array(live.tokens[:-1], np.int32)])
        types = np.concatenate([np.asarray(x["token_type_ids"], np.int32), np.zeros(len(ids) - len(prompt), np.int32)])
        length = min(bucket_length(len(ids)), self.max_length)
        k = self._programs.shapes.cache.k  # [S, N, K, T, E]
        nbytes = 2 * k.dtype.itemsize * (k.size // (k.shape[0] * k.shape[3])) * length
        if not self.prefix_cache.worth_keeping(nbytes):
            return
        if not live.images and x.get("pixel_values") is not None:
            live.images = prefix_lib.image_digests(x["pixel_values"])
        kept = self._new_id()
        self._device("keep", np.int32(slot), np.int64(kept), np.int32(length))
        self.prefix_cache.put(ids, types, live.images, kept, nbytes)

    def _free(self, slot: int, cancelled: bool = False) -> None:
        with self._cv:
            self._live[slot] = None
            self.completed += 1
            self.cancelled += cancelled

    def _free_cancelled(self) -> None:
        for s, live in enumerate(self._live):
            if live is not None and live.request.cancelled:
                self._free(s, cancelled=True)

    def _fail_all(self, message: str) -> None:
        """End every running and waiting request with an error event."""
        with self._cv:
            pending = [x.request for x in self._live if x is not None] + list(self._waiting)
            self._live = [None] * self.slots
            self._waiting.clear()
        for req in pending:
            if not req.cancelled:
                try:
                    req.on_event(Event("", "error", 0, message))
                except Exception as e:  # one caller's callback must not keep the others from hearing
                    print(f"cogvlm-jax engine: a request's on_event failed: {type(e).__name__}: {e}",
                          file=sys.stderr, flush=True)
