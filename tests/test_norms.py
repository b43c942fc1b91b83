"""Measuring: global norms of every ord, dtype safety, odd trees, zero-safe grads."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
from tests.helpers import np_leaves, np_norm, random_tree


@pytest.mark.parametrize("ord", [1, 2, np.inf, "inf", 3, 0.5, 1.5])
@pytest.mark.parametrize("seed,n", [(0, 1), (1, 13)])
def test_global_norm_matches_numpy(ord, seed, n):
    tree = random_tree(seed, n)
    p = np.inf if ord == "inf" else float(ord)
    expected = np_norm(np_leaves(tree), p)
    np.testing.assert_allclose(oc.global_norm(tree, ord=ord), expected, rtol=2e-6)
    np.testing.assert_allclose(
        jax.jit(lambda t: oc.global_norm(t, ord=ord))(tree), expected, rtol=2e-6
    )


def test_float16_large_values_do_not_overflow():
    # sum of squares = 4 * 300**2 * 64 = 23_040_000 > float16 max (65504)
    tree = {
        "a": jnp.full((64,), 300.0, jnp.float16),
        "b": jnp.full((3, 64), -300.0, jnp.float16),
    }
    expected = 300.0 * np.sqrt(4 * 64)
    np.testing.assert_allclose(oc.global_norm(tree), expected, rtol=1e-6)
    assert not np.isfinite(float(optax.tree.norm(tree)))  # the failure we fix


def test_float16_tiny_values_do_not_underflow():
    tree = {"a": jnp.full((100,), 1e-4, jnp.float16)}
    value = float(np.float16(1e-4))
    np.testing.assert_allclose(oc.global_norm(tree), value * 10.0, rtol=1e-5)
    assert float(optax.tree.norm(tree)) == 0.0  # the failure we fix


def test_bfloat16_ten_million_ones():
    tree = {"w": jnp.ones((10_000_000,), jnp.bfloat16)}
    np.testing.assert_allclose(float(oc.global_norm(tree)), 3162.2777, rtol=1e-3)


def test_float32_overflowing_total_of_finite_leaf_sums_is_exact():
    # Each leaf's sum of squares (1e36) is finite; their total (6e38)
    # overflows float32, the norm (~2.4e19) does not.
    tree = [jnp.full((4,), 5e17, jnp.float32) for _ in range(600)]
    expected = np_norm(np_leaves(tree), 2.0)
    assert expected < np.finfo(np.float32).max
    assert float(expected) ** 2 > float(np.finfo(np.float32).max)
    np.testing.assert_allclose(oc.global_norm(tree), expected, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(oc.global_norm)(tree), expected, rtol=1e-5)


def test_float32_overflowing_powers_are_rescaled_for_other_orders():
    tree = [jnp.full((3,), 1e30, jnp.float32), jnp.array([2e30], jnp.float32)]
    for p in (3, 1.5, 10):
        expected = np_norm(np_leaves(tree), p)
        np.testing.assert_allclose(oc.global_norm(tree, ord=p), expected, rtol=1e-5)
    # |x|**10 overflows float32 from ~7e3: a realistic range for p = 10.
    tree = [jnp.full((5,), 8e3, jnp.float32), jnp.array([-2e4], jnp.float32)]
    expected = np_norm(np_leaves(tree), 10.0)
    np.testing.assert_allclose(oc.global_norm(tree, ord=10), expected, rtol=1e-5)


def test_one_tensor_above_two_to_the_64_reads_as_inf():
    # Documented limit: one tensor's own float32 sum of squares overflows.
    tree = [jnp.array([1e30], jnp.float32), jnp.ones((3,), jnp.float32)]
    assert np.isposinf(float(oc.global_norm(tree)))
    # The L1 norm of values near float32's maximum is above float32's range.
    assert np.isposinf(float(oc.global_norm([jnp.full((3,), 3e38)], ord=1)))


def test_genuine_inf_stays_inf_and_nan_stays_nonfinite():
    assert np.isposinf(float(oc.global_norm([jnp.array([1.0, np.inf])])))
    assert np.isnan(float(oc.global_norm([jnp.array([1.0, np.nan])])))
    # A maximum reads NaN as +inf: a maximum split across devices would
    # drop a NaN (see test_distributed), an infinite entry it keeps.
    assert np.isposinf(float(oc.global_norm([jnp.array([1.0, np.nan])], ord=np.inf)))


def test_odd_trees():
    tree = {
        "none": None,
        "masked": optax.MaskedNode(),
        "ints": jnp.array([100, 200]),
        "scalar": jnp.asarray(3.0),
        "complex": jnp.array([3 + 4j], jnp.complex64),
        "empty": jnp.zeros((0, 3)),
    }
    np.testing.assert_allclose(oc.global_norm(tree), np.sqrt(9 + 25), rtol=1e-6)
    assert float(oc.global_norm({})) == 0.0
    assert float(oc.global_norm([jnp.arange(3)])) == 0.0


def test_float64_accumulates_in_float64_under_x64():
    with jax.enable_x64(True):
        tree = [jnp.asarray([1.0, 1e-10], jnp.float64)]
        norm = oc.global_norm(tree)
        assert norm.dtype == jnp.float64
        np.testing.assert_allclose(norm, np.hypot(1.0, 1e-10), rtol=1e-15)
    assert oc.global_norm([jnp.ones(2, jnp.bfloat16)]).dtype == jnp.float32


@pytest.mark.parametrize("ord", [1, 2, np.inf, 3])
def test_zero_safe_derivative(ord):
    grad = jax.grad(lambda t: oc.global_norm(t, ord=ord))({"w": jnp.zeros(4)})
    assert np.all(np.isfinite(np.asarray(grad["w"])))


@pytest.mark.parametrize("bad", ["fro", 0, -1, np.nan, "two", None])
def test_bad_ord_raises(bad):
    with pytest.raises(ValueError, match="ord"):
        oc.global_norm([jnp.ones(2)], ord=bad)


def test_unitwise_norm_rejects_high_rank_without_axis():
    with pytest.raises(ValueError, match="axis"):
        oc.unitwise_norm(jnp.ones((1, 2, 1, 2, 1, 2)))


def test_unitwise_norm_float16_accumulates_in_float32():
    x = jnp.full((4, 3), 300.0, jnp.float16)
    np.testing.assert_allclose(oc.unitwise_norm(x), np.full((4, 3), 600.0), rtol=1e-6)


def _np_safe_scale(norm, bound, keep):
    # min(1, bound / norm): exactly 1 at or under the bound, 0 for an
    # infinite norm, NaN for a NaN norm; 0 wherever keep is False.
    with np.errstate(divide="ignore", invalid="ignore"):
        over = ~(norm <= bound)
        out = np.where(over, bound / norm, 1.0)
    return np.where(keep, out, 0.0) if keep is not None else out


@pytest.mark.parametrize("keep", [None, True, False])
def test_safe_scale_matches_numpy(keep):
    from optaxclip import _numerics

    norm = np.array([0.0, 0.5, 1.0, 2.0, 4.0, 1e30, np.inf, np.nan], np.float32)
    for bound in [0.0, 1.0, 3.0, np.inf]:
        got = _numerics.safe_scale(
            jnp.asarray(norm, jnp.float32),
            jnp.float32(bound),
            None if keep is None else jnp.asarray(keep),
        )
        expected = _np_safe_scale(norm.astype(np.float64), bound, keep).astype(
            np.float32
        )
        np.testing.assert_allclose(
            np.asarray(got), expected, rtol=1e-6, atol=0, equal_nan=True
        )
        # Exactly 1 where nothing is clipped (kept).
        if keep is not False:
            under = norm <= bound
            assert np.all(np.asarray(got)[under] == 1.0)
