"""The scope transforms: properties, numerics, non-finite policy, hyperparameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optaxclip as oc
from tests.helpers import np_leaves, np_norm, random_tree, run

# ---------------------------------------------------------------------------
# Properties (hypothesis)
# ---------------------------------------------------------------------------

trees = st.builds(
    lambda seed, n, scale, dtype: random_tree(seed, n, dtype, scale),
    seed=st.integers(0, 10_000),
    n=st.integers(1, 6),
    scale=st.sampled_from([1e-3, 0.3, 1.0, 10.0, 1e3]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
)
thresholds = st.sampled_from([0.0, 1e-3, 0.5, 1.0, 7.0, 1e4])
ords = st.sampled_from([1, 2, np.inf, 3])


def _tol(tree):
    # Rounding the rescaled entries back to a 16-bit dtype moves each entry by
    # up to half an ulp, so the norm can exceed the bound by that much.
    dtypes = {x.dtype for x in jax.tree.leaves(tree)}
    return 1e-5 if dtypes == {jnp.dtype(jnp.float32)} else 8e-3


def _tensor_norms(tree, p):
    return [np_norm([a], p) for a in np_leaves(tree)]


@settings(max_examples=30)
@given(tree=trees, threshold=thresholds, ord=ords)
def test_global_norm_bounded_direction_kept(tree, threshold, ord):
    out, state = run(oc.clip_by_global_norm(threshold, ord=ord), tree)
    p = float(ord)
    before, after = np_norm(np_leaves(tree), p), np_norm(np_leaves(out), p)
    assert after <= threshold * (1 + _tol(tree)) + 1e-30
    np.testing.assert_allclose(float(state.stats.norm), before, rtol=2e-5)
    if before <= threshold:  # below the bound: unchanged, bit for bit
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(tree), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:  # one common factor: the direction is unchanged
        scale = float(state.stats.scale)
        np.testing.assert_allclose(scale, threshold / before, rtol=2e-5)
        for a, b in zip(np_leaves(out), np_leaves(tree), strict=True):
            np.testing.assert_allclose(
                a,
                b * scale,
                rtol=_tol(tree),
                atol=1e-30 + _tol(tree) * np.abs(b).max(initial=0) * scale,
            )
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(tree), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape


@settings(max_examples=30)
@given(tree=trees, threshold=thresholds, ord=ords)
def test_per_tensor_bounded_and_idempotent(tree, threshold, ord):
    tx = oc.clip_by_norm(threshold, ord=ord)
    out, state = run(tx, tree)
    p = float(ord)
    before = _tensor_norms(tree, p)
    np.testing.assert_allclose(np.asarray(state.stats.norm), before, rtol=2e-5)
    for n_after, n_before in zip(_tensor_norms(out, p), before, strict=True):
        assert (
            n_after <= max(threshold, 0.0) * (1 + _tol(tree)) + 1e-30
            or n_after <= n_before
        )
        assert n_after <= threshold * (1 + _tol(tree)) + 1e-30
    twice, _ = run(tx, out)
    for a, b in zip(np_leaves(twice), np_leaves(out), strict=True):
        np.testing.assert_allclose(a, b, rtol=_tol(tree), atol=1e-30)
    assert int(state.stats.clipped) == sum(b > threshold for b in before)


@settings(max_examples=25)
@given(tree=trees, threshold=thresholds)
def test_value_and_block_rms_bounded_idempotent(tree, threshold):
    out, state = run(oc.clip_by_value(threshold), tree)
    largest = max(np.abs(a).max(initial=0) for a in np_leaves(tree))
    np.testing.assert_allclose(float(state.stats.norm), largest, rtol=1e-6)
    assert all(
        np.abs(a).max(initial=0) <= threshold * (1 + 1e-3) for a in np_leaves(out)
    )
    twice, _ = run(oc.clip_by_value(threshold), out)
    for a, b in zip(jax.tree.leaves(twice), jax.tree.leaves(out), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    out, state = run(oc.clip_by_block_rms(threshold), tree)
    for a in np_leaves(out):
        rms = np.sqrt(np.mean(np.abs(a) ** 2)) if a.size else 0.0
        assert rms <= threshold * (1 + _tol(tree)) + 1e-30


@settings(max_examples=25)
@given(tree=trees, clipping=st.sampled_from([0.0, 0.01, 0.1, 1.0]))
def test_agc_bounded_unitwise(tree, clipping):
    params = jax.tree.map(lambda x: (x * 3 + 1).astype(x.dtype), tree)
    out, _ = run(oc.adaptive_grad_clip(clipping), tree, params)
    for g, w in zip(jax.tree.leaves(out), jax.tree.leaves(params), strict=True):
        g_unit = np.asarray(oc.unitwise_norm(g))
        w_unit = np.maximum(np.asarray(oc.unitwise_norm(w)), 1e-3)
        assert np.all(g_unit <= clipping * w_unit * (1 + _tol(tree)) + 1e-30)


# ---------------------------------------------------------------------------
# Numerics where optax fails
# ---------------------------------------------------------------------------


def test_float16_overflowing_square_is_clipped_not_zeroed():
    grads = {"w": jnp.full((256,), 300.0, jnp.float16)}
    out, state = run(oc.clip_by_global_norm(1.0), grads)
    np.testing.assert_allclose(float(state.stats.norm), 300.0 * 16, rtol=1e-6)
    np.testing.assert_allclose(np_norm(np_leaves(out)), 1.0, rtol=2e-3)
    zeroed, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    assert float(jnp.abs(zeroed["w"]).max()) == 0.0  # optax zeroes it


def test_float16_tiny_gradients_get_their_norm():
    grads = {"w": jnp.full((100,), 1e-4, jnp.float16)}
    out, state = run(oc.clip_by_global_norm(1e-4), grads)
    np.testing.assert_allclose(
        float(state.stats.norm), float(np.float16(1e-4)) * 10, rtol=1e-5
    )
    np.testing.assert_allclose(np_norm(np_leaves(out)), 1e-4, rtol=2e-3)


@pytest.mark.parametrize(
    "make",
    [
        lambda t: oc.clip_by_global_norm(t),
        lambda t: oc.clip_by_norm(t),
        lambda t: oc.clip_by_value(t),
        lambda t: oc.clip_by_block_rms(t),
        lambda t: oc.clip_by_global_norm(t, ord=3),
    ],
    ids=["global", "tensor", "value", "block_rms", "global_p3"],
)
@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_zero_gradient_and_zero_threshold_no_nan(make, threshold):
    tx = make(threshold)
    zeros = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    out, state = run(tx, zeros)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(out))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))

    def loss(w):
        updates, _ = tx.update({"w": w, "b": jnp.zeros(2)}, tx.init(zeros))
        return jnp.sum(updates["w"] ** 2) + jnp.sum(updates["w"])

    grad = jax.grad(loss)(jnp.zeros((3, 2)))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_global_clip_of_an_overflowing_total_keeps_the_direction():
    # 600 leaves whose float32 sums of squares are finite but whose total
    # overflows: the update is rescaled to the bound, not zeroed.
    tree = {f"l{i:03d}": jnp.full((4,), 5e17 * (1 + i % 3)) for i in range(600)}
    ref = np_leaves(tree)
    norm = np_norm(ref, 2.0)
    out, state = run(oc.clip_by_global_norm(2.0), tree)
    np.testing.assert_allclose(float(state.stats.norm), norm, rtol=1e-5)
    assert int(state.stats.nonfinite_count) == 0
    for got, want in zip(np_leaves(out), ref, strict=True):
        np.testing.assert_allclose(got, want * (2.0 / norm), rtol=1e-5)


@pytest.mark.parametrize(
    "make", [oc.clip_by_global_norm, oc.clip_by_norm], ids=["global", "tensor"]
)
def test_one_tensor_norm_beyond_two_to_the_64_is_a_nonfinite_step(make):
    # Documented limit: this tensor's own float32 sum of squares overflows.
    tree = {"w": jnp.array([1e30, 1.0]), "b": jnp.ones(3)}
    out, state = run(make(1.0), tree)
    assert int(state.stats.nonfinite_count) == 1
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(out))


def test_infinite_threshold_leaves_every_scope_unclipped():
    tree = {"w": jnp.array([[3e10, -4.0], [1.0, 2.0]]), "b": jnp.array([0.5])}
    for make in (oc.clip_by_global_norm, oc.clip_by_norm, oc.clip_by_block_rms):
        out, state = run(make(float("inf")), tree)
        for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(tree), strict=True):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(np.asarray(state.stats.scale), 1.0)


def test_zero_threshold_zeroes_nonzero_gradient():
    out, state = run(oc.clip_by_global_norm(0.0), {"w": jnp.array([3.0, 4.0])})
    np.testing.assert_array_equal(np.asarray(out["w"]), [0.0, 0.0])
    assert float(state.stats.scale) == 0.0


def test_grad_through_agc_of_zero_gradient_is_finite():
    params = {"w": jnp.ones((3, 2))}
    tx = oc.adaptive_grad_clip(0.1)
    grad = jax.grad(
        lambda g: jnp.sum(tx.update({"w": g}, tx.init(params), params)[0]["w"])
    )(jnp.zeros((3, 2)))
    assert np.all(np.isfinite(np.asarray(grad)))


# ---------------------------------------------------------------------------
# Odd trees
# ---------------------------------------------------------------------------

ALL_SCOPES = [
    ("global", lambda: oc.clip_by_global_norm(1.0)),
    ("tensor", lambda: oc.clip_by_norm(1.0)),
    ("value", lambda: oc.clip_by_value(1.0)),
    ("block_rms", lambda: oc.clip_by_block_rms(1.0)),
    ("agc", lambda: oc.adaptive_grad_clip(0.1)),
]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name,make", ALL_SCOPES, ids=[s[0] for s in ALL_SCOPES])
def test_odd_trees(name, make, jit):
    tree = {
        "none": None,
        "masked": optax.MaskedNode(),
        "ints": jnp.array([100, -200]),
        "scalar": jnp.asarray(30.0),
        "complex": jnp.array([[3 + 4j, 0j]], jnp.complex64),
        "bf16": jnp.full((2, 2), 5.0, jnp.bfloat16),
    }
    out, state = run(make(), tree, tree, jit=jit)
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    np.testing.assert_array_equal(np.asarray(out["ints"]), [100, -200])
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(tree), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
    assert np.abs(np.asarray(out["complex"])).max() <= 5.0
    assert np.abs(np.asarray(out["scalar"])) < 30.0
    assert int(state.stats.nonfinite_count) == 0


@pytest.mark.parametrize("name,make", ALL_SCOPES, ids=[s[0] for s in ALL_SCOPES])
def test_empty_tree(name, make):
    out, state = run(make(), {}, {})
    assert out == {}
    assert int(state.stats.count) == 1


# ---------------------------------------------------------------------------
# Non-finite policy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name,make", ALL_SCOPES, ids=[s[0] for s in ALL_SCOPES])
def test_nonfinite_default_gives_zero_update_and_counts(name, make, bad):
    tx = make()
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    good = {"a": jnp.array([0.1, 0.2, 0.3]), "b": jnp.full((2, 2), 0.1)}
    bad_grads = {"a": jnp.array([0.1, bad, 0.3]), "b": jnp.full((2, 2), 0.1)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    out, state = step(bad_grads, state, params)
    for x in jax.tree.leaves(out):
        np.testing.assert_array_equal(np.asarray(x), 0.0)
    assert int(state.stats.nonfinite_count) == 1
    out, state = step(good, state, params)
    assert int(state.stats.nonfinite_count) == 1
    assert int(state.stats.count) == 2
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out))


def test_nonfinite_leaves_rule_state_untouched():
    class CountingRule:
        def init(self, norm_like):
            return jnp.zeros_like(norm_like)

        def update(self, state, norm, step):
            return jnp.ones_like(norm), state + norm

    tx = oc.clip_by_global_norm(CountingRule())
    state = tx.init({"w": jnp.ones(2)})
    _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
    _, state = tx.update({"w": jnp.array([np.nan, 4.0])}, state)
    _, state = tx.update({"w": jnp.array([np.inf, 4.0])}, state)
    assert float(state.rule_state) == 5.0
    _, state = tx.update({"w": jnp.array([0.0, 1.0])}, state)
    assert float(state.rule_state) == 6.0


# ---------------------------------------------------------------------------
# Hyperparameters: schedules, inject_hyperparams, no retracing
# ---------------------------------------------------------------------------


def test_schedule_threshold():
    tx = oc.clip_by_global_norm(optax.linear_schedule(1.0, 3.0, 2))
    grads = {"w": jnp.array([30.0, 40.0])}
    state = tx.init(grads)
    thresholds = []
    for _ in range(4):
        out, state = tx.update(grads, state)
        thresholds.append(float(state.stats.threshold))
        np.testing.assert_allclose(np_norm(np_leaves(out)), thresholds[-1], rtol=1e-6)
    assert thresholds == [1.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize(
    "factory,kwargs",
    [
        (oc.clip_by_global_norm, {"max_norm": 1.0}),
        (oc.clip_by_global_norm, {"max_norm": 1.0, "ord": 2}),
        (oc.clip_by_norm, {"max_norm": 1.0, "ord": 1}),
        (oc.clip_by_value, {"max_delta": 1.0}),
        (oc.clip_by_block_rms, {"threshold": 1.0}),
        (oc.adaptive_grad_clip, {"clipping": 1.0, "eps": 1e-3}),
    ],
)
def test_inject_hyperparams_changes_take_effect_without_retracing(factory, kwargs):
    tx = optax.inject_hyperparams(factory)(**kwargs)
    params = {"w": jnp.array([[3.0, 4.0]]), "b": jnp.array([1.0])}
    grads = {"w": jnp.array([[30.0, 40.0]]), "b": jnp.array([2.0])}
    traces = []

    @jax.jit
    def step(state):
        traces.append(1)
        return tx.update(grads, state, params)

    state = tx.init(params)
    first, state = step(state)
    name = next(iter(kwargs))
    state.hyperparams[name] = jnp.asarray(0.5, state.hyperparams[name].dtype)
    second, state = step(state)
    assert len(traces) == 1
    assert not np.allclose(np.asarray(first["w"]), np.asarray(second["w"]))
    (s,) = oc.stats(state)
    assert float(np.max(np.asarray(s.threshold))) == 0.5


def test_traced_ord_under_inject_hyperparams_matches_static_ord():
    grads = {"w": jnp.array([3.0, -4.0, 12.0])}
    for ord in (1, 2, np.inf, 3):
        tx = optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=1.0, ord=ord)
        out, state = jax.jit(tx.update)(grads, tx.init(grads))
        ref, ref_state = run(oc.clip_by_global_norm(1.0, ord=ord), grads)
        np.testing.assert_allclose(
            np.asarray(out["w"]), np.asarray(ref["w"]), rtol=1e-6
        )
        np.testing.assert_allclose(
            float(oc.stats(state)[0].norm), float(ref_state.stats.norm), rtol=1e-6
        )


def test_array_threshold_changes_without_retracing():
    traces = []

    @jax.jit
    def step(grads, threshold):
        traces.append(1)
        tx = oc.clip_by_global_norm(threshold)
        return tx.update(grads, tx.init(grads))[0]

    grads = {"w": jnp.array([3.0, 4.0])}
    a = step(grads, jnp.asarray(1.0))
    b = step(grads, jnp.asarray(2.0))
    assert len(traces) == 1
    np.testing.assert_allclose(np.asarray(b["w"]), 2 * np.asarray(a["w"]), rtol=1e-6)


# ---------------------------------------------------------------------------
# torch.nn.utils.clip_grad_norm_ semantics (NumPy reference, torch not needed)
# ---------------------------------------------------------------------------


def _torch_clip_grad_norm_reference(grads, max_norm, norm_type):
    """torch clip_grad_norm_: total = norm of the per-tensor norms;
    coef = max_norm / (total + 1e-6), capped at 1."""
    per_tensor = [
        np.abs(g).max()
        if np.isinf(norm_type)
        else np.sum(np.abs(g) ** norm_type) ** (1 / norm_type)
        for g in grads
    ]
    per_tensor = np.asarray(per_tensor)
    if np.isinf(norm_type):
        total = per_tensor.max()
    else:
        total = np.sum(per_tensor**norm_type) ** (1 / norm_type)
    coef = min(max_norm / (total + 1e-6), 1.0)
    return total, coef


@pytest.mark.parametrize("norm_type", [1, 2, np.inf, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_clip_grad_norm_semantics(norm_type, seed):
    tree = random_tree(seed, 6, scale=2.0)
    grads = np_leaves(tree)
    total, coef = _torch_clip_grad_norm_reference(grads, 1.0, norm_type)
    out, state = run(oc.clip_by_global_norm(1.0, ord=norm_type), tree)
    np.testing.assert_allclose(float(state.stats.norm), total, rtol=2e-6)
    # torch adds 1e-6 to the denominator; the scales agree to that precision.
    np.testing.assert_allclose(float(state.stats.scale), coef, rtol=1e-5)
    for a, g in zip(np_leaves(out), grads, strict=True):
        np.testing.assert_allclose(a, g * coef, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: oc.clip_by_global_norm(-1.0), "max_norm.*-1.0"),
        (lambda: oc.clip_by_global_norm(float("nan")), "max_norm.*nan"),
        (lambda: oc.clip_by_global_norm(1.0, ord=0), "ord.*0"),
        (lambda: oc.clip_by_global_norm(1.0, ord="fro"), "ord.*fro"),
        (lambda: oc.clip_by_global_norm(1.0, ord=-2), "ord.*-2"),
        (lambda: oc.clip_by_norm(-0.5), "max_norm.*-0.5"),
        (lambda: oc.clip_by_value(-1), "max_delta.*-1"),
        (lambda: oc.clip_by_block_rms(-2.0), "threshold.*-2.0"),
        (lambda: oc.adaptive_grad_clip(-0.1), "clipping.*-0.1"),
        (lambda: oc.adaptive_grad_clip(0.1, eps=-1.0), "eps.*-1.0"),
        (lambda: oc.clip_by_global_norm(1.0, nonfinite="skip"), "nonfinite.*skip"),
        (lambda: oc.clip_by_norm(1.0, stacked_axes=-1), "stacked_axes.*-1"),
        (lambda: oc.clip_by_global_norm(np.ones(2)), "max_norm.*scalar"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_threshold_type_raises():
    with pytest.raises(TypeError, match="max_norm"):
        oc.clip_by_global_norm("1.0")


def test_agc_without_params_raises():
    tx = oc.adaptive_grad_clip(0.1)
    grads = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="params"):
        tx.update(grads, tx.init(grads))


def test_agc_params_structure_mismatch_raises():
    tx = oc.adaptive_grad_clip(0.1)
    grads = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="structure"):
        tx.update(grads, tx.init(grads), {"v": jnp.ones(2)})


def test_tree_structure_mismatch_raises():
    tx = oc.clip_by_norm(1.0)
    state = tx.init({"a": jnp.ones(2), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match="initialized"):
        tx.update({"a": jnp.ones(2)}, state)


def test_wrong_state_raises():
    tx = oc.clip_by_global_norm(1.0)
    # Another transform's state (None / EmptyState() are a fresh state).
    other = optax.scale_by_adam().init({"a": jnp.ones(2)})
    with pytest.raises(TypeError, match="ClipState"):
        tx.update({"a": jnp.ones(2)}, other)


# ---------------------------------------------------------------------------
# Stats
# ---------------------------------------------------------------------------


def test_stats_found_in_nested_states():
    # optax's own adam promotes int32 counts to float: allow it here.
    with jax.numpy_dtype_promotion("standard"):
        _check_stats_found_in_nested_states()


def _check_stats_found_in_nested_states():
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([3.0, 4.0, 0.0])}
    inner = optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-3))
    nests = {
        "chain": inner,
        "masked": optax.masked(inner, {"w": True}),
        "multisteps": optax.MultiSteps(inner, every_k_schedule=1),
        "inject": optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=1.0),
        "two": optax.chain(oc.clip_by_value(10.0), oc.clip_by_global_norm(1.0)),
    }
    for name, tx in nests.items():
        state = tx.init(params)
        _, state = tx.update(grads, state, params)
        found = oc.stats(state)
        assert len(found) == (2 if name == "two" else 1), name
        np.testing.assert_allclose(float(found[-1].norm), 5.0, rtol=1e-6)
        assert int(found[-1].count) == 1
    assert oc.stats(optax.adam(1e-3).init(params)) == ()


def test_state_can_be_donated_right_after_init():
    tx = optax.chain(
        oc.clip_by_norm(1.0),
        oc.clip_by_global_norm(10.0, per_tensor_stats=True),
        optax.sgd(0.1),
    )
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    step = jax.jit(lambda g, s: tx.update(g, s, params), donate_argnums=1)
    state = tx.init(params)
    _, state = step(params, state)
    s, recorded = oc.stats(state)
    # leaves in pytree order: "b" then "w"
    np.testing.assert_allclose(np.asarray(s.norm), [np.sqrt(2), np.sqrt(3)], rtol=1e-6)
    # the second clip sees the first one's output: every tensor at norm 1
    np.testing.assert_allclose(np.asarray(recorded.tensor_norms), [1.0, 1.0], rtol=1e-6)
