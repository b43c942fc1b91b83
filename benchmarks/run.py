"""Speed, bandwidth and compile-time benchmarks for optaxclip.

Run from the repository root::

    python benchmarks/run.py                      # full run (make bench)
    python benchmarks/run.py --quick              # small sizes, a few minutes
    python benchmarks/run.py --json out.json      # also write every row as JSON
    python benchmarks/report.py out.json          # the JSON as Markdown tables

Every table compares implementations measured side by side in one process:
each row's candidates are warmed up, then timed in interleaved rounds (one
call of each per round, in a fresh random order each round, seeded by
``--seed``; ``block_until_ready`` around every call), and the median of the
rounds is reported: at least ``--repeats`` rounds, more (up to 400) where a
row's rounds fit in ``--row-budget`` seconds. Absolute times drift with
machine load; the ratios are what to compare across runs.

Sections (``--sections`` runs them in the order given):

1. ``clip_by_global_norm`` on its own, float32 trees of ``--sizes`` x
   ``--leaves``, against optax, torch's ``clip_grad_norm_`` (if installed)
   and two bandwidth references, plainly and donated (``global_norm.py``);
2. each scope and adaptive rule inside a jitted ``chain(clip, adamw)``
   step, against bare adamw (``adamw_step.py``);
3. trace + compile time of that step, and of the clip alone, at
   ``--compile-leaves`` leaves, one fresh process each (``compile_time.py``);
4. bfloat16 and float16 trees, as section 1 (``global_norm.py``);
5. a whole jitted, donated transformer train step (forward, backward, clip,
   adamw) of each ``--train-models`` size, with each clip and without one,
   ``--train-rounds`` rounds (``train_step.py``).

``--json`` is rewritten after each row group, so a run stopped part-way
keeps what it measured (``benchmarks/gpu.sh`` runs the suite on a GPU
machine that way). At the end the tables are printed (``report.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

if not __package__:  # run as a script: make the benchmarks package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import (  # noqa: E402
    adamw_step,
    compile_time,
    global_norm,
    harness,
    report,
    train_step,
)
from benchmarks.records import FULL, QUICK, Config, Row, row_to_dict  # noqa: E402

SECTIONS = (1, 2, 3, 4, 5)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Config]:
    """The flags and the configuration they select; bad values exit with
    a message naming the flag and the value."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, a few minutes"
    )
    parser.add_argument(
        "--sections", default="1,2,3,4,5", help="comma-separated sections to run"
    )
    parser.add_argument(
        "--repeats", default=None, help="least timed rounds per row (full: 21)"
    )
    parser.add_argument("--json", default=None, help="also write every row here")
    parser.add_argument(
        "--compile-timeout",
        default=None,
        help="seconds each section-3 process may run (default 120)",
    )
    parser.add_argument(
        "--summarize", default=None, help="print the tables of a --json file and exit"
    )
    parser.add_argument(
        "--sizes", default=None, help="section 1 sizes, e.g. 1e5,1e6 (full: 1e5-5e7)"
    )
    parser.add_argument(
        "--leaves", default=None, help="section 1 leaf counts (full: 1,16,256)"
    )
    parser.add_argument(
        "--compile-leaves",
        default=None,
        help="section 3 leaf counts (full: 10,100,1000,5000)",
    )
    parser.add_argument(
        "--row-budget",
        default=None,
        help="seconds of extra timed rounds per row (full: 3, quick: 0)",
    )
    parser.add_argument(
        "--train-models",
        default=None,
        help=f"section 5 model sizes, of {','.join(train_step.MODELS)} (full: 1M,4M)",
    )
    parser.add_argument(
        "--train-rounds", default=None, help="section 5 timed rounds (full: 21)"
    )
    parser.add_argument(
        "--seed",
        default=None,
        help="seeds the random candidate order of each round (default 0)",
    )
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    try:
        changes: dict[str, Any] = {}
        for name, flag, value in (
            ("sizes", "--sizes", args.sizes),
            ("leaves", "--leaves", args.leaves),
            ("compile_leaves", "--compile-leaves", args.compile_leaves),
        ):
            if value is not None:
                changes[name] = tuple(harness.int_list(value, flag))
        for name, flag, value in (
            ("repeats", "--repeats", args.repeats),
            ("train_rounds", "--train-rounds", args.train_rounds),
        ):
            if value is not None:
                (changes[name],) = harness.int_list(value, flag)
        if args.seed is not None:
            changes["seed"] = _seed(args.seed)
        if args.train_models is not None:
            changes["train_models"] = _models(args.train_models)
        for name, flag, value, allow_zero in (
            ("row_budget_s", "--row-budget", args.row_budget, True),
            ("compile_timeout_s", "--compile-timeout", args.compile_timeout, False),
        ):
            if value is not None:
                changes[name] = _seconds(value, flag, allow_zero)
        args.order = harness.int_list(args.sections, "--sections")
    except ValueError as e:
        parser.error(str(e))
    if not set(args.order) <= set(SECTIONS):
        parser.error(f"--sections takes 1, 2, 3, 4 and 5, got {args.sections!r}")
    return args, dataclasses.replace(cfg, **changes)


def _seconds(text: str, flag: str, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        kind = "a number of seconds >= 0" if allow_zero else "a number of seconds > 0"
        raise ValueError(f"{flag} takes {kind}, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"--seed takes a whole number >= 0, got {text!r}")
    return value


def _models(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in train_step.MODELS]
    if not names or unknown:
        raise ValueError(
            f"--train-models takes model sizes of {','.join(train_step.MODELS)}, "
            f"e.g. 1M,4M; got {text!r}"
        )
    return names


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, cfg = parse_args(argv)
    if args.summarize:
        with open(args.summarize) as f:
            print(report.render(json.load(f)))
        return 0

    mode = "quick" if args.quick else "full"
    print(f"# optaxclip benchmarks ({mode} mode)", flush=True)
    versions = harness.versions()
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    start = time.perf_counter()
    rows: list[Row] = []
    results: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/run.py", *argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "sections": args.order,
        "versions": versions,
        "config": dataclasses.asdict(cfg),
        "copy_gb_s": None,
        "elapsed_s": None,
        "rows": [],
    }

    def save(new_rows: Sequence[Row] = ()) -> None:
        rows.extend(new_rows)
        results["rows"] = [row_to_dict(r) for r in rows]
        results["elapsed_s"] = time.perf_counter() - start
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    for section in args.order:
        section_start = time.perf_counter()
        print(f"\n## Section {section}", flush=True)
        if section in (1, 4) and results["copy_gb_s"] is None:
            results["copy_gb_s"] = harness.copy_bandwidth(
                cfg.copy_bytes, cfg.repeats, cfg.seed
            )
            print(f"  device copy bandwidth: {results['copy_gb_s']:.1f} GB/s")
        if section == 1:
            global_norm.section_1(cfg, save)
        elif section == 2:
            adamw_step.run(cfg, save)
        elif section == 3:
            compile_time.run(cfg, save)
        elif section == 4:
            global_norm.section_4(cfg, save)
        else:
            train_step.run(cfg, save)
        save()
        print(f"  section {section}: {time.perf_counter() - section_start:.0f} s")
    print()
    print(report.render(results))
    print(f"\nTotal benchmark time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
