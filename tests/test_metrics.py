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
