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

Numbers and ``optax.Schedule`` callables are wrapped into :func:`fixed` and
:func:`scheduled` automatically by every scope function.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Rule", "as_rule", "fixed", "scheduled"]


@runtime_checkable
class Rule(Protocol):
    """The interface every threshold rule implements."""

    def init(self, norm_like: jax.Array) -> Any:
        """Returns the initial state for measurements shaped like ``norm_like``."""

    def update(
        self, state: Any, norm: jax.Array, step: jax.Array
    ) -> tuple[jax.Array, Any]:
        """Returns the threshold for ``norm`` and the next state."""


@dataclasses.dataclass(frozen=True)
class fixed:  # noqa: N801  (a rule reads as a function call: rules.fixed(1.0))
    """A constant threshold.

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
        value = jnp.asarray(self.value, norm.dtype)
        return jnp.broadcast_to(value, norm.shape), state


@dataclasses.dataclass(frozen=True)
class scheduled:  # noqa: N801
    """A threshold that follows an ``optax.Schedule`` of the step count.

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
        value = jnp.asarray(self.schedule(step), norm.dtype)
        return jnp.broadcast_to(value, norm.shape), state


def as_rule(threshold: Any, name: str = "threshold") -> Rule:
    """Wraps a number, array or schedule into a rule; returns rules as is.

    Args:
      threshold: a :class:`Rule`, a callable schedule, or a number/array.
      name: the argument name used in error messages.

    Returns:
      A :class:`Rule`.

    Raises:
      ValueError: if a concrete number is negative or NaN.
      TypeError: if ``threshold`` is none of the above.
    """
    if isinstance(threshold, Rule) and not callable(threshold):
        return threshold
    if callable(threshold):
        return scheduled(threshold)
    check_threshold(threshold, name)
    return fixed(threshold)


def check_threshold(value: Any, name: str) -> None:
    """Raises ValueError for a concrete negative or NaN ``value``.

    Traced and device arrays are not checked (that would need a host
    round-trip); Python and NumPy numbers are.
    """
    if isinstance(value, jax.Array):
        return
    if isinstance(value, bool) or not isinstance(value, int | float | np.number | np.ndarray):
        raise TypeError(
            f"`{name}` must be a number, a scalar array, an optax schedule or a "
            f"rule from optaxclip.rules; got {value!r} of type {type(value).__name__}."
        )
    array = np.asarray(value)
    if array.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar; got an array of shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.number) or math.isnan(float(array)):
        raise ValueError(f"`{name}` must be a number >= 0; got {value!r}.")
    if float(array) < 0:
        raise ValueError(f"`{name}` must be >= 0; got {value!r}.")
