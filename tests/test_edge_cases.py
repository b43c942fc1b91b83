"""One table of edge-case trees, applied to every transform of optaxclip.

Each case is a tree of updates and what is expected of it; each transform
comes with a NumPy (float64) reference of its first step, written from its
docstring. Every (transform, case) pair runs under ``jax.jit`` (all cases of
one transform in one compiled function, which keeps the file fast) and a
subset runs eagerly. What is checked for every pair: the tree structure,
shapes and dtypes are kept; integer, ``None`` and ``MaskedNode`` leaves are
kept as they were; the values equal the NumPy reference (zeros on a NaN/Inf
step); finite input gives a finite output; large float16 / bfloat16 values
are clipped to the bound, not zeroed; tiny ones pass unclipped; complex
leaves keep their phase; ``oc.stats`` exist, count the step and the
non-finite steps, and hold a finite norm and scale for finite input (the
threshold may be +inf where a rule has no history yet); the guards leave
the wrapped optimizer's state untouched on a skipped step; and an ordinary
step after a NaN step or an all-zero step behaves as a first step (no
absorbing state).

Pairs that fail because of a known defect are not in the main table: they
are in the ``test_bug_*`` functions at the end, which keep failing until the
defect is fixed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

F16, BF16, C64 = jnp.float16, jnp.bfloat16, jnp.complex64
BATCH = 2  # examples per batch for the per-example transforms


def _is_float(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


# ---------------------------------------------------------------------------
# The edge cases
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """An edge-case tree of updates and what is special about it."""

    name: str
    tree: Callable[[], Any]
    nonfinite: bool = False  # the step holds a NaN or an Inf: zeroed / skipped
    large: bool = False  # squared entries overflow the leaf dtype: still clipped
    tiny: bool = False  # entries in the subnormal range: passed unclipped
    follow: bool = False  # then an ordinary step, which must act as a first step


def _base(a=(3.0, -4.0, 1.0)) -> dict:
    return {
        "a": jnp.asarray(a, jnp.float32),
        "b": {"c": jnp.asarray([[0.5, 2.0], [-1.0, 0.0]], jnp.float32)},
    }


def _bad(value: float) -> Callable[[], dict]:
    return lambda: _base(a=(3.0, value, 1.0))


def _filled(dtype: Any, value: float) -> Callable[[], dict]:
    return lambda: {
        "a": jnp.asarray(value * np.array([1.0, -1.0, 1.0, -1.0]), dtype),
        "b": jnp.asarray(np.full((2, 3), -value), dtype),
    }


CASES = [
    Case("ordinary", _base),
    Case("zeros", lambda: jax.tree.map(np.zeros_like, _base()), follow=True),
    Case("nan", _bad(np.nan), nonfinite=True, follow=True),
    Case("posinf", _bad(np.inf), nonfinite=True),
    Case("neginf", _bad(-np.inf), nonfinite=True),
    # 6e4 squared overflows float16 (max 65504); 1e-7 is float16-subnormal.
    Case("float16_large", _filled(F16, 6e4), large=True),
    Case("float16_tiny", _filled(F16, 1e-7), tiny=True),
    # 1e30 squared overflows float32 and bfloat16; 1e-30 squared underflows.
    Case("bfloat16_large", _filled(BF16, 1e30), large=True),
    Case("bfloat16_tiny", _filled(BF16, 1e-30), tiny=True),
    Case(
        "integer",
        lambda: {
            "f": jnp.asarray([3.0, 4.0]),
            "i": jnp.asarray([5, -7, 9], jnp.int32),
        },
    ),
    Case("none", lambda: {"f": jnp.asarray([3.0, 4.0, 12.0]), "n": None}),
    Case(
        "masked_node",
        lambda: {"f": jnp.asarray([3.0, 4.0, 12.0]), "m": optax.MaskedNode()},
    ),
    Case(
        "complex",
        lambda: {
            "z": jnp.asarray([3 + 4j, -1 + 1j, 0j], C64),
            "w": jnp.asarray([[1j, 2.0], [0.5 - 0.5j, -3j]], C64),
        },
    ),
    Case("empty_tree", dict),
    Case(
        "empty_arrays",
        lambda: {
            "e": jnp.zeros((0,)),
            "f": jnp.zeros((0, 3)),
            "w": jnp.asarray([3.0, 4.0]),
        },
    ),
    Case("scalars", lambda: {"s": jnp.asarray(3.0), "t": jnp.asarray(-4.0)}),
    Case(
        "mixed_dtypes",
        lambda: {
            "f32": jnp.asarray([3.0, 4.0]),
            "f16": jnp.asarray([[1.0, -2.0]], F16),
            "bf16": jnp.asarray([0.5, 6.0], BF16),
            "c64": jnp.asarray([1 + 1j], C64),
            "i8": jnp.asarray([1, -2], jnp.int8),
        },
    ),
]
CASE = {c.name: c for c in CASES}
# Also run eagerly: every transform on the tree that holds float32, float16,
# bfloat16, complex64 and int8 leaves at once, and a few on a NaN step.
EAGER_CASES = ("mixed_dtypes",)
EAGER_NAN = ("global_norm_ord2", "skip_nonfinite")


# ---------------------------------------------------------------------------
# NumPy references of each transform's first step (float64 / complex128)
# ---------------------------------------------------------------------------
# A reference maps the float leaves of the updates (and the matching leaves of
# the parameters, all ones) to the expected float leaves of the output.


def _pnorm(leaves, p=2.0) -> float:
    flat = np.concatenate([np.abs(x).ravel() for x in leaves] + [np.zeros(0)])
    if flat.size == 0:
        return 0.0
    if np.isinf(p):
        return float(flat.max())
    return float(np.sum(flat**p) ** (1.0 / p))


def _shrink(norm: float, bound: float) -> float:
    return 1.0 if norm <= bound else bound / norm


def ref_identity(leaves, weights):
    return list(leaves)


def ref_value(c):
    def ref(leaves, weights):
        out = []
        for x in leaves:
            mag = np.abs(x)
            with np.errstate(divide="ignore", invalid="ignore"):
                out.append(np.where(mag > c, x * (c / mag), x))
        return out

    return ref


def ref_global(c, p=2.0):
    def ref(leaves, weights):
        s = _shrink(_pnorm(leaves, p), c)
        return [x * s for x in leaves]

    return ref


def ref_tensor(c):
    def ref(leaves, weights):
        return [x * _shrink(_pnorm([x]), c) for x in leaves]

    return ref


def _rms(x) -> float:
    return float(np.sqrt(np.sum(np.abs(x) ** 2) / max(x.size, 1)))


def ref_rms(c):
    def ref(leaves, weights):
        return [x * _shrink(_rms(x), c) for x in leaves]

    return ref


def _unit_norms(x):
    """optax.unitwise_norm's units: vectors whole, rank 2-3 reduce axis 0."""
    if np.squeeze(x).ndim <= 1:
        axes = tuple(range(x.ndim))
    elif x.ndim in (2, 3):
        axes = (0,)
    else:
        axes = (0, 1, 2)
    sq = np.sum(np.abs(x) ** 2, axis=axes, keepdims=True)
    return np.broadcast_to(np.sqrt(sq), x.shape)


def ref_agc(c, eps):
    def ref(leaves, weights):
        out = []
        for g, w in zip(leaves, weights, strict=True):
            bound = np.maximum(_unit_norms(w), eps) * c
            g_norm = _unit_norms(g)
            with np.errstate(divide="ignore", invalid="ignore"):
                out.append(np.where(g_norm > bound, g * (bound / g_norm), g))
        return out

    return ref


def ref_sgd(leaves, weights):
    return [-x for x in leaves]  # sgd(1.0, momentum=0.9), first step


def ref_clippy(rel, ab):
    def ref(leaves, weights):
        out = []
        for u, w in zip(leaves, weights, strict=True):
            room = rel * np.abs(w) + ab
            ratio = float(np.max(np.abs(u) / room, initial=0.0))
            out.append(u * (1.0 / ratio if ratio > 1 else 1.0))
        return out

    return ref


def _multipliers(norms, c):
    # optax: min(1, C / n), a NaN norm counting as unclipped (multiplier 1).
    with np.errstate(divide="ignore", invalid="ignore"):
        m = np.minimum(c / norms, 1.0)
    return np.where(np.isnan(m), 1.0, m)


def _batch_sum(m, x):
    with np.errstate(invalid="ignore"):
        return np.tensordot(m, x, axes=(0, 0))


def ref_per_example(c):
    def ref(leaves, weights):
        sq = [np.sum(np.abs(x.reshape(BATCH, -1)) ** 2, axis=1) for x in leaves]
        norms = np.sqrt(np.sum(sq, axis=0)) if sq else np.zeros(BATCH)
        m = _multipliers(norms, c)
        return [_batch_sum(m, x) for x in leaves]

    return ref


def ref_layer(c):
    def ref(leaves, weights):
        bound = c / math.sqrt(max(len(leaves), 1))
        out = []
        for x in leaves:
            norms = np.sqrt(np.sum(np.abs(x.reshape(BATCH, -1)) ** 2, axis=1))
            out.append(_batch_sum(_multipliers(norms, bound), x))
        return out

    return ref


# Measures of an output that a clipping transform bounds (for the large cases).


def m_max_abs(leaves, weights):
    return _pnorm(leaves, np.inf)


def m_global(p):
    return lambda leaves, weights: _pnorm(leaves, p)


def m_max_tensor(leaves, weights):
    return max([_pnorm([x]) for x in leaves], default=0.0)


def m_max_rms(leaves, weights):
    return max([_rms(x) for x in leaves], default=0.0)


def m_agc(eps):
    def measure(leaves, weights):
        ratios = [
            np.max(_unit_norms(g) / np.maximum(_unit_norms(w), eps), initial=0.0)
            for g, w in zip(leaves, weights, strict=True)
        ]
        return float(max(ratios, default=0.0))

    return measure


def m_clippy(rel, ab):
    def measure(leaves, weights):
        ratios = [
            np.max(np.abs(u) / (rel * np.abs(w) + ab), initial=0.0)
            for u, w in zip(leaves, weights, strict=True)
        ]
        return float(max(ratios, default=0.0))

    return measure


def ref_normalize_tensor(c):
    def ref(leaves, weights):
        return [x * (c / n) if (n := _pnorm([x])) > 0 else x for x in leaves]

    return ref


def ref_normalize_global(c):
    def ref(leaves, weights):
        n = _pnorm(leaves)
        return [x * (c / n) if n > 0 else x for x in leaves]

    return ref


def ref_stabilizer(eps):
    # First step: the EMAs hold the norm n alone, so the target is
    # n / (n + eps) and the factor target / max(n, eps).
    def ref(leaves, weights):
        out = []
        for x in leaves:
            n = _pnorm([x])
            out.append(x * (n / (n + eps)) / max(n, eps) if n > 0 else x)
        return out

    return ref


def ref_spectral(c):
    """Each non-empty 2-D leaf's singular values clamped to ``c``; others kept."""

    def ref(leaves, weights):
        out = []
        for x in leaves:
            if x.ndim == 2 and x.size:
                u, s, vt = np.linalg.svd(x, full_matrices=False)
                x = (u * np.minimum(s, c)) @ vt
            out.append(x)
        return out

    return ref


def m_max_spectral(leaves, weights):
    tops = [
        np.linalg.svd(x, compute_uv=False)[0] for x in leaves if x.ndim == 2 and x.size
    ]
    return max(tops, default=0.0)


# ---------------------------------------------------------------------------
# The transforms
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Transform:
    """A transform, its first-step NumPy reference and the bound it enforces.

    ``kind``: ``"clip"`` (scopes and presets), ``"normalize"`` (a clip that
    sets each norm to its bound, so tiny gradients are scaled up), ``"guard"`` (wraps
    ``sgd(1.0, momentum=0.9)``), ``"per_example"`` (updates with a batch
    axis, init without) or ``"function"`` (the optax-style per-example
    functions, which return ``(summed, num_clipped)``). ``limit`` is
    ``(measure, bound)`` for transforms that clip on their first step, None
    for those whose first bound is the step's own measurement.
    """

    name: str
    make: Callable[[], Any]
    reference: Callable
    limit: tuple[Callable, float] | None
    kind: str = "clip"
    refuses: tuple[tuple[str, str], ...] = ()  # (case, error regex)


def _guarded(guard, **kwargs):
    # Integer leaves are masked out: optax.sgd itself cannot add a float
    # momentum to them under strict promotion.
    inner = optax.masked(
        optax.sgd(1.0, momentum=0.9), lambda p: jax.tree.map(_is_float, p)
    )
    return lambda: guard(inner, **kwargs)


# 1.0 for the first 5 steps, then down to 0.5 (optax's piecewise and cosine
# schedules do not run on an int32 count under strict promotion).
_SCHEDULE = optax.linear_schedule(1.0, 0.5, transition_steps=10, transition_begin=5)
_NO_LEAVES = (("empty_tree", "has no leaves"),)
_G1 = (m_global(2.0), 1.0)

TRANSFORMS = [
    Transform("clip_by_value", lambda: oc.clip_by_value(1.0), ref_value(1.0),
              (m_max_abs, 1.0)),
    Transform("clip_by_norm", lambda: oc.clip_by_norm(1.0), ref_tensor(1.0),
              (m_max_tensor, 1.0)),
    Transform("global_norm_ord1", lambda: oc.clip_by_global_norm(1.0, ord=1),
              ref_global(1.0, 1.0), (m_global(1.0), 1.0)),
    Transform("global_norm_ord2", lambda: oc.clip_by_global_norm(1.0),
              ref_global(1.0), _G1),
    Transform("global_norm_ordinf", lambda: oc.clip_by_global_norm(1.0, ord=np.inf),
              ref_global(1.0, np.inf), (m_global(np.inf), 1.0)),
    Transform("global_norm_ord3", lambda: oc.clip_by_global_norm(1.0, ord=3),
              ref_global(1.0, 3.0), (m_global(3.0), 1.0)),
    Transform("clip_by_block_rms", lambda: oc.clip_by_block_rms(1.0), ref_rms(1.0),
              (m_max_rms, 1.0)),
    Transform("adaptive_grad_clip", lambda: oc.adaptive_grad_clip(0.1),
              ref_agc(0.1, 1e-3), (m_agc(1e-3), 0.1)),
    # Scopes with rules; each first bound follows from the rule's docstring.
    Transform("global_norm_percentile",
              lambda: oc.clip_by_global_norm(oc.rules.percentile(50.0)),
              ref_identity, None),
    Transform("global_norm_zscore",
              lambda: oc.clip_by_global_norm(oc.rules.zscore()),
              ref_global(1.0), _G1),
    Transform("norm_ema_warmup",
              lambda: oc.clip_by_norm(oc.rules.ema(warmup=5, warmup_max_norm=1.0)),
              ref_global(1.0), _G1),
    Transform("value_quantile",
              lambda: oc.clip_by_value(oc.rules.quantile(initial=1.0)),
              ref_value(1.0), (m_max_abs, 1.0)),
    Transform("block_rms_schedule", lambda: oc.clip_by_block_rms(_SCHEDULE),
              ref_rms(1.0), (m_max_rms, 1.0)),
    # Presets (adagc and olmo with eps=0: their eps=1e-6 in the clip
    # coefficient shrinks tiny gradients on purpose, as the official codes).
    Transform("autoclip", lambda: oc.autoclip(), ref_identity, None),
    Transform("zclip", lambda: oc.zclip(), ref_global(1.0), _G1),
    Transform("adagc", lambda: oc.adagc(eps=0.0), ref_global(1.0), _G1),
    Transform("olmo_adaptive_clip", lambda: oc.olmo_adaptive_clip(eps=0.0),
              ref_identity, None),
    Transform("quantile_clip", lambda: oc.quantile_clip(), ref_global(0.1),
              (m_global(2.0), 0.1)),
    Transform("spam_clip", lambda: oc.spam_clip(), ref_identity, None),
    Transform("stable_spam_clip", lambda: oc.stable_spam_clip(), ref_identity, None),
    # A floor of 1: the first step (no second moment yet) clamps to the floor.
    Transform("adamw_clip", lambda: oc.adamw_clip(floor=1.0), ref_value(1.0),
              (m_max_abs, 1.0)),
    Transform("clippy", lambda: oc.clippy(), ref_clippy(0.1, 1e-7),
              (m_clippy(0.1, 1e-7), 1.0)),
    Transform("clip_by_spectral_norm", lambda: oc.clip_by_spectral_norm(1.0),
              ref_spectral(1.0), (m_max_spectral, 1.0)),
    # Guards around sgd(1.0, momentum=0.9): the first step applies -g.
    Transform("skip_nonfinite", _guarded(oc.skip_nonfinite), ref_sgd, None,
              kind="guard"),
    Transform("skip_spikes", _guarded(oc.skip_spikes, window=4), ref_sgd, None,
              kind="guard"),
    # Per-example: updates carry a leading batch axis of BATCH copies.
    Transform("clip_per_example", lambda: oc.clip_per_example(1.0),
              ref_per_example(1.0), (m_global(2.0), BATCH * 1.0),
              kind="per_example"),
    Transform("clip_per_example_quantile",
              lambda: oc.clip_per_example(oc.rules.quantile(initial=1.0)),
              ref_per_example(1.0), (m_global(2.0), BATCH * 1.0),
              kind="per_example"),
    Transform("per_example_global_norm_clip",
              lambda: lambda g: oc.per_example_global_norm_clip(g, 1.0),
              ref_per_example(1.0), (m_global(2.0), BATCH * 1.0),
              kind="function", refuses=_NO_LEAVES),
    Transform("per_example_layer_norm_clip",
              lambda: lambda g: oc.per_example_layer_norm_clip(g, 1.0),
              ref_layer(1.0), (m_global(2.0), BATCH * 1.0),
              kind="function", refuses=_NO_LEAVES),
    # The normalize action: every non-zero norm set to the bound.
    Transform("norm_normalize", lambda: oc.clip_by_norm(1.0, action="normalize"),
              ref_normalize_tensor(1.0), (m_max_tensor, 1.0), kind="normalize"),
    Transform("global_norm_normalize",
              lambda: oc.clip_by_global_norm(1.0, action="normalize"),
              ref_normalize_global(1.0), _G1, kind="normalize"),
    Transform("gradient_stabilizer", lambda: oc.gradient_stabilizer(),
              ref_stabilizer(1e-12), (m_max_tensor, 1.0), kind="normalize"),
]  # fmt: skip
TRANSFORM = {t.name: t for t in TRANSFORMS}


# ---------------------------------------------------------------------------
# Running a transform on a case
# ---------------------------------------------------------------------------


def _batched(t: Transform, tree: Any) -> Any:
    if t.kind in ("per_example", "function"):
        return jax.tree.map(lambda x: np.stack([np.asarray(x)] * BATCH), tree)
    return tree


def _inputs(t: Transform, case: Case) -> tuple:
    """(updates, params, follow-up updates or None) of ``t`` on ``case``."""
    tree = case.tree()
    # Built with NumPy: eager JAX ops would each compile a kernel.
    params = jax.tree.map(
        lambda x: np.ones(x.shape, x.dtype) if _is_float(x) else x, tree
    )
    follow = _batched(t, _base()) if case.follow else None
    return _batched(t, tree), params, follow


def _step(t: Transform, updates: Any, params: Any, follow: Any) -> dict:
    """``init`` and one ``update`` (and one more on ``follow``)."""
    if t.kind == "function":
        summed, clipped = t.make()(updates)
        return {"out": summed, "clipped": clipped}
    tx = t.make()
    state0 = tx.init(params)
    out, state = tx.update(updates, state0, params)
    result = {"state0": state0, "out": out, "state": state}
    if follow is not None:
        result["out2"], _ = tx.update(follow, state, params)
    return result


# XLA:CPU compiles these many-kernel programs two to three times faster with
# LLVM's optimizations off and the elemental emitters. Only code generation
# differs: the HLO (every operation, dtype and select) is the same. The eager
# runs use the default pipeline.
_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_cpu_use_fusion_emitters": False,
}


@functools.cache
def _jit_results(name: str) -> tuple[dict, dict]:
    """Every case of one transform, traced and compiled as one function."""
    t = TRANSFORM[name]
    errors = {}

    def run_all(inputs):
        results = {}
        for case_name, args in inputs.items():
            try:
                results[case_name] = _step(t, *args)
            except Exception as e:  # noqa: BLE001  (reported by the case's test)
                errors[case_name] = e
        return results

    inputs = {c.name: _inputs(t, c) for c in CASES if c.name not in dict(t.refuses)}
    lowered = jax.jit(run_all).lower(inputs)
    try:
        compiled = lowered.compile(compiler_options=_COMPILER_OPTIONS)
    except Exception:  # noqa: BLE001  (an XLA without these options)
        compiled = lowered.compile()
    # Read back to NumPy at once (slicing device arrays compiles kernels).
    return jax.device_get(compiled(inputs)), errors


def _result(t: Transform, case: Case, mode: str) -> dict:
    if mode == "eager":
        return _step(t, *jax.tree.map(jnp.asarray, _inputs(t, case)))
    results, errors = _jit_results(t.name)
    if case.name in errors:
        raise errors[case.name]
    return results[case.name]


# ---------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------

_RTOL = {
    jnp.dtype(F16): 2e-3,
    jnp.dtype(BF16): 1.6e-2,
    jnp.dtype(jnp.float32): 2e-6,
    jnp.dtype(C64): 2e-6,
}


def _f64(x) -> np.ndarray:
    a = np.asarray(x)
    return a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)


def _assert_close(actual, expected, dtype, what):
    """``actual`` (a leaf) equals ``expected`` (float64) rounded to ``dtype``."""
    rounded = _f64(np.asarray(expected).astype(dtype))
    np.testing.assert_allclose(
        _f64(actual), rounded, rtol=_RTOL[jnp.dtype(dtype)], atol=0, err_msg=what
    )


def _finite_leaves(tree) -> bool:
    return all(
        np.all(np.isfinite(_f64(x))) for x in jax.tree.leaves(tree) if _is_float(x)
    )


def check(t: Transform, case: Case, mode: str) -> None:
    """Runs ``t`` on ``case`` and checks everything the contracts promise."""
    refused = dict(t.refuses)
    updates, params, follow = _inputs(t, case)
    if case.name in refused:
        step = _step if mode == "eager" else jax.jit(functools.partial(_step, t))
        args = (t,) if mode == "eager" else ()
        with pytest.raises(ValueError, match=refused[case.name]):
            step(*args, *jax.tree.map(jnp.asarray, (updates, params, follow)))
        return
    result = _result(t, case, mode)
    out = result["out"]
    tree = case.tree()

    # Structure, shapes and dtypes; non-float leaves untouched.
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    floats_in, weights, dtypes = [], [], []
    for o, x, u, w in zip(
        jax.tree.leaves(out),
        jax.tree.leaves(tree),
        jax.tree.leaves(updates),
        jax.tree.leaves(params),
        strict=True,
    ):
        if _is_float(x):
            assert (o.shape, o.dtype) == (x.shape, x.dtype), (o.shape, o.dtype)
            floats_in.append(_f64(u))
            weights.append(_f64(w))
            dtypes.append(x.dtype)
        else:
            assert (o.shape, o.dtype) == (u.shape, u.dtype), (o.shape, o.dtype)
            np.testing.assert_array_equal(np.asarray(o), np.asarray(u))
    floats_out = [o for o in jax.tree.leaves(out) if _is_float(o)]

    # Values against the NumPy reference; NaN/Inf steps are zeroed, except
    # by the optax-style functions, which propagate as optax does.
    if case.nonfinite and t.kind != "function":
        expected = [np.zeros(o.shape) for o in floats_out]
    else:
        with np.errstate(invalid="ignore"):
            expected = t.reference(floats_in, weights)
    for o, e, dt in zip(floats_out, expected, dtypes, strict=True):
        _assert_close(o, e, dt, f"{t.name} on {case.name}")
    if not case.nonfinite:
        assert _finite_leaves(out)
    if t.kind == "function" and not case.nonfinite:
        # How many examples were clipped: over the tree, or per layer against
        # 1 / sqrt(number of layers).
        sq = [np.sum(np.abs(x.reshape(BATCH, -1)) ** 2, axis=1) for x in floats_in]
        if t.name == "per_example_global_norm_clip":
            norms = np.sqrt(np.sum(sq, axis=0)) if sq else np.zeros(BATCH)
            assert int(result["clipped"]) == int(np.sum(norms > 1.0))
        else:
            layer = 1.0 / math.sqrt(max(len(sq), 1))
            counts = [int(n) for n in jax.tree.leaves(result["clipped"])]
            assert counts == [int(np.sum(np.sqrt(q) > layer)) for q in sq]

    # Large entries are clipped to the bound (not zeroed); tiny ones pass.
    out64 = [_f64(o) for o in floats_out]
    if case.large:
        assert _pnorm(out64) > 0
        if t.limit is not None:
            measure, bound = t.limit
            eps = max(float(jnp.finfo(dt).eps) for dt in dtypes)
            assert measure(out64, weights) <= bound * (1 + eps)
    if case.tiny and t.kind != "normalize":
        for o, x in zip(out64, floats_in, strict=True):
            e = -x if t.kind == "guard" else x
            if t.kind in ("per_example", "function"):
                e = x.sum(axis=0)
            np.testing.assert_allclose(o, e, rtol=1e-3, atol=0)
        assert _pnorm(out64) > 0

    # Complex leaves keep their phase (the guards' sgd flips it by pi).
    if case.name == "complex":
        for o, x in zip(out64, floats_in, strict=True):
            x = x[0] if t.kind in ("per_example", "function") else x
            x = -x if t.kind == "guard" else x
            moved = np.abs(o) > 0
            np.testing.assert_allclose(
                o[moved] / np.abs(o[moved]), x[moved] / np.abs(x[moved]), atol=1e-6
            )

    if t.kind == "function":
        return

    # Stats: present, one step counted, non-finite steps counted, finite.
    (s,) = oc.stats(result["state"])
    assert int(s.count) == 1
    assert int(s.nonfinite_count) == int(case.nonfinite)
    if not case.nonfinite:
        for field in (s.norm, s.scale):
            assert np.all(np.isfinite(np.asarray(field))), s
        # The bound may be +inf where it is not set yet (no history, a guard
        # that does not check yet); a fixed first bound is finite.
        threshold = np.asarray(s.threshold)
        assert np.all(threshold >= 0), s
        if t.limit is not None:
            assert np.all(np.isfinite(threshold)), s

    # Guards: a skipped step leaves the optimizer state as it was; an
    # applied one moves sgd's momentum to the gradient.
    if t.kind == "guard":
        inner0 = jax.tree.leaves(result["state0"].inner_state)
        inner = jax.tree.leaves(result["state"].inner_state)
        if case.nonfinite:
            for a, b in zip(inner, inner0, strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            assert len(inner) == len(floats_in)
            for a, x, dt in zip(inner, floats_in, dtypes, strict=True):
                _assert_close(a, x, dt, "momentum")

    # After a NaN/Inf step or an all-zero step, an ordinary step is handled
    # exactly as a first step: nothing was learned from the bad step.
    if case.follow:
        follow_floats = [_f64(x) for x in jax.tree.leaves(follow)]
        expected = t.reference(follow_floats, [np.ones(x.shape) for x in follow_floats])
        for o, e in zip(jax.tree.leaves(result["out2"]), expected, strict=True):
            _assert_close(o, e, jnp.float32, f"{t.name}: step after {case.name}")


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------

# Pairs that fail because of a defect, by defect; each has a test_bug_* below.
_LARGE_BF16_ZEROED = (
    "clip_by_norm",
    "global_norm_ord2",
    "clip_by_block_rms",
    "adaptive_grad_clip",
    "global_norm_percentile",
    "global_norm_zscore",
    "norm_ema_warmup",
    "block_rms_schedule",
    "autoclip",
    "zclip",
    "adagc",
    "olmo_adaptive_clip",
    "quantile_clip",
    "spam_clip",
    "adamw_clip",
    "skip_nonfinite",
    "skip_spikes",
    "clip_per_example",
    "clip_per_example_quantile",
    "per_example_global_norm_clip",
    "per_example_layer_norm_clip",
    "norm_normalize",
    "global_norm_normalize",
    "gradient_stabilizer",
)
_PER_EXAMPLE = ("clip_per_example", "clip_per_example_quantile")
_FUNCTIONS = ("per_example_global_norm_clip", "per_example_layer_norm_clip")
# Pairs checked by their own test below rather than by the table.
BUGS: dict[str, set[tuple[str, str]]] = {
    "norm_above_2_64": {(t, "bfloat16_large") for t in _LARGE_BF16_ZEROED},
    "per_example_integer": {(t, "integer") for t in _FUNCTIONS},
    # The drop-ins count the int8 leaf in the norm (as optax does), which the
    # float references leave out; the integer case above covers it.
    "functions_mixed": {(t, "mixed_dtypes") for t in _FUNCTIONS},
    # Documented limits of the spectral clamp, each checked by its own test:
    # it mixes a matrix's entries (no entry keeps its phase), and its float32
    # SVD carries an error of about eps * (top singular value / bound).
    "spectral_complex": {("clip_by_spectral_norm", "complex")},
    "spectral_float32": {("clip_by_spectral_norm", "float16_large")},
    "normalize_underflow": {
        (t, "bfloat16_tiny")
        for t in ("norm_normalize", "global_norm_normalize", "gradient_stabilizer")
    },
}


def _known_bug(t: str, c: str) -> bool:
    return any((t, c) in pairs for pairs in BUGS.values())


def _modes(transform: str, case: str) -> tuple[str, ...]:
    eager = case in EAGER_CASES or (case == "nan" and transform in EAGER_NAN)
    return ("jit", "eager") if eager else ("jit",)


def _pairs(group: str) -> list:
    return [
        pytest.param(t, c, mode, id=f"{t}-{c}-{mode}")
        for t, c in sorted(BUGS[group])
        for mode in _modes(t, c)
    ]


TABLE = [
    pytest.param(t.name, c.name, mode, id=f"{t.name}-{c.name}-{mode}")
    for t in TRANSFORMS
    for c in CASES
    for mode in _modes(t.name, c.name)
    if not _known_bug(t.name, c.name)
]


@pytest.mark.parametrize("transform,case,mode", TABLE)
def test_edge_case(transform, case, mode):
    check(TRANSFORM[transform], CASE[case], mode)


def test_clip_is_clip_by_value():
    # The table runs clip_by_value; if `clip` ever becomes its own function,
    # add it to TRANSFORMS.
    assert oc.clip is oc.clip_by_value


@pytest.mark.parametrize(
    "make",
    [
        lambda: oc.clip_per_example(1.0).update,
        lambda: lambda g, s: oc.per_example_global_norm_clip(g, 1.0),
        lambda: lambda g, s: oc.per_example_layer_norm_clip(g, 1.0),
    ],
    ids=["clip_per_example", "per_example_global_norm_clip", "layer_norm_clip"],
)
def test_per_example_refuses_a_tree_without_batch_axis(make):
    scalars = CASE["scalars"].tree()
    state = oc.clip_per_example(1.0).init(scalars)
    with pytest.raises(ValueError, match=r"leading batch axis.*\['s'\].*\(\)"):
        make()(scalars, state)


# ---------------------------------------------------------------------------
# Documented limits
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("transform,case,mode", _pairs("norm_above_2_64"))
def test_a_tensor_2_norm_beyond_2_64_counts_as_nonfinite(transform, case, mode):
    """A 2-norm (or RMS) is accumulated in float32 (float64 under x64): a
    tensor whose norm exceeds 2**64 (~1.8e19, here bfloat16 entries of 1e30)
    reads as infinite, and the step is treated as non-finite: zeroed and
    counted (guards: skipped), as optax zeroes it (``ord=1``, ``inf`` and
    other ``p``, the value scope, clippy and Stable-SPAM are unaffected)."""
    t = TRANSFORM[transform]
    result = _result(t, CASE[case], mode)
    for o in jax.tree.leaves(result["out"]):
        if _is_float(o):
            np.testing.assert_array_equal(_f64(o), 0.0)
    if t.kind == "function":
        return
    (s,) = oc.stats(result["state"])
    assert int(s.nonfinite_count) == 1 and int(s.count) == 1
    if t.kind == "guard":
        inner0 = jax.tree.leaves(result["state0"].inner_state)
        inner = jax.tree.leaves(result["state"].inner_state)
        for a, b in zip(inner, inner0, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("transform,case,mode", _pairs("per_example_integer"))
def test_per_example_functions_treat_integer_leaves_as_optax_does(
    transform, case, mode
):
    """The optax drop-ins measure integer leaves and return their clipped sum
    as float32, exactly as optax's functions do (``clip_per_example``, a
    transform, leaves integer leaves untouched as every transform does)."""
    tree = CASE[case].tree()
    batched = jax.tree.map(lambda x: jnp.stack([x, 2 * x, -x]), tree)
    ours_fn, theirs_fn = {
        "per_example_global_norm_clip": (
            oc.per_example_global_norm_clip,
            optax.per_example_global_norm_clip,
        ),
        "per_example_layer_norm_clip": (
            oc.per_example_layer_norm_clip,
            optax.per_example_layer_norm_clip,
        ),
    }[transform]
    ours = ours_fn(jax.tree.leaves(batched), 1.0)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
        theirs = theirs_fn(jax.tree.leaves(batched), 1.0)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert jnp.asarray(a).dtype == jnp.asarray(b).dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


@pytest.mark.parametrize("transform,case,mode", _pairs("normalize_underflow"))
def test_a_norm_whose_square_underflows_reads_as_zero_when_normalizing(
    transform, case, mode
):
    """A 2-norm is accumulated in float32: bfloat16 entries of 1e-30 square
    to below float32's smallest subnormal, so the tensor's norm reads as 0
    and the normalize action leaves it as it is, as a zero tensor (the
    official GradientStabilizer, which measures in float32, skips it too);
    nothing divides by zero and the statistics record nothing."""
    t = TRANSFORM[transform]
    result = _result(t, CASE[case], mode)
    for o, x in zip(
        jax.tree.leaves(result["out"]), jax.tree.leaves(CASE[case].tree()), strict=True
    ):
        np.testing.assert_array_equal(_f64(o), _f64(x))
    (s,) = oc.stats(result["state"])
    np.testing.assert_array_equal(np.asarray(s.norm), 0.0)
    np.testing.assert_array_equal(np.asarray(s.scale), 1.0)
    assert int(s.nonfinite_count) == 0 and int(s.clipped) == 0


# ---------------------------------------------------------------------------
# Update-RMS clipping and the lazy guards
# ---------------------------------------------------------------------------

_RMS_LAZY = [
    Transform("clip_update_rms", lambda: oc.clip_update_rms(1.0), ref_rms(1.0),
              (m_max_rms, 1.0)),
    Transform("skip_nonfinite_lazy", _guarded(oc.skip_nonfinite, lazy=True), ref_sgd,
              None, kind="guard"),
    Transform("skip_spikes_lazy", _guarded(oc.skip_spikes, window=4, lazy=True),
              ref_sgd, None, kind="guard"),
]  # fmt: skip
TRANSFORM.update({t.name: t for t in _RMS_LAZY})


@pytest.mark.parametrize(
    "transform,case,mode",
    [
        pytest.param(t.name, c.name, mode, id=f"{t.name}-{c.name}-{mode}")
        for t in _RMS_LAZY
        for c in CASES
        if c.name != "bfloat16_large"
        for mode in _modes(t.name, c.name) + (("eager",) if c.name == "nan" else ())
    ],
)
def test_edge_case_update_rms_and_lazy_guards(transform, case, mode):
    check(TRANSFORM[transform], CASE[case], mode)


@pytest.mark.parametrize("transform", [t.name for t in _RMS_LAZY])
def test_update_rms_and_lazy_guards_norm_beyond_2_64(transform):
    test_a_tensor_2_norm_beyond_2_64_counts_as_nonfinite(
        transform, "bfloat16_large", "jit"
    )


@pytest.mark.parametrize("transform,case,mode", _pairs("spectral_complex"))
def test_spectral_clip_of_a_complex_matrix_mixes_its_entries(transform, case, mode):
    """A complex matrix's singular values are clamped as a real one's (its
    entries' phases change); a complex vector passes unchanged."""
    tree = CASE[case].tree()
    out = _result(TRANSFORM[transform], CASE[case], mode)["out"]
    (expected,) = ref_spectral(1.0)([_f64(tree["w"])], None)
    np.testing.assert_allclose(_f64(out["w"]), expected, rtol=1e-5, atol=1e-6)
    assert np.linalg.svd(_f64(out["w"]), compute_uv=False)[0] <= 1 + 1e-6
    np.testing.assert_array_equal(_f64(out["z"]), _f64(tree["z"]))


@pytest.mark.parametrize("transform,case,mode", _pairs("spectral_float32"))
def test_spectral_clip_far_above_the_bound_is_accurate_to_float32(
    transform, case, mode
):
    """float16 entries of 6e4 (a top singular value 1.5e5 times the bound):
    clipped to the bound, not zeroed, with the float32 SVD's error of about
    eps_f32 * 1.5e5 (2e-2 relative) rather than float16 rounding."""
    tree = CASE[case].tree()
    out = _result(TRANSFORM[transform], CASE[case], mode)["out"]
    (expected,) = ref_spectral(1.0)([_f64(tree["b"])], None)
    top = float(np.linalg.svd(_f64(tree["b"]), compute_uv=False)[0])
    tolerance = float(np.finfo(np.float32).eps) * top
    np.testing.assert_allclose(_f64(out["b"]), expected, rtol=0, atol=tolerance)
    assert m_max_spectral([_f64(out["b"])], None) <= 1 + tolerance
    np.testing.assert_array_equal(_f64(out["a"]), _f64(tree["a"]))
