"""Section 2: every scope and rule inside a jitted ``chain(clip, adamw)`` step.

The parameters are ``(rows, 256)`` float32 kernels (so AGC has units); the
steps are timed side by side with bare adamw, whose time the report divides
by, and each rule's step is also read against the fixed threshold of its
scope.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from benchmarks import harness, methods
from benchmarks.records import Config, StepRow


def run(cfg: Config, on_rows: Callable[[list[StepRow]], None]) -> None:
    """Times every method of :func:`methods.methods` in front of adamw."""
    params = harness.make_matrix_tree(cfg.step_size, cfg.step_leaves, seed=1)
    grads = harness.make_matrix_tree(cfg.step_size, cfg.step_leaves, seed=2)
    size = sum(x.size for x in jax.tree.leaves(params))
    cases = methods.methods()
    steps, states = {}, {}
    for m in cases:
        tx = optax.chain(m.build(), optax.adamw(1e-3))
        states[m.label] = tx.init(params)
        steps[m.label] = jax.jit(tx.update)
    timed = {
        m.label: (lambda n=m.label: steps[n](grads, states[n], params)) for m in cases
    }
    timing = harness.time_side_by_side(
        timed, cfg.repeats, budget_s=cfg.row_budget_s, seed=cfg.seed
    )
    rows = [
        StepRow(
            section=2,
            method=m.label,
            library=m.library,
            scope=m.scope,
            rule=m.rule,
            params=size,
            leaves=cfg.step_leaves,
            seconds=timing.seconds[m.label],
            rounds=timing.rounds,
        )
        for m in cases
    ]
    bare = timing.seconds[methods.BARE]
    for r in rows:
        print(f"  {r.method}: {r.seconds / bare:.3f} x bare adamw", flush=True)
    on_rows(rows)
