"""Every clipping scope, each with its action.

A scope measures the updates (`Scope.measure`) and acts on them above the
bound (`Scope.apply`): rescale, clamp, or an action of its own. The public
functions in ``optaxclip._clipping`` build one and run the core step
(`optaxclip._core.Step`) over it. Measurements are data only.

- `GlobalScope`: the whole tree's ``ord``-norm; rescale.
- `ElementScope`: the largest absolute entry; clamp each entry.
- `StepRatioScope`: the update's norm over the params'; rescale (trust ratio).
- `MomentClampScope`: the global 2-norm; clamp each entry to its second
  moment (SPAM).
- `TensorScope`: each tensor's (or layer slice's) norm or RMS; rescale each.
- `ScaleAboveScope`: each tensor's largest entry; scale the entries above
  the bound (Stable-SPAM).
- `RelativeScope`: each tensor's largest move relative to its weights;
  rescale each (Clippy).
- `UnitScope`: each tensor's largest unit ratio to the params; rescale each
  unit (AGC).
- `GlobalNormalizeScope`, `TensorNormalizeScope`: as the global and tensor
  scopes; set each norm to the bound, up or down (GradientStabilizer).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _checks, _mesh, _norms, _numerics, _tree, _xla
from ._core import Act, Applied, Measurement, Scope
from ._numerics import (
    INF,
    acc_dtype,
    nan_to_inf,
    power_sum,
    rescale,
    safe_root,
    safe_scale,
    scale_leaf,
    tree_acc_dtype,
)
from ._tree import (
    float_leaves,
    full_like,
    leafwise,
    map_float,
    matching_float_leaves,
    zero_tree,
    zero_unless,
)
from .rules import bias_correction, one_minus


def _finite(norms: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(norms))


def _scalar_like(params: Any) -> jax.Array:
    return jnp.zeros((), tree_acc_dtype(params))


def _rescale_all(updates: Any, norm: jax.Array, act: Act) -> Applied:
    """Every leaf by one factor ``min(1, bound / norm)`` (a global decision)."""
    threshold, keep = act.threshold, act.keep
    out = map_float(lambda _, x: rescale(x, norm, threshold, keep), updates)
    return Applied(out, safe_scale(norm, threshold, keep), norm > threshold)


def _scale_each(updates: Any, factor: jax.Array, keep: jax.Array | None) -> Any:
    """Leaf ``i`` times ``factor[i]``, each factor a buffer of its own (not a
    slice), so equally shaped leaves share compiled kernels."""
    factors = _xla.split_entries(factor, [1] * factor.shape[0])
    return map_float(lambda i, x: scale_leaf(x, factors[i].reshape(()), keep), updates)


def _needs_params(owner: str, updates: Any, params: Any) -> None:
    if params is None:
        raise ValueError(
            f"{owner} needs the parameters: call `tx.update(updates, state, params)`."
        )
    _checks.check_params(owner, updates, params)


# ---------------------------------------------------------------------------
# Global and element scopes
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GlobalScope(Scope):
    """The whole pytree: one ``ord``-norm (each tensor's too, for the record)."""

    ord: Any = 2.0
    axis_name: Any = None
    partition_specs: Any = None
    owner: str = "clip_by_global_norm"
    per_tensor_stats: bool = False
    leafwise = True

    def norm_like(self, params):
        return _scalar_like(params)

    def measure(self, updates, params, extra_args):
        del params, extra_args
        norm, per_leaf = _norms.tree_norms(
            updates, self.ord, self.axis_name, self.partition_specs
        )
        return Measurement(norm, _finite(norm), norm, None, per_leaf)

    def apply(self, updates, measured, act):
        return _rescale_all(updates, measured.norms, act)


@dataclasses.dataclass(frozen=True)
class ElementScope(GlobalScope):
    """Every entry: the largest absolute entry is measured, entries clamped."""

    ord: Any = INF
    owner: str = "clip_by_value"

    def apply(self, updates, measured, act):
        threshold, keep = act.threshold, act.keep

        def clamp(_, x):
            if jnp.iscomplexobj(x):
                # The modulus is clamped, the phase kept.
                out = rescale(x, jnp.abs(x), threshold.astype(x.real.dtype), None)
            else:
                bound = threshold.astype(x.dtype)
                out = jnp.clip(x, -bound, bound)
            return zero_unless(keep, out)

        norms = measured.norms
        scale = safe_scale(norms, threshold, keep)
        return Applied(map_float(clamp, updates), scale, norms > threshold)


@dataclasses.dataclass(frozen=True)
class StepRatioScope(GlobalScope):
    """The whole update's norm relative to the whole parameters' norm."""

    eps: Any = 1e-3
    owner: str = "trust_ratio_clip"

    def measure(self, updates, params, extra_args):
        del extra_args
        _needs_params(self.owner, updates, params)
        acc = tree_acc_dtype(updates)
        specs = (self.axis_name, self.partition_specs)
        step, steps = _norms.tree_norms(updates, 2.0, *specs)
        size, sizes = _norms.tree_norms(params, 2.0, *specs)
        eps = jnp.asarray(self.eps, acc)
        ratio = step / jnp.maximum(size, eps)
        # Each tensor's own ratio: non-finite exactly where its update is.
        ratios = steps / jnp.maximum(sizes.astype(acc), eps)
        return Measurement(ratio, jnp.isfinite(ratio), ratio, None, ratios)


@dataclasses.dataclass(frozen=True)
class MomentClampScope(GlobalScope):
    """Each entry clamped relative to the EMA ``v`` of its clipped square.

    SPAM (``floor=None``): entries with ``g**2 > threshold * v`` become
    ``sign(g) * sqrt(threshold * v)``, where ``v > 0``, outside the guard
    steps after the start and each reset of ``v``. AdamWClip (``floor`` a
    number): each entry is clamped to ``max(threshold * sqrt(v_hat), floor)``,
    ``v_hat`` bias-corrected over the earlier finite steps, once
    ``warmup_steps`` have passed. Then ``v <- beta2 v + (1 - beta2) g_c**2``.

    Its state: ``nu`` (``v``) and ``finite_count`` (finite steps seen).
    """

    beta2: Any = 0.999
    reset_interval: Any = 0
    guard_steps: Any = 0
    floor: Any = None
    warmup_steps: Any = 0
    owner: str = "spam_clip"
    stateless = False

    def init(self, params):
        acc = lambda _, x: jnp.zeros_like(x, dtype=acc_dtype(x.dtype))  # noqa: E731
        return {"nu": map_float(acc, params), "finite_count": jnp.zeros((), jnp.int32)}

    def _bound(self, count, threshold, dtype):
        """``(reset, bound_of(nu))`` of this step."""
        if self.floor is None:
            t = count + 1
            interval = jnp.asarray(self.reset_interval, jnp.int32)
            guard = jnp.asarray(self.guard_steps, jnp.int32)
            periodic = interval > 0
            phase = jnp.where(periodic, t % jnp.maximum(interval, 1), t)
            active = (t >= guard) & (phase >= guard)

            def spam(nu):
                bound = safe_root(threshold.astype(nu.dtype) * nu, 2.0)
                return jnp.where(active & (nu > 0), bound, full_like(bound, INF))

            return periodic & (phase == 0), spam
        # ``1 - beta2**n`` over the n >= 1 gradients ``nu`` holds (none: nu = 0).
        correction = bias_correction(self.beta2, jnp.maximum(count, 1), dtype)
        floor = jnp.where(count >= self.warmup_steps, self.floor, INF).astype(dtype)

        def adam(nu):
            rms = safe_root(nu / correction.astype(nu.dtype), 2.0)
            return jnp.maximum(threshold.astype(nu.dtype) * rms, floor)

        return jnp.asarray(False), adam

    def apply(self, updates, measured, act):
        nu_tree, count = act.state["nu"], act.state["finite_count"]
        _checks.check_same_tree(self.owner, nu_tree, updates)
        acc = measured.norms.dtype
        reset, bound_of = self._bound(count, act.threshold, acc)
        b2, rest = jnp.asarray(self.beta2, acc), one_minus(self.beta2, acc)
        nus, counted = [], []

        def clip_leaf(_, g, nu):
            nu = jnp.where(reset, full_like(nu, 0), nu)
            magnitude = jnp.abs(g).astype(nu.dtype)
            bound = bound_of(nu)
            over = magnitude > bound
            safe = jnp.where(over, magnitude, full_like(magnitude, 1))
            factor = jnp.where(over, bound / safe, full_like(safe, 1))
            new_mag = jnp.where(over, bound, magnitude)
            nus.append(b2.astype(nu.dtype) * nu + rest.astype(nu.dtype) * new_mag**2)
            counted.append(jnp.sum(over, dtype=jnp.int32))
            return scale_leaf(g, factor, None)

        clipped = map_float(clip_leaf, updates, nu_tree)
        specs = (self.axis_name, self.partition_specs)
        after = _norms.global_norm(clipped, 2, specs[0], partition_specs=specs[1])
        n_clipped = _norms.count_entries(counted, updates, *specs)
        norm = measured.norms
        scale = jnp.where(norm > 0, after.astype(acc) / jnp.where(norm > 0, norm, 1), 1)
        moments = {
            "nu": map_float(lambda i, _: nus[i], nu_tree),
            "finite_count": optax.safe_increment(count),
        }
        out = zero_tree(act.keep, clipped)
        return Applied(out, zero_unless(act.keep, scale), n_clipped, moments)


# ---------------------------------------------------------------------------
# Tensor scopes
# ---------------------------------------------------------------------------


def _stacked_per_leaf(stacked_axes, tree):
    return leafwise(stacked_axes, tree, lambda v: isinstance(v, int | np.integer))


@dataclasses.dataclass(frozen=True)
class TensorMeasurement(Measurement):
    """One norm per tensor (or stacked layer slice), with each leaf's piece.

    Attributes:
      layer_axes: per leaf, the leading stacked axes kept apart.
      pieces: per leaf, its norms shaped for broadcasting against it.
    """

    layer_axes: tuple[tuple[int, ...], ...] = ()
    pieces: tuple[jax.Array, ...] = ()


@dataclasses.dataclass(frozen=True)
class TensorScope(Scope):
    """Each tensor (leaf), or each stacked layer slice of it; ``rms``: the
    root-mean-square entry rather than the ``ord``-norm."""

    ord: Any = 2.0
    axis_name: Any = None
    partition_specs: Any = None
    stacked_axes: Any = None
    rms: bool = False
    owner: str = "clip_by_norm"

    def _layer_axes(self, tree):
        leaves = float_leaves(tree)
        out = []
        stacked = _stacked_per_leaf(self.stacked_axes, tree)
        for x, k in zip(leaves, stacked, strict=True):
            k = int(k or 0)
            if k > np.ndim(x):
                raise ValueError(
                    f"`stacked_axes`={k} exceeds the rank of a leaf of shape "
                    f"{np.shape(x)}."
                )
            out.append(tuple(range(k)))
        return leaves, out

    def norm_like(self, params):
        leaves, layers = self._layer_axes(params)
        n = sum(_norms.segment_count(x, k) for x, k in zip(leaves, layers, strict=True))
        return jnp.zeros((n,), tree_acc_dtype(params))

    def _total(self, norms, leaves, layers):
        # The whole tree's measurement, in the scope's own terms: the
        # ``ord``-norm of the tensors' norms, or the RMS of every entry.
        if not leaves:
            return jnp.zeros((), norms.dtype)
        if not self.rms:
            return _norms.norm_of_norms(norms, self.ord)
        counts = [
            _norms.segment_count(x, k) for x, k in zip(leaves, layers, strict=True)
        ]
        sizes = np.repeat(
            [x.size // max(c, 1) for x, c in zip(leaves, counts, strict=True)], counts
        )
        weights = jnp.asarray(sizes / max(sizes.sum(), 1), norms.dtype)
        return safe_root(jnp.sum(weights * norms * norms), 2.0)

    def measure(self, updates, params, extra_args):
        del params, extra_args
        leaves, layers = self._layer_axes(updates)
        reduced = [
            tuple(a for a in range(x.ndim) if a not in k)
            for x, k in zip(leaves, layers, strict=True)
        ]
        groups = _mesh.reduction_groups(
            updates, leaves, self.axis_name, self.partition_specs, reduced
        )
        segments = _norms.segments(leaves, self.ord, layers, groups, self.rms)
        dtype = tree_acc_dtype(updates)
        pieces = tuple(
            piece if piece.dtype == dtype else piece.astype(dtype)
            for piece in segments.pieces
        )
        norms = segments.norms.astype(dtype)
        total = self._total(norms, leaves, layers)
        return TensorMeasurement(
            norms, _finite(norms), total, None, None, tuple(layers), pieces
        )

    def apply(self, updates, measured, act):
        threshold, keep = act.threshold, act.keep
        layer_axes, pieces = measured.layer_axes, measured.pieces
        factors = None
        if threshold.ndim:
            # A rule's bounds: every leaf's factor is computed in one vector
            # and split off it into a buffer of its own (see `_xla`).
            counts = [
                _norms.segment_count(x, k)
                for x, k in zip(float_leaves(updates), layer_axes, strict=True)
            ]
            factors = _xla.leaf_scales(pieces, threshold, counts)

        def scale(i, x):
            if factors is not None:
                factor = _norms.segment_view(factors[i], x, layer_axes[i])
                return scale_leaf(x, factor, keep)
            piece = pieces[i]
            if not layer_axes[i]:
                # One norm for the leaf: a scalar, as the global scope's,
                # so the division fuses into the pass over the leaf.
                piece = jnp.reshape(piece, ())
            return rescale(x, piece, threshold, keep)

        norms = measured.norms
        return Applied(
            map_float(scale, updates),
            safe_scale(norms, threshold, keep),
            jnp.sum(norms > threshold),
        )


@dataclasses.dataclass(frozen=True)
class ScaleAboveScope(TensorScope):
    """Stable-SPAM: per tensor, the entries above its bound ``T`` are
    multiplied by ``T / max|g|``; the others are kept."""

    ord: Any = INF
    owner: str = "stable_spam_clip"

    def apply(self, updates, measured, act):
        largest = measured.norms
        bound = jnp.broadcast_to(act.threshold, largest.shape)
        factor = safe_scale(largest, bound)
        # Each leaf's bound and factor in buffers of their own (see `_xla`).
        ones = [1] * largest.shape[0]
        bounds = _xla.split_entries(bound, ones)
        factors = _xla.split_entries(factor, ones)
        counted = []

        def clip_leaf(i, g):
            magnitude = jnp.abs(g).astype(largest.dtype)
            mask = magnitude > bounds[i].reshape(())
            counted.append(jnp.sum(mask, dtype=jnp.int32))
            one = full_like(magnitude, 1)
            return scale_leaf(g, jnp.where(mask, factors[i].reshape(()), one), act.keep)

        out = map_float(clip_leaf, updates)
        specs = (self.axis_name, self.partition_specs)
        n_clipped = _norms.count_entries(counted, updates, *specs)
        return Applied(out, zero_unless(act.keep, factor), n_clipped)


@dataclasses.dataclass(frozen=True)
class RelativeScope(Scope):
    """Clippy: each tensor's largest ``|u| / (relative * |w| + absolute)``."""

    relative: Any = 0.1
    absolute: Any = 1e-7
    axis_name: Any = None
    owner: str = "clippy"

    def norm_like(self, params):
        return _norms.per_tensor_like(params)

    def measure(self, updates, params, extra_args):
        del extra_args
        _needs_params(self.owner, updates, params)
        acc = tree_acc_dtype(updates)
        leaves = float_leaves(updates)
        if not leaves:
            empty = jnp.zeros((0,), acc)
            return Measurement(empty, jnp.asarray(True), jnp.zeros((), acc))
        weights = matching_float_leaves(updates, params)
        rel, ab = jnp.asarray(self.relative, acc), jnp.asarray(self.absolute, acc)
        ratios, largest = [], []
        for u, w in zip(leaves, weights, strict=True):
            mag = jnp.abs(u).astype(acc)
            room = rel * jnp.abs(w).astype(acc) + ab
            moving = mag > 0
            ratio = jnp.where(moving, mag / jnp.where(moving, room, 1), 0)
            ratios.append(jnp.max(ratio, initial=0.0))
            largest.append(jnp.max(nan_to_inf(mag), initial=0.0))
        names = _mesh.axis_names(self.axis_name)
        ratio = _mesh.cross_device(_xla.stack_barrier(ratios), names, INF)
        big = _mesh.cross_device(_xla.stack_barrier(largest), names, INF)
        # A tensor with a NaN or infinite entry reads as such (a NaN entry
        # does not move its ratio, whose comparison is False).
        ratio = jnp.where(jnp.isfinite(big), ratio, big)
        return Measurement(ratio, jnp.all(jnp.isfinite(big)), jnp.max(ratio))

    def apply(self, updates, measured, act):
        norms, threshold, keep = measured.norms, act.threshold, act.keep
        scale = safe_scale(norms, threshold, keep)
        clipped = jnp.sum(norms > threshold, dtype=jnp.int32)
        return Applied(_scale_each(updates, scale, keep), scale, clipped)


# ---------------------------------------------------------------------------
# Unit scope (AGC)
# ---------------------------------------------------------------------------


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


@dataclasses.dataclass(frozen=True)
class UnitScope(Scope):
    """Each unit (row, column, filter) of each tensor, relative to the params."""

    eps: Any = 1e-3
    axis: Any = None
    axis_name: Any = None
    partition_specs: Any = None
    stacked_axes: Any = None
    owner: str = "adaptive_grad_clip"

    def norm_like(self, params):
        return _norms.per_tensor_like(params)

    def _axes(self, x, k):
        inner = _norms.unit_axes(jax.ShapeDtypeStruct(x.shape[k:], x.dtype), self.axis)
        return tuple(a + k for a in inner)

    def measure(self, updates, params, extra_args):
        del extra_args
        _needs_params(self.owner, updates, params)
        leaves = float_leaves(updates)
        p_leaves = matching_float_leaves(updates, params)
        ks = [int(k or 0) for k in _stacked_per_leaf(self.stacked_axes, updates)]
        axes = [self._axes(x, k) for x, k in zip(leaves, ks, strict=True)]
        groups = _mesh.reduction_groups(
            updates, leaves, self.axis_name, self.partition_specs, axes
        )
        eps = jnp.asarray(self.eps, jnp.float32)
        units = []
        for x, w, ax, names in zip(leaves, p_leaves, axes, groups, strict=True):
            g_sum = power_sum(x, 2.0, ax, keepdims=True)
            w_sum = power_sum(w, 2.0, ax, keepdims=True)
            g_norm = safe_root(_mesh.cross_device(g_sum, names, 2.0), 2.0)
            w_norm = safe_root(_mesh.cross_device(w_sum, names, 2.0), 2.0)
            units.append((g_norm, jnp.maximum(w_norm, eps.astype(w_sum.dtype))))
        acc = tree_acc_dtype(updates)
        if not units:
            empty = jnp.zeros((0,), acc)
            return UnitMeasurement(empty, jnp.asarray(True), jnp.zeros((), acc))
        # Inside shard_map, units split along a dim that is not reduced live on
        # different devices: maxima and minima are taken across every named
        # axis (idempotent for replicated leaves), unit counts are summed only
        # across the axes that split units (not the ones that split a unit).
        split = [
            names
            for names, _ in _mesh.leaf_mesh_axes(
                updates, self.axis_name, self.partition_specs
            )
        ]
        everywhere = tuple(dict.fromkeys(n for names in split for n in names))
        unit_groups = tuple(
            tuple(n for n in s if n not in g)
            for s, g in zip(split, groups, strict=True)
        )
        ratios = [jnp.max(nan_to_inf(g / w)).astype(acc) for g, w in units]
        ratios = _mesh.cross_device(_xla.stack_barrier(ratios), everywhere, INF)
        return UnitMeasurement(
            ratios,
            _finite(ratios),
            jnp.max(ratios),
            None,
            None,
            tuple(units),
            everywhere,
            unit_groups,
        )

    def apply(self, updates, measured, act):
        threshold, keep = act.threshold, act.keep
        units = measured.units
        smallest, clipped = [], []
        bounds = None
        if threshold.ndim:
            # A rule's bounds, split into a buffer per leaf (see `_xla`).
            bounds = _xla.split_entries(threshold, [1] * len(units))

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
            dtype = measured.norms.dtype
            return Applied(out, jnp.ones((0,), dtype), jnp.zeros((), jnp.int32))
        factor = _xla.stack_barrier(smallest).astype(measured.norms.dtype)
        if measured.everywhere:
            factor = jax.lax.pmin(factor, measured.everywhere)
        total = _mesh.cross_device_vector(
            _xla.stack_barrier(clipped), [1] * len(units), measured.unit_groups, 2.0
        )
        return Applied(out, zero_unless(keep, factor), jnp.sum(total))


# ---------------------------------------------------------------------------
# Normalize: set each measured norm to its bound, up or down
# ---------------------------------------------------------------------------


def normalize_scale(norms: jax.Array, bound: jax.Array) -> jax.Array:
    """``bound / norms``: the factor that sets each norm to its bound.

    A zero norm gives 1 (a zero tensor stays zero, with no division by zero
    and a finite derivative), and so does an infinite bound (a rule with no
    history yet: the update passes unchanged). A NaN norm gives 1 (NaN
    reaches the output under ``nonfinite="propagate"``), an infinite one 0.
    Every operand is derived from ``norms``, so it carries its sharding.
    """
    bound = jnp.asarray(bound).astype(norms.dtype) + full_like(norms, 0)
    acts = (norms > 0) & (bound != INF)
    one = full_like(bound, 1)
    return jnp.where(acts, bound, one) / jnp.where(acts, norms, one)


def normalize(
    updates: Any,
    factor: jax.Array,
    layer_axes: tuple[tuple[int, ...], ...],
    keep: jax.Array | None,
) -> Any:
    """Multiplies each float leaf by its entries of ``factor`` (one fused pass).

    ``factor`` is a scalar (a global decision) or one entry per tensor or
    layer slice (leaf ``i`` with the stacked axes ``layer_axes[i]``); each
    leaf's entries are split off into a buffer of their own (see `_xla`).
    """
    if not factor.ndim:
        return map_float(lambda _, x: scale_leaf(x, factor, keep), updates)
    counts = [
        _norms.segment_count(x, k)
        for x, k in zip(float_leaves(updates), layer_axes, strict=True)
    ]
    parts = _xla.split_entries(factor, counts)
    return map_float(
        lambda i, x: scale_leaf(
            x, _norms.segment_view(parts[i], x, layer_axes[i]), keep
        ),
        updates,
    )


def _normalized(updates: Any, measured: Any, act: Act, layer_axes: Any) -> Applied:
    norms, threshold = measured.norms, act.threshold
    factor = normalize_scale(norms, threshold)
    above = jnp.sum(norms > threshold) if norms.ndim else norms > threshold
    out = normalize(updates, factor, layer_axes, act.keep)
    return Applied(out, zero_unless(act.keep, factor), above)


@dataclasses.dataclass(frozen=True)
class GlobalNormalizeScope(GlobalScope):
    """The whole tree's ``ord``-norm set to the bound (``clipped``: above it)."""

    def apply(self, updates, measured, act):
        return _normalized(updates, measured, act, ())


@dataclasses.dataclass(frozen=True)
class TensorNormalizeScope(TensorScope):
    """Each tensor's (or layer slice's) norm set to its bound (GradientStabilizer)."""

    def apply(self, updates, measured, act):
        return _normalized(updates, measured, act, measured.layer_axes)


# Spectral scope: each matrix's singular values (clip_by_spectral_norm; the
# numerics are in `_norms`: svd_parts / svd_clamp, gram_parts / soft_clip)
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpectralMeasurement(Measurement):
    """Each matrix's top singular value, with its group's decomposition.

    Attributes:
      groups: per matrix shape, ``(members, entries, parts)``: each member
        leaf's ``(index, leaf, matrix count)``, the entries of its matrices in
        ``norms``, and the batched decomposition's parts.
      gathers: per float leaf, the ``(mesh axes, dim)`` it was gathered over.
    """

    groups: tuple[tuple[Any, np.ndarray, tuple[Any, ...]], ...] = ()
    gathers: tuple[tuple[tuple[tuple[str, ...], int], ...], ...] = ()


@dataclasses.dataclass(frozen=True)
class SpectralScope(Scope):
    """Each matrix (2-D leaf or stacked slice): its top singular value; each
    other leaf (or stacked slice) holds an entry of 0 (inf where it holds a
    NaN or an Inf), as ``clip_by_norm``'s entries are laid out."""

    mode: str = "exact"
    stacked_axes: Any = None
    axis_name: Any = None
    partition_specs: Any = None
    owner: str = "clip_by_spectral_norm"

    def _entries(self, tree):
        # Per float leaf: its stacked axes, its number of entries (one per
        # stacked slice, as `clip_by_norm`), and whether it is a matrix.
        leaves = float_leaves(tree)
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
        return jnp.zeros((sum(counts),), tree_acc_dtype(params))

    def measure(self, updates, params, extra_args):
        del params, extra_args
        leaves, ks, counts, matrix = self._entries(updates)
        gathers = _mesh.gather_plan(updates, self.axis_name, self.partition_specs)
        shapes, offsets, markers = {}, np.cumsum([0, *counts]), []
        acc = tree_acc_dtype(updates)
        for i, (x, k) in enumerate(zip(leaves, ks, strict=True)):
            if matrix[i]:
                x = _mesh.gather(x, gathers[i])
                count = math.prod(x.shape[:k])
                key = (x.shape[-2:], x.dtype)
                shapes.setdefault(key, []).append((i, x, count, offsets[i]))
            else:
                # Not a matrix: its entries (per stacked slice) are 0, or
                # inf where it holds a NaN or an Inf.
                ok = jnp.all(jnp.isfinite(x), axis=tuple(range(k, x.ndim)))
                marker = jnp.where(ok, 0, jnp.inf).astype(acc).reshape(-1)
                markers.append(_tree.replicated(marker))
        groups, tops, order = [], [], []
        parts_of = _norms.gram_parts if self.mode == "soft" else _norms.svd_parts
        for (shape, dtype), members in shapes.items():
            dt = _numerics.compute_dtype(dtype)
            batch = jnp.concatenate(
                [
                    _tree.replicated(x).reshape(-1, *shape).astype(dt)
                    for _, x, _, _ in members
                ]
            )
            top, parts = parts_of(batch)
            entries = np.concatenate([np.arange(o, o + c) for _, _, c, o in members])
            groups.append((tuple((i, x, c) for i, x, c, _ in members), entries, parts))
            tops.append(top.astype(acc))
            order.append(entries)
        filled = np.concatenate([*order, np.zeros((0,), int)])
        rest = np.setdiff1d(np.arange(offsets[-1]), filled)
        source = np.empty(offsets[-1], int)
        source[filled], source[rest] = (
            np.arange(filled.size),
            filled.size + np.arange(rest.size),
        )
        norms = jnp.concatenate([*tops, *markers, jnp.zeros((0,), acc)])[source]
        everywhere = _mesh.axis_names(self.axis_name)
        if everywhere:
            # A NaN on one device zeroes the step on all of them (an inf
            # marker survives the max); the entries of gathered matrices are
            # equal everywhere (the pmax says so to shard_map).
            norms = jax.lax.pmax(norms, everywhere)
        ok = _finite(norms)
        total = jnp.max(norms, initial=0.0)
        return SpectralMeasurement(
            norms, ok, total, groups=tuple(groups), gathers=tuple(gathers)
        )

    def apply(self, updates, measured, act):
        threshold, keep, out = act.threshold, act.keep, {}
        for members, entries, parts in measured.groups:
            bound = threshold[entries] if threshold.ndim else threshold
            bound = jnp.broadcast_to(bound, entries.shape)
            if self.mode == "soft":
                batch = _norms.soft_clip(parts, bound)
            else:
                batch = _norms.svd_clamp(parts, bound, measured.norms[entries])
            pieces = _xla.split_batch(batch, [c for _, _, c in members])
            for (i, x, _), piece in zip(members, pieces, strict=True):
                piece = piece.reshape(x.shape).astype(x.dtype)
                out[i] = _mesh.scatter(piece, measured.gathers[i])

        def clamp(i, x):
            return zero_unless(keep, _tree.sharded_like(x, out.get(i, x)))

        norms = measured.norms
        clipped = jnp.sum(norms > threshold)
        return Applied(
            map_float(clamp, updates), safe_scale(norms, threshold, keep), clipped
        )
