"""Threshold rules: how the bound a scope clips to is chosen on each step.

A rule is a small frozen object with two methods, applied elementwise to
whatever its scope measured (a scalar for the global and element scopes, one
entry per tensor, layer slice or example otherwise):

* ``init(norm_like) -> state``: a pytree of arrays shaped like ``norm_like``;
* ``update(state, norm, step) -> (threshold, new_state)``: the threshold for
  this step's ``norm`` (``step`` is the transform's int32 step count, from 0).

Scopes never let a non-finite measurement reach a rule's statistics: when any
measured norm is NaN or infinite, the scope keeps the previous state. Rules
therefore only ever learn from finite steps.

Numbers and ``optax.Schedule`` callables are wrapped into
[`fixed`][optaxclip.rules.fixed] and
[`scheduled`][optaxclip.rules.scheduled] automatically by every scope function.

Hyperparameters are checked when a rule or transform is built: Python and
NumPy numbers and concrete JAX arrays raise ``ValueError`` when out of range
(naming the argument the user passed, a preset's own name included), and
every array must be a scalar. A traced value (inside ``jit``, e.g. under
``optax.inject_hyperparams``) is checked for its shape only, since reading it
would need a host round-trip: an invalid traced value is used as given,
except that a negative threshold acts as 0 (the update is zeroed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import (
    Any,
    NamedTuple,
    Protocol,
    TypeAlias,
    cast,
    runtime_checkable,
)

import jax
import jax.numpy as jnp
import optax

from ._checks import (
    check_choice,
    check_flag,
    check_number,
    check_schedule,
    check_size,
    check_threshold,
)

__all__ = [
    "EmaState",
    "MaxEmaState",
    "MeanStdState",
    "Observation",
    "Observes",
    "PercentileState",
    "Rule",
    "Threshold",
    "ZScoreState",
    "as_rule",
    "ema",
    "observe",
    "fixed",
    "mean_std",
    "percentile",
    "quantile",
    "scheduled",
    "zscore",
]


@runtime_checkable
class Rule(Protocol):
    """The interface every threshold rule implements."""

    def init(self, norm_like: jax.Array) -> Any:
        """Returns the initial state for measurements shaped like ``norm_like``."""
        ...

    def update(
        self, state: Any, norm: jax.Array, step: jax.Array
    ) -> tuple[jax.Array, Any]:
        """Returns the threshold for ``norm`` and the next state.

        The threshold is shaped like ``norm``, or is a scalar that applies to
        every entry of it. ``norm`` is shaped like the ``norm_like`` of
        ``init`` (for per-example clipping, the mean per-example norm; a
        rule that needs the samples themselves implements `Observes`).
        """
        ...


Threshold: TypeAlias = float | int | jax.Array | optax.Schedule | Rule
"""What every scope accepts as its bound: a number, a scalar array, an
``optax.Schedule`` of the step count, or a [`Rule`][optaxclip.rules.Rule]."""


class Observation(NamedTuple):
    """What a rule observes on one step, explicitly.

    Attributes:
      values: the measurement the bound applies to, shaped like the rule's
        ``norm_like``: a scalar, or one entry per tensor.
      total: the whole tree's measurement as one scalar, in the scope's own
        terms (the global 2-norm for the global and tensor scopes).
      samples: per-example norms of which ``values`` is the mean (the
        per-example scope), else None.
    """

    values: jax.Array
    total: jax.Array
    samples: jax.Array | None = None


@runtime_checkable
class Observes(Protocol):
    """A rule that reads the whole `Observation`, not only its values.

    Every rule implements ``update(state, norm, step)``; a rule whose
    statistic needs the whole tree's measurement or the samples implements
    ``observe`` too, and the transforms call it instead.
    """

    def observe(
        self, state: Any, observation: Observation, step: jax.Array
    ) -> tuple[jax.Array, Any]:
        """Returns the threshold for ``observation`` and the next state."""
        ...


def observe(
    rule: Rule, state: Any, observation: Observation, step: jax.Array
) -> tuple[jax.Array, Any]:
    """Asks ``rule`` for the threshold of ``observation``.

    A rule that implements `Observes` gets the whole observation; any other
    rule gets ``observation.values``.
    """
    if isinstance(rule, Observes):
        return rule.observe(state, observation, step)
    return rule.update(state, observation.values, step)


@dataclasses.dataclass(frozen=True)
class fixed:  # noqa: N801  (a rule reads as a function call: rules.fixed(1.0))
    """A constant threshold.

    No state, so nothing to absorb: after any run of zero norms the bound is
    the same (recovery within 0 steps).

    Args:
      value: the bound, a number or a (possibly traced) scalar array.

    Example:
      >>> import jax.numpy as jnp
      >>> from optaxclip import rules
      >>> rule = rules.fixed(2.0)
      >>> threshold, _ = rule.update(rule.init(jnp.zeros(())), jnp.array(5.0), 0)
      >>> print(threshold)
      2.0
    """

    value: Any

    def __post_init__(self):
        check_threshold(self.value, "threshold")

    def init(self, norm_like: jax.Array) -> tuple[()]:
        del norm_like
        return ()

    def update(self, state, norm, step):
        del step
        # A scalar bound applies to every entry; the transform broadcasts it
        # for the stats only, so per-tensor scaling stays a scalar multiply.
        return jnp.asarray(self.value, norm.dtype), state


@dataclasses.dataclass(frozen=True)
class scheduled:  # noqa: N801
    """A threshold that follows an ``optax.Schedule`` of the step count.

    No state besides the step count: after any run of zero norms the bound
    is the schedule's value at that step (recovery within 0 steps).

    Args:
      schedule: a callable from the int32 step count (from 0) to the bound.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from optaxclip import rules
      >>> rule = rules.scheduled(optax.linear_schedule(1.0, 3.0, 2))
      >>> print(rule.update((), jnp.array(9.0), jnp.array(1))[0])
      2.0
    """

    schedule: Callable[[jax.Array], jax.typing.ArrayLike]

    def init(self, norm_like: jax.Array) -> tuple[()]:
        del norm_like
        return ()

    def update(self, state, norm, step):
        return jnp.asarray(self.schedule(step), norm.dtype), state


def as_rule(threshold: Any, name: str = "threshold") -> Rule:
    """Wraps a number, array or schedule into a rule; returns rules as is.

    Args:
      threshold: a [`Rule`][optaxclip.rules.Rule], a callable schedule, or a
        number/array.
      name: the argument name used in error messages.

    Returns:
      A [`Rule`][optaxclip.rules.Rule].

    Raises:
      ValueError: if a number or concrete array is negative or NaN, or an
        array is not a scalar (traced arrays are checked for shape only; a
        negative traced threshold acts as 0).
      TypeError: if ``threshold`` is none of the above, or is a rule class
        rather than an instance (``rules.zscore`` for ``rules.zscore()``).
    """
    if isinstance(threshold, type):
        check_threshold(threshold, name)
    if isinstance(threshold, Rule) and not callable(threshold):
        return threshold
    if callable(threshold):
        check_schedule(threshold, name)
        return scheduled(cast(Callable[[jax.Array], jax.typing.ArrayLike], threshold))
    check_threshold(threshold, name)
    return fixed(threshold)


# ---------------------------------------------------------------------------
# Adaptive rules
# ---------------------------------------------------------------------------

DEFAULT_HISTORY = 1024


class PercentileState(NamedTuple):
    """State of [`percentile`][optaxclip.rules.percentile].

    Attributes:
      buffer: the last ``window`` recorded norms, shape
        ``norm.shape + (window,)`` (unused slots hold ``+inf``).
      count: int32, shaped like the norms: how many norms each entry has
        recorded so far (finite and, unless ``include_zeros``, non-zero).
    """

    buffer: jax.Array
    count: jax.Array


@dataclasses.dataclass(frozen=True)
class percentile:  # noqa: N801
    """AutoClip: the ``p``-th percentile of the past norms, the current one included.

    The threshold on step ``t`` is ``np.percentile(history, p)`` (NumPy's
    ``'linear'`` method) where ``history`` holds the finite, non-zero norms
    seen so far, this step's included, as the official AutoClip code does
    with every norm.

    No absorbing zero: a norm of exactly zero (a frozen layer, a masked
    phase, a padding-only batch) is not recorded, so a run of zero steps,
    however long, leaves the history as it was and the first non-zero norm
    after it is bounded exactly as if the run had not happened (recovery
    within 0 steps). The official code records zeros: with ``p = 10``, once
    a tenth of the history is zero every later bound is 0 and every update
    is zeroed until enough non-zero norms outnumber them.
    ``include_zeros=True`` reproduces that behaviour. While an entry has
    recorded nothing (only zero norms so far) its threshold is ``inf``; its
    update is zero anyway.

    AutoClip keeps every past norm, which cannot be a fixed-shape state under
    ``jit``. Here the history is a ring buffer of ``window`` entries: while at
    most ``window`` finite norms have been seen the result is exactly the
    full-history percentile; after that it is the percentile of the last
    ``window`` norms (a sliding window, so the bound follows the run's
    current scale rather than its first steps).

    Args:
      p: the percentile, in ``[0, 100]`` (AutoClip's default is 10).
      window: the number of most recent recorded norms kept. ``None``
        (default) means 1024, exact full history for the first 1024 recorded
        norms. Must be a Python int (it is the state's shape).
      include_zeros: keyword-only; record norms of exactly zero too, as the
        official AutoClip code does (default False: zero norms are not
        recorded, see above). A Python bool.

    Returns:
      A rule; its state is a [`PercentileState`][optaxclip.rules.PercentileState].

    Example:
      >>> import jax.numpy as jnp
      >>> from optaxclip import rules
      >>> rule = rules.percentile(50.0, window=8)
      >>> state = rule.init(jnp.zeros(()))
      >>> for n in [1.0, 3.0, 2.0]:
      ...     threshold, state = rule.update(state, jnp.array(n), 0)
      ...     print(threshold)
      1.0
      2.0
      2.0

    References:
      Seetharaman et al., [AutoClip: Adaptive Gradient Clipping for Source
      Separation Networks](https://arxiv.org/abs/2007.14469), 2020.
    """

    p: Any = 10.0
    window: int | None = None
    _: dataclasses.KW_ONLY
    include_zeros: bool = False

    def __post_init__(self):
        check_number(self.p, "p", lo=0.0, hi=100.0)
        check_flag(self.include_zeros, "include_zeros", static=True)
        check_size(self.window, "window", lo=1, allow_none=True)

    @property
    def size(self) -> int:
        return DEFAULT_HISTORY if self.window is None else int(self.window)

    def init(self, norm_like: jax.Array) -> PercentileState:
        norm_like = jnp.asarray(norm_like)
        buffer = jnp.full((*norm_like.shape, self.size), jnp.inf, norm_like.dtype)
        return PercentileState(buffer, jnp.zeros(norm_like.shape, jnp.int32))

    def update(self, state: PercentileState, norm, step):
        del step
        size = self.size
        dt = state.buffer.dtype
        norm = norm.astype(dt)
        # Each entry keeps its own count: on the tensor scope a frozen
        # tensor records nothing while the others go on recording.
        record = jnp.ones(norm.shape, jnp.bool_) if self.include_zeros else norm > 0
        buffer, count = ring_push(state.buffer, state.count, norm, record)
        n = jnp.maximum(jnp.minimum(count, size), 1)
        ordered = jnp.sort(buffer, axis=-1)
        position = jnp.asarray(self.p, dt) / 100 * (n - 1).astype(dt)
        lo = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, n - 1)
        hi = jnp.minimum(lo + 1, n - 1)
        frac = position - lo.astype(dt)
        below = jnp.take_along_axis(ordered, lo[..., None], axis=-1)[..., 0]
        above = jnp.take_along_axis(ordered, hi[..., None], axis=-1)[..., 0]
        gap = jnp.where(hi > lo, above - below, jnp.zeros_like(below))
        threshold = below + frac * gap
        return threshold, PercentileState(buffer, count)


class ZScoreState(NamedTuple):
    """State of [`zscore`][optaxclip.rules.zscore], one entry per measured norm.

    Attributes:
      count: int32, non-zero finite norms seen (warm-up is over once it
        reaches ``warmup``).
      mean: the running mean (Welford mean during warm-up, then the EMA).
      var: during warm-up the sum of squared deviations; afterwards the EMA
        of the variance.
    """

    count: jax.Array
    mean: jax.Array
    var: jax.Array


_ZMODES = ("zscore", "percentile")
_ZOPTIONS = ("adaptive_scaling", "mean")


@dataclasses.dataclass(frozen=True)
class zscore:  # noqa: N801
    """ZClip: z-score spike detection on an EMA of the norm's mean and variance.

    Warm-up: for the first ``warmup`` norms the bound is ``max_norm`` (no
    bound if None) and the population mean and variance of those norms are
    collected. Afterwards, with ``std = sqrt(var)`` and
    ``z = (n - mean) / (std + eps)``:

    * ``mode="zscore"``: a spike is ``z > z``; it is clipped to
      ``clip_factor * (mean + z_thresh**2 / z * std)``
      (``clip_option="adaptive_scaling"``) or to ``mean`` (``"mean"``);
    * ``mode="percentile"``: a spike is ``n > mean + z * std``, clipped to
      that value;

    and the bound is ``min(that, max_norm)`` (``max_norm`` alone when there is
    no spike). Then the EMA of the mean, and of the variance around the
    updated mean, is fed with the clip value on a spike (nothing if
    ``skip_update_on_spike``) and with the norm otherwise.

    Differences from the official code: a norm of exactly zero never
    reaches the statistics, neither the warm-up nor the EMAs (all-zero
    warm-up statistics would make every later step a spike clipped to zero
    for ever; after warm-up, a long run of zero norms would decay the mean
    and variance towards zero, and every later norm would be a spike
    clipped to almost zero, feeding that clipped value back); non-finite
    norms never reach the statistics (the scope keeps the previous state);
    the clip coefficient is ``bound / n`` (the official code divides by
    ``n + 1e-6``).

    No absorbing zero: a run of exact-zero norms, however long, leaves the
    statistics as they were, so the first non-zero norm after it is bounded
    exactly as if the run had not happened (recovery within 0 steps).

    Args:
      alpha: EMA factor of the mean and variance, in ``[0, 1]``.
      z: the z-score threshold (ZClip's ``z_thresh``), ``> 0``.
      warmup: number of non-zero norms used to initialize the statistics,
        ``>= 1``.
      max_norm: keyword-only; an absolute cap on every step (ZClip's
        ``max_grad_norm``), or None.
      eps: keyword-only; added to the standard deviation.
      mode: keyword-only; ``"zscore"`` or ``"percentile"``.
      clip_option: keyword-only; ``"adaptive_scaling"`` or ``"mean"`` (zscore
        mode only).
      clip_factor: keyword-only; multiplies the adaptive bound.
      skip_update_on_spike: keyword-only; leave the statistics untouched on a
        spike.

    Returns:
      A rule; its state is a [`ZScoreState`][optaxclip.rules.ZScoreState].

    Example:
      >>> import jax.numpy as jnp
      >>> from optaxclip import rules
      >>> rule = rules.zscore(warmup=2, max_norm=None)
      >>> state = rule.init(jnp.zeros(()))
      >>> for n in [1.0, 3.0, 2.0, 50.0]:
      ...     threshold, state = rule.update(state, jnp.array(n), 0)
      ...     print(threshold)
      inf
      inf
      inf
      2.1263...

    References:
      Kumar et al., [ZClip: Adaptive Spike Mitigation for LLM
      Pre-Training](https://arxiv.org/abs/2504.02507), 2025.
    """

    alpha: Any = 0.97
    z: Any = 2.5
    warmup: Any = 25
    max_norm: Any = 1.0
    eps: Any = 1e-6
    mode: str = "zscore"
    clip_option: str = "adaptive_scaling"
    clip_factor: Any = 1.0
    skip_update_on_spike: Any = False

    def __post_init__(self):
        check_number(self.alpha, "alpha", lo=0.0, hi=1.0)
        check_number(self.z, "z", lo=0.0, lo_open=True)
        check_number(self.warmup, "warmup", lo=1, integer=True)
        if self.max_norm is not None:
            check_number(self.max_norm, "max_norm", lo=0.0)
        check_number(self.eps, "eps", lo=0.0)
        check_number(self.clip_factor, "clip_factor", lo=0.0)
        check_choice(self.mode, "mode", _ZMODES)
        check_choice(self.clip_option, "clip_option", _ZOPTIONS)
        check_flag(self.skip_update_on_spike, "skip_update_on_spike")

    def init(self, norm_like: jax.Array) -> ZScoreState:
        # Three separate buffers, so the state can be donated right after init.
        return ZScoreState(
            jnp.zeros(jnp.shape(norm_like), jnp.int32),
            jnp.zeros_like(norm_like),
            jnp.zeros_like(norm_like),
        )

    def update(self, state: ZScoreState, norm, step):
        del step
        dt = norm.dtype
        alpha = jnp.asarray(self.alpha, dt)
        z_thresh = jnp.asarray(self.z, dt)
        warmup = jnp.asarray(self.warmup, jnp.int32)
        inf = jnp.full_like(norm, jnp.inf)
        cap = inf if self.max_norm is None else jnp.asarray(self.max_norm, dt)
        count, mean, var = state

        # Warm-up: Welford's running mean and sum of squared deviations.
        seen = norm > 0
        c1 = count + seen.astype(jnp.int32)
        delta = norm - mean
        w_mean = jnp.where(seen, mean + delta / jnp.maximum(c1, 1).astype(dt), mean)
        w_m2 = jnp.where(seen, var + delta * (norm - w_mean), var)
        w_var = jnp.where(
            seen & (c1 >= warmup), w_m2 / jnp.maximum(c1, 1).astype(dt), w_m2
        )
        w_threshold = jnp.minimum(inf, cap)

        # After warm-up: spike detection and the EMA update.
        std = _sqrt(jnp.maximum(var, 0))
        if self.mode == "percentile":
            clip_value = mean + z_thresh * std
            spike = norm > clip_value
        else:
            score = (norm - mean) / (std + jnp.asarray(self.eps, dt))
            spike = score > z_thresh
            if self.clip_option == "mean":
                clip_value = mean
            else:
                safe = jnp.where(spike, score, jnp.ones_like(score))
                clip_value = jnp.asarray(self.clip_factor, dt) * (
                    mean + z_thresh * z_thresh / safe * std
                )
        a_threshold = jnp.minimum(jnp.where(spike, clip_value, inf), cap)
        fed = jnp.where(spike, clip_value, norm)
        rest = one_minus(self.alpha, dt)
        e_mean = alpha * mean + rest * fed
        e_var = alpha * var + rest * (fed - e_mean) ** 2
        # A zero norm is no measurement: it never feeds the EMAs.
        freeze = (spike & jnp.asarray(self.skip_update_on_spike, jnp.bool_)) | ~seen
        e_mean = jnp.where(freeze, mean, e_mean)
        e_var = jnp.where(freeze, var, e_var)

        warm = count < warmup
        threshold = jnp.where(warm, w_threshold, a_threshold)
        new = ZScoreState(
            jnp.where(warm, c1, count),
            jnp.where(warm, w_mean, e_mean),
            jnp.where(warm, w_var, e_var),
        )
        return threshold, new


class EmaState(NamedTuple):
    """State of [`ema`][optaxclip.rules.ema].

    Attributes:
      count: int32, finite steps seen (scalar).
      average: the running statistic, one entry per norm; exactly 0 means
        "not yet set" (so the next non-zero norm initializes it).
    """

    count: jax.Array
    average: jax.Array


@dataclasses.dataclass(frozen=True)
class ema:  # noqa: N801
    """A bound ``ratio`` times a running average of the clipped norm (OLMo, AdaGC).

    After warm-up, with ``a`` the running average: the bound is
    ``ratio * a`` (the clip coefficient is ``min(1, ratio * a / (n + eps))``,
    exactly as the official code), and then
    ``a <- beta * a + (1 - beta) * min(n, bound)`` (the post-clip norm).

    During the first ``warmup`` finite steps (AdaGC): the measured norms are
    scaled together so the whole tree's measurement is at most
    ``warmup_max_norm`` (the scope passes it to ``update`` as ``total``:
    the global norm for the tensor and global scopes, AdaGC's warm-up; the
    largest entry or unit ratio for the element and unit scopes; None
    means no warm-up bound), and ``a`` is the running minimum of the
    post-clip norms.

    No absorbing zero: a norm of exactly zero never reaches the average. An
    average of exactly zero is "not set"; zero norms never set it (a tensor
    with an exactly-zero gradient in warm-up or on the first step would
    otherwise be clipped to zero for ever), and the first non-zero norm
    initializes it (bound ``ratio * n`` on that step, as OLMo's first step).
    After warm-up a zero norm leaves the average as it was (the official
    codes decay it: after a long run of zeros, a frozen tensor would be
    clipped to almost zero and the average would learn from that clipped
    value, growing back by a factor ``beta + (1 - beta) * ratio`` per step).
    So a run of zero norms, however long, is as if it had not happened: the
    first non-zero norm after it is bounded as before the run (recovery
    within 0 steps); a run inside warm-up only uses up warm-up steps.

    Args:
      ratio: the bound relative to the average (OLMo's
        ``max_grad_norm_ratio``, AdaGC's ``lambda_rel``), ``> 0``.
      beta: the EMA factor in ``[0, 1]``.
      warmup: number of warm-up steps (AdaGC: 100; OLMo: 0), ``>= 0``.
      warmup_max_norm: keyword-only; the global bound during warm-up
        (AdaGC's ``lambda_abs``), or None.
      eps: keyword-only; added to the norm in the clip coefficient
        (the official codes use ``1e-6``).

    Returns:
      A rule; its state is an [`EmaState`][optaxclip.rules.EmaState].

    Example:
      >>> import jax.numpy as jnp
      >>> from optaxclip import rules
      >>> rule = rules.ema(ratio=2.0, beta=0.5)
      >>> state = rule.init(jnp.zeros(()))
      >>> for n in [1.0, 10.0, 1.0]:
      ...     threshold, state = rule.update(state, jnp.array(n), 0)
      ...     print(threshold, state.average)
      2.0 1.0
      2.0 1.5
      3.0 1.25

    References:
      Wang et al., [AdaGC: Improving Training Stability for Large Language
      Model Pretraining](https://arxiv.org/abs/2502.11034), 2025.
      Groeneveld et al., [OLMo: Accelerating the Science of Language
      Models](https://arxiv.org/abs/2402.00838), 2024 (``max_grad_norm_ratio``).
    """

    ratio: Any = 1.05
    beta: Any = 0.95
    warmup: Any = 0
    warmup_max_norm: Any = None
    eps: Any = 0.0

    def __post_init__(self):
        check_number(self.ratio, "ratio", lo=0.0, lo_open=True)
        check_number(self.beta, "beta", lo=0.0, hi=1.0)
        check_number(self.warmup, "warmup", lo=0, integer=True)
        if self.warmup_max_norm is not None:
            check_number(self.warmup_max_norm, "warmup_max_norm", lo=0.0)
        check_number(self.eps, "eps", lo=0.0)

    def init(self, norm_like: jax.Array) -> EmaState:
        return EmaState(jnp.zeros((), jnp.int32), jnp.zeros_like(norm_like))

    def update(self, state: EmaState, norm, step):
        return self.observe(state, Observation(norm, None), step)  # pyright: ignore[reportArgumentType]

    def observe(self, state: EmaState, observation: Observation, step):
        """The threshold and next state; reads ``observation.total`` (the
        tree's global 2-norm) with ``warmup_max_norm``."""
        del step
        norm, total = observation.values, observation.total
        dt = norm.dtype
        eps = jnp.asarray(self.eps, dt)
        beta = jnp.asarray(self.beta, dt)
        count, average = state
        is_set = average > 0

        # Warm-up: one global clip, running minimum of the clipped norms.
        if self.warmup_max_norm is None:
            coefficient = jnp.ones((), dt)
        else:
            if total is None:
                raise ValueError(
                    "rules.ema(warmup_max_norm=...) bounds the whole tree's "
                    "measurement during warm-up: call `rules.observe` with an "
                    "`Observation` whose `total` is that measurement (every "
                    "optaxclip scope does)."
                )
            total = jnp.asarray(total, dt)
            cap = jnp.asarray(self.warmup_max_norm, dt)
            over = total > cap - eps
            # The division only where it is taken: a zero tree's total with
            # eps = 0 would be 0 / 0, whose derivative poisons the select.
            safe = jnp.where(over, total + eps, jnp.ones_like(total))
            coefficient = jnp.where(over, cap / safe, 1)
        w_threshold = norm * coefficient
        clipped = norm * coefficient
        w_average = jnp.where(
            clipped > 0,
            jnp.where(is_set, jnp.minimum(average, clipped), clipped),
            average,
        )

        # After warm-up: ratio times the average, EMA of the clipped norm.
        base = jnp.where(is_set, average, norm)
        bound = jnp.asarray(self.ratio, dt) * base
        positive = norm > 0
        safe = jnp.where(positive, norm, jnp.ones_like(norm))
        a_threshold = jnp.where(positive, bound * (safe / (safe + eps)), bound)
        a_average = jnp.where(
            positive,
            beta * base + one_minus(self.beta, dt) * jnp.minimum(norm, a_threshold),
            average,
        )

        warm = count < jnp.asarray(self.warmup, jnp.int32)
        threshold = jnp.where(warm, w_threshold, a_threshold)
        average = jnp.where(warm, w_average, a_average)
        return threshold, EmaState(jnp.asarray(optax.safe_increment(count)), average)


@dataclasses.dataclass(frozen=True)
class quantile:  # noqa: N801
    """Quantile tracking: the bound moves towards the ``target`` quantile of the norms.

    With ``C`` the current bound and ``b`` the fraction of norms at most
    ``C``: ``C <- C * exp(-learning_rate * (b - target))`` (geometric) or
    ``C <- max(0, C - learning_rate * (b - target))`` (arithmetic). The bound
    used on a step is ``C`` before that update.

    On the global scope ``b`` is ``1[n <= C]`` (streaming). For DP-SGD,
    call the rule with the vector of per-example norms and a state made by
    ``init`` of a scalar: leading axes of ``norm`` that the state does not
    have are samples, so ``b`` is the fraction of unclipped examples
    (Andrew et al. then add noise to ``b``; add it to ``target`` if needed).
    [`clip_per_example`][optaxclip.clip_per_example] passes them as
    ``Observation.samples``.

    No absorbing zero. A norm of exactly zero (a frozen layer, a masked
    phase, a padding example) is no measurement and does not move ``C``:
    per example, ``b`` is the fraction of the non-zero norms, and a step
    whose norms are all zero leaves ``C`` as it was. (Counted as unclipped,
    as in the paper, zeros shrink the geometric bound by
    ``exp(-learning_rate * (1 - target))`` per step until it underflows to
    exactly 0, from which the multiplicative update never leaves: about 850
    zero steps with the defaults.) So a run of zero norms, however long, is
    as if it had not happened: the first non-zero norm after it is bounded
    as before the run (recovery within 0 steps). On ordinary streams the
    update is exactly the paper's. The geometric bound is also kept at or
    above the dtype's smallest normal number (``jnp.finfo(dtype).tiny``),
    so it can never be exactly zero; with ``target > 0`` it grows from
    there by ``exp(learning_rate * target)`` per step on norms above it.
    With ``target = 0`` the bound only ever decreases, by definition.

    Args:
      target: the quantile to track, in ``[0, 1]``.
      learning_rate: the step size, ``>= 0``.
      initial: the first bound, ``> 0`` (``>= 0`` if not geometric).
      geometric: multiplicative (default, as the paper) or additive update.

    Returns:
      A rule; its state is the current bound ``C`` (an array).

    Example:
      >>> import jax.numpy as jnp
      >>> from optaxclip import rules
      >>> rule = rules.quantile(target=0.5, learning_rate=0.2, initial=1.0)
      >>> state = rule.init(jnp.zeros(()))
      >>> bound, state = rule.update(state, jnp.array([0.5, 3.0, 4.0, 0.2]), 0)
      >>> print(bound, state)
      1.0 1.0
      >>> bound, state = rule.update(state, jnp.array(0.1), 1)
      >>> print(bound, state)
      1.0 0.904837...

    References:
      Andrew et al., [Differentially Private Learning with Adaptive
      Clipping](https://arxiv.org/abs/1905.03871), 2021.
    """

    target: Any = 0.5
    learning_rate: Any = 0.2
    initial: Any = 0.1
    geometric: bool = True

    def __post_init__(self):
        check_flag(self.geometric, "geometric", static=True)
        check_number(self.target, "target", lo=0.0, hi=1.0)
        check_number(self.learning_rate, "learning_rate", lo=0.0)
        check_number(self.initial, "initial", lo=0.0, lo_open=bool(self.geometric))

    def init(self, norm_like: jax.Array) -> jax.Array:
        norm_like = jnp.asarray(norm_like)
        return jnp.full(norm_like.shape, self.initial, norm_like.dtype)

    def update(self, state: jax.Array, norm, step):
        norm = jnp.asarray(norm)
        state = jnp.asarray(state)
        if norm.ndim > state.ndim:
            # Leading axes the state does not have are samples (per-example
            # norms, the DP-SGD use above).
            samples = norm.reshape((-1, *state.shape))
            observation = Observation(jnp.mean(samples, axis=0), norm, samples)
        else:
            observation = Observation(norm, norm)
        return self.observe(state, observation, step)

    def observe(self, state: jax.Array, observation: Observation, step):
        """The threshold and next state; with ``observation.samples`` (the
        per-example norms) the bound moves by the fraction of non-zero
        samples at or under it."""
        del step
        bound = state
        dt = bound.dtype
        samples = observation.samples
        if samples is None:
            norm = observation.values
            positive = norm > 0
            below = (positive & (norm <= bound)).astype(dt)
            moves = positive
        else:
            positive = samples > 0
            below = (positive & (samples <= bound)).astype(dt)
            seen = jnp.sum(positive, axis=0, dtype=jnp.int32)
            below = jnp.sum(below, axis=0) / jnp.maximum(seen, 1).astype(dt)
            moves = seen > 0
        move = jnp.asarray(self.learning_rate, dt) * (
            below - jnp.asarray(self.target, dt)
        )
        if self.geometric:
            floor = jnp.asarray(jnp.finfo(dt).tiny, dt)
            new = jnp.maximum(bound * jnp.exp(-move), floor)
        else:
            new = jnp.maximum(bound - move, 0)
        return bound, jnp.where(moves, new, bound)


class MeanStdState(NamedTuple):
    """State of [`mean_std`][optaxclip.rules.mean_std].

    Attributes:
      buffer: the last ``window`` recorded values, shape
        ``norm.shape + (window,)`` (a ring buffer).
      count: int32, shaped like the norms: values recorded so far.
    """

    buffer: jax.Array
    count: jax.Array


@dataclasses.dataclass(frozen=True)
class mean_std:  # noqa: N801
    """The mean plus ``sigma`` standard deviations of the last ``window`` values.

    The bound on a step is ``mean + sigma * std`` of the values recorded on
    earlier steps (at most the last ``window``; ``std`` unbiased; this
    step's value is not included), and ``inf`` until ``min_history`` values
    have been recorded, this step's included, and at least two earlier ones
    (where the unbiased ``std`` is defined). Then this step's value is
    recorded. This is OLMo-core's spike rule (``SkipStepOptimizer``), the
    default of [`skip_spikes`][optaxclip.skip_spikes]; as a clipping
    threshold it bounds a norm to its recent spread.

    No absorbing zero: a value of exactly zero (a frozen or masked step) is
    not recorded, so a run of zeros, however long, leaves the history as it
    was (recovery within 0 steps). (OLMo-core records it: after a run of
    zero steps filling the window the bound is 0, and every later step is a
    spike until enough non-zero values have been recorded.) Negative values
    (a loss) are recorded.

    Args:
      window: the number of earlier values compared against, a Python int
        ``>= 2``.
      sigma: how many standard deviations above the mean is the bound,
        ``>= 0``.
      min_history: keyword-only; recorded values (this step's included)
        needed before the bound is finite; default ``max(3, window // 2)``
        (OLMo-core's ``window // 2``, but never fewer than two earlier
        values).

    Returns:
      A rule; its state is a [`MeanStdState`][optaxclip.rules.MeanStdState].

    Example:
      >>> import jax.numpy as jnp
      >>> from optaxclip import rules
      >>> rule = rules.mean_std(window=4, sigma=1.0, min_history=3)
      >>> state = rule.init(jnp.zeros(()))
      >>> for n in [1.0, 3.0, 2.0]:
      ...     bound, state = rule.update(state, jnp.array(n), 0)
      ...     print(bound)
      inf
      inf
      3.4142...

    References:
      OLMo-core ``SkipStepOptimizer`` (allenai/OLMo-core); Team OLMo,
      [2 OLMo 2 Furious](https://arxiv.org/abs/2501.00656), 2024.
    """

    window: int = 128
    sigma: Any = 6.0
    _: dataclasses.KW_ONLY
    min_history: int | None = None

    def __post_init__(self):
        check_size(self.window, "window", lo=2)
        check_number(self.sigma, "sigma", lo=0.0)
        check_size(self.min_history, "min_history", lo=3, allow_none=True)

    @property
    def history(self) -> int:
        """The recorded values needed before the bound is finite."""
        if self.min_history is None:
            return max(3, int(self.window) // 2)
        return int(self.min_history)

    def init(self, norm_like: jax.Array) -> MeanStdState:
        norm_like = jnp.asarray(norm_like)
        buffer = jnp.zeros((*norm_like.shape, int(self.window)), norm_like.dtype)
        return MeanStdState(buffer, jnp.zeros(norm_like.shape, jnp.int32))

    def update(self, state: MeanStdState, norm, step):
        del step
        window = int(self.window)
        dt = state.buffer.dtype
        value = jnp.asarray(norm).astype(dt)
        n = jnp.minimum(state.count, window)
        slots = jax.lax.broadcasted_iota(jnp.int32, state.buffer.shape, value.ndim)
        valid = slots < n[..., None]
        n_f = jnp.maximum(n, 1).astype(dt)
        mean = jnp.sum(jnp.where(valid, state.buffer, 0), axis=-1) / n_f
        centred = jnp.where(valid, state.buffer - mean[..., None], 0)
        var = jnp.sum(centred * centred, axis=-1) / jnp.maximum(n - 1, 1).astype(dt)
        active = (n + 1 >= self.history) & (n >= 2)
        bound = mean + jnp.asarray(self.sigma, dt) * _sqrt(var)
        threshold = jnp.where(active, bound, jnp.full_like(bound, jnp.inf))
        buffer, count = ring_push(state.buffer, state.count, value, value != 0)
        return threshold, MeanStdState(buffer, count)


class MaxEmaState(NamedTuple):
    """State of Stable-SPAM's bound (`BiasCorrectedMax`), one entry per tensor.

    Attributes:
      m_max: the EMA of each tensor's largest absolute entry.
      nonzero_count: int32, the non-zero measurements each tensor has had.
    """

    m_max: jax.Array
    nonzero_count: jax.Array


@dataclasses.dataclass(frozen=True)
class BiasCorrectedMax:
    """Stable-SPAM's bound: a bias-corrected EMA of the measurement.

    ``m <- beta * m + (1 - beta) * n`` from ``m = 0``, and the bound is
    ``m / (1 - beta**t)``, this step included, with ``t`` the number of
    non-zero measurements: an entry's EMA and count advance only on
    non-zero steps (``inf`` before the first). Used by
    [`stable_spam_clip`][optaxclip.stable_spam_clip].

    Args:
      beta: the EMA factor, in ``[0, 1)``.
    """

    beta: Any = 0.999

    def __post_init__(self):
        # beta = 1 would divide by 1 - beta**t = 0 in the bias correction.
        check_number(self.beta, "beta", lo=0.0, hi=1.0, hi_open=True)

    def init(self, norm_like: jax.Array) -> MaxEmaState:
        norm_like = jnp.asarray(norm_like)
        return MaxEmaState(
            jnp.zeros_like(norm_like), jnp.zeros(norm_like.shape, jnp.int32)
        )

    def update(self, state: MaxEmaState, norm, step):
        del step
        acc = norm.dtype
        seen = norm > 0
        count = state.nonzero_count + seen.astype(jnp.int32)
        ema = jnp.asarray(self.beta, acc) * state.m_max
        m_max = jnp.where(seen, ema + one_minus(self.beta, acc) * norm, state.m_max)
        correction = bias_correction(self.beta, count, acc)
        bound = jnp.where(
            count > 0, m_max / jnp.where(count > 0, correction, 1), jnp.inf
        )
        return bound, MaxEmaState(m_max, count)


def bias_correction(beta: Any, count: jax.Array, dtype: Any) -> jax.Array:
    """``1 - beta**count`` without cancellation: ``-expm1(count * log(beta))``."""
    if isinstance(beta, jax.Array):
        log_b = jnp.log(jnp.asarray(beta, dtype))
    else:
        b = float(beta)
        log_b = jnp.asarray(math.log(b) if b > 0 else -math.inf, dtype)
    return -jnp.expm1(jnp.asarray(count).astype(dtype) * log_b)


def one_minus(value: Any, dtype: Any) -> jax.Array:
    """``1 - value`` in ``dtype``, computed in float64 first for Python numbers.

    ``1 - float32(0.999)`` is off by 1.3e-5 relative; EMAs with factors close
    to 1 need the complement itself rounded once.
    """
    if isinstance(value, jax.Array):
        return 1 - jnp.asarray(value, dtype)
    return jnp.asarray(1.0 - float(value), dtype)


def ring_push(
    buffer: jax.Array, count: jax.Array, value: jax.Array, record: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Writes ``value`` into each entry's ring buffer where ``record`` holds.

    The one ring buffer of the windowed rules (`percentile`, `mean_std`):
    ``buffer`` has a trailing axis of slots, ``count`` (int32, shaped like
    ``value``) the values each entry has recorded; an entry writes its slot
    ``count % window`` and advances its count only where ``record`` is True
    (a frozen tensor records nothing while the others go on). A one-hot
    select, not a dynamic slice: each entry has its own slot.
    """
    slots = jax.lax.broadcasted_iota(jnp.int32, buffer.shape, value.ndim)
    write = (slots == (count % buffer.shape[-1])[..., None]) & record[..., None]
    buffer = jnp.where(write, value[..., None], buffer)
    return buffer, jnp.where(record, optax.safe_increment(count), count)


def _sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` whose derivative at 0 is 0, not inf.

    A standard deviation of identical values is ``sqrt(0)``; the plain
    derivative there is infinite, and times a zero tangent NaN, which would
    reach every derivative of the bound. The root is taken of a positive
    stand-in where ``x`` is 0, so the branch that is not taken has a finite
    derivative too.
    """
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)
