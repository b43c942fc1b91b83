"""The one step every optaxclip transform runs, and the state it keeps.

A transform is a declaration: a scope (what is measured), a rule (the
bound) and an action (what happens above it). `Step` runs them in order:

1. ``scope.measure`` reads the updates once and returns a `Measurement`;
2. the rule turns the observation into a threshold;
3. the rule's new state is kept only on a finite step;
4. ``action.apply`` rescales, clamps or skips, in one fused pass;
5. `write_record` stores the step's stats (``optaxclip._stats``).

The primitives every action shares live here too, one of each: the safe
scale factor, the sharding-preserving zeroing select and keeping the old
state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import jax
import jax.numpy as jnp
import optax

from . import _checks, _norms
from ._stats import (
    ClipStats,
    Record,
    empty_record,
    read_record,
    record_of,
    record_shape,
    write_record,
)
from .rules import Rule, fixed, scheduled

__all__ = ["ClipState"]

_NONFINITE = ("zero", "propagate")


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

    @property
    def stats(self) -> ClipStats:
        """The latest step's [`ClipStats`][optaxclip.ClipStats]."""
        return read_record(record_of(self))


# ---------------------------------------------------------------------------
# Primitives shared by every action
# ---------------------------------------------------------------------------


def check_nonfinite(nonfinite: str) -> bool:
    """Validates the ``nonfinite`` policy; True for ``"zero"``."""
    _checks.check_choice(nonfinite, "nonfinite", _NONFINITE)
    return nonfinite == "zero"


def safe_scale(
    norms: jax.Array, threshold: jax.Array, keep: jax.Array | None = None
) -> jax.Array:
    """``min(1, threshold / norms)`` with no division by zero.

    A norm at or under the threshold gives exactly 1 (a zero norm with a
    zero threshold too), an infinite norm 0, and a NaN norm a NaN scale, as
    in optax, so ``nonfinite="propagate"`` reproduces optax; with ``keep``
    (the step's finiteness) the scale is 0 where it is False.
    """
    return _norms.piece_scale(norms, threshold, False, keep)


def rescale(
    x: jax.Array, norm: jax.Array, bound: jax.Array, keep: jax.Array | None
) -> jax.Array:
    """``x * min(1, bound / norm)``, written per entry as optax does.

    ``where(norm <= bound, x, x / norm * bound)`` in the accumulation dtype,
    cast back to ``x.dtype``: the scalar factor is never a kernel of its
    own (the division fuses into the pass over ``x``), so a one-leaf step is
    as few kernels as optax's. With ``keep``, entries are zeroed where it is
    False.
    """
    dtype = _norms.compute_dtype(x.dtype)
    a = x if x.dtype == dtype else jax.lax.convert_element_type(x, dtype)
    n = norm.astype(dtype) if norm.dtype != dtype else norm
    b = bound.astype(dtype) if bound.dtype != dtype else bound
    out = _clipped(a, n, b)
    out = out if out.dtype == x.dtype else jax.lax.convert_element_type(out, x.dtype)
    return zero_unless(keep, out)


@jax.custom_jvp
def _clipped(a: jax.Array, n: jax.Array, b: jax.Array) -> jax.Array:
    # ``where(n <= b, a, a / n * b)``, the ops of optax's clip, so the
    # compiled step is unchanged (the division fuses into the pass over
    # ``a``). Its own derivative, because the branch that is not taken is
    # still differentiated and its derivative multiplied by zero: at
    # ``n = 0`` (a zero gradient) ``a / n`` is NaN, and at ``b = inf`` (a
    # rule that has recorded nothing yet) ``a * b / n**2`` is; either makes
    # the product NaN.
    return jnp.where(n <= b, a, a / n * b)


@_clipped.defjvp
def _clipped_jvp(primals, tangents):
    (a, n, b), (ta, tn, tb) = primals, tangents
    over = ~(n <= b)
    # Every coefficient is computed from operands the branch would see
    # where it is taken, and from harmless stand-ins where it is not, so
    # each one is finite wherever ``a`` is.
    inv = 1 / jnp.where(over, n, _norms.full_like(n, 1))
    ratio = jnp.where(over, b, _norms.full_like(b, 0)) * inv
    clipped = ta * ratio + a * inv * (tb - ratio * tn)
    return _clipped(a, n, b), jnp.where(over, clipped, ta)


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
    and a broadcast flag carry ``x``'s sharding (`_norms.sharded_like`): on
    meshes with Explicit axes a select needs operands of one sharding.
    """
    if keep is None:
        return x
    if jnp.ndim(keep):
        keep = _norms.sharded_like(x, jnp.broadcast_to(keep, x.shape))
    return jax.lax.select(keep, x, _norms.full_like(x, 0))


def zero_tree(keep: jax.Array | None, tree: Any) -> Any:
    """`zero_unless` on every float leaf of ``tree``."""
    if keep is None:
        return tree
    return map_float(lambda _, x: zero_unless(keep, x), tree)


def keep_if(condition: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``condition`` holds, else ``old`` (leafwise select)."""
    return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new, old)


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


def check_match(owner: str, measured: Measurement, record: Record) -> None:
    """Raises if this step measured a different number of entries than ``init``.

    A scope whose decision is global measures a scalar whatever the tree:
    its state fits any tree (its per-tensor flags and norms follow the tree
    of the latest update).
    """
    norms = measured.norms
    expected = record_shape(record)
    if tuple(norms.shape) != expected:
        found = norms.shape[0] if norms.ndim else 1
        held = expected[0] if expected else 1
        raise ValueError(
            f"{owner}: the updates do not match the tree this transform was "
            f"initialized with: it measured {found} norm(s) (shape "
            f"{tuple(norms.shape)}) but its state holds {held} (shape "
            f"{expected}). Call `init` with params of the same structure as "
            "the updates."
        )


# ---------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What a scope measured, for the rule, the action and the record.

    Attributes:
      norms: the recorded norms: a scalar, or one entry per tensor.
      finite: scalar bool, whether the step may reach the rule's
        statistics (every measured value finite).
      observed: what the rule sees: ``norms``, or samples of it with extra
        leading axes (per-example norms), which rules reduce as their
        statistic defines.
      total: the whole tree's measurement as one scalar, in the scope's
        own terms (the global norm for the global and tensor scopes, the
        largest entry or unit ratio for the element and unit scopes), for
        rules that bound the whole tree (``rules.ema(warmup_max_norm=...)``).

    A scope whose decision is global also measures each tensor's own norm
    (``leaf_norms``, a vector), for the record's per-tensor norms and
    non-finite flags.
    """

    norms: jax.Array
    finite: jax.Array
    observed: jax.Array
    total: jax.Array


M = TypeVar("M", bound=Measurement)
M_contra = TypeVar("M_contra", bound=Measurement, contravariant=True)
M_co = TypeVar("M_co", bound=Measurement, covariant=True)


class Scope(Protocol[M_co]):
    """What is measured: the interface of every scope."""

    @property
    def owner(self) -> str:
        """The public function's name, for error messages."""
        ...

    def norm_like(self, params: Any) -> jax.Array:
        """A zero array shaped like the norms measured on ``params``."""
        ...

    def measure(self, updates: Any, params: Any, extra_args: dict[str, Any]) -> M_co:
        """Reads the updates once."""
        ...


class Applied(NamedTuple):
    """What an action did: the updates out, and what the record needs."""

    updates: Any
    scale: jax.Array
    clipped: jax.Array
    state: Any = ()


class Context(NamedTuple):
    """What an action is given besides the updates and the measurement.

    Attributes:
      threshold: the bound, a scalar or one entry per measured norm.
      keep: the zeroing flag of ``nonfinite="zero"`` (the step's
        finiteness), or None under ``"propagate"``.
      state: the action's own state.
      params: the ``params`` passed to ``update``.
      extra_args: the extra arguments passed to ``update``.
      count: the int32 step count.
    """

    threshold: jax.Array
    keep: jax.Array | None
    state: Any
    params: Any
    extra_args: dict[str, Any]
    count: jax.Array


class Action(Protocol[M_contra]):
    """What happens above the threshold: rescale, clamp or skip.

    ``stateless`` actions keep no state of their own (``init`` returns
    ``()``), so with a fixed threshold ``update(g, None)`` works.
    """

    @property
    def stateless(self) -> bool:
        """Whether the action keeps no state of its own."""
        ...

    def init(self, params: Any) -> Any:
        """The action's own state (``()`` if it keeps none)."""
        ...

    def apply(self, updates: Any, measured: M_contra, ctx: Context) -> Applied:
        """Acts on the updates."""
        ...


class Parts(NamedTuple):
    """The three parts of every state: rule, action and stats record."""

    rule_state: Any
    action_state: Any
    record: Record


def _clip_state(parts: Parts) -> ClipState:
    return ClipState(parts.rule_state, *parts.record)


def _clip_parts(state: ClipState) -> Parts:
    return Parts(state.rule_state, (), record_of(state))


def record_sizes(scope: Any, params: Any) -> tuple[int, int | None]:
    """How many non-finite flags and per-tensor norms ``scope`` records.

    A scope whose decision is global (``leafwise``) flags each tensor that
    was non-finite, and with ``per_tensor_stats`` records each tensor's
    norm (None: not recorded); per-tensor scopes need neither (their norms
    are per tensor).
    """
    if not getattr(scope, "leafwise", False):
        return 0, None
    n = len(_norms.float_leaves(params))
    return n, n if records_tensors(scope) else None


def records_tensors(scope: Any) -> bool:
    """Whether ``scope`` records each tensor's norm (``per_tensor_stats``)."""
    return bool(getattr(scope, "per_tensor_stats", False))


@dataclasses.dataclass(frozen=True)
class Step(Generic[M]):
    """One transform: a scope, a rule and an action, run as one step.

    Attributes:
      scope: measures the updates.
      rule: turns the observation into the threshold.
      action: rescales, clamps or skips.
      zero_nonfinite: the ``nonfinite="zero"`` policy (else propagate).
      make_state: builds the transform's public state class from the
        `Parts` (`ClipState` by default).
      parts_of: reads the `Parts` back from that state.
      state_type: that state class (a state of another class is refused).
    """

    scope: Scope[M]
    rule: Rule
    action: Action[M]
    zero_nonfinite: bool = True
    make_state: Callable[[Parts], Any] = _clip_state
    parts_of: Callable[[Any], Parts] = _clip_parts
    state_type: type = ClipState

    def init(self, params: Any) -> Any:
        norm_like = self.scope.norm_like(params)
        return self.make_state(
            Parts(
                self.rule.init(norm_like),
                self.action.init(params),
                empty_record(norm_like, *record_sizes(self.scope, params)),
            )
        )

    def update(
        self, updates: Any, state: Any, params: Any = None, **extra_args: Any
    ) -> tuple[Any, Any]:
        if state is None or isinstance(state, optax.EmptyState):
            state = fresh_state(
                self.rule, state, lambda: self.init(updates), self.action.stateless
            )
        if not isinstance(state, self.state_type):
            raise TypeError(
                f"{self.scope.owner}: expected its state "
                f"({self.state_type.__name__}); got {type(state).__name__}. "
                "Was `init` called on this transform?"
            )
        parts = self.parts_of(state)
        measured = self.scope.measure(updates, params, extra_args)
        check_match(self.scope.owner, measured, parts.record)
        count = parts.record.count
        threshold, rule_state = observe(self.rule, parts.rule_state, measured, count)
        # A negative threshold (only from a traced hyperparameter, which
        # construction cannot check) acts as 0. A scalar threshold stays a
        # scalar, so equally shaped leaves share their kernels.
        threshold = jnp.maximum(jnp.asarray(threshold, measured.norms.dtype), 0)
        rule_state = keep_if(measured.finite, rule_state, parts.rule_state)
        keep = measured.finite if self.zero_nonfinite else None
        ctx = Context(threshold, keep, parts.action_state, params, extra_args, count)
        applied = self.action.apply(updates, measured, ctx)
        leaf = getattr(measured, "leaf_norms", None)
        record = write_record(
            parts.record,
            measured.norms,
            threshold,
            applied.scale,
            applied.clipped,
            measured.finite,
            None if leaf is None else ~jnp.isfinite(leaf),
            leaf if leaf is not None and records_tensors(self.scope) else None,
        )
        return applied.updates, self.make_state(
            Parts(rule_state, applied.state, record)
        )

    def transform(self) -> optax.GradientTransformationExtraArgs:
        return optax.GradientTransformationExtraArgs(self.init, self.update)


def observe(
    rule: Rule, state: Any, measured: Measurement, count: jax.Array
) -> tuple[jax.Array, Any]:
    """Asks ``rule`` for the threshold, passing what it observes explicitly."""
    if getattr(rule, "needs_total", False):
        # AdaGC's warm-up bounds the whole tree's norm.
        update = rule.update
        return update(state, measured.observed, count, total=measured.total)  # pyright: ignore[reportCallIssue]
    return rule.update(state, measured.observed, count)


def fresh_state(
    rule: Rule, given: Any, init: Callable[[], Any], stateless: bool = True
) -> Any:
    """The state to use when ``update`` is given ``None`` / ``EmptyState()``.

    optax's stateless transforms accept ``tx.update(g, None)``; so does a
    transform whose threshold has no history (a number or a schedule, which
    is then read at step 0) and whose action keeps none: its state is
    created fresh. A rule that learns from the run, or an action with a
    state (a wrapped optimizer, a second moment), refuses: that history
    would restart every step.
    """
    if not stateless:
        raise ValueError(
            f"`update` got state {given!r}, but this transform keeps a state "
            "across steps (a wrapped optimizer's, or a moment estimate), which "
            "would restart on every step. Call `state = tx.init(params)` once "
            "and pass the state that each `update` returns to the next one."
        )
    if isinstance(rule, fixed | scheduled):
        return init()
    raise ValueError(
        f"`update` got state {given!r}, but this transform's threshold rule "
        f"({type(rule).__name__}) learns from the norms of earlier steps, which "
        "would restart on every step. Call `state = tx.init(params)` once and "
        "pass the state that each `update` returns to the next one."
    )
