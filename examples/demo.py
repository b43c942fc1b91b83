"""Gradient clipping on the adding problem: an LSTM whose gradients explode.

The adding problem (Hochreiter & Schmidhuber 1997), one of the tasks on which
Pascanu, Mikolov & Bengio (2013, arXiv:1211.5063) introduced gradient-norm
clipping: every input sequence has ``T`` = 30 steps of two channels, a random
number in [0, 1] and a marker that is 1 at exactly two steps (one in each
half); the target is the sum of the two marked numbers. Predicting the mean
scores a mean squared error of 1/6 (about 0.167); a run counts as *solved*
when its final test MSE is below 0.01.

An LSTM with 32 units (Flax nnx) is trained with SGD with momentum 0.9 and a
cosine-decayed learning rate (batch 32, 800 steps, test MSE on 512 held-out
sequences every 50 steps), once per method, seed and peak learning rate. A
seed fixes the initialisation and the batches, so every method sees the same
starting point and data. At a high peak rate the gradient norm explodes in
the first steps; the question is which clipping methods turn that into a
solved run.

Why an LSTM: in the measurements that chose this configuration, a vanilla
tanh RNN (the model of Pascanu et al.) did not learn this task within a few
CPU minutes at any learning rate tried, so it cannot show what clipping
changes. The LSTM learns it in a few hundred steps when its first steps do
not blow up. What the runs show is in ``docs/demo.md``.

Every run trains inside one jitted ``lax.scan`` over the steps, and all the
(seed, learning rate) runs of a method are one compiled program, split over
the CPU cores with ``shard_map``. On each core the runs train one after
another (``lax.map``): batching them with ``vmap`` turns the LSTM's small
matrix products into batched ones, which measured slower per run on CPU;
``Config.vmap_runs`` batches them instead (for an accelerator). The
pre-clip norm and the threshold are read each step with
``optaxclip.stats(opt_state)``; "no clipping" is
``clip_by_global_norm(inf, nonfinite="propagate")``, which never changes a
gradient (NaN included) and only records its norm.

The script prints one table per peak learning rate and saves one PNG: the
test MSE of the same seeds with and without clipping, the gradient norm
against the threshold, and the number of seeds solved per method and rate.

    python examples/demo.py                     # 5 seeds, rates 0.1 0.2 0.5 1.0
    python examples/demo.py --seeds 20 --lrs 0.5
    python examples/demo.py --warmup            # 100-step learning-rate warm-up
    python examples/demo.py --json runs.json    # every run as a row
    python examples/demo.py --suggest norms.png # a threshold from a recorded run
    python examples/demo.py --sweep             # fixed bounds x rates, as a grid
    python examples/demo.py --task charlm --sweep  # the grid on a character LM

``--sweep`` trains no clipping, the fixed global-norm bounds of
``--thresholds`` (0.1, 0.3, 1, 3, 10) and ``recommended`` against the peak
rates, prints the grid (seeds solved, the median step to solve, and how the
other seeds failed: NaN, stuck at the mean, or still learning) and saves it
as a heat map. ``recommended`` is ``optaxclip.trust_ratio_clip()`` after the
optimizer: each step at most 1% of the weights' norm, no threshold.

``--task charlm --sweep`` runs the same grid on a second task: a character
language model (GRU, 64 units, batch 16 x 32 characters, 400 steps) on the
source of a few standard-library modules, read from this interpreter's
installation and split 90/10 into training and test text. A run is solved
when its final test loss (bits per character) beats the bigram model's on the
same text; it has stalled ("flat") when it ends no better than the unigram
model's (the character frequencies) minus 0.1 bit. Peak rates 0.5 to 10,
5 seeds; ``--quick``: 100 steps, 2 seeds, rates 0.5 and 5.

``--suggest PNG`` reuses the pre-clip norms recorded in one run: the
``global_norm`` run of the first seed at peak rate 0.5 (or at the highest
rate if 0.5 is not among ``--lrs``). It prints
``optaxclip.suggest_threshold``'s report on them and saves
``optaxclip.plot_norm_history``'s figure, with the fixed bound and the
suggestion drawn over it, to ``PNG``. It trains nothing more; it needs
``global_norm`` among ``--methods``.

``--quick`` is the test suite's smoke test: 200 steps, 2 seeds, rates 0.2
and 1.0.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optaxclip as oc

SOLVED = 0.01  # a run is solved when its final test MSE is below this
MEAN_MSE = 1 / 6  # the MSE of predicting the mean target, 1

# ---------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str
    make: Callable[[], optax.GradientTransformation]
    threshold: float | None = None  # the fixed bound; None for rules and "none"
    after: bool = False  # placed after the optimizer (it bounds the update)


def methods(
    clip_norm: float, clip_value: float, max_ratio: float = 0.01
) -> dict[str, Method]:
    """Every method of the demo, by name; adaptive ones use their paper defaults."""
    return {
        "none": Method(
            "none",
            "no clipping",
            # An infinite bound never clips; "propagate" lets NaN through as
            # plain SGD would. Only the recorded norm differs from no transform.
            lambda: oc.clip_by_global_norm(float("inf"), nonfinite="propagate"),
        ),
        "global_norm": fixed_bound(clip_norm),
        "zclip": Method("zclip", "ZClip", oc.zclip),
        "zclip_nocap": Method(
            "zclip_nocap", "ZClip, no cap", lambda: oc.zclip(max_grad_norm=None)
        ),
        "autoclip": Method("autoclip", "AutoClip (p=10)", oc.autoclip),
        "adagc": Method("adagc", "AdaGC", oc.adagc),
        "value": Method(
            "value", f"value {clip_value:g}", lambda: oc.clip_by_value(clip_value)
        ),
        # No threshold: no step moves the weights by more than 1% of their
        # norm (after the optimizer, so it bounds the step, not the gradient).
        "recommended": Method(
            "recommended",
            "recommended" if max_ratio == 0.01 else f"trust ratio {max_ratio:g}",
            lambda: oc.trust_ratio_clip(max_ratio),
            after=True,
        ),
    }


def fixed_bound(threshold: float) -> Method:
    """``clip_by_global_norm(threshold)``, the method ``global_norm``."""
    return Method(
        "global_norm",
        f"global norm {threshold:g}",
        lambda: oc.clip_by_global_norm(threshold),
        threshold=threshold,
    )


# ---------------------------------------------------------------------------
# Task and model
# ---------------------------------------------------------------------------


def adding_batch(key: jax.Array, batch: int, seq_len: int):
    """A batch of the adding problem: inputs (batch, T, 2) and targets (batch,)."""
    # One draw per batch: T values, then one uniform per marker position.
    draw = jax.random.uniform(key, (batch, seq_len + 2))
    values = draw[:, :seq_len]
    half = seq_len // 2
    # (min: a float32 uniform just below 1, times n, can round up to n)
    first = jnp.minimum(jnp.floor(draw[:, seq_len] * half), half - 1)
    rest = seq_len - half
    second = half + jnp.minimum(jnp.floor(draw[:, seq_len + 1] * rest), rest - 1)
    first, second = first.astype(jnp.int32), second.astype(jnp.int32)
    markers = jax.nn.one_hot(first, seq_len) + jax.nn.one_hot(second, seq_len)
    inputs = jnp.stack([values, markers], axis=-1)
    targets = jnp.sum(values * markers, axis=-1)
    return inputs, targets


def _forget_bias_one(hidden: int):
    # Gates are laid out [input, forget, cell, output]; a forget bias of 1
    # (Jozefowicz et al. 2015) keeps the cell state at the start.
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.zeros(shape, dtype).at[hidden : 2 * hidden].set(1.0)

    return init


class LSTM(nnx.Module):
    """One LSTM layer over the sequence, read out linearly after the last step."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = hidden
        self.inp = nnx.Linear(
            2, 4 * hidden, bias_init=_forget_bias_one(hidden), rngs=rngs
        )
        self.rec = nnx.Linear(
            hidden,
            4 * hidden,
            use_bias=False,
            kernel_init=nnx.initializers.orthogonal(),
            rngs=rngs,
        )
        self.out = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        drive = jnp.swapaxes(self.inp(inputs), 0, 1)  # (T, batch, 4 * hidden)
        kernel = self.rec.kernel[...]

        def step(carry, x):
            c, h = carry
            i, f, g, o = jnp.split(x + h @ kernel, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (c, h), None

        zeros = jnp.zeros((drive.shape[1], self.hidden), drive.dtype)
        (_, h), _ = jax.lax.scan(step, (zeros, zeros), drive)
        return self.out(h)[:, 0]


# ---------------------------------------------------------------------------
# The second task: a character language model on standard-library source
# ---------------------------------------------------------------------------

VOCAB = 128  # ASCII; other bytes are read as "?"
TEXT_MODULES = ("argparse", "dataclasses", "json.decoder", "json.encoder")


@functools.cache
def char_text() -> tuple[np.ndarray, np.ndarray]:
    """ASCII codes of a few standard-library modules: (train, test).

    The source files are read from this interpreter's installation, so nothing
    is downloaded; the last 10% of the characters are held out for the test
    loss. Which text a run saw depends on the Python version.
    """
    import importlib
    import inspect

    parts = []
    for name in TEXT_MODULES:
        source = inspect.getsourcefile(importlib.import_module(name))
        with open(str(source), "rb") as f:
            parts.append(np.frombuffer(f.read(), np.uint8))
    text = np.concatenate(parts)
    text = np.where(text < VOCAB, text, ord("?")).astype(np.int32)
    cut = int(0.9 * text.size)
    return text[:cut], text[cut:]


@functools.cache
def char_baselines() -> tuple[float, float]:
    """Test cross-entropies (bits per character) of two counting models.

    The unigram model predicts each character from the training text's
    character frequencies; the bigram model from the frequencies of the
    character that follows the previous one (both add-one smoothed over the
    128 codes). A network that ends at the unigram's loss has learned only
    the frequencies, the language model's "predicting the mean".
    """
    train, test = char_text()
    unigram = np.bincount(train, minlength=VOCAB) + 1.0
    unigram /= unigram.sum()
    pairs = np.zeros((VOCAB, VOCAB)) + 1.0
    np.add.at(pairs, (train[:-1], train[1:]), 1.0)
    pairs /= pairs.sum(axis=1, keepdims=True)
    uni = -np.mean(np.log2(unigram[test[1:]]))
    bi = -np.mean(np.log2(pairs[test[:-1], test[1:]]))
    return float(uni), float(bi)


def char_batch(key: jax.Array, cfg: Config):
    """``cfg.batch`` random windows of the training text: inputs and next chars."""
    train, _ = char_text()
    starts = jax.random.randint(key, (cfg.batch,), 0, train.size - cfg.seq_len - 1)
    index = starts[:, None] + jnp.arange(cfg.seq_len + 1)
    window = jnp.asarray(train)[index]
    return window[:, :-1], window[:, 1:]


def char_test(cfg: Config):
    """``cfg.test_size`` windows spread evenly over the held-out text."""
    _, test = char_text()
    starts = np.linspace(0, test.size - cfg.seq_len - 1, cfg.test_size).astype(int)
    window = test[starts[:, None] + np.arange(cfg.seq_len + 1)]
    return jnp.asarray(window[:, :-1]), jnp.asarray(window[:, 1:])


class CharGRU(nnx.Module):
    """Embedding, one GRU layer, and a linear read-out of the next character."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = hidden
        self.embed = nnx.Embed(VOCAB, hidden, rngs=rngs)
        self.inp = nnx.Linear(hidden, 3 * hidden, rngs=rngs)
        self.rec = nnx.Linear(
            hidden,
            3 * hidden,
            use_bias=False,
            kernel_init=nnx.initializers.orthogonal(),
            rngs=rngs,
        )
        self.out = nnx.Linear(hidden, VOCAB, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        drive = jnp.swapaxes(self.inp(self.embed(tokens)), 0, 1)  # (T, batch, 3h)
        kernel = self.rec.kernel[...]

        def step(h, x):
            # Gates laid out [reset, update, candidate] (Cho et al. 2014).
            xr, xz, xn = jnp.split(x, 3, axis=-1)
            hr, hz, hn = jnp.split(h @ kernel, 3, axis=-1)
            r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
            h = (1 - z) * jnp.tanh(xn + r * hn) + z * h
            return h, h

        zeros = jnp.zeros((drive.shape[1], self.hidden), drive.dtype)
        _, hs = jax.lax.scan(step, zeros, drive)
        return self.out(jnp.swapaxes(hs, 0, 1))  # (batch, T, VOCAB) logits


def _cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


# ---------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
    """A task of the demo: data, model, loss, and what counts as solved."""

    name: str
    title: str  # for headers and figures
    model: Callable[[Config, nnx.Rngs], nnx.Module]
    batch: Callable[[jax.Array, Config], tuple[jax.Array, jax.Array]]
    test: Callable[[Config], tuple[jax.Array, jax.Array]]
    loss: Callable[[jax.Array, jax.Array], jax.Array]
    final: str  # the --json field of the final test score
    solved: float  # solved: final test score below this
    at_mean: float  # stalled: a finite final score at or above this
    codes: dict[str, str]  # the grid's words for diverged / stalled / slow
    score: float = 1.0  # test score = score * loss


def _squared_error(prediction: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean((prediction - target) ** 2)


def _charlm_task() -> Task:
    unigram, bigram = char_baselines()
    return Task(
        name="charlm",
        title="character LM (GRU) on standard-library source",
        model=lambda cfg, rngs: CharGRU(cfg.hidden, rngs=rngs),
        batch=char_batch,
        test=char_test,
        loss=_cross_entropy,
        final="final_bpc",
        solved=bigram,
        at_mean=unigram - 0.1,
        codes={"diverged": "nan", "mean": "flat", "slow": "slow"},
        score=1 / math.log(2),  # nats to bits
    )


class _Tasks(dict):
    """The tasks by name; the character task reads its text when first asked."""

    def __missing__(self, name: str) -> Task:
        if name != "charlm":
            raise KeyError(name)
        self[name] = task = _charlm_task()
        return task


TASKS: dict[str, Task] = _Tasks(
    adding=Task(
        name="adding",
        title="adding problem",
        model=lambda cfg, rngs: LSTM(cfg.hidden, rngs=rngs),
        batch=lambda key, cfg: adding_batch(key, cfg.batch, cfg.seq_len),
        test=lambda cfg: adding_batch(
            jax.random.key(10_000), cfg.test_size, cfg.seq_len
        ),
        loss=_squared_error,
        final="final_mse",
        solved=SOLVED,
        at_mean=0.1,
        codes={"diverged": "nan", "mean": "mean", "slow": "slow"},
    )
)
TASK_NAMES = ("adding", "charlm")
# What --task charlm changes in Config when the flags leave it.
CHARLM_DEFAULTS = {
    "seq_len": 32,
    "hidden": 64,
    "batch": 16,
    "steps": 400,
    "eval_every": 25,
    "test_size": 128,
    "learning_rates": (0.5, 1.0, 2.0, 5.0, 10.0),
    "seeds": (0, 1, 2, 3, 4),
}


# ---------------------------------------------------------------------------
# Training: every (seed, learning rate) of a method in one jitted scan
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    seq_len: int = 30
    hidden: int = 32
    batch: int = 32
    steps: int = 800
    eval_every: int = 50
    momentum: float = 0.9
    learning_rates: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    warmup: int = 0
    test_size: int = 512
    vmap_runs: int = 1  # runs batched with vmap on a device; 1 is fastest on CPU
    clip_norm: float = 1.0
    clip_value: float = 0.1
    max_ratio: float = 0.01  # recommended's trust_ratio_clip(max_ratio)
    task: str = "adding"  # a key of TASKS


@dataclasses.dataclass
class Result:
    """One method's history, indexed [learning rate, seed, ...]."""

    method: Method
    test_mse: np.ndarray  # (rates, seeds, evals)
    eval_steps: np.ndarray  # (evals,)
    norm: np.ndarray  # (rates, seeds, steps): ClipStats.norm (max over tensors)
    threshold: np.ndarray  # (rates, seeds, steps): ClipStats.threshold (max)
    clipped: np.ndarray  # (rates, seeds, steps) bool
    nonfinite: np.ndarray  # (rates, seeds, steps) bool
    seconds: float


def learning_rate(peak, cfg: Config) -> optax.Schedule:
    """Cosine decay from ``peak`` to 0, after a linear warm-up if ``cfg.warmup``.

    ``peak`` may be traced (one per vmapped or mapped run): optax builds the
    schedule's shape from Python numbers, and the peak only scales it.
    """
    if cfg.warmup:
        shape = optax.warmup_cosine_decay_schedule(0.0, 1.0, cfg.warmup, cfg.steps)
    else:
        shape = optax.cosine_decay_schedule(1.0, cfg.steps)
    return lambda step: peak * shape(step)


def prepare(method: Method, cfg: Config) -> Callable[..., Result]:
    """Compiles the training of one model per (learning rate, seed) with ``method``.

    All runs of the method are one jitted program: the runs are split over
    the host's CPU devices with ``shard_map`` and, on each device, trained
    ``cfg.vmap_runs`` at a time (``lax.map`` over ``vmap``); each run is a
    ``lax.scan`` over evaluation chunks of a ``lax.scan`` over steps.

    Args:
      method: the clipping method.
      cfg: the run's configuration.

    Returns:
      ``train(progress=None) -> Result``, which runs the compiled program;
      ``progress`` is called on the host after every ``cfg.eval_every`` steps
      of a run.
    """
    n_rates, n_seeds = len(cfg.learning_rates), len(cfg.seeds)
    peaks = np.repeat(np.asarray(cfg.learning_rates, np.float32), n_seeds)
    seeds = np.tile(np.asarray(cfg.seeds, np.uint32), n_rates)
    task = TASKS[cfg.task]
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: task.model(cfg, nnx.Rngs(0))))
    n_chunks = cfg.steps // cfg.eval_every

    def optimizer(peak):
        sgd = optax.sgd(learning_rate(peak, cfg), momentum=cfg.momentum)
        if method.after:
            return optax.chain(sgd, method.make())
        return optax.chain(method.make(), sgd)

    def loss_fn(params, x, y):
        return task.loss(nnx.merge(graphdef, params)(x), y)

    def train_step(carry, step, peak, data_key):
        params, opt_state = carry
        x, y = task.batch(jax.random.fold_in(data_key, step), cfg)
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer(peak).update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        (s,) = oc.stats(opt_state)
        norm = jnp.max(s.norm)  # per-tensor methods: the largest tensor norm
        record = {
            "norm": norm,
            "threshold": jnp.max(s.threshold),
            "clipped": jnp.sum(s.clipped) > 0,
            "nonfinite": ~jnp.isfinite(norm),
        }
        return (params, opt_state), record

    progress: list[Callable[[], None]] = []

    def tick(_):
        for report in progress:
            report()

    def one_run(seed, peak):
        key = jax.random.key(seed)
        params = nnx.state(task.model(cfg, nnx.Rngs(key)))
        data_key = jax.random.fold_in(key, 1)
        test_x, test_y = task.test(cfg)

        def chunk(carry, index):
            steps = index * cfg.eval_every + jnp.arange(cfg.eval_every)
            carry, records = jax.lax.scan(
                lambda c, t: train_step(c, t, peak, data_key), carry, steps
            )
            jax.debug.callback(tick, index)
            score = task.score * loss_fn(carry[0], test_x, test_y)
            return carry, (records, score)

        carry = (params, optimizer(peak).init(params))
        _, out = jax.lax.scan(chunk, carry, jnp.arange(n_chunks))
        return out

    def local_runs(seeds, peaks):
        batch = cfg.vmap_runs if cfg.vmap_runs > 1 else None
        return jax.lax.map(lambda a: one_run(*a), (seeds, peaks), batch_size=batch)

    mesh = jax.make_mesh((_device_count(seeds.size),), ("runs",))
    sharding = jax.sharding.NamedSharding(mesh, jax.P("runs"))
    run = jax.jit(
        jax.shard_map(
            local_runs,
            mesh=mesh,
            in_specs=jax.P("runs"),
            out_specs=jax.P("runs"),
            check_vma=False,
        )
    )
    seeds, peaks = jax.device_put((seeds, peaks), sharding)
    compiled = run.lower(seeds, peaks).compile()

    def train(report: Callable[[], None] | None = None) -> Result:
        progress[:] = [] if report is None else [report]
        start = time.perf_counter()
        records, mse = jax.device_get(compiled(seeds, peaks))
        return _result(method, cfg, records, mse, time.perf_counter() - start)

    return train


def _result(method, cfg, records, mse, seconds) -> Result:
    n_rates, n_seeds = len(cfg.learning_rates), len(cfg.seeds)

    def per_step(x):  # (runs, chunks, eval_every) -> (rates, seeds, steps)
        return x.reshape(n_rates, n_seeds, cfg.steps)

    n_chunks = cfg.steps // cfg.eval_every
    return Result(
        method=method,
        test_mse=mse.reshape(n_rates, n_seeds, n_chunks),
        eval_steps=cfg.eval_every * np.arange(1, n_chunks + 1),
        norm=per_step(records["norm"]),
        threshold=per_step(records["threshold"]),
        clipped=per_step(records["clipped"]),
        nonfinite=per_step(records["nonfinite"]),
        seconds=seconds,
    )


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _device_count(runs: int) -> int:
    """The most CPU devices (at most one per core) that split ``runs`` evenly."""
    usable = min(jax.device_count(), _cores())
    return max(d for d in range(1, usable + 1) if runs % d == 0)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def run_rows(r: Result, cfg: Config) -> list[dict]:
    """Every run of one method as a dict: the fields of ``--json``."""
    task = TASKS[cfg.task]
    out = []
    for i, lr in enumerate(cfg.learning_rates):
        for j, seed in enumerate(cfg.seeds):
            curve = r.test_mse[i, j]
            final = float(curve[-1])
            below = np.flatnonzero(curve < task.solved)
            nonfinite = int(r.nonfinite[i, j].sum())
            out.append(
                {
                    "method": r.method.name,
                    "threshold": r.method.threshold,
                    "lr": lr,
                    "seed": seed,
                    task.final: final if math.isfinite(final) else None,
                    "solved": bool(final < task.solved),
                    "diverged": bool(nonfinite > 0 or not math.isfinite(final)),
                    "first_solved_step": (
                        int(r.eval_steps[below[0]]) if below.size else None
                    ),
                    "clipped_steps": int(r.clipped[i, j].sum()),
                    "nonfinite_steps": nonfinite,
                }
            )
    return out


def rows(results: list[Result], cfg: Config) -> list[dict]:
    """Every run of every method as a dict: the fields of ``--json``."""
    return [row for r in results for row in run_rows(r, cfg)]


def _mse(x: float) -> str:
    if not math.isfinite(x):
        return "nan"
    return f"{x:.4f}" if x < 100 else f"{x:.1e}"


def table(results: list[Result], cfg: Config, lr: float) -> str:
    """The summary of every method at one peak learning rate."""
    n = len(cfg.seeds)
    head = (
        f"{'method':<16} {'solved':>6}  {'final test MSE: median [min, max]':<34} "
        f"{'first <0.01':>11} {'diverged':>8} {'clipped steps':>13}"
    )
    lines = [f"peak learning rate {lr:g}", head, "-" * len(head)]
    for r in results:
        mine = [row for row in run_rows(r, cfg) if row["lr"] == lr]
        # A non-finite MSE counts as the largest value.
        finals = np.asarray(
            [math.inf if x["final_mse"] is None else x["final_mse"] for x in mine]
        )
        firsts = [x["first_solved_step"] for x in mine if x["first_solved_step"]]
        first = f"{int(np.median(firsts))}" if firsts else "-"
        spread = (
            f"{_mse(float(np.median(finals)))} "
            f"[{_mse(finals.min())}, {_mse(finals.max())}]"
        )
        lines.append(
            f"{r.method.label:<16} {sum(x['solved'] for x in mine):>2d}/{n:<3d}  "
            f"{spread:<34} {first:>11} "
            f"{sum(x['diverged'] for x in mine):>4d}/{n:<3d} "
            f"{int(np.median([x['clipped_steps'] for x in mine])):>13d}"
        )
    return "\n".join(lines)


TABLE_NOTE = (
    "solved: final test MSE < 0.01 (predicting the mean scores 0.167); "
    "first <0.01: median over the seeds that got there of the first evaluation "
    "below 0.01; diverged: a gradient or the final test MSE was NaN/Inf; "
    "clipped steps: median over seeds, of {steps}."
)


# One colour per method in every panel of the figure.
COLORS = {
    "none": "C3",
    "global_norm": "C0",
    "zclip": "C1",
    "zclip_nocap": "C4",
    "autoclip": "C8",
    "adagc": "C5",
    "value": "C7",
    "recommended": "C2",
}


def plot(results: list[Result], cfg: Config, path: str) -> float:
    """Saves the three-panel figure; returns the learning rate it shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {r.method.name: r for r in results}
    lr = 0.5 if 0.5 in cfg.learning_rates else max(cfg.learning_rates)
    i = cfg.learning_rates.index(lr)
    shown = ["none", "global_norm", "recommended"]  # panel 1
    pairs = [(by_name[n], COLORS[n]) for n in shown if n in by_name]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    top = 1.0  # where NaN is drawn
    ax = axes[0]
    for r, color in pairs:
        for j, curve in enumerate(r.test_mse[i]):
            ax.plot(
                np.concatenate([[0], r.eval_steps]),
                np.concatenate([[MEAN_MSE], np.where(np.isfinite(curve), curve, top)]),
                color=color,
                alpha=0.7,
                lw=1.3,
                label=r.method.label if j == 0 else None,
            )
    ax.axhline(MEAN_MSE, color="gray", ls=":", lw=1, label="predict the mean")
    ax.axhline(SOLVED, color="gray", ls="--", lw=1, label="solved")
    ax.set_yscale("log")
    ax.set_ylim(top=1.5 * top)
    ax.set_xlabel("step")
    ax.set_ylabel("test MSE (NaN drawn at 1, above cut off)")
    ax.set_title(f"1. Test MSE, {len(cfg.seeds)} seeds, peak lr {lr:g}")
    ax.legend(fontsize=8, loc="lower left")

    ax = axes[1]
    # The gradient norm: recommended's stats hold the step's ratio instead.
    for r, color in [(r, c) for r, c in pairs if r.method.name != "recommended"]:
        norm = r.norm[i, 0]
        what = "gradient norm" if r.method.name == "none" else "norm before clipping"
        ax.plot(norm, color=color, lw=0.8, label=f"{r.method.label}: {what}")
        bad = np.flatnonzero(~np.isfinite(norm))
        if bad.size:
            last = bad[0] - 1
            ax.plot([last], [norm[last]], "x", color=color, ms=9)
            ax.annotate(
                f"NaN from step {bad[0]}",
                (last, norm[last]),
                xytext=(12, -4),
                textcoords="offset points",
                color=color,
                fontsize=8,
            )
        if np.all(np.isfinite(r.threshold[i, 0])):
            ax.plot(
                r.threshold[i, 0], color=color, ls="--", lw=1.2, label="its threshold"
            )
    ax.set_yscale("log")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(0, cfg.steps)
    ax.set_xlabel("step (linear to 10, then log)")
    ax.set_ylabel("global gradient norm")
    ax.set_title(f"2. Gradient norm, seed {cfg.seeds[0]}, peak lr {lr:g}")
    ax.legend(fontsize=8, loc="upper right")

    ax = axes[2]
    width = 0.8 / len(results)
    x = np.arange(len(cfg.learning_rates))
    for k, r in enumerate(results):
        solved = (r.test_mse[:, :, -1] < SOLVED).sum(axis=1)
        ax.bar(
            x + (k - (len(results) - 1) / 2) * width,
            solved,
            width,
            label=r.method.label,
            color=COLORS.get(r.method.name),
        )
    ax.set_xticks(x, [f"{v:g}" for v in cfg.learning_rates])
    ax.set_yticks(range(0, len(cfg.seeds) + 1, max(1, len(cfg.seeds) // 5)))
    ax.set_ylim(0, 1.45 * len(cfg.seeds))
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(f"seeds solved (of {len(cfg.seeds)}): final test MSE < 0.01")
    ax.set_title("3. Seeds solved per method and learning rate")
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    warm = f", {cfg.warmup}-step warm-up" if cfg.warmup else ""
    fig.suptitle(
        f"Adding problem T={cfg.seq_len}, LSTM {cfg.hidden} units, SGD momentum "
        f"{cfg.momentum:g}, cosine decay{warm}, batch {cfg.batch}, {cfg.steps} steps"
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return lr


SWEEP_THRESHOLDS = (0.1, 0.3, 1.0, 3.0, 10.0)


AT_MEAN = 0.1  # a finite run that ends above this has not left the mean (0.167)


def _cell(mine: list[dict], task: Task | None = None) -> dict:
    """One (method, rate) cell: how its seeds ended, and the median solved step.

    Every seed is one of: solved (final test MSE < 0.01), diverged (NaN),
    at the mean (finite, final MSE >= 0.1: it never left predicting the
    mean) or slow (finite, 0.01 <= final MSE < 0.1: still learning at the
    last step).
    """
    task = task or TASKS["adding"]
    final, at_mean = task.final, task.at_mean
    firsts = [x["first_solved_step"] for x in mine if x["solved"]]
    finite = [x for x in mine if not x["diverged"] and not x["solved"]]
    return {
        "solved": sum(x["solved"] for x in mine),
        "diverged": sum(x["diverged"] for x in mine),
        "mean": sum(x[final] >= at_mean for x in finite),
        "slow": sum(x[final] < at_mean for x in finite),
        "first": int(np.median(firsts)) if firsts else None,
    }


def sweep_cells(results: list[Result], cfg: Config) -> list[list[dict]]:
    """``_cell`` of every method (row) at every peak learning rate (column)."""
    return [
        [
            _cell([x for x in run_rows(r, cfg) if x["lr"] == lr], TASKS[cfg.task])
            for lr in cfg.learning_rates
        ]
        for r in results
    ]


def _sweep_label(method: Method) -> str:
    if method.name == "global_norm":
        return f"{method.threshold:g}"
    return method.label


def sweep_table(results: list[Result], cfg: Config) -> str:
    """The sweep's grid as text: one row per threshold, one column per rate."""
    labels = [_sweep_label(r.method) for r in results]
    cells = sweep_cells(results, cfg)
    return grid_text(labels, cells, cfg.learning_rates, TASKS[cfg.task].codes)


def grid_text(
    labels: list[str],
    cells: list[list[dict]],
    rates: tuple[float, ...],
    codes: dict[str, str] | None = None,
) -> str:
    """Rows of ``_cell`` dicts as text; ``--json``'s rows are enough to rebuild it."""
    codes = codes or SWEEP_CODES
    texts = []
    for row in cells:
        texts.append([])
        for c in row:
            n = c["solved"] + c["diverged"] + c["mean"] + c["slow"]
            parts = [f"{c['solved']}/{n}"]
            if c["first"] is not None:
                parts.append(f"@{c['first']}")
            for key in ("diverged", "mean", "slow"):
                if c[key]:
                    parts.append(f"{c[key]}{codes[key]}")
            texts[-1].append(" ".join(parts))
    width = 2 + max([len(t) for row in texts for t in row] + [8])
    head = f"{'threshold':<12}" + "".join(
        f"{'lr ' + format(lr, 'g'):>{width}}" for lr in rates
    )
    lines = [head, "-" * len(head)]
    for label, row in zip(labels, texts, strict=True):
        lines.append(f"{label:<12}" + "".join(f"{t:>{width}}" for t in row))
    return "\n".join(lines)


SWEEP_CODES = {"diverged": "nan", "mean": "mean", "slow": "slow"}
CHARLM_NOTE = (
    "each cell: seeds solved (final test loss below the bigram model's, in "
    "bits per character) @ the median first evaluation below it over the "
    "solved seeds, then the other seeds: Nnan: N diverged (a gradient or the "
    "final test loss was NaN/Inf); Nflat: N finite but stalled at the "
    "character frequencies (final loss above the unigram model's minus 0.1); "
    "Nslow: N still learning at the last step (in between)."
)
SWEEP_NOTE = (
    "each cell: seeds solved (final test MSE < 0.01) @ the median first "
    "evaluation below 0.01 over the solved seeds, then the other seeds: Nnan: "
    "N diverged (a gradient or the final test MSE was NaN/Inf); Nmean: N "
    "finite but stuck at the mean (final MSE >= 0.1; predicting the mean "
    "scores 0.167); Nslow: N still learning at the last step (final MSE in "
    "[0.01, 0.1))."
)


def plot_sweep(results: list[Result], cfg: Config, path: str) -> None:
    """Saves the sweep's heat maps: seeds solved, and steps to solve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sweep_cells(results, cfg)
    stalled = "flat" if cfg.task == "charlm" else "at mean"
    n = len(cfg.seeds)
    solved = np.array([[c["solved"] for c in row] for row in cells], float)
    first = np.array(
        [[np.nan if c["first"] is None else c["first"] for c in row] for row in cells]
    )
    labels = [_sweep_label(r.method) for r in results]
    rates = [f"{lr:g}" for lr in cfg.learning_rates]
    fig, axes = plt.subplots(
        1,
        2,
        figsize=(5 + 2.6 * len(rates), 1.2 + 0.55 * len(labels)),
        constrained_layout=True,
    )
    panels = [
        (solved, "RdYlGn", 0, n, f"1. Seeds solved (of {n})"),
        (first, "viridis_r", 0, cfg.steps, "2. Steps to solve (median over solved)"),
    ]
    for ax, (values, cmap, lo, hi, title) in zip(axes, panels, strict=True):
        image = ax.imshow(values, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set_xticks(range(len(rates)), rates)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("global-norm threshold")
        ax.set_title(title)
        for i, row in enumerate(cells):
            for j, c in enumerate(row):
                if ax is axes[0]:
                    text = [f"{c['solved']}/{n}"]
                    for key, word in [
                        ("diverged", "NaN"),
                        ("mean", stalled),
                        ("slow", "slow"),
                    ]:
                        if c[key]:
                            text.append(f"{c[key]} {word}")
                else:
                    text = ["-" if c["first"] is None else str(c["first"])]
                ax.text(j, i, "\n".join(text), ha="center", va="center", fontsize=8)
    if cfg.task == "charlm":
        title = (
            f"Global-norm threshold x peak learning rate, character LM (GRU "
            f"{cfg.hidden}), {cfg.steps} steps. Solved: test loss below the "
            "bigram model's. NaN: diverged; flat: finite, stalled at the "
            "character frequencies; slow: still learning at the end"
        )
    else:
        title = (
            f"Global-norm threshold x peak learning rate, adding problem "
            f"T={cfg.seq_len}, {cfg.steps} steps. NaN: diverged; at mean: finite, "
            "stuck at the mean (too large a bound, or none); slow: still learning "
            "at the end (too small a bound)"
        )
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def suggest(results: list[Result], cfg: Config, path: str) -> str:
    """The threshold report on one recorded ``global_norm`` run; saves its plot.

    The run is the first seed of ``cfg.seeds`` at peak rate 0.5, or at the
    highest rate if 0.5 is not among ``cfg.learning_rates`` (the rate of the
    demo figure's panel 2). Its pre-clip norms, recorded with
    ``optaxclip.stats`` during training, go to ``optaxclip.suggest_threshold``
    and ``optaxclip.plot_norm_history``; nothing is trained again.

    Args:
      results: the trained methods; one of them must be ``global_norm``.
      cfg: the configuration they were trained with.
      path: where to save the norm-history figure.

    Returns:
      The text printed for the run: which run it is, the report, and how many
      steps the fixed bound rescaled.
    """
    (r,) = [r for r in results if r.method.name == "global_norm"]
    lr = 0.5 if 0.5 in cfg.learning_rates else max(cfg.learning_rates)
    i = cfg.learning_rates.index(lr)
    norms = r.norm[i, 0]
    report = oc.suggest_threshold(norms)
    oc.plot_norm_history(
        norms,
        path,
        {
            f"fixed bound {cfg.clip_norm:g}": cfg.clip_norm,
            f"suggested (p{report.percentile:g})": report.threshold,
        },
    )
    above = int(np.sum(norms > cfg.clip_norm))
    return "\n".join(
        [
            f"threshold suggestion from the pre-clip norms of {r.method.label}, "
            f"seed {cfg.seeds[0]}, peak learning rate {lr:g}:",
            str(report),
            f"the fixed bound {cfg.clip_norm:g} rescaled {above} of the "
            f"{norms.size} steps",
        ]
    )


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _seeds(text: str) -> tuple[int, ...]:
    """``"3"`` means seeds 0, 1, 2; ``"4,7"`` means seeds 4 and 7."""
    try:
        if "," in text:
            seeds = tuple(int(s) for s in text.split(",") if s)
        else:
            seeds = tuple(range(int(text)))
    except ValueError:
        seeds = ()
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(
            f"expected a count >= 1 or a comma list of seeds >= 0; got {text!r}"
        )
    return seeds


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(s) for s in text.split(",") if s)
    except ValueError:
        rates = ()
    if not rates or not all(math.isfinite(r) and r > 0 for r in rates):
        raise argparse.ArgumentTypeError(
            f"expected a comma list of positive learning rates; got {text!r}"
        )
    return rates


def main(argv: list[str] | None = None) -> list[Result]:
    defaults = Config()
    available = methods(defaults.clip_norm, defaults.clip_value)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--task",
        choices=TASK_NAMES,
        default="adding",
        help="adding: the adding problem (LSTM); charlm: a character language "
        "model (GRU) on standard-library source, with --sweep only",
    )
    parser.add_argument("--seeds", type=_seeds, help="count, or a comma list")
    parser.add_argument(
        "--lrs",
        type=_rates,
        help="comma list of peak learning rates (default 0.1,0.2,0.5,1.0; "
        "charlm 0.5,1,2,5,10)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(available),
        help=f"comma-separated subset of: {', '.join(available)}",
    )
    parser.add_argument("--steps", type=int, help="default 800; charlm 400")
    parser.add_argument(
        "--warmup",
        type=int,
        nargs="?",
        const=100,
        default=0,
        help="linear learning-rate warm-up over this many steps (100 if given alone)",
    )
    parser.add_argument("--clip-norm", type=float, default=defaults.clip_norm)
    parser.add_argument("--clip-value", type=float, default=defaults.clip_value)
    parser.add_argument(
        "--max-ratio",
        type=float,
        default=defaults.max_ratio,
        help="recommended's bound on the step relative to the weights (0.01)",
    )
    parser.add_argument(
        "--out", help="where to save the PNG (default out/demo.png, out/sweep.png)"
    )
    parser.add_argument("--json", metavar="PATH", help="write every run as a row")
    parser.add_argument(
        "--suggest",
        metavar="PNG",
        help="print optaxclip.suggest_threshold's report on the recorded norms "
        "of global_norm (first seed, peak rate 0.5 or the highest) and save "
        "plot_norm_history's figure to PNG",
    )
    parser.add_argument(
        "--quick", action="store_true", help="200 steps, 2 seeds, rates 0.2,1.0"
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="fixed global-norm thresholds (--thresholds) and no clipping, "
        "against the peak rates, with recommended; prints the grid and saves "
        "its heat map (--out, default out/sweep.png)",
    )
    parser.add_argument(
        "--thresholds",
        type=_rates,
        default=SWEEP_THRESHOLDS,
        help="comma list of the fixed bounds of --sweep (default 0.1,0.3,1,3,10)",
    )
    args = parser.parse_args(argv)

    if args.task == "charlm" and not args.sweep:
        parser.error("--task charlm runs the grid only; add --sweep")
    cfg = Config(
        warmup=args.warmup,
        clip_norm=args.clip_norm,
        clip_value=args.clip_value,
        max_ratio=args.max_ratio,
        task=args.task,
    )
    if args.task == "charlm":
        cfg = dataclasses.replace(cfg, **CHARLM_DEFAULTS)
    given = {"steps": args.steps, "seeds": args.seeds, "learning_rates": args.lrs}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})
    if args.quick and args.task == "charlm":
        cfg = dataclasses.replace(
            cfg, steps=100, seeds=(0, 1), learning_rates=(0.5, 5.0), test_size=64
        )
    elif args.quick:
        cfg = dataclasses.replace(
            cfg, steps=200, seeds=(0, 1), learning_rates=(0.2, 1.0), test_size=256
        )
    if cfg.steps < cfg.eval_every or cfg.steps % cfg.eval_every:
        parser.error(f"--steps must be a multiple of {cfg.eval_every}; got {cfg.steps}")
    if not 0 <= cfg.warmup < cfg.steps:
        parser.error(f"--warmup must be in [0, --steps); got {cfg.warmup}")
    if not (math.isfinite(cfg.max_ratio) and cfg.max_ratio > 0):
        parser.error(f"--max-ratio must be a number > 0; got {cfg.max_ratio}")
    available = methods(cfg.clip_norm, cfg.clip_value, cfg.max_ratio)
    chosen = [m for m in args.methods.split(",") if m]
    unknown = [m for m in chosen if m not in available]
    if unknown or not chosen:
        parser.error(f"unknown --methods {unknown}; choose from {list(available)}")
    if args.sweep:
        if args.suggest:
            parser.error("--suggest reads one global_norm run; drop it with --sweep")
        todo = [available["none"]]
        todo += [fixed_bound(t) for t in args.thresholds]
        todo += [available["recommended"]]
        chosen = [m.name for m in todo]
    else:
        todo = [available[name] for name in chosen]
    out = args.out or os.path.join("out", "sweep.png" if args.sweep else "demo.png")
    if args.suggest and "global_norm" not in chosen:
        parser.error(
            f"--suggest reads the norms of global_norm; got --methods {args.methods}"
            " (add global_norm)"
        )

    # One CPU device per core, so that the runs of a method train in parallel.
    # Read when the backend starts (the first computation below).
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={_cores()}"
        )
    from tqdm.auto import tqdm

    warm = f", {cfg.warmup}-step warm-up" if cfg.warmup else ""
    if cfg.task == "charlm":
        unigram, bigram = char_baselines()
        train, test = char_text()
        print(
            f"character LM on {', '.join(TEXT_MODULES)} ({train.size} training, "
            f"{test.size} test characters): GRU {cfg.hidden} units, SGD momentum "
            f"{cfg.momentum:g}, cosine decay{warm}, batch {cfg.batch} x "
            f"{cfg.seq_len} characters, {cfg.steps} steps; seeds {list(cfg.seeds)}; "
            f"peak learning rates {list(cfg.learning_rates)}; test loss of the "
            f"unigram {unigram:.3f}, bigram {bigram:.3f} bits per character"
        )
    else:
        print(
            f"adding problem T={cfg.seq_len}: LSTM {cfg.hidden} units, SGD momentum "
            f"{cfg.momentum:g}, cosine decay{warm}, batch {cfg.batch}, "
            f"{cfg.steps} steps; seeds {list(cfg.seeds)}; "
            f"peak learning rates {list(cfg.learning_rates)}"
        )
    results = []
    start = time.perf_counter()
    runs = len(cfg.seeds) * len(cfg.learning_rates)
    # Compiling is most of a short run's time: compile the methods in
    # parallel (XLA releases the GIL) while the first ones train.
    with ThreadPoolExecutor(min(len(todo), _cores())) as pool:
        pending = [pool.submit(prepare, method, cfg) for method in todo]
        if args.sweep:  # one bar for the whole grid
            total = len(todo) * runs * cfg.steps
            with tqdm(total=total, desc="sweep", unit="step") as bar:
                for compiling in pending:
                    train = compiling.result()
                    results.append(train(lambda: bar.update(cfg.eval_every)))
        else:
            for method, compiling in zip(todo, pending, strict=True):
                desc = f"{method.label:<16}"
                with tqdm(total=runs * cfg.steps, desc=desc, unit="step") as bar:
                    train = compiling.result()
                    results.append(train(lambda bar=bar: bar.update(cfg.eval_every)))
    seconds = time.perf_counter() - start
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    if args.sweep:
        print()
        print(sweep_table(results, cfg))
        print()
        print(CHARLM_NOTE if cfg.task == "charlm" else SWEEP_NOTE)
        print(
            f"trained no clipping, {len(args.thresholds)} fixed thresholds and "
            f"recommended x {len(cfg.learning_rates)} rates x {len(cfg.seeds)} "
            f"seeds in {seconds:.0f} s"
        )
        plot_sweep(results, cfg, out)
        print(f"saved {out}")
    else:
        for lr in cfg.learning_rates:
            print()
            print(table(results, cfg, lr))
        print()
        print(TABLE_NOTE.format(steps=cfg.steps))
        print(
            f"trained {len(chosen)} methods x {len(cfg.learning_rates)} rates x "
            f"{len(cfg.seeds)} seeds in {seconds:.0f} s"
        )
        lr = plot(results, cfg, out)
        print(f"saved {out} (panels 1 and 2 at peak learning rate {lr:g})")
    if args.json:
        config = dataclasses.asdict(cfg) | {"methods": chosen}
        if args.sweep:
            config |= {"thresholds": list(args.thresholds)}
        with open(args.json, "w") as f:
            json.dump({"config": config, "runs": rows(results, cfg)}, f, indent=1)
        print(f"saved {args.json}")
    if args.suggest:
        print()
        os.makedirs(os.path.dirname(args.suggest) or ".", exist_ok=True)
        print(suggest(results, cfg, args.suggest))
        print(f"saved {args.suggest}")
    return results


if __name__ == "__main__":
    main()
