"""Shared test helpers: random pytrees, hazard streams, scans, NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import optaxclip as oc

SHAPES = [(), (3,), (2, 5), (4, 1, 3), (2, 3, 2, 2)]


def random_tree(seed: int, n_leaves: int, dtype=jnp.float32, scale: float = 1.0):
    """A dict pytree of ``n_leaves`` random arrays of mixed ranks."""
    rng = np.random.default_rng(seed)
    tree = {}
    for i in range(n_leaves):
        shape = SHAPES[rng.integers(len(SHAPES))]
        tree[f"p{i:02d}"] = jnp.asarray(rng.normal(size=shape) * scale, dtype)
    return tree


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


# ---------------------------------------------------------------------------
# A stream of gradients with every hazard, and scans over it
# ---------------------------------------------------------------------------

STREAM_STEPS = 320
STREAM_SHAPES = ((4,), (2, 3), (5,))


def make_stream(seed: int, steps: int = STREAM_STEPS, scale: float = 1.0):
    """Stacked gradients ``[steps, *shape]`` per leaf, with every hazard."""
    rng = np.random.default_rng(seed)
    level = np.exp(rng.normal(0.0, 0.3, size=steps)) * scale
    leaves = [
        rng.normal(size=(steps, *s)) * level.reshape(-1, *[1] * len(s))
        for s in STREAM_SHAPES
    ]
    k = max(1, steps // 50)  # hazards of each kind
    start = min(40, steps // 3)
    picks = rng.permutation(np.arange(start, steps))
    spikes, zeros, nans, infs, entry_spikes = np.split(
        picks[: 8 * k], [2 * k, 3 * k, 4 * k, 5 * k]
    )
    for t in spikes:
        for x in leaves:
            x[t] *= 30.0
    for t in entry_spikes:
        leaves[1][t].flat[rng.integers(6)] *= 1e3
    for t in zeros:
        for x in leaves:
            x[t] = 0.0
    leaves[0][:3] = 0.0  # a tensor whose gradient is exactly zero at the start
    leaves[2][rng.choice(np.arange(3, steps), 2 * k, replace=False)] = 0.0
    for t in [2, *nans]:
        leaves[rng.integers(3)][t].flat[0] = np.nan
    for j, t in enumerate([min(30, steps - 1), *infs]):
        leaves[rng.integers(3)][t].flat[-1] = np.inf if j % 2 else -np.inf
    return {f"p{i}": jnp.asarray(x, jnp.float32) for i, x in enumerate(leaves)}


def first(tree):
    return jax.tree.map(lambda x: x[0], tree)


def scanner(tx):
    """A jitted ``(state, stream, params) -> (state, (outputs, stats))`` for ``tx``."""

    def body(state, xs):
        grads, p = xs
        out, state = tx.update(grads, state, p)
        return state, (out, oc.stats(state)[0])

    return jax.jit(
        lambda state, stream, params: jax.lax.scan(body, state, (stream, params))
    )


def scan_many(txs, stream, params=None):
    """Runs every transform of ``txs`` side by side over the stream, in one scan."""
    states = tuple(tx.init(first(stream if params is None else params)) for tx in txs)

    def body(states, xs):
        grads, p = xs
        results, new = [], []
        for tx, state in zip(txs, states, strict=True):
            out, state = tx.update(grads, state, p)
            results.append((out, oc.stats(state)[0]))
            new.append(state)
        return tuple(new), results

    run = jax.jit(lambda s, x, p: jax.lax.scan(body, s, (x, p))[1])
    return run(states, stream, params)
