"""The clipping scopes: element, tensor, unit and global.

Every public function here declares one transform from three choices: a
scope (what is measured), a threshold rule (the bound) and an action
(rescale or clamp), run by the core step (`optaxclip._core.Step`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _checks, _norms
from ._core import (
    Applied,
    Context,
    Measurement,
    Scope,
    Step,
    check_nonfinite,
    map_float,
    rescale,
    safe_scale,
    scale_leaf,
    zero_unless,
)
from .rules import Threshold, as_rule

__all__ = [
    "adaptive_grad_clip",
    "clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_spectral_norm",
    "clip_by_value",
]


# ---------------------------------------------------------------------------
# Public scope functions
# ---------------------------------------------------------------------------


def clip_by_global_norm(
    max_norm: Threshold,
    ord: int | float | str = 2,  # noqa: A002
    *,
    nonfinite: str = "zero",
    axis_name: _norms.AxisName = None,
    partition_specs: Any = None,
    per_tensor_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Rescales the whole update so its global ``ord``-norm is at most the bound.

    With a number and finite input the result equals
    ``optax.clip_by_global_norm(max_norm)``: ``g * min(1, max_norm / |g|)``.
    Unlike optax, the norm is accumulated in float32 or better (a float16 tree
    whose squared norm overflows float16 is clipped, not zeroed), a zero
    gradient or a zero bound never divides by zero, the pre-clip norm is kept
    in the state, and non-finite steps follow ``nonfinite``.

    Args:
      max_norm: the bound: a number, a scalar array, an ``optax.Schedule`` of
        the step count, or a rule from [`optaxclip.rules`][optaxclip.rules] (e.g.
        ``rules.zscore()`` for ZClip, ``rules.percentile(10)`` for AutoClip).
      ord: the norm: ``1``, ``2``, ``inf`` or any ``p > 0``, like
        ``torch.nn.utils.clip_grad_norm_(norm_type=p)``.
      nonfinite: keyword-only. ``"zero"`` (default): if the norm is NaN or
        infinite, output zeros for that step, count it, and leave the rule's
        statistics untouched. ``"propagate"``: output what optax would (NaN
        propagates); the rule's statistics are still protected.
      axis_name: keyword-only; the ``shard_map`` / ``pmap`` mesh axis (or
        axes) the leaves are split across, so the norm is the norm of the
        whole tree. Not needed under ``jit`` with sharded arrays.
      partition_specs: keyword-only; a pytree prefix of
        ``jax.sharding.PartitionSpec`` saying which leaves are split across
        ``axis_name`` (replicated leaves are then counted once).
      per_tensor_stats: keyword-only; also record each tensor's ``ord``-norm on
        every step (``stats.tensor_norms``, and per-tensor keys in
        [`metrics`][optaxclip.metrics]); costs one small kernel per step.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`ClipState`][optaxclip.ClipState].

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> tx = oc.clip_by_global_norm(1.0)
      >>> grads = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
      >>> clipped, state = tx.update(grads, tx.init(grads))
      >>> print(clipped["a"], clipped["b"], state.stats.norm)
      [0.6] [0.8] 5.0

    References:
      Pascanu et al., [On the difficulty of training Recurrent Neural
      Networks](https://arxiv.org/abs/1211.5063), 2013.
    """
    scope = GlobalScope(
        ord=_norms.check_ord(ord),
        axis_name=axis_name,
        partition_specs=partition_specs,
        per_tensor_stats=_checks.static_flag(per_tensor_stats, "per_tensor_stats"),
    )
    return scope_transform(scope, max_norm, "max_norm", nonfinite, Rescale())


def clip_by_norm(
    max_norm: Threshold,
    ord: int | float | str = 2,  # noqa: A002
    *,
    nonfinite: str = "zero",
    axis_name: _norms.AxisName = None,
    partition_specs: Any = None,
    stacked_axes: Any = None,
    per_tensor_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Rescales each tensor (leaf) separately to an ``ord``-norm of at most the bound.

    Like ``tf.clip_by_norm`` applied to every leaf:
    ``g_i * min(1, max_norm / |g_i|)``. A rule threshold learns one bound per
    tensor (e.g. ``clip_by_norm(rules.ema(ratio=1.05))`` is AdaGC-style
    per-tensor adaptive clipping).

    Args:
      max_norm: a number, scalar array, ``optax.Schedule`` or rule; rules see
        the vector of per-tensor norms and return one bound per tensor.
      ord: ``1``, ``2``, ``inf`` or any ``p > 0``.
      nonfinite: keyword-only; ``"zero"`` (default) zeroes the whole update
        when any tensor's norm is non-finite, ``"propagate"`` lets NaN through.
      axis_name: keyword-only; mesh axis (or axes) the tensors are split across
        inside ``shard_map`` / ``pmap``.
      partition_specs: keyword-only; a pytree prefix of ``PartitionSpec``
        saying which leaves are split across ``axis_name``.
      stacked_axes: keyword-only; the number of leading axes that index stacked
        layers (``nnx.scan`` / ``lax.scan`` models), as an int for every leaf
        or a pytree prefix of ints; each layer slice is then clipped as its
        own tensor. Default None (no stacked axes). Under
        ``optax.inject_hyperparams`` list it in ``static_args``.
      per_tensor_stats: keyword-only; accepted for a uniform signature:
        this scope always records one entry per tensor.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``stats.norm`` holds one
      norm per tensor (or per layer slice).

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> tx = oc.clip_by_norm(1.0)
      >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
      >>> clipped, state = tx.update(grads, tx.init(grads))
      >>> print(clipped["a"], clipped["b"], state.stats.norm)
      [0.6 0.8] [0.5] [5.  0.5]
    """
    _checks.static_flag(per_tensor_stats, "per_tensor_stats")
    scope = TensorScope(
        ord=_norms.check_ord(ord),
        axis_name=axis_name,
        partition_specs=partition_specs,
        stacked_axes=_checks.check_stacked(stacked_axes),
        normalize=False,
    )
    return scope_transform(scope, max_norm, "max_norm", nonfinite, Rescale())


def clip_by_block_rms(
    threshold: Threshold,
    *,
    nonfinite: str = "zero",
    axis_name: _norms.AxisName = None,
    partition_specs: Any = None,
    stacked_axes: Any = None,
    per_tensor_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Rescales each tensor so its root-mean-square entry is at most the bound.

    Equals ``optax.clip_by_block_rms(threshold)`` on finite input:
    ``g_i / max(1, rms(g_i) / threshold)``.

    Args:
      threshold: a number, scalar array, ``optax.Schedule`` or rule (one bound
        per tensor).
      nonfinite: keyword-only; ``"zero"`` (default) or ``"propagate"``.
      axis_name: keyword-only; mesh axis the tensors are split across.
      partition_specs: keyword-only; which leaves are split across it.
      stacked_axes: keyword-only; leading stacked-layer axes (see
        [`clip_by_norm`][optaxclip.clip_by_norm]).
      per_tensor_stats: keyword-only; accepted for a uniform signature:
        this scope always records one entry per tensor.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``stats.norm`` holds the
      per-tensor RMS.

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> tx = oc.clip_by_block_rms(1.0)
      >>> grads = {"w": jnp.array([2.0, -2.0, 2.0, -2.0])}
      >>> clipped, state = tx.update(grads, tx.init(grads))
      >>> print(clipped["w"], state.stats.norm)
      [ 1. -1.  1. -1.] [2.]
    """
    _checks.static_flag(per_tensor_stats, "per_tensor_stats")
    scope = TensorScope(
        ord=2.0,
        axis_name=axis_name,
        partition_specs=partition_specs,
        stacked_axes=_checks.check_stacked(stacked_axes),
        normalize=True,
        owner="clip_by_block_rms",
    )
    return scope_transform(scope, threshold, "threshold", nonfinite, Rescale())


def clip_by_value(
    max_delta: Threshold,
    *,
    nonfinite: str = "zero",
    axis_name: _norms.AxisName = None,
    partition_specs: Any = None,
    per_tensor_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Clamps every entry to ``[-max_delta, max_delta]``.

    Equals ``optax.clip(max_delta)`` on finite input. The largest absolute
    entry is measured for the stats (and for rules: ``clip_by_value(rule)``
    learns the bound from the history of largest entries). Complex entries
    keep their phase and have their modulus clamped.

    Args:
      max_delta: a number, scalar array, ``optax.Schedule`` or rule.
      nonfinite: keyword-only; ``"zero"`` (default) or ``"propagate"``.
      axis_name: keyword-only; mesh axis the leaves are split across (only the
        recorded largest entry and rules depend on it).
      partition_specs: keyword-only; which leaves are split across it.
      per_tensor_stats: keyword-only; also record each tensor's largest
        absolute entry on every step (``stats.tensor_norms``, and per-tensor keys in
        [`metrics`][optaxclip.metrics]); costs one small kernel per step.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> tx = oc.clip_by_value(1.0)
      >>> clipped, state = tx.update(jnp.array([-3.0, 0.5, 2.0]), tx.init(None))
      >>> print(clipped, state.stats.norm, state.stats.clipped)
      [-1.   0.5  1. ] 3.0 1
    """
    scope = ElementScope(
        axis_name=axis_name,
        partition_specs=partition_specs,
        per_tensor_stats=_checks.static_flag(per_tensor_stats, "per_tensor_stats"),
    )
    return scope_transform(scope, max_delta, "max_delta", nonfinite, Clamp())


clip = clip_by_value
"""Alias of [`clip_by_value`][optaxclip.clip_by_value], under optax's name ``clip``.

``oc.clip(max_delta)`` is ``oc.clip_by_value(max_delta)``: the same arguments,
state and result, so ``optax.clip(1.0)`` ports by changing the module only.
"""


def adaptive_grad_clip(
    clipping: Threshold,
    eps: jax.typing.ArrayLike = 1e-3,
    axis: int | tuple[int, ...] | None = None,
    *,
    nonfinite: str = "zero",
    axis_name: _norms.AxisName = None,
    partition_specs: Any = None,
    stacked_axes: Any = None,
    per_tensor_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Adaptive gradient clipping (AGC): each unit to ``clipping * max(|w|, eps)``.

    Equals ``optax.adaptive_grad_clip`` on finite input: every unit (a column
    of a dense kernel, an output filter of a convolution; see
    [`unitwise_norm`][optaxclip.unitwise_norm]) of the gradient is rescaled so that its
    norm is at most ``clipping`` times the norm of the same unit of the
    parameters. Needs ``params`` in ``update``.

    Args:
      clipping: the largest allowed ratio ``|g_unit| / max(|w_unit|, eps)``; a
        number, scalar array, ``optax.Schedule``, or a rule (which sees each
        tensor's largest unit ratio and returns one bound per tensor).
      eps: floor on the parameter unit norm, so zero-initialized parameters
        can still move.
      axis: axis or axes forming a unit, overriding the rank-based default.
      nonfinite: keyword-only; ``"zero"`` (default) or ``"propagate"``.
      axis_name: keyword-only; mesh axis the leaves are split across inside
        ``shard_map`` (with ``partition_specs``, only splits along the unit's
        reduced axes are summed).
      partition_specs: keyword-only; a pytree prefix of ``PartitionSpec``.
      stacked_axes: keyword-only; leading stacked-layer axes excluded from
        the units (see [`clip_by_norm`][optaxclip.clip_by_norm]).
      per_tensor_stats: keyword-only; accepted for a uniform signature:
        this scope always records one entry per tensor.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``stats.norm`` holds each
      tensor's largest unit ratio and ``stats.clipped`` the number of units
      clipped.

    Raises:
      ValueError: in ``update`` if ``params`` is None or does not match the
        updates' structure.

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> tx = oc.adaptive_grad_clip(0.1)
      >>> params = {"w": jnp.array([[1.0, 10.0], [0.0, 0.0]])}
      >>> grads = {"w": jnp.array([[1.0, 0.5], [0.0, 0.0]])}
      >>> clipped, state = tx.update(grads, tx.init(params), params)
      >>> print(clipped["w"], state.stats.clipped)
      [[0.1 0.5]
       [0.  0. ]] 1

    References:
      Brock et al., [High-Performance Large-Scale Image Recognition Without
      Normalization](https://arxiv.org/abs/2102.06171), 2021.
    """
    _checks.check_threshold(eps, "eps")
    _checks.static_flag(per_tensor_stats, "per_tensor_stats")
    scope = UnitScope(
        eps=eps,
        axis=axis,
        axis_name=axis_name,
        partition_specs=partition_specs,
        stacked_axes=_checks.check_stacked(stacked_axes),
    )
    return scope_transform(scope, clipping, "clipping", nonfinite, Rescale())


# ---------------------------------------------------------------------------
# Building a transform
# ---------------------------------------------------------------------------


def scope_transform(
    scope: Scope[Any], threshold: Threshold, name: str, nonfinite: str, action: Any
) -> optax.GradientTransformationExtraArgs:
    """The core step over ``scope`` with the user's threshold and policy."""
    zero = check_nonfinite(nonfinite)
    return Step(scope, as_rule(threshold, name), action, zero).transform()


# ---------------------------------------------------------------------------
# Actions
# ---------------------------------------------------------------------------


class Rescales(Protocol):
    """A measurement that knows how to rescale what it measured."""

    def rescale(
        self, updates: Any, threshold: jax.Array, keep: jax.Array | None
    ) -> tuple[Any, jax.Array, jax.Array]:
        """Returns the rescaled updates, the scale and the clipped count."""
        ...


@dataclasses.dataclass(frozen=True)
class Rescale:
    """Action: rescale each measured unit to the bound (the scope says how)."""

    stateless = True

    def init(self, params: Any) -> tuple[()]:
        del params
        return ()

    def apply(self, updates: Any, measured: Any, ctx: Context) -> Applied:
        out, scale, clipped = measured.rescale(updates, ctx.threshold, ctx.keep)
        return Applied(out, scale, clipped, ctx.state)


@dataclasses.dataclass(frozen=True)
class Clamp:
    """Action: clamp every entry to ``[-bound, bound]`` (complex: the modulus)."""

    stateless = True

    def init(self, params: Any) -> tuple[()]:
        del params
        return ()

    def apply(self, updates: Any, measured: Measurement, ctx: Context) -> Applied:
        threshold, keep = ctx.threshold, ctx.keep

        def clamp(_, x):
            if jnp.iscomplexobj(x):
                bound = threshold.astype(x.real.dtype)
                out = rescale(x, jnp.abs(x), bound, None)
            else:
                bound = threshold.astype(x.dtype)
                out = jnp.clip(x, -bound, bound)
            return zero_unless(keep, out)

        norms = measured.norms
        scale = safe_scale(norms, threshold, keep)
        return Applied(map_float(clamp, updates), scale, norms > threshold, ctx.state)


# ---------------------------------------------------------------------------
# Scopes: what is measured, and how it is rescaled
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GlobalMeasurement(Measurement):
    """The whole tree's norm (or its largest entry, for the element scope).

    Attributes:
      leaf_norms: each tensor's own norm (or largest entry), for the record.
    """

    leaf_norms: jax.Array | None = None

    def rescale(self, updates, threshold, keep):
        norm = self.norms
        out = map_float(lambda _, x: rescale(x, norm, threshold, keep), updates)
        return out, safe_scale(norm, threshold, keep), norm > threshold


def _finite(norms: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(norms))


@dataclasses.dataclass(frozen=True)
class GlobalScope:
    """The whole pytree: one ``ord``-norm (each tensor's too, for the record)."""

    ord: Any
    axis_name: Any
    partition_specs: Any
    owner: str = "clip_by_global_norm"
    per_tensor_stats: bool = False
    leafwise = True

    def norm_like(self, params):
        return jnp.zeros((), _norms.tree_acc_dtype(params))

    def measure(self, updates, params, extra_args):
        del params, extra_args
        norm, per_leaf = _norms.tree_norms(
            updates, self.ord, self.axis_name, self.partition_specs
        )
        return GlobalMeasurement(norm, _finite(norm), norm, norm, per_leaf)


@dataclasses.dataclass(frozen=True)
class ElementScope:
    """Every entry: the largest absolute entry is what is measured."""

    axis_name: Any
    partition_specs: Any
    owner: str = "clip_by_value"
    per_tensor_stats: bool = False
    leafwise = True

    def norm_like(self, params):
        return jnp.zeros((), _norms.tree_acc_dtype(params))

    def measure(self, updates, params, extra_args):
        del params, extra_args
        largest, per_leaf = _norms.tree_norms(
            updates, _norms.INF, self.axis_name, self.partition_specs
        )
        return GlobalMeasurement(largest, _finite(largest), largest, largest, per_leaf)


def _stacked_per_leaf(stacked_axes, tree):
    return _norms.leafwise(
        stacked_axes, tree, lambda v: isinstance(v, int | np.integer)
    )


@dataclasses.dataclass(frozen=True)
class TensorMeasurement(Measurement):
    """One norm per tensor (or stacked layer slice), with each leaf's piece.

    Attributes:
      leaves: the float leaves measured.
      keep_axes: per leaf, the leading stacked axes kept apart.
      pieces: per leaf, its norms shaped for broadcasting against it.
    """

    leaves: tuple[jax.Array, ...] = ()
    keep_axes: tuple[tuple[int, ...], ...] = ()
    pieces: tuple[jax.Array, ...] = ()

    def rescale(self, updates, threshold, keep):
        factors = None
        if threshold.ndim:
            # A rule's bounds: every leaf's factor is computed in one vector
            # and split off it into a buffer of its own. Read as a slice, a
            # bound would make each leaf's kernels (and every optimizer
            # kernel fused with them) unique, compiled once per leaf.
            counts = [
                _norms.segment_count(x, k)
                for x, k in zip(self.leaves, self.keep_axes, strict=True)
            ]
            factors = _norms.leaf_scales(self.pieces, threshold, False, counts)

        def scale(i, x):
            piece = self.pieces[i]
            if factors is not None:
                factor = _norms.segment_view(factors[i], x, self.keep_axes[i])
                return scale_leaf(x, factor, keep)
            if not self.keep_axes[i]:
                # One norm for the leaf: a scalar, as the global scope's,
                # so the division fuses into the pass over the leaf.
                piece = jnp.reshape(piece, ())
            return rescale(x, piece, threshold, keep)

        out = map_float(scale, updates)
        norms = self.norms
        return out, safe_scale(norms, threshold, keep), jnp.sum(norms > threshold)


@dataclasses.dataclass(frozen=True)
class TensorScope:
    """Each tensor (leaf), or each stacked layer slice of it."""

    ord: Any
    axis_name: Any
    partition_specs: Any
    stacked_axes: Any
    normalize: bool
    owner: str = "clip_by_norm"

    def _keep_axes(self, tree):
        leaves = _norms.float_leaves(tree)
        ks = _stacked_per_leaf(self.stacked_axes, tree)
        out = []
        for x, k in zip(leaves, ks, strict=True):
            k = int(k or 0)
            if k > np.ndim(x):
                raise ValueError(
                    f"`stacked_axes`={k} exceeds the rank of a leaf of shape "
                    f"{np.shape(x)}."
                )
            out.append(tuple(range(k)))
        return leaves, out

    def norm_like(self, params):
        leaves, keep = self._keep_axes(params)
        n = sum(_norms.segment_count(x, k) for x, k in zip(leaves, keep, strict=True))
        return jnp.zeros((n,), _norms.tree_acc_dtype(params))

    def _total(self, norms, leaves, keep):
        # The whole tree's measurement, in the scope's own terms: the
        # ``ord``-norm of the tensors' norms, or the RMS of every entry.
        if not leaves:
            return jnp.zeros((), norms.dtype)
        if self.normalize:
            counts = [
                _norms.segment_count(x, k) for x, k in zip(leaves, keep, strict=True)
            ]
            sizes = np.repeat(
                [x.size // max(c, 1) for x, c in zip(leaves, counts, strict=True)],
                counts,
            )
            weights = jnp.asarray(sizes / max(sizes.sum(), 1), norms.dtype)
            return _norms.safe_root(jnp.sum(weights * norms * norms), 2.0)
        return _norms.norm_of_norms(norms, self.ord)

    def measure(self, updates, params, extra_args):
        del params, extra_args
        leaves, keep = self._keep_axes(updates)
        reduced = [
            tuple(a for a in range(x.ndim) if a not in k)
            for x, k in zip(leaves, keep, strict=True)
        ]
        groups = _norms.reduction_groups(
            updates, leaves, self.axis_name, self.partition_specs, reduced
        )
        segments = _norms.segment_pieces(leaves, self.ord, keep, groups, self.normalize)
        dtype = _norms.tree_acc_dtype(updates)
        pieces = tuple(
            piece if piece.dtype == dtype else piece.astype(dtype)
            for piece in segments.pieces
        )
        norms = segments.norms.astype(dtype)
        total = self._total(norms, leaves, keep)
        return TensorMeasurement(
            norms,
            _finite(norms),
            norms,
            total,
            tuple(leaves),
            tuple(keep),
            pieces,
        )


@dataclasses.dataclass(frozen=True)
class UnitMeasurement(Measurement):
    """Each tensor's largest unit ratio ``|g_unit| / max(|w_unit|, eps)``.

    Attributes:
      units: per leaf, the unit norms of the gradient and of the parameter.
      everywhere: every mesh axis a leaf is split across.
      unit_groups: per leaf, the mesh axes that split its units apart.
    """

    units: tuple[tuple[jax.Array, jax.Array], ...] = ()
    everywhere: tuple[str, ...] = ()
    unit_groups: tuple[tuple[str, ...], ...] = ()

    def rescale(self, updates, threshold, keep):
        smallest, clipped = [], []
        units = self.units
        bounds = None
        if threshold.ndim:
            # A rule's bounds, split into a buffer per leaf (see TensorMeasurement).
            bounds = _norms.split_entries(threshold, [1] * len(units))

        def scale(i, x):
            g_norm, w_norm = units[i]
            # A scalar threshold is used as is (no per-leaf slice), so equally
            # shaped leaves share one compiled kernel.
            bound = threshold if bounds is None else bounds[i].reshape(())
            max_norm = bound.astype(w_norm.dtype) * w_norm
            # Not "g_norm > max_norm": a NaN unit norm is rescaled, as in
            # optax, so NaN reaches the whole unit under "propagate" (the
            # default policy zeroes the step anyway).
            over = ~(g_norm <= max_norm)
            s = jnp.where(over, max_norm / jnp.maximum(g_norm, 1e-6), 1.0)
            smallest.append(jnp.min(s, initial=1.0))
            clipped.append(jnp.sum(g_norm > max_norm, dtype=jnp.int32))
            return scale_leaf(x, s, keep)

        out = map_float(scale, updates)
        if not units:
            return out, jnp.ones((0,), self.norms.dtype), jnp.zeros((), jnp.int32)
        factor = _norms.stack_barrier(smallest).astype(self.norms.dtype)
        if self.everywhere:
            factor = jax.lax.pmin(factor, self.everywhere)
        factor = zero_unless(keep, factor)
        total = _norms.cross_device_vector(
            _norms.stack_barrier(clipped), [1] * len(units), self.unit_groups, 2.0
        )
        return out, factor, jnp.sum(total)


@dataclasses.dataclass(frozen=True)
class UnitScope:
    """Each unit (row, column, filter) of each tensor, relative to the params."""

    eps: Any
    axis: Any
    axis_name: Any
    partition_specs: Any
    stacked_axes: Any
    owner: str = "adaptive_grad_clip"

    def norm_like(self, params):
        return _norms.per_tensor_like(params)

    def _axes(self, x, k):
        inner = _norms.unit_axes(jax.ShapeDtypeStruct(x.shape[k:], x.dtype), self.axis)
        return tuple(a + k for a in inner)

    def measure(self, updates, params, extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "adaptive_grad_clip needs the parameters: call "
                "`tx.update(updates, state, params)`."
            )
        _checks.check_params("adaptive_grad_clip", updates, params)
        leaves = _norms.float_leaves(updates)
        p_leaves = _norms.matching_float_leaves(updates, params)
        ks = [int(k or 0) for k in _stacked_per_leaf(self.stacked_axes, updates)]
        axes = [self._axes(x, k) for x, k in zip(leaves, ks, strict=True)]
        groups = _norms.reduction_groups(
            updates, leaves, self.axis_name, self.partition_specs, axes
        )
        eps = jnp.asarray(self.eps, jnp.float32)
        units = []
        for x, w, ax, names in zip(leaves, p_leaves, axes, groups, strict=True):
            g_sum = _norms.cross_device(
                _norms.power_sum(x, 2.0, ax, keepdims=True), names, 2.0
            )
            w_sum = _norms.cross_device(
                _norms.power_sum(w, 2.0, ax, keepdims=True), names, 2.0
            )
            g_norm = _norms.safe_root(g_sum, 2.0)
            w_norm = jnp.maximum(_norms.safe_root(w_sum, 2.0), eps.astype(w_sum.dtype))
            units.append((g_norm, w_norm))
        acc = _norms.tree_acc_dtype(updates)
        if not units:
            empty = jnp.zeros((0,), acc)
            return UnitMeasurement(empty, jnp.asarray(True), empty, jnp.zeros((), acc))
        # Inside shard_map, units split along a dim that is not reduced live on
        # different devices: maxima and minima are taken across every named
        # axis (idempotent for replicated leaves), unit counts are summed only
        # across the axes that split units (not the ones that split a unit).
        split = [
            names
            for names, _ in _norms.leaf_mesh_axes(
                updates, self.axis_name, self.partition_specs
            )
        ]
        everywhere = tuple(dict.fromkeys(n for names in split for n in names))
        unit_groups = tuple(
            tuple(n for n in s if n not in g)
            for s, g in zip(split, groups, strict=True)
        )
        ratios = [jnp.max(_norms.nan_to_inf(g / w)).astype(acc) for g, w in units]
        ratios = _norms.cross_device(
            _norms.stack_barrier(ratios), everywhere, _norms.INF
        )
        return UnitMeasurement(
            ratios,
            _finite(ratios),
            ratios,
            jnp.max(ratios),
            tuple(units),
            everywhere,
            unit_groups,
        )


# ---------------------------------------------------------------------------
# Spectral scope: clip_by_spectral_norm (the numerics are in `_norms`:
# svd_parts / svd_clamp and gram_parts / soft_clip; below is the glue)
# ---------------------------------------------------------------------------


def clip_by_spectral_norm(
    max_norm: Threshold,
    *,
    mode: str = "exact",
    stacked_axes: Any = None,
    nonfinite: str = "zero",
    axis_name: _norms.AxisName = None,
    partition_specs: Any = None,
    per_tensor_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Clamps the singular values of every matrix leaf to at most the bound.

    Each matrix (a 2-D leaf, or the trailing two axes of a leaf with
    ``stacked_axes`` leading axes, one matrix per stacked slice) becomes
    ``U diag(min(s, max_norm)) V^H``: its spectral norm (top singular value)
    is at most the bound, and the directions under it are untouched. Other
    leaves (vectors, scalars, convolution kernels, integers) pass unchanged.
    Equally shaped matrices are decomposed together, one batched SVD (or one
    batched Newton–Schulz iteration) per shape, so compile time does not
    grow with the number of matrices.

    Args:
      max_norm: the bound on each matrix's top singular value: a number,
        scalar array, ``optax.Schedule`` or rule; a rule observes the vector
        of entries (see Returns) and returns one bound per entry, so each
        matrix learns its own (``rules.ema(...)`` or ``rules.percentile(...)``
        as in arXiv:2605.11838).
      mode: keyword-only. ``"exact"`` (default): a batched SVD in the
        accumulation dtype, singular values above the bound set to it, and
        the top singular value measured exactly. ``"soft"``: SPECTRA's soft
        clipping ``(I + X X^H / c^2)^{-1/2} X``, which maps every singular
        value ``s`` to ``s / sqrt(1 + s^2 / c^2)`` (within a factor
        ``1/sqrt(2)`` of ``min(s, c)``, the worst at ``s = c``), computed
        by 10 Newton–Schulz iterations with no SVD; its top singular value
        is estimated by a power iteration of 64 steps (from below).
      stacked_axes: keyword-only; leading stacked-layer axes (an int or a
        pytree prefix of ints), see [`clip_by_norm`][optaxclip.clip_by_norm].
      nonfinite: keyword-only; ``"zero"`` (default) zeroes the whole update
        when any leaf holds a NaN or an Inf, ``"propagate"`` lets it through.
      axis_name: keyword-only; inside ``shard_map``, the mesh axis (or axes)
        the matrices are split across; needs ``partition_specs``, which says
        along which dims (the matrix is gathered for its decomposition).
      partition_specs: keyword-only; a pytree prefix of ``PartitionSpec``.
      per_tensor_stats: keyword-only; accepted for a uniform signature: this
        scope always records one entry per matrix.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``stats.norm`` holds one
      entry per tensor (or stacked slice), laid out as ``clip_by_norm``'s:
      a matrix's top singular value, 0 for a leaf that is not a matrix
      (never clipped); ``stats.scale`` is ``bound / norm`` where a matrix
      is clipped (1 elsewhere) and ``stats.clipped`` the number of matrices
      clipped.

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> tx = oc.clip_by_spectral_norm(1.0)
      >>> grads = {"w": jnp.array([[3.0, 0.0], [0.0, 0.5]]), "b": jnp.ones(2)}
      >>> clipped, state = tx.update(grads, tx.init(grads))
      >>> print(clipped["w"], clipped["b"], state.stats.norm, state.stats.clipped)
      [[1.  0. ]
       [0.  0.5]] [1. 1.] [0. 3.] 1

    References:
      Jiang, Semenov and Stich, [Enhancing LLM Training via Spectral
      Clipping](https://arxiv.org/abs/2603.14315), 2026 (SPECTRA; official
      code: mlolab/llm-spectral-clipping).

    Differences from the official code: SPECTRA's ``clip_sigvals``
    (``src/optim/post_process.py``) runs its iteration in bfloat16 unless
    ``--ns_float32``; here it runs in float32 (float64 for float64 leaves
    under x64), on each matrix divided by its largest entry (equal in exact
    arithmetic, and free of overflow). For a batch of matrices the official
    code scales by the largest bound of the batch; here each matrix has its
    own, as the official code gives each 2-D parameter. The official code
    clips vectors by their norm when asked to (``apply_to="all"``); here
    only matrices are clipped. SPECTRA applies the clip to the optimizer's
    update (after the optimizer) or to the gradient (before it): place this
    transform accordingly in an ``optax.chain``.
    """
    _checks.check_choice(mode, "mode", ("exact", "soft"))
    _checks.static_flag(per_tensor_stats, "per_tensor_stats")
    if _norms.axis_names(axis_name) and partition_specs is None:
        raise _checks.fail(
            "axis_name",
            f"was given ({axis_name!r}) without `partition_specs`: a singular "
            "value needs the whole matrix, so say along which dims each leaf "
            "is split with `partition_specs` (a pytree prefix of PartitionSpec).",
        )
    scope = SpectralScope(
        mode, _checks.check_stacked(stacked_axes), axis_name, partition_specs
    )
    return scope_transform(scope, max_norm, "max_norm", nonfinite, Rescale())


@dataclasses.dataclass(frozen=True)
class SpectralMeasurement(Measurement):
    """Each matrix's top singular value, with its group's decomposition.

    Attributes:
      groups: per matrix shape, ``(members, entries, parts)``: each member
        leaf's ``(index, leaf, matrix count)``, the entries of its matrices in
        ``norms``, and the batched decomposition's parts.
      gathers: per float leaf, the ``(mesh axes, dim)`` it was gathered over.
      soft: SPECTRA's soft clip rather than the exact clamp.
    """

    groups: tuple[tuple[Any, np.ndarray, tuple[Any, ...]], ...] = ()
    gathers: tuple[tuple[tuple[tuple[str, ...], int], ...], ...] = ()
    soft: bool = False

    def rescale(self, updates, threshold, keep):
        out = {}
        for members, entries, parts in self.groups:
            bound = threshold[entries] if threshold.ndim else threshold
            bound = jnp.broadcast_to(bound, entries.shape)
            if self.soft:
                batch = _norms.soft_clip(parts, bound)
            else:
                batch = _norms.svd_clamp(parts, bound, self.norms[entries])
            pieces = _split_batch(batch, [c for _, _, c in members])
            for (i, x, _), piece in zip(members, pieces, strict=True):
                piece = piece.reshape(x.shape).astype(x.dtype)
                out[i] = _scatter(piece, self.gathers[i])

        def scale(i, x):
            return zero_unless(keep, _norms.sharded_like(x, out.get(i, x)))

        norms = self.norms
        clipped = jnp.sum(norms > threshold)
        return map_float(scale, updates), safe_scale(norms, threshold, keep), clipped


def _split_batch(batch, counts):
    # One buffer per leaf from a few multi-output kernels (`split_entries`):
    # read as slices, each leaf's piece would be a kernel of its own.
    size = math.prod(batch.shape[1:])
    counts = [c * size for c in counts]
    if not jnp.iscomplexobj(batch):
        return _norms.split_entries(batch.reshape(-1), counts)
    parts = (
        _norms.split_entries(p.reshape(-1), counts) for p in (batch.real, batch.imag)
    )
    return [jax.lax.complex(a, b) for a, b in zip(*parts, strict=True)]


def _gather(x, gathers):
    for names, dim in gathers:
        x = jax.lax.all_gather(x, names, axis=dim, tiled=True)
    return x


def _scatter(x, gathers):
    for names, dim in reversed(gathers):
        size = x.shape[dim] // jax.lax.psum(1, names)
        start = jax.lax.axis_index(names) * size
        x = jax.lax.dynamic_slice_in_dim(x, start, size, dim)
    return x


@dataclasses.dataclass(frozen=True)
class SpectralScope:
    """Each matrix (2-D leaf or stacked slice): its top singular value; each
    other leaf (or stacked slice) holds an entry of 0, as ``clip_by_norm``'s
    entries are laid out."""

    mode: str
    stacked_axes: Any
    axis_name: Any
    partition_specs: Any
    owner: str = "clip_by_spectral_norm"

    def _entries(self, tree):
        # Per float leaf: its stacked axes, its number of entries (one per
        # stacked slice, as `clip_by_norm`), and whether it is a matrix.
        leaves = _norms.float_leaves(tree)
        ks = [int(k or 0) for k in _stacked_per_leaf(self.stacked_axes, tree)]
        for x, k in zip(leaves, ks, strict=True):
            if k > np.ndim(x):
                raise ValueError(
                    f"`stacked_axes`={k} exceeds the rank of a leaf of shape "
                    f"{np.shape(x)}."
                )
        counts = [math.prod(np.shape(x)[:k]) for x, k in zip(leaves, ks, strict=True)]
        matrix = [
            np.ndim(x) - k == 2 and bool(np.size(x))
            for x, k in zip(leaves, ks, strict=True)
        ]
        return leaves, ks, counts, matrix

    def norm_like(self, params):
        _, _, counts, _ = self._entries(params)
        return jnp.zeros((sum(counts),), _norms.tree_acc_dtype(params))

    def measure(self, updates, params, extra_args):
        del params, extra_args
        leaves, ks, counts, matrix = self._entries(updates)
        split = _norms.leaf_mesh_axes(updates, self.axis_name, self.partition_specs)
        gathers = []
        for names, dims in split:
            by_dim = {}
            for n, d in zip(names, dims or (), strict=True):
                by_dim.setdefault(d, []).append(n)
            gathers.append(tuple((tuple(v), d) for d, v in by_dim.items()))
        finite = [jnp.all(jnp.isfinite(x)) for x in leaves]
        shapes, offsets = {}, np.cumsum([0, *counts])
        for i, (x, k) in enumerate(zip(leaves, ks, strict=True)):
            if matrix[i]:
                x = _gather(x, gathers[i])
                count = math.prod(x.shape[:k])
                key = (x.shape[-2:], x.dtype)
                shapes.setdefault(key, []).append((i, x, count, offsets[i]))
        groups, tops, order = [], [], []
        parts_of = _norms.gram_parts if self.mode == "soft" else _norms.svd_parts
        acc = _norms.tree_acc_dtype(updates)
        for (shape, dtype), members in shapes.items():
            dt = _norms.compute_dtype(dtype)
            batch = jnp.concatenate(
                [
                    _norms.replicated(x).reshape(-1, *shape).astype(dt)
                    for _, x, _, _ in members
                ]
            )
            top, parts = parts_of(batch)
            entries = np.concatenate([np.arange(o, o + c) for _, _, c, o in members])
            groups.append((tuple((i, x, c) for i, x, c, _ in members), entries, parts))
            tops.append(top.astype(acc))
            order.append(entries)
        # Leaves that are not matrices hold 0 (never clipped).
        filled = np.concatenate([*order, np.zeros((0,), int)])
        rest = np.setdiff1d(np.arange(offsets[-1]), filled)
        source = np.empty(offsets[-1], int)
        source[filled], source[rest] = (
            np.arange(filled.size),
            filled.size + np.arange(rest.size),
        )
        norms = jnp.concatenate([*tops, jnp.zeros((rest.size,), acc)])[source]
        ok = jnp.all(jnp.stack(finite)) if finite else jnp.asarray(True)
        everywhere = _norms.axis_names(self.axis_name)
        if everywhere:
            # A NaN on one device zeroes the step on all of them; the norms of
            # gathered matrices are equal everywhere (a pmax says so).
            ok = jax.lax.pmin(ok.astype(jnp.int32), everywhere).astype(bool)
            norms = jax.lax.pmax(norms, everywhere)
        ok = ok & _finite(norms)
        return SpectralMeasurement(
            norms,
            ok,
            norms,
            jnp.max(norms, initial=0.0),
            tuple(groups),
            tuple(gathers),
            self.mode == "soft",
        )
