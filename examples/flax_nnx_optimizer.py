"""Gradient clipping in a Flax nnx training loop with ``nnx.Optimizer``.

The clip is the first link of the optax chain given to ``nnx.Optimizer``;
``optaxclip.metrics(optimizer)`` finds its statistics inside the optimizer
state and returns them as a flat dict (``clip/norm``, ``clip/threshold``, ...),
so the jitted step can return the pre-clip gradient norm for logging.

    python examples/flax_nnx_optimizer.py [--steps 300] [--method zclip] [--quick]
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optaxclip as oc

CLIPS = {
    "global_norm": lambda: oc.clip_by_global_norm(1.0),
    "zclip": lambda: oc.zclip(),
    "autoclip": lambda: oc.autoclip(percentile=10.0),
}


class MLP(nnx.Module):
    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(1, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.l3 = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x):
        x = nnx.gelu(self.l1(x))
        x = nnx.gelu(self.l2(x))
        return self.l3(x)[..., 0]


def make_data(key, n=512):
    """A noisy 1-D regression task: y = sin(3x) + x^2 / 2 + noise."""
    kx, kn = jax.random.split(key)
    x = jax.random.uniform(kx, (n, 1), minval=-2.0, maxval=2.0)
    y = jnp.sin(3 * x[:, 0]) + 0.5 * x[:, 0] ** 2 + 0.1 * jax.random.normal(kn, (n,))
    return x, y


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x, y):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    # clip/norm (before clipping), clip/threshold, clip/scale, clip/clipped, ...
    return {"loss": loss, **oc.metrics(optimizer)}


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
    model = MLP(64, rngs=nnx.Rngs(1))
    tx = optax.chain(CLIPS[args.method](), optax.adamw(args.lr, weight_decay=1e-4))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    log_every = max(1, steps // 10)
    clipped = 0
    for step in range(steps):
        batch = jax.random.choice(jax.random.key(step), x.shape[0], (64,))
        logs = train_step(model, optimizer, x[batch], y[batch])
        logs = {k: v.item() for k, v in jax.device_get(logs).items()}
        clipped += logs["clip/clipped"]
        if step % log_every == 0 or step == steps - 1:
            print(
                f"step {step:4d}  loss {logs['loss']:.4f}  "
                f"grad_norm {logs['clip/norm']:.4f}  "
                f"threshold {logs['clip/threshold']:.4f}"
            )
    final = float(jnp.mean((model(x) - y) ** 2))
    print(
        f"method {args.method}: final loss {final:.4f}, clipped steps {clipped}/{steps}"
    )
    return final


if __name__ == "__main__":
    main()
