"""Achievable memory read bandwidth: jitted reductions over an array far larger than the caches.

A step of decode reads every language-expert weight once, so its speed limit is bytes / bandwidth.
This probe measures the bandwidth that jitted code can actually reach on this device (not the data
sheet's number): a float32 array of ``size_gb`` (>= 1 GB on CPU, well past any last-level cache) is
reduced by a few kernels, each best-of-N, and the fastest one is the probe.

Kernels (all read the array exactly once and write almost nothing):

* ``sum``: ``x.sum()``, the plain full reduction;
* ``row_sums``: ``x.reshape(R, -1).sum(1)``, R independent rows: lets a backend split rows over threads;
* ``matvec``: ``x.reshape(-1, 1024) @ v``, the very operation a batch-1 decode step is made of.

The same code runs on GPU/TPU (use a size well above the device's caches there too).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from benchmarks.common import GB, best_time, record

ROWS = 64  # independent rows for ``row_sums``
MATVEC_WIDTH = 1024


def _kernels():
    def sum_all(x):
        return jnp.sum(x)

    def row_sums(x):
        return jnp.sum(x.reshape(ROWS, -1), axis=1)

    def matvec(x):
        v = jnp.ones((MATVEC_WIDTH,), x.dtype)
        return jnp.dot(x.reshape(-1, MATVEC_WIDTH), v, precision=jax.lax.Precision.HIGHEST)

    return {"sum": sum_all, "row_sums": row_sums, "matvec": matvec}


def _array(size_gb: float):
    """A materialised float32 device buffer of about ``size_gb`` that every kernel can reshape (passed as an
    argument: a constant would be folded away by XLA)."""
    n = int(size_gb * GB) // 4
    n -= n % (ROWS * MATVEC_WIDTH)
    return jax.block_until_ready(jnp.ones((n,), jnp.float32))


def probe(size_gb: float = 1.0, repeats: int = 10) -> dict[str, float]:
    """GB/s of each kernel over a ``size_gb`` float32 array (best of ``repeats``); key ``"probe"``: the max."""
    x = _array(size_gb)
    nbytes = x.size * 4
    out = {}
    for name, fn in _kernels().items():
        f = jax.jit(fn)
        jax.block_until_ready(f(x))  # compile + warm the pages
        t = best_time(lambda: jax.block_until_ready(f(x)), repeats)
        out[name] = nbytes / t / GB
    out["probe"] = max(out.values())
    out["bytes"] = float(nbytes)
    return out


class PairedProbe:
    """The probe's fastest kernel, kept ready to time one pass at a time between the repetitions of another
    measurement: its fraction is then taken against the bandwidth of the same minutes. On a shared VM the
    probe itself moves by a fifth between runs minutes apart (docs/benchmarks.md, "The machine"), more
    than the difference a decode fix makes.
    """

    def __init__(self, size_gb: float, kernel: str):
        self._x = _array(size_gb)
        self.bytes = self._x.size * 4
        self._fn = jax.jit(_kernels()[kernel])
        jax.block_until_ready(self._fn(self._x))
        self.best_gb_s = 0.0

    def once(self) -> float:
        """Time one pass; returns its GB/s and keeps the best in ``best_gb_s``."""
        t0 = time.perf_counter()
        jax.block_until_ready(self._fn(self._x))
        gb_s = self.bytes / (time.perf_counter() - t0) / GB
        self.best_gb_s = max(self.best_gb_s, gb_s)
        return gb_s

    def reset(self) -> None:
        self.best_gb_s = 0.0


def run(quick: bool = False, size_gb: float | None = None) -> list[dict]:
    """The measurements: one per kernel, and ``bandwidth`` (the probe every fraction is taken against)."""
    size = size_gb or (0.25 if quick else 1.0)
    res = probe(size, repeats=3 if quick else 10)
    recs = [record(f"bandwidth_{k}", res[k], "GB/s", dtype="float32", array_gb=res["bytes"] / GB)
            for k in _kernels()]
    best = max(_kernels(), key=lambda k: res[k])
    recs.append(record("bandwidth", res["probe"], "GB/s", dtype="float32", array_gb=res["bytes"] / GB, kernel=best))
    return recs


if __name__ == "__main__":
    from benchmarks.common import emit

    for r in run():
        emit(r)
