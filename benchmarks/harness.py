"""The measuring tools every section shares.

* :func:`time_side_by_side`: median seconds per call of several candidates,
  timed in interleaved rounds, each in a fresh random order
  (:func:`round_orders`), with more rounds where a row is cheap;
* :func:`in_place_candidates`: donated calls that clip the same buffers over
  and over (refilled with the original data, untimed), as torch's in-place
  clip does;
* :func:`copy_bandwidth`: the device's practical memory bandwidth;
* :func:`donated_peak_bytes` and :func:`peak_rss_mb`: peak memory of a
  compiled executable and of this process;
* test trees (:func:`make_tree`, :func:`make_matrix_tree`), the optional
  torch import, the library versions and the command-line number lists.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import optaxclip as oc

try:  # torch is optional: without it the torch rows are left out
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None
else:
    # One intra-op thread: on a small shared machine torch's spinning OpenMP
    # pool, competing with XLA's threads, is tens of times slower than this.
    torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "1")))


def block(x: Any) -> Any:
    """Waits for every array in ``x`` and returns it."""
    return jax.block_until_ready(x)


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


class Timing(NamedTuple):
    """What :func:`time_side_by_side` measured."""

    seconds: dict[str, float]  # median seconds per call, by candidate
    rounds: int  # interleaved rounds timed (one call of each per round)
    samples: dict[str, list[float]]  # by candidate: each round's seconds, in order


def round_orders(names: Sequence[str], rounds: int, seed: int = 0) -> list[list[str]]:
    """The order of the candidates in each of ``rounds`` interleaved rounds.

    Each round is a fresh random permutation of ``names``, drawn from a
    generator seeded with ``seed`` (the same seed, the same orders). On a
    small CPU machine a candidate's position in a round moves its time by
    about 10% (the caches and the clock speed the previous call leaves), so
    a fixed order would favour whichever candidate comes where.
    """
    rng = random.Random(seed)
    return [rng.sample(list(names), len(names)) for _ in range(rounds)]


def time_side_by_side(
    candidates: Mapping[str, Callable[..., Any]],
    repeats: int,
    warmup: int = 2,
    prepare: Mapping[str, Callable[[], Any]] | None = None,
    budget_s: float = 0.0,
    max_rounds: int = 400,
    seed: int = 0,
) -> Timing:
    """Median seconds per call of each candidate, timed in interleaved rounds.

    Every candidate is called ``warmup`` times (its first call compiles),
    then the rounds run: one call of each candidate per round, in a fresh
    random order each round (:func:`round_orders` with ``seed``), each call
    waited for with ``block_until_ready``, so load drift and the position in
    a round hit all alike.

    ``prepare[name]()`` (untimed) builds the argument of each call, for
    candidates that consume or modify their input (buffer donation, torch's
    in-place clip); such a candidate is called as ``fn(arg)``, the others
    as ``fn()``.

    Runs ``repeats`` rounds, or more (up to ``max_rounds``) when one round,
    timed after the warm-up, is cheap enough that ``budget_s`` seconds allow
    them: small rows get more samples, which steadies their medians on a
    noisy machine.
    """
    prepare = prepare or {}

    def call(name: str) -> float:
        fn = candidates[name]
        if name in prepare:
            arg = block(prepare[name]())
            start = time.perf_counter()
            block(fn(arg))
        else:
            start = time.perf_counter()
            block(fn())
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
    for order in round_orders(list(candidates), rounds, seed):
        for name in order:
            samples[name].append(call(name))
    return Timing(
        {n: statistics.median(s) for n, s in samples.items()}, rounds, samples
    )


# ---------------------------------------------------------------------------
# In-place (donated) calls
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, donate_argnums=0)
def refill(held: Any, tree: Any) -> Any:
    """Writes ``tree``'s data into ``held``'s buffers (donated: same memory)."""
    return jax.tree.map(
        lambda h, x: jax.lax.dynamic_update_slice(h, x, (0,) * h.ndim), held, tree
    )


def in_place_candidates(
    fns: Mapping[str, Callable[..., Any]],
    states: dict[str, Any],
    tree: Any,
    feed_state: Sequence[str] = (),
) -> tuple[dict[str, Callable[[Any], Any]], dict[str, Callable[[], Any]]]:
    """Donated calls ``fns[name](grads, state)`` on the same buffers each time.

    Each candidate keeps one copy of ``tree``. Before every (timed) donated
    call, ``prepare`` writes the original data back into that copy's
    buffers, and the call's output (which reuses the donated memory) is kept
    for the next round. A fresh buffer per call would also time the
    allocator and the first touch of new pages, which torch's in-place clip,
    restored the same way, does not pay. The candidates named in
    ``feed_state`` donate their state too: each call's new state (written
    back into ``states``) is the next call's input, as in a training step.

    Returns the candidates and their ``prepare`` functions, for
    :func:`time_side_by_side`.
    """
    held = {name: jax.tree.map(jnp.copy, tree) for name in fns}

    def prepare_for(name: str) -> Callable[[], Any]:
        def prepare() -> Any:
            held[name] = refill(held[name], tree)
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


# ---------------------------------------------------------------------------
# Bandwidth and memory
# ---------------------------------------------------------------------------


def copy_bandwidth(n_bytes: int, repeats: int, seed: int = 0) -> float:
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

    timing = time_side_by_side(
        {"fresh": lambda: copy(x), "in place": copy_in_place}, repeats, seed=seed
    )
    return 2 * x.size * 4 / min(timing.seconds.values()) / 1e9


def donated_peak_bytes(fn: Any, *args: Any) -> int | None:
    """Peak bytes of a jitted ``fn``'s executable: inputs, temps, new outputs.

    Outputs that reuse a donated input's memory are counted once. ``None``
    where the backend reports no memory analysis.
    """
    try:
        analysis = fn.lower(*args).compile().memory_analysis()
    except Exception:  # noqa: BLE001  (not every backend reports it)
        return None
    if analysis is None:
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.temp_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def peak_rss_mb() -> float:
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
    return block(tree)


def make_matrix_tree(total: int, leaves: int, seed: int = 0) -> dict[str, jax.Array]:
    """A dict of ``leaves`` float32 ``(rows, 256)`` kernels (units for AGC)."""
    cols = 256
    rows = max(total // (leaves * cols), 1)
    key = jax.random.PRNGKey(seed)
    tree = {}
    for i in range(leaves):
        key, sub = jax.random.split(key)
        tree[f"w{i:03d}"] = jax.random.normal(sub, (rows, cols), jnp.float32)
    return block(tree)


def nbytes(tree: Any) -> int:
    """Bytes held by the arrays of ``tree``."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------
# torch, versions, command line
# ---------------------------------------------------------------------------


def torch_device() -> str:
    """Where torch's gradients live: the GPU when JAX runs on one, else CPU."""
    if torch is not None and jax.default_backend() == "gpu":
        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


def torch_sync(device: str) -> None:
    """Waits for torch's queued work (CPU torch is synchronous already)."""
    if device == "cuda":
        torch.cuda.synchronize()


def versions() -> dict[str, Any]:
    """The library versions and the machine the numbers come from."""
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"),
        "optax": optax.__version__,
        "optaxclip": oc.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "torch device": torch_device() if torch is not None else None,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "cpu cores": os.cpu_count(),
        "platform": platform.platform(),
    }


def int_list(text: str, flag: str) -> list[int]:
    """``"1e5,16"`` -> ``[100000, 16]``; a clear error for anything else.

    Raises:
      ValueError: naming ``flag`` and ``text``, for an empty list or any
        entry that is not a positive whole number.
    """
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            f"{flag} takes comma-separated numbers such as 1e5,1e6, got {text!r}"
        ) from None
    if not values or any(not math.isfinite(v) or v <= 0 or v != int(v) for v in values):
        raise ValueError(f"{flag} takes positive whole numbers, got {text!r}")
    return [int(v) for v in values]
