"""Per-example clipping for differentially private training (DP-SGD)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from . import _norms

__all__ = ["per_example_global_norm_clip", "per_example_layer_norm_clip"]


def per_example_global_norm_clip(
    grads: Any, l2_norm_clip: jax.typing.ArrayLike
) -> tuple[Any, jax.Array]:
    """Clips each example's gradient to a global L2 norm, then sums over the batch.

    Same signature and results as ``optax.per_example_global_norm_clip``; the
    norms accumulate in float32 or better.

    Args:
      grads: a pytree (optax: a list) of arrays that all share a leading batch
        axis, e.g. from ``jax.vmap(jax.grad(loss))``.
      l2_norm_clip: the largest L2 norm an example's gradient may have.

    Returns:
      ``(clipped_sum, num_clipped)``: the pytree of clipped gradients summed
      over the batch, and the int32 number of examples that were clipped.

    Raises:
      ValueError: if the leaves do not share a leading batch axis (the message
        names the offending leaf and shapes).

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> grads = [jnp.array([[0.0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]])]
      >>> summed, n = oc.per_example_global_norm_clip(grads, 1.25)
      >>> print(summed[0], n)
      [1.75 1.75 1.75] 3

    References:
      Abadi et al., `Deep Learning with Differential Privacy
      <https://arxiv.org/abs/1607.00133>`_, 2016.
    """
    leaves = jax.tree.leaves(grads)
    check_batch(grads, "per_example_global_norm_clip")
    norms = example_norms(leaves)
    multipliers = clip_multipliers(norms, l2_norm_clip)
    summed = jax.tree.map(lambda g: batch_sum(multipliers, g), grads)
    return summed, jnp.sum(multipliers < 1.0, dtype=jnp.int32)


def per_example_layer_norm_clip(
    grads: Any, global_l2_norm_clip: jax.typing.ArrayLike, uniform: bool = True
) -> tuple[Any, Any]:
    """Clips each example's gradient layer by layer, then sums over the batch.

    Same signature and results as ``optax.per_example_layer_norm_clip``: with
    ``K`` layers and ``C = global_l2_norm_clip``, each layer is clipped to
    ``C / sqrt(K)`` (``uniform=True``) or ``C * sqrt(D_i / D)`` where ``D_i``
    is the layer's size per example and ``D`` the total.

    Args:
      grads: a pytree of arrays sharing a leading batch axis.
      global_l2_norm_clip: the overall bound ``C``.
      uniform: split ``C`` evenly across layers (True) or by size (False).

    Returns:
      ``(clipped_sum, num_clipped)``, both pytrees of the structure of
      ``grads``: per layer the clipped sum over the batch and the number of
      examples clipped.

    Raises:
      ValueError: if the leaves do not share a leading batch axis.

    Example:
      >>> import jax.numpy as jnp
      >>> import optaxclip as oc
      >>> grads = [jnp.array([[0.0, 3, 4], [0, 0, 1]]), jnp.array([[6.0], [0.5]])]
      >>> summed, n = oc.per_example_layer_norm_clip(grads, 2.0 ** 0.5)
      >>> print(summed[0], summed[1], n[0], n[1])
      [0.  0.6 1.8] [1.5] 1 1

    References:
      McMahan et al., `Learning Differentially Private Recurrent Language
      Models <https://arxiv.org/abs/1710.06963>`_, 2017.
    """
    check_batch(grads, "per_example_layer_norm_clip")
    leaves = jax.tree.leaves(grads)
    if uniform:
        bounds = [global_l2_norm_clip * (1.0 / len(leaves)) ** 0.5] * len(leaves)
    else:
        total = sum(g[0].size for g in leaves)
        bounds = [global_l2_norm_clip * (g[0].size / total) ** 0.5 for g in leaves]
    summed, clipped = [], []
    for g, bound in zip(leaves, bounds, strict=True):
        multipliers = clip_multipliers(example_norms([g]), bound)
        summed.append(batch_sum(multipliers, g))
        clipped.append(jnp.sum(multipliers < 1.0, dtype=jnp.int32))
    treedef = jax.tree.structure(grads)
    return jax.tree.unflatten(treedef, summed), jax.tree.unflatten(treedef, clipped)


def check_batch(grads: Any, name: str) -> int:
    """Returns the common leading batch size, or raises a ValueError naming the leaf."""
    with_path = jax.tree_util.tree_leaves_with_path(grads)
    if not with_path:
        raise ValueError(f"{name}: `grads` has no leaves.")
    first_path, first = with_path[0]
    if jnp.ndim(first) < 1:
        raise ValueError(
            f"{name} expects every leaf to have a leading batch axis; leaf "
            f"{jax.tree_util.keystr(first_path)} has shape {jnp.shape(first)}."
        )
    batch = jnp.shape(first)[0]
    for path, g in with_path[1:]:
        if jnp.ndim(g) < 1 or jnp.shape(g)[0] != batch:
            raise ValueError(
                f"{name} expects every leaf to share the leading batch axis of "
                f"leaf {jax.tree_util.keystr(first_path)} (shape {jnp.shape(first)}, "
                f"batch {batch}); leaf {jax.tree_util.keystr(path)} has shape "
                f"{jnp.shape(g)}."
            )
    return batch


def example_norms(leaves: list[jax.Array], p: float = 2.0) -> jax.Array:
    """The ``p``-norm of each example (leading axis) across ``leaves``."""
    sums = []
    for g in leaves:
        g = jnp.asarray(g)
        if not _norms.is_float(g):
            g = g.astype(jnp.float32)
        part = _norms.power_sum(g, p, tuple(range(1, g.ndim)))
        sums.append(part.astype(jnp.float32))
    total = jnp.sum(_norms.stack_barrier(sums), axis=0) if len(sums) > 1 else sums[0]
    return _norms.safe_root(total, p)


def clip_multipliers(norms: jax.Array, bound: jax.typing.ArrayLike) -> jax.Array:
    """``min(1, bound / norm)`` per example; 1 where that is 0/0 (as optax)."""
    bound = jnp.asarray(bound, norms.dtype)
    positive = norms > 0
    safe = jnp.where(positive, norms, jnp.ones_like(norms))
    ratio = jnp.where(positive, bound / safe, jnp.where(bound > 0, jnp.inf, 1.0))
    return jnp.minimum(ratio, 1.0)


def batch_sum(multipliers: jax.Array, g: jax.Array) -> jax.Array:
    """``sum_b multipliers[b] * g[b]`` in float32 or better."""
    g = jnp.asarray(g)
    dtype = g.dtype if _norms.is_float(g) else jnp.float32
    acc = _norms.acc_dtype(dtype)
    g = g.astype(_norms.compute_dtype(dtype))
    out = jnp.tensordot(multipliers.astype(acc).astype(g.dtype), g, axes=1)
    return out.astype(dtype)
