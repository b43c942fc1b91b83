"""``metrics()`` and ``nonfinite_paths()``: the clip statistics, named for a logger."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from ._stats import ClipStats, find_states, read_record, record_of

__all__ = ["metrics", "nonfinite_paths"]


def metrics(
    opt_state: Any,
    params: Any = None,
    *,
    prefix: str = "clip",
    host: bool = False,
    per_tensor: bool = False,
) -> dict[str, Any]:
    """The clip statistics of an optimizer state as a flat dict, ready to log.

    Reads every clip and guard in the state and names its statistics by
    what they belong to, never by position, so adding or removing a guard,
    ``optax.masked`` or ``optax.MultiSteps`` around a clip leaves its keys
    as they were:

    - a clip's keys are ``{prefix}/{name}``; a second clip in the same
      state gets ``{prefix}_1/{name}``, a third ``{prefix}_2/{name}``, in
      the order of [`stats`][optaxclip.stats];
    - a guard's keys are ``{prefix}/skip_spikes/{name}`` or
      ``{prefix}/skip_nonfinite/{name}`` (a second guard of the same kind
      gets ``skip_spikes_1``, ...).

    The names, for a clip whose stats are scalars (global and element
    scopes, per-example clipping, SPAM):

    | name | value |
    |---|---|
    | `norm` | the norm measured before clipping (per-example: their mean) |
    | `threshold` | the bound of this step |
    | `scale` | the factor applied (1: not clipped, 0: zeroed step) |
    | `norm_after` | what the clip passed on: `norm * scale` (0 if zeroed) |
    | `clipped` | 1 if the step was clipped, else 0 (per-example: how many) |
    | `nonfinite_count` | running count of non-finite steps |

    For a clip with one entry per tensor (`clip_by_norm`, `adagc`, AGC, ...)
    the entries are summarized: `norm_max` (largest tensor norm),
    `threshold_min`, `scale_min` (the strongest rescaling), `clipped` (how
    many tensors or units were clipped) and `nonfinite_count`. A guard
    gives `norm` (the global 2-norm it checked), `threshold` (its bound),
    `skipped` (1 if this step was skipped), `skipped_total`,
    `nonfinite_count`, and for `skip_spikes` `value_threshold` (the loss's
    bound; `inf` while not checked or without `value=`).

    With ``per_tensor=True`` every clip that has per-tensor entries adds one
    key per tensor and statistic, ``{head}/{stat}/{path}``: ``norm`` for
    every such clip (a clip whose decision is global has them when built
    with ``per_tensor_stats=True``), and for tensor and unit scopes also
    ``threshold``, ``scale`` and ``clipped`` (1 if that tensor was scaled
    down). ``path`` joins the keys of the parameter in ``params`` with
    ``/`` (``layers/0/attn/kernel``); without ``params`` it is the tensor's
    index (``0``, ``1``, ...). Entries of stacked layers (``stacked_axes``)
    add the layer index (``layers/kernel/3``).

    Which keys a state gets depends only on its transforms, never on the
    values, so they are the same on every step. Inside
    ``optax.MultiSteps`` the clip's state only changes on the step that
    applies the accumulated gradient: every micro-step reports that last
    applied step.

    Under `jax.jit` call it with `host=False` (the default) and return the
    dict from the step: its values are scalar arrays. On the host,
    `host=True` fetches them (one `jax.device_get`) and converts them to
    Python `float` (and `int` for the counts), the form `clu` metric writers,
    TensorBoard's `add_scalar` and `wandb.log` take. On several processes
    (`jax.distributed`) the values are replicated, so every process reads
    the same numbers.

    Args:
      opt_state: an optimizer state (any nesting of `optax.chain`,
        `optax.masked`, `optax.MultiSteps`, `optax.inject_hyperparams`, ...),
        a flax linen `TrainState`, an `nnx.Optimizer` or its `nnx.state`.
      params: the tree the per-tensor keys are named after: any tree with
        the structure of the clipped updates (the parameters, or for a clip
        inside `optax.masked` / `optax.partition` the part it sees). Only
        read with ``per_tensor=True``.
      prefix: keyword-only; the first part of every key (`""` for none).
      host: keyword-only; `True` returns Python numbers (outside `jit` only),
        `False` returns scalar arrays (usable inside `jit`).
      per_tensor: keyword-only; add the per-tensor keys.

    Returns:
      A dict from key to a scalar array (or a Python `float` / `int` with
      `host=True`); empty if the state holds no clip.

    Raises:
      TypeError: `prefix` is not a string, `host` or `per_tensor` is not a
        bool, or `host=True` inside a transformation (`jit`, `vmap`, ...),
        where values are not concrete.
      ValueError: with `per_tensor=True`, `params` does not have one
        floating-point leaf per entry of a clip.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import optaxclip as oc
      >>> tx = optax.chain(oc.clip_by_global_norm(5.0), optax.sgd(0.1))
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> _, state = tx.update({"w": jnp.array([6.0, 8.0])}, state)
      >>> for key, value in oc.metrics(state, host=True).items():
      ...     print(key, value)
      clip/norm 10.0
      clip/threshold 5.0
      clip/scale 0.5
      clip/norm_after 5.0
      clip/clipped 1
      clip/nonfinite_count 0

      Per tensor, named by parameter path:

      >>> tx = oc.clip_by_global_norm(1.0, per_tensor_stats=True)
      >>> params = {"layers": [{"kernel": jnp.zeros(2)}, {"kernel": jnp.zeros(1)}]}
      >>> grads = {"layers": [{"kernel": jnp.array([3.0, 4.0])},
      ...                     {"kernel": jnp.array([12.0])}]}
      >>> _, state = tx.update(grads, tx.init(params))
      >>> logs = oc.metrics(state, params, host=True, per_tensor=True)
      >>> print(logs["clip/norm"], logs["clip/norm/layers/0/kernel"],
      ...       logs["clip/norm/layers/1/kernel"])
      13.0 5.0 12.0

    References:
      The keys other stacks log and their optaxclip names are tabulated in
      the docs (Logging page).
    """
    _check_options(prefix, host, per_tensor)
    out: dict[str, Any] = {}
    for head, kind, state in _heads(opt_state, prefix):
        s = read_record(record_of(state))
        for name, value in _summarize(kind, s, state).items():
            out[head + name] = value
        if per_tensor:
            for name, vector in _per_tensor(kind, s).items():
                paths = entry_paths(params, vector.shape[-1], head.rstrip("/"))
                for i, path in enumerate(paths):
                    out[f"{head}{name}/{path}"] = vector[..., i]
    if host:
        return _to_host(out)
    return out


def nonfinite_paths(opt_state: Any, params: Any) -> list[str]:
    """The parameter paths of the tensors that were non-finite on the latest step.

    For every clip and guard in the state, the tensors whose gradient held
    a NaN or infinite entry on its latest step (an empty list when that
    step was finite), named as in [`metrics`][optaxclip.metrics]
    (``layers/0/attn/kernel``), in order and without repeats. Clips whose
    decision is global record which tensors were non-finite on every step
    (no ``per_tensor_stats`` needed); per-tensor clips read it from their
    per-tensor norms. Per-example clipping zeroes non-finite *examples* and
    does not record tensors: it contributes nothing here.

    Call it on the host, outside ``jit``, e.g. when
    ``nonfinite_count`` moved. On several processes every process gets
    the same list.

    Args:
      opt_state: an optimizer state (any nesting), a flax ``TrainState``,
        an ``nnx.Optimizer`` or its ``nnx.state``.
      params: a tree with the structure of the clipped updates (usually the
        parameters), or None to name tensors by index.

    Returns:
      A list of paths (``str``).

    Raises:
      ValueError: the state holds no clip or guard, or ``params`` does not
        have one floating-point leaf per tensor of a clip.
      TypeError: called inside a JAX transformation.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optaxclip as oc
      >>> tx = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(1e-3))
      >>> params = {"embed": jnp.zeros(2), "head": {"kernel": jnp.zeros(3)}}
      >>> state = tx.init(params)
      >>> bad = jnp.array([1.0, jnp.nan, 0.0])
      >>> grads = {"embed": jnp.ones(2), "head": {"kernel": bad}}
      >>> _, state = tx.update(grads, state, params)
      >>> oc.nonfinite_paths(state, params)
      ['head/kernel']
    """
    found = find_states(opt_state)
    if not found:
        raise ValueError(
            "nonfinite_paths: the optimizer state holds no optaxclip clip or "
            "guard, so no step's tensors were recorded. Pass the state of an "
            "optimizer built with an optaxclip transform (e.g. "
            "optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-3)))."
        )
    out: list[str] = []
    for head, _, state in _heads(opt_state, "clip"):
        s = read_record(record_of(state))
        flags = jnp.asarray(s.nonfinite_tensors)
        if isinstance(flags, jax.core.Tracer):
            raise TypeError(
                "nonfinite_paths needs concrete values; call it on the host, "
                "outside jit, with the state the step returned."
            )
        flags = np.asarray(jax.device_get(flags))
        if flags.ndim != 1 or not flags.size:
            continue
        paths = entry_paths(params, flags.shape[0], head.rstrip("/"))
        out.extend(p for p, bad in zip(paths, flags, strict=True) if bad)
    return list(dict.fromkeys(out))


def _check_options(prefix: Any, host: Any, per_tensor: Any) -> None:
    if not isinstance(prefix, str):
        raise TypeError(
            f"prefix must be a string (the first part of every key), got "
            f"prefix={prefix!r}; pass e.g. prefix='clip' or prefix=''."
        )
    if not isinstance(host, bool):
        raise TypeError(
            f"host must be True (Python numbers) or False (arrays, inside jit), "
            f"got host={host!r}."
        )
    if not isinstance(per_tensor, bool):
        raise TypeError(
            f"per_tensor must be True (add one key per tensor) or False, got "
            f"per_tensor={per_tensor!r}."
        )


def _heads(opt_state: Any, prefix: str) -> list[tuple[str, str, Any]]:
    # Each state's key head, from its kind and how many of that kind came
    # before it: never from its position among other kinds.
    seen: dict[str, int] = {}
    out = []
    for kind, state in find_states(opt_state):
        k = seen.get(kind, 0)
        seen[kind] = k + 1
        suffix = f"_{k}" if k else ""
        if kind == "clip":
            head = prefix + suffix if prefix else (str(k) if k else "")
        else:
            head = "/".join(p for p in (prefix, kind + suffix) if p)
        out.append((head + "/" if head else "", kind, state))
    return out


def _summarize(kind: str, s: ClipStats, state: Any) -> dict[str, jax.Array]:
    norm = jnp.asarray(s.norm)
    if kind != "clip":
        out = {
            "norm": norm,
            "threshold": jnp.asarray(s.threshold),
            "skipped": jnp.asarray(s.clipped),
            "skipped_total": jnp.asarray(_field(state, "skipped")),
            "nonfinite_count": jnp.asarray(s.nonfinite_count),
        }
        if kind == "skip_spikes":
            out["value_threshold"] = jnp.asarray(_field(state, "value_threshold"))
        return out
    if norm.ndim == 0:
        scale = jnp.asarray(s.scale)
        # A zeroed step has a NaN or infinite norm and scale 0: it passed on 0.
        after = jnp.where(scale == 0, jnp.zeros_like(norm), norm * scale)
        return {
            "norm": norm,
            "threshold": jnp.asarray(s.threshold),
            "scale": scale,
            "norm_after": after,
            "clipped": jnp.asarray(s.clipped),
            "nonfinite_count": jnp.asarray(s.nonfinite_count),
        }
    # One entry per tensor: the extremes say what a dashboard needs (the
    # largest norm, the tightest bound, the strongest rescaling). The
    # initial values keep a tree without floating-point leaves well defined.
    return {
        "norm_max": jnp.max(norm, initial=0.0),
        "threshold_min": jnp.min(jnp.asarray(s.threshold), initial=jnp.inf),
        "scale_min": jnp.min(jnp.asarray(s.scale), initial=1.0),
        "clipped": jnp.asarray(s.clipped),
        "nonfinite_count": jnp.asarray(s.nonfinite_count),
    }


def _per_tensor(kind: str, s: ClipStats) -> dict[str, jax.Array]:
    norm = jnp.asarray(s.norm)
    if kind == "clip" and norm.ndim == 1:
        scale = jnp.asarray(s.scale)
        return {
            "norm": norm,
            "threshold": jnp.asarray(s.threshold),
            "scale": scale,
            "clipped": (scale < 1).astype(jnp.int32),
        }
    tensors = jnp.asarray(s.tensor_norms)
    if tensors.shape[-1]:
        return {"norm": tensors}
    return {}


def _field(state: Any, name: str) -> Any:
    value = state[name] if isinstance(state, Mapping) else getattr(state, name)
    get_value = getattr(value, "get_value", None)
    if callable(get_value):
        return get_value()
    return getattr(value, "value", value)


def entry_paths(params: Any, n: int, owner: str = "clip") -> list[str]:
    """The names of a clip's ``n`` per-tensor entries, from ``params``' paths.

    One name per floating-point leaf of ``params`` (its keys joined by
    ``/``); if the clip has more entries than leaves (stacked layers
    measured per slice), each leaf's entries get their slice index when the
    leading sizes of the leaves account for every entry. Without
    ``params``, the entries' indices.
    """
    if params is None:
        return [str(i) for i in range(n)]
    paths, shapes = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if _is_float(leaf):
            paths.append(path_name(path))
            shapes.append(np.shape(leaf))
    if len(paths) == n:
        return paths
    stacked = [s[0] if s else 1 for s in shapes]
    if shapes and sum(stacked) == n:
        return [
            f"{p}/{i}" for p, k in zip(paths, stacked, strict=True) for i in range(k)
        ]
    shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
    raise ValueError(
        f"The clip whose keys start with {owner!r} holds {n} per-tensor "
        f"entries, but `params` has {len(paths)} floating-point leaves "
        f"({shown}). Pass a tree with the structure of the updates this clip "
        "sees: the parameters, or for a clip inside optax.masked / "
        "optax.partition only the parameters it clips."
    )


def path_name(path: tuple[Any, ...]) -> str:
    """``layers/0/attn/kernel``: a key path's entries joined by ``/``."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    # nnx keeps a parameter's array in its variable's `value`.
    if len(parts) > 1 and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def _is_float(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _to_host(out: dict[str, jax.Array]) -> dict[str, float | int]:
    if any(isinstance(v, jax.core.Tracer) for v in out.values()):
        raise TypeError(
            "metrics(..., host=True) needs concrete values, but it was called "
            "inside a JAX transformation (jit, vmap, ...); call metrics(state) "
            "there, return the dict, and convert it outside, e.g. with "
            "metrics(state, host=True) on the returned state."
        )
    # One transfer for all values; a list keeps the keys' order (a dict
    # pytree would come back sorted).
    fetched = jax.device_get(list(out.values()))
    return {
        k: int(v) if np.issubdtype(v.dtype, np.integer) else float(v)
        for k, v in zip(out, fetched, strict=True)
    }
