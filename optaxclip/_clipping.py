"""The clipping scopes: element, tensor, unit and global.

Every public function here builds one transform from three choices: a scope
(what is measured), a threshold rule (the bound) and an action (rescale or
clamp). `_transform` is the single implementation of the step: measure
once, ask the rule for the threshold, keep the rule's statistics clean of
non-finite steps, then scale in one fused pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _checks, _norms
from ._stats import ClipState, ClipStats
from .rules import Rule, as_rule, check_threshold, fixed, scheduled

__all__ = [
    "adaptive_grad_clip",
    "clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
]

Threshold = Any  # a number, a scalar array, an optax.Schedule or a Rule
_NONFINITE = ("zero", "propagate")


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
    scope = _GlobalScope(
        ord=_norms.check_ord(ord), axis_name=axis_name, partition_specs=partition_specs
    )
    return _transform(scope, as_rule(max_norm, "max_norm"), nonfinite)


def clip_by_norm(
    max_norm: Threshold,
    ord: int | float | str = 2,  # noqa: A002
    *,
    nonfinite: str = "zero",
    axis_name: _norms.AxisName = None,
    partition_specs: Any = None,
    stacked_axes: Any = None,
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
    scope = _TensorScope(
        ord=_norms.check_ord(ord),
        axis_name=axis_name,
        partition_specs=partition_specs,
        stacked_axes=_check_stacked(stacked_axes),
        normalize=False,
    )
    return _transform(scope, as_rule(max_norm, "max_norm"), nonfinite)


def clip_by_block_rms(
    threshold: Threshold,
    *,
    nonfinite: str = "zero",
    axis_name: _norms.AxisName = None,
    partition_specs: Any = None,
    stacked_axes: Any = None,
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
    scope = _TensorScope(
        ord=2.0,
        axis_name=axis_name,
        partition_specs=partition_specs,
        stacked_axes=_check_stacked(stacked_axes),
        normalize=True,
    )
    return _transform(scope, as_rule(threshold, "threshold"), nonfinite)


def clip_by_value(
    max_delta: Threshold,
    *,
    nonfinite: str = "zero",
    axis_name: _norms.AxisName = None,
    partition_specs: Any = None,
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
    scope = _ElementScope(axis_name=axis_name, partition_specs=partition_specs)
    return _transform(scope, as_rule(max_delta, "max_delta"), nonfinite)


clip = clip_by_value


def adaptive_grad_clip(
    clipping: Threshold,
    eps: jax.typing.ArrayLike = 1e-3,
    axis: int | tuple[int, ...] | None = None,
    *,
    nonfinite: str = "zero",
    axis_name: _norms.AxisName = None,
    partition_specs: Any = None,
    stacked_axes: Any = None,
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
    check_threshold(eps, "eps")
    scope = _UnitScope(
        eps=eps,
        axis=axis,
        axis_name=axis_name,
        partition_specs=partition_specs,
        stacked_axes=_check_stacked(stacked_axes),
    )
    return _transform(scope, as_rule(clipping, "clipping"), nonfinite)


# ---------------------------------------------------------------------------
# The one transform
# ---------------------------------------------------------------------------


def _transform(
    scope: Any, rule: Rule, nonfinite: str
) -> optax.GradientTransformationExtraArgs:
    zero_nonfinite = check_nonfinite(nonfinite)

    def init_fn(params):
        norm_like = scope.norm_like(params)
        return ClipState(
            rule_state=rule.init(norm_like), stats=ClipStats.zeros(norm_like)
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if state is None or isinstance(state, optax.EmptyState):
            state = fresh_state(rule, state, lambda: init_fn(updates))
        if not isinstance(state, ClipState):
            raise TypeError(
                f"Expected the state of an optaxclip transform (ClipState); got "
                f"{type(state).__name__}. Was `init` called on this transform?"
            )
        measured = scope.measure(updates, params)
        norms = measured.norms
        _check_shape(norms, state.stats.norm)
        count = state.stats.count
        threshold, rule_state = rule.update(state.rule_state, norms, count)
        # A scalar threshold (fixed, scheduled) stays a scalar for scaling;
        # the stats record it per entry.
        threshold = jnp.maximum(jnp.asarray(threshold, norms.dtype), 0)
        finite = jnp.all(jnp.isfinite(norms))
        rule_state = keep_if(finite, rule_state, state.rule_state)
        keep = finite if zero_nonfinite else None
        new_updates, scale, clipped = scope.apply(updates, measured, threshold, keep)
        stats = ClipStats(
            norm=norms,
            threshold=jnp.broadcast_to(threshold, norms.shape),
            scale=scale,
            clipped=jnp.asarray(clipped, jnp.int32),
            nonfinite_count=state.stats.nonfinite_count + (~finite).astype(jnp.int32),
            count=optax.safe_increment(count),
        )
        return new_updates, ClipState(rule_state=rule_state, stats=stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def fresh_state(rule: Rule, given: Any, init: Callable[[], Any]) -> Any:
    """The state to use when ``update`` is given ``None`` / ``EmptyState()``.

    optax's stateless transforms accept ``tx.update(g, None)``; so does a
    transform whose threshold has no history (a number or a schedule, which
    is then read at step 0): its state is created fresh. A rule that learns
    from the run refuses: its history would restart every step.
    """
    if isinstance(rule, fixed | scheduled):
        return init()
    raise ValueError(
        f"`update` got state {given!r}, but this transform's threshold rule "
        f"({type(rule).__name__}) learns from the norms of earlier steps, which "
        "would restart on every step. Call `state = tx.init(params)` once and "
        "pass the state that each `update` returns to the next one."
    )


def check_nonfinite(nonfinite: str) -> bool:
    """Validates the ``nonfinite`` policy; True for ``"zero"``."""
    _checks.check_choice(nonfinite, "nonfinite", _NONFINITE)
    return nonfinite == "zero"


def keep_if(condition: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``condition`` holds, else ``old`` (leafwise select)."""
    return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new, old)


def _check_shape(norms: jax.Array, recorded: jax.Array) -> None:
    if norms.shape != recorded.shape:
        raise ValueError(
            "The updates do not match the tree this transform was initialized "
            f"with: it measured {norms.shape[0] if norms.ndim else 1} tensor "
            f"norm(s) but its state holds {recorded.shape}. Call `init` with "
            "params of the same structure as the updates."
        )


def _check_stacked(stacked_axes: Any) -> Any:
    for k in jax.tree.leaves(stacked_axes):
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
            raise ValueError(
                f"`stacked_axes` must be a non-negative int (or a pytree prefix of "
                f"them); got {k!r}. Under optax.inject_hyperparams, pass it in "
                "`static_args`."
            )
    return stacked_axes


def scale_factor(
    norms: jax.Array, threshold: jax.Array, keep: jax.Array | None = None
) -> jax.Array:
    """``min(1, threshold / norms)`` with no division by zero (and no NaN grads).

    A norm at or under the threshold gives exactly 1 (a zero norm with a
    zero threshold too), an infinite norm 0, and a NaN norm a NaN scale, as
    in optax, so ``nonfinite="propagate"`` reproduces optax; the default
    policy passes ``keep`` (the step's finiteness), which makes the scale 0
    on a non-finite step.
    """
    return _norms.piece_scale(norms, threshold, False, keep)


def scale_leaf(x: jax.Array, scale: jax.Array, keep: jax.Array | None) -> jax.Array:
    """``x * scale`` computed in the accumulation dtype, cast back to ``x.dtype``.

    With ``keep`` given, entries are zeroed where it is False (a select, so a
    NaN entry becomes 0 rather than NaN * 0).
    """
    dtype = _norms.compute_dtype(x.dtype)
    a = x if x.dtype == dtype else jax.lax.convert_element_type(x, dtype)
    out = a * (scale if scale.dtype == dtype else scale.astype(dtype))
    out = out if out.dtype == x.dtype else jax.lax.convert_element_type(out, x.dtype)
    return zero_unless(keep, out)


def zero_unless(keep: jax.Array | None, x: jax.Array) -> jax.Array:
    """``x`` where ``keep`` holds, else zeros (None: ``x``).

    ``keep`` is a scalar or broadcasts against ``x`` (one flag per example,
    say). A select, so a NaN entry becomes 0 rather than NaN * 0. The zeros
    and a broadcast flag are built from ``x`` (``zeros_like``), so they carry
    its sharding: on meshes with Explicit axes a select needs operands of
    one sharding.
    """
    if keep is None:
        return x
    if jnp.ndim(keep):
        keep = jnp.logical_or(jnp.zeros_like(x, dtype=bool), keep)
    return jax.lax.select(keep, x, jnp.zeros_like(x))


def map_float(fn: Callable[..., jax.Array], tree: Any, *rest: Any) -> Any:
    """Applies ``fn(i, leaf, *rest_leaves)`` to the float leaves, in order.

    Integer leaves are returned untouched; ``None`` and ``MaskedNode`` stay.
    """
    leaves, treedef = jax.tree.flatten(tree)
    rest_leaves = [treedef.flatten_up_to(r) for r in rest]
    out, i = [], 0
    for j, x in enumerate(leaves):
        if _norms.is_float(x):
            out.append(fn(i, x, *(r[j] for r in rest_leaves)))
            i += 1
        else:
            out.append(x)
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------
# Scopes: what is measured and how the bound is applied
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Measured:
    """A scope's measurement: the norms the rule sees, plus reusable parts."""

    norms: jax.Array
    parts: Any = None


@dataclasses.dataclass(frozen=True)
class _GlobalScope:
    ord: Any
    axis_name: Any
    partition_specs: Any

    def norm_like(self, params):
        return jnp.zeros((), _norms.tree_acc_dtype(params))

    def measure(self, updates, params):
        del params
        norm = _norms.global_norm(
            updates, self.ord, self.axis_name, partition_specs=self.partition_specs
        )
        return Measured(norm.astype(_norms.tree_acc_dtype(updates)))

    def apply(self, updates, measured, threshold, keep):
        # One scalar kernel computes both the recorded scale and the leaves'
        # factor: 0 on a zeroed step, where a select on ``factor > 0`` zeroes
        # the entries (NaN * 0 is NaN). The per-entry loops then read this
        # one scalar only; reading the norm as well, XLA would evaluate its
        # finiteness again for every entry (up to a fifth of the scaling
        # pass on CPU). One kernel for both also keeps a one-leaf step within
        # XLA CPU's in-line execution threshold (at most 8 kernels), the
        # fast path for small trees.
        factor = scale_factor(measured.norms, threshold, keep)
        kept = None if keep is None else factor > 0
        out = map_float(lambda _, x: scale_leaf(x, factor, kept), updates)
        return out, factor, measured.norms > threshold


@dataclasses.dataclass(frozen=True)
class _ElementScope:
    axis_name: Any
    partition_specs: Any

    def norm_like(self, params):
        return jnp.zeros((), _norms.tree_acc_dtype(params))

    def measure(self, updates, params):
        del params
        largest = _norms.global_norm(
            updates, "inf", self.axis_name, partition_specs=self.partition_specs
        )
        return Measured(largest.astype(_norms.tree_acc_dtype(updates)))

    def apply(self, updates, measured, threshold, keep):
        def clamp(_, x):
            if jnp.iscomplexobj(x):
                out = scale_leaf(
                    x, scale_factor(jnp.abs(x), threshold.astype(x.real.dtype)), None
                )
            else:
                bound = threshold.astype(x.dtype)
                out = jnp.clip(x, -bound, bound)
            return zero_unless(keep, out)

        scale = scale_factor(measured.norms, threshold, keep)
        return map_float(clamp, updates), scale, measured.norms > threshold


def _stacked_per_leaf(stacked_axes, tree):
    return _norms.leafwise(
        stacked_axes, tree, lambda v: isinstance(v, int | np.integer)
    )


@dataclasses.dataclass(frozen=True)
class _TensorScope:
    ord: Any
    axis_name: Any
    partition_specs: Any
    stacked_axes: Any
    normalize: bool

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

    def measure(self, updates, params):
        del params
        leaves, keep = self._keep_axes(updates)
        reduced = [
            tuple(a for a in range(x.ndim) if a not in k)
            for x, k in zip(leaves, keep, strict=True)
        ]
        groups = _norms.reduction_groups(
            updates, leaves, self.axis_name, self.partition_specs, reduced
        )
        norms, pieces, squared = _norms.segment_norms(
            leaves, self.ord, keep, groups, self.normalize, pieces=True
        )
        dtype = _norms.tree_acc_dtype(updates)
        pieces = [
            piece if piece.dtype == dtype else piece.astype(dtype) for piece in pieces
        ]
        return Measured(norms.astype(dtype), (leaves, keep, pieces, squared))

    def apply(self, updates, measured, threshold, keep_mask):
        leaves, keep, pieces, squared = measured.parts
        counts = [_norms.segment_count(x, k) for x, k in zip(leaves, keep, strict=True)]
        offsets = np.cumsum([0, *counts])

        def rescale(i, x):
            # Each leaf is scaled from its own measurement, not from a slice
            # of the norm vector, and a scalar threshold is used as is, so
            # equally shaped leaves share one compiled kernel.
            bound = threshold
            if threshold.ndim:
                bound = _norms.segment_view(
                    threshold[offsets[i] : offsets[i + 1]], x, keep[i]
                )
            return scale_leaf(
                x, _norms.piece_scale(pieces[i], bound, squared), keep_mask
            )

        out = map_float(rescale, updates)
        scale = scale_factor(measured.norms, threshold, keep_mask)
        return out, scale, jnp.sum(measured.norms > threshold)


@dataclasses.dataclass(frozen=True)
class _UnitScope:
    eps: Any
    axis: Any
    axis_name: Any
    partition_specs: Any
    stacked_axes: Any

    def norm_like(self, params):
        n = len(_norms.float_leaves(params))
        return jnp.zeros((n,), _norms.tree_acc_dtype(params))

    def _axes(self, x, k):
        inner = _norms.unit_axes(jax.ShapeDtypeStruct(x.shape[k:], x.dtype), self.axis)
        return tuple(a + k for a in inner)

    def measure(self, updates, params):
        if params is None:
            raise ValueError(
                "adaptive_grad_clip needs the parameters: call "
                "`tx.update(updates, state, params)`."
            )
        _checks.check_params("adaptive_grad_clip", updates, params)
        leaves = _norms.float_leaves(updates)
        p_leaves = [
            p
            for u, p in zip(
                jax.tree.leaves(updates), jax.tree.leaves(params), strict=True
            )
            if _norms.is_float(u)
        ]
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
            return Measured(jnp.zeros((0,), acc), ([], (), []))
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
        unit_groups = [
            tuple(n for n in s if n not in g)
            for s, g in zip(split, groups, strict=True)
        ]
        ratios = [jnp.max(g / w).astype(acc) for g, w in units]
        ratios = _norms.cross_device(
            _norms.stack_barrier(ratios), everywhere, _norms._INF
        )
        return Measured(ratios, (units, everywhere, unit_groups))

    def apply(self, updates, measured, threshold, keep):
        units, everywhere, unit_groups = measured.parts
        smallest, clipped = [], []

        def rescale(i, x):
            g_norm, w_norm = units[i]
            # A scalar threshold is used as is (no per-leaf slice), so equally
            # shaped leaves share one compiled kernel.
            bound = threshold[i] if threshold.ndim else threshold
            max_norm = bound.astype(w_norm.dtype) * w_norm
            # Not "g_norm > max_norm": a NaN unit norm is rescaled, as in
            # optax, so NaN reaches the whole unit under "propagate" (the
            # default policy zeroes the step anyway).
            over = ~(g_norm <= max_norm)
            s = jnp.where(over, max_norm / jnp.maximum(g_norm, 1e-6), 1.0)
            smallest.append(jnp.min(s, initial=1.0))
            clipped.append(jnp.sum(g_norm > max_norm, dtype=jnp.int32))
            return scale_leaf(x, s, keep)

        out = map_float(rescale, updates)
        if not units:
            return out, jnp.ones((0,), measured.norms.dtype), jnp.zeros((), jnp.int32)
        scale = _norms.stack_barrier(smallest).astype(measured.norms.dtype)
        if everywhere:
            scale = jax.lax.pmin(scale, everywhere)
        scale = zero_unless(keep, scale)
        clipped = _norms._cross_device_vector(
            _norms.stack_barrier(clipped), [1] * len(units), unit_groups, 2.0
        )
        return out, scale, jnp.sum(clipped)
