"""The one step every optaxclip transform runs, and the state it keeps.

A transform is a declaration: a scope (what is measured), a rule (the
bound) and an action (what happens above it). `Step` runs them in order:

1. ``scope.measure`` reads the updates once and returns a `Measurement`;
2. the rule turns the observation into a threshold;
3. the rule's new state is kept only on a finite step;
4. ``action.apply`` rescales, clamps or skips, in one fused pass;
5. `write_record` stores the step's stats in one packed array.

The primitives every action shares live here too, one of each: the safe
scale factor, the sharding-preserving zeroing select, keeping the old
state, and the packed stats record with its decoder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _checks, _norms
from .rules import Rule, fixed, scheduled

__all__ = ["ClipState", "ClipStats", "stats"]

_NONFINITE = ("zero", "propagate")


# ---------------------------------------------------------------------------
# Stats: what a user reads, and how it is stored
# ---------------------------------------------------------------------------


class ClipStats(NamedTuple):
    """What a clipping transform measured and did on its latest step.

    Read it with [`stats`][optaxclip.stats] or a state's ``.stats``. The
    state stores these fields packed into one array (one buffer, one
    kernel to write per step); this view decodes it. The meaning of each
    field for each transform is tabulated in the docs (methods page,
    "What the stats mean").

    For the global and element scopes the first three fields are scalars;
    for the tensor and unit scopes they hold one entry per tensor (or per
    stacked layer slice), in the order of ``jax.tree.leaves`` of the
    floating-point leaves.

    Attributes:
      norm: the norm measured before clipping (for ``clip_by_value`` the
        largest absolute entry; for AGC the largest unit ratio
        ``|g| / max(|w|, eps)`` of each tensor).
      threshold: the bound used on this step.
      scale: the factor applied (1 where nothing was clipped; 0 on a step
        zeroed for non-finite input).
      clipped: int32, how many units were clipped (0 or 1 for the global and
        element scopes, the number of tensors / units / examples otherwise).
      nonfinite_count: int32, running count of steps whose measurement was
        NaN or infinite.
      count: int32, number of steps seen (the step index of the next update).
    """

    norm: jax.Array
    threshold: jax.Array
    scale: jax.Array
    clipped: jax.Array
    nonfinite_count: jax.Array
    count: jax.Array


# The record is one integer array. Scalar stats: [clipped, nonfinite_count,
# count, norm, threshold, scale] (length 6). Per-entry stats of n entries:
# [clipped, nonfinite_count, count, n, norm[n], threshold[n], scale[n]]
# (length 4 + 3n). The lengths differ modulo 3, so the layout is known from
# the static shape. The floats are stored as their bits (a bitcast to the
# integer type of the same width), so they round-trip exactly.
_SCALAR_LENGTH = 6
_VECTOR_HEADER = 4


def _int_for(dtype: Any) -> Any:
    return jnp.int64 if jnp.dtype(dtype).itemsize == 8 else jnp.int32


def _float_for(dtype: Any) -> Any:
    return jnp.float64 if jnp.dtype(dtype).itemsize == 8 else jnp.float32


def empty_record(norm_like: jax.Array) -> jax.Array:
    """The record of a transform that has not stepped yet.

    ``norm_like`` gives the shape (a scalar or a vector) and the float
    dtype of the stats (float32, or float64 under x64).
    """
    norm_like = jnp.asarray(norm_like)
    zeros = jnp.zeros(norm_like.shape, _float_for(norm_like.dtype))
    return _pack(zeros, zeros, jnp.ones_like(zeros), *(jnp.zeros((), jnp.int32),) * 3)


def _pack(norm, threshold, scale, clipped, nonfinite_count, count) -> jax.Array:
    idt = _int_for(norm.dtype)
    header = [clipped, nonfinite_count, count]
    if norm.ndim:
        header.append(jnp.asarray(norm.shape[0], idt))
    floats = jnp.concatenate([jnp.ravel(norm), jnp.ravel(threshold), jnp.ravel(scale)])
    bits = jax.lax.bitcast_convert_type(floats, idt)
    head = jnp.stack([jnp.asarray(h).astype(idt) for h in header])
    return jnp.concatenate([head, bits])


def record_count(record: jax.Array) -> jax.Array:
    """The int32 step count stored in a record."""
    return record[..., 2].astype(jnp.int32)


def record_size(record: jax.Array) -> tuple[int, ...]:
    """The shape of the per-step stats a record holds: ``()`` or ``(n,)``."""
    length = int(record.shape[-1])
    if length % 3 == _SCALAR_LENGTH % 3:
        return ()
    return ((length - _VECTOR_HEADER) // 3,)


def write_record(
    old: jax.Array,
    norm: jax.Array,
    threshold: jax.Array,
    scale: jax.Array,
    clipped: jax.Array,
    finite: jax.Array,
) -> jax.Array:
    """The record of this step: stats written into one array.

    Args:
      old: the previous record (its counters are advanced).
      norm: the measured norms (the record's shape).
      threshold: the bound, a scalar or shaped like ``norm``.
      scale: the factor applied, shaped like ``norm``.
      clipped: the number of units clipped.
      finite: whether the step's measurement was finite.
    """
    dtype = norm.dtype
    idt = old.dtype
    return _pack(
        norm,
        jnp.broadcast_to(jnp.asarray(threshold, dtype), norm.shape),
        jnp.broadcast_to(jnp.asarray(scale, dtype), norm.shape),
        jnp.asarray(clipped).astype(idt),
        old[1] + (~finite).astype(idt),
        optax.safe_increment(old[2]),
    )


def decode_record(record: Any) -> ClipStats:
    """The [`ClipStats`][optaxclip.ClipStats] a packed record holds.

    Leading axes (records stacked over steps by ``lax.scan``, or over runs
    by ``vmap``) are kept in front of every field.
    """
    record = jnp.asarray(record)
    shape = record_size(record)
    lead = record.shape[:-1]
    fdt = _float_for(record.dtype)
    start = 3 if not shape else _VECTOR_HEADER
    floats = jax.lax.bitcast_convert_type(record[..., start:], fdt)
    n = 1 if not shape else shape[0]
    norm, threshold, scale = (
        floats[..., k * n : (k + 1) * n].reshape(lead + shape) for k in range(3)
    )
    clipped, nonfinite_count, count = (
        record[..., k].astype(jnp.int32) for k in range(3)
    )
    return ClipStats(norm, threshold, scale, clipped, nonfinite_count, count)


class ClipState(NamedTuple):
    """State of every optaxclip scope transform.

    Attributes:
      rule_state: the threshold rule's state (``()`` for a fixed threshold).
      packed_stats: the latest step's stats, packed into one array; read
        them as ``state.stats`` (a [`ClipStats`][optaxclip.ClipStats]) or
        with [`stats`][optaxclip.stats].
    """

    rule_state: Any
    packed_stats: jax.Array

    @property
    def stats(self) -> ClipStats:
        """The latest step's [`ClipStats`][optaxclip.ClipStats]."""
        return decode_record(self.packed_stats)


def stats(opt_state: Any) -> tuple[ClipStats, ...]:
    """Finds every [`ClipStats`][optaxclip.ClipStats] inside a (nested) optimizer state.

    Works through ``optax.chain``, ``optax.masked``, ``optax.MultiSteps``,
    ``optax.inject_hyperparams``, ``optax.multi_transform``, the optaxclip
    guards, flax ``TrainState.opt_state`` and ``nnx.Optimizer`` (whose state
    wraps arrays in variables): anything that is a pytree. States stored as
    mappings of their field names (``nnx.state(optimizer)``, a checkpoint
    restored without a template) are found too.

    Args:
      opt_state: an optimizer state, a flax ``TrainState``, an
        ``nnx.Optimizer`` or its ``nnx.state``.

    Returns:
      A tuple of the [`ClipStats`][optaxclip.ClipStats] found, in pytree
      order (empty if none).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optaxclip as oc
      >>> tx = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
      >>> (s,) = oc.stats(state)
      >>> print(s.norm, s.threshold, s.scale, s.clipped)
      5.0 1.0 0.2 1
    """
    return tuple(_find(_unwrap(opt_state)))


def _find(tree: Any) -> list[ClipStats]:
    # A state holding a record may hold other states too (a guard wraps an
    # optimizer): its fields are searched in order, its own record included.
    found = []
    for x in jax.tree.leaves(tree, is_leaf=_holds_record):
        if not _holds_record(x):
            continue
        items = x.items() if isinstance(x, Mapping) else zip(x._fields, x, strict=True)
        for name, value in items:
            if name == _RECORD:
                found.append(decode_record(_variable_value(value)))
            else:
                found.extend(_find(value))
    return found


_RECORD = "packed_stats"


def _holds_record(x: Any) -> bool:
    # States are NamedTuples with a `packed_stats` field; ``nnx.state`` and
    # checkpoints restored without a template hold them as mappings.
    if isinstance(x, tuple) and _RECORD in getattr(x, "_fields", ()):
        return True
    return isinstance(x, Mapping) and _RECORD in x


def _unwrap(obj: Any) -> Any:
    # flax TrainState / nnx.Optimizer keep the optax state in `opt_state`.
    inner = getattr(obj, "opt_state", None)
    if inner is not None and not isinstance(obj, tuple):
        return inner
    return obj


def _variable_value(field: Any) -> Any:
    if isinstance(field, jax.Array | np.ndarray):
        return field
    get_value = getattr(field, "get_value", None)  # flax >= 0.11
    if callable(get_value):
        return get_value()
    return getattr(field, "value", field)


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
    out = jnp.where(n <= b, a, _divide(a, n) * b)
    out = out if out.dtype == x.dtype else jax.lax.convert_element_type(out, x.dtype)
    return zero_unless(keep, out)


@jax.custom_jvp
def _divide(a: jax.Array, n: jax.Array) -> jax.Array:
    # ``a / n`` whose derivative is finite at ``n = 0`` (that branch of the
    # select in `rescale` is never taken there, but its derivative is still
    # multiplied by zero: it must not be NaN). A plain division in the
    # compiled step, so it fuses into the pass over ``a``.
    return a / n


@_divide.defjvp
def _divide_jvp(primals, tangents):
    (a, n), (ta, tn) = primals, tangents
    safe = jnp.where(n != 0, n, _norms.full_like(n, 1))
    return a / n, ta / safe - a * tn / (safe * safe)


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


def check_match(owner: str, norms: jax.Array, record: jax.Array) -> None:
    """Raises if this step measured a different number of entries than ``init``."""
    expected = record_size(record)
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
    packed_stats: jax.Array


def _clip_state(parts: Parts) -> ClipState:
    return ClipState(parts.rule_state, parts.packed_stats)


def _clip_parts(state: ClipState) -> Parts:
    return Parts(state.rule_state, (), state.packed_stats)


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
                empty_record(norm_like),
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
        check_match(self.scope.owner, measured.norms, parts.packed_stats)
        count = record_count(parts.packed_stats)
        threshold, rule_state = observe(self.rule, parts.rule_state, measured, count)
        # A negative threshold (only from a traced hyperparameter, which
        # construction cannot check) acts as 0. A scalar threshold stays a
        # scalar, so equally shaped leaves share their kernels.
        threshold = jnp.maximum(jnp.asarray(threshold, measured.norms.dtype), 0)
        rule_state = keep_if(measured.finite, rule_state, parts.rule_state)
        keep = measured.finite if self.zero_nonfinite else None
        ctx = Context(threshold, keep, parts.action_state, params, extra_args, count)
        applied = self.action.apply(updates, measured, ctx)
        record = write_record(
            parts.packed_stats,
            measured.norms,
            threshold,
            applied.scale,
            applied.clipped,
            measured.finite,
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
