"""The dtypes a model is loaded, trained, planned or benchmarked in: one table behind every ``--dtype``."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

# name -> numpy dtype; the names are the ``--dtype`` choices (generate, serve, train, plan, compile, bench)
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
# the reference mode: every computation in float64, on CPU with JAX's 64-bit mode on (``api.check_reference_mode``);
# for checking a port against ours to 1e-12, not for speed (docs/sharding-and-numerics.md)
REFERENCE = {"float64": np.dtype(np.float64)}
# what ``cogvlm_jax.load(dtype=)`` and ``Model(dtype=)`` accept
LOADABLE = {**DTYPES, **REFERENCE}


def model_dtype(name: str, choices: dict = DTYPES) -> np.dtype:
    """The dtype of ``choices`` (default ``DTYPES``) called ``name``; a ValueError naming the choices for any
    other."""
    try:
        return choices[name]
    except (KeyError, TypeError):
        raise ValueError(f"dtype {name!r} unknown; expected one of {sorted(choices)}") from None


def as_dtype(dtype: Any) -> np.dtype | None:
    """``None``, a numpy / jax dtype or a dtype name ("bfloat16", "bf16", "float32", ...) -> numpy dtype (None
    stays None); a ValueError for anything else."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype.lower() in ("bfloat16", "bf16"):
        return DTYPES["bfloat16"]
    try:
        return np.dtype(dtype)
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}") from None
