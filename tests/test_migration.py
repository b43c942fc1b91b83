"""What docs/migration-stacks.md promises a port from the JAX training stacks.

A bit-identical port (``nonfinite="propagate"`` against optax over whole
jitted Adam steps), the Muon partition (orthogonalized leaves pass the clip
untouched and stay out of its norm), and the guard inside
``optax.MultiSteps`` (the accumulated gradient is checked, the
``MultiStepsState`` stays readable). Expected values come from optax itself
or from NumPy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

# optax.adam and optax.MultiSteps mix Python floats and int32 counts, which
# the suite's strict promotion rejects; users run them under the standard one.
pytestmark = pytest.mark.usefixtures("standard_promotion")


@pytest.fixture
def standard_promotion():
    with jax.numpy_dtype_promotion("standard"):
        yield


def _tiny_mlp(seed):
    rng = np.random.default_rng(seed)
    params = {
        "w1": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
        "b1": jnp.asarray(rng.normal(size=(5,)) * 0.1, jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    return params, x, y


@pytest.mark.parametrize("compute", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_propagate_adam_steps_are_bit_identical_to_optax(compute):
    # float32 parameters and gradients; the forward pass in `compute` (nanodo's
    # mixed precision for bfloat16). Spiky batches make some steps clip.
    params, x, y = _tiny_mlp(0)
    threshold = 2.3

    def loss_fn(p, x, y):
        p = jax.tree.map(lambda a: a.astype(compute), p)
        h = jnp.tanh(x.astype(compute) @ p["w1"] + p["b1"][None, :])
        return jnp.mean(((h @ p["w2"]).astype(jnp.float32) - y) ** 2)

    def make_step(clip):
        tx = optax.chain(clip, optax.adam(1e-2))

        @jax.jit
        def step(p, s, x):
            loss, g = jax.value_and_grad(loss_fn)(p, x, y)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, loss, optax.tree.norm(g)

        return tx, step

    runs = []
    for clip in (
        optax.clip_by_global_norm(threshold),
        oc.clip_by_global_norm(threshold, nonfinite="propagate"),
    ):
        tx, step = make_step(clip)
        p, s, trace = params, tx.init(params), []
        for i in range(12):
            p, s, loss, norm = step(p, s, x * (8.0 if i % 4 == 2 else 1.0))
            trace.append((p, loss, float(norm)))
        runs.append(trace)

    norms = [norm for _, _, norm in runs[0]]
    assert min(norms) < threshold < max(norms)  # both branches of the clip ran
    for i, ((p_ref, l_ref, _), (p_ours, l_ours, _)) in enumerate(
        zip(*runs, strict=True)
    ):
        assert np.asarray(l_ref).tobytes() == np.asarray(l_ours).tobytes(), i
        for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_ours), strict=True):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), i


def _muon_labels(params):
    # optax.contrib.muon's default split: matrices are orthogonalized.
    return jax.tree.map(lambda p: "muon" if p.ndim == 2 else "adam", params)


def test_muon_partition_clips_only_the_non_orthogonalized_leaves():
    rng = np.random.default_rng(1)
    params = {
        "w1": jnp.zeros((4, 3)),
        "w2": jnp.zeros((3, 2)),
        "b": jnp.zeros(3),
        "scale": jnp.zeros(2),
    }
    grads = {
        "w1": jnp.asarray(rng.normal(size=(4, 3)) * 50.0, jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(3, 2)) * 50.0, jnp.float32),
        "b": jnp.asarray([3.0, -4.0, 12.0], jnp.float32),
        "scale": jnp.asarray([0.0, 5.0], jnp.float32),
    }
    bound = 2.0
    clip = optax.partition(
        {"muon": optax.identity(), "adam": oc.clip_by_global_norm(bound)}, _muon_labels
    )

    clipped, state = clip.update(grads, clip.init(params))

    adam_norm = np.sqrt(
        sum(np.sum(np.asarray(grads[k], np.float64) ** 2) for k in ("b", "scale"))
    )
    assert adam_norm == pytest.approx(np.sqrt(9 + 16 + 144 + 25))
    for k in ("w1", "w2"):  # untouched, bit for bit
        assert np.asarray(clipped[k]).tobytes() == np.asarray(grads[k]).tobytes()
    for k in ("b", "scale"):
        np.testing.assert_allclose(
            clipped[k], np.asarray(grads[k]) * bound / adam_norm, rtol=1e-6
        )
    # The recorded norm is the non-Muon leaves' alone.
    np.testing.assert_allclose(oc.metrics(state)["clip/norm"], adam_norm, rtol=1e-6)

    # Through the whole optimizer: Muon gets the raw matrices, Adam the
    # clipped vectors.
    tx = optax.chain(clip, optax.contrib.muon(learning_rate=0.02))
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    reference = dict(grads)
    for k in ("b", "scale"):
        reference[k] = jnp.asarray(
            np.asarray(grads[k], np.float64) * bound / adam_norm, jnp.float32
        )
    muon = optax.contrib.muon(learning_rate=0.02)
    expected, _ = jax.jit(muon.update)(reference, muon.init(params), params)
    for k in params:
        np.testing.assert_allclose(
            updates[k], expected[k], rtol=1e-5, atol=1e-7, err_msg=k
        )


def test_guard_inside_multisteps_checks_the_accumulated_step():
    k, lr, bound = 2, 0.1, 2.05
    inner = oc.skip_spikes(
        optax.chain(oc.clip_by_global_norm(bound), optax.sgd(lr, momentum=0.9)),
        window=8,
        sigma=3.0,
    )
    tx = optax.MultiSteps(inner, every_k_schedule=k)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    update = jax.jit(tx.update)

    # Micro-batch pairs whose means have norms 1.9, 2.2 (clipped) and 2.0;
    # then one whose mean spikes (norm 40.5) although its last micro-batch
    # alone is ordinary.
    pairs = [
        ([1.8, 0.0], [2.0, 0.0]),
        ([0.0, 2.1], [0.0, 2.3]),
        ([1.2, 1.6], [1.2, 1.6]),
    ] * 2
    pairs.append(([79.0, 0.0], [2.0, 0.0]))
    momentum = np.zeros(2)
    for step, micro in enumerate(pairs, start=1):
        before = state.inner_opt_state.inner_state
        for g in micro:
            out, state = update(
                {"w": jnp.asarray(g)}, state, params, value=jnp.float32(1.0)
            )
        mean = np.mean(np.asarray(micro, np.float64), axis=0)
        norm = np.linalg.norm(mean)
        # The MultiSteps state is still on top and counts optimizer steps.
        assert int(state.gradient_step) == step and int(state.mini_step) == 0
        guard = oc.stats(state)[-1]
        np.testing.assert_allclose(
            guard.norm, norm, rtol=1e-6
        )  # the accumulated gradient
        if step < len(pairs):
            clipped = mean * min(1.0, bound / norm)
            momentum = 0.9 * momentum + clipped
            np.testing.assert_allclose(out["w"], -lr * momentum, rtol=1e-5, atol=1e-7)
            assert int(state.inner_opt_state.skipped) == 0
        else:
            np.testing.assert_array_equal(out["w"], np.zeros(2))
            assert int(state.inner_opt_state.skipped) == 1
            for a, b in zip(
                jax.tree.leaves(before),
                jax.tree.leaves(state.inner_opt_state.inner_state),
                strict=True,
            ):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("spike_at", [0, 1], ids=["first_micro", "last_micro"])
def test_guard_inside_multisteps_checks_the_last_micro_batch_loss(spike_at):
    # MultiSteps passes `value` on every call and keeps the inner state of
    # the k-th only: the guard judges the loss given with the last micro-batch.
    tx = optax.MultiSteps(
        oc.skip_spikes(optax.sgd(0.1), window=8, sigma=3.0), every_k_schedule=2
    )
    params = {"w": jnp.zeros(1)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95]  # losses, and gradients alike
    for value in history:
        for _ in range(2):
            g = {"w": jnp.full(1, value)}
            _, state = update(g, state, params, value=jnp.float32(value))
    for micro in range(2):
        loss = 50.0 if micro == spike_at else 1.0
        out, state = update({"w": jnp.ones(1)}, state, params, value=jnp.float32(loss))
    skipped = int(state.inner_opt_state.skipped)
    assert skipped == (1 if spike_at == 1 else 0)
    assert float(out["w"][0]) == (0.0 if spike_at == 1 else pytest.approx(-0.1))
