"""Several JAX processes (``jax.distributed``): 2 processes of 4 CPU devices
each on localhost, one global mesh of 8 devices, CPU collectives over gloo.

The processes run ``tests/multiprocess_worker.py``, which checks, with
Explicit and with Auto mesh axes, that every scope, every rule at the global
scope, every preset and guard gives on FSDP-sharded global arrays the updates
and stats of the single-process run, that ``oc.metrics(state, host=True)``
and ``oc.stats(state)`` read them on every process, that
``oc.nonfinite_paths`` names the same tensor on both, and that an orbax
checkpoint saved by both processes restores and continues bit for bit. This
test starts them on a free port, bounds them in time, always ends them, shows
their output when one fails, and compares what the two report.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import optaxclip as oc
from tests import multiprocess_worker as worker

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = 2
# A bound for a hang, not a speed target: each worker spends about 35 s of
# CPU time (most of it compiling), so on a busy machine the wall time is a
# multiple of that.
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(workdir: Path) -> list[dict]:
    """Starts the worker processes, waits for all of them (at most
    TIMEOUT_S), and returns their reports; fails with their output if one
    exits with an error or the time runs out."""
    port = free_port()
    logs = [workdir / f"worker-{i}.log" for i in range(PROCESSES)]
    procs: list[subprocess.Popen] = []
    failure = None
    try:
        for i, log in enumerate(logs):
            with open(log, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "tests.multiprocess_worker",
                            str(i),
                            str(PROCESSES),
                            str(port),
                            str(workdir),
                        ],
                        cwd=ROOT,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
        deadline = time.monotonic() + TIMEOUT_S
        while None in (codes := [p.poll() for p in procs]):
            # One failed process leaves the others waiting in a collective:
            # stop at the first error rather than at the deadline.
            if any(code not in (None, 0) for code in codes):
                break
            if time.monotonic() > deadline:
                failure = f"timed out after {TIMEOUT_S} s"
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if failure or any(codes):
        output = "\n".join(
            f"--- worker {i} (exit {code}) ---\n{tail(log)}"
            for i, (code, log) in enumerate(zip(codes, logs, strict=True))
        )
        pytest.fail(f"{failure or 'a worker failed'}: exit codes {codes}\n{output}")
    return [
        json.loads((workdir / f"report-{i}.json").read_text()) for i in range(PROCESSES)
    ]


def tail(log: Path, chars: int = 6000) -> str:
    """The end of a worker's output, without gloo's connection messages."""
    lines = log.read_text(errors="replace").splitlines()
    return "\n".join(x for x in lines if not x.startswith("[Gloo]"))[-chars:]


def test_two_processes_match_single_process(tmp_path):
    reports = run_workers(tmp_path)
    cases = ["/".join(case) for case in worker.CASES]
    for i, report in enumerate(reports):
        assert report["process_index"] == i
        assert report["process_count"] == PROCESSES
        assert report["device_count"] == PROCESSES * worker.LOCAL_DEVICES
        assert report["cases"] == [list(case) for case in worker.CASES]
        assert set(report["modes"]) == set(worker.MESH_MODES)
        for mode, result in report["modes"].items():
            assert sorted(result["metrics"]) == sorted(cases), mode
            assert all(result["metrics"].values()), mode
            assert result["checkpoint_restored"], mode
            # Checked once the library has it; the worker says whether it did.
            has_it = hasattr(oc, "nonfinite_paths")
            assert result["nonfinite_paths_checked"] == has_it, mode
    # Every process read the same numbers on the host.
    assert reports[0]["modes"] == reports[1]["modes"]
    # Both mesh kinds give the same metrics (each also equals one device's).
    explicit, auto = (reports[0]["modes"][m]["metrics"] for m in worker.MESH_MODES)
    assert explicit.keys() == auto.keys()
    for case, values in explicit.items():
        for key, value in values.items():
            assert value == pytest.approx(auto[case][key], rel=1e-6, abs=1e-7), (
                case,
                key,
            )
