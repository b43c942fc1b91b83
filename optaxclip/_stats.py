"""What a clip records on each step, how it is stored, and how it is read back.

Every state that records stats holds the four fields of a `Record`, by
name, beside its own fields. They read as numbers in a checkpoint opened
without optaxclip: floats are floats, counts are integers, and the step
counter is a plain integer field, as in optax's states.

- ``count``: int32 ``[]``, steps seen (the step index of the next update);
- ``norm_threshold_scale``: float ``[3]`` or ``[3, n]``, three rows: the
  norm measured before clipping, the bound, and the factor applied;
- ``counts``: int32 ``[2 + k]``: units clipped on this step, non-finite
  steps so far, then, for a clip whose decision is global, one flag per
  tensor (1 if that tensor was non-finite on this step);
- ``tensor_norms``: float ``[n]``, each tensor's norm, with
  ``per_tensor_stats=True`` on a clip whose decision is global; otherwise
  an empty tuple (nothing stored).

The floats are float32 (float64 under x64 for float64 trees). Writing the
record costs a kernel per array on backends that do not fuse sibling
outputs (CPU): the step counter, the float rows and the int counts are
three, and ``tensor_norms`` a fourth when it is recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["ClipStats", "stats"]


class ClipStats(NamedTuple):
    """What a clipping transform measured and did on its latest step.

    Read it with [`stats`][optaxclip.stats] or a state's ``.stats``. The
    meaning of each field for each transform is tabulated in the docs
    (methods page, "What the stats mean").

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
      tensor_norms: each tensor's norm on this step, for a clip whose
        decision is global built with ``per_tensor_stats=True`` (the same
        ``ord``); an empty vector otherwise. For the tensor and unit scopes
        ``norm`` already holds one entry per tensor.
      nonfinite_tensors: bool, one entry per tensor (per entry of ``norm``
        for the tensor and unit scopes): True where that tensor held a NaN
        or infinite entry on this step.
    """

    norm: jax.Array
    threshold: jax.Array
    scale: jax.Array
    clipped: jax.Array
    nonfinite_count: jax.Array
    count: jax.Array
    tensor_norms: jax.Array
    nonfinite_tensors: jax.Array


class Record(NamedTuple):
    """The stats fields of a state (see the module docstring)."""

    count: jax.Array
    norm_threshold_scale: jax.Array
    counts: jax.Array
    tensor_norms: jax.Array | tuple[()]


RECORD_FIELDS = Record._fields


class StatsField:
    """A state's ``stats``: its record read as a [`ClipStats`][optaxclip.ClipStats].

    Every state class that records stats declares ``stats = StatsField()``
    beside its fields (a class attribute, not a field: nothing is stored).
    """

    def __get__(self, state: Any, owner: Any = None) -> ClipStats:
        """The latest step's [`ClipStats`][optaxclip.ClipStats]."""
        if state is None:  # read on the class: the field itself
            return self  # pyright: ignore[reportReturnType]
        return read_record(record_of(state))


def float_dtype(dtype: Any) -> Any:
    """The stats' float dtype for norms of ``dtype``."""
    return jnp.float64 if jnp.dtype(dtype).itemsize == 8 else jnp.float32


def empty_record(norm_like: jax.Array, flags: int, tensors: int | None) -> Record:
    """The record of a transform that has not stepped yet.

    Args:
      norm_like: gives the shape (a scalar or a vector) and the float dtype
        of the stats.
      flags: the number of per-tensor non-finite flags (tensors of a clip
        whose decision is global; 0 for per-tensor scopes, whose norms say it).
      tensors: the number of per-tensor norms recorded, or None where they
        are not (``per_tensor_stats`` off).
    """
    norm_like = jnp.asarray(norm_like)
    fdt = float_dtype(norm_like.dtype)
    rows = jnp.zeros((3, *norm_like.shape), fdt)
    rows = rows.at[2].set(1)  # nothing scaled yet
    return Record(
        jnp.zeros((), jnp.int32),
        rows,
        jnp.zeros((2 + flags,), jnp.int32),
        () if tensors is None else jnp.zeros((tensors,), fdt),
    )


def record_shape(record: Record) -> tuple[int, ...]:
    """The shape of the per-step stats a record holds: ``()`` or ``(n,)``."""
    return tuple(record.norm_threshold_scale.shape[1:])


def write_record(
    old: Record,
    norm: jax.Array,
    threshold: jax.Array,
    scale: jax.Array,
    clipped: jax.Array,
    finite: jax.Array,
    nonfinite_tensors: jax.Array | None = None,
    tensor_norms: jax.Array | None = None,
) -> Record:
    """The record of this step.

    Args:
      old: the previous record (its counters are advanced).
      norm: the measured norms (the record's shape).
      threshold: the bound, a scalar or shaped like ``norm``.
      scale: the factor applied, shaped like ``norm``.
      clipped: the number of units clipped.
      finite: whether the step's measurement was finite.
      nonfinite_tensors: bool per tensor, for a clip whose decision is global.
      tensor_norms: each tensor's norm, when recorded.

    The flags and per-tensor norms are those of this step's tree: a clip
    whose decision is global keeps a state that fits any tree.
    """
    fdt = old.norm_threshold_scale.dtype
    norm = norm.astype(fdt)
    rows = jnp.stack(
        [
            norm,
            jnp.broadcast_to(jnp.asarray(threshold).astype(fdt), norm.shape),
            jnp.broadcast_to(jnp.asarray(scale).astype(fdt), norm.shape),
        ]
    )
    counters = [
        jnp.reshape(jnp.asarray(clipped).astype(jnp.int32), (1,)),
        jnp.reshape(old.counts[1] + (~finite).astype(jnp.int32), (1,)),
    ]
    if nonfinite_tensors is not None:
        counters.append(nonfinite_tensors.astype(jnp.int32))
    counts = jnp.concatenate(counters)
    norms = old.tensor_norms if tensor_norms is None else tensor_norms.astype(fdt)
    count = jnp.asarray(optax.safe_increment(old.count))
    return Record(count, rows, counts, norms)


def read_record(record: Record) -> ClipStats:
    """The [`ClipStats`][optaxclip.ClipStats] a record holds.

    Leading axes (records stacked over steps by ``lax.scan``, or over runs
    by ``vmap``) are kept in front of every field.
    """
    count = jnp.asarray(record.count)
    lead = count.ndim
    rows = jnp.asarray(record.norm_threshold_scale)
    counts = jnp.asarray(record.counts)
    norm, threshold, scale = (rows[(slice(None),) * lead + (k,)] for k in range(3))
    if norm.ndim > lead:
        # Per-tensor scopes: a tensor is non-finite where its own norm is.
        nonfinite = ~jnp.isfinite(norm)
    elif counts.shape[-1] > 2:
        nonfinite = counts[..., 2:].astype(bool)
    else:
        nonfinite = jnp.zeros(count.shape + (0,), bool)
    tensor_norms = record.tensor_norms
    if isinstance(tensor_norms, tuple) or tensor_norms is None:
        tensor_norms = jnp.zeros(count.shape + (0,), rows.dtype)
    return ClipStats(
        norm,
        threshold,
        scale,
        counts[..., 0],
        counts[..., 1],
        count,
        jnp.asarray(tensor_norms),
        nonfinite,
    )


def record_of(state: Any) -> Record:
    """The `Record` fields of a state (a NamedTuple or a mapping of fields).

    A mapping restored without a template may lack ``tensor_norms`` where
    it stored nothing (an empty tuple has no leaves to save).
    """
    if isinstance(state, Mapping):
        get = lambda f: state[f] if f in state else ()  # noqa: E731
    else:
        get = lambda f: getattr(state, f)  # noqa: E731
    return Record(*(_variable_value(get(f)) for f in RECORD_FIELDS))


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
      >>> print(s.norm, s.threshold, s.scale, s.clipped, s.count)
      5.0 1.0 0.2 1 1
    """
    return tuple(read_record(record_of(state)) for _, state in find_states(opt_state))


def find_states(opt_state: Any) -> list[tuple[str, Any]]:
    """Every state holding a record, with its kind, in pytree order.

    The kind names what the stats belong to: ``"clip"`` for a clipping
    transform, ``"skip_spikes"`` / ``"skip_nonfinite"`` for the guards.
    """
    found: list[tuple[str, Any]] = []
    _find(_unwrap(opt_state), found)
    return found


def _find(tree: Any, found: list[tuple[str, Any]]) -> None:
    # A state holding a record may hold other states too (a guard wraps an
    # optimizer): its fields are searched in order, its own record where
    # the record's fields are, so the order is the pytree order.
    for x in jax.tree.leaves(tree, is_leaf=_holds_record):
        if not _holds_record(x):
            continue
        names = x.keys() if isinstance(x, Mapping) else x._fields
        for name in names:
            if name == RECORD_FIELDS[0]:
                found.append((_kind(x), x))
            elif name not in RECORD_FIELDS:
                _find(x[name] if isinstance(x, Mapping) else getattr(x, name), found)


def _fields(x: Any) -> tuple[str, ...]:
    if isinstance(x, Mapping):
        return tuple(x.keys())
    return tuple(getattr(x, "_fields", ()))


def _holds_record(x: Any) -> bool:
    # States are NamedTuples with the record's fields; ``nnx.state`` and
    # checkpoints restored without a template hold them as mappings.
    if not (isinstance(x, tuple) or isinstance(x, Mapping)):
        return False
    names = _fields(x)
    return all(f in names for f in RECORD_FIELDS[:3])


def _kind(x: Any) -> str:
    names = _fields(x)
    if "inner_state" in names:
        return "skip_spikes" if "loss_state" in names else "skip_nonfinite"
    return "clip"


def _unwrap(obj: Any) -> Any:
    # flax TrainState / nnx.Optimizer keep the optax state in `opt_state`.
    inner = getattr(obj, "opt_state", None)
    if inner is not None and not isinstance(obj, tuple):
        return inner
    return obj


def _variable_value(field: Any) -> Any:
    if isinstance(field, jax.Array | np.ndarray | tuple):
        return field
    get_value = getattr(field, "get_value", None)  # flax >= 0.11
    if callable(get_value):
        return get_value()
    return getattr(field, "value", field)
