"""Argument validation, in one place, in the vocabulary of the user's call.

Every transform, preset, guard and rule checks its hyperparameters here, at
construction. What is checked:

* Python and NumPy numbers, and *concrete* JAX arrays (values known on the
  host, e.g. ``jnp.array(-1.0)`` or what ``optax.inject_hyperparams`` builds
  in ``init``): range, NaN, integrality and shape;
* traced values (inside ``jit``, e.g. ``optax.inject_hyperparams`` in a
  jitted ``update``): only their shape, which is static. Their value cannot be
  read without a host round-trip, so an invalid traced value is not reported;
  what it does is documented where it is used (a negative traced threshold
  acts as 0, for instance).

Messages name the argument the user passed. A preset builds its rule inside
`arguments`, which raises an error of the rule's own checks again under the
preset's argument (``zclip(z_thresh=-1)`` reports ``z_thresh``, not the
rule's field ``z``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np


class ArgumentError(ValueError):
    """A bad argument: ``"owner: `name` text"``.

    Attributes:
      name: the argument, as the function that raised it calls it.
      text: what is wrong with it, and the fix.
      owner: the public function the user called, once known.
    """

    def __init__(
        self,
        name: str,
        text: str,
        owner: str | None = None,
        hint: Callable[[str | None, str], str] | None = None,
    ):
        self.name, self.text, self.owner, self.hint = name, text, owner, hint
        more = hint(owner, name) if hint else ""
        super().__init__(f"{owner + ': ' if owner else ''}`{name}` {text}{more}")


class ArgumentTypeError(ArgumentError, TypeError):
    """An `ArgumentError` of the wrong type (a class for an instance, ...)."""


@contextlib.contextmanager
def arguments(owner: str, **names: str) -> Iterator[None]:
    """Errors raised in the block name ``owner`` and the user's arguments.

    A preset builds its rule, and validates its own arguments through the
    rule's checks, inside this block: an `ArgumentError` raised there is
    raised again naming the argument the user passed (``zclip(z_thresh=-1)``
    reports ``z_thresh``, not the rule's field ``z``) and the function the
    user called. The innermost block names the owner.

    Args:
      owner: the public function the user called (e.g. ``"zclip"``).
      **names: maps a name used by the checks inside the block (a rule's
        field) to the argument the user passed, e.g. ``z="z_thresh"``.
    """
    try:
        yield
    except ArgumentError as e:
        name, owner = names.get(e.name, e.name), e.owner or owner
        raise type(e)(name, e.text, owner, e.hint) from None


def fail(
    name: str,
    text: str,
    error: type[Exception] = ValueError,
    hint: Callable[[str | None, str], str] | None = None,
) -> Exception:
    """The `ArgumentError` for argument ``name`` (a TypeError if ``error`` is).

    ``hint(owner, name)`` completes the message once the function the user
    called and the argument's name there are known.
    """
    if issubclass(error, TypeError):
        return ArgumentTypeError(name, text, hint=hint)
    return ArgumentError(name, text, hint=hint)


def check_fits(owner: str, found: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """The one tree/state match check: the step measured what ``init`` did.

    ``found`` is the shape of this step's measured norms, ``expected`` the
    shape the state records. A scope whose decision is global measures a
    scalar whatever the tree: its state fits any tree.
    """
    if tuple(found) != tuple(expected):
        n_found = found[0] if found else 1
        held = expected[0] if expected else 1
        raise ValueError(
            f"{owner}: the updates do not match the tree this transform was "
            f"initialized with: it measured {n_found} norm(s) (shape "
            f"{tuple(found)}) but its state holds {held} (shape {tuple(expected)})."
            " Call `init` with params of the same structure as the updates."
        )


def is_traced(value: Any) -> bool:
    """Whether ``value`` is a tracer (its value is unknown at construction)."""
    return isinstance(value, jax.core.Tracer)


def concrete(value: Any) -> np.ndarray | None:
    """``value`` as a NumPy array, or None if it cannot be read on the host.

    Tracers and arrays spread over devices this process cannot address are
    not read (that would be a host round-trip, or impossible).
    """
    if is_traced(value):
        return None
    if isinstance(value, jax.Array):
        if not getattr(value, "is_fully_addressable", True):
            return None
        return np.asarray(jax.device_get(value))
    return np.asarray(value)


def show(value: Any) -> str:
    """A short rendering of a user's value for messages."""
    if isinstance(value, jax.Array | np.ndarray) and not is_traced(value):
        array = concrete(value)
        if array is not None and array.size <= 8:
            kind = "jax.Array" if isinstance(value, jax.Array) else "np.ndarray"
            return f"{kind}({array.tolist()!r}, dtype={array.dtype})"
    if is_traced(value):
        return f"a traced array of shape {tuple(value.shape)}"
    return repr(value)


def _describe_range(
    lo: float | None, hi: float | None, lo_open: bool, hi_open: bool
) -> str:
    if lo is not None and hi is not None:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        return f"in {left}{lo:g}, {hi:g}{right}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"{'<' if hi_open else '<='} {hi:g}"


def check_number(
    value: Any,
    name: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
    allow_inf: bool = False,
) -> None:
    """Raises ValueError for a number outside its range, NaN, or not a scalar.

    Python and NumPy numbers and concrete JAX arrays are checked; a traced
    array only for its shape.

    Args:
      value: the user's value.
      name: the argument's name (translated by `arguments`).
      lo: the smallest allowed value, or None.
      hi: the largest allowed value, or None.
      lo_open: exclude ``lo`` itself.
      hi_open: exclude ``hi`` itself.
      integer: the value must be a whole number.
      allow_inf: accept ``+inf`` (e.g. "no bound").

    Raises:
      ValueError: naming the argument, the value, and the allowed values.
    """
    wanted = (
        _describe_range(lo, hi, lo_open, hi_open) if (lo, hi) != (None, None) else ""
    )
    kind = "an integer" if integer else "a number"
    expected = f"{kind} {wanted}".strip()
    if isinstance(value, bool) or not isinstance(
        value, int | float | np.number | np.ndarray | jax.Array
    ):
        raise fail(
            name,
            f"must be {expected} (a Python number or a scalar array); got "
            f"{value!r} of type {type(value).__name__}.",
        )
    if np.ndim(value) != 0:
        raise fail(
            name,
            f"must be a scalar ({expected}); got {show(value)} of shape "
            f"{tuple(np.shape(value))}.",
        )
    array = concrete(value)
    if array is None:
        return
    # jnp.issubdtype knows bfloat16 and the other ml_dtypes floats.
    real = jnp.issubdtype(array.dtype, jnp.integer) or jnp.issubdtype(
        array.dtype, jnp.floating
    )
    if not real:
        raise fail(name, f"must be a real number ({expected}); got {show(value)}.")
    number = float(array)
    if math.isnan(number):
        raise fail(name, f"must be {expected}; got NaN ({show(value)}).")
    if math.isinf(number) and not (allow_inf and number > 0):
        raise fail(name, f"must be finite ({expected}); got {show(value)}.")
    if integer and number != int(number):
        raise fail(name, f"must be a whole number ({expected}); got {show(value)}.")
    below = lo is not None and (number < lo or (lo_open and number == lo))
    above = hi is not None and (number > hi or (hi_open and number == hi))
    if below or above:
        raise fail(name, f"must be {expected}; got {show(value)}.")


def check_threshold(value: Any, name: str) -> None:
    """Raises for a threshold that is not a scalar ``>= 0`` (``inf`` allowed).

    Raises:
      TypeError: if ``value`` is not a number or an array (a rule *class*
        instead of an instance included).
      ValueError: if it is negative, NaN or not a scalar.
    """
    if isinstance(value, type):
        raise fail(
            name,
            f"got the class {_class_name(value)}; {_instance_hint(value)}",
            TypeError,
        )
    if isinstance(value, bool) or not isinstance(
        value, int | float | np.number | np.ndarray | jax.Array
    ):
        raise fail(
            name,
            "must be a number, a scalar array, an optax schedule or a rule from "
            f"optaxclip.rules (e.g. rules.zscore()); got {value!r} of type "
            f"{type(value).__name__}.",
            TypeError,
        )
    if np.ndim(value) != 0:
        raise fail(
            name,
            "must be a scalar: one bound for every entry (an adaptive bound per "
            "tensor comes from a rule, e.g. rules.ema()); got an array of shape "
            f"{tuple(np.shape(value))}.",
        )
    check_number(value, name, lo=0.0, allow_inf=True)


def check_schedule(schedule: Any, name: str) -> None:
    """Raises if a schedule's value is not a scalar.

    The value's shape is found without running the schedule
    (``jax.eval_shape`` of the int32 step count); a schedule that cannot be
    traced that way is left for ``update`` to run.
    """
    step = jax.ShapeDtypeStruct((), np.int32)
    try:
        shape = jax.eval_shape(schedule, step).shape
    except Exception:  # noqa: BLE001  (any failure here is the schedule's own)
        return
    if shape != ():
        raise fail(
            name,
            "is a schedule whose value must be a scalar (one bound for every "
            f"entry); it returns an array of shape {tuple(shape)}.",
        )


def check_size(
    value: Any, name: str, *, lo: int, allow_none: bool = False, owner: str = ""
) -> None:
    """Raises for a size parameter (a state's shape) that is not a Python int.

    A JAX array here almost always comes from ``optax.inject_hyperparams``,
    which turns every number into an array unless it is listed in
    ``static_args``; the message says so.

    Args:
      value: the user's value.
      name: the argument's name (translated by `arguments`).
      lo: the smallest allowed size.
      allow_none: whether None (a default) is accepted.
      owner: the factory's name for the ``static_args`` hint, if no
        `arguments` block gives one.
    """
    if allow_none and value is None:
        return
    if isinstance(value, jax.Array):
        raise fail(
            name,
            f"sets the shape of the state, so it must be a Python int >= {lo}; got "
            f"{show(value)}.",
            hint=lambda factory, user: (
                " Under optax.inject_hyperparams, list it in `static_args`: "
                f"optax.inject_hyperparams({factory or owner or 'factory'}, "
                f"static_args=({user!r},))."
            ),
        )
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
        none = " or None" if allow_none else ""
        raise fail(
            name,
            f"must be a Python int >= {lo}{none} (it sets the shape of the state); "
            f"got {value!r}.",
        )


def check_choice(value: Any, name: str, choices: Sequence[str]) -> None:
    """Raises ValueError unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise fail(name, f"must be one of {tuple(choices)}; got {value!r}.")


def check_flag(value: Any, name: str, *, static: bool = False) -> None:
    """Raises ValueError unless ``value`` is a bool (or a scalar bool array).

    Args:
      value: the user's value.
      name: the argument's name.
      static: the flag selects code at trace time, so it must be a Python
        bool (arrays, even concrete ones, are refused).
    """
    if isinstance(value, bool | np.bool_):
        return
    if not static and isinstance(value, np.ndarray | jax.Array):
        if np.ndim(value) == 0 and np.dtype(value.dtype) == np.bool_:
            return
    kind = "a Python bool" if static else "a bool or a scalar bool array"
    raise fail(name, f"must be {kind} (True or False); got {show(value)}.")


def static_flag(value: Any, name: str) -> bool:
    """``value`` as a Python bool, after checking it is one (it selects code)."""
    check_flag(value, name, static=True)
    return bool(value)


def check_stacked(stacked_axes: Any, name: str = "stacked_axes") -> Any:
    """Validates ``stacked_axes``: a non-negative int or a pytree prefix of them."""
    for k in jax.tree.leaves(stacked_axes):
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
            raise fail(
                name,
                f"must be a non-negative int (or a pytree prefix of them); got "
                f"{k!r}. Under optax.inject_hyperparams, pass it in `static_args`.",
            )
    return stacked_axes


def check_same_tree(owner: str, template: Any, updates: Any) -> None:
    """Raises ValueError unless ``updates`` has the structure and leaf shapes of
    ``template`` (a state built like the params, e.g. a second moment).
    """
    t_paths = jax.tree_util.tree_flatten_with_path(template)[0]
    u_paths = jax.tree_util.tree_flatten_with_path(updates)[0]
    t_keys = [jax.tree_util.keystr(k) for k, _ in t_paths]
    u_keys = [jax.tree_util.keystr(k) for k, _ in u_paths]
    if t_keys != u_keys or jax.tree.structure(template) != jax.tree.structure(updates):
        missing = [k for k in t_keys if k not in u_keys]
        extra = [k for k in u_keys if k not in t_keys]
        found = f"leaves {u_keys[:4]}{' ...' if len(u_keys) > 4 else ''}"
        if missing or extra:
            found = f"missing leaves {missing[:4]} and extra leaves {extra[:4]}"
        _tree_mismatch(owner, f"leaves {t_keys[:4]}", found + " (another tree)")
    for key, (_, t), (_, u) in zip(t_keys, t_paths, u_paths, strict=True):
        if np.shape(t) != np.shape(u):
            _tree_mismatch(
                owner,
                f"leaf {key} of shape {tuple(np.shape(t))}",
                f"shape {tuple(np.shape(u))} there",
            )


def check_params(owner: str, updates: Any, params: Any) -> None:
    """Raises ValueError unless ``params`` has the updates' structure and shapes."""
    if jax.tree.structure(updates) != jax.tree.structure(params):
        raise ValueError(
            f"{owner}: `params` must have the structure of the updates; got "
            f"{jax.tree.structure(params)} for updates {jax.tree.structure(updates)}."
        )
    with_path = jax.tree_util.tree_flatten_with_path(updates)[0]
    for (path, u), w in zip(with_path, jax.tree.leaves(params), strict=True):
        if np.shape(u) != np.shape(w):
            raise ValueError(
                f"{owner}: `params` must have the shapes of the updates; leaf "
                f"{jax.tree_util.keystr(path)} has shape {tuple(np.shape(u))} in "
                f"the updates and {tuple(np.shape(w))} in `params`."
            )


def _tree_mismatch(owner: str, expected: str, found: str) -> None:
    raise ValueError(
        f"{owner}: the updates do not match the tree this transform was "
        f"initialized with: its state holds {expected}, the updates have "
        f"{found}. Call `init` with params of the same structure and shapes as "
        "the updates (and initialize again after changing the model)."
    )


def _class_name(cls: type) -> str:
    module = cls.__module__
    if module == "optaxclip.rules":
        return f"rules.{cls.__name__}"
    return cls.__name__


def _instance_hint(cls: type) -> str:
    return f"pass an instance: {_class_name(cls)}()."
