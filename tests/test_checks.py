"""Bad input, as a careless user types it: every error names the user's argument.

One table per kind of mistake: out-of-range preset arguments (reported under
the preset's own names, never a rule's field), concrete JAX / NumPy arrays
(checked like Python numbers), thresholds of the wrong shape or type, update
trees that do not match the state, and size parameters under
``optax.inject_hyperparams``.
"""

from __future__ import annotations

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
from optaxclip import rules

NAN = float("nan")

# (preset, bad keyword arguments, the argument the message must name, the
# value's text the message must show). Every argument of every preset
# appears at least once (checked below).
PRESET_ERRORS = [
    (oc.autoclip, dict(percentile=150), "percentile", "150"),
    (oc.autoclip, dict(percentile=-1.0), "percentile", "-1.0"),
    (oc.autoclip, dict(percentile=NAN), "percentile", "nan"),
    (oc.autoclip, dict(percentile="10"), "percentile", "'10'"),
    (oc.autoclip, dict(history=10.5), "history", "10.5"),
    (oc.autoclip, dict(history=0), "history", "0"),
    (oc.autoclip, dict(nonfinite="skip"), "nonfinite", "'skip'"),
    (oc.autoclip, dict(include_zeros="yes"), "include_zeros", "'yes'"),
    (oc.zclip, dict(alpha=1.5), "alpha", "1.5"),
    (oc.zclip, dict(z_thresh=-1), "z_thresh", "-1"),
    (oc.zclip, dict(z_thresh=0.0), "z_thresh", "0.0"),
    (oc.zclip, dict(max_grad_norm=-1.0), "max_grad_norm", "-1.0"),
    (oc.zclip, dict(eps=-1e-3), "eps", "-0.001"),
    (oc.zclip, dict(warmup_steps=0), "warmup_steps", "0"),
    (oc.zclip, dict(warmup_steps=2.5), "warmup_steps", "2.5"),
    (oc.zclip, dict(mode="median"), "mode", "'median'"),
    (oc.zclip, dict(clip_option="max"), "clip_option", "'max'"),
    (oc.zclip, dict(clip_factor=-2.0), "clip_factor", "-2.0"),
    (oc.zclip, dict(skip_update_on_spike="yes"), "skip_update_on_spike", "'yes'"),
    (oc.zclip, dict(nonfinite="nan"), "nonfinite", "'nan'"),
    (oc.adagc, dict(lambda_rel=-1), "lambda_rel", "-1"),
    (oc.adagc, dict(beta=1.5), "beta", "1.5"),
    (oc.adagc, dict(warmup_steps=-1), "warmup_steps", "-1"),
    (oc.adagc, dict(warmup_steps=1.5), "warmup_steps", "1.5"),
    (oc.adagc, dict(lambda_abs=-2.0), "lambda_abs", "-2.0"),
    (oc.adagc, dict(eps=-1.0), "eps", "-1.0"),
    (oc.adagc, dict(nonfinite=None), "nonfinite", "None"),
    (oc.adagc, dict(stacked_axes=-1), "stacked_axes", "-1"),
    (
        oc.olmo_adaptive_clip,
        dict(max_grad_norm_ratio=0.0),
        "max_grad_norm_ratio",
        "0.0",
    ),
    (oc.olmo_adaptive_clip, dict(beta=-0.5), "beta", "-0.5"),
    (oc.olmo_adaptive_clip, dict(eps=NAN), "eps", "nan"),
    (oc.olmo_adaptive_clip, dict(nonfinite="Zero"), "nonfinite", "'Zero'"),
    (oc.olmo_adaptive_clip, dict(stacked_axes=1.5), "stacked_axes", "1.5"),
    (oc.quantile_clip, dict(target_quantile=1.5), "target_quantile", "1.5"),
    (oc.quantile_clip, dict(learning_rate=-0.2), "learning_rate", "-0.2"),
    (oc.quantile_clip, dict(initial=0.0), "initial", "0.0"),
    (oc.quantile_clip, dict(initial=-1.0, geometric=False), "initial", "-1.0"),
    (oc.quantile_clip, dict(geometric="no"), "geometric", "'no'"),
    (oc.quantile_clip, dict(nonfinite=0), "nonfinite", "0"),
    (oc.spam_clip, dict(threshold=0.0), "threshold", "0.0"),
    (oc.spam_clip, dict(beta2=1.5), "beta2", "1.5"),
    (oc.spam_clip, dict(reset_interval=-5), "reset_interval", "-5"),
    (oc.spam_clip, dict(guard_steps=2.5), "guard_steps", "2.5"),
    (oc.spam_clip, dict(nonfinite="skip"), "nonfinite", "'skip'"),
    (oc.stable_spam_clip, dict(beta=1.0), "beta", "1.0"),
    (oc.stable_spam_clip, dict(beta=-0.1), "beta", "-0.1"),
    (oc.stable_spam_clip, dict(nonfinite="skip"), "nonfinite", "'skip'"),
    (oc.clippy, dict(relative=-0.1), "relative", "-0.1"),
    (oc.clippy, dict(absolute=-1e-7), "absolute", "-1e-07"),
    (oc.clippy, dict(nonfinite="skip"), "nonfinite", "'skip'"),
    (oc.trust_ratio_clip, dict(max_ratio=-0.01), "max_ratio", "-0.01"),
    (oc.trust_ratio_clip, dict(eps=-1e-3), "eps", "-0.001"),
    (oc.trust_ratio_clip, dict(nonfinite="skip"), "nonfinite", "'skip'"),
    *[
        (preset, dict(per_tensor_stats="yes"), "per_tensor_stats", "'yes'")
        for preset in [
            oc.autoclip,
            oc.zclip,
            oc.adagc,
            oc.olmo_adaptive_clip,
            oc.quantile_clip,
            oc.spam_clip,
            oc.stable_spam_clip,
            oc.clippy,
            oc.trust_ratio_clip,
        ]
    ],
]
PRESETS = sorted({p for p, *_ in PRESET_ERRORS}, key=lambda f: f.__name__)
# Any hashable names a mesh axis; any pytree prefix of PartitionSpec.
NOT_CHECKED = {"axis_name", "partition_specs"}


def _id(case):
    preset, kwargs, *_ = case
    return f"{preset.__name__}-{'-'.join(f'{k}={v!r}' for k, v in kwargs.items())}"


def _named(message: str) -> list[str]:
    return re.findall(r"`(\w+)`", message)


@pytest.mark.parametrize("case", PRESET_ERRORS, ids=[_id(c) for c in PRESET_ERRORS])
def test_preset_errors_name_the_presets_own_argument(case):
    preset, kwargs, argument, shown = case
    with pytest.raises(ValueError) as info:
        preset(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{preset.__name__}: "), message
    # The first (and only) argument named is the user's, not a rule field.
    assert _named(message)[0] == argument, message
    assert argument in inspect.signature(preset).parameters
    assert shown in message, message


def test_preset_error_table_covers_every_argument():
    for preset in PRESETS:
        covered = {arg for p, _, arg, _ in PRESET_ERRORS if p is preset}
        expected = set(inspect.signature(preset).parameters) - NOT_CHECKED
        assert covered == expected, (preset.__name__, expected - covered)


GUARD_ERRORS = [
    (lambda: oc.skip_spikes(optax.sgd(1.0), window=1), "skip_spikes", "window", "1"),
    (
        lambda: oc.skip_spikes(optax.sgd(1.0), window=8.0),
        "skip_spikes",
        "window",
        "8.0",
    ),
    (
        lambda: oc.skip_spikes(optax.sgd(1.0), sigma=-1.0),
        "skip_spikes",
        "sigma",
        "-1.0",
    ),
    (
        lambda: oc.skip_spikes(optax.sgd(1.0), min_history=2),
        "skip_spikes",
        "min_history",
        "2",
    ),
    (
        lambda: oc.skip_nonfinite(optax.sgd(1.0), max_consecutive=-1),
        "skip_nonfinite",
        "max_consecutive",
        "-1",
    ),
]


@pytest.mark.parametrize("make,owner,argument,shown", GUARD_ERRORS)
def test_guard_errors_name_the_argument(make, owner, argument, shown):
    with pytest.raises(ValueError) as info:
        make()
    message = str(info.value)
    assert message.startswith(f"{owner}: ") and _named(message)[0] == argument
    assert shown in message


# ---------------------------------------------------------------------------
# Concrete arrays are checked like numbers; traced ones are not
# ---------------------------------------------------------------------------

SCOPES = [
    (oc.clip_by_global_norm, "max_norm"),
    (oc.clip_by_norm, "max_norm"),
    (oc.clip_by_block_rms, "threshold"),
    (oc.clip_by_value, "max_delta"),
    (oc.clip, "max_delta"),
    (oc.adaptive_grad_clip, "clipping"),
    (oc.clip_per_example, "l2_norm_clip"),
    (oc.clip_by_spectral_norm, "max_norm"),
]
BAD_ARRAYS = [
    jnp.array(-1.0),
    jnp.array(-1, jnp.int32),
    np.array(-1.0),
    np.float32(-1.0),
    jnp.array(NAN),
    jnp.array(-np.inf),
    jnp.array(-1.0, jnp.bfloat16),
]


@pytest.mark.parametrize("bad", BAD_ARRAYS, ids=repr)
@pytest.mark.parametrize("scope,argument", SCOPES, ids=[s[0].__name__ for s in SCOPES])
def test_concrete_array_threshold_is_checked(scope, argument, bad):
    with pytest.raises(ValueError) as info:
        scope(bad)
    message = str(info.value)
    assert _named(message)[0] == argument
    assert repr(np.asarray(bad).tolist()) in message, message


@pytest.mark.parametrize(
    "make,argument,shown",
    [
        (lambda: oc.autoclip(percentile=jnp.array(150.0)), "percentile", "150.0"),
        (lambda: oc.zclip(z_thresh=np.array(-1.0)), "z_thresh", "-1.0"),
        (lambda: oc.adagc(lambda_rel=jnp.array(0.0)), "lambda_rel", "0.0"),
        (
            lambda: oc.quantile_clip(target_quantile=jnp.array(2.0)),
            "target_quantile",
            "2.0",
        ),
        (lambda: oc.spam_clip(beta2=jnp.array(1.5)), "beta2", "1.5"),
        (lambda: oc.stable_spam_clip(beta=jnp.array(1.0)), "beta", "1.0"),
        (lambda: oc.clippy(relative=jnp.array(-1.0)), "relative", "-1.0"),
        (lambda: oc.adaptive_grad_clip(0.1, eps=jnp.array(-1.0)), "eps", "-1.0"),
        (
            lambda: oc.skip_spikes(optax.sgd(1.0), sigma=jnp.array(-1.0)),
            "sigma",
            "-1.0",
        ),
        (lambda: rules.zscore(alpha=jnp.array(2.0)), "alpha", "2.0"),
        (lambda: rules.percentile(jnp.array(101.0)), "p", "101.0"),
        (lambda: rules.ema(warmup=jnp.array(2.5)), "warmup", "2.5"),
    ],
)
def test_concrete_array_hyperparameters_are_checked(make, argument, shown):
    with pytest.raises(ValueError) as info:
        make()
    message = str(info.value)
    assert _named(message)[0] == argument and shown in message, message


def test_concrete_valid_arrays_are_accepted_and_used():
    grads = {"a": jnp.array([3.0, 4.0])}
    for threshold in (
        jnp.array(1.0),
        np.array(1.0),
        np.float32(1.0),
        jnp.array(1.0, jnp.bfloat16),
        jnp.array(1.0, jnp.float16),
        jnp.array(1, jnp.int32),
        np.int64(1),
    ):
        tx = oc.clip_by_global_norm(threshold)
        out, _ = tx.update(grads, tx.init(grads))
        np.testing.assert_allclose(out["a"], [0.6, 0.8], rtol=1e-6)


@pytest.mark.parametrize("scope,argument", SCOPES, ids=[s[0].__name__ for s in SCOPES])
def test_traced_negative_threshold_acts_as_zero(scope, argument):
    # A traced value cannot be read at construction (documented): it is not
    # checked, and a negative bound acts as 0, as the docs say.
    del argument
    grads = {"w": jnp.array([[3.0, -4.0], [1.0, 2.0]])}
    is_agc = scope is oc.adaptive_grad_clip
    params = jax.tree.map(lambda x: x + 1.0, grads) if is_agc else None

    if is_agc:
        init = params
    elif scope is oc.clip_per_example:
        init = jax.tree.map(lambda x: x[0], grads)
    else:
        init = grads

    def step(bound):
        tx = scope(bound)
        return tx.update(grads, tx.init(init), params)[0]

    negative = jax.jit(step)(jnp.array(-1.0))
    zero = step(0.0)
    for a, b in zip(jax.tree.leaves(negative), jax.tree.leaves(zero), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, np.zeros_like(a))


def test_traced_hyperparameter_under_inject_hyperparams_is_not_checked():
    tx = optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=1.0)
    grads = {"a": jnp.array([3.0, 4.0])}
    state = tx.init(grads)
    state.hyperparams["max_norm"] = jnp.asarray(-1.0)
    out, _ = jax.jit(tx.update)(grads, state)
    np.testing.assert_array_equal(out["a"], [0.0, 0.0])


# ---------------------------------------------------------------------------
# Thresholds of the wrong shape or type
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [jnp.ones(3), np.ones((2, 2)), jnp.ones((1,))], ids=str)
@pytest.mark.parametrize("scope,argument", SCOPES, ids=[s[0].__name__ for s in SCOPES])
def test_threshold_of_wrong_shape_is_refused(scope, argument, bad):
    with pytest.raises(ValueError) as info:
        scope(bad)
    message = str(info.value)
    assert _named(message)[0] == argument
    assert "scalar" in message and str(tuple(bad.shape)) in message, message


def test_traced_threshold_of_wrong_shape_is_refused_at_trace_time():
    grads = {"a": jnp.array([3.0, 4.0])}

    def step(bound):
        tx = oc.clip_by_global_norm(bound)
        return tx.update(grads, tx.init(grads))[0]

    with pytest.raises(ValueError, match=r"`max_norm` must be a scalar.*\(3,\)"):
        jax.jit(step)(jnp.ones(3))


def test_schedule_of_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"`max_norm` is a schedule.*\(3,\)"):
        oc.clip_by_global_norm(lambda count: jnp.ones(3) + count.astype(jnp.float32))


RULE_CLASSES = [rules.zscore, rules.percentile, rules.ema, rules.quantile]


@pytest.mark.parametrize("rule", RULE_CLASSES, ids=lambda r: r.__name__)
@pytest.mark.parametrize("scope,argument", SCOPES, ids=[s[0].__name__ for s in SCOPES])
def test_rule_class_instead_of_instance(scope, argument, rule):
    with pytest.raises(TypeError) as info:
        scope(rule)
    message = str(info.value)
    assert _named(message)[0] == argument
    assert f"pass an instance: rules.{rule.__name__}()" in message, message


def test_valid_schedule_and_rule_are_still_accepted():
    grads = {"a": jnp.array([3.0, 4.0])}
    for threshold in (optax.constant_schedule(1.0), rules.zscore(), lambda c: 1.0):
        tx = oc.clip_by_global_norm(threshold)
        out, _ = tx.update(grads, tx.init(grads))
        np.testing.assert_allclose(out["a"], [0.6, 0.8], rtol=1e-6)


# ---------------------------------------------------------------------------
# Update trees that do not match the state
# ---------------------------------------------------------------------------

INIT_TREE = {"a": jnp.ones((2, 3)), "b": jnp.ones(4)}
FEWER = {"a": jnp.ones((2, 3))}
MORE = {"a": jnp.ones((2, 3)), "b": jnp.ones(4), "c": jnp.ones(2)}
RESHAPED = {"a": jnp.ones((3, 2)), "b": jnp.ones(5)}

# Transforms whose state holds one entry per tensor (or is shaped like the
# tree): a tree with another number of tensors is refused. For these with a
# second moment shaped like the tree, a change of shape too.
PER_TENSOR = [
    ("clip_by_norm", lambda: oc.clip_by_norm(1.0)),
    ("clip_by_norm_rule", lambda: oc.clip_by_norm(rules.ema())),
    ("clip_by_block_rms", lambda: oc.clip_by_block_rms(1.0)),
    ("adaptive_grad_clip", lambda: oc.adaptive_grad_clip(0.1)),
    ("adagc", oc.adagc),
    ("olmo_adaptive_clip", oc.olmo_adaptive_clip),
    ("spam_clip", oc.spam_clip),
    ("stable_spam_clip", oc.stable_spam_clip),
    ("clippy", oc.clippy),
    ("clip_by_spectral_norm", lambda: oc.clip_by_spectral_norm(1.0)),
]
SHAPED_LIKE_TREE = {"spam_clip"}
NEEDS_PARAMS = {"adaptive_grad_clip", "clippy"}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("other", [FEWER, MORE], ids=["fewer", "more"])
@pytest.mark.parametrize("name,make", PER_TENSOR, ids=[n for n, _ in PER_TENSOR])
def test_per_tensor_state_refuses_another_tree(name, make, other, jit):
    tx = make()
    state = tx.init(INIT_TREE)
    params = other if name in NEEDS_PARAMS else None
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError, match="initialized with") as info:
        update(other, state, params)
    assert "Call `init`" in str(info.value)


@pytest.mark.parametrize("name", sorted(SHAPED_LIKE_TREE))
def test_state_shaped_like_the_tree_refuses_other_shapes(name):
    tx = dict(PER_TENSOR)[name]()
    state = tx.init(INIT_TREE)
    with pytest.raises(ValueError, match=r"initialized with.*\['a'\].*\(2, 3\)"):
        tx.update(RESHAPED, state)
    with pytest.raises(ValueError, match=r"initialized with.*\['c'\]"):
        tx.update({"a": INIT_TREE["a"], "c": INIT_TREE["b"]}, state)


def test_stable_spam_state_does_not_grow_on_another_tree():
    # Before the check, one tensor's state broadcast against three tensors.
    tx = oc.stable_spam_clip()
    state = tx.init({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"stable_spam_clip: .*measured 3 .*holds 1"):
        tx.update({"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(2)}, state)


@pytest.mark.parametrize("name", sorted(NEEDS_PARAMS))
def test_params_of_another_tree_are_refused(name):
    tx = dict(PER_TENSOR)[name]()
    state = tx.init(INIT_TREE)
    with pytest.raises(ValueError, match=f"{name}: `params` must have the shapes"):
        tx.update(INIT_TREE, state, RESHAPED)
    with pytest.raises(ValueError, match=f"{name}: `params` must have the structure"):
        tx.update(INIT_TREE, state, FEWER)


# Transforms whose state does not depend on the tree (scalars only): any tree
# is valid and gives what a state initialized on it gives.
TREE_FREE = [
    ("clip_by_global_norm", lambda: oc.clip_by_global_norm(1.0)),
    (
        "clip_by_global_norm-per_tensor_stats",
        lambda: oc.clip_by_global_norm(1.0, per_tensor_stats=True),
    ),
    ("clip_by_value", lambda: oc.clip_by_value(0.5)),
    ("autoclip", oc.autoclip),
    ("zclip", oc.zclip),
    ("quantile_clip", oc.quantile_clip),
    ("skip_nonfinite", lambda: oc.skip_nonfinite(optax.sgd(1.0))),
    ("skip_spikes", lambda: oc.skip_spikes(optax.sgd(1.0))),
]


@pytest.mark.parametrize("name,make", TREE_FREE, ids=[n for n, _ in TREE_FREE])
def test_tree_free_state_accepts_any_tree(name, make):
    tx = make()
    other = {"x": jnp.array([3.0, -4.0, 12.0])}
    out, state = tx.update(other, tx.init(INIT_TREE))
    fresh, fresh_state = tx.update(other, tx.init(other))
    for a, b in zip(
        jax.tree.leaves((out, state)),
        jax.tree.leaves((fresh, fresh_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_clip_per_example_refuses_leaves_without_a_shared_batch_axis():
    tx = oc.clip_per_example(1.0)
    state = tx.init({"a": jnp.ones(3), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"clip_per_example.*\['b'\].*\(3,\)"):
        tx.update({"a": jnp.ones((4, 3)), "b": jnp.ones(3)}, state)


def test_guards_pass_the_inner_optimizers_own_check_through():
    # The guards' own state is tree-free; the wrapped optimizer's state is
    # checked by that optimizer (optax raises on a tree it was not built for).
    for guard in (oc.skip_nonfinite, oc.skip_spikes):
        tx = guard(optax.adam(1e-3))
        state = tx.init(INIT_TREE)
        with pytest.raises((ValueError, TypeError)):
            tx.update(FEWER, state, FEWER)


# ---------------------------------------------------------------------------
# Size parameters under optax.inject_hyperparams
# ---------------------------------------------------------------------------

# (factory, arguments, the size argument reported, static_args of the failing
# call: the sizes checked before it).
SIZES = [
    (oc.autoclip, dict(history=64), "history", ()),
    (oc.skip_spikes, dict(inner=optax.sgd(1.0), window=32), "window", ()),
    (
        oc.skip_spikes,
        dict(inner=optax.sgd(1.0), window=8, min_history=4),
        "min_history",
        ("window",),
    ),
]


@pytest.mark.parametrize(
    "factory,kwargs,argument,before", SIZES, ids=[s[2] for s in SIZES]
)
def test_size_under_inject_hyperparams_says_static_args(
    factory, kwargs, argument, before
):
    grads = {"a": jnp.array([3.0, 4.0])}
    inject = optax.inject_hyperparams
    with pytest.raises(ValueError) as info:
        inject(factory, static_args=before)(**kwargs).init(grads)
    message = str(info.value)
    assert message.startswith(f"{factory.__name__}: `{argument}`"), message
    assert str(kwargs[argument]) in message
    assert f"static_args=({argument!r},)" in message, message
    tx = inject(factory, static_args=(*before, argument))(**kwargs)
    out, _ = jax.jit(tx.update)(grads, tx.init(grads), grads)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))


@pytest.mark.parametrize(
    "make,argument,shown",
    [
        (
            lambda: rules.zscore(skip_update_on_spike="yes"),
            "skip_update_on_spike",
            "'yes'",
        ),
        (
            lambda: rules.zscore(skip_update_on_spike=np.ones(2, bool)),
            "skip_update_on_spike",
            "True",
        ),
        (lambda: rules.quantile(geometric=jnp.array(True)), "geometric", "True"),
        (lambda: rules.quantile(geometric=1), "geometric", "1"),
        (lambda: rules.percentile(window=jnp.array(8)), "window", "8"),
    ],
)
def test_rule_flags_and_sizes_are_checked(make, argument, shown):
    with pytest.raises(ValueError) as info:
        make()
    message = str(info.value)
    assert _named(message)[0] == argument and shown in message, message


def test_valid_flags_are_accepted():
    assert rules.zscore(skip_update_on_spike=jnp.array(True)).skip_update_on_spike
    assert rules.zscore(skip_update_on_spike=np.bool_(False)) is not None
    assert rules.quantile(geometric=False).geometric is False
