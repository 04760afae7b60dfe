"""Products of a few rows (batched decode, short prefills) on XLA:CPU: the weight as the left operand.

XLA:CPU (jax 0.10.2) gives every float32 dot of two or more rows to YNNPACK, which packs its right operand
before multiplying. Written ``x @ W.T`` (the decoder's ``[out, in]`` kernels on the right) that packs the
whole weight on every call: on the mid config a step's 40 layer products cost 29 ms at 2 rows and 41 ms
at 16 against 12 ms at one row. Written ``(W @ x.T).T`` the weight is the left operand and is read as it
is, only the few rows are packed: 18 ms at 2 rows and 23 ms at 16 (125 GFLOP/s of the machine's ~158),
and the ``[32000, 1024]`` lm_head takes 11 ms at 16 rows against 21 (``[in, out]``, right operand) or 12
(Eigen, YNNPACK off, the former choice here). From about 64 rows on the packing pays for itself and the
usual order is as fast or faster (prefill). Measured in ``benchmarks/matvec.py`` (``run_rows``).

``ByRows`` jits a function twice and picks per call, by a static row count, the default compilation or
the few-row one (``layers.Dense(out_in=True)`` multiplying ``W @ x.T`` while it is traced:
``weight_lhs_active``). Only CPU has the few-row compilation; elsewhere it is the default.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable

import jax

from cogvlm_jax.parallel import program

MIN_ROWS, MAX_ROWS = 2, 64  # row counts in this range take the few-row compilation (on CPU)

_tracing = threading.local()


def few_rows(rows: int) -> bool:
    """Whether a program whose products have ``rows`` rows takes the few-row compilation."""
    return jax.default_backend() == "cpu" and MIN_ROWS <= rows <= MAX_ROWS


def weight_lhs_active() -> bool:
    """True while a few-row program is traced: ``[out, in]`` kernels are then the left operand."""
    return getattr(_tracing, "weight_lhs", False)


@contextlib.contextmanager
def _weight_lhs(on: bool):
    saved = weight_lhs_active()
    _tracing.weight_lhs = on
    try:
        yield
    finally:
        _tracing.weight_lhs = saved


class ByRows:
    """``program.jit(fn, mesh, **jit_kwargs)`` in two compilations, picked per call by
    ``few_rows(rows(*args, **kwargs))``.

    ``rows`` must read only static facts (shapes) of the arguments. ``lower`` picks the same way."""

    def __init__(self, fn: Callable, rows: Callable[..., int], mesh=None, **jit_kwargs):
        self._rows = rows

        def traced(few: bool):
            @functools.wraps(fn)
            def f(*args, **kwargs):
                with _weight_lhs(few):
                    return fn(*args, **kwargs)
            return f

        self._jits = {False: program.jit(traced(False), mesh, **jit_kwargs),
                      True: program.jit(traced(True), mesh, **jit_kwargs)}

    def pick(self, *args, **kwargs):
        return self._jits[few_rows(self._rows(*args, **kwargs))]

    def __call__(self, *args, **kwargs):
        return self.pick(*args, **kwargs)(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.pick(*args, **kwargs).lower(*args, **kwargs)
