"""Products of a few rows (batched decode: one row per sequence) on XLA:CPU, compiled the faster way.

By default (jax 0.10.2) XLA:CPU gives every float32 dot of two or more rows to a YNNPACK fusion, which
re-packs the whole weight on every call: on the mid config a step of 8 or 16 rows costs 3-5x a one-row step
(a one-row dot takes XLA's matrix-vector path, near the memory bandwidth). With YNNPACK turned off for the
compilation, dots go to Eigen, which runs a weight stored ``[in, out]`` (the lm_head) about 1.5x faster at
8-16 rows, and a weight stored ``[out, in]`` (the decoder's) fast only as the *left* operand, ``W @ x.T``:
as the right one (``x @ W.T``) Eigen is 15-40x slower. Below 8 rows YNNPACK is as fast or faster, so
those steps keep the default. Measured in ``benchmarks/matvec.py`` (``run_rows``).

``ByRows`` jits a function twice and picks per call, by a static row count, the default compilation or
the few-row one (YNNPACK off, and ``layers.Dense(out_in=True)`` multiplying ``W @ x.T`` while it is
traced: ``weight_lhs_active``). Only CPU has the few-row compilation; elsewhere it is the default.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable

import jax

from cogvlm_jax import program

MIN_ROWS = 8  # row counts from here on take the few-row compilation (on CPU)
NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}  # XLA:CPU: no YNNPACK fusions (dots go to Eigen)

_tracing = threading.local()


def few_rows(rows: int) -> bool:
    """Whether a program whose products have ``rows`` rows takes the few-row compilation."""
    return jax.default_backend() == "cpu" and rows >= MIN_ROWS


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
                      True: program.jit(traced(True), mesh, options=NO_YNN, **jit_kwargs)}

    def pick(self, *args, **kwargs):
        return self._jits[few_rows(self._rows(*args, **kwargs))]

    def __call__(self, *args, **kwargs):
        return self.pick(*args, **kwargs)(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.pick(*args, **kwargs).lower(*args, **kwargs)
