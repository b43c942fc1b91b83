"""Loss spikes in a small character-level Transformer, and what clipping does.

A small pre-LN Transformer (Flax nnx) learns to predict the next character
of the Python standard library's own source code (read from this
interpreter's installation, so nothing is downloaded) with Adam at a high
learning rate and no warm-up, the regime in which loss spikes are reported
for larger models. The same initialisation and batches are trained with fixed
global-norm clipping, ZClip, AutoClip and spike skipping; the script reports
the number and size of the loss spikes and the final loss of each. The
default model is small and the run short: in runs at learning rates from 0.01
to 0.15 no step crossed the spike threshold (the largest loss-to-median
ratios were about 1.15), so larger ``--steps``, ``--dim`` or ``--layers`` may
be needed to provoke spikes.

A spike is a step whose training loss exceeds ``--spike-ratio`` (default
1.25) times the median of the previous 20 steps; its size is that ratio.

    python examples/llm_spikes.py [--steps 400] [--lr 0.02] [--quick]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import inspect
import json
import os
import sysconfig
import time
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optaxclip as oc

VOCAB = 128  # ASCII; other bytes are mapped to "?"


def stdlib_text(min_chars: int = 400_000) -> np.ndarray:
    """ASCII codes of standard-library source files, found from this interpreter."""
    files = [
        inspect.getsourcefile(m)
        for m in (argparse, collections, dataclasses, inspect, json, typing)
    ]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files += sorted(str(p) for p in stdlib.glob("*.py"))
    chunks, total = [], 0
    for f in dict.fromkeys(files):  # de-duplicated, order kept
        data = np.frombuffer(Path(f).read_bytes(), np.uint8)
        chunks.append(data)
        total += data.size
        if total >= min_chars:
            break
    text = np.concatenate(chunks)
    return np.where(text < VOCAB, text, ord("?")).astype(np.int32)


class Block(nnx.Module):
    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class CharTransformer(nnx.Module):
    def __init__(self, dim: int, heads: int, layers: int, context: int, *, rngs):
        self.embed = nnx.Embed(VOCAB, dim, rngs=rngs)
        self.pos = nnx.Embed(context, dim, rngs=rngs)
        self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[-1]))
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


def methods(lr: float) -> dict[str, optax.GradientTransformation]:
    adam = optax.adam(lr, b2=0.95)
    return {
        "global_norm(1.0)": optax.chain(oc.clip_by_global_norm(1.0), adam),
        "zclip": optax.chain(oc.zclip(), adam),
        "autoclip(p=10)": optax.chain(oc.autoclip(percentile=10.0), adam),
        "skip_spikes": oc.skip_spikes(adam, window=64, sigma=4.0),
    }


def count_spikes(losses: np.ndarray, ratio: float, window: int = 20):
    """Steps whose loss exceeds ``ratio`` x the median of the previous ``window``."""
    sizes = []
    for t in range(window, losses.size):
        rel = losses[t] / np.median(losses[t - window : t])
        if not np.isfinite(rel) or rel > ratio:
            sizes.append(rel)
    return np.asarray(sizes)


def train(tx, args, text, model_args):
    model = CharTransformer(*model_args, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, tokens):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, tokens[:, 1:]
            ).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        (s,) = oc.stats(opt_state)
        return optax.apply_updates(params, updates), opt_state, loss, s.norm

    rng = np.random.default_rng(0)  # the same batches for every method
    losses, norms = [], []
    start = time.perf_counter()
    for _ in range(args.steps):
        starts = rng.integers(0, text.size - args.context - 1, args.batch)
        tokens = np.stack([text[s : s + args.context + 1] for s in starts])
        params, opt_state, loss, norm = step(params, opt_state, tokens)
        losses.append(loss)
        norms.append(norm)
    losses = np.asarray(jax.device_get(losses), np.float64)
    return (
        losses,
        np.asarray(jax.device_get(norms)),
        time.perf_counter() - start,
        opt_state,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--spike-ratio", type=float, default=1.25)
    parser.add_argument("--quick", action="store_true", help="a few steps (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        # Compile time dominates a smoke test; skip XLA's slower CPU optimizations.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_backend_optimization_level=0"
            + " --xla_llvm_disable_expensive_passes=true"
        )
        args.steps, args.batch, args.context, args.dim, args.layers = 20, 8, 32, 32, 1
    text = stdlib_text()
    print(f"text: {text.size} characters of standard-library source; lr {args.lr:g}")
    model_args = (args.dim, 4, args.layers, args.context)

    rows = []
    for name, tx in methods(args.lr).items():
        losses, norms, seconds, state = train(tx, args, text, model_args)
        spikes = count_spikes(losses, args.spike_ratio)
        tail = losses[-max(1, args.steps // 10) :]
        skipped = int(getattr(state, "skipped", 0))
        rows.append(
            (name, tail.mean(), spikes, float(np.nanmax(norms)), skipped, seconds)
        )

    print(
        f"\n{'method':<18} {'final loss':>10} {'spikes':>7} {'largest spike':>14} "
        f"{'max grad norm':>14} {'skipped':>8} {'time s':>7}"
    )
    for name, final, spikes, max_norm, skipped, seconds in rows:
        largest = f"{spikes.max():.2f}x" if spikes.size else "-"
        print(
            f"{name:<18} {final:>10.4f} {spikes.size:>7d} {largest:>14} "
            f"{max_norm:>14.3g} {skipped:>8d} {seconds:>7.1f}"
        )
    print(
        f"\nfinal loss: mean over the last 10% of steps; a spike: loss > "
        f"{args.spike_ratio:g} x the median of the previous 20 steps"
    )
    return rows


if __name__ == "__main__":
    main()
