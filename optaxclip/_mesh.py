"""Mesh plumbing: ``axis_name`` / ``partition_specs`` to reduction groups,
and the cross-device sums (maxima for ``ord=inf``) over them.

Inside ``shard_map`` / ``pmap`` a leaf holds only its shard: its partial
reduction is ``psum``-ed (``pmax``-ed) across the mesh axes it is split
over, and a tree of ``PartitionSpec`` says which leaves are split, so a
replicated leaf is counted once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from ._numerics import INF, combine
from ._tree import float_leaves, leafwise

AxisName = str | tuple[str, ...] | None


def axis_names(axis_name: AxisName) -> tuple[str, ...]:
    """``axis_name`` as a tuple of mesh axis names (empty for None)."""
    if axis_name is None:
        return ()
    if isinstance(axis_name, str):
        return (axis_name,)
    return tuple(axis_name)


def _is_spec(v: Any) -> bool:
    return isinstance(v, PartitionSpec)


def leaf_mesh_axes(
    tree: Any,
    axis_name: AxisName,
    partition_specs: Any,
) -> list[tuple[tuple[str, ...], tuple[int, ...] | None]]:
    """Per float leaf: the mesh axes it is split across, and over which dims.

    The dims entry is ``None`` when unknown (no spec given: the leaf is taken
    as split across every named axis, along whichever dim is reduced).
    """
    names = axis_names(axis_name)
    leaves = float_leaves(tree)
    if not names:
        return [((), None)] * len(leaves)
    if partition_specs is None:
        return [(names, None)] * len(leaves)
    specs = leafwise(partition_specs, tree, _is_spec)
    out = []
    for spec in specs:
        if spec is None:
            spec = PartitionSpec()
        leaf_names: list[str] = []
        dims: list[int] = []
        for dim, entry in enumerate(spec):
            entry_names = axis_names(entry)
            for n in entry_names:
                if n in names:
                    leaf_names.append(n)
                    dims.append(dim)
        out.append((tuple(dict.fromkeys(leaf_names)), tuple(dims)))
    return out


def reduction_groups(
    tree: Any,
    leaves: Sequence[jax.Array],
    axis_name: AxisName,
    partition_specs: Any,
    reduced_axes: Sequence[tuple[int, ...] | None] | None = None,
) -> list[tuple[str, ...]]:
    """Per float leaf, the mesh axes its partial reduction is combined over.

    ``reduced_axes[i]`` lists the dims of leaf ``i`` that are reduced (None:
    all); a leaf split only along dims that are not reduced needs no
    cross-device sum.
    """
    per_leaf = leaf_mesh_axes(tree, axis_name, partition_specs)
    if reduced_axes is None:
        reduced_axes = [None] * len(leaves)
    groups = []
    for (names, dims), red in zip(per_leaf, reduced_axes, strict=True):
        if dims is None or red is None:
            groups.append(names)
        else:
            spec_names = [n for n, d in zip(names, dims, strict=True) if d in red]
            groups.append(tuple(dict.fromkeys(spec_names)))
    return groups


def cross_device(
    value: jax.Array, names: tuple[str, ...], p: float | jax.Array
) -> jax.Array:
    """Combines a partial reduction across mesh axes (pmax for ``inf``)."""
    if not names:
        return value
    if isinstance(p, float) and p == INF:
        return jax.lax.pmax(value, names)
    return jax.lax.psum(value, names)


def cross_device_vector(
    vector: jax.Array,
    counts: Sequence[int],
    groups: Sequence[tuple[str, ...]],
    p: float | jax.Array,
) -> jax.Array:
    """Combines a vector of per-leaf segments across the mesh axes of each leaf."""
    distinct = list(dict.fromkeys(groups))
    if distinct == [()]:
        return vector
    if len(distinct) == 1:
        return cross_device(vector, distinct[0], p)
    everywhere = tuple(dict.fromkeys(n for g in distinct for n in g))
    out = None
    for names in distinct:
        mask = np.concatenate(
            [np.full(c, g == names) for c, g in zip(counts, groups, strict=True)]
        )
        piece = cross_device(jnp.where(mask, vector, 0), names, p)
        # The piece is equal on every device of the remaining axes (its
        # leaves are replicated there); a pmax says so to shard_map's
        # replication check, so the result can leave with out_specs=P().
        rest = tuple(n for n in everywhere if n not in names)
        piece = jax.lax.pmax(piece, rest) if rest else piece
        out = piece if out is None else combine(out, piece, p)
    assert out is not None  # groups are not all empty here
    return out


def gather_plan(
    tree: Any, axis_name: AxisName, partition_specs: Any
) -> list[tuple[tuple[tuple[str, ...], int], ...]]:
    """Per float leaf, the ``(mesh axes, dim)`` pairs it is split over.

    A leaf that must be read whole (a matrix whose singular values are
    measured) is gathered along each pair with `gather` and split again
    with `scatter`.
    """
    plan = []
    for names, dims in leaf_mesh_axes(tree, axis_name, partition_specs):
        by_dim: dict[int, list[str]] = {}
        for n, d in zip(names, dims or (), strict=True):
            by_dim.setdefault(d, []).append(n)
        plan.append(tuple((tuple(v), d) for d, v in by_dim.items()))
    return plan


def gather(x: jax.Array, pairs: Sequence[tuple[tuple[str, ...], int]]) -> jax.Array:
    """The whole of a leaf split over ``pairs`` (inside ``shard_map``)."""
    for names, dim in pairs:
        x = jax.lax.all_gather(x, names, axis=dim, tiled=True)
    return x


def scatter(x: jax.Array, pairs: Sequence[tuple[tuple[str, ...], int]]) -> jax.Array:
    """This device's shard of a whole leaf split over ``pairs`` (`gather`'s inverse)."""
    for names, dim in reversed(pairs):
        size = x.shape[dim] // jax.lax.psum(1, names)
        start = jax.lax.axis_index(names) * size
        x = jax.lax.dynamic_slice_in_dim(x, start, size, dim)
    return x
