"""Numerics primitives: accumulation dtypes, power sums, the safe root, the
one safe ``min(1, b/n)`` and rescaling with zero-safe derivatives.

* sums accumulate in float32, or float64 for float64 leaves under
  ``jax_enable_x64``, whatever the leaf dtype;
* roots have a zero-safe derivative: ``jax.grad`` through the norm of a
  zero tree is zero, not NaN;
* the scale ``min(1, bound / norm)`` never divides by zero, and the
  rescaled entries are differentiated on the branch the step takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ._tree import float_leaves, full_like, zero_unless

INF = float("inf")


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


def is_static(p: Any, *values: float) -> bool:
    """Whether the order ``p`` is a Python float among ``values``."""
    return isinstance(p, float) and p in values


def dispatch_ord(p: float | jax.Array, fn: Callable[[float | jax.Array], Any]):
    """Calls ``fn(p)`` with a static ``p``, or switches on a traced ``p``."""
    if isinstance(p, float):
        return fn(p)
    p = jnp.asarray(p, jnp.float32)
    index = jnp.select([p == 2.0, p == 1.0, jnp.isinf(p)], [0, 1, 2], 3)
    branches = [lambda _: fn(2.0), lambda _: fn(1.0), lambda _: fn(INF), fn]
    return jax.lax.switch(index, branches, p)


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
    if is_static(p, 2.0):
        out = jax.lax.reduce_sum(jax.lax.mul(a, a), axes)
    elif is_static(p, INF):
        out = jax.lax.reduce_max(nan_to_inf(jax.lax.abs(a)), axes)
    elif is_static(p, 1.0):
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
    if isinstance(p, float) and p == INF:
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
    if is_static(p, INF, 1.0):
        return total
    if is_static(p, 2.0):
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


def safe_scale(
    piece: jax.Array, bound: jax.Array, keep: jax.Array | None = None
) -> jax.Array:
    """``min(1, bound / norm)``, the one scale factor every clip uses.

    ``piece`` is a norm (a scalar, or a leaf's own norms shaped to
    broadcast against it). A norm at or under
    the bound gives exactly 1 (also a zero norm with a zero bound), an infinite
    norm 0 and a NaN norm NaN. The division only ever sees a norm above the
    bound, so the derivative is finite everywhere, also at zero. With the
    flag ``keep`` (the step's finiteness) given, the scale is 0 where it is
    False; a NaN norm gives a NaN scale otherwise, as in optax, so
    ``nonfinite="propagate"`` reproduces optax.

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
    over = ~(piece <= bound)
    one = full_like(piece, 1)
    otherwise = one
    if keep is not None:
        over = over & keep
        otherwise = jax.lax.select(keep, one, full_like(one, 0))
    num = jax.lax.select(over, one * bound, otherwise)
    den = jax.lax.select(over, piece, one)
    return num / den


def rescale(
    x: jax.Array, norm: jax.Array, bound: jax.Array, keep: jax.Array | None
) -> jax.Array:
    """``x * min(1, bound / norm)``, written per entry as optax does.

    ``where(norm <= bound, x, x / norm * bound)`` in the accumulation dtype,
    cast back to ``x.dtype``: the scalar factor is never a kernel of its
    own (the division fuses into the pass over ``x``), so a one-leaf step is
    as few kernels as optax's. With ``keep``, entries are zeroed where it is
    False.
    """
    dtype = compute_dtype(x.dtype)
    a = x if x.dtype == dtype else jax.lax.convert_element_type(x, dtype)
    n = norm.astype(dtype) if norm.dtype != dtype else norm
    b = bound.astype(dtype) if bound.dtype != dtype else bound
    out = _clipped(a, n, b)
    out = out if out.dtype == x.dtype else jax.lax.convert_element_type(out, x.dtype)
    return zero_unless(keep, out)


@jax.custom_jvp
def _clipped(a: jax.Array, n: jax.Array, b: jax.Array) -> jax.Array:
    # ``where(n <= b, a, a / n * b)``, the ops of optax's clip, so the
    # compiled step is unchanged (the division fuses into the pass over
    # ``a``). Its own derivative, because the branch that is not taken is
    # still differentiated and its derivative multiplied by zero: at
    # ``n = 0`` (a zero gradient) ``a / n`` is NaN, and at ``b = inf`` (a
    # rule that has recorded nothing yet) ``a * b / n**2`` is; either makes
    # the product NaN.
    return jnp.where(n <= b, a, a / n * b)


@_clipped.defjvp
def _clipped_jvp(primals, tangents):
    (a, n, b), (ta, tn, tb) = primals, tangents
    over = ~(n <= b)
    # Every coefficient is computed from operands the branch would see
    # where it is taken, and from harmless stand-ins where it is not, so
    # each one is finite wherever ``a`` is.
    inv = 1 / jnp.where(over, n, full_like(n, 1))
    ratio = jnp.where(over, b, full_like(b, 0)) * inv
    clipped = ta * ratio + a * inv * (tb - ratio * tn)
    return _clipped(a, n, b), jnp.where(over, clipped, ta)


def scale_leaf(x: jax.Array, scale: jax.Array, keep: jax.Array | None) -> jax.Array:
    """``x * scale`` computed in the accumulation dtype, cast back to ``x.dtype``.

    With ``keep`` given, entries are zeroed where it is False (a select, so a
    NaN entry becomes 0 rather than NaN * 0).
    """
    dtype = compute_dtype(x.dtype)
    a = x if x.dtype == dtype else jax.lax.convert_element_type(x, dtype)
    out = a * (scale if scale.dtype == dtype else scale.astype(dtype))
    out = out if out.dtype == x.dtype else jax.lax.convert_element_type(out, x.dtype)
    return zero_unless(keep, out)


def combine(a: jax.Array, b: jax.Array, p: float | jax.Array) -> jax.Array:
    if isinstance(p, float) and p == INF:
        return jnp.maximum(a, b)
    return a + b


def norm_of_norms(norms: jax.Array, p: float | jax.Array) -> jax.Array:
    """The ``p``-norm of a vector of ``p``-norms: the norm of their union."""
    if is_static(p, INF):
        return jnp.max(norms, initial=0.0)
    if is_static(p, 1.0):
        return jnp.sum(norms)
    if is_static(p, 2.0):
        return safe_root(jnp.sum(norms * norms), 2.0)
    # Any other p: ``(sum norms**p)**(1/p)``, scaled by the largest so it
    # cannot overflow.
    largest = jnp.max(norms, initial=0.0)
    safe = jnp.where(largest > 0, largest, jnp.ones_like(largest))
    total = jnp.sum((norms / safe) ** p)
    return jnp.where(jnp.isfinite(largest), safe * safe_root(total, p), largest)
