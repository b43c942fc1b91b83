"""Kernel counts of the compiled step: deterministic, no timing.

On the CPU backend every array the step writes is one kernel: XLA's CPU
backend does not fuse sibling outputs, so the readable record (the step
counter, the float rows of norm / threshold / scale, and the int counts) is
three small kernels beside the clip's own, which match optax's kernel for
kernel. Recording per-tensor norms (``per_tensor_stats=True``) adds at most
one. Counted on the CPU backend the suite runs on: the instructions of the
compiled entry computation that run code (fusions and any unfused op), not
parameters, constants, tuples or bitcasts.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import optaxclip as oc

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
