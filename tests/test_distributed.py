"""Multi-device behaviour on 8 simulated CPU devices.

Every result is compared with the same computation on one device, unsharded:

* under ``jax.jit`` with gradients sharded by ``NamedSharding`` (replicated,
  FSDP-like first-axis sharding, 2-D tensor parallelism) every scope, rule,
  preset and guard, and per-example clipping, gives the same updates, stats
  and next state, keeps the sharding and leaves a state on the mesh, on
  meshes from ``jax.make_mesh`` as it comes (Explicit axes), with Explicit
  or Auto axes, and inside a mesh context (``jax.set_mesh``);
* inside ``jax.shard_map`` / ``jax.pmap``, ``axis_name`` (plus
  ``partition_specs`` for a mix of split and replicated leaves) makes the
  norms those of the whole tensors;
* ``stacked_axes`` clips each layer of a scan-stacked leaf like a separate
  tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip as oc
from optaxclip import _tree, rules
from tests.helpers import learning_rule_names

RTOL, ATOL = 1e-6, 1e-7


def rule_cases() -> dict:
    """Every threshold kind: a number, a schedule and each rule in ``rules``."""
    cases = {"number": 1.0, "schedule": optax.linear_schedule(3.0, 0.5, 4)}
    for name in learning_rule_names():
        obj = getattr(rules, name)
        names = {f.name for f in dataclasses.fields(obj)}
        # Short warm-ups so a few steps exercise the adaptive part.
        kwargs = {k: 2 for k in ("warmup", "window") if k in names}
        if "min_history" in names:
            kwargs["min_history"] = 3
        cases[name] = obj(**kwargs)
    return cases


RULES = rule_cases()

# (scope, threshold) pairs: every scope with a number, and every rule at the
# per-tensor scope (vector state) and the global scope (scalar state).
SCOPES = {
    "global": lambda t, **kw: oc.clip_by_global_norm(t, **kw),
    "global_inf": lambda t, **kw: oc.clip_by_global_norm(t, ord="inf", **kw),
    "tensor": lambda t, **kw: oc.clip_by_norm(t, **kw),
    "value": lambda t, **kw: oc.clip_by_value(t, **kw),
    "block_rms": lambda t, **kw: oc.clip_by_block_rms(t, **kw),
    "agc": lambda t, **kw: oc.adaptive_grad_clip(t, **kw),
    # "w" is the one matrix ("k" is one with stacked_axes, tested below).
    "spectral": lambda t, **kw: oc.clip_by_spectral_norm(t, **kw),
    "global_normalize": lambda t, **kw: oc.clip_by_global_norm(
        t, action="normalize", **kw
    ),
    "tensor_normalize": lambda t, **kw: oc.clip_by_norm(t, action="normalize", **kw),
}
NUMBER = {scope: ("number", 0.05 if scope == "agc" else 1.0) for scope in SCOPES}
FIXED_CASES = [(scope, "number") for scope in SCOPES]
RULE_CASES = {
    scope: [(scope, r) for r in RULES if r != "number"]
    for scope in ("global", "tensor")
}
# Presets and guards take no threshold: ("preset", name) and ("guard", name).
PRESETS = {
    "autoclip": lambda **kw: oc.autoclip(history=4, **kw),
    "zclip": lambda **kw: oc.zclip(warmup_steps=2, **kw),
    "adagc": lambda **kw: oc.adagc(warmup_steps=2, **kw),
    "olmo_adaptive_clip": lambda **kw: oc.olmo_adaptive_clip(**kw),
    "clip_update_rms": lambda **kw: oc.clip_update_rms(1.0, **kw),
    "quantile_clip": lambda **kw: oc.quantile_clip(**kw),
    "spam_clip": lambda **kw: oc.spam_clip(**kw),
    "stable_spam_clip": lambda **kw: oc.stable_spam_clip(**kw),
    # Not clipped on the first step, so the later bounds are far above 0.
    "adamw_clip": lambda **kw: oc.adamw_clip(warmup_steps=1, **kw),
    # clippy takes the largest ratio across devices: no partition_specs.
    "clippy": lambda partition_specs=None, **kw: oc.clippy(**kw),
    "trust_ratio_clip": lambda **kw: oc.trust_ratio_clip(0.5, **kw),
    "gradient_stabilizer": lambda **kw: oc.gradient_stabilizer(**kw),
}
GUARDS = {
    "skip_nonfinite": lambda **kw: oc.skip_nonfinite(
        optax.sgd(1e-2, momentum=0.9), **kw
    ),
    "skip_spikes": lambda **kw: oc.skip_spikes(
        optax.sgd(1e-2, momentum=0.9), window=4, min_history=3, **kw
    ),
    "skip_nonfinite_lazy": lambda **kw: oc.skip_nonfinite(
        optax.sgd(1e-2, momentum=0.9), lazy=True, **kw
    ),
    "skip_spikes_lazy": lambda **kw: oc.skip_spikes(
        optax.sgd(1e-2, momentum=0.9), window=4, min_history=3, lazy=True, **kw
    ),
}
PRESET_CASES = [("preset", name) for name in PRESETS]
GUARD_CASES = [("guard", name) for name in GUARDS]


ALL_CASES = (
    FIXED_CASES
    + RULE_CASES["global"]
    + RULE_CASES["tensor"]
    + PRESET_CASES
    + GUARD_CASES
)


def make_tx(case, **kw):
    scope, rule = case
    if scope == "preset":
        return PRESETS[rule](**kw)
    if scope == "guard":
        return GUARDS[rule](**kw)
    threshold = NUMBER[scope][1] if rule == "number" else RULES[rule]
    return SCOPES[scope](threshold, **kw)


def make_tree(seed: int, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    shapes = {"w": (16, 8), "b": (8,), "k": (8, 4, 8), "s": ()}
    return {
        k: jnp.asarray(scale * rng.standard_normal(s), jnp.float32)
        for k, s in shapes.items()
    }


# Gradient magnitudes vary so both clipped and unclipped steps occur.
GRADS = [make_tree(10 + i, scale) for i, scale in enumerate([0.001, 2.0, 0.003, 5.0])]
PARAMS = make_tree(0)


def assert_trees_close(actual, expected, what: str) -> None:
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert a_def == e_def, what
    for a, e in zip(a_leaves, e_leaves, strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(e), rtol=RTOL, atol=ATOL, err_msg=what
        )


def run_cases(cases, grads_seq, params, place=lambda t: t, **kw):
    """Runs the transforms of ``cases`` for all steps in one jitted function."""
    txs = {case: make_tx(case, **kw) for case in cases}

    @jax.jit
    def step(grads, states, params):
        out = {case: tx.update(grads, states[case], params) for case, tx in txs.items()}
        return {k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()}

    params = place(params)
    states = {case: tx.init(params) for case, tx in txs.items()}
    history = []
    for grads in grads_seq:
        updates, states = step(place(grads), states, params)
        history.append((updates, states))
    return history


@functools.cache
def reference():
    """Every case on one device, unsharded: the expected results."""
    return run_cases(ALL_CASES, GRADS, PARAMS)


def assert_matches_reference(history, cases, what):
    expected = reference()[: len(history)]
    for step, ((u_ref, s_ref), (u, s)) in enumerate(
        zip(expected, history, strict=True)
    ):
        for case in cases:
            assert_trees_close(
                u[case], u_ref[case], f"{what} {case} updates, step {step}"
            )
            assert_trees_close(
                s[case], s_ref[case], f"{what} {case} state, step {step}"
            )


# How the mesh is built: with Explicit axes (the default of ``jax.make_mesh``
# since JAX 0.9), with Auto axes, and with Explicit axes entered as the
# context mesh (``jax.set_mesh``; ``jax.sharding.use_mesh`` before it).
# ``jax.make_mesh`` as it comes is what the README snippet and
# examples/sharded_training.py use; their tests run them on 8 devices.
MESH_MODES = ["explicit", "auto", "context"]
_set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh


def make_mesh(shape, names, mode="auto") -> Mesh:
    kind = AxisType.Auto if mode == "auto" else AxisType.Explicit
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(names))


def mesh_1d(mode="auto") -> Mesh:
    return make_mesh((8,), ("data",), mode)


def mesh_2d(mode="auto") -> Mesh:
    return make_mesh((2, 4), ("data", "model"), mode)


def mesh_context(mesh, mode):
    return _set_mesh(mesh) if mode == "context" else contextlib.nullcontext()


LAYOUTS = {
    "replicated": (mesh_1d, {"w": P(), "b": P(), "k": P(), "s": P()}),
    "fsdp": (mesh_1d, {"w": P("data"), "b": P("data"), "k": P("data"), "s": P()}),
    "tensor_parallel": (
        mesh_2d,
        {
            "w": P("data", "model"),
            "b": P("model"),
            "k": P(None, "data", "model"),
            "s": P(),
        },
    ),
}


def test_eight_devices():
    assert len(jax.devices()) >= 8


def test_rule_cases_cover_every_rule():
    rule_types = set(learning_rule_names())
    assert rule_types <= set(RULES)
    for threshold in RULES.values():
        assert isinstance(rules.as_rule(threshold), rules.Rule)


def assert_state_on_mesh(state, mesh, params_sharding, what: str) -> None:
    """Every state leaf lives on the mesh's devices; a leaf shaped like a
    parameter (optimizer moments) has its sharding, the others (norms, rule
    statistics, counts) are replicated."""
    devices = set(mesh.devices.flat)
    by_shape = {}
    for k, sharding in params_sharding.items():
        by_shape.setdefault(PARAMS[k].shape, []).append(sharding)
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.device_set == devices, f"{what}: {leaf.sharding}"
        shardings = by_shape.get(leaf.shape, [])
        if leaf.ndim and shardings:
            assert (
                any(leaf.sharding.is_equivalent_to(sh, leaf.ndim) for sh in shardings)
                or leaf.sharding.is_fully_replicated
            ), f"{what}: {leaf.sharding}"
        else:
            assert leaf.sharding.is_fully_replicated, f"{what}: {leaf.sharding}"


# Every rule on the FSDP layout in every mode; the other layouts with both
# axis types (each case compiles every transform at once: the slowest tests).
NAMED_CASES = [("fsdp", mode) for mode in MESH_MODES] + [
    (layout, mode)
    for layout in ("replicated", "tensor_parallel")
    for mode in ("explicit", "auto")
]


@pytest.mark.parametrize("layout,mode", NAMED_CASES)
def test_named_sharding_matches_single_device(layout, mode):
    build, specs = LAYOUTS[layout]
    mesh = build(mode)
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}

    def place(tree):
        return {k: jax.device_put(v, shardings[k]) for k, v in tree.items()}

    # Every scope, preset and guard on every layout; every rule on the FSDP
    # layout at both the global and the tensor scope.
    cases = FIXED_CASES + PRESET_CASES + GUARD_CASES
    if layout == "fsdp":
        cases += RULE_CASES["global"] + RULE_CASES["tensor"]
    with mesh_context(mesh, mode):
        history = run_cases(cases, GRADS, PARAMS, place)
    assert_matches_reference(history, cases, f"{layout}/{mode}")
    for step, (updates, states) in enumerate(history):
        for case, tree in updates.items():
            for k, leaf in tree.items():
                assert leaf.sharding.is_equivalent_to(shardings[k], leaf.ndim), (
                    f"{case}: leaf {k} lost its sharding: {leaf.sharding}"
                )
            assert_state_on_mesh(
                states[case], mesh, shardings, f"{layout}/{mode} {case} step {step}"
            )
    # The steps exercised clipping and the pass-through branch.
    for case in FIXED_CASES:
        clipped = [int(np.sum(s[case].stats.clipped)) for _, s in history]
        assert max(clipped) > 0 and min(clipped) == 0, case


@pytest.mark.parametrize("mode", ["explicit", "context"])
def test_fresh_state_on_explicit_mesh_donates(mode):
    """``init`` outside ``jit`` on sharded params, then a donated jitted step."""
    mesh = mesh_1d(mode)
    specs = LAYOUTS["fsdp"][1]
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    grads = {k: jax.device_put(v, shardings[k]) for k, v in GRADS[1].items()}
    params = {k: jax.device_put(v, shardings[k]) for k, v in PARAMS.items()}
    for case in [("global", "number"), ("global", "percentile"), *PRESET_CASES]:
        tx = make_tx(case)
        with mesh_context(mesh, mode):
            state = tx.init(params)
            step = jax.jit(tx.update, donate_argnums=1)
            updates, state = step(grads, state, params)
            updates, state = step(grads, state, params)
        assert updates["w"].sharding.is_equivalent_to(shardings["w"], 2), case
        assert_state_on_mesh(state, mesh, shardings, f"{mode} {case}")


PER_EXAMPLE_LAYOUTS = {
    # Data parallel: the batch axis is split; FSDP: the first parameter axis.
    "batch": {"w": P("data"), "b": P("data"), "k": P("data"), "s": P("data")},
    "fsdp": {"w": P(None, "data"), "b": P(None, "data"), "k": P(), "s": P()},
    # Some leaves split on the batch axis, others replicated: the per-example
    # norms (and the finiteness flags) are split, and they meet replicated
    # leaves.
    "mixed": {"w": P("data"), "b": P("data"), "k": P(), "s": P()},
}


@pytest.mark.parametrize(
    "layout,mode",
    [("batch", mode) for mode in MESH_MODES]
    + [("fsdp", "explicit"), ("mixed", "explicit")],
)
def test_per_example_clipping_sharded_matches_single_device(layout, mode):
    """clip_per_example and the per-example drop-ins on sharded batches."""
    batch = 8
    rng = np.random.default_rng(7)
    # Example norms from about 0.1 to 10: some are clipped, some are not.
    factors = np.geomspace(0.005, 0.5, batch)
    per_example = {
        k: jnp.asarray(
            rng.standard_normal((batch, *v.shape))
            * factors.reshape((-1,) + (1,) * v.ndim),
            jnp.float32,
        )
        for k, v in PARAMS.items()
    }
    txs = {
        "number": oc.clip_per_example(1.0),
        "quantile": oc.clip_per_example(rules.quantile(initial=1.0)),
        "ema": oc.clip_per_example(rules.ema(warmup=1)),
    }

    def run(tree, params):
        out = {}
        for name, tx in txs.items():
            state = tx.init(params)
            for _ in range(2):
                summed, state = tx.update(tree, state)
            out[name] = (summed, state)
        out["global_fn"] = oc.per_example_global_norm_clip(list(tree.values()), 1.0)
        out["layer_fn"] = oc.per_example_layer_norm_clip(list(tree.values()), 2.0)
        return out

    expected = jax.jit(run)(per_example, PARAMS)
    mesh = mesh_1d(mode)
    specs = PER_EXAMPLE_LAYOUTS[layout]
    placed = {
        k: jax.device_put(v, NamedSharding(mesh, specs[k]))
        for k, v in per_example.items()
    }
    with mesh_context(mesh, mode):
        actual = jax.jit(run)(placed, PARAMS)
    assert_trees_close(actual, expected, f"per-example {layout}/{mode}")
    clipped = int(actual["number"][1].stats.clipped)
    assert 0 < clipped < batch


@pytest.mark.parametrize(
    "spec,flags_spec",
    [(P("data"), P()), (P(None, "data"), P()), (P(), P("data")), (P("data"), None)],
)
def test_constants_and_flags_carry_the_sharding_they_meet(spec, flags_spec):
    """Inside ``jit`` on an Explicit mesh with no mesh context (where
    ``jnp.ones_like`` drops the sharding on jax 0.12), the constants a step
    builds and a per-example flag broadcast against a leaf take the leaf's
    sharding; the zeroing select then runs and zeroes the flagged examples."""
    mesh = mesh_1d("explicit")
    values = np.arange(1.0, 129.0, dtype=np.float32).reshape(8, 16)
    keep = np.arange(8) % 3 != 0
    x = jax.device_put(jnp.asarray(values), NamedSharding(mesh, spec))
    flags = jnp.asarray(keep)
    if flags_spec is not None:
        flags = jax.device_put(flags, NamedSharding(mesh, flags_spec))

    def step(x, flags):
        one = _tree.full_like(x, 1)
        assert jax.typeof(one).sharding == jax.typeof(x).sharding
        zeroed = _tree.zero_unless(flags.reshape(8, 1), x)
        assert jax.typeof(zeroed).sharding == jax.typeof(x).sharding
        return zeroed + one

    out = jax.jit(step)(x, flags)
    np.testing.assert_array_equal(
        np.asarray(out), np.where(keep[:, None], values, 0) + 1
    )
    assert out.sharding.is_equivalent_to(x.sharding, 2)


def test_named_sharding_clipped_norm_is_exact():
    """A sharded gradient is clipped to exactly the global bound."""
    mesh = mesh_1d()
    grads = jax.device_put(
        jnp.arange(64.0, dtype=jnp.float32).reshape(16, 4),
        NamedSharding(mesh, P("data")),
    )
    tx = oc.clip_by_global_norm(1.0)
    clipped, state = jax.jit(tx.update)(grads, tx.init(grads))
    expected = np.linalg.norm(np.arange(64.0))
    np.testing.assert_allclose(float(state.stats.norm), expected, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(clipped)), 1.0, rtol=1e-6)
    assert clipped.sharding.is_equivalent_to(grads.sharding, 2)


# ---------------------------------------------------------------------------
# shard_map and pmap: axis_name and partition_specs
# ---------------------------------------------------------------------------

# Split along different dims: "w" along the unit axis of AGC (needs a psum),
# "k" along its last axis (AGC units are not split there), "b" and "s"
# replicated, as a bias is in tensor parallelism.
MIXED_SPECS = {"w": P("x"), "b": P(), "k": P(None, None, "x"), "s": P()}


def shard_map_cases(cases, specs, mesh, axis_name, grads_seq, **kw):
    """Runs ``cases`` inside one shard_map, all steps, states replicated."""
    txs = {case: make_tx(case, axis_name=axis_name, **kw) for case in cases}
    states = {case: tx.init(PARAMS) for case, tx in txs.items()}

    # Parameter-shaped parts of a state (SPAM's second moment, a guarded
    # optimizer's momentum) are split like the parameters; the rest is
    # replicated.
    def is_param_tree(x):
        return isinstance(x, dict) and set(x) == set(PARAMS)

    state_specs = jax.tree.map(
        lambda x: specs if is_param_tree(x) else P(), states, is_leaf=is_param_tree
    )
    update_specs = {case: specs for case in cases}

    @jax.jit
    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(specs, state_specs, specs),
        out_specs=(update_specs, state_specs),
    )
    def step(grads, states, params):
        out = {case: tx.update(grads, states[case], params) for case, tx in txs.items()}
        return {k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()}

    # On a mesh with Explicit axes the inputs' types must match in_specs:
    # every input is placed as its spec says (states replicated).
    def place(tree):
        return {
            k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()
        }

    states = jax.tree.map(
        lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)),
        states,
        state_specs,
        is_leaf=lambda x: isinstance(x, P),
    )
    params = place(PARAMS)
    history = []
    for grads in grads_seq:
        updates, states = step(place(grads), states, params)
        history.append((updates, states))
    return history


@pytest.mark.parametrize("mode", ["explicit", "auto"])
def test_shard_map_mixed_leaves_match_unsharded(mode):
    """Every scope and every rule, with split and replicated leaves."""
    mesh = make_mesh((8,), ("x",), mode)
    cases = FIXED_CASES + RULE_CASES["global"]
    history = shard_map_cases(
        cases, MIXED_SPECS, mesh, "x", GRADS, partition_specs=MIXED_SPECS
    )
    assert_matches_reference(history, cases, "shard_map")


@pytest.mark.parametrize("mode", ["explicit", "auto"])
def test_shard_map_presets_and_guards_match_unsharded(mode):
    """Every preset and guard takes axis_name: split leaves give the
    unsharded result, stats and state included."""
    mesh = make_mesh((8,), ("x",), mode)
    cases = PRESET_CASES + GUARD_CASES
    history = shard_map_cases(
        cases, MIXED_SPECS, mesh, "x", GRADS, partition_specs=MIXED_SPECS
    )
    assert_matches_reference(history, cases, "shard_map")


@pytest.mark.parametrize("mode", ["explicit", "auto"])
def test_shard_map_two_axes_matches_unsharded(mode):
    """A 2-D mesh with both axes named: each leaf is summed over its axes."""
    mesh = mesh_2d(mode)
    specs = LAYOUTS["tensor_parallel"][1]
    cases = [(s, "number") for s in ("tensor", "block_rms", "agc")]
    history = shard_map_cases(
        cases, specs, mesh, ("data", "model"), GRADS[:2], partition_specs=specs
    )
    assert_matches_reference(history, cases, "2-D shard_map")


def test_shard_map_axis_name_alone_counts_every_leaf_as_split():
    """Without partition_specs every leaf is taken as split across the axis."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    tree = {"w": GRADS[3]["w"], "k": GRADS[3]["k"]}
    specs = {"w": P("x"), "k": P(None, None, "x")}
    tx = oc.clip_by_global_norm(1.0, axis_name="x")
    fn = jax.shard_map(
        lambda g: tx.update(g, tx.init(g))[0],
        mesh=mesh,
        in_specs=(specs,),
        out_specs=specs,
        check_vma=False,
    )
    clipped = jax.jit(fn)(tree)
    ref = {k: np.asarray(v, np.float64) for k, v in tree.items()}
    norm = np.sqrt(sum(np.sum(v**2) for v in ref.values()))
    for k in tree:
        np.testing.assert_allclose(clipped[k], ref[k] / norm, rtol=1e-6, atol=ATOL)


def test_shard_map_replicated_leaf_needs_partition_specs():
    """A replicated leaf is counted once with specs, once per device without."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    tree = {"w": GRADS[1]["w"], "b": GRADS[1]["b"]}
    specs = {"w": P("x"), "b": P()}
    ref_w = np.sum(np.square(np.asarray(tree["w"], np.float64)))
    ref_b = np.sum(np.square(np.asarray(tree["b"], np.float64)))

    def norms(t):
        with_specs = oc.global_norm(t, axis_name="x", partition_specs=specs)
        without = oc.global_norm(t, axis_name="x")
        return with_specs, without

    fn = jax.shard_map(
        norms, mesh=mesh, in_specs=(specs,), out_specs=P(), check_vma=False
    )
    with_specs, without = jax.jit(fn)(tree)
    np.testing.assert_allclose(float(with_specs), np.sqrt(ref_w + ref_b), rtol=1e-6)
    np.testing.assert_allclose(float(without), np.sqrt(ref_w + 8 * ref_b), rtol=1e-6)


def test_shard_map_optax_local_norm_is_wrong_and_axis_name_fixes_it():
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    grads = jnp.asarray(np.random.default_rng(3).standard_normal((64, 4)), jnp.float32)

    def clip_with(tx):
        def f(g):
            return tx.update(g, tx.init(g))[0]

        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=P("x")))

    local = clip_with(optax.clip_by_global_norm(1.0))(grads)
    ours = clip_with(oc.clip_by_global_norm(1.0, axis_name="x"))(grads)
    assert np.linalg.norm(np.asarray(local)) > 2.0  # eight local norms of 1
    np.testing.assert_allclose(np.linalg.norm(np.asarray(ours)), 1.0, rtol=1e-6)


def test_pmap_matches_unsharded():
    """pmap: leaves split along axis 0, the scalar replicated (in_axes None)."""
    n = 8
    cases = [(s, "number") for s in ("global", "block_rms")]
    specs = {"w": P("d"), "b": P("d"), "k": P("d"), "s": P()}
    txs = {c: make_tx(c, axis_name="d", partition_specs=specs) for c in cases}
    states = {c: tx.init(PARAMS) for c, tx in txs.items()}
    in_axes = {"w": 0, "b": 0, "k": 0, "s": None}

    def split(t):
        return {
            k: v if in_axes[k] is None else v.reshape(n, -1, *v.shape[1:])
            for k, v in t.items()
        }

    def join(t):
        return {
            k: v[0] if in_axes[k] is None else v.reshape(-1, *v.shape[2:])
            for k, v in t.items()
        }

    def step(grads, states, params):
        return {c: tx.update(grads, states[c], params) for c, tx in txs.items()}

    fn = jax.pmap(step, axis_name="d", in_axes=(in_axes, None, in_axes), out_axes=0)
    for step_index, (grads, (u_ref, s_ref)) in enumerate(
        zip(GRADS, reference(), strict=True)
    ):
        out = fn(split(grads), states, split(PARAMS))
        for c in cases:
            updates, new_state = out[c]
            what = f"pmap {c}, step {step_index}"
            assert_trees_close(join(updates), u_ref[c], f"{what} updates")
            for device in range(n):
                assert_trees_close(
                    jax.tree.map(lambda x, i=device: x[i], new_state),
                    s_ref[c],
                    f"{what} state on device {device}",
                )
        states = {c: jax.tree.map(lambda x: x[0], out[c][1]) for c in cases}


# ---------------------------------------------------------------------------
# stacked_axes: scan-stacked layers clipped as separate tensors
# ---------------------------------------------------------------------------

N_LAYERS = 3


def stacked_tree(seed: int, scale: float) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "layers": {
            "kernel": jnp.asarray(
                scale * rng.standard_normal((N_LAYERS, 4, 3)), jnp.float32
            ),
            "bias": jnp.asarray(
                scale * rng.standard_normal((N_LAYERS, 3)), jnp.float32
            ),
        },
        "head": jnp.asarray(scale * rng.standard_normal((3, 2)), jnp.float32),
    }


def unstack(tree: dict) -> dict:
    out = dict(tree)
    out["layers"] = {
        k: [v[i] for i in range(N_LAYERS)] for k, v in tree["layers"].items()
    }
    return out


STACKED_SCOPES = {
    "tensor": lambda t, **kw: oc.clip_by_norm(t, **kw),
    "tensor_inf": lambda t, **kw: oc.clip_by_norm(t, ord="inf", **kw),
    "block_rms": lambda t, **kw: oc.clip_by_block_rms(t, **kw),
    "agc": lambda t, **kw: oc.adaptive_grad_clip(t, **kw),
}
STACKED_GRADS = [
    stacked_tree(s, sc) for s, sc in ((1, 0.2), (2, 3.0), (3, 1.0), (4, 0.5))
]
STACKED_PARAMS = stacked_tree(0, 1.0)


def run_stacked(txs: dict, pick, unstacked: bool):
    """All transforms of ``txs`` over STACKED_GRADS in one jitted function."""
    prep = unstack if unstacked else (lambda t: t)
    params = prep(pick(STACKED_PARAMS))

    @jax.jit
    def step(grads, states):
        out = {k: tx.update(grads, states[k], params) for k, tx in txs.items()}
        return {k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()}

    states = {k: tx.init(params) for k, tx in txs.items()}
    history = []
    for g in STACKED_GRADS:
        updates, states = step(prep(pick(g)), states)
        history.append((updates, states))
    return history


@pytest.mark.parametrize("prefix", [False, True])
def test_stacked_axes_equals_unstacked_layers(prefix):
    if prefix:  # a pytree prefix: only the layer stack has a layer axis
        stacked_axes = {"layers": 1, "head": 0}
        pick = dict
    else:  # an int for every leaf, on a tree of stacked leaves only
        stacked_axes = 1
        pick = lambda t: {"layers": t["layers"]}  # noqa: E731
    # Rules are elementwise over the norms; two of them check the state layout.
    if prefix:
        cases = [(s, "number") for s in STACKED_SCOPES]
        cases += [("tensor", r) for r in ("percentile", "ema") if r in RULES]
    else:
        cases = [("tensor", "number"), ("agc", "number")]

    def txs(**kw):
        return {
            (scope, r): STACKED_SCOPES[scope](
                (0.05 if scope == "agc" else 1.0) if r == "number" else RULES[r], **kw
            )
            for scope, r in cases
        }

    stacked = run_stacked(txs(stacked_axes=stacked_axes), pick, unstacked=False)
    plain = run_stacked(txs(), pick, unstacked=True)
    for step, ((u_s, s_s), (u_p, s_p)) in enumerate(zip(stacked, plain, strict=True)):
        for case in cases:
            what = f"{case} step {step}"
            assert_trees_close(unstack(u_s[case]), u_p[case], f"{what} updates")
            if case[0] != "agc":  # AGC records one entry per leaf, not per unit
                assert_trees_close(s_s[case], s_p[case], f"{what} state")
    n_norms = 2 * N_LAYERS + (1 if prefix else 0)
    assert stacked[0][1][("tensor", "number")].stats.norm.shape == (n_norms,)


def test_stacked_axes_differ_from_whole_stack():
    """Without stacked_axes the layer stack is one tensor: a different result."""
    grads = {"layers": STACKED_GRADS[1]["layers"]}
    tx_whole, tx_layers = oc.clip_by_norm(1.0), oc.clip_by_norm(1.0, stacked_axes=1)
    whole = tx_whole.update(grads, tx_whole.init(grads))[0]["layers"]["kernel"]
    layers = tx_layers.update(grads, tx_layers.init(grads))[0]["layers"]["kernel"]
    assert not np.allclose(np.asarray(whole), np.asarray(layers))
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(layers).reshape(N_LAYERS, -1), axis=1),
        np.ones(N_LAYERS),
        rtol=1e-6,
    )


def test_stacked_axes_rejects_bad_values():
    with pytest.raises(ValueError, match="stacked_axes"):
        oc.clip_by_norm(1.0, stacked_axes=-1)
    tx = oc.clip_by_norm(1.0, stacked_axes=3)
    with pytest.raises(ValueError, match="stacked_axes"):
        tx.init({"w": jnp.zeros((2, 2))})


def test_shard_map_overflowing_total_is_exact_across_devices():
    """Each device's sum of squares is finite, the psum of them overflows:
    the scaled sum travels in the same collective and gives the exact norm."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    specs = {"w": P("x"), "b": P()}
    tree = {
        "w": jnp.full((256, 4), 1e18, jnp.float32),
        "b": jnp.full((8,), 1e18, jnp.float32),
    }
    limit = float(np.finfo(np.float32).max)
    assert 1e36 * (256 * 4 // 8 + 8) < limit  # one device's partial sum
    expected = np.sqrt(1e36 * (256 * 4 + 8))
    assert expected**2 > limit

    fn = jax.shard_map(
        lambda t: oc.global_norm(t, axis_name="x", partition_specs=specs),
        mesh=mesh,
        in_specs=(specs,),
        out_specs=P(),
        check_vma=False,
    )
    np.testing.assert_allclose(float(jax.jit(fn)(tree)), expected, rtol=1e-5)


@pytest.mark.parametrize("mode", ["explicit", "auto"])
def test_stacked_axes_split_over_mesh_match_single_device(mode):
    """Scan-stacked layers split over the mesh along the layer axis: one norm
    per layer, each its own shard's, recorded in a replicated state."""
    rng = np.random.default_rng(5)
    layers = 8
    grads = [
        {
            "kernel": jnp.asarray(
                rng.standard_normal((layers, 4, 3))
                * np.geomspace(0.05, 5.0, layers).reshape(-1, 1, 1),
                jnp.float32,
            ),
            "head": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
        }
        for _ in range(3)
    ]
    txs = {
        "number": oc.clip_by_norm(1.0, stacked_axes={"kernel": 1, "head": 0}),
        "percentile": oc.clip_by_norm(
            rules.percentile(50.0, window=4), stacked_axes={"kernel": 1, "head": 0}
        ),
        "block_rms": oc.clip_by_block_rms(0.3, stacked_axes={"kernel": 1, "head": 0}),
        "agc": oc.adaptive_grad_clip(0.05, stacked_axes={"kernel": 1, "head": 0}),
    }

    def run(seq, params):
        out = []
        states = {k: tx.init(params) for k, tx in txs.items()}
        step = jax.jit(
            lambda g, s: {k: tx.update(g, s[k], params) for k, tx in txs.items()}
        )
        for g in seq:
            res = step(g, states)
            states = {k: v[1] for k, v in res.items()}
            out.append(res)
        return out

    expected = run(grads, grads[0])
    mesh = mesh_1d(mode)
    shardings = {
        "kernel": NamedSharding(mesh, P("data")),
        "head": NamedSharding(mesh, P()),
    }

    def place(t):
        return {k: jax.device_put(v, shardings[k]) for k, v in t.items()}

    with mesh_context(mesh, mode):
        actual = run([place(g) for g in grads], place(grads[0]))
    assert_trees_close(actual, expected, f"stacked {mode}")
    for res in actual:
        for _, (updates, state) in res.items():
            assert updates["kernel"].sharding.is_equivalent_to(shardings["kernel"], 3)
            for leaf in jax.tree.leaves(state):
                assert leaf.sharding.is_fully_replicated, leaf.sharding
    assert 0 < int(actual[0]["number"][1].stats.clipped) < layers


PER_TENSOR_STATS_CASES = {
    "global": lambda: oc.clip_by_global_norm(1.0, per_tensor_stats=True),
    "value": lambda: oc.clip_by_value(0.5, per_tensor_stats=True),
    "zclip": lambda: oc.zclip(per_tensor_stats=True),
    "skip_spikes": lambda: oc.skip_spikes(optax.sgd(0.1), per_tensor_stats=True),
}


@pytest.mark.parametrize("layout", ["fsdp", "tensor_parallel"])
@pytest.mark.parametrize("mode", ["explicit", "auto"])
def test_per_tensor_stats_are_replicated_and_equal_one_device(layout, mode):
    build, specs = LAYOUTS[layout]
    mesh = build(mode)
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}

    def place(tree):
        return {k: jax.device_put(v, shardings[k]) for k, v in tree.items()}

    def run(txs, place):
        @jax.jit
        def step(grads, states, params):
            out = {k: tx.update(grads, states[k], params) for k, tx in txs.items()}
            return {k: v[1] for k, v in out.items()}

        params = place(PARAMS)
        states = {k: tx.init(params) for k, tx in txs.items()}
        bad = dict(GRADS[1], k=GRADS[1]["k"].at[0, 0, 0].set(jnp.nan))
        for grads in [*GRADS[:2], bad]:
            states = step(place(grads), states, params)
        return states

    txs = {k: make() for k, make in PER_TENSOR_STATS_CASES.items()}
    expected = run(txs, lambda t: t)
    with mesh_context(mesh, mode):
        got = run(txs, place)
    for k in txs:
        (s_ref,), (s,) = oc.stats(expected[k]), oc.stats(got[k])
        assert s.tensor_norms.sharding.is_fully_replicated, k
        assert s.tensor_norms.shape == (len(PARAMS),)
        np.testing.assert_allclose(
            np.asarray(s.tensor_norms),
            np.asarray(s_ref.tensor_norms),
            rtol=RTOL,
            err_msg=k,
        )
        assert oc.nonfinite_paths(got[k], PARAMS) == ["k"], k
        logs = oc.metrics(got[k], PARAMS, host=True, per_tensor=True)
        ref = oc.metrics(expected[k], PARAMS, host=True, per_tensor=True)
        assert logs.keys() == ref.keys()
        np.testing.assert_allclose(list(logs.values()), list(ref.values()), rtol=RTOL)


@pytest.mark.parametrize("mode", ["explicit", "auto"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: oc.clip_by_value(0.5),
        lambda: oc.clip_by_global_norm(1.0, ord="inf"),
        lambda: oc.stable_spam_clip(),
        lambda: oc.adaptive_grad_clip(0.1),
        lambda: oc.clippy(),
    ],
    ids=["value", "global_inf", "stable_spam", "agc", "clippy"],
)
def test_a_nan_in_one_shard_is_seen_by_every_maximum(make, mode):
    # A maximum split across devices may drop a NaN (the collective's max
    # does not propagate it): the step must still be zeroed and counted.
    mesh = mesh_1d(mode)
    shardings = {k: NamedSharding(mesh, s) for k, s in LAYOUTS["fsdp"][1].items()}
    bad = dict(GRADS[1], k=GRADS[1]["k"].at[5, 0, 0].set(jnp.nan))
    tx = make()
    params = {k: jax.device_put(v, shardings[k]) for k, v in PARAMS.items()}
    grads = {k: jax.device_put(v, shardings[k]) for k, v in bad.items()}
    with mesh_context(mesh, mode):
        out, state = jax.jit(tx.update)(grads, tx.init(params), params)
    (s,) = oc.stats(state)
    assert int(s.nonfinite_count) == 1
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(out))
    assert oc.nonfinite_paths(state, PARAMS) == ["k"]


# ---------------------------------------------------------------------------
# The normalize action and GradientStabilizer, on their own
# ---------------------------------------------------------------------------

NORMALIZE_CASES = [
    ("global_normalize", "number"),
    ("tensor_normalize", "number"),
    ("tensor_normalize", "mean_over_rms"),
    ("preset", "gradient_stabilizer"),
]


@functools.cache
def normalize_reference():
    return run_cases(NORMALIZE_CASES, GRADS, PARAMS)


def assert_normalize_matches(history, what):
    for step, ((u_ref, s_ref), (u, s)) in enumerate(
        zip(normalize_reference(), history, strict=True)
    ):
        for case in NORMALIZE_CASES:
            assert_trees_close(u[case], u_ref[case], f"{what} {case} step {step}")
            assert_trees_close(s[case], s_ref[case], f"{what} {case} step {step}")


@pytest.mark.parametrize(
    "layout,mode", [("fsdp", "explicit"), ("tensor_parallel", "auto")]
)
def test_normalize_and_stabilizer_sharded_match_single_device(layout, mode):
    build, specs = LAYOUTS[layout]
    mesh = build(mode)
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}

    def place(tree):
        return {k: jax.device_put(v, shardings[k]) for k, v in tree.items()}

    history = run_cases(NORMALIZE_CASES, GRADS, PARAMS, place)
    assert_normalize_matches(history, f"{layout}/{mode}")
    for updates, states in history:
        for case, tree in updates.items():
            for k, leaf in tree.items():
                assert leaf.sharding.is_equivalent_to(shardings[k], leaf.ndim), case
            assert_state_on_mesh(states[case], mesh, shardings, f"{case}")
    # Norms were set both down and up.
    scales = np.concatenate(
        [np.ravel(s[c].stats.scale) for _, s in history for c in NORMALIZE_CASES]
    )
    assert np.any(scales > 1.0) and np.any(scales < 1.0)


@pytest.mark.parametrize("mode", ["explicit", "auto"])
def test_normalize_and_stabilizer_in_shard_map_match_unsharded(mode):
    mesh = make_mesh((8,), ("x",), mode)
    history = shard_map_cases(
        NORMALIZE_CASES, MIXED_SPECS, mesh, "x", GRADS, partition_specs=MIXED_SPECS
    )
    assert_normalize_matches(history, "shard_map")


# ---------------------------------------------------------------------------
# Lazy guards: the skipped branch's zeros on a mesh
# ---------------------------------------------------------------------------


def _stream_with_skips() -> list:
    grads = [make_tree(40 + i) for i in range(6)]
    grads[3] = jax.tree.map(lambda x: 1e4 * x, grads[3])  # a spike
    grads[4]["w"] = grads[4]["w"].at[2, 3].set(jnp.nan)  # a non-finite step
    return grads


@pytest.mark.parametrize(
    "layout,mode",
    [("fsdp", "explicit"), ("fsdp", "context"), ("tensor_parallel", "auto")],
)
def test_lazy_guards_sharded_match_one_device_and_select(layout, mode):
    """Skipped steps under ``lax.cond``: zeros carrying the updates' sharding
    on meshes from ``jax.make_mesh`` with Explicit and with Auto axes; the
    results equal one device and the select mode."""
    build, specs = LAYOUTS[layout]
    mesh = build(mode)
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}

    def place(tree):
        return {k: jax.device_put(v, shardings[k]) for k, v in tree.items()}

    grads = _stream_with_skips()
    cases = [("guard", "skip_spikes_lazy"), ("guard", "skip_nonfinite_lazy")]
    cases += [("guard", "skip_spikes")]
    expected = run_cases(cases, grads, PARAMS)
    with mesh_context(mesh, mode):
        actual = run_cases(cases, grads, PARAMS, place)
    for step, ((u_ref, s_ref), (u, s)) in enumerate(zip(expected, actual, strict=True)):
        for case in cases:
            what = f"{layout}/{mode} {case} step {step}"
            assert_trees_close(u[case], u_ref[case], what)
            assert_trees_close(s[case], s_ref[case], what)
            for k, leaf in u[case].items():
                assert leaf.sharding.is_equivalent_to(shardings[k], leaf.ndim), what
        lazy, select = s[cases[0]], s[cases[2]]
        assert_trees_close(lazy, select, f"lazy against select, step {step}")
    skipped = [int(s[cases[0]].skipped) for _, s in actual]
    assert skipped[-1] == 2 and skipped[2] == 0, skipped
    assert int(actual[-1][1][cases[1]].skipped) == 1


# ---------------------------------------------------------------------------
# Spectral clipping of stacked matrices ("w" and each layer of "k"), exact
# and soft: sharded equals one device
# ---------------------------------------------------------------------------

SPECTRAL_STACK = {"w": 0, "b": 0, "k": 1, "s": 0}


def _spectral(mode, **kw):
    return oc.clip_by_spectral_norm(1.0, mode=mode, stacked_axes=SPECTRAL_STACK, **kw)


def _run_spectral(tx, place=lambda t: t, step_fn=None):
    step = step_fn or jax.jit(tx.update)
    state, history = jax.tree.map(place, tx.init(PARAMS)), []
    for grads in GRADS:
        updates, state = step(place(grads), state)
        history.append((updates, state))
    return history


def _assert_spectral_close(history, expected, mode, what):
    # Under Auto axes XLA may split the Newton-Schulz products, which reorders
    # their sums: soft mode equals one device within their float32 rounding.
    rtol, atol = {"exact": (RTOL, ATOL), "soft": (1e-5, 1e-6)}[mode]
    for (u, s), (u_ref, s_ref) in zip(history, expected, strict=True):
        pairs = zip(
            jax.tree.leaves((u, s)), jax.tree.leaves((u_ref, s_ref)), strict=True
        )
        for a, e in pairs:
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(e), rtol, atol, err_msg=what
            )


# The scope runs on every named layout in `SCOPES` (one 2-D leaf); stacked
# matrices in both modes on one Explicit and one Auto mesh of each layout
# that splits them.
SPECTRAL_CASES = [
    ("fsdp", "explicit", "exact"),
    ("fsdp", "auto", "soft"),
    ("tensor_parallel", "explicit", "soft"),
    ("tensor_parallel", "auto", "exact"),
]


@pytest.mark.parametrize("layout,mode,spectral_mode", SPECTRAL_CASES)
def test_spectral_clip_of_stacked_matrices_sharded_matches_single_device(
    layout, mode, spectral_mode
):
    expected = _run_spectral(_spectral(spectral_mode))
    build, specs = LAYOUTS[layout]
    mesh = build(mode)
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}

    def place(tree):
        if isinstance(tree, dict) and set(tree) == set(shardings):
            return {k: jax.device_put(v, shardings[k]) for k, v in tree.items()}
        return tree

    with mesh_context(mesh, mode):
        history = _run_spectral(_spectral(spectral_mode), place)
    _assert_spectral_close(history, expected, spectral_mode, f"{layout}/{mode}")
    for updates, _ in history:
        for k, leaf in updates.items():
            assert leaf.sharding.is_equivalent_to(shardings[k], leaf.ndim), k
    clipped = [int(s.stats.clipped) for _, s in history]
    assert max(clipped) == 9 and min(clipped) == 0  # "w" and 8 layers of "k"


@pytest.mark.parametrize(
    "mode,spectral_mode", [("explicit", "exact"), ("auto", "soft")]
)
def test_spectral_clip_in_shard_map_matches_single_device(mode, spectral_mode):
    """Split matrices are gathered for their clip, then split again."""
    expected = _run_spectral(_spectral(spectral_mode))
    mesh = make_mesh((8,), ("x",), mode)
    tx = _spectral(spectral_mode, axis_name="x", partition_specs=MIXED_SPECS)
    state_specs = jax.tree.map(lambda _: P(), tx.init(PARAMS))
    step = jax.jit(
        jax.shard_map(
            tx.update,
            mesh=mesh,
            in_specs=(MIXED_SPECS, state_specs),
            out_specs=(MIXED_SPECS, state_specs),
        )
    )

    def place(tree):
        if isinstance(tree, dict) and set(tree) == set(MIXED_SPECS):
            return {
                k: jax.device_put(v, NamedSharding(mesh, MIXED_SPECS[k]))
                for k, v in tree.items()
            }
        return jax.device_put(tree, NamedSharding(mesh, P()))

    history = _run_spectral(tx, place, step)
    _assert_spectral_close(history, expected, spectral_mode, f"shard_map/{mode}")


def test_spectral_axis_name_needs_partition_specs():
    with pytest.raises(ValueError, match="axis_name.*partition_specs"):
        oc.clip_by_spectral_norm(1.0, axis_name="x")
