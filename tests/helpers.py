"""Shared test helpers: random pytrees, jit/no-jit variants, NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = [(), (3,), (2, 5), (4, 1, 3), (2, 3, 2, 2)]


def random_tree(seed: int, n_leaves: int, dtype=jnp.float32, scale: float = 1.0):
    """A dict pytree of ``n_leaves`` random arrays of mixed ranks."""
    rng = np.random.default_rng(seed)
    tree = {}
    for i in range(n_leaves):
        shape = SHAPES[rng.integers(len(SHAPES))]
        tree[f"p{i:02d}"] = jnp.asarray(rng.normal(size=shape) * scale, dtype)
    return tree


def variants(fn):
    """``fn`` eagerly and under ``jax.jit``, as (name, callable) pairs."""
    return [("eager", fn), ("jit", jax.jit(fn))]


def run(tx, updates, params=None, jit=False):
    """One update of ``tx`` from its initial state; returns (updates, state)."""
    init_params = updates if params is None else params
    state = tx.init(init_params)
    update = jax.jit(tx.update) if jit else tx.update
    return update(updates, state, params)


def np_leaves(tree):
    """Float leaves of ``tree`` as float64 NumPy arrays (complex stays complex)."""
    out = []
    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            a = np.asarray(x)
            out.append(a.astype(np.complex128 if np.iscomplexobj(a) else np.float64))
    return out


def np_norm(leaves, p=2.0) -> float:
    """Reference p-norm of all entries (NumPy, float64)."""
    flat = (
        np.concatenate([np.abs(a).ravel() for a in leaves]) if leaves else np.zeros(0)
    )
    if flat.size == 0:
        return 0.0
    if np.isinf(p):
        return float(flat.max())
    return float(np.sum(flat**p) ** (1.0 / p))


def assert_trees_close(actual, expected, rtol=1e-6, atol=0.0):
    """Same structure, dtypes and values."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert jnp.asarray(a).dtype == jnp.asarray(e).dtype, (a.dtype, e.dtype)
        np.testing.assert_allclose(
            np.asarray(a, np.float64) if not np.iscomplexobj(a) else np.asarray(a),
            np.asarray(e, np.float64) if not np.iscomplexobj(e) else np.asarray(e),
            rtol=rtol,
            atol=atol,
        )


def learning_rule_names() -> list[str]:
    """The names of every learning rule in ``optaxclip.rules`` (the frozen
    dataclasses it exports, less the fixed and scheduled thresholds)."""
    import dataclasses

    from optaxclip import rules

    return [
        name
        for name in rules.__all__
        if name not in {"fixed", "scheduled"}
        and isinstance(getattr(rules, name), type)
        and dataclasses.is_dataclass(getattr(rules, name))
    ]
