"""Speed, bandwidth and compile-time benchmarks for optaxclip.

Run from the repository root::

    python benchmarks/run.py            # full run (see README, "Performance")
    python benchmarks/run.py --quick    # small sizes, under a minute

Every table compares implementations measured side by side in one process:
each row's candidates are warmed up, then timed in interleaved rounds (one
call of each per round, ``block_until_ready`` around every call), and the
median of the rounds is reported: at least ``--repeats`` rounds, more (up
to 400) where a row's rounds are cheap enough to fit in a few seconds.
Absolute times drift with machine load; the ratios are what to compare
across runs.

Sections:

1. Global-norm clipping of float32 trees (sizes x leaf counts): optaxclip vs
   ``optax.clip_by_global_norm`` vs ``torch.nn.utils.clip_grad_norm_`` (only
   if torch is installed) vs two bandwidth references: the plain jitted
   "measure + scale" and a jitted copy of the same bytes. Effective GB/s
   counts 2 reads + 1 write of the gradient bytes. Also with buffer donation,
   with the peak memory of the donated executable relative to its input;
   torch, which clips in place (on the GPU when JAX runs on one), is timed
   in the same rounds as the donated (in-place) JAX calls. A diagnostic
   candidate runs optaxclip's clip with its new state dropped, which
   isolates the cost of the ``ClipStats`` outputs. The absolute GB/s of the
   donated rows are also printed against the device's copy bandwidth (a
   jitted copy of one large array, measured first).
2. Each scope and each adaptive rule inside a jitted
   ``optax.chain(clip, optax.adamw(...))`` step, as a ratio to bare adamw.
3. Trace + compile time (and peak compiler memory) of that jitted step for
   growing leaf counts, optaxclip vs optax, each in a fresh subprocess; and
   of the clip transform jitted on its own.
4. bfloat16 and float16 gradients: float32 accumulation vs the references.

``--sections`` runs them in the order given, and ``--json`` is rewritten
after each row group, so a run stopped part-way keeps what it measured
(``benchmarks/gpu.sh`` runs the whole suite on a GPU machine that way).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc

try:  # torch is optional: its rows read "n/a" when it is missing
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None
else:
    # One intra-op thread: on a small shared machine torch's spinning OpenMP
    # pool, competing with XLA's threads, is tens of times slower than this.
    torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "1")))


def torch_device() -> str:
    """Where torch's gradients live: the GPU when JAX runs on one, else CPU."""
    if torch is not None and jax.default_backend() == "gpu":
        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


def _torch_sync(device: str) -> None:
    """Waits for torch's queued work (CPU torch is synchronous already)."""
    if device == "cuda":
        torch.cuda.synchronize()


TORCH_NA = "n/a (torch not installed)"
UPDATES_ONLY = "optaxclip, state dropped"
HERE = os.path.dirname(os.path.abspath(__file__))

FULL = {
    "sizes": [100_000, 1_000_000, 10_000_000, 50_000_000],
    "leaves": [1, 16, 256],
    "repeats": 21,
    "row_budget_s": 3.0,
    "step_size": 10_000_000,
    "step_leaves": 16,
    "compile_leaves": [10, 100, 1000, 5000],
    "compile_timeout": 120.0,
    "compile_shared_process": False,
    "lowp_size": 10_000_000,
    "copy_bytes": 2**31,
}
QUICK = {
    "sizes": [100_000],
    "leaves": [1, 16],
    "repeats": 20,
    "row_budget_s": 0.0,
    "step_size": 100_000,
    "step_leaves": 4,
    "compile_leaves": [10, 40],
    "compile_timeout": 120.0,
    "compile_shared_process": True,
    "lowp_size": 100_000,
    "copy_bytes": 2**24,
}


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def _block(x: Any) -> Any:
    return jax.block_until_ready(x)


def time_side_by_side(
    candidates: dict[str, Callable[..., Any]],
    repeats: int,
    warmup: int = 2,
    prepare: dict[str, Callable[[], Any]] | None = None,
    budget_s: float = 0.0,
    max_rounds: int = 400,
) -> tuple[dict[str, float], int]:
    """Median seconds per call of each candidate, timed in interleaved rounds.

    ``prepare[name]()`` (untimed) builds the argument of each call, for
    candidates that consume or modify their input (buffer donation, torch's
    in-place clip); the candidate is then called as ``fn(arg)``.

    Runs ``repeats`` rounds, or more (up to ``max_rounds``) when a round is
    cheap enough that ``budget_s`` seconds allow it: small rows get more
    samples, which steadies their medians on a noisy machine. Returns the
    medians and the number of rounds.
    """
    prepare = prepare or {}

    def call(name: str) -> float:
        fn = candidates[name]
        if name in prepare:
            arg = _block(prepare[name]())
            start = time.perf_counter()
            _block(fn(arg))
        else:
            start = time.perf_counter()
            _block(fn())
        return time.perf_counter() - start

    for name in candidates:
        for _ in range(warmup):
            call(name)
    # The cost of a round, read after the warm-up (whose first calls compile).
    round_start = time.perf_counter()
    for name in candidates:
        call(name)
    per_round = time.perf_counter() - round_start
    rounds = max(repeats, min(max_rounds, int(budget_s / max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name in candidates:
            samples[name].append(call(name))
    return {name: statistics.median(s) for name, s in samples.items()}, rounds


# ---------------------------------------------------------------------------
# Trees
# ---------------------------------------------------------------------------


def split_sizes(total: int, leaves: int) -> list[int]:
    """``leaves`` sizes summing to ``total``, as even as possible."""
    base, extra = divmod(total, leaves)
    return [base + (1 if i < extra else 0) for i in range(leaves)]


def make_tree(
    total: int, leaves: int, dtype: Any, seed: int = 0
) -> dict[str, jax.Array]:
    """A dict of ``leaves`` 1-D arrays with ``total`` normal entries in all."""
    key = jax.random.PRNGKey(seed)
    tree = {}
    for i, n in enumerate(split_sizes(total, leaves)):
        key, sub = jax.random.split(key)
        tree[f"p{i:05d}"] = jax.random.normal(sub, (n,), jnp.float32).astype(dtype)
    return _block(tree)


def make_matrix_tree(total: int, leaves: int, seed: int = 0) -> dict[str, jax.Array]:
    """A dict of ``leaves`` float32 ``(rows, 256)`` kernels (units for AGC)."""
    cols = 256
    rows = max(total // (leaves * cols), 1)
    key = jax.random.PRNGKey(seed)
    tree = {}
    for i in range(leaves):
        key, sub = jax.random.split(key)
        tree[f"w{i:03d}"] = jax.random.normal(sub, (rows, cols), jnp.float32)
    return _block(tree)


def nbytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------
# The candidates of sections 1 and 4
# ---------------------------------------------------------------------------


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


def clip_candidates(
    tree: Any, donate: bool
) -> tuple[dict[str, Callable[..., Any]], dict[str, Any]]:
    """Jitted clip functions over ``tree``; with ``donate`` they consume it."""
    ours = oc.clip_by_global_norm(1.0)
    theirs = optax.clip_by_global_norm(1.0)
    our_state = ours.init(tree)
    their_state = theirs.init(tree)
    donate_argnums = (0,) if donate else ()

    fns = {
        "optaxclip": jax.jit(
            lambda g, s: ours.update(g, s), donate_argnums=donate_argnums
        ),
        "optax": jax.jit(
            lambda g, s: theirs.update(g, s), donate_argnums=donate_argnums
        ),
        # Diagnostic: the same clip with its new state (the ClipStats
        # outputs) dropped, which tells their cost apart from the clip's.
        UPDATES_ONLY: jax.jit(
            lambda g, s: (ours.update(g, s)[0], None), donate_argnums=donate_argnums
        ),
        "ref measure+scale": jax.jit(
            lambda g, s: (reference_clip(g, 1.0), None), donate_argnums=donate_argnums
        ),
        "ref copy": jax.jit(
            lambda g, s: (copy_tree(g), None), donate_argnums=donate_argnums
        ),
    }
    states = {
        "optaxclip": our_state,
        "optax": their_state,
        UPDATES_ONLY: our_state,
        "ref measure+scale": None,
        "ref copy": None,
    }
    return fns, states


@functools.partial(jax.jit, donate_argnums=0)
def _refill(held: Any, tree: Any) -> Any:
    """Writes ``tree``'s data into ``held``'s buffers (donated: same memory)."""
    return jax.tree.map(
        lambda h, x: jax.lax.dynamic_update_slice(h, x, (0,) * h.ndim), held, tree
    )


def in_place_candidates(
    fns: dict[str, Callable[..., Any]],
    states: dict[str, Any],
    tree: Any,
    feed_state: Sequence[str] = (),
) -> tuple[dict[str, Callable[[Any], Any]], dict[str, Callable[[], Any]]]:
    """Donated calls that clip the same buffers over and over, as torch does.

    Each candidate keeps one copy of ``tree``. Before every (timed) donated
    call, ``prepare`` writes the original data back into that copy's
    buffers, and the call's output (which reuses the donated memory) is kept
    for the next round. A fresh buffer per call would also time the
    allocator and the first touch of new pages, which torch's in-place clip,
    restored the same way, does not pay. The candidates named in
    ``feed_state`` donate their state too: each call's new state (in
    ``states``) is the next call's input, as in a training step.
    """
    held = {name: jax.tree.map(jnp.copy, tree) for name in fns}

    def prepare_for(name: str) -> Callable[[], Any]:
        def prepare() -> Any:
            held[name] = _refill(held[name], tree)
            return held[name]

        return prepare

    def run_for(name: str) -> Callable[[Any], Any]:
        def run(grads: Any) -> Any:
            out = fns[name](grads, states[name])
            held[name] = out[0]
            if name in feed_state:
                states[name] = out[1]
            return out

        return run

    return {n: run_for(n) for n in fns}, {n: prepare_for(n) for n in fns}


def torch_candidate(
    tree: Any,
) -> tuple[Callable[[Any], None], Callable[[], None]] | None:
    """``clip_grad_norm_(foreach=True)`` on gradients holding the same data.

    The gradients live on the GPU when JAX runs on one (``torch_device``),
    else on the CPU. Returns the clip and a ``restore`` to run (untimed)
    before each call: torch clips in place, so every timed call clips the
    same gradient. Both wait for the device before returning.
    """
    if torch is None:
        return None
    device = torch_device()
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
        _torch_sync(device)

    def restore() -> None:
        for g, o in zip(grads, originals, strict=True):
            g.copy_(o)
        _torch_sync(device)

    return run, restore


def copy_bandwidth(n_bytes: int, repeats: int) -> float:
    """GB/s of a jitted copy of one ``n_bytes`` float32 array (read + write).

    The device's practical memory bandwidth, the ceiling the absolute GB/s
    of the other rows are read against: the faster of a copy into a fresh
    output and one in place (donated, as the donated rows run; on a CPU a
    fresh output also pays for its first page touches).
    """
    x = jax.random.normal(jax.random.PRNGKey(3), (n_bytes // 4,), jnp.float32)
    copy = jax.jit(jnp.negative)
    in_place = jax.jit(jnp.negative, donate_argnums=0)
    held = [x.copy()]

    def copy_in_place() -> Any:
        held[0] = in_place(held[0])
        return held[0]

    times, _ = time_side_by_side(
        {"fresh": lambda: copy(x), "in place": copy_in_place}, repeats
    )
    return 2 * x.size * 4 / min(times.values()) / 1e9


def donated_peak_ratio(fn: Callable[..., Any], tree: Any, state: Any) -> float | None:
    """Peak bytes of a donated executable (inputs, temps, new outputs) / input."""
    try:
        analysis = fn.lower(tree, state).compile().memory_analysis()
    except Exception:  # noqa: BLE001  (not every backend reports it)
        return None
    if analysis is None:
        return None
    peak = (
        analysis.argument_size_in_bytes
        + analysis.temp_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    return peak / nbytes(tree)


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


def section_global(
    cfg: dict,
    dtypes: Sequence[Any],
    sizes: Sequence[int],
    title: str,
    section: int,
    rows: list[dict],
    save: Callable[[], None] = lambda: None,
) -> None:
    """Appends the rows of every (dtype, size, leaves) to ``rows``, calling
    ``save`` after each, so a run stopped part-way keeps what it measured."""
    print(f"\n## {title}\n")
    header = (
        "| dtype | params | leaves | mode | impl | time (ms) | GB/s | "
        "vs optax | % of bandwidth ref | peak / input |"
    )
    print(header)
    print("|" + "---|" * 10)
    for dtype in dtypes:
        for size in sizes:
            for leaves in cfg["leaves"]:
                tree = make_tree(size, leaves, dtype)
                moved = 3 * nbytes(tree)  # 2 reads + 1 write
                for donate in (False, True):
                    rows.extend(
                        _global_rows(
                            cfg, tree, dtype, size, leaves, donate, moved, section
                        )
                    )
                del tree
                save()


def _global_rows(cfg, tree, dtype, size, leaves, donate, moved, section):
    fns, states = clip_candidates(tree, donate)
    names = list(fns)
    if donate:
        candidates, prepare = in_place_candidates(fns, states, tree)
    else:
        candidates = {n: (lambda n=n: fns[n](tree, states[n])) for n in names}
        prepare = None
    torch_run = torch_candidate(tree) if donate else None
    if torch_run is not None:
        # torch clips in place: it is timed with the donated (in-place) JAX
        # calls, in the same interleaved rounds, so load drift hits all alike.
        candidates["torch foreach"], prepare["torch foreach"] = torch_run
    times, rounds = time_side_by_side(
        candidates, cfg["repeats"], prepare=prepare, budget_s=cfg["row_budget_s"]
    )
    mode = "donated" if donate else "plain"
    if donate and torch_run is None:
        times["torch foreach"] = None
    # The floor: measuring + scaling moves 3x the bytes, a copy 2x.
    floor = min(times["ref measure+scale"], 1.5 * times["ref copy"])
    # Peak memory of the donated executables, optaxclip's and optax's, so
    # the backend's own temporaries are told apart from ours.
    peaks = {
        name: donated_peak_ratio(fns[name], tree, states[name])
        for name in ("optaxclip", "optax")
        if donate
    }
    rows = []
    for name in [*names, "torch foreach"]:
        if name not in times:
            continue
        t = times[name]
        row = {
            "section": section,
            "dtype": jnp.dtype(dtype).name,
            "params": size,
            "leaves": leaves,
            "mode": mode,
            "impl": name,
            "rounds": rounds,
        }
        if t is None:
            cells = [TORCH_NA, "", "", "", ""]
            row["time_s"] = None
        else:
            gbs = (2 if name == "ref copy" else 3) * moved / 3 / t / 1e9
            cells = [
                f"{t * 1e3:.3f}",
                f"{gbs:.1f}",
                f"{t / times['optax']:.2f}",
                f"{100 * floor / t:.0f}%" if name != "ref copy" else "",
                f"{peaks[name]:.2f}" if peaks.get(name) is not None else "",
            ]
            row.update(time_s=t, gb_s=gbs, vs_optax=t / times["optax"], of_bw=floor / t)
            if peaks.get(name) is not None:
                row["peak_over_input"] = peaks[name]
        print(
            f"| {row['dtype']} | {size:.0e} | {leaves} | {mode} | {name} | "
            + " | ".join(cells)
            + " |"
        )
        rows.append(row)
    return rows


def step_transforms() -> dict[str, Callable[[], optax.GradientTransformation]]:
    """Clipping transforms put in front of adamw in section 2."""
    out: dict[str, Callable[[], Any]] = {
        "bare adamw": lambda: optax.identity(),
        "value (clip_by_value)": lambda: oc.clip_by_value(1.0),
        "per-tensor (clip_by_norm)": lambda: oc.clip_by_norm(1.0),
        "global (clip_by_global_norm)": lambda: oc.clip_by_global_norm(1.0),
        "block RMS (clip_by_block_rms)": lambda: oc.clip_by_block_rms(1.0),
        "AGC (adaptive_grad_clip)": lambda: oc.adaptive_grad_clip(0.01),
        "optax.clip_by_global_norm": lambda: optax.clip_by_global_norm(1.0),
    }
    # Adaptive rules, whichever this version of optaxclip provides.
    rules = {
        "percentile": lambda r: r(10.0),
        "zscore": lambda r: r(),
        "ema": lambda r: r(),
        "quantile": lambda r: r(),
    }
    for name, build in rules.items():
        rule = getattr(oc.rules, name, None)
        if rule is not None:
            out[f"global + rules.{name}"] = lambda rule=rule, build=build: (
                oc.clip_by_global_norm(build(rule))
            )
            out[f"per-tensor + rules.{name}"] = lambda rule=rule, build=build: (
                oc.clip_by_norm(build(rule))
            )
    return out


def section_step(cfg: dict):
    size = cfg["step_size"]
    print(
        f"\n## 2. Each scope and rule in a jitted chain(clip, adamw) step, "
        f"{size:.0e} params\n"
    )
    params = make_matrix_tree(size, cfg["step_leaves"], seed=1)
    grads = make_matrix_tree(size, cfg["step_leaves"], seed=2)
    steps, states = {}, {}
    for name, build in step_transforms().items():
        tx = optax.chain(build(), optax.adamw(1e-3))
        states[name] = tx.init(params)
        steps[name] = jax.jit(tx.update)
    candidates = {n: (lambda n=n: steps[n](grads, states[n], params)) for n in steps}
    times, _ = time_side_by_side(
        candidates, cfg["repeats"], budget_s=cfg["row_budget_s"]
    )
    bare = times["bare adamw"]
    fixed_global = times["global (clip_by_global_norm)"]
    fixed_tensor = times["per-tensor (clip_by_norm)"]
    print(
        "| clip in front of adamw | time (ms) | vs bare adamw | vs fixed same scope |"
    )
    print("|---|---|---|---|")
    rows = []
    for name, t in times.items():
        ref = fixed_tensor if name.startswith("per-tensor +") else fixed_global
        vs_fixed = f"{t / ref:.3f}" if "+ rules." in name else ""
        print(f"| {name} | {t * 1e3:.2f} | {t / bare:.3f} | {vs_fixed} |")
        rows.append(
            {
                "section": 2,
                "impl": name,
                "time_s": t,
                "vs_bare": t / bare,
                "params": size,
            }
        )
    return rows


# Leaf shapes cycling like the parameters of a transformer block, so the
# compile benchmark sees a realistic mix of repeated and distinct shapes.
_BLOCK_SHAPES = [(64,), (64,), (64, 192), (64, 64), (64,), (64,), (64, 256), (256, 64)]


def compile_worker(impls: Sequence[str], leaf_counts: Sequence[int]) -> None:
    """Child process: compiles the chain(impl, adamw) step for each leaf count."""
    for impl in impls:
        _compile_one(impl, leaf_counts)


def _peak_rss_mb() -> float:
    """High-water mark of this process's resident memory, in MB.

    Read from ``/proc`` (reset by ``exec``, unlike ``ru_maxrss``, which a
    child started from a large parent inherits); ``ru_maxrss`` elsewhere.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _compile_one(impl: str, leaf_counts: Sequence[int]) -> None:
    for n in leaf_counts:
        params = {
            f"l{i:05d}": jnp.zeros(_BLOCK_SHAPES[i % len(_BLOCK_SHAPES)], jnp.float32)
            for i in range(n)
        }
        name, clip_only = impl.removesuffix(CLIP_ONLY), impl.endswith(CLIP_ONLY)
        clip = {
            "optaxclip global": lambda: oc.clip_by_global_norm(1.0),
            "optax global": lambda: optax.clip_by_global_norm(1.0),
            "optaxclip per-tensor": lambda: oc.clip_by_norm(1.0),
            "optaxclip block RMS": lambda: oc.clip_by_block_rms(1.0),
            "optax block RMS": lambda: optax.clip_by_block_rms(1.0),
            "bare adamw": lambda: optax.identity(),
        }[name]()
        tx = clip if clip_only else optax.chain(clip, optax.adamw(1e-3))
        state = tx.init(params)
        start = time.perf_counter()
        lowered = jax.jit(tx.update).lower(params, state, params)
        traced = time.perf_counter()
        lowered.compile()
        done = time.perf_counter()
        peak_mb = _peak_rss_mb()
        print(
            json.dumps(
                {
                    "impl": impl,
                    "leaves": n,
                    "trace_s": traced - start,
                    "compile_s": done - traced,
                    "peak_rss_mb": peak_mb,
                }
            ),
            flush=True,
        )


CLIP_ONLY = " (clip only)"
COMPILE_IMPLS = [
    "bare adamw",
    "optax global",
    "optaxclip global",
    "optaxclip per-tensor",
    # The clip transform jitted on its own: its compile time without adamw's
    # (which itself grows faster than linearly with the leaves on XLA CPU).
    "optax global" + CLIP_ONLY,
    "optaxclip global" + CLIP_ONLY,
    "optaxclip per-tensor" + CLIP_ONLY,
]


def section_compile(cfg: dict):
    counts = cfg["compile_leaves"]
    print(
        "\n## 3. Trace + compile of a jitted chain(clip, adamw) update "
        "(fresh process per implementation; peak RSS of that process)\n"
    )
    print(
        "| impl | leaves | trace (s) | compile (s) | total vs optax global (same kind) "
        "| peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|")
    results: dict[str, dict[int, dict | None]] = {impl: {} for impl in COMPILE_IMPLS}
    # One process per implementation (its own peak RSS and time limit); the
    # quick mode shares one process to save the start-up time.
    batches = (
        [COMPILE_IMPLS]
        if cfg["compile_shared_process"]
        else [[impl] for impl in COMPILE_IMPLS]
    )
    for batch in batches:
        for r in _run_compile_worker(batch, counts, cfg["compile_timeout"]):
            results[r["impl"]][r["leaves"]] = r
    rows = []
    for impl in COMPILE_IMPLS:
        for n in counts:
            r = results[impl].get(n)
            suffix = CLIP_ONLY if impl.endswith(CLIP_ONLY) else ""
            base = results["optax global" + suffix].get(n)
            row = {"section": 3, "impl": impl, "leaves": n}
            if r is None:
                cells = [f"> {cfg['compile_timeout']:.0f} s (stopped)", "", "", ""]
            else:
                total = r["trace_s"] + r["compile_s"]
                vs = (
                    f"{total / (base['trace_s'] + base['compile_s']):.2f}"
                    if base
                    else "(optax stopped)"
                )
                cells = [
                    f"{r['trace_s']:.2f}",
                    f"{r['compile_s']:.2f}",
                    vs,
                    f"{r['peak_rss_mb']:.0f}",
                ]
                row.update(r)
            print(f"| {impl} | {n} | " + " | ".join(cells) + " |")
            rows.append(row)
    return rows


def _run_compile_worker(impls: Sequence[str], counts: Sequence[int], timeout: float):
    cmd = [sys.executable, os.path.abspath(__file__)]
    cmd += ["--compile-worker", ",".join(impls)]
    cmd += ["--leaf-counts", ",".join(map(str, counts))]
    env = dict(os.environ)
    if jax.default_backend() == "cpu":
        env.setdefault("JAX_PLATFORMS", "cpu")
    # On a GPU this process already holds most of the device memory (JAX
    # preallocates it): the compiling child allocates only what it uses.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    out = []
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
        stdout = proc.stdout
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    for line in stdout.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def summarize(rows: Sequence[dict]) -> None:
    """Prints the condensed section-1/4 table used in the README."""
    print(
        "| dtype | params | leaves | optaxclip / optax | donated: optaxclip / optax "
        "| donated: % of bandwidth ref | donated: peak / input "
        "| donated: optax peak / input "
        "| donated optaxclip / torch foreach (in place) "
        "| donated, state dropped: optaxclip / optax |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = [r for r in rows if r["section"] in (1, 4)]
    index = {
        (r["dtype"], r["params"], r["leaves"], r["mode"], r["impl"]): r for r in rows
    }
    keys = sorted(
        {
            (r["dtype"], r["params"], r["leaves"])
            for r in rows
            if r["section"] in (1, 4)
        },
        key=lambda k: (k[0] != "float32", k[0], k[1], k[2]),
    )
    for dtype, size, leaves in keys:
        plain = index[(dtype, size, leaves, "plain", "optaxclip")]
        donated = index[(dtype, size, leaves, "donated", "optaxclip")]
        dropped = index[(dtype, size, leaves, "donated", UPDATES_ONLY)]
        torch_row = index.get((dtype, size, leaves, "donated", "torch foreach"))
        vs_torch = (
            f"{donated['time_s'] / torch_row['time_s']:.2f}"
            if torch_row and torch_row["time_s"]
            else TORCH_NA
        )
        peak = donated.get("peak_over_input")
        their_peak = index[(dtype, size, leaves, "donated", "optax")].get(
            "peak_over_input"
        )
        print(
            f"| {dtype} | {size:.0e} | {leaves} | {plain['vs_optax']:.2f} | "
            f"{donated['vs_optax']:.2f} | {100 * donated['of_bw']:.0f}% | "
            f"{'' if peak is None else f'{peak:.2f}'} | "
            f"{'' if their_peak is None else f'{their_peak:.2f}'} | {vs_torch} | "
            f"{dropped['vs_optax']:.2f} |"
        )


def summarize_bandwidth(rows: Sequence[dict], copy_gb_s: float) -> None:
    """Absolute GB/s of the donated rows, against the device's copy bandwidth."""
    print(f"Device copy bandwidth (jitted copy, read + write): {copy_gb_s:.0f} GB/s\n")
    impls = ["optaxclip", "optax", "torch foreach", "ref measure+scale", "ref copy"]
    print(
        "| dtype | params | leaves | "
        + " | ".join(f"{i} GB/s" for i in impls)
        + " | optaxclip % of device copy |"
    )
    print("|---|---|---|" + "---|" * (len(impls) + 1))
    index = {
        (r["dtype"], r["params"], r["leaves"], r["impl"]): r
        for r in rows
        if r["section"] in (1, 4) and r["mode"] == "donated"
    }
    keys = sorted(
        {k[:3] for k in index},
        key=lambda k: (k[0] != "float32", k[0], k[1], k[2]),
    )
    for key in keys:
        cells = []
        for impl in impls:
            r = index.get((*key, impl))
            cells.append(f"{r['gb_s']:.0f}" if r and r.get("gb_s") else "n/a")
        ours = index[(*key, "optaxclip")]["gb_s"]
        print(
            f"| {key[0]} | {key[1]:.0e} | {key[2]} | "
            + " | ".join(cells)
            + f" | {100 * ours / copy_gb_s:.0f}% |"
        )


def print_versions() -> dict:
    info = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"),
        "optax": optax.__version__,
        "optaxclip": oc.__version__,
        "torch": torch.__version__ if torch is not None else "not installed",
        "torch device": torch_device() if torch is not None else "n/a",
        "device": str(jax.devices()[0].device_kind),
        "cpu cores": os.cpu_count(),
        "platform": platform.platform(),
    }
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, under a minute"
    )
    parser.add_argument(
        "--sections", default="1,2,3,4", help="comma-separated sections to run"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row")
    parser.add_argument("--json", default=None, help="also write all rows to this file")
    parser.add_argument(
        "--compile-timeout",
        type=float,
        default=None,
        help="seconds each section-3 process may run (full: 120, quick: 120)",
    )
    parser.add_argument(
        "--summarize", default=None, help="print the README summary of a --json file"
    )
    parser.add_argument(
        "--sizes", default=None, help="section 1 sizes, e.g. 1e5,1e6 (overrides)"
    )
    parser.add_argument(
        "--leaves", default=None, help="section 1 leaf counts, e.g. 1,16,256"
    )
    parser.add_argument(
        "--compile-leaves", default=None, help="section 3 leaf counts, e.g. 10,100"
    )
    parser.add_argument(
        "--row-budget",
        type=float,
        default=None,
        help="seconds of extra timed rounds per row (full: 3, quick: 0)",
    )
    parser.add_argument("--compile-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--leaf-counts", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.compile_worker:
        compile_worker(
            args.compile_worker.split(","),
            [int(c) for c in args.leaf_counts.split(",")],
        )
        return 0

    if args.summarize:
        with open(args.summarize) as f:
            data = json.load(f)
        summarize(data["rows"])
        if data.get("copy_gb_s"):
            print()
            summarize_bandwidth(data["rows"], data["copy_gb_s"])
        return 0

    cfg = dict(QUICK if args.quick else FULL)
    if args.repeats is not None:
        cfg["repeats"] = args.repeats
    if args.compile_timeout is not None:
        cfg["compile_timeout"] = args.compile_timeout
    if args.row_budget is not None:
        cfg["row_budget_s"] = args.row_budget
    for key, value in (
        ("sizes", args.sizes),
        ("leaves", args.leaves),
        ("compile_leaves", args.compile_leaves),
    ):
        if value is not None:
            cfg[key] = _int_list(value, "--" + key.replace("_", "-"))
    # Sections run in the order given, so a time-limited run can put the
    # ones it needs most first; the JSON is rewritten after each one.
    order = _int_list(args.sections, "--sections")
    if not set(order) <= {1, 2, 3, 4}:
        parser.error(f"--sections takes 1, 2, 3 and 4, got {args.sections!r}")
    print(f"# optaxclip benchmarks ({'quick' if args.quick else 'full'} mode)")
    versions = print_versions()
    start = time.perf_counter()
    rows: list[dict] = []
    copy_gb_s = None

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {
                        "versions": versions,
                        "config": cfg,
                        "copy_gb_s": copy_gb_s,
                        "rows": rows,
                    },
                    f,
                    indent=1,
                )

    for section in order:
        if section in (1, 4) and copy_gb_s is None:
            copy_gb_s = copy_bandwidth(cfg["copy_bytes"], cfg["repeats"])
            print(f"\nDevice copy bandwidth: {copy_gb_s:.0f} GB/s")
        if section == 1:
            section_global(
                cfg,
                [jnp.float32],
                cfg["sizes"],
                "1. Global-norm clipping, float32",
                1,
                rows,
                save,
            )
        elif section == 2:
            rows += section_step(cfg)
        elif section == 3:
            rows += section_compile(cfg)
        else:
            section_global(
                {**cfg, "leaves": [16]},
                [jnp.bfloat16, jnp.float16],
                [cfg["lowp_size"]],
                "4. Low-precision gradients (float32 accumulation)",
                4,
                rows,
                save,
            )
        save()
    if {1, 4} & set(order):
        print("\n## Summary of sections 1 and 4 (ratios < 1: optaxclip faster)\n")
        summarize(rows)
        print()
        summarize_bandwidth(rows, copy_gb_s)
    print(f"\nTotal benchmark time: {time.perf_counter() - start:.0f} s")
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    """``"1e5,16"`` -> ``[100000, 16]``; a clear error for anything else."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(
            f"{flag} takes comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(not math.isfinite(v) or v <= 0 or v != int(v) for v in values):
        raise SystemExit(f"{flag} takes positive whole numbers, got {text!r}")
    return [int(v) for v in values]


if __name__ == "__main__":
    sys.exit(main())
