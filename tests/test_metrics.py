"""``optaxclip.metrics``: flat, stable logging keys from any optimizer state.

Expected values come from NumPy on the gradients themselves, not from the
state the helper reads.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import optaxclip as oc

GRADS = {
    "w": jnp.asarray([[3.0, 4.0], [0.0, 12.0]], jnp.float32),
    "b": jnp.asarray([0.3, 0.4], jnp.float32),
}
PARAMS = jax.tree.map(jnp.zeros_like, GRADS)
SCALAR_KEYS = ["norm", "threshold", "scale", "norm_after", "clipped", "nonfinite_count"]
TENSOR_KEYS = ["norm_max", "threshold_min", "scale_min", "clipped", "nonfinite_count"]
# optax.MultiSteps and inject_hyperparams mix Python floats and int32 counts,
# which strict promotion rejects.
OPTAX_PROMOTION = jax.numpy_dtype_promotion("standard")


def np_leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def np_global_norm(tree):
    return float(np.sqrt(sum(np.sum(x**2) for x in np_leaves(tree))))


def one_step(tx, grads=GRADS):
    state = tx.init(PARAMS)
    _, state = tx.update(grads, state, PARAMS)
    return state


def test_one_clip_in_a_chain_gives_the_global_stats():
    state = one_step(optax.chain(oc.clip_by_global_norm(2.0), optax.sgd(0.1)))
    m = oc.metrics(state)
    assert list(m) == [f"clip/{k}" for k in SCALAR_KEYS]
    norm = np_global_norm(GRADS)  # sqrt(9 + 16 + 144 + 0.09 + 0.16)
    np.testing.assert_allclose(m["clip/norm"], norm, rtol=1e-6)
    np.testing.assert_allclose(m["clip/threshold"], 2.0)
    np.testing.assert_allclose(m["clip/scale"], 2.0 / norm, rtol=1e-6)
    assert int(m["clip/clipped"]) == 1
    assert int(m["clip/nonfinite_count"]) == 0
    assert all(isinstance(v, jax.Array) and v.shape == () for v in m.values())


def test_a_second_clip_gets_a_suffix_in_chain_order():
    tx = optax.chain(oc.clip_by_norm(1.0), oc.clip_by_global_norm(0.5), optax.sgd(0.1))
    m = oc.metrics(one_step(tx))
    assert list(m) == [f"clip/{k}" for k in TENSOR_KEYS] + [
        f"clip_1/{k}" for k in SCALAR_KEYS
    ]
    per_tensor = {k: float(np.linalg.norm(v)) for k, v in GRADS.items()}
    np.testing.assert_allclose(m["clip/norm_max"], max(per_tensor.values()), 1e-6)
    np.testing.assert_allclose(m["clip/threshold_min"], 1.0)
    np.testing.assert_allclose(
        m["clip/scale_min"], min(1.0 / n for n in per_tensor.values()), rtol=1e-6
    )
    assert int(m["clip/clipped"]) == sum(n > 1.0 for n in per_tensor.values())
    # The second clip sees the first one's output: every tensor at norm <= 1.
    after_first = {
        k: np.asarray(v) * min(1.0, 1.0 / per_tensor[k]) for k, v in GRADS.items()
    }
    np.testing.assert_allclose(m["clip_1/norm"], np_global_norm(after_first), 1e-6)
    assert int(m["clip_1/clipped"]) == 1


def test_per_tensor_scope_is_summarized():
    # b's norm (0.5) is under the bound, w's (13) above it.
    m = oc.metrics(one_step(oc.clip_by_norm(1.0)), host=True)
    assert list(m) == [f"clip/{k}" for k in TENSOR_KEYS]
    assert m["clip/norm_max"] == pytest.approx(13.0, rel=1e-6)
    assert m["clip/scale_min"] == pytest.approx(1.0 / 13.0, rel=1e-6)
    assert m["clip/threshold_min"] == 1.0
    assert m["clip/clipped"] == 1


@pytest.mark.parametrize(
    "wrap",
    [
        lambda tx: optax.masked(tx, {"w": True, "b": True}),
        lambda tx: optax.MultiSteps(tx, every_k_schedule=1),
        lambda tx: optax.chain(optax.identity(), optax.chain(tx)),
    ],
    ids=["masked", "MultiSteps", "nested_chain"],
)
def test_nesting_keeps_the_keys_and_values(wrap):
    inner = optax.chain(oc.clip_by_global_norm(2.0), optax.sgd(0.1))
    with OPTAX_PROMOTION:
        m = oc.metrics(one_step(wrap(inner)), host=True)
    assert list(m) == [f"clip/{k}" for k in SCALAR_KEYS]
    assert m["clip/norm"] == pytest.approx(np_global_norm(GRADS), rel=1e-6)
    assert m["clip/clipped"] == 1


def test_inject_hyperparams_threshold_is_reported():
    tx = optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=3.0)
    with OPTAX_PROMOTION:
        state = one_step(tx)
    m = oc.metrics(state, host=True)
    assert m["clip/threshold"] == 3.0
    assert m["clip/scale"] == pytest.approx(3.0 / np_global_norm(GRADS), rel=1e-6)


def test_a_guard_has_keys_of_its_own():
    tx = oc.skip_nonfinite(optax.chain(oc.zclip(), optax.sgd(0.1)))
    m = oc.metrics(one_step(tx), host=True)
    # The clip keeps its keys; the guard's are under its own name.
    assert [k for k in m if k.startswith("clip/skip")] == [
        f"clip/skip_nonfinite/{k}"
        for k in ["norm", "threshold", "skipped", "skipped_total", "nonfinite_count"]
    ]
    assert [k for k in m if not k.startswith("clip/skip")] == [
        f"clip/{k}" for k in SCALAR_KEYS
    ]
    assert m["clip/norm"] == pytest.approx(np_global_norm(GRADS), rel=1e-6)
    assert m["clip/skip_nonfinite/norm"] == pytest.approx(
        np_global_norm(GRADS), rel=1e-6
    )
    assert m["clip/skip_nonfinite/skipped"] == 0


def test_nonfinite_step_is_counted():
    bad = {"w": GRADS["w"].at[0, 0].set(jnp.nan), "b": GRADS["b"]}
    m = oc.metrics(one_step(oc.clip_by_global_norm(1.0), bad), host=True)
    assert m["clip/nonfinite_count"] == 1
    assert m["clip/scale"] == 0.0


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(x)


def test_linen_train_state():
    model = Linear()
    x = jnp.ones((4, 3), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    tx = optax.chain(oc.clip_by_global_norm(1e-3), optax.sgd(0.1))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(params)
    state = state.apply_gradients(grads=grads)
    m = oc.metrics(state, host=True)
    assert list(m) == [f"clip/{k}" for k in SCALAR_KEYS]
    assert m["clip/norm"] == pytest.approx(np_global_norm(grads), rel=1e-5)
    assert m["clip/clipped"] == 1


class NnxLinear(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.lin(x)


def test_nnx_optimizer_and_its_state():
    model = NnxLinear(nnx.Rngs(0))
    tx = optax.chain(oc.clip_by_global_norm(1e-3), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.ones((4, 3), jnp.float32)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    expected = np_global_norm(grads)
    optimizer.update(model, grads)
    for source in (optimizer, nnx.state(optimizer)):
        m = oc.metrics(source, host=True)
        assert list(m) == [f"clip/{k}" for k in SCALAR_KEYS]
        assert m["clip/norm"] == pytest.approx(expected, rel=1e-5)
        assert m["clip/clipped"] == 1


def test_under_jit_returns_arrays_equal_to_eager():
    tx = optax.chain(oc.clip_by_norm(1.0), oc.autoclip(), optax.sgd(0.1))

    @jax.jit
    def step(state):
        _, state = tx.update(GRADS, state, PARAMS)
        return state, oc.metrics(state)

    state, jitted = step(tx.init(PARAMS))
    eager = oc.metrics(state)
    # A dict returned from jit comes back with sorted keys (pytree order).
    assert sorted(jitted) == sorted(eager)
    for k in eager:
        assert isinstance(jitted[k], jax.Array) and jitted[k].shape == ()
        np.testing.assert_array_equal(jitted[k], eager[k])
    assert jitted["clip_1/norm"] == pytest.approx(
        np_global_norm(
            {
                k: np.asarray(v) * min(1.0, 1.0 / np.linalg.norm(v))
                for k, v in GRADS.items()
            }
        ),
        rel=1e-6,
    )


def test_host_gives_python_numbers():
    m = oc.metrics(one_step(oc.clip_by_global_norm(2.0)), host=True)
    assert {k: type(v) for k, v in m.items()} == {
        "clip/norm": float,
        "clip/threshold": float,
        "clip/scale": float,
        "clip/norm_after": float,
        "clip/clipped": int,
        "clip/nonfinite_count": int,
    }


def test_host_inside_jit_is_refused_with_the_fix():
    state = oc.clip_by_global_norm(1.0).init(PARAMS)
    with pytest.raises(TypeError, match=r"host=True.*inside a JAX transformation"):
        jax.jit(lambda s: oc.metrics(s, host=True))(state)


def test_keys_are_stable_across_steps_and_from_init():
    tx = optax.chain(oc.clip_by_norm(1.0), oc.zclip(), optax.sgd(0.1))
    state = tx.init(PARAMS)
    keys = [list(oc.metrics(state))]
    for scale in (1.0, 1e-3, 1e3):
        grads = jax.tree.map(lambda g, s=scale: g * s, GRADS)
        _, state = tx.update(grads, state, PARAMS)
        keys.append(list(oc.metrics(state)))
        keys.append(list(oc.metrics(state, host=True)))
    assert all(k == keys[0] for k in keys)


def test_prefix():
    state = one_step(oc.clip_by_global_norm(1.0))
    assert list(oc.metrics(state, prefix="train/grad")) == [
        f"train/grad/{k}" for k in SCALAR_KEYS
    ]
    assert list(oc.metrics(state, prefix="")) == SCALAR_KEYS
    two = one_step(optax.chain(oc.clip_by_value(1.0), oc.clip_by_global_norm(1.0)))
    assert list(oc.metrics(two, prefix=""))[:7] == SCALAR_KEYS + ["1/norm"]
    with pytest.raises(TypeError, match=r"prefix=3"):
        oc.metrics(state, prefix=3)
    with pytest.raises(TypeError, match=r"host='yes'"):
        oc.metrics(state, host="yes")


def test_a_state_without_clips_gives_an_empty_dict():
    assert oc.metrics(optax.sgd(0.1).init(PARAMS)) == {}


def test_empty_per_tensor_tree_is_well_defined():
    ints = {"i": jnp.arange(3)}
    tx = oc.clip_by_norm(1.0)
    _, state = tx.update(ints, tx.init(ints))
    m = oc.metrics(state, host=True)
    assert m == {
        "clip/norm_max": 0.0,
        "clip/threshold_min": float("inf"),
        "clip/scale_min": 1.0,
        "clip/clipped": 0,
        "clip/nonfinite_count": 0,
    }


# ---------------------------------------------------------------------------
# Per-tensor statistics by parameter path
# ---------------------------------------------------------------------------

TREE_PARAMS = {
    "embed": jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32),
    "layers": [
        {
            "bias": jnp.asarray([0.5, -1.0], jnp.float32),
            "kernel": jnp.asarray(np.random.default_rng(2).normal(size=(3, 2)) * 2),
        },
        {
            "bias": jnp.asarray([2.0, 0.0], jnp.float32),
            "kernel": jnp.asarray(np.random.default_rng(3).normal(size=(2, 2)) * 3),
        },
    ],
}
TREE_PARAMS = jax.tree.map(lambda x: x.astype(jnp.float32), TREE_PARAMS)
TREE_GRADS = jax.tree.map(
    lambda x: x * 2.5 + 0.1, TREE_PARAMS
)  # some tensors above the bounds below, some under
PATHS = [
    "embed",
    "layers/0/bias",
    "layers/0/kernel",
    "layers/1/bias",
    "layers/1/kernel",
]


def np_tensors(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def np_pnorm(x, p):
    a = np.abs(x).ravel()
    return float(a.max()) if np.isinf(p) else float(np.sum(a**p) ** (1 / p))


def np_unit_norms(x):
    # AGC's units (Brock et al.): a vector is one unit, a matrix's units are
    # its columns (the sum runs over the input axis 0).
    axis = None if np.squeeze(x).ndim <= 1 else 0
    return np.sqrt(np.sum(x**2, axis=axis))


def np_agc_ratio(g, w, eps=1e-3):
    return float(np.max(np_unit_norms(g) / np.maximum(np_unit_norms(w), eps)))


def np_clippy_ratio(u, w, relative=0.1, absolute=1e-7):
    room = relative * np.abs(w) + absolute
    mag = np.abs(u)
    return float(np.max(np.where(mag > 0, mag / room, 0.0)))


GLOBAL_DECISION = {
    "clip_by_global_norm": (
        lambda: oc.clip_by_global_norm(1.0, per_tensor_stats=True),
        "clip",
        lambda g, w: np_pnorm(g, 2),
    ),
    "clip_by_global_norm_ord1": (
        lambda: oc.clip_by_global_norm(1.0, ord=1, per_tensor_stats=True),
        "clip",
        lambda g, w: np_pnorm(g, 1),
    ),
    "clip_by_global_norm_ord3": (
        lambda: oc.clip_by_global_norm(1.0, ord=3, per_tensor_stats=True),
        "clip",
        lambda g, w: np_pnorm(g, 3),
    ),
    "clip_by_global_norm_inf": (
        lambda: oc.clip_by_global_norm(1.0, ord="inf", per_tensor_stats=True),
        "clip",
        lambda g, w: np_pnorm(g, np.inf),
    ),
    "clip_by_value": (
        lambda: oc.clip_by_value(1.0, per_tensor_stats=True),
        "clip",
        lambda g, w: np_pnorm(g, np.inf),
    ),
    "zclip": (
        lambda: oc.zclip(per_tensor_stats=True),
        "clip",
        lambda g, w: np_pnorm(g, 2),
    ),
    "autoclip": (
        lambda: oc.autoclip(per_tensor_stats=True),
        "clip",
        lambda g, w: np_pnorm(g, 2),
    ),
    "quantile_clip": (
        lambda: oc.quantile_clip(per_tensor_stats=True),
        "clip",
        lambda g, w: np_pnorm(g, 2),
    ),
    "spam_clip": (
        lambda: oc.spam_clip(per_tensor_stats=True),
        "clip",
        lambda g, w: np_pnorm(g, 2),
    ),
    "trust_ratio_clip": (
        lambda: oc.trust_ratio_clip(0.01, per_tensor_stats=True),
        "clip",
        lambda u, w: np_pnorm(u, 2) / max(np_pnorm(w, 2), 1e-3),
    ),
    "skip_nonfinite": (
        lambda: oc.skip_nonfinite(optax.sgd(0.1), per_tensor_stats=True),
        "clip/skip_nonfinite",
        lambda g, w: np_pnorm(g, 2),
    ),
    "skip_spikes": (
        lambda: oc.skip_spikes(optax.sgd(0.1), per_tensor_stats=True),
        "clip/skip_spikes",
        lambda g, w: np_pnorm(g, 2),
    ),
}
PER_TENSOR = {
    "clip_by_norm": (lambda: oc.clip_by_norm(1.0), lambda g, w: np_pnorm(g, 2)),
    "clip_by_norm_ord1": (
        lambda: oc.clip_by_norm(1.0, ord=1),
        lambda g, w: np_pnorm(g, 1),
    ),
    "clip_by_block_rms": (
        lambda: oc.clip_by_block_rms(1.0),
        lambda g, w: float(np.sqrt(np.mean(g**2))),
    ),
    "adaptive_grad_clip": (
        lambda: oc.adaptive_grad_clip(0.5),
        np_agc_ratio,
    ),
    "adagc": (lambda: oc.adagc(), lambda g, w: np_pnorm(g, 2)),
    "olmo_adaptive_clip": (
        lambda: oc.olmo_adaptive_clip(),
        lambda g, w: np_pnorm(g, 2),
    ),
    "stable_spam_clip": (
        lambda: oc.stable_spam_clip(),
        lambda g, w: np_pnorm(g, np.inf),
    ),
    "clippy": (lambda: oc.clippy(), np_clippy_ratio),
    # A matrix's top singular value; 0 for a leaf that is not a matrix.
    "clip_by_spectral_norm": (
        lambda: oc.clip_by_spectral_norm(1.0),
        lambda g, w: np.linalg.svd(g, compute_uv=False)[0] if g.ndim == 2 else 0.0,
    ),
}


def tree_step(tx, grads=TREE_GRADS, params=TREE_PARAMS):
    state = tx.init(params)
    _, state = jax.jit(tx.update)(grads, state, params)
    return state


@pytest.mark.parametrize("name", list(GLOBAL_DECISION))
def test_global_decision_clips_record_each_tensors_norm(name):
    make, head, ref = GLOBAL_DECISION[name]
    m = oc.metrics(tree_step(make()), TREE_PARAMS, host=True, per_tensor=True)
    expected = [
        ref(g, w)
        for g, w in zip(np_tensors(TREE_GRADS), np_tensors(TREE_PARAMS), strict=True)
    ]
    got = [m[f"{head}/norm/{p}"] for p in PATHS]
    np.testing.assert_allclose(got, expected, rtol=2e-6)
    # Per tensor, only the norm: the decision is the whole tree's.
    assert not any(k.startswith(f"{head}/threshold/") for k in m)


@pytest.mark.parametrize("name", list(PER_TENSOR))
def test_per_tensor_clips_report_each_tensor_by_path(name):
    make, ref = PER_TENSOR[name]
    m = oc.metrics(tree_step(make()), TREE_PARAMS, host=True, per_tensor=True)
    expected = [
        ref(g, w)
        for g, w in zip(np_tensors(TREE_GRADS), np_tensors(TREE_PARAMS), strict=True)
    ]
    got = [m[f"clip/norm/{p}"] for p in PATHS]
    np.testing.assert_allclose(got, expected, rtol=2e-6)
    for p in PATHS:
        scale, threshold = m[f"clip/scale/{p}"], m[f"clip/threshold/{p}"]
        assert m[f"clip/clipped/{p}"] == int(scale < 1)
        assert 0.0 <= scale <= 1.0 and threshold >= 0.0
    # the summary agrees with the per-tensor keys
    assert m["clip/norm_max"] == pytest.approx(max(expected), rel=2e-6)


def test_per_tensor_threshold_and_scale_against_numpy():
    bound = 1.5
    m = oc.metrics(
        tree_step(oc.clip_by_norm(bound)), TREE_PARAMS, host=True, per_tensor=True
    )
    for p, g in zip(PATHS, np_tensors(TREE_GRADS), strict=True):
        n = np.linalg.norm(g)
        assert m[f"clip/threshold/{p}"] == bound
        assert m[f"clip/scale/{p}"] == pytest.approx(min(1.0, bound / n), rel=1e-6)
        assert m[f"clip/clipped/{p}"] == int(n > bound)


def test_without_params_the_keys_use_the_tensor_index():
    state = tree_step(oc.clip_by_global_norm(1.0, per_tensor_stats=True))
    m = oc.metrics(state, host=True, per_tensor=True)
    norms = [np_pnorm(g, 2) for g in np_tensors(TREE_GRADS)]
    np.testing.assert_allclose(
        [m[f"clip/norm/{i}"] for i in range(len(norms))], norms, rtol=2e-6
    )


def test_per_tensor_keys_inside_jit_equal_the_host_values():
    tx = optax.chain(
        oc.clip_by_global_norm(1.0, per_tensor_stats=True), optax.adam(1e-3)
    )

    @jax.jit
    def step(state):
        _, state = tx.update(TREE_GRADS, state, TREE_PARAMS)
        return state, oc.metrics(state, TREE_PARAMS, per_tensor=True)

    with OPTAX_PROMOTION:
        state, jitted = step(tx.init(TREE_PARAMS))
    host = oc.metrics(state, TREE_PARAMS, host=True, per_tensor=True)
    assert sorted(jitted) == sorted(host)
    for k, v in host.items():
        assert jitted[k].shape == ()
        np.testing.assert_allclose(float(jitted[k]), v, rtol=1e-7)


def test_default_records_no_per_tensor_norms():
    state = tree_step(oc.clip_by_global_norm(1.0))
    m = oc.metrics(state, TREE_PARAMS, host=True, per_tensor=True)
    assert list(m) == [f"clip/{k}" for k in SCALAR_KEYS]
    assert oc.stats(state)[0].tensor_norms.shape == (0,)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_per_tensor_norm_is_nonfinite_exactly_where_the_tensor_is(bad):
    grads = jax.tree.map(lambda x: x, TREE_GRADS)
    grads["layers"][1]["bias"] = grads["layers"][1]["bias"].at[0].set(bad)
    for tx in [
        oc.clip_by_global_norm(1.0, per_tensor_stats=True),
        oc.clip_by_norm(1.0),
    ]:
        m = oc.metrics(tree_step(tx, grads), TREE_PARAMS, host=True, per_tensor=True)
        finite = {p: np.isfinite(m[f"clip/norm/{p}"]) for p in PATHS}
        assert finite == {p: p != "layers/1/bias" for p in PATHS}


def test_per_tensor_params_of_another_structure_is_refused_naming_both():
    state = tree_step(oc.clip_by_global_norm(1.0, per_tensor_stats=True))
    with pytest.raises(ValueError, match=r"5 per-tensor entries.*2 floating-point"):
        oc.metrics(state, GRADS, per_tensor=True)
    with pytest.raises(TypeError, match=r"per_tensor='yes'"):
        oc.metrics(state, per_tensor="yes")
    with pytest.raises(ValueError, match=r"per_tensor_stats.*Python bool"):
        oc.clip_by_global_norm(1.0, per_tensor_stats="yes")


def test_stacked_layers_get_their_slice_index():
    params = {"blocks": {"kernel": jnp.ones((3, 2, 2)), "bias": jnp.ones((3, 2))}}
    grads = jax.tree.map(
        lambda x: x * jnp.arange(1.0, 4.0).reshape((3,) + (1,) * (x.ndim - 1)), params
    )
    state = tree_step(oc.clip_by_norm(1.0, stacked_axes=1), grads, params)
    m = oc.metrics(state, params, host=True, per_tensor=True)
    for i in range(3):
        assert m[f"clip/norm/blocks/kernel/{i}"] == pytest.approx(2.0 * (i + 1))
        assert m[f"clip/norm/blocks/bias/{i}"] == pytest.approx(np.sqrt(2) * (i + 1))


def test_linen_and_nnx_parameters_are_named_by_their_module_path():
    model = Linear()
    x = jnp.ones((4, 3), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    tx = optax.chain(oc.clip_by_norm(1e-3), optax.sgd(0.1))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(params)
    state = state.apply_gradients(grads=grads)
    m = oc.metrics(state, state.params, host=True, per_tensor=True)
    assert m["clip/norm/Dense_0/kernel"] == pytest.approx(
        float(np.linalg.norm(grads["Dense_0"]["kernel"])), rel=1e-5
    )

    nmodel = NnxLinear(nnx.Rngs(0))
    optimizer = nnx.Optimizer(nmodel, tx, wrt=nnx.Param)
    ngrads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(nmodel)
    optimizer.update(nmodel, ngrads)
    m = oc.metrics(optimizer, nnx.state(nmodel, nnx.Param), host=True, per_tensor=True)
    assert sorted(k for k in m if "/norm/" in k) == [
        "clip/norm/lin/bias",
        "clip/norm/lin/kernel",
    ]
    assert m["clip/norm/lin/kernel"] == pytest.approx(
        float(np.linalg.norm(ngrads["lin"]["kernel"][...])), rel=1e-5
    )


# ---------------------------------------------------------------------------
# Post-clip norm, guards' keys, keys that survive a change of the chain
# ---------------------------------------------------------------------------


def test_norm_after_is_the_norm_of_what_the_clip_passed_on():
    tx = oc.clip_by_global_norm(2.0)
    state = tx.init(PARAMS)
    out, state = tx.update(GRADS, state)
    m = oc.metrics(state, host=True)
    assert m["clip/norm_after"] == pytest.approx(np_global_norm(out), rel=1e-6)
    assert m["clip/norm_after"] == pytest.approx(2.0, rel=1e-6)
    bad = {"w": GRADS["w"].at[0, 0].set(jnp.nan), "b": GRADS["b"]}
    out, state = tx.update(bad, state)
    m = oc.metrics(state, host=True)
    assert np.isnan(m["clip/norm"]) and m["clip/norm_after"] == 0.0
    assert np_global_norm(out) == 0.0


def test_skip_spikes_reports_skips_and_the_loss_bound():
    window, sigma = 4, 2.0
    tx = oc.skip_spikes(optax.sgd(0.1), window=window, sigma=sigma, min_history=3)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    losses = [1.0, 1.2, 0.9, 1.1, 50.0, 1.0]
    grads = [0.5, 0.6, 0.55, 0.5, 0.52, 0.5]
    skipped, history = [], []
    for loss, g in zip(losses, grads, strict=True):
        _, state = tx.update(
            {"w": jnp.full(2, g)}, state, params, value=jnp.float32(loss)
        )
        m = oc.metrics(state, host=True)
        skipped.append(m["clip/skip_spikes/skipped"])
        previous = np.asarray(history[-window:])
        if len(history) + 1 >= 3:
            want = previous.mean() + sigma * previous.std(ddof=1)
            assert m["clip/skip_spikes/value_threshold"] == pytest.approx(want, 1e-5)
        else:
            assert m["clip/skip_spikes/value_threshold"] == np.inf
        history.append(loss)
    assert skipped == [0, 0, 0, 0, 1, 0]
    assert m["clip/skip_spikes/skipped_total"] == 1


def test_skip_nonfinite_counts_its_skips():
    tx = oc.skip_nonfinite(optax.sgd(0.1))
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    for g in [1.0, np.nan, 2.0, np.inf]:
        _, state = tx.update({"w": jnp.full(2, g, jnp.float32)}, state, params)
    m = oc.metrics(state, host=True)
    assert m["clip/skip_nonfinite/skipped"] == 1
    assert m["clip/skip_nonfinite/skipped_total"] == 2
    assert m["clip/skip_nonfinite/nonfinite_count"] == 2


@pytest.mark.parametrize(
    "wrap",
    [
        lambda tx: oc.skip_spikes(tx),
        lambda tx: oc.skip_nonfinite(tx),
        lambda tx: optax.masked(tx, {"w": True, "b": True}),
        lambda tx: optax.MultiSteps(tx, every_k_schedule=1),
        lambda tx: oc.skip_spikes(optax.MultiSteps(tx, every_k_schedule=1)),
    ],
    ids=["skip_spikes", "skip_nonfinite", "masked", "MultiSteps", "guard+MultiSteps"],
)
def test_wrapping_the_optimizer_does_not_rename_the_clips_keys(wrap):
    inner = optax.chain(oc.clip_by_global_norm(2.0), optax.adam(1e-3))
    with OPTAX_PROMOTION:
        bare = oc.metrics(one_step(inner), host=True)
        wrapped = oc.metrics(one_step(wrap(inner)), host=True)
    for k, v in bare.items():
        assert wrapped[k] == pytest.approx(v, rel=1e-6), k
    assert all(k in bare or k.startswith("clip/skip_") for k in wrapped)


def test_two_guards_of_a_kind_get_a_suffix():
    tx = oc.skip_nonfinite(oc.skip_nonfinite(optax.sgd(0.1)))
    m = oc.metrics(one_step(tx), host=True)
    heads = sorted({k.rsplit("/", 1)[0] for k in m})
    assert heads == ["clip/skip_nonfinite", "clip/skip_nonfinite_1"]


def test_multisteps_reports_the_last_applied_step_on_every_micro_step():
    k = 3
    tx = optax.MultiSteps(
        optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1)), every_k_schedule=k
    )
    params = {"w": jnp.zeros(2)}
    with OPTAX_PROMOTION:
        state = tx.init(params)
        stream = [jnp.array([3.0, 4.0]) * (i + 1) for i in range(2 * k)]
        seen = []
        for g in stream:
            _, state = tx.update({"w": g}, state, params)
            seen.append(oc.metrics(state, host=True)["clip/norm"])
    # accumulated (mean) gradient of each group of k micro-steps
    means = [np.linalg.norm(np.mean(stream[j : j + k], axis=0)) for j in (0, k)]
    expected = [0.0] * (k - 1) + [means[0]] * k + [means[1]]
    np.testing.assert_allclose(seen, expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# nonfinite_paths
# ---------------------------------------------------------------------------


def bad_tree(*paths, value=np.nan):
    grads = jax.tree.map(lambda x: x, TREE_GRADS)
    for p in paths:
        node = grads
        parts = [int(q) if q.isdigit() else q for q in p.split("/")]
        for q in parts[:-1]:
            node = node[q]
        node[parts[-1]] = (
            node[parts[-1]].reshape(-1).at[0].set(value).reshape(node[parts[-1]].shape)
        )
    return grads


@pytest.mark.parametrize(
    "make",
    [
        lambda: oc.clip_by_global_norm(1.0),
        lambda: oc.clip_by_global_norm(1.0, ord=1),
        lambda: oc.clip_by_value(1.0),
        lambda: oc.zclip(),
        lambda: oc.clip_by_norm(1.0),
        lambda: oc.clip_by_block_rms(1.0),
        lambda: oc.adaptive_grad_clip(0.1),
        lambda: oc.adagc(),
        lambda: oc.spam_clip(),
        lambda: oc.stable_spam_clip(),
        lambda: oc.skip_nonfinite(optax.sgd(0.1)),
        lambda: oc.skip_spikes(optax.sgd(0.1)),
        lambda: oc.trust_ratio_clip(),
    ],
)
def test_nonfinite_paths_names_the_bad_tensors(make):
    tx = make()
    state = tree_step(tx, bad_tree("layers/0/kernel", "embed"))
    assert oc.nonfinite_paths(state, TREE_PARAMS) == ["embed", "layers/0/kernel"]
    state = tree_step(tx, bad_tree("layers/1/bias", value=np.inf))
    assert oc.nonfinite_paths(state, TREE_PARAMS) == ["layers/1/bias"]
    assert oc.nonfinite_paths(tree_step(tx), TREE_PARAMS) == []


def test_nonfinite_paths_for_clippy_reads_the_update():
    state = tree_step(oc.clippy(), bad_tree("layers/1/kernel"))
    assert oc.nonfinite_paths(state, TREE_PARAMS) == ["layers/1/kernel"]


def test_nonfinite_paths_through_a_chain_with_a_guard():
    inner = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(1e-3, momentum=0.9))
    tx = oc.skip_spikes(inner)
    state = tree_step(tx, bad_tree("layers/0/bias"))
    assert oc.nonfinite_paths(state, TREE_PARAMS) == ["layers/0/bias"]
    # the next finite step clears it
    _, state = jax.jit(tx.update)(TREE_GRADS, state, TREE_PARAMS)
    assert oc.nonfinite_paths(state, TREE_PARAMS) == []


def test_nonfinite_paths_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"holds no optaxclip clip"):
        oc.nonfinite_paths(optax.adam(1e-3).init(PARAMS), PARAMS)
    state = tree_step(oc.clip_by_global_norm(1.0), bad_tree("embed"))
    with pytest.raises(ValueError, match=r"5 per-tensor entries.*2 floating-point"):
        oc.nonfinite_paths(state, GRADS)
    assert oc.nonfinite_paths(state, None) == ["0"]


def test_a_clip_inside_partition_is_named_by_the_parameters_it_sees():
    labels = {"w": "clipped", "b": "plain"}
    tx = optax.partition(
        {
            "clipped": optax.chain(
                oc.clip_by_global_norm(1.0, per_tensor_stats=True), optax.sgd(0.1)
            ),
            "plain": optax.sgd(0.1),
        },
        labels,
    )
    m = oc.metrics(one_step(tx), {"w": PARAMS["w"]}, host=True, per_tensor=True)
    w_norm = float(np.linalg.norm(np.asarray(GRADS["w"])))
    assert m["clip/norm"] == pytest.approx(w_norm, rel=1e-6)
    assert m["clip/norm/w"] == pytest.approx(w_norm, rel=1e-6)
    with pytest.raises(ValueError, match=r"only the parameters it clips"):
        oc.metrics(one_step(tx), PARAMS, per_tensor=True)
