"""clip_by_spectral_norm: each matrix's singular values clamped to the bound.

The references are written here in NumPy (float64) from the definitions: the
exact clamp ``U diag(min(s, b)) V^T``, SPECTRA's soft clip as its official
code computes it (``clip_sigvals`` in mlolab/llm-spectral-clipping,
``src/optim/post_process.py``: ten coupled Newton-Schulz iterations on
``(I + X X^T / c^2) / alpha``), and its closed form
``s -> s / sqrt(1 + s^2 / c^2)``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
from optaxclip import rules

# A tall and a wide matrix, a stack of three square layers, and leaves that
# are not matrices (a vector, a scalar, an integer leaf, None).
STACK = {"tall": 0, "wide": 0, "layers": 1, "bias": 0, "scale": 0, "step": 0, "none": 0}


def make_tree(seed: int, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    shapes = {"tall": (7, 4), "wide": (3, 6), "layers": (3, 5, 5), "bias": (5,)}
    tree = {k: scale * rng.standard_normal(s) for k, s in shapes.items()}
    tree = {k: jnp.asarray(v, jnp.float32) for k, v in tree.items()}
    tree["scale"] = jnp.asarray(2.5 * scale, jnp.float32)
    tree["step"] = jnp.asarray([1, 2], jnp.int32)
    tree["none"] = None
    return tree


def matrices(tree: dict) -> list[np.ndarray]:
    """The matrices of ``tree`` in the order of ``stats.norm`` (leaf order)."""
    out = []
    for k in sorted(tree):  # a dict flattens in key order
        if k in ("tall", "wide"):
            out.append(np.asarray(tree[k], np.float64))
        elif k == "layers":
            out.extend(np.asarray(tree[k], np.float64))
    return out


def np_clamp(x: np.ndarray, bound: float) -> np.ndarray:
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    return (u * np.minimum(s, bound)) @ vt


def np_soft_closed_form(x: np.ndarray, c: float) -> np.ndarray:
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    return (u * (s / np.sqrt(1 + s**2 / c**2))) @ vt


def np_soft_official(x: np.ndarray, c: float, steps: int = 10) -> np.ndarray:
    """SPECTRA's ``clip_sigvals`` on one matrix, step by step, in float64."""
    tall = x.shape[0] > x.shape[1]
    a = x.T if tall else x
    gram = a @ a.T
    bound = min(np.abs(gram).sum(axis=-1).max(), np.linalg.norm(gram))
    eye = np.eye(gram.shape[0])
    alpha = 1.0 + bound / c**2
    y, z = (eye + gram / c**2) / alpha, eye
    for _ in range(steps):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    out = z / np.sqrt(alpha) @ a
    return out.T if tall else out


def outputs(updates: dict) -> list[np.ndarray]:
    return matrices(updates)


def top_singular_values(tree: dict) -> np.ndarray:
    return np.array([np.linalg.svd(m, compute_uv=False)[0] for m in matrices(tree)])


def entries(tree: dict) -> tuple[np.ndarray, np.ndarray]:
    """``stats.norm`` as expected: one entry per float leaf or stacked slice
    (as ``clip_by_norm``), a matrix's top singular value or 0; and which
    entries are matrices."""
    norms, is_matrix = [], []
    for k in sorted(tree):
        if k in ("tall", "wide", "layers"):
            tops = top_singular_values({k: tree[k]})
            norms.extend(tops)
            is_matrix.extend([True] * len(tops))
        elif k in ("bias", "scale"):
            norms.append(0.0)
            is_matrix.append(False)
    return np.array(norms), np.array(is_matrix)


def run(tx, tree, jit: bool = True):
    update = jax.jit(tx.update) if jit else tx.update
    return update(tree, tx.init(tree))


def assert_matrices_close(actual, expected, rtol, what=""):
    for a, e in zip(actual, expected, strict=True):
        # Relative to each matrix's largest entry (a few entries are near 0).
        np.testing.assert_allclose(
            a, e, rtol=rtol, atol=rtol * np.abs(e).max(), err_msg=what
        )


def assert_non_matrices_unchanged(out: dict, tree: dict) -> None:
    for k in ("bias", "scale", "step"):
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(tree[k]))
        assert out[k].dtype == tree[k].dtype
    assert out["none"] is None


# ---------------------------------------------------------------------------
# Exact mode
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [True, False])
def test_exact_equals_numpy_svd_clamp(jit):
    tree = make_tree(0)
    bound = 1.5
    tx = oc.clip_by_spectral_norm(bound, stacked_axes=STACK)
    out, state = run(tx, tree, jit)
    expected = [np_clamp(m, bound) for m in matrices(tree)]
    assert_matrices_close(outputs(out), expected, 1e-5)
    assert_non_matrices_unchanged(out, tree)
    # Every matrix here is clipped: its top singular value is now the bound.
    tops = top_singular_values(tree)
    assert np.all(tops > bound)
    np.testing.assert_allclose(top_singular_values(out), bound, rtol=1e-5)
    s = state.stats
    norms, is_matrix = entries(tree)
    assert s.norm.shape == (7,) and int(np.sum(is_matrix)) == 5
    np.testing.assert_allclose(np.asarray(s.norm), norms, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(s.threshold), bound)
    scale = np.where(is_matrix, bound / np.where(is_matrix, norms, 1), 1)
    np.testing.assert_allclose(np.asarray(s.scale), scale, rtol=1e-5)
    assert int(s.clipped) == len(tops) == 5


def test_exact_leaves_matrices_under_the_bound_untouched():
    tree = make_tree(1)
    tops = top_singular_values(tree)
    bound = float(np.median(tops))  # some matrices above it, some under
    out, state = run(oc.clip_by_spectral_norm(bound, stacked_axes=STACK), tree)
    for a, x, top in zip(outputs(out), matrices(tree), tops, strict=True):
        if top <= bound:
            np.testing.assert_array_equal(a, np.asarray(x, np.float32))
        else:
            np.testing.assert_allclose(a, np_clamp(x, bound), rtol=1e-5, atol=1e-6)
    scale = np.asarray(state.stats.scale)[entries(tree)[1]]
    np.testing.assert_allclose(scale, np.minimum(1, bound / tops), rtol=1e-5)
    assert int(state.stats.clipped) == int(np.sum(tops > bound)) == 2


def test_exact_complex_and_low_precision_matrices():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((4, 3)) + 1j * rng.standard_normal((4, 3))
    h = rng.standard_normal((3, 5))
    tree = {"z": jnp.asarray(z, jnp.complex64), "h": jnp.asarray(h, jnp.bfloat16)}
    out, state = run(oc.clip_by_spectral_norm(1.0), tree)
    assert out["z"].dtype == jnp.complex64 and out["h"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out["z"]), np_clamp(z, 1.0), atol=1e-5)
    h16 = np.asarray(tree["h"].astype(jnp.float32), np.float64)
    np.testing.assert_allclose(
        np.asarray(out["h"].astype(jnp.float32)), np_clamp(h16, 1.0), atol=1e-2
    )
    np.testing.assert_allclose(
        np.asarray(state.stats.norm),
        [
            np.linalg.svd(h16, compute_uv=False)[0],
            np.linalg.svd(z, compute_uv=False)[0],
        ],
        rtol=1e-5,
    )


def test_zero_bound_zero_matrix_and_huge_entries():
    tree = {
        "a": jnp.asarray([[1.0, 2.0], [3.0, 4.0]]),
        "zero": jnp.zeros((3, 2)),
        # Squares overflow float32; the clip divides by the largest entry first.
        "huge": jnp.asarray([[1e30, 0.0], [0.0, 2e30]], jnp.float32),
    }
    for mode in ("exact", "soft"):
        out, state = run(oc.clip_by_spectral_norm(0.0, mode=mode), tree)
        for k in tree:
            np.testing.assert_array_equal(np.asarray(out[k]), 0.0)
        out, state = run(oc.clip_by_spectral_norm(1.0, mode=mode), tree)
        np.testing.assert_array_equal(np.asarray(out["zero"]), 0.0)
        huge = np.asarray(out["huge"])
        assert np.all(np.isfinite(huge)) and abs(huge[1, 1]) > 0.5, (mode, huge)
        if mode == "exact":
            np.testing.assert_allclose(huge, [[1.0, 0.0], [0.0, 1.0]], rtol=1e-6)
        assert int(state.stats.nonfinite_count) == 0


@pytest.mark.parametrize("policy", ["zero", "propagate"])
def test_nonfinite_entries(policy):
    tree = make_tree(3)
    tree["bias"] = tree["bias"].at[1].set(jnp.nan)  # not a matrix: still counts
    tx = oc.clip_by_spectral_norm(1.0, stacked_axes=STACK, nonfinite=policy)
    out, state = run(tx, tree)
    assert int(state.stats.nonfinite_count) == 1
    if policy == "zero":
        for x in jax.tree.leaves(out):
            if jnp.issubdtype(x.dtype, jnp.floating):
                np.testing.assert_array_equal(np.asarray(x), 0.0)
    else:
        assert np.isnan(np.asarray(out["bias"][1]))
        assert_matrices_close(
            outputs(out), [np_clamp(m, 1.0) for m in matrices(tree)], 1e-5
        )
    tree = make_tree(3)
    tree["wide"] = tree["wide"].at[0, 0].set(jnp.inf)
    out, state = run(oc.clip_by_spectral_norm(1.0, stacked_axes=STACK), tree)
    assert int(state.stats.nonfinite_count) == 1
    np.testing.assert_array_equal(np.asarray(out["tall"]), 0.0)


# ---------------------------------------------------------------------------
# Soft mode (SPECTRA)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bound", [0.5, 2.0, 50.0])
def test_soft_equals_the_official_iteration(bound):
    tree = make_tree(4, scale=3.0)
    out, _ = run(oc.clip_by_spectral_norm(bound, mode="soft", stacked_axes=STACK), tree)
    expected = [np_soft_official(m, bound) for m in matrices(tree)]
    assert_matrices_close(outputs(out), expected, 2e-5, f"bound {bound}")
    assert_non_matrices_unchanged(out, tree)


def test_soft_is_within_its_documented_factor_of_the_exact_clamp():
    """Each singular value ``s`` becomes ``s / sqrt(1 + s^2 / c^2)``, which
    lies in ``[min(s, c) / sqrt(2), min(s, c)]``; where ten iterations have
    converged (``s_max / c`` up to about 20) it equals that closed form."""
    tree = make_tree(5, scale=2.0)
    for c in (0.5, 1.0, 4.0):
        tx = oc.clip_by_spectral_norm(c, mode="soft", stacked_axes=STACK)
        out, _ = run(tx, tree)
        exact, _ = run(oc.clip_by_spectral_norm(c, stacked_axes=STACK), tree)
        for a, e, x in zip(outputs(out), outputs(exact), matrices(tree), strict=True):
            np.testing.assert_allclose(a, np_soft_closed_form(x, c), atol=1e-4)
            s_soft = np.linalg.svd(a, compute_uv=False)
            s_exact = np.linalg.svd(e, compute_uv=False)
            assert np.all(s_soft <= s_exact * (1 + 1e-4))
            assert np.all(s_soft >= s_exact / np.sqrt(2) * (1 - 1e-4))


def test_soft_far_above_the_bound_follows_the_official_iteration():
    # s_max / c near 1000: ten iterations have not converged for the small
    # singular values; the result is the official code's, not the closed form.
    x = np.diag([1000.0, 1.0, 0.1])
    out, _ = run(oc.clip_by_spectral_norm(1.0, mode="soft"), {"x": jnp.asarray(x)})
    got = np.asarray(out["x"], np.float64)
    np.testing.assert_allclose(got, np_soft_official(x, 1.0), rtol=1e-4, atol=1e-7)
    assert abs(got[1, 1] - np_soft_closed_form(x, 1.0)[1, 1]) > 0.1


def test_soft_top_singular_value_is_a_power_iteration_estimate():
    tree = make_tree(6)
    tx = oc.clip_by_spectral_norm(1.0, mode="soft", stacked_axes=STACK)
    _, state = run(tx, tree)
    estimate = np.asarray(state.stats.norm)[entries(tree)[1]]
    tops = top_singular_values(tree)
    assert np.all(estimate <= tops * (1 + 1e-5))  # from below
    np.testing.assert_allclose(estimate, tops, rtol=1e-4)
    assert int(state.stats.clipped) == int(np.sum(estimate > 1.0))


# ---------------------------------------------------------------------------
# Thresholds: numbers, schedules and rules over the top singular values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule",
    [rules.ema(ratio=1.05, warmup=1), rules.percentile(50.0, window=3)],
    ids=["ema", "percentile"],
)
def test_rules_observe_each_matrix_top_singular_value(rule):
    """The rule sees the vector of entries (a matrix's top singular value, 0
    for the bias and the scalar) and returns one bound per entry, which that
    matrix is clamped to."""
    tx = oc.clip_by_spectral_norm(rule, stacked_axes=STACK)
    step = jax.jit(tx.update)
    trees = [make_tree(10 + i, scale) for i, scale in enumerate([1.0, 3.0, 0.5, 2.0])]
    state = tx.init(trees[0])
    rule_state = rule.init(jnp.zeros((7,), jnp.float32))
    for count, tree in enumerate(trees):
        out, state = step(tree, state)
        norms, is_matrix = entries(tree)
        bounds, rule_state = rule.update(
            rule_state, jnp.asarray(norms, jnp.float32), jnp.asarray(count, jnp.int32)
        )
        bounds = np.asarray(bounds)
        assert bounds.shape == (7,)
        np.testing.assert_allclose(np.asarray(state.stats.threshold), bounds, rtol=1e-5)
        pairs = zip(matrices(tree), bounds[is_matrix], strict=True)
        expected = [np_clamp(m, b) for m, b in pairs]
        assert_matrices_close(outputs(out), expected, 1e-5, f"step {count}")
    assert int(state.stats.count) == len(trees)


def test_schedule_bound():
    schedule = optax.linear_schedule(2.0, 1.0, transition_steps=2)
    tx = oc.clip_by_spectral_norm(schedule, stacked_axes=STACK)
    state = tx.init(make_tree(0))
    for count in range(3):
        tree = make_tree(20 + count, 2.0)
        out, state = jax.jit(tx.update)(tree, state)
        bound = float(schedule(count))
        expected = [np_clamp(m, bound) for m in matrices(tree)]
        assert_matrices_close(outputs(out), expected, 1e-5)


def test_stacked_layers_are_clipped_as_separate_matrices():
    tree = make_tree(7)
    layers = np.asarray(tree["layers"], np.float64)
    out, state = run(oc.clip_by_spectral_norm(1.0, stacked_axes=STACK), tree)
    for i in range(layers.shape[0]):
        np.testing.assert_allclose(
            np.asarray(out["layers"][i]), np_clamp(layers[i], 1.0), rtol=1e-5, atol=1e-6
        )
    # Without stacked axes a 3-D leaf is not a matrix: it passes unchanged.
    out, state = run(oc.clip_by_spectral_norm(1.0), tree)
    np.testing.assert_array_equal(np.asarray(out["layers"]), np.asarray(tree["layers"]))
    assert state.stats.norm.shape == (5,)  # one per float leaf


def test_update_without_init_state_and_inject_hyperparams():
    tree = make_tree(8)
    del tree["step"], tree["none"]  # optax's inject_hyperparams needs floats
    stack = {k: STACK[k] for k in tree}
    tx = oc.clip_by_spectral_norm(1.0, stacked_axes=stack)
    fresh, _ = tx.update(tree, None)
    out, _ = run(tx, tree)
    for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(out), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    injected = optax.inject_hyperparams(
        oc.clip_by_spectral_norm, static_args=("stacked_axes",)
    )(max_norm=1.0, stacked_axes=stack)
    got, _ = jax.jit(injected.update)(tree, injected.init(tree))
    assert_matrices_close(outputs(got), outputs(out), 1e-6)


# ---------------------------------------------------------------------------
# Compile time: one batched decomposition per matrix shape
# ---------------------------------------------------------------------------


def _lowered(make, n: int):
    params = {f"m{i:03d}": jnp.zeros((16, 8), jnp.float32) for i in range(n)}
    tx = make()
    return jax.jit(tx.update).lower(params, tx.init(params))


def _kernels(hlo: str) -> int:
    """Distinct computations of compiled ``hlo``, up to names and metadata."""
    bodies = re.findall(r"^%\S+ \(.*?\{\n(.*?)\n\}", hlo, re.M | re.S)
    assert bodies, "no computation found in the compiled HLO"
    strip = lambda b: re.sub(r"%[\w.\-]+", "%", re.sub(r", metadata=\{[^}]*\}", "", b))  # noqa: E731
    return len({strip(b) for b in bodies})


@pytest.mark.parametrize("mode", ["exact", "soft"])
def test_compile_is_flat_in_the_number_of_matrices(mode):
    """10 and 100 equally shaped matrices: the same decompositions (one
    batched SVD, or one batched Newton-Schulz iteration) and about as many
    distinct kernels, as a per-tensor norm clip grows."""
    few, many = (
        _lowered(lambda: oc.clip_by_spectral_norm(1.0, mode=mode), n) for n in (10, 100)
    )
    text_few, text_many = few.as_text(), many.as_text()
    ops = {"exact": r"svd", "soft": r"dot_general"}[mode]
    count_few = len(re.findall(ops, text_few))
    assert count_few > 0
    assert len(re.findall(ops, text_many)) == count_few
    norm_few, norm_many = (_lowered(lambda: oc.clip_by_norm(1.0), n) for n in (10, 100))
    norm_growth = _kernels(norm_many.compile().as_text()) - _kernels(
        norm_few.compile().as_text()
    )
    growth = _kernels(many.compile().as_text()) - _kernels(few.compile().as_text())
    # A slice read per matrix would add a kernel per matrix (90 here).
    assert growth <= norm_growth + 8, (growth, norm_growth)


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"mode.*'exact', 'soft'.*'svd'"):
        oc.clip_by_spectral_norm(1.0, mode="svd")
    with pytest.raises(ValueError, match=r"max_norm.*-1"):
        oc.clip_by_spectral_norm(-1.0)
    with pytest.raises(ValueError, match="stacked_axes"):
        oc.clip_by_spectral_norm(1.0, stacked_axes=-1)
    with pytest.raises(ValueError, match="per_tensor_stats"):
        oc.clip_by_spectral_norm(1.0, per_tensor_stats="yes")
