"""Per-tensor clip statistics of a small model's training, written to TensorBoard.

A two-layer nnx MLP trains with ``clip_by_global_norm(1.0,
per_tensor_stats=True)`` before AdamW. Every step logs the clip's keys
(``clip/norm``, ``clip/norm_after``, ``clip/clipped``, ...) and one key per
tensor named by its parameter path (``clip/norm/l1/kernel``, ...) with
``tensorboardX`` (no TensorFlow needed; ``pip install tensorboardX``, or the
``test`` extra). ``tensorboard --logdir runs/clip`` shows them; ``--plot``
also saves the per-tensor norm heatmap.

    python examples/tensorboard_logging.py [--logdir runs/clip] [--steps 200]
                                           [--plot tensors.png] [--quick]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optaxclip as oc


class MLP(nnx.Module):
    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(4, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.gelu(self.l1(x)))[..., 0]


def make_data(key, n=256):
    kx, kn = jax.random.split(key)
    x = jax.random.normal(kx, (n, 4))
    y = jnp.sin(x[:, 0]) * x[:, 1] + 0.1 * jax.random.normal(kn, (n,))
    return x, y


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, params_like, x, y):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    logs = oc.metrics(optimizer, params_like, per_tensor=True)
    return loss, grads, logs


def run(logdir: str, steps: int = 200, lr: float = 0.05, plot: str | None = None):
    """Trains and logs; returns the names, the gradients and the logged dicts.

    Returns:
      ``(paths, grads, logged)``: the per-tensor key paths, each step's
      gradient (a list of NumPy arrays per step, in the order of ``paths``)
      and each step's logged dict (Python numbers).
    """
    from tensorboardX import SummaryWriter

    x, y = make_data(jax.random.key(0))
    model = MLP(16, rngs=nnx.Rngs(1))
    tx = optax.chain(
        oc.clip_by_global_norm(1.0, per_tensor_stats=True),
        optax.adamw(lr, weight_decay=1e-4),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    params_like = nnx.state(model, nnx.Param)
    seen_grads, logged = [], []
    with SummaryWriter(logdir) as writer:
        for step in range(steps):
            batch = jax.random.choice(jax.random.key(step), x.shape[0], (32,))
            loss, grads, logs = train_step(
                model, optimizer, params_like, x[batch], y[batch]
            )
            logs = {k: v.item() for k, v in jax.device_get(logs).items()}
            logs["loss"] = float(loss)
            for key, value in logs.items():
                writer.add_scalar(key, value, step)
            logged.append(logs)
            seen_grads.append([np.asarray(g) for g in jax.tree.leaves(grads)])
    # The names metrics() gave each tensor, in the order of the tree.
    paths = [
        k.removeprefix("clip/norm/") for k in logged[0] if k.startswith("clip/norm/")
    ]
    if plot:
        norms = np.array([[s[f"clip/norm/{p}"] for p in paths] for s in logged])
        clipped = np.array([s["clip/clipped"] for s in logged])
        oc.plot_tensor_norms(norms, plot, names=paths, clipped=clipped)
    return paths, seen_grads, logged


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", default="runs/clip")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--plot", default=None, help="save the heatmap (PNG)")
    parser.add_argument("--quick", action="store_true", help="20 steps (smoke test)")
    args = parser.parse_args(argv)
    steps = 20 if args.quick else args.steps
    paths, _, logged = run(args.logdir, steps, args.lr, args.plot)
    clipped = sum(s["clip/clipped"] for s in logged)
    last = logged[-1]
    print(f"wrote {len(logged)} steps to {args.logdir}; clipped {clipped} steps")
    for p in paths:
        print(f"  clip/norm/{p}: {last[f'clip/norm/{p}']:.4f}")


if __name__ == "__main__":
    main()
