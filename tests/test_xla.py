"""How the step is laid out for XLA (``optaxclip._xla``): kernel counts and
compile growth, deterministic, no timing.

On the CPU backend every array the step writes is one kernel: XLA's CPU
backend does not fuse sibling outputs, so the readable record (the step
counter, the float rows of norm / threshold / scale, and the int counts) is
three small kernels beside the clip's own, which match optax's kernel for
kernel. Recording per-tensor norms (``per_tensor_stats=True``) adds at most
one. Counted on the CPU backend the suite runs on: the instructions of the
compiled entry computation that run code (fusions and any unfused op), not
parameters, constants, tuples or bitcasts.

A learning rule's compiled step grows with the leaf count as the fixed clip's.

XLA compiles each distinct kernel once and shares it among identical ones,
so with a fixed threshold equally shaped leaves cost one kernel between
them. A rule's threshold is a vector with one entry per tensor; read by each
leaf as a slice, every leaf's scaling (and each optimizer kernel fused with
it) became a kernel of its own, and compile time grew by several kernels
per leaf. These tests count, without timing anything, the distinct kernels
of the compiled step and the instructions of the traced one at two leaf
counts.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
from optaxclip import _numerics, _xla, rules

_NOT_KERNELS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
SIZES = [10, 1000, 100_000]
# The record's arrays: count, norm_threshold_scale, counts.
RECORD = 3


def kernels(fn, *args) -> list[str]:
    """The op names of the kernels in ``jax.jit(fn)``'s compiled entry."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text[text.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    ops = []
    for line in entry.splitlines()[1:]:
        match = re.match(r"\s*(?:ROOT )?%\S+ = \S+ ([\w-]+)\(", line)
        if match and match.group(1) not in _NOT_KERNELS:
            ops.append(match.group(1))
    return ops


def step_kernels(tx, grads) -> int:
    return len(kernels(tx.update, grads, tx.init(grads)))


def test_kernel_count_reads_the_compiled_program():
    # One elementwise op is one kernel; a reduction feeding a rescale is more.
    x = jnp.ones((1000,))
    assert len(kernels(lambda a: a * 2.0, x)) == 1
    assert len(kernels(lambda a: a / jnp.sum(a), x)) >= 2


@pytest.mark.parametrize("size", SIZES)
def test_global_clip_is_optax_plus_the_record(size):
    g = jnp.linspace(-1.0, 1.0, size)
    ours = step_kernels(oc.clip_by_global_norm(1.0), g)
    theirs = step_kernels(optax.clip_by_global_norm(1.0), g)
    assert ours <= theirs + RECORD, (ours, theirs)


@pytest.mark.parametrize("size", SIZES)
def test_per_tensor_stats_cost_at_most_one_kernel(size):
    g = {"a": jnp.linspace(-1.0, 1.0, size), "b": jnp.ones((3, 4))}
    default = step_kernels(oc.clip_by_global_norm(1.0), g)
    recorded = step_kernels(oc.clip_by_global_norm(1.0, per_tensor_stats=True), g)
    assert recorded <= default + 1, (recorded, default)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "make", [oc.clip_by_norm, oc.clip_by_block_rms], ids=["norm", "block_rms"]
)
def test_per_tensor_clip_is_optax_plus_the_record(size, make):
    # optax's per-tensor clip is clip_by_block_rms: one reduction, one rescale.
    g = jnp.linspace(-1.0, 1.0, size)
    ours = step_kernels(make(1.0), g)
    theirs = step_kernels(optax.clip_by_block_rms(1.0), g)
    assert ours <= theirs + RECORD, (ours, theirs)


@pytest.mark.parametrize("size", SIZES)
def test_value_clip_is_optax_plus_its_measurement_plus_the_record(size):
    # optax's clip reads nothing; ours also measures the largest entry (the
    # recorded norm, which rules learn from) and writes the record. A NaN
    # entry is read as +inf first: a maximum split across devices drops NaN.
    g = jnp.linspace(-1.0, 1.0, size)
    ours = step_kernels(oc.clip_by_value(1.0), g)
    theirs = step_kernels(optax.clip(1.0), g)

    def largest(x):
        a = jnp.abs(x)
        return jnp.max(jnp.where(jnp.isnan(a), jnp.inf, a))

    measure = len(kernels(largest, g))
    assert ours <= theirs + measure + RECORD, (ours, theirs, measure)


def test_the_stats_are_three_arrays_in_the_state():
    g = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    for tx in [oc.clip_by_global_norm(1.0), oc.clip_by_norm(1.0), oc.clip(1.0)]:
        assert len(jax.tree.leaves(tx.init(g))) == RECORD
    tx = oc.clip_by_global_norm(1.0, per_tensor_stats=True)
    assert len(jax.tree.leaves(tx.init(g))) == RECORD + 1


# The shapes of a small transformer block, as in benchmarks/compile_time.py.
SHAPES = [(8,), (8,), (8, 24), (8, 8), (8,), (8,), (8, 32), (32, 8)]
SMALL, LARGE = 16, 32
# XLA's fusion decisions move a few vector kernels between leaf counts; a
# slice per leaf would add at least one kernel per leaf (16 here).
SLACK = 4

FIXED = ("fixed", lambda: oc.clip_by_norm(1.0))
RULES = [
    ("ema", lambda: oc.clip_by_norm(rules.ema(ratio=1.05))),
    ("zscore", lambda: oc.clip_by_norm(rules.zscore())),
    ("percentile", lambda: oc.clip_by_norm(rules.percentile(10.0, window=8))),
    ("quantile", lambda: oc.clip_by_norm(rules.quantile())),
    ("adagc", lambda: oc.adagc()),
    ("stacked_ema", lambda: oc.clip_by_norm(rules.ema(), stacked_axes=1)),
]


def tree(n: int, stacked: bool = False) -> dict[str, jax.Array]:
    lead = (3,) if stacked else ()
    return {
        f"l{i:03d}": jnp.zeros(lead + SHAPES[i % len(SHAPES)], jnp.float32)
        for i in range(n)
    }


def lowered(make, n: int, stacked: bool = False, adamw: bool = False):
    params = tree(n, stacked)
    tx = make()
    tx = optax.chain(tx, optax.adamw(1e-3)) if adamw else tx
    # optax's bias correction mixes a Python float with the int32 count.
    with jax.numpy_dtype_promotion("standard"):
        return jax.jit(tx.update).lower(params, tx.init(params), params)


def distinct_kernels(hlo: str) -> int:
    """The number of distinct computations (up to names) in compiled ``hlo``."""
    bodies = re.findall(r"^%\S+ \(.*?\{\n(.*?)\n\}", hlo, re.M | re.S)
    assert bodies, "no computation found in the compiled HLO"
    normal = {
        re.sub(r"%[\w.\-]+", "%", re.sub(r", metadata=\{[^}]*\}", "", b))
        for b in bodies
    }
    return len(normal)


def growth(
    make, stacked: bool = False, sizes: tuple[int, int] = (SMALL, LARGE)
) -> tuple[int, int]:
    """(distinct kernels, traced lines) added from SMALL to LARGE leaves."""
    small = lowered(make, sizes[0], stacked)
    large = lowered(make, sizes[1], stacked)
    kernels = distinct_kernels(large.compile().as_text()) - distinct_kernels(
        small.compile().as_text()
    )
    lines = len(large.as_text().splitlines()) - len(small.as_text().splitlines())
    return kernels, lines


@pytest.fixture(scope="module")
def fixed_growth():
    return {stacked: growth(FIXED[1], stacked) for stacked in (False, True)}


def test_fixed_clip_shares_kernels_among_equal_leaves(fixed_growth):
    # The baseline the rules are held to: two more blocks of the same eight
    # shapes compile (almost) no new kernel, and the traced step grows.
    for kernels, lines in fixed_growth.values():
        assert kernels <= SLACK
        assert lines > 0


@pytest.mark.parametrize("name,make", RULES, ids=[n for n, _ in RULES])
def test_rule_grows_like_the_fixed_clip(name, make, fixed_growth):
    fixed_kernels, fixed_lines = fixed_growth[name.startswith("stacked")]
    kernels, lines = growth(make, name.startswith("stacked"))
    assert kernels <= fixed_kernels + SLACK, f"{name}: {kernels} more kernels"
    assert lines <= 1.3 * fixed_lines, f"{name}: {lines} vs {fixed_lines} lines"


@pytest.mark.parametrize(
    "make", [oc.clippy, oc.stable_spam_clip], ids=["clippy", "stable_spam_clip"]
)
def test_per_tensor_presets_share_kernels_like_the_fixed_clip(make, fixed_growth):
    # One factor (and bound) per tensor, each read from a buffer of its own.
    # Their per-leaf work differs from a rescale, so kernels are compared, not
    # traced lines.
    fixed_kernels, _ = fixed_growth[False]
    kernels, _ = growth(make)
    assert kernels <= fixed_kernels + SLACK, f"{kernels} more kernels"


def test_agc_rule_grows_like_agc_with_a_number():
    # Fewer leaves: AGC compiles more kernels per leaf (a slice per leaf would
    # still add at least 8).
    sizes = (4, 12)
    fixed_kernels, fixed_lines = growth(lambda: oc.adaptive_grad_clip(0.1), sizes=sizes)
    kernels, lines = growth(lambda: oc.adaptive_grad_clip(rules.ema()), sizes=sizes)
    assert kernels <= fixed_kernels + SLACK
    assert lines <= 1.3 * fixed_lines


# ---------------------------------------------------------------------------
# The splitting helper
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_split_entries_equals_slices(jit):
    counts = [1, 3, 1, 2, 3, 1] * 30  # more pieces than one reduction takes
    offsets = np.cumsum([0, *counts])
    rng = np.random.default_rng(0)
    values = rng.normal(size=offsets[-1]).astype(np.float32)
    values[:4] = [np.nan, np.inf, -np.inf, -0.0]
    split = jax.jit(_xla.split_entries, static_argnums=1) if jit else None
    pieces = (split or _xla.split_entries)(jnp.asarray(values), tuple(counts))
    assert len(pieces) == len(counts)
    for i, piece in enumerate(pieces):
        want = values[offsets[i] : offsets[i + 1]]
        assert piece.shape == want.shape and piece.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(piece), want)
        np.testing.assert_array_equal(np.signbit(np.asarray(piece)), np.signbit(want))


def test_split_entries_derivative_and_vmap_are_the_slices():
    counts = (2, 1, 3)
    x = jnp.arange(6.0)
    weights = [jnp.array([1.0, 2.0]), jnp.array([3.0]), jnp.array([4.0, 5.0, 6.0])]

    def loss(v):
        pieces = _xla.split_entries(v, counts)
        return sum(jnp.sum(w * p * p) for w, p in zip(weights, pieces, strict=True))

    np.testing.assert_allclose(
        np.asarray(jax.jit(jax.grad(loss))(x)), 2 * np.arange(6.0) * np.arange(1.0, 7.0)
    )
    batch = jnp.stack([x, -x])
    pieces = jax.vmap(lambda v: _xla.split_entries(v, counts))(batch)
    np.testing.assert_array_equal(
        np.asarray(pieces[2]), [[3.0, 4.0, 5.0], [-3, -4, -5]]
    )


def test_split_entries_of_no_and_one_piece():
    assert _xla.split_entries(jnp.zeros((0,)), []) == []
    (one,) = _xla.split_entries(jnp.array([1.0, 2.0]), [2])
    np.testing.assert_array_equal(np.asarray(one), [1.0, 2.0])


# leaf_scales computes every factor in one vector kernel, safe_scale each
# leaf's op by op: the same operations (a select, one division), which XLA
# may round differently once fused (jax 0.12 gives one ulp apart). The
# promise is the same values to rounding: equal where nothing is clipped
# (exactly 1), a few ulp apart where a division is taken.
ULPS = 4 * float(np.finfo(np.float32).eps)


def test_leaf_scales_equal_each_leafs_safe_scale():
    # The pieces of a leaf of 1, 3 and 2 segments (stacked layers), shaped to
    # broadcast against their leaves; a vector of bounds, one per segment.
    rng = np.random.default_rng(1)
    pieces = [
        jnp.asarray(rng.uniform(0, 4, size=s), jnp.float32)
        for s in [(1, 1), (3, 1, 1), (2, 1)]
    ]
    pieces[1] = pieces[1].at[0].set(0.0)  # a zero norm under a zero bound
    counts = [1, 3, 2]
    bounds = jnp.asarray([1.0, 0.0, 2.0, 0.5, 3.0, np.inf], jnp.float32)
    got = jax.jit(_xla.leaf_scales, static_argnums=(2,))(pieces, bounds, tuple(counts))
    assert len(got) == len(pieces)
    offsets = np.cumsum([0, *counts])
    clipped = 0
    for i, piece in enumerate(pieces):
        # One buffer of counts[i] factors per leaf.
        assert got[i].size == counts[i] and got[i].dtype == jnp.float32
        scale = np.asarray(got[i]).reshape(piece.shape)
        bound = bounds[offsets[i] : offsets[i + 1]].reshape(piece.shape)
        want = np.asarray(_numerics.safe_scale(piece, bound))
        np.testing.assert_array_equal(scale == 1.0, want == 1.0)
        np.testing.assert_allclose(scale, want, rtol=ULPS, atol=0)
        # And an independent float64 reference: min(1, bound / norm).
        norm = np.asarray(piece, np.float64)
        limit = np.asarray(bound, np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ref = np.where(norm <= limit, 1.0, limit / norm)
        np.testing.assert_allclose(scale, ref, rtol=ULPS, atol=0)
        clipped += int(np.sum(ref < 1))
    assert clipped >= 2  # the division is exercised, not only the ones
    # Spot values: 1 at or under the bound, bound / norm above it.
    norm = float(pieces[0][0, 0])
    np.testing.assert_allclose(float(got[0][0]), min(1.0, 1.0 / norm), rtol=1e-6)
    assert float(got[1][0]) == 1.0


def test_leaf_scales_of_no_leaves():
    assert _xla.leaf_scales([], jnp.zeros((0,)), []) == []
