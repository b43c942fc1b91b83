"""Every preset against an independent NumPy reference of its paper.

Each reference below is written from the paper and the official code's
semantics (with the documented safety differences: non-finite steps are
skipped and never reach the statistics, exact zeros never set a statistic),
and runs on a stream of 320 steps of a random pytree with injected spikes,
exact zeros, NaN and Inf.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
from tests.helpers import STREAM_SHAPES, first, make_stream, scan_many, scanner

T = 320
RTOL = 1e-5


# ---------------------------------------------------------------------------
# The stream and the driver
# ---------------------------------------------------------------------------


def np_steps(stream):
    """The stream as a list of per-step lists of float64 NumPy leaves."""
    arrays = [np.asarray(stream[k], np.float64) for k in sorted(stream)]
    return [[a[t] for a in arrays] for t in range(arrays[0].shape[0])]


def finite_params(seed, steps):
    return jax.tree.map(
        lambda x: jnp.where(jnp.isfinite(x), x, 1.0), make_stream(seed, steps)
    )


def run_stream(tx, stream, params=None):
    """Runs ``tx`` over the stream with one ``lax.scan``; returns outputs and stats."""
    state = tx.init(first(stream if params is None else params))
    _, (outs, stats) = scanner(tx)(state, stream, params)
    return outs, stats


def check_preset(make, settings, reference, stream, params=None):
    """Each setting's run (all in one scan) against ``reference(kwargs)``."""
    results = scan_many([make(**kw) for kw in settings], stream, params)
    for kw, (outs, stats) in zip(settings, results, strict=True):
        check_against(outs, stats, reference(kw))
        assert int(jnp.sum(stats.clipped)) > 5, kw


def check_against(outs, stats, expected):
    """``expected[t]``: None on a skipped step, else ``(threshold, scale, outputs)``."""
    out_leaves = [np.asarray(outs[k]) for k in sorted(outs)]
    good = np.array([e is not None for e in expected])
    for o in out_leaves:
        np.testing.assert_array_equal(o[~good], 0.0)
    rows = [e for e in expected if e is not None]
    np.testing.assert_allclose(
        np.asarray(stats.threshold)[good], np.array([r[0] for r in rows]), rtol=RTOL
    )
    np.testing.assert_allclose(
        np.asarray(stats.scale)[good], np.array([r[1] for r in rows]), rtol=RTOL
    )
    for i, o in enumerate(out_leaves):
        want = np.stack([r[2][i] for r in rows])
        np.testing.assert_allclose(o[good], want, rtol=RTOL, atol=1e-30)
    assert int(stats.nonfinite_count[-1]) == int(np.sum(~good))
    assert good.sum() > 0.9 * len(expected)


def is_finite(leaves):
    return all(np.all(np.isfinite(x)) for x in leaves)


def gnorm(leaves):
    return math.sqrt(sum(float(np.sum(x * x)) for x in leaves))


def clip_scale(norm, threshold):
    return threshold / norm if norm > threshold else 1.0


def global_reference(rule_step, steps):
    """Expected (threshold, scale, outputs) for a global-scope rule reference."""
    expected = []
    for leaves in steps:
        if not is_finite(leaves):
            expected.append(None)
            continue
        n = gnorm(leaves)
        threshold = rule_step(n)
        s = clip_scale(n, threshold)
        expected.append((threshold, s, [x * s for x in leaves]))
    return expected


def tensor_reference(rule_step, steps):
    expected = []
    for leaves in steps:
        if not is_finite(leaves):
            expected.append(None)
            continue
        norms = np.array([math.sqrt(float(np.sum(x * x))) for x in leaves])
        thresholds = rule_step(norms)
        scales = np.array(
            [clip_scale(n, c) for n, c in zip(norms, thresholds, strict=True)]
        )
        expected.append(
            (thresholds, scales, [x * s for x, s in zip(leaves, scales, strict=True)])
        )
    return expected


# ---------------------------------------------------------------------------
# AutoClip
# ---------------------------------------------------------------------------


class RefAutoClip:
    """pseeth/autoclip: percentile of every past norm, current included.

    Documented difference: exact-zero norms are not recorded unless
    ``include_zeros`` (the official behaviour); inf while nothing is recorded.
    """

    def __init__(self, percentile, history, include_zeros=False):
        self.p, self.size, self.history = percentile, history or 1024, []
        self.include_zeros = include_zeros

    def __call__(self, n):
        if n > 0 or self.include_zeros:
            self.history.append(n)
        if not self.history:
            return math.inf
        return float(np.percentile(self.history[-self.size :], self.p))


AUTOCLIP = [
    dict(percentile=10.0),
    dict(percentile=50.0, history=64),
    dict(percentile=90.0, history=16),
    dict(percentile=10.0, history=64, include_zeros=True),
]


def test_autoclip_matches_reference():
    stream = make_stream(0)
    steps = np_steps(stream)
    check_preset(
        oc.autoclip,
        AUTOCLIP,
        lambda kw: global_reference(
            RefAutoClip(
                kw["percentile"], kw.get("history"), kw.get("include_zeros", False)
            ),
            steps,
        ),
        stream,
    )


# ---------------------------------------------------------------------------
# ZClip
# ---------------------------------------------------------------------------


class RefZClip:
    """bluorion-com/ZClip ``ZClip.step``, on the norm alone."""

    def __init__(
        self,
        alpha=0.97,
        z_thresh=2.5,
        max_grad_norm=1.0,
        eps=1e-6,
        warmup_steps=25,
        mode="zscore",
        clip_option="adaptive_scaling",
        clip_factor=1.0,
        skip_update_on_spike=False,
    ):
        self.__dict__.update(locals())
        self.buffer, self.initialized = [], False

    def __call__(self, n):
        cap = math.inf if self.max_grad_norm is None else self.max_grad_norm
        if not self.initialized:
            if n > 0:  # documented difference: zero norms do not warm up
                self.buffer.append(n)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(
                    self.buffer
                )
                self.initialized = True
            return cap
        std = self.var**0.5
        clip_val = None
        if self.mode == "percentile":
            if n > self.mean + self.z_thresh * std:
                clip_val = self.mean + self.z_thresh * std
        else:
            z = (n - self.mean) / (std + self.eps)
            if z > self.z_thresh:
                if self.clip_option == "adaptive_scaling":
                    eta = z / self.z_thresh
                    clip_val = (
                        self.mean + self.z_thresh * std / eta
                    ) * self.clip_factor
                else:
                    clip_val = self.mean
        bound = min(cap, math.inf if clip_val is None else clip_val)
        if clip_val is not None and self.skip_update_on_spike:
            return bound
        if n == 0:  # documented difference: zero norms never reach the EMAs
            return bound
        fed = n if clip_val is None else clip_val
        self.mean = self.alpha * self.mean + (1 - self.alpha) * fed
        self.var = self.alpha * self.var + (1 - self.alpha) * (fed - self.mean) ** 2
        return bound


ZCLIP = [
    dict(),
    dict(
        max_grad_norm=None, alpha=0.9, warmup_steps=10, mode="percentile", z_thresh=2.0
    ),
    dict(
        max_grad_norm=10.0, clip_option="mean", skip_update_on_spike=True, z_thresh=2.0
    ),
    dict(max_grad_norm=None, clip_factor=0.8, z_thresh=1.5, eps=1e-3),
]


def test_zclip_matches_reference():
    stream = make_stream(1)
    steps = np_steps(stream)
    check_preset(
        oc.zclip, ZCLIP, lambda kw: global_reference(RefZClip(**kw), steps), stream
    )


# ---------------------------------------------------------------------------
# AdaGC and OLMo
# ---------------------------------------------------------------------------


class RefAdaGC:
    """AdaGC (Wang et al. 2025): warm-up global clip + running min, then EMA."""

    def __init__(
        self, lambda_rel=1.04, beta=0.99, warmup_steps=100, lambda_abs=1.0, eps=1e-6
    ):
        self.__dict__.update(locals())
        self.gamma, self.t = None, 0

    def __call__(self, norms):
        if self.gamma is None:
            self.gamma = np.zeros_like(norms)  # 0 = not yet set
        bounds = np.empty_like(norms)
        if self.t < self.warmup_steps:
            total = math.sqrt(float(np.sum(norms**2)))
            coef = min(1.0, self.lambda_abs / (total + self.eps))
            for i, n in enumerate(norms):
                clipped = n * coef
                bounds[i] = clipped
                if clipped > 0:
                    g = self.gamma[i]
                    self.gamma[i] = clipped if g == 0 else min(g, clipped)
        else:
            for i, n in enumerate(norms):
                base = self.gamma[i] if self.gamma[i] > 0 else n
                coef = (
                    min(1.0, self.lambda_rel * base / (n + self.eps)) if n > 0 else 1.0
                )
                bounds[i] = (
                    self.lambda_rel * base * (n / (n + self.eps) if n > 0 else 1.0)
                )
                if n > 0:  # documented difference: zeros leave gamma as it was
                    self.gamma[i] = self.beta * base + (1 - self.beta) * n * coef
        self.t += 1
        return bounds


class RefOLMo(RefAdaGC):
    """allenai/OLMo adaptive clipping: c = min(1, r*ema/(n+eps)), ema lerp n*c."""

    def __init__(self, max_grad_norm_ratio=1.0, beta=0.95, eps=1e-6):
        super().__init__(max_grad_norm_ratio, beta, 0, None, eps)


ADAGC = [
    dict(),
    dict(lambda_rel=1.1, beta=0.9, warmup_steps=10, lambda_abs=2.0, eps=0.0),
    dict(lambda_rel=1.0, beta=0.999, warmup_steps=0, eps=1e-6),
]


def test_adagc_matches_reference():
    stream = make_stream(2)
    steps = np_steps(stream)
    check_preset(
        oc.adagc, ADAGC, lambda kw: tensor_reference(RefAdaGC(**kw), steps), stream
    )


OLMO = [
    dict(),
    dict(max_grad_norm_ratio=1.5, beta=0.9, eps=0.0),
    dict(max_grad_norm_ratio=1.05, beta=0.99),
]


def test_olmo_matches_reference():
    stream = make_stream(3)
    steps = np_steps(stream)
    check_preset(
        oc.olmo_adaptive_clip,
        OLMO,
        lambda kw: tensor_reference(RefOLMo(**kw), steps),
        stream,
    )


# ---------------------------------------------------------------------------
# Quantile tracking
# ---------------------------------------------------------------------------


class RefQuantile:
    """Andrew et al. 2021, Algorithm 1 without noise, one norm per step."""

    def __init__(
        self, target_quantile=0.5, learning_rate=0.2, initial=0.1, geometric=True
    ):
        self.__dict__.update(locals())
        self.c = initial

    def __call__(self, n):
        bound = self.c
        if n == 0:  # documented difference: a zero norm does not move the bound
            return bound
        unclipped = 1.0 if n <= bound else 0.0
        if self.geometric:
            self.c = bound * math.exp(
                -self.learning_rate * (unclipped - self.target_quantile)
            )
        else:
            self.c = max(
                0.0, bound - self.learning_rate * (unclipped - self.target_quantile)
            )
        return bound


QUANTILE = [
    dict(),
    dict(target_quantile=0.9, learning_rate=0.05, initial=5.0, geometric=False),
    dict(target_quantile=0.1, learning_rate=0.5, initial=1.0),
]


def test_quantile_clip_matches_reference():
    stream = make_stream(4)
    steps = np_steps(stream)
    check_preset(
        oc.quantile_clip,
        QUANTILE,
        lambda kw: global_reference(RefQuantile(**kw), steps),
        stream,
    )


def test_quantile_rule_per_example_tracks_the_unclipped_fraction():
    rule = oc.rules.quantile(target=0.25, learning_rate=0.3, initial=2.0)
    rng = np.random.default_rng(5)
    state = rule.init(jnp.zeros(()))
    step = jax.jit(rule.update)
    c = 2.0
    for t in range(40):
        norms = np.abs(rng.normal(size=16)) * 3
        bound, state = step(state, jnp.asarray(norms, jnp.float32), t)
        np.testing.assert_allclose(bound, c, rtol=RTOL)
        c *= math.exp(-0.3 * (np.mean(norms <= c) - 0.25))
        grads = [jnp.asarray(norms[:, None], jnp.float32)]  # example i has norm i
        _, n = oc.per_example_global_norm_clip(grads, bound)
        assert int(n) == int(np.sum(norms > float(bound)))


# ---------------------------------------------------------------------------
# SPAM and Stable-SPAM
# ---------------------------------------------------------------------------


def spam_reference(
    steps, threshold=5000.0, beta2=0.999, reset_interval=500, guard_steps=20
):
    """SPAM AdamW's masking and second moment (official code), per entry."""
    v = [np.zeros_like(x) for x in steps[0]]
    t = 0
    expected = []
    for leaves in steps:
        if not is_finite(leaves):
            expected.append(None)
            continue
        t += 1
        if reset_interval and t % reset_interval == 0:
            v = [np.zeros_like(x) for x in v]
        active = t >= guard_steps and (
            not reset_interval or t % reset_interval >= guard_steps
        )
        out = []
        for i, g in enumerate(leaves):
            g = g.copy()
            if active:
                mask = (g**2 > threshold * v[i]) & (v[i] > 0)  # v == 0: not clipped
                g[mask] = np.sign(g[mask]) * np.sqrt(threshold * v[i][mask])
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            out.append(g)
        before, after = gnorm(leaves), gnorm(out)
        # stats: the threshold factor, and the norm after over the one before
        expected.append((threshold, after / before if before > 0 else 1.0, out))
    return expected, v


SPAM = [
    dict(),
    dict(threshold=100.0, beta2=0.99, reset_interval=50, guard_steps=5),
    dict(threshold=10.0, beta2=0.9, reset_interval=0, guard_steps=3),
]


def test_spam_clip_matches_reference():
    stream = make_stream(6)
    steps = np_steps(stream)
    check_preset(oc.spam_clip, SPAM, lambda kw: spam_reference(steps, **kw)[0], stream)


def stable_spam_reference(steps, beta=0.999):
    """Stable-SPAM's adaptive clipping (official semantics), per tensor."""
    m = np.zeros(len(steps[0]))
    count = np.zeros(len(steps[0]), int)
    expected = []
    for leaves in steps:
        if not is_finite(leaves):
            expected.append(None)
            continue
        bounds, scales, out = [], [], []
        for i, g in enumerate(leaves):
            largest = float(np.max(np.abs(g)))
            if largest > 0:  # documented difference: all-zero steps do not count
                count[i] += 1
                m[i] = beta * m[i] + (1 - beta) * largest
            bound = m[i] / (1 - beta ** count[i]) if count[i] else math.inf
            g = g.copy()
            mask = np.abs(g) > bound
            g[mask] = g[mask] / largest * bound
            bounds.append(bound)
            scales.append(bound / largest if largest > bound else 1.0)
            out.append(g)
        expected.append((np.array(bounds), np.array(scales), out))
    return expected


def test_stable_spam_clip_matches_reference():
    stream = make_stream(7)
    steps = np_steps(stream)
    settings = [dict(beta=0.999), dict(beta=0.9), dict(beta=0.5)]
    check_preset(
        oc.stable_spam_clip,
        settings,
        lambda kw: stable_spam_reference(steps, kw["beta"]),
        stream,
    )


def test_spam_second_moment_equals_adams_before_adam():
    stream = make_stream(8, steps=60)
    stream = jax.tree.map(lambda x: jnp.where(jnp.isfinite(x), x, 0.0), stream)
    spam = oc.spam_clip(threshold=50.0, beta2=0.95, reset_interval=0, guard_steps=2)
    tx = optax.chain(spam, optax.adam(1e-3, b2=0.95))
    with jax.numpy_dtype_promotion("standard"):  # optax.adam's bias correction
        state, _ = scanner(tx)(tx.init(first(stream)), stream, None)
    assert int(state[0].stats.count) == 60
    assert int(jnp.sum(state[0].stats.clipped)) >= 0
    for k in state[0].nu:
        np.testing.assert_allclose(state[0].nu[k], state[1][0].nu[k], rtol=1e-6)


# ---------------------------------------------------------------------------
# Clippy
# ---------------------------------------------------------------------------


def clippy_reference(steps, param_steps, relative=0.1, absolute=1e-7):
    expected = []
    for leaves, weights in zip(steps, param_steps, strict=True):
        if not is_finite(leaves):
            expected.append(None)
            continue
        scales = []
        for u, w in zip(leaves, weights, strict=True):
            with np.errstate(divide="ignore", invalid="ignore"):
                room = (relative * np.abs(w) + absolute) / np.abs(u)
            scales.append(min(1.0, float(np.min(room, initial=np.inf))))
        out = [u * s for u, s in zip(leaves, scales, strict=True)]
        expected.append((np.ones(len(leaves)), np.array(scales), out))
    return expected


CLIPPY = [dict(), dict(relative=0.01, absolute=0.0), dict(relative=0.5, absolute=1e-3)]


def test_clippy_matches_reference():
    stream = jax.tree.map(lambda x: x * 0.05, make_stream(9))
    params = finite_params(10, T)
    steps, weights = np_steps(stream), np_steps(params)
    check_preset(
        oc.clippy,
        CLIPPY,
        lambda kw: clippy_reference(steps, weights, **kw),
        stream,
        params,
    )


def trust_ratio_reference(steps, param_steps, max_ratio=0.01, eps=1e-3):
    expected = []
    for leaves, weights in zip(steps, param_steps, strict=True):
        if not is_finite(leaves):
            expected.append(None)
            continue
        step = np.sqrt(sum(np.sum(u**2) for u in leaves))
        size = max(np.sqrt(sum(np.sum(w**2) for w in weights)), eps)
        ratio = step / size
        scale = 1.0 if ratio <= max_ratio else max_ratio / ratio
        expected.append((max_ratio, scale, [u * scale for u in leaves]))
    return expected


TRUST_RATIO = [dict(), dict(max_ratio=0.3), dict(max_ratio=0.02, eps=50.0)]


def test_trust_ratio_clip_matches_reference():
    stream = jax.tree.map(lambda x: x * 0.05, make_stream(12))
    params = finite_params(13, T)
    steps, weights = np_steps(stream), np_steps(params)
    check_preset(
        oc.trust_ratio_clip,
        TRUST_RATIO,
        lambda kw: trust_ratio_reference(steps, weights, **kw),
        stream,
        params,
    )
    # Only the spikes are clipped at the looser bounds; the default clips
    # every finite step of this stream.
    (_, loose), (_, floored) = scan_many(
        [oc.trust_ratio_clip(**kw) for kw in TRUST_RATIO[1:]], stream, params
    )
    for stats in (loose, floored):
        assert 5 < int(jnp.sum(stats.clipped)) < T // 4


def test_trust_ratio_clip_needs_params():
    tx = oc.trust_ratio_clip()
    with pytest.raises(ValueError, match="trust_ratio_clip needs the parameters"):
        tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))
    with pytest.raises(ValueError, match="eps"):
        oc.trust_ratio_clip(eps=-1.0)


# ---------------------------------------------------------------------------
# Paper properties, precision, state
# ---------------------------------------------------------------------------

HOMOGENEOUS = [
    ("autoclip", lambda: oc.autoclip(25.0, history=32)),
    ("olmo", lambda: oc.olmo_adaptive_clip(1.02, 0.9, eps=0.0)),
    ("adagc_after_warmup", lambda: oc.adagc(warmup_steps=0, eps=0.0)),
    ("zclip_uncapped", lambda: oc.zclip(max_grad_norm=None, warmup_steps=10)),
    ("zclip_percentile", lambda: oc.zclip(max_grad_norm=None, mode="percentile")),
]


def test_scale_homogeneous():
    """Multiplying every gradient by c multiplies every threshold by c."""
    c = 7.25
    stream = make_stream(11, steps=200)
    both = jax.tree.map(lambda x: jnp.stack([x, x * c]), stream)
    txs = [make() for _, make in HOMOGENEOUS]
    results = jax.vmap(lambda s: scan_many(txs, s))(both)
    finite = ~np.array([not is_finite(x) for x in np_steps(stream)])
    for (name, _), (_, stats) in zip(HOMOGENEOUS, results, strict=True):
        assert int(jnp.sum(stats.clipped[0])) > 5, name
        np.testing.assert_allclose(
            np.asarray(stats.threshold[1])[finite],
            c * np.asarray(stats.threshold[0])[finite],
            rtol=RTOL,
            err_msg=name,
        )
        np.testing.assert_allclose(
            np.asarray(stats.scale[1])[finite],
            np.asarray(stats.scale[0])[finite],
            rtol=RTOL,
            err_msg=name,
        )


def test_float64_matches_reference_to_1e_10():
    with jax.enable_x64(True):
        stream = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), make_stream(12))
        steps = np_steps(stream)
        for tx, expected in [
            (
                oc.zclip(max_grad_norm=2.0),
                global_reference(RefZClip(max_grad_norm=2.0), steps),
            ),
            (
                oc.adagc(warmup_steps=20),
                tensor_reference(RefAdaGC(warmup_steps=20), steps),
            ),
        ]:
            _, stats = run_stream(tx, stream)
            assert stats.threshold.dtype == jnp.float64
            good = np.array([e is not None for e in expected])
            rows = [e for e in expected if e is not None]
            for field, k in [(stats.threshold, 0), (stats.scale, 1)]:
                np.testing.assert_allclose(
                    np.asarray(field)[good], np.array([r[k] for r in rows]), rtol=1e-10
                )


def test_low_precision_gradients_keep_float32_statistics():
    base = make_stream(13, steps=40)
    for dtype in (jnp.float16, jnp.bfloat16):
        # entries near 3e3: their float16 squares overflow, the norms must not
        stream = jax.tree.map(lambda x, d=dtype: (x * 100).astype(d), base)
        tx = optax.chain(
            oc.zclip(warmup_steps=5), oc.adagc(warmup_steps=5), oc.spam_clip()
        )
        state = tx.init(first(stream))
        for leaf in jax.tree.leaves(state):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert leaf.dtype == jnp.float32
        state, (outs, _) = scanner(tx)(state, stream, None)
        assert all(o.dtype == dtype for o in jax.tree.leaves(outs))
        bad = np.array([not is_finite(x) for x in np_steps(stream)])
        for s in oc.stats(state):
            assert s.norm.dtype == jnp.float32
            assert bool(jnp.all(jnp.isfinite(s.norm)))
        # the first transform sees (and zeroes) every non-finite step
        assert int(oc.stats(state)[0].nonfinite_count) == int(bad.sum())


PRESETS = [
    ("autoclip", lambda: oc.autoclip(history=16)),
    ("zclip", lambda: oc.zclip(warmup_steps=5)),
    ("adagc", lambda: oc.adagc(warmup_steps=5)),
    ("olmo", lambda: oc.olmo_adaptive_clip()),
    ("quantile", lambda: oc.quantile_clip()),
    ("spam", lambda: oc.spam_clip(threshold=50.0, reset_interval=20, guard_steps=3)),
    ("stable_spam", lambda: oc.stable_spam_clip(0.9)),
    ("clippy", lambda: oc.clippy()),
]


def test_save_restore_vmap_and_jit():
    """Checkpointed mid-stream state continues identically; vmap runs independently."""
    import flax.serialization

    streams = [make_stream(s, steps=40) for s in (14, 16)]
    params = finite_params(15, 40)
    txs = [make() for _, make in PRESETS]
    states0 = tuple(tx.init(first(params)) for tx in txs)

    def body(states, xs):
        grads, p = xs
        new, outs = [], []
        for tx, state in zip(txs, states, strict=True):
            out, state = tx.update(grads, state, p)
            new.append(state)
            outs.append(out)
        return tuple(new), outs

    go = jax.jit(lambda s, x, p: jax.lax.scan(body, s, (x, p)))
    half = lambda tree, h: jax.tree.map(lambda x: x[20 * h : 20 * (h + 1)], tree)  # noqa: E731
    mid, _ = go(states0, half(streams[0], 0), half(params, 0))
    end, second = go(mid, half(streams[0], 1), half(params, 1))
    restored = flax.serialization.from_bytes(states0, flax.serialization.to_bytes(mid))
    end2, second2 = go(restored, half(streams[0], 1), half(params, 1))
    for x, y in zip(
        jax.tree.leaves((end, second)), jax.tree.leaves((end2, second2)), strict=True
    ):
        np.testing.assert_array_equal(x, y)
    assert [len(oc.stats(s)) for s in end] == [1] * len(PRESETS)

    first_half = [go(states0, half(s, 0), half(params, 0)) for s in streams]
    both = jax.tree.map(lambda *x: jnp.stack(x), *[half(s, 0) for s in streams])
    batched = jax.vmap(go, in_axes=(None, 0, None))(states0, both, half(params, 0))
    for i, single in enumerate(first_half):
        for x, y in zip(jax.tree.leaves(single), jax.tree.leaves(batched), strict=True):
            np.testing.assert_allclose(y[i], x, rtol=1e-6)


def test_inject_hyperparams_changes_thresholds_without_retracing():
    traces = []

    def factory(alpha, z_thresh, max_grad_norm, warmup_steps):
        traces.append(1)
        return oc.zclip(alpha, z_thresh, max_grad_norm, warmup_steps=warmup_steps)

    tx = optax.inject_hyperparams(factory)(
        alpha=0.97, z_thresh=2.5, max_grad_norm=1.0, warmup_steps=3
    )
    stream = jax.tree.map(
        lambda x: jnp.where(jnp.isfinite(x), x, 0.0), make_stream(19, 12)
    )
    state = tx.init(first(stream))
    step = jax.jit(tx.update)
    bounds = []
    for t in range(3):
        state.hyperparams["max_grad_norm"] = jnp.asarray(0.5 + 0.1 * t)
        _, state = step(jax.tree.map(lambda x, t=t: x[t], stream), state)
        bounds.append(float(oc.stats(state)[0].threshold))
    assert len(traces) == 2  # init, and one trace of update for every value
    np.testing.assert_allclose(bounds, [0.5, 0.6, 0.7], rtol=1e-6)

    p = jax.tree.map(lambda x: x[1], stream)
    factories = [
        (oc.autoclip, dict(percentile=20.0)),
        (oc.quantile_clip, dict(target_quantile=0.3, learning_rate=0.1, initial=1.0)),
        (oc.adagc, dict(lambda_rel=1.1, warmup_steps=2)),
        (oc.olmo_adaptive_clip, dict(max_grad_norm_ratio=1.2)),
        (oc.spam_clip, dict(threshold=100.0, guard_steps=2)),
        (oc.stable_spam_clip, dict(beta=0.9)),
        (oc.clippy, dict(relative=0.2)),
    ]
    txs = [optax.inject_hyperparams(f)(**kw) for f, kw in factories]
    params = jax.tree.map(lambda x: jnp.broadcast_to(x, (12, *x.shape)), p)
    for (f, _), (outs, stats) in zip(
        factories, scan_many(txs, stream, params), strict=True
    ):
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(outs))
        assert int(stats.count[-1]) == 12
        assert int(jnp.sum(stats.clipped)) > 0, f.__name__


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: oc.autoclip(percentile=101.0), "`percentile`.*101"),
        (lambda: oc.autoclip(history=0), "`history`.*0"),
        (lambda: oc.zclip(alpha=1.5), "`alpha`.*1.5"),
        (lambda: oc.zclip(z_thresh=0.0), "`z_thresh`.*0.0"),
        (lambda: oc.zclip(warmup_steps=2.5), "`warmup_steps`.*2.5"),
        (lambda: oc.zclip(mode="median"), "`mode`.*median"),
        (lambda: oc.zclip(clip_option="max"), "`clip_option`.*max"),
        (lambda: oc.adagc(lambda_rel=-1.0), "`lambda_rel`.*-1.0"),
        (lambda: oc.adagc(lambda_abs=-2.0), "`lambda_abs`.*-2.0"),
        (lambda: oc.olmo_adaptive_clip(beta=2.0), "`beta`.*2.0"),
        (lambda: oc.quantile_clip(target_quantile=1.5), "`target_quantile`.*1.5"),
        (lambda: oc.quantile_clip(initial=0.0), "`initial`.*0.0"),
        (lambda: oc.quantile_clip(learning_rate=float("nan")), "`learning_rate`.*nan"),
        (lambda: oc.spam_clip(threshold=-1.0), "`threshold`.*-1.0"),
        (lambda: oc.spam_clip(reset_interval=-5), "`reset_interval`.*-5"),
        (lambda: oc.stable_spam_clip(beta=1.0), "`beta`.*1.0"),
        (lambda: oc.clippy(relative=-0.1), "`relative`.*-0.1"),
        (lambda: oc.clippy(nonfinite="skip"), "`nonfinite`.*skip"),
    ],
)
def test_bad_hyperparameters_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_clippy_needs_params():
    tx = oc.clippy()
    with pytest.raises(ValueError, match="params"):
        tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))


# ---------------------------------------------------------------------------
# No absorbing zeros: each preset after a long run of zero gradients
# ---------------------------------------------------------------------------


def zero_run_stream(seed, before, zeros, after, frozen):
    """Ordinary gradients with ``zeros`` all-zero steps in the ``frozen``
    leaves after ``before`` steps; also the stream without those steps."""
    rng = np.random.default_rng(seed)
    steps = before + zeros + after
    level = np.exp(rng.normal(0.0, 0.5, size=steps))
    level[rng.choice(steps, 20, replace=False)] *= 20.0
    stream = {
        f"p{i}": rng.normal(size=(steps, *s)) * level.reshape(-1, *[1] * len(s))
        for i, s in enumerate(STREAM_SHAPES)
    }
    for k in frozen:
        stream[k][before : before + zeros] = 0.0
    kept = np.r_[0:before, before + zeros : steps]
    cast = lambda tree: {k: jnp.asarray(x, jnp.float32) for k, x in tree.items()}  # noqa: E731
    return cast(stream), cast({k: x[kept] for k, x in stream.items()})


# Every preset built on a rule, whether it clips per tensor, and the steps
# its docstring says it needs to be back to normal after a run of exact-zero
# gradients (0: at once).
RECOVERING_PRESETS = [
    ("autoclip", lambda: oc.autoclip(), False, 0),
    ("zclip", lambda: oc.zclip(), False, 0),
    ("adagc", lambda: oc.adagc(), True, 0),
    ("olmo_adaptive_clip", lambda: oc.olmo_adaptive_clip(), True, 0),
    ("quantile_clip", lambda: oc.quantile_clip(), False, 0),
]


@pytest.mark.parametrize("frozen", [("p0",), ("p0", "p1", "p2")], ids=["one", "all"])
def test_presets_recover_from_a_long_run_of_zero_gradients(frozen):
    # 120 steps first: past AdaGC's 100 warm-up steps; 1200 zero steps: far
    # past the ~875 after which the old quantile bound underflowed to 0.
    before, zeros, after = 120, 1200, 40
    stream, reference = zero_run_stream(50, before, zeros, after, frozen)
    # with one tensor frozen the global norm is not zero: per-tensor presets only
    presets = [p for p in RECOVERING_PRESETS if p[2] or len(frozen) == len(stream)]
    txs = [make() for _, make, _, _ in presets]
    results = scan_many(txs, stream)
    expected = scan_many(txs, reference)
    not_recovered = []
    for (name, _, _, within), (outs, _), (ref_outs, ref_stats) in zip(
        presets, results, expected, strict=True
    ):
        assert int(jnp.sum(ref_stats.clipped[before:])) > 0, name
        for k in frozen:
            got = np.asarray(outs[k])[before + zeros + within :]
            want = np.asarray(ref_outs[k])[before + within :]
            moved = np.abs(got).reshape(len(got), -1).sum(axis=1)
            if not (np.all(moved > 0) and np.allclose(got, want, rtol=1e-5, atol=0)):
                not_recovered.append((name, k))
    assert not not_recovered, not_recovered


def test_autoclip_include_zeros_reproduces_the_official_zero_pinning():
    """12 zero steps early on: officially the 10th percentile is then 0 for
    most of the next 68 steps (every update zeroed); by default none is."""
    stream, _ = zero_run_stream(51, 8, 12, 68, ("p0", "p1", "p2"))
    official, default = scan_many(
        [oc.autoclip(include_zeros=True), oc.autoclip()], stream
    )
    after = slice(20, None)
    steps = np_steps(stream)[after]
    norms = np.array([gnorm(leaves) for leaves in steps])
    zeroed = lambda outs: np.sum(  # noqa: E731
        sum(np.abs(np.asarray(outs[k])[after]).reshape(68, -1).sum(1) for k in outs)
        == 0
    )
    assert np.all(norms > 0)
    assert zeroed(official[0]) > 30
    assert zeroed(default[0]) == 0
    # the official option's bound is the percentile of every norm, zeros included
    reference = RefAutoClip(10.0, None, include_zeros=True)
    want = [reference(gnorm(leaves)) for leaves in np_steps(stream)]
    np.testing.assert_allclose(official[1].threshold, want, rtol=1e-5)


@pytest.mark.parametrize(
    "make", [oc.adagc, oc.olmo_adaptive_clip], ids=["adagc", "olmo_adaptive_clip"]
)
def test_per_tensor_presets_forward_stacked_axes(make):
    # Three stacked layers: one norm, one bound and one statistic per layer,
    # each layer clipped as its own tensor (as three separate leaves are).
    rng = np.random.default_rng(5)
    steps = [rng.normal(size=(3, 4)).astype(np.float32) * s for s in (1, 5, 0.2)]
    stacked = make(stacked_axes=1)
    separate = make()
    s1 = stacked.init({"w": jnp.zeros((3, 4))})
    s2 = separate.init({f"l{i}": jnp.zeros(4) for i in range(3)})
    for g in steps:
        out1, s1 = stacked.update({"w": jnp.asarray(g)}, s1)
        out2, s2 = separate.update({f"l{i}": jnp.asarray(g[i]) for i in range(3)}, s2)
        assert s1.stats.norm.shape == (3,)
        for i in range(3):
            np.testing.assert_allclose(out1["w"][i], out2[f"l{i}"], rtol=1e-6)
        np.testing.assert_allclose(s1.stats.threshold, s2.stats.threshold, rtol=1e-6)


# ---------------------------------------------------------------------------
# AdamWClip
# ---------------------------------------------------------------------------


def adamw_clip_reference(steps, k=3.0, beta2=0.999, floor=1e-10, warmup_steps=0):
    """AdamWClip's clipping (official code), per entry: each entry within
    ``max(k * sqrt(v / (1 - beta2**n)), floor)``, ``v`` and ``n`` from the
    earlier (finite) steps, ``v`` updated with the clipped gradient."""
    v = [np.zeros_like(x) for x in steps[0]]
    n = 0
    expected = []
    for leaves in steps:
        if not is_finite(leaves):  # documented difference: skipped, not in v
            expected.append(None)
            continue
        out = []
        for i, g in enumerate(leaves):
            if n + 1 > warmup_steps:
                correction = 1.0 / (1.0 - beta2**n) if n > 0 else 1.0
                bound = np.maximum(np.sqrt(v[i] * correction) * k, floor)
                g = np.clip(g, -bound, bound)
            v[i] = v[i] * beta2 + (1 - beta2) * g * g
            out.append(g)
        n += 1
        before, after = gnorm(leaves), gnorm(out)
        expected.append((k, after / before if before > 0 else 1.0, out))
    return expected


ADAMW_CLIP = [
    dict(),
    dict(k=2.0, beta2=0.9, floor=1e-3, warmup_steps=5),
    dict(k=1.5, beta2=0.99, floor=0.5, warmup_steps=1),
]


def test_adamw_clip_matches_reference():
    stream = make_stream(30)
    steps = np_steps(stream)
    check_preset(
        oc.adamw_clip,
        ADAMW_CLIP,
        lambda kw: adamw_clip_reference(steps, **kw),
        stream,
    )


def official_adamwclip(params, grads, lr, betas, eps, weight_decay, k, floor, warm):
    """The official ``AdamWClip.step`` (PyPI 0.1.4), one float64 NumPy array per
    parameter; returns the parameters after every step."""
    b1, b2 = betas
    theta = [p.copy() for p in params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    trajectory = []
    for t, step_grads in enumerate(grads, start=1):
        lr_correction1 = -lr / (1.0 - b1**t)
        correction2 = 1.0 / (1.0 - b2**t)
        correction_clip = 1.0 / (1.0 - b2 ** (t - 1)) if t > 1 else 1.0
        theta = [p + (-lr * weight_decay) * p for p in theta]
        step_grads = [g.copy() for g in step_grads]
        if k is not None and t > warm:  # k None: plain AdamW, as officially
            for i, g in enumerate(step_grads):
                bound = np.maximum(np.sqrt(v[i] * correction_clip) * k, floor)
                step_grads[i] = np.minimum(np.maximum(g, -bound), bound)
        for i, g in enumerate(step_grads):
            m[i] = m[i] * b1 + (1 - b1) * g
            v[i] = v[i] * b2 + (1 - b2) * g * g
            denom = np.sqrt(v[i] * correction2) + eps
            theta[i] = theta[i] + lr_correction1 * m[i] / denom
        trajectory.append([p.copy() for p in theta])
    return trajectory


@pytest.mark.parametrize(
    "settings",
    [
        dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, k=3.0,
             floor=1e-10, warm=0),
        dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, k=2.0,
             floor=1e-3, warm=3),
    ],
    ids=["official_defaults", "other"],
)  # fmt: skip
def test_adamw_clip_before_adamw_is_the_official_optimizer(settings):
    """20 steps of gradients with spikes: the chain's parameters equal the
    official optimizer's to 1e-6 (float32), and clipping changed them."""
    rng = np.random.default_rng(31)
    shapes = [(3, 4), (5,)]
    params = [rng.normal(size=s) for s in shapes]
    grads = [[rng.normal(size=s) * np.exp(rng.normal(0, 0.3)) for s in shapes]]
    for t in range(1, 20):
        g = [rng.normal(size=s) * np.exp(rng.normal(0, 0.3)) for s in shapes]
        if t in (8, 13):
            g = [x * 50.0 for x in g]  # spikes of the whole gradient
        if t == 16:
            g[0].flat[5] *= 1e3  # a spike of one entry
        grads.append(g)
    s = settings
    want = official_adamwclip(
        params, grads, s["lr"], s["betas"], s["eps"], s["weight_decay"],
        s["k"], s["floor"], s["warm"],
    )  # fmt: skip
    b1, b2 = s["betas"]
    adamw = optax.adamw(s["lr"], b1, b2, s["eps"], weight_decay=s["weight_decay"])
    tx = optax.chain(oc.adamw_clip(s["k"], b2, s["floor"], s["warm"]), adamw)
    f32 = lambda tree: [jnp.asarray(x, jnp.float32) for x in tree]  # noqa: E731

    def body(carry, g):
        p, state = carry
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
        return (p, state), (p, oc.stats(state)[0].clipped)

    stacked = [
        jnp.stack([jnp.asarray(g[i], jnp.float32) for g in grads]) for i in (0, 1)
    ]
    with jax.numpy_dtype_promotion("standard"):  # optax.adam's bias correction
        p0 = f32(params)
        (_, state), (got, clipped) = jax.jit(lambda c, x: jax.lax.scan(body, c, x))(
            (p0, tx.init(p0)), stacked
        )
    for i in range(2):
        np.testing.assert_allclose(
            got[i], np.stack([w[i] for w in want]), rtol=1e-6, atol=1e-6
        )
        # the clip's second moment is the optimizer's own
        np.testing.assert_allclose(state[0].nu[i], state[1][0].nu[i], rtol=1e-6)
    assert int(state[0].finite_count) == 20
    clipped = np.asarray(clipped)
    assert clipped[13] > 0 and clipped[16] > 0
    # without the clipping the trajectory is another one
    plain = official_adamwclip(
        params, grads, s["lr"], s["betas"], s["eps"], s["weight_decay"],
        None, s["floor"], s["warm"],
    )  # fmt: skip
    assert np.max(np.abs(plain[-1][0] - want[-1][0])) > 1e-3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0.0), "adamw_clip: `k`.*0.0"),
        (dict(k=-3.0), "adamw_clip: `k`.*-3.0"),
        (dict(beta2=1.0), "adamw_clip: `beta2`.*1.0"),
        (dict(beta2=-0.5), "adamw_clip: `beta2`.*-0.5"),
        (dict(floor=0.0), "adamw_clip: `floor`.*0.0"),
        (dict(warmup_steps=2.5), "adamw_clip: `warmup_steps`.*2.5"),
        (dict(warmup_steps=-1), "adamw_clip: `warmup_steps`.*-1"),
        (dict(nonfinite="skip"), "adamw_clip: `nonfinite`.*skip"),
        (dict(per_tensor_stats="yes"), "adamw_clip: `per_tensor_stats`.*yes"),
    ],
)
def test_adamw_clip_bad_hyperparameters_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        oc.adamw_clip(**kwargs)


def test_adamw_clip_nonfinite_step_leaves_the_moment_untouched():
    tx = oc.adamw_clip(k=2.0, beta2=0.5)
    g = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([[0.5]])}
    state = tx.init(g)
    _, state = tx.update(g, state)
    bad = {"a": jnp.array([jnp.nan, 1.0]), "b": jnp.array([[jnp.inf]])}
    out, after = jax.jit(tx.update)(bad, state)
    for leaf in jax.tree.leaves(out):
        np.testing.assert_array_equal(leaf, 0.0)
    for x, y in zip(jax.tree.leaves(after.nu), jax.tree.leaves(state.nu), strict=True):
        np.testing.assert_array_equal(x, y)
    assert int(after.finite_count) == 1 and int(after.count) == 2
    assert int(after.stats.nonfinite_count) == 1
    # "propagate" passes the NaN on, and still keeps it out of the moment
    tx = oc.adamw_clip(k=2.0, beta2=0.5, nonfinite="propagate")
    out, after = tx.update(bad, state)
    assert bool(jnp.isnan(out["a"][0]))
    np.testing.assert_array_equal(after.nu["a"], state.nu["a"])


def test_adamw_clip_k_as_a_schedule_and_injected():
    # k = 1 on step 0, 2 on step 1: the second step's bound is k * sqrt(v_hat).
    k = lambda count: 1.0 + count.astype(jnp.float32)  # noqa: E731
    tx = oc.adamw_clip(k, beta2=0.5, warmup_steps=1)
    state = tx.init(jnp.zeros(2))
    _, state = tx.update(jnp.array([1.0, -2.0]), state)
    out, state = tx.update(jnp.array([10.0, -10.0]), state)
    np.testing.assert_allclose(out, [2.0, -4.0], rtol=1e-6)
    assert float(state.stats.threshold) == 2.0
    traces = []

    def factory(k, beta2):
        traces.append(1)
        return oc.adamw_clip(k, beta2, warmup_steps=1)

    tx = optax.inject_hyperparams(factory)(k=3.0, beta2=0.5)
    state = tx.init(jnp.zeros(2))
    step = jax.jit(tx.update)
    state.hyperparams["k"] = jnp.asarray(3.0)
    _, state = step(jnp.array([1.0, -2.0]), state)
    state.hyperparams["k"] = jnp.asarray(1.5)
    out, state = step(jnp.array([10.0, -10.0]), state)
    np.testing.assert_allclose(out, [1.5, -3.0], rtol=1e-6)
    assert len(traces) == 2  # init, and one trace of update for both values


def test_adamw_clip_per_tensor_stats_and_nonfinite_paths():
    params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    tx = oc.adamw_clip(per_tensor_stats=True)
    state = tx.init(params)
    assert state.count.dtype == jnp.int32 and state.finite_count.dtype == jnp.int32
    g = {"a": jnp.array([3.0, 4.0, 0.0]), "b": jnp.array([[1.0, 0.0], [0.0, 0.0]])}
    _, state = tx.update(g, state)
    np.testing.assert_allclose(state.stats.tensor_norms, [5.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(state.stats.norm, math.sqrt(26.0), rtol=1e-6)
    bad = {"a": g["a"], "b": g["b"].at[1, 1].set(jnp.nan)}
    _, state = tx.update(bad, state)
    assert oc.nonfinite_paths(state, params) == ["b"]
