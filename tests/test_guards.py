"""Guards: a skipped step leaves the inner optimizer exactly as it was."""

from __future__ import annotations

import functools

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
from tests.helpers import first, make_stream

STEPS = 320


def scan_guard(tx, stream, losses=None, state=None):
    """Runs ``tx`` over the stream in one scan; returns (final state, per-step)."""
    state = tx.init(first(stream)) if state is None else state
    with jax.numpy_dtype_promotion("standard"):  # optax.adam's bias correction
        return _runner(tx)(state, stream, losses, first(stream))


@functools.cache
def _runner(tx):
    def body(params, state, xs):
        grads, loss = xs
        extra = {} if loss is None else {"value": loss}
        out, new = tx.update(grads, state, params, **extra)
        return new, (out, new)

    return jax.jit(
        lambda s, x, v, p: jax.lax.scan(functools.partial(body, p), s, (x, v))
    )


def bad_steps(stream):
    leaves = [np.asarray(x) for x in stream.values()]
    return np.array(
        [
            not all(np.all(np.isfinite(x[t])) for x in leaves)
            for t in range(len(leaves[0]))
        ]
    )


# The guarded step and its reference (optax's guard, or a scan of bare Adam)
# compile to different fusions, which XLA rounds differently in float32
# (newer JAX more often than older). Adam's moments are averages whose small
# entries come from cancellation, so their rounding error is a few ulp of the
# array's largest magnitude, not of the entry itself; the slow second moment
# gathers a few such ulp over the run (up to 8 seen on jax 0.12).
ROUNDING = 16 * float(np.finfo(np.float32).eps)


def assert_equal_to_rounding(actual, desired):
    """Equal up to float32 rounding at the scale of ``desired`` (NaN alike)."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    scale = float(np.max(np.abs(desired[np.isfinite(desired)]), initial=0.0))
    np.testing.assert_allclose(actual, desired, rtol=1e-6, atol=ROUNDING * scale)


def assert_unchanged_when_skipped(init_inner, inner_states, skipped):
    """Inner state after a skipped step is bit-identical to the one before it."""
    for t in np.flatnonzero(skipped):
        before = (
            init_inner
            if t == 0
            else jax.tree.map(lambda x, t=t: x[t - 1], inner_states)
        )
        after = jax.tree.map(lambda x, t=t: x[t], inner_states)
        for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------
# skip_nonfinite
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_consecutive", [None, 0, 1])
def test_skip_nonfinite_matches_apply_if_finite(max_consecutive):
    stream = make_stream(30, steps=STEPS)
    # two non-finite steps in a row, to exercise max_consecutive
    stream = {
        k: v.at[100:102].set(jnp.nan) if k == "p1" else v for k, v in stream.items()
    }
    tx = oc.skip_nonfinite(optax.adam(1e-2), max_consecutive=max_consecutive)
    _, (outs, states) = scan_guard(tx, stream)
    bad = bad_steps(stream)
    assert bad.sum() >= 8
    if max_consecutive is None:
        skipped = bad
    else:
        reference = optax.apply_if_finite(
            optax.adam(1e-2), max_consecutive_errors=max_consecutive
        )
        _, (ref_outs, ref_states) = scan_guard(reference, stream)
        for k in outs:
            assert_equal_to_rounding(outs[k], ref_outs[k])
        for a, b in zip(
            jax.tree.leaves(states.inner_state),
            jax.tree.leaves(ref_states.inner_state),
            strict=True,
        ):
            assert_equal_to_rounding(a, b)
        skipped = ~np.asarray(ref_states.last_finite)
        skipped &= np.asarray(ref_states.notfinite_count) <= max_consecutive
    assert_unchanged_when_skipped(
        tx.init(first(stream)).inner_state, states.inner_state, skipped
    )
    for k in outs:
        np.testing.assert_array_equal(np.asarray(outs[k])[skipped], 0.0)
    assert int(states.stats.nonfinite_count[-1]) == bad.sum()
    np.testing.assert_array_equal(states.stats.clipped, skipped.astype(np.int32))
    np.testing.assert_array_equal(
        states.inner_state[0].count[-1], STEPS - skipped.sum()
    )


def test_skip_nonfinite_reads_inf_nan_and_overflowing_tensors_as_nonfinite():
    tx = oc.skip_nonfinite(optax.sgd(1.0, momentum=0.9))
    params = {"w": jnp.zeros(2), "b": jnp.zeros(3)}
    cases = {
        "nan": ({"w": jnp.array([1.0, jnp.nan]), "b": jnp.ones(3)}, False),
        "inf": ({"w": jnp.array([1.0, -jnp.inf]), "b": jnp.ones(3)}, False),
        # documented: this tensor's float32 sum of squares overflows
        "1e30": ({"w": jnp.array([1e30, 1.0]), "b": jnp.ones(3)}, False),
        # every tensor's sum is finite, only the total overflows: applied
        "large": ({"w": jnp.full((2,), 1.2e19), "b": jnp.full((3,), 1e19)}, True),
    }
    for name, (grads, applied) in cases.items():
        out, state = jax.jit(tx.update)(grads, tx.init(params), params)
        assert int(state.stats.clipped) == (0 if applied else 1), name
        if applied:
            np.testing.assert_allclose(out["w"], -np.asarray(grads["w"]), rtol=1e-6)
        else:
            assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(out))


# ---------------------------------------------------------------------------
# skip_spikes
# ---------------------------------------------------------------------------


def skip_reference(norms, losses, window, sigma, min_history):
    """OLMo-core SkipStepOptimizer: compare with the previous ``window`` values."""
    history_n, history_l = [], []
    skips, bounds = [], []
    for t, n in enumerate(norms):
        loss = None if losses is None else float(losses[t])
        if not np.isfinite(n) or (loss is not None and not np.isfinite(loss)):
            skips.append(True)
            bounds.append(None)
            continue
        skip, bound = False, np.inf
        for history, x, is_norm in ((history_n, n, True), (history_l, loss, False)):
            if x is None:
                continue
            previous = history[-window:]
            if len(previous) + 1 >= min_history and len(previous) >= 2:
                limit = np.mean(previous) + sigma * np.std(previous, ddof=1)
                skip |= x - np.mean(previous) > sigma * np.std(previous, ddof=1)
                if is_norm:
                    bound = limit
            if not is_norm or x > 0:  # documented difference: zero norms
                history.append(x)
        skips.append(bool(skip))
        bounds.append(bound)
    return np.array(skips), bounds


def loss_stream(seed, steps=STEPS):
    rng = np.random.default_rng(seed)
    losses = 3.0 + 0.1 * rng.normal(size=steps) - np.linspace(0, 1, steps)
    losses[rng.choice(np.arange(60, steps), 6, replace=False)] += 5.0
    losses[150] = np.nan
    return jnp.asarray(losses, jnp.float32)


@pytest.mark.parametrize(
    "window,sigma,with_loss",
    [(128, 6.0, False), (32, 3.0, True), (10, 4.0, True), (64, 2.5, False)],
)
def test_skip_spikes_matches_olmo_core_reference(window, sigma, with_loss):
    stream = make_stream(31, steps=STEPS)
    losses = loss_stream(32) if with_loss else None
    tx = oc.skip_spikes(optax.adam(1e-2), window=window, sigma=sigma)
    _, (outs, states) = scan_guard(tx, stream, losses)
    leaves = [np.asarray(stream[k], np.float64) for k in sorted(stream)]
    norms = [
        float(np.sqrt(sum(np.sum(x[t] ** 2) for x in leaves))) for t in range(STEPS)
    ]
    skips, bounds = skip_reference(
        norms,
        None if losses is None else np.asarray(losses),
        window,
        sigma,
        max(3, window // 2),
    )
    np.testing.assert_array_equal(
        np.asarray(states.stats.clipped), skips.astype(np.int32)
    )
    assert skips.sum() > bad_steps(stream).sum()  # spikes were skipped, not only NaN
    for t, bound in enumerate(bounds):
        if bound is not None:
            np.testing.assert_allclose(states.stats.threshold[t], bound, rtol=1e-5)
    assert int(states.skipped[-1]) == skips.sum()

    # skipped steps: zero update, Adam's state bit-identical
    assert_unchanged_when_skipped(
        tx.init(first(stream)).inner_state, states.inner_state, skips
    )
    for k in outs:
        np.testing.assert_array_equal(np.asarray(outs[k])[skips], 0.0)
    # applied steps: exactly Adam on the stream of applied gradients
    kept = jax.tree.map(lambda x: x[~skips], stream)
    adam = optax.adam(1e-2)
    with jax.numpy_dtype_promotion("standard"):
        _, ref = jax.lax.scan(
            lambda s, g: adam.update(g, s, first(stream))[::-1],
            adam.init(first(stream)),
            kept,
        )
    for k in outs:
        assert_equal_to_rounding(np.asarray(outs[k])[~skips], ref[k])


def test_skip_spikes_never_checks_before_min_history():
    values = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 50.0, 1.0, 1000.0]
    grads = jnp.asarray(values)[:, None]
    tx = oc.skip_spikes(optax.sgd(1.0), window=16, sigma=3.0)  # checks from 8 values
    _, (outs, states) = scan_guard(tx, {"w": grads})
    # the spike at index 6 comes before 8 values were recorded: not checked
    np.testing.assert_array_equal(states.stats.clipped, [0, 0, 0, 0, 0, 0, 0, 0, 1])
    assert bool(jnp.all(jnp.isinf(states.stats.threshold[:7])))
    previous = np.array(values[:8])
    np.testing.assert_allclose(
        states.stats.threshold[8], previous.mean() + 3 * previous.std(ddof=1), rtol=1e-5
    )
    np.testing.assert_array_equal(outs["w"][8], 0.0)


def test_guards_are_found_by_stats_and_compose():
    tx = oc.skip_spikes(
        oc.skip_nonfinite(optax.chain(oc.zclip(warmup_steps=3), optax.adam(1e-3))),
        window=8,
    )
    stream = make_stream(33, steps=40)
    state, _ = scan_guard(tx, stream)
    zclip, inner_guard, outer_guard = oc.stats(state)
    assert int(outer_guard.count) == 40
    assert int(state.skipped) >= int(bad_steps(stream).sum()) > 0
    # the inner guard and ZClip only ever saw the steps the outer guard let through
    assert int(inner_guard.count) == 40 - int(state.skipped)
    assert int(zclip.count) == int(inner_guard.count)
    assert int(zclip.nonfinite_count) == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: oc.skip_nonfinite(optax.adam(1e-2)),
        lambda: oc.skip_spikes(optax.adam(1e-2), 8),
    ],
)
def test_guard_state_saves_restores_and_vmaps(make):
    tx = make()
    streams = [make_stream(s, steps=40) for s in (34, 35)]
    half = lambda tree, h: jax.tree.map(lambda x: x[20 * h : 20 * (h + 1)], tree)  # noqa: E731
    mid, _ = scan_guard(tx, half(streams[0], 0))
    end, second = scan_guard(tx, half(streams[0], 1), state=mid)
    restored = flax.serialization.from_bytes(
        tx.init(first(streams[0])), flax.serialization.to_bytes(mid)
    )
    end2, second2 = scan_guard(tx, half(streams[0], 1), state=restored)
    for a, b in zip(
        jax.tree.leaves((end, second)), jax.tree.leaves((end2, second2)), strict=True
    ):
        np.testing.assert_array_equal(a, b)

    halves = [half(s, 0) for s in streams]
    both = jax.tree.map(lambda *x: jnp.stack(x), *halves)
    batched = jax.vmap(lambda s: scan_guard(tx, s)[1])(both)
    for i, s in enumerate(halves):
        single = scan_guard(tx, s)[1]
        for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(batched), strict=True):
            np.testing.assert_allclose(b[i], a, rtol=1e-6)


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda: oc.skip_nonfinite(optax.sgd(1.0), max_consecutive=-1),
            "`max_consecutive`.*-1",
        ),
        (lambda: oc.skip_spikes(optax.sgd(1.0), window=1), "`window`.*1"),
        (lambda: oc.skip_spikes(optax.sgd(1.0), sigma=-1.0), "`sigma`.*-1.0"),
        (lambda: oc.skip_spikes(optax.sgd(1.0), min_history=2), "`min_history`.*2"),
    ],
)
def test_bad_guard_arguments_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_skip_spikes_recovers_from_a_long_run_of_zero_gradients():
    """Zero-norm steps are applied and not recorded: after 600 of them the
    first non-zero step is checked as if the run had not happened (OLMo-core
    would skip it and the next ones, against a history of zeros)."""
    rng = np.random.default_rng(34)
    before, zeros, after = 60, 600, 60
    level = np.exp(rng.normal(0.0, 0.2, size=before + zeros + after))
    level[[20, 45, 700]] *= 30.0  # spikes, one after the zero run
    grads = rng.normal(size=(before + zeros + after, 3)) * level[:, None]
    grads[before : before + zeros] = 0.0
    kept = np.r_[0:before, before + zeros : len(grads)]
    tx = oc.skip_spikes(optax.sgd(1.0), window=32, sigma=2.0)
    _, (outs, states) = scan_guard(tx, {"w": jnp.asarray(grads, jnp.float32)})
    _, (ref_outs, ref_states) = scan_guard(
        tx, {"w": jnp.asarray(grads[kept], jnp.float32)}
    )
    skipped = np.asarray(states.stats.clipped)
    ref_skipped = np.asarray(ref_states.stats.clipped)
    # zero steps are applied (not skipped), and the history is untouched
    np.testing.assert_array_equal(skipped[before : before + zeros], 0)
    np.testing.assert_array_equal(
        states.rule_state.count[before + zeros - 1],
        ref_states.rule_state.count[before - 1],
    )
    # afterwards every decision and bound equals the run without zeros
    np.testing.assert_array_equal(skipped[before + zeros :], ref_skipped[before:])
    np.testing.assert_allclose(
        states.stats.threshold[before + zeros :],
        ref_states.stats.threshold[before:],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        outs["w"][before + zeros :], ref_outs["w"][before:], rtol=1e-6
    )
    assert ref_skipped[before:].sum() == 1  # the spike at step 700, nothing else


# ---------------------------------------------------------------------------
# The skip action takes any rule
# ---------------------------------------------------------------------------


def stream_norms(stream):
    leaves = [np.asarray(stream[k], np.float64) for k in sorted(stream)]
    return np.array(
        [np.sqrt(sum(np.sum(x[t] ** 2) for x in leaves)) for t in range(len(leaves[0]))]
    )


def test_skip_spikes_with_a_fixed_rule_skips_every_norm_above_it():
    stream = make_stream(41, steps=60)
    norms = stream_norms(stream)
    bound = float(np.nanmedian(norms[np.isfinite(norms)]))
    tx = oc.skip_spikes(optax.sgd(0.1, momentum=0.9), rule=bound)
    _, (outs, states) = scan_guard(tx, stream)
    expected = ~np.isfinite(norms) | (norms > bound)
    assert 0 < expected.sum() < len(norms)
    np.testing.assert_array_equal(np.asarray(states.stats.clipped), expected)
    np.testing.assert_allclose(np.asarray(states.stats.threshold), bound, rtol=1e-6)
    for k in outs:
        np.testing.assert_array_equal(np.asarray(outs[k])[expected], 0.0)
    assert_unchanged_when_skipped(
        tx.init(first(stream)).inner_state, states.inner_state, expected
    )


def test_skip_spikes_with_zscore_skips_where_the_rule_bounds_the_norm():
    # The guard skips exactly where the rule's bound is below the norm, with
    # the rule learning from every finite step (spikes included).
    stream = make_stream(42, steps=80)
    norms = stream_norms(stream)
    rule = oc.rules.zscore(warmup=5, max_norm=None)
    tx = oc.skip_spikes(optax.sgd(0.1), rule=rule)
    _, (_, states) = scan_guard(tx, stream)
    state = rule.init(jnp.zeros((), jnp.float32))
    expected = []
    for t, n in enumerate(norms):
        if not np.isfinite(n):
            expected.append(True)
            continue
        bound, state = rule.update(state, jnp.float32(n), jnp.int32(t))
        expected.append(bool(np.float32(n) > np.asarray(bound)))
    expected = np.array(expected)
    assert expected.sum() > bad_steps(stream).sum()
    np.testing.assert_array_equal(np.asarray(states.stats.clipped), expected)


def test_skip_nonfinite_is_the_guard_with_an_infinite_threshold():
    stream = make_stream(43, steps=40)
    a = oc.skip_nonfinite(optax.adam(1e-2))
    b = oc.skip_spikes(optax.adam(1e-2), rule=float("inf"))
    _, (outs_a, states_a) = scan_guard(a, stream)
    _, (outs_b, states_b) = scan_guard(b, stream)
    for k in outs_a:
        np.testing.assert_array_equal(outs_a[k], outs_b[k])
    for x, y in zip(
        jax.tree.leaves(states_a.inner_state),
        jax.tree.leaves(states_b.inner_state),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(states_a.stats.clipped, bad_steps(stream))
    np.testing.assert_array_equal(states_a.stats.clipped, states_b.stats.clipped)


def test_skip_spikes_refuses_a_rule_and_the_default_rules_settings():
    with pytest.raises(ValueError, match=r"skip_spikes got `rule`.*window=32"):
        oc.skip_spikes(optax.sgd(1.0), window=32, rule=oc.rules.zscore())
    with pytest.raises(ValueError, match="rules.mean_std"):
        oc.skip_spikes(optax.sgd(1.0), sigma=3.0, rule=1.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: oc.skip_nonfinite(optax.sgd(0.1, momentum=0.9)),
        lambda: oc.skip_spikes(optax.sgd(0.1), rule=1.0),
    ],
    ids=["skip_nonfinite", "skip_spikes"],
)
def test_guards_refuse_a_missing_state(make):
    # The wrapped optimizer's state would restart every step.
    tx = make()
    with pytest.raises(ValueError, match="keeps a state across steps"):
        tx.update({"w": jnp.ones(2)}, None)
