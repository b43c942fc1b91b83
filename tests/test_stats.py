"""The stats record (``optaxclip._stats``): readable fields, exact round trip.

A state reads as numbers: floats are floats, counts are integers, the step
counter is a plain integer field. Expected values are computed here from
the inputs (NumPy), never read back from the code under test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
from optaxclip import _stats


def write(record, norm, threshold, scale, clipped, finite, flags=None):
    return _stats.write_record(
        record,
        jnp.asarray(norm),
        jnp.asarray(threshold),
        jnp.asarray(scale),
        jnp.asarray(clipped),
        jnp.asarray(finite),
        None if flags is None else jnp.asarray(flags),
    )


@pytest.mark.parametrize("shape", [(), (0,), (1,), (5,)])
def test_record_round_trips_every_field_exactly(shape):
    rng = np.random.default_rng(0)
    norm = rng.normal(size=shape).astype(np.float32)
    threshold = rng.normal(size=shape).astype(np.float32)
    special = np.float32([np.nan, np.inf, -0.0, 1e-45, 3.0])
    scale = special[: norm.size].reshape(shape) if shape else special[0]
    record = _stats.empty_record(jnp.zeros(shape, jnp.float32), 0, 0)
    assert record.count.dtype == jnp.int32 and record.count.shape == ()
    assert record.counts.dtype == jnp.int32
    assert record.norm_threshold_scale.dtype == jnp.float32
    record = write(record, norm, threshold, scale, 3, False)
    record = write(record, norm, threshold, scale, 7, True)
    got = _stats.read_record(record)
    assert got.norm.shape == shape and got.norm.dtype == jnp.float32
    # bit-exact, NaN, -0.0 and a subnormal included
    for field, want in [("norm", norm), ("threshold", threshold), ("scale", scale)]:
        np.testing.assert_array_equal(
            np.asarray(getattr(got, field)).view(np.int32),
            np.asarray(want, np.float32).view(np.int32),
        )
    assert (int(got.clipped), int(got.nonfinite_count), int(got.count)) == (7, 1, 2)


def test_record_counts_are_exact_beyond_float32_integers():
    # Counters are integers: 2**24 + 1 steps would round in float32.
    record = _stats.empty_record(jnp.zeros(()), 0, 0)
    record = record._replace(count=jnp.asarray(2**24, jnp.int32))
    record = write(record, 1.0, 1.0, 1.0, 0, True)
    assert int(_stats.read_record(record).count) == 2**24 + 1


def test_record_keeps_float64_stats_under_x64():
    with jax.enable_x64(True):
        norm = jnp.asarray([1.0 + 2.0**-40, 1e300], jnp.float64)
        record = _stats.empty_record(jnp.zeros((2,), jnp.float64), 0, 0)
        assert record.norm_threshold_scale.dtype == jnp.float64
        record = write(record, norm, norm, jnp.ones(2, jnp.float64), 1, True)
        got = _stats.read_record(record)
        assert got.norm.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(got.norm), np.asarray(norm))
        assert got.count.dtype == jnp.int32


def test_nonfinite_flags_round_trip():
    record = _stats.empty_record(jnp.zeros(()), 3, 0)
    assert record.counts.shape == (5,)
    record = write(record, np.nan, 1.0, 0.0, 0, False, [False, True, False])
    got = _stats.read_record(record)
    np.testing.assert_array_equal(np.asarray(got.nonfinite_tensors), [0, 1, 0])
    assert got.nonfinite_tensors.dtype == jnp.bool_


def test_a_global_clip_state_reads_as_named_numbers():
    # What a checkpoint shows: plain arrays under names that say what they are.
    tx = oc.clip_by_global_norm(2.0)
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}
    _, state = tx.update(grads, tx.init(grads))
    assert state._fields == (
        "rule_state",
        "count",
        "norm_threshold_scale",
        "counts",
        "tensor_norms",
    )
    assert state.count.dtype == jnp.int32 and int(state.count) == 1
    np.testing.assert_allclose(
        np.asarray(state.norm_threshold_scale), [13.0, 2.0, 2.0 / 13.0], rtol=1e-6
    )
    # clipped, non-finite steps so far, then one non-finite flag per tensor
    np.testing.assert_array_equal(np.asarray(state.counts), [1, 0, 0, 0])
    assert state.tensor_norms == ()
    # No field holds the bits of another dtype: every float field is a float.
    leaves = jax.tree.leaves(state)
    assert {str(x.dtype) for x in leaves} == {"int32", "float32"}


@pytest.mark.parametrize(
    "make",
    [
        lambda: oc.clip_by_global_norm(1.0),
        lambda: oc.clip_by_norm(1.0),
        lambda: oc.clip_by_value(1.0),
        lambda: oc.zclip(),
        lambda: oc.adagc(),
        lambda: oc.spam_clip(),
        lambda: oc.stable_spam_clip(),
        lambda: oc.clippy(),
        lambda: oc.clip_per_example(1.0),
        lambda: oc.skip_nonfinite(optax.sgd(0.1)),
        lambda: oc.skip_spikes(optax.sgd(0.1)),
    ],
)
def test_every_state_has_a_plain_integer_step_counter(make):
    params = {"w": jnp.zeros((2, 3))}
    state = make().init(params)
    assert state.count.dtype == jnp.int32 and state.count.shape == ()
    assert state.counts.dtype == jnp.int32
    assert jnp.issubdtype(state.norm_threshold_scale.dtype, jnp.floating)


def test_stats_read_from_a_mapping_of_field_names():
    # A checkpoint restored without a template holds each state as a dict.
    tx = oc.clip_by_global_norm(1.0, per_tensor_stats=True)
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}
    _, state = tx.update(grads, tx.init(grads))
    as_dict = {"0": dict(zip(state._fields, state, strict=True))}
    (got,) = oc.stats(as_dict)
    assert float(got.norm) == pytest.approx(np.sqrt(26.0), rel=1e-6)
    np.testing.assert_allclose(np.asarray(got.tensor_norms), [5.0, 1.0], rtol=1e-6)
