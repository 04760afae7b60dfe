"""Logical axis names -> ``PartitionSpec`` on a mesh, by a table of rules and the fallback rule.

A rules table maps each logical name (the ones every parameter, cache buffer and input declares) to a
tuple of mesh axes: the dimension is sharded over their product, or replicated for ``()``. The project's
table is ``parallel/axes.py`` ``RULES``; whoever builds a module or places arrays passes it in. A table is
given as a mapping or as a tuple of ``(name, mesh axes)`` pairs, the hashable form a module field holds
(:func:`as_rules`).

Fallback rule (stated, never an XLA error): a dimension is sharded over its mesh axes only if its size
is divisible by the product of their sizes; otherwise that dimension is replicated. A mesh axis is used
at most once per array (the first dimension that claims it wins).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, tuple[str, ...]], ...]  # (logical name, mesh axes) pairs, hashable
RulesLike = Union[Mapping[str, Sequence[str]], Iterable[tuple[str, Sequence[str]]]]


def as_rules(rules: RulesLike) -> Rules:
    """``rules`` as a tuple of ``(name, mesh axes tuple)`` pairs, in the table's order."""
    items = rules.items() if isinstance(rules, Mapping) else rules
    return tuple((str(name), tuple(axes)) for name, axes in items)


def _placement(logical, shape, mesh, rules) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Per dimension: (the mesh axes it is sharded over, the mesh axes its rule gave it that do not divide
    its size), by the table and the fallback rule; at most one of the two is non-empty."""
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    table = dict(rules.items() if isinstance(rules, Mapping) else rules)
    used: set[str] = set()
    out = []
    for name, size in zip(logical, shape):
        if name is None:
            out.append(((), ()))
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in the rules table (parallel/axes.py RULES)")
        axes = tuple(a for a in table[name] if mesh.shape[a] > 1 and a not in used)
        total = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or size % total:
            out.append(((), axes))
            continue
        used.update(axes)
        out.append((axes, ()))
    return out


def spec_for(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh, rules: RulesLike) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes and shape, after the fallback rule.

    ``mesh``: anything with a ``shape`` mapping of axis sizes (a ``Mesh``, or the planner's sizes)."""
    axes = [sharded for sharded, _ in _placement(logical, shape, mesh, rules)]
    return PartitionSpec(*(None if not a else a[0] if len(a) == 1 else a for a in axes))


def undivided(logical: Sequence[Optional[str]], shape: Sequence[int], mesh, rules: RulesLike) -> list[tuple]:
    """The dimensions the fallback rule replicates: (dimension, logical name, size, the mesh axes that do
    not divide it) for each dimension whose rule shards it but whose size their product does not divide."""
    return [(d, logical[d], shape[d], left) for d, (_, left) in enumerate(_placement(logical, shape, mesh, rules))
            if left]


def named_sharding(logical, shape, mesh: Mesh, rules: RulesLike) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical, shape, mesh, rules))
