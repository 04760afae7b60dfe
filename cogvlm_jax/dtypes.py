"""The dtypes a model is loaded, trained, planned or benchmarked in: one table behind every ``--dtype``."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

# name -> numpy dtype; the names are the ``--dtype`` choices and what ``cogvlm_jax.load(dtype=)`` accepts
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def model_dtype(name: str) -> np.dtype:
    """The dtype of ``DTYPES`` called ``name``; a ValueError naming the choices for any other."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"dtype {name!r} unknown; expected one of {sorted(DTYPES)}") from None


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
