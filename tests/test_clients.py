"""optaxclip inside the machinery users wrap around it: optax and flax.

Each test trains a few steps and checks the result against an independent
computation (optax's own clipping, or NumPy), not only that it runs.
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

X = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.float32)
Y = jnp.asarray(np.random.default_rng(1).standard_normal((8, 3)), jnp.float32)
# optax.adam and optax.MultiSteps mix Python floats and int32 counts, which
# strict promotion rejects; these clients run under standard promotion.
OPTAX_PROMOTION = jax.numpy_dtype_promotion("standard")
PARAMS = {"w": jnp.ones((4, 3), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}


def loss_fn(params):
    return 10.0 * jnp.mean((X @ params["w"] + params["b"][None, :] - Y) ** 2)


def train(tx, steps=5, params=PARAMS):
    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss, grads

    state = tx.init(params)
    losses, grads_seen = [], []
    for _ in range(steps):
        params, state, loss, grads = step(params, state)
        losses.append(float(loss))
        grads_seen.append(grads)
    return params, state, losses, grads_seen


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda: optax.adam(1e-2),
        lambda: optax.adamw(1e-2, weight_decay=1e-2),
        lambda: optax.sgd(1e-2, momentum=0.9),
        lambda: optax.lion(1e-3),
    ],
    ids=["adam", "adamw", "sgd", "lion"],
)
def test_chain_with_optimizers_matches_optax(make_opt):
    with OPTAX_PROMOTION:
        _check_chain(make_opt)


def _check_chain(make_opt):
    ours, state, losses, grads = train(
        optax.chain(oc.clip_by_global_norm(1.0), make_opt())
    )
    ref, _, ref_losses, _ = train(
        optax.chain(optax.clip_by_global_norm(1.0), make_opt())
    )
    assert_trees_close(ours, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    (s,) = oc.stats(state)
    np.testing.assert_allclose(s.norm, optax.tree.norm(grads[-1]), rtol=1e-6)
    assert int(s.count) == 5 and int(s.clipped) == 1


def test_masked_clips_only_the_masked_leaves():
    tx = optax.chain(
        optax.masked(oc.clip_by_norm(0.1), {"w": True, "b": False}), optax.sgd(1.0)
    )
    params, state, _, grads = train(tx, steps=1)
    g = {k: np.asarray(v, np.float64) for k, v in grads[0].items()}
    w_expected = np.asarray(PARAMS["w"]) - g["w"] * min(
        1.0, 0.1 / np.linalg.norm(g["w"])
    )
    np.testing.assert_allclose(params["w"], w_expected, rtol=1e-6)
    np.testing.assert_allclose(params["b"], -g["b"], rtol=1e-6)
    (s,) = oc.stats(state)
    assert s.norm.shape == (1,)  # only "w" is measured
    np.testing.assert_allclose(s.norm, [np.linalg.norm(g["w"])], rtol=1e-6)


def test_partition_clips_each_group_differently():
    transforms = {
        "kernel": optax.chain(oc.clip_by_global_norm(0.5), optax.sgd(1.0)),
        "bias": optax.chain(oc.clip_by_value(0.01), optax.sgd(1.0)),
    }
    labels = {"w": "kernel", "b": "bias"}
    for tx in (
        optax.partition(transforms, labels),
        optax.multi_transform(transforms, labels),
    ):
        params, state, _, grads = train(tx, steps=1)
        g = {k: np.asarray(v, np.float64) for k, v in grads[0].items()}
        w_expected = np.asarray(PARAMS["w"]) - g["w"] * min(
            1.0, 0.5 / np.linalg.norm(g["w"])
        )
        np.testing.assert_allclose(params["w"], w_expected, rtol=1e-6)
        np.testing.assert_allclose(
            params["b"], -np.clip(g["b"], -0.01, 0.01), rtol=1e-6
        )
        found = oc.stats(state)
        assert len(found) == 2
        norms = sorted(float(s.norm) for s in found)
        expected = sorted([np.linalg.norm(g["w"]), np.abs(g["b"]).max()])
        np.testing.assert_allclose(norms, expected, rtol=1e-6)


def test_multisteps_clips_the_accumulated_gradient_once_per_apply():
    k = 3
    tx = optax.MultiSteps(
        optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(1.0)), every_k_schedule=k
    )
    micro = [
        {n: (i + 1.0) * jnp.ones_like(v) for n, v in PARAMS.items()}
        for i in range(2 * k)
    ]
    state = tx.init(PARAMS)
    step = jax.jit(tx.update)
    for i, g in enumerate(micro):
        with OPTAX_PROMOTION:
            updates, state = step(g, state, PARAMS)
        (s,) = oc.stats(state)
        applied = (i + 1) % k == 0
        assert int(s.count) == (i + 1) // k  # advances only on applied steps
        if not applied:
            assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
            continue
        mean = {
            n: np.mean([np.asarray(m[n]) for m in micro[i + 1 - k : i + 1]], 0)
            for n in PARAMS
        }
        norm = np.sqrt(sum(np.sum(v**2) for v in mean.values()))
        np.testing.assert_allclose(s.norm, norm, rtol=1e-6)
        for n in PARAMS:
            np.testing.assert_allclose(updates[n], -mean[n] / norm, rtol=1e-6)


def test_inject_hyperparams_with_a_schedule_on_the_threshold():
    schedule = optax.linear_schedule(2.0, 0.5, 4)
    tx = optax.chain(
        optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=schedule),
        optax.sgd(1.0),
    )
    grads = {n: 3.0 * jnp.ones_like(v) for n, v in PARAMS.items()}
    norm = float(optax.tree.norm(grads))
    state = tx.init(PARAMS)
    step = jax.jit(tx.update)
    for t in range(5):
        updates, state = step(grads, state, PARAMS)
        bound = float(schedule(t))
        (s,) = oc.stats(state)
        np.testing.assert_allclose(s.threshold, bound, rtol=1e-6)
        np.testing.assert_allclose(
            updates["w"], -3.0 * min(1.0, bound / norm) * np.ones((4, 3)), rtol=1e-6
        )
        np.testing.assert_allclose(state[0].hyperparams["max_norm"], bound, rtol=1e-6)


def test_apply_if_finite_around_a_chain_with_a_clip():
    tx = optax.apply_if_finite(
        optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(1.0)),
        max_consecutive_errors=3,
    )
    good = {n: 2.0 * jnp.ones_like(v) for n, v in PARAMS.items()}
    bad = {"w": PARAMS["w"].at[0, 0].set(jnp.nan), "b": PARAMS["b"]}
    params, state = PARAMS, tx.init(PARAMS)
    step = jax.jit(tx.update)
    for g in (good, bad, good):
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    norm = float(optax.tree.norm(good))
    np.testing.assert_allclose(params["w"], 1.0 - 2 * 2.0 / norm, rtol=1e-6)
    assert int(state.total_notfinite) == 1
    (s,) = oc.stats(state)
    assert int(s.count) == 2  # the skipped step never reached the clip
    assert int(s.nonfinite_count) == 0


# ---------------------------------------------------------------------------
# flax
# ---------------------------------------------------------------------------


class Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x)


def test_linen_train_state():
    model = Dense()
    params = model.init(jax.random.key(0), X)["params"]

    def loss(p):
        return 10.0 * jnp.mean((model.apply({"params": p}, X) - Y) ** 2)

    def run(tx):
        state = train_state.TrainState.create(
            apply_fn=model.apply, params=params, tx=tx
        )

        @jax.jit
        def step(state):
            return state.apply_gradients(grads=jax.grad(loss)(state.params))

        history = [state.params]
        with OPTAX_PROMOTION:
            for _ in range(4):
                state = step(state)
                history.append(state.params)
        return state, history

    ours, _ = run(optax.chain(oc.clip_by_global_norm(0.5), optax.adam(1e-2)))
    ref, history = run(optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2)))
    assert_trees_close(ours.params, ref.params, rtol=1e-5, atol=1e-6)
    (s,) = oc.stats(ours)  # the TrainState itself
    assert int(s.count) == 4
    np.testing.assert_allclose(s.threshold, 0.5)
    last_grads = jax.grad(loss)(history[-2])
    np.testing.assert_allclose(s.norm, optax.tree.norm(last_grads), rtol=1e-5)
    assert float(loss(ours.params)) < float(loss(params))


def test_linen_passes_the_loss_to_spike_skipping_by_hand():
    """apply_gradients takes no extra arguments: call tx.update directly."""
    params = {"w": jnp.zeros(2)}
    tx = oc.skip_spikes(
        optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1)), window=4
    )
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)

    @jax.jit
    def step(state, grads, loss):
        updates, opt_state = state.tx.update(
            grads, state.opt_state, state.params, value=loss
        )
        return state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )

    grads = {"w": jnp.ones(2)}
    for loss in (1.0, 1.1, 0.9, 1.0):
        state = step(state, grads, loss)
    before = np.asarray(state.params["w"])
    state = step(state, grads, 100.0)  # loss spike, ordinary gradient
    np.testing.assert_array_equal(state.params["w"], before)
    assert int(state.opt_state.skipped) == 1
    state = step(state, grads, 1.0)
    assert not np.array_equal(np.asarray(state.params["w"]), before)


class Linear(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.dense(x)


def test_nnx_optimizer_and_stats():
    def run(tx):
        model = Linear(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer):
            loss, grads = nnx.value_and_grad(
                lambda m: 10.0 * jnp.mean((m(X) - Y) ** 2)
            )(model)
            optimizer.update(model, grads)
            return loss, grads

        with OPTAX_PROMOTION:
            losses = [float(step(model, optimizer)[0]) for _ in range(4)]
        return model, optimizer, losses

    model, optimizer, losses = run(
        optax.chain(oc.clip_by_global_norm(0.5), optax.adam(1e-2))
    )
    ref_model, _, ref_losses = run(
        optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2))
    )
    assert_trees_close(
        nnx.state(model, nnx.Param), nnx.state(ref_model, nnx.Param), 1e-5, 1e-6
    )
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    sources = (optimizer, optimizer.opt_state, nnx.state(optimizer))
    for found in map(oc.stats, sources):
        (s,) = found
        assert isinstance(s.norm, jax.Array)  # unwrapped from nnx variables
        assert int(s.count) == 4 and int(s.clipped) == 1
        np.testing.assert_allclose(s.threshold, 0.5)


def test_nnx_optimizer_passes_value_to_spike_skipping():
    model = Linear(nnx.Rngs(0))
    tx = oc.skip_spikes(
        optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1)), window=4
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))

    @nnx.jit
    def step(model, optimizer, loss):
        optimizer.update(model, grads, value=loss)

    for loss in (1.0, 1.1, 0.9, 1.0):
        step(model, optimizer, loss)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    step(model, optimizer, 100.0)  # loss spike, ordinary gradient: skipped
    assert_trees_close(nnx.state(model, nnx.Param), before, 0, 0)
    assert int(optimizer.opt_state.skipped[...]) == 1
    step(model, optimizer, 1.0)
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(np.asarray(a), b),
        nnx.state(model, nnx.Param),
        before,
    )
    assert all(jax.tree.leaves(changed))
    found = oc.stats(optimizer)
    (clip,) = [s for s in found if float(s.threshold) == 1.0]
    assert len(found) == 2
    assert int(clip.count) == 5  # the inner clip never saw the skipped step
