"""The adaptive rules: exact semantics, safety, and use at every scope."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
from optaxclip import rules
from tests.helpers import first, make_stream, scan_many, scanner

RULES = [
    ("percentile", lambda: rules.percentile(20.0, window=16)),
    ("zscore", lambda: rules.zscore(warmup=5, max_norm=None, z=1.5)),
    ("zscore_percentile", lambda: rules.zscore(warmup=5, mode="percentile", z=1.0)),
    ("ema", lambda: rules.ema(ratio=1.02, beta=0.9)),
    (
        "ema_warmup",
        lambda: rules.ema(ratio=1.1, beta=0.9, warmup=5, warmup_max_norm=2.0),
    ),
    ("quantile", lambda: rules.quantile(0.5, 0.2, 1.0)),
    ("quantile_arithmetic", lambda: rules.quantile(0.8, 0.5, 1.0, geometric=False)),
]
RULE_IDS = [r[0] for r in RULES]

SCOPES = [
    ("global", lambda r: oc.clip_by_global_norm(r)),
    ("tensor", lambda r: oc.clip_by_norm(r)),
    ("tensor_l1", lambda r: oc.clip_by_norm(r, ord=1)),
    ("block_rms", lambda r: oc.clip_by_block_rms(r)),
    ("element", lambda r: oc.clip_by_value(r)),
    ("unit", lambda r: oc.adaptive_grad_clip(r)),
]


def drive(rule, norms, totals=None):
    """Feeds ``norms[t]`` to ``rule`` step by step in one scan; returns thresholds.

    With ``totals``, ``totals[t]`` is passed as the whole tree's norm.
    """
    state = rule.init(jnp.zeros(norms.shape[1:], norms.dtype))

    def body(state, xs):
        n, t, total = xs
        if totals is None:
            threshold, state = rule.update(state, n, t)
        else:
            observation = rules.Observation(n, total)
            threshold, state = rules.observe(rule, state, observation, t)
        return state, threshold

    steps = jnp.arange(norms.shape[0], dtype=jnp.int32)
    tot = steps if totals is None else jnp.asarray(totals, norms.dtype)
    return jax.jit(lambda s, n: jax.lax.scan(body, s, (n, steps, tot)))(state, norms)


# ---------------------------------------------------------------------------
# percentile: the bounded buffer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p,window", [(10.0, 40), (50.0, 7), (97.5, 100), (0.0, 5), (100.0, 5)]
)
def test_percentile_is_exact_full_history_then_a_sliding_window(p, window):
    rng = np.random.default_rng(0)
    norms = np.abs(rng.standard_cauchy(size=(120, 3))).astype(np.float32)
    norms[5:9, 1] = 0.0
    norms[0:3, 2] = 0.0
    official = rules.percentile(p, window=window, include_zeros=True)
    _, got_official = drive(official, jnp.asarray(norms))
    _, got = drive(rules.percentile(p, window=window), jnp.asarray(norms))
    history = norms.astype(np.float64)
    for t in range(120):
        # exact full-history percentile while t + 1 <= window, then the last `window`
        want = np.percentile(history[max(0, t + 1 - window) : t + 1], p, axis=0)
        np.testing.assert_allclose(got_official[t], want, rtol=1e-5)
        # by default each entry's history holds its non-zero norms only
        for i in range(3):
            kept = history[: t + 1, i][history[: t + 1, i] > 0][-window:]
            want = np.percentile(kept, p) if kept.size else np.inf
            np.testing.assert_allclose(got[t, i], want, rtol=1e-5)


def test_percentile_default_window_keeps_1024_norms():
    rule = rules.percentile(10.0)
    assert rule.init(jnp.zeros(())).buffer.shape == (1024,)
    assert rule.init(jnp.zeros((3,))).buffer.shape == (3, 1024)


def test_percentile_on_tensor_scope_is_per_tensor():
    """``clip_by_norm(rules.percentile(...))``: bitsandbytes-style clipping."""
    stream = make_stream(20, steps=60)
    tx = oc.clip_by_norm(rules.percentile(5.0, window=30))
    _, (_, stats) = scanner(tx)(tx.init(first(stream)), stream, None)
    norms = np.asarray(stats.norm, np.float64)
    good = np.isfinite(norms).all(axis=1)
    history = norms[good]
    assert np.sum(history == 0) >= 3  # the stream has exact-zero tensors
    # each tensor's own history of non-zero norms, the last 30 of them
    want = np.array(
        [
            [
                np.percentile(h[h > 0][-30:], 5.0) if np.any(h > 0) else np.inf
                for h in history[: t + 1].T
            ]
            for t in range(len(history))
        ]
    )
    np.testing.assert_allclose(np.asarray(stats.threshold)[good], want, rtol=1e-5)


# ---------------------------------------------------------------------------
# Non-finite steps never happened; no absorbing zero
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scope_name,scope", SCOPES[:2], ids=[s[0] for s in SCOPES[:2]])
def test_nonfinite_steps_are_as_if_they_had_not_happened(scope_name, scope):
    stream = make_stream(21, steps=50)
    bad = np.array(
        [
            not all(np.all(np.isfinite(np.asarray(x[t]))) for x in stream.values())
            for t in range(50)
        ]
    )
    assert 3 <= bad.sum() < 10
    clean = jax.tree.map(lambda x: x[~bad], stream)
    txs = [scope(make()) for _, make in RULES]
    with_bad = scan_many(txs, stream)
    without = scan_many(txs, clean)
    for name, (outs, stats), (clean_outs, clean_stats) in zip(
        RULE_IDS, with_bad, without, strict=True
    ):
        for k in outs:
            np.testing.assert_array_equal(outs[k][bad], 0.0)
            np.testing.assert_array_equal(outs[k][~bad], clean_outs[k], err_msg=name)
        np.testing.assert_array_equal(stats.threshold[~bad], clean_stats.threshold)
        assert int(stats.nonfinite_count[-1]) == bad.sum()


ZERO_START_RULES = [
    ("olmo", rules.ema(ratio=1.0, beta=0.9)),
    ("adagc", rules.ema(ratio=1.05, beta=0.99, warmup=4, warmup_max_norm=1.0)),
    ("zscore", rules.zscore(warmup=3, max_norm=None)),
    ("zscore_percentile", rules.zscore(warmup=3, max_norm=None, mode="percentile")),
]


def test_no_absorbing_zero():
    """A tensor whose gradient is exactly zero at first is not clipped to zero later."""
    rng = np.random.default_rng(1)
    g = rng.normal(size=(30, 2, 3)).astype(np.float32)
    g[:8, 0] = 0.0  # tensor "a" is zero through warm-up and the first steps
    stream = {"a": jnp.asarray(g[:, 0]), "b": jnp.asarray(g[:, 1])}
    txs = [oc.clip_by_norm(rule) for _, rule in ZERO_START_RULES]
    for (name, _), (outs, stats) in zip(
        ZERO_START_RULES, scan_many(txs, stream), strict=True
    ):
        assert np.all(np.asarray(stats.threshold)[8:, 0] > 0), name
        assert np.all(np.abs(np.asarray(outs["a"])[8:]).sum(axis=1) > 0), name
        # its first non-zero gradient passes unclipped: the statistic starts there
        np.testing.assert_allclose(outs["a"][8], g[8, 0], rtol=1e-6, err_msg=name)


def test_zscore_all_zero_warmup_does_not_clip_to_zero_forever():
    norms = jnp.asarray(np.r_[np.zeros(10), np.linspace(1, 2, 30)].astype(np.float32))
    _, thresholds = drive(rules.zscore(warmup=3, max_norm=None), norms)
    assert np.all(np.asarray(thresholds)[10:] > 0.5)


def test_ema_warmup_is_a_global_clip_and_running_min():
    norms = jnp.asarray([[3.0, 4.0], [0.3, 0.4], [6.0, 8.0], [1.0, 1.0]], jnp.float32)
    rule = rules.ema(ratio=2.0, beta=0.5, warmup=3, warmup_max_norm=1.0)
    totals = np.linalg.norm(np.asarray(norms, np.float64), axis=1)
    state, thresholds = drive(rule, norms, totals)
    # warm-up: each tensor's bound is its share of the global clip to norm 1
    np.testing.assert_allclose(thresholds[0], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(thresholds[1], [0.3, 0.4], rtol=1e-6)
    np.testing.assert_allclose(thresholds[2], [0.6, 0.8], rtol=1e-6)
    # after warm-up: ratio x running min of the clipped norms (0.3, 0.4)
    np.testing.assert_allclose(thresholds[3], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(
        state.average, [0.5 * 0.3 + 0.5 * 0.6, 0.5 * 0.4 + 0.5 * 0.8]
    )
    with pytest.raises(ValueError, match="total"):
        drive(rule, norms)


def test_quantile_bound_stays_positive_or_floored():
    norms = jnp.full((200,), 1e-3, jnp.float32)
    _, geometric = drive(rules.quantile(0.0, 1.0, 1.0), norms)
    _, arithmetic = drive(rules.quantile(0.0, 1.0, 1.0, geometric=False), norms)
    assert np.all(np.asarray(geometric) > 0)
    assert np.all(np.asarray(arithmetic) >= 0) and float(arithmetic[-1]) == 0.0


# ---------------------------------------------------------------------------
# Every rule at every scope; jit, vmap, traced hyperparameters
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scope_name,scope", SCOPES, ids=[s[0] for s in SCOPES])
def test_every_rule_at_every_scope(scope_name, scope):
    stream = make_stream(22, steps=24)
    params = jax.tree.map(
        lambda x: jnp.where(jnp.isfinite(x), x, 1.0), make_stream(23, 24)
    )
    results = scan_many([scope(make()) for _, make in RULES], stream, params)
    for name, (outs, stats) in zip(RULE_IDS, results, strict=True):
        thresholds = np.asarray(stats.threshold)
        finite = np.isfinite(np.asarray(stats.norm)).reshape(24, -1).all(axis=1)
        assert np.all(thresholds[finite] >= 0), name
        assert int(jnp.sum(stats.clipped)) > 0, (scope_name, name)
        for o in jax.tree.leaves(outs):
            assert bool(jnp.all(jnp.isfinite(o))), (scope_name, name)


def test_traced_hyperparameters_do_not_retrace_and_vmap():
    traces = []

    def run(z, alpha, ratio, p, target):
        traces.append(1)
        norms = jnp.abs(jnp.sin(jnp.arange(40.0))) + jnp.where(
            jnp.arange(40) % 9 == 8, 5.0, 0.0
        )
        out = []
        for rule in [
            rules.zscore(alpha, z, 4, max_norm=None),
            rules.ema(ratio, alpha),
            rules.percentile(p, window=8),
            rules.quantile(target, 0.1, 1.0),
        ]:
            out.append(drive(rule, norms)[1])
        return out

    fn = jax.jit(run)
    a = fn(2.0, 0.9, 1.1, 10.0, 0.5)
    b = fn(1.0, 0.8, 1.5, 90.0, 0.9)
    assert len(traces) == 1
    for x, y in zip(a, b, strict=True):
        assert not np.allclose(x, y)
    # vmap over hyperparameter settings equals separate runs
    batched = jax.vmap(run)(
        jnp.array([2.0, 1.0]),
        jnp.array([0.9, 0.8]),
        jnp.array([1.1, 1.5]),
        jnp.array([10.0, 90.0]),
        jnp.array([0.5, 0.9]),
    )
    for x, y, z in zip(a, b, batched, strict=True):
        np.testing.assert_allclose(z[0], x, rtol=1e-6)
        np.testing.assert_allclose(z[1], y, rtol=1e-6)


@pytest.mark.parametrize("name,make", RULES, ids=RULE_IDS)
def test_rules_are_frozen_and_states_are_arrays(name, make):
    rule = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.p = 1.0  # type: ignore[misc]
    state = rule.init(jnp.zeros((3,), jnp.float32))
    for leaf in jax.tree.leaves(state):
        assert isinstance(leaf, jax.Array)
        assert leaf.dtype in (jnp.float32, jnp.int32)
    assert isinstance(rule, rules.Rule)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: rules.percentile(-1.0), "`p`.*-1.0"),
        (lambda: rules.percentile(50.0, window=2.5), "`window`.*2.5"),
        (lambda: rules.percentile("10"), "`p`.*'10'"),
        (lambda: rules.percentile(10.0, include_zeros=1), "`include_zeros`.*1"),
        (lambda: rules.zscore(alpha=-0.1), "`alpha`.*-0.1"),
        (lambda: rules.zscore(warmup=0), "`warmup`.*0"),
        (lambda: rules.zscore(max_norm=-1.0), "`max_norm`.*-1.0"),
        (lambda: rules.zscore(eps=float("inf")), "`eps`.*inf"),
        (lambda: rules.zscore(clip_factor=-2.0), "`clip_factor`.*-2.0"),
        (lambda: rules.ema(ratio=0.0), "`ratio`.*0.0"),
        (lambda: rules.ema(beta=1.5), "`beta`.*1.5"),
        (lambda: rules.ema(warmup=-3), "`warmup`.*-3"),
        (lambda: rules.ema(eps=-1e-6), "`eps`.*-1e-06"),
        (lambda: rules.quantile(target=-0.5), "`target`.*-0.5"),
        (lambda: rules.quantile(learning_rate=-1.0), "`learning_rate`.*-1.0"),
        (lambda: rules.quantile(initial=-1.0, geometric=False), "`initial`.*-1.0"),
    ],
)
def test_bad_rule_arguments_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_float16_gradients_keep_rule_state_in_float32():
    grads = {"w": jnp.full((2, 8), 300.0, jnp.float16)}  # two steps
    txs = [oc.clip_by_global_norm(make()) for _, make in RULES]
    for name, tx in zip(RULE_IDS, txs, strict=True):
        for leaf in jax.tree.leaves(tx.init(first(grads)).rule_state):
            assert leaf.dtype in (jnp.float32, jnp.int32), name
    for name, (outs, stats) in zip(RULE_IDS, scan_many(txs, grads), strict=True):
        # the float16 squares (9e4 each) overflow float16; the norm must not
        np.testing.assert_allclose(stats.norm, 300.0 * 8**0.5, rtol=1e-6, err_msg=name)
        assert outs["w"].dtype == jnp.float16


# ---------------------------------------------------------------------------
# Every public transform's fresh state can be donated
# ---------------------------------------------------------------------------


def _every_rule():
    """Every rule of optaxclip.rules in its usual settings (fresh instances)."""
    return [
        ("fixed", 1.0),
        ("scheduled", optax.linear_schedule(0.5, 2.0, 10)),
        ("percentile", rules.percentile(10.0)),
        ("percentile_zeros", rules.percentile(50.0, window=8, include_zeros=True)),
        ("zscore", rules.zscore()),
        ("zscore_percentile", rules.zscore(mode="percentile")),
        ("ema", rules.ema()),
        ("ema_warmup", rules.ema(warmup=3, warmup_max_norm=1.0)),
        ("quantile", rules.quantile()),
        ("quantile_arithmetic", rules.quantile(geometric=False)),
    ]


def _every_transform():
    scopes = [
        ("clip", oc.clip),
        ("clip_by_value", oc.clip_by_value),
        ("clip_by_norm", oc.clip_by_norm),
        ("clip_by_global_norm", oc.clip_by_global_norm),
        ("clip_by_block_rms", oc.clip_by_block_rms),
        ("adaptive_grad_clip", oc.adaptive_grad_clip),
        ("clip_per_example", oc.clip_per_example),
    ]
    out = [
        (f"{scope_name}-{rule_name}", scope(rule))
        for scope_name, scope in scopes
        for rule_name, rule in _every_rule()
    ]
    out += [
        ("autoclip", oc.autoclip()),
        ("autoclip_official", oc.autoclip(include_zeros=True)),
        ("zclip", oc.zclip()),
        ("adagc", oc.adagc()),
        ("olmo_adaptive_clip", oc.olmo_adaptive_clip()),
        ("quantile_clip", oc.quantile_clip()),
        ("spam_clip", oc.spam_clip()),
        ("stable_spam_clip", oc.stable_spam_clip()),
        ("clippy", oc.clippy()),
        ("skip_nonfinite", oc.skip_nonfinite(optax.adam(1e-3))),
        ("skip_spikes", oc.skip_spikes(optax.adam(1e-3))),
    ]
    return out


TRANSFORMS = _every_transform()


def _donation_inputs(name):
    params = {"w": jnp.ones((3, 2)), "b": jnp.full((2,), 0.5)}
    grads = {"w": jnp.full((3, 2), 0.25), "b": jnp.array([1.0, -2.0])}
    if name.startswith("clip_per_example"):
        # per-example gradients: a leading batch axis of 4
        grads = jax.tree.map(
            lambda x: jnp.stack([x * (i + 1) for i in range(4)]), grads
        )
    return params, grads


def _buffer_pointers(tree):
    return [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(tree)]


@pytest.mark.parametrize("name,tx", TRANSFORMS, ids=[t[0] for t in TRANSFORMS])
def test_fresh_state_has_no_shared_buffers(name, tx):
    params, _ = _donation_inputs(name)
    state = tx.init(params)
    pointers = _buffer_pointers(state)
    assert len(pointers) == len(set(pointers)), name
    # nor does it hold one of the params' own buffers
    assert not set(pointers) & set(_buffer_pointers(params)), name


def test_fresh_state_can_be_donated_to_a_jitted_update():
    """Every transform's fresh state, donated to one jitted step of them all
    (one compile; a buffer shared inside any state fails the whole call), and
    the states it returns donated again."""
    names = [name for name, _ in TRANSFORMS]
    txs = dict(TRANSFORMS)
    inputs = {name: _donation_inputs(name) for name in names}

    def step(states):
        return {
            name: txs[name].update(inputs[name][1], states[name], inputs[name][0])
            for name in names
        }

    def fresh():
        return {name: txs[name].init(inputs[name][0]) for name in names}

    with jax.numpy_dtype_promotion("standard"):  # optax.adam's bias correction
        expected = step(fresh())
        donated = jax.jit(step, donate_argnums=0)
        actual = donated(fresh())
    for name in names:
        for a, b in zip(
            jax.tree.leaves(actual[name]), jax.tree.leaves(expected[name]), strict=True
        ):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    with jax.numpy_dtype_promotion("standard"):
        again = donated({name: actual[name][1] for name in names})
    for name in names:
        assert int(oc.stats(again[name][1])[0].count) == 2, name


# ---------------------------------------------------------------------------
# No absorbing zeros: long runs of exact-zero gradients, then ordinary ones
# ---------------------------------------------------------------------------

# Each rule with the number of steps after a run of zero norms within which
# its docstring says it is back to normal (bounded exactly as if the run had
# not happened): 0 for every rule, since zero norms never reach a statistic.
RECOVERY_RULES = [
    ("fixed", lambda: 1.0, 0),
    ("scheduled", lambda: optax.linear_schedule(0.5, 2.0, 20), 0),
    ("percentile", lambda: rules.percentile(10.0), 0),
    ("percentile_window", lambda: rules.percentile(50.0, window=16), 0),
    ("zscore", lambda: rules.zscore(warmup=5, max_norm=None, z=1.5), 0),
    ("zscore_capped", lambda: rules.zscore(warmup=5, z=1.5), 0),
    (
        "zscore_percentile",
        lambda: rules.zscore(warmup=5, max_norm=None, mode="percentile", z=1.0),
        0,
    ),
    ("ema", lambda: rules.ema(ratio=1.05, beta=0.9), 0),
    (
        "ema_warmup",
        lambda: rules.ema(ratio=1.05, beta=0.95, warmup=5, warmup_max_norm=2.0),
        0,
    ),
    ("quantile", lambda: rules.quantile(), 0),
    ("quantile_arithmetic", lambda: rules.quantile(0.5, 0.05, 1.0, geometric=False), 0),
]
BEFORE, ZERO_RUN, AFTER = 40, 1200, 40  # 1200 zero steps: the quantile underflows


def zero_run_streams(seed, frozen):
    """A stream with ``ZERO_RUN`` zero steps in the ``frozen`` leaves, and the
    same stream with those steps left out of every leaf (the reference)."""
    rng = np.random.default_rng(seed)
    steps = BEFORE + ZERO_RUN + AFTER
    level = np.exp(rng.normal(0.0, 0.5, size=steps))
    level[rng.choice(steps, 12, replace=False)] *= 20.0  # spikes to clip
    shapes = {"a": (3,), "b": (2, 2)}
    stream = {
        k: rng.normal(size=(steps, *s)) * level.reshape(-1, *[1] * len(s))
        for k, s in shapes.items()
    }
    run = slice(BEFORE, BEFORE + ZERO_RUN)
    for k in frozen:
        stream[k][run] = 0.0
    kept = np.r_[0:BEFORE, BEFORE + ZERO_RUN : steps]
    reference = {k: x[kept] for k, x in stream.items()}
    cast = lambda tree: {k: jnp.asarray(x, jnp.float32) for k, x in tree.items()}  # noqa: E731
    return cast(stream), cast(reference)


def assert_recovers(name, outs, reference, leaves, within):
    """After the zero run, ``leaves`` are non-zero and equal the run without it."""
    for k in leaves:
        got = np.asarray(outs[k])[BEFORE + ZERO_RUN + within :]
        want = np.asarray(reference[k])[BEFORE + within :]
        moved = np.abs(got).reshape(len(got), -1).sum(axis=1)
        assert np.all(moved > 0), (name, k, int(np.sum(moved == 0)))
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{name} {k}")


@pytest.mark.parametrize(
    "scope_name,frozen",
    [("global", ("a", "b")), ("tensor", ("a",)), ("tensor", ("a", "b"))],
    ids=["global-all_zero", "tensor-one_zero", "tensor-all_zero"],
)
def test_every_rule_recovers_from_a_long_run_of_zero_gradients(scope_name, frozen):
    stream, reference = zero_run_streams(40, frozen)
    scope = oc.clip_by_global_norm if scope_name == "global" else oc.clip_by_norm
    txs = [scope(make()) for _, make, _ in RECOVERY_RULES]
    results = scan_many(txs, stream)
    expected = scan_many(txs, reference)
    not_recovered = []
    for (name, _, within), (outs, _), (ref_outs, _) in zip(
        RECOVERY_RULES, results, expected, strict=True
    ):
        try:
            assert_recovers(name, outs, ref_outs, frozen, within)
        except AssertionError:
            not_recovered.append(name)
    assert not not_recovered, not_recovered
    for (name, _, _), (outs, _), (_, ref_stats) in zip(
        RECOVERY_RULES, results, expected, strict=True
    ):
        # the rules clip on these streams, before and after the zero run
        assert int(jnp.sum(ref_stats.clipped[BEFORE:])) > 0 or name == "fixed", name
        # during the run the zero tensors' updates are zero, the others normal
        for k in stream:
            run = np.asarray(outs[k])[BEFORE : BEFORE + ZERO_RUN]
            if k in frozen:
                np.testing.assert_array_equal(run, 0.0)
            else:
                assert np.all(np.abs(run).reshape(ZERO_RUN, -1).sum(axis=1) > 0)


def test_quantile_bound_leaves_zero_from_the_dtype_floor():
    """A bound of exactly 0 (a state saved by a version whose bound underflowed)
    is lifted to ``finfo.tiny`` and grows back by ``exp(lr * target)`` per step."""
    tiny = float(jnp.finfo(jnp.float32).tiny)
    rule = rules.quantile(0.5, 0.2, 0.1)
    norms = jnp.ones((1000,), jnp.float32)

    def body(state, n):
        bound, state = rule.update(state, n, 0)
        return state, bound

    _, bounds = jax.jit(lambda s: jax.lax.scan(body, s, norms))(jnp.zeros(()))
    bounds = np.asarray(bounds, np.float64)
    assert bounds[0] == 0.0 and bounds[1] == np.float32(tiny)
    np.testing.assert_allclose(
        bounds[1:11] / tiny, np.exp(0.1 * np.arange(10)), rtol=1e-4
    )
    # back to the norms' scale within ceil(log(1 / tiny) / 0.1) = 874 steps
    within = int(np.ceil(np.log(1 / tiny) / 0.1))
    assert within == 874
    assert np.all(bounds[1 + within :] > 0.9)
    # the arithmetic bound leaves 0 by learning_rate * target per step
    arithmetic = rules.quantile(0.5, 0.2, 1.0, geometric=False)
    bound, state = jnp.zeros(()), jnp.zeros(())
    for _ in range(3):
        bound, state = arithmetic.update(state, jnp.array(1.0), 0)
    np.testing.assert_allclose([bound, state], [0.2, 0.3], rtol=1e-6)


def test_quantile_per_example_fraction_leaves_out_zero_norms():
    rule = rules.quantile(target=0.5, learning_rate=0.2, initial=1.0)
    state = rule.init(jnp.zeros(()))
    # two of four examples are padding (norm 0); of the others one is clipped
    _, state = rule.update(state, jnp.array([0.0, 0.5, 3.0, 0.0]), 0)
    np.testing.assert_allclose(state, 1.0, rtol=1e-6)  # fraction 1/2 = target
    _, state = rule.update(state, jnp.zeros(4), 1)  # a padding-only batch
    np.testing.assert_allclose(state, 1.0, rtol=1e-6)
    _, state = rule.update(state, jnp.array([0.0, 0.5, 0.7, 0.2]), 2)
    np.testing.assert_allclose(state, np.exp(-0.2 * 0.5), rtol=1e-6)


# ---------------------------------------------------------------------------
# mean_std: the windowed spike rule
# ---------------------------------------------------------------------------


def mean_std_reference(values, window, sigma, min_history):
    """The bound before each value: mean + sigma * std (ddof 1) of the
    previous ``window`` recorded values, once enough are recorded."""
    history, bounds = [], []
    for v in values:
        previous = history[-window:]
        if len(previous) + 1 >= min_history and len(previous) >= 2:
            bounds.append(np.mean(previous) + sigma * np.std(previous, ddof=1))
        else:
            bounds.append(np.inf)
        if v != 0:
            history.append(v)
    return np.array(bounds)


@pytest.mark.parametrize("window,sigma,min_history", [(4, 2.0, 3), (16, 1.0, 8)])
def test_mean_std_matches_its_numpy_reference(window, sigma, min_history):
    rng = np.random.default_rng(3)
    values = np.abs(rng.normal(1.0, 0.3, 60)).astype(np.float32)
    values[[10, 11, 12, 30]] = 0.0  # zeros are not recorded
    values[40] = 9.0  # a spike is recorded
    rule = rules.mean_std(window, sigma, min_history=min_history)
    _, bounds = drive(rule, jnp.asarray(values))
    expected = mean_std_reference(values.astype(np.float64), window, sigma, min_history)
    np.testing.assert_allclose(np.asarray(bounds), expected, rtol=1e-5)


def test_mean_std_keeps_one_history_per_entry():
    # Per tensor: a frozen tensor records nothing while the other records.
    rng = np.random.default_rng(4)
    a = np.abs(rng.normal(1.0, 0.2, 30)).astype(np.float32)
    b = np.where(np.arange(30) < 15, 0.0, a[::-1]).astype(np.float32)
    rule = rules.mean_std(8, 3.0, min_history=3)
    _, bounds = drive(rule, jnp.asarray(np.stack([a, b], axis=1)))
    for column, values in enumerate([a, b]):
        expected = mean_std_reference(values.astype(np.float64), 8, 3.0, 3)
        np.testing.assert_allclose(np.asarray(bounds)[:, column], expected, rtol=1e-5)


def test_mean_std_as_a_clipping_threshold_bounds_the_norm():
    rule = rules.mean_std(8, 0.0, min_history=3)
    tx = oc.clip_by_global_norm(rule)
    state = tx.init({"w": jnp.zeros(2)})
    for n in [1.0, 2.0, 3.0, 30.0]:
        out, state = tx.update({"w": jnp.array([n, 0.0])}, state)
    # the bound of the last step is the mean of the three before it
    np.testing.assert_allclose(float(state.stats.threshold), 2.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["w"]), [2.0, 0.0], rtol=1e-6)
