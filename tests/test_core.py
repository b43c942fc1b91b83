"""The core step's stats record: packed into one array, read back exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
from optaxclip import _core


def write(record, norm, threshold, scale, clipped, finite):
    return _core.write_record(
        record,
        jnp.asarray(norm),
        jnp.asarray(threshold),
        jnp.asarray(scale),
        jnp.asarray(clipped),
        jnp.asarray(finite),
    )


@pytest.mark.parametrize("shape", [(), (0,), (1,), (5,)])
def test_record_round_trips_every_field_exactly(shape):
    rng = np.random.default_rng(0)
    norm = rng.normal(size=shape).astype(np.float32)
    threshold = rng.normal(size=shape).astype(np.float32)
    special = np.float32([np.nan, np.inf, -0.0, 1e-45, 3.0])
    scale = special[: norm.size].reshape(shape) if shape else special[0]
    record = _core.empty_record(jnp.zeros(shape, jnp.float32))
    assert record.ndim == 1 and record.dtype == jnp.int32
    record = write(record, norm, threshold, scale, 3, False)
    record = write(record, norm, threshold, scale, 7, True)
    got = _core.decode_record(record)
    assert got.norm.shape == shape and got.norm.dtype == jnp.float32
    # bit-exact, NaN, -0.0 and a subnormal included
    for field, want in [("norm", norm), ("threshold", threshold), ("scale", scale)]:
        np.testing.assert_array_equal(
            np.asarray(getattr(got, field)).view(np.int32),
            np.asarray(want, np.float32).view(np.int32),
        )
    assert (int(got.clipped), int(got.nonfinite_count), int(got.count)) == (7, 1, 2)


def test_record_counts_are_exact_beyond_float32_integers():
    # Counters are stored as integers: 2**24 + 1 steps would round in float32.
    record = _core.empty_record(jnp.zeros(()))
    record = record.at[2].set(2**24)
    record = write(record, 1.0, 1.0, 1.0, 0, True)
    assert int(_core.decode_record(record).count) == 2**24 + 1


def test_record_keeps_float64_stats_under_x64():
    with jax.enable_x64(True):
        norm = jnp.asarray([1.0 + 2.0**-40, 1e300], jnp.float64)
        record = _core.empty_record(jnp.zeros((2,), jnp.float64))
        assert record.dtype == jnp.int64
        record = write(record, norm, norm, jnp.ones(2, jnp.float64), 1, True)
        got = _core.decode_record(record)
        assert got.norm.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(got.norm), np.asarray(norm))
        assert got.count.dtype == jnp.int32


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
    other = oc.clippy().init({"w": jnp.zeros(2)})
    with pytest.raises(TypeError, match=r"expected its state \(ClipState\)"):
        tx.update({"w": jnp.ones(2)}, other)
