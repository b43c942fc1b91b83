"""Per-example clipping for differentially private training (DP-SGD)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from . import _checks, _numerics, _tree, _xla
from ._core import Applied, Measurement, Scope, Step, check_nonfinite
from ._numerics import safe_scale
from ._tree import zero_unless
from .rules import as_rule

__all__ = [
    "clip_per_example",
    "per_example_global_norm_clip",
    "per_example_layer_norm_clip",
]


def clip_per_example(
    l2_norm_clip: Any, *, nonfinite: str = "zero"
) -> optax.GradientTransformationExtraArgs:
    """Clips each example's gradient to an L2 bound and sums over the batch.

    The transform form of
    [`per_example_global_norm_clip`][optaxclip.per_example_global_norm_clip], for a
    threshold that is a number, an ``optax.Schedule`` or a rule. Its
    ``update`` takes per-example gradients (every leaf with a leading batch
    axis, e.g. from ``jax.vmap(jax.grad(loss), in_axes=(None, 0))``) and
    returns the sum over the batch of each example's gradient scaled by
    ``min(1, C / |g_b|)``, without the batch axis. ``init`` takes the
    parameters (no batch axis). Works under ``jit`` for batch sizes from 1
    and leaves of any rank; integer leaves are returned untouched.

    The rule sees the vector of per-example norms (samples of one
    measurement) and returns one bound for the whole batch: ``rules.quantile``
    moves it by the fraction of unclipped examples (the adaptive clipping of
    Andrew et al.), the other rules learn from the batch's mean
    per-example norm.

    The transform adds no noise. For DP-SGD, follow it with Gaussian noise of
    standard deviation ``noise_multiplier * C`` on the sum (``C`` is
    ``stats.threshold``; with an adaptive rule the noise must follow the
    current ``C`` and the quantile's fraction should itself be noised, as in
    the paper), then divide by the batch size.
    ``optax.contrib.differentially_private_aggregate(C, noise_multiplier)``
    does exactly this for a fixed ``C`` (its clipping is
    [`per_example_global_norm_clip`][optaxclip.per_example_global_norm_clip]); privacy
    accounting is left to
    libraries such as jax-privacy or dp-accounting.

    Args:
      l2_norm_clip: the bound ``C``: a number, a scalar array, an
        ``optax.Schedule`` of the step count, or a rule from
        [`optaxclip.rules`][optaxclip.rules] (e.g. ``rules.quantile(target=0.5)``).
      nonfinite: keyword-only. ``"zero"`` (default): an example whose norm is
        NaN or infinite contributes zero to the sum (the other examples are
        kept), the step is counted in ``stats.nonfinite_count``, and the
        rule's statistics are left untouched. ``"propagate"``: such an example
        is passed through unscaled (as optax does), so NaN reaches the sum.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`ClipState`][optaxclip.ClipState]. Its stats are scalars: ``norm`` is the
      mean per-example norm, ``scale`` the mean multiplier and ``clipped`` the
      number of examples clipped on the latest step.

    Raises:
      ValueError: at construction for a negative, NaN or non-scalar
        threshold (a number or concrete array; a traced one is checked for its
        shape only and acts as 0 if negative) or an unknown ``nonfinite``; in
        ``update`` if the leaves do not share a leading batch axis (the
        message names the offending leaf path and shapes).

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> tx = oc.clip_per_example(1.0)
      >>> per_example = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
      >>> summed, state = tx.update(per_example, tx.init({"w": jnp.zeros(2)}))
      >>> print(summed["w"], state.stats.clipped, state.stats.norm)
      [0.90000004 1.2       ] 1 2.75

    References:
      Abadi et al., [Deep Learning with Differential
      Privacy](https://arxiv.org/abs/1607.00133), 2016.

      Andrew et al., [Differentially Private Learning with Adaptive
      Clipping](https://arxiv.org/abs/1905.03871), 2021.
    """
    zero = check_nonfinite(nonfinite)
    rule = as_rule(l2_norm_clip, "l2_norm_clip")
    return Step(ExampleScope(), rule, zero).transform()


@dataclasses.dataclass(frozen=True)
class ExampleScope(Scope):
    """Each example's global norm; the action scales each example's gradient
    and sums them over the batch. The record holds the mean of the finite
    examples' norms; the rule observes every example (``samples``)."""

    owner: str = "clip_per_example"

    def norm_like(self, params):
        return jnp.zeros((), _numerics.tree_acc_dtype(params))

    def measure(self, updates, params, extra_args):
        del params, extra_args
        if jax.tree.leaves(updates):
            check_batch(updates, self.owner)
        dtype = _numerics.tree_acc_dtype(updates)
        leaves = _tree.float_leaves(updates)
        if not leaves:
            zero = jnp.zeros((), dtype)
            return Measurement(zero, jnp.asarray(True), zero, jnp.zeros((0,), dtype))
        norms = example_norms(leaves)
        finite = jnp.isfinite(norms)
        n_finite = jnp.maximum(jnp.sum(finite, dtype=jnp.int32), 1)
        mean = jnp.sum(jnp.where(finite, norms, 0.0)) / n_finite.astype(norms.dtype)
        mean = mean.astype(dtype)
        return Measurement(mean, jnp.all(finite), mean, norms.astype(dtype))

    def apply(self, updates, measured, act):
        norms, keep = measured.samples, act.keep
        finite = jnp.isfinite(norms)
        bound = act.threshold.astype(norms.dtype)
        multipliers = clip_multipliers(norms, bound)
        if keep is not None:
            # The policy is per example: a non-finite example contributes
            # zero, the others are kept.
            multipliers = zero_unless(finite, multipliers)

        def clip_sum(g):
            if not _tree.is_float(g):
                return g
            if keep is not None:
                g = zero_unless(finite.reshape((-1,) + (1,) * (g.ndim - 1)), g)
            return batch_sum(multipliers, g)

        summed = jax.tree.map(clip_sum, updates)
        dtype = measured.norms.dtype
        scale = (
            jnp.mean(multipliers).astype(dtype) if norms.size else jnp.ones((), dtype)
        )
        clipped = jnp.sum(finite & (norms > bound), dtype=jnp.int32)
        return Applied(summed, scale, clipped)


def per_example_global_norm_clip(
    grads: Any, l2_norm_clip: jax.typing.ArrayLike
) -> tuple[Any, jax.Array]:
    """Clips each example's gradient to a global L2 norm, then sums over the batch.

    Same signature and results as ``optax.per_example_global_norm_clip``; the
    norms accumulate in float32 or better.

    Args:
      grads: a pytree (optax: a list) of arrays that all share a leading batch
        axis, e.g. from ``jax.vmap(jax.grad(loss))``.
      l2_norm_clip: the largest L2 norm an example's gradient may have.

    Returns:
      ``(clipped_sum, num_clipped)``: the pytree of clipped gradients summed
      over the batch, and the int32 number of examples that were clipped.

    Raises:
      ValueError: if the leaves do not share a leading batch axis (the message
        names the offending leaf and shapes), or if ``l2_norm_clip`` is a
        number or concrete array that is negative, NaN or not a scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> grads = [jnp.array([[0.0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]])]
      >>> summed, n = oc.per_example_global_norm_clip(grads, 1.25)
      >>> print(summed[0], n)
      [1.75 1.75 1.75] 3

    References:
      Abadi et al., [Deep Learning with Differential
      Privacy](https://arxiv.org/abs/1607.00133), 2016.
    """
    leaves = jax.tree.leaves(grads)
    check_batch(grads, "per_example_global_norm_clip")
    _checks.check_threshold(l2_norm_clip, "l2_norm_clip")
    norms = example_norms(leaves)
    multipliers = clip_multipliers(norms, l2_norm_clip)
    summed = jax.tree.map(lambda g: batch_sum(multipliers, g), grads)
    return summed, jnp.sum(multipliers < 1.0, dtype=jnp.int32)


def per_example_layer_norm_clip(
    grads: Any, global_l2_norm_clip: jax.typing.ArrayLike, uniform: bool = True
) -> tuple[Any, Any]:
    """Clips each example's gradient layer by layer, then sums over the batch.

    Same signature and results as ``optax.per_example_layer_norm_clip``: with
    ``K`` layers and ``C = global_l2_norm_clip``, each layer is clipped to
    ``C / sqrt(K)`` (``uniform=True``) or ``C * sqrt(D_i / D)`` where ``D_i``
    is the layer's size per example and ``D`` the total.

    Args:
      grads: a pytree of arrays sharing a leading batch axis.
      global_l2_norm_clip: the overall bound ``C``.
      uniform: split ``C`` evenly across layers (True) or by size (False).

    Returns:
      ``(clipped_sum, num_clipped)``, both pytrees of the structure of
      ``grads``: per layer the clipped sum over the batch and the number of
      examples clipped.

    Raises:
      ValueError: if the leaves do not share a leading batch axis, or if
        ``global_l2_norm_clip`` is a number or concrete array that is
        negative, NaN or not a scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> grads = [jnp.array([[0.0, 3, 4], [0, 0, 1]]), jnp.array([[6.0], [0.5]])]
      >>> summed, n = oc.per_example_layer_norm_clip(grads, 2.0 ** 0.5)
      >>> print(summed[0], summed[1], n[0], n[1])
      [0.  0.6 1.8] [1.5] 1 1

    References:
      McMahan et al., [Learning Differentially Private Recurrent Language
      Models](https://arxiv.org/abs/1710.06963), 2017.
    """
    check_batch(grads, "per_example_layer_norm_clip")
    _checks.check_threshold(global_l2_norm_clip, "global_l2_norm_clip")
    leaves = jax.tree.leaves(grads)
    if uniform:
        bounds = [global_l2_norm_clip * (1.0 / len(leaves)) ** 0.5] * len(leaves)
    else:
        total = sum(g[0].size for g in leaves)
        bounds = [global_l2_norm_clip * (g[0].size / total) ** 0.5 for g in leaves]
    summed, clipped = [], []
    for g, bound in zip(leaves, bounds, strict=True):
        multipliers = clip_multipliers(example_norms([g]), bound)
        summed.append(batch_sum(multipliers, g))
        clipped.append(jnp.sum(multipliers < 1.0, dtype=jnp.int32))
    treedef = jax.tree.structure(grads)
    return jax.tree.unflatten(treedef, summed), jax.tree.unflatten(treedef, clipped)


def check_batch(grads: Any, name: str) -> int:
    """Returns the common leading batch size, or raises a ValueError naming the leaf."""
    with_path = jax.tree_util.tree_leaves_with_path(grads)
    if not with_path:
        raise ValueError(f"{name}: `grads` has no leaves.")
    first_path, first = with_path[0]
    if jnp.ndim(first) < 1:
        raise ValueError(
            f"{name} expects every leaf to have a leading batch axis; leaf "
            f"{jax.tree_util.keystr(first_path)} has shape {jnp.shape(first)}."
        )
    batch = jnp.shape(first)[0]
    for path, g in with_path[1:]:
        if jnp.ndim(g) < 1 or jnp.shape(g)[0] != batch:
            raise ValueError(
                f"{name} expects every leaf to share the leading batch axis of "
                f"leaf {jax.tree_util.keystr(first_path)} (shape {jnp.shape(first)}, "
                f"batch {batch}); leaf {jax.tree_util.keystr(path)} has shape "
                f"{jnp.shape(g)}."
            )
    return batch


def example_norms(leaves: list[jax.Array], p: float = 2.0) -> jax.Array:
    """The ``p``-norm of each example (leading axis) across ``leaves``.

    Accumulated as the scopes measure: in float32, or float64 when a leaf is
    float64 under ``jax_enable_x64`` (so a float64 example whose norm is
    beyond float32's range is clipped, not read as infinite); integer leaves
    are measured as float32.
    """
    arrays = [jnp.asarray(g) for g in leaves]
    arrays = [g if _tree.is_float(g) else g.astype(jnp.float32) for g in arrays]
    acc = jnp.result_type(*[_numerics.acc_dtype(g.dtype) for g in arrays])
    sums = []
    for g in arrays:
        part = _numerics.power_sum(g, p, tuple(range(1, g.ndim)))
        sums.append(part if part.dtype == acc else part.astype(acc))
    if len(sums) > 1:
        total = jnp.sum(_xla.stack_barrier(_tree.one_sharding(sums)), axis=0)
    else:
        total = sums[0]
    return _numerics.safe_root(total, p)


def clip_multipliers(norms: jax.Array, bound: jax.typing.ArrayLike) -> jax.Array:
    """``min(1, bound / norm)`` per example (`safe_scale`), and 1 for a NaN
    norm: such an example passes unscaled, as optax does."""
    scale = safe_scale(norms, jnp.asarray(bound, norms.dtype))
    return jnp.where(jnp.isnan(norms), _tree.full_like(scale, 1), scale)


def batch_sum(multipliers: jax.Array, g: jax.Array) -> jax.Array:
    """``sum_b multipliers[b] * g[b]`` in float32 or better."""
    g = jnp.asarray(g)
    dtype = g.dtype if _tree.is_float(g) else jnp.float32
    # Complex leaves keep their imaginary part: summed in complex64 or better.
    acc = _numerics.compute_dtype(dtype)
    g = g.astype(acc)
    # A broadcast product summed over the batch axis rather than a dot: on a
    # mesh with Explicit axes a contraction over a split batch axis has no
    # defined output sharding, a reduction over it does.
    m = multipliers.astype(acc).reshape((-1,) + (1,) * (g.ndim - 1))
    out = jnp.sum(m * g, axis=0, dtype=acc)
    return out.astype(dtype)
