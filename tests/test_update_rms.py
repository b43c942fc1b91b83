"""clip_update_rms: Adafactor's update clipping, after the optimizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

SHAPES = {"w": (6, 5), "b": (5,), "k": (3, 4, 2), "s": ()}


def _grads(seed: int, scale: float) -> dict:
    rng = np.random.default_rng(seed)
    return {
        k: jnp.asarray(scale * rng.standard_normal(s), jnp.float32)
        for k, s in SHAPES.items()
    }


def _adafactor_chain(clip):
    # The chain optax.adafactor builds (its defaults), with ``clip`` in place
    # of its optax.clip_by_block_rms(clipping_threshold).
    return optax.chain(
        optax.scale_by_factored_rms(),
        clip,
        optax.scale_by_learning_rate(1e-2, flip_sign=False),
        optax.scale_by_param_block_rms(),
        optax.scale(-1),
    )


def test_equals_adafactor_clipping_threshold_step_by_step():
    ours = _adafactor_chain(oc.clip_update_rms(1.0))
    theirs = optax.adafactor(1e-2, clipping_threshold=1.0)
    params = _grads(0, 1.0)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    # Ordinary steps, one with gradients 1e4 times larger, one tiny.
    scales = [1.0, 0.5, 2.0, 1e4, 1.0, 1e-3, 1.0, 3.0, 1.0, 1.0]
    clipped = []
    with jax.numpy_dtype_promotion("standard"):  # optax's factored rms
        for step, scale in enumerate(scales):
            g = _grads(100 + step, scale)
            u_ours, s_ours = jax.jit(ours.update)(g, s_ours, params)
            u_theirs, s_theirs = jax.jit(theirs.update)(g, s_theirs, params)
            for k in SHAPES:
                np.testing.assert_allclose(
                    u_ours[k], u_theirs[k], rtol=1e-6, atol=1e-12, err_msg=f"{step} {k}"
                )
            params = optax.apply_updates(params, u_theirs)
            clipped.append(int(np.sum(oc.stats(s_ours)[0].clipped)))
    # The run clipped tensors on some steps and passed them on others.
    assert max(clipped) > 0 and min(clipped) == 0, clipped


def _numpy_update_rms(u: np.ndarray, threshold: float) -> np.ndarray:
    u = u.astype(np.float64)
    rms = np.sqrt(np.mean(u * u)) if u.size else 0.0
    return u / max(1.0, rms / threshold)


@pytest.mark.parametrize("threshold", [0.3, 1.0, 5.0])
def test_matches_numpy_reference(threshold):
    tx = oc.clip_update_rms(threshold)
    g = _grads(7, 2.0)
    out, state = jax.jit(tx.update)(g, tx.init(g))
    for k in SHAPES:
        np.testing.assert_allclose(
            np.asarray(out[k]),
            _numpy_update_rms(np.asarray(g[k]), threshold),
            rtol=1e-6,
            atol=1e-12,
        )
    rms = [np.sqrt(np.mean(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(g)]
    np.testing.assert_allclose(np.asarray(state.stats.norm), rms, rtol=1e-6)


def test_stacked_axes_clip_each_layer_as_t5x_averaging_dims():
    # t5x averages over a tensor's axes other than its scanned ones.
    rng = np.random.default_rng(3)
    layers = (
        rng.standard_normal((4, 5, 3)) * np.array([0.1, 1.0, 3.0, 9.0])[:, None, None]
    )
    tx = oc.clip_update_rms(1.0, stacked_axes=1)
    g = {"w": jnp.asarray(layers, jnp.float32)}
    out, _ = tx.update(g, tx.init(g))
    expected = np.stack([_numpy_update_rms(x, 1.0) for x in layers])
    np.testing.assert_allclose(np.asarray(out["w"]), expected, rtol=1e-6)


def test_nonfinite_tensor_is_zeroed_or_propagated():
    g = {"a": jnp.asarray([3.0, jnp.inf]), "b": jnp.asarray([3.0, 4.0])}
    zero, _ = oc.clip_update_rms(1.0).update(g, None)
    np.testing.assert_array_equal(np.asarray(zero["a"]), 0.0)
    np.testing.assert_array_equal(np.asarray(zero["b"]), 0.0)
    kept, _ = oc.clip_update_rms(1.0, nonfinite="propagate").update(g, None)
    theirs, _ = optax.clip_by_block_rms(1.0).update(g, optax.EmptyState())
    for k in g:
        np.testing.assert_array_equal(np.asarray(kept[k]), np.asarray(theirs[k]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"threshold": -1.0}, "clip_update_rms: `threshold`.*-1.0"),
        ({"threshold": float("nan")}, "clip_update_rms: `threshold`"),
        ({"nonfinite": "skip"}, "clip_update_rms: `nonfinite`.*'skip'"),
        ({"stacked_axes": -1}, "clip_update_rms: `stacked_axes`.*-1"),
        ({"per_tensor_stats": "yes"}, "clip_update_rms: `per_tensor_stats`"),
    ],
)
def test_bad_arguments_name_clip_update_rms(kwargs, match):
    with pytest.raises(ValueError, match=match):
        oc.clip_update_rms(**kwargs)
