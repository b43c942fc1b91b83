"""Pytree plumbing: the leaves that are clipped, leafwise maps, and the
arrays a step creates.

Every array a step creates beside the updates is built here with the
sharding of what it meets (`full_like`, `sharded_like`): on a mesh with
Explicit axes the sharding is part of an array's type, and a select or an
elementwise op needs operands of one sharding. The one zeroing select
(`zero_unless`) and the one keep-the-old-state (`commit`) live here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


def is_float(x: Any) -> bool:
    """Whether a leaf is measured and clipped (floating or complex)."""
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def float_leaves(tree: Any) -> list[jax.Array]:
    """The floating-point leaves of ``tree``, in flattening order."""
    return [x for x in jax.tree.leaves(tree) if is_float(x)]


def matching_float_leaves(updates: Any, params: Any) -> list[jax.Array]:
    """The leaves of ``params`` at the float leaves of ``updates``, in order."""
    flat = jax.tree.structure(updates).flatten_up_to(params)
    return [
        w for u, w in zip(jax.tree.leaves(updates), flat, strict=True) if is_float(u)
    ]


def leafwise(prefix: Any, tree: Any, is_leaf: Callable[[Any], bool]) -> list[Any]:
    """Broadcasts a prefix tree onto the float leaves of ``tree``.

    Returns one entry of ``prefix`` per float leaf of ``tree``, in order.
    """
    if prefix is None or is_leaf(prefix):
        return [prefix] * len(float_leaves(tree))
    treedef = jax.tree.structure(prefix, is_leaf=lambda v: v is None or is_leaf(v))
    try:
        subtrees = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "The per-leaf option tree does not match the updates: its structure "
            f"{treedef} is not a prefix of {jax.tree.structure(tree)} ({e})."
        ) from None
    values = jax.tree.leaves(prefix, is_leaf=lambda v: v is None or is_leaf(v))
    out = []
    for value, sub in zip(values, subtrees, strict=True):
        out.extend([value] * len(float_leaves(sub)))
    return out


# Explicit sharding (typeof, reshard) is absent from the oldest supported JAX.
_typeof = getattr(jax, "typeof", lambda x: None)


_reshard = getattr(jax.sharding, "reshard", lambda x, sharding: x)


_EXPLICIT = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)


def replicated(x: jax.Array) -> jax.Array:
    """``x``, resharded to replicated if its type carries an Explicit sharding.

    On a mesh with Explicit axes a reduction keeps the sharding of the dims
    it does not reduce (one norm per stacked layer or per example of a
    sharded batch); the small vectors of norms are replicated before they
    are joined, as the state that records them is. A no-op otherwise.
    """
    sharding = getattr(_typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if sharding is None or not spec or all(s is None for s in spec):
        return x
    return _reshard(x, jax.sharding.NamedSharding(sharding.mesh, PartitionSpec()))


def one_sharding(values: Sequence[jax.Array]) -> list[jax.Array]:
    """``values``, all replicated if their Explicit shardings differ.

    Per-example sums of leaves split differently (the batch axis split on
    some leaves, not on others) carry different shardings, and a stack on a
    mesh with Explicit axes needs one; they are small vectors, replicated
    as `replicated` does. Unchanged where the shardings agree.
    """
    shardings = {getattr(_typeof(v), "sharding", None) for v in values}
    if len(shardings) <= 1:
        return list(values)
    return [replicated(v) for v in values]


def sharded_like(x: jax.Array, y: jax.Array) -> jax.Array:
    """``y`` (shaped as ``x``) carrying the sharding that ``x``'s type names.

    On a mesh with Explicit axes the sharding is part of an array's type,
    and a select or an elementwise op needs operands of one sharding. Newer
    JAX (0.12) builds constants such as ``jnp.ones_like(x)`` inside ``jit``
    without ``x``'s sharding when no mesh context is set, and a flag
    broadcast from a vector of per-example norms carries the vector's
    sharding, not the leaf's; both are resharded here. A no-op where ``x``'s
    type names no Explicit axis (unsharded arrays, Auto axes, older JAX).
    """
    want = getattr(_typeof(x), "sharding", None)
    types = getattr(getattr(want, "mesh", None), "axis_types", None) or ()
    if _EXPLICIT is None or _EXPLICIT not in types:
        return y
    if getattr(_typeof(y), "sharding", None) == want:
        return y
    return _reshard(y, want)


def full_like(
    x: jax.Array, fill_value: Any, dtype: jax.typing.DTypeLike | None = None
) -> jax.Array:
    """``jnp.full_like(x, fill_value, dtype)`` carrying ``x``'s sharding.

    Every constant that a step combines with an array is built here (see
    `sharded_like`), so it has the sharding of the array it meets on a mesh
    with Explicit axes, on every supported JAX.
    """
    return sharded_like(x, jnp.full_like(x, fill_value, dtype))


def map_float(fn: Callable[..., jax.Array], tree: Any, *rest: Any) -> Any:
    """Applies ``fn(i, leaf, *rest_leaves)`` to the float leaves, in order.

    Integer leaves are returned untouched; ``None`` and ``MaskedNode`` stay.
    """
    leaves, treedef = jax.tree.flatten(tree)
    rest_leaves = [treedef.flatten_up_to(r) for r in rest]
    out, i = [], 0
    for j, x in enumerate(leaves):
        if is_float(x):
            out.append(fn(i, x, *(r[j] for r in rest_leaves)))
            i += 1
        else:
            out.append(x)
    return jax.tree.unflatten(treedef, out)


def commit(condition: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``condition`` holds, else ``old``: the one keep-the-old-state.

    A leafwise select over two states of one structure: the rule's state,
    a scope's moments and a wrapped optimizer's state are all committed
    through it, so a bad step leaves each exactly as it was.
    """
    return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new, old)


def zero_unless(keep: jax.Array | None, x: jax.Array) -> jax.Array:
    """``x`` where ``keep`` holds, else zeros (None: ``x``).

    ``keep`` is a scalar or broadcasts against ``x`` (one flag per example,
    say). A select, so a NaN entry becomes 0 rather than NaN * 0. The zeros
    and a broadcast flag carry ``x``'s sharding (`sharded_like`): on
    meshes with Explicit axes a select needs operands of one sharding.
    """
    if keep is None:
        return x
    if jnp.ndim(keep):
        keep = sharded_like(x, jnp.broadcast_to(keep, x.shape))
    return jax.lax.select(keep, x, full_like(x, 0))


def zero_tree(keep: jax.Array | None, tree: Any) -> Any:
    """`zero_unless` on every float leaf of ``tree``."""
    if keep is None:
        return tree
    return map_float(lambda _, x: zero_unless(keep, x), tree)
