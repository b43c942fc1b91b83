"""Where a small clip's time goes: the per-call cost of the state outputs.

Run from the repository root::

    python benchmarks/overhead.py [--json out.json] [--hlo out.txt] [--seed N]

For the global clip of small float32 trees, times side by side (donated
gradients, as in ``run.py``'s in-place rounds):

* ``optax``: ``optax.clip_by_global_norm`` (empty state);
* ``optaxclip``: ``optaxclip.clip_by_global_norm``, new state returned;
* ``state dropped``: the same clip with its new state discarded;
* ``state donated``: the state donated too and fed to the next call, as in
  a training step that donates its optimizer state;
* ``norm only``: the same clip returning only ``stats.norm`` of its state.

Each is reported three ways: latency (one call, waited for), throughput (50
calls queued, then waited for, per call) and dispatch (the time the call
takes to return, before the device finishes), in interleaved rounds that
each run the variants in a fresh random order (``--seed``). Also counts the kernels of
each compiled program (fusions, custom calls and other top-level
instructions of its optimized HLO) and, with ``--hlo``, writes the
optimized HLO of the one-leaf programs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optaxclip as oc

if not __package__:  # run as a script: make the benchmarks package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402

QUEUED = 50


def variants(tree: Any) -> dict[str, tuple[Callable[..., Any], Any, bool]]:
    """name -> (fn(grads, state), initial state, donates and feeds its state)."""
    ours = oc.clip_by_global_norm(1.0)
    theirs = optax.clip_by_global_norm(1.0)

    def norm_only(g, s):
        updates, state = ours.update(g, s)
        return updates, state.stats.norm

    return {
        "optax": (theirs.update, theirs.init(tree), False),
        "optaxclip": (ours.update, ours.init(tree), False),
        "state dropped": (
            lambda g, s: (ours.update(g, s)[0], None),
            ours.init(tree),
            False,
        ),
        "state donated": (ours.update, ours.init(tree), True),
        "norm only": (norm_only, ours.init(tree), False),
    }


def kernel_count(hlo: str) -> int:
    """Top-level instructions of the ENTRY computation that launch work."""
    entry = hlo[hlo.index("ENTRY") :]
    body = entry[: entry.index("\n}")]
    skip = ("parameter(", "get-tuple-element(", "tuple(", "bitcast(", "constant(")
    lines = [line for line in body.splitlines()[1:] if "=" in line]
    return sum(not any(s in line for s in skip) for line in lines)


def measure(
    tree: Any, repeats: int, seed: int = 0
) -> tuple[dict[str, dict[str, float]], dict]:
    raw = variants(tree)
    fns = {
        name: (jax.jit(fn, donate_argnums=(0, 1) if feeds else 0), feeds)
        for name, (fn, _, feeds) in raw.items()
    }
    plain = {name: jax.jit(fn) for name, (fn, _, _) in raw.items()}
    states = {name: v[1] for name, v in raw.items()}
    # Copies the queued (undonated) calls read: the donated ones consume theirs.
    spare = {name: jax.tree.map(jnp.copy, v[1]) for name, v in raw.items()}
    compiled = {
        name: fn.lower(tree, states[name]).compile().as_text()
        for name, (fn, _) in fns.items()
    }
    # The in-place rounds of section 1: the same buffers every call, refilled
    # with the original data untimed.
    run, prepare = harness.in_place_candidates(
        {name: fn for name, (fn, _) in fns.items()},
        states,
        tree,
        feed_state=[name for name, (_, feeds) in fns.items() if feeds],
    )

    def one(name: str, wait: bool) -> float:
        grads = harness.block(prepare[name]())
        start = time.perf_counter()
        out = run[name](grads)
        returned = time.perf_counter()
        harness.block(out)  # also after a dispatch sample: no overlap with the next
        return (time.perf_counter() if wait else returned) - start

    def queued(name: str) -> float:
        # Plain (not donated) inputs, so calls can be queued back to back.
        state = spare[name]
        harness.block(plain[name](tree, state))
        start = time.perf_counter()
        outs = [plain[name](tree, state) for _ in range(QUEUED)]
        harness.block(outs)
        return (time.perf_counter() - start) / QUEUED

    for name in fns:
        for _ in range(3):
            one(name, True)
    samples: dict[str, dict[str, list[float]]] = {
        name: {"latency": [], "dispatch": [], "throughput": []} for name in fns
    }
    for order in harness.round_orders(list(fns), repeats, seed):
        for name in order:
            samples[name]["latency"].append(one(name, True))
            samples[name]["dispatch"].append(one(name, False))
    for order in harness.round_orders(list(fns), 5, seed + 1):
        for name in order:
            samples[name]["throughput"].append(queued(name))
    result = {
        name: {k: statistics.median(v) for k, v in s.items()}
        for name, s in samples.items()
    }
    for name in fns:
        result[name]["kernels"] = kernel_count(compiled[name])
    return result, compiled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e5,1e7")
    parser.add_argument("--leaves", default="1,16")
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--json", default=None)
    parser.add_argument("--hlo", default=None, help="write one-leaf optimized HLO")
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the random order of each round"
    )
    args = parser.parse_args(argv)
    try:
        sizes = harness.int_list(args.sizes, "--sizes")
        leaf_counts = harness.int_list(args.leaves, "--leaves")
    except ValueError as e:
        parser.error(str(e))
    if args.repeats < 1:
        parser.error(f"--repeats takes a whole number >= 1, got {args.repeats}")
    info = harness.versions()
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    rows = []
    hlo_out = []
    print(
        "\n| params | leaves | impl | latency (us) | throughput (us/call) "
        "| dispatch (us) | kernels |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in sizes:
        for leaves in leaf_counts:
            tree = harness.make_tree(size, leaves, "float32")
            result, compiled = measure(tree, args.repeats, args.seed)
            for name, r in result.items():
                print(
                    f"| {size:.0e} | {leaves} | {name} | {r['latency'] * 1e6:.1f} | "
                    f"{r['throughput'] * 1e6:.1f} | {r['dispatch'] * 1e6:.1f} | "
                    f"{r['kernels']} |"
                )
                rows.append({"params": size, "leaves": leaves, "impl": name, **r})
            if leaves == 1:
                for name in ("optax", "optaxclip", "state dropped"):
                    hlo_out.append(f"#### {size:.0e} params, {name}\n{compiled[name]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": info, "rows": rows}, f, indent=1)
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write("\n\n".join(hlo_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
