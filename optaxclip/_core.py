"""The one step every optaxclip transform runs, over the `Scope` protocol.

A transform is a declaration: a scope (what is measured, and what its
action does above the bound) and a rule (the bound). `Step` runs them in
order, written once:

1. ``scope.measure`` reads the updates once and returns a `Measurement`;
2. the rule turns the `rules.Observation` into a threshold;
3. on a non-finite step the old state is kept (`_tree.commit`, the one
   keep-the-old-state), for the rule's state and the scope's moments;
4. ``scope.apply`` acts (rescale, clamp, normalize, skip) in one fused pass;
5. `write_record` stores the step's stats (``optaxclip._stats``).

The core knows the state's fields by name: ``rule_state`` (where the
transform has a rule with a state), the record's four fields, and the
fields the scope keeps (`Scope.init`), which it updates from `Applied`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _checks
from ._stats import (
    RECORD_FIELDS,
    StatsField,
    empty_record,
    record_of,
    record_shape,
    write_record,
)
from ._tree import commit, float_leaves
from .rules import Observation, Rule, observe

__all__ = ["ClipState"]

_NONFINITE = ("zero", "propagate")
# The fields the core writes; a state's other fields are its scope's own.
_CORE_FIELDS = ("rule_state", *RECORD_FIELDS)


class ClipState(NamedTuple):
    """State of every optaxclip scope transform.

    Attributes:
      rule_state: the threshold rule's state (``()`` for a fixed threshold).
      count: int32, steps seen (the step index of the next update).
      norm_threshold_scale: the latest step's norm, bound and scale, as
        three rows (float; one column per tensor for per-tensor scopes).
      counts: int32, ``[clipped, nonfinite_count, *nonfinite_tensors]``: units
        clipped on the latest step, non-finite steps so far, and for a clip
        whose decision is global one 0/1 flag per tensor.
      tensor_norms: each tensor's norm on the latest step, with
        ``per_tensor_stats=True`` on a clip whose decision is global (empty
        otherwise).

    Read them together as ``state.stats`` (a
    [`ClipStats`][optaxclip.ClipStats]) or with [`stats`][optaxclip.stats].
    """

    rule_state: Any
    count: jax.Array
    norm_threshold_scale: jax.Array
    counts: jax.Array
    tensor_norms: jax.Array | tuple[()]

    stats = StatsField()


def check_nonfinite(nonfinite: str) -> bool:
    """Validates the ``nonfinite`` policy; True for ``"zero"``."""
    _checks.check_choice(nonfinite, "nonfinite", _NONFINITE)
    return nonfinite == "zero"


# ---------------------------------------------------------------------------
# The Scope protocol
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What a scope measured, for the rule, the action and the record.

    Attributes:
      norms: the recorded norms: a scalar, or one entry per tensor.
      finite: scalar bool, whether the step may reach the rule's
        statistics (every measured value finite).
      total: the whole tree's measurement as one scalar, in the scope's
        own terms (the global norm for the global and tensor scopes, the
        largest entry or unit ratio for the element and unit scopes).
      samples: per-example norms of which ``norms`` is the mean (the
        per-example scope), else None.
      leaf_norms: each tensor's own norm, for a scope whose decision is
        global (the record's per-tensor norms and non-finite flags), else
        None.
    """

    norms: jax.Array
    finite: jax.Array
    total: jax.Array
    samples: jax.Array | None = None
    leaf_norms: jax.Array | None = None


class Act(NamedTuple):
    """What a scope's action is given besides the updates and the measurement.

    Attributes:
      threshold: the bound, a scalar or one entry per measured norm.
      keep: the zeroing flag of ``nonfinite="zero"`` (the step's
        finiteness), or None under ``"propagate"``.
      state: the scope's own state fields (a mapping; see `Scope.init`).
      params: the ``params`` passed to ``update``.
      extra_args: the extra arguments passed to ``update``.
      count: the int32 step count.
    """

    threshold: jax.Array
    keep: jax.Array | None
    state: Mapping[str, Any]
    params: Any
    extra_args: dict[str, Any]
    count: jax.Array


class Applied(NamedTuple):
    """What an action did.

    Attributes:
      updates: the updates out.
      scale: the factor applied, shaped like the measured norms.
      clipped: the number of units clipped.
      moments: new values of the scope's state fields that a non-finite step
        must not touch (a second moment): the core keeps the old ones then.
      counters: new values of the scope's state fields written as given
        (skip counters, the wrapped optimizer's state after its own select).
    """

    updates: Any
    scale: jax.Array
    clipped: jax.Array
    moments: Mapping[str, Any] | None = None
    counters: Mapping[str, Any] | None = None


class Scope(abc.ABC):
    """What is measured, and what happens above the bound: the scope's action.

    A scope is a frozen dataclass that implements the abstract `norm_like`,
    `measure` and `apply` (and overrides `init` if it keeps state of its
    own). Class attributes:

    - ``owner``: the public function's name, for error messages;
    - ``leafwise``: the decision is global but the record keeps one flag
      (and, with ``per_tensor_stats``, one norm) per tensor;
    - ``per_tensor_stats``: record each tensor's norm;
    - ``stateless``: keeps no state of its own, so with a fixed threshold
      ``update(g, None)`` works.
    """

    owner: str = "clip"
    leafwise: bool = False
    per_tensor_stats: bool = False
    stateless: bool = True

    @abc.abstractmethod
    def norm_like(self, params: Any) -> jax.Array:
        """A zero array shaped like the norms measured on ``params``."""

    def init(self, params: Any) -> dict[str, Any]:
        """The scope's own state fields, by name (none by default)."""
        del params
        return {}

    @abc.abstractmethod
    def measure(
        self, updates: Any, params: Any, extra_args: dict[str, Any]
    ) -> Measurement:
        """Reads the updates once."""

    @abc.abstractmethod
    def apply(self, updates: Any, measured: Any, act: Act) -> Applied:
        """Acts on the updates: rescale, clamp, normalize or skip."""


def record_sizes(scope: Scope, params: Any) -> tuple[int, int | None]:
    """How many non-finite flags and per-tensor norms ``scope`` records.

    A scope whose decision is global (``leafwise``) flags each tensor that
    was non-finite, and with ``per_tensor_stats`` records each tensor's
    norm (None: not recorded); per-tensor scopes need neither (their norms
    are per tensor).
    """
    if not scope.leafwise:
        return 0, None
    n = len(float_leaves(params))
    return n, n if scope.per_tensor_stats else None


# ---------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step:
    """One transform: a scope and a rule, run as one step.

    Attributes:
      scope: measures the updates and acts on them.
      rule: turns the observation into the threshold.
      zero_nonfinite: the ``nonfinite="zero"`` policy (else propagate).
      state_type: the transform's state class, a NamedTuple whose fields
        are the record's, ``rule_state`` (if the rule keeps state) and the
        scope's own (`Scope.init`).
    """

    scope: Scope
    rule: Rule
    zero_nonfinite: bool = True
    state_type: type = ClipState

    def init(self, params: Any) -> Any:
        norm_like = self.scope.norm_like(params)
        record = empty_record(norm_like, *record_sizes(self.scope, params))
        fields = {
            "rule_state": self.rule.init(norm_like),
            **self.scope.init(params),
            **record._asdict(),
        }
        return self.state_type(**{f: fields[f] for f in self.state_type._fields})

    def update(
        self, updates: Any, state: Any, params: Any = None, **extra_args: Any
    ) -> tuple[Any, Any]:
        scope = self.scope
        if state is None or isinstance(state, optax.EmptyState):
            state = self.fresh_state(state, updates)
        if not isinstance(state, self.state_type):
            raise TypeError(
                f"{scope.owner}: expected its state "
                f"({self.state_type.__name__}); got {type(state).__name__}. "
                "Was `init` called on this transform?"
            )
        record = record_of(state)
        measured = scope.measure(updates, params, extra_args)
        _checks.check_fits(scope.owner, measured.norms.shape, record_shape(record))
        old_rule_state = getattr(state, "rule_state", ())
        observation = Observation(measured.norms, measured.total, measured.samples)
        threshold, rule_state = observe(
            self.rule, old_rule_state, observation, record.count
        )
        # A negative threshold (only from a traced hyperparameter, which
        # construction cannot check) acts as 0. A scalar threshold stays a
        # scalar, so equally shaped leaves share their kernels.
        threshold = jnp.maximum(jnp.asarray(threshold, measured.norms.dtype), 0)
        finite = measured.finite
        own = {f: getattr(state, f) for f in state._fields if f not in _CORE_FIELDS}
        keep = finite if self.zero_nonfinite else None
        act = Act(threshold, keep, own, params, extra_args, record.count)
        applied = scope.apply(updates, measured, act)
        leaf = measured.leaf_norms
        new_record = write_record(
            record,
            measured.norms,
            threshold,
            applied.scale,
            applied.clipped,
            finite,
            None if leaf is None else ~jnp.isfinite(leaf),
            leaf if scope.per_tensor_stats else None,
        )
        fields: dict[str, Any] = dict(new_record._asdict())
        if "rule_state" in self.state_type._fields:
            fields["rule_state"] = commit(finite, rule_state, old_rule_state)
        for name, value in (applied.moments or {}).items():
            fields[name] = commit(finite, value, own[name])
        fields.update(applied.counters or {})
        return applied.updates, state._replace(**fields)

    def fresh_state(self, given: Any, updates: Any) -> Any:
        """The state to use when ``update`` is given ``None`` / ``EmptyState()``.

        optax's stateless transforms accept ``tx.update(g, None)``; so does a
        transform whose threshold has no history (a number or a schedule,
        which is then read at step 0: its rule's state is empty) and whose
        scope keeps none: its state is created fresh. A rule that learns
        from the run, or a scope with a state (a wrapped optimizer, a second
        moment), refuses: that history would restart every step.
        """
        hint = (
            "would restart on every step. Call `state = tx.init(params)` once "
            "and pass the state that each `update` returns to the next one."
        )
        if not self.scope.stateless:
            raise ValueError(
                f"`update` got state {given!r}, but this transform keeps a "
                "state across steps (a wrapped optimizer's, or a moment "
                f"estimate), which {hint}"
            )
        state = self.init(updates)
        if jax.tree.leaves(getattr(state, "rule_state", ())):
            raise ValueError(
                f"`update` got state {given!r}, but this transform's threshold "
                f"rule ({type(self.rule).__name__}) learns from the norms of "
                f"earlier steps, which {hint}"
            )
        return state

    def transform(self) -> optax.GradientTransformationExtraArgs:
        return optax.GradientTransformationExtraArgs(self.init, self.update)
