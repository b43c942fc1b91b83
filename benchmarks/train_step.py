"""Section 5: a whole jitted, donated transformer train step, with each clip.

A small decoder-only transformer (token and position embeddings, pre-LN
blocks of causal self-attention and a GELU MLP, a final layer norm, logits,
cross-entropy on the next token) takes one training step: forward,
backward, the clip, ``optax.adamw``, the parameters updated. The step is
jitted with its parameters and optimizer state donated, and each call's
outputs are the next call's inputs, as in a training loop. Every candidate
is the same step with one clip (or a guard) added, timed side by side with
the step without one in interleaved rounds, each round in a fresh random
order; the report reads each clip's cost as a share of the unclipped step,
round by round.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc
from benchmarks import harness
from benchmarks.records import GUARD, Config, TrainRow


class Model(NamedTuple):
    """The shape of the benchmark's transformer and of its batch."""

    vocab: int
    d_model: int
    heads: int
    layers: int
    batch: int
    seq_len: int


# The sizes section 5 can run (``Config.train_models``); "tiny" is the quick
# run's. "1M" has 0.93M parameters in 45 tensors, "4M" 3.7M in 45.
MODELS: dict[str, Model] = {
    "tiny": Model(vocab=64, d_model=32, heads=2, layers=1, batch=2, seq_len=16),
    "1M": Model(vocab=512, d_model=128, heads=4, layers=4, batch=4, seq_len=64),
    "4M": Model(vocab=1024, d_model=256, heads=8, layers=4, batch=4, seq_len=64),
}

NO_CLIP = "adamw, no clip"


class Candidate(NamedTuple):
    """One step to time: how its optimizer is made from ``optax.adamw``."""

    label: str  # the table's label
    library: str  # "optaxclip", "optax" or "none" (the step without a clip)
    optimizer: Callable[[optax.GradientTransformation], Any]
    takes_loss: bool = False  # the step passes ``value=loss`` to its update


def clipped(
    make: Callable[..., Any], *args: Any, **kwargs: Any
) -> Callable[[optax.GradientTransformation], Any]:
    """``adamw -> chain(make(*args, **kwargs), adamw)``: the clip in front."""
    return lambda adamw: optax.chain(make(*args, **kwargs), adamw)


def ours(make: Callable[..., Any], *args: Any, **kwargs: Any) -> Candidate:
    """optaxclip's ``make(*args, **kwargs)`` in front of adamw, labelled by
    the call (``oc.clip_by_global_norm(1.0)``)."""
    shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    label = f"oc.{make.__name__}({', '.join(shown)})"
    return Candidate(label, "optaxclip", clipped(make, *args, **kwargs))


OPTAX_GLOBAL = "optax.clip_by_global_norm(1.0)"


def candidates() -> list[Candidate]:
    """The steps of section 5, the step without a clip first.

    One line per candidate: another clip, or the same with other options, is
    one more line.
    """
    return [
        Candidate(NO_CLIP, "none", lambda adamw: adamw),
        Candidate(OPTAX_GLOBAL, "optax", clipped(optax.clip_by_global_norm, 1.0)),
        ours(oc.clip_by_global_norm, 1.0),
        ours(oc.clip_by_global_norm, 1.0, per_tensor_stats=True),
        ours(oc.zclip),
        ours(oc.clip_by_norm, 1.0),  # per tensor
        ours(oc.adagc),
        Candidate("oc.skip_spikes(adamw)", "optaxclip", oc.skip_spikes, True),
    ]


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


def init_params(model: Model, seed: int = 0) -> dict[str, Any]:
    """Float32 parameters: normal kernels scaled by ``1/sqrt(fan_in)``."""
    d, hidden = model.d_model, 4 * model.d_model
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 3 + 4 * model.layers))

    def dense(n_in: int, n_out: int) -> jax.Array:
        return jax.random.normal(next(keys), (n_in, n_out)) / math.sqrt(n_in)

    def norm() -> dict[str, jax.Array]:
        return {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))}

    blocks = [
        {
            "ln1": norm(),
            "qkv": dense(d, 3 * d),
            "out": dense(d, d),
            "ln2": norm(),
            "mlp_in": {"w": dense(d, hidden), "b": jnp.zeros((hidden,))},
            "mlp_out": {"w": dense(hidden, d), "b": jnp.zeros((d,))},
        }
        for _ in range(model.layers)
    ]
    return {
        "embed": 0.02 * jax.random.normal(next(keys), (model.vocab, d)),
        "pos": 0.02 * jax.random.normal(next(keys), (model.seq_len, d)),
        "blocks": blocks,
        "ln_f": norm(),
        "unembed": dense(d, model.vocab),
    }


def _row(v: jax.Array, x: jax.Array) -> jax.Array:
    """``v`` with ``x``'s rank, its leading axes of size 1 (to broadcast)."""
    return v.reshape((1,) * (x.ndim - v.ndim) + v.shape)


def _layer_norm(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    normed = (x - mean) * jax.lax.rsqrt(var + 1e-5)
    return normed * _row(p["scale"], x) + _row(p["bias"], x)


def _attention(x: jax.Array, block: dict[str, Any], heads: int) -> jax.Array:
    b, t, d = x.shape
    q, k, v = jnp.split(x @ block["qkv"], 3, axis=-1)
    q, k, v = (y.reshape(b, t, heads, d // heads) for y in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // heads)
    causal = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(_row(causal, logits), logits, -1e9), axis=-1)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
    return mixed @ block["out"]


def loss_fn(params: dict[str, Any], tokens: jax.Array, heads: int) -> jax.Array:
    """Mean next-token cross-entropy of ``tokens`` (``(batch, seq_len + 1)``)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    x = params["embed"][inputs]
    x = x + _row(params["pos"][: inputs.shape[1]], x)
    for block in params["blocks"]:
        x = x + _attention(_layer_norm(x, block["ln1"]), block, heads)
        h = _layer_norm(x, block["ln2"]) @ block["mlp_in"]["w"]
        h = jax.nn.gelu(h + _row(block["mlp_in"]["b"], h))
        x = x + h @ block["mlp_out"]["w"] + _row(block["mlp_out"]["b"], x)
    logits = _layer_norm(x, params["ln_f"]) @ params["unembed"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_step(
    tx: Any, heads: int, takes_loss: bool = False
) -> Callable[[Any, Any, jax.Array], tuple[Any, Any, jax.Array]]:
    """The jitted step ``(params, opt_state, tokens) -> (params, opt_state,
    loss)``, its parameters and optimizer state donated."""

    def step(params: Any, opt_state: Any, tokens: jax.Array) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, heads)
        extra = {"value": loss} if takes_loss else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def tokens_for(model: Model, seed: int = 0) -> jax.Array:
    """A fixed batch of random tokens, ``(batch, seq_len + 1)``."""
    key = jax.random.PRNGKey(seed)
    return jax.random.randint(key, (model.batch, model.seq_len + 1), 0, model.vocab)


# ---------------------------------------------------------------------------
# The section
# ---------------------------------------------------------------------------


def measure(
    name: str,
    model: Model,
    rounds: int,
    seed: int = 0,
    cands: list[Candidate] | None = None,
) -> list[TrainRow]:
    """Times every candidate's step on ``model`` in the same rounds (the
    section's `candidates`, or ``cands``)."""
    cands = candidates() if cands is None else cands
    params = harness.block(init_params(model))
    tokens = tokens_for(model)
    held: dict[str, tuple[Any, Any]] = {}
    losses: dict[str, jax.Array] = {}
    steps = {}
    for c in cands:
        tx = c.optimizer(optax.adamw(1e-3))
        own = jax.tree.map(jnp.copy, params)  # each step donates its own copy
        held[c.label] = (own, tx.init(own))
        steps[c.label] = make_step(tx, model.heads, c.takes_loss)

    def timed_for(label: str) -> Callable[[], Any]:
        def run() -> Any:
            new_params, state, loss = steps[label](*held[label], tokens)
            held[label], losses[label] = (new_params, state), loss
            return loss

        return run

    timing = harness.time_side_by_side(
        {c.label: timed_for(c.label) for c in cands}, rounds, seed=seed
    )
    # Each step trained the model: its last loss must be a number.
    last = {label: float(loss) for label, loss in losses.items()}
    bad = [label for label, loss in last.items() if not np.isfinite(loss)]
    if bad:
        raise RuntimeError(f"section 5: the {name} model's loss is not finite in "
                           f"the steps {bad}: {last}")  # fmt: skip
    leaves = jax.tree.leaves(params)
    return [
        TrainRow(
            section=5,
            model=name,
            params=sum(x.size for x in leaves),
            leaves=len(leaves),
            layers=model.layers,
            d_model=model.d_model,
            heads=model.heads,
            vocab=model.vocab,
            batch=model.batch,
            seq_len=model.seq_len,
            method=c.label,
            library=c.library,
            seconds=timing.seconds[c.label],
            rounds=timing.rounds,
            round_seconds=timing.samples[c.label],
        )
        for c in cands
    ]


def run(cfg: Config, on_rows: Callable[[list[TrainRow]], None]) -> None:
    """Measures every model of ``cfg.train_models``, in the order given."""
    for name in cfg.train_models:
        rows = measure(name, MODELS[name], cfg.train_rounds, cfg.seed)
        on_rows(rows)
        base = rows[0].round_seconds
        for r in rows[1:]:
            cost = np.median(np.asarray(r.round_seconds) / np.asarray(base) - 1)
            print(
                f"  {name} ({r.params:,} params): {r.method}: "
                f"{100 * cost:+.1f}% of the step ({r.rounds} rounds)",
                flush=True,
            )
        skips = measure(
            name, MODELS[name], cfg.train_rounds, cfg.seed, skip_candidates()
        )
        on_rows(skips)
        for r in skips[1:]:
            ratio = np.median(np.asarray(r.round_seconds) / skips[0].round_seconds)
            print(f"  {name}: {r.method}: {ratio:.2f} x the unguarded muon step",
                  flush=True)  # fmt: skip


# ---------------------------------------------------------------------------
# Skipping a Muon step: lazy (lax.cond) against select
# ---------------------------------------------------------------------------

MUON = "muon, no guard"


def skip_candidates() -> list[Candidate]:
    """The same train step with ``optax.contrib.muon`` in a guard that applies
    every step (``rule=inf``) or skips every step (``rule=0.0``), in the
    select mode and with ``lazy=True``, after the unguarded muon step. Their
    rows carry ``library=GUARD`` and have a table of their own."""

    def guarded(bound: float, lazy: bool) -> Candidate:
        what = "applied" if bound else "skipped"
        label = f"oc.skip_spikes(muon, rule={bound}, lazy={lazy}): every step {what}"

        def make(adamw: Any) -> Any:
            del adamw  # muon in its place
            return oc.skip_spikes(optax.contrib.muon(1e-3), rule=bound, lazy=lazy)

        return Candidate(label, GUARD, make)

    return [
        Candidate(MUON, GUARD, lambda _: optax.contrib.muon(1e-3)),
        *(guarded(b, lazy) for b in (float("inf"), 0.0) for lazy in (False, True)),
    ]
