"""Choosing a fixed threshold from a recorded history of gradient norms.

Every optaxclip transform keeps the pre-clip norm of its latest step in
[`ClipStats`][optaxclip.ClipStats]; record ``oc.stats(opt_state)[0].norm`` during a
short run (or a run without clipping) and pass the history here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "ThresholdReport",
    "plot_norm_history",
    "plot_tensor_norms",
    "suggest_threshold",
]

REPORTED_PERCENTILES = (1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0)


@dataclasses.dataclass(frozen=True)
class ThresholdReport:
    """What [`suggest_threshold`][optaxclip.suggest_threshold] found; ``print()`` it for
    a summary.

    Attributes:
      threshold: the suggested fixed threshold (the ``percentile``-th
        percentile of the finite recorded norms).
      percentile: the percentile the suggestion is taken at.
      clipped_fraction: the fraction of the finite recorded steps whose norm
        is above ``threshold``, i.e. that a fixed clip at ``threshold`` would
        have rescaled.
      percentiles: the norm at each of the percentiles 1, 5, 10, 25, 50, 75,
        90, 95 and 99 (and at ``percentile``), as ``{percentile: norm}``.
      num_steps: the number of recorded steps, finite or not.
      num_nonfinite: how many of them were NaN or infinite (left out of every
        statistic, as optaxclip's rules leave them out).
      max_norm: the largest finite norm recorded.
      reasoning: a human-readable explanation of the suggestion.
    """

    threshold: float
    percentile: float
    clipped_fraction: float
    percentiles: dict[float, float]
    num_steps: int
    num_nonfinite: int
    max_norm: float
    reasoning: str

    def __str__(self) -> str:
        rows = [f"gradient-norm history: {self.num_steps} steps"]
        if self.num_nonfinite:
            rows[0] += f" ({self.num_nonfinite} non-finite, left out)"
        for p, v in self.percentiles.items():
            rows.append(f"  p{p:<5g} {v:.4g}")
        rows.append(f"  max    {self.max_norm:.4g}")
        rows.append(f"suggested threshold: {self.threshold:.4g}")
        rows.append(self.reasoning)
        return "\n".join(rows)


def suggest_threshold(norms: Any, percentile: float = 10.0) -> ThresholdReport:
    """Suggests a fixed clipping threshold from a history of gradient norms.

    The suggestion is the rule of AutoClip: clip at the ``percentile``-th
    percentile of the norms seen so far (10 in the paper), which rescales most
    steps a little and the outliers a lot. The report also gives the spread of
    the history, so a threshold that only catches spikes (e.g. the 90th or
    99th percentile) can be read off it. NaN and infinite entries are counted
    and left out.

    Args:
      norms: a 1-D sequence or array of pre-clip gradient norms, one per step,
        e.g. ``[float(oc.stats(state)[0].norm) for state in states]`` or a
        stacked ``ClipStats.norm`` recorded inside ``lax.scan``.
      percentile: the percentile of the history to suggest, in ``[0, 100]``.

    Returns:
      A [`ThresholdReport`][optaxclip.ThresholdReport] (``print()`` it for a summary).

    Raises:
      ValueError: if ``percentile`` is outside ``[0, 100]``, or ``norms`` is
        not 1-D, has negative entries, or has no finite entry.

    Example:
      >>> import numpy as np
      >>> import optaxclip as oc
      >>> norms = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 50.0, np.nan])
      >>> report = oc.suggest_threshold(norms, percentile=50.0)
      >>> print(report.threshold, report.clipped_fraction, report.num_nonfinite)
      5.5 0.5 1

    References:
      Seetharaman et al., [AutoClip: Adaptive Gradient Clipping for Source
      Separation Networks](https://arxiv.org/abs/2007.14469), 2020.
    """
    percentile = _check_percentile(percentile)
    values = _as_history(norms, "norms")
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ValueError(
            f"`norms` has no finite entry ({values.size} entries, all NaN or "
            "infinite); record the norms of some finite steps first."
        )
    if np.any(finite < 0):
        raise ValueError(
            f"`norms` must be non-negative; got a smallest entry of {finite.min()!r}."
        )
    levels = sorted({*REPORTED_PERCENTILES, percentile})
    quantiles = np.percentile(finite, levels)
    table = {float(p): float(v) for p, v in zip(levels, quantiles, strict=True)}
    threshold = table[percentile]
    clipped = float(np.mean(finite > threshold))
    median = table[50.0]
    max_norm = float(finite.max())
    reasoning = _reasoning(
        percentile, threshold, clipped, median, max_norm, finite.size
    )
    return ThresholdReport(
        threshold=threshold,
        percentile=percentile,
        clipped_fraction=clipped,
        percentiles=table,
        num_steps=int(values.size),
        num_nonfinite=int(values.size - finite.size),
        max_norm=max_norm,
        reasoning=reasoning,
    )


def plot_norm_history(
    norms: Any,
    path: str,
    thresholds: Any = None,
) -> str:
    """Draws the norm history (time series and histogram) to an image file.

    Left: the norm at every step on a log scale, with the threshold(s) over
    it. Right: the histogram of the log norms, with the threshold(s) as
    vertical lines. Non-finite steps are marked along the bottom of the
    time series.

    Args:
      norms: a 1-D sequence or array of gradient norms, one per step.
      path: the file to write (the format follows the extension, e.g. PNG).
      thresholds: ``None``; a number (a fixed threshold); a 1-D array with one
        threshold per step (e.g. the recorded ``ClipStats.threshold`` of an
        adaptive rule); or a mapping from a label to either.

    Returns:
      ``path``.

    Raises:
      ImportError: if matplotlib is not installed.
      ValueError: if ``norms`` is not 1-D or a per-step threshold array does
        not have one entry per step.

    Example:
      >>> import os, tempfile
      >>> import numpy as np
      >>> import optaxclip as oc
      >>> norms = np.exp(np.random.default_rng(0).normal(size=200))
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     out = os.path.join(folder, "norms.png")
      ...     path = oc.plot_norm_history(norms, out, {"p10": 0.3, "fixed": 1.0})
      ...     print(path == out, os.path.getsize(out) > 0)
      True True
    """
    values = _as_history(norms, "norms")
    lines = _threshold_lines(thresholds, values.size)
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "plot_norm_history needs matplotlib: `pip install matplotlib` "
            "(or `pip install optaxclip[examples]`)."
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(values.size)
    finite = np.isfinite(values) & (values > 0)
    fig, (ax_t, ax_h) = plt.subplots(
        1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [2, 1]}
    )
    ax_t.plot(steps[finite], values[finite], lw=0.7, color="C0", label="norm")
    bad = ~np.isfinite(values)
    if bad.any():
        low = values[finite].min() if finite.any() else 1.0
        ax_t.plot(
            steps[bad], np.full(bad.sum(), low), "x", color="k", label="non-finite"
        )
    logs = np.log10(values[finite]) if finite.any() else np.zeros(0)
    ax_h.hist(logs, bins=40, color="C0", alpha=0.8)
    marked = False
    for i, (label, line) in enumerate(lines.items()):
        color = f"C{(i + 1) % 10}"
        if np.ndim(line) == 0:
            ax_t.axhline(line, color=color, lw=1.2, label=label)
            if line > 0:
                ax_h.axvline(np.log10(line), color=color, lw=1.2, label=label)
                marked = True
        else:
            ax_t.plot(steps, line, color=color, lw=1.0, label=label)
    ax_t.set_yscale("log")
    ax_t.set_xlabel("step")
    ax_t.set_ylabel("gradient norm")
    ax_t.legend(fontsize=8, loc="upper right")
    ax_h.set_xlabel("log10 gradient norm")
    ax_h.set_ylabel("steps")
    if marked:
        ax_h.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tensor_norms(
    norms: Any,
    path: str,
    names: Any = None,
    clipped: Any = None,
) -> str:
    """Draws per-tensor gradient norms over steps as a heatmap (tensors x steps).

    Each row is a tensor, each column a step, the colour its log10 norm;
    non-finite norms are drawn black, and the steps marked in ``clipped``
    get a tick along the top. Record the rows from ``oc.stats(state)[0]``
    (``tensor_norms`` of a clip built with ``per_tensor_stats=True``, or
    ``norm`` of a per-tensor clip) or from the per-tensor keys of
    [`metrics`][optaxclip.metrics].

    Args:
      norms: a 2-D array, one row per step and one column per tensor.
      path: the file to write (the format follows the extension, e.g. PNG).
      names: the tensors' names (e.g. parameter paths), one per column, or
        None for their indices.
      clipped: None, or a 1-D sequence of booleans (or 0/1), one per step:
        the steps the clip rescaled, skipped or zeroed.

    Returns:
      ``path``.

    Raises:
      ImportError: if matplotlib is not installed.
      ValueError: if ``norms`` is not 2-D, or ``names`` / ``clipped`` do not
        match its columns / rows.

    Example:
      >>> import os, tempfile
      >>> import numpy as np
      >>> import optaxclip as oc
      >>> norms = np.exp(np.random.default_rng(0).normal(size=(50, 3)))
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     out = os.path.join(folder, "tensors.png")
      ...     path = oc.plot_tensor_norms(norms, out, ["embed", "attn", "head"],
      ...                                 clipped=norms.max(axis=1) > 3)
      ...     print(path == out, os.path.getsize(out) > 0)
      True True
    """
    values = np.asarray(norms, dtype=np.float64)
    if values.ndim != 2 or not values.size:
        raise ValueError(
            "`norms` must be a non-empty 2-D array with one row per step and "
            f"one column per tensor; got shape {values.shape}."
        )
    steps, tensors = values.shape
    labels = [str(i) for i in range(tensors)] if names is None else list(names)
    if len(labels) != tensors:
        raise ValueError(
            f"`names` has {len(labels)} entries but `norms` has {tensors} "
            "columns (tensors); pass one name per column."
        )
    marks = None
    if clipped is not None:
        marks = np.asarray(clipped, dtype=bool)
        if marks.shape != (steps,):
            raise ValueError(
                f"`clipped` must have one entry per step ({steps}); got shape "
                f"{marks.shape}."
            )
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "plot_tensor_norms needs matplotlib: `pip install matplotlib` "
            "(or `pip install optaxclip[examples]`)."
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = np.isfinite(values) & (values > 0)
    logs = np.where(finite, np.log10(np.where(finite, values, 1.0)), np.nan)
    height = min(1.2 + 0.22 * tensors, 12.0)
    fig, ax = plt.subplots(figsize=(10, height))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="black")
    image = ax.imshow(
        np.ma.masked_invalid(logs.T), aspect="auto", cmap=cmap,
        interpolation="nearest",
    )  # fmt: skip
    fig.colorbar(image, ax=ax, label="log10 norm", pad=0.01)
    ax.set_yticks(range(tensors), labels, fontsize=7)
    ax.set_xlabel("step")
    if marks is not None and marks.any():
        at = np.flatnonzero(marks)
        ax.plot(at, np.full(at.size, -0.5), "v", color="red", ms=4, clip_on=False,
                label="clipped")  # fmt: skip
        ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 1.12))
    ax.set_title("per-tensor gradient norm", fontsize=10, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _check_percentile(percentile: Any) -> float:
    if isinstance(percentile, bool) or not isinstance(
        percentile, int | float | np.number
    ):
        raise ValueError(
            f"`percentile` must be a number in [0, 100]; got {percentile!r}."
        )
    value = float(percentile)
    if math.isnan(value) or not 0.0 <= value <= 100.0:
        raise ValueError(f"`percentile` must be in [0, 100]; got {percentile!r}.")
    return value


def _as_history(norms: Any, name: str) -> np.ndarray:
    values = np.asarray(norms, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(
            f"`{name}` must be a 1-D history with one norm per step; got shape "
            f"{values.shape}. For per-tensor stats pass one column, e.g. norms[:, i]."
        )
    if values.size == 0:
        raise ValueError(f"`{name}` is empty; record at least one step.")
    return values


def _threshold_lines(thresholds: Any, num_steps: int) -> dict[str, Any]:
    if thresholds is None:
        return {}
    if not isinstance(thresholds, Mapping):
        thresholds = {"threshold": thresholds}
    lines = {}
    for label, value in thresholds.items():
        array = np.asarray(value, dtype=np.float64)
        if array.ndim == 0:
            lines[str(label)] = float(array)
        elif array.shape == (num_steps,):
            lines[str(label)] = array
        else:
            raise ValueError(
                f"`thresholds[{label!r}]` must be a number or have one entry per "
                f"step ({num_steps}); got shape {array.shape}."
            )
    return lines


def _reasoning(
    percentile: float,
    threshold: float,
    clipped: float,
    median: float,
    max_norm: float,
    steps: int,
) -> str:
    spread = max_norm / median if median > 0 else math.inf
    text = (
        f"AutoClip (Seetharaman et al. 2020, arXiv:2007.14469) clips at "
        f"percentile {percentile:g} of the norms seen so far; over these {steps} "
        f"finite steps that is {threshold:.4g}, which would have rescaled "
        f"{100 * clipped:.0f}% of them. "
    )
    if spread > 10:
        text += (
            f"The largest norm is {spread:.0f}x the median ({median:.4g}): the run "
            "has spikes, which any threshold near the median removes. "
        )
    else:
        text += f"The largest norm is {spread:.1f}x the median ({median:.4g}). "
    text += (
        "Norms usually shrink as training proceeds, so a threshold taken from an "
        "early window clips less later on; an adaptive rule "
        "(oc.rules.percentile, oc.rules.zscore) follows the run instead."
    )
    return text
