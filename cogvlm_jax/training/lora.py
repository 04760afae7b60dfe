"""LoRA: low-rank trainable factors beside frozen ``Dense`` kernels, and merging them for export.

A target is a ``Dense`` module chosen by a glob over its path in the parameter tree, e.g.
``layers_*/self_attn/*_expert_query_key_value``. Each gets two factors in a separate ``lora``
collection at the module's own path::

    lora_a [in, r]   uniform(-1/sqrt(in), 1/sqrt(in))      lora_b [r, out]   zeros

and computes ``y = x @ kernel (+ bias) + (alpha / r) * (x @ lora_a) @ lora_b``: the frozen kernel is never
rewritten during training, and at initialisation (``lora_b`` zero) the model is exactly the base model.
The extra term is added by a flax method interceptor (:func:`applied`), so the model code has no LoRA
branch; it works under ``nn.remat`` because the ``lora`` collection is lifted like the parameters.
:func:`merge` folds the factors into the kernels (``kernel + (alpha / r) * lora_a @ lora_b``).

Axis legend: D in features, F out features, R rank.
"""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from cogvlm_jax.models.layers import Dense, precision_for

COLLECTION = "lora"
A, B = "lora_a", "lora_b"
# The decoder's attention projections, both experts (CogVLM's own LoRA recipe targets attention).
DEFAULT_TARGETS = ("layers_*/self_attn/*_expert_query_key_value", "layers_*/self_attn/*_expert_dense")


def _out_in(path) -> bool:
    """Whether the kernel at module ``path`` is stored ``[out, in]``: the decoder layers' linears and the
    lm_head are (``Dense(out_in=True)``); the ViT and adapter are ``[in, out]``.
    The interceptor checks this against each module it touches."""
    return str(path[0]).startswith("layers_") or str(path[0]) == "lm_head"


def target_paths(params: Mapping, patterns: Sequence[str]) -> list[tuple]:
    """Module paths (tuples) of the 2-D ``kernel`` leaves whose ``/``-joined module path matches a pattern.

    Raises ``ValueError`` naming any pattern that matches no linear layer (a typo would silently train
    nothing).
    """
    if not patterns:
        raise ValueError("LoRA needs at least one target pattern")
    modules = ["/".join(p[:-1]) for p, leaf in flatten_dict(params).items()
               if p[-1] == "kernel" and len(leaf.shape) == 2]
    unused = [pat for pat in patterns if not any(fnmatch.fnmatchcase(m, pat) for m in modules)]
    if unused:
        raise ValueError(f"LoRA target pattern(s) {', '.join(repr(p) for p in unused)} match no linear layer; "
                         f"examples of names: {', '.join(modules[:4])}")
    return [tuple(m.split("/")) for m in modules if any(fnmatch.fnmatchcase(m, pat) for pat in patterns)]


def init(params: Mapping, patterns: Sequence[str], rank: int, rng) -> dict:
    """Float32 factors for every target: ``{module path...: {"lora_a": [in, r], "lora_b": [r, out]}}``."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    flat = {}
    paths = target_paths(params, patterns)
    for path, key in zip(paths, jax.random.split(rng, len(paths))):
        d_in, d_out = _leaf(params, path + ("kernel",)).shape[::-1 if _out_in(path) else 1]
        bound = 1.0 / d_in ** 0.5
        flat[path + (A,)] = jax.random.uniform(key, (d_in, rank), jnp.float32, -bound, bound)
        flat[path + (B,)] = jnp.zeros((rank, d_out), jnp.float32)
    return unflatten_dict(flat)


def axes_of(lora: Mapping, kernel_axes: Mapping) -> dict:
    """Logical axes of every factor from its kernel's ``(in, out)`` axes: a ``(in, None)``, b ``(None, out)``."""
    out = {}
    for path in flatten_dict(lora):
        k_in, k_out = tuple(_leaf(kernel_axes, path[:-1] + ("kernel",)))[::-1 if _out_in(path[:-1]) else 1]
        out[path] = (k_in, None) if path[-1] == A else (None, k_out)
    return unflatten_dict(out)


def _interceptor(scale: float):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name != "__call__" or not isinstance(module, Dense)
                or not module.has_variable(COLLECTION, A)):
            return next_fun(*args, **kwargs)
        if module.out_in != _out_in(module.scope.path):
            raise ValueError(f"LoRA: kernel layout of {'/'.join(module.scope.path)} is not the one lora.py assumes")
        x = args[0]
        dt = module.dtype
        a = module.get_variable(COLLECTION, A).astype(dt)
        b = module.get_variable(COLLECTION, B).astype(dt)
        prec = precision_for(dt)
        low = jnp.einsum("...d,dr->...r", x.astype(dt), a, precision=prec, preferred_element_type=jnp.float32)
        delta = jnp.einsum("...r,rf->...f", low.astype(dt), b, precision=prec, preferred_element_type=jnp.float32)
        return next_fun(*args, **kwargs) + scale * delta
    return intercept


@contextlib.contextmanager
def applied(scale: float) -> Iterator[None]:
    """Inside this context, ``module.apply({"params": p, "lora": factors}, ...)`` adds the LoRA terms."""
    with nn.intercept_methods(_interceptor(float(scale))):
        yield


def merge(params: Mapping, lora: Mapping, scale: float) -> dict:
    """``params`` with each target kernel replaced by ``kernel + scale * lora_a @ lora_b`` (float32 product,
    cast back to the kernel's dtype); every other leaf is the same object."""
    flat = flatten_dict(params)
    factors = flatten_dict(lora)
    for path in {p[:-1] for p in factors}:
        k = path + ("kernel",)
        if k not in flat:
            raise ValueError(f"LoRA factors for {'/'.join(path)}, which has no kernel in the parameters")
        kernel = flat[k]
        a, b = (jnp.asarray(factors[path + (k,)], jnp.float32) for k in (A, B))
        delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)  # [in, out]
        if _out_in(path):
            delta = delta.T
        flat[k] = (jnp.asarray(kernel, jnp.float32) + scale * delta).astype(kernel.dtype)
    return unflatten_dict(flat)


def _leaf(tree, path):
    for k in path:
        tree = tree[k]
    return tree
