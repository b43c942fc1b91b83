"""optaxclip: every gradient-clipping method as an ``optax.GradientTransformation``.

Scopes (what is measured) take a threshold that is a number, an
``optax.Schedule`` or a rule from [`optaxclip.rules`][optaxclip.rules] (how the bound
adapts to the run).
"""

from . import rules as rules
from ._clipping import AdamWClipState as AdamWClipState
from ._clipping import ClippyState as ClippyState
from ._clipping import SpamClipState as SpamClipState
from ._clipping import StableSpamClipState as StableSpamClipState
from ._clipping import adamw_clip as adamw_clip
from ._clipping import adaptive_grad_clip as adaptive_grad_clip
from ._clipping import clip as clip
from ._clipping import clip_by_block_rms as clip_by_block_rms
from ._clipping import clip_by_global_norm as clip_by_global_norm
from ._clipping import clip_by_norm as clip_by_norm
from ._clipping import clip_by_spectral_norm as clip_by_spectral_norm
from ._clipping import clip_by_value as clip_by_value
from ._clipping import clippy as clippy
from ._clipping import spam_clip as spam_clip
from ._clipping import stable_spam_clip as stable_spam_clip
from ._clipping import trust_ratio_clip as trust_ratio_clip
from ._core import ClipState as ClipState
from ._guards import SkipNonfiniteState as SkipNonfiniteState
from ._guards import SkipSpikesState as SkipSpikesState
from ._guards import skip_nonfinite as skip_nonfinite
from ._guards import skip_spikes as skip_spikes
from ._metrics import metrics as metrics
from ._metrics import nonfinite_paths as nonfinite_paths
from ._norms import global_norm as global_norm
from ._norms import unitwise_norm as unitwise_norm
from ._per_example import clip_per_example as clip_per_example
from ._per_example import per_example_global_norm_clip as per_example_global_norm_clip
from ._per_example import per_example_layer_norm_clip as per_example_layer_norm_clip
from ._presets import adagc as adagc
from ._presets import autoclip as autoclip
from ._presets import clip_update_rms as clip_update_rms
from ._presets import gradient_stabilizer as gradient_stabilizer
from ._presets import olmo_adaptive_clip as olmo_adaptive_clip
from ._presets import quantile_clip as quantile_clip
from ._presets import zclip as zclip
from ._stats import ClipStats as ClipStats
from ._stats import stats as stats
from .diagnostics import ThresholdReport as ThresholdReport
from .diagnostics import plot_norm_history as plot_norm_history
from .diagnostics import plot_tensor_norms as plot_tensor_norms
from .diagnostics import suggest_threshold as suggest_threshold

__version__ = "0.1.0"

__all__ = [
    "AdamWClipState",
    "ClipState",
    "ClipStats",
    "ClippyState",
    "SkipNonfiniteState",
    "SkipSpikesState",
    "SpamClipState",
    "StableSpamClipState",
    "ThresholdReport",
    "adagc",
    "adamw_clip",
    "adaptive_grad_clip",
    "autoclip",
    "clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_spectral_norm",
    "clip_by_value",
    "clip_per_example",
    "clip_update_rms",
    "clippy",
    "global_norm",
    "gradient_stabilizer",
    "metrics",
    "nonfinite_paths",
    "olmo_adaptive_clip",
    "per_example_global_norm_clip",
    "per_example_layer_norm_clip",
    "plot_norm_history",
    "plot_tensor_norms",
    "quantile_clip",
    "rules",
    "skip_nonfinite",
    "skip_spikes",
    "spam_clip",
    "stable_spam_clip",
    "stats",
    "suggest_threshold",
    "trust_ratio_clip",
    "unitwise_norm",
    "zclip",
]
