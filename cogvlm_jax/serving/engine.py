"""Continuous batching: many requests share one jitted decode over a fixed number of slots.

prefill -> insert -> generate. A request takes a free slot of the shared ``[S, ...]`` KV cache, and
its prompt is prefilled in one of two ways:

* on its own (the default, and every prompt with an image): left-padded to a bucket, as ``Model.chat``
  does, through the ViT and the model, and its one-row KV cache inserted into the slot (``insert``);
* with ``prefill_chunk=P``, a text prompt P tokens at a time inside the decode step (chunked prefill,
  ``chunked_prefill.py``): each ``mix`` call decodes every slot once and writes the prompt's next chunk
  into its slot, the products of both in one block, so the weights are read once for both and the other
  requests keep decoding while a long prompt is read. The prompt is not padded beyond its last chunk
  (``prefill_sizes``), and no prompt length compiles anything new. After its last chunk the request
  decodes with the others. On the 2-core CPU this was measured on it does not pay: a 16-slot decode step
  is already compute-bound, so the prompt's rows cost what they cost alone (README, Serving).

Without a prompt to prefill, a ``decode`` call runs ``chunk`` decode steps on device; the host reads the
new tokens once per call (no host round trip per token). It decodes the slots up to the last busy one,
rounded up to one of ``decode_sizes`` (1, 2, 4, ..., S: one compile each), so a lone request costs one
row, not S. A slot is freed the moment its request stops: eos, ``max_tokens``, a stop string, or
``cancel()`` (the client went away). Idle slots below the last busy one keep computing (static shapes);
their tokens are dropped.

Compiles: one per decode size, one per prefill shape (prompt bucket, with or without an image),
and with chunked prefill one per chunk length in ``prefill_sizes`` (text prompts then add none),
whatever the traffic: sampling settings, seeds, slot numbers and limits are traced values.

Sampling: token i of a request is chosen with ``sampling.choose`` and the key
``fold_in(fold_in(PRNGKey(seed), 0), i)``, the key ``Model.chat(seed=seed)`` uses for the same token,
so a request's text depends on its own seed and prompt, not on what else is being served.

The engine relies on one fact about the KV cache: every leaf has the batch on axis 0.

On a mesh (a model loaded with ``mesh=``) the slots' KV cache is sharded like ``generate``'s, batch over
``data``/``fsdp`` and kv heads over ``tensor``, and the host reads replicated tokens. Across several
processes, process 0's engine runs the requests; before each device program (empty slots, insert, decode
chunk) it sends that program's host inputs to the others (``multihost.broadcast_bytes``), which run the
same program in :meth:`Engine.follow` until it stops. While idle it sends a no-op every
``HEARTBEAT_S`` seconds, so that no process waits in a collective for longer than that.

Axis legend: S slots, L prompt bucket, T cache length, V vocab, C decode chunk, P prefill chunk.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import queue
import sys
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cogvlm_jax.generation import chunked_prefill, sampling
from cogvlm_jax.generation.buckets import MIN_BUCKET, bucket_length
from cogvlm_jax.generation.errors import InputError
from cogvlm_jax.inputs.preprocess import pad_batch
from cogvlm_jax.inputs.tokenizer import StreamDecoder
from cogvlm_jax.models import kv_cache
from cogvlm_jax.models.cogvlm import CogVLM
from cogvlm_jax.parallel import multihost, rows
from cogvlm_jax.parallel.sharding import cache_shardings, replicated

DEFAULT_CHUNK = 4  # decode steps per device call between two host reads
HEARTBEAT_S = 60.0  # several processes: an idle process 0 tells the others it is alive this often


def _doubling(first: int, last: int) -> tuple[int, ...]:
    """first, 2 first, 4 first, ... below ``last``, then ``last``."""
    sizes, n = [], first
    while n < last:
        sizes.append(n)
        n *= 2
    return tuple(sizes) + (last,)


def decode_sizes(slots: int) -> tuple[int, ...]:
    """The row counts the decode chunk is compiled for: 1, 2, 4, ... below ``slots``, and ``slots``. A
    chunk decodes the first rows up to the last busy slot, rounded up to one of these (requests take the
    lowest free slot), so one stream on a server of 16 slots costs one row, not 16."""
    return _doubling(1, slots)


def prefill_sizes(prefill_chunk: int) -> tuple[int, ...]:
    """The chunk lengths the chunked-prefill step is compiled for: 16, 32, 64, ... below ``prefill_chunk``,
    and ``prefill_chunk`` (none for 0: off). A prompt is prefilled in chunks of ``prefill_chunk`` and its
    rest in the shortest that holds it, so it is padded by less than half its last chunk (and less than 16)."""
    return _doubling(16, prefill_chunk) if prefill_chunk else ()



class ContextLengthError(InputError):
    """Prompt plus ``max_tokens`` does not fit the context (or the engine's cache)."""


class QueueFullError(RuntimeError):
    """Every slot is busy and the waiting queue is full."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class EngineFailedError(EngineStoppedError):
    """The engine's thread died (a device failure it could not recover from): it serves nothing more."""


# --------------------------------------------------------------------------------------- requests
@dataclasses.dataclass
class Event:
    """What a request receives: new text, and at the end a finish reason (``stop``, ``length``, ``error``)."""

    text: str = ""
    finish_reason: Optional[str] = None
    completion_tokens: int = 0  # tokens generated so far, the eos included
    error: Optional[str] = None


@dataclasses.dataclass(eq=False)
class Request:
    """One generation. ``inputs``: a ``Model.build_inputs`` dict; ``on_event`` is called from the engine thread."""

    inputs: dict
    max_tokens: int
    on_event: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: Sequence[str] = ()
    cancelled: bool = False

    @property
    def prompt_tokens(self) -> int:
        return int(len(self.inputs["input_ids"]))

    def cancel(self) -> None:
        """Stop generating (the engine frees the slot before its next decode chunk)."""
        self.cancelled = True


class TextOutput:
    """Generated ids -> text deltas; holds back text that may be the start of a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.decoder = StreamDecoder(tokenizer)
        self.stop = tuple(s for s in stop if s)
        self.held = ""

    def add(self, token_id: int) -> tuple[str, bool]:
        """-> (text to emit, whether a stop string was reached: the text ends right before it)."""
        return self._release(self.held + self.decoder.add(token_id), final=False)

    def flush(self) -> tuple[str, bool]:
        return self._release(self.held + self.decoder.flush(), final=True)

    def _release(self, text: str, final: bool) -> tuple[str, bool]:
        self.held = ""
        if not self.stop:
            return text, False
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            return text[:min(hits)], True
        if final:
            return text, False
        keep = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        if keep:
            text, self.held = text[:-keep], text[-keep:]
        return text, False


# --------------------------------------------------------------------------------------- device state
@flax.struct.dataclass
class Slots:
    """Everything the decode chunk reads and writes, for all S slots (batch on axis 0 everywhere)."""

    cache: kv_cache.KVCache
    token: jax.Array  # [S] the last chosen token: the next one fed to the model
    position: jax.Array  # [S] its position id
    step: jax.Array  # [S] tokens chosen so far (the index of the next token's key)
    sampling: sampling.SamplingParams  # [S] per-slot settings; key = fold_in(PRNGKey(seed), 0)


def choose_rows(logits, sp: sampling.SamplingParams, steps):
    """Next token per row [S], each row with its own settings and step [S] (one compile for any mix).

    Rows are visited one at a time and only a sampling row (temperature > 0) pays for the top-k/top-p
    filter over the vocabulary: a full-vocabulary sort per row and step, which an idle or greedy slot
    should not cost. Each row's draw is ``sampling.choose`` on that row alone, as in ``Model.chat``.
    """
    def one(row):
        row_logits, row_sp, row_step = row
        one_row = jax.tree_util.tree_map(lambda x: x[None], row_sp)
        draw = lambda: sampling.choose(row_logits[None], one_row, row_step, True)[0]  # noqa: E731
        greedy = lambda: jnp.argmax(row_logits).astype(jnp.int32)  # noqa: E731
        return jax.lax.cond(row_sp.temperature > 0, draw, greedy)

    return jax.lax.cond(jnp.any(sp.temperature > 0), lambda: jax.lax.map(one, (logits, sp, steps)),
                        lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))


def first_token(logits, temperature, top_k, top_p, seed):
    """A new request's first token from its prompt's last logits [1, V] -> (token [1], its settings [1]): key
    ``fold_in(PRNGKey(seed), 0)``, as ``SamplingParams.make(1, seed=seed)`` and so ``Model.chat``."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
    sp = sampling.SamplingParams(temperature[None], top_k[None], top_p[None], key[None])
    return choose_rows(logits, sp, jnp.zeros((1,), jnp.int32)), sp


def next_tokens(state: Slots, logits, cache, live, keep):
    """One decode step's bookkeeping for every row: the next tokens [S] (an idle row, not ``live``, greedy,
    so it never makes the step take the sampling branch) and the state moved on. An idle row's write
    index goes back to 0, unless ``keep`` [S] (a prompt being prefilled in chunks): it writes at slot 0 of
    its own row again and again, since decode attention reads every row up to the largest write index,
    which an idle row advancing each step would push to the end."""
    cache = cache.replace(index=jnp.where(live | keep, cache.index, 0))
    tok = choose_rows(logits, state.sampling.replace(temperature=jnp.where(live, state.sampling.temperature, 0.0)),
                      state.step)
    return tok, state.replace(cache=cache, token=tok, position=state.position + 1, step=state.step + 1)


def _put_row(full, row, slot):
    """Write the one-row ``row`` [1, ...] into row ``slot`` of ``full`` [S, ...]."""
    return jax.lax.dynamic_update_index_in_dim(full, row.astype(full.dtype), slot, axis=0)


class _Programs:
    """The jitted functions of one engine: empty slots, prefill+insert (per prompt shape), decode chunk."""

    def __init__(self, module: CogVLM, slots: int, cache_length: int, chunk: int, mesh=None):
        t = module.config.text

        def new_cache(batch):
            return kv_cache.init_cache(t.num_layers, batch, cache_length, t.num_kv_heads, t.head_dim, module.dtype)

        def abstract():
            zeros = jnp.zeros((slots,), jnp.int32)
            sp = sampling.SamplingParams(zeros.astype(jnp.float32), zeros, zeros.astype(jnp.float32),
                                         jnp.zeros((slots, 2), jnp.uint32))
            return Slots(cache=new_cache(slots), token=zeros, position=zeros, step=zeros, sampling=sp)

        shapes = jax.eval_shape(abstract)
        out, state_shardings = {}, None
        if mesh is not None:  # the cache sharded like generate's; the rest, and the outputs, replicated
            rep = replicated(mesh)
            state_shardings = jax.tree_util.tree_map(lambda _: rep, shapes).replace(
                cache=cache_shardings(shapes.cache, mesh))
            out = {"out_shardings": (state_shardings, rep)}
        # the slots' shapes and (on a mesh) shardings: what ``empty`` makes, and what ahead-of-time
        # compilation (``cogvlm_jax.aot``) lowers the programs with
        self.shapes, self.state_shardings = shapes, state_shardings

        def empty():
            """All-zero slots, made on the host from the traced shapes: nothing to compile."""
            if mesh is None:
                return jax.tree_util.tree_map(lambda x: jax.device_put(np.zeros(x.shape, x.dtype)), shapes)
            return jax.tree_util.tree_map(lambda x, sh: multihost.to_global(np.zeros(x.shape, x.dtype), sh),
                                          shapes, state_shardings)

        # a prompt of rows.MIN_ROWS to rows.MAX_ROWS tokens prefills as a few-row program (see rows.py)
        @functools.partial(rows.ByRows, rows=lambda params, state, input_ids, *a: input_ids.size, mesh=mesh,
                           donate_argnames=("state",), **out)
        def insert(params, state: Slots, input_ids, token_type_ids, attention_mask, pixel_values, slot,
                   temperature, top_k, top_p, seed):
            """Prefill one prompt [1, L] into a fresh one-row cache, choose its first token, put it in ``slot``."""
            logits, next_pos, cache = sampling.prefill(module, params, input_ids, token_type_ids, attention_mask,
                                                       pixel_values, new_cache(1))
            first, sp = first_token(logits, temperature, top_k, top_p, seed)
            put = lambda full, row: _put_row(full, row, slot)  # noqa: E731
            state = Slots(cache=jax.tree_util.tree_map(put, state.cache, cache), token=put(state.token, first),
                          position=put(state.position, next_pos.astype(jnp.int32)),
                          step=put(state.step, jnp.ones((1,), jnp.int32)),
                          sampling=jax.tree_util.tree_map(put, state.sampling, sp))
            return state, first[0]

        def steps(params, state: Slots, live, n: int):
            """``chunk`` decode steps of all ``n`` rows of ``state`` -> (state, tokens [n, C])."""
            def body(i, carry):
                s, out = carry
                logits, cache = module.apply({"params": params}, s.token, s.position, s.cache,
                                             method=CogVLM.decode_step)
                tok, s = next_tokens(s, logits, cache, live, False)
                return s, jax.lax.dynamic_update_index_in_dim(out, tok, i, axis=1)

            return jax.lax.fori_loop(0, chunk, body, (state, jnp.zeros((n, chunk), jnp.int32)))

        @functools.partial(rows.ByRows, rows=lambda params, state, live, active: active, mesh=mesh,
                           donate_argnames=("state",), static_argnames=("active",), **out)
        def decode(params, state: Slots, live, active: int):
            """``chunk`` steps of the first ``active`` slots (static; the others are left as they are)
            -> (state, tokens [active, C]). ``live`` [S]: slots whose tokens are used (an idle slot never makes
            the chunk take the sampling branch)."""
            if active < slots:  # a copy of those rows is decoded and written back: a cheap part of the chunk
                part, out = steps(params, jax.tree_util.tree_map(lambda x: x[:active], state), live[:active], active)
                state = jax.tree_util.tree_map(lambda full, p: jax.lax.dynamic_update_slice_in_dim(full, p, 0, axis=0),
                                               state, part)
                # the rows past ``active`` are idle: their write index goes to 0, as an idle decoded row's does
                index = jnp.where(jnp.arange(slots) < active, state.cache.index, 0)
                return state.replace(cache=state.cache.replace(index=index)), out
            return steps(params, state, live, slots)

        @functools.partial(rows.ByRows, rows=lambda params, state, live, chunk_ids, *a: slots + chunk_ids.shape[0],
                           mesh=mesh, donate_argnames=("state",), **out)
        def mix(params, state: Slots, live, chunk_ids, chunk_positions, chunk_len, slot, start, last, temperature,
                top_k, top_p, seed):
            """One decode step of every slot plus the next chunk [P] of ``slot``'s text prompt
            -> (state, (tokens [S], the prompt's first token)). ``last``: the chunk ends the prompt, so
            ``slot`` starts decoding from its first token (chosen as ``insert`` does)."""
            logits, chunk_logits, cache = module.apply(
                {"params": params}, state.token, state.position, state.cache, chunk_ids, chunk_positions, chunk_len,
                slot, start, method=chunked_prefill.mixed_step)
            # the prompt's slot keeps the index its next chunk starts at
            tok, state = next_tokens(state, logits, cache, live, jnp.arange(slots) == slot)
            first, first_sp = first_token(chunk_logits[None], temperature, top_k, top_p, seed)
            begin = lambda full, row: jnp.where(last, _put_row(full, row, slot), full)  # noqa: E731
            next_pos = jax.lax.dynamic_index_in_dim(chunk_positions, jnp.maximum(chunk_len - 1, 0)) + 1
            state = state.replace(token=begin(state.token, first), position=begin(state.position, next_pos),
                                  step=begin(state.step, jnp.ones((1,), jnp.int32)),
                                  sampling=jax.tree_util.tree_map(begin, state.sampling, first_sp))
            return state, (tok, first[0])

        self.empty, self.insert, self.decode, self.mix = empty, insert, decode, mix


def _encode(op: str, args: tuple) -> bytes:
    """A device program's name and host inputs (numpy or None) as bytes, for the other processes."""
    buf = io.BytesIO()
    np.savez(buf, op=np.array(op), n=np.array(len(args)),
             **{f"a{i}": np.asarray(a) for i, a in enumerate(args) if a is not None})
    return buf.getvalue()


def _decode_op(data: bytes) -> tuple[str, tuple]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return str(z["op"]), tuple(z[f"a{i}"] if f"a{i}" in z.files else None for i in range(int(z["n"])))


# --------------------------------------------------------------------------------------- the engine
@dataclasses.dataclass
class _Live:
    request: Request
    text: TextOutput
    generated: int = 0
    prompt: Optional[np.ndarray] = None  # a text prompt's ids while it is prefilled in chunks
    prefilled: int = 0  # of which written to the cache so far
    order: int = 0  # admission order: chunked prompts are prefilled first come, first served

    @property
    def decoding(self) -> bool:
        return self.prompt is None


class Engine:
    """Serve ``model`` (an ``api.Model`` with a tokenizer) to many callers at once from one thread.

    With several processes (``model`` loaded on a mesh over all of them) every process makes the engine;
    process 0 calls :meth:`start` and takes the requests, the others call :meth:`follow`.

    ``slots``: requests decoded together. ``max_length``: KV cache slots per request, prompt (an image
    prompt: its bucket) plus ``max_tokens`` (default: the model's context length). ``max_queue``:
    requests that may wait for a slot beyond the free ones; ``submit`` raises ``QueueFullError`` past
    that. ``prefill_chunk``: the most text-prompt tokens prefilled per decode step (chunked prefill,
    ``chunked_prefill.py``); 0, the default: every prompt is prefilled on its own.
    """

    def __init__(self, model, slots: int = 8, max_length: Optional[int] = None, chunk: int = DEFAULT_CHUNK,
                 max_queue: int = 64, prefill_chunk: int = 0):
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
        self._programs = _Programs(model.module, slots, self.max_length, chunk, self.mesh)
        self._state: Optional[Slots] = None
        self._live: list[Optional[_Live]] = [None] * slots
        self._waiting: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._accepting = False
        self._stop = False
        self.failure: Optional[str] = None  # why the serving thread died; then every request is refused
        self.completed = 0  # requests that left their slot (any reason), for /health and tests
        self.cancelled = 0  # of which cancelled (the client went away)
        self.prefill_shapes: set[tuple[int, bool]] = set()  # (bucket, with image) prefilled alone: one compile each
        self._admitted = 0  # requests given a slot so far

    # ------------------------------------------------------------------ admission
    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise ``ContextLengthError`` if a prompt of ``prompt_tokens`` plus ``max_tokens`` cannot be served."""
        if max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {max_tokens}")
        ctx = self.config.context_length
        if prompt_tokens + max_tokens > ctx:
            raise ContextLengthError(f"prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} exceeds the "
                                     f"model's context length {ctx}")
        if prompt_tokens + max_tokens > self.max_length:
            raise ContextLengthError(
                f"prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} exceeds this server's cache of "
                f"{self.max_length} tokens per request (--max-length)")

    def bucket(self, prompt_tokens: int, max_tokens: int) -> int:
        """The length the prompt is padded to: ``bucket_length``, less where its padding would not leave
        ``max_tokens`` room in the cache."""
        return bucket_length(prompt_tokens, self.max_length - max_tokens)

    def room(self, prompt_tokens: int) -> int:
        """The largest ``max_tokens`` a prompt of this length can have."""
        return min(self.config.context_length, self.max_length) - prompt_tokens

    def submit(self, request: Request) -> Request:
        """Queue a request (checked first); its events arrive through ``request.on_event``."""
        self.check(request.prompt_tokens, request.max_tokens)
        if request.temperature < 0 or not 0 < request.top_p <= 1 or request.top_k < 0:
            raise InputError(f"bad sampling settings: temperature {request.temperature}, top_p {request.top_p}, "
                             f"top_k {request.top_k}")
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
                    "max_length": self.max_length, "failure": self.failure}

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
        while True:
            op, args = _decode_op(multihost.broadcast_bytes(None))
            if op == "stop":
                return
            try:
                self._apply(op, args)
            except Exception as e:  # process 0 meets it too: it fails its requests and sends "empty"
                print(f"cogvlm-jax engine: {op} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ device programs
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
        """Run device program ``op`` (``empty``, ``insert``, ``decode``, ``mix`` or ``noop``) with host inputs ``args``;
        process 0 of several first sends it to the others."""
        if self._leader:
            multihost.broadcast_bytes(_encode(op, args))
        return self._apply(op, args)

    def _apply(self, op: str, args: tuple):
        p = self._programs
        if op == "noop":
            return None
        if op == "empty":
            self._state = p.empty()
            return None
        static = {}
        if op == "decode":  # the row count is a compile-time constant
            args, static = args[:1], {"active": int(args[1])}
        if self.mesh is not None:  # every process supplies the same host inputs, replicated
            args = tuple(None if a is None else multihost.to_global(np.asarray(a), replicated(self.mesh))
                         for a in args)
        self._state, out = getattr(p, op)(self.model.params, self._state, *args, **static)
        return out

    # ------------------------------------------------------------------ the serving thread
    def _run(self) -> None:
        try:
            self._serve()
        except Exception as e:  # the thread cannot go on: say so to every caller, now and later
            self._die(f"{type(e).__name__}: {e}")

    def _die(self, message: str) -> None:
        with self._cv:
            self.failure = message
            self._accepting = False
        print(f"cogvlm-jax engine: {self.failure_message()}", file=sys.stderr, flush=True)
        self._fail_all(self.failure_message())
        if self._leader:  # best effort: let the other processes leave follow()
            try:
                multihost.broadcast_bytes(_encode("stop", ()))
            except Exception:
                pass

    def _serve(self) -> None:
        while True:
            idle = False
            with self._cv:
                while not self._stop and not self._waiting and all(s is None for s in self._live):
                    if not self._cv.wait(HEARTBEAT_S if self._leader else None):
                        idle = True
                        break
                if self._stop:
                    break
                admit = []
                self._drop_cancelled()
                for s in range(self.slots):
                    if self._live[s] is None:
                        if not self._waiting:
                            break
                        req = self._waiting.popleft()
                        admit.append((s, req))
                        self._admitted += 1
                        self._live[s] = _Live(req, TextOutput(self.model.tokenizer, req.stop),
                                              prompt=self._chunked_prompt(req), order=self._admitted)
            if idle:
                self._device("noop")
                continue
            try:
                for s, req in admit:
                    if self._live[s].prompt is None:
                        self._insert(s, req)
                self._free_cancelled()
                prefilling = [s for s, x in enumerate(self._live) if x is not None and not x.decoding]
                if prefilling:  # first come, first served: a prompt started is finished first
                    self._mix(min(prefilling, key=lambda s: self._live[s].order))
                elif any(x is not None for x in self._live):
                    self._decode()
            except Exception as e:  # a device failure: start again from empty slots, fail what was running
                message = f"{type(e).__name__}: {e}"
                try:
                    self._device("empty")
                except Exception as again:  # no slots to serve from: the thread dies (_die)
                    raise RuntimeError(f"{message}; then rebuilding the slots failed: "
                                       f"{type(again).__name__}: {again}") from again
                self._fail_all(message)
        self._fail_all("the server shut down before this request finished")
        if self._leader:
            multihost.broadcast_bytes(_encode("stop", ()))

    def _insert(self, slot: int, req: Request) -> None:
        x = pad_batch([req.inputs], self.config.pad_token_id, self.bucket(req.prompt_tokens, req.max_tokens))  # [1, L]
        pv = x["pixel_values"]
        self.prefill_shapes.add((x["input_ids"].shape[1], pv is not None))
        first = self._device("insert", x["input_ids"], x["token_type_ids"], x["attention_mask"], pv, np.int32(slot),
                             np.float32(req.temperature), np.int32(req.top_k), np.float32(req.top_p),
                             np.uint32(req.seed % 2**32))
        self._take(slot, [int(first)])

    def _chunked_prompt(self, req: Request) -> Optional[np.ndarray]:
        """A text prompt's ids if it is to be prefilled in chunks, else None (prefilled alone: ``insert``)."""
        x = req.inputs
        if not self.prefill_chunk or x.get("pixel_values") is not None or np.any(np.asarray(x["token_type_ids"])):
            return None
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
        args, n, last = self._mix_args(slot, live.prompt, live.prefilled, live.request)
        decoding = args[0]
        tokens, first = self._device("mix", *args)
        tokens = np.asarray(tokens)
        live.prefilled += n
        if last:
            live.prompt = None
        for s in np.flatnonzero(decoding):
            self._take(int(s), [int(tokens[s])])
        if last:
            self._take(slot, [int(first)])

    def _decoding_mask(self) -> np.ndarray:
        return np.array([x is not None and x.decoding for x in self._live])

    def _decode(self) -> None:
        live = self._decoding_mask()
        last = max(s for s, x in enumerate(self._live) if x is not None)
        active = min(n for n in self.decode_sizes if n > last)
        out = np.asarray(self._device("decode", live, np.int32(active)))
        for s in np.flatnonzero(live):
            self._take(int(s), out[s].tolist())

    def _take(self, slot: int, tokens: list[int]) -> None:
        """Hand a slot's new tokens to its request; free the slot when the request stops."""
        live = self._live[slot]
        req = live.request
        text, finish, hit = [], None, False
        for tok in tokens:
            live.generated += 1
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
            self._free(slot)
        if not req.cancelled:
            req.on_event(Event("".join(text), finish, live.generated))

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
