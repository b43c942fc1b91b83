"""Measuring recipes: global, per-tensor (RMS, stacked), unit and
per-example norms, built from the primitives below them.

Everything in optaxclip measures through this module and the layers under
it (`_numerics`, `_mesh`, `_xla`), so the numerical contract lives in one
place:

* measuring reads each leaf once, with no control flow over the tree; a
  global 2-norm whose float32 sum of squares overflows is still exact (the
  per-leaf sums are combined rescaled), but one tensor (or segment) whose own
  2-norm exceeds ``2**64`` (about 1.8e19) reads as ``inf``: a non-finite step.
  For ``p`` other than 1, 2 and ``inf``, where ``|x|**p`` overflows for
  moderate entries (above ~7e3 for ``p = 10``), an overflowing sum is
  re-measured rescaled by the largest entry (extra passes only on that step);
* complex leaves use ``|z|``; integer leaves, ``None`` and ``optax.MaskedNode``
  are not measured;
* ``axis_name`` sums (or maxes, for ``ord=inf``) the partial results across a
  ``shard_map`` / ``pmap`` mesh axis, counting replicated leaves once when a
  tree of ``PartitionSpec`` says which leaves are split.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks
from ._mesh import AxisName, cross_device, cross_device_vector, reduction_groups
from ._numerics import (
    INF,
    acc_dtype,
    combine,
    dispatch_ord,
    is_static,
    norm_of_norms,
    power_sum,
    safe_root,
    tree_acc_dtype,
)
from ._tree import float_leaves
from ._xla import stack_barrier

__all__ = ["global_norm", "unitwise_norm"]


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
    return measure_leaves(leaves, p, groups)[0]


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


def per_tensor_like(tree: Any) -> jax.Array:
    """A zero vector with one entry per float leaf of ``tree`` (its norms)."""
    return jnp.zeros((len(float_leaves(tree)),), tree_acc_dtype(tree))


def check_ord(ord: Any, name: str = "ord") -> float | jax.Array:
    """Validates ``ord`` and returns it as a float (``inf`` for infinity).

    A traced value (as ``optax.inject_hyperparams`` passes) is returned as
    is and dispatched at run time.
    """
    if isinstance(ord, str):
        if ord.lower() in ("inf", "infinity"):
            return INF
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
    return jnp.sum(cross_device_vector(vector, [1] * len(counts), groups, 2.0))


# A float32 sum of squares that overflows is at least 2**128; scaled by 2**-64
# it is at least 2**64, so the entries the scaling flushes to zero (below
# 2**-85 each) cannot change it. Its square root is rescaled by 2**32.
_SHIFT = 2.0**-64


_UNSHIFT_ROOT = 2.0**32


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


def _measure_total(leaves, p, groups):
    acc = jnp.result_type(*[acc_dtype(x.dtype) for x in leaves])
    if not is_static(p, 1.0, 2.0, INF):
        # Any other p: |x|**p overflows float32 for moderate entries (7e3 for
        # p = 10), so each leaf's norm is measured overflow-safe, then the
        # per-leaf norms are combined.
        norms, _ = _segment_norms(
            leaves, p, [()] * len(leaves), groups, normalize=False, pieces=False
        )
        return norm_of_norms(norms, p), norms

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
        if p == INF:
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
        out = part if out is None else combine(out, part, p)
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


class Segments(NamedTuple):
    """Segment norms, with each leaf's own norms for scaling it.

    Attributes:
      norms: one norm per segment, concatenated into a vector.
      pieces: per leaf, its segments' norms shaped to broadcast against it.
    """

    norms: jax.Array
    pieces: tuple[jax.Array, ...]


def segments(
    leaves: Sequence[jax.Array],
    p: float | jax.Array,
    layer_axes: Sequence[tuple[int, ...]],
    groups: Sequence[tuple[str, ...]],
    normalize: bool = False,
) -> Segments:
    """One norm per segment, and each leaf's own norms for scaling it.

    Leaf ``i`` is reduced over every axis except ``layer_axes[i]`` (leading
    axes: stacked layers or a batch), giving ``prod(shape[layer_axes])`` segments.
    With ``normalize`` the power sum is divided by the segment size first
    (an RMS for ``p = 2``). Scaling a leaf by its own piece, rather than by
    a slice of the vector, keeps the per-leaf kernels of equally shaped
    leaves identical, so XLA compiles one kernel for all of them instead of
    one per leaf.
    """
    if not leaves:
        return Segments(jnp.zeros((0,), jnp.float32), ())
    vector, pieces = dispatch_ord(
        p,
        functools.partial(
            _segment_norms,
            leaves,
            layer_axes=layer_axes,
            groups=groups,
            normalize=normalize,
            pieces=True,
        ),
    )
    return Segments(vector, tuple(pieces))


def _segment_norms(leaves, p, layer_axes, groups, normalize, pieces):
    acc = jnp.result_type(*[acc_dtype(x.dtype) for x in leaves])
    counts = [segment_count(x, k) for x, k in zip(leaves, layer_axes, strict=True)]
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
            axes = tuple(a for a in range(x.ndim) if a not in layer_axes[i])
            div = None if divisors is None else divisors[i]
            part = power_sum(x, q, axes, keepdims=True, divisor=div)
            own.append(part if part.dtype == acc else part.astype(acc))
        vector = stack_barrier(
            [jax.lax.reshape(part, (part.size,)) for part in own], concat=True
        )
        vector = cross_device_vector(vector, counts, groups, q)
        mean = normalize and not is_static(q, INF)
        if mean:
            vector = vector / jnp.asarray(np.maximum(sizes, 1), acc)
        if not pieces:
            return vector, []
        if local:
            if mean:
                own = [
                    part * (1.0 / max(int(leaf_sizes[i]), 1))
                    for i, part in enumerate(own)
                ]
            return vector, own
        return vector, [
            segment_view(vector[offsets[i] : offsets[i + 1]], x, layer_axes[i])
            for i, x in enumerate(leaves)
        ]

    total, total_parts = totals(p)
    if is_static(p, INF):
        return total, total_parts
    norms = safe_root(total, p)
    norm_parts = [safe_root(t, p) for t in total_parts]
    if local and norm_parts and is_static(p, 1.0, 2.0):
        # The vector is built from the leaves' own norms: each root then
        # fuses into its leaf's reduction, which nothing else reads.
        norms = stack_barrier(
            [jax.lax.reshape(q, (q.size,)) for q in norm_parts], concat=True
        )
    if is_static(p, 1.0, 2.0):
        # A float32 sum of squares (or of moduli) overflows only for a
        # segment whose norm is above 2**64 (for p = 1, above float32's
        # range): it reads as infinite, a non-finite step. No re-measuring
        # branch keeps the step free of control flow over the tree.
        return norms, norm_parts

    def rescaled(_):
        def rescale(largest, scaled):
            return jnp.where(jnp.isfinite(largest), scaled, largest)

        largest, largest_parts = totals(INF)
        if not pieces:
            largest_parts = [
                segment_view(largest[offsets[i] : offsets[i + 1]], x, layer_axes[i])
                for i, x in enumerate(leaves)
            ]
        safe = [
            jnp.where(m > 0, m, jnp.ones_like(m)) for m in [largest, *largest_parts]
        ]
        scaled, scaled_parts = totals(p, safe[1:])
        vector = rescale(largest, safe[0] * safe_root(scaled, p))
        if not pieces:
            return vector, []
        return vector, [
            rescale(m, d * safe_root(t, p))
            for m, d, t in zip(largest_parts, safe[1:], scaled_parts, strict=True)
        ]

    return jax.lax.cond(
        jnp.any(jnp.isposinf(total)), rescaled, lambda _: (norms, norm_parts), None
    )


def segment_count(x: jax.Array, layers: tuple[int, ...]) -> int:
    """Number of segments leaf ``x`` contributes with layer axes ``layers``."""
    return int(math.prod(x.shape[a] for a in layers))


def segment_view(values: jax.Array, x: jax.Array, layers: tuple[int, ...]) -> jax.Array:
    """Reshapes one leaf's slice of a segment vector to broadcast against it."""
    shape = [x.shape[a] if a in layers else 1 for a in range(x.ndim)]
    return values.reshape(shape)


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
