"""Measuring gradients: global, per-tensor, per-unit and per-example norms.

Everything in optaxclip measures through this module, so the numerical
contract lives in one place:

* sums accumulate in float32, or float64 for float64 leaves under
  ``jax_enable_x64``, whatever the leaf dtype (a float16 leaf of values near 300
  does not overflow, one near 1e-4 does not underflow);
* measuring reads each leaf once, with no control flow over the tree; a
  global 2-norm whose float32 sum of squares overflows is still exact (the
  per-leaf sums are combined rescaled), but one tensor (or segment) whose own
  2-norm exceeds ``2**64`` (about 1.8e19) reads as ``inf``: a non-finite step.
  For ``p`` other than 1, 2 and ``inf``, where ``|x|**p`` overflows for
  moderate entries (above ~7e3 for ``p = 10``), an overflowing sum is
  re-measured rescaled by the largest entry (extra passes only on that step);
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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from . import _checks

__all__ = ["global_norm", "unitwise_norm"]

AxisName = str | tuple[str, ...] | None
_INF = float("inf")
INF = _INF


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
    underflow; a global 2-norm whose float32 sum of squares overflows is
    still exact (one tensor whose own 2-norm exceeds ``2**64`` reads as
    ``inf``). Integer leaves, ``None`` and
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
      Pascanu et al., [On the difficulty of training Recurrent Neural
      Networks](https://arxiv.org/abs/1211.5063), 2013.
    """
    p = check_ord(ord)
    leaves = float_leaves(tree)
    groups = reduction_groups(tree, leaves, axis_name, partition_specs)
    return measure_total(leaves, p, groups)


def tree_norms(
    tree: Any, ord: float | jax.Array, axis_name: AxisName, partition_specs: Any
) -> tuple[jax.Array, jax.Array]:
    """The whole tree's ``ord``-norm and each float leaf's, in one read.

    Like [`global_norm`][optaxclip.global_norm] (``ord`` already checked),
    also returning the vector of per-leaf norms the total is built from;
    both in the tree's accumulation dtype.
    """
    leaves = float_leaves(tree)
    groups = reduction_groups(tree, leaves, axis_name, partition_specs)
    total, per_leaf = measure_leaves(leaves, ord, groups)
    acc = tree_acc_dtype(tree)
    return total.astype(acc), per_leaf.astype(acc)


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
      Brock et al., [High-Performance Large-Scale Image Recognition Without
      Normalization](https://arxiv.org/abs/2102.06171), 2021.
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


def per_tensor_like(tree: Any) -> jax.Array:
    """A zero vector with one entry per float leaf of ``tree`` (its norms)."""
    return jnp.zeros((len(float_leaves(tree)),), tree_acc_dtype(tree))


def matching_float_leaves(updates: Any, params: Any) -> list[jax.Array]:
    """The leaves of ``params`` at the float leaves of ``updates``, in order."""
    flat = jax.tree.structure(updates).flatten_up_to(params)
    return [
        w for u, w in zip(jax.tree.leaves(updates), flat, strict=True) if is_float(u)
    ]


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
    if _checks.is_traced(ord):
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

    Accumulates in `acc_dtype`; the cast fuses into the reduction, so
    no converted copy of ``x`` is materialized. Written with ``lax``
    primitives: this runs once per leaf, and every traced op counts when a
    model has thousands of leaves.
    """
    acc = acc_dtype(x.dtype)
    axes = tuple(range(x.ndim)) if axes is None else tuple(axes)
    kept = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
    if x.size == 0:
        shape = (
            kept
            if keepdims
            else tuple(d for a, d in enumerate(x.shape) if a not in axes)
        )
        return jnp.zeros(shape, acc)
    if jnp.iscomplexobj(x):
        sq = jnp.square(x.real.astype(acc)) + jnp.square(x.imag.astype(acc))
        if divisor is not None:
            sq = sq / jnp.square(divisor)
        return _reduce_from_square(sq, p, axes, keepdims)
    a = x if x.dtype == acc else jax.lax.convert_element_type(x, acc)
    if divisor is not None:
        a = a / divisor
    if _is_static(p, 2.0):
        out = jax.lax.reduce_sum(jax.lax.mul(a, a), axes)
    elif _is_static(p, _INF):
        out = jax.lax.reduce_max(nan_to_inf(jax.lax.abs(a)), axes)
    elif _is_static(p, 1.0):
        out = jax.lax.reduce_sum(jax.lax.abs(a), axes)
    else:
        out = jax.lax.reduce_sum(jnp.abs(a) ** p, axes)
    return jax.lax.reshape(out, kept) if keepdims else out


def nan_to_inf(x: jax.Array) -> jax.Array:
    """``x`` with NaN entries read as ``+inf``, for a maximum to see them.

    A maximum split across devices (a sharded ``jnp.max`` under ``jit``, a
    ``pmax``) may drop a NaN: the collective's max does not propagate it.
    An infinite entry survives every maximum, and still marks the step
    non-finite. Elementwise before the reduction, so it fuses into it.
    """
    return jnp.where(jnp.isnan(x), full_like(x, jnp.inf), x)


def _reduce_from_square(sq, p, axes, keepdims):
    if isinstance(p, float) and p == 2.0:
        return jnp.sum(sq, axis=axes, keepdims=keepdims)
    if isinstance(p, float) and p == _INF:
        top = jnp.max(nan_to_inf(sq), axis=axes, keepdims=keepdims, initial=0.0)
        return _sqrt(top)
    # |z|**p from |z|**2 where it is positive (0 elsewhere, the same value):
    # the derivative of sq**(p/2) at 0 is infinite for p < 2, and NaN once
    # multiplied by a zero tangent.
    positive = sq > 0
    safe = jnp.where(positive, sq, full_like(sq, 1))
    terms = jnp.where(positive, safe ** (p / 2), full_like(sq, 0))
    return jnp.sum(terms, axis=axes, keepdims=keepdims)


def safe_root(total: jax.Array, p: float | jax.Array) -> jax.Array:
    """``total ** (1/p)`` with a zero-safe derivative (identity for ``inf``).

    NaN and ``inf`` pass through (they mark a non-finite step); at zero the
    derivative is 0, not NaN. The root is the last op (its derivative is
    defined separately), so XLA fuses it into the reduction that feeds it.
    """
    if _is_static(p, _INF, 1.0):
        return total
    if _is_static(p, 2.0):
        return _sqrt(total)
    zero = jax.lax.convert_element_type(total == 0, total.dtype)
    base = total + zero
    return base ** (1 / p) * (1 - zero)


@jax.custom_jvp
def _sqrt(x: jax.Array) -> jax.Array:
    return jax.lax.sqrt(x)


@_sqrt.defjvp
def _sqrt_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    root = jax.lax.sqrt(x)
    positive = x > 0
    safe = jnp.where(positive, root, full_like(root, 1))
    return root, jnp.where(positive, t / (2 * safe), full_like(t, 0))


def piece_scale(
    piece: jax.Array,
    bound: jax.Array,
    squared: bool,
    keep: jax.Array | None = None,
) -> jax.Array:
    """``min(1, bound / norm)`` from one leaf's own measurement.

    ``piece`` is the leaf's norm, or with ``squared`` its sum of squares
    (the root is then taken of that small array only). A norm at or under
    the bound gives exactly 1 (also a zero norm with a zero bound), an infinite
    norm 0 and a NaN norm NaN. The division only ever sees a norm above the
    bound, so the derivative is finite everywhere, also at zero. With the
    scalar flag ``keep`` given, the scale is 0 where it is False.

    The result is one division (``1 / 1`` where nothing is clipped): XLA
    does not fuse a division into the per-entry loops that read the scale,
    so it is computed once, where a select at the root would be evaluated
    again for every entry.
    """
    # Every operand is derived from ``piece`` (`full_like`, arithmetic), so
    # all of them carry its sharding, as a select on an Explicit mesh needs.
    bound = jnp.asarray(bound).astype(piece.dtype)
    if bound.ndim > piece.ndim:
        piece = piece + full_like(bound, 0)
    over = ~(piece <= (bound * bound if squared else bound))
    one = full_like(piece, 1)
    otherwise = one
    if keep is not None:
        over = over & keep
        otherwise = jax.lax.select(keep, one, full_like(one, 0))
    num = jax.lax.select(over, one * bound, otherwise)
    den = jax.lax.select(over, piece, one)
    return num / (jax.lax.sqrt(den) if squared else den)


def unit_axes(
    x: jax.Array | jax.ShapeDtypeStruct, axis: int | tuple[int, ...] | None
) -> tuple[int, ...]:
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


def axis_names(axis_name: AxisName) -> tuple[str, ...]:
    """``axis_name`` as a tuple of mesh axis names (empty for None)."""
    return _axis_names(axis_name)


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


def count_entries(
    counts: Sequence[jax.Array], tree: Any, axis_name: AxisName, partition_specs: Any
) -> jax.Array:
    """The total of per-leaf int32 counts of entries, across the mesh.

    ``counts[i]`` counts entries of float leaf ``i`` of ``tree`` on this
    device; a split leaf's counts are summed over the axes it is split
    across, a replicated leaf's counted once.
    """
    if not counts:
        return jnp.zeros((), jnp.int32)
    vector = stack_barrier(list(counts))
    if axis_name is None:
        return jnp.sum(vector)
    groups = reduction_groups(tree, float_leaves(tree), axis_name, partition_specs)
    return jnp.sum(_cross_device_vector(vector, [1] * len(counts), groups, 2.0))


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

# Explicit sharding (typeof, reshard) is absent from the oldest supported JAX.
_typeof = getattr(jax, "typeof", lambda x: None)
_reshard = getattr(jax.sharding, "reshard", lambda x, sharding: x)
_EXPLICIT = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)

# A float32 sum of squares that overflows is at least 2**128; scaled by 2**-64
# it is at least 2**64, so the entries the scaling flushes to zero (below
# 2**-85 each) cannot change it. Its square root is rescaled by 2**32.
_SHIFT = 2.0**-64
_UNSHIFT_ROOT = 2.0**32


def is_static(p: Any, *values: float) -> bool:
    """Whether the order ``p`` is a Python float among ``values``."""
    return isinstance(p, float) and p in values


_is_static = is_static


def measure_total(
    leaves: Sequence[jax.Array],
    p: float | jax.Array,
    groups: Sequence[tuple[str, ...]],
) -> jax.Array:
    """The ``p``-norm of all ``leaves`` together, as a scalar."""
    return measure_leaves(leaves, p, groups)[0]


def measure_leaves(
    leaves: Sequence[jax.Array],
    p: float | jax.Array,
    groups: Sequence[tuple[str, ...]],
) -> tuple[jax.Array, jax.Array]:
    """The ``p``-norm of all ``leaves`` together, and each leaf's own ``p``-norm.

    Both come from the same per-leaf reductions (one read of each leaf):
    the per-leaf norms are the partial results the total is built from, so
    a caller that does not use them costs nothing more. A leaf's norm is
    NaN or infinite exactly when the leaf holds a NaN or infinite entry (or,
    for ``p = 2``, when its own 2-norm exceeds ``2**64``).

    Returns:
      ``(total, per_leaf)``: a scalar, and a vector with one entry per leaf
      in order, both in the accumulation dtype.
    """
    if not leaves:
        return jnp.zeros((), jnp.float32), jnp.zeros((0,), jnp.float32)
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
    if not _is_static(p, 1.0, 2.0, _INF):
        # Any other p: |x|**p overflows float32 for moderate entries (7e3 for
        # p = 10), so each leaf's norm is measured overflow-safe, then the
        # per-leaf norms are combined.
        norms, _ = _segment_norms(
            leaves, p, [()] * len(leaves), groups, normalize=False, parts=None
        )
        return _norm_of_norms(norms, p), norms

    # One reduction per leaf, nothing else reads the leaves: no control flow
    # over the tree, so the step stays one pass to measure and one to scale.
    # The per-leaf sums are stacked behind an optimization barrier: XLA would
    # otherwise fuse every leaf's reduction into one giant reduction, whose
    # compile time grows super-linearly with the number of leaves.
    sums = [power_sum(x, p).astype(acc) for x in leaves]
    if p == 2.0 and len(sums) == 1 and groups == [()]:
        # One local sum cannot overflow where its own terms did not: it is
        # inf exactly when the tensor's norm is beyond 2**64 (a non-finite
        # step). The root then fuses into the reduction's kernel.
        total = safe_root(sums[0], 2.0)
        return total, jnp.reshape(total, (1,))
    out = None
    per_group, order = [], []
    for names in dict.fromkeys(groups):
        members = [i for i, g in enumerate(groups) if g == names]
        vector = stack_barrier([sums[i] for i in members])
        # Each leaf's own sum, whole across the mesh (only read when a
        # caller records per-tensor norms or non-finite tensors).
        per_group.append(cross_device(vector, names, p))
        order.extend(members)
        if p == _INF:
            part = jnp.max(vector, initial=0.0)
        elif p == 1.0:
            # An L1 sum above float32's range is a norm above it: inf is exact.
            part = jnp.sum(vector)
        else:
            # The plain sum and a scaled copy, combined across devices in
            # one collective; the scaled sum is used only if the plain one
            # overflows although every leaf's own sum is finite.
            part = jnp.stack([jnp.sum(vector), jnp.sum(vector * _SHIFT)])
        part = cross_device(part, names, p)
        out = part if out is None else _join(out, part, p)
    assert out is not None  # there is at least one leaf, so one group
    per_leaf = per_group[0] if len(per_group) == 1 else jnp.concatenate(per_group)
    if order != sorted(order):
        per_leaf = per_leaf[np.argsort(order)]
    per_leaf = safe_root(per_leaf, p)
    if p != 2.0:
        return out, per_leaf
    total, scaled = out[0], out[1]
    # One root of whichever sum is finite: a single expensive op, which XLA
    # fuses into the reduction rather than giving it a kernel of its own.
    overflow = jnp.isposinf(total)
    chosen = jnp.where(overflow, scaled, total)
    factor = jnp.where(overflow, _UNSHIFT_ROOT, 1.0).astype(chosen.dtype)
    return safe_root(chosen, 2.0) * factor, per_leaf


def norm_of_norms(norms: jax.Array, p: float | jax.Array) -> jax.Array:
    """The ``p``-norm of a vector of ``p``-norms: the norm of their union."""
    if _is_static(p, _INF):
        return jnp.max(norms, initial=0.0)
    if _is_static(p, 1.0):
        return jnp.sum(norms)
    if _is_static(p, 2.0):
        return safe_root(jnp.sum(norms * norms), 2.0)
    return _norm_of_norms(norms, p)


def _norm_of_norms(norms: jax.Array, p: float | jax.Array) -> jax.Array:
    """``(sum norms**p)**(1/p)``, scaled by the largest so it cannot overflow."""
    largest = jnp.max(norms, initial=0.0)
    safe = jnp.where(largest > 0, largest, jnp.ones_like(largest))
    total = jnp.sum((norms / safe) ** p)
    return jnp.where(jnp.isfinite(largest), safe * safe_root(total, p), largest)


def stack_barrier(values: Sequence[jax.Array], concat: bool = False) -> jax.Array:
    """Stacks (or concatenates) small per-leaf results into one vector.

    The optimization barrier stops XLA from fusing the consumers of the
    vector back into every leaf's reduction, which makes compile time grow
    much faster than the number of leaves.
    """
    if concat:
        # Segment norms keep the sharding of the dims they do not reduce
        # (stacked layers split over a mesh axis); the joined vector is
        # replicated, as the state that records it is.
        joined = jnp.concatenate([replicated(v) for v in values])
    else:
        joined = jnp.stack(values)
    return jax.lax.optimization_barrier(joined)


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


def _join(a: jax.Array, b: jax.Array, p: float | jax.Array) -> jax.Array:
    if isinstance(p, float) and p == _INF:
        return jnp.maximum(a, b)
    return a + b


class Segments(NamedTuple):
    """Segment norms, with each leaf's own norms for scaling it.

    Attributes:
      norms: one norm per segment, concatenated into a vector.
      pieces: per leaf, its segments' norms shaped to broadcast against it.
    """

    norms: jax.Array
    pieces: tuple[jax.Array, ...]


def segment_norms(
    leaves: Sequence[jax.Array],
    p: float | jax.Array,
    keep_axes: Sequence[tuple[int, ...]],
    groups: Sequence[tuple[str, ...]],
    normalize: bool = False,
) -> jax.Array:
    """One norm per segment, concatenated into a vector.

    Leaf ``i`` is reduced over every axis except ``keep_axes[i]`` (leading
    axes: stacked layers or a batch), giving ``prod(shape[keep])`` segments.
    With ``normalize`` the power sum is divided by the segment size first
    (an RMS for ``p = 2``).
    """
    return _segments(leaves, p, keep_axes, groups, normalize, None).norms


def segment_pieces(
    leaves: Sequence[jax.Array],
    p: float | jax.Array,
    keep_axes: Sequence[tuple[int, ...]],
    groups: Sequence[tuple[str, ...]],
    normalize: bool = False,
) -> Segments:
    """`segment_norms`, with each leaf's own piece (a `Segments`).

    Scaling a leaf by its own piece, rather than by a slice of the vector,
    keeps the per-leaf kernels of equally shaped leaves identical, so XLA
    compiles one kernel for all of them instead of one per leaf.
    """
    return _segments(leaves, p, keep_axes, groups, normalize, "norms")


def _segments(leaves, p, keep_axes, groups, normalize, parts) -> Segments:
    if not leaves:
        return Segments(jnp.zeros((0,), jnp.float32), ())
    vector, pieces = dispatch_ord(
        p,
        functools.partial(
            _segment_norms,
            leaves,
            keep_axes=keep_axes,
            groups=groups,
            normalize=normalize,
            parts=parts,
        ),
    )
    return Segments(vector, tuple(pieces))


def _segment_norms(leaves, p, keep_axes, groups, normalize, parts):
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
        own = []
        for i, x in enumerate(leaves):
            axes = tuple(a for a in range(x.ndim) if a not in keep_axes[i])
            div = None if divisors is None else divisors[i]
            part = power_sum(x, q, axes, keepdims=True, divisor=div)
            own.append(part if part.dtype == acc else part.astype(acc))
        vector = stack_barrier(
            [jax.lax.reshape(part, (part.size,)) for part in own], concat=True
        )
        vector = _cross_device_vector(vector, counts, groups, q)
        mean = normalize and not _is_static(q, _INF)
        if mean:
            vector = vector / jnp.asarray(np.maximum(sizes, 1), acc)
        if parts is None:
            return vector, []
        if local:
            if mean:
                own = [
                    part * (1.0 / max(int(leaf_sizes[i]), 1))
                    for i, part in enumerate(own)
                ]
            return vector, own
        return vector, [
            segment_view(vector[offsets[i] : offsets[i + 1]], x, keep_axes[i])
            for i, x in enumerate(leaves)
        ]

    total, total_parts = totals(p)
    if _is_static(p, _INF):
        return total, total_parts
    norms = safe_root(total, p)
    norm_parts = [safe_root(t, p) for t in total_parts]
    if local and norm_parts and _is_static(p, 1.0, 2.0):
        # The vector is built from the leaves' own norms: each root then
        # fuses into its leaf's reduction, which nothing else reads.
        norms = stack_barrier(
            [jax.lax.reshape(q, (q.size,)) for q in norm_parts], concat=True
        )
    if _is_static(p, 1.0, 2.0):
        # A float32 sum of squares (or of moduli) overflows only for a
        # segment whose norm is above 2**64 (for p = 1, above float32's
        # range): it reads as infinite, a non-finite step. No re-measuring
        # branch keeps the step free of control flow over the tree.
        return norms, norm_parts

    def rescaled(_):
        def rescale(largest, scaled):
            return jnp.where(jnp.isfinite(largest), scaled, largest)

        largest, largest_parts = totals(_INF)
        if parts is None:
            largest_parts = [
                segment_view(largest[offsets[i] : offsets[i + 1]], x, keep_axes[i])
                for i, x in enumerate(leaves)
            ]
        safe = [
            jnp.where(m > 0, m, jnp.ones_like(m)) for m in [largest, *largest_parts]
        ]
        scaled, scaled_parts = totals(p, safe[1:])
        vector = rescale(largest, safe[0] * safe_root(scaled, p))
        if parts is None:
            return vector, []
        return vector, [
            rescale(m, d * safe_root(t, p))
            for m, d, t in zip(largest_parts, safe[1:], scaled_parts, strict=True)
        ]

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


def cross_device_vector(
    vector: jax.Array,
    counts: Sequence[int],
    groups: Sequence[tuple[str, ...]],
    p: float | jax.Array,
) -> jax.Array:
    """Combines a vector of per-leaf segments across the mesh axes of each leaf."""
    return _cross_device_vector(vector, counts, groups, p)


def leaf_scales(
    pieces: Sequence[jax.Array],
    bounds: jax.Array,
    squared: bool,
    counts: Sequence[int],
) -> list[jax.Array]:
    """Each leaf's `piece_scale`, for a vector of per-segment bounds.

    ``pieces`` are the leaves' own measurements (see `segment_norms`), leaf
    ``i`` holding ``counts[i]`` segments, and ``bounds`` has one entry per
    segment. The factors are computed as one vector, with the same
    arithmetic as `piece_scale` on each leaf, then split with
    `split_entries`: leaf ``i`` gets its ``counts[i]`` factors as a buffer
    of its own, which keeps the kernels that scale equally shaped leaves
    identical (compiled once).
    """
    if not pieces:
        return []
    joined = jnp.concatenate([replicated(p).reshape(-1) for p in pieces])
    return split_entries(piece_scale(joined, bounds, squared), counts)


def split_entries(vector: jax.Array, counts: Sequence[int]) -> list[jax.Array]:
    """Splits ``vector`` into consecutive pieces of ``counts[i]`` entries.

    The pieces are the slices ``vector[o_i : o_i + counts[i]]``, but each is
    produced as its own small buffer by a few multi-output reductions rather
    than read as a slice by whatever consumes it. XLA compiles a slice into
    its consumer, with the offset as a constant, so every consumer would be
    its own kernel: per-tensor bounds or factors read this way make each
    leaf's scaling (and every optimizer kernel fused with it) unique, and
    compile time grows by several kernels per leaf. Read from a buffer of
    its own, equally shaped leaves keep one shared kernel, as with a scalar
    threshold.

    The values are exact (each entry is the maximum of itself and ``-inf``),
    NaN and signed zeros included; the derivative is that of the slices.
    """
    counts = tuple(int(c) for c in counts)
    if not _checks.is_traced(vector):
        # Run op by op, nothing is compiled for the program: plain slices.
        offsets = np.cumsum([0, *counts])
        return [vector[offsets[i] : offsets[i + 1]] for i in range(len(counts))]
    return list(_split_entries(counts, vector))


# Pieces per multi-output reduction: one kernel's outputs, kept moderate
# because a kernel's compile time grows faster than its number of outputs.
_SPLIT_CHUNK = 64


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _split_entries(counts: tuple[int, ...], vector: jax.Array) -> tuple[jax.Array, ...]:
    offsets = np.cumsum([0, *counts])
    if len(counts) <= 1:
        return (vector,) if counts else ()
    low = jnp.full_like(vector, -_INF)
    padded = jnp.stack([vector, low], axis=-1)
    init = jnp.full((), -_INF, vector.dtype)
    out: list[Any] = [None] * len(counts)
    by_count: dict[int, list[int]] = {}
    for i, c in enumerate(counts):
        by_count.setdefault(c, []).append(i)
    for c, members in by_count.items():
        for start in range(0, len(members), _SPLIT_CHUNK):
            chunk = members[start : start + _SPLIT_CHUNK]
            operands = [
                jax.lax.slice_in_dim(padded, offsets[i], offsets[i] + c) for i in chunk
            ]
            pieces = jax.lax.reduce(
                operands,
                [init] * len(chunk),
                lambda a, b: [jax.lax.max(x, y) for x, y in zip(a, b, strict=True)],
                (padded.ndim - 1,),
            )
            for i, piece in zip(chunk, pieces, strict=True):
                out[i] = piece
    return tuple(out)


@_split_entries.defjvp
def _split_entries_jvp(counts, primals, tangents):
    (vector,), (tangent,) = primals, tangents
    offsets = np.cumsum([0, *counts])
    pieces = _split_entries(counts, vector)
    slices = tuple(
        jax.lax.slice_in_dim(tangent, offsets[i], offsets[i + 1])
        for i in range(len(counts))
    )
    return pieces, slices


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
    assert out is not None  # groups are not all empty here
    return out


# ---------------------------------------------------------------------------
# Spectral: singular values of batches of matrices (pure functions)
# ---------------------------------------------------------------------------
# Each takes a batch ``(B, m, n)`` in the accumulation dtype. Every matrix is
# first divided by its largest absolute entry ``f`` (`unit_matrices`), so no
# square overflows or underflows (a bfloat16 matrix of 1e30 entries is
# clipped, not zeroed) and the work is invariant to the gradient's scale.

NEWTON_SCHULZ_STEPS = 10  # SPECTRA's default (``--spectral_ns_steps``)
POWER_SQUARINGS = 6  # power iteration of 2**6 steps


def _adjoint(m: jax.Array) -> jax.Array:
    return jnp.swapaxes(m, -1, -2).conj()


def unit_matrices(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(f, m / f)``: each matrix's largest ``|entry|`` and the matrix over it.

    A zero matrix has ``f = 0`` and stays zero; a non-finite one has a NaN or
    infinite ``f`` and becomes zero (so no decomposition sees a NaN).
    """
    f = jnp.max(jnp.abs(m), axis=(-2, -1), initial=0.0)
    ok = jnp.isfinite(f) & (f > 0)
    y = m / jnp.where(ok, f, 1).astype(m.dtype)[..., None, None]
    return f, jnp.where(ok[..., None, None], y, 0)


def svd_parts(m: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Each matrix's top singular value (exact, from one batched SVD), and the
    parts `svd_clamp` needs."""
    f, y = unit_matrices(m)
    u, s, vh = jnp.linalg.svd(y, full_matrices=False)
    top = f * s[..., 0] if s.shape[-1] else jnp.zeros_like(f)
    return top, (m, f, u, s, vh)


def svd_clamp(
    parts: tuple[jax.Array, ...], bound: jax.Array, top: jax.Array
) -> jax.Array:
    """``U diag(min(s, bound)) V^H`` per matrix (``parts`` from `svd_parts`).

    A matrix whose top singular value is at most its bound comes back
    exactly (a select, not a reconstruction); a zero bound gives zeros.
    """
    m, f, u, s, vh = parts
    b = bound / jnp.where(f > 0, f, 1)
    kept = (u * jnp.minimum(s, b[..., None]).astype(u.dtype)[..., None, :]) @ vh
    clamped = f.astype(m.dtype)[..., None, None] * kept
    return jnp.where((top <= bound)[..., None, None], m, clamped)


def gram_parts(
    m: jax.Array, squarings: int = POWER_SQUARINGS
) -> tuple[jax.Array, tuple[Any, ...]]:
    """Each matrix's top singular value by power iteration, and the parts
    `soft_clip` needs.

    The power ``(Y Y^H)^(2^squarings)`` (64 by default) is formed by repeated
    squaring, rescaled each time, and applied to the column of ``Y Y^H`` of
    the largest diagonal entry (the row of ``Y`` of largest norm): a
    deterministic start, never orthogonal to the top singular vector unless
    that row is. The estimate is the Rayleigh quotient: from below.
    """
    wide = m.shape[-2] <= m.shape[-1]
    f, y = unit_matrices(m if wide else _adjoint(m))
    gram = y @ _adjoint(y)
    diag = jnp.real(jnp.diagonal(gram, axis1=-2, axis2=-1))
    power = gram
    for _ in range(squarings):
        power = power @ power
        largest = jnp.max(jnp.abs(power), axis=(-2, -1), keepdims=True)
        power = power / jnp.where(largest > 0, largest, 1).astype(power.dtype)
    v = _unit_vector(
        jnp.take_along_axis(power, jnp.argmax(diag, -1)[..., None, None], -1)
    )
    rayleigh = jnp.real(jnp.sum(v.conj() * (gram @ v), axis=(-2, -1)))
    top = f * safe_root(jnp.maximum(rayleigh, 0), 2.0)
    return top, (m, f, y, gram, not wide)


def _unit_vector(v: jax.Array) -> jax.Array:
    length = safe_root(jnp.sum(jnp.real(v * v.conj()), axis=-2, keepdims=True), 2.0)
    return v / jnp.where(length > 0, length, 1).astype(v.dtype)


def soft_clip(
    parts: tuple[jax.Array, ...], bound: jax.Array, steps: int = NEWTON_SCHULZ_STEPS
) -> jax.Array:
    """SPECTRA's soft clip ``(I + X X^H / c^2)^{-1/2} X`` of each matrix.

    Each singular value ``s`` becomes ``s / sqrt(1 + s^2 / c^2)``.

    The inverse square root is ``steps`` coupled Newton–Schulz iterations on
    ``A / alpha``, with ``alpha = 1 + min(Gershgorin, Frobenius bound of
    X X^H) / c^2``, as the official ``clip_sigvals``; here written on
    ``Y = X / f``, with the identity and ``Y Y^H`` weighted so that neither
    ``(f / c)^2`` nor its inverse overflows (equal in exact arithmetic).
    The matrix product runs on the wide orientation (``Y Y^H`` of the
    smaller side), as the official code.
    """
    m, f, y, gram, tall = parts
    bound = bound.astype(f.dtype)
    # The identity weighted by w = min(1, (c/f)^2), Y Y^H by v = min(1, (f/c)^2),
    # each from a ratio at most 1 (finite derivatives at f = 0 and c = 0).
    over = bound < f
    root_w = jnp.where(over, bound / jnp.where(f > 0, f, 1), 1)
    root_v = jnp.where(over, 1, f / jnp.where(over | (bound <= 0), 1, bound))
    w, v = (root_w * root_w)[..., None, None], (root_v * root_v)[..., None, None]
    absolute = jnp.abs(gram)
    gershgorin = jnp.max(jnp.sum(absolute, -1), -1)
    frobenius = safe_root(jnp.sum(absolute * absolute, (-2, -1)), 2.0)
    den = w + v * jnp.minimum(gershgorin, frobenius)[..., None, None]
    eye = jnp.broadcast_to(jnp.eye(gram.shape[-1], dtype=gram.dtype), gram.shape)
    a = (w * eye + v * gram) / den.astype(gram.dtype)
    z = eye
    for _ in range(steps):
        t = 0.5 * (3.0 * eye - z @ a)
        a, z = a @ t, t @ z
    factor = (f * root_w)[..., None, None] * jax.lax.rsqrt(den)
    out = factor.astype(y.dtype) * (z @ y)
    # An infinite bound (a rule with no history yet) passes ``m`` exactly.
    return jnp.where(
        jnp.isinf(bound)[..., None, None], m, _adjoint(out) if tall else out
    )
