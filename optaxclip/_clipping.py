"""The public clipping functions: validate, build a scope, run the core.

Each function here checks its arguments in the user's words, builds one
scope from ``optaxclip._scopes`` and the threshold's rule, and returns the
core step (`optaxclip._core.Step`) as an ``optax`` transformation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from . import _checks, _mesh, _norms, rules
from ._core import ClipState, Scope, Step, check_nonfinite
from ._mesh import AxisName
from ._scopes import (
    ElementScope,
    GlobalNormalizeScope,
    GlobalScope,
    MomentClampScope,
    RelativeScope,
    ScaleAboveScope,
    SpectralScope,
    StepRatioScope,
    TensorNormalizeScope,
    TensorScope,
    UnitScope,
)
from ._stats import StatsField
from .rules import Threshold, as_rule

__all__ = [
    "AdamWClipState",
    "ClippyState",
    "SpamClipState",
    "StableSpamClipState",
    "adamw_clip",
    "adaptive_grad_clip",
    "clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_spectral_norm",
    "clip_by_value",
    "clippy",
    "spam_clip",
    "stable_spam_clip",
    "trust_ratio_clip",
]


def run(
    scope: Scope,
    threshold: Threshold,
    name: str,
    nonfinite: str,
    state_type: type = ClipState,
) -> optax.GradientTransformationExtraArgs:
    """The core step over ``scope`` with the user's threshold and policy."""
    zero = check_nonfinite(nonfinite)
    rule = as_rule(threshold, name)
    return Step(scope, rule, zero, state_type).transform()


def clip_by_global_norm(
    max_norm: Threshold,
    ord: int | float | str = 2,  # noqa: A002
    *,
    nonfinite: str = "zero",
    axis_name: AxisName = None,
    partition_specs: Any = None,
    per_tensor_stats: bool = False,
    action: str = "rescale",
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
      action: keyword-only; ``"rescale"`` (default) scales the update down
        to the bound when its norm is above it; ``"normalize"`` sets its norm
        to the bound, up or down (a zero update stays zero, and an infinite
        bound, a rule with no history yet, leaves it unchanged).

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
    _checks.check_choice(action, "action", ("rescale", "normalize"))
    scope_type = GlobalNormalizeScope if action == "normalize" else GlobalScope
    scope = scope_type(
        ord=_norms.check_ord(ord),
        axis_name=axis_name,
        partition_specs=partition_specs,
        per_tensor_stats=_checks.static_flag(per_tensor_stats, "per_tensor_stats"),
    )
    return run(scope, max_norm, "max_norm", nonfinite)


def clip_by_norm(
    max_norm: Threshold,
    ord: int | float | str = 2,  # noqa: A002
    *,
    nonfinite: str = "zero",
    axis_name: AxisName = None,
    partition_specs: Any = None,
    stacked_axes: Any = None,
    per_tensor_stats: bool = False,
    action: str = "rescale",
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
      action: keyword-only; ``"rescale"`` (default) scales each tensor down
        to its bound when its norm is above it; ``"normalize"`` sets each
        tensor's norm to its bound, up or down (a zero tensor stays zero, and
        an infinite bound, a rule with no history yet, leaves it unchanged).

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
    _checks.check_choice(action, "action", ("rescale", "normalize"))
    scope_type = TensorNormalizeScope if action == "normalize" else TensorScope
    scope = scope_type(
        ord=_norms.check_ord(ord),
        axis_name=axis_name,
        partition_specs=partition_specs,
        stacked_axes=_checks.check_stacked(stacked_axes),
    )
    return run(scope, max_norm, "max_norm", nonfinite)


def clip_by_block_rms(
    threshold: Threshold,
    *,
    nonfinite: str = "zero",
    axis_name: AxisName = None,
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
        rms=True,
        owner="clip_by_block_rms",
    )
    return run(scope, threshold, "threshold", nonfinite)


def clip_by_value(
    max_delta: Threshold,
    *,
    nonfinite: str = "zero",
    axis_name: AxisName = None,
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
    return run(scope, max_delta, "max_delta", nonfinite)


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
    axis_name: AxisName = None,
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
    return run(scope, clipping, "clipping", nonfinite)


class SpamClipState(NamedTuple):
    """State of [`spam_clip`][optaxclip.spam_clip].

    Attributes:
      nu: the EMA of the clipped squared gradient (float32 or better), shaped
        like the updates.
      finite_count: int32, finite steps seen (drives the resets and the
        guard steps).
      count: int32, steps seen.
      norm_threshold_scale: three rows: the latest step's global norm
        before clipping, the spike threshold on ``g**2 / v``, and the global
        norm after clipping over the one before.
      counts: int32, ``[entries clipped, nonfinite_count, *nonfinite_tensors]``.
      tensor_norms: each tensor's 2-norm, with ``per_tensor_stats=True``.

    Read the stats together as ``state.stats`` (a
    [`ClipStats`][optaxclip.ClipStats]); what each means is tabulated in
    the docs (methods page, "What the stats mean").
    """

    nu: Any
    finite_count: jax.Array
    count: jax.Array
    norm_threshold_scale: jax.Array
    counts: jax.Array
    tensor_norms: jax.Array | tuple[()]

    stats = StatsField()


def spam_clip(
    threshold: Any = 5000.0,
    beta2: Any = 0.999,
    reset_interval: Any = 500,
    guard_steps: Any = 20,
    *,
    nonfinite: str = "zero",
    axis_name: AxisName = None,
    partition_specs: Any = None,
    per_tensor_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """SPAM's spike-aware clipping: each entry against its second moment.

    With ``v`` the EMA of the clipped squared gradient (from the previous
    step): entries with ``g**2 > threshold * v`` become
    ``sign(g) * sqrt(threshold * v)``; then
    ``v <- beta2 * v + (1 - beta2) * g_clipped**2``. Chained before
    ``optax.adam(b2=beta2)`` (and ``reset_interval=0``) ``v`` equals Adam's
    ``nu``. As SPAM, ``v`` is reset to zero every ``reset_interval`` steps
    (0: never) and no entry is clipped for ``guard_steps`` steps after the
    start and after each reset (step ``t``, from 1, clips when
    ``t >= guard_steps`` and ``t % reset_interval >= guard_steps``).

    Differences from the official code (SPAM AdamW): entries with ``v == 0``
    are not clipped (officially every non-zero gradient of an entry whose
    gradient was zero until then is clipped to zero, for ever); NaN/Inf
    steps are zeroed and leave ``v`` and the step count untouched. The
    momentum reset and learning-rate warm-up of SPAM's optimizer are not
    part of this clipping transform.

    Args:
      threshold: the spike threshold on ``g**2 / v``, ``> 0``.
      beta2: EMA factor of ``v`` (use the optimizer's ``b2``).
      reset_interval: steps between resets of ``v``; 0 for none.
      guard_steps: steps without clipping after the start and each reset.
      nonfinite: keyword-only; as in
        [`clip_by_global_norm`][optaxclip.clip_by_global_norm].
      axis_name: keyword-only; as there.
      partition_specs: keyword-only; as there.
      per_tensor_stats: keyword-only; as there.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`SpamClipState`][optaxclip.SpamClipState].

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> tx = oc.spam_clip(threshold=4.0, beta2=0.5, guard_steps=1)
      >>> state = tx.init(jnp.zeros(2))
      >>> out, state = tx.update(jnp.array([1.0, -2.0]), state)
      >>> out, state = tx.update(jnp.array([10.0, -1.0]), state)
      >>> print(out, state.stats.clipped)
      [ 1.41421... -1.       ] 1

    References:
      Huang et al., [SPAM: Spike-Aware Adam with Momentum Reset for Stable
      LLM Training](https://arxiv.org/abs/2501.06842), 2025.
    """
    with _checks.arguments("spam_clip"):
        _checks.check_number(threshold, "threshold", lo=0.0, lo_open=True)
        _checks.check_number(beta2, "beta2", lo=0.0, hi=1.0)
        _checks.check_number(reset_interval, "reset_interval", lo=0, integer=True)
        _checks.check_number(guard_steps, "guard_steps", lo=0, integer=True)
        zero = check_nonfinite(nonfinite)
        pts = _checks.static_flag(per_tensor_stats, "per_tensor_stats")
    scope = MomentClampScope(
        axis_name=axis_name,
        partition_specs=partition_specs,
        per_tensor_stats=pts,
        beta2=beta2,
        reset_interval=reset_interval,
        guard_steps=guard_steps,
    )
    return Step(scope, rules.fixed(threshold), zero, SpamClipState).transform()


def adamw_clip(
    k: Any = 3.0,
    beta2: Any = 0.999,
    floor: Any = 1e-10,
    warmup_steps: Any = 0,
    *,
    nonfinite: str = "zero",
    axis_name: AxisName = None,
    partition_specs: Any = None,
    per_tensor_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """AdamWClip's clipping: each entry within ``k`` times its Adam RMS.

    With ``nu`` Adam's second moment of the clipped gradients of the earlier
    steps (``n`` of them), each entry of ``g`` is clamped to
    ``+-max(k * sqrt(nu / (1 - beta2**n)), floor)`` (its sign kept, a complex
    entry's phase kept); then ``nu <- beta2 * nu + (1 - beta2) * g_clipped**2``.
    On the first step ``nu`` is empty and every entry is clamped to
    ``floor``, as officially; ``warmup_steps`` first steps are not clipped
    (``nu`` is still updated).

    ``optax.chain(oc.adamw_clip(k, b2, floor, w), optax.adamw(lr, b1, b2,
    eps, weight_decay=wd))`` is the official ``AdamWClip(params, lr, (b1,
    b2), eps, wd, clip_grad_adapt=k, clip_grad_min=floor,
    clip_grad_warm_up=w)`` (the official ``weight_decay`` defaults to 0.01,
    optax's to 1e-4): the two second moments are equal, since both take
    the clipped gradient.

    Differences from the official code (``AdamWClip/optimizer.py``, PyPI
    0.1.4): the second moment is this transform's own copy (the official
    optimizer reads its ``exp_avg_sq``), so it works before any optimizer
    and costs one moment of memory; a NaN/Inf step is zeroed and leaves
    ``nu`` and the step count untouched (officially a NaN enters ``v`` and
    the parameters for ever, and an infinite entry is clamped to its bound
    like any other; wrap the chain in
    [`skip_nonfinite`][optaxclip.skip_nonfinite] so the optimizer's moments
    skip the step too); ``floor`` must be positive (at 0 an entry whose ``nu`` is 0
    would be clamped to 0 for ever). As officially, zero gradients enter
    ``nu``: after ``s`` of them the bound shrinks by ``beta2**(s/2)``, and
    once ``1 - beta2**n`` is near 1 it regrows by at most
    ``sqrt(beta2 + (1 - beta2) * k**2)`` per step (1.004 at the defaults).

    Args:
      k: the bound in standard deviations (``clip_grad_adapt``), ``> 0``, or
        a schedule.
      beta2: Adam's ``b2``, in ``[0, 1)``.
      floor: the smallest bound (``clip_grad_min``), ``> 0``.
      warmup_steps: steps not clipped at the start (``clip_grad_warm_up``).
      nonfinite: keyword-only; as in
        [`clip_by_global_norm`][optaxclip.clip_by_global_norm].
      axis_name: keyword-only; as there.
      partition_specs: keyword-only; as there.
      per_tensor_stats: keyword-only; as there.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      [`AdamWClipState`][optaxclip.AdamWClipState] (SPAM's fields).

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> tx = oc.adamw_clip(k=3.0, beta2=0.5, warmup_steps=1)
      >>> state = tx.init(jnp.zeros(2))
      >>> out, state = tx.update(jnp.array([1.0, -2.0]), state)
      >>> out, state = tx.update(jnp.array([10.0, -1.0]), state)
      >>> print(out, state.stats.clipped)
      [ 3. -1.] 1

    References:
      Wandel, [AdamWClip: AdamW with adaptive gradient
      clipping](https://github.com/wandeln/AdamWClip), 2026 (PyPI
      ``adamwclip`` 0.1.4).
    """
    with _checks.arguments("adamw_clip"):
        rule = as_rule(k, "k")
        if isinstance(rule, rules.fixed):
            _checks.check_number(k, "k", lo=0.0, lo_open=True)
        _checks.check_number(beta2, "beta2", lo=0.0, hi=1.0, hi_open=True)
        _checks.check_number(floor, "floor", lo=0.0, lo_open=True)
        _checks.check_number(warmup_steps, "warmup_steps", lo=0, integer=True)
        zero = check_nonfinite(nonfinite)
        pts = _checks.static_flag(per_tensor_stats, "per_tensor_stats")
    scope = MomentClampScope(
        axis_name=axis_name,
        partition_specs=partition_specs,
        per_tensor_stats=pts,
        beta2=beta2,
        floor=floor,
        warmup_steps=warmup_steps,
        owner="adamw_clip",
    )
    return Step(scope, rule, zero, AdamWClipState).transform()


AdamWClipState = SpamClipState
"""State of [`adamw_clip`][optaxclip.adamw_clip]: SPAM's fields, with ``nu``
Adam's second moment of the clipped gradients and ``finite_count`` the
gradients it holds; ``stats.threshold`` is ``k``, ``stats.scale`` the global
norm after clipping over the one before."""


StableSpamClipState = ClipState
"""State of [`stable_spam_clip`][optaxclip.stable_spam_clip]: a
[`ClipState`][optaxclip.ClipState], one entry per tensor.

Its ``rule_state`` is a [`MaxEmaState`][optaxclip.rules.MaxEmaState]: the
EMA of each tensor's largest absolute entry (``m_max``) and the number of
non-zero gradients each tensor has had (``nonzero_count``). Its stats: each
tensor's largest absolute entry, the bias-corrected bound ``T``, and
``T / max|g|`` where clipped; ``clipped`` counts entries.
"""


def stable_spam_clip(
    beta: Any = 0.999,
    *,
    nonfinite: str = "zero",
    axis_name: AxisName = None,
    partition_specs: Any = None,
    per_tensor_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Stable-SPAM's adaptive spike clipping: entries above a per-tensor bound.

    Per tensor: ``m <- beta * m + (1 - beta) * max|g|`` and
    ``T = m / (1 - beta**t)`` (bias-corrected; this step included); entries
    with ``|g| > T`` are multiplied by ``T / max|g|``.

    Differences from the official code (Stable-SPAM): a tensor's step
    count ``t`` and ``m`` only advance on steps where its gradient is not
    all zero (zeros would otherwise shrink the bias-corrected bound, and a
    zero first step would clip the next real one hard); NaN/Inf steps are
    zeroed and leave ``m`` untouched. Stable-SPAM's gradient normalization
    and momentum reset belong to the optimizer, not to this transform.

    Args:
      beta: EMA factor of the largest absolute entry (Stable-SPAM's
        ``theta``), in ``[0, 1)``.
      nonfinite: keyword-only; as in
        [`clip_by_global_norm`][optaxclip.clip_by_global_norm].
      axis_name: keyword-only; as there.
      partition_specs: keyword-only; as there.
      per_tensor_stats: keyword-only; as there.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`ClipState`][optaxclip.ClipState] (`StableSpamClipState`).

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> tx = oc.stable_spam_clip(beta=0.5)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> out, state = tx.update({"w": jnp.array([1.0, -0.5])}, state)
      >>> out, state = tx.update({"w": jnp.array([4.0, 2.0])}, state)
      >>> print(out["w"], state.stats.threshold)
      [3. 2.] [3.]

    References:
      Huang et al., [Stable-SPAM: How to Train in 4-Bit More Stably than
      16-Bit Adam](https://arxiv.org/abs/2502.17055v2), 2025 (arXiv versions
      1 and 2; version 3 of that id is the GradientStabilizer paper, see
      [`gradient_stabilizer`][optaxclip.gradient_stabilizer]).
    """
    with _checks.arguments("stable_spam_clip"):
        rule = rules.BiasCorrectedMax(beta)
        zero = check_nonfinite(nonfinite)
        _checks.static_flag(per_tensor_stats, "per_tensor_stats")
    scope = ScaleAboveScope(axis_name=axis_name, partition_specs=partition_specs)
    return Step(scope, rule, zero).transform()


ClippyState = ClipState
"""State of [`clippy`][optaxclip.clippy]: a [`ClipState`][optaxclip.ClipState]
with no rule state, one entry per tensor.

Its stats: each tensor's largest ``|u| / (relative * |w| + absolute)``, 1
(the bound), and the factor applied; ``clipped`` counts the tensors scaled
down.
"""


def clippy(
    relative: Any = 0.1,
    absolute: Any = 1e-7,
    *,
    nonfinite: str = "zero",
    axis_name: AxisName = None,
    per_tensor_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Clippy: scale each tensor's *update* so no entry moves its weight too far.

    Place it after the optimizer (it needs ``params``): each tensor's update
    ``u`` is multiplied by
    ``s = min(1, min_i (relative * |w_i| + absolute) / |u_i|)``.

    Differences from the official code (tensorflow/recommenders Clippy
    Adagrad): the same factor as a transform that follows any optimizer
    (the official one is built into Adagrad); a NaN/Inf update is zeroed
    rather than applied.

    Args:
      relative: the largest move relative to the weight's magnitude.
      absolute: the largest move of a zero weight.
      nonfinite: keyword-only; as in
        [`clip_by_global_norm`][optaxclip.clip_by_global_norm].
      axis_name: keyword-only; as there.
      per_tensor_stats: keyword-only; as there.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`ClipState`][optaxclip.ClipState] (`ClippyState`).

    Raises:
      ValueError: in ``update`` if ``params`` is None.

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> tx = oc.clippy(relative=0.1, absolute=0.0)
      >>> params = {"w": jnp.array([1.0, 10.0])}
      >>> out, state = tx.update({"w": jnp.array([0.5, 0.5])}, tx.init(params), params)
      >>> print(out["w"], state.stats.scale)
      [0.1 0.1] [0.2]

    References:
      Tang et al., [Improving Training Stability for Multitask Ranking Models
      in Recommender Systems](https://arxiv.org/abs/2302.09178), 2023.
    """
    with _checks.arguments("clippy"):
        _checks.check_number(relative, "relative", lo=0.0)
        _checks.check_number(absolute, "absolute", lo=0.0)
        zero = check_nonfinite(nonfinite)
        _checks.static_flag(per_tensor_stats, "per_tensor_stats")
    scope = RelativeScope(relative, absolute, axis_name)
    return Step(scope, rules.fixed(1.0), zero).transform()


def trust_ratio_clip(
    max_ratio: rules.Threshold = 0.01,
    eps: jax.typing.ArrayLike = 1e-3,
    *,
    nonfinite: str = "zero",
    axis_name: AxisName = None,
    partition_specs: Any = None,
    per_tensor_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Bounds each step relative to the weights: ``|u| <= max_ratio * |w|``.

    Place it after the optimizer (it needs ``params``): the whole update
    ``u`` is rescaled so that its global 2-norm is at most ``max_ratio``
    times the global 2-norm of the parameters (floored at ``eps``), i.e.
    ``u * min(1, max_ratio * max(|w|, eps) / |u|)``. No step moves the
    weights by more than ``max_ratio`` of their size, whatever the learning
    rate, the loss scale or the gradient's history: the bound is a ratio,
    not a gradient norm, so it needs no threshold read off the run. This is
    the trust ratio of LARS and LAMB used as a bound rather than a factor.

    ``stats.norm`` holds the step's ratio ``|u| / max(|w|, eps)`` and
    ``stats.threshold`` the bound on it.

    Args:
      max_ratio: the largest step relative to the parameters' norm (default
        0.01: one percent per step); a number, scalar array,
        ``optax.Schedule`` or a rule from [`optaxclip.rules`][optaxclip.rules]
        (which then sees the ratio).
      eps: floor on the parameters' norm, so zero-initialized parameters can
        still move (at most ``max_ratio * eps`` per step).
      nonfinite: keyword-only; ``"zero"`` (default): a NaN/Inf update is
        zeroed and counted; ``"propagate"``: it passes through.
      axis_name: keyword-only; the ``shard_map`` / ``pmap`` mesh axis (or
        axes) the leaves are split across.
      partition_specs: keyword-only; a pytree prefix of ``PartitionSpec``
        saying which leaves are split across ``axis_name`` (for both the
        updates and the parameters).
      per_tensor_stats: keyword-only; also record each tensor's own ratio
        ``|u_i| / max(|w_i|, eps)`` on every step (``stats.tensor_norms``;
        per-tensor keys in [`metrics`][optaxclip.metrics]).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`ClipState`][optaxclip.ClipState].

    Raises:
      ValueError: in ``update`` if ``params`` is None or does not match the
        updates' structure.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optaxclip as oc
      >>> tx = optax.chain(optax.sgd(1.0), oc.trust_ratio_clip(0.1))
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> grads = {"w": jnp.array([6.0, 8.0])}
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> print(updates["w"], oc.stats(state)[0].norm)
      [-0.3 -0.4] 2.0

    References:
      You et al., [Large Batch Training of Convolutional
      Networks](https://arxiv.org/abs/1708.03888), 2017 (the trust ratio);
      Brock et al., [High-Performance Large-Scale Image Recognition Without
      Normalization](https://arxiv.org/abs/2102.06171), 2021 (a bound
      relative to the weights).
    """
    with _checks.arguments("trust_ratio_clip"):
        _checks.check_threshold(eps, "eps")
        pts = _checks.static_flag(per_tensor_stats, "per_tensor_stats")
        scope = StepRatioScope(
            axis_name=axis_name,
            partition_specs=partition_specs,
            per_tensor_stats=pts,
            eps=eps,
        )
        return run(scope, max_ratio, "max_ratio", nonfinite)


def clip_by_spectral_norm(
    max_norm: Threshold,
    *,
    mode: str = "exact",
    stacked_axes: Any = None,
    nonfinite: str = "zero",
    axis_name: AxisName = None,
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
        scope always records one entry per tensor (or stacked slice).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``stats.norm`` holds one
      entry per tensor (or stacked slice), laid out as ``clip_by_norm``'s:
      a matrix's top singular value, 0 for a leaf that is not a matrix
      (never clipped; inf on a step where it holds a NaN or an Inf);
      ``stats.scale`` is ``bound / norm`` where a matrix is clipped (1
      elsewhere) and ``stats.clipped`` the number of matrices clipped.

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
    if _mesh.axis_names(axis_name) and partition_specs is None:
        raise _checks.fail(
            "axis_name",
            f"was given ({axis_name!r}) without `partition_specs`: a singular "
            "value needs the whole matrix, so say along which dims each leaf "
            "is split with `partition_specs` (a pytree prefix of PartitionSpec).",
        )
    scope = SpectralScope(
        mode, _checks.check_stacked(stacked_axes), axis_name, partition_specs
    )
    return run(scope, max_norm, "max_norm", nonfinite)
