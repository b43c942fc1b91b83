"""What each clipping method does to exploding gradients: the adding problem.

The adding problem of Hochreiter & Schmidhuber (1997), used by Pascanu,
Mikolov & Bengio (2013, arXiv:1211.5063) when they introduced gradient-norm
clipping: each input sequence has ``T`` steps of two channels, a random number
in [0, 1] and a marker that is 1 at exactly two steps (one in each half); the
target is the sum of the two marked numbers. Predicting the mean scores an MSE
of 1/6 (about 0.167); a run counts as solved below 0.01.

A vanilla tanh RNN (Flax nnx) is trained with SGD + momentum at a learning
rate where the gradient norm explodes every so often. The same seeds are
trained with every method; the script prints a table and saves a PNG with the
test-loss curves and, per method, the measured gradient norm against the
threshold the method used.

Run ``python examples/demo.py --help`` for the options; ``--quick`` is a
smoke test that finishes in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optaxclip as oc

# ---------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str
    make: Callable[[], optax.GradientTransformation] | None  # None: no clipping
    # what ClipStats.norm means for this method, for the plot's y label
    measures: str = "global norm"


def methods(clip_norm: float, clip_value: float) -> dict[str, Method]:
    """Every method of the demo, by name; adaptive ones use their paper defaults."""
    return {
        "none": Method("none", "no clipping", None),
        "global_norm": Method(
            "global_norm",
            f"global norm {clip_norm:g}",
            lambda: oc.clip_by_global_norm(clip_norm),
        ),
        "value": Method(
            "value",
            f"value {clip_value:g}",
            lambda: oc.clip_by_value(clip_value),
            measures="largest |entry|",
        ),
        "autoclip": Method("autoclip", "AutoClip (p=10)", oc.autoclip),
        "zclip": Method("zclip", "ZClip", oc.zclip),
        "quantile_clip": Method("quantile_clip", "quantile tracking", oc.quantile_clip),
        "adagc": Method(
            "adagc", "AdaGC (per tensor)", oc.adagc, measures="largest tensor norm"
        ),
    }


# ---------------------------------------------------------------------------
# Task and model
# ---------------------------------------------------------------------------


def adding_batch(key: jax.Array, batch: int, seq_len: int):
    """A batch of the adding problem: inputs (batch, T, 2) and targets (batch,)."""
    k_val, k_first, k_second = jax.random.split(key, 3)
    values = jax.random.uniform(k_val, (batch, seq_len))
    half = seq_len // 2
    first = jax.random.randint(k_first, (batch,), 0, half)
    second = jax.random.randint(k_second, (batch,), half, seq_len)
    markers = jax.nn.one_hot(first, seq_len) + jax.nn.one_hot(second, seq_len)
    inputs = jnp.stack([values, markers], axis=-1)
    targets = jnp.sum(values * markers, axis=-1)
    return inputs, targets


def _scaled_identity(scale: float):
    # An identity recurrence integrates its input in tanh's linear regime,
    # which is what the task needs (Le et al. 2015, arXiv:1504.00941).
    def init(key, shape, dtype=jnp.float32):
        del key
        return scale * jnp.eye(shape[0], shape[1], dtype=dtype)

    return init


class TanhRNN(nnx.Module):
    """``h_t = tanh(W x_t + U h_{t-1} + b)``, read out linearly after the last step."""

    def __init__(self, hidden: int, recurrent_scale: float, *, rngs: nnx.Rngs):
        self.inp = nnx.Linear(2, hidden, rngs=rngs)
        self.rec = nnx.Linear(
            hidden,
            hidden,
            use_bias=False,
            kernel_init=_scaled_identity(recurrent_scale),
            rngs=rngs,
        )
        self.out = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        drive = jnp.swapaxes(self.inp(inputs), 0, 1)  # (T, batch, hidden)
        kernel = self.rec.kernel[...]

        def step(h, x):
            return jnp.tanh(x + h @ kernel), None

        h0 = jnp.zeros(drive.shape[1:], drive.dtype)
        h, _ = jax.lax.scan(step, h0, drive)
        return self.out(h)[:, 0]


# ---------------------------------------------------------------------------
# Training: one jitted chunk of steps, vmapped over seeds
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int = 1000
    seq_len: int = 100
    seeds: tuple[int, ...] = (0, 1, 2)
    hidden: int = 64
    batch: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9
    optimizer: str = "sgd"
    recurrent_scale: float = 1.0
    eval_every: int = 50
    test_size: int = 512
    clip_norm: float = 1.0
    clip_value: float = 0.1


@dataclasses.dataclass
class Result:
    method: Method
    test_mse: np.ndarray  # (seeds, evals)
    eval_steps: np.ndarray  # (evals,)
    grad_norm: np.ndarray  # (seeds, steps), own measurement of the global norm
    measured: np.ndarray | None  # (seeds, steps), ClipStats.norm (max over tensors)
    threshold: np.ndarray | None  # (seeds, steps), ClipStats.threshold
    clipped: np.ndarray  # (seeds, steps) bool
    nonfinite: np.ndarray  # (seeds, steps) bool
    seconds: float


@functools.cache
def setup(cfg: Config):
    """The models (one per seed) and the test set, shared by every method."""

    def init(key):
        model = TanhRNN(cfg.hidden, cfg.recurrent_scale, rngs=nnx.Rngs(key))
        return model, nnx.state(model, nnx.Param)

    graphdef, _ = nnx.split(
        nnx.eval_shape(lambda: init(jax.random.key(0))[0]), nnx.Param
    )

    @jax.jit
    def start(keys):
        params = jax.vmap(lambda k: init(k)[1])(keys)
        return params, adding_batch(jax.random.key(10_000), cfg.test_size, cfg.seq_len)

    params, test = start(jax.vmap(jax.random.key)(jnp.asarray(cfg.seeds)))
    return graphdef, params, test


def train(method: Method, cfg: Config, progress=None) -> Result:
    """Trains one model per seed with ``method``; returns the recorded history."""
    if cfg.optimizer == "adam":
        optimizer = optax.adam(cfg.learning_rate)
    else:
        optimizer = optax.sgd(cfg.learning_rate, momentum=cfg.momentum)
    tx = optimizer if method.make is None else optax.chain(method.make(), optimizer)

    graphdef, params, (test_x, test_y) = setup(cfg)
    opt_state = jax.jit(jax.vmap(tx.init))(params)

    def loss_fn(params, x, y):
        model = nnx.merge(graphdef, params)
        return jnp.mean((model(x) - y) ** 2)

    def one_step(carry, step_key):
        params, opt_state = carry
        x, y = adding_batch(step_key, cfg.batch, cfg.seq_len)
        grads = jax.grad(loss_fn)(params, x, y)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        record = {"grad_norm": grad_norm, "nonfinite": ~jnp.isfinite(grad_norm)}
        found = oc.stats(opt_state)
        if found:
            (s,) = found
            record["measured"] = jnp.max(s.norm)
            record["threshold"] = jnp.max(s.threshold)
            record["clipped"] = s.clipped > 0
        return (params, opt_state), record

    def chunk(params, opt_state, data_key, first, length):
        keys = jax.vmap(lambda s: jax.random.fold_in(data_key, s))(
            first + jnp.arange(length)
        )
        (params, opt_state), records = jax.lax.scan(one_step, (params, opt_state), keys)
        mse = loss_fn(params, test_x, test_y)
        return params, opt_state, records, mse

    def run_chunk(params, opt_state, data_keys, first, length):
        batched = jax.vmap(chunk, in_axes=(0, 0, 0, None, None))
        return batched(params, opt_state, data_keys, first, length)

    run_chunk = jax.jit(run_chunk, static_argnums=4)
    base = jax.vmap(jax.random.key)(jnp.asarray(cfg.seeds))
    n_chunks = -(-cfg.steps // cfg.eval_every)
    data_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(base)
    history, mses, eval_steps = [], [], []
    start = time.perf_counter()
    for c in range(n_chunks):
        first = c * cfg.eval_every
        length = min(cfg.eval_every, cfg.steps - first)
        params, opt_state, records, mse = run_chunk(
            params, opt_state, data_keys, jnp.int32(first), length
        )
        history.append(jax.device_get(records))
        mses.append(np.asarray(mse))
        eval_steps.append(first + length)
        if progress is not None:
            progress.update(length)
            progress.set_postfix(mse=f"{float(np.nanmedian(mses[-1])):.4f}")
    seconds = time.perf_counter() - start

    def cat(name):
        if name not in history[0]:
            return None
        return np.concatenate([h[name] for h in history], axis=1)

    clipped = cat("clipped")
    return Result(
        method=method,
        test_mse=np.stack(mses, axis=1),
        eval_steps=np.asarray(eval_steps),
        grad_norm=cat("grad_norm"),
        measured=cat("measured"),
        threshold=cat("threshold"),
        clipped=np.zeros_like(cat("nonfinite")) if clipped is None else clipped,
        nonfinite=cat("nonfinite"),
        seconds=seconds,
    )


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

SOLVED = 0.01


def first_solved(result: Result) -> list[int | None]:
    """Per seed, the first evaluated step with test MSE below 0.01 (None if never)."""
    out = []
    for curve in result.test_mse:
        hit = np.flatnonzero(curve < SOLVED)
        out.append(int(result.eval_steps[hit[0]]) if hit.size else None)
    return out


def table(results: list[Result]) -> str:
    """The summary table: one row per method, medians over seeds."""
    head = (
        f"{'method':<22} {'final test MSE':>16} {'solved (MSE<0.01)':>18} "
        f"{'first step <0.01':>17} {'clipped steps':>14} {'non-finite':>11} "
        f"{'time s':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        final = r.test_mse[:, -1]
        solved = first_solved(r)
        hits = [s for s in solved if s is not None]
        first = f"{int(np.median(hits))}" if hits else "never"
        finals = "nan" if np.all(np.isnan(final)) else f"{np.nanmedian(final):.4f}"
        lines.append(
            f"{r.method.name:<22} {finals:>16} "
            f"{f'{len(hits)}/{len(solved)}':>18} {first:>17} "
            f"{int(np.median(r.clipped.sum(axis=1))):>14} "
            f"{int(np.median(r.nonfinite.sum(axis=1))):>11} {r.seconds:>7.1f}"
        )
    lines.append(
        "median over seeds; 'first step' is the median over the seeds that solved it; "
        "trivial predictor MSE = 0.167"
    )
    return "\n".join(lines)


def optimizer_name(cfg: Config) -> str:
    if cfg.optimizer == "adam":
        return f"Adam lr={cfg.learning_rate:g}"
    return f"SGD lr={cfg.learning_rate:g} momentum={cfg.momentum:g}"


def plot(results: list[Result], path: str, cfg: Config) -> None:
    """Saves the test-loss curves and, per method, norm against threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = 3
    rows = 1 + -(-n // cols)
    fig = plt.figure(figsize=(5 * cols, 3.2 * rows), constrained_layout=True)
    grid = fig.add_gridspec(rows, cols)
    ax = fig.add_subplot(grid[0, :])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(results):
        color = colors[i % len(colors)]
        for s, curve in enumerate(r.test_mse):
            ax.plot(
                r.eval_steps,
                np.where(np.isfinite(curve), curve, np.nan),
                color=color,
                alpha=0.8,
                lw=1.2,
                label=r.method.label if s == 0 else None,
            )
    ax.axhline(1 / 6, color="gray", ls=":", lw=1)
    ax.axhline(SOLVED, color="gray", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_ylim(top=10.0)  # diverging runs leave the chart at the top
    ax.set_xlabel("step")
    ax.set_ylabel("test MSE (runs above 10 are cut off)")
    ax.set_title(
        f"Adding problem, T={cfg.seq_len}, tanh RNN, {optimizer_name(cfg)}, "
        f"{len(cfg.seeds)} seeds "
        "(dotted: predict the mean, dashed: solved)"
    )
    ax.legend(ncol=min(n, 4), fontsize=8)
    for i, r in enumerate(results):
        ax = fig.add_subplot(grid[1 + i // cols, i % cols])
        steps = np.arange(r.grad_norm.shape[1])
        shown = r.measured if r.measured is not None else r.grad_norm
        ax.plot(steps, shown[0], lw=0.6, color="C0", label=r.method.measures)
        if r.threshold is not None:
            ax.plot(steps, r.threshold[0], lw=1.0, color="C3", label="threshold")
        ax.set_yscale("log")
        ax.set_title(f"{r.method.label} (seed {cfg.seeds[0]})", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7, loc="upper right")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def threshold_report(results: list[Result], out: str, cfg: Config) -> None:
    """Which fixed threshold would the recorded norms suggest? (first seed)"""
    base = next((r for r in results if r.method.name == "global_norm"), results[0])
    norms = base.grad_norm[0]
    report = oc.suggest_threshold(norms, percentile=10.0)
    print(
        f"\nthreshold suggested from the pre-clip norms of the "
        f"{base.method.label!r} run (seed {cfg.seeds[0]}):"
    )
    print(report)
    lines = {"suggested (p10)": report.threshold}
    if base.method.name == "global_norm":
        lines[f"fixed {cfg.clip_norm:g}"] = cfg.clip_norm
    stem = out[:-4] if out.endswith(".png") else out
    path = oc.plot_norm_history(norms, f"{stem}_norms.png", lines)
    print(f"saved {path}")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"3"`` means seeds 0, 1, 2; ``"4,7"`` means seeds 4 and 7."""
    if "," in text:
        return tuple(int(s) for s in text.split(",") if s)
    count = int(text)
    if count < 1:
        raise argparse.ArgumentTypeError(f"--seeds must be >= 1; got {text!r}")
    return tuple(range(count))


def main(argv: list[str] | None = None) -> list[Result]:
    defaults = Config()
    available = methods(defaults.clip_norm, defaults.clip_value)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument(
        "--seeds",
        type=parse_seeds,
        default=defaults.seeds,
        help="count, or a comma list",
    )
    parser.add_argument(
        "--methods",
        default=",".join(available),
        help=f"comma-separated subset of: {', '.join(available)}",
    )
    parser.add_argument(
        "--out", default=os.path.join("out", "demo.png"), help="where to save the PNG"
    )
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument(
        "--optimizer", choices=["sgd", "adam"], default=defaults.optimizer
    )
    parser.add_argument("--momentum", type=float, default=defaults.momentum)
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument(
        "--recurrent-scale", type=float, default=defaults.recurrent_scale
    )
    parser.add_argument("--clip-norm", type=float, default=defaults.clip_norm)
    parser.add_argument("--clip-value", type=float, default=defaults.clip_value)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few steps on short sequences (smoke test)",
    )
    args = parser.parse_args(argv)

    cfg = Config(
        steps=args.steps,
        seq_len=args.seq_len,
        seeds=args.seeds,
        hidden=args.hidden,
        batch=args.batch,
        learning_rate=args.lr,
        momentum=args.momentum,
        optimizer=args.optimizer,
        recurrent_scale=args.recurrent_scale,
        clip_norm=args.clip_norm,
        clip_value=args.clip_value,
    )
    if args.quick:
        # Compile time dominates a smoke test; skip XLA's slower CPU optimizations
        # (which do pay off in the full run). Read when the backend starts, i.e.
        # at the first computation below.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_backend_optimization_level=0"
            + " --xla_llvm_disable_expensive_passes=true"
        )
        cfg = dataclasses.replace(
            cfg,
            steps=40,
            seq_len=20,
            seeds=(0,),
            hidden=16,
            eval_every=20,
            test_size=64,
        )
    for name, value in [("--steps", cfg.steps), ("--seq-len", cfg.seq_len)]:
        if value < 2:
            parser.error(f"{name} must be >= 2; got {value}")
    available = methods(cfg.clip_norm, cfg.clip_value)
    chosen = [m for m in args.methods.split(",") if m]
    unknown = [m for m in chosen if m not in available]
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {list(available)}")

    from tqdm.auto import tqdm

    results = []
    print(
        f"adding problem: T={cfg.seq_len}, {cfg.steps} steps, seeds {list(cfg.seeds)}, "
        f"{optimizer_name(cfg)}, methods {chosen}"
    )
    for name in chosen:
        with tqdm(total=cfg.steps, desc=f"{name:<14}", leave=True) as bar:
            results.append(train(available[name], cfg, bar))
    print()
    print(table(results))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    plot(results, args.out, cfg)
    print(f"\nsaved {args.out}")
    threshold_report(results, args.out, cfg)
    return results


if __name__ == "__main__":
    main()
