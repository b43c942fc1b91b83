"""Every drop-in returns what optax 0.2.x returns on finite input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
from tests.helpers import assert_trees_close, random_tree

# (dtype, rtol): float32 must match to 1e-6; bfloat16 to its own precision
# (optax scales in bfloat16, optaxclip in float32 and rounds once).
DTYPES = [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)]
CASES = [(seed, n) for seed, n in [(0, 1), (1, 7), (2, 50)]]


def _pairs():
    return [
        ("clip", lambda: oc.clip(0.3), lambda: optax.clip(0.3)),
        ("clip_by_value", lambda: oc.clip_by_value(0.3), lambda: optax.clip(0.3)),
        (
            "clip_by_global_norm",
            lambda: oc.clip_by_global_norm(1.5),
            lambda: optax.clip_by_global_norm(1.5),
        ),
        (
            "clip_by_block_rms",
            lambda: oc.clip_by_block_rms(0.5),
            lambda: optax.clip_by_block_rms(0.5),
        ),
        (
            "adaptive_grad_clip",
            lambda: oc.adaptive_grad_clip(0.05),
            lambda: optax.adaptive_grad_clip(0.05),
        ),
    ]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype,rtol", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("seed,n_leaves", CASES)
@pytest.mark.parametrize("name,ours,theirs", _pairs(), ids=[p[0] for p in _pairs()])
def test_drop_in_matches_optax(name, ours, theirs, seed, n_leaves, dtype, rtol, jit):
    grads = random_tree(seed, n_leaves, dtype, scale=2.0)
    params = (
        random_tree(seed + 100, n_leaves, dtype)
        if name == "adaptive_grad_clip"
        else None
    )
    # Same shapes for params as for grads (AGC needs matching units).
    if params is not None:
        params = jax.tree.map(
            lambda g, p: jnp.resize(p, g.shape).astype(g.dtype), grads, params
        )
    mine, theirs_tx = ours(), theirs()
    up_mine = jax.jit(mine.update) if jit else mine.update
    up_theirs = jax.jit(theirs_tx.update) if jit else theirs_tx.update
    expected, _ = up_theirs(grads, theirs_tx.init(grads), params)
    actual, _ = up_mine(grads, mine.init(grads if params is None else params), params)
    assert_trees_close(
        actual, expected, rtol=rtol, atol=1e-7 if dtype == jnp.float32 else 1e-2
    )


@pytest.mark.parametrize("name,ours,theirs", _pairs(), ids=[p[0] for p in _pairs()])
def test_drop_in_matches_optax_float64(name, ours, theirs):
    with jax.enable_x64(True):
        grads = random_tree(3, 20, jnp.float64, scale=3.0)
        params = jax.tree.map(lambda g: g * 2 + 1, grads)
        expected, _ = theirs().update(grads, theirs().init(grads), params)
        tx = ours()
        actual, state = tx.update(grads, tx.init(params), params)
        assert state.stats.norm.dtype == jnp.float64
        assert_trees_close(actual, expected, rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "shape", [(5,), (3, 4), (2, 3, 4), (2, 2, 3, 4), (2, 2, 2, 3, 4)]
)
def test_unitwise_norm_matches_optax(shape, seed):
    x = jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)
    np.testing.assert_allclose(
        oc.unitwise_norm(x), optax.transforms.unitwise_norm(x), rtol=1e-6
    )
    np.testing.assert_allclose(
        oc.unitwise_norm(x, axis=-1),
        optax.transforms.unitwise_norm(x, axis=-1),
        rtol=1e-6,
    )


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("bound", [0.0, 0.7, 2.5, np.inf])
def test_per_example_global_norm_clip_matches_optax(bound, jit):
    rng = np.random.default_rng(0)
    grads = [
        jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
        jnp.asarray(rng.normal(size=(6, 2, 2)), jnp.float32),
    ]
    grads[0] = grads[0].at[2].set(0.0)
    grads[1] = grads[1].at[2].set(0.0)
    ours = (
        jax.jit(oc.per_example_global_norm_clip)
        if jit
        else oc.per_example_global_norm_clip
    )
    expected = optax.per_example_global_norm_clip(grads, bound)
    actual = ours(grads, bound)
    assert_trees_close(actual[0], expected[0], rtol=1e-6, atol=1e-7)
    assert int(actual[1]) == int(expected[1])


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("bound", [0.0, 1.0, 4.0])
def test_per_example_layer_norm_clip_matches_optax(bound, uniform):
    rng = np.random.default_rng(1)
    grads = [
        jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
        jnp.asarray(rng.normal(size=(5, 3, 3)), jnp.float32),
        jnp.asarray(rng.normal(size=(5,)), jnp.float32),
    ]
    expected = optax.per_example_layer_norm_clip(grads, bound, uniform)
    actual = oc.per_example_layer_norm_clip(grads, bound, uniform)
    assert_trees_close(actual[0], expected[0], rtol=1e-6, atol=1e-7)
    assert [int(c) for c in actual[1]] == [int(c) for c in expected[1]]


def test_per_example_doctest_values_match_optax_on_integer_input():
    grads = [jnp.array([[0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]])]
    for bound in (jnp.inf, 0.0, 1.25):
        with jax.numpy_dtype_promotion("standard"):  # optax promotes int to float
            expected = optax.per_example_global_norm_clip(grads, bound)
        actual = oc.per_example_global_norm_clip(grads, bound)
        assert_trees_close(actual[0], expected[0])
        assert int(actual[1]) == int(expected[1])


@pytest.mark.parametrize(
    "name,ours,theirs",
    [
        (
            "global",
            oc.clip_by_global_norm(1.0, nonfinite="propagate"),
            optax.clip_by_global_norm(1.0),
        ),
        ("value", oc.clip(0.5, nonfinite="propagate"), optax.clip(0.5)),
        (
            "block_rms",
            oc.clip_by_block_rms(0.5, nonfinite="propagate"),
            optax.clip_by_block_rms(0.5),
        ),
    ],
)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_propagate_equals_optax_on_nonfinite(name, ours, theirs, bad):
    grads = {"a": jnp.array([1.0, 2.0, bad]), "b": jnp.array([[0.5, -3.0]])}
    expected, _ = theirs.update(grads, theirs.init(grads))
    actual, state = ours.update(grads, ours.init(grads))
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
    assert int(state.stats.nonfinite_count) == 1


def _per_leaf(transform):
    """optax semantics of a per-tensor clip: ``transform`` applied to each leaf."""

    def update(grads):
        return jax.tree.map(lambda g: transform.update(g, transform.init(g))[0], grads)

    return update


# Every scope's "propagate" against optax (clip_by_norm against optax's global
# clip applied to each leaf, the per-tensor semantics optax would give).
PROPAGATE = [
    (
        "clip_by_global_norm",
        lambda: oc.clip_by_global_norm(1.0, nonfinite="propagate"),
        lambda g, p: optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0],
    ),
    (
        "clip_by_norm",
        lambda: oc.clip_by_norm(1.0, nonfinite="propagate"),
        lambda g, p: _per_leaf(optax.clip_by_global_norm(1.0))(g),
    ),
    (
        "clip_by_block_rms",
        lambda: oc.clip_by_block_rms(0.5, nonfinite="propagate"),
        lambda g, p: optax.clip_by_block_rms(0.5).update(g, optax.EmptyState())[0],
    ),
    (
        "clip",
        lambda: oc.clip(0.5, nonfinite="propagate"),
        lambda g, p: optax.clip(0.5).update(g, optax.EmptyState())[0],
    ),
    (
        "adaptive_grad_clip",
        lambda: oc.adaptive_grad_clip(0.1, nonfinite="propagate"),
        lambda g, p: optax.adaptive_grad_clip(0.1).update(g, optax.EmptyState(), p)[0],
    ),
]
# A bad entry in a vector (its only unit), in one unit of a matrix, and in a
# matrix whose other units are clipped or not.
BAD_TREES = {
    "vector": lambda bad: {
        "a": jnp.array([1.0, 2.0, bad]),
        "b": jnp.array([[0.5, -3.0]]),
    },
    "one_unit": lambda bad: {
        "w": jnp.array([[1.0, 20.0, 0.1], [bad, -3.0, 0.2]]),
        "v": jnp.array([0.3, -0.4]),
    },
    "scalar": lambda bad: {
        "s": jnp.array(bad),
        "m": jnp.array([[4.0, 0.0], [1.0, 1.0]]),
    },
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("tree", sorted(BAD_TREES))
@pytest.mark.parametrize("name,ours,theirs", PROPAGATE, ids=[p[0] for p in PROPAGATE])
def test_every_scope_propagates_like_optax(name, ours, theirs, tree, bad, jit):
    grads = BAD_TREES[tree](bad)
    params = jax.tree.map(lambda g: jnp.full_like(g, 2.0), grads)
    tx = ours()
    update = jax.jit(tx.update) if jit else tx.update
    actual, state = update(grads, tx.init(params), params)
    expected = theirs(grads, params)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        # NaN and +-inf exactly where optax has them; finite values to 1e-6.
        np.testing.assert_array_equal(np.isnan(a), np.isnan(e))
        np.testing.assert_array_equal(a[np.isinf(e)], e[np.isinf(e)])
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=0)
    assert int(state.stats.nonfinite_count) == 1


def test_agc_propagates_nan_to_the_whole_unit():
    # optax rescales a unit whose norm is NaN (NaN / NaN): every entry is NaN.
    grads = {"g": jnp.array([1.0, 2.0, np.nan])}
    params = {"g": jnp.ones(3)}
    tx = oc.adaptive_grad_clip(0.1, nonfinite="propagate")
    out, _ = tx.update(grads, tx.init(params), params)
    assert np.isnan(np.asarray(out["g"])).all()
    tx = oc.adaptive_grad_clip(0.1)  # the default policy zeroes the step
    out, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(out["g"], np.zeros(3))
    assert int(state.stats.clipped) == 0  # a NaN unit is not counted as clipped


# ---------------------------------------------------------------------------
# The stateless idiom: ``tx.update(grads, None)`` as optax users write it
# ---------------------------------------------------------------------------


def _stateless_pairs():
    # Each drop-in with a number and with a schedule, beside optax with the
    # schedule's value at step 0 (a fresh state reads the schedule there).
    schedule = optax.linear_schedule(1.5, 0.1, 10)
    return _pairs() + [
        (
            "clip_by_global_norm_schedule",
            lambda: oc.clip_by_global_norm(schedule),
            lambda: optax.clip_by_global_norm(1.5),
        ),
        (
            "clip_schedule",
            lambda: oc.clip(optax.constant_schedule(0.3)),
            lambda: optax.clip(0.3),
        ),
    ]


def _np_clip_by_norm(grads, bound):
    out = {}
    for k, g in grads.items():
        a = np.asarray(g, np.float64)
        norm = np.sqrt(np.sum(a**2))
        out[k] = (a * min(1.0, bound / norm) if norm > 0 else a).astype(np.float32)
    return out


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("empty", [None, optax.EmptyState()], ids=["None", "Empty"])
@pytest.mark.parametrize(
    "name,ours,theirs", _stateless_pairs(), ids=[p[0] for p in _stateless_pairs()]
)
def test_drop_in_accepts_stateless_idiom(name, ours, theirs, empty, jit):
    grads = random_tree(1, 7, jnp.float32, scale=2.0)
    params = jax.tree.map(lambda g: 2 * g + 1, grads)
    mine, theirs_tx = ours(), theirs()
    expected, _ = theirs_tx.update(grads, empty, params)
    update = jax.jit(mine.update) if jit else mine.update
    actual, state = update(grads, empty, params)
    assert_trees_close(actual, expected, rtol=1e-6, atol=1e-7)
    # The returned state is a fresh one after one step, ready to be kept.
    assert int(oc.stats(state)[0].count) == 1


@pytest.mark.parametrize("empty", [None, optax.EmptyState()], ids=["None", "Empty"])
def test_clip_by_norm_accepts_stateless_idiom(empty):
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[0.1, -0.2]])}
    actual, _ = oc.clip_by_norm(1.0).update(grads, empty)
    expected = _np_clip_by_norm(grads, 1.0)
    for k in grads:
        np.testing.assert_allclose(actual[k], expected[k], rtol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: oc.clip_by_global_norm(oc.rules.percentile(10.0)),
        lambda: oc.clip_by_norm(oc.rules.ema()),
        lambda: oc.clip_by_value(oc.rules.zscore()),
        lambda: oc.clip_by_block_rms(oc.rules.quantile()),
        lambda: oc.adaptive_grad_clip(oc.rules.ema()),
        lambda: oc.zclip(),
        lambda: oc.autoclip(),
    ],
)
@pytest.mark.parametrize("empty", [None, optax.EmptyState()], ids=["None", "Empty"])
def test_learning_rule_refuses_stateless_idiom(make, empty):
    grads = {"w": jnp.array([[3.0, 4.0]])}
    with pytest.raises(ValueError, match="learns from the norms of earlier steps"):
        make().update(grads, empty, grads)
