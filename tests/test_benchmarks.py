"""Tests of the benchmark suite: the quick run, the report, the flags, the harness."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
from benchmarks import (
    compile_time,
    global_norm,
    harness,
    methods,
    overhead,
    records,
    report,
    run,
    train_step,
)
from benchmarks.records import (
    OPTAX,
    OPTAXCLIP,
    QUICK,
    REF_CLIP,
    REF_COPY,
    STATE_DROPPED,
    TORCH,
    ClipRow,
    CompileRow,
    StepRow,
    TrainRow,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_env():
    env = dict(os.environ)
    # The suite's simulated devices are for the sharding tests; the
    # benchmark measures one real CPU device.
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(
        f for f in flags if "xla_force_host_platform_device_count" not in f
    )
    return env


# ---------------------------------------------------------------------------
# The quick run, end to end
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "rows.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=_bench_env(),
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return proc.stdout, json.load(f)


def _rows(data, kind):
    rows = [records.row_from_dict(r) for r in data["rows"]]
    return [r for r in rows if isinstance(r, kind)]


def test_quick_run_records_how_it_was_run(quick):
    _, data = quick
    assert data["command"] == f"python benchmarks/run.py --quick --json {_json(data)}"
    assert data["mode"] == "quick" and data["sections"] == [1, 2, 3, 4, 5]
    assert data["date"].startswith(time.strftime("%Y-", time.gmtime()))
    assert data["config"] == json.loads(json.dumps(dataclasses.asdict(QUICK)))
    for key in ("jax", "jaxlib", "optax", "python", "cpu cores"):
        assert data["versions"][key], key
    assert data["copy_gb_s"] > 0 and data["elapsed_s"] > 0


def _json(data):
    return data["command"].rsplit(" ", 1)[1]


def test_quick_run_has_every_global_norm_row(quick):
    _, data = quick
    rows = _rows(data, ClipRow)
    impls = {OPTAXCLIP, OPTAX, STATE_DROPPED, REF_CLIP, REF_COPY}
    trees = [("float32", s, n) for s in QUICK.sizes for n in QUICK.leaves]
    trees += [(d, QUICK.lowp_size, QUICK.lowp_leaves) for d in ("bfloat16", "float16")]
    for tree in trees:
        for mode in records.MODES:
            got = {
                r.impl: r
                for r in rows
                if (r.dtype, r.params, r.leaves, r.mode) == (*tree, mode)
            }
            torch = {TORCH} if mode == "donated" and harness.torch else set()
            assert set(got) == impls | torch, (tree, mode)
            for r in got.values():
                assert r.seconds > 0 and r.rounds >= QUICK.repeats
                assert r.grad_bytes == tree[1] * jnp.dtype(tree[0]).itemsize
                passes = 2 if r.impl == REF_COPY else 3
                assert r.bytes_moved == passes * r.grad_bytes
            if mode == "donated":
                for impl in (OPTAXCLIP, OPTAX):
                    assert got[impl].peak_bytes >= got[impl].grad_bytes
    assert len(rows) == sum(len(impls) * 2 + bool(harness.torch) for _ in trees)


def test_quick_run_has_every_step_and_compile_row(quick):
    _, data = quick
    steps = _rows(data, StepRow)
    assert [r.method for r in steps] == [m.label for m in methods.methods()]
    assert all(r.seconds > 0 for r in steps)
    comp = _rows(data, CompileRow)
    expected = [
        (c.method, c.with_adamw, n)
        for c in compile_time.cases(QUICK.compile_rules)
        for n in QUICK.compile_leaves
    ]
    assert [(r.method, r.with_adamw, r.leaves) for r in comp] == expected
    # The quick sizes compile well within the time limit: nothing stopped.
    assert all(r.trace_s > 0 and r.compile_s > 0 and r.peak_rss_mb > 0 for r in comp)


def _expected_params(m):
    # Embeddings, per block two layer norms, the qkv and output kernels and
    # the MLP (kernels and biases), the final layer norm and the unembedding.
    d = m.d_model
    block = 2 * d + 3 * d * d + d * d + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return m.vocab * d + m.seq_len * d + m.layers * block + 2 * d + d * m.vocab


def _np_cost(row, base):
    ratios = np.asarray(row.round_seconds) / np.asarray(base.round_seconds)
    return float(np.median(ratios)) - 1


def test_quick_run_has_every_train_step_row_and_its_table(quick):
    stdout, data = quick
    rows = [r for r in _rows(data, TrainRow) if r.library != records.GUARD]
    labels = [c.label for c in train_step.candidates()]
    assert [(r.model, r.method) for r in rows] == [
        (name, label) for name in QUICK.train_models for label in labels
    ]
    page = report.render(data)
    assert "## A whole train step (section 5)" in page
    assert f"in a fresh random order each round (seed {QUICK.seed})" in page
    for name in QUICK.train_models:
        m = train_step.MODELS[name]
        got = [r for r in rows if r.model == name]
        base = got[0]
        assert base.library == "none"
        (optax_row,) = [r for r in got if r.library == "optax"]
        for r in got:
            assert (r.layers, r.d_model, r.heads, r.vocab) == (
                m.layers, m.d_model, m.heads, m.vocab)  # fmt: skip
            assert (r.batch, r.seq_len) == (m.batch, m.seq_len)
            assert r.params == _expected_params(m)
            assert r.leaves == 5 + 10 * m.layers
            assert r.rounds == QUICK.train_rounds == len(r.round_seconds)
            assert all(t > 0 for t in r.round_seconds)
            assert r.seconds == pytest.approx(np.median(r.round_seconds))
            cells = _cells(page, f"| {name} | {r.method} |")
            assert cells[2] == f"{r.seconds * 1e3:.2f}"
            if r is base:
                assert cells[3:] == ["baseline", "", ""]
                continue
            cost = _np_cost(r, base)
            assert cells[3] == f"{100 * cost:+.1f}%"
            if r.library == "optaxclip":
                theirs = _np_cost(optax_row, base)
                assert cells[4] == f"{100 * (cost - theirs):+.1f}"
                assert cells[5] == ("yes" if cost <= theirs + 0.01 else "no")
    assert "In a whole train step" in page
    assert page.strip() in stdout


def test_quick_run_prints_the_report_of_its_rows(quick):
    stdout, data = quick
    page = report.render(data)
    assert page.strip() in stdout
    lines = page.splitlines()
    for r in _rows(data, ClipRow):
        prefix = f"| {r.dtype} | {report.format_count(r.params)} | {r.leaves} |"
        assert sum(line.startswith(prefix) for line in lines) == 2  # ratios, GB/s
    assert "nan" not in page.lower()


# ---------------------------------------------------------------------------
# The report, from a JSON made here
# ---------------------------------------------------------------------------


def _clip(impl, mode, seconds, peak=None, params=100_000_000, passes=3):
    return ClipRow(1, "float32", params, 2, mode, impl, seconds, 30, 4 * params,
                   passes * 4 * params, peak)  # fmt: skip


def _step(method, library, scope, rule, ms):
    return StepRow(2, method, library, scope, rule, 1000, 4, ms / 1e3, 21)


def _compile(method, library, scope, rule, leaves, trace, comp, adamw=True):
    return CompileRow(
        3, method, library, scope, rule, adamw, leaves, trace, comp, 500.0
    )


def _data(rows, **extra):
    return {
        "command": "python benchmarks/run.py --sections 1",
        "date": "2026-01-02T03:04:05+00:00",
        "mode": "full",
        "versions": {"jax": "0.0.1", "optax": "0.0.2", "cpu cores": 2},
        "config": {"repeats": 21},
        "copy_gb_s": 800.0,
        "rows": [records.row_to_dict(r) for r in rows],
        **extra,
    }


def _cells(page, prefix):
    (line,) = [line for line in page.splitlines() if line.startswith(prefix)]
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table_lines(page, prefix):
    return [line for line in page.splitlines() if line.startswith(prefix)]


def test_report_computes_the_global_norm_ratios_from_the_times():
    rows = [
        _clip(OPTAXCLIP, "plain", 2.0e-3),
        _clip(OPTAX, "plain", 1.6e-3),
        _clip(OPTAXCLIP, "donated", 3.0e-3, peak=8 * 10**8),
        _clip(OPTAX, "donated", 2.0e-3),
        _clip(STATE_DROPPED, "donated", 2.2e-3),
        _clip(TORCH, "donated", 6.0e-3),
        _clip(REF_CLIP, "donated", 2.4e-3),
        _clip(REF_COPY, "donated", 1.0e-3, passes=2),
    ]
    page = report.render(_data(rows))
    ratios, speeds = _table_lines(page, "| float32 | 100M | 2 |")
    cells = [c.strip() for c in ratios.strip("|").split("|")]
    # plain 2.0/1.6; donated 3/2; dropped 2.2/2; vs torch 3/6; bandwidth:
    # min(2.4, 1.5 x 1.0) / 3; peak 8e8 / 4e8 bytes; optax's peak unknown.
    assert cells[3:] == ["1.25", "1.50", "1.10", "0.50", "50%", "2.00", "n/a"]
    cells = [c.strip() for c in speeds.strip("|").split("|")]
    # GB/s: 1.2e9 bytes / 3 ms = 400; copy 8e8 / 1 ms = 800; 400 of 800.
    assert cells[3:] == ["400.0", "600.0", "200.0", "500.0", "800.0", "50%"]
    assert "copy bandwidth of 800.0 GB/s" in page
    summary = page.split("## What this means for you")[1].split("##")[0]
    assert "In short: optaxclip's global-norm clip runs 50% slower" in summary
    assert "took 1.50x the time of `optax.clip_by_global_norm`" in summary
    assert "discarded the same clip took median 1.10x" in summary


def test_report_leaves_missing_candidates_as_na():
    # torch not installed, and a run stopped before the donated rows.
    page = report.render(
        _data([_clip(OPTAXCLIP, "plain", 2e-3), _clip(OPTAX, "plain", 1e-3)])
    )
    ratios, speeds = _table_lines(page, "| float32 | 100M | 2 |")
    assert ratios.split("|")[4].strip() == "2.00"
    assert ratios.count("n/a") == 6 and speeds.count("n/a") == 6


def test_report_computes_the_step_ratios_against_bare_and_fixed():
    rows = [
        _step("bare adamw", "none", None, None, 10.0),
        _step("global", "optaxclip", "global", None, 12.0),
        _step("per-tensor", "optaxclip", "per-tensor", None, 16.0),
        _step("optax global", "optax", "global", None, 11.0),
        _step("global + p", "optaxclip", "global", "percentile", 15.0),
        _step("per-tensor + p", "optaxclip", "per-tensor", "percentile", 12.0),
    ]
    page = report.render(_data(rows))
    assert _cells(page, "| bare adamw |") == ["bare adamw", "10.00", "1.000", ""]
    assert _cells(page, "| global |")[2:] == ["1.200", ""]
    assert _cells(page, "| global + p |")[2:] == ["1.500", "1.250"]
    assert _cells(page, "| per-tensor + p |")[2:] == ["1.200", "0.750"]
    summary = page.split("## What this means for you")[1].split("##")[0]
    assert "global clip changed the step's time by +20%" in summary
    assert "optax's by +10%" in summary
    assert "1.25x the fixed threshold" in summary


def _train(model, params, method, library, round_ms):
    seconds = [ms / 1e3 for ms in round_ms]
    return TrainRow(5, model, params, 45, 4, 128, 4, 512, 8, 64, method, library,
                    float(np.median(seconds)), len(seconds), seconds)  # fmt: skip


def test_report_reads_each_clip_as_a_share_of_the_same_rounds_step():
    base = [10.0, 12.0, 11.0, 10.0, 16.0]
    rows = [
        _train("big", 4_000_000, "no clip", "none", base),
        _train("big", 4_000_000, "optax global", "optax",
               [10.5, 12.3, 11.4, 10.6, 16.5]),
        # Slower in absolute time than optax in some rounds, but each round
        # read against the same round's unclipped step.
        _train("big", 4_000_000, "ours", "optaxclip",
               [10.3, 12.6, 11.5, 10.4, 16.2]),
        _train("big", 4_000_000, "per tensor", "optaxclip",
               [11.0, 13.2, 12.1, 11.0, 17.6]),
        _train("small", 1_000_000, "no clip", "none", [2.0, 2.0, 2.2]),
        _train("small", 1_000_000, "optax global", "optax", [2.1, 2.1, 2.2]),
        _train("small", 1_000_000, "ours", "optaxclip", [2.1, 2.0, 2.3]),
    ]  # fmt: skip
    page = report.render(_data(rows))
    costs = {}
    for r in rows:
        b = next(x for x in rows if x.model == r.model and x.library == "none")
        ratios = np.asarray(r.round_seconds) / np.asarray(b.round_seconds)
        costs[(r.model, r.method)] = float(np.median(ratios)) - 1
    lines = _table_lines(page, "| big |")
    assert [c.split("|")[2].strip() for c in lines] == [
        "no clip", "optax global", "ours", "per tensor"]  # fmt: skip
    assert _cells(page, "| big | no clip |")[2:] == ["11.00", "baseline", "", ""]
    theirs = costs[("big", "optax global")]
    assert _cells(page, "| big | optax global |")[3:] == [
        f"{100 * theirs:+.1f}%", "", ""]  # fmt: skip
    ours = costs[("big", "ours")]  # median of 3%, 5%, 4.5%, 4%, 1.25%: 4%
    assert ours == pytest.approx(0.04)
    assert _cells(page, "| big | ours |")[3:] == [
        "+4.0%", f"{100 * (ours - theirs):+.1f}", "yes"]  # fmt: skip
    tensor = costs[("big", "per tensor")]  # 10% in every round
    assert tensor == pytest.approx(0.10)
    assert tensor > theirs + 0.01
    assert _cells(page, "| big | per tensor |")[3:] == [
        "+10.0%", f"{100 * (tensor - theirs):+.1f}", "no"]  # fmt: skip
    # Rounds of +5%, 0% and +4.5% against optax's +5%, +5% and 0%.
    assert _cells(page, "| small | ours |")[3:] == ["+4.5%", "-0.5", "yes"]
    # The smaller model is listed first, and each model is described.
    assert page.index("| small |") < page.index("| big |")
    assert "4 blocks of width 128 (4 heads), vocabulary 512" in page
    assert "4,000,000 parameters in 45 tensors (5 rounds)" in page
    summary = page.split("## What this means for you")[1].split("##")[0]
    assert (
        f"4M parameters: forward, backward, clip, adamw) optax's global clip "
        f"cost {100 * theirs:+.1f}% of the step and optaxclip's +4.0%"
    ) in summary
    assert "2 of 3 optaxclip steps measured added at most optax's cost + 1%" in summary
    assert "(not: per tensor on big, +10.0%)" in summary


def test_report_computes_the_compile_ratios_and_shows_stopped_rows():
    rows = [
        _compile("optax global", "optax", "global", None, 100, 1.0, 3.0),
        _compile("per-tensor", "optaxclip", "per-tensor", None, 100, 0.5, 1.5),
        _compile("global", "optaxclip", "global", None, 100, 1.0, 4.0),
        _compile("per-tensor + ema", "optaxclip", "per-tensor", "ema", 100, 2.0, 4.0),
        _compile(
            "per-tensor + ema", "optaxclip", "per-tensor", "ema", 1000, None, None
        ),
        _compile("optax global", "optax", "global", None, 100, 0.2, 0.6, adamw=False),
        _compile(
            "per-tensor", "optaxclip", "per-tensor", None, 100, 0.1, 0.1, adamw=False
        ),
    ]
    page = report.render(_data(rows))
    lines = _table_lines(page, "| per-tensor |")
    # With adamw 2 s against optax's 4 s; alone 0.2 s against 0.8 s.
    assert [c.strip() for c in lines[0].split("|")[6:8]] == ["0.50", ""]
    assert [c.strip() for c in lines[1].split("|")[6:8]] == ["0.25", ""]
    ema, stopped = _table_lines(page, "| per-tensor + ema |")
    assert [c.strip() for c in ema.split("|")[4:9]] == [
        "2.00",
        "4.00",
        "1.50",
        "3.00",
        "500",
    ]
    assert stopped.split("|")[4].strip() == "stopped"
    summary = page.split("## What this means for you")[1].split("##")[0]
    assert "At 100 tensors an adaptive per-tensor rule took 3.0x" in summary
    assert "the fixed per-tensor clip's 2.0 s to compile" in summary
    assert "global clip took 1.25x the time with optax's, at 100" in summary
    assert "1 rule(s) ran out of the time limit" in summary
    assert "The one cost to plan for is compile time" in summary


def test_report_page_names_the_command_versions_and_date(tmp_path):
    source = tmp_path / "run.json"
    source.write_text(json.dumps(_data([_clip(OPTAXCLIP, "plain", 2e-3)])))
    extra = tmp_path / "extra.md"
    extra.write_text("## Appended\n\nkept as written\n")
    notes = tmp_path / "notes.md"
    notes.write_text("A shared machine.\n")
    out = tmp_path / "page.md"
    argv = [str(source), "--out", str(out), "--notes", str(notes)]
    argv += ["--append", str(extra)]
    assert report.main(argv) == 0
    page = out.read_text()
    assert "python benchmarks/run.py --sections 1\n" in page
    assert "python benchmarks/report.py " + str(source) in page
    assert "2026-01-02T03:04:05+00:00" in page
    assert "jax 0.0.1" in page and "optax 0.0.2" in page and "cpu cores 2" in page
    assert "\nA shared machine.\n" in page
    assert page.endswith("## Appended\n\nkept as written\n")


def test_report_refuses_a_file_that_is_not_benchmark_json(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [{"section": 1, "dtype": "float32"}]}))
    with pytest.raises(SystemExit):
        report.main([str(bad)])
    err = capsys.readouterr().err
    assert str(bad) in err and "missing" in err and "seconds" in err
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "absent.json")])
    assert "absent.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Command-line flags
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--sizes", "0"),
        ("--sizes", "inf"),
        ("--sizes", "a,1"),
        ("--leaves", "1.5"),
        ("--leaves", ""),
        ("--compile-leaves", "-2"),
        ("--repeats", "0"),
        ("--row-budget", "-1"),
        ("--row-budget", "nan"),
        ("--compile-timeout", "0"),
        ("--sections", "1,6"),
        ("--seed", "-1"),
        ("--seed", "1.5"),
        ("--train-rounds", "0"),
        ("--train-models", "2M"),
        ("--train-models", ""),
    ],
)
def test_bad_flags_are_refused_naming_the_flag_and_value(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        run.main([flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and repr(value) in err


def test_flags_override_the_chosen_mode():
    _, cfg = run.parse_args(["--quick", "--sizes", "1e5,2e5", "--row-budget", "0.5"])
    assert cfg.sizes == (100_000, 200_000) and cfg.row_budget_s == 0.5
    assert cfg.leaves == QUICK.leaves and cfg.repeats == QUICK.repeats
    args, cfg = run.parse_args(["--sections", "3,1", "--compile-leaves", "7"])
    assert args.order == [3, 1] and cfg.compile_leaves == (7,)
    assert cfg.sizes == records.FULL.sizes
    argv = ["--quick", "--train-models", "1M,tiny", "--train-rounds", "3"]
    _, cfg = run.parse_args([*argv, "--seed", "7"])
    assert cfg.train_models == ("1M", "tiny") and cfg.train_rounds == 3
    assert cfg.seed == 7 and cfg.repeats == QUICK.repeats


# ---------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------


class _Clock:
    """A stand-in for the harness's ``time``: advances only when told to."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_cheap_rows_get_more_rounds_despite_a_slow_first_call(monkeypatch):
    # The first call of a jitted candidate compiles; the number of rounds a
    # row's budget allows must come from the calls after it.
    clock = _Clock()
    monkeypatch.setattr(harness, "time", clock)
    calls = []

    def candidate():
        calls.append(None)
        clock.now += 0.3 if len(calls) == 1 else 0.001

    timing = harness.time_side_by_side(
        {"c": candidate}, repeats=21, budget_s=0.2, max_rounds=400
    )
    # 0.2 s of 1 ms rounds (199 after rounding the float sum down); a
    # round estimated from the 0.3 s first call would allow none extra.
    assert timing.rounds in (199, 200), timing.rounds
    assert timing.seconds["c"] == pytest.approx(0.001)
    assert len(calls) == 2 + 1 + timing.rounds  # warm-up, estimate, rounds
    timing = harness.time_side_by_side(
        {"c": candidate}, repeats=21, budget_s=10.0, max_rounds=100
    )
    assert timing.rounds == 100
    timing = harness.time_side_by_side({"c": candidate}, repeats=21, budget_s=0.0)
    assert timing.rounds == 21


def test_prepared_arguments_are_passed_and_not_timed(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(harness, "time", clock)
    seen = []

    def prepare():
        clock.now += 1.0
        return len(seen)

    def candidate(arg):
        seen.append(arg)
        clock.now += 0.001

    timing = harness.time_side_by_side(
        {"c": candidate, "d": lambda: None}, repeats=5, prepare={"c": prepare}
    )
    assert seen == list(range(2 + 1 + 5))  # each call got its own argument
    assert timing.seconds["c"] == pytest.approx(0.001)
    assert timing.seconds["d"] == 0.0


def test_every_round_runs_each_candidate_once_in_a_fresh_order(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(harness, "time", clock)
    names = ["a", "b", "c", "d", "e"]
    calls = []

    def candidate_for(name):
        def candidate():
            calls.append(name)
            clock.now += 0.001

        return candidate

    def rounds_of(seed):
        calls.clear()
        timing = harness.time_side_by_side(
            {n: candidate_for(n) for n in names}, repeats=12, seed=seed
        )
        assert timing.rounds == 12
        timed = calls[3 * len(names) :]  # after two warm-up calls and a round
        return [timed[i : i + len(names)] for i in range(0, len(timed), len(names))]

    rounds = rounds_of(seed=0)
    assert len(rounds) == 12
    for order in rounds:
        assert sorted(order) == names  # each candidate once per round
    assert len({tuple(o) for o in rounds}) > 6  # fresh orders, not one repeated
    assert {o[0] for o in rounds} != {rounds[0][0]}  # not always the same first
    assert rounds_of(seed=0) == rounds  # a seed gives the same orders again
    assert rounds_of(seed=1) != rounds
    assert harness.round_orders(names, 12, 0) == rounds


def test_random_orders_share_a_position_bias_among_the_candidates(monkeypatch):
    # On a busy CPU a call's time depends on its place in the round: here
    # the k-th call of a round takes (1 + k) ms. Identical candidates must
    # come out alike, and each round's sample belongs to its own round.
    clock = _Clock()
    monkeypatch.setattr(harness, "time", clock)
    names = ["a", "b", "c"]
    position = [0]

    def candidate():
        clock.now += 0.001 * (1 + position[0] % len(names))
        position[0] += 1

    timing = harness.time_side_by_side(
        {n: candidate for n in names}, repeats=301, seed=3
    )
    orders = harness.round_orders(names, 301, 3)
    for name in names:
        expected = [0.001 * (1 + order.index(name)) for order in orders]
        np.testing.assert_allclose(timing.samples[name], expected)
        assert timing.seconds[name] == pytest.approx(0.002)


def test_in_place_calls_clip_the_original_data_in_the_same_buffers():
    # Every donated round must clip the original gradient (not the previous
    # round's clipped output) and reuse its buffers, as torch's restored
    # in-place clip does; the caller's tree must survive the donations.
    tree = harness.make_tree(3000, 3, jnp.float32)
    original = {k: np.asarray(v) for k, v in tree.items()}
    expected = global_norm.reference_clip(tree, 1.0)
    cands = global_norm.candidates(tree, donate=True)
    fns = {c.name: c.fn for c in cands}
    run_, prepare = harness.in_place_candidates(
        fns, {c.name: c.state for c in cands}, tree
    )
    for name in fns:
        for _ in range(3):
            grads = prepare[name]()
            for key in tree:
                np.testing.assert_array_equal(np.asarray(grads[key]), original[key])
            pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(grads)]
            updates = run_[name](grads)[0]
            assert [
                x.unsafe_buffer_pointer() for x in jax.tree.leaves(updates)
            ] == pointers, name
            want = jax.tree.map(jnp.negative, tree) if name == REF_COPY else expected
            for key in tree:
                np.testing.assert_allclose(
                    np.asarray(updates[key]), np.asarray(want[key]), rtol=1e-5
                )
    for key in tree:
        np.testing.assert_array_equal(np.asarray(tree[key]), original[key])


def test_in_place_calls_feed_a_donated_state_forward():
    # A candidate that donates its state gets the previous call's new state:
    # the step count advances, and no call reads a donated buffer.
    tree = harness.make_tree(300, 2, jnp.float32)
    tx = oc.clip_by_global_norm(1.0)
    fns = {"fed": jax.jit(tx.update, donate_argnums=(0, 1))}
    states = {"fed": tx.init(tree)}
    run_, prepare = harness.in_place_candidates(fns, states, tree, feed_state=["fed"])
    for step in range(1, 4):
        run_["fed"](prepare["fed"]())
        (stats,) = oc.stats(states["fed"])
        assert int(stats.count) == step


def test_reference_clip_matches_an_independent_numpy_clip():
    tree = harness.make_tree(1000, 4, jnp.float32)
    leaves = [np.asarray(x, np.float64) for x in tree.values()]
    norm = np.sqrt(sum(np.sum(x**2) for x in leaves))
    ref = global_norm.reference_clip(tree, 1.0)
    for x, key in zip(leaves, tree, strict=True):
        np.testing.assert_allclose(np.asarray(ref[key]), x / norm, rtol=1e-5)


def test_split_sizes_cover_the_total_evenly():
    sizes = harness.split_sizes(1_000_003, 16)
    assert sum(sizes) == 1_000_003 and len(sizes) == 16
    assert max(sizes) - min(sizes) <= 1


def test_torch_gradients_follow_jax_to_the_gpu(monkeypatch):
    monkeypatch.setattr(harness.jax, "default_backend", lambda: "cpu")
    assert harness.torch_device() == "cpu"
    if harness.torch is not None:
        monkeypatch.setattr(harness.jax, "default_backend", lambda: "gpu")
        monkeypatch.setattr(harness.torch.cuda, "is_available", lambda: True)
        assert harness.torch_device() == "cuda"
        monkeypatch.setattr(harness.torch.cuda, "is_available", lambda: False)
        assert harness.torch_device() == "cpu"


def test_compiles_past_the_time_limit_are_recorded_as_stopped():
    cfg = dataclasses.replace(QUICK, compile_timeout_s=0.01, compile_leaves=(2, 3))
    got = []
    compile_time.run(cfg, got.extend)
    assert [(r.method, r.with_adamw, r.leaves) for r in got] == [
        (c.method, c.with_adamw, n) for c in compile_time.cases(False) for n in (2, 3)
    ]
    assert all(r.trace_s is None and r.compile_s is None for r in got)


def test_gpu_script_runs_its_commands(tmp_path):
    # The script's own flags go through run.py's parser; BENCH_ARGS, added
    # after them, keeps the run small (every compile stopped at once).
    env = _bench_env() | {
        "PYTHON": sys.executable,
        "BENCH_ARGS": "--quick --sections 3 --compile-timeout 0.01",
    }
    subprocess.run(
        ["bash", "benchmarks/gpu.sh", str(tmp_path)],
        cwd=ROOT, env=env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    for name in ("gpu", "gpu_compile"):
        assert "exit status: 0" in (tmp_path / f"{name}.log").read_text()
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert _rows(data, CompileRow) and data["sections"] == [3]


def test_performance_page_is_the_report_of_the_committed_run(tmp_path, monkeypatch):
    # docs/performance.md is generated: rendering the committed JSON with the
    # command the page names gives the page, byte for byte.
    with open(os.path.join(ROOT, "docs", "performance.md")) as f:
        page = f.read()
    (command,) = [
        line
        for line in page.splitlines()
        if line.startswith("python benchmarks/report.py")
    ]
    argv = command.split()[2:]
    out = argv.index("--out")
    argv[out + 1] = str(tmp_path / "page.md")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(report.shlex, "join", lambda _: command)
    assert report.main(argv) == 0
    assert (tmp_path / "page.md").read_text() == page


def test_report_runs_from_the_command_line(tmp_path):
    # The page's own command, as a script: every table it renders is
    # defined before the script runs.
    out = tmp_path / "page.md"
    args = ["benchmarks/results/cpu-2core.json", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "benchmarks/report.py", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    assert "## Skipping a Muon step" in page and "spectral" in page


def test_train_step_is_a_donated_language_model_step_with_the_clip_in_front():
    model = train_step.MODELS["tiny"]
    params = train_step.init_params(model)
    tokens = train_step.tokens_for(model)
    assert tokens.shape == (model.batch, model.seq_len + 1)
    # Untrained, the next-token loss is close to that of a uniform guess.
    loss = float(train_step.loss_fn(params, tokens, model.heads))
    assert abs(loss - np.log(model.vocab)) < 0.5
    cands = {c.label: c for c in train_step.candidates()}
    results = {}
    for label in (train_step.NO_CLIP, train_step.OPTAX_GLOBAL,
                  "oc.clip_by_global_norm(1.0)"):  # fmt: skip
        c = cands[label]
        tx = c.optimizer(optax.sgd(1.0))
        held = jax.tree.map(jnp.copy, params)
        step = train_step.make_step(tx, model.heads, c.takes_loss)
        new, _, step_loss = step(held, tx.init(held), tokens)
        assert all(x.is_deleted() for x in jax.tree.leaves(held))  # donated
        assert float(step_loss) == pytest.approx(loss, rel=1e-6)
        results[c.library] = new
    # A plain SGD step moves the parameters by the gradient; a clip in front
    # scales it to a global norm of 1 (the gradient's norm is above 1 here),
    # the same for optax's clip and optaxclip's.
    grads = jax.grad(train_step.loss_fn)(params, tokens, model.heads)
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
    norm = np.sqrt(sum(np.sum(x**2) for x in g))
    assert norm > 1
    p = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
    for library, scale in (("none", 1.0), ("optax", 1 / norm), ("optaxclip", 1 / norm)):
        got = jax.tree.leaves(results[library])
        for x, old, grad in zip(got, p, g, strict=True):
            np.testing.assert_allclose(
                np.asarray(x), old - scale * grad, rtol=1e-4, atol=1e-6
            )


# ---------------------------------------------------------------------------
# benchmarks/overhead.py: every variant is timed and counted
# ---------------------------------------------------------------------------

HLO = """HloModule jit_f

%fused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(%p)
}

ENTRY %main (a: f32[4], b: s32[]) -> (f32[4], s32[]) {
  %a = f32[4]{0} parameter(0)
  %b = s32[] parameter(1)
  %c = s32[] constant(1)
  %f = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused
  %g = s32[] add(%b, %c)
  %t = (f32[4]{0}, s32[]) tuple(%f, %g)
  %e = f32[4]{0} get-tuple-element(%t), index=0
  %x = f32[4]{0} bitcast(%e)
  ROOT %r = (f32[4]{0}, s32[]) tuple(%x, %g)
}
"""


def test_kernel_count_skips_parameters_constants_and_plumbing():
    # Only the fusion and the add launch work; the nested computation's
    # instructions are not the entry's.
    assert overhead.kernel_count(HLO) == 2


def test_overhead_reports_every_variant(tmp_path):
    out, hlo = tmp_path / "ov.json", tmp_path / "ov.txt"
    overhead.main(
        ["--sizes", "1e3", "--leaves", "1,2", "--repeats", "3", "--json", str(out)]
        + ["--hlo", str(hlo)]
    )
    # The optimized HLO of the one-leaf programs, one module per variant.
    text = hlo.read_text()
    for name in ("optax", "optaxclip", "state dropped"):
        assert f"#### 1e+03 params, {name}\n" in text
    assert text.count("ENTRY") == 3
    with open(out) as f:
        rows = json.load(f)["rows"]
    names = {"optax", "optaxclip", "state dropped", "state donated", "norm only"}
    for leaves in (1, 2):
        got = {r["impl"]: r for r in rows if r["leaves"] == leaves}
        assert set(got) == names
        for r in got.values():
            assert r["latency"] > 0 and r["throughput"] > 0 and r["dispatch"] > 0
            assert r["kernels"] >= 1
        # Dropping the state outputs can only remove work.
        assert got["state dropped"]["kernels"] <= got["optaxclip"]["kernels"]
        assert got["norm only"]["kernels"] <= got["optaxclip"]["kernels"]


@pytest.mark.parametrize(
    ("flag", "value"), [("--sizes", "0"), ("--leaves", "x"), ("--repeats", "0")]
)
def test_overhead_refuses_bad_flags_naming_them(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        overhead.main([flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and value in err


def test_quick_run_has_the_muon_skip_rows_and_their_table(quick):
    """Section 5's guard around muon: the unguarded step, then every step
    applied and every step skipped, select and lazy, timed in one run."""
    _, data = quick
    rows = [r for r in _rows(data, TrainRow) if r.library == records.GUARD]
    labels = [c.label for c in train_step.skip_candidates()]
    assert [(r.model, r.method) for r in rows] == [
        (name, label) for name in QUICK.train_models for label in labels
    ]
    page = report.render(data)
    assert "## Skipping a Muon step: lazy against select (section 5)" in page
    for name in QUICK.train_models:
        got = [r for r in rows if r.model == name]
        base = got[0]
        assert base.method == train_step.MUON
        for r in got:
            assert r.rounds == QUICK.train_rounds == len(r.round_seconds)
            assert all(t > 0 for t in r.round_seconds)
            cells = _cells(page, f"| {name} | {r.method} |")
            assert cells[2] == f"{r.seconds * 1e3:.2f}"
            ratio = np.median(np.asarray(r.round_seconds) / base.round_seconds)
            assert cells[3] == f"{ratio:.2f}"
    # The guard rows are not in the clip table.
    assert not _table_lines(page, f"| {QUICK.train_models[0]} | {train_step.MUON} | ")[
        1:
    ]


def test_skip_candidates_apply_or_skip_every_step():
    model = train_step.MODELS["tiny"]
    params = train_step.init_params(model)
    tokens = train_step.tokens_for(model)
    for c in train_step.skip_candidates()[1:]:
        tx = c.optimizer(optax.adamw(1e-3))
        step = train_step.make_step(tx, model.heads)
        own = jax.tree.map(jnp.copy, params)
        with jax.numpy_dtype_promotion("standard"):  # optax's muon
            new, state, _ = step(own, tx.init(own), tokens)
        skipped = "skipped" in c.label
        assert int(state.skipped) == int(skipped), c.label
        moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new, params)
        assert any(jax.tree.leaves(moved)) != skipped, c.label
