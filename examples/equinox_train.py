"""Gradient clipping in an Equinox training loop.

An ``eqx.nn.MLP`` fits a noisy 1-D regression. The optimizer is
``optax.chain(<clip>, optax.adamw(...))``, initialized on the model's array
leaves (``eqx.filter(model, eqx.is_array)``); gradients come from
``eqx.filter_value_and_grad``, and the jitted step returns the clip's
statistics with one call, ``optaxclip.metrics(opt_state)`` (``clip/norm``
before clipping, ``clip/threshold``, ``clip/clipped``, ...).

    python examples/equinox_train.py [--steps 300] [--method zclip] [--quick]
"""

from __future__ import annotations

import argparse
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import optaxclip as oc

CLIPS = {
    "global_norm": lambda: oc.clip_by_global_norm(1.0),
    "zclip": lambda: oc.zclip(),
    "autoclip": lambda: oc.autoclip(percentile=10.0),
}


def make_data(key, n=512):
    """A noisy 1-D regression task: y = sin(3x) + x^2 / 2 + noise."""
    kx, kn = jax.random.split(key)
    x = jax.random.uniform(kx, (n, 1), minval=-2.0, maxval=2.0)
    y = jnp.sin(3 * x[:, 0]) + 0.5 * x[:, 0] ** 2 + 0.1 * jax.random.normal(kn, (n,))
    return x, y


def mse(model, x, y):
    pred = jax.vmap(model)(x)[:, 0]
    return jnp.mean((pred - y) ** 2)


def make_step(tx):
    @eqx.filter_jit
    def step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(mse)(model, x, y)
        updates, opt_state = tx.update(
            grads, opt_state, eqx.filter(model, eqx.is_array)
        )
        model = eqx.apply_updates(model, updates)
        return model, opt_state, {"loss": loss, **oc.metrics(opt_state)}

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--method", choices=sorted(CLIPS), default="global_norm")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--quick", action="store_true", help="a few steps (smoke test)")
    args = parser.parse_args(argv)
    steps = 20 if args.quick else args.steps
    if args.quick:
        # Compile time dominates a smoke test; skip XLA's slower CPU optimizations.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_backend_optimization_level=0"
            + " --xla_llvm_disable_expensive_passes=true"
        )

    x, y = make_data(jax.random.key(0))
    model = eqx.nn.MLP(
        1, 1, width_size=64, depth=2, activation=jax.nn.gelu, key=jax.random.key(1)
    )
    tx = optax.chain(CLIPS[args.method](), optax.adamw(args.lr, weight_decay=1e-4))
    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    step_fn = make_step(tx)

    log_every = max(1, steps // 10)
    clipped = 0
    for step in range(steps):
        batch = jax.random.choice(jax.random.key(step), x.shape[0], (64,))
        model, opt_state, logs = step_fn(model, opt_state, x[batch], y[batch])
        logs = {k: v.item() for k, v in jax.device_get(logs).items()}
        clipped += logs["clip/clipped"]
        if step % log_every == 0 or step == steps - 1:
            print(
                f"step {step:4d}  loss {logs['loss']:.4f}  "
                f"grad_norm {logs['clip/norm']:.4f}  "
                f"threshold {logs['clip/threshold']:.4f}"
            )
    final = float(mse(model, x, y))
    print(
        f"method {args.method}: final loss {final:.4f}, clipped steps {clipped}/{steps}"
    )
    return final


if __name__ == "__main__":
    main()
