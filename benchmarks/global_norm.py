"""Sections 1 and 4: the global-norm clip on its own, against the references.

For each tree (a dtype, a size, a number of leaves), jitted
``clip_by_global_norm(1.0)`` with its new state returned is timed against
``optax.clip_by_global_norm``, ``torch.nn.utils.clip_grad_norm_`` (only if
torch is installed) and two bandwidth references: the plain "measure +
scale" and a copy of the same bytes. Once plainly, and once donated (in
place, the same buffers each call, refilled untimed), where torch, which
clips in place, is timed in the same rounds. A diagnostic candidate drops
optaxclip's new state, which isolates the cost of its stats outputs.
Section 1 runs float32 trees of every size and leaf count; section 4 runs
bfloat16 and float16 trees (accumulated in float32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc
from benchmarks import harness
from benchmarks.records import (
    OPTAX,
    OPTAXCLIP,
    REF_CLIP,
    REF_COPY,
    STATE_DROPPED,
    TORCH,
    ClipRow,
    Config,
)


class Candidate(NamedTuple):
    """One jitted clip of a row: ``fn(grads, state) -> (updates, state)``."""

    name: str
    fn: Any
    state: Any
    passes: int  # passes over the gradient bytes: 3 to clip, 2 to copy


def reference_clip(tree: Any, max_norm: float) -> Any:
    """The plain "measure + scale": one reduction per leaf, one scaling pass."""
    leaves = jax.tree.leaves(tree)
    total = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)
    norm = jnp.sqrt(total)
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
    return jax.tree.map(lambda x: (x.astype(jnp.float32) * scale).astype(x.dtype), tree)


def copy_tree(tree: Any) -> Any:
    """A real read + write of every byte (a negation XLA cannot elide)."""
    return jax.tree.map(jnp.negative, tree)


def candidates(tree: Any, donate: bool) -> list[Candidate]:
    """The jitted candidates over ``tree``; with ``donate`` they consume it."""
    ours = oc.clip_by_global_norm(1.0)
    theirs = optax.clip_by_global_norm(1.0)
    our_state = ours.init(tree)

    def jit(fn: Callable[..., Any]) -> Any:
        return jax.jit(fn, donate_argnums=(0,) if donate else ())

    return [
        Candidate(OPTAXCLIP, jit(ours.update), our_state, 3),
        Candidate(OPTAX, jit(theirs.update), theirs.init(tree), 3),
        Candidate(
            STATE_DROPPED, jit(lambda g, s: (ours.update(g, s)[0], None)), our_state, 3
        ),
        Candidate(REF_CLIP, jit(lambda g, s: (reference_clip(g, 1.0), None)), None, 3),
        Candidate(REF_COPY, jit(lambda g, s: (copy_tree(g), None)), None, 2),
    ]


def torch_candidate(
    tree: Any,
) -> tuple[Callable[[Any], None], Callable[[], None]] | None:
    """``clip_grad_norm_(foreach=True)`` on gradients holding the same data.

    The gradients live on the GPU when JAX runs on one, else on the CPU.
    Returns the clip and a ``restore`` to run (untimed) before each call:
    torch clips in place, so every timed call clips the same gradient. Both
    wait for the device before returning. ``None`` without torch.
    """
    torch = harness.torch
    if torch is None:
        return None
    device = harness.torch_device()
    dtype = {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[jnp.dtype(jax.tree.leaves(tree)[0].dtype).name]
    grads = [
        torch.from_numpy(np.array(x, dtype=np.float32)).to(device=device, dtype=dtype)
        for x in jax.tree.leaves(tree)
    ]
    originals = [g.clone() for g in grads]
    params = []
    for g in grads:
        p = torch.empty_like(g).requires_grad_()
        p.grad = g
        params.append(p)

    def run(_: Any) -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        harness.torch_sync(device)

    def restore() -> None:
        for g, o in zip(grads, originals, strict=True):
            g.copy_(o)
        harness.torch_sync(device)

    return run, restore


def measure(
    cfg: Config, tree: Any, section: int, params: int, leaves: int, donate: bool
) -> list[ClipRow]:
    """The rows of one tree, plain or donated: every candidate, same rounds."""
    cands = candidates(tree, donate)
    fns = {c.name: c.fn for c in cands}
    states = {c.name: c.state for c in cands}
    if donate:
        timed, prepare = harness.in_place_candidates(fns, states, tree)
        torch_run = torch_candidate(tree)
        if torch_run is not None:
            timed[TORCH], prepare[TORCH] = torch_run
    else:
        timed = {n: (lambda n=n: fns[n](tree, states[n])) for n in fns}
        prepare = None
    timing = harness.time_side_by_side(
        timed, cfg.repeats, prepare=prepare, budget_s=cfg.row_budget_s, seed=cfg.seed
    )
    grad_bytes = harness.nbytes(tree)
    dtype = jnp.dtype(jax.tree.leaves(tree)[0].dtype).name
    mode = "donated" if donate else "plain"
    passes = {c.name: c.passes for c in cands} | {TORCH: 3}
    # Peak memory of the donated executables, optaxclip's and optax's, so
    # the backend's own temporaries are told apart from ours.
    peaks = {
        c.name: harness.donated_peak_bytes(c.fn, tree, c.state)
        for c in cands
        if donate and c.name in (OPTAXCLIP, OPTAX)
    }
    return [
        ClipRow(
            section=section,
            dtype=dtype,
            params=params,
            leaves=leaves,
            mode=mode,
            impl=name,
            seconds=seconds,
            rounds=timing.rounds,
            grad_bytes=grad_bytes,
            bytes_moved=passes[name] * grad_bytes,
            peak_bytes=peaks.get(name),
        )
        for name, seconds in timing.seconds.items()
    ]


def run(
    cfg: Config,
    section: int,
    dtypes: Sequence[Any],
    sizes: Sequence[int],
    leaf_counts: Sequence[int],
    on_rows: Callable[[list[ClipRow]], None],
) -> None:
    """Measures every (dtype, size, leaves) tree, plain then donated.

    ``on_rows`` receives each tree's rows as soon as they are measured, so a
    run stopped part-way keeps what it finished.
    """
    for dtype in dtypes:
        for size in sizes:
            for leaves in leaf_counts:
                tree = harness.make_tree(size, leaves, dtype)
                for donate in (False, True):
                    rows = measure(cfg, tree, section, size, leaves, donate)
                    on_rows(rows)
                    t = {r.impl: r.seconds for r in rows}
                    print(
                        f"  {jnp.dtype(dtype).name} {size:.0e} params x {leaves} "
                        f"{rows[0].mode}: optaxclip / optax "
                        f"{t[OPTAXCLIP] / t[OPTAX]:.2f} ({rows[0].rounds} rounds)",
                        flush=True,
                    )
                del tree


def section_1(cfg: Config, on_rows: Callable[[list[ClipRow]], None]) -> None:
    """Float32 trees of every configured size and leaf count."""
    run(cfg, 1, [jnp.float32], cfg.sizes, cfg.leaves, on_rows)


def section_4(cfg: Config, on_rows: Callable[[list[ClipRow]], None]) -> None:
    """bfloat16 and float16 trees (optaxclip accumulates in float32)."""
    run(
        cfg, 4, [jnp.bfloat16, jnp.float16], [cfg.lowp_size], [cfg.lowp_leaves], on_rows
    )
