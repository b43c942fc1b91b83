"""ClipStats: what every optaxclip transform records, and ``stats()``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["ClipState", "ClipStats", "stats"]


class ClipStats(NamedTuple):
    """What a clipping transform measured and did on its latest step.

    The fields are arrays (part of the optimizer state, so they checkpoint,
    shard and cross ``jit`` boundaries); their names are stable API.

    For the global and element scopes the first four fields are scalars; for
    the tensor and per-example scopes they hold one entry per tensor (or per
    stacked layer slice, or per example), in the order of
    ``jax.tree.leaves`` of the floating-point leaves.

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

    @classmethod
    def zeros(cls, norm_like: jax.Array) -> ClipStats:
        """Initial stats for a measurement shaped like ``norm_like``.

        Every field is its own buffer, so the state can be donated to a
        jitted step right after ``init``.
        """
        return cls(
            norm=jnp.zeros_like(norm_like),
            threshold=jnp.zeros_like(norm_like),
            scale=jnp.ones_like(norm_like),
            clipped=jnp.zeros((), jnp.int32),
            nonfinite_count=jnp.zeros((), jnp.int32),
            count=jnp.zeros((), jnp.int32),
        )


class ClipState(NamedTuple):
    """State of every optaxclip clipping transform.

    Attributes:
      rule_state: the threshold rule's state (``()`` for a fixed threshold).
      stats: [`ClipStats`][optaxclip.ClipStats] of the latest step.
    """

    rule_state: Any
    stats: ClipStats


def stats(opt_state: Any) -> tuple[ClipStats, ...]:
    """Finds every [`ClipStats`][optaxclip.ClipStats] inside a (nested) optimizer state.

    Works through ``optax.chain``, ``optax.masked``, ``optax.MultiSteps``,
    ``optax.inject_hyperparams``, ``optax.multi_transform``, the optaxclip
    guards, flax ``TrainState.opt_state`` and ``nnx.Optimizer`` (whose state
    wraps arrays in variables): anything that is a pytree. Stats stored as
    mappings of their field names (``nnx.state(optimizer)``, a checkpoint
    restored without a template) are found too.

    Args:
      opt_state: an optimizer state, a flax ``TrainState``, an
        ``nnx.Optimizer`` or its ``nnx.state``.

    Returns:
      A tuple of the [`ClipStats`][optaxclip.ClipStats] found, in pytree order (empty if
      none).

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
    opt_state = _unwrap(opt_state)
    found = jax.tree.leaves(opt_state, is_leaf=_is_stats)
    return tuple(_materialize(x) for x in found if _is_stats(x))


_FIELDS = frozenset(ClipStats._fields)


def _is_stats(x: Any) -> bool:
    # ``nnx.state(optimizer)`` and checkpoints restored without a template
    # hold the stats as a mapping of the field names.
    if isinstance(x, ClipStats):
        return True
    return isinstance(x, Mapping) and set(x.keys()) == _FIELDS


def _unwrap(obj: Any) -> Any:
    # flax TrainState / nnx.Optimizer keep the optax state in `opt_state`.
    inner = getattr(obj, "opt_state", None)
    if inner is not None and not isinstance(obj, tuple):
        return inner
    return obj


def _materialize(s: Any) -> ClipStats:
    # nnx wraps every array of the optimizer state in a Variable.
    if not isinstance(s, ClipStats):
        s = ClipStats(**{name: s[name] for name in ClipStats._fields})
    return ClipStats(*(_variable_value(f) for f in s))


def _variable_value(field: Any) -> Any:
    if isinstance(field, jax.Array):
        return field
    get_value = getattr(field, "get_value", None)  # flax >= 0.11
    if callable(get_value):
        return get_value()
    return getattr(field, "value", field)
