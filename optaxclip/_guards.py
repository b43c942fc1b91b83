"""Guards: wrap a whole optimizer and skip bad steps.

A skipped step outputs a zero update and leaves the inner optimizer's state
exactly as it was (Adam's moments and step count included), as if the step
had never happened.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _checks, _mesh, _norms, _numerics, rules
from ._core import Applied, Measurement, Scope, Step
from ._stats import StatsField
from ._tree import commit, full_like, sharded_like, zero_unless

__all__ = ["SkipNonfiniteState", "SkipSpikesState", "skip_nonfinite", "skip_spikes"]


class SkipNonfiniteState(NamedTuple):
    """State of [`skip_nonfinite`][optaxclip.skip_nonfinite].

    Attributes:
      inner_state: the wrapped optimizer's state.
      consecutive: int32, non-finite steps in a row up to this one.
      skipped: int32, total steps skipped.
      count: int32, steps seen.
      norm_threshold_scale: the latest step's global norm of the incoming
        updates, ``inf`` (the threshold) and 1 if applied or 0 if skipped.
      counts: int32, ``[skipped this step (0/1), nonfinite_count,
        *nonfinite_tensors]``.
      tensor_norms: each tensor's norm, with ``per_tensor_stats=True``.

    Read the stats together as ``state.stats`` (a
    [`ClipStats`][optaxclip.ClipStats]).
    """

    inner_state: Any
    consecutive: jax.Array
    skipped: jax.Array
    count: jax.Array
    norm_threshold_scale: jax.Array
    counts: jax.Array
    tensor_norms: jax.Array | tuple[()]

    stats = StatsField()


def skip_nonfinite(
    inner: optax.GradientTransformation,
    max_consecutive: int | None = None,
    *,
    axis_name: _mesh.AxisName = None,
    partition_specs: Any = None,
    per_tensor_stats: bool = False,
    lazy: bool = False,
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
      axis_name: keyword-only; the ``shard_map`` / ``pmap`` mesh axis (or
        axes) the leaves are split across, so the norm is the whole tree's.
      partition_specs: keyword-only; which leaves are split across
        ``axis_name`` (see [`clip_by_global_norm`][optaxclip.clip_by_global_norm]).
      per_tensor_stats: keyword-only; also record each tensor's 2-norm on
        every step (``stats.tensor_norms``; per-tensor keys in
        [`metrics`][optaxclip.metrics]). Which tensors were non-finite is
        recorded either way ([`nonfinite_paths`][optaxclip.nonfinite_paths]).
      lazy: keyword-only; skip through ``jax.lax.cond``, so a skipped step
        does not run ``inner`` at all (default False: ``inner`` always runs
        and its results are selected). Both give the same updates, state and
        stats on every step, to float rounding; see "Skipping lazily: select
        or cond" on the methods page for which is faster.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`SkipNonfiniteState`][optaxclip.SkipNonfiniteState]; extra arguments
      are passed to ``inner``.

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
    options = (axis_name, partition_specs, per_tensor_stats, lazy)
    scope = _skip_scope("skip_nonfinite", inner, None, max_consecutive, *options)
    return Step(scope, rules.fixed(float("inf")), True, SkipNonfiniteState).transform()


class SkipSpikesState(NamedTuple):
    """State of [`skip_spikes`][optaxclip.skip_spikes].

    Attributes:
      inner_state: the wrapped optimizer's state.
      rule_state: the rule's state for the gradient norm (for the default
        rule a [`MeanStdState`][optaxclip.rules.MeanStdState]: the last
        ``window`` recorded norms and their count).
      loss_state: the same rule's state for the loss (the ``value`` extra
        argument).
      skipped: int32, total steps skipped.
      value_threshold: the loss's bound on the latest step (``inf`` while not
        yet checked, or when no ``value`` was passed).
      count: int32, steps seen.
      norm_threshold_scale: the latest step's global norm of the incoming
        updates, the rule's bound (``inf`` while not yet checked) and 1 if
        applied or 0 if skipped.
      counts: int32, ``[skipped this step (0/1), nonfinite_count,
        *nonfinite_tensors]``.
      tensor_norms: each tensor's norm, with ``per_tensor_stats=True``.

    Read the stats together as ``state.stats`` (a
    [`ClipStats`][optaxclip.ClipStats]).
    """

    inner_state: Any
    rule_state: Any
    loss_state: Any
    skipped: jax.Array
    value_threshold: jax.Array
    count: jax.Array
    norm_threshold_scale: jax.Array
    counts: jax.Array
    tensor_norms: jax.Array | tuple[()]

    stats = StatsField()


def skip_spikes(
    inner: optax.GradientTransformation,
    window: int = 128,
    sigma: Any = 6.0,
    *,
    min_history: int | None = None,
    rule: rules.Threshold | None = None,
    axis_name: _mesh.AxisName = None,
    partition_specs: Any = None,
    per_tensor_stats: bool = False,
    lazy: bool = False,
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

    The check is a rule, the skip an action: the default rule is
    [`rules.mean_std`][optaxclip.rules.mean_std], and ``rule=`` takes any
    other; [`skip_nonfinite`][optaxclip.skip_nonfinite] is the same guard
    with an infinite threshold.

    Args:
      inner: the optimizer to guard.
      window: the number of previous steps compared against (a Python int
        ``>= 2``).
      sigma: how many standard deviations above the mean count as a spike.
      min_history: keyword-only; recorded values (current included) needed
        before steps are checked.
      rule: keyword-only; any threshold rule (or number, or schedule) in
        place of the default ``rules.mean_std(window, sigma,
        min_history=min_history)``: a step is skipped when its norm is above
        the rule's bound, and the loss is checked by the same rule with its
        own state (e.g. ``rule=rules.zscore(max_norm=None)``). With ``rule``,
        leave ``window``, ``sigma`` and ``min_history`` at their defaults.
      axis_name: keyword-only; mesh axis (or axes) the leaves are split
        across inside ``shard_map`` / ``pmap``.
      partition_specs: keyword-only; which leaves are split across it.
      per_tensor_stats: keyword-only; also record each tensor's 2-norm on
        every step (``stats.tensor_norms``; per-tensor keys in
        [`metrics`][optaxclip.metrics]). Which tensors were non-finite is
        recorded either way ([`nonfinite_paths`][optaxclip.nonfinite_paths]).
      lazy: keyword-only; skip through ``jax.lax.cond``, so a skipped step
        does not run ``inner`` at all (default False: ``inner`` always runs
        and its results are selected). Both give the same updates, state and
        stats on every step, to float rounding; see "Skipping lazily: select
        or cond" on the methods page for which is faster.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`SkipSpikesState`][optaxclip.SkipSpikesState]; extra arguments
      (``value`` included) are
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
    if rule is None:
        with _checks.arguments("skip_spikes"):
            rule = rules.mean_std(window, sigma, min_history=min_history)
    else:
        given = window != 128 or not _is_default_sigma(sigma) or min_history is not None
        if given:
            raise ValueError(
                f"skip_spikes got `rule`={rule!r} and also window={window!r}, "
                f"sigma={sigma!r}, min_history={min_history!r}: those configure the "
                "default rule. Pass them to the rule instead, e.g. "
                "`rule=rules.mean_std(window, sigma)`."
            )
        rule = rules.as_rule(rule, "rule")
    options = (axis_name, partition_specs, per_tensor_stats, lazy)
    scope = _skip_scope("skip_spikes", inner, rule, None, *options)
    return Step(scope, rule, True, SkipSpikesState).transform()


def _skip_scope(
    owner, inner, loss_rule, max_consecutive, axis_name, specs, per_tensor, lazy
):
    """The guard's scope, its flags checked in the words of ``owner``."""
    with _checks.arguments(owner):
        lazy = _checks.static_flag(lazy, "lazy")
        per_tensor = _checks.static_flag(per_tensor, "per_tensor_stats")
    inner = optax.with_extra_args_support(inner)
    return SkipScope(
        inner, loss_rule, max_consecutive, axis_name, specs, owner, per_tensor, lazy
    )


def _is_default_sigma(sigma: Any) -> bool:
    return isinstance(sigma, int | float) and float(sigma) == 6.0


@dataclasses.dataclass(frozen=True)
class GuardMeasurement(Measurement):
    """The global 2-norm of the updates, each tensor's, and the loss if passed."""

    loss: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class SkipScope(Scope):
    """The whole tree's 2-norm; the action applies the wrapped optimizer or
    skips the step entirely.

    A step is skipped when it is not finite or its norm (or loss, checked
    by ``loss_rule`` against its own history) is above the threshold,
    unless more than ``max_consecutive`` non-finite steps came in a row.
    Its state: the wrapped optimizer's (``inner_state``), ``skipped``, and
    ``consecutive`` (`skip_nonfinite`) or the loss rule's ``loss_state`` and
    ``value_threshold`` (`skip_spikes`). With ``lazy``, a skipped step does
    not run ``inner`` (`cond_update`).
    """

    inner: optax.GradientTransformationExtraArgs
    loss_rule: rules.Rule | None
    max_consecutive: int | None
    axis_name: _mesh.AxisName
    partition_specs: Any
    owner: str
    per_tensor_stats: bool = False
    lazy: bool = False
    leafwise = True
    stateless = False

    def norm_like(self, params: Any) -> jax.Array:
        return jnp.zeros((), _numerics.tree_acc_dtype(params))

    def init(self, params: Any) -> dict[str, Any]:
        # Every field its own buffer, so the state can be donated after init.
        acc = _numerics.tree_acc_dtype(params)
        fields = {
            "inner_state": self.inner.init(params),
            "skipped": jnp.zeros((), jnp.int32),
        }
        if self.loss_rule is None:
            fields["consecutive"] = jnp.zeros((), jnp.int32)
        else:
            fields["loss_state"] = self.loss_rule.init(jnp.zeros((), acc))
            fields["value_threshold"] = jnp.full((), jnp.inf, acc)
        return fields

    def measure(self, updates, params, extra_args) -> GuardMeasurement:
        del params
        # One pass: the norm is NaN or inf exactly when an entry is (or when
        # one tensor's 2-norm exceeds 2**64, which also counts as non-finite).
        norm, per_leaf = _norms.tree_norms(
            updates, 2.0, self.axis_name, self.partition_specs
        )
        finite = jnp.isfinite(norm)
        value = extra_args.get("value")
        loss = None
        if value is not None:
            loss = jnp.asarray(value).astype(norm.dtype)
            finite = finite & jnp.isfinite(loss)
        return GuardMeasurement(norm, finite, norm, None, per_leaf, loss)

    def apply(self, updates: Any, measured: GuardMeasurement, act) -> Applied:
        finite, state = measured.finite, act.state
        spike = measured.norms > act.threshold
        moments, counters = {}, {}
        if self.loss_rule is not None:
            bound = jnp.full_like(state["value_threshold"], jnp.inf)
            if measured.loss is not None:
                bound, moments["loss_state"] = self.loss_rule.update(
                    state["loss_state"], measured.loss, act.count
                )
                spike = spike | (measured.loss > bound)
            counters["value_threshold"] = jnp.asarray(bound).astype(
                state["value_threshold"].dtype
            )
        apply = finite & ~spike
        if "consecutive" in state:
            consecutive = jnp.where(
                finite,
                jnp.zeros_like(state["consecutive"]),
                optax.safe_increment(state["consecutive"]),
            )
            counters["consecutive"] = consecutive
            if self.max_consecutive is not None:
                limit = jnp.asarray(self.max_consecutive, jnp.int32)
                apply = apply | (consecutive > limit)
        out, counters["inner_state"] = _apply_or_skip(
            self.inner,
            apply,
            updates,
            state["inner_state"],
            act.params,
            act.extra_args,
            self.lazy,
        )
        counters["skipped"] = state["skipped"] + (~apply).astype(jnp.int32)
        scale = apply.astype(measured.norms.dtype)
        return Applied(out, scale, ~apply, moments, counters)


def _apply_or_skip(inner, apply, updates, inner_state, params, extra_args, lazy):
    # By default the inner update always runs and its results are selected,
    # as in optax.apply_if_finite: a select fuses into the inner update's own
    # kernels, while a lax.cond over the whole tree stops that fusion and,
    # on GPU, waits for the predicate on the host every step. A skipped
    # step's NaN results never leave the select. ``lazy`` takes the cond.
    if lazy:
        return cond_update(inner, apply, updates, inner_state, params, extra_args)
    out, new_state = inner.update(updates, inner_state, params, **extra_args)
    out = jax.tree.map(lambda x: zero_unless(apply, jnp.asarray(x)), out)
    return out, commit(apply, new_state, inner_state)


# ---------------------------------------------------------------------------
# Lazy skipping: the inner update under a lax.cond
# ---------------------------------------------------------------------------


def cond_update(inner, apply, updates, inner_state, params, extra_args):
    """``inner.update`` where ``apply`` holds, else zeros and the old state.

    A ``jax.lax.cond``, so a skipped step runs none of ``inner``'s work (for
    Muon, its Newton–Schulz iterations). The results are those of the
    select in `_apply_or_skip`: the applied branch returns ``inner``'s
    output as it is and its state in the dtype the select gives; the
    skipped one zeros of the output's dtypes, carrying the sharding of the
    incoming updates (the applied output is given that sharding too, a
    no-op where ``inner`` keeps it, so both branches have one type on a
    mesh with Explicit axes), and the old state. (Where XLA fuses the
    select into ``inner``'s kernels it may round an entry differently;
    the cond gives ``inner``'s own rounding.)
    """

    def run():
        return inner.update(updates, inner_state, params, **extra_args)

    out_shapes, state_shapes = jax.eval_shape(run)
    kinds = jax.tree.map(jnp.result_type, state_shapes, inner_state)

    def applied():
        out, new_state = run()
        out = jax.tree.map(_like_update, out, updates)
        return out, jax.tree.map(lambda x, t: x.astype(t), new_state, kinds)

    def skipped():
        zeros = jax.tree.map(_zeros_like_update, out_shapes, updates)
        return zeros, jax.tree.map(lambda x, t: x.astype(t), inner_state, kinds)

    return jax.lax.cond(apply, applied, skipped)


def _like_update(x: jax.Array, u: Any) -> jax.Array:
    same = jnp.shape(u) == jnp.shape(x)
    return sharded_like(u, x) if same else x


def _zeros_like_update(shape: Any, u: Any) -> jax.Array:
    if jnp.shape(u) == shape.shape:
        return full_like(u, 0, shape.dtype)
    return jnp.zeros(shape.shape, shape.dtype)
