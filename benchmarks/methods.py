"""The clipping methods sections 2 and 3 put in front of adamw."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optax

import optaxclip as oc
from benchmarks.records import PER_TENSOR_STATS


class Method(NamedTuple):
    """One clip to benchmark, and what it is, for the report's ratios."""

    label: str  # the table's label (and the key the compile worker is given)
    library: str  # "optaxclip", "optax" or "none" (bare adamw)
    scope: str | None  # "value", "per-tensor", "global", "block RMS", "unit"
    rule: str | None  # an adaptive rule or preset; None: a fixed threshold
    build: Callable[[], optax.GradientTransformation]


BARE = "bare adamw"
GLOBAL_PER_TENSOR_STATS = "global, per_tensor_stats=True"
SPECTRAL = "spectral (clip_by_spectral_norm)"
SPECTRAL_SOFT = "spectral, mode=soft (SPECTRA)"

# Adaptive rules, built with their defaults (percentile with p=10, as AutoClip).
_RULES: dict[str, Callable[[Any], Any]] = {
    "percentile": lambda rule: rule(10.0),
    "zscore": lambda rule: rule(),
    "ema": lambda rule: rule(),
    "quantile": lambda rule: rule(),
}


def methods() -> list[Method]:
    """Every method, fixed thresholds first, then each rule at two scopes.

    Rules (and the AdaGC preset) are included where this version of
    optaxclip provides them.
    """
    out = [
        Method(BARE, "none", None, None, optax.identity),
        Method("value (clip_by_value)", "optaxclip", "value", None,
               lambda: oc.clip_by_value(1.0)),
        Method("per-tensor (clip_by_norm)", "optaxclip", "per-tensor", None,
               lambda: oc.clip_by_norm(1.0)),
        Method("global (clip_by_global_norm)", "optaxclip", "global", None,
               lambda: oc.clip_by_global_norm(1.0)),
        Method("block RMS (clip_by_block_rms)", "optaxclip", "block RMS", None,
               lambda: oc.clip_by_block_rms(1.0)),
        Method("AGC (adaptive_grad_clip)", "optaxclip", "unit", None,
               lambda: oc.adaptive_grad_clip(0.01)),
        Method(GLOBAL_PER_TENSOR_STATS, "optaxclip", "global", PER_TENSOR_STATS,
               lambda: oc.clip_by_global_norm(1.0, per_tensor_stats=True)),
        Method("optax.clip_by_global_norm", "optax", "global", None,
               lambda: optax.clip_by_global_norm(1.0)),
        Method("optax.clip_by_block_rms", "optax", "block RMS", None,
               lambda: optax.clip_by_block_rms(1.0)),
    ]  # fmt: skip
    for name, build in _RULES.items():
        rule = getattr(oc.rules, name, None)
        if rule is None:
            continue
        out.append(
            Method(f"global + rules.{name}", "optaxclip", "global", name,
                   lambda rule=rule, build=build: oc.clip_by_global_norm(build(rule)))
        )  # fmt: skip
        out.append(
            Method(f"per-tensor + rules.{name}", "optaxclip", "per-tensor", name,
                   lambda rule=rule, build=build: oc.clip_by_norm(build(rule)))
        )  # fmt: skip
    if hasattr(oc, "adagc"):
        out.append(Method("adagc()", "optaxclip", "per-tensor", "adagc", oc.adagc))
    if hasattr(oc, "clip_by_spectral_norm"):
        # One batched decomposition of the equally shaped kernels, read in
        # the report against the global clip's step.
        out += [
            Method(SPECTRAL, "optaxclip", "spectral", None,
                   lambda: oc.clip_by_spectral_norm(1.0)),
            Method(SPECTRAL_SOFT, "optaxclip", "spectral", "soft",
                   lambda: oc.clip_by_spectral_norm(1.0, mode="soft")),
        ]  # fmt: skip
    return out


def by_label() -> dict[str, Method]:
    """:func:`methods`, keyed by label."""
    return {m.label: m for m in methods()}
