"""The core step: stats decoded from stacked states, guard order, foreign states."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc


def test_records_stacked_by_scan_decode_per_step():
    tx = oc.clip_by_norm(1.0)
    grads = {"a": jnp.arange(1.0, 7.0).reshape(3, 2), "b": jnp.ones((3, 4))}

    def body(state, g):
        _, state = tx.update(g, state)
        return state, state

    _, states = jax.lax.scan(body, tx.init(jax.tree.map(lambda x: x[0], grads)), grads)
    stats = states.stats
    assert stats.norm.shape == (3, 2) and stats.count.shape == (3,)
    expected = np.stack(
        [
            np.linalg.norm(np.asarray(grads["a"]), axis=1),
            np.linalg.norm(np.asarray(grads["b"]), axis=1),
        ],
        axis=1,
    )
    np.testing.assert_allclose(np.asarray(stats.norm), expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(stats.count), [1, 2, 3])


def test_stats_are_found_inside_guards_in_tree_order():
    tx = oc.skip_nonfinite(optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1)))
    params = {"w": jnp.zeros(2)}
    _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
    inner, outer = oc.stats(state)
    assert float(inner.threshold) == 1.0 and float(outer.threshold) == np.inf
    assert float(inner.norm) == float(outer.norm) == 5.0


def test_a_state_of_another_transform_is_refused():
    tx = oc.clip_by_global_norm(1.0)
    other = oc.spam_clip().init({"w": jnp.zeros(2)})
    with pytest.raises(TypeError, match=r"expected its state \(ClipState\)"):
        tx.update({"w": jnp.ones(2)}, other)
