"""Per-example (DP-SGD) clipping, checked against NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

import optaxclip as oc
from optaxclip import rules
from tests.helpers import learning_rule_names

ADAPTIVE = learning_rule_names()


def per_example_tree(batch: int, seed: int = 0, scale: float = 1.0) -> dict:
    """Leaves of rank 0, 1 and 3 per example, all with a leading batch axis."""
    rng = np.random.default_rng(seed)
    shapes = {"s": (), "v": (3,), "t": (2, 1, 3)}
    return {
        k: jnp.asarray(
            scale
            * rng.standard_normal((batch, *s))
            * rng.uniform(0.1, 3, (batch,) + (1,) * len(s)),
            jnp.float32,
        )
        for k, s in shapes.items()
    }


def np_clip_sum(tree: dict, bound: float):
    """Reference: each example scaled by min(1, C / |g_b|), summed over b."""
    arrays = {k: np.asarray(v, np.float64) for k, v in tree.items()}
    batch = next(iter(arrays.values())).shape[0]
    sq = sum(np.sum(v.reshape(batch, -1) ** 2, axis=1) for v in arrays.values())
    norms = np.sqrt(sq)
    mult = np.minimum(1.0, bound / np.where(norms > 0, norms, 1.0))
    mult = np.where(norms > 0, mult, 1.0)
    summed = {k: np.tensordot(mult, v, axes=1) for k, v in arrays.items()}
    return summed, norms, mult


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("batch", [1, 2, 7, 1024])
def test_clip_per_example_matches_numpy(batch):
    tree = per_example_tree(batch, seed=batch)
    params = jax.tree.map(lambda x: x[0], tree)
    tx = oc.clip_per_example(1.5)
    summed, state = jax.jit(tx.update)(tree, tx.init(params))
    ref, norms, mult = np_clip_sum(tree, 1.5)
    for k in tree:
        assert summed[k].shape == tree[k].shape[1:]
        assert summed[k].dtype == tree[k].dtype
        assert_close(summed[k], ref[k], rtol=1e-5, atol=1e-5)
    assert int(state.stats.clipped) == int(np.sum(norms > 1.5))
    assert_close(state.stats.norm, np.mean(norms))
    assert_close(state.stats.scale, np.mean(mult))
    assert int(state.stats.count) == 1


def test_clip_per_example_matches_optax_and_drop_in():
    tree = per_example_tree(16, seed=3)
    grads = [tree["s"], tree["v"], tree["t"]]
    tx = oc.clip_per_example(0.8)
    summed, state = tx.update(grads, tx.init(None))
    ref_sum, ref_n = optax.per_example_global_norm_clip(grads, 0.8)
    ours_sum, ours_n = oc.per_example_global_norm_clip(grads, 0.8)
    for a, b, c in zip(summed, ref_sum, ours_sum, strict=True):
        assert_close(a, np.asarray(b))
        assert_close(c, np.asarray(b))
    assert int(state.stats.clipped) == int(ref_n) == int(ours_n)


def test_layer_norm_clip_matches_optax():
    tree = per_example_tree(8, seed=4)
    grads = [tree["v"], tree["t"]]
    for uniform in (True, False):
        ours, ours_n = oc.per_example_layer_norm_clip(grads, 1.0, uniform=uniform)
        ref, ref_n = optax.per_example_layer_norm_clip(grads, 1.0, uniform=uniform)
        for a, b in zip(ours, ref, strict=True):
            assert_close(a, np.asarray(b))
        assert [int(n) for n in ours_n] == [int(n) for n in ref_n]


def test_vmap_grad_of_a_model_under_jit():
    """Per-example gradients of a linear model, clipped and summed."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((32, 5)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((32,)), jnp.float32)
    params = {"w": jnp.asarray(rng.standard_normal(5), jnp.float32), "b": jnp.zeros(())}

    def loss(p, xi, yi):
        return 0.5 * (xi @ p["w"] + p["b"] - yi) ** 2

    tx = optax.chain(oc.clip_per_example(0.5), optax.scale(1.0 / 32), optax.sgd(0.1))

    @jax.jit
    def step(params, state):
        per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
        updates, state = tx.update(per_example, state, params)
        return optax.apply_updates(params, updates), state

    new_params, state = step(params, tx.init(params))
    # NumPy: residual r_b, gradient (r_b x_b, r_b).
    w, xs, ys = (np.asarray(a, np.float64) for a in (params["w"], x, y))
    r = xs @ w - ys
    per = {"w": r[:, None] * xs, "b": r}
    ref, _, _ = np_clip_sum(per, 0.5)
    assert_close(new_params["w"], w - 0.1 * ref["w"] / 32)
    assert_close(new_params["b"], -0.1 * ref["b"] / 32)
    (s,) = oc.stats(state)
    assert int(s.clipped) == int(
        np.sum(np.abs(r) * np.sqrt(np.sum(xs**2, 1) + 1) > 0.5)
    )


def test_equals_dp_aggregate_without_noise():
    """clip_per_example + scale(1/B) is DP aggregation with no noise."""
    tree = per_example_tree(8, seed=5)
    params = jax.tree.map(lambda x: x[0], tree)
    ours = optax.chain(oc.clip_per_example(1.0), optax.scale(1.0 / 8))
    dp = optax.contrib.differentially_private_aggregate(1.0, 0.0, key=jax.random.key(0))
    u_ours, _ = ours.update(tree, ours.init(params))
    u_dp, _ = dp.update(tree, dp.init(params))
    for k in tree:
        assert_close(u_ours[k], np.asarray(u_dp[k]))


def test_schedule_threshold_follows_the_step():
    tree = per_example_tree(4, seed=6, scale=10.0)
    schedule = optax.linear_schedule(2.0, 0.5, 3)
    tx = oc.clip_per_example(schedule)
    state = tx.init(None)
    step = jax.jit(tx.update)
    for t in range(4):
        summed, state = step(tree, state)
        ref, _, _ = np_clip_sum(tree, float(schedule(t)))
        assert_close(summed["v"], ref["v"])
        assert_close(state.stats.threshold, float(schedule(t)))


def np_quantile(norms_per_step, target, lr, initial):
    """Andrew et al. 2021: C <- C * exp(-lr * (frac(norm <= C) - target))."""
    c, bounds = initial, []
    for norms in norms_per_step:
        bounds.append(c)
        c = c * np.exp(-lr * (np.mean(norms <= c) - target))
    return bounds, c


def test_quantile_rule_is_andrew_et_al():
    trees = [
        per_example_tree(64, seed=10 + t, scale=s)
        for t, s in enumerate([1, 2, 4, 0.5, 3])
    ]
    rule = rules.quantile(target=0.3, learning_rate=0.5, initial=0.2)
    tx = oc.clip_per_example(rule)
    state = tx.init(None)
    step = jax.jit(tx.update)
    norms_per_step = [np_clip_sum(t, 0.0)[1] for t in trees]
    bounds, final = np_quantile(norms_per_step, 0.3, 0.5, 0.2)
    for tree, bound in zip(trees, bounds, strict=True):
        summed, state = step(tree, state)
        ref, _, _ = np_clip_sum(tree, bound)
        assert_close(state.stats.threshold, bound)
        assert_close(summed["t"], ref["t"], rtol=1e-4, atol=1e-5)
    assert_close(state.rule_state, final)
    # The bound moved towards the 30% quantile of the last norms.
    assert final != pytest.approx(0.2)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_every_rule_learns_a_scalar_bound(name):
    """Rules that are not batch-aware learn from the mean per-example norm."""
    rule = getattr(rules, name)()
    tx = oc.clip_per_example(rule)
    state = tx.init(None)
    rule_state = rule.init(jnp.zeros((), jnp.float32))
    step = jax.jit(tx.update)
    for t in range(4):
        tree = per_example_tree(8, seed=20 + t, scale=1.0 + t)
        summed, state = step(tree, state)
        assert state.stats.threshold.shape == ()
        ref_sum, norms, _ = np_clip_sum(tree, float(state.stats.threshold))
        assert_close(summed["v"], ref_sum["v"])
        if name == "quantile":
            seen = jnp.asarray(norms, jnp.float32)
        else:
            seen = jnp.asarray(np.mean(norms), jnp.float32)
        threshold, rule_state = rule.update(rule_state, seen, jnp.asarray(t, jnp.int32))
        assert_close(state.stats.threshold, np.maximum(np.asarray(threshold), 0))
        jax.tree.map(
            lambda a, b: assert_close(a, np.asarray(b)), state.rule_state, rule_state
        )


def test_nonfinite_example_is_dropped_and_rule_untouched():
    tree = per_example_tree(4, seed=7)
    bad = {k: v.at[2].set(jnp.nan) if k == "v" else v for k, v in tree.items()}
    tx = oc.clip_per_example(rules.quantile(initial=1.0))
    state0 = tx.init(None)
    summed, state = tx.update(bad, state0)
    keep = {k: np.delete(np.asarray(v, np.float64), 2, axis=0) for k, v in tree.items()}
    ref, _, _ = np_clip_sum(keep, 1.0)
    for k in tree:
        assert_close(summed[k], ref[k])
    assert int(state.stats.nonfinite_count) == 1
    assert_close(state.rule_state, np.asarray(state0.rule_state))
    summed, _ = oc.clip_per_example(1.0, nonfinite="propagate").update(bad, state0)
    assert np.isnan(np.asarray(summed["v"])).any()


def test_integer_leaves_untouched_and_empty_float_tree():
    tree = {"g": jnp.ones((3, 2)), "i": jnp.arange(3)}
    tx = oc.clip_per_example(1.0)
    summed, _ = tx.update(tree, tx.init(None))
    np.testing.assert_array_equal(np.asarray(summed["i"]), np.arange(3))
    assert_close(summed["g"], np.full(2, 3 / np.sqrt(2)))


def test_missing_batch_axis_names_the_leaf():
    tree = {"a": jnp.zeros((4, 3)), "b": {"c": jnp.zeros((5, 3))}}
    tx = oc.clip_per_example(1.0)
    with pytest.raises(ValueError, match=r"\['b'\]\['c'\].*\(5, 3\)"):
        tx.update(tree, tx.init(None))
    with pytest.raises(ValueError, match=r"\['a'\].*\(4, 3\)"):
        oc.per_example_global_norm_clip(tree, 1.0)
    with pytest.raises(ValueError, match=r"\['b'\]\['c'\]"):
        oc.per_example_layer_norm_clip(tree, 1.0)
    with pytest.raises(ValueError, match=r"\['s'\].*\(\)"):
        tx.update({"s": jnp.zeros(())}, tx.init(None))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="l2_norm_clip.*-1"):
        oc.clip_per_example(-1.0)
    with pytest.raises(ValueError, match="nonfinite.*'skip'"):
        oc.clip_per_example(1.0, nonfinite="skip")


def _huge_float64_batch():
    """float64 per-example gradients; example 1's norm (~1e30) overflows float32."""
    rng = np.random.default_rng(11)
    a = rng.standard_normal((4, 3))
    b = rng.standard_normal((4, 2, 2))
    a[1] *= 1e30
    b[1] *= 1e30
    b[3] *= 1e-30  # and one whose squares underflow float32
    return a, b


def test_float64_examples_are_measured_in_float64_under_x64():
    a, b = _huge_float64_batch()
    with jax.enable_x64(True):
        grads = [jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)]
        ref, norms, _ = np_clip_sum({"a": a, "b": b}, 1.5)
        assert norms[1] > 1e29 and norms[1] < np.inf  # beyond float32, not inf
        theirs, theirs_n = optax.per_example_global_norm_clip(grads, 1.5)
        for fn in (
            oc.per_example_global_norm_clip,
            jax.jit(oc.per_example_global_norm_clip),
        ):
            summed, n = fn(grads, 1.5)
            for got, want, opt in zip(
                summed, (ref["a"], ref["b"]), theirs, strict=True
            ):
                assert got.dtype == jnp.float64
                np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)
                np.testing.assert_allclose(np.asarray(got), np.asarray(opt), rtol=1e-12)
            # The huge example is clipped to the bound, not dropped.
            assert int(n) == int(theirs_n) == int(np.sum(norms > 1.5))

        tx = oc.clip_per_example(1.5)
        params = [g[0] for g in grads]
        summed, state = jax.jit(tx.update)(grads, tx.init(params))
        assert state.stats.norm.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(summed[0]), ref["a"], rtol=1e-12)
        np.testing.assert_allclose(np.asarray(summed[1]), ref["b"], rtol=1e-12)
        np.testing.assert_allclose(float(state.stats.norm), np.mean(norms), rtol=1e-12)
        assert int(state.stats.nonfinite_count) == 0
        # Initialized without params (float32 state), the float64 batch is
        # still measured in float64.
        summed, _ = tx.update(grads, tx.init(None))
        np.testing.assert_allclose(np.asarray(summed[0]), ref["a"], rtol=1e-12)


@pytest.mark.parametrize("uniform", [True, False])
def test_float64_layer_clip_is_measured_in_float64_under_x64(uniform):
    a, b = _huge_float64_batch()
    with jax.enable_x64(True):
        grads = [jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)]
        theirs, theirs_n = optax.per_example_layer_norm_clip(grads, 2.0, uniform)
        ours, ours_n = oc.per_example_layer_norm_clip(grads, 2.0, uniform)
        sizes = np.array([3, 4])
        bounds = (
            2.0 / np.sqrt([2, 2]) if uniform else 2.0 * np.sqrt(sizes / sizes.sum())
        )
        expected_n = []
        for got, opt, x, bound in zip(ours, theirs, (a, b), bounds, strict=True):
            ref, norms, _ = np_clip_sum({"x": x}, bound)
            assert got.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(got), ref["x"], rtol=1e-12)
            np.testing.assert_allclose(np.asarray(got), np.asarray(opt), rtol=1e-12)
            expected_n.append(int(np.sum(norms > bound)))
        assert [int(n) for n in ours_n] == [int(n) for n in theirs_n] == expected_n


@pytest.mark.parametrize("empty", [None, optax.EmptyState()], ids=["None", "Empty"])
def test_clip_per_example_accepts_stateless_idiom(empty):
    rng = np.random.default_rng(11)
    grads = {"w": jnp.asarray(rng.standard_normal((4, 3, 2)), jnp.float32)}
    summed, state = oc.clip_per_example(1.0).update(grads, empty)
    expected, _ = optax.per_example_global_norm_clip([grads["w"]], 1.0)
    np.testing.assert_allclose(summed["w"], expected[0], rtol=1e-6)
    assert int(state.stats.count) == 1
    with pytest.raises(ValueError, match="learns from the norms of earlier steps"):
        oc.clip_per_example(oc.rules.quantile()).update(grads, empty)
