"""Derivatives through every transform: finite everywhere, right where smooth.

One table of every public transform. For each, a scalar function of the
gradient ``g`` and of a traced threshold ``t`` (passed into the
transform's constructor inside the function) runs a short trajectory and
reads the updates. ``jax.grad`` and ``jax.jvp`` with respect to both must be
finite at a zero gradient, at a tree with one zero leaf, and at a zero bound,
under ``vmap`` (a batch of gradients) and without it (``lax.map``). Where
the function is smooth, both agree with central finite differences in
float64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
from optaxclip import rules


@dataclasses.dataclass(frozen=True)
class Case:
    """One transform of the table.

    Attributes:
      make: builds the transform from the traced threshold ``t`` (a
        transform whose threshold is not a number ignores it: its
        derivatives in the gradient are still checked).
      kind: ``"tx"`` (a transform of the gradient), ``"example"`` (a
        transform of per-example gradients) or ``"function"`` (a function
        of per-example gradients and the bound).
    """

    make: Callable[[Any], Any]
    kind: str = "tx"


def _sgd():
    return optax.sgd(0.5)


CASES: dict[str, Case] = {
    # The scopes.
    "clip": Case(lambda t: oc.clip(t)),
    "clip_by_value": Case(lambda t: oc.clip_by_value(t)),
    "clip_by_norm": Case(lambda t: oc.clip_by_norm(t)),
    "clip_by_norm-ord1": Case(lambda t: oc.clip_by_norm(t, ord=1)),
    "clip_by_norm-ordinf": Case(lambda t: oc.clip_by_norm(t, ord="inf")),
    "clip_by_norm-ord3": Case(lambda t: oc.clip_by_norm(t, ord=3)),
    "clip_by_global_norm": Case(lambda t: oc.clip_by_global_norm(t)),
    "clip_by_global_norm-ord1": Case(lambda t: oc.clip_by_global_norm(t, ord=1)),
    "clip_by_global_norm-ordinf": Case(lambda t: oc.clip_by_global_norm(t, ord="inf")),
    "clip_by_global_norm-ord3": Case(lambda t: oc.clip_by_global_norm(t, ord=3)),
    "clip_by_norm-stacked": Case(
        lambda t: oc.clip_by_norm(t, stacked_axes={"a": 0, "b": 1})
    ),
    "clip_by_block_rms": Case(lambda t: oc.clip_by_block_rms(t)),
    "adaptive_grad_clip": Case(lambda t: oc.adaptive_grad_clip(t)),
    "clip_by_spectral_norm": Case(lambda t: oc.clip_by_spectral_norm(t)),
    "clip_by_spectral_norm-soft": Case(
        lambda t: oc.clip_by_spectral_norm(t, mode="soft")
    ),
    # Every rule at the global scope; ``t`` goes where the rule takes a bound.
    "rules.percentile": Case(
        lambda t: oc.clip_by_global_norm(rules.percentile(50.0, window=4)),
    ),
    "rules.zscore": Case(
        lambda t: oc.clip_by_global_norm(rules.zscore(warmup=1, max_norm=t))
    ),
    "rules.ema": Case(
        lambda t: oc.clip_by_global_norm(rules.ema(warmup=1, warmup_max_norm=t))
    ),
    "rules.quantile": Case(lambda t: oc.clip_by_global_norm(rules.quantile(initial=t))),
    "rules.mean_std": Case(
        lambda t: oc.clip_by_global_norm(rules.mean_std(window=4, sigma=t))
    ),
    "rules.scheduled": Case(
        lambda t: oc.clip_by_global_norm(lambda count: t * (count + 1).astype(t.dtype))
    ),
    "rules.ema-tensor": Case(
        lambda t: oc.clip_by_norm(rules.ema(warmup=1, warmup_max_norm=t))
    ),
    "rules.ema-block_rms": Case(
        lambda t: oc.clip_by_block_rms(rules.ema(warmup=1, warmup_max_norm=t))
    ),
    # The presets.
    "autoclip": Case(lambda t: oc.autoclip(50.0, history=4)),
    "zclip": Case(lambda t: oc.zclip(warmup_steps=1, max_grad_norm=t)),
    "adagc": Case(lambda t: oc.adagc(warmup_steps=1, lambda_abs=t)),
    # A ratio of 3 at t = 1: at 1 (and 2, after a step of g / 2) a step sits
    # on its bound (the EMA starts at the norm), a kink that finite
    # differences would straddle.
    "olmo_adaptive_clip": Case(lambda t: oc.olmo_adaptive_clip(3 * t)),
    "quantile_clip": Case(lambda t: oc.quantile_clip(initial=t)),
    "spam_clip": Case(lambda t: oc.spam_clip(t, beta2=0.5, guard_steps=0)),
    "stable_spam_clip": Case(lambda t: oc.stable_spam_clip(0.5)),
    # One step unclipped: the run on (g / 2, g) then clips g to |g| / 2 * t.
    "adamw_clip": Case(lambda t: oc.adamw_clip(t, beta2=0.5, warmup_steps=1)),
    "clippy": Case(lambda t: oc.clippy(relative=t)),
    "trust_ratio_clip": Case(lambda t: oc.trust_ratio_clip(0.1 * t)),
    # The guards around sgd.
    "skip_nonfinite": Case(lambda t: oc.skip_nonfinite(_sgd())),
    "skip_spikes": Case(lambda t: oc.skip_spikes(_sgd(), window=4, min_history=3)),
    # A bound of 10: the smooth point is applied, not skipped.
    "skip_spikes-rule": Case(lambda t: oc.skip_spikes(_sgd(), rule=10 * t)),
    "skip_nonfinite-lazy": Case(lambda t: oc.skip_nonfinite(_sgd(), lazy=True)),
    "skip_spikes-rule-lazy": Case(
        lambda t: oc.skip_spikes(_sgd(), rule=10 * t, lazy=True)
    ),
    "clip_update_rms": Case(lambda t: oc.clip_update_rms(t)),
    # Per-example clipping.
    "clip_per_example": Case(lambda t: oc.clip_per_example(t), kind="example"),
    "per_example_global_norm_clip": Case(
        lambda t: lambda g: oc.per_example_global_norm_clip(g, t)[0],
        kind="function",
    ),
    "per_example_layer_norm_clip": Case(
        lambda t: lambda g: oc.per_example_layer_norm_clip(g, t)[0],
        kind="function",
    ),
    "per_example_layer_norm_clip-sized": Case(
        lambda t: lambda g: oc.per_example_layer_norm_clip(g, t, uniform=False)[0],
        kind="function",
    ),
    # The normalize action (every non-zero norm set to the bound, a zero
    # one left at zero), with a number and with GradientStabilizer's rule.
    "clip_by_norm-normalize": Case(lambda t: oc.clip_by_norm(t, action="normalize")),
    "clip_by_global_norm-normalize": Case(
        lambda t: oc.clip_by_global_norm(t, action="normalize")
    ),
    "rules.mean_over_rms": Case(
        lambda t: oc.clip_by_global_norm(rules.mean_over_rms(0.5, 0.9))
    ),
    "gradient_stabilizer": Case(lambda t: oc.gradient_stabilizer(0.5, 0.9)),
}

# Every transform the package exports is in the table.
_TRANSFORMS = {
    "adagc", "adaptive_grad_clip", "autoclip", "clip", "clip_by_block_rms",
    "clip_by_global_norm", "clip_by_norm", "clip_by_spectral_norm",
    "clip_by_value", "clip_per_example", "clip_update_rms", "clippy",
    "olmo_adaptive_clip", "per_example_global_norm_clip",
    "per_example_layer_norm_clip", "quantile_clip", "skip_nonfinite",
    "skip_spikes", "spam_clip", "stable_spam_clip", "trust_ratio_clip", "zclip",
    "gradient_stabilizer",
    "adamw_clip",
}  # fmt: skip


def test_the_table_covers_every_transform_and_rule():
    exported = {
        name
        for name in oc.__all__
        if name[0].islower()
        and callable(getattr(oc, name))
        and name not in {"global_norm", "unitwise_norm", "metrics", "stats"}
        and name not in {"nonfinite_paths", "plot_norm_history", "plot_tensor_norms"}
        and name not in {"suggest_threshold"}
    }
    assert exported == _TRANSFORMS
    covered = {name.split("-")[0] for name in CASES}
    assert _TRANSFORMS <= covered
    learning = {
        n for n in rules.__all__ if n[0].islower() and n not in {"as_rule", "observe"}
    }
    assert {f"rules.{n}" for n in learning - {"fixed"}} <= covered


# ---------------------------------------------------------------------------
# The function differentiated
# ---------------------------------------------------------------------------

PARAMS = {"a": np.array([0.5, -1.0, 2.0]), "b": np.array([[1.5, -0.5], [0.25, 3.0]])}
# Readout weights: the scalar is a fixed linear function of the updates.
WEIGHTS = {"a": np.array([0.3, -0.7, 1.1]), "b": np.array([[0.9, 0.2], [-0.4, 0.6]])}
# Gradients of the earlier steps of the trajectory.
HISTORY = [
    {"a": np.array([0.2, 0.1, -0.3]), "b": np.array([[0.1, 0.4], [-0.2, 0.3]])},
    {"a": np.array([-0.1, 0.3, 0.2]), "b": np.array([[0.2, -0.1], [0.3, 0.1]])},
]
# Gradients at which the derivative is taken: all zero, one zero leaf, and a
# point of the smooth region (every bound tried is crossed, none touched).
ZERO = {"a": np.zeros(3), "b": np.zeros((2, 2))}
ONE_ZERO_LEAF = {"a": np.zeros(3), "b": np.array([[1.0, -2.0], [0.5, 1.5]])}
SMOOTH = {"a": np.array([1.3, -2.1, 0.7]), "b": np.array([[0.9, -1.7], [2.3, 0.4]])}


def _cast(tree, dtype):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def _per_example(g):
    # Example 0 is g, example 1 its half: the batch holds the same zeros.
    return jax.tree.map(lambda x: jnp.stack([x, 0.5 * x]), g)


def _readout(updates, dtype):
    weights = _cast(WEIGHTS, dtype)
    total = jnp.zeros((), dtype)
    for u, w in zip(jax.tree.leaves(updates), jax.tree.leaves(weights), strict=True):
        total = total + jnp.sum(u * w)
    return total


def objective(case: Case, dtype) -> Callable[[Any, jax.Array], jax.Array]:
    """``f(g, t)``: the updates of a short run, read out as one scalar.

    Two runs, summed: one whose earlier steps see fixed gradients and whose
    last step sees ``g``, and one that sees ``g / 2``, then ``g`` (so a zero
    ``g`` is a run of zero steps, where adaptive bounds have recorded
    nothing and are infinite).
    """

    def f(g, t):
        made = case.make(t)
        if case.kind == "function":
            return _readout(made(_per_example(g)), dtype)
        params = _cast(PARAMS, dtype)
        history = [_cast(h, dtype) for h in HISTORY]
        total = jnp.zeros((), dtype)
        for steps in (history + [g], [jax.tree.map(lambda x: 0.5 * x, g), g]):
            state = made.init(params)
            for step in steps:
                grads = _per_example(step) if case.kind == "example" else step
                out, state = made.update(grads, state, params)
            total = total + _readout(out, dtype)
        return total

    return f


# ---------------------------------------------------------------------------
# The table: one compiled check per transform
# ---------------------------------------------------------------------------

# Where the derivative is taken: (label, g, t, direction in g, direction in t).
# The last two rows lie in the smooth region (every bound is crossed, none
# touched) and are compared against finite differences.
_UP = {"a": np.array([0.6, -0.2, 0.9]), "b": np.array([[-0.3, 0.8], [0.5, -0.7]])}
_ACROSS = {"a": np.array([-0.4, 0.5, 0.1]), "b": np.array([[0.7, 0.2], [-0.6, 0.3]])}
POINTS = [
    (f"{name} g, t={t}", g, t, _UP, 1.0)
    for name, g in (
        ("zero", ZERO),
        ("one zero leaf", ONE_ZERO_LEAF),
        ("smooth", SMOOTH),
    )
    for t in (0.0, 1.0)
] + [("smooth g, t=1.0, along g", SMOOTH, 1.0, _ACROSS, 0.0)]
_SMOOTH_ROWS = [3 + 2, 6]  # smooth g at t = 1, in two directions
_H = 1e-6
# Compiled with LLVM's optimizations off and without the fusion emitters (a
# quarter of the compile time): only code generation differs, the HLO is the
# same.
_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_cpu_use_fusion_emitters": False,
}


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def _derivatives(f):
    """At ``(g, t)``: the value, ``grad`` in ``t``, the directional derivative
    by ``jvp`` and by ``grad``, then ``grad`` in ``g``, as one vector."""

    def at(g, t, dg, dt):
        value, (grad_g, grad_t) = jax.value_and_grad(f, argnums=(0, 1))(g, t)
        _, tangent = jax.jvp(f, (g, t), (dg, dt))
        leaves = jax.tree.leaves(grad_g)
        dot = grad_t * dt
        for x, d in zip(leaves, jax.tree.leaves(dg), strict=True):
            dot = dot + jnp.sum(x * d)
        parts = [value, grad_t, tangent, dot, *leaves]
        return jnp.concatenate([jnp.ravel(x) for x in parts])

    return at


_PARTS = ["value", "grad in t", "jvp", "grad (directional)"]


def _nonfinite_parts(row):
    names = _PARTS + ["grad in g"] * (row.size - len(_PARTS))
    return sorted({n for n, v in zip(names, row, strict=True) if not np.isfinite(v)})


@pytest.mark.parametrize("name", sorted(CASES))
def test_derivatives_are_finite_and_match_finite_differences(name):
    case = CASES[name]
    with jax.enable_x64(True):
        dtype = jnp.float64
        # Traced once (jit caches the trace), then batched, looped and
        # differentiated from that one trace.
        f = jax.jit(objective(case, dtype))
        at = jax.jit(_derivatives(f))
        g, dg = (_stack([_cast(p[k], dtype) for p in POINTS]) for k in (1, 3))
        t, dt = (jnp.asarray([p[k] for p in POINTS], dtype) for k in (2, 4))

        def everything(g, t, dg, dt):
            batched = jax.vmap(at)(g, t, dg, dt)
            # One point at a time (no batching), as a loop.
            looped = jax.lax.map(lambda args: at(*args), (g, t, dg, dt))
            # Central differences at the smooth points, batched.
            rows = jnp.asarray(_SMOOTH_ROWS)
            pick = lambda x: x[rows]  # noqa: E731
            g0, t0, d0, s0 = (jax.tree.map(pick, x) for x in (g, t, dg, dt))

            def shifted(h):
                moved = jax.tree.map(lambda x, d: x + h * d, g0, d0)
                return jax.vmap(f)(moved, t0 + h * s0)

            return batched, looped, (shifted(_H) - shifted(-_H)) / (2 * _H)

        lowered = jax.jit(everything).lower(g, t, dg, dt)
        try:
            compiled = lowered.compile(compiler_options=_COMPILER_OPTIONS)
        except Exception:  # noqa: BLE001  (an XLA without these options)
            compiled = lowered.compile()
        batched, looped, fd = (np.asarray(v) for v in compiled(g, t, dg, dt))

    for how, values in (("vmap", batched), ("one at a time", looped)):
        bad = [
            f"{point[0]}: {_nonfinite_parts(row)}"
            for point, row in zip(POINTS, values, strict=True)
            if not np.all(np.isfinite(row))
        ]
        assert not bad, f"{name}: non-finite derivative ({how}) at {bad}"
    # Batching changes nothing.
    np.testing.assert_allclose(batched, looped, rtol=1e-12, atol=1e-12)
    # Where smooth, jvp and grad agree with central finite differences.
    smooth = looped[_SMOOTH_ROWS]
    np.testing.assert_allclose(smooth[:, 2], fd, rtol=1e-6, atol=1e-8, err_msg="jvp")
    np.testing.assert_allclose(smooth[:, 3], fd, rtol=1e-6, atol=1e-8, err_msg="grad")
    # The point is not trivial: moving g changes the updates.
    assert abs(fd[1]) > 1e-3


@pytest.mark.parametrize("scope", [oc.clip_by_global_norm, oc.clip_by_norm])
def test_derivatives_of_complex_leaves_are_finite(scope):
    # |z| is measured from |z|**2, whose powers have infinite derivatives at
    # 0 (|z| itself for ord 1, |z|**p for p < 2).
    ords = [1, 2, "inf", 3]

    def f(g, t, ord):
        tx = scope(t, ord=ord)
        out, _ = tx.update(g, tx.init(g))
        z = out["z"]
        return jnp.sum(jnp.real(z) - 2 * jnp.imag(z)) + jnp.sum(out["x"])

    @jax.jit
    def derivatives(g, t):
        return [jax.grad(f, argnums=(0, 1))(g, t, ord) for ord in ords]

    zero = {"z": jnp.zeros(3, jnp.complex64), "x": jnp.zeros(2)}
    one_zero_leaf = {"z": jnp.zeros(3, jnp.complex64), "x": jnp.array([3.0, 4.0])}
    for g in (zero, one_zero_leaf):
        for t in (0.0, 1.0):
            out = derivatives(g, jnp.asarray(t))
            for ord, (dg, dt) in zip(ords, out, strict=True):
                for leaf in (*jax.tree.leaves(dg), dt):
                    assert np.all(np.isfinite(np.asarray(leaf))), (ord, t, dg, dt)
