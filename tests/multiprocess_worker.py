"""One JAX process of ``tests/test_multiprocess.py`` (not a test module).

Run from the repository root, once per process::

    python -m tests.multiprocess_worker PROCESS_ID NUM_PROCESSES PORT WORKDIR

Each process has 4 CPU devices; together they form one global mesh, on which
the cases of ``tests/test_distributed.py`` (every scope with a number, every
rule at the global scope, every preset and guard) run for a few jitted steps
on FSDP-sharded gradients: with Explicit axes inside ``jax.set_mesh``, the
state built under ``jit``, then with Auto axes and ``tx.init`` outside
``jit``. Every process checks, on the parts of the arrays it holds, that the
updates and states equal those of the same steps on its first local device
alone; reads ``oc.metrics(state, host=True)`` and ``oc.stats(state)`` (all
processes, then the first alone) and checks them against the single-device
values; saves an orbax checkpoint in ``WORKDIR`` (shared by the processes),
restores it and continues bit for bit. Where the library has
``oc.nonfinite_paths``, ``check_nonfinite_paths`` checks it too. Any mismatch
raises (a non-zero exit with the traceback on stderr); on success each
process writes ``WORKDIR/report-PROCESS_ID.json`` for the test to read.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback

LOCAL_DEVICES = 4
SAVE_AFTER = 2  # steps before the checkpoint; the rest continue from it
MESH_MODES = ("explicit", "auto")
STARTED = time.monotonic()
TIMES: dict[str, list[float]] = {}


def mark(phase: str) -> None:
    """Records the wall and CPU seconds since the start at the end of a phase."""
    TIMES[phase] = [time.monotonic() - STARTED, time.process_time()]
    print(
        f"{phase}: {TIMES[phase][0]:.1f} s, cpu {TIMES[phase][1]:.1f} s",
        file=sys.stderr,
        flush=True,
    )


def set_local_devices() -> None:
    """Before JAX is imported: 4 CPU devices in this process, whatever the
    parent process asked for."""
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\S*",
        "",
        os.environ.get("XLA_FLAGS", ""),
    )
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={LOCAL_DEVICES}"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
    set_local_devices()

import jax  # noqa: E402


def initialize(process_id: int, num_processes: int, port: int) -> None:
    """Joins the processes; before any array exists (importing the test
    tables creates some)."""
    # The suite's configuration (conftest.py), so results match its own.
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    # CPU collectives across processes go through gloo (the default in the
    # JAX releases that still have the option).
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=list(range(LOCAL_DEVICES)),
        initialization_timeout=60,
    )


if __name__ == "__main__":
    initialize(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

import optaxclip as oc  # noqa: E402
from tests import test_distributed as td  # noqa: E402

# Every scope with a number, every rule at the global scope (a scalar rule
# state), every preset and guard.
CASES = td.FIXED_CASES + td.RULE_CASES["global"] + td.PRESET_CASES + td.GUARD_CASES


def main(argv: list[str]) -> None:
    process_id, num_processes, port, workdir = argv
    process_id, num_processes = int(process_id), int(num_processes)
    mark("initialize")
    assert jax.process_count() == num_processes, jax.process_count()
    assert jax.process_index() == process_id, jax.process_index()
    assert jax.local_device_count() == LOCAL_DEVICES, jax.local_devices()
    assert jax.device_count() == LOCAL_DEVICES * num_processes, jax.devices()
    report = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "cases": [list(case) for case in CASES],
        "modes": {},
        "seconds": TIMES,
    }

    # The single-process run: the same NumPy data on this process's first
    # local device, unsharded.
    with jax.default_device(jax.local_devices()[0]):
        reference = Run(CASES)
        reference.init(td.PARAMS)
        ref_history = [reference.step(grads) for grads in td.GRADS]
    mark("reference")

    for mode in MESH_MODES:
        report["modes"][mode] = check_mode(mode, ref_history, workdir)
        mark(mode)

    mark("total")
    path = os.path.join(workdir, f"report-{process_id}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    jax.distributed.shutdown()


class Run:
    """Every transform of ``cases`` stepped together by one jitted function."""

    def __init__(self, cases, **kw):
        self.txs = {case: td.make_tx(case, **kw) for case in cases}
        self._step = jax.jit(self._update)
        self.params = self.states = None

    def _update(self, grads, states, params):
        out = {c: tx.update(grads, states[c], params) for c, tx in self.txs.items()}
        return {c: v[0] for c, v in out.items()}, {c: v[1] for c, v in out.items()}

    def init(self, params, jit: bool = False):
        """``tx.init`` on the (global) parameters, outside ``jit`` as on one
        process, or under it, as multi-host code usually builds its state."""
        self.params = params

        def init(params):
            return {case: tx.init(params) for case, tx in self.txs.items()}

        self.states = jax.jit(init)(params) if jit else init(params)

    def step(self, grads):
        updates, self.states = self._step(grads, self.states, self.params)
        return updates, self.states


def global_arrays(tree: dict, shardings: dict) -> dict:
    """Global arrays over the mesh from the same NumPy data on every process;
    each process fills only the shards on its own devices."""
    out = {}
    for k, v in tree.items():
        data = np.asarray(v)
        out[k] = jax.make_array_from_callback(
            data.shape, shardings[k], lambda index, data=data: data[index]
        )
    return out


def check_mode(mode: str, ref_history, workdir: str) -> dict:
    """Every case on the global mesh, with Explicit axes entered as the
    context mesh and the state built under ``jit`` (how multi-host code
    usually runs), or with Auto axes and ``tx.init`` outside ``jit``."""
    mesh = td.mesh_1d(mode)
    specs = td.LAYOUTS["fsdp"][1]
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    assert not shardings["w"].is_fully_addressable  # split across the processes

    def context():
        return td.mesh_context(mesh, "context" if mode == "explicit" else mode)

    with context():
        run = Run(CASES)
        run.init(global_arrays(td.PARAMS, shardings), jit=mode == "explicit")
        history = []
        for step, grads in enumerate(td.GRADS):
            history.append(run.step(global_arrays(grads, shardings)))
            mark(f"{mode} step {step}")
        check_steps(mode, mesh, shardings, history, ref_history)
        mark(f"{mode} compared")
        metrics = check_host_reads(mode, history, ref_history)
        mark(f"{mode} host reads")

    # Orbax 0.11 slices shards with eager JAX operations, which JAX 0.8
    # refuses inside `jax.set_mesh`: save and restore outside the context.
    saved = {"params": run.params, "states": history[SAVE_AFTER - 1][1]}
    restored = save_and_restore(saved, os.path.join(workdir, f"ckpt-{mode}"))
    mark(f"{mode} checkpoint")
    with context():
        # The same transforms and jitted step, from the restored arrays.
        run.params, run.states = restored["params"], restored["states"]
        for step in range(SAVE_AFTER, len(td.GRADS)):
            grads = global_arrays(td.GRADS[step], shardings)
            resumed = run.step(grads)
            assert_local_shards_equal(resumed, history[step], f"resumed {step}")
        mark(f"{mode} resumed")
        checked = hasattr(oc, "nonfinite_paths")
        if checked:
            check_nonfinite_paths(run, shardings)
    return {
        "metrics": metrics,
        "checkpoint_restored": True,
        "nonfinite_paths_checked": checked,
    }


def check_steps(mode, mesh, shardings, history, ref_history) -> None:
    """Updates and states equal the single-device run on the shards this
    process holds; updates keep the gradients' sharding, states live on the
    mesh."""
    for step, ((updates, states), (u_ref, s_ref)) in enumerate(
        zip(history, ref_history, strict=True)
    ):
        for case in CASES:
            what = f"{mode} {case} step {step}"
            assert_local_shards_close(updates[case], u_ref[case], f"{what} updates")
            assert_local_shards_close(states[case], s_ref[case], f"{what} state")
            for k, leaf in updates[case].items():
                assert leaf.sharding.is_equivalent_to(shardings[k], leaf.ndim), (
                    f"{what}: leaf {k} lost its sharding: {leaf.sharding}"
                )
            td.assert_state_on_mesh(states[case], mesh, shardings, what)
    # The steps exercised clipping and the pass-through branch.
    for case in td.FIXED_CASES:
        clipped = [int(np.sum(np.asarray(s[case].stats.clipped))) for _, s in history]
        assert max(clipped) > 0 and min(clipped) == 0, (mode, case, clipped)


def check_host_reads(mode, history, ref_history) -> dict:
    """``oc.metrics(state, host=True)`` and ``oc.stats(state)`` read on this
    process what one device computes, although the state's arrays span both
    processes; returns the metrics of every case."""
    final, ref_final = history[-1][1], ref_history[-1][1]
    metrics = {}
    for case in CASES:
        got = oc.metrics(final[case], host=True)
        expected = oc.metrics(ref_final[case], host=True)
        assert list(got) == list(expected) and got, (case, got, expected)
        for key, value in got.items():
            assert type(value) is type(expected[key]), (case, key, value)
            np.testing.assert_allclose(
                value, expected[key], rtol=td.RTOL, atol=td.ATOL, err_msg=key
            )
        found, ref_found = oc.stats(final[case]), oc.stats(ref_final[case])
        assert len(found) == len(ref_found) >= 1, (case, found)
        for s, s_ref in zip(found, ref_found, strict=True):
            for name, a, e in zip(s._fields, s, s_ref, strict=True):
                np.testing.assert_allclose(
                    np.asarray(a),
                    np.asarray(e),
                    rtol=td.RTOL,
                    atol=td.ATOL,
                    err_msg=f"{mode} {case} stats.{name}",
                )
        metrics["/".join(case)] = got
    # The usual logging code reads them on the first process alone: no
    # collective is involved, so the others do not have to take part.
    if jax.process_index() == 0:
        for case in CASES:
            assert oc.metrics(final[case], host=True) == metrics["/".join(case)]
    multihost_utils.sync_global_devices(f"{mode} host reads")
    return metrics


def save_and_restore(saved, path: str):
    """Every process saves its shards of ``saved`` into one orbax checkpoint
    and restores them into arrays of the same shardings."""
    template = jax.tree.map(ocp.utils.to_shape_dtype_struct, saved)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, saved)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(path, template)
    assert_local_shards_equal(restored, saved, "restored checkpoint")
    for leaf, like in zip(
        jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True
    ):
        assert leaf.sharding.is_equivalent_to(like.sharding, leaf.ndim), leaf.sharding
    return restored


def check_nonfinite_paths(run: Run, shardings) -> None:
    """``oc.nonfinite_paths`` names, on every process, the tensor whose
    gradient had a NaN (then an infinite) entry, although one process alone
    holds that entry; the next, finite step names none."""
    for bad in (np.nan, np.inf):
        grads = {k: np.array(v) for k, v in td.GRADS[1].items()}
        grads["k"][-1, 0, 0] = bad  # on the last device: the last process's
        run.step(global_arrays(grads, shardings))
        for case in CASES:
            paths = oc.nonfinite_paths(run.states[case], td.PARAMS)
            assert paths == ["k"], (case, bad, paths)
    run.step(global_arrays(td.GRADS[0], shardings))
    for case in CASES:
        assert oc.nonfinite_paths(run.states[case], td.PARAMS) == [], case


def assert_local_shards_close(actual, expected, what: str) -> None:
    """Each array of ``actual`` (global) equals ``expected`` (one device) on
    the shards this process holds."""
    _compare(actual, expected, what, exact=False)


def assert_local_shards_equal(actual, expected, what: str) -> None:
    _compare(actual, expected, what, exact=True)


def _compare(actual, expected, what: str, exact: bool) -> None:
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert a_def == e_def, f"{what}: {a_def} != {e_def}"
    for a, e in zip(a_leaves, e_leaves, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype, (what, a, e)
        assert a.addressable_shards, what
        for shard in a.addressable_shards:
            got = np.asarray(shard.data)
            want = _local_value(e)[shard.index]
            if exact:
                np.testing.assert_array_equal(got, want, err_msg=what)
            else:
                np.testing.assert_allclose(
                    got, want, rtol=td.RTOL, atol=td.ATOL, err_msg=what
                )


def _local_value(x) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    # Another process's global array (the uninterrupted run): compare shard
    # by shard against the same devices' shards.
    return _ShardView(x)  # type: ignore[return-value]


class _ShardView:
    """Indexes a global array by the index of one of this process's shards."""

    def __init__(self, x):
        self._shards = {_key(s.index): s.data for s in x.addressable_shards}

    def __getitem__(self, index):
        return np.asarray(self._shards[_key(index)])


def _key(index) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BaseException:
        # Exit at once: a normal exit would wait for the other processes at
        # the runtime's shutdown barrier.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
