"""Products of a few rows (batched decode, short prefills) on XLA:CPU: the weight as the left operand.

XLA:CPU gives every float32 dot of two or more rows to YNNPACK, which packs its right operand before
multiplying. Written ``x @ W.T`` (the decoder's ``[out, in]`` kernels on the right) that packs the whole
weight on every call, so a few rows cost several times what one row costs. Written ``(W @ x.T).T`` the
weight is the left operand and is read as it is, only the few rows are packed: faster than ``x @ W.T``,
than an ``[in, out]`` kernel on the right, and than Eigen (YNNPACK off), for the layer products and the
lm_head alike. From about 64 rows on the packing pays for itself and the usual order is as fast or
faster (prefill). ``benchmarks/matvec.py`` (``run_rows``) times the variants; docs/benchmarks.md has
the numbers.

``ByRows`` jits a function of a module twice, with two variants of the module, and picks per call, by a
static row count, the default compilation or the few-row one (the module's ``execution.weight_lhs`` set:
``layers.Dense(out_in=True)`` multiplies ``W @ x.T``). Only CPU has the few-row compilation; elsewhere it
is the default.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import flax.linen as nn

from cogvlm_jax.parallel import program

MIN_ROWS, MAX_ROWS = 2, 64  # row counts in this range take the few-row compilation (on CPU)


def few_rows(rows: int, platform: str) -> bool:
    """Whether a program on ``platform`` whose products have ``rows`` rows takes the few-row compilation."""
    return platform == "cpu" and MIN_ROWS <= rows <= MAX_ROWS


def variants(module: nn.Module) -> dict[bool, nn.Module]:
    """``module`` as built (False) and with ``execution.weight_lhs`` set (True): the few-row program's."""
    ex = module.execution
    return {few: module.clone(execution=ex.replace(weight_lhs=few)) for few in (False, True)}


class ByRows:
    """``program.jit(fn(module, ...), mesh, **jit_kwargs)`` in two compilations, picked per call by
    ``few_rows(rows(*args, **kwargs), module.execution.platform)``: ``fn`` is given the module's variant
    (:func:`variants`) as its first argument, then the call's arguments.

    ``rows`` must read only static facts (shapes) of the call's arguments. ``lower`` picks the same way.
    ``describe``: what a slow compile of a call says it compiled (``program.jit``)."""

    def __init__(self, fn: Callable, rows: Callable[..., int], mesh=None, *, module: nn.Module,
                 describe: Optional[Callable[..., str]] = None, **jit_kwargs):
        self._rows = rows
        self._platform = module.execution.platform
        self._jits = {few: program.jit(functools.partial(fn, variant), mesh, describe=describe, **jit_kwargs)
                      for few, variant in variants(module).items()}

    def pick(self, *args, **kwargs):
        return self._jits[few_rows(self._rows(*args, **kwargs), self._platform)]

    def __call__(self, *args, **kwargs):
        return self.pick(*args, **kwargs)(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.pick(*args, **kwargs).lower(*args, **kwargs)
