"""Published adaptive clipping methods, each under its paper's name.

Most are one line: a scope from `optaxclip._scopes` with a rule from
[`optaxclip.rules`][optaxclip.rules]. SPAM, Stable-SPAM and Clippy are
declarations over the same core step with an action (or scope) of their
own: SPAM clamps each entry relative to a second moment, Stable-SPAM scales
the entries above a bias-corrected bound, Clippy rescales each tensor of the
update relative to the parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _checks, _norms, rules
from ._core import (
    Applied,
    Context,
    Measurement,
    Parts,
    Step,
    check_nonfinite,
    keep_if,
    map_float,
    safe_scale,
    scale_leaf,
    zero_tree,
    zero_unless,
)
from ._scopes import (
    GlobalMeasurement,
    GlobalScope,
    Rescale,
    TensorScope,
    clip_by_global_norm,
    clip_by_norm,
    scope_transform,
)
from ._stats import ClipStats, read_record, record_of

__all__ = [
    "ClippyState",
    "SpamClipState",
    "StableSpamClipState",
    "adagc",
    "autoclip",
    "clippy",
    "gradient_stabilizer",
    "olmo_adaptive_clip",
    "quantile_clip",
    "spam_clip",
    "stable_spam_clip",
    "trust_ratio_clip",
    "zclip",
]


# ---------------------------------------------------------------------------
# Scope x rule presets
# ---------------------------------------------------------------------------


def autoclip(
    percentile: Any = 10.0,
    history: int | None = None,
    *,
    include_zeros: bool = False,
    nonfinite: str = "zero",
    axis_name: Any = None,
    partition_specs: Any = None,
    per_tensor_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """AutoClip: clip the global norm to a percentile of its own history.

    ``clip_by_global_norm(rules.percentile(percentile, window=history,
    include_zeros=include_zeros))``: each step's bound is the
    ``percentile``-th percentile (NumPy ``'linear'``) of all finite,
    non-zero global norms seen so far, this step's included.

    Differences from the official code (pseeth/autoclip): the history is a
    fixed-size buffer of ``history`` norms (default 1024), so the result is
    the exact full-history percentile for the first ``history`` recorded
    norms and the percentile of the last ``history`` ones afterwards;
    NaN/Inf norms never enter the history (officially they poison it for
    ever) and their step's update is zeroed (``nonfinite``); norms of
    exactly zero (frozen, masked or padding-only steps) do not enter it
    either, so a run of zero steps leaves the bound as it was (recovery
    within 0 steps). Officially they do: with the default history, 12 zero
    steps zero most of the next 70 updates. ``include_zeros=True``
    reproduces the official behaviour.

    Args:
      percentile: the percentile in ``[0, 100]``; default 10 as the paper.
      history: the buffer size (a Python int), or None for 1024.
      include_zeros: keyword-only; record zero norms in the history, as the
        official code does (default False).
      nonfinite: keyword-only; ``"zero"`` (default) or ``"propagate"``.
      axis_name: keyword-only; the ``shard_map`` mesh axis the leaves are
        split across.
      partition_specs: keyword-only; which leaves are split across
        ``axis_name`` (a pytree prefix of ``PartitionSpec``).
      per_tensor_stats: keyword-only; also record each tensor's norm on every
        step (``stats.tensor_norms``; per-tensor keys in
        [`metrics`][optaxclip.metrics]).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> tx = oc.autoclip(percentile=50.0)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for g in [[3.0, 4.0], [0.6, 0.8], [30.0, 40.0]]:
      ...     out, state = tx.update({"w": jnp.array(g)}, state)
      ...     print([round(float(v), 4) for v in out["w"]], state.stats.threshold)
      [3.0, 4.0] 5.0
      [0.6, 0.8] 3.0
      [3.0, 4.0] 5.0

    References:
      Seetharaman et al., [AutoClip: Adaptive Gradient Clipping for Source
      Separation Networks](https://arxiv.org/abs/2007.14469), 2020.
    """
    with _checks.arguments("autoclip", p="percentile", window="history"):
        rule = rules.percentile(percentile, window=history, include_zeros=include_zeros)
        return clip_by_global_norm(
            rule,
            nonfinite=nonfinite,
            axis_name=axis_name,
            partition_specs=partition_specs,
            per_tensor_stats=per_tensor_stats,
        )


def zclip(
    alpha: Any = 0.97,
    z_thresh: Any = 2.5,
    max_grad_norm: Any = 1.0,
    eps: Any = 1e-6,
    warmup_steps: Any = 25,
    mode: str = "zscore",
    clip_option: str = "adaptive_scaling",
    clip_factor: Any = 1.0,
    skip_update_on_spike: Any = False,
    *,
    nonfinite: str = "zero",
    axis_name: Any = None,
    partition_specs: Any = None,
    per_tensor_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """ZClip: z-score spike clipping of the global norm.

    ``clip_by_global_norm(rules.zscore(...))`` with the official defaults.
    For the first ``warmup_steps`` steps the update is clipped at
    ``max_grad_norm`` and the population mean and variance of the norms are
    collected; afterwards a norm whose z-score ``(n - mean) / (std + eps)``
    exceeds ``z_thresh`` is clipped to
    ``clip_factor * (mean + z_thresh**2 / z * std)`` (``"adaptive_scaling"``)
    or to ``mean`` (``"mean"``), or, in ``mode="percentile"``, any norm above
    ``mean + z_thresh * std`` is clipped to it; the bound is capped at
    ``max_grad_norm`` when set. The EMAs of the mean and variance are fed the
    clip value on a spike (nothing if ``skip_update_on_spike``), else the norm.

    Differences from the official code (bluorion-com/ZClip): norms of
    exactly zero never reach the statistics (an all-zero warm-up would clip
    every later step to zero for ever, and a long run of zero steps after
    warm-up would decay the EMAs so that every later step is clipped to
    almost zero); a run of zero steps leaves the bound as it was (recovery
    within 0 steps); NaN/Inf norms never reach the
    EMAs (officially they make them NaN for ever) and their step is zeroed;
    the clip coefficient is ``bound / n`` instead of ``bound / (n + 1e-6)``.

    Args:
      alpha: EMA factor of the mean and variance.
      z_thresh: z-score threshold.
      max_grad_norm: absolute cap (also the warm-up bound), or None.
      eps: added to the standard deviation.
      warmup_steps: number of (non-zero) norms before the EMAs start.
      mode: ``"zscore"`` or ``"percentile"``.
      clip_option: ``"adaptive_scaling"`` or ``"mean"``.
      clip_factor: multiplies the adaptive bound.
      skip_update_on_spike: leave the EMAs untouched on a spike.
      nonfinite: keyword-only; ``"zero"`` (default) or ``"propagate"``.
      axis_name: keyword-only; the ``shard_map`` mesh axis.
      partition_specs: keyword-only; which leaves are split across
        ``axis_name`` (a pytree prefix of ``PartitionSpec``).
      per_tensor_stats: keyword-only; also record each tensor's norm on every
        step (``stats.tensor_norms``; per-tensor keys in
        [`metrics`][optaxclip.metrics]).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> tx = oc.zclip(warmup_steps=2, max_grad_norm=None)
      >>> state = tx.init(jnp.zeros(()))
      >>> for g in [1.0, 3.0, 2.0, 50.0]:
      ...     out, state = tx.update(jnp.array(g), state)
      >>> print(out, state.stats.threshold)
      2.1263... 2.1263...

    References:
      Kumar et al., [ZClip: Adaptive Spike Mitigation for LLM
      Pre-Training](https://arxiv.org/abs/2504.02507), 2025.
    """
    with _checks.arguments(
        "zclip", z="z_thresh", warmup="warmup_steps", max_norm="max_grad_norm"
    ):
        rule = rules.zscore(
            alpha,
            z_thresh,
            warmup_steps,
            max_norm=max_grad_norm,
            eps=eps,
            mode=mode,
            clip_option=clip_option,
            clip_factor=clip_factor,
            skip_update_on_spike=skip_update_on_spike,
        )
        return clip_by_global_norm(
            rule,
            nonfinite=nonfinite,
            axis_name=axis_name,
            partition_specs=partition_specs,
            per_tensor_stats=per_tensor_stats,
        )


def adagc(
    lambda_rel: Any = 1.04,
    beta: Any = 0.99,
    warmup_steps: Any = 100,
    lambda_abs: Any = 1.0,
    eps: Any = 1e-6,
    *,
    nonfinite: str = "zero",
    axis_name: Any = None,
    partition_specs: Any = None,
    stacked_axes: Any = None,
    per_tensor_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """AdaGC: per-tensor clipping relative to an EMA of each tensor's norm.

    ``clip_by_norm(rules.ema(lambda_rel, beta, warmup_steps,
    warmup_max_norm=lambda_abs, eps=eps))``. For the first ``warmup_steps``
    steps the whole update is clipped to a global norm of ``lambda_abs`` and
    each tensor's ``gamma`` is the running minimum of its post-clip norm;
    afterwards tensor ``i`` is clipped to ``lambda_rel * gamma_i`` (clip
    coefficient ``min(1, lambda_rel * gamma_i / (n_i + eps))``) and
    ``gamma_i <- beta * gamma_i + (1 - beta) * min(n_i, lambda_rel * gamma_i)``;
    there is no global cap after warm-up.

    Differences from the official Megatron patch: a tensor whose gradient is
    exactly zero does not set its ``gamma`` to zero (which would clip it to
    zero for ever) or decay it (a long-frozen tensor would be clipped to
    almost zero); ``gamma`` starts from the tensor's first non-zero norm,
    and a run of zero steps leaves it as it was (recovery within 0 steps).
    NaN/Inf steps are zeroed and leave every ``gamma`` untouched. The
    warm-up's global norm is the tree's 2-norm, which the tensor scope
    passes to the rule.

    Args:
      lambda_rel: the bound relative to ``gamma``.
      beta: EMA factor of ``gamma``.
      warmup_steps: number of warm-up steps.
      lambda_abs: the global bound during warm-up.
      eps: added to the norm in the clip coefficients.
      nonfinite: keyword-only; ``"zero"`` (default) or ``"propagate"``.
      axis_name: keyword-only; the ``shard_map`` mesh axis.
      partition_specs: keyword-only; which leaves are split across
        ``axis_name`` (a pytree prefix of ``PartitionSpec``).
      stacked_axes: keyword-only; leading stacked-layer axes (see
        [`clip_by_norm`][optaxclip.clip_by_norm]).
      per_tensor_stats: keyword-only; accepted for a uniform signature:
        this method always records one entry per tensor.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``stats`` hold one entry
      per tensor.

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> tx = oc.adagc(warmup_steps=1, lambda_abs=1.0, eps=0.0)
      >>> state = tx.init({"a": jnp.zeros(1), "b": jnp.zeros(1)})
      >>> out, state = tx.update({"a": jnp.array([3.0]), "b": jnp.array([4.0])}, state)
      >>> print(out["a"], out["b"])
      [0.6] [0.8]
      >>> out, state = tx.update({"a": jnp.array([3.0]), "b": jnp.array([0.5])}, state)
      >>> print(out["a"], out["b"])
      [0.624] [0.5]

    References:
      Wang et al., [AdaGC: Improving Training Stability for Large Language
      Model Pretraining](https://arxiv.org/abs/2502.11034), 2025.
    """
    with _checks.arguments(
        "adagc",
        ratio="lambda_rel",
        warmup="warmup_steps",
        warmup_max_norm="lambda_abs",
    ):
        rule = rules.ema(
            lambda_rel, beta, warmup_steps, warmup_max_norm=lambda_abs, eps=eps
        )
        return clip_by_norm(
            rule,
            nonfinite=nonfinite,
            axis_name=axis_name,
            partition_specs=partition_specs,
            per_tensor_stats=per_tensor_stats,
            stacked_axes=stacked_axes,
        )


def olmo_adaptive_clip(
    max_grad_norm_ratio: Any = 1.0,
    beta: Any = 0.95,
    eps: Any = 1e-6,
    *,
    nonfinite: str = "zero",
    axis_name: Any = None,
    partition_specs: Any = None,
    stacked_axes: Any = None,
    per_tensor_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """OLMo's adaptive clipping: each tensor to a ratio of its norm's EMA.

    ``clip_by_norm(rules.ema(max_grad_norm_ratio, beta, eps=eps))``: with
    ``ema_i`` the running average of tensor ``i``'s clipped norm, the clip
    coefficient is ``c = min(1, ratio * ema_i / (n_i + eps))`` and
    ``ema_i <- beta * ema_i + (1 - beta) * n_i * c``; ``ema_i`` starts at the
    tensor's first norm.

    Differences from the official code (allenai/OLMo
    ``max_grad_norm_ratio``): ``ema_i`` starts at the first *non-zero* norm
    (a zero first gradient would otherwise pin the tensor at zero for ever)
    and a zero norm leaves ``ema_i`` as it was (officially it decays, and a
    long-frozen tensor is clipped to almost zero once it moves again; here
    it recovers within 0 steps); the first step's statistic is kept (OLMo
    discards it and starts again on step 2); NaN/Inf steps are zeroed and
    never reach the EMA (officially it turns NaN for ever).

    Args:
      max_grad_norm_ratio: the bound relative to the EMA.
      beta: EMA factor (0.95 in OLMo).
      eps: added to the norm in the clip coefficient.
      nonfinite: keyword-only; ``"zero"`` (default) or ``"propagate"``.
      axis_name: keyword-only; the ``shard_map`` mesh axis.
      partition_specs: keyword-only; which leaves are split across
        ``axis_name`` (a pytree prefix of ``PartitionSpec``).
      stacked_axes: keyword-only; leading stacked-layer axes (see
        [`clip_by_norm`][optaxclip.clip_by_norm]).
      per_tensor_stats: keyword-only; accepted for a uniform signature:
        this method always records one entry per tensor.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``stats`` hold one entry
      per tensor.

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> tx = oc.olmo_adaptive_clip(max_grad_norm_ratio=1.0, beta=0.5, eps=0.0)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for g in [[3.0, 4.0], [30.0, 40.0]]:
      ...     out, state = tx.update({"w": jnp.array(g)}, state)
      >>> print(out["w"], state.stats.threshold)
      [3. 4.] [5.]

    References:
      Groeneveld et al., [OLMo: Accelerating the Science of Language
      Models](https://arxiv.org/abs/2402.00838), 2024.
    """
    with _checks.arguments("olmo_adaptive_clip", ratio="max_grad_norm_ratio"):
        rule = rules.ema(max_grad_norm_ratio, beta, 0, eps=eps)
        return clip_by_norm(
            rule,
            nonfinite=nonfinite,
            axis_name=axis_name,
            partition_specs=partition_specs,
            per_tensor_stats=per_tensor_stats,
            stacked_axes=stacked_axes,
        )


def quantile_clip(
    target_quantile: Any = 0.5,
    learning_rate: Any = 0.2,
    initial: Any = 0.1,
    geometric: bool = True,
    *,
    nonfinite: str = "zero",
    axis_name: Any = None,
    partition_specs: Any = None,
    per_tensor_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Quantile-tracking clipping of the global norm (streaming).

    ``clip_by_global_norm(rules.quantile(...))``: the bound ``C`` starts at
    ``initial``, clips the step, then moves by
    ``C <- C * exp(-learning_rate * (1[n <= C] - target_quantile))``
    (``C - learning_rate * (...)``, floored at 0, if not ``geometric``). For
    per-example (DP-SGD) use, call ``rules.quantile`` directly with the
    vector of example norms (see its docstring).

    Differences from the official code (TF-Privacy): no noise is added to
    the unclipped fraction (this is the non-private streaming estimator);
    NaN/Inf norms never move ``C`` and their step is zeroed; a norm of
    exactly zero does not move ``C`` either (counted as unclipped, a run of
    about 850 zero steps underflows the default bound to exactly 0, which
    the multiplicative update never leaves), so a run of zero steps leaves
    the bound as it was (recovery within 0 steps); the geometric bound is
    kept at or above ``jnp.finfo(dtype).tiny``.

    Args:
      target_quantile: the quantile of the norms to track, in ``[0, 1]``.
      learning_rate: the step size of the update.
      initial: the first bound.
      geometric: multiplicative (default) or additive update.
      nonfinite: keyword-only; ``"zero"`` (default) or ``"propagate"``.
      axis_name: keyword-only; the ``shard_map`` mesh axis.
      partition_specs: keyword-only; which leaves are split across
        ``axis_name`` (a pytree prefix of ``PartitionSpec``).
      per_tensor_stats: keyword-only; also record each tensor's norm on every
        step (``stats.tensor_norms``; per-tensor keys in
        [`metrics`][optaxclip.metrics]).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> tx = oc.quantile_clip(initial=1.0)
      >>> state = tx.init(jnp.zeros(()))
      >>> out, state = tx.update(jnp.array(4.0), state)
      >>> print(out, state.rule_state)
      1.0 1.105171

    References:
      Andrew et al., [Differentially Private Learning with Adaptive
      Clipping](https://arxiv.org/abs/1905.03871), 2021.
    """
    with _checks.arguments("quantile_clip", target="target_quantile"):
        rule = rules.quantile(target_quantile, learning_rate, initial, geometric)
        return clip_by_global_norm(
            rule,
            nonfinite=nonfinite,
            axis_name=axis_name,
            partition_specs=partition_specs,
            per_tensor_stats=per_tensor_stats,
        )


# ---------------------------------------------------------------------------
# Element-wise and update-relative methods
# ---------------------------------------------------------------------------


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

    @property
    def stats(self) -> ClipStats:
        """The latest step's [`ClipStats`][optaxclip.ClipStats]."""
        return read_record(record_of(self))


def spam_clip(
    threshold: Any = 5000.0,
    beta2: Any = 0.999,
    reset_interval: Any = 500,
    guard_steps: Any = 20,
    *,
    nonfinite: str = "zero",
    axis_name: _norms.AxisName = None,
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
      nonfinite: keyword-only; ``"zero"`` (default) or ``"propagate"``.
      axis_name: keyword-only; the ``shard_map`` / ``pmap`` mesh axis (or
        axes) the leaves are split across (the recorded norms and counts
        are then the whole tree's).
      partition_specs: keyword-only; which leaves are split across
        ``axis_name`` (a pytree prefix of ``PartitionSpec``).
      per_tensor_stats: keyword-only; also record each tensor's norm on every
        step (``stats.tensor_norms``; per-tensor keys in
        [`metrics`][optaxclip.metrics]).

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
    scope = GlobalScope(2.0, axis_name, partition_specs, "spam_clip", pts)
    action = _SpamAction(beta2, reset_interval, guard_steps, axis_name, partition_specs)

    def make(parts: Parts) -> SpamClipState:
        nu, finite_count = parts.action_state
        return SpamClipState(nu, finite_count, *parts.record)

    def parts_of(state: SpamClipState) -> Parts:
        return Parts((), (state.nu, state.finite_count), record_of(state))

    step = Step(
        scope, rules.fixed(threshold), action, zero, make, parts_of, SpamClipState
    )
    return step.transform()


@dataclasses.dataclass(frozen=True)
class _SpamAction:
    """Clamp each entry to ``sqrt(threshold * v)``, then update ``v``."""

    beta2: Any
    reset_interval: Any
    guard_steps: Any
    axis_name: Any
    partition_specs: Any
    stateless = False

    def init(self, params: Any) -> tuple[Any, jax.Array]:
        nu = map_float(lambda _, x: jnp.zeros_like(x, dtype=_real_acc(x)), params)
        return nu, jnp.zeros((), jnp.int32)

    def apply(self, updates: Any, measured: Measurement, ctx: Context) -> Applied:
        nu_tree, count = ctx.state
        _checks.check_same_tree("spam_clip", nu_tree, updates)
        acc = measured.norms.dtype
        t = count + 1
        interval = jnp.asarray(self.reset_interval, jnp.int32)
        guard = jnp.asarray(self.guard_steps, jnp.int32)
        periodic = interval > 0
        phase = jnp.where(periodic, t % jnp.maximum(interval, 1), t)
        reset = periodic & (phase == 0)
        active = (t >= guard) & (phase >= guard)
        b2 = jnp.asarray(self.beta2, acc)
        rest = rules.one_minus(self.beta2, acc)
        nus, counted = [], []

        def clip_leaf(_, g, nu):
            nu = jnp.where(reset, _norms.full_like(nu, 0), nu)
            magnitude = jnp.abs(g).astype(nu.dtype)
            bound = _norms.safe_root(ctx.threshold.astype(nu.dtype) * nu, 2.0)
            over = active & (nu > 0) & (magnitude > bound)
            safe = jnp.where(over, magnitude, _norms.full_like(magnitude, 1))
            factor = jnp.where(over, bound / safe, _norms.full_like(safe, 1))
            new_mag = jnp.where(over, bound, magnitude)
            nus.append(b2.astype(nu.dtype) * nu + rest.astype(nu.dtype) * new_mag**2)
            counted.append(jnp.sum(over, dtype=jnp.int32))
            return scale_leaf(g, factor, None)

        clipped_tree = map_float(clip_leaf, updates, nu_tree)
        new_nu = map_float(lambda i, _: nus[i], nu_tree)
        after = _norms.global_norm(
            clipped_tree, 2, self.axis_name, partition_specs=self.partition_specs
        ).astype(acc)
        n_clipped = _norms.count_entries(
            counted, updates, self.axis_name, self.partition_specs
        )
        finite = measured.finite
        norm = measured.norms
        scale = jnp.where(norm > 0, after / jnp.where(norm > 0, norm, 1), 1)
        new_nu = keep_if(finite, new_nu, nu_tree)
        count = jnp.where(finite, optax.safe_increment(count), count)
        out = zero_tree(ctx.keep, clipped_tree)
        return Applied(out, zero_unless(ctx.keep, scale), n_clipped, (new_nu, count))


class StableSpamClipState(NamedTuple):
    """State of [`stable_spam_clip`][optaxclip.stable_spam_clip], one entry per tensor.

    Attributes:
      m_max: the EMA of each tensor's largest absolute entry.
      nonzero_count: int32, the number of non-zero gradients each tensor
        has had.
      count: int32, steps seen.
      norm_threshold_scale: three rows, one column per tensor: each
        tensor's largest absolute entry, the bias-corrected bound ``T``, and
        ``T / max|g|`` where clipped.
      counts: int32, ``[entries clipped, nonfinite_count]``.
      tensor_norms: empty (the norms are per tensor).

    Read the stats together as ``state.stats`` (a
    [`ClipStats`][optaxclip.ClipStats]); what each means is tabulated in
    the docs (methods page, "What the stats mean").
    """

    m_max: jax.Array
    nonzero_count: jax.Array
    count: jax.Array
    norm_threshold_scale: jax.Array
    counts: jax.Array
    tensor_norms: jax.Array | tuple[()]

    @property
    def stats(self) -> ClipStats:
        """The latest step's [`ClipStats`][optaxclip.ClipStats]."""
        return read_record(record_of(self))


def stable_spam_clip(
    beta: Any = 0.999,
    *,
    nonfinite: str = "zero",
    axis_name: _norms.AxisName = None,
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
      nonfinite: keyword-only; ``"zero"`` (default) or ``"propagate"``.
      axis_name: keyword-only; the ``shard_map`` / ``pmap`` mesh axis (or
        axes) the leaves are split across (the recorded norms and counts
        are then the whole tree's).
      partition_specs: keyword-only; which leaves are split across
        ``axis_name`` (a pytree prefix of ``PartitionSpec``).
      per_tensor_stats: keyword-only; accepted for a uniform signature:
        this method always records one entry per tensor.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`StableSpamClipState`][optaxclip.StableSpamClipState].

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
        # beta = 1 would divide by 1 - beta**t = 0 in the bias correction.
        _checks.check_number(beta, "beta", lo=0.0, hi=1.0, hi_open=True)
        zero = check_nonfinite(nonfinite)
        _checks.static_flag(per_tensor_stats, "per_tensor_stats")
    scope = TensorScope(
        _norms.INF, axis_name, partition_specs, None, False, owner="stable_spam_clip"
    )

    def make(parts: Parts) -> StableSpamClipState:
        m_max, nonzero_count = parts.rule_state
        return StableSpamClipState(m_max, nonzero_count, *parts.record)

    def parts_of(state: StableSpamClipState) -> Parts:
        rule_state = _MaxEmaState(state.m_max, state.nonzero_count)
        return Parts(rule_state, (), record_of(state))

    step = Step(
        scope, _BiasCorrectedMax(beta), _ScaleAbove(axis_name, partition_specs),
        zero, make, parts_of, StableSpamClipState,
    )  # fmt: skip
    return step.transform()


class _MaxEmaState(NamedTuple):
    m_max: jax.Array
    count: jax.Array


@dataclasses.dataclass(frozen=True)
class _BiasCorrectedMax:
    """Stable-SPAM's bound: a bias-corrected EMA of the largest entry, this
    step included; a tensor's EMA and count advance only on non-zero steps."""

    beta: Any

    def init(self, norm_like: jax.Array) -> _MaxEmaState:
        return _MaxEmaState(
            jnp.zeros_like(norm_like), jnp.zeros(norm_like.shape, jnp.int32)
        )

    def update(self, state: _MaxEmaState, norm: jax.Array, step: jax.Array):
        del step
        acc = norm.dtype
        b = jnp.asarray(self.beta, acc)
        seen = norm > 0
        count = state.count + seen.astype(jnp.int32)
        m_max = jnp.where(
            seen, b * state.m_max + rules.one_minus(self.beta, acc) * norm, state.m_max
        )
        # 1 - beta**t without cancellation: -expm1(t * log(beta)).
        beta = self.beta
        log_b = (
            jnp.log(b) if isinstance(beta, jax.Array) else jnp.asarray(_log(beta), acc)
        )
        correction = -jnp.expm1(count.astype(acc) * log_b)
        bound = jnp.where(
            count > 0, m_max / jnp.where(count > 0, correction, 1), jnp.inf
        )
        return bound, _MaxEmaState(m_max, count)


@dataclasses.dataclass(frozen=True)
class _ScaleAbove:
    """Stable-SPAM's action: entries above a tensor's bound ``T`` are
    multiplied by ``T / max|g|``; the others are kept."""

    axis_name: Any
    partition_specs: Any
    stateless = True

    def init(self, params: Any) -> tuple[()]:
        del params
        return ()

    def apply(self, updates: Any, measured: Measurement, ctx: Context) -> Applied:
        largest, bound = measured.norms, ctx.threshold
        bound = jnp.broadcast_to(bound, largest.shape)
        factor = safe_scale(largest, bound)
        # Each leaf's bound and factor in buffers of their own (not slices),
        # so equally shaped leaves share compiled kernels.
        ones = [1] * largest.shape[0]
        bounds = _norms.split_entries(bound, ones)
        factors = _norms.split_entries(factor, ones)
        counted = []

        def clip_leaf(i, g):
            magnitude = jnp.abs(g).astype(largest.dtype)
            mask = magnitude > bounds[i].reshape(())
            counted.append(jnp.sum(mask, dtype=jnp.int32))
            return scale_leaf(
                g,
                jnp.where(mask, factors[i].reshape(()), _norms.full_like(magnitude, 1)),
                ctx.keep,
            )

        out = map_float(clip_leaf, updates)
        n_clipped = _norms.count_entries(
            counted, updates, self.axis_name, self.partition_specs
        )
        return Applied(out, zero_unless(ctx.keep, factor), n_clipped, ctx.state)


class ClippyState(NamedTuple):
    """State of [`clippy`][optaxclip.clippy].

    Attributes:
      count: int32, steps seen.
      norm_threshold_scale: three rows, one column per tensor: the largest
        ``|u| / (relative * |w| + absolute)``, 1 (the bound), and the factor
        applied.
      counts: int32, ``[tensors scaled down, nonfinite_count]``.
      tensor_norms: empty (the norms are per tensor).

    Read the stats together as ``state.stats`` (a
    [`ClipStats`][optaxclip.ClipStats]); what each means is tabulated in
    the docs (methods page, "What the stats mean").
    """

    count: jax.Array
    norm_threshold_scale: jax.Array
    counts: jax.Array
    tensor_norms: jax.Array | tuple[()]

    @property
    def stats(self) -> ClipStats:
        """The latest step's [`ClipStats`][optaxclip.ClipStats]."""
        return read_record(record_of(self))


def clippy(
    relative: Any = 0.1,
    absolute: Any = 1e-7,
    *,
    nonfinite: str = "zero",
    axis_name: _norms.AxisName = None,
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
      nonfinite: keyword-only; ``"zero"`` (default) or ``"propagate"``.
      axis_name: keyword-only; the ``shard_map`` / ``pmap`` mesh axis (or
        axes) the leaves are split across.
      per_tensor_stats: keyword-only; accepted for a uniform signature:
        this method always records one entry per tensor.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`ClippyState`][optaxclip.ClippyState].

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
    scope = _RelativeScope(relative, absolute, axis_name)

    def make(parts: Parts) -> ClippyState:
        return ClippyState(*parts.record)

    def parts_of(state: ClippyState) -> Parts:
        return Parts((), (), record_of(state))

    step = Step(scope, rules.fixed(1.0), Rescale(), zero, make, parts_of, ClippyState)
    return step.transform()


@dataclasses.dataclass(frozen=True)
class RelativeMeasurement(Measurement):
    """Each tensor's largest move relative to its weights (clippy)."""

    def rescale(self, updates, threshold, keep):
        scale = safe_scale(self.norms, threshold, keep)
        # Each leaf's factor in a buffer of its own (not a slice), so equally
        # shaped leaves share compiled kernels.
        factors = _norms.split_entries(scale, [1] * self.norms.shape[0])
        out = map_float(
            lambda i, u: scale_leaf(u, factors[i].reshape(()), keep), updates
        )
        return out, scale, jnp.sum(self.norms > threshold, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class _RelativeScope:
    """The tensor scope on the update relative to the parameters."""

    relative: Any
    absolute: Any
    axis_name: Any
    owner: str = "clippy"

    def norm_like(self, params):
        return _norms.per_tensor_like(params)

    def measure(self, updates, params, extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "clippy needs the parameters: call `tx.update(updates, state, params)`."
            )
        _checks.check_params("clippy", updates, params)
        acc = _norms.tree_acc_dtype(updates)
        leaves = _norms.float_leaves(updates)
        if not leaves:
            empty = jnp.zeros((0,), acc)
            return RelativeMeasurement(
                empty, jnp.asarray(True), empty, jnp.zeros((), acc)
            )
        weights = _norms.matching_float_leaves(updates, params)
        rel, ab = jnp.asarray(self.relative, acc), jnp.asarray(self.absolute, acc)
        ratios, largest = [], []
        for u, w in zip(leaves, weights, strict=True):
            mag = jnp.abs(u).astype(acc)
            room = rel * jnp.abs(w).astype(acc) + ab
            moving = mag > 0
            ratio = jnp.where(moving, mag / jnp.where(moving, room, 1), 0)
            ratios.append(jnp.max(ratio, initial=0.0))
            largest.append(jnp.max(_norms.nan_to_inf(mag), initial=0.0))
        names = _norms.axis_names(self.axis_name)
        ratio = _norms.cross_device(_norms.stack_barrier(ratios), names, _norms.INF)
        big = _norms.cross_device(_norms.stack_barrier(largest), names, _norms.INF)
        # A tensor with a NaN or infinite entry reads as such (a NaN entry
        # does not move its ratio, whose comparison is False).
        ratio = jnp.where(jnp.isfinite(big), ratio, big)
        finite = jnp.all(jnp.isfinite(big))
        return RelativeMeasurement(ratio, finite, ratio, jnp.max(ratio))


def trust_ratio_clip(
    max_ratio: rules.Threshold = 0.01,
    eps: jax.typing.ArrayLike = 1e-3,
    *,
    nonfinite: str = "zero",
    axis_name: _norms.AxisName = None,
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
        scope = _StepRatioScope(eps, axis_name, partition_specs, per_tensor_stats=pts)
        return scope_transform(scope, max_ratio, "max_ratio", nonfinite, Rescale())


@dataclasses.dataclass(frozen=True)
class _StepRatioScope:
    """The whole update's norm relative to the whole parameters' norm."""

    eps: Any
    axis_name: Any
    partition_specs: Any
    owner: str = "trust_ratio_clip"
    per_tensor_stats: bool = False
    leafwise = True

    def norm_like(self, params):
        return jnp.zeros((), _norms.tree_acc_dtype(params))

    def measure(self, updates, params, extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "trust_ratio_clip needs the parameters: call "
                "`tx.update(updates, state, params)`."
            )
        _checks.check_params(self.owner, updates, params)
        acc = _norms.tree_acc_dtype(updates)
        specs = (self.axis_name, self.partition_specs)
        step, steps = _norms.tree_norms(updates, 2.0, *specs)
        size, sizes = _norms.tree_norms(params, 2.0, *specs)
        eps = jnp.asarray(self.eps, acc)
        ratio = step / jnp.maximum(size, eps)
        # Each tensor's own ratio: non-finite exactly where its update is.
        ratios = steps / jnp.maximum(sizes.astype(acc), eps)
        return GlobalMeasurement(ratio, jnp.isfinite(ratio), ratio, ratio, ratios)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _log(beta: Any) -> float:
    return math.log(float(beta)) if float(beta) > 0 else -math.inf


def _real_acc(x: jax.Array) -> jnp.dtype:
    return _norms.acc_dtype(x.dtype)


# ---------------------------------------------------------------------------
# GradientStabilizer: the normalize action with the mean-over-RMS rule
# ---------------------------------------------------------------------------


def gradient_stabilizer(
    beta1: Any = 0.6,
    beta2: Any = 0.999,
    eps: Any = 1e-12,
    *,
    nonfinite: str = "zero",
    axis_name: _norms.AxisName = None,
    partition_specs: Any = None,
    stacked_axes: Any = None,
    per_tensor_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """GradientStabilizer: each tensor's norm set to a stabilized target.

    ``clip_by_norm(rules.mean_over_rms(beta1, beta2, eps),
    action="normalize")``. Per tensor, a non-zero norm ``n`` is recorded in
    EMAs of ``n`` and ``n**2`` first, then the tensor is rescaled to the norm
    ``m_hat / (sqrt(v_hat) + eps)`` (Adam's bias corrections, each tensor
    counting its own recorded norms): the direction is kept and the
    magnitude replaced, so a small gradient is scaled *up*, a spike down to
    about the usual target, which stays bounded however large the spike.
    Meant in front of an adaptive optimizer (``optax.adamw``).

    Differences from the official code (TianjinYellow/GradientStabilizer,
    ``GradientStabilizer._scale_param``): the rescale factor is
    ``target / n`` where the official code divides by ``max(n, eps)`` (they
    differ for norms below ``eps`` only); a NaN/Inf norm zeroes the whole
    step (``nonfinite="zero"``) and leaves every tensor's statistics as they
    were, where the official code leaves that tensor's gradient as it is
    (NaN reaches the optimizer) and still updates the other tensors' EMAs.
    A zero gradient is skipped as officially: it stays zero and is not
    recorded.

    Args:
      beta1: EMA factor of the norm (the official ``gamma1``), in ``[0, 1)``.
      beta2: EMA factor of the squared norm (``gamma2``), in ``[0, 1)``.
      eps: added to ``sqrt(v_hat)``, ``> 0``.
      nonfinite: keyword-only; ``"zero"`` (default) or ``"propagate"``.
      axis_name: keyword-only; the ``shard_map`` / ``pmap`` mesh axis (or
        axes) the tensors are split across.
      partition_specs: keyword-only; which leaves are split across
        ``axis_name`` (a pytree prefix of ``PartitionSpec``).
      stacked_axes: keyword-only; leading stacked-layer axes, each layer
        slice a tensor of its own (see [`clip_by_norm`][optaxclip.clip_by_norm]).
      per_tensor_stats: keyword-only; accepted for a uniform signature:
        this method always records one entry per tensor.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`ClipState`][optaxclip.ClipState] (``rule_state`` a
      [`MeanOverRmsState`][optaxclip.rules.MeanOverRmsState]).

    Example:
      A gradient a hundred times smaller is scaled up, one ten thousand
      times larger (a spike) down, and a zero gradient stays zero:

      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> tx = oc.gradient_stabilizer()
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for g in ([3.0, 4.0], [0.03, 0.04], [300.0, 400.0], [0.0, 0.0]):
      ...     out, state = tx.update({"w": jnp.array(g)}, state)
      ...     print(f"{float(oc.global_norm(out)):.4f}")
      1.0000
      0.5393
      0.8864
      0.0000

    References:
      Huang et al., [GradientStabilizer: Fix the Norm, Not the
      Gradient](https://arxiv.org/abs/2502.17055v3), ICML 2026.
    """
    with _checks.arguments("gradient_stabilizer"):
        return clip_by_norm(
            rules.mean_over_rms(beta1, beta2, eps),
            nonfinite=nonfinite,
            axis_name=axis_name,
            partition_specs=partition_specs,
            stacked_axes=stacked_axes,
            per_tensor_stats=per_tensor_stats,
            action="normalize",
        )
