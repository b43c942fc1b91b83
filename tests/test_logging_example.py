"""The TensorBoard example: every per-tensor key is in the event file, right.

The event file is read back with the protobuf definitions tensorboardX
ships (no TensorFlow); the expected per-tensor norms are computed here with
NumPy from the gradients the example saw.
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import jax
import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example():
    spec = importlib.util.spec_from_file_location(
        "tensorboard_logging", EXAMPLES / "tensorboard_logging.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the event files in ``logdir``: {tag: {step: value}}."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            # A record: uint64 length, uint32 crc, payload, uint32 crc.
            (length,) = struct.unpack("<Q", data[at : at + 8])
            payload = data[at + 12 : at + 12 + length]
            at += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_event_file_holds_every_per_tensor_norm(tmp_path):
    example = load_example()
    steps = 12
    plot = tmp_path / "tensors.png"
    # What a user runs: JAX's standard dtype promotion (the suite is strict).
    with jax.numpy_dtype_promotion("standard"):
        paths, grads, logged = example.run(
            str(tmp_path / "runs"), steps, plot=str(plot)
        )
    scalars = read_scalars(tmp_path / "runs")
    assert paths == ["l1/bias", "l1/kernel", "l2/bias", "l2/kernel"]
    for name in ["loss", "clip/norm", "clip/norm_after", "clip/clipped"]:
        assert sorted(scalars[name]) == list(range(steps))
    for step in range(steps):
        expected = [float(np.linalg.norm(g.astype(np.float64))) for g in grads[step]]
        got = [scalars[f"clip/norm/{p}"][step] for p in paths]
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        total = float(np.sqrt(np.sum(np.square(expected))))
        np.testing.assert_allclose(scalars["clip/norm"][step], total, rtol=1e-5)
        np.testing.assert_allclose(
            scalars["clip/norm_after"][step], min(total, 1.0), rtol=1e-5
        )
    assert sum(s["clip/clipped"] for s in logged) > 0  # the bound was reached
    assert plot.stat().st_size > 0


def test_example_runs_from_the_command_line(tmp_path):
    import subprocess
    import sys

    logdir = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "tensorboard_logging.py"), "--quick",
         "--logdir", str(logdir)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "wrote 20 steps" in proc.stdout
    scalars = read_scalars(logdir)
    assert sorted(scalars["clip/norm/l2/kernel"]) == list(range(20))
