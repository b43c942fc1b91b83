"""Guards: wrap a whole optimizer and skip bad steps.

A skipped step outputs a zero update and leaves the inner optimizer's state
exactly as it was (Adam's moments and step count included), as if the step
had never happened.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _checks, _norms
from ._clipping import keep_if, zero_unless
from ._stats import ClipStats

__all__ = ["skip_nonfinite", "skip_spikes"]


class SkipNonfiniteState(NamedTuple):
    """State of [`skip_nonfinite`][optaxclip.skip_nonfinite].

    Attributes:
      inner_state: the wrapped optimizer's state.
      stats: [`ClipStats`][optaxclip.ClipStats] (``norm``: global norm of the
        incoming updates; ``threshold``: ``inf``; ``scale``: 1 if applied,
        0 if skipped; ``clipped``: 1 if skipped; ``nonfinite_count``: total
        non-finite steps).
      consecutive: int32, non-finite steps in a row up to this one.
    """

    inner_state: Any
    stats: ClipStats
    consecutive: jax.Array


def skip_nonfinite(
    inner: optax.GradientTransformation, max_consecutive: int | None = None
) -> optax.GradientTransformationExtraArgs:
    """Skips every step whose updates hold a NaN or Inf, like ``optax.apply_if_finite``.

    The check reads the updates once: a step is non-finite when its global
    2-norm is NaN or infinite, which is when an entry is NaN or infinite (or
    one tensor's own 2-norm exceeds ``2**64``, beyond float32's range for
    its sum of squares). On a skipped step the output is zero and
    ``inner``'s state is returned unchanged (bit for bit). With
    ``max_consecutive`` set, once more than that many steps in a row were
    non-finite the update is passed to
    ``inner`` anyway (``optax.apply_if_finite``'s ``max_consecutive_errors``);
    with None (default) non-finite steps are always skipped.

    Args:
      inner: the optimizer (or any transform) to guard.
      max_consecutive: the number of consecutive non-finite steps tolerated,
        or None.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      `SkipNonfiniteState`; extra arguments are passed to ``inner``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optaxclip as oc
      >>> tx = oc.skip_nonfinite(optax.sgd(0.1, momentum=0.9))
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> out, state = tx.update(jnp.array([1.0, jnp.nan]), state, params)
      >>> print(out, state.inner_state[0].trace, state.stats.nonfinite_count)
      [0. 0.] [0. 0.] 1

    References:
      ``optax.apply_if_finite``.
    """
    if max_consecutive is not None:
        with _checks.arguments("skip_nonfinite"):
            _checks.check_number(max_consecutive, "max_consecutive", lo=0, integer=True)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        acc = _norms.tree_acc_dtype(params)
        return SkipNonfiniteState(
            inner.init(params),
            ClipStats.zeros(jnp.zeros((), acc)),
            jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        # One pass: the norm is NaN or inf exactly when an entry is (or when
        # one tensor's 2-norm exceeds 2**64, which also counts as non-finite).
        norm = _norms.global_norm(updates).astype(state.stats.norm.dtype)
        finite = jnp.isfinite(norm)
        consecutive = jnp.where(
            finite, jnp.zeros((), jnp.int32), optax.safe_increment(state.consecutive)
        )
        apply = finite
        if max_consecutive is not None:
            apply = apply | (consecutive > jnp.asarray(max_consecutive, jnp.int32))
        out, inner_state = _apply_or_skip(
            inner, apply, updates, state.inner_state, params, extra_args
        )
        stats = _guard_stats(
            state.stats, norm, jnp.full_like(norm, jnp.inf), apply, finite
        )
        return out, SkipNonfiniteState(inner_state, stats, consecutive)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class SkipSpikesState(NamedTuple):
    """State of [`skip_spikes`][optaxclip.skip_spikes].

    Attributes:
      inner_state: the wrapped optimizer's state.
      stats: [`ClipStats`][optaxclip.ClipStats] (``norm``: global norm of the
        incoming updates; ``threshold``: ``mean + sigma * std`` of the past
        norms, ``inf`` while not yet checked; ``scale``: 1 if applied, 0 if
        skipped; ``clipped``: 1 if skipped).
      norms: ring buffer of the last ``window`` finite update norms.
      losses: ring buffer of the last ``window`` finite losses.
      norm_count: int32, norms recorded so far.
      loss_count: int32, losses recorded so far.
      skipped: int32, total steps skipped.
    """

    inner_state: Any
    stats: ClipStats
    norms: jax.Array
    losses: jax.Array
    norm_count: jax.Array
    loss_count: jax.Array
    skipped: jax.Array


def skip_spikes(
    inner: optax.GradientTransformation,
    window: int = 128,
    sigma: Any = 6.0,
    *,
    min_history: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Skips steps whose gradient norm (or loss) spikes above its recent history.

    As OLMo-core's ``SkipStepOptimizer``: a step is skipped (zero update,
    ``inner``'s state untouched, Adam's moments and step count included)
    when its gradient norm exceeds ``mean + sigma * std`` of the norms of
    the previous ``window`` steps (unbiased ``std``, the current step
    excluded), or when the loss, passed as the ``value`` extra argument
    (``tx.update(grads, state, params, value=loss)``), does the same against
    the previous losses. Steps are only checked once ``min_history`` values
    have been recorded, the current one included (default
    ``max(3, window // 2)``: OLMo-core's ``window // 2``, but never with
    fewer than two previous values, where the unbiased ``std`` is undefined).
    Every finite value is recorded, spikes included (as OLMo-core), except a
    gradient norm of exactly zero (a frozen or masked step): that step is
    applied and its norm is not recorded. (OLMo-core records it: after a run
    of zero steps filling the window the bound is 0, and every later step
    is skipped as a spike until enough non-zero norms have been recorded,
    dozens of steps for a small ``sigma``.) So a run of zero-norm steps,
    however long, leaves the norm history as it was, and the first non-zero
    step after it is checked as if the run had not happened (recovery
    within 0 steps). A step with a NaN or Inf norm or loss is always skipped
    and never recorded.

    Args:
      inner: the optimizer to guard.
      window: the number of previous steps compared against (a Python int
        ``>= 2``).
      sigma: how many standard deviations above the mean count as a spike.
      min_history: keyword-only; recorded values (current included) needed
        before steps are checked.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      `SkipSpikesState`; extra arguments (``value`` included) are
      passed to ``inner``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optaxclip as oc
      >>> tx = oc.skip_spikes(optax.sgd(1.0), window=4, sigma=3.0)
      >>> params = jnp.zeros(1)
      >>> state = tx.init(params)
      >>> for g in [1.0, 1.1, 0.9, 1.0, 50.0]:
      ...     out, state = tx.update(jnp.array([g]), state, params)
      >>> print(out, state.skipped)
      [0.] 1

    References:
      OLMo-core ``SkipStepOptimizer`` (allenai/OLMo-core); Team OLMo,
      [2 OLMo 2 Furious](https://arxiv.org/abs/2501.00656), 2024.
    """
    with _checks.arguments("skip_spikes"):
        _checks.check_size(window, "window", lo=2)
        _checks.check_number(sigma, "sigma", lo=0.0)
        _checks.check_size(min_history, "min_history", lo=3, allow_none=True)
    if min_history is None:
        min_history = max(3, window // 2)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        acc = _norms.tree_acc_dtype(params)
        # Every field its own buffer, so the state can be donated after init.
        return SkipSpikesState(
            inner.init(params),
            ClipStats.zeros(jnp.zeros((), acc)),
            jnp.zeros((window,), acc),
            jnp.zeros((window,), acc),
            jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        acc = state.norms.dtype
        norm = _norms.global_norm(updates).astype(acc)
        finite = jnp.isfinite(norm)
        sig = jnp.asarray(sigma, acc)
        bound, active = _history_bound(state.norms, state.norm_count, sig, min_history)
        spike = active & (norm > bound)
        norms, norm_count = state.norms, state.norm_count
        losses, loss_count = state.losses, state.loss_count
        value = extra_args.get("value")
        if value is not None:
            loss = jnp.asarray(value).astype(acc)
            finite = finite & jnp.isfinite(loss)
            l_bound, l_active = _history_bound(losses, loss_count, sig, min_history)
            spike = spike | (l_active & (loss > l_bound))
            losses, loss_count = _record(losses, loss_count, loss, finite)
        # A zero norm (frozen or masked step) is no measurement of the scale.
        norms, norm_count = _record(norms, norm_count, norm, finite & (norm > 0))
        apply = finite & ~spike
        out, inner_state = _apply_or_skip(
            inner, apply, updates, state.inner_state, params, extra_args
        )
        stats = _guard_stats(
            state.stats, norm, jnp.where(active, bound, jnp.inf), apply, finite
        )
        skipped = state.skipped + (~apply).astype(jnp.int32)
        return out, SkipSpikesState(
            inner_state, stats, norms, losses, norm_count, loss_count, skipped
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _apply_or_skip(inner, apply, updates, inner_state, params, extra_args):
    # The inner update always runs and its results are selected, as in
    # optax.apply_if_finite: a select fuses into the inner update's own
    # kernels, while a lax.cond over the whole tree stops that fusion and,
    # on accelerators, waits for the predicate on the host every step. A
    # skipped step's NaN results never leave the select.
    out, new_state = inner.update(updates, inner_state, params, **extra_args)
    out = jax.tree.map(lambda x: zero_unless(apply, jnp.asarray(x)), out)
    return out, keep_if(apply, new_state, inner_state)


def _history_bound(buffer, count, sigma, min_history):
    window = buffer.shape[0]
    n = jnp.minimum(count, window)
    valid = jnp.arange(window) < n
    n_f = jnp.maximum(n, 1).astype(buffer.dtype)
    mean = jnp.sum(jnp.where(valid, buffer, 0)) / n_f
    centred = jnp.where(valid, buffer - mean, 0)
    var = jnp.sum(centred * centred) / jnp.maximum(n - 1, 1).astype(buffer.dtype)
    active = (n + 1 >= min_history) & (n >= 2)
    return mean + sigma * jnp.sqrt(var), active


def _record(buffer, count, value, finite):
    slot = count % buffer.shape[0]
    updated = buffer.at[slot].set(value)
    return (
        jnp.where(finite, updated, buffer),
        jnp.where(finite, optax.safe_increment(count), count),
    )


def _guard_stats(old, norm, threshold, apply, finite) -> ClipStats:
    one = jnp.ones_like(norm)
    return ClipStats(
        norm=norm,
        threshold=threshold.astype(norm.dtype),
        scale=jnp.where(apply, one, jnp.zeros_like(one)),
        clipped=(~apply).astype(jnp.int32),
        nonfinite_count=old.nonfinite_count + (~finite).astype(jnp.int32),
        count=optax.safe_increment(old.count),
    )
