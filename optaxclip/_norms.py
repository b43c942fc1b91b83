"""Measuring gradients: global, per-tensor, per-unit and per-example norms.

Everything in optaxclip measures through this module, so the numerical
contract lives in one place:

* sums accumulate in float32, or float64 for float64 leaves under
  ``jax_enable_x64``, whatever the leaf dtype (a float16 leaf of values near 300
  does not overflow, one near 1e-4 does not underflow);
* if a float32 sum of powers overflows although every entry is finite, the
  norm is recomputed rescaled by the largest entry (this costs extra passes
  only on that step);
* complex leaves use ``|z|``; integer leaves, ``None`` and ``optax.MaskedNode``
  are not measured;
* roots have a zero-safe derivative: ``jax.grad`` through the norm of a zero
  tree is zero, not NaN;
* ``axis_name`` sums (or maxes, for ``ord=inf``) the partial results across a
  ``shard_map`` / ``pmap`` mesh axis, counting replicated leaves once when a
  tree of ``PartitionSpec`` says which leaves are split.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

__all__ = ["global_norm", "unitwise_norm"]

AxisName = str | tuple[str, ...] | None
_INF = float("inf")


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------


def global_norm(
    tree: Any,
    ord: int | float | str = 2,  # noqa: A002  (numpy/torch name)
    axis_name: AxisName = None,
    *,
    partition_specs: Any = None,
) -> jax.Array:
    """Returns the ``ord``-norm of all floating-point entries of a pytree.

    The norm is accumulated in float32 (float64 for float64 leaves under
    ``jax_enable_x64``), so float16/bfloat16 trees neither overflow nor
    underflow, and a float32 sum that overflows although every entry is finite
    is recomputed with rescaling. Integer leaves, ``None`` and
    ``optax.MaskedNode`` are ignored; complex entries count as ``|z|``.

    Args:
      tree: a pytree of arrays.
      ord: ``1``, ``2``, ``inf`` (or ``"inf"``), or any ``p > 0``; the norm is
        ``(sum |x|^p)^(1/p)`` over every entry of every leaf, which equals the
        ``p``-norm of the per-leaf ``p``-norms, as in
        ``torch.nn.utils.clip_grad_norm_(norm_type=p)``.
      axis_name: inside ``shard_map`` / ``pmap``, the mesh axis (or axes) over
        which leaves are split; partial sums are ``psum``-ed (``pmax`` for
        ``inf``) so the result is the norm of the whole, unsplit tree.
      partition_specs: optional keyword-only pytree (a prefix of ``tree``) of
        ``jax.sharding.PartitionSpec``; a leaf is reduced across the axes of
        ``axis_name`` that its spec names, so a replicated leaf
        (``PartitionSpec()``) is counted once. Without it every leaf is taken
        as split across ``axis_name``.

    Returns:
      A scalar in the accumulation dtype (float32, or float64 under x64).

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> tree = {"w": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
      >>> print(oc.global_norm(tree))
      5.0
      >>> print(oc.global_norm(tree, ord=1), oc.global_norm(tree, ord="inf"))
      7.0 4.0
      >>> print(oc.global_norm({"h": jnp.full((4,), 300.0, jnp.float16)}))
      600.0

    References:
      Pascanu et al., `On the difficulty of training Recurrent Neural Networks
      <https://arxiv.org/abs/1211.5063>`_, 2013.
    """
    p = check_ord(ord)
    leaves = float_leaves(tree)
    groups = reduction_groups(tree, leaves, axis_name, partition_specs)
    return measure_total(leaves, p, groups)


def unitwise_norm(
    x: jax.typing.ArrayLike, axis: int | tuple[int, ...] | None = None
) -> jax.Array:
    """Returns the L2 norm of each unit of ``x``, broadcast to ``x.shape``.

    Same conventions as ``optax.unitwise_norm`` (used by AGC): with
    ``axis=None``, scalars and vectors form one unit; rank-2 and rank-3
    arrays reduce axis 0 (a dense kernel ``(in, out)`` has one unit per output);
    rank-4 reduces ``(0, 1, 2)`` (HWIO convolutions) and rank-5 ``(0, 1, 2,
    3)``. The sum is accumulated in float32 or better and the result is
    returned in the accumulation dtype.

    Args:
      x: an array.
      axis: the axis or axes to reduce, overriding the rank-based default.

    Returns:
      An array of ``x.shape`` holding each entry's unit norm.

    Raises:
      ValueError: if ``axis`` is None and ``x`` has rank above 5.

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> print(oc.unitwise_norm(jnp.array([[3.0, 1.0], [4.0, 0.0]])))
      [[5. 1.]
       [5. 1.]]

    References:
      Brock et al., `High-Performance Large-Scale Image Recognition Without
      Normalization <https://arxiv.org/abs/2102.06171>`_, 2021.
    """
    x = jnp.asarray(x)
    axes = unit_axes(x, axis)
    total = power_sum(x, 2.0, axes, keepdims=True)
    return jnp.broadcast_to(safe_root(total, 2.0), x.shape)


# ---------------------------------------------------------------------------
# Leaves, dtypes and ord
# ---------------------------------------------------------------------------


def is_float(x: Any) -> bool:
    """Whether a leaf is measured and clipped (floating or complex)."""
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def float_leaves(tree: Any) -> list[jax.Array]:
    """The floating-point leaves of ``tree``, in flattening order."""
    return [x for x in jax.tree.leaves(tree) if is_float(x)]


def acc_dtype(dtype: Any) -> jnp.dtype:
    """The dtype norms of ``dtype`` entries are accumulated in."""
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128)):
        # float64 when x64 is enabled (also inside `jax.enable_x64()`).
        return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))
    return jnp.dtype(jnp.float32)


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype entries are scaled in: the accumulation dtype, complex kept."""
    acc = acc_dtype(dtype)
    if jnp.issubdtype(jnp.dtype(dtype), jnp.complexfloating):
        return jnp.dtype(jnp.complex128 if acc == jnp.float64 else jnp.complex64)
    return acc


def tree_acc_dtype(tree: Any) -> jnp.dtype:
    """float64 if any leaf accumulates in float64, else float32."""
    dtypes = {acc_dtype(x.dtype) for x in float_leaves(tree)}
    f64 = jnp.dtype(jnp.float64)
    return f64 if f64 in dtypes else jnp.dtype(jnp.float32)


def check_ord(ord: Any, name: str = "ord") -> float | jax.Array:
    """Validates ``ord`` and returns it as a float (``inf`` for infinity).

    A traced value (as ``optax.inject_hyperparams`` passes) is returned as
    is and dispatched at run time.
    """
    if isinstance(ord, str):
        if ord.lower() in ("inf", "infinity"):
            return _INF
        raise ValueError(f"`{name}` must be a number > 0 or 'inf'; got {ord!r}.")
    if isinstance(ord, jax.core.Tracer):
        return ord
    try:
        value = float(np.asarray(ord))
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a number > 0 or 'inf'; got {ord!r}."
        ) from None
    if not value > 0:  # also catches NaN
        raise ValueError(f"`{name}` must be > 0 (1, 2, inf or any p > 0); got {ord!r}.")
    return value


# ---------------------------------------------------------------------------
# Per-leaf reductions
# ---------------------------------------------------------------------------


def power_sum(
    x: jax.Array,
    p: float | jax.Array,
    axes: tuple[int, ...] | None = None,
    keepdims: bool = False,
    divisor: jax.Array | None = None,
) -> jax.Array:
    """``sum |x / divisor|^p`` over ``axes`` (``max |x|`` for ``p = inf``).

    Accumulates in :func:`acc_dtype`; the cast fuses into the reduction, so
    no converted copy of ``x`` is materialized.
    """
    acc = acc_dtype(x.dtype)
    if jnp.iscomplexobj(x):
        sq = jnp.square(x.real.astype(acc)) + jnp.square(x.imag.astype(acc))
        if divisor is not None:
            sq = sq / jnp.square(divisor)
        return _reduce_from_square(sq, p, axes, keepdims)
    a = x.astype(acc)
    if divisor is not None:
        a = a / divisor
    if isinstance(p, float):
        if p == 2.0:
            return jnp.sum(a * a, axis=axes, keepdims=keepdims)
        if p == _INF:
            return jnp.max(jnp.abs(a), axis=axes, keepdims=keepdims, initial=0.0)
        if p == 1.0:
            return jnp.sum(jnp.abs(a), axis=axes, keepdims=keepdims)
    return jnp.sum(jnp.abs(a) ** p, axis=axes, keepdims=keepdims)


def _reduce_from_square(sq, p, axes, keepdims):
    if isinstance(p, float) and p == 2.0:
        return jnp.sum(sq, axis=axes, keepdims=keepdims)
    if isinstance(p, float) and p == _INF:
        return jnp.sqrt(jnp.max(sq, axis=axes, keepdims=keepdims, initial=0.0))
    return jnp.sum(sq ** (p / 2), axis=axes, keepdims=keepdims)


def safe_root(total: jax.Array, p: float | jax.Array) -> jax.Array:
    """``total ** (1/p)`` with a zero-safe derivative (identity for ``inf``)."""
    if isinstance(p, float) and p == _INF:
        return total
    if isinstance(p, float) and p == 1.0:
        return total
    # NaN must propagate (it marks a non-finite step), so test for zero only.
    zero = total == 0
    safe = jnp.where(zero, jnp.ones_like(total), total)
    root = jnp.sqrt(safe) if (isinstance(p, float) and p == 2.0) else safe ** (1 / p)
    return jnp.where(zero, jnp.zeros_like(total), root)


def unit_axes(x: jax.Array, axis: int | tuple[int, ...] | None) -> tuple[int, ...]:
    """Reduction axes of a unit, with ``optax.unitwise_norm``'s defaults."""
    if axis is not None:
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        return tuple(a % max(x.ndim, 1) for a in axes)
    if np.squeeze(np.empty(x.shape, dtype=bool)).ndim <= 1:
        return tuple(range(x.ndim))
    if x.ndim in (2, 3):
        return (0,)
    if x.ndim == 4:
        return (0, 1, 2)
    if x.ndim == 5:
        return (0, 1, 2, 3)
    raise ValueError(
        f"unitwise_norm: cannot infer unit axes for an array of shape {x.shape}; "
        "pass `axis` to say which axes form a unit."
    )


# ---------------------------------------------------------------------------
# Reduction groups: which mesh axes each leaf is psum-ed over
# ---------------------------------------------------------------------------


def _axis_names(axis_name: AxisName) -> tuple[str, ...]:
    if axis_name is None:
        return ()
    if isinstance(axis_name, str):
        return (axis_name,)
    return tuple(axis_name)


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
    names = _axis_names(axis_name)
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
            entry_names = _axis_names(entry)
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
    if isinstance(p, float) and p == _INF:
        return jax.lax.pmax(value, names)
    return jax.lax.psum(value, names)


# ---------------------------------------------------------------------------
# Totals: one pass, robust to float32 overflow, traced ord dispatch
# ---------------------------------------------------------------------------


def measure_total(
    leaves: Sequence[jax.Array],
    p: float | jax.Array,
    groups: Sequence[tuple[str, ...]],
) -> jax.Array:
    """The ``p``-norm of all ``leaves`` together, as a scalar."""
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return dispatch_ord(p, functools.partial(_measure_total, leaves, groups=groups))


def dispatch_ord(p: float | jax.Array, fn: Callable[[float | jax.Array], Any]):
    """Calls ``fn(p)`` with a static ``p``, or switches on a traced ``p``."""
    if isinstance(p, float):
        return fn(p)
    p = jnp.asarray(p, jnp.float32)
    index = jnp.select([p == 2.0, p == 1.0, jnp.isinf(p)], [0, 1, 2], 3)
    branches = [lambda _: fn(2.0), lambda _: fn(1.0), lambda _: fn(_INF), fn]
    return jax.lax.switch(index, branches, p)


def _measure_total(leaves, p, groups):
    acc = jnp.result_type(*[acc_dtype(x.dtype) for x in leaves])

    def combine(per_leaf):
        # Stacking the per-leaf partial sums behind an optimization barrier
        # keeps XLA from fusing every leaf's reduction into one giant
        # reduction, whose compile time grows super-linearly with the leaves.
        out = None
        for names in dict.fromkeys(groups):
            values = [
                v.astype(acc)
                for v, g in zip(per_leaf, groups, strict=True)
                if g == names
            ]
            part = _reduce_vector(stack_barrier(values), p)
            part = cross_device(part, names, p)
            out = part if out is None else _join(out, part, p)
        return out

    total = combine([power_sum(x, p) for x in leaves])
    if isinstance(p, float) and p == _INF:
        return total
    norm = safe_root(total, p)

    def rescaled(_):
        largest = combine([power_sum(x, _INF) for x in leaves])
        safe = jnp.where(largest > 0, largest, jnp.ones_like(largest))
        scaled = combine([power_sum(x, p, divisor=safe) for x in leaves])
        return jnp.where(jnp.isfinite(largest), safe * safe_root(scaled, p), largest)

    return jax.lax.cond(jnp.isposinf(total), rescaled, lambda _: norm, None)


def stack_barrier(values: Sequence[jax.Array], concat: bool = False) -> jax.Array:
    """Stacks (or concatenates) small per-leaf results into one vector.

    The optimization barrier stops XLA from fusing the consumers of the
    vector back into every leaf's reduction, which makes compile time grow
    much faster than the number of leaves.
    """
    joined = jnp.concatenate(values) if concat else jnp.stack(values)
    return jax.lax.optimization_barrier(joined)


def _reduce_vector(vector: jax.Array, p: float | jax.Array) -> jax.Array:
    if isinstance(p, float) and p == _INF:
        return jnp.max(vector, initial=0.0)
    return jnp.sum(vector)


def _join(a: jax.Array, b: jax.Array, p: float | jax.Array) -> jax.Array:
    if isinstance(p, float) and p == _INF:
        return jnp.maximum(a, b)
    return a + b


def segment_norms(
    leaves: Sequence[jax.Array],
    p: float | jax.Array,
    keep_axes: Sequence[tuple[int, ...]],
    groups: Sequence[tuple[str, ...]],
    normalize: bool = False,
    pieces: bool = False,
) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
    """One norm per segment, concatenated into a vector.

    Leaf ``i`` is reduced over every axis except ``keep_axes[i]`` (leading
    axes: stacked layers or a batch), giving ``prod(shape[keep])`` segments.
    With ``normalize`` the power sum is divided by the segment size first
    (an RMS for ``p = 2``).

    With ``pieces`` also returns each leaf's norms on their own, shaped to
    broadcast against the leaf (the same values as the vector's entries).
    Scaling a leaf by its own piece, rather than by a slice of the vector,
    keeps the per-leaf kernels of equally shaped leaves identical, so XLA
    compiles one kernel for all of them instead of one per leaf.
    """
    if not leaves:
        empty = jnp.zeros((0,), jnp.float32)
        return (empty, []) if pieces else empty
    vector, per_leaf = dispatch_ord(
        p,
        functools.partial(
            _segment_norms,
            leaves,
            keep_axes=keep_axes,
            groups=groups,
            normalize=normalize,
        ),
    )
    return (vector, per_leaf) if pieces else vector


def _segment_norms(leaves, p, keep_axes, groups, normalize):
    acc = jnp.result_type(*[acc_dtype(x.dtype) for x in leaves])
    counts = [segment_count(x, keep) for x, keep in zip(leaves, keep_axes, strict=True)]
    offsets = np.cumsum([0, *counts])
    # Inside shard_map a leaf holds only its shard: the segment size is the
    # local size times the number of devices the reduced dims are split over.
    split = [math.prod(jax.lax.axis_size(n) for n in g) for g in groups]
    leaf_sizes = [
        x.size // max(c, 1) * s for x, c, s in zip(leaves, counts, split, strict=True)
    ]
    sizes = np.repeat(leaf_sizes, counts)

    # Without cross-device sums each leaf's piece is its own reduction; with
    # them, pieces are read back from the combined vector.
    local = all(not g for g in groups)

    def totals(q, divisors=None):
        parts = []
        for i, x in enumerate(leaves):
            axes = tuple(a for a in range(x.ndim) if a not in keep_axes[i])
            div = None if divisors is None else divisors[i]
            parts.append(power_sum(x, q, axes, keepdims=True, divisor=div).astype(acc))
        vector = stack_barrier([part.reshape(-1) for part in parts], concat=True)
        vector = _cross_device_vector(vector, counts, groups, q)
        mean = normalize and not (isinstance(q, float) and q == _INF)
        if mean:
            vector = vector / jnp.asarray(np.maximum(sizes, 1), acc)
        if local:
            if mean:
                parts = [
                    part / jnp.asarray(max(int(leaf_sizes[i]), 1), acc)
                    for i, part in enumerate(parts)
                ]
            return vector, parts
        return vector, [
            segment_view(vector[offsets[i] : offsets[i + 1]], x, keep_axes[i])
            for i, x in enumerate(leaves)
        ]

    total, total_parts = totals(p)
    if isinstance(p, float) and p == _INF:
        return total, total_parts
    norms = safe_root(total, p)
    norm_parts = [safe_root(t, p) for t in total_parts]

    def rescaled(_):
        def rescale(largest, scaled):
            return jnp.where(jnp.isfinite(largest), scaled, largest)

        largest, largest_parts = totals(_INF)
        safe = [
            jnp.where(m > 0, m, jnp.ones_like(m)) for m in [largest, *largest_parts]
        ]
        scaled, scaled_parts = totals(p, safe[1:])
        vector = rescale(largest, safe[0] * safe_root(scaled, p))
        parts = [
            rescale(m, d * safe_root(t, p))
            for m, d, t in zip(largest_parts, safe[1:], scaled_parts, strict=True)
        ]
        return vector, parts

    return jax.lax.cond(
        jnp.any(jnp.isposinf(total)), rescaled, lambda _: (norms, norm_parts), None
    )


def segment_count(x: jax.Array, keep: tuple[int, ...]) -> int:
    """Number of segments leaf ``x`` contributes when keeping axes ``keep``."""
    return int(math.prod(x.shape[a] for a in keep))


def segment_view(values: jax.Array, x: jax.Array, keep: tuple[int, ...]) -> jax.Array:
    """Reshapes one leaf's slice of a segment vector to broadcast against it."""
    shape = [x.shape[a] if a in keep else 1 for a in range(x.ndim)]
    return values.reshape(shape)


def _cross_device_vector(vector, counts, groups, p):
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
        out = piece if out is None else _join(out, piece, p)
    return out
