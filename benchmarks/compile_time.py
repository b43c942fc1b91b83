"""Section 3: trace + compile time of a jitted update against the leaf count.

Leaves cycle through the eight shapes of a small transformer block. Each
case (a method, in ``chain(clip, adamw)`` or on its own) compiles in a
fresh process (``python -m benchmarks.compile_time``), which reports its
peak resident memory too and is stopped after ``compile_timeout_s``; rows
it did not reach are recorded as stopped. The per-tensor rules and AdaGC
get a row each, to read against the fixed per-tensor clip.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from benchmarks import harness, methods
from benchmarks.records import CompileRow, Config, row_to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BLOCK_SHAPES = [(64,), (64,), (64, 192), (64, 64), (64,), (64,), (64, 256), (256, 64)]


class CompileCase(NamedTuple):
    """One compile to time: a method's update, with or without adamw."""

    method: str  # a label of methods.by_label()
    with_adamw: bool


def cases(rules: bool = True) -> list[CompileCase]:
    """The cases of section 3: the fixed clips, each per-tensor rule (where
    ``rules``), and the fixed clips on their own."""
    known = methods.by_label()
    chained = [
        methods.BARE,
        "optax.clip_by_global_norm",
        "global (clip_by_global_norm)",
        methods.GLOBAL_PER_TENSOR_STATS,
        "per-tensor (clip_by_norm)",
    ]
    if rules:
        chained += [
            m.label for m in known.values() if m.scope == "per-tensor" and m.rule
        ]
    alone = [
        "optax.clip_by_global_norm",
        "global (clip_by_global_norm)",
        "per-tensor (clip_by_norm)",
    ]
    return [CompileCase(m, True) for m in chained] + [
        CompileCase(m, False) for m in alone
    ]


def compile_rows(case: CompileCase, leaf_counts: Sequence[int]) -> list[CompileRow]:
    """Times ``case`` at each leaf count in this process (the worker's job)."""
    method = methods.by_label()[case.method]
    rows = []
    for n in leaf_counts:
        params = {
            f"l{i:05d}": jnp.zeros(_BLOCK_SHAPES[i % len(_BLOCK_SHAPES)], jnp.float32)
            for i in range(n)
        }
        clip = method.build()
        tx = optax.chain(clip, optax.adamw(1e-3)) if case.with_adamw else clip
        state = tx.init(params)
        start = time.perf_counter()
        lowered = jax.jit(tx.update).lower(params, state, params)
        traced = time.perf_counter()
        lowered.compile()
        done = time.perf_counter()
        row = _row(case, n, traced - start, done - traced, harness.peak_rss_mb())
        print(json.dumps(row_to_dict(row)), flush=True)
        rows.append(row)
    return rows


def run(cfg: Config, on_rows: Callable[[list[CompileRow]], None]) -> None:
    """Runs every case in fresh processes; ``on_rows`` gets each case's rows.

    One process per case (its own peak memory and time limit); the quick
    mode shares one process to save the start-up time.
    """
    all_cases = cases(cfg.compile_rules)
    batches = [all_cases] if cfg.compile_shared_process else [[c] for c in all_cases]
    for batch in batches:
        got = {
            (r.method, r.with_adamw, r.leaves): r
            for r in _run_worker(batch, cfg.compile_leaves, cfg.compile_timeout_s)
        }
        for case in batch:
            rows = [
                got.get((case.method, case.with_adamw, n)) or _stopped(case, n)
                for n in cfg.compile_leaves
            ]
            for r in rows:
                total = (
                    "stopped"
                    if r.trace_s is None
                    else f"{r.trace_s + r.compile_s:.2f} s"
                )
                alone = "" if case.with_adamw else " (clip only)"
                print(f"  {case.method}{alone}, {r.leaves} leaves: {total}", flush=True)
            on_rows(rows)


def _stopped(case: CompileCase, leaves: int) -> CompileRow:
    return _row(case, leaves, None, None, None)


def _row(
    case: CompileCase,
    leaves: int,
    trace_s: float | None,
    compile_s: float | None,
    peak_rss_mb: float | None,
) -> CompileRow:
    method = methods.by_label()[case.method]
    return CompileRow(
        section=3,
        method=method.label,
        library=method.library,
        scope=method.scope,
        rule=method.rule,
        with_adamw=case.with_adamw,
        leaves=leaves,
        trace_s=trace_s,
        compile_s=compile_s,
        peak_rss_mb=peak_rss_mb,
    )


def _run_worker(
    batch: Sequence[CompileCase], leaf_counts: Sequence[int], timeout: float
) -> list[CompileRow]:
    cmd = [sys.executable, "-m", "benchmarks.compile_time"]
    cmd += ["--cases", json.dumps([list(c) for c in batch])]
    cmd += ["--leaf-counts", ",".join(map(str, leaf_counts))]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    if jax.default_backend() == "cpu":
        env.setdefault("JAX_PLATFORMS", "cpu")
    # On a GPU the parent already holds most of the device memory (JAX
    # preallocates it): the compiling child allocates only what it uses.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=ROOT,
            check=False,
        )
        stdout = proc.stdout
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr, flush=True)
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    rows = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            rows.append(CompileRow(**json.loads(line)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """The worker: compiles each ``--cases`` entry at each ``--leaf-counts``."""
    parser = argparse.ArgumentParser(description="section 3's compiling process")
    parser.add_argument("--cases", required=True, help="JSON [[method, adamw], ...]")
    parser.add_argument("--leaf-counts", required=True, help="e.g. 10,100")
    args = parser.parse_args(argv)
    counts = harness.int_list(args.leaf_counts, "--leaf-counts")
    for method, with_adamw in json.loads(args.cases):
        compile_rows(CompileCase(method, bool(with_adamw)), counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
