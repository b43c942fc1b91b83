"""Clipping in a data- and model-parallel jitted train step (8 simulated devices).

The batch is split over the ``data`` axis of a 4 x 2 device mesh and every
weight matrix over the ``model`` axis. Nothing in the clip needs to know: under
``jax.jit`` with sharded arrays, ``clip_by_global_norm`` measures the norm of
the whole, unsplit gradient (XLA inserts the cross-device reduction), so the
step equals the single-device step. The script checks both that and that the
parameters keep their shardings. The mesh is ``jax.make_mesh``'s default:
Explicit axes since JAX 0.9 (shardings are part of the arrays' types), Auto
before.

    python examples/sharded_training.py [--steps 50] [--quick]
"""

from __future__ import annotations

import os
import sys

# Simulated CPU devices must be requested before JAX is imported.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
if "--quick" in sys.argv[1:]:
    # Compile time dominates a smoke test; skip XLA's slower CPU optimizations.
    os.environ["XLA_FLAGS"] += (
        " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optaxclip as oc  # noqa: E402

# Megatron-style MLP: the first matrix is split by columns, the second by rows.
PARAM_SPECS = {
    "w1": P(None, "model"),
    "b1": P("model"),
    "w2": P("model", None),
    "b2": P(),
}


def init_params(key, d_in=32, hidden=128, d_out=8):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (d_in, hidden)) / np.sqrt(d_in),
        "b1": jnp.zeros((hidden,)),
        "w2": jax.random.normal(k2, (hidden, d_out)) / np.sqrt(hidden),
        "b2": jnp.zeros((d_out,)),
    }


def loss_fn(params, x, y, out_sharding=None):
    h = jax.nn.gelu(x @ params["w1"] + params["b1"])
    # On an Explicit mesh the second matmul contracts the split "model" axis,
    # so JAX asks where its result lives: back on the batch's sharding.
    out = jnp.matmul(h, params["w2"], out_sharding=out_sharding)
    return jnp.mean((out + params["b2"] - y) ** 2)


def make_step(tx, out_sharding=None):
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, out_sharding)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, oc.metrics(opt_state)

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--max-norm", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="a few steps (smoke test)")
    args = parser.parse_args(argv)
    steps = 5 if args.quick else args.steps
    if jax.device_count() < 8:
        raise SystemExit(
            f"needs 8 devices, found {jax.device_count()}; is XLA_FLAGS overridden?"
        )

    mesh = jax.make_mesh((4, 2), ("data", "model"))  # Explicit axes since JAX 0.9
    param_sharding = {k: NamedSharding(mesh, spec) for k, spec in PARAM_SPECS.items()}
    batch_sharding = NamedSharding(mesh, P("data", None))
    tx = optax.chain(oc.clip_by_global_norm(args.max_norm), optax.adamw(1e-2))

    params = init_params(jax.random.key(0))
    teacher = init_params(jax.random.key(1))
    sharded = jax.device_put(params, param_sharding)
    sharded_state = tx.init(sharded)
    local_state = tx.init(params)

    # Only an Explicit mesh (the default since JAX 0.9) takes an output
    # sharding for the matmul; on an Auto one XLA chooses it.
    explicit = all(t == AxisType.Explicit for t in mesh.axis_types)
    sharded_step = jax.jit(make_step(tx, batch_sharding if explicit else None))
    local_step = jax.jit(make_step(tx))  # unsharded inputs: runs on one device
    max_diff = 0.0
    for i in range(steps):
        x = jax.random.normal(jax.random.key(100 + i), (64, 32))
        y = jax.vmap(lambda xi: jnp.tanh(xi @ teacher["w1"]) @ teacher["w2"])(x)
        sharded, sharded_state, loss, logs = sharded_step(
            sharded,
            sharded_state,
            jax.device_put(x, batch_sharding),
            jax.device_put(y, batch_sharding),
        )
        params, local_state, _, local_logs = local_step(params, local_state, x, y)
        diff = max(
            float(jnp.max(jnp.abs(jax.device_get(a) - b)))
            for a, b in zip(
                jax.tree.leaves(sharded), jax.tree.leaves(params), strict=True
            )
        )
        max_diff = max(max_diff, diff)
        print(
            f"step {i:3d}  loss {float(loss):.4f}  "
            f"pre-clip norm {float(logs['clip/norm']):.4f} "
            f"(single device {float(local_logs['clip/norm']):.4f})"
        )

    preserved = all(
        sharded[k].sharding.is_equivalent_to(param_sharding[k], sharded[k].ndim)
        for k in PARAM_SPECS
    )
    print(f"mesh {dict(mesh.shape)}; param shardings preserved: {preserved}")
    print(f"max |sharded - single-device| over params: {max_diff:.2e}")
    return max_diff, preserved


if __name__ == "__main__":
    main()
