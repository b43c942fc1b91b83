"""Checkpointing the full optimizer state mid-run, clip and rule states included.

A run interrupted after some steps, saved, restored into a freshly built
template and continued for 20 steps matches the uninterrupted run bit for bit.
"""

from __future__ import annotations

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optaxclip as oc
from optaxclip import rules

BEFORE, AFTER = 6, 20
X = jnp.asarray(np.random.default_rng(0).standard_normal((16, 4)), jnp.float32)
Y = jnp.asarray(np.random.default_rng(1).standard_normal((16, 3)), jnp.float32)
# optax.adam mixes Python floats with int32 counts, which strict promotion rejects.
OPTAX_PROMOTION = jax.numpy_dtype_promotion("standard")


def make_tx():
    """Every rule, every kind of clip state, and a guard with history buffers."""
    return oc.skip_spikes(
        optax.chain(
            oc.clip_by_global_norm(rules.zscore(warmup=2)),
            oc.clip_by_norm(rules.percentile(50.0, window=4)),
            oc.clip_by_block_rms(rules.ema(warmup=2)),
            oc.clip_by_global_norm(rules.quantile(initial=1.0), per_tensor_stats=True),
            oc.adaptive_grad_clip(optax.linear_schedule(0.5, 0.1, 10)),
            optax.adam(1e-2),
        ),
        window=4,
        sigma=3.0,
        per_tensor_stats=True,
    )


def fresh():
    params = {"w": jnp.ones((4, 3), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}
    return {"params": params, "opt_state": make_tx().init(params)}


def loss_fn(params, t):
    noise = jnp.sin(t.astype(jnp.float32) * 1.7)  # varying gradient sizes
    pred = X @ params["w"] + params["b"][None, :]
    return (1.0 + 5.0 * noise**2) * jnp.mean((pred - Y) ** 2)


TX = make_tx()


@jax.jit
def step(train, t):
    loss, grads = jax.value_and_grad(loss_fn)(train["params"], t)
    updates, opt_state = TX.update(
        grads, train["opt_state"], train["params"], value=loss
    )
    return {
        "params": optax.apply_updates(train["params"], updates),
        "opt_state": opt_state,
    }


def run(train, start, stop):
    with OPTAX_PROMOTION:
        for t in range(start, stop):
            train = step(train, jnp.asarray(t, jnp.int32))
    return train


def assert_bitwise_equal(a, b):
    a_leaves, a_def = jax.tree.flatten(a)
    b_leaves, b_def = jax.tree.flatten(b)
    assert a_def == b_def
    for x, y in zip(a_leaves, b_leaves, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def uninterrupted():
    mid = run(fresh(), 0, BEFORE)
    return mid, run(mid, BEFORE, BEFORE + AFTER)


def check_continues(restored, uninterrupted):
    mid, end = uninterrupted
    assert_bitwise_equal(restored, mid)
    assert_bitwise_equal(run(restored, BEFORE, BEFORE + AFTER), end)
    # The saved state really carried learned statistics.
    initial = fresh()["opt_state"]
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)),
        mid["opt_state"],
        initial,
    )
    assert sum(jax.tree.leaves(changed)) > 10
    assert len(oc.stats(restored["opt_state"])) == 6


def test_orbax_round_trip_continues_bit_identically(tmp_path, uninterrupted):
    mid, _ = uninterrupted
    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, mid)
        checkpointer.wait_until_finished()
        template = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh())
        restored = checkpointer.restore(path, template)
    check_continues(restored, uninterrupted)


def test_flax_serialization_round_trip_continues_bit_identically(uninterrupted):
    mid, _ = uninterrupted
    data = flax.serialization.to_bytes(mid)
    restored = flax.serialization.from_bytes(fresh(), data)
    check_continues(restored, uninterrupted)


def test_state_dict_holds_only_arrays(uninterrupted):
    mid, _ = uninterrupted
    state_dict = flax.serialization.to_state_dict(mid)
    for leaf in jax.tree.leaves(state_dict):
        assert isinstance(leaf, jax.Array | np.ndarray), type(leaf)
