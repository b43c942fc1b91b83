"""Smoke test of the benchmark suite: the quick mode runs and reports every row."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optaxclip as oc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPEC = importlib.util.spec_from_file_location(
    "optaxclip_benchmarks", os.path.join(ROOT, "benchmarks", "run.py")
)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "rows.json"
    env = dict(os.environ)
    # The suite's simulated devices are for the sharding tests; the
    # benchmark measures one real CPU device.
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(
        f for f in flags if "xla_force_host_platform_device_count" not in f
    )
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick"]
        + ["--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        data = json.load(f)
    return proc.stdout, data


def _rows(data, section):
    return [r for r in data["rows"] if r["section"] == section]


def test_quick_config_is_small():
    cfg = bench.QUICK
    assert cfg["repeats"] >= 20
    assert max(cfg["sizes"]) <= 1_000_000 and cfg["compile_shared_process"]
    assert bench.FULL["sizes"] == [100_000, 1_000_000, 10_000_000, 50_000_000]
    assert bench.FULL["leaves"] == [1, 16, 256]
    assert bench.FULL["compile_leaves"] == [10, 100, 1000, 5000]
    assert bench.FULL["repeats"] >= 20


def test_split_sizes_cover_the_total():
    sizes = bench.split_sizes(1_000_003, 16)
    assert sum(sizes) == 1_000_003 and len(sizes) == 16
    assert max(sizes) - min(sizes) <= 1


def test_reference_clip_matches_optaxclip():
    tree = bench.make_tree(1000, 4, jnp.float32)
    tx = oc.clip_by_global_norm(1.0)
    ours, _ = tx.update(tree, tx.init(tree))
    ref = bench.reference_clip(tree, 1.0)
    for key in tree:
        assert jnp.allclose(ours[key], ref[key], rtol=1e-5, atol=0)


def test_in_place_candidates_clip_the_original_data_in_the_same_buffers():
    # Every donated round must clip the original gradient (not the previous
    # round's clipped output) and reuse its buffers, as torch's restored
    # in-place clip does; the caller's tree must survive the donations.
    tree = bench.make_tree(3000, 3, jnp.float32)
    original = {k: np.asarray(v) for k, v in tree.items()}
    expected = bench.reference_clip(tree, 1.0)
    fns, states = bench.clip_candidates(tree, donate=True)
    candidates, prepare = bench.in_place_candidates(fns, states, tree)
    assert set(candidates) == set(prepare) == set(fns)
    for name in fns:
        for _ in range(3):
            grads = prepare[name]()
            for key in tree:
                np.testing.assert_array_equal(np.asarray(grads[key]), original[key])
            pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(grads)]
            updates = candidates[name](grads)[0]
            assert [
                x.unsafe_buffer_pointer() for x in jax.tree.leaves(updates)
            ] == pointers, name
            if name != "ref copy":
                for key in tree:
                    np.testing.assert_allclose(
                        np.asarray(updates[key]), np.asarray(expected[key]), rtol=1e-5
                    )
    for key in tree:
        np.testing.assert_array_equal(np.asarray(tree[key]), original[key])


def test_section_1_reports_every_row(report):
    _, data = report
    cfg = data["config"]
    rows = _rows(data, 1)
    impls = ["optaxclip", "optax", bench.UPDATES_ONLY, "ref measure+scale", "ref copy"]
    for size in cfg["sizes"]:
        for leaves in cfg["leaves"]:
            for mode in ("plain", "donated"):
                got = {
                    r["impl"]
                    for r in rows
                    if (r["params"], r["leaves"], r["mode"]) == (size, leaves, mode)
                }
                expected = set(impls) | (
                    {"torch foreach"} if mode == "donated" else set()
                )
                assert got == expected, (size, leaves, mode, got)
    for r in rows:
        if r["impl"] == "torch foreach" and r["time_s"] is None:
            continue
        assert r["time_s"] > 0 and r["gb_s"] > 0 and r["vs_optax"] > 0
        if r["impl"] in ("optaxclip", "optax") and r["mode"] == "donated":
            assert r["peak_over_input"] > 0


def test_section_2_reports_every_scope_and_rule(report):
    _, data = report
    names = {r["impl"] for r in _rows(data, 2)}
    for scope in ("value", "per-tensor", "global", "block RMS", "AGC"):
        assert any(n.startswith(scope + " (") for n in names), scope
    assert "bare adamw" in names
    for rule in ("percentile", "zscore", "ema", "quantile"):
        if hasattr(oc.rules, rule):
            assert f"global + rules.{rule}" in names
            assert f"per-tensor + rules.{rule}" in names
    assert all(r["vs_bare"] > 0 for r in _rows(data, 2))


def test_section_3_reports_every_compile(report):
    stdout, data = report
    rows = _rows(data, 3)
    for impl in bench.COMPILE_IMPLS:
        for n in data["config"]["compile_leaves"]:
            matches = [r for r in rows if (r["impl"], r["leaves"]) == (impl, n)]
            assert len(matches) == 1, (impl, n)
            # The quick sizes compile well within the time limit.
            assert matches[0]["compile_s"] > 0 and matches[0]["peak_rss_mb"] > 0


def test_section_4_reports_low_precision(report):
    stdout, data = report
    rows = _rows(data, 4)
    assert {r["dtype"] for r in rows} == {"bfloat16", "float16"}
    assert {r["impl"] for r in rows} >= {"optaxclip", "optax", "ref measure+scale"}
    assert "Total benchmark time" in stdout
    assert "Versions:" in stdout
    assert "Summary of sections 1 and 4" in stdout


def test_summary_has_a_full_line_per_size(report):
    stdout, data = report
    summary = stdout.split("Summary of sections 1 and 4")[1]
    summary = summary.split("Device copy bandwidth (jitted copy")[0]
    lines = [line for line in summary.splitlines() if line.startswith("| ")]
    header, body = lines[0], lines[1:]
    assert "state dropped" in header and "torch foreach" in header
    columns = header.count("|")
    keys = {
        (r["dtype"], r["params"], r["leaves"])
        for r in data["rows"]
        if r["section"] in (1, 4)
    }
    assert len(body) == len(keys)
    for line in body:
        assert line.count("|") == columns, line
        assert "nan" not in line.lower()


def test_device_copy_bandwidth_and_absolute_table(report):
    stdout, data = report
    assert data["copy_gb_s"] > 0
    table = stdout.split("Device copy bandwidth (jitted copy, read + write)")[1]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    header, body = lines[0], lines[1:]
    assert "optaxclip % of device copy" in header and "torch foreach GB/s" in header
    keys = {
        (r["dtype"], r["params"], r["leaves"])
        for r in data["rows"]
        if r["section"] in (1, 4)
    }
    assert len(body) == len(keys)
    rows = {
        (r["dtype"], r["params"], r["leaves"]): r
        for r in data["rows"]
        if r["section"] in (1, 4)
        and r["mode"] == "donated"
        and r["impl"] == "optaxclip"
    }
    for line in body:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == header.count("|") - 1, line
        dtype, params, leaves = cells[0], float(cells[1]), int(cells[2])
        ours = rows[(dtype, int(params), leaves)]
        # The optaxclip cell and its share of the copy bandwidth agree with
        # the row's own numbers.
        assert float(cells[3]) == pytest.approx(ours["gb_s"], abs=0.51)
        share = 100 * ours["gb_s"] / data["copy_gb_s"]
        assert float(cells[-1].rstrip("%")) == pytest.approx(share, abs=0.51)


def test_torch_gradients_follow_jax_to_the_gpu(monkeypatch):
    monkeypatch.setattr(bench.jax, "default_backend", lambda: "cpu")
    assert bench.torch_device() == "cpu"
    if bench.torch is not None:
        monkeypatch.setattr(bench.jax, "default_backend", lambda: "gpu")
        monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
        assert bench.torch_device() == "cuda"
        monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
        assert bench.torch_device() == "cpu"


@pytest.mark.parametrize(
    ("text", "expected"), [("1e5,16", [100_000, 16]), ("3", [3]), ("1,2,", [1, 2])]
)
def test_number_lists_parse(text, expected):
    assert bench._int_list(text, "--sizes") == expected


@pytest.mark.parametrize("text", ["", "a,1", "0", "1.5", "-2", "inf", "nan,1"])
def test_bad_number_lists_name_the_flag_and_value(text):
    with pytest.raises(SystemExit, match=f"--sizes .*{text!r}"):
        bench._int_list(text, "--sizes")


def test_bad_section_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--sections", "1,5"])
    assert "'1,5'" in capsys.readouterr().err


def test_gpu_script_is_valid_and_uses_existing_options():
    script = os.path.join(ROOT, "benchmarks", "gpu.sh")
    subprocess.run(["bash", "-n", script], check=True)
    with open(script) as f:
        flags = set(re.findall(r"(--[a-z][a-z-]+)", f.read()))
    with open(os.path.join(ROOT, "benchmarks", "run.py")) as f:
        source = f.read()
    assert {"--sections", "--json", "--compile-leaves", "--row-budget"} <= flags
    for flag in flags:
        assert f'"{flag}"' in source, flag


def test_cheap_rows_get_more_rounds_despite_a_slow_first_call():
    # The first call of a jitted candidate compiles; the number of rounds a
    # row's budget allows must come from the calls after it.
    calls = []

    def candidate():
        calls.append(None)
        time.sleep(0.3 if len(calls) == 1 else 0.001)

    times, rounds = bench.time_side_by_side(
        {"c": candidate}, repeats=21, budget_s=0.2, max_rounds=400
    )
    assert 60 <= rounds <= 200, rounds
    assert times["c"] < 0.01
    _, rounds = bench.time_side_by_side({"c": candidate}, repeats=21, budget_s=0.0)
    assert rounds == 21


def test_in_place_candidates_feed_a_donated_state_forward():
    # A candidate that donates its state gets the previous call's new state:
    # the step count advances, and no call reads a donated buffer.
    tree = bench.make_tree(300, 2, jnp.float32)
    tx = oc.clip_by_global_norm(1.0)
    fns = {"fed": jax.jit(tx.update, donate_argnums=(0, 1))}
    states = {"fed": tx.init(tree)}
    run, prepare = bench.in_place_candidates(fns, states, tree, feed_state=["fed"])
    for step in range(1, 4):
        run["fed"](prepare["fed"]())
        assert int(states["fed"].stats.count) == step
