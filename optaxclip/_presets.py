"""Published clipping methods, each under its paper's name.

Each is a one-liner over a public function of ``optaxclip._clipping``: the
paper's rule from [`optaxclip.rules`][optaxclip.rules], built under the
preset's own argument names (errors name them, see `_checks.arguments`),
and the shared keyword options passed through as one bundle (`_options`).
Methods with an action or a scope of their own (SPAM, Stable-SPAM, Clippy,
the trust ratio) are public functions in ``optaxclip._clipping``.
"""

from __future__ import annotations

from typing import Any

import optax

from . import _checks, rules
from ._clipping import clip_by_global_norm, clip_by_norm

__all__ = [
    "adagc",
    "autoclip",
    "olmo_adaptive_clip",
    "quantile_clip",
    "zclip",
]

# The keyword options every preset shares with the function it calls.
_SHARED = (
    "nonfinite",
    "axis_name",
    "partition_specs",
    "stacked_axes",
    "per_tensor_stats",
)


def _options(arguments: dict[str, Any]) -> dict[str, Any]:
    """The shared keyword options among a preset's ``arguments``, as given."""
    return {name: arguments[name] for name in _SHARED if name in arguments}


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
      nonfinite: keyword-only; as in
        [`clip_by_global_norm`][optaxclip.clip_by_global_norm].
      axis_name: keyword-only; as there.
      partition_specs: keyword-only; as there.
      per_tensor_stats: keyword-only; as there.

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
        return clip_by_global_norm(rule, **_options(locals()))


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
      nonfinite: keyword-only; as in
        [`clip_by_global_norm`][optaxclip.clip_by_global_norm].
      axis_name: keyword-only; as there.
      partition_specs: keyword-only; as there.
      per_tensor_stats: keyword-only; as there.

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
        return clip_by_global_norm(rule, **_options(locals()))


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
      nonfinite: keyword-only; as in [`clip_by_norm`][optaxclip.clip_by_norm].
      axis_name: keyword-only; as there.
      partition_specs: keyword-only; as there.
      stacked_axes: keyword-only; as there.
      per_tensor_stats: keyword-only; as there.

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
        return clip_by_norm(rule, **_options(locals()))


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
      nonfinite: keyword-only; as in [`clip_by_norm`][optaxclip.clip_by_norm].
      axis_name: keyword-only; as there.
      partition_specs: keyword-only; as there.
      stacked_axes: keyword-only; as there.
      per_tensor_stats: keyword-only; as there.

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
        return clip_by_norm(rule, **_options(locals()))


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
      nonfinite: keyword-only; as in
        [`clip_by_global_norm`][optaxclip.clip_by_global_norm].
      axis_name: keyword-only; as there.
      partition_specs: keyword-only; as there.
      per_tensor_stats: keyword-only; as there.

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
        return clip_by_global_norm(rule, **_options(locals()))
