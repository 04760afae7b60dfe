"""The CPU kernel of a quantized decode product: ``x @ dequant(W).T`` reading the held int8 / int4 bytes.

XLA:CPU has no integer-by-float dot. For a held int8 kernel it converts the integers to a float32 array
inside the program and multiplies that: a decode step then writes and reads four bytes per weight
besides the one it holds, and runs slower than float32 weights (``docs/benchmarks.md``, "Quantized
weights"). ``csrc/int8_cpu.cc`` is an XLA FFI handler that reads each weight byte once per call and widens
it in registers; ``setup.py`` builds it into the package as ``cogvlm_jax/_int8_cpu*.so`` where a C++
compiler is present.

``layers.Dense`` calls :func:`matmul` where :func:`applies`: a quantized ``[out, in]`` kernel (the
decoder's projections and the lm_head), a program for CPU devices (``Execution.platform``, from the
mesh the module is built for) on one device, at most :data:`MAX_ROWS` rows (decode steps, short
prefill chunks: the products that read every weight for few rows), and ``Execution.quant_kernel`` on.
Everything else, and a build without the library (a warning, once), multiplies as XLA ops
(``quantize.product_kernel``). Programs for TPU or GPU never contain the kernel.

The products are those of ``quantize.product_kernel``, in another float32 summation order: int8
``(x @ q.T) * scale`` per output channel; int4 ``x @ (q * group scale).T``. Gradients (QLoRA trains
through a frozen quantized base) are those of the XLA product (:func:`reference`).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import threading
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from cogvlm_jax.models import quantize as quant_lib

MAX_ROWS = 64  # the most rows (tokens times batch) a product sends to the kernel
TARGETS = {"int8": ("cogvlm_int8_matmul", "CogvlmInt8Matmul"), "int4": ("cogvlm_int4_matmul", "CogvlmInt4Matmul")}
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_lock = threading.Lock()
_state: dict = {}  # "loaded": bool once tried; "why": the reason it is not


def library_path() -> Optional[str]:
    """The built kernel library beside the package (``cogvlm_jax/_int8_cpu*.so``), or None."""
    found = sorted(glob.glob(os.path.join(_PACKAGE, "_int8_cpu*.so")))
    return found[0] if found else None


def _load() -> bool:
    """Load the library and register its targets with XLA for CPU, once; False (and why) where not built."""
    with _lock:
        if "loaded" in _state:
            return _state["loaded"]
        path = library_path()
        try:
            if path is None:
                raise FileNotFoundError(f"no _int8_cpu*.so in {_PACKAGE} (pip install -e . builds it where a "
                                        "C++ compiler is present)")
            lib = ctypes.cdll.LoadLibrary(path)
            for name, symbol in TARGETS.values():
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
            _state.update(loaded=True, why=None, lib=lib)
        except (OSError, AttributeError) as e:
            _state.update(loaded=False, why=str(e))
            warnings.warn(f"the CPU int8/int4 decode kernel is unavailable ({e}); quantized products on CPU "
                          "run as XLA ops, which widen the weights to float32 on every call", RuntimeWarning,
                          stacklevel=3)
        return _state["loaded"]


def isa() -> Optional[str]:
    """The version the kernel runs on this CPU: ``"avx512"``, ``"avx2"`` (with FMA) or ``"scalar"``
    (chosen when the library loads; ``COGVLM_CPU_KERNEL_ISA=avx2|scalar`` caps it); None without it."""
    if not _load():
        return None
    return ("scalar", "avx2", "avx512")[_state["lib"].CogvlmCpuKernelIsa()]


def available() -> bool:
    """Whether the kernel library is built and registered (loads it on first use)."""
    return _load()


def applies(execution, rows: int, out_in: bool) -> bool:
    """Whether a quantized ``Dense`` of ``rows`` rows on ``execution`` multiplies in the kernel.

    ``execution`` (``models/execution.py``) says the platform and mesh the program is traced for; the
    default backend of the process plays no part, so a TPU or GPU program compiled from a CPU host never
    gets the kernel."""
    q = execution.quant
    if q is None or not out_in or not execution.quant_kernel or execution.platform != "cpu":
        return False
    if execution.mesh is not None and execution.mesh.devices.size > 1:
        return False
    if rows < 1 or rows > MAX_ROWS or (q.format == "int4" and not q.packed):
        return False
    return available()


def reference(x, kernel, scale, quant):
    """The XLA product the kernel computes: ``x`` f32 [R, D], an ``[out, in]`` held kernel and its scales
    -> f32 [R, out] (``quantize.product_kernel``'s arithmetic)."""
    hi = jax.lax.Precision.HIGHEST
    if quant.format == "int8":
        return jnp.einsum("rd,fd->rf", x, kernel.astype(jnp.float32), precision=hi) * scale[:, 0]
    w = quant_lib.dequantize(kernel, scale, 1, quant, jnp.float32)
    return jnp.einsum("rd,fd->rf", x, w, precision=hi)


def _call(x, kernel, scale, quant):
    name = TARGETS[quant.format][0]
    out = jax.ShapeDtypeStruct((x.shape[0], kernel.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(name, out, vmap_method="sequential")(x, kernel, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _product(x, kernel, scale, quant):
    return _call(x, kernel, scale, quant)


def _product_fwd(x, kernel, scale, quant):
    return _call(x, kernel, scale, quant), (x, kernel, scale)


def _product_bwd(quant, res, g):
    x, kernel, scale = res
    _, vjp = jax.vjp(lambda x_, s_: reference(x_, kernel, s_, quant), x, scale)
    dx, ds = vjp(g)
    return dx, np.zeros(kernel.shape, dtype=jax.dtypes.float0), ds


_product.defvjp(_product_fwd, _product_bwd)


def matmul(x, kernel, scale, quant):
    """``x`` [..., D] (float32 values) times the held ``[out, in]`` kernel -> float32 [..., out], in the
    kernel. ``kernel``: int8 [out, D] or packed int4 ``uint8`` [out, D/2]; ``scale``: float32 [out, 1] or
    [out, D/group]."""
    if not available():
        raise RuntimeError(f"the CPU int8/int4 kernel is unavailable: {_state.get('why')}")
    d = x.shape[-1]
    held_in = d // 2 if quant.format == "int4" else d
    if kernel.ndim != 2 or kernel.shape[1] != held_in or scale.shape[0] != kernel.shape[0]:
        raise ValueError(f"{quant.format} kernel {kernel.shape} / scale {scale.shape} do not fit an input of width {d}")
    y = _product(x.reshape(-1, d).astype(jnp.float32), kernel, scale.astype(jnp.float32), quant)
    return y.reshape(*x.shape[:-1], kernel.shape[0])
