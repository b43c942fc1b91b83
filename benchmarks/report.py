"""Renders a benchmark run's JSON (``run.py --json``) as a Markdown page.

    python benchmarks/report.py results.json                  # to stdout
    python benchmarks/report.py results.json --out docs/performance.md \\
        --notes conditions.md --append extra.md

Every ratio and GB/s figure is computed here from the rows' measured
seconds and bytes; the page also gives the command that produced the
JSON, its date, the library versions and what the numbers mean for a user.
Imports no JAX.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from collections.abc import Iterable, Sequence
from typing import Any

if not __package__:  # run as a script: make the benchmarks package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.records import (  # noqa: E402
    GUARD,
    OPTAX,
    OPTAXCLIP,
    PER_TENSOR_STATS,
    REF_CLIP,
    REF_COPY,
    STATE_DROPPED,
    TORCH,
    ClipRow,
    CompileRow,
    StepRow,
    TrainRow,
    row_from_dict,
)

NA = "n/a"


def render(
    data: dict[str, Any], notes: Sequence[str] = (), report_command: str | None = None
) -> str:
    """The whole page: summary, how it was measured, one table per section.

    Args:
      data: the JSON object ``run.py --json`` wrote.
      notes: paragraphs added to "How these numbers were measured".
      report_command: the command that rendered the page, to print with it.

    Returns:
      Markdown text.
    """
    rows = [row_from_dict(r) for r in data["rows"]]
    clip = [r for r in rows if isinstance(r, ClipRow)]
    step = [r for r in rows if isinstance(r, StepRow)]
    comp = [r for r in rows if isinstance(r, CompileRow)]
    train = [r for r in rows if isinstance(r, TrainRow) and r.library != GUARD]
    skips = [r for r in rows if isinstance(r, TrainRow) and r.library == GUARD]
    out = ["# Performance", ""]
    out += [
        "This page is generated from one benchmark run by `benchmarks/report.py`;",
        "rerun the commands below to regenerate it.",
        "",
        "## What this means for you",
        "",
        summary(clip, step, comp, data.get("versions", {}), train),
        "",
        "## How these numbers were measured",
        "",
    ]
    out += _measured(data, notes, report_command)
    if clip:
        out += ["", *clip_tables(clip, data.get("copy_gb_s"))]
    if step:
        out += ["", *step_table(step)]
    if train:
        out += ["", *train_table(train)]
    if skips:
        out += ["", *skip_table(skips)]
    if comp:
        out += ["", *compile_table(comp)]
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------
# Sections 1 and 4
# ---------------------------------------------------------------------------


def _clip_index(rows: Iterable[ClipRow]) -> dict[tuple, ClipRow]:
    return {(r.dtype, r.params, r.leaves, r.mode, r.impl): r for r in rows}


def _trees(rows: Iterable[ClipRow]) -> list[tuple[str, int, int]]:
    keys = {(r.dtype, r.params, r.leaves) for r in rows}
    return sorted(keys, key=lambda k: (k[0] != "float32", k[0], k[1], k[2]))


def ratio(
    index: dict[tuple, Any], key: tuple, mode: str, a: str, b: str
) -> float | None:
    """Median time of candidate ``a`` over ``b`` on one tree, if both ran."""
    ra, rb = index.get((*key, mode, a)), index.get((*key, mode, b))
    if ra is None or rb is None:
        return None
    return ra.seconds / rb.seconds


def bandwidth_share(index: dict[tuple, Any], key: tuple, mode: str) -> float | None:
    """optaxclip's speed as a share of the faster bandwidth reference.

    The reference time is the plain measure + scale, or 1.5x the copy (a
    clip moves 3x the gradient bytes, a copy 2x), whichever is faster.
    """
    ours = index.get((*key, mode, OPTAXCLIP))
    refs = [index.get((*key, mode, REF_CLIP)), index.get((*key, mode, REF_COPY))]
    if ours is None or None in refs:
        return None
    floor = min(refs[0].seconds, 1.5 * refs[1].seconds)
    return floor / ours.seconds


def gb_s(row: ClipRow | None) -> float | None:
    """Bytes read + written per second, in GB/s."""
    return None if row is None else row.bytes_moved / row.seconds / 1e9


def clip_tables(rows: Sequence[ClipRow], copy_gb_s: float | None) -> list[str]:
    """The ratio table and the absolute GB/s table of sections 1 and 4."""
    index = _clip_index(rows)
    sections = sorted({r.section for r in rows})
    names = {1: "1 (float32)", 4: "4 (bfloat16 and float16)"}
    out = [
        "## Global-norm clipping on its own",
        "",
        "Section"
        + ("s " if len(sections) > 1 else " ")
        + " and ".join(names[s] for s in sections)
        + " of the benchmark: "
        "`clip_by_global_norm(1.0)` jitted on its own, its new state returned. "
        "Each cell is a ratio of median times per call: below 1 means "
        "optaxclip is faster. *Donated* calls clip in place: before each timed "
        "call the original gradient is written back into the same buffers "
        "(untimed); torch's `clip_grad_norm_(foreach=True)`, which clips in "
        "place, is restored the same way and timed in the same rounds. "
        "*State dropped* is the same clip with its statistics discarded, which "
        "shows what recording them costs. *% of bandwidth* is optaxclip's speed "
        "against the faster of a plain jitted measure-and-scale and 1.5x a "
        "jitted copy of the same bytes. *Peak / input* is the donated "
        "program's peak memory over the gradient's size.",
        "",
        "| dtype | params | leaves | optaxclip / optax | donated: optaxclip / optax "
        "| donated, state dropped / optax | donated: optaxclip / torch "
        "| donated: % of bandwidth | peak / input: optaxclip | peak / input: optax |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in _trees(rows):
        ours = index.get((*key, "donated", OPTAXCLIP))
        theirs = index.get((*key, "donated", OPTAX))
        cells = [
            _num(ratio(index, key, "plain", OPTAXCLIP, OPTAX)),
            _num(ratio(index, key, "donated", OPTAXCLIP, OPTAX)),
            _num(ratio(index, key, "donated", STATE_DROPPED, OPTAX)),
            _num(ratio(index, key, "donated", OPTAXCLIP, TORCH)),
            _pct(bandwidth_share(index, key, "donated")),
            _num(_peak(ours)),
            _num(_peak(theirs)),
        ]
        out.append(_line([key[0], format_count(key[1]), str(key[2]), *cells]))
    impls = [OPTAXCLIP, OPTAX, TORCH, REF_CLIP, REF_COPY]
    out += [
        "",
        "**Absolute speed** of the donated calls, in GB/s of gradient bytes "
        "moved (a clip reads them twice and writes them once; the copy reads "
        "and writes once)"
        + (
            f", against the device's copy bandwidth of {copy_gb_s:.1f} GB/s "
            "(a jitted copy of one large float32 array):"
            if copy_gb_s
            else ":"
        ),
        "",
        "| dtype | params | leaves | "
        + " | ".join(impls)
        + (" | optaxclip, % of device copy |" if copy_gb_s else " |"),
        "|---|---|---|" + "---|" * (len(impls) + (1 if copy_gb_s else 0)),
    ]
    for key in _trees(rows):
        speeds = [gb_s(index.get((*key, "donated", impl))) for impl in impls]
        cells = [_num(s, 1) for s in speeds]
        if copy_gb_s:
            cells.append(_pct(None if speeds[0] is None else speeds[0] / copy_gb_s))
        out.append(_line([key[0], format_count(key[1]), str(key[2]), *cells]))
    return out


def _peak(row: ClipRow | None) -> float | None:
    if row is None or row.peak_bytes is None:
        return None
    return row.peak_bytes / row.grad_bytes


# ---------------------------------------------------------------------------
# Section 2
# ---------------------------------------------------------------------------


def _fixed(rows: Sequence[Any], row: Any, **same: Any) -> Any:
    """optaxclip's fixed-threshold row of ``row``'s scope (and ``same``)."""
    for r in rows:
        if (r.library, r.scope, r.rule) == ("optaxclip", row.scope, None) and all(
            getattr(r, k) == v for k, v in same.items()
        ):
            return r
    return None


def step_table(rows: Sequence[StepRow]) -> list[str]:
    """Section 2: each clip in front of adamw, against bare adamw."""
    bare = next((r for r in rows if r.library == "none"), None)
    first = rows[0]
    out = [
        "## Inside an adamw step (section 2)",
        "",
        f"A jitted `optax.chain(clip, optax.adamw(1e-3))` update of "
        f"{format_count(first.params)} float32 parameters in {first.leaves} "
        f"`(rows, 256)` matrices, timed side by side ({first.rounds} rounds). "
        "Adaptive rules are also compared with the fixed threshold of the "
        "same scope.",
        "",
        "| clip in front of adamw | time (ms) | vs bare adamw "
        "| vs fixed threshold, same scope |",
        "|---|---|---|---|",
    ]
    for r in rows:
        fixed = _fixed(rows, r) if r.rule else None
        out.append(
            _line(
                [
                    r.method,
                    f"{r.seconds * 1e3:.2f}",
                    _num(r.seconds / bare.seconds if bare else None, 3),
                    _num(r.seconds / fixed.seconds, 3) if fixed else "",
                ]
            )
        )
    return out


# ---------------------------------------------------------------------------
# Section 5
# ---------------------------------------------------------------------------

# A clip meets the target when it adds at most optax's cost + this share of
# the unclipped step.
TRAIN_TARGET = 0.01


def train_costs(rows: Sequence[TrainRow]) -> dict[tuple[str, str], float]:
    """Each step's cost, by (model, method): its time over the unclipped
    step's in the same round, minus 1, the median over the rounds."""
    base = {r.model: r for r in rows if r.library == "none"}
    out = {}
    for r in rows:
        b = base.get(r.model)
        if b is None or r is b:
            continue
        ratios = [t / u for t, u in zip(r.round_seconds, b.round_seconds, strict=True)]
        if ratios:
            out[(r.model, r.method)] = statistics.median(ratios) - 1
    return out


def _optax_cost(
    rows: Sequence[TrainRow], costs: dict[tuple[str, str], float], model: str
) -> float | None:
    return next(
        (
            costs.get((r.model, r.method))
            for r in rows
            if r.model == model and r.library == "optax"
        ),
        None,
    )


def _models(rows: Sequence[TrainRow]) -> list[TrainRow]:
    """One row per model, smallest first."""
    first: dict[str, TrainRow] = {}
    for r in rows:
        first.setdefault(r.model, r)
    return sorted(first.values(), key=lambda r: r.params)


def train_table(rows: Sequence[TrainRow]) -> list[str]:
    """Section 5: each clip's cost in a whole train step, against optax's."""
    costs = train_costs(rows)
    models = _models(rows)
    described = "; ".join(
        f"**{m.model}**: {m.layers} block{'s' if m.layers > 1 else ''} of width "
        f"{m.d_model} ({m.heads} heads), vocabulary {m.vocab}, batches of "
        f"{m.batch} x {m.seq_len} tokens, {m.params:,} parameters in {m.leaves} "
        f"tensors ({max(r.rounds for r in rows if r.model == m.model)} rounds)"
        for m in models
    )
    out = [
        "## A whole train step (section 5)",
        "",
        "A jitted train step of a small decoder-only transformer (token and "
        "position embeddings, pre-LN blocks of causal self-attention and a "
        "GELU MLP, a final layer norm, logits, next-token cross-entropy): "
        "forward, backward, the clip, `optax.adamw(1e-3)` and the parameter "
        "update, its parameters and optimizer state donated and fed from one "
        "step to the next. Each row is the same step with one clip in front of "
        "adamw (`oc.clip_by_norm` clips each tensor to its own norm; "
        "`oc.skip_spikes` wraps adamw and is given the loss as `value`), "
        "timed side by side with the step without a clip in interleaved "
        "rounds, in a fresh random order each round. *Cost* is the median over "
        "the rounds of the step's time over the unclipped step's in the same "
        "round, minus 1, in percent of the unclipped step; *vs optax* "
        "subtracts `optax.clip_by_global_norm`'s cost, in points of the step. "
        f"The target: each clip adds at most optax's cost + {TRAIN_TARGET:.0%} "
        f"of the step. Models: {described}.",
        "",
        "| model | step | time (ms) | cost, % of the step | vs optax (points) "
        f"| within optax + {TRAIN_TARGET:.0%} |",
        "|---|---|---|---|---|---|",
    ]
    for m in models:
        theirs = _optax_cost(rows, costs, m.model)
        for r in rows:
            if r.model != m.model:
                continue
            cost = costs.get((r.model, r.method))
            if r.library == "none":
                cells = ["baseline", "", ""]
            elif r.library == "optax" or theirs is None or cost is None:
                cells = [_signed_pct(cost), "", ""]
            else:
                within = cost <= theirs + TRAIN_TARGET
                cells = [
                    _signed_pct(cost),
                    f"{100 * (cost - theirs):+.1f}",
                    "yes" if within else "no",
                ]
            out.append(_line([m.model, r.method, f"{r.seconds * 1e3:.2f}", *cells]))
    return out


def _signed_pct(value: float | None) -> str:
    return NA if value is None else f"{100 * value:+.1f}%"


# ---------------------------------------------------------------------------
# Section 3
# ---------------------------------------------------------------------------


def _total(r: CompileRow | None) -> float | None:
    if r is None or r.trace_s is None or r.compile_s is None:
        return None
    return r.trace_s + r.compile_s


def compile_table(rows: Sequence[CompileRow]) -> list[str]:
    """Section 3: trace + compile time against the number of leaves."""

    def optax_global(r: CompileRow) -> CompileRow | None:
        for o in rows:
            if (o.library, o.scope, o.rule, o.with_adamw, o.leaves) == (
                "optax",
                "global",
                None,
                r.with_adamw,
                r.leaves,
            ):
                return o
        return None

    out = [
        "## Compile time (section 3)",
        "",
        "Trace + compile time of the jitted update, each method in a fresh "
        "process (the peak memory of that process includes JAX itself), with "
        "leaves cycling through the eight shapes of a small transformer block. "
        "*With adamw*: `chain(clip, adamw)`; otherwise the clip on its own. "
        '"stopped": the process ran out of its time limit before this row.',
        "",
        "| method | with adamw | leaves | trace (s) | compile (s) "
        "| total vs optax global | vs fixed threshold, same scope | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        adamw = "yes" if r.with_adamw else "no"
        if r.trace_s is None:
            out.append(
                _line([r.method, adamw, str(r.leaves), "stopped", "", "", "", ""])
            )
            continue
        base = _total(optax_global(r))
        fixed = _total(_fixed(rows, r, with_adamw=r.with_adamw, leaves=r.leaves))
        total = _total(r)
        out.append(
            _line(
                [
                    r.method,
                    adamw,
                    str(r.leaves),
                    f"{r.trace_s:.2f}",
                    f"{r.compile_s:.2f}",
                    _num(total / base if base else None),
                    _num(total / fixed) if r.rule and fixed else "",
                    _num(r.peak_rss_mb, 0),
                ]
            )
        )
    return out


# ---------------------------------------------------------------------------
# Summary and provenance
# ---------------------------------------------------------------------------


def summary(
    clip: Sequence[ClipRow],
    step: Sequence[StepRow],
    comp: Sequence[CompileRow],
    versions: dict[str, Any],
    train: Sequence[TrainRow] = (),
) -> str:
    """A plain-language paragraph whose every number comes from the rows."""
    groups = [_clip_summary(clip), _step_summary(step), _train_summary(train)]
    groups.append(_compile_summary(comp))
    parts = []
    machine = (
        "a CPU machine"
        if versions.get("backend") == "cpu"
        else versions.get("device", "one device")
    )
    cores = versions.get("cpu cores")
    parts.append(
        f"These figures come from one run on {machine}"
        + (f" with {cores} cores" if cores else "")
        + "; ratios of candidates measured side by side carry over to other "
        "machines better than absolute times, which depend on the hardware "
        "and its load."
    )
    lead = " ".join([*_lead(clip, comp), *parts])
    return "\n".join([lead, "", *("- " + " ".join(g) for g in groups if g)])


def _lead(clip: Sequence[ClipRow], comp: Sequence[CompileRow]) -> list[str]:
    """One sentence in plain words, chosen by the measured medians."""
    index = _clip_index(clip)
    got = [
        ratio(index, k, "donated", OPTAXCLIP, OPTAX)
        for k in _trees(clip)
        if k[0] == "float32"
    ]
    got = [g for g in got if g is not None]
    out = []
    if got:
        m = statistics.median(got)
        if abs(m - 1) <= 0.05:
            pace = "about as fast as optax's"
        else:
            pace = f"{abs(m - 1):.0%} {'slower' if m > 1 else 'faster'} than optax's"
        out.append(
            f"In short: optaxclip's global-norm clip runs {pace} (the median "
            "of the trees below) while it also records the pre-clip norm for "
            "you to log."
        )
    done = [r for r in comp if r.with_adamw and _total(r)]
    if done:
        most = max(r.leaves for r in done)
        at = {(r.library, r.scope, r.rule): _total(r) for r in done if r.leaves == most}
        fixed = at.get(("optaxclip", "per-tensor", None))
        worst = max(
            (
                t
                for (lib, scope, rule), t in at.items()
                if scope == "per-tensor" and rule
            ),
            default=None,
        )
        if fixed and worst and worst > 2 * fixed:
            out.append(
                "The one cost to plan for is compile time: the adaptive "
                "per-tensor rules compile several times slower than a fixed "
                "per-tensor clip, which adds up on models with many parameter "
                "tensors."
            )
    return out


def _clip_summary(clip: Sequence[ClipRow]) -> list[str]:
    index = _clip_index(clip)
    f32 = [k for k in _trees(clip) if k[0] == "float32"]

    def ratios(a: str, b: str, keys: Sequence[tuple] = f32) -> list[float]:
        got = [ratio(index, k, "donated", a, b) for k in keys]
        return [r for r in got if r is not None]

    donated = ratios(OPTAXCLIP, OPTAX)
    if not donated:
        return []
    biggest = max(k[1] for k in f32)
    big = ratios(OPTAXCLIP, OPTAX, [k for k in f32 if k[1] == biggest])
    text = (
        "**Clipping on its own.** optaxclip's `clip_by_global_norm` took "
        f"{_range(donated)}x the time of `optax.clip_by_global_norm` (median "
        f"{statistics.median(donated):.2f}x over {len(donated)} float32 trees, "
        f"clipping in place), and {_range(big)}x at the largest size "
        f"measured, {format_count(biggest)} parameters."
    )
    dropped = ratios(STATE_DROPPED, OPTAX)
    if dropped and statistics.median(donated) > statistics.median(dropped):
        text += (
            " With its statistics discarded the same clip took median "
            f"{statistics.median(dropped):.2f}x: the rest is the cost of "
            "recording the pre-clip norm and the other statistics you log."
        )
    out = [text]
    vs_torch = ratios(OPTAXCLIP, TORCH)
    if vs_torch:
        out.append(
            "Against PyTorch's `clip_grad_norm_(foreach=True)` on the same "
            f"device it took {_range(vs_torch)}x torch's time (faster on "
            f"{sum(t < 1 for t in vs_torch)} of {len(vs_torch)} trees)."
        )
    return out


def _step_summary(step: Sequence[StepRow]) -> list[str]:
    def find(library: str, scope: str | None) -> StepRow | None:
        return next(
            (r for r in step if (r.library, r.scope, r.rule) == (library, scope, None)),
            None,
        )

    bare, ours = find("none", None), find("optaxclip", "global")
    theirs = find("optax", "global")
    if not (bare and ours and theirs):
        return []
    out = [
        "**In a training step** (a jitted adamw update of "
        f"{format_count(bare.params)} parameters) the global clip changed the "
        f"step's time by {_change(ours.seconds / bare.seconds)} and optax's by "
        f"{_change(theirs.seconds / bare.seconds)}."
    ]
    rules = [
        r.seconds / ours.seconds
        for r in step
        if (r.library, r.scope) == ("optaxclip", "global")
        and r.rule not in (None, PER_TENSOR_STATS)
    ]
    if rules:
        out.append(
            "An adaptive rule instead of a fixed global threshold took "
            f"{_range(rules)}x the fixed threshold's step."
        )
    spectral = [r for r in step if r.scope == "spectral"]
    if spectral:
        out.append(
            "Spectral clipping took "
            + ", ".join(
                f"{r.seconds / ours.seconds:.2f}x ({r.method})" for r in spectral
            )
            + " the global clip's step."
        )
    return out


def _train_summary(train: Sequence[TrainRow]) -> list[str]:
    costs = train_costs(train)
    models = _models(train)
    if not models:
        return []
    big = models[-1]

    def cost_of(library: str) -> float | None:
        return next(
            (
                costs.get((r.model, r.method))
                for r in train
                if r.model == big.model and r.library == library
            ),
            None,
        )

    theirs = cost_of("optax")
    ours = next(
        (
            costs.get((r.model, r.method))
            for r in train
            if (r.model, r.library) == (big.model, "optaxclip")
        ),
        None,
    )
    if theirs is None or ours is None:
        return []
    out = [
        "**In a whole train step** (a jitted, donated transformer step of "
        f"{format_count(big.params)} parameters: forward, backward, clip, "
        f"adamw) optax's global clip cost {_signed_pct(theirs)} of the step "
        f"and optaxclip's {_signed_pct(ours)}."
    ]
    missed, total = [], 0
    for m in models:
        base = _optax_cost(train, costs, m.model)
        for r in train:
            cost = costs.get((r.model, r.method))
            if r.model != m.model or r.library != "optaxclip" or cost is None:
                continue
            if base is None:
                continue
            total += 1
            if cost > base + TRAIN_TARGET:
                missed.append(f"{r.method} on {m.model}, {_signed_pct(cost)}")
    if total:
        out.append(
            f"{total - len(missed)} of {total} optaxclip steps measured added at "
            f"most optax's cost + {TRAIN_TARGET:.0%} of the step"
            + (f" (not: {'; '.join(missed)})." if missed else ".")
        )
    return out


def _compile_summary(comp: Sequence[CompileRow]) -> list[str]:
    done = [r for r in comp if r.with_adamw and _total(r)]
    by = {(r.library, r.scope, r.rule, r.leaves): _total(r) for r in done}
    counts = sorted({r.leaves for r in done})
    out = []
    vs_optax = [
        by[("optaxclip", "global", None, n)] / by[("optax", "global", None, n)]
        for n in counts
        if ("optaxclip", "global", None, n) in by and ("optax", "global", None, n) in by
    ]
    if vs_optax:
        out.append(
            "**Compile time.** Compiling an adamw step with optaxclip's global "
            f"clip took {_range(vs_optax)}x the time with optax's, at "
            f"{_range(counts, 0)} parameter tensors."
        )
    recorded = [
        (n, by[("optaxclip", "global", PER_TENSOR_STATS, n)] / base)
        for n in counts
        if ("optaxclip", "global", PER_TENSOR_STATS, n) in by
        and (base := by.get(("optaxclip", "global", None, n)))
    ]
    if recorded:
        n, ratio = recorded[-1]
        out.append(
            f"Recording each tensor's norm (`per_tensor_stats=True`) took {ratio:.2f}x "
            f"the global clip's compile time at {n} tensors."
        )
    if counts:
        most = counts[-1]
        fixed = by.get(("optaxclip", "per-tensor", None, most))
        rules = [
            t
            for (lib, scope, rule, n), t in by.items()
            if (lib, scope, n) == ("optaxclip", "per-tensor", most) and rule
        ]
        stopped = {r.method for r in comp if r.with_adamw and r.rule and not _total(r)}
        if fixed and rules:
            out.append(
                f"At {most} tensors an adaptive per-tensor rule took "
                f"{_range([t / fixed for t in rules], 1)}x the fixed per-tensor "
                f"clip's {fixed:.1f} s to compile"
                + (
                    f", and {len(stopped)} rule(s) ran out of the time limit "
                    "at a larger leaf count"
                    if stopped
                    else ""
                )
                + "."
            )
    return out


def _measured(
    data: dict[str, Any], notes: Sequence[str], report_command: str | None
) -> list[str]:
    versions = data.get("versions", {})
    shown = ["python", "jax", "jaxlib", "optax", "optaxclip", "torch", "backend"]
    shown += ["device", "cpu cores", "platform"]
    listed = ", ".join(
        f"{k} {'not installed' if versions.get(k) is None else versions[k]}"
        for k in shown
        if k in versions
    )
    cfg = data.get("config", {})
    out = [
        "The JSON was produced by",
        "",
        "```bash",
        data.get("command", "python benchmarks/run.py"),
        "```",
        "",
    ]
    if report_command:
        out += ["and this page by", "", "```bash", report_command, "```", ""]
    elapsed = data.get("elapsed_s")
    out += [
        f"on {data.get('date', 'an unrecorded date')}"
        + (f", in {elapsed / 60:.0f} minutes" if elapsed else "")
        + f". Versions: {listed}.",
        "",
        f"Configuration ({data.get('mode', 'full')} mode, with the flags above): "
        + ", ".join(f"{k} {_cfg(k, v)}" for k, v in cfg.items())
        + ".",
        "",
        "Method: the candidates of a row are warmed up (their first call "
        "compiles), then timed in interleaved rounds, one call of each per "
        "round"
        + (
            f" in a fresh random order each round (seed {cfg['seed']})"
            if "seed" in cfg
            else ""
        )
        + " with `block_until_ready` around every call, and each cell uses "
        "the median of the rounds: at least `repeats` rounds, more where a "
        "row's rounds fit in `row_budget_s` seconds. Interleaving puts load "
        "drift on every candidate alike, so ratios are steadier than times.",
    ]
    for note in notes:
        out += ["", note]
    return out


def _cfg(key: str, value: Any) -> str:
    if key.endswith("_bytes") and isinstance(value, int):
        return f"{value / 2**20:g} MiB"
    if isinstance(value, list | tuple):
        return ",".join(
            format_count(v) if isinstance(v, int) else str(v) for v in value
        )
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and value >= 10_000:
        return format_count(value)
    return str(value)


def format_count(n: int) -> str:
    """100000 -> "100k", 10000000 -> "10M", 9998336 -> "10.0M"."""
    for size, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= size and n % (size // 10) == 0:
            return f"{n / size:g}{suffix}"
    for size, suffix in ((10**9, "G"), (10**6, "M")):
        if n >= size:
            return f"{n / size:.1f}{suffix}"
    return f"{n:,}"


def _num(value: float | None, digits: int = 2) -> str:
    return NA if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return NA if value is None else f"{100 * value:.0f}%"


def _range(values: Sequence[float], digits: int = 2) -> str:
    lo, hi = min(values), max(values)
    if f"{lo:.{digits}f}" == f"{hi:.{digits}f}":
        return f"{lo:.{digits}f}"
    return f"{lo:.{digits}f}-{hi:.{digits}f}"


def _change(r: float) -> str:
    return f"{100 * (r - 1):+.0f}%"


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="a file written by benchmarks/run.py --json")
    parser.add_argument("--out", default=None, help="write here instead of stdout")
    parser.add_argument(
        "--notes",
        action="append",
        default=[],
        help="a Markdown file on the run's conditions, added to its description",
    )
    parser.add_argument(
        "--append",
        action="append",
        default=[],
        help="a Markdown file to add at the end",
    )
    args = parser.parse_args(argv)
    import json

    try:
        with open(args.json) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        parser.error(f"cannot read the benchmark JSON {args.json!r}: {e}")
    command = shlex.join(["python", "benchmarks/report.py", *argv])
    notes = []
    for name in args.notes:
        with open(name) as f:
            notes.append(f.read().strip())
    try:
        page = render(data, notes, command)
    except (KeyError, ValueError, TypeError) as e:
        parser.error(f"{args.json!r} is not a benchmarks/run.py --json file: {e}")
    for extra in args.append:
        with open(extra) as f:
            page += "\n" + f.read().rstrip() + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(page)
    else:
        sys.stdout.write(page)
    return 0


def skip_table(rows: Sequence[TrainRow]) -> list[str]:
    """Section 5, a guard around muon: lazy against select, skipped against
    applied steps, each step's time over the unguarded muon step's in the
    same round (the median over the rounds)."""
    out = [
        "## Skipping a Muon step: lazy against select (section 5)",
        "",
        "The same train step with `optax.contrib.muon(1e-3)` in place of adamw, "
        "unguarded and inside `oc.skip_spikes` with a bound that applies every "
        "step (`rule=inf`) or skips every step (`rule=0.0`), in the default "
        "select mode (the inner update always runs) and with `lazy=True` (a "
        "`lax.cond`: a skipped step runs no muon work), timed side by side in "
        "interleaved rounds. *Time* is the median step; *x muon* the median "
        "over the rounds of the step's time over the unguarded step's.",
        "",
        "| model | step | time (ms) | x muon |",
        "|---|---|---|---|",
    ]
    base = {r.model: r for r in rows if r.method.startswith("muon")}
    for r in rows:
        b = base.get(r.model)
        pairs = zip(r.round_seconds, b.round_seconds, strict=True) if b else ()
        ratios = [t / u for t, u in pairs]
        cell = f"{statistics.median(ratios):.2f}" if ratios else NA
        out.append(_line([r.model, r.method, f"{r.seconds * 1e3:.2f}", cell]))
    return out


if __name__ == "__main__":
    sys.exit(main())
