"""Tests for suggest_threshold and plot_norm_history."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optaxclip as oc

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def reference_percentile(values, p):
    """Linear interpolation between the closest ranks (NumPy's default)."""
    x = sorted(float(v) for v in values)
    rank = p / 100 * (len(x) - 1)
    lo = int(np.floor(rank))
    hi = min(lo + 1, len(x) - 1)
    return x[lo] + (rank - lo) * (x[hi] - x[lo])


def test_threshold_is_the_percentile_of_the_finite_norms():
    norms = [4.0, 1.0, np.nan, 3.0, np.inf, 2.0, 100.0]
    report = oc.suggest_threshold(norms, percentile=25.0)
    finite = [4.0, 1.0, 3.0, 2.0, 100.0]
    assert report.threshold == pytest.approx(reference_percentile(finite, 25.0))
    assert report.percentile == 25.0
    assert report.num_steps == 7
    assert report.num_nonfinite == 2
    assert report.max_norm == 100.0
    assert report.clipped_fraction == pytest.approx(3 / 5)


def test_default_percentile_is_autoclips_ten():
    norms = np.linspace(1.0, 2.0, 11)
    report = oc.suggest_threshold(norms)
    assert report.percentile == 10.0
    assert report.threshold == pytest.approx(1.1)


def test_reported_percentiles_cover_the_spread():
    norms = np.random.default_rng(0).lognormal(size=101)
    report = oc.suggest_threshold(norms, percentile=37.0)
    for p in (1, 5, 10, 25, 50, 75, 90, 95, 99, 37):
        assert report.percentiles[float(p)] == pytest.approx(
            reference_percentile(norms, p)
        )
    assert list(report.percentiles) == sorted(report.percentiles)


@settings(max_examples=25)
@given(
    norms=st.lists(
        st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=50,
    ),
    percentile=st.floats(0.0, 100.0),
)
def test_matches_reference_on_random_histories(norms, percentile):
    report = oc.suggest_threshold(norms, percentile)
    expected = reference_percentile(norms, percentile)
    assert report.threshold == pytest.approx(expected, rel=1e-9, abs=1e-9)
    above = sum(v > report.threshold for v in norms) / len(norms)
    assert report.clipped_fraction == pytest.approx(above)
    assert min(norms) <= report.threshold <= max(norms)


def test_spiky_history_is_called_out_in_the_reasoning():
    spiky = oc.suggest_threshold([1.0] * 50 + [500.0])
    calm = oc.suggest_threshold(np.linspace(1.0, 2.0, 51))
    assert "spikes" in spiky.reasoning
    assert "spikes" not in calm.reasoning
    assert "AutoClip" in spiky.reasoning and "arXiv:2007.14469" in spiky.reasoning


def test_report_prints_a_summary():
    text = str(oc.suggest_threshold([1.0, 2.0, 3.0, 4.0, np.nan], percentile=50.0))
    assert "suggested threshold: 2.5" in text
    assert "1 non-finite" in text
    assert "p50" in text and "p99" in text
    assert "AutoClip" in text


def test_works_on_a_history_recorded_from_stats():
    tx = oc.clip_by_global_norm(1.0)
    grads = (
        jax.random.normal(jax.random.key(0), (30, 5)) * jnp.arange(1.0, 31.0)[:, None]
    )

    def step(state, g):
        _, state = tx.update({"w": g}, state)
        return state, oc.stats(state)[0].norm

    _, norms = jax.lax.scan(step, tx.init({"w": grads[0]}), grads)
    expected_norms = [float(np.linalg.norm(np.asarray(g))) for g in grads]
    np.testing.assert_allclose(norms, expected_norms, rtol=1e-6)
    report = oc.suggest_threshold(norms)
    assert report.threshold == pytest.approx(
        reference_percentile(expected_norms, 10.0), rel=1e-6
    )


@pytest.mark.parametrize("percentile", [-0.1, 100.5, float("nan"), True, "10", None])
def test_bad_percentile_raises(percentile):
    with pytest.raises(ValueError, match="percentile"):
        oc.suggest_threshold([1.0, 2.0], percentile)


@pytest.mark.parametrize(
    "norms, match",
    [
        ([], "empty"),
        (np.ones((3, 2)), r"1-D.*\(3, 2\)"),
        (1.0, r"1-D"),
        ([np.nan, np.inf], "no finite"),
        ([1.0, -2.0], "non-negative"),
    ],
)
def test_bad_norms_raise(norms, match):
    with pytest.raises(ValueError, match=match):
        oc.suggest_threshold(norms)


@pytest.mark.parametrize(
    "thresholds",
    [
        None,
        1.5,
        np.linspace(1.0, 2.0, 40),
        {"p10": 0.5, "adaptive": np.linspace(1.0, 2.0, 40)},
    ],
)
def test_plot_writes_a_png(tmp_path, thresholds):
    norms = np.exp(np.random.default_rng(1).normal(size=40))
    norms[7] = np.nan
    path = str(tmp_path / "history.png")
    assert oc.plot_norm_history(norms, path, thresholds) == path
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_plot_rejects_a_threshold_of_the_wrong_length(tmp_path):
    with pytest.raises(ValueError, match=r"thresholds\['threshold'\].*\(3,\)"):
        oc.plot_norm_history(np.ones(5), str(tmp_path / "x.png"), np.ones(3))


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        oc.plot_norm_history(np.ones(5), str(tmp_path / "x.png"))
