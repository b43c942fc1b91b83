"""Compile-time shaping: how the step is laid out for XLA.

Two devices keep the compiled step small and its compile time flat in the
number of leaves:

* `stack_barrier`: small per-leaf results (norms, counts) are stacked
  behind an optimization barrier. Without it XLA fuses every leaf's
  reduction into the consumers of the vector, and into one giant
  reduction, whose compile time grows super-linearly with the number of
  leaves.
* `split_entries` / `leaf_scales`: per-tensor bounds and factors are split
  into buffers of their own rather than read as slices. A slice is
  compiled into its consumer with its offset as a constant, which makes
  every leaf's scaling kernel (and every optimizer kernel fused with it)
  unique; from a buffer of its own, equally shaped leaves share one kernel.

The tests that pin this are in ``tests/test_xla.py``: the kernel counts of
the compiled step against optax's, the distinct kernels and traced size
flat in the number of leaves (per-tensor rules as the fixed clip), and the
values and derivatives of `split_entries` and `leaf_scales`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks
from ._numerics import INF, safe_scale
from ._tree import replicated


def stack_barrier(values: Sequence[jax.Array], concat: bool = False) -> jax.Array:
    """Stacks (or concatenates) small per-leaf results into one vector.

    The optimization barrier stops XLA from fusing the consumers of the
    vector back into every leaf's reduction, which makes compile time grow
    much faster than the number of leaves.
    """
    if concat:
        # Segment norms keep the sharding of the dims they do not reduce
        # (stacked layers split over a mesh axis); the joined vector is
        # replicated, as the state that records it is.
        joined = jnp.concatenate([replicated(v) for v in values])
    else:
        joined = jnp.stack(values)
    return jax.lax.optimization_barrier(joined)


def leaf_scales(
    pieces: Sequence[jax.Array],
    bounds: jax.Array,
    counts: Sequence[int],
) -> list[jax.Array]:
    """Each leaf's `safe_scale`, for a vector of per-segment bounds.

    ``pieces`` are the leaves' own measurements (see `_norms.segments`), leaf
    ``i`` holding ``counts[i]`` segments, and ``bounds`` has one entry per
    segment. The factors are computed as one vector, with the same
    arithmetic as `safe_scale` on each leaf, then split with
    `split_entries`: leaf ``i`` gets its ``counts[i]`` factors as a buffer
    of its own, which keeps the kernels that scale equally shaped leaves
    identical (compiled once).
    """
    if not pieces:
        return []
    joined = jnp.concatenate([replicated(p).reshape(-1) for p in pieces])
    return split_entries(safe_scale(joined, bounds), counts)


def split_entries(vector: jax.Array, counts: Sequence[int]) -> list[jax.Array]:
    """Splits ``vector`` into consecutive pieces of ``counts[i]`` entries.

    The pieces are the slices ``vector[o_i : o_i + counts[i]]``, but each is
    produced as its own small buffer by a few multi-output reductions rather
    than read as a slice by whatever consumes it. XLA compiles a slice into
    its consumer, with the offset as a constant, so every consumer would be
    its own kernel: per-tensor bounds or factors read this way make each
    leaf's scaling (and every optimizer kernel fused with it) unique, and
    compile time grows by several kernels per leaf. Read from a buffer of
    its own, equally shaped leaves keep one shared kernel, as with a scalar
    threshold.

    The values are exact (each entry is the maximum of itself and ``-inf``),
    NaN and signed zeros included; the derivative is that of the slices.
    """
    counts = tuple(int(c) for c in counts)
    if not _checks.is_traced(vector):
        # Run op by op, nothing is compiled for the program: plain slices.
        offsets = np.cumsum([0, *counts])
        return [vector[offsets[i] : offsets[i + 1]] for i in range(len(counts))]
    return list(_split_entries(counts, vector))


# Pieces per multi-output reduction: one kernel's outputs, kept moderate
# because a kernel's compile time grows faster than its number of outputs.
_SPLIT_CHUNK = 64


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _split_entries(counts: tuple[int, ...], vector: jax.Array) -> tuple[jax.Array, ...]:
    offsets = np.cumsum([0, *counts])
    if len(counts) <= 1:
        return (vector,) if counts else ()
    low = jnp.full_like(vector, -INF)
    padded = jnp.stack([vector, low], axis=-1)
    init = jnp.full((), -INF, vector.dtype)
    out: list[Any] = [None] * len(counts)
    by_count: dict[int, list[int]] = {}
    for i, c in enumerate(counts):
        by_count.setdefault(c, []).append(i)
    for c, members in by_count.items():
        for start in range(0, len(members), _SPLIT_CHUNK):
            chunk = members[start : start + _SPLIT_CHUNK]
            operands = [
                jax.lax.slice_in_dim(padded, offsets[i], offsets[i] + c) for i in chunk
            ]
            pieces = jax.lax.reduce(
                operands,
                [init] * len(chunk),
                lambda a, b: [jax.lax.max(x, y) for x, y in zip(a, b, strict=True)],
                (padded.ndim - 1,),
            )
            for i, piece in zip(chunk, pieces, strict=True):
                out[i] = piece
    return tuple(out)


@_split_entries.defjvp
def _split_entries_jvp(counts, primals, tangents):
    (vector,), (tangent,) = primals, tangents
    offsets = np.cumsum([0, *counts])
    pieces = _split_entries(counts, vector)
    slices = tuple(
        jax.lax.slice_in_dim(tangent, offsets[i], offsets[i + 1])
        for i in range(len(counts))
    )
    return pieces, slices


def split_batch(batch: jax.Array, counts: Sequence[int]) -> list[jax.Array]:
    """Splits a batch of matrices into pieces of ``counts[i]`` matrices.

    Each piece is a buffer of its own, from a few multi-output kernels
    (`split_entries`): read as slices, each piece would be a kernel of its
    own. Complex batches are split by parts.
    """
    size = math.prod(batch.shape[1:])
    counts = [c * size for c in counts]
    if not jnp.iscomplexobj(batch):
        return split_entries(batch.reshape(-1), counts)
    parts = (split_entries(p.reshape(-1), counts) for p in (batch.real, batch.imag))
    return [jax.lax.complex(a, b) for a, b in zip(*parts, strict=True)]
