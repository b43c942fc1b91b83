"""``metrics()``: the clip statistics of an optimizer state as a flat dict."""

from __future__ import annotations

from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from ._core import ClipStats, stats

__all__ = ["metrics"]


def metrics(
    opt_state: Any, *, prefix: str = "clip", host: bool = False
) -> dict[str, Any]:
    """The clip statistics of an optimizer state as a flat dict, ready to log.

    Reads every clip in the state through [`stats`][optaxclip.stats] and
    names its statistics with stable keys: `{prefix}/{name}` when the state
    holds one clip, `{prefix}/{i}/{name}` (`i` = 0, 1, ... in the order of
    [`stats`][optaxclip.stats]) when it holds several. The names, for a clip
    whose stats are scalars (global and element scopes, per-example clipping,
    the guards):

    | key | value |
    |---|---|
    | `norm` | the norm measured before clipping (per-example: their mean) |
    | `threshold` | the bound of this step |
    | `scale` | the factor applied (1: not clipped, 0: zeroed step) |
    | `clipped` | 1 if the step was clipped, else 0 (per-example: how many) |
    | `nonfinite_count` | running count of non-finite steps |

    For a clip with one entry per tensor (`clip_by_norm`, `adagc`, AGC, ...)
    the per-tensor entries are summarized: `norm_max` (largest tensor norm),
    `threshold_min`, `scale_min` (the strongest rescaling), `clipped` (how
    many tensors were clipped) and `nonfinite_count`. Which names a clip gets
    depends only on its transform, never on the values, so the keys are the
    same on every step.

    Under `jax.jit` call it with `host=False` (the default) and return the
    dict from the step: its values are scalar arrays (a dict that leaves
    `jit` has its keys sorted, as every pytree dict). On the host,
    `host=True` fetches them (one `jax.device_get`) and converts them to
    Python `float` (and `int` for the counts), the form `clu` metric writers,
    TensorBoard's `add_scalar` and `wandb.log` take. A dict returned from a
    jitted step converts the same way:
    `{k: v.item() for k, v in jax.device_get(logs).items()}`.

    Args:
      opt_state: an optimizer state (any nesting of `optax.chain`,
        `optax.masked`, `optax.MultiSteps`, `optax.inject_hyperparams`, ...),
        a flax linen `TrainState`, an `nnx.Optimizer` or its `nnx.state`.
      prefix: keyword-only; the first part of every key (`""` for none).
      host: keyword-only; `True` returns Python numbers (outside `jit` only),
        `False` returns scalar arrays (usable inside `jit`).

    Returns:
      A dict from key to a scalar array (or a Python `float` / `int` with
      `host=True`); empty if the state holds no clip.

    Raises:
      TypeError: `prefix` is not a string, `host` is not a bool, or
        `host=True` inside a transformation (`jit`, `vmap`, ...), where
        values are not concrete.

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
      clip/clipped 1
      clip/nonfinite_count 0
    """
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
    found = stats(opt_state)
    out: dict[str, Any] = {}
    for i, s in enumerate(found):
        parts = [p for p in (prefix, str(i) if len(found) > 1 else "") if p]
        head = "/".join(parts) + "/" if parts else ""
        for name, value in _summarize(s).items():
            out[head + name] = value
    if host:
        return _to_host(out)
    return out


def _summarize(s: ClipStats) -> dict[str, jax.Array]:
    norm = jnp.asarray(s.norm)
    if norm.ndim == 0:
        return {
            "norm": norm,
            "threshold": jnp.asarray(s.threshold),
            "scale": jnp.asarray(s.scale),
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
